//! `lb run -- COMMAND` (contract §1): the whole start with no config file.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;

use common::{LB, Lb, WORKER, field, free_port, hello};
use nix::sys::signal::Signal;

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

#[test]
fn lb_run_serves_a_command_with_two_workers_and_no_config_file() {
    let (listen, admin) = (loopback(), loopback());
    let dir = tempfile::tempdir().expect("temp dir");
    let mut lb = Lb::spawn(
        dir,
        listen,
        Command::new(LB)
            .args(["run", "--listen", &listen.to_string()])
            .args(["--admin", &admin.to_string(), "--count", "2", "--", WORKER])
            // Workers get lb's environment, as with a config file.
            .env("HELLO", "1"),
    );
    lb.admin = Some(admin);
    lb.wait_ready(2);
    let ids: BTreeSet<String> = (0..4)
        .map(|_| {
            let line = format!(" {}", hello(listen).expect("served through lb run"));
            assert_eq!(field(&line, "service"), Some("app"), "{line}");
            field(&line, "id").expect("id").to_owned()
        })
        .collect();
    assert_eq!(ids, BTreeSet::from(["0".to_owned(), "1".to_owned()]));

    // The admin API and the client commands work as with a file; a reload has nothing
    // new to read, and a rolling restart replaces both workers.
    let reload = lb.cli(&["reload"]);
    assert!(reload.status.success(), "{reload:?}");
    let restart = lb.cli(&["restart"]);
    assert!(restart.status.success(), "{restart:?}");
    assert_eq!(
        lb.restarts("app").values().copied().collect::<Vec<_>>(),
        [1, 1]
    );

    lb.signal(Signal::SIGTERM);
    assert!(lb.wait_exit().success());
}

#[test]
fn lb_run_without_a_command_or_with_a_bad_count_says_so() {
    for args in [&["run"][..], &["run", "--count", "0", "--", "true"]] {
        let out = Command::new(LB).args(args).output().expect("run lb");
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty());
    }
}

#[test]
fn the_readmes_lb_run_command_serves_the_hello_example() {
    let repo = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{repo}/README.md")).expect("README");
    let line = readme
        .lines()
        .find(|l| l.starts_with("lb run --listen"))
        .expect("the README shows lb run");
    // As written, on free ports (tests run side by side), from the repository's root.
    let (listen, admin) = (loopback(), loopback());
    let args: Vec<String> = line
        .split_whitespace()
        .skip(1)
        .map(|arg| match arg {
            "127.0.0.1:8080" => listen.to_string(),
            other => other.to_owned(),
        })
        .collect();
    let dir = tempfile::tempdir().expect("temp dir");
    let lb = Lb::spawn(
        dir,
        listen,
        Command::new(LB)
            .args(["--admin", &admin.to_string()])
            .args(&args)
            .current_dir(repo),
    );
    lb.wait_ready(1);
    let (code, body) = common::http(listen, "GET", "/", b"");
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("hello from worker"), "{body}");
}
