//! lb as PID 1 of a PID namespace (as in a container): it reaps orphans that are not its
//! workers, and still stops gracefully on SIGTERM.

mod common;

use std::net::SocketAddr;
use std::process::Command;

use common::{DEADLINE, LB, Lb, WORKER, free_port, hello, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Children of `pid`, from /proc.
fn children(pid: i32) -> Vec<i32> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
    })
}

#[test]
fn as_pid_1_lb_reaps_orphans_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("temp dir");
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    // Each worker start leaves an orphan: a subshell's `sleep` whose parent exits at once,
    // so the orphan is re-parented to PID 1, which must reap it when it ends.
    let config = format!(
        r#"
admin: {{ listen: null }}
services:
  - name: web
    listen: {listen}
    workers:
      command: "(sleep 0.2 &) ; exec {WORKER}"
      count: 2
      env: {{ HELLO: "1" }}
"#
    );
    let path = dir.path().join("lb.yaml");
    std::fs::write(&path, config).expect("write config");
    let mut command = Command::new("unshare");
    command
        .args([
            "--pid",
            "--fork",
            "--kill-child",
            "--mount-proc",
            LB,
            "--config",
        ])
        .arg(&path);
    command.env("LB_LOG", "debug");
    let mut lb = Lb::spawn(dir, listen, &mut command);
    lb.wait_ready(2);
    hello(listen).expect("lb serves as PID 1");
    let unshare = lb.pid().as_raw();
    let inner = *children(unshare).first().expect("lb runs under unshare");
    // Each orphaned sleep ends after 0.2 s and lb reaps it: no zombie stays behind.
    wait_until("lb to reap both orphans", DEADLINE, || {
        lb.lines("reaped a process that was not a worker").len() >= 2
    });
    let zombies: Vec<i32> = children(inner)
        .into_iter()
        .filter(|c| is_zombie(*c))
        .collect();
    assert!(zombies.is_empty(), "zombies under lb: {zombies:?}");
    kill(Pid::from_raw(inner), Signal::SIGTERM).expect("SIGTERM to lb");
    let status = lb.wait_exit();
    assert!(status.success(), "{status:?}\n{}", lb.log());
    assert!(lb.log().contains("stopped"), "{}", lb.log());
}
