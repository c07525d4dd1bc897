//! Connections through lb reach its workers: balanced, byte-exact, half-close aware.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::time::Duration;

use common::{DEADLINE, Lb, backend, connect, echo, field, hello};

const THREE_HELLO_WORKERS: &str = r#"
services:
  - name: web
    listen: {listen}
    workers:
      command: ["{worker}"]
      count: 3
      env: { HELLO: "1" }
"#;

#[test]
fn thirty_connections_land_ten_on_each_of_three_workers_with_their_env() {
    let lb = Lb::start(THREE_HELLO_WORKERS);
    lb.wait_ready(3);
    let mut per_worker: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        let line = hello(lb.listen).expect("hello through lb");
        assert_eq!(
            field(&format!(" {line}"), "host"),
            Some("127.0.0.1"),
            "{line}"
        );
        assert_eq!(field(&format!(" {line}"), "service"), Some("web"), "{line}");
        let id = field(&format!(" {line}"), "id").expect("id").to_owned();
        *per_worker.entry(id).or_default() += 1;
    }
    let expected: HashMap<String, usize> = (0..3).map(|i| (i.to_string(), 10)).collect();
    assert_eq!(per_worker, expected);
    // Each worker's PORT is the one lb chose for it and logged.
    for (slot, pid) in lb.started_workers() {
        let started = lb
            .lines("worker started")
            .into_iter()
            .find(|l| field(l, "pid") == Some(&pid.to_string()));
        let port = field(&started.expect("start line"), "port")
            .expect("port")
            .to_owned();
        let env = std::fs::read_to_string(format!("/proc/{pid}/environ")).expect("worker environ");
        let vars: Vec<&str> = env.split('\0').collect();
        assert!(
            vars.contains(&format!("PORT={port}").as_str()),
            "slot {slot}: {vars:?}"
        );
        assert!(vars.contains(&format!("LB_WORKER_ID={slot}").as_str()));
        assert!(vars.contains(&format!("NODE_APP_INSTANCE={slot}").as_str()));
        assert!(vars.contains(&"LB_SERVICE=web"));
        assert!(vars.contains(&"HOST=127.0.0.1"));
    }
}

/// xorshift: reproducible pseudo-random bytes without a crate.
fn random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

const ONE_ECHO_WORKER: &str = r#"
services:
  - name: echo
    listen: {listen}
    workers:
      command: ["{worker}"]
      count: 2
"#;

#[test]
fn ten_megabytes_echo_back_byte_exact() {
    let lb = Lb::start(ONE_ECHO_WORKER);
    lb.wait_ready(2);
    let sent = random_bytes(10 * 1024 * 1024, 0x5eed);
    let received = echo(lb.listen, &sent);
    assert_eq!(received.len(), sent.len());
    assert_eq!(fnv1a(&received), fnv1a(&sent));
    assert!(received == sent, "same length and hash but different bytes");
}

#[test]
fn half_closed_client_still_receives_the_reply() {
    let lb = Lb::start(ONE_ECHO_WORKER);
    lb.wait_ready(2);
    let mut stream = connect(lb.listen);
    stream
        .write_all(b"request after which the client stops sending")
        .expect("send");
    stream.shutdown(Shutdown::Write).expect("half-close");
    let mut reply = Vec::new();
    stream
        .read_to_end(&mut reply)
        .expect("reply after half-close");
    assert_eq!(reply, b"request after which the client stops sending");
}

#[test]
fn idle_connection_is_closed_after_the_idle_timeout() {
    let lb = Lb::start(
        r#"
services:
  - name: echo
    listen: {listen}
    timeouts: { idle: 300ms }
    workers:
      command: ["{worker}"]
      count: 1
"#,
    );
    lb.wait_ready(1);
    let mut stream = connect(lb.listen);
    stream.write_all(b"ping").expect("send");
    let mut reply = [0u8; 4];
    stream.read_exact(&mut reply).expect("echo");
    let quiet = std::time::Instant::now();
    let mut rest = Vec::new();
    stream
        .read_to_end(&mut rest)
        .expect("lb closes the idle connection");
    let waited = quiet.elapsed();
    assert!(rest.is_empty());
    assert!(
        waited >= std::time::Duration::from_millis(250),
        "closed after {waited:?}, before the idle timeout"
    );
}

#[test]
fn failed_connect_is_retried_on_another_backend_which_then_takes_all_traffic() {
    // One static backend where nothing listens, one that answers.
    let live_addr = backend(|stream| {
        let _ = (&stream).write_all(b"live\n");
    });
    let dead = format!("127.0.0.1:{}", common::free_port());
    let lb = Lb::start(&format!(
        r#"
services:
  - name: mixed
    listen: {{listen}}
    backends: ["{dead}", "{live_addr}"]
"#
    ));
    lb.wait_log("listening");
    for i in 0..10 {
        let line =
            hello(lb.listen).unwrap_or_else(|e| panic!("connection {i} failed: {e}\n{}", lb.log()));
        assert_eq!(line, "live");
    }
    let down = lb.lines("a connect to the backend failed");
    assert_eq!(
        down.len(),
        1,
        "reported once, then out of rotation: {down:?}"
    );
    assert!(down[0].contains(&dead), "{down:?}");
    assert_eq!(field(&down[0], "connect"), Some("refused"), "{down:?}");
}

/// lb in front of one static backend.
fn edge(backend: std::net::SocketAddr) -> Lb {
    let lb = Lb::start(&format!(
        "services:\n  - name: edge\n    listen: {{listen}}\n    backends: ['{backend}']\n"
    ));
    lb.wait_log("listening");
    lb
}

/// Closes with a reset (RST) instead of a FIN.
fn reset(stream: std::net::TcpStream) {
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
}

#[test]
fn a_backend_reset_reaches_the_client_as_a_reset_not_a_clean_end() {
    let lb = edge(backend(|mut stream| {
        let _ = stream.read(&mut [0u8; 64]);
        let _ = stream.write_all(b"partial answer");
        reset(stream);
    }));
    let mut client = connect(lb.listen);
    client.write_all(b"request").expect("send");
    let mut got = Vec::new();
    let err = client
        .read_to_end(&mut got)
        .expect_err("a clean end would pass the cut-off answer for a whole one");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

#[test]
fn a_client_reset_reaches_the_backend_as_a_reset() {
    let (seen_tx, seen) = std::sync::mpsc::channel();
    let seen_tx = std::sync::Mutex::new(seen_tx);
    let lb = edge(backend(move |mut stream| {
        let mut got = Vec::new();
        let outcome = stream.read_to_end(&mut got).map(|_| got.len());
        let _ = seen_tx.lock().expect("sender").send(outcome);
    }));
    let mut client = connect(lb.listen);
    client.write_all(b"hello").expect("send");
    reset(client);
    let outcome = seen
        .recv_timeout(DEADLINE)
        .expect("the backend saw the end");
    let err = outcome.expect_err("the backend must see the client's reset, not a clean end");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

#[test]
fn running_out_of_descriptors_is_not_blamed_on_the_backend() {
    // A backend that greets, then holds the connection until the client closes it.
    let lb = edge(backend(|mut stream| {
        let _ = stream.write_all(b"hi\n");
        let _ = stream.read(&mut [0u8; 1]);
    }));
    // The limit bounds descriptor numbers, not their count (lb may hold a high one it
    // inherited, such as cargo's jobserver pipe): room for exactly one more, the lowest
    // free number. The first client is accepted there; its connect to the backend then
    // fails with EMFILE.
    lb.wait_log("admin API listening");
    let open = lb.open_fds();
    let lowest_free = (0..).find(|n| !open.contains(n)).expect("a free number");
    // The soft limit only, so it can be raised again without privileges.
    let limit_fds = |limit: usize| {
        let status = std::process::Command::new("prlimit")
            .args(["--pid", &lb.pid().to_string()])
            .arg(format!("--nofile={limit}:"))
            .status()
            .expect("run prlimit (util-linux)");
        assert!(status.success());
    };
    limit_fds(lowest_free as usize + 1);
    let held: Vec<_> = (0..10).map(|_| connect(lb.listen)).collect();
    // Each client in turn is accepted into the one free descriptor and closed (the
    // admin API cannot answer meanwhile: it needs a descriptor too).
    for mut client in held {
        let mut byte = [0u8; 1];
        assert_eq!(client.read(&mut byte).expect("closed, not reset"), 0);
    }
    limit_fds(1024);
    assert_eq!(hello(lb.listen).expect("lb serves again"), "hi");
    let resources = [("service", "edge"), ("reason", "resources")];
    assert_eq!(lb.metric("lb_connections_dropped_total", &resources), 10.0);
    // Said once for the episode, not once per client.
    assert_eq!(lb.lines("lb is out of resources").len(), 1, "{}", lb.log());
    assert!(
        lb.lines("a connect to the backend failed").is_empty(),
        "{}",
        lb.log()
    );
    let (_, metrics) = lb.admin("GET", "/metrics", b"");
    let errors: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("lb_connect_errors_total{"))
        .collect();
    assert!(
        !errors.is_empty() && errors.iter().all(|l| l.ends_with(" 0")),
        "{errors:?}"
    );
}

#[test]
fn past_max_connections_a_client_waits_until_a_slot_frees() {
    let lb = Lb::start(
        r#"
services:
  - name: web
    listen: {listen}
    max_connections: 1
    workers:
      command: ["{worker}"]
      count: 1
      env: { HELLO: "1" }
"#,
    );
    lb.wait_ready(1);
    let first = connect(lb.listen);
    let mut first_reader = std::io::BufReader::new(first.try_clone().expect("clone"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut first_reader, &mut line).expect("first hello");
    // The second client is queued, not served, while the first holds the only slot.
    let second = connect(lb.listen);
    second
        .set_read_timeout(Some(std::time::Duration::from_millis(500)))
        .expect("timeout");
    let mut byte = [0u8; 1];
    let early = (&second).read(&mut byte);
    assert!(
        early.is_err(),
        "second client served past max_connections: {early:?}"
    );
    drop(first_reader);
    drop(first);
    second
        .set_read_timeout(Some(std::time::Duration::from_secs(15)))
        .expect("timeout");
    let mut reader = std::io::BufReader::new(second);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut reader, &mut line).expect("second hello after the first left");
    assert!(line.starts_with("id=0"), "{line}");
}

/// Writes `data` in pieces of up to `piece` bytes, pausing now and then (a slow writer),
/// then half-closes.
fn send_slowly(mut stream: std::net::TcpStream, data: &[u8], piece: usize) {
    for (i, chunk) in data.chunks(piece).enumerate() {
        stream.write_all(chunk).expect("send");
        if i % 16 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    stream.shutdown(Shutdown::Write).expect("half-close");
}

/// Reads to EOF in small pieces, pausing now and then (a slow reader).
fn receive_slowly(mut stream: std::net::TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let mut piece = [0u8; 3000];
    for i in 0.. {
        let n = stream.read(&mut piece).expect("receive");
        if n == 0 {
            break;
        }
        received.extend_from_slice(&piece[..n]);
        if i % 64 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    received
}

/// Bytes each way for the connection that starts with `seed`: up to 3 MiB, so that some
/// directions stream (and splice) and some do not.
fn sizes(seed: u64) -> (usize, usize) {
    let r = random_bytes(8, seed);
    let up = usize::from(u16::from_le_bytes([r[0], r[1]])) * 48;
    let down = usize::from(u16::from_le_bytes([r[2], r[3]])) * 48;
    (up, down)
}

#[test]
fn random_sizes_both_ways_with_slow_peers_arrive_byte_exact_and_counted_exactly() {
    use std::sync::{Arc, Mutex};
    // The backend learns the seed from the first 8 bytes, then sends its own payload and
    // reads the client's at once, both slowly, and records what it received.
    /// What each backend connection received, by the seed it started with.
    type Received = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;
    let received: Received = Arc::default();
    let record = Arc::clone(&received);
    let backend = backend(move |mut stream| {
        let mut seed = [0u8; 8];
        stream.read_exact(&mut seed).expect("seed");
        let seed = u64::from_le_bytes(seed);
        let down = random_bytes(sizes(seed).1, seed ^ 0xd0);
        let writer = stream.try_clone().expect("clone");
        let sender = std::thread::spawn(move || send_slowly(writer, &down, 7000));
        let got = receive_slowly(stream);
        sender.join().expect("backend sender");
        record.lock().expect("record").push((seed, got));
    });
    let lb = Lb::start(&format!(
        "threads: 2\nservices:\n  - name: edge\n    listen: {{listen}}\n    backends: ['{backend}']\n"
    ));
    lb.wait_log("listening");
    let seeds: Vec<u64> = (1..=8).collect();
    let clients: Vec<_> = seeds
        .iter()
        .map(|&seed| {
            let listen = lb.listen;
            std::thread::spawn(move || {
                let stream = connect(listen);
                let mut up = seed.to_le_bytes().to_vec();
                up.extend(random_bytes(sizes(seed).0, seed ^ 0x5));
                let writer = stream.try_clone().expect("clone");
                let sender = std::thread::spawn(move || send_slowly(writer, &up, 5000));
                let got = receive_slowly(stream);
                sender.join().expect("client sender");
                let want = random_bytes(sizes(seed).1, seed ^ 0xd0);
                assert!(got == want, "seed {seed}: backend to client differs");
            })
        })
        .collect();
    for client in clients {
        client.join().expect("client");
    }
    // A backend may still be reading the end of its client's bytes.
    common::wait_until("every backend to read to EOF", DEADLINE, || {
        received.lock().expect("received").len() == seeds.len()
    });
    let received = received.lock().expect("received");
    for (seed, got) in received.iter() {
        let want = random_bytes(sizes(*seed).0, seed ^ 0x5);
        assert!(got == &want, "seed {seed}: client to backend differs");
    }
    let up: usize = seeds.iter().map(|&s| 8 + sizes(s).0).sum();
    let down: usize = seeds.iter().map(|&s| sizes(s).1).sum();
    let counted = |direction| lb.metric("lb_bytes_total", &[("direction", direction)]);
    assert_eq!(counted("in"), up as f64);
    assert_eq!(counted("out"), down as f64);
}
