//! Prometheus metrics (contract §6): names, labels and values that add up.

mod common;

use std::io::{Read as _, Write as _};
use std::process::{Command, Stdio};

use common::observe::metric_sum as sum;
use common::{DEADLINE, Lb, connect, echo, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The metric families of the contract (§6) that lb has so far.
const CONTRACT: [&str; 12] = [
    "lb_connections_total",
    "lb_connections_active",
    "lb_bytes_total",
    "lb_connect_errors_total",
    "lb_connection_duration_seconds",
    "lb_workers",
    "lb_worker_restarts_total",
    "lb_reloads_total",
    "lb_backend_up",
    "lb_messages_dropped_total",
    "lb_connections_dropped_total",
    "lb_rollouts_total",
];

fn metrics(lb: &Lb) -> String {
    let (code, body) = lb.admin("GET", "/metrics", b"");
    assert_eq!(code, 200);
    body
}

const TWO_ECHO_WORKERS: &str = r#"
services:
  - name: web
    listen: {listen}
    workers:
      command: ["{worker}"]
      count: 2
"#;

#[test]
fn connections_and_bytes_add_up_and_active_returns_to_zero() {
    let lb = Lb::start(TWO_ECHO_WORKERS);
    lb.wait_ready(2);
    let payload = vec![7u8; 3000];
    for _ in 0..20 {
        assert_eq!(echo(lb.listen, &payload).len(), 3000);
    }
    wait_until("active connections back to 0", DEADLINE, || {
        sum(
            &metrics(&lb),
            "lb_connections_active",
            &[("service", "web")],
        ) == 0.0
    });
    let text = metrics(&lb);
    assert_eq!(
        sum(&text, "lb_connections_total", &[("service", "web")]),
        20.0,
        "{text}"
    );
    assert_eq!(
        sum(&text, "lb_connections_total", &[("worker", "0")]),
        10.0,
        "round-robin: {text}"
    );
    assert_eq!(
        sum(
            &text,
            "lb_bytes_total",
            &[("service", "web"), ("direction", "in")]
        ),
        60_000.0
    );
    assert_eq!(
        sum(
            &text,
            "lb_bytes_total",
            &[("service", "web"), ("direction", "out")]
        ),
        60_000.0
    );
    assert_eq!(
        sum(
            &text,
            "lb_connection_duration_seconds_count",
            &[("service", "web")]
        ),
        20.0
    );
    assert_eq!(
        sum(
            &text,
            "lb_workers",
            &[("service", "web"), ("state", "ready")]
        ),
        2.0
    );
    assert_eq!(sum(&text, "lb_backend_up", &[("service", "web")]), 2.0);
    assert_eq!(
        sum(&text, "lb_connect_errors_total", &[("service", "web")]),
        0.0
    );
    assert!(
        text.contains("lb_messages_dropped_total{service=\"web\"} 0"),
        "{text}"
    );
}

#[test]
fn bytes_are_counted_while_the_connection_is_still_open() {
    let lb = Lb::start(TWO_ECHO_WORKERS);
    lb.wait_ready(2);
    let mut conn = connect(lb.listen);
    let payload = [b'x'; 1000];
    conn.write_all(&payload).expect("send");
    let mut back = [0u8; 1000];
    conn.read_exact(&mut back).expect("echo");
    wait_until("1000 bytes counted each way", DEADLINE, || {
        let text = metrics(&lb);
        sum(&text, "lb_bytes_total", &[("direction", "in")]) == 1000.0
            && sum(&text, "lb_bytes_total", &[("direction", "out")]) == 1000.0
    });
    drop(conn);
}

#[test]
fn restarts_reloads_and_worker_states_are_counted() {
    let lb = Lb::start(&TWO_ECHO_WORKERS.replace(
        "count: 2",
        "count: 2\n      restart_backoff: { initial: 2s, max: 2s }",
    ));
    lb.wait_ready(2);
    // Known label sets are there at 0 before anything happens, so an alert on
    // `increase()` sees the first event.
    let text = metrics(&lb);
    for series in [
        r#"lb_reloads_total{result="error"} 0"#,
        r#"lb_reloads_total{result="ok"} 0"#,
        r#"lb_rollouts_total{result="halted"} 0"#,
        r#"lb_worker_restarts_total{reason="crash",service="web",worker="1"} 0"#,
        r#"lb_worker_restarts_total{reason="rollout",service="web",worker="0"} 0"#,
    ] {
        assert!(
            text.lines().any(|l| l == series),
            "{series} missing:\n{text}"
        );
    }
    kill(Pid::from_raw(lb.worker_pid(1)), Signal::SIGKILL).expect("kill worker 1");
    lb.wait_log("worker exited");
    let text = metrics(&lb);
    assert_eq!(
        sum(
            &text,
            "lb_worker_restarts_total",
            &[("worker", "1"), ("reason", "crash")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        sum(&text, "lb_workers", &[("state", "backoff")]),
        1.0,
        "{text}"
    );
    assert_eq!(
        sum(&text, "lb_backend_up", &[("worker", "1")]),
        0.0,
        "{text}"
    );
    lb.rewrite_config("services: [");
    assert_eq!(lb.admin("POST", "/reload", b"").0, 400);
    assert_eq!(
        sum(&metrics(&lb), "lb_reloads_total", &[("result", "error")]),
        1.0
    );
}

/// Every family has samples: traffic, a failed connect, a crash, a rollout, a reload.
#[test]
fn the_metrics_pass_promtool_check() {
    let dead = format!("127.0.0.1:{}", common::free_port());
    let lb = Lb::start(&format!(
        "{}\n  - name: remote\n    listen: 127.0.0.1:{}\n    backends: [\"{dead}\"]\n",
        TWO_ECHO_WORKERS.trim_end(),
        common::free_port()
    ));
    lb.wait_ready(2);
    echo(lb.listen, b"traffic");
    assert_eq!(lb.admin("POST", "/restart?service=web", b"").0, 200);
    assert_eq!(lb.admin("POST", "/reload", b"").0, 200);
    let remote: std::net::SocketAddr = lb.lines("listening service=remote")[0]
        .rsplit_once("addr=")
        .map(|(_, a)| a.trim().parse().expect("addr"))
        .expect("remote listener");
    let _ = std::net::TcpStream::connect(remote).map(|mut s| s.write_all(b"x"));
    wait_until("a connect error counted", DEADLINE, || {
        sum(&metrics(&lb), "lb_connect_errors_total", &[]) >= 1.0
    });
    let text = metrics(&lb);
    for family in CONTRACT {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family} missing:\n{text}"
        );
    }
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is installed");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = promtool.wait_with_output().expect("promtool ran");
    assert!(
        out.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The dashboard, the alerts and the scrape config name only metrics of the contract,
/// and Prometheus accepts them.
#[test]
fn deploy_files_use_only_contract_metrics_and_pass_promtool() {
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let dashboard =
        std::fs::read_to_string(deploy.join("grafana-dashboard.json")).expect("dashboard");
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    assert!(parsed["panels"].as_array().is_some_and(|p| p.len() >= 8));
    let alerts = std::fs::read_to_string(deploy.join("lb-alerts.yml")).expect("alerts");
    for text in [&dashboard, &alerts] {
        let names = text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("lb_"));
        for name in names {
            let base = name.trim_end_matches("_bucket");
            assert!(CONTRACT.contains(&base), "{name} is not a contract metric");
        }
    }
    for (what, file) in [("config", "prometheus.yml"), ("rules", "lb-alerts.yml")] {
        let out = Command::new("promtool")
            .args(["check", what])
            .arg(deploy.join(file))
            .output()
            .expect("promtool");
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // The dashboard's queries are PromQL that Prometheus parses: each one, its Grafana
    // variables given values, becomes a recording rule for `promtool check rules`.
    let mut queries = Vec::new();
    dashboard_queries(&parsed, &mut queries);
    assert!(queries.len() >= 8, "dashboard queries: {queries:?}");
    let dir = tempfile::tempdir().expect("temp dir");
    let check = |queries: &[String]| {
        let rules: Vec<serde_json::Value> = queries
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let expr = q
                    .replace("$__rate_interval", "5m")
                    .replace("$service", ".+");
                serde_json::json!({ "record": format!("dashboard:query_{i}"), "expr": expr })
            })
            .collect();
        let file = dir.path().join("dashboard-rules.json");
        let groups = serde_json::json!({ "groups": [{ "name": "dashboard", "rules": rules }] });
        std::fs::write(&file, groups.to_string()).expect("write rules");
        let out = Command::new("promtool")
            .args(["check", "rules"])
            .arg(&file)
            .output()
            .expect("promtool");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let (ok, text) = check(&queries);
    assert!(ok, "dashboard queries: {text}\n{queries:#?}");
    // And the check can fail: an unclosed parenthesis is caught.
    let (ok, text) = check(&["sum(rate(lb_connections_total[$__rate_interval])".into()]);
    assert!(!ok, "a broken query passed: {text}");
}

/// Every `expr` of a Grafana dashboard, however deep its panels nest.
fn dashboard_queries(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match v.as_str() {
                    Some(expr) if key == "expr" => out.push(expr.to_owned()),
                    _ => dashboard_queries(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}
