//! Starting lb: the shipped example serves, and what prevents a start is one clear line.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};

use common::{Lb, connect, free_port};

fn last_line(lb: &Lb) -> String {
    lb.log().lines().last().unwrap_or_default().to_owned()
}

#[test]
fn listen_address_in_use_is_a_clear_startup_error() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let config = r#"
services:
  - name: web
    listen: ADDR
    workers:
      command: ["{worker}"]
      count: 1
"#
    .replace("ADDR", &addr.to_string());
    let mut lb = Lb::start(&config);
    let status = lb.wait_exit();
    assert_eq!(status.code(), Some(1));
    let line = last_line(&lb);
    assert!(
        line.starts_with(&format!("lb: service web: could not listen on {addr}: ")),
        "{line}"
    );
    assert!(line.contains("in use"), "{line}");
    assert!(
        lb.lines("worker started").is_empty(),
        "no worker starts when a listener fails"
    );
}

#[test]
fn missing_command_is_a_clear_startup_error() {
    let mut lb = Lb::start(
        r#"
services:
  - name: web
    listen: {listen}
    workers:
      command: ["/nonexistent/app", "--port", "${PORT}"]
      count: 2
"#,
    );
    let status = lb.wait_exit();
    assert_eq!(status.code(), Some(1));
    let line = last_line(&lb);
    assert!(
        line.starts_with("lb: starting worker web/0: could not run \"/nonexistent/app\": "),
        "{line}"
    );
}

#[test]
fn the_shipped_example_config_serves() {
    let repo = env!("CARGO_MANIFEST_DIR");
    let example =
        std::fs::read_to_string(format!("{repo}/config.example.yaml")).expect("example config");
    assert!(
        example.contains("listen: 127.0.0.1:8080"),
        "the README promises port 8080"
    );
    // The same file, on a free port and run from a temp dir with the repo as its cwd.
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let text = example
        .replace("listen: 127.0.0.1:8080", &format!("listen: {listen}"))
        .replace("listen: 127.0.0.1:9900", &format!("listen: {admin}"))
        .replace("cwd: .", &format!("cwd: {repo}"));
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("lb.yaml");
    std::fs::write(&path, text).expect("write config");
    let lb = Lb::start_at(dir, &path, listen);
    lb.wait_ready(3);
    let mut bodies = Vec::new();
    for _ in 0..3 {
        let mut stream = connect(listen);
        stream
            .write_all(b"GET / HTTP/1.0\r\nHost: example\r\n\r\n")
            .expect("request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("response");
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        bodies.push(response.lines().last().unwrap_or_default().to_owned());
    }
    bodies.sort();
    let expected: Vec<String> = (0..3).map(|i| format!("hello from worker {i}")).collect();
    let got: Vec<String> = bodies
        .iter()
        .map(|b| b.split(" (pid").next().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(got, expected, "{bodies:?}");
}

#[test]
fn json_log_format_writes_one_object_per_line_including_worker_output() {
    let lb = Lb::start_with(
        r#"
services:
  - name: web
    listen: {listen}
    workers:
      command: ["{worker}"]
      count: 1
"#,
        &["--log-format", "json"],
    );
    lb.wait_ready(1);
    lb.wait_log("listening on 127.0.0.1");
    let log = lb.log();
    for line in log.lines() {
        assert!(
            line.starts_with('{') && line.ends_with('}'),
            "not a JSON object: {line}"
        );
    }
    let ready = lb.lines("\"message\":\"worker ready\"");
    assert_eq!(ready.len(), 1, "{log}");
    assert!(ready[0].contains("\"service\":\"web\""), "{}", ready[0]);
    let fields: serde_json::Value = serde_json::from_str(&ready[0]).expect("JSON");
    // Numbers stay numbers, so a log query can compare them.
    assert!(
        fields["fields"]["pid"].is_i64() || fields["pid"].is_i64(),
        "{}",
        ready[0]
    );
    let output = lb.lines("listening on 127.0.0.1");
    assert!(
        output[0].contains("\"worker\":\"web/0\"") && output[0].contains("\"stream\":\"stdout\""),
        "{}",
        output[0]
    );
}

#[test]
fn a_worker_flooding_the_log_crowds_out_none_of_lbs_own_lines() {
    // A worker writing lines as fast as it can, on the same stream as lb's log, while
    // lb logs reloads.
    let lb = Lb::start(
        r#"
services:
  - name: web
    listen: {listen}
    workers:
      command: "yes spam-line >&2 & exec {worker}"
      count: 1
"#,
    );
    lb.wait_log("[web/0] spam-line");
    for _ in 0..5 {
        assert_eq!(lb.admin("POST", "/reload", b"").0, 200);
    }
    common::wait_until("five reload lines", common::DEADLINE, || {
        lb.lines("reload: no change").len() == 5
    });
    assert!(lb.lines("log lines dropped").is_empty());
}

#[test]
fn a_bare_config_file_name_runs_workers_in_the_config_folder() {
    let dir = tempfile::tempdir().expect("temp dir");
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = format!(
        "admin: {{ listen: null }}\nservices:\n  - name: web\n    listen: {listen}\n    workers:\n      command: [\"{}\"]\n      count: 1\n",
        common::WORKER
    );
    std::fs::write(dir.path().join("lb.yaml"), config).expect("write config");
    let cwd = dir.path().to_path_buf();
    let lb = Lb::spawn(
        dir,
        listen,
        std::process::Command::new(common::LB)
            .current_dir(&cwd)
            .args(["--config", "lb.yaml"]),
    );
    lb.wait_ready(1);
    let pid = lb.worker_pid(0);
    let worker_cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).expect("worker cwd");
    assert_eq!(worker_cwd, cwd.canonicalize().expect("canonical temp dir"));
}
