//! Health checks (contract §2): `fall` failed checks take a backend out of rotation and
//! `rise` passed ones bring it back, for static backends and workers alike; an HTTP
//! check finds a hung worker, which is then replaced, drain first.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::config::{Config, Service};
use common::observe::{healthz, try_echo};
use common::{Lb, WORKER, free_port, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// What "within a few checks" may take on a loaded 2-core machine.
const QUICK: Duration = Duration::from_secs(10);

/// Checks every 200 ms; out after 2 failures, back after 2 passes.
const FAST_CHECKS: &str = "{ interval: 200ms, timeout: 200ms, fall: 2, rise: 2 }";

/// The test worker run by hand as a static backend on a port; killed when dropped.
struct StaticBackend(Child);

impl StaticBackend {
    fn start(port: u16) -> StaticBackend {
        let child = Command::new(WORKER)
            .env("HOST", "127.0.0.1")
            .env("PORT", port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a static backend");
        StaticBackend(child)
    }
}

impl Drop for StaticBackend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn backend_up(lb: &Lb, worker: &str) -> f64 {
    lb.metric("lb_backend_up", &[("service", "web"), ("worker", worker)])
}

#[test]
fn a_static_backend_that_dies_leaves_rotation_after_fall_checks_and_returns_after_rise() {
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let backend = StaticBackend::start(port);
    wait_until("the backend listening", QUICK, || {
        std::net::TcpStream::connect(addr).is_ok()
    });
    let lb = Lb::start(
        &Config::new()
            .service(Service::backends("web", &[addr]).option("health_check", FAST_CHECKS))
            .yaml(),
    );
    let admin = lb.admin.expect("an admin API");
    wait_until("lb answering", QUICK, || healthz(admin).is_some());
    let label = addr.to_string();
    wait_until("the backend up", QUICK, || backend_up(&lb, &label) == 1.0);
    assert_eq!(try_echo(lb.listen, b"hi").expect("echo"), b"hi");
    assert_eq!(lb.status()["services"][0]["backends"][0]["health"], "up");

    drop(backend);
    let died = Instant::now();
    wait_until("the backend out of rotation", QUICK, || {
        backend_up(&lb, &label) == 0.0
    });
    // Two failed checks 200 ms apart: the first may come right after the kill.
    assert!(
        died.elapsed() >= Duration::from_millis(190),
        "{:?}",
        died.elapsed()
    );
    assert_eq!(lb.status()["services"][0]["backends"][0]["health"], "down");

    let _backend = StaticBackend::start(port);
    let back = Instant::now();
    wait_until("the backend back in rotation", QUICK, || {
        backend_up(&lb, &label) == 1.0
    });
    assert!(
        back.elapsed() >= Duration::from_millis(190),
        "{:?}",
        back.elapsed()
    );
    assert_eq!(try_echo(lb.listen, b"again").expect("echo"), b"again");
}

#[test]
fn an_http_check_that_turns_to_500_takes_a_worker_out_until_it_passes_again() {
    let dir = tempfile::tempdir().expect("temp dir");
    let health = |slot: usize| dir.path().join(format!("health-{slot}"));
    let lb = Lb::start(
        &Config::new()
            .service(
                Service::workers("web")
                    .count(2)
                    .env(
                        "HEALTH_FILE",
                        &format!("{}/health-${{LB_WORKER_ID}}", dir.path().display()),
                    )
                    .option(
                        "health_check",
                        "{ interval: 200ms, timeout: 500ms, fall: 2, rise: 2, path: /healthz }",
                    ),
            )
            .yaml(),
    );
    lb.wait_ready(2);
    wait_until("both workers checked up", QUICK, || {
        lb.status_workers("web").iter().all(|w| w["health"] == "up")
    });
    std::fs::write(health(0), "500").expect("turn worker 0 bad");
    wait_until("worker 0 out of rotation", QUICK, || {
        backend_up(&lb, "0") == 0.0
    });
    assert_eq!(lb.status_workers("web")[0]["health"], "down");
    assert_eq!(backend_up(&lb, "1"), 1.0);
    // Every client reaches the healthy worker meanwhile.
    for i in 0..10 {
        let msg = format!("while 0 is out {i}");
        assert_eq!(
            try_echo(lb.listen, msg.as_bytes()).expect("echo"),
            msg.as_bytes()
        );
    }
    std::fs::write(health(0), "204").expect("turn worker 0 good");
    wait_until("worker 0 back in rotation", QUICK, || {
        backend_up(&lb, "0") == 1.0
    });
    assert_eq!(lb.status_workers("web")[0]["health"], "up");
    // Kept out for less than its ready_timeout (30 s): not replaced.
    assert_eq!(
        lb.metric("lb_worker_restarts_total", &[("reason", "health")]),
        0.0
    );
}

#[test]
fn a_hung_worker_is_found_by_its_http_check_and_replaced_drain_first() {
    let lb = Lb::start(
        &Config::new()
            .service(
                Service::workers("web")
                    .count(2)
                    .env("HEALTH_FILE", "/nonexistent/all-good")
                    .set("ready_timeout", "1s")
                    .set("drain_timeout", "1s")
                    .set("stop_timeout", "1s")
                    .option(
                        "health_check",
                        "{ interval: 200ms, timeout: 300ms, fall: 2, rise: 1, path: /healthz }",
                    ),
            )
            .yaml(),
    );
    lb.wait_ready(2);
    let hung = lb.ready_slots("web")[&0];
    kill(Pid::from_raw(hung), Signal::SIGSTOP).expect("SIGSTOP worker 0");
    wait_until("worker 0 out of rotation", QUICK, || {
        backend_up(&lb, "0") == 0.0
    });
    // Clients reach worker 1 while worker 0 hangs: none waits on the hung one.
    for i in 0..10 {
        let msg = format!("while 0 hangs {i}");
        assert_eq!(
            try_echo(lb.listen, msg.as_bytes()).expect("echo"),
            msg.as_bytes()
        );
    }
    lb.wait_status("a new worker in slot 0", QUICK, |lb| {
        lb.ready_slots("web")
            .get(&0)
            .is_some_and(|pid| *pid != hung)
    });
    assert_eq!(
        lb.metric(
            "lb_worker_restarts_total",
            &[("worker", "0"), ("reason", "health")]
        ),
        1.0
    );
    wait_until("the hung worker stopped", QUICK, || !common::alive(hung));
    wait_until("the new worker 0 in rotation", QUICK, || {
        backend_up(&lb, "0") == 1.0
    });
}
