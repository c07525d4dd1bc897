//! The message channel (contract §3): broadcasts, the feed, `ready: message`, a worker
//! that never reads, and real Node and Python workers.

mod common;

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;

use common::config::{Config, Service};
use common::{DEADLINE, Lb, alive, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn repo() -> &'static str {
    env!("CARGO_MANIFEST_DIR")
}

/// lb's resident memory stays far below what an unbounded queue would reach.
fn assert_memory_bounded(lb: &Lb) {
    let status = std::fs::read_to_string(format!("/proc/{}/status", lb.pid())).expect("lb status");
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .trim()
                .strip_suffix(" kB")?
                .parse()
                .ok()
        })
        .expect("VmRSS");
    assert!(rss_kib < 200 * 1024, "lb uses {rss_kib} KiB");
}

/// `GET /` over HTTP/1.0; returns the body.
fn get(addr: SocketAddr) -> String {
    let mut stream = common::connect(addr);
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: lb\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.trim().to_owned())
        .unwrap_or_default()
}

fn node_service(count: usize, feed: &str) -> String {
    format!(
        r#"
services:
  - name: app
    listen: {{listen}}
    workers:
      command: ["node", "server.js"]
      cwd: {repo}/examples/node-cluster
      count: {count}
      ready: message
      env: {{ WORK: "0" }}
      restart_backoff: {{ initial: 100ms, max: 100ms }}
{feed}"#,
        repo = repo()
    )
}

#[test]
fn lb_broadcast_reaches_every_node_worker() {
    let lb = Lb::start(&node_service(3, ""));
    lb.wait_ready(3);
    let out = lb.cli(&["broadcast", r#"{"usersCount":25}"#]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "delivered to 3 workers\n"
    );
    // Delivered is not yet read: a worker may answer a request before its event loop
    // gets to the message, so poll until every worker has it.
    let mut bodies: Vec<String> = Vec::new();
    wait_until("every worker to have the broadcast value", DEADLINE, || {
        bodies = (0..3).map(|_| get(lb.listen)).collect();
        bodies.iter().all(|b| b.starts_with("Users: 25 "))
    });
    let workers: std::collections::HashSet<&str> = bodies
        .iter()
        .filter_map(|b| b.split("worker ").nth(1))
        .collect();
    assert_eq!(
        workers.len(),
        3,
        "round-robin reached all three: {bodies:?}"
    );
}

#[test]
fn fed_values_reach_workers_and_a_restarted_worker_starts_with_the_latest() {
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("count");
    // 5, 25, 625, then silence: after that, only lb's memory of the last value can
    // give a new worker 625.
    let feed = format!(
        r#"      feed:
        command: 'n=$(cat {state} 2>/dev/null || echo 0); case $n in 0) n=5;; 5) n=25;; 25) n=625;; *) exit 0;; esac; echo $n > {state}; echo "{{\"usersCount\": $n}}"'
        every: 300ms
"#,
        state = state.display()
    );
    let lb = Lb::start(&node_service(2, &feed));
    lb.wait_ready(2);
    wait_until("both workers serve 625", DEADLINE, || {
        (0..2).all(|_| get(lb.listen).starts_with("Users: 625 "))
    });
    let old = lb.worker_pid(0);
    kill(Pid::from_raw(old), Signal::SIGKILL).expect("kill worker 0");
    wait_until("worker 0 back", DEADLINE, || {
        lb.worker_pid(0) != old && lb.lines("worker ready").len() >= 3
    });
    let status: serde_json::Value =
        serde_json::from_str(&lb.admin("GET", "/status", b"").1).expect("status");
    let port = status["services"][0]["workers"][0]["port"]
        .as_u64()
        .expect("port") as u16;
    let first = get(SocketAddr::from(([127, 0, 0, 1], port)));
    assert!(
        first.starts_with("Users: 625 (worker 0"),
        "first answer of the new worker: {first}"
    );
}

#[test]
fn a_worker_that_never_reads_its_channel_never_slows_lb() {
    let lb = Lb::start(
        r#"
services:
  - name: deaf
    listen: {listen}
    workers:
      command: ["{worker}"]
      count: 2
      feed:
        command: ["seq", "1", "100000"]
        every: 1h
"#,
    );
    lb.wait_ready(2);
    let dropped = || {
        let text = lb.admin("GET", "/metrics", b"").1;
        text.lines()
            .find(|l| l.starts_with("lb_messages_dropped_total{service=\"deaf\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    wait_until("100,000 values fed and mostly dropped", DEADLINE, || {
        dropped() > 150_000.0
    });
    let started = std::time::Instant::now();
    for _ in 0..200 {
        assert_eq!(common::echo(lb.listen, b"still fast"), b"still fast");
    }
    let took = started.elapsed();
    assert!(
        took < std::time::Duration::from_secs(10),
        "200 connections took {took:?}"
    );
    assert_memory_bounded(&lb);
    assert_eq!(
        lb.lines("not reading its channel").len(),
        2,
        "one line per worker, not per message"
    );
}

#[test]
fn ready_message_gates_connections_and_times_out() {
    let lb = Lb::start(
        r#"
services:
  - name: web
    listen: {listen}
    timeouts: { connect: 10s }
    workers:
      command: ["{worker}"]
      count: 1
      ready: message
      env: { READY_MESSAGE_AFTER_MS: "800" }
"#,
    );
    lb.wait_log("listening");
    // The worker listens at once, but lb holds this client until it says "ready".
    assert_eq!(common::echo(lb.listen, b"after ready"), b"after ready");
    lb.wait_log("[web/0] accepted a connection");
    let log = lb.log();
    let ready_at = log
        .find("[web/0] sending ready")
        .expect("the worker said ready");
    let accepted_at = log
        .find("[web/0] accepted a connection")
        .expect("the connection arrived");
    assert!(
        ready_at < accepted_at,
        "a connection reached the worker before it was ready:\n{log}"
    );

    let silent = Lb::start(
        r#"
services:
  - name: web
    listen: {listen}
    workers:
      command: ["{worker}"]
      count: 1
      ready: message
      ready_timeout: 1s
      env: { READY_MESSAGE_AFTER_MS: "600000" }
"#,
    );
    silent.wait_log("worker not ready within ready_timeout; killing it");
    assert!(silent.lines("[web/0] accepted a connection").is_empty());
}

#[test]
fn a_python_worker_receives_a_broadcast_and_its_answer_is_logged() {
    let config = format!(
        r#"
services:
  - name: py
    listen: {{listen}}
    workers:
      command: ["python3", "-u", "worker.py"]
      cwd: {}/examples/python
      count: 2
"#,
        repo()
    );
    let mut command_env = Lb::start_with_env(&config, &[("LB_LOG", "debug")]);
    let lb = &mut command_env;
    lb.wait_ready(2);
    let out = lb.cli(&["broadcast", r#"{"hello":"python"}"#]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "delivered to 2 workers\n",
        "{out:?}"
    );
    wait_until("both answers logged", DEADLINE, || {
        lb.lines(r#"content={"ack":{"hello":"python"}}"#).len() >= 2
    });
    let answers = lb.lines("message from worker");
    assert!(
        answers.iter().any(|l| l.contains("worker=py/0"))
            && answers.iter().any(|l| l.contains("worker=py/1"))
    );
    let body = get(lb.listen);
    assert!(
        body.contains(r#""last_message": {"hello": "python"}"#),
        "{body}"
    );
    for (_, pid) in lb.started_workers() {
        assert!(alive(pid));
    }
}

#[test]
fn a_ready_message_worker_is_not_killed_when_its_ready_timeout_passes() {
    let lb = Lb::start(
        r#"
services:
  - name: web
    listen: {listen}
    workers:
      command: ["{worker}"]
      count: 1
      ready: message
      ready_timeout: 700ms
      env: { READY_MESSAGE_AFTER_MS: "50" }
"#,
    );
    lb.wait_ready(1);
    let pid = lb.worker_pid(0);
    // Well past the deadline it met: the deadline must not fire against it.
    let ready = std::time::Instant::now();
    wait_until("three ready_timeouts to pass", DEADLINE, || {
        ready.elapsed() > std::time::Duration::from_millis(2100)
    });
    assert!(
        lb.lines("not ready within ready_timeout").is_empty(),
        "{}",
        lb.log()
    );
    assert_eq!(lb.worker_pid(0), pid);
    assert!(alive(pid));
}

#[test]
fn a_feed_run_that_hangs_is_killed_with_its_children_and_its_output_still_counts() {
    let lb = Lb::start_with_env(
        r#"
services:
  - name: web
    listen: {listen}
    workers:
      command: ["{worker}"]
      count: 1
      feed:
        command: "sleep 1001 & echo '{\"n\": 1}'; exec sleep 1002"
        every: 300ms
"#,
        &[("LB_LOG", "debug")],
    );
    lb.wait_ready(1);
    wait_until("three hung runs killed", DEADLINE, || {
        lb.lines("did not finish within `every`; killed it").len() >= 3
    });
    wait_until("the killed runs' output broadcast", DEADLINE, || {
        lb.lines("feed: broadcast")
            .iter()
            .any(|l| l.contains("values=1"))
    });
    let leftovers = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|cmdline| cmdline.starts_with(b"sleep\x00100"))
        .count();
    assert!(
        leftovers <= 2,
        "{leftovers} sleeps left behind by killed feed runs"
    );
}

#[test]
fn a_worker_flooding_its_channel_cannot_bloat_or_stall_lb() {
    let lb = Lb::start(
        r#"
services:
  - name: chatty
    listen: {listen}
    workers:
      command: "yes 1 >&3 & exec {worker}"
      count: 1
"#,
    );
    lb.wait_ready(1);
    for _ in 0..20 {
        let asked = std::time::Instant::now();
        assert_eq!(lb.admin("GET", "/status", b"").0, 200);
        assert!(
            asked.elapsed() < std::time::Duration::from_secs(2),
            "/status took {:?}",
            asked.elapsed()
        );
        assert_eq!(common::echo(lb.listen, b"served"), b"served");
    }
    assert_memory_bounded(&lb);
}

#[test]
fn a_broadcast_reaches_a_worker_that_is_still_starting() {
    let lb = Lb::start(
        r#"
services:
  - name: web
    listen: {listen}
    workers:
      command: ["{worker}"]
      count: 1
      ready: message
      env: { READY_MESSAGE_AFTER_MS: "20000" }
"#,
    );
    lb.wait_log("worker started");
    let out = lb.cli(&["broadcast", r#"{"flag":true}"#]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "delivered to 1 workers\n"
    );
    assert!(lb.lines("worker ready").is_empty(), "it was still starting");
}

#[test]
fn a_broadcast_counts_only_workers_that_took_it() {
    let config = Config::new()
        .service(Service::workers("open"))
        .service(
            Service::workers("closed")
                .listen(format!("127.0.0.1:{}", common::free_port()))
                .env("CLOSE_CHANNEL", "1"),
        )
        .yaml();
    let lb = Lb::start(&config);
    lb.wait_ready(2);
    // lb sees the closed channel as soon as it reads its end.
    wait_until("the closed channel to count for nothing", DEADLINE, || {
        let out = lb.cli(&["broadcast", "1"]);
        String::from_utf8_lossy(&out.stdout) == "delivered to 1 workers\n"
    });
    let (code, body) = lb.admin("POST", "/broadcast?service=closed", b"2");
    assert_eq!((code, body.as_str()), (200, "{\"delivered\":0}\n"));
}
