//! Stopping lb: graceful on SIGTERM, and no worker outlives lb even after `kill -9`.

mod common;

use std::io::{Read, Write};

use common::{DEADLINE, Lb, alive, backend, connect, echo, wait_until};
use nix::sys::signal::Signal;

#[test]
fn sigterm_lets_an_exchange_in_flight_finish_then_exits_zero_with_no_worker_left() {
    let mut lb = Lb::start(
        r#"
services:
  - name: slow
    listen: {listen}
    workers:
      command: ["{worker}"]
      count: 2
      env: { REPLY_DELAY_MS: "1500" }
      drain_timeout: 20s
"#,
    );
    lb.wait_ready(2);
    let mut client = connect(lb.listen);
    client.write_all(b"in flight").expect("send");
    // Stop lb only once the request is at a worker, so it is truly in flight.
    lb.wait_log("] accepted a connection");
    lb.signal(Signal::SIGTERM);
    lb.wait_log("stopping: listeners closed");
    // New clients are refused at once, not left in a backlog nobody accepts from.
    wait_until("the listener closed", DEADLINE, || {
        std::net::TcpStream::connect(lb.listen).is_err()
    });
    let mut reply = [0u8; 9];
    client.read_exact(&mut reply).expect("reply after SIGTERM");
    assert_eq!(&reply, b"in flight");
    drop(client);
    let status = lb.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", lb.log());
    for (_, pid) in lb.started_workers() {
        assert!(!alive(pid), "worker {pid} outlived lb");
    }
    assert!(
        lb.log().contains("all connections finished"),
        "{}",
        lb.log()
    );
}

#[test]
fn kill_9_of_lb_leaves_no_worker_behind() {
    let mut lb = Lb::start(
        r#"
services:
  - name: web
    listen: {listen}
    workers:
      command: ["{worker}"]
      count: 2
"#,
    );
    lb.wait_ready(2);
    let workers = lb.started_workers();
    assert_eq!(workers.len(), 2);
    lb.signal(Signal::SIGKILL);
    lb.wait_exit();
    wait_until("workers to die with lb", DEADLINE, || {
        workers.iter().all(|(_, pid)| !alive(*pid))
    });
}

#[test]
fn kill_9_of_lb_also_kills_what_a_shell_worker_started() {
    let mut lb = Lb::start(
        r#"
services:
  - name: web
    listen: {listen}
    workers:
      # The shell stays as the worker's first process; the server is its child.
      command: "{worker} & wait"
      count: 1
      env: { HELLO: "1" }
"#,
    );
    lb.wait_ready(1);
    let line = common::hello(lb.listen).expect("hello from the grandchild");
    let server: i32 = common::field(&format!(" {line}"), "pid")
        .expect("pid")
        .parse()
        .expect("pid number");
    let shell = lb.worker_pid(0);
    assert_ne!(server, shell, "the server should be the shell's child");
    lb.signal(Signal::SIGKILL);
    lb.wait_exit();
    wait_until("the shell and its child to die with lb", DEADLINE, || {
        !alive(shell) && !alive(server)
    });
}

#[test]
fn second_sigterm_stops_at_once_even_with_connections_and_stubborn_workers() {
    let mut lb = Lb::start(
        r#"
services:
  - name: web
    listen: {listen}
    workers:
      command: ["{worker}"]
      count: 2
      env: { IGNORE_SIGTERM: "1" }
      drain_timeout: 60s
      stop_timeout: 60s
"#,
    );
    lb.wait_ready(2);
    // An idle connection that would hold the drain for a minute.
    let mut client = connect(lb.listen);
    client.write_all(b"x").expect("send");
    let mut echo = [0u8; 1];
    client.read_exact(&mut echo).expect("echo");
    let started = std::time::Instant::now();
    lb.signal(Signal::SIGTERM);
    lb.wait_log("stopping: listeners closed");
    lb.signal(Signal::SIGTERM);
    let status = lb.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", lb.log());
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    let mut rest = Vec::new();
    assert_eq!(
        client
            .read_to_end(&mut rest)
            .map(|_| rest.len())
            .unwrap_or(0),
        0,
        "connection closed"
    );
    for (_, pid) in lb.started_workers() {
        assert!(!alive(pid), "worker {pid} outlived lb");
    }
}

#[test]
fn a_stalled_stdout_stops_neither_the_proxy_nor_a_graceful_stop() {
    // The workers flood stdout: far more than their pipes to lb and lb's queue hold, so
    // lb's stdout, read by nobody, stays blocked. Workers that print then wait, as on a
    // stopped terminal; lb itself must go on proxying (here to a static backend) and
    // must still stop on SIGTERM.
    let echo_backend = backend(|mut stream| {
        let mut buf = [0u8; 1024];
        while let Ok(n @ 1..) = stream.read(&mut buf) {
            let _ = stream.write_all(&buf[..n]);
        }
    });
    let edge = std::net::SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let mut lb = Lb::start_with_stdout_stalled(&format!(
        r#"
services:
  - name: web
    listen: {{listen}}
    workers:
      command: "head -c 400000 /dev/zero | tr '\\0' x | fold -w 100 & exec {{worker}}"
      count: 4
      stop_timeout: 1s
  - name: edge
    listen: {edge}
    backends: ["{echo_backend}"]
"#
    ));
    lb.wait_ready(4);
    for i in 0..20 {
        let sent = format!("request {i}");
        assert_eq!(echo(edge, sent.as_bytes()), sent.as_bytes());
    }
    assert_eq!(lb.admin("GET", "/healthz", b"").0, 200);
    lb.signal(Signal::SIGTERM);
    assert!(lb.wait_exit().success(), "{}", lb.log());
}

#[test]
fn a_shell_wrapped_worker_gets_its_stop_timeout_after_the_shell_dies() {
    // `sh -c "...; true"` cannot exec the worker, so the shell is the process lb started;
    // it dies at once on SIGTERM while the worker takes its time.
    let mut lb = Lb::start(
        r#"
services:
  - name: web
    listen: {listen}
    workers:
      command: "{worker}; true"
      count: 1
      env: { STOP_DELAY_MS: "700" }
      stop_timeout: 10s
"#,
    );
    lb.wait_ready(1);
    lb.signal(Signal::SIGUSR2);
    lb.wait_log("rollout finished");
    assert_eq!(lb.lines("[web/0] stopped cleanly").len(), 1, "{}", lb.log());
    lb.signal(Signal::SIGTERM);
    assert!(lb.wait_exit().success());
    assert_eq!(lb.lines("[web/0] stopped cleanly").len(), 2, "{}", lb.log());
    assert!(lb.lines("killing it").is_empty(), "{}", lb.log());
}
