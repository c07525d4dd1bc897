//! lb keeps its workers alive: crashed ones come back in their slot, crash loops back off.

mod common;

use std::time::{Duration, Instant};

use common::config::{Config, Service};
use common::{DEADLINE, Lb, alive, hello, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

#[test]
fn killed_worker_returns_in_its_slot_and_others_serve_meanwhile() {
    let lb = Lb::start(
        r#"
services:
  - name: web
    listen: {listen}
    workers:
      command: ["{worker}"]
      count: 3
      env: { HELLO: "1" }
      restart_backoff: { initial: 500ms, max: 1s }
"#,
    );
    lb.wait_ready(3);
    let victim = lb.worker_pid(1);
    kill(Pid::from_raw(victim), Signal::SIGKILL).expect("kill worker 1");
    lb.wait_log("worker exited");
    // Connections made while slot 1 is down all succeed, on the other workers, and none
    // is even tried on the dead one: it left rotation when lb reaped it.
    for _ in 0..20 {
        let line = hello(lb.listen).expect("connection while a worker is down");
        assert!(!line.contains(&format!("pid={victim}")), "{line}");
    }
    assert!(
        lb.lines("a connect to the worker failed").is_empty(),
        "{}",
        lb.log()
    );
    wait_until("worker 1 restarted and ready", DEADLINE, || {
        lb.lines("worker ready").len() >= 4
    });
    let replacement = lb.worker_pid(1);
    assert_ne!(replacement, victim);
    assert!(alive(replacement));
    assert!(!alive(victim));
    let exited = lb.lines("worker exited");
    assert_eq!(exited.len(), 1, "{exited:?}");
    assert!(
        exited[0].contains("worker=1") && exited[0].contains("signal SIGKILL"),
        "{exited:?}"
    );
    // The restarted worker takes connections again.
    let seen: Vec<String> = (0..6).map(|_| hello(lb.listen).expect("hello")).collect();
    assert!(
        seen.iter()
            .any(|l| l.contains(&format!("pid={replacement}"))),
        "{seen:?}"
    );
}

/// CPU seconds (user + system) lb has used so far.
fn cpu_seconds(pid: Pid) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("lb stat");
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .expect("stat fields")
        .split_whitespace()
        .collect();
    // After the command name: state is field 0, utime field 11, stime field 12.
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / 100.0
}

#[test]
fn crash_looping_worker_restarts_with_backoff_and_lb_stays_idle() {
    let lb = Lb::start(
        r#"
services:
  - name: crashy
    listen: {listen}
    workers:
      command: "exit 1"
      count: 1
      restart_backoff: { initial: 100ms, max: 30s }
"#,
    );
    lb.wait_log("worker exited");
    let cpu_before = cpu_seconds(lb.pid());
    // Delays of 0.1, 0.2, 0.4 and 0.8 s: five exits take at least 1.5 s. Without backoff
    // they would take milliseconds. Timed by lb's own log, so a test that polls late on
    // a loaded machine measures the same.
    wait_until("five exits", DEADLINE, || {
        lb.lines("worker exited").len() >= 5
    });
    let exits = lb.lines("worker exited");
    let at = |line: &str| {
        let stamp = line.split_whitespace().next().expect("a timestamp");
        humantime::parse_rfc3339_weak(stamp).expect("an RFC 3339 timestamp")
    };
    let window = at(&exits[4])
        .duration_since(at(&exits[0]))
        .expect("in order");
    assert!(
        window >= Duration::from_millis(1500),
        "five exits in {window:?}:\n{}",
        lb.log()
    );
    let delays: Vec<String> = lb
        .lines("worker exited")
        .iter()
        .filter_map(|l| common::field(l, "restart_in").map(str::to_owned))
        .collect();
    assert_eq!(
        delays[..5],
        ["100ms", "200ms", "400ms", "800ms", "1.6s"],
        "{delays:?}"
    );
    let cpu = cpu_seconds(lb.pid()) - cpu_before;
    assert!(
        cpu < 0.3,
        "lb used {cpu}s of CPU in {window:?} of crash loop"
    );
}

#[test]
fn a_new_restart_backoff_applies_to_a_slot_waiting_in_backoff() {
    let config = |backoff: &str| {
        format!(
            r#"
services:
  - name: web
    listen: {{listen}}
    workers:
      command: ["{{worker}}"]
      count: 1
      env: {{ CRASH_WITHIN_MS: "2" }}
      restart_backoff: {backoff}
"#
        )
    };
    let lb = Lb::start(&config("{ initial: 3s, max: 60s }"));
    lb.wait_log("restart_in=3s");
    // The slot waits out its 3 s; its next crash follows the new policy.
    lb.rewrite_config(&config("{ initial: 100ms, max: 200ms }"));
    lb.signal(Signal::SIGHUP);
    lb.wait_log("reload applied");
    wait_until("a second exit", DEADLINE, || {
        lb.lines("worker exited").len() >= 2
    });
    let delays: Vec<String> = lb
        .lines("worker exited")
        .iter()
        .filter_map(|l| common::field(l, "restart_in").map(str::to_owned))
        .collect();
    assert_eq!(delays[..2], ["3s", "100ms"], "{}", lb.log());
}

/// The availability experiment: workers crash at random moments under load. New
/// connections are never refused; only exchanges in flight on a crashing worker may fail.
#[test]
fn random_crashes_under_load_never_refuse_a_new_connection() {
    let lb = Lb::start(
        r#"
services:
  - name: web
    listen: {listen}
    workers:
      command: ["{worker}"]
      count: 3
      env: { CRASH_WITHIN_MS: "1200" }
      restart_backoff: { initial: 50ms, max: 200ms }
    # Clients wait for a ready worker however slowly a loaded machine restarts them.
    timeouts: { connect: 10s }
"#,
    );
    lb.wait_ready(3);
    let load = common::load::Load::start(lb.listen, 4, 2);
    wait_until("ten crashes under load", DEADLINE, || {
        lb.lines("worker exited").len() >= 10
    });
    load.wait_for(100);
    let report = load.stop();
    let crashes = lb.lines("worker exited").len();
    let refused: Vec<_> = report
        .failures
        .iter()
        .filter(|f| !matches!(f, common::load::Failure::Exchange(_)))
        .collect();
    assert!(
        refused.is_empty(),
        "connections refused or wrong replies: {refused:?}"
    );
    // Each crash can break at most the exchanges in flight on that worker: one per client.
    let broken = report.failures.len();
    assert!(
        broken <= crashes * 6,
        "{broken} broken exchanges for {crashes} crashes"
    );
    assert!(report.ok > 100, "only {} exchanges succeeded", report.ok);
    eprintln!(
        "availability: {} ok, {broken} broken in flight, {crashes} crashes",
        report.ok
    );
}

/// A worker killed for missing its `ready_timeout` that is not reaped in time (held
/// here by a tracer that never waits) does not leave its slot empty for good.
#[test]
fn a_worker_stuck_after_sigkill_does_not_leave_its_slot_empty_for_good() {
    let lb = Lb::start(
        &Config::new()
            .service(
                Service::workers("web")
                    .set("ready_timeout", "2s")
                    .set("restart_backoff", "{ initial: 100ms, max: 200ms }")
                    .env("START_DELAY_MS", "60000"),
            )
            .yaml(),
    );
    lb.wait_log("admin API listening");
    let deadline = Instant::now() + Duration::from_secs(10);
    let pid = loop {
        if let Some(pid) = lb.status_workers("web")[0]["pid"].as_i64() {
            break pid as i32;
        }
        assert!(Instant::now() < deadline, "worker started");
        std::thread::sleep(Duration::from_millis(20));
    };
    // A tracer thread that never waits: the killed worker stays unreaped until it exits.
    let tracer = std::thread::spawn(move || {
        nix::sys::ptrace::seize(Pid::from_raw(pid), nix::sys::ptrace::Options::empty())
            .expect("ptrace seize");
        std::thread::sleep(Duration::from_secs(6));
    });
    tracer.join().expect("tracer");
    wait_until("the worker reaped", Duration::from_secs(5), || !alive(pid));
    // Every process is gone and the restart backoff is 200 ms at most: the slot must
    // have a worker again.
    lb.wait_status("a new worker in slot 0", Duration::from_secs(5), |lb| {
        lb.status_workers("web")[0]["pid"].as_i64().is_some()
    });
}
