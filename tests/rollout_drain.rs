//! Rollouts that never wait on clients (contract §3, §4): old workers drain in the
//! background after the drain message, `rollout_watch` halts a bad release, one worker
//! can be replaced on its own, and scale-down drains the same way.

mod common;

use std::time::Duration;

use common::config::{Config, Service};
use common::held::{Held, close_all, one_per_slot};
use common::{Lb, alive, wait_until};
use nix::sys::signal::Signal;

/// What "within a few seconds" may take on a loaded 2-core machine; far below the
/// `drain_timeout: 20s` the held connections could otherwise hold a rollout for.
const QUICK: Duration = Duration::from_secs(10);

/// Three workers that say which process a connection reached, and would let a held
/// connection keep an old worker for 20 s.
fn three_holding_workers() -> Service {
    Service::workers("web")
        .count(3)
        .set("drain_timeout", "20s")
        .set("rollout_watch", "500ms")
        .env("HELLO", "1")
}

/// The drain messages a `CHANNEL_LOG=1` (or the Node script's `message:`) worker of
/// `prefix` logged, as JSON.
fn logged_messages(lb: &Lb, prefix: &str) -> Vec<serde_json::Value> {
    lb.lines(prefix)
        .iter()
        .filter_map(|l| l.split_once(prefix).map(|(_, m)| m.trim()))
        .filter_map(|m| serde_json::from_str(m).ok())
        .collect()
}

/// The one drain message in the log after `prefix`, checked against the contract's
/// shape: `{"lb":"drain","timeout_ms":N}`, N what is left of a 20 s `drain_timeout`.
fn assert_one_drain_message(lb: &Lb, prefix: &str) {
    let messages = logged_messages(lb, prefix);
    assert_eq!(messages.len(), 1, "{messages:?}\n{}", lb.log());
    let message = &messages[0];
    assert_eq!(message["lb"], "drain", "{message}");
    let left = message["timeout_ms"].as_u64().unwrap_or_default();
    assert!(
        (10_000..=20_000).contains(&left),
        "timeout_ms should be what is left of drain_timeout (20 s): {message}"
    );
    assert_eq!(
        message.as_object().map(|o| o.len()),
        Some(2),
        "no other fields: {message}"
    );
}

#[test]
fn a_rollout_does_not_wait_for_connections_held_on_every_old_worker() {
    let lb = Lb::start(&Config::new().service(three_holding_workers()).yaml());
    lb.wait_ready(3);
    let mut held = one_per_slot(lb.listen, 3);
    let old: Vec<(usize, i32)> = held.iter().map(|h| (h.slot, h.pid)).collect();
    assert_eq!(
        lb.ready_slots("web").into_iter().collect::<Vec<_>>(),
        old,
        "the held connections reach the three ready workers"
    );

    let (out, took) = lb.cli_within(&["restart"], QUICK);
    let out = out.unwrap_or_else(|| {
        panic!("lb restart still running after {took:?}: the rollout waits on held connections")
    });
    assert!(out.status.success(), "{out:?}");

    // Every slot has a new worker in rotation; every old one drains beside it, holding
    // its client's connection.
    let ready = lb.ready_slots("web");
    assert_eq!(ready.len(), 3, "{}", lb.status());
    for (slot, pid) in &old {
        assert_ne!(ready[slot], *pid, "slot {slot} was not replaced");
    }
    let workers = lb.status_workers("web");
    let mut draining: Vec<(usize, i32, u64)> = workers
        .iter()
        .filter(|w| w["state"] == "draining")
        .filter_map(|w| {
            let id = w["id"].as_u64()? as usize;
            Some((
                id,
                w["pid"].as_i64()? as i32,
                w["active_connections"].as_u64()?,
            ))
        })
        .collect();
    draining.sort();
    let expected: Vec<_> = old.iter().map(|(slot, pid)| (*slot, *pid, 1)).collect();
    assert_eq!(
        draining, expected,
        "the old workers drain, each holding its client: {workers:?}"
    );

    // The held connections still work, each with the old worker it reached.
    for conn in &mut held {
        conn.exchange();
        assert!(alive(conn.pid));
    }
    // New clients reach only the new workers.
    for _ in 0..6 {
        let fresh = Held::open(lb.listen);
        assert_eq!(
            ready.get(&fresh.slot),
            Some(&fresh.pid),
            "a new client reached an old worker"
        );
    }

    // Once their clients leave, the old workers stop, long before drain_timeout.
    close_all(held);
    lb.wait_status(
        "the old workers to stop once their clients left",
        QUICK,
        |lb| lb.pids_in_state("web", "draining").is_empty() && old.iter().all(|(_, p)| !alive(*p)),
    );
    eprintln!("rollout of 3 workers with a held connection each took {took:?}");
}

#[test]
fn the_drain_message_reaches_the_old_worker_before_its_stop_signal() {
    let worker = Service::workers("web")
        .set("drain_timeout", "20s")
        .set("rollout_watch", "500ms")
        .env("HELLO", "1")
        .env("CHANNEL_LOG", "1")
        .env("STOP_DELAY_MS", "0");
    let lb = Lb::start(&Config::new().service(worker).yaml());
    lb.wait_ready(1);
    // A held connection keeps the stop signal back until the test closes it.
    let mut conn = Held::open(lb.listen);
    conn.exchange();
    lb.signal(Signal::SIGUSR2);
    wait_until(
        "the drain message on the old worker's channel",
        QUICK,
        || !logged_messages(&lb, "[web/0] channel:").is_empty(),
    );
    assert_one_drain_message(&lb, "[web/0] channel:");
    assert!(lb.lines("[web/0] stopping").is_empty(), "{}", lb.log());
    assert_eq!(lb.pids_in_state("web", "draining"), [(0, conn.pid)]);
    conn.exchange();

    close_all(vec![conn]);
    wait_until("the old worker's stop signal", QUICK, || {
        !lb.lines("[web/0] stopping").is_empty()
    });
    let log = lb.log();
    let drain = log.find("[web/0] channel:").expect("drain line");
    let stopping = log.find("[web/0] stopping").expect("stopping line");
    assert!(drain < stopping, "{log}");
}

/// A Node server that uses nothing but Node's own IPC: it logs every message it
/// receives and its SIGTERM.
const NODE_WORKER: &str = r#"
const net = require('net');
const server = net.createServer((socket) => socket.pipe(socket));
server.listen(Number(process.env.PORT), process.env.HOST, () => console.log('listening'));
process.on('message', (message) => console.log('message: ' + JSON.stringify(message)));
process.on('SIGTERM', () => {
  console.log('got SIGTERM');
  process.exit(0);
});
"#;

fn node_found() -> bool {
    std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success())
}

#[test]
fn the_drain_message_reaches_an_unmodified_node_worker_before_its_sigterm() {
    if !node_found() {
        eprintln!("skipped: no `node` on PATH");
        return;
    }
    let script_dir = tempfile::tempdir().expect("temp dir");
    let script = script_dir.path().join("worker.js");
    std::fs::write(&script, NODE_WORKER).expect("write the Node worker");
    let script = script.to_str().expect("utf-8 path");
    let worker = Service::workers("web")
        .command(&["node", script])
        .set("drain_timeout", "20s")
        .set("rollout_watch", "500ms");
    let lb = Lb::start(&Config::new().service(worker).yaml());
    lb.wait_ready(1);
    let old = lb.ready_slots("web")[&0];
    let mut conn = common::connect(lb.listen);
    let echoed = |conn: &mut std::net::TcpStream| {
        use std::io::{Read as _, Write as _};
        conn.write_all(b"ping\n").expect("send");
        let mut reply = [0u8; 5];
        conn.read_exact(&mut reply)
            .expect("echo from the Node worker");
        assert_eq!(&reply, b"ping\n");
    };
    echoed(&mut conn);
    lb.signal(Signal::SIGUSR2);
    wait_until("the drain message at the old Node worker", QUICK, || {
        !logged_messages(&lb, "[web/0] message:").is_empty()
    });
    assert_one_drain_message(&lb, "[web/0] message:");
    assert!(lb.lines("[web/0] got SIGTERM").is_empty(), "{}", lb.log());
    assert_eq!(lb.pids_in_state("web", "draining"), [(0, old)]);
    echoed(&mut conn);

    drop(conn);
    wait_until("the old Node worker's SIGTERM", QUICK, || {
        !lb.lines("[web/0] got SIGTERM").is_empty()
    });
    let log = lb.log();
    assert!(
        log.find("[web/0] message:") < log.find("[web/0] got SIGTERM"),
        "{log}"
    );
    wait_until("the old Node worker gone", QUICK, || !alive(old));
}

#[test]
fn a_replacement_that_exits_within_rollout_watch_halts_the_rollout_and_lb_restart_fails() {
    let web = Service::workers("web").count(3).set("rollout_watch", "2s");
    let lb = Lb::start(&Config::new().service(web.clone()).yaml());
    lb.wait_ready(3);
    let before = lb.ready_slots("web");
    let halted = lb.metric("lb_rollouts_total", &[("result", "halted")]);
    // The new release gets ready, then dies 100 ms later; each replacement takes a
    // second to start, so slot 0's dies while slot 1's is still starting.
    lb.rewrite_config(
        &Config::new()
            .service(
                web.env("START_DELAY_MS", "1000")
                    .env("EXIT_AFTER_MS", "100"),
            )
            .yaml(),
    );
    let (out, took) = lb.cli_within(&["restart"], Duration::from_secs(20));
    let out = out.unwrap_or_else(|| panic!("lb restart still running after {took:?}"));
    assert!(
        !out.status.success(),
        "lb restart succeeded after {took:?} although its first replacement died: {out:?}"
    );
    assert_eq!(
        lb.metric("lb_rollouts_total", &[("result", "halted")]),
        halted + 1.0
    );
    let after = lb.ready_slots("web");
    for slot in [1, 2] {
        assert_eq!(
            after.get(&slot),
            before.get(&slot),
            "slot {slot}, never replaced, keeps its worker: {}",
            lb.status()
        );
        assert!(alive(before[&slot]));
    }
}

/// Replaces worker 1 of three with `replace` and checks nothing else changed.
fn only_worker_1_is_replaced(replace: impl FnOnce(&Lb)) {
    let lb = Lb::start(
        &Config::new()
            .service(
                Service::workers("web")
                    .count(3)
                    .set("rollout_watch", "200ms"),
            )
            .yaml(),
    );
    lb.wait_ready(3);
    let before = lb.ready_slots("web");
    let restarts = lb.restarts("web");
    replace(&lb);
    let after = lb.ready_slots("web");
    assert_eq!(after.len(), 3, "{}", lb.status());
    assert_ne!(after[&1], before[&1], "worker 1 was not replaced");
    assert_eq!(after[&0], before[&0], "worker 0 was replaced too");
    assert_eq!(after[&2], before[&2], "worker 2 was replaced too");
    let now = lb.restarts("web");
    assert_eq!(now[&1], restarts[&1] + 1, "{}", lb.status());
    assert_eq!((now[&0], now[&2]), (restarts[&0], restarts[&2]));
    wait_until("the old worker 1 stopped", QUICK, || !alive(before[&1]));
}

#[test]
fn lb_restart_with_a_worker_id_replaces_only_that_worker() {
    only_worker_1_is_replaced(|lb| {
        let (out, took) = lb.cli_within(&["restart", "--service", "web", "--worker", "1"], QUICK);
        let out = out.unwrap_or_else(|| panic!("lb restart still running after {took:?}"));
        assert!(out.status.success(), "{out:?}");
    });
}

#[test]
fn post_restart_with_a_worker_id_replaces_only_that_worker() {
    only_worker_1_is_replaced(|lb| {
        let (code, body) = lb.admin("POST", "/restart?service=web&worker=1", b"");
        assert_eq!(code, 200, "{body}");
    });
}

#[test]
fn scale_down_drains_the_removed_workers_in_the_background() {
    let web = three_holding_workers();
    let lb = Lb::start(&Config::new().service(web.clone()).yaml());
    lb.wait_ready(3);
    let mut held = one_per_slot(lb.listen, 3);
    let pids: Vec<i32> = held.iter().map(|h| h.pid).collect();

    lb.rewrite_config(&Config::new().service(web.count(1)).yaml());
    let asked = std::time::Instant::now();
    let (code, body) = lb.admin("POST", "/reload", b"");
    assert_eq!(code, 200, "{body}");
    assert!(
        asked.elapsed() < QUICK,
        "the reload waited {:?} on held connections",
        asked.elapsed()
    );
    // The highest slots leave rotation and drain, holding their clients.
    lb.wait_status("slots 1 and 2 draining", QUICK, |lb| {
        let mut draining = lb.pids_in_state("web", "draining");
        draining.sort();
        draining == [(1, pids[1]), (2, pids[2])]
    });
    assert_eq!(
        lb.ready_slots("web").into_iter().collect::<Vec<_>>(),
        [(0, pids[0])]
    );
    for _ in 0..4 {
        assert_eq!(
            Held::open(lb.listen).slot,
            0,
            "a new client reached a removed slot"
        );
    }
    for conn in &mut held {
        conn.exchange();
    }

    close_all(held);
    lb.wait_status(
        "the removed workers to stop once their clients left",
        QUICK,
        |lb| lb.pids_in_state("web", "draining").is_empty() && !alive(pids[1]) && !alive(pids[2]),
    );
    assert!(alive(pids[0]));
}

#[test]
fn scale_down_sends_the_drain_message_to_the_removed_worker_only() {
    let web = Service::workers("web")
        .count(2)
        .set("drain_timeout", "20s")
        .env("HELLO", "1")
        .env("CHANNEL_LOG", "1");
    let lb = Lb::start(&Config::new().service(web.clone()).yaml());
    lb.wait_ready(2);
    // Held, so worker 1 reads its message before any stop signal can end it.
    let held = one_per_slot(lb.listen, 2);
    lb.rewrite_config(&Config::new().service(web.count(1)).yaml());
    let (code, body) = lb.admin("POST", "/reload", b"");
    assert_eq!(code, 200, "{body}");
    wait_until("the drain message at the removed worker", QUICK, || {
        !logged_messages(&lb, "[web/1] channel:").is_empty()
    });
    assert_one_drain_message(&lb, "[web/1] channel:");
    assert!(
        logged_messages(&lb, "[web/0] channel:").is_empty(),
        "{}",
        lb.log()
    );
    close_all(held);
}

/// A replacement that exits within `rollout_watch` halts the rollout; the next slot's
/// replacement, starting at that moment, is stopped with it rather than left running
/// outside any slot.
#[test]
fn a_halt_by_rollout_watch_leaves_no_replacement_running() {
    let v1 = Service::workers("web")
        .count(3)
        .set("rollout_watch", "5s")
        .set("restart_backoff", "{ initial: 5s, max: 5s }");
    let lb = Lb::start(&Config::new().service(v1.clone()).yaml());
    lb.wait_ready(3);
    // The new release: slot 0's worker dies 1 s after it is ready (within the watch);
    // the others take 3 s to start, so slot 1's replacement is starting at the halt.
    let script = "if [ \"$LB_WORKER_ID\" = 0 ]; then EXIT_AFTER_MS=1000 exec {worker}; \
                  else START_DELAY_MS=3000 exec {worker}; fi";
    lb.rewrite_config(
        &Config::new()
            .service(v1.command(&["sh", "-c", script]))
            .yaml(),
    );
    let out = lb.cli(&["restart"]);
    assert!(!out.status.success(), "the rollout halts");
    // Long after the halt, the started replacement of slot 1 is ready and serves nobody.
    std::thread::sleep(Duration::from_secs(5));
    let workers = lb.status_workers("web");
    let ids: Vec<u64> = workers.iter().filter_map(|w| w["id"].as_u64()).collect();
    assert_eq!(
        lb.metric("lb_workers", &[("service", "web")]),
        3.0,
        "a 3-worker service counts 4 workers: /status ids {ids:?}: {workers:?}"
    );
    assert_eq!(ids.len(), 3, "/status lists a leaked worker: {workers:?}");
}

/// A reload during `lb restart` that makes a starting replacement outdated does not
/// cancel the restart of its slot.
#[test]
fn a_reload_during_a_restart_does_not_cancel_the_restart_of_a_slot() {
    let v1 = Service::workers("web").count(2).set("rollout_watch", "0s");
    let lb = Lb::start(&Config::new().service(v1.clone()).yaml());
    lb.wait_ready(2);
    let before = lb.ready_slots("web");
    lb.rewrite_config(
        &Config::new()
            .service(v1.clone().env("START_DELAY_MS", "3000"))
            .yaml(),
    );
    let restart = {
        let admin = lb.admin.expect("admin").to_string();
        std::thread::spawn(move || {
            std::process::Command::new(common::LB)
                .args(["--admin", &admin, "restart"])
                .output()
                .expect("lb restart")
        })
    };
    lb.wait_status(
        "slot 0's replacement starting",
        Duration::from_secs(10),
        |lb| lb.status_workers("web").len() == 3,
    );
    lb.rewrite_config(&Config::new().service(v1).yaml());
    lb.signal(Signal::SIGHUP);
    let out = restart.join().expect("restart thread");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let after = lb.ready_slots("web");
    assert_ne!(
        before[&0],
        after[&0],
        "`lb restart` said {:?} but slot 0 still runs its old process",
        String::from_utf8_lossy(&out.stdout).trim()
    );
}
