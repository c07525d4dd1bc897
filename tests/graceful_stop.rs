//! The graceful stop (contract §3, §4): clients waiting in the accept queue are served,
//! each service's own `stop_timeout`, `shutdown_delay`, the drain message before the
//! stop signal, and no process a worker started outlives lb.

mod common;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::config::{Config, Service};
use common::observe::{healthz, try_echo};
use common::{Lb, alive, connect, free_port, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// What "at once" or "within a few seconds" may take on a loaded 2-core machine.
const QUICK: Duration = Duration::from_secs(10);

/// Connections the kernel completed and nobody accepted yet on the listening sockets at
/// `addr` (their accept queues, one per connection thread), or `None` when nothing
/// listens there.
fn accept_queue(addr: SocketAddr) -> Option<u32> {
    let tcp = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let local = format!("0100007F:{:04X}", addr.port());
    let queues: Vec<u32> = tcp
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl, local_address, rem_address, st, tx_queue:rx_queue; 0A is LISTEN, whose
            // rx_queue is the accept queue's length.
            if fields.get(1) != Some(&local.as_str()) || fields.get(3) != Some(&"0A") {
                return None;
            }
            let (_, rx) = fields.get(4)?.split_once(':')?;
            u32::from_str_radix(rx, 16).ok()
        })
        .collect();
    (!queues.is_empty()).then(|| queues.iter().sum())
}

/// Connection threads in the tests below. Past `max_connections` each holds one client
/// it accepted until a permit frees; the others wait in the accept queues.
const THREADS: u32 = 2;

#[test]
fn sigterm_serves_every_client_waiting_in_the_accept_queue() {
    let web = Service::workers("web")
        .option("max_connections", "1")
        .set("drain_timeout", "20s");
    let config = Config::new().set("threads", &THREADS.to_string());
    let mut lb = Lb::start(&config.service(web).yaml());
    lb.wait_ready(1);
    // The first client holds the only permit.
    let mut first = connect(lb.listen);
    first.write_all(b"first\n").expect("send");
    let mut reply = [0u8; 6];
    first
        .read_exact(&mut reply)
        .expect("echo to the first client");
    // Five more: completed by the kernel, each has sent its request, none served: each
    // thread holds at most one, the rest are queued.
    let queued: Vec<(TcpStream, String)> = (0..5)
        .map(|i| {
            let mut stream = connect(lb.listen);
            let request = format!("queued client {i}\n");
            stream.write_all(request.as_bytes()).expect("send");
            (stream, request)
        })
        .collect();
    wait_until("the other clients in lb's accept queues", QUICK, || {
        accept_queue(lb.listen) >= Some(5 - THREADS)
    });

    lb.signal(Signal::SIGTERM);
    let admin = lb.admin.expect("admin API");
    wait_until("/healthz to stop answering 200", QUICK, || {
        healthz(admin) != Some(200)
    });
    // Give lb the moment it takes to stop listening, if it does so before the queue is
    // served (that is what would reset the queued clients); never required.
    let signalled = Instant::now();
    while accept_queue(lb.listen).is_some() && signalled.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(20));
    }

    // Release the permit: the queued clients get it one after another.
    first
        .shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    let mut rest = Vec::new();
    let _ = first.read_to_end(&mut rest);
    drop(first);
    let clients: Vec<_> = queued
        .into_iter()
        .map(|(mut stream, request)| {
            std::thread::spawn(move || {
                let mut reply = vec![0u8; request.len()];
                let outcome = stream.read_exact(&mut reply).map(|()| reply);
                (request, outcome)
            })
        })
        .collect();
    let outcomes: Vec<_> = clients
        .into_iter()
        .map(|c| c.join().expect("client thread"))
        .collect();
    let failed: Vec<String> = outcomes
        .iter()
        .filter_map(|(request, outcome)| match outcome {
            Ok(reply) if reply == request.as_bytes() => None,
            Ok(reply) => Some(format!(
                "{}: got {:?}",
                request.trim(),
                String::from_utf8_lossy(reply)
            )),
            Err(err) => Some(format!("{}: {:?} ({err})", request.trim(), err.kind())),
        })
        .collect();
    assert!(
        failed.is_empty(),
        "queued clients not served after SIGTERM: {failed:?}"
    );
    let status = lb.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", lb.log());
}

#[test]
fn each_service_gets_its_own_stop_timeout() {
    let stubborn = |name: &str, stop_timeout: &str| {
        Service::workers(name)
            .set("stop_timeout", stop_timeout)
            .env("IGNORE_SIGTERM", "1")
    };
    let slow_listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut lb = Lb::start(
        &Config::new()
            .service(stubborn("quick", "1s"))
            .service(stubborn("slow", "6s").listen(slow_listen))
            .yaml(),
    );
    lb.wait_ready(2);
    let quick = lb.ready_slots("quick")[&0];
    let slow = lb.ready_slots("slow")[&0];
    let signalled = Instant::now();
    lb.signal(Signal::SIGTERM);
    wait_until("the quick service's worker killed", QUICK, || !alive(quick));
    let quick_gone = signalled.elapsed();
    wait_until("the slow service's worker killed", QUICK, || !alive(slow));
    let slow_gone = signalled.elapsed();
    assert!(lb.wait_exit().success(), "{}", lb.log());
    // Both ignore SIGTERM, so each lives exactly until its own SIGKILL.
    assert!(
        quick_gone >= Duration::from_millis(900) && quick_gone < Duration::from_secs(4),
        "stop_timeout 1s, but the worker was killed after {quick_gone:?}"
    );
    assert!(
        slow_gone >= Duration::from_millis(5500),
        "stop_timeout 6s, but the worker was killed after {slow_gone:?}"
    );
}

#[test]
fn shutdown_delay_keeps_serving_while_healthz_answers_503() {
    let mut lb = Lb::start(
        &Config::new()
            .shutdown_delay("3s")
            .service(Service::workers("web").count(2))
            .yaml(),
    );
    lb.wait_ready(2);
    let admin = lb.admin.expect("admin API");
    assert_eq!(healthz(admin), Some(200));
    let signalled = Instant::now();
    lb.signal(Signal::SIGTERM);
    wait_until("/healthz to answer 503", QUICK, || {
        healthz(admin) == Some(503)
    });
    let unhealthy = signalled.elapsed();
    assert!(
        unhealthy < Duration::from_millis(1500),
        "/healthz answered 503 only after {unhealthy:?}"
    );
    // New clients are still served during the delay.
    let mut served = 0;
    while signalled.elapsed() < Duration::from_secs(2) {
        let sent = format!("client {served} during shutdown_delay");
        match try_echo(lb.listen, sent.as_bytes()) {
            Ok(reply) => assert_eq!(reply, sent.as_bytes()),
            Err(err) => panic!(
                "a new client {:?} after SIGTERM, within shutdown_delay: {err}",
                signalled.elapsed()
            ),
        }
        served += 1;
    }
    assert!(served >= 3, "only {served} clients in two seconds");
    // Then lb stops.
    let status = lb.wait_exit();
    let stopped = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{}", lb.log());
    assert!(
        stopped >= Duration::from_millis(2900),
        "lb stopped {stopped:?} after SIGTERM, before its 3 s shutdown_delay"
    );
}

#[test]
fn sigterm_sends_every_worker_the_drain_message_before_its_stop_signal() {
    let web = Service::workers("web")
        .count(2)
        .set("drain_timeout", "20s")
        .env("CHANNEL_LOG", "1")
        .env("STOP_DELAY_MS", "0");
    let mut lb = Lb::start(&Config::new().service(web).yaml());
    lb.wait_ready(2);
    // An open connection holds the stop signals back until the test closes it.
    let mut held = connect(lb.listen);
    held.write_all(b"held\n").expect("send");
    let mut reply = [0u8; 5];
    held.read_exact(&mut reply).expect("echo");
    lb.signal(Signal::SIGTERM);
    let drained = |slot: usize| -> Vec<serde_json::Value> {
        let prefix = format!("[web/{slot}] channel:");
        lb.lines(&prefix)
            .iter()
            .filter_map(|l| serde_json::from_str(l.split_once(&prefix)?.1.trim()).ok())
            .filter(|m: &serde_json::Value| m["lb"] == "drain")
            .collect()
    };
    wait_until("the drain message at both workers", QUICK, || {
        !drained(0).is_empty() && !drained(1).is_empty()
    });
    for slot in [0, 1] {
        let left = drained(slot)[0]["timeout_ms"].as_u64().unwrap_or_default();
        assert!(
            (10_000..=20_000).contains(&left),
            "worker {slot}: {left} ms"
        );
    }
    assert!(lb.lines("] stopping").is_empty(), "{}", lb.log());
    drop(held);
    assert!(lb.wait_exit().success(), "{}", lb.log());
    let log = lb.log();
    for slot in [0, 1] {
        let drain = log.find(&format!("[web/{slot}] channel:"));
        let stopping = log.find(&format!("[web/{slot}] stopping"));
        assert!(stopping.is_some() && drain < stopping, "{log}");
    }
}

/// Daemons the test worker started (`DAEMON=1`), killed when the test ends whatever
/// happened, since lb's harness only kills process groups it started.
struct Daemons(Vec<i32>);

impl Daemons {
    /// Takes in every daemon pid the workers of `lb` printed so far.
    fn update(&mut self, lb: &Lb) {
        self.0 = lb
            .lines("] daemon pid=")
            .iter()
            .filter_map(|l| l.rsplit_once("daemon pid=")?.1.trim().parse().ok())
            .collect();
    }

    /// Those still running (not some other process that reused a pid).
    fn alive(&self) -> Vec<i32> {
        self.0
            .iter()
            .copied()
            .filter(|pid| {
                alive(*pid)
                    && std::fs::read(format!("/proc/{pid}/environ"))
                        .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == b"LB_TEST_DAEMON=run"))
            })
            .collect()
    }
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for pid in self.alive() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

#[test]
fn a_daemon_a_worker_started_is_gone_after_lbs_stop() {
    let mut lb = Lb::start(
        &Config::new()
            .service(Service::workers("web").env("DAEMON", "1"))
            .yaml(),
    );
    lb.wait_ready(1);
    let mut daemons = Daemons(Vec::new());
    wait_until("the worker's daemon", QUICK, || {
        daemons.update(&lb);
        !daemons.0.is_empty()
    });
    assert_eq!(daemons.alive(), daemons.0, "{}", lb.log());
    lb.signal(Signal::SIGTERM);
    assert!(lb.wait_exit().success(), "{}", lb.log());
    wait_until("the daemon to be gone", QUICK, || {
        daemons.alive().is_empty()
    });
}

#[test]
fn a_crash_looping_worker_does_not_pile_up_daemons() {
    let mut lb = Lb::start(
        &Config::new()
            .service(
                Service::workers("web")
                    .set("restart_backoff", "{ initial: 100ms, max: 100ms }")
                    .env("DAEMON", "1")
                    .env("EXIT_AFTER_MS", "300"),
            )
            .yaml(),
    );
    let mut daemons = Daemons(Vec::new());
    let mut most = 0;
    wait_until(
        "six runs of the crash-looping worker",
        Duration::from_secs(20),
        || {
            daemons.update(&lb);
            most = most.max(daemons.alive().len());
            daemons.0.len() >= 6
        },
    );
    // Its own daemon beside each run, and at most the one of the run that just died
    // while lb is stopping it.
    assert!(
        most <= 2,
        "{most} daemons alive at once over {} runs",
        daemons.0.len()
    );
    lb.signal(Signal::SIGTERM);
    assert!(lb.wait_exit().success(), "{}", lb.log());
    daemons.update(&lb);
    wait_until("every daemon gone after lb's stop", QUICK, || {
        daemons.alive().is_empty()
    });
}

/// Each service's drain time counts from when lb stops taking clients, and a service
/// whose clients wait for a permit does not hold up another's workers: the stop takes
/// no longer than `lb check` says.
#[test]
fn a_stop_takes_no_longer_than_lb_check_says() {
    let b_listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = Config::new()
        .service(
            Service::workers("a")
                .option("max_connections", "1")
                .set("drain_timeout", "4s")
                .set("stop_timeout", "1s")
                .env("CHANNEL_LOG", "1"),
        )
        .service(
            Service::workers("b")
                .listen(b_listen)
                .set("drain_timeout", "1s")
                .set("stop_timeout", "4s")
                .env("IGNORE_SIGTERM", "1"),
        );
    let mut lb = Lb::start(&config.yaml());
    lb.wait_ready(2);
    let check = common::lb_check(&lb.dir.path().join("lb.yaml"));
    let summary = String::from_utf8_lossy(&check.stdout).to_string();
    assert!(summary.contains("longest stop: 5s"), "{summary}");
    // Service a is at max_connections with one client, another waits in the queue.
    let mut held = TcpStream::connect(lb.listen).expect("connect");
    held.write_all(b"held\n").expect("write");
    let mut buf = [0u8; 16];
    let _ = held.read(&mut buf);
    let mut queued = TcpStream::connect(lb.listen).expect("connect");
    queued.write_all(b"queued\n").expect("write");
    std::thread::sleep(Duration::from_millis(200));
    let signalled = Instant::now();
    lb.signal(Signal::SIGTERM);
    assert!(lb.wait_exit().success(), "{}", lb.log());
    let took = signalled.elapsed();
    let drains = lb.lines("channel: ");
    assert!(
        took < Duration::from_millis(5_900),
        "lb check said 5s, the stop took {took:?}; drain messages: {drains:?}"
    );
}

/// lb still takes clients during `shutdown_delay`, so a worker that crashes then is
/// restarted.
#[test]
fn a_worker_that_crashes_during_shutdown_delay_is_restarted() {
    let mut lb = Lb::start(
        &Config::new()
            .shutdown_delay("6s")
            .service(
                Service::workers("web").set("restart_backoff", "{ initial: 100ms, max: 100ms }"),
            )
            .yaml(),
    );
    lb.wait_ready(1);
    lb.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    let pid = lb.worker_pid(0);
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    wait_until("the crashed worker reaped", Duration::from_secs(5), || {
        !alive(pid)
    });
    std::thread::sleep(Duration::from_millis(1000));
    let served = common::observe::try_echo(lb.listen, b"during the delay\n");
    let workers = lb.status_workers("web");
    assert!(
        served.as_deref().ok() == Some(&b"during the delay\n"[..]),
        "a client 1 s after the crash, 4 s before shutdown_delay ends: {served:?}; /status {workers:?}"
    );
    lb.wait_exit();
}

/// Hundreds of clients queued when SIGTERM arrives are all served: the workers leave
/// rotation only once every queued client has reached one.
#[test]
fn sigterm_serves_every_queued_client_even_a_few_hundred() {
    const CLIENTS: usize = 300;
    let mut lb = Lb::start(
        &Config::new()
            .service(Service::workers("web").count(2).set("drain_timeout", "5s"))
            .yaml(),
    );
    lb.wait_ready(2);
    kill(lb.pid(), Signal::SIGSTOP).expect("SIGSTOP lb");
    let clients: Vec<TcpStream> = (0..CLIENTS)
        .map(|i| {
            let mut s = TcpStream::connect(lb.listen).expect("connect");
            s.write_all(format!("client {i}\n").as_bytes())
                .expect("write");
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            s
        })
        .collect();
    kill(lb.pid(), Signal::SIGTERM).expect("SIGTERM lb");
    kill(lb.pid(), Signal::SIGCONT).expect("SIGCONT lb");
    let mut failed = Vec::new();
    for (i, mut s) in clients.into_iter().enumerate() {
        let want = format!("client {i}\n");
        let mut got = vec![0u8; want.len()];
        if let Err(err) = s.read_exact(&mut got) {
            failed.push((i, err.kind()));
        }
    }
    let _ = lb.wait_exit();
    assert!(
        failed.is_empty(),
        "{} of {CLIENTS} queued clients not served: first {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
}
