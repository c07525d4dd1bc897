//! Backends found by DNS (contract §2 `backends`, `resolvers`, `resolve_every`): every
//! address a host name resolves to is a backend, followed as the answer changes, with a
//! real DNS server (Debian's `dnsmasq`) on loopback serving a hosts file the test
//! rewrites; and, without `resolvers`, the system's resolver. The tests that need
//! dnsmasq skip with a message where it is not installed, unless `CI` is set (`.ci/run`
//! installs it).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::config::{Config, Service};
use common::load::Load;
use common::observe::healthz;
use common::{Lb, WORKER, free_port, wait_until};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// What "within a few lookups" may take on a loaded 2-core machine.
const QUICK: Duration = Duration::from_secs(10);

/// How often lb looks the name up in these tests.
const RESOLVE_EVERY: &str = "300ms";

/// The name the tests' DNS server answers for; `lb.test` is local to it, so any other
/// name in it is NXDOMAIN at once.
const NAME: &str = "api.lb.test";

/// dnsmasq on 127.0.0.1 and a free port, answering from a hosts file; killed on drop.
struct Dnsmasq {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Dnsmasq {
    /// Starts dnsmasq with `NAME` resolving to `ips`, or returns None (after saying
    /// why) where dnsmasq is not installed and this is not CI.
    fn start(ips: &[&str]) -> Option<Dnsmasq> {
        let Some(binary) = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq", "/sbin/dnsmasq"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
        else {
            assert!(
                std::env::var_os("CI").is_none(),
                "dnsmasq is not installed; .ci/run installs it (Debian package dnsmasq-base)"
            );
            eprintln!(
                "skipping: dnsmasq is not installed (apt-get install dnsmasq-base to run this test)"
            );
            return None;
        };
        // A port free for TCP is almost always free for UDP too; if not, try another.
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("temp dir");
            let port = free_port();
            std::fs::write(dir.path().join("hosts"), hosts(ips)).expect("write hosts");
            let log = std::fs::File::create(dir.path().join("dnsmasq.log")).expect("log");
            let child = Command::new(&binary)
                .arg("--keep-in-foreground")
                .arg("--no-resolv")
                .arg("--no-hosts")
                .arg(format!(
                    "--addn-hosts={}",
                    dir.path().join("hosts").display()
                ))
                .arg("--local=/lb.test/")
                .arg(format!("--port={port}"))
                .arg("--listen-address=127.0.0.1")
                .arg("--bind-interfaces")
                .arg("--user=root")
                .arg("--pid-file=")
                .arg("--log-queries")
                .arg("--log-facility=-")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start dnsmasq");
            let mut dns = Dnsmasq { child, dir, port };
            let started = Instant::now();
            // It reads its hosts file once it listens.
            while dns.reads() == 0 {
                if dns.child.try_wait().ok().flatten().is_some() {
                    break;
                }
                assert!(
                    started.elapsed() < QUICK,
                    "dnsmasq did not start:\n{}",
                    dns.log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            if dns.reads() > 0 {
                return Some(dns);
            }
            eprintln!("dnsmasq exited, trying another port:\n{}", dns.log());
        }
        panic!("dnsmasq could not start on any port");
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dnsmasq.log")).unwrap_or_default()
    }

    /// How many times it has read its hosts file.
    fn reads(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("read ") && l.contains("hosts"))
            .count()
    }

    /// Queries it has answered for `NAME`.
    fn queries(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("query[") && l.contains(NAME))
            .count()
    }

    /// From now on, `NAME` resolves to `ips` (none: NXDOMAIN). Returns once dnsmasq has
    /// read the new file.
    fn answer(&self, ips: &[&str]) {
        let before = self.reads();
        std::fs::write(self.dir.path().join("hosts"), hosts(ips)).expect("rewrite hosts");
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGHUP).expect("SIGHUP dnsmasq");
        wait_until("dnsmasq to re-read its hosts file", QUICK, || {
            self.reads() > before
        });
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn hosts(ips: &[&str]) -> String {
    ips.iter().map(|ip| format!("{ip} {NAME}\n")).collect()
}

/// The test worker (an echo server) on `ip:port`; killed when dropped.
struct Backend(Child);

impl Backend {
    fn start(ip: &str, port: u16) -> Backend {
        let child = Command::new(WORKER)
            .env("HOST", ip)
            .env("PORT", port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a backend");
        let addr: SocketAddr = format!("{ip}:{port}").parse().expect("backend address");
        wait_until(&format!("the backend on {addr} listening"), QUICK, || {
            TcpStream::connect(addr).is_ok()
        });
        Backend(child)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `address` of every backend of the first service in `/status`, sorted.
fn status_addresses(lb: &Lb) -> Vec<String> {
    let status = lb.status();
    let mut addrs: Vec<String> = status["services"][0]["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .map(|b| b["address"].as_str().expect("address").to_owned())
        .collect();
    addrs.sort();
    addrs
}

fn backend_up(lb: &Lb, addr: &str) -> f64 {
    lb.metric("lb_backend_up", &[("service", "api"), ("worker", addr)])
}

/// Whether any series in `/metrics` carries `worker="<addr>"`.
fn has_series(lb: &Lb, addr: &str) -> bool {
    let (_, metrics) = lb.admin("GET", "/metrics", b"");
    metrics.contains(&format!("worker=\"{addr}\""))
}

/// One exchange on a held connection.
fn exchange(stream: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    stream.write_all(data)?;
    let mut reply = vec![0; data.len()];
    stream.read_exact(&mut reply)?;
    assert_eq!(reply, data);
    Ok(())
}

fn config(dns: &Dnsmasq, port: u16, balance: &str) -> String {
    Config::new()
        .set("resolvers", &format!("[{}]", dns.addr()))
        .service(
            Service::backend_entries("api", &[&format!("{NAME}:{port}")])
                .option("resolve_every", RESOLVE_EVERY)
                .option("balance", balance),
        )
        .yaml()
}

#[test]
fn a_host_name_is_followed_as_its_addresses_change_without_failed_clients() {
    let Some(dns) = Dnsmasq::start(&["127.0.0.2"]) else {
        return;
    };
    let port = free_port();
    let (two, three) = (format!("127.0.0.2:{port}"), format!("127.0.0.3:{port}"));
    let _b2 = Backend::start("127.0.0.2", port);
    let _b3 = Backend::start("127.0.0.3", port);
    let lb = Lb::start(&config(&dns, port, "round-robin"));
    let admin = lb.admin.expect("an admin API");
    wait_until("lb ready", QUICK, || healthz(admin) == Some(200));
    assert_eq!(status_addresses(&lb), vec![two.clone()]);
    assert_eq!(backend_up(&lb, &two), 1.0);
    let entry = &lb.status()["services"][0]["backends"][0];
    assert_eq!(entry["name"], format!("{NAME}:{port}"), "{entry}");

    // A connection to 127.0.0.2 that stays open while that address leaves the answer.
    let mut held = common::connect(lb.listen);
    exchange(&mut held, b"before\n").expect("held connection");
    let load = Load::start(lb.listen, 2, 2);
    load.wait_for(20);

    // A second address joins within a few lookups, and takes connections.
    dns.answer(&["127.0.0.2", "127.0.0.3"]);
    let changed = Instant::now();
    wait_until("127.0.0.3 in /status", QUICK, || {
        status_addresses(&lb) == vec![two.clone(), three.clone()]
    });
    let followed = changed.elapsed();
    // resolve_every is 300 ms: the next lookup sees it, with room for a loaded machine.
    assert!(
        followed < Duration::from_secs(3),
        "followed after {followed:?}"
    );
    wait_until("127.0.0.3 up", QUICK, || backend_up(&lb, &three) == 1.0);
    wait_until("connections reaching 127.0.0.3", QUICK, || {
        lb.metric(
            "lb_connections_total",
            &[("service", "api"), ("worker", &three)],
        ) >= 5.0
    });

    // The first address leaves: out of rotation, its series gone, its open connection
    // still served.
    dns.answer(&["127.0.0.3"]);
    wait_until("127.0.0.2 gone from /status", QUICK, || {
        status_addresses(&lb) == vec![three.clone()]
    });
    wait_until("127.0.0.2's series gone from /metrics", QUICK, || {
        !has_series(&lb, &two)
    });
    load.wait_for(50);
    exchange(&mut held, b"after\n").expect("the held connection still works");
    drop(held);
    let connections_to_three = lb.metric(
        "lb_connections_total",
        &[("service", "api"), ("worker", &three)],
    );
    load.wait_for(20);
    assert!(
        lb.metric(
            "lb_connections_total",
            &[("service", "api"), ("worker", &three)]
        ) > connections_to_three,
        "new connections go to 127.0.0.3"
    );

    // A failed lookup (the name is gone: NXDOMAIN) keeps the last addresses, and is
    // logged once however many lookups fail.
    dns.answer(&[]);
    lb.wait_log("host name lookup failed");
    let queries = dns.queries();
    wait_until("several more failed lookups", QUICK, || {
        dns.queries() >= queries + 6
    });
    assert_eq!(lb.lines("host name lookup failed").len(), 1, "{}", lb.log());
    assert_eq!(status_addresses(&lb), vec![three]);
    load.wait_for(20);
    dns.answer(&["127.0.0.3"]);
    lb.wait_log("host name resolves again");

    let report = load.stop();
    assert!(report.ok > 0);
    assert!(
        report.failures.is_empty(),
        "{} failed clients: {:?}",
        report.failures.len(),
        report.failures
    );
}

#[test]
fn each_address_of_a_name_is_its_own_source_hash_member() {
    let Some(dns) = Dnsmasq::start(&["127.0.0.2", "127.0.0.3", "127.0.0.4"]) else {
        return;
    };
    let port = free_port();
    let _backends: Vec<Backend> = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        .iter()
        .map(|ip| Backend::start(ip, port))
        .collect();
    let lb = Lb::start(&config(&dns, port, "source-hash"));
    let admin = lb.admin.expect("an admin API");
    wait_until("three backends", QUICK, || {
        healthz(admin) == Some(200) && status_addresses(&lb).len() == 3
    });
    // Clients from many source addresses spread over all three: three members, not one.
    for i in 0..60u8 {
        let local = SocketAddr::from(([127, 0, 1, i + 1], 0));
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket.bind(&local.into()).expect("bind a client address");
        socket.connect(&lb.listen.into()).expect("connect");
        let mut stream = TcpStream::from(socket);
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        exchange(&mut stream, b"hi\n").expect("exchange");
    }
    for ip in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        let addr = format!("{ip}:{port}");
        let n = lb.metric(
            "lb_connections_total",
            &[("service", "api"), ("worker", &addr)],
        );
        assert!(n > 0.0, "no client mapped to {addr}");
    }
}

#[test]
fn a_reload_that_drops_the_name_drops_its_addresses() {
    let Some(dns) = Dnsmasq::start(&["127.0.0.2"]) else {
        return;
    };
    let port = free_port();
    let _b2 = Backend::start("127.0.0.2", port);
    let _b5 = Backend::start("127.0.0.5", port);
    let lb = Lb::start(&config(&dns, port, "round-robin"));
    let admin = lb.admin.expect("an admin API");
    wait_until("lb ready", QUICK, || healthz(admin) == Some(200));
    assert_eq!(status_addresses(&lb), vec![format!("127.0.0.2:{port}")]);

    // The same service now names an address directly and the old name no more.
    let literal = format!("127.0.0.5:{port}");
    lb.rewrite_config(
        &Config::new()
            .set("resolvers", &format!("[{}]", dns.addr()))
            .service(
                Service::backend_entries("api", &[&literal]).option("resolve_every", RESOLVE_EVERY),
            )
            .yaml(),
    );
    let (code, body) = lb.admin("POST", "/reload", b"");
    assert_eq!(code, 200, "{body}");
    wait_until("only 127.0.0.5 in /status", QUICK, || {
        status_addresses(&lb) == vec![literal.clone()]
    });
    assert!(!has_series(&lb, &format!("127.0.0.2:{port}")));
    assert_eq!(
        common::observe::try_echo(lb.listen, b"x").expect("echo"),
        b"x"
    );
}

#[test]
fn without_resolvers_a_name_is_looked_up_by_the_system_resolver() {
    // /etc/hosts names localhost on every system; no DNS server is involved.
    let port = free_port();
    let _backend = Backend::start("127.0.0.1", port);
    let lb = Lb::start(
        &Config::new()
            .service(Service::backend_entries(
                "api",
                &[&format!("localhost:{port}")],
            ))
            .yaml(),
    );
    let admin = lb.admin.expect("an admin API");
    let local = format!("127.0.0.1:{port}");
    wait_until("localhost resolved", QUICK, || {
        healthz(admin) == Some(200) && status_addresses(&lb).contains(&local)
    });
    // Where localhost is ::1 too, nothing listens there: that backend leaves rotation
    // and the connect is retried on 127.0.0.1.
    for _ in 0..3 {
        assert_eq!(
            common::observe::try_echo(lb.listen, b"x").expect("echo"),
            b"x"
        );
    }
}
