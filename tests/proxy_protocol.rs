//! What lb tells backends and operators about each client (contract §2, §6): the PROXY
//! protocol header, byte-exact against haproxy's proxy-protocol.txt, before the client's
//! first byte (and the LOCAL form on lb's own checks); `lb_connections_dropped_total`;
//! and the `log_connections` line in JSON.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::config::{Config, Service};
use common::observe::healthz;
use common::{Lb, backend, free_port, wait_until};

const QUICK: Duration = Duration::from_secs(10);

/// A backend that records the first bytes of every connection (until `until` has
/// arrived, or the peer closes), then echoes what follows.
fn recording_backend(until: &'static [u8]) -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let addr = backend(move |mut stream| {
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        while !got.windows(until.len()).any(|w| w == until) {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        record.lock().expect("record").push(got);
        let _ = stream.write_all(b"ok\n");
    });
    (addr, seen)
}

/// A client from `ip` (any of 127/8 reaches loopback) that sends `hello\n` to lb and
/// reads the backend's `ok`; returns its own address.
fn client_from(ip: Ipv4Addr, lb: SocketAddr) -> SocketAddr {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    socket
        .bind(&SocketAddr::from((ip, 0)).into())
        .expect("bind the client address");
    socket.connect(&lb.into()).expect("connect to lb");
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(QUICK)).expect("read timeout");
    let me = stream.local_addr().expect("client address");
    stream.write_all(b"hello\n").expect("send");
    let mut ok = [0u8; 3];
    stream.read_exact(&mut ok).expect("the backend's answer");
    assert_eq!(&ok, b"ok\n");
    me
}

fn lb_in_front_of(backend: SocketAddr, version: &str) -> Lb {
    let lb = Lb::start(
        &Config::new()
            .service(Service::backends("web", &[backend]).option("proxy_protocol", version))
            .yaml(),
    );
    let admin = lb.admin.expect("an admin API");
    wait_until("lb answering", QUICK, || healthz(admin).is_some());
    lb
}

#[test]
fn v1_sends_the_client_and_the_address_it_reached_before_its_first_byte() {
    let (addr, seen) = recording_backend(b"hello\n");
    let lb = lb_in_front_of(addr, "v1");
    let me = client_from(Ipv4Addr::new(127, 0, 0, 7), lb.listen);
    let expected = format!(
        "PROXY TCP4 127.0.0.7 127.0.0.1 {} {}\r\nhello\n",
        me.port(),
        lb.listen.port()
    );
    assert_eq!(seen.lock().expect("seen")[0], expected.as_bytes());
}

#[test]
fn v2_sends_the_binary_header_before_the_first_byte() {
    let (addr, seen) = recording_backend(b"hello\n");
    let lb = lb_in_front_of(addr, "v2");
    let me = client_from(Ipv4Addr::new(127, 0, 0, 9), lb.listen);
    let mut expected = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    expected.extend([0x21, 0x11, 0, 12, 127, 0, 0, 9, 127, 0, 0, 1]);
    expected.extend(me.port().to_be_bytes());
    expected.extend(lb.listen.port().to_be_bytes());
    expected.extend(b"hello\n");
    assert_eq!(seen.lock().expect("seen")[0], expected);
}

#[test]
fn v1_over_ipv6_names_both_ends_in_ipv6() {
    if TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 loopback here");
        return;
    }
    let (addr, seen) = recording_backend(b"hello\n");
    let port = free_port();
    let lb = Lb::start(
        &Config::new()
            .service(
                Service::backends("web", &[addr])
                    .listen(format!("\"[::1]:{port}\""))
                    .option("proxy_protocol", "v1"),
            )
            .yaml(),
    );
    let admin = lb.admin.expect("an admin API");
    wait_until("lb answering", QUICK, || healthz(admin).is_some());
    let mut stream = TcpStream::connect(("::1", port)).expect("connect over IPv6");
    let me = stream.local_addr().expect("client address");
    stream.write_all(b"hello\n").expect("send");
    let mut ok = [0u8; 3];
    stream.read_exact(&mut ok).expect("answer");
    let expected = format!("PROXY TCP6 ::1 ::1 {} {port}\r\nhello\n", me.port());
    assert_eq!(seen.lock().expect("seen")[0], expected.as_bytes());
}

#[test]
fn health_checks_say_local_and_v1_checks_say_unknown() {
    for (version, expected) in [
        ("v2", b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00".as_slice()),
        ("v1", b"PROXY UNKNOWN\r\n".as_slice()),
    ] {
        let (addr, seen) = recording_backend(expected);
        let lb = Lb::start(
            &Config::new()
                .service(
                    Service::backends("web", &[addr])
                        .option("proxy_protocol", version)
                        .option("health_check", "{ interval: 100ms }"),
                )
                .yaml(),
        );
        wait_until("a health check", QUICK, || {
            !seen.lock().expect("seen").is_empty()
        });
        assert_eq!(seen.lock().expect("seen")[0], expected, "{version}");
        drop(lb);
    }
}

#[test]
fn clients_lb_cannot_serve_are_counted_by_reason_and_logged() {
    // A static backend nobody listens on, and workers that never become ready.
    let dead = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let slow_port = free_port();
    let lb = Lb::start_with(
        &Config::new()
            .service(
                Service::backends("web", &[dead])
                    .option("log_connections", "true")
                    .option("timeouts", "{ connect: 300ms }"),
            )
            .service(
                Service::workers("slow")
                    .listen(format!("127.0.0.1:{slow_port}"))
                    .env("START_DELAY_MS", "60000")
                    .option("log_connections", "true")
                    .option("timeouts", "{ connect: 300ms }"),
            )
            .yaml(),
        &["--log-format", "json"],
    );
    let admin = lb.admin.expect("an admin API");
    wait_until("lb answering", QUICK, || healthz(admin).is_some());
    for addr in [lb.listen, SocketAddr::from(([127, 0, 0, 1], slow_port))] {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(QUICK)).expect("timeout");
        let mut buf = [0u8; 1];
        // Closed without a byte.
        assert_eq!(stream.read(&mut buf).unwrap_or(0), 0);
    }
    let dropped = |service: &str, reason: &str| {
        lb.metric(
            "lb_connections_dropped_total",
            &[("service", service), ("reason", reason)],
        )
    };
    wait_until("both drops counted", QUICK, || {
        dropped("web", "connect_failed") == 1.0 && dropped("slow", "no_backend") == 1.0
    });
    assert_eq!(dropped("web", "no_backend"), 0.0);
    assert_eq!(dropped("web", "resources"), 0.0);
    let lines: Vec<serde_json::Value> = lb
        .lines("\"connection\"")
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let ended: Vec<&str> = lines.iter().filter_map(|l| l["ended"].as_str()).collect();
    assert!(ended.contains(&"connect_failed"), "{lines:?}");
    assert!(ended.contains(&"no_backend"), "{lines:?}");
}

#[test]
fn log_connections_says_who_where_how_much_how_long_and_how_it_ended() {
    let (addr, _seen) = recording_backend(b"hello\n");
    let lb = Lb::start_with(
        &Config::new()
            .service(Service::backends("web", &[addr]).option("log_connections", "true"))
            .yaml(),
        &["--log-format", "json"],
    );
    let admin = lb.admin.expect("an admin API");
    wait_until("lb answering", QUICK, || healthz(admin).is_some());
    let me = client_from(Ipv4Addr::new(127, 0, 0, 3), lb.listen);
    wait_until("the connection's line", QUICK, || {
        !lb.lines("\"connection\"").is_empty()
    });
    let line: serde_json::Value =
        serde_json::from_str(&lb.lines("\"connection\"")[0]).expect("a JSON line");
    let fields = &line;
    assert_eq!(fields["client"], me.to_string(), "{line}");
    assert_eq!(fields["backend"], addr.to_string(), "{line}");
    assert_eq!(fields["bytes_in"], 6, "{line}");
    assert_eq!(fields["bytes_out"], 3, "{line}");
    assert!(fields["duration_ms"].is_u64(), "{line}");
    assert_eq!(fields["ended"], "closed", "{line}");
}
