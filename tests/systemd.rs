//! lb under systemd (contract §8): the `Type=notify` protocol seen from a test-owned
//! `NOTIFY_SOCKET`, sockets passed by socket activation (the real
//! `systemd-socket-activate`, and a socket held across two lb processes as systemd
//! holds it across a restart), and the shipped unit files checked by
//! `systemd-analyze verify`.

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::os::fd::AsRawFd as _;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::config::{Config, Service};
use common::observe::healthz;
use common::{DEADLINE, LB, Lb, echo};
use nix::sys::signal::Signal;

/// systemd's end of the notify protocol: every datagram lb sends, in order.
struct NotifySocket {
    socket: UnixDatagram,
    _dir: tempfile::TempDir,
    path: String,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        NotifySocket {
            socket,
            path: path.to_str().expect("utf-8 path").to_owned(),
            _dir: dir,
        }
    }

    /// The next message other than a watchdog ping, which `pings` counts.
    fn next(&self, pings: &mut usize) -> String {
        let start = Instant::now();
        let mut buf = [0u8; 4096];
        while start.elapsed() < DEADLINE {
            let Ok(n) = self.socket.recv(&mut buf) else {
                continue;
            };
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            if message == "WATCHDOG=1\n" {
                *pings += 1;
            } else {
                return message;
            }
        }
        panic!("no message on NOTIFY_SOCKET within {DEADLINE:?}");
    }
}

fn first_line(message: &str) -> &str {
    message.lines().next().unwrap_or_default()
}

#[test]
fn type_notify_hears_ready_reloading_stopping_and_watchdog_pings() {
    let notify = NotifySocket::new();
    // Workers that take a while to start: READY=1 must wait for them.
    let config = Config::new()
        .service(
            Service::workers("web")
                .count(2)
                .env("START_DELAY_MS", "300"),
        )
        .yaml();
    let mut lb = Lb::start_under(
        &config,
        &[],
        &[("NOTIFY_SOCKET", &notify.path), ("WATCHDOG_USEC", "200000")],
    );
    let admin = lb.admin.expect("admin API");
    let mut pings = 0;

    let ready = notify.next(&mut pings);
    assert_eq!(first_line(&ready), "READY=1", "{ready}");
    assert_eq!(
        healthz(admin),
        Some(200),
        "READY=1 before every service was served"
    );

    // Workers do not see lb's notify socket or watchdog.
    for (slot, pid) in lb.started_workers() {
        let env = std::fs::read(format!("/proc/{pid}/environ")).expect("worker environ");
        let env = String::from_utf8_lossy(&env);
        for var in ["NOTIFY_SOCKET=", "WATCHDOG_USEC="] {
            assert!(!env.contains(var), "worker {slot} inherited {var}");
        }
    }

    // A reload is RELOADING=1 (with the monotonic time systemd matches it by), then READY=1.
    let reload = lb.cli(&["reload"]);
    assert!(reload.status.success(), "{reload:?}");
    let reloading = notify.next(&mut pings);
    assert_eq!(first_line(&reloading), "RELOADING=1", "{reloading}");
    assert!(reloading.contains("\nMONOTONIC_USEC="), "{reloading}");
    assert_eq!(first_line(&notify.next(&mut pings)), "READY=1");

    // WATCHDOG_USEC of 200 ms: a ping every 100 ms.
    let start = Instant::now();
    let before = pings;
    let mut buf = [0u8; 64];
    while pings < before + 3 {
        assert!(start.elapsed() < DEADLINE, "watchdog pings stopped");
        if let Ok(n) = notify.socket.recv(&mut buf) {
            assert_eq!(&buf[..n], b"WATCHDOG=1\n");
            pings += 1;
        }
    }

    lb.signal(Signal::SIGTERM);
    let stopping = notify.next(&mut pings);
    assert_eq!(first_line(&stopping), "STOPPING=1", "{stopping}");
    assert!(lb.wait_exit().success());
}

/// The targets of a process's descriptors (`socket:[inode]` for a socket).
fn descriptors(pid: i32) -> Vec<std::path::PathBuf> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("descriptors");
    fds.flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .collect()
}

#[test]
fn systemd_socket_activate_hands_lb_the_service_and_admin_sockets() {
    let config = Config::new()
        .service(Service::workers("web").count(2).env("HELLO", "1"))
        .yaml();
    let lb = Lb::start_under(
        &config,
        &["systemd-socket-activate", "-l", "{listen}", "-l", "{admin}"],
        &[],
    );
    let admin = lb.admin.expect("admin API");
    // systemd-socket-activate starts lb when the first client arrives; the client waits
    // in the passed socket's queue meanwhile, and lb serves it.
    let mut first = None;
    common::wait_until("systemd-socket-activate listens", DEADLINE, || {
        first = std::net::TcpStream::connect(lb.listen).ok();
        first.is_some()
    });
    let mut first = first.expect("connected");
    first
        .set_read_timeout(Some(DEADLINE))
        .expect("read timeout");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&mut first), &mut line)
        .expect("the client that started lb is served");
    assert!(line.starts_with("id="), "{line}");
    assert_eq!(healthz(admin), Some(200));
    // lb listens on the two sockets it was passed, as descriptors 3 and 4.
    let passed: Vec<_> = [3, 4]
        .map(|fd| std::fs::read_link(format!("/proc/{}/fd/{fd}", lb.pid())).expect("passed fd"))
        .into();
    // The workers see neither the sockets nor the variables that passed them.
    for (slot, pid) in lb.started_workers() {
        let env = std::fs::read(format!("/proc/{pid}/environ")).expect("worker environ");
        let env = String::from_utf8_lossy(&env);
        assert!(
            !env.contains("LISTEN_FDS="),
            "worker {slot} inherited LISTEN_FDS"
        );
        let held: Vec<_> = descriptors(pid)
            .into_iter()
            .filter(|target| passed.contains(target))
            .collect();
        assert!(held.is_empty(), "worker {slot} holds lb's sockets {held:?}");
    }
}

/// Runs lb with `socket` passed as descriptor 3, the way systemd's socket units do.
fn start_with_socket(config: &str, socket: &TcpListener) -> Lb {
    // std opens sockets close-on-exec; this copy is inherited by the shell (bash: dash
    // takes single-digit descriptors only), which moves it to 3 and names lb (its own
    // pid, kept by exec) in LISTEN_PID. The copy takes the lowest free number, which is 3
    // itself whenever another test thread has just closed its descriptor 3: then it
    // stays where it is (moving it would close it).
    let copy = nix::unistd::dup(socket).expect("dup the socket");
    let fd = copy.as_raw_fd();
    let script =
        format!(r#"[ {fd} = 3 ] || exec 3<&{fd} {fd}<&-; LISTEN_PID=$$ LISTEN_FDS=1 exec "$@""#);
    let lb = Lb::start_under(config, &["bash", "-c", &script, "bash"], &[]);
    drop(copy);
    lb
}

#[test]
fn a_restart_of_lb_on_a_passed_socket_refuses_no_client() {
    // The test holds the socket as systemd does, across two lb processes.
    let socket = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = socket.local_addr().expect("address");
    let config = Config::new()
        .service(Service::workers("web").count(1).listen(addr))
        .yaml();
    let mut first = start_with_socket(&config, &socket);
    first.wait_ready(1);
    assert_eq!(echo(addr, b"first lb"), b"first lb");
    first.signal(Signal::SIGTERM);
    assert!(first.wait_exit().success());

    // No lb runs: clients' handshakes complete in the socket's queue and they wait. The
    // first lb left the backlog whole (a socket it had bound itself, it would have
    // shrunk before closing), so none of them is held back.
    let waiting: Vec<_> = (0..5)
        .map(|i| {
            let mut client = common::connect(addr);
            client
                .write_all(format!("client {i}").as_bytes())
                .expect("send");
            client
                .shutdown(std::net::Shutdown::Write)
                .expect("half-close");
            (i, client)
        })
        .collect();

    let second = start_with_socket(&config, &socket);
    for (i, mut client) in waiting {
        let mut answer = String::new();
        client
            .read_to_string(&mut answer)
            .expect("a queued client is served");
        assert_eq!(answer, format!("client {i}"));
    }
    drop(second);
}

/// `systemd-analyze verify` on a unit file: its output, empty when the unit is sound.
/// The unit's `ExecStart=` must name an executable that exists, so it is checked as
/// installed: with lb at the path the unit names.
fn verify(unit: &Path) -> String {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(unit)
        .output()
        .expect("systemd-analyze (Debian package systemd) is installed");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        said
    } else {
        format!("{said}exit: {}", out.status)
    }
}

/// The shipped unit, as installed with lb where this test built it.
fn installed_unit(dir: &Path, name: &str) -> std::path::PathBuf {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/systemd")
        .join(name);
    let text = std::fs::read_to_string(&shipped).expect("shipped unit");
    let path = dir.join(name);
    std::fs::write(&path, text.replace("/usr/local/bin/lb", LB)).expect("write unit");
    path
}

#[test]
fn the_shipped_units_pass_systemd_analyze_verify() {
    let dir = tempfile::tempdir().expect("temp dir");
    for name in ["lb.service", "lb.socket"] {
        let unit = installed_unit(dir.path(), name);
        assert_eq!(verify(&unit), "", "{name}");
    }
    // The check fails when it should: a misspelled service type is only a warning to
    // systemd, and an error here.
    let unit = installed_unit(dir.path(), "lb.service");
    let text = std::fs::read_to_string(&unit).expect("unit");
    std::fs::write(&unit, text.replace("Type=notify", "Type=notfy")).expect("write unit");
    assert!(verify(&unit).contains("notfy"));
}

#[test]
fn the_units_stop_timeout_exceeds_the_longest_stop_of_the_defaults() {
    let dir = tempfile::tempdir().expect("temp dir");
    let unit = std::fs::read_to_string(installed_unit(dir.path(), "lb.service")).expect("unit");
    let timeout: u64 = unit
        .lines()
        .find_map(|line| line.strip_prefix("TimeoutStopSec="))
        .expect("TimeoutStopSec=")
        .parse()
        .expect("seconds");
    let config = dir.path().join("lb.yaml");
    let defaults = Service::workers("web")
        .listen("127.0.0.1:8080")
        .command(&["node", "server.js"]);
    std::fs::write(&config, Config::new().service(defaults).yaml()).expect("write config");
    let check = Command::new(LB)
        .arg("check")
        .arg(&config)
        .output()
        .expect("lb check");
    let summary = String::from_utf8_lossy(&check.stdout);
    let longest: u64 = summary
        .lines()
        .find_map(|line| line.strip_prefix("longest stop: ")?.split_once('s'))
        .and_then(|(seconds, _)| seconds.parse().ok())
        .expect("lb check prints the longest stop");
    assert!(
        timeout > longest,
        "TimeoutStopSec={timeout}, longest stop {longest}s"
    );
}

#[test]
fn a_passed_socket_can_be_taken_again_after_a_failed_reload() {
    // The test holds the passed socket as systemd does.
    let socket = TcpListener::bind("127.0.0.1:0").expect("bind");
    let passed = socket.local_addr().expect("address");
    // An address something else listens on, so a reload that wants it fails.
    let busy = TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = busy.local_addr().map(|a| (a, busy)).expect("address");
    let base = Config::new().service(Service::workers("web").count(1));
    let lb = start_with_socket(&base.yaml(), &socket);
    lb.wait_ready(1);
    // A reload that adds a service on the passed address and on a busy one: refused.
    let both = base
        .clone()
        .service(Service::backends("api", &[lb.listen]).listen(format!("[{passed}, {}]", busy.0)));
    let out = reload_to(&lb, &both);
    assert!(!out.status.success(), "{out:?}");
    // The same service on the passed address alone must now work.
    let one = base.service(Service::backends("api", &[lb.listen]).listen(passed));
    assert_reloaded(&reload_to(&lb, &one));
}

#[test]
fn a_passed_socket_can_be_taken_again_after_a_reload_released_it() {
    let socket = TcpListener::bind("127.0.0.1:0").expect("bind");
    let passed = socket.local_addr().expect("address");
    let base = Config::new().service(Service::workers("web").count(1));
    let with_api = base
        .clone()
        .service(Service::backends("api", &[passed]).listen(passed));
    let lb = start_with_socket(&with_api.yaml(), &socket);
    lb.wait_ready(1);
    assert_reloaded(&reload_to(&lb, &base));
    assert_reloaded(&reload_to(&lb, &with_api));
}

/// Writes `config` over lb's file and runs `lb reload`.
fn reload_to(lb: &Lb, config: &Config) -> std::process::Output {
    lb.rewrite_config(&config.yaml());
    lb.cli(&["reload"])
}

fn assert_reloaded(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn no_reloading_or_ready_is_sent_after_stopping() {
    let notify = NotifySocket::new();
    let config = Config::new()
        .shutdown_delay("5s")
        .service(Service::workers("web").count(1))
        .yaml();
    let lb = Lb::start_under(&config, &[], &[("NOTIFY_SOCKET", &notify.path)]);
    let mut pings = 0;
    assert_eq!(first_line(&notify.next(&mut pings)), "READY=1");
    lb.signal(Signal::SIGTERM);
    assert_eq!(first_line(&notify.next(&mut pings)), "STOPPING=1");
    // An operator's reload while lb drains (shutdown_delay keeps it up).
    let reload = lb.cli(&["reload"]);
    assert!(!reload.status.success(), "{reload:?}");
    let mut buf = [0u8; 4096];
    let mut after = Vec::new();
    while let Ok(n) = notify.socket.recv(&mut buf) {
        after.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(after.is_empty(), "after STOPPING=1: {after:?}");
}
