//! SIGUSR2 replaces every worker one at a time under load, without a failed exchange;
//! draining lets open connections finish; a bad release halts the rollout.

mod common;

use std::io::{Read, Write};

use common::load::Load;
use common::{DEADLINE, Lb, alive, connect, wait_until};
use nix::sys::signal::Signal;

const THREE_ECHO_WORKERS: &str = r#"
services:
  - name: web
    listen: {listen}
    workers:
      command: ["{worker}"]
      count: 3
      drain_timeout: 10s
"#;

#[test]
fn sigusr2_replaces_every_worker_under_load_without_a_failed_exchange() {
    let lb = Lb::start(THREE_ECHO_WORKERS);
    lb.wait_ready(3);
    let before = lb.ready_pids();
    let load = Load::start(lb.listen, 4, 4);
    load.wait_for(300);
    // Rollout after rollout for about ten seconds of continuous load.
    let started = std::time::Instant::now();
    let mut round = 0;
    while round < 2 || started.elapsed() < std::time::Duration::from_secs(10) {
        round += 1;
        lb.signal(Signal::SIGUSR2);
        wait_until(&format!("rollout {round} to finish"), DEADLINE, || {
            lb.lines("rollout finished").len() >= round
        });
        load.wait_for(300);
    }
    let report = load.stop();
    assert!(
        report.failures.is_empty(),
        "{} ok, failures: {:?}\n{}",
        report.ok,
        report.failures,
        lb.log()
    );
    let after = lb.ready_pids();
    assert_eq!(after.len(), 3);
    for (slot, pid) in &after {
        assert_ne!(before[slot], *pid, "slot {slot} was not replaced");
        assert!(alive(*pid));
        assert!(
            !alive(before[slot]),
            "old worker of slot {slot} still running"
        );
    }
    assert_eq!(
        lb.lines("retired worker stopped").len(),
        3 * round,
        "{}",
        lb.log()
    );
    eprintln!(
        "{} exchanges over {round} rollouts in {:?}, none failed",
        report.ok,
        started.elapsed()
    );
}

#[test]
fn a_connection_open_across_a_rollout_keeps_working_until_it_closes_itself() {
    let lb = Lb::start(THREE_ECHO_WORKERS.replace("count: 3", "count: 1").as_str());
    lb.wait_ready(1);
    let old = lb.worker_pid(0);
    let mut stream = connect(lb.listen);
    let mut exchange = |n: usize| {
        let msg = format!("message {n}\n");
        stream
            .write_all(msg.as_bytes())
            .expect("send on the old connection");
        let mut reply = vec![0u8; msg.len()];
        stream
            .read_exact(&mut reply)
            .expect("reply on the old connection");
        assert_eq!(reply, msg.as_bytes());
    };
    exchange(0);
    lb.signal(Signal::SIGUSR2);
    lb.wait_log("worker out of rotation, draining");
    // The old worker is out of rotation, and still serves this connection.
    for n in 1..=20 {
        exchange(n);
    }
    assert!(alive(old));
    drop(stream);
    lb.wait_log("rollout finished");
    assert!(!lb.lines("worker drained").is_empty(), "{}", lb.log());
    assert!(lb.lines("drain_timeout passed").is_empty(), "{}", lb.log());
    wait_until("old worker stopped", DEADLINE, || !alive(old));
}

#[test]
fn a_connection_outliving_drain_timeout_is_closed_and_the_old_worker_stopped() {
    let lb = Lb::start(
        &THREE_ECHO_WORKERS
            .replace("count: 3", "count: 1")
            .replace("drain_timeout: 10s", "drain_timeout: 1s"),
    );
    lb.wait_ready(1);
    let old = lb.worker_pid(0);
    let mut stream = connect(lb.listen);
    stream.write_all(b"hold\n").expect("send");
    let mut reply = [0u8; 5];
    stream.read_exact(&mut reply).expect("echo");
    let signalled = std::time::Instant::now();
    lb.signal(Signal::SIGUSR2);
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .expect("lb closes the connection at the drain deadline");
    let held = signalled.elapsed();
    assert!(
        held >= std::time::Duration::from_millis(900),
        "closed after {held:?}, before drain_timeout"
    );
    lb.wait_log("rollout finished");
    assert_eq!(lb.lines("drain_timeout passed").len(), 1, "{}", lb.log());
    wait_until("old worker stopped", DEADLINE, || !alive(old));
    assert_ne!(lb.worker_pid(0), old);
}

#[test]
fn a_release_that_never_gets_ready_halts_the_rollout_and_old_workers_keep_serving() {
    let config = THREE_ECHO_WORKERS.replace(
        "drain_timeout: 10s",
        "drain_timeout: 10s\n      ready_timeout: 1s",
    );
    let lb = Lb::start(&config);
    lb.wait_ready(3);
    let before = lb.ready_pids();
    let load = Load::start(lb.listen, 3, 3);
    load.wait_for(200);
    // The new release starts, but never listens on its PORT.
    lb.rewrite_config(&config.replace(r#"command: ["{worker}"]"#, r#"command: ["sleep", "600"]"#));
    lb.signal(Signal::SIGUSR2);
    lb.wait_log("rollout halted");
    load.wait_for(200);
    let report = load.stop();
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(
        lb.ready_pids(),
        before,
        "old workers replaced despite the halt"
    );
    for pid in before.values() {
        assert!(alive(*pid));
    }
    let halted = &lb.lines("rollout halted")[0];
    assert!(
        halted.contains("not ready within ready_timeout") && halted.contains("web/0"),
        "{halted}"
    );
    // Only the first slot was tried, and its replacement was killed.
    let tried = lb.lines("rollout: replacement started");
    assert_eq!(tried.len(), 1, "{tried:?}");
    let replacement: i32 = common::field(&tried[0], "pid")
        .expect("pid")
        .parse()
        .expect("pid");
    wait_until("the failed replacement to be killed", DEADLINE, || {
        !alive(replacement)
    });
}

#[test]
fn sigusr2_during_a_rollout_runs_one_more_rollout_after_it() {
    let lb = Lb::start(&THREE_ECHO_WORKERS.replace("count: 3", "count: 2").replace(
        r#"command: ["{worker}"]"#,
        r#"command: ["{worker}"]
      env: { START_DELAY_MS: "300" }"#,
    ));
    lb.wait_ready(2);
    lb.signal(Signal::SIGUSR2);
    lb.wait_log("rollout started");
    lb.signal(Signal::SIGUSR2);
    lb.signal(Signal::SIGUSR2);
    wait_until("two rollouts", DEADLINE, || {
        lb.lines("rollout finished").len() >= 2
    });
    // The kernel may merge the two pending signals; either way they coalesce into one
    // more rollout, never a concurrent one.
    assert!(!lb.lines("one more rollout will follow").is_empty());
    // Both rollouts replaced both slots: 2 initial workers + 4 replacements, no overlap.
    assert_eq!(lb.started_workers().len(), 6, "{}", lb.log());
    assert_eq!(lb.lines("rollout started").len(), 2);
    let replaced: Vec<String> = lb.lines("rollout: replacement started");
    assert_eq!(replaced.len(), 4, "{replaced:?}");
}

#[test]
fn a_replacement_that_exits_at_once_halts_the_rollout() {
    let lb = Lb::start(THREE_ECHO_WORKERS);
    lb.wait_ready(3);
    let before = lb.ready_pids();
    lb.rewrite_config(
        &THREE_ECHO_WORKERS.replace(r#"command: ["{worker}"]"#, r#"command: "exit 3""#),
    );
    lb.signal(Signal::SIGUSR2);
    lb.wait_log("rollout halted");
    let halted = &lb.lines("rollout halted")[0];
    assert!(
        halted.contains("exited (exit code 3) before it was ready"),
        "{halted}"
    );
    assert_eq!(lb.ready_pids(), before);
    assert_eq!(
        common::echo(lb.listen, b"old workers serve"),
        b"old workers serve"
    );
}

#[test]
fn sigusr2_with_an_invalid_config_changes_nothing() {
    let lb = Lb::start(THREE_ECHO_WORKERS);
    lb.wait_ready(3);
    let before = lb.ready_pids();
    lb.rewrite_config(&THREE_ECHO_WORKERS.replace("count: 3", "count: lots"));
    lb.signal(Signal::SIGUSR2);
    lb.wait_log("reload rejected");
    assert!(lb.lines("rollout started").is_empty());
    assert_eq!(lb.ready_pids(), before);
    assert_eq!(lb.started_workers().len(), 3);
}

const TWO_SLOW_STARTING: &str = r#"
services:
  - name: web
    listen: {listen}
    workers:
      command: ["{worker}"]
      count: 2
      ready_timeout: 2s
      env: { START_DELAY_MS: "600" }
"#;

/// Every connection answers with the `HELLO=1` line: every worker runs the new settings.
fn all_workers_say_hello(lb: &Lb) -> bool {
    (0..6).all(|_| common::hello(lb.listen).is_ok_and(|l| l.starts_with("id=")))
}

#[test]
fn a_reload_during_a_rollout_also_reaches_the_slot_being_replaced() {
    let lb = Lb::start(TWO_SLOW_STARTING);
    lb.wait_ready(2);
    lb.signal(Signal::SIGUSR2);
    lb.wait_log("rollout: replacement started");
    lb.rewrite_config(
        &TWO_SLOW_STARTING.replace(r#"{ START_DELAY_MS"#, r#"{ HELLO: "1", START_DELAY_MS"#),
    );
    lb.signal(Signal::SIGHUP);
    lb.wait_log("rollout finished");
    assert!(all_workers_say_hello(&lb), "{}", lb.log());
}

#[test]
fn a_restart_requested_during_a_halting_rollout_still_runs_and_unreplaced_slots_keep_their_settings()
 {
    let lb = Lb::start(TWO_SLOW_STARTING);
    lb.wait_ready(2);
    // A bad release: it never listens.
    lb.rewrite_config(
        &TWO_SLOW_STARTING.replace(r#"command: ["{worker}"]"#, r#"command: ["sleep", "600"]"#),
    );
    lb.signal(Signal::SIGUSR2);
    lb.wait_log("rollout: replacement started");
    // A slot the halted rollout never reached crashes: it comes back with the settings
    // it ran, not the bad release.
    lb.wait_log("rollout halted");
    let slot1 = lb.worker_pid(1);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(slot1), Signal::SIGKILL)
        .expect("kill slot 1");
    wait_until("slot 1 back", DEADLINE, || {
        lb.worker_pid(1) != slot1 && lb.lines("worker ready").len() >= 3
    });
    assert_eq!(common::echo(lb.listen, b"still up"), b"still up");

    // The fix ships while a second bad rollout runs: its restart follows the halt.
    lb.signal(Signal::SIGUSR2);
    wait_until("second rollout started", DEADLINE, || {
        lb.lines("rollout started").len() >= 2
    });
    lb.rewrite_config(
        &TWO_SLOW_STARTING.replace(r#"{ START_DELAY_MS"#, r#"{ HELLO: "1", START_DELAY_MS"#),
    );
    lb.signal(Signal::SIGUSR2);
    lb.wait_log("one more rollout will follow");
    lb.wait_log("rollout finished");
    assert_eq!(lb.lines("rollout halted").len(), 2, "{}", lb.log());
    assert!(all_workers_say_hello(&lb), "{}", lb.log());
}

const TWO_WORKERS_WITH_ENV: &str = r#"
services:
  - name: web
    listen: {listen}
    workers:
      command: ["{worker}"]
      count: 2
      env: { V: "1", START_DELAY_MS: "0" }
"#;

#[test]
fn a_restart_after_a_config_edit_replaces_each_worker_once() {
    let lb = Lb::start(TWO_WORKERS_WITH_ENV);
    lb.wait_ready(2);
    lb.rewrite_config(&TWO_WORKERS_WITH_ENV.replace(r#"V: "1""#, r#"V: "2""#));
    let out = lb.cli(&["restart"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "rollout finished: 2 workers replaced"
    );
    assert_eq!(lb.lines("rollout: replacement started").len(), 2);
}

#[test]
fn a_restart_of_an_unknown_service_changes_nothing() {
    let lb = Lb::start(TWO_WORKERS_WITH_ENV);
    lb.wait_ready(2);
    let before = lb.ready_pids();
    lb.rewrite_config(&TWO_WORKERS_WITH_ENV.replace(r#"V: "1""#, r#"V: "2""#));
    let out = lb.cli(&["restart", "--service", "wbe"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(r#"no service named "wbe""#),
        "{out:?}"
    );
    assert!(lb.lines("reload applied").is_empty(), "{}", lb.log());
    assert!(lb.lines("rollout: replacement started").is_empty());
    assert_eq!(lb.ready_pids(), before);
}

#[test]
fn a_change_reverted_during_its_rollout_leaves_the_original_workers() {
    let lb = Lb::start(TWO_WORKERS_WITH_ENV);
    lb.wait_ready(2);
    let before = lb.ready_pids();
    // A slow release: its first replacement is still starting when the change is undone.
    lb.rewrite_config(&TWO_WORKERS_WITH_ENV.replace(
        r#"V: "1", START_DELAY_MS: "0""#,
        r#"V: "2", START_DELAY_MS: "3000""#,
    ));
    lb.signal(Signal::SIGHUP);
    lb.wait_log("rollout: replacement started");
    lb.rewrite_config(TWO_WORKERS_WITH_ENV);
    lb.signal(Signal::SIGHUP);
    lb.wait_log("replacement outdated by a reload");
    let discarded: i32 = common::field(&lb.lines("rollout: replacement started")[0], "pid")
        .and_then(|p| p.parse().ok())
        .expect("pid of the replacement");
    wait_until("the outdated replacement gone", DEADLINE, || {
        !alive(discarded)
    });
    assert_eq!(
        lb.lines("rollout: replacement started").len(),
        1,
        "{}",
        lb.log()
    );
    assert_eq!(lb.ready_pids(), before);
    assert!(before.values().all(|p| alive(*p)));
}

#[test]
fn sigterm_while_a_replacement_starts_is_no_halted_rollout() {
    let mut lb = Lb::start(TWO_WORKERS_WITH_ENV);
    lb.wait_ready(2);
    lb.rewrite_config(
        &TWO_WORKERS_WITH_ENV.replace(r#"START_DELAY_MS: "0""#, r#"START_DELAY_MS: "5000""#),
    );
    lb.signal(Signal::SIGUSR2);
    lb.wait_log("rollout: replacement started");
    lb.signal(Signal::SIGTERM);
    assert!(lb.wait_exit().success());
    assert!(lb.lines("rollout halted").is_empty(), "{}", lb.log());
    assert_eq!(lb.lines("rollout abandoned").len(), 1, "{}", lb.log());
}
