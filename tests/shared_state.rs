//! `examples/shared-state/`: Node workers that keep their shared count in a Redis that
//! lb runs as a second service, reached through lb's fixed listen address. Real node,
//! real redis-server, real sockets.
//!
//! The example's `lb.yaml` is run as shipped except for its addresses (free ports, so
//! tests run in parallel and beside a running example) and its `cwd` (the config is
//! written to a temp dir): the file is parsed, those fields are set, and the result is
//! written back as JSON, which lb reads as YAML. `config_check.rs` checks the shipped
//! file itself with `lb check`.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{DEADLINE, Lb, alive, field, free_port, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/shared-state")
}

/// Fails with the Debian package to install, instead of a worker that never starts.
fn require(program: &str, package: &str) {
    if let Err(err) = Command::new(program).arg("--version").output() {
        panic!(
            "{program} could not run ({err}): the shared-state example needs it; \
             install the Debian package {package} (.ci/run does)"
        );
    }
}

/// The service named `name` in a parsed config.
fn service<'a>(config: &'a mut Value, name: &str) -> &'a mut Value {
    config["services"]
        .as_array_mut()
        .expect("services is a list")
        .iter_mut()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("the example has no service {name:?}"))
}

/// Starts lb on the example's config with free addresses (`Lb::listen` is the app's),
/// and waits until its three app workers and its Redis are ready (an app worker says
/// ready only once Redis has answered it).
fn start_example() -> Lb {
    require("node", "nodejs");
    require("redis-server", "redis-server");
    let dir = example_dir();
    let text = std::fs::read_to_string(dir.join("lb.yaml")).expect("read the example's lb.yaml");
    let mut config: Value = serde_saphyr::from_str(&text).expect("the example's lb.yaml parses");

    // The app finds Redis at the redis service's listen address: the one invariant
    // between the two services, checked on the file as shipped.
    let shipped_redis = service(&mut config, "redis")["listen"].clone();
    assert_eq!(
        service(&mut config, "app")["workers"]["env"]["REDIS_ADDR"],
        shipped_redis,
        "the app must reach Redis at the redis service's listen address"
    );

    let app = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let redis = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    config["admin"]["listen"] = json!(admin.to_string());
    service(&mut config, "redis")["listen"] = json!(redis.to_string());
    let app_service = service(&mut config, "app");
    app_service["listen"] = json!(app.to_string());
    app_service["workers"]["env"]["REDIS_ADDR"] = json!(redis.to_string());
    for name in ["app", "redis"] {
        service(&mut config, name)["workers"]["cwd"] = json!(dir.display().to_string());
    }

    let temp = tempfile::tempdir().expect("temp dir");
    let path = temp.path().join("lb.yaml");
    std::fs::write(&path, config.to_string()).expect("write config");
    let mut lb = Lb::start_at(temp, &path, app);
    lb.admin = Some(admin);
    lb.wait_ready(4);
    lb
}

/// `GET /` over HTTP/1.0 (one connection each, so round-robin spreads them); returns
/// the status code and the body.
fn get(addr: SocketAddr) -> (u16, String) {
    let (code, response) =
        common::http_exchange(addr, "GET / HTTP/1.0\r\nHost: shared-state\r\n\r\n", b"");
    (code, common::response_body(&response).trim().to_owned())
}

/// `visits=N worker=ID` → `(N, ID)`.
fn visit(body: &str) -> (u64, String) {
    let parse = || {
        let (visits, worker) = body.split_once(' ')?;
        Some((
            visits.strip_prefix("visits=")?.parse().ok()?,
            worker.strip_prefix("worker=")?.to_owned(),
        ))
    };
    parse().unwrap_or_else(|| panic!("not a visits answer: {body:?}"))
}

/// Pids of the Redis worker processes lb has started, oldest first.
fn redis_pids(lb: &Lb) -> Vec<i32> {
    lb.lines("worker started")
        .iter()
        .filter(|l| field(l, "service") == Some("redis"))
        .filter_map(|l| field(l, "pid")?.parse().ok())
        .collect()
}

#[test]
fn every_worker_counts_in_the_same_redis() {
    let lb = start_example();
    let mut answers = Vec::new();
    for _ in 0..12 {
        let (code, body) = get(lb.listen);
        assert_eq!(code, 200, "{body}");
        answers.push(visit(&body));
    }
    let counts: Vec<u64> = answers.iter().map(|(n, _)| *n).collect();
    assert_eq!(counts, (1..=12).collect::<Vec<u64>>(), "{answers:?}");
    let workers: BTreeSet<&str> = answers.iter().map(|(_, w)| w.as_str()).collect();
    assert!(
        workers.len() >= 2,
        "one worker answered everything: {answers:?}"
    );
}

/// Why the app goes through lb: Redis restarted by lb runs on another port, yet the
/// app's address for it still works, and every worker counts in the new one.
#[test]
fn the_app_reaches_a_restarted_redis_at_the_same_address() {
    let lb = start_example();
    for expected in 1..=3 {
        let (code, body) = get(lb.listen);
        assert_eq!((code, visit(&body).0), (200, expected), "{body}");
    }
    let old = *redis_pids(&lb).last().expect("redis started");
    kill(Pid::from_raw(old), Signal::SIGKILL).expect("kill redis");
    wait_until("the old redis to be gone", DEADLINE, || !alive(old));

    // The new Redis starts empty. A worker answers 503 until it has reconnected, and
    // from then on counts in the new Redis: the answers that succeed count from 1,
    // whichever worker gave them.
    let start = Instant::now();
    let mut answers: Vec<(u64, String)> = Vec::new();
    let mut unavailable = 0;
    while answers
        .iter()
        .map(|(_, w)| w)
        .collect::<BTreeSet<_>>()
        .len()
        < 3
    {
        assert!(
            start.elapsed() < DEADLINE,
            "not every worker counts in the new redis: {answers:?} ({unavailable} answered 503)"
        );
        match get(lb.listen) {
            (200, body) => answers.push(visit(&body)),
            (503, _) => {
                unavailable += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            (code, body) => panic!("unexpected answer {code}: {body}"),
        }
    }
    let counts: Vec<u64> = answers.iter().map(|(n, _)| *n).collect();
    let expected: Vec<u64> = (1..=counts.len() as u64).collect();
    assert_eq!(counts, expected, "{answers:?} ({unavailable} answered 503)");
    let pids = redis_pids(&lb);
    assert_eq!(pids.len(), 2, "lb restarted redis once: {pids:?}");
}
