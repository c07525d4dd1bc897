//! The admin API (contract §5) and the client commands that use it (§1).

mod common;

use std::process::Command;

use common::config::{Config, Service};
use common::{DEADLINE, LB, Lb, alive, echo, http, wait_until};

const TWO_ECHO_WORKERS: &str = r#"
services:
  - name: web
    listen: {listen}
    workers:
      command: ["{worker}"]
      count: 2
"#;

fn status_json(lb: &Lb) -> serde_json::Value {
    let (code, body) = lb.admin("GET", "/status", b"");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("status is JSON")
}

fn worker_states(lb: &Lb) -> Vec<String> {
    let status = status_json(lb);
    status["services"][0]["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| w["state"].as_str().expect("state").to_owned())
        .collect()
}

#[test]
fn healthz_is_200_with_ready_workers_and_503_when_a_service_has_none() {
    let lb = Lb::start(&format!(
        r#"{}
  - name: crashy
    listen: 127.0.0.1:{}
    workers:
      command: "exit 1"
      count: 1
"#,
        TWO_ECHO_WORKERS.trim_end(),
        common::free_port()
    ));
    lb.wait_ready(2);
    let (code, body) = lb.admin("GET", "/healthz", b"");
    assert_eq!((code, body.as_str()), (503, "no ready backend: crashy\n"));
    // `lb health`, the container HEALTHCHECK: exit 1 with one line saying why.
    let health = lb.cli(&["health"]);
    assert_eq!(health.status.code(), Some(1));
    let said = String::from_utf8_lossy(&health.stderr);
    assert_eq!(said.lines().count(), 1, "{said}");
    assert!(said.contains("crashy"), "{said}");

    let ok = Lb::start(TWO_ECHO_WORKERS);
    ok.wait_ready(2);
    assert_eq!(ok.admin("GET", "/healthz", b""), (200, "ok\n".to_owned()));
    assert_eq!(ok.cli(&["health"]).status.code(), Some(0));
}

#[test]
fn health_fails_with_one_line_when_no_lb_answers() {
    let nobody = format!("127.0.0.1:{}", common::free_port());
    let health = Command::new(LB)
        .args(["health", "--admin", &nobody])
        .output()
        .expect("run lb health");
    assert_eq!(health.status.code(), Some(1));
    let said = String::from_utf8_lossy(&health.stderr);
    assert_eq!(said.lines().count(), 1, "{said}");
    assert!(said.contains(&nobody), "{said}");
}

#[test]
fn status_has_the_contract_fields_and_follows_a_rollout() {
    let config = TWO_ECHO_WORKERS.replace(
        "count: 2",
        "count: 2\n      env: { START_DELAY_MS: \"400\" }",
    );
    let lb = Lb::start(&config);
    lb.wait_ready(2);
    let status = status_json(&lb);
    let svc = &status["services"][0];
    assert_eq!(svc["name"], "web");
    assert_eq!(svc["listen"][0], lb.listen.to_string());
    assert_eq!(svc["balance"], "round-robin");
    for (i, w) in svc["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .enumerate()
    {
        assert_eq!(w["id"], i);
        assert!(w["pid"].as_i64().is_some_and(|p| alive(p as i32)), "{w}");
        assert!(w["port"].as_u64().is_some(), "{w}");
        assert_eq!(w["state"], "ready");
        assert!(w["uptime_seconds"].as_f64().is_some(), "{w}");
        assert_eq!(w["restarts"], 0);
        assert_eq!(w["active_connections"], 0);
    }
    // A connection held open keeps the old worker draining for a while.
    let mut held = common::connect(lb.listen);
    std::io::Write::write_all(&mut held, b"x").expect("send");
    let mut byte = [0u8; 1];
    std::io::Read::read_exact(&mut held, &mut byte).expect("echo");
    lb.signal(nix::sys::signal::Signal::SIGUSR2);
    wait_until("a starting replacement in /status", DEADLINE, || {
        worker_states(&lb).contains(&"starting".to_owned())
    });
    wait_until("a draining worker in /status", DEADLINE, || {
        worker_states(&lb).contains(&"draining".to_owned())
    });
    drop(held);
    lb.wait_log("rollout finished");
    assert_eq!(worker_states(&lb), ["ready", "ready"]);
}

#[test]
fn post_reload_answers_400_with_the_check_message_for_a_broken_config() {
    let lb = Lb::start(TWO_ECHO_WORKERS);
    lb.wait_ready(2);
    lb.rewrite_config(&TWO_ECHO_WORKERS.replace("count: 2", "count: 0"));
    let (code, body) = lb.admin("POST", "/reload", b"");
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("lb.yaml:9:14: services[0].workers.count: expected a positive integer"),
        "{body}"
    );
    lb.rewrite_config(&TWO_ECHO_WORKERS.replace("count: 2", "count: 3"));
    let (code, body) = lb.admin("POST", "/reload", b"");
    assert_eq!(
        (code, body.trim_end()),
        (200, "reload applied\n  changed: web (workers.count 2 -> 3)")
    );
    lb.wait_ready(3);
}

#[test]
fn post_restart_answers_after_the_rollout_with_every_pid_changed() {
    let lb = Lb::start(TWO_ECHO_WORKERS);
    lb.wait_ready(2);
    let before = lb.ready_pids();
    let (code, body) = lb.admin("POST", "/restart?service=web", b"");
    assert_eq!(
        (code, body.trim()),
        (200, "rollout finished: 2 workers replaced")
    );
    let after = lb.ready_pids();
    for slot in [0, 1] {
        assert_ne!(before[&slot], after[&slot]);
    }
    let (code, body) = lb.admin("POST", "/restart?service=nope", b"");
    assert_eq!((code, body.trim()), (404, "no service named \"nope\""));
}

#[test]
fn lb_status_prints_a_table_and_json() {
    let lb = Lb::start(TWO_ECHO_WORKERS);
    lb.wait_ready(2);
    let out = lb.cli(&["status"]);
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(lines[0].starts_with("SERVICE  WORKER  PID"), "{table}");
    for (slot, pid) in lb.ready_pids() {
        let row = lines
            .iter()
            .find(|l| l.contains(&format!(" {pid} ")))
            .expect("a row per worker");
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            (cells[0], cells[1], cells[4]),
            ("web", slot.to_string().as_str(), "ready"),
            "{row}"
        );
    }
    let out = lb.cli(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        json["services"][0]["workers"].as_array().map(Vec::len),
        Some(2)
    );
}

#[test]
fn client_commands_give_up_on_an_address_that_never_answers() {
    // Accepts (the kernel does, from the backlog) and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = silent.local_addr().expect("addr").to_string();
    let started = std::time::Instant::now();
    let out = Command::new(LB)
        .args(["status", "--admin", &addr])
        .output()
        .expect("run lb status");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim(), format!("lb: {addr} did not answer within 15s"));
    assert!(started.elapsed() < std::time::Duration::from_secs(25));
    drop(silent);
}

#[test]
fn client_commands_say_clearly_when_no_lb_answers() {
    let nobody = format!("127.0.0.1:{}", common::free_port());
    let out = Command::new(LB)
        .args(["reload", "--admin", &nobody])
        .output()
        .expect("run lb reload");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(&format!("lb: no lb answers at {nobody}")),
        "{err}"
    );
}

#[test]
fn lb_restart_fails_with_the_reason_when_the_rollout_halts() {
    let config = TWO_ECHO_WORKERS.replace("count: 2", "count: 2\n      ready_timeout: 1s");
    let lb = Lb::start(&config);
    lb.wait_ready(2);
    lb.rewrite_config(&config.replace(r#"command: ["{worker}"]"#, r#"command: ["sleep", "600"]"#));
    let out = lb.cli(&["restart"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rollout halted: replacement for web/0 not ready within ready_timeout"),
        "{err}"
    );
}

#[test]
fn oversized_malformed_and_misrouted_requests_are_refused_and_lb_keeps_serving() {
    let lb = Lb::start(TWO_ECHO_WORKERS);
    lb.wait_ready(2);
    let admin = lb.admin.expect("admin");
    let big = vec![b'x'; 2 * 1024 * 1024];
    assert_eq!(http(admin, "POST", "/reload", &big).0, 413);
    assert_eq!(lb.admin("GET", "/nowhere", b"").0, 404);
    assert_eq!(lb.admin("GET", "/reload", b"").0, 405);
    assert_eq!(lb.admin("POST", "/status", b"").0, 405);
    // HEAD is GET without the body, for health checkers.
    assert_eq!(lb.admin("HEAD", "/healthz", b""), (200, String::new()));
    assert_eq!(lb.admin("HEAD", "/reload", b"").0, 405);
    let mut raw = common::connect(admin);
    std::io::Write::write_all(&mut raw, b"NOT HTTP AT ALL\r\n\r\n").expect("send garbage");
    let mut answer = String::new();
    let _ = std::io::Read::read_to_string(&mut raw, &mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    assert_eq!(echo(lb.listen, b"still serving"), b"still serving");
    assert_eq!(lb.admin("GET", "/healthz", b"").0, 200);
}

#[test]
fn client_commands_fall_back_to_the_default_address_when_the_config_does_not_parse() {
    let dir = tempfile::tempdir().expect("temp dir");
    let broken = dir.path().join("lb.yaml");
    std::fs::write(
        &broken,
        "services:\n  - name: web\n    listen: [127.0.0.1:1\n",
    )
    .expect("write");
    let out = Command::new(LB)
        .args(["status", "--config"])
        .arg(&broken)
        .output()
        .expect("run lb status");
    let err = String::from_utf8_lossy(&out.stderr);
    let first = err.lines().next().unwrap_or_default();
    assert!(first.contains("lb.yaml:"), "{err}");
    assert!(
        first.ends_with("asking the default admin address 127.0.0.1:9900 (or pass --admin ADDR)"),
        "{err}"
    );

    // An empty file names no address: the default, without a complaint.
    std::fs::write(&broken, "").expect("empty the file");
    let out = Command::new(LB)
        .args(["status", "--config"])
        .arg(&broken)
        .output()
        .expect("run lb status");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("empty"), "{err}");
}

#[test]
fn status_shows_the_port_the_kernel_chose_for_port_0() {
    let config = Config::new().service(Service::workers("web").listen("127.0.0.1:0"));
    let lb = Lb::start(&config.yaml());
    lb.wait_ready(1);
    let status = status_json(&lb);
    let listen = status["services"][0]["listen"][0].as_str().expect("listen");
    let bound: std::net::SocketAddr = listen.parse().expect("an address");
    assert_ne!(bound.port(), 0, "{status}");
    assert_eq!(
        echo(bound, b"through the chosen port"),
        b"through the chosen port"
    );
}
