//! An idle proxied connection costs lb little memory: no copy buffer or pipe stays with
//! it once its bytes have been taken.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::{Lb, backend, connect};

/// Connections held open at once.
const CONNECTIONS: usize = 2000;
/// Bytes each connection carries each way before it goes idle.
const EXCHANGE: usize = 64 * 1024;
/// Twice what an idle connection costs (about 1.9 KB, in this debug build as in a release
/// build) and far below the two 16 KiB buffers each one used to keep.
const BOUND_PER_CONNECTION: u64 = 4 * 1024;

fn resident_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("lb's status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in kB")
}

/// Sends `EXCHANGE` bytes and reads them back, leaving the connection open.
fn exchange(lb: &Lb, payload: &[u8]) -> TcpStream {
    let mut stream = connect(lb.listen);
    stream.write_all(payload).expect("send");
    let mut back = vec![0u8; payload.len()];
    stream.read_exact(&mut back).expect("echo");
    assert!(back == payload, "the echo differs from what was sent");
    stream
}

#[test]
fn two_thousand_idle_connections_that_carried_64_kib_each_way_hold_no_buffers() {
    let echo = backend(|mut stream| {
        let mut buf = [0u8; 16 * 1024];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 || stream.write_all(&buf[..n]).is_err() {
                return;
            }
        }
    });
    let lb = Lb::start(&format!(
        "services:\n  - name: edge\n    listen: {{listen}}\n    backends: ['{echo}']\n"
    ));
    lb.wait_log("listening");
    let payload: Vec<u8> = (0..EXCHANGE).map(|i| (i % 251) as u8).collect();
    // One connection first, so lb's one-time allocations are in the baseline.
    drop(exchange(&lb, &payload));
    let pid = lb.pid().as_raw();
    let before = resident_kib(pid);
    let fds_before = lb.open_fds().len();
    let held: Vec<TcpStream> = (0..CONNECTIONS).map(|_| exchange(&lb, &payload)).collect();
    let after = resident_kib(pid);
    // Two sockets per connection and nothing else: a direction that spliced gave its
    // pipe back once it went quiet.
    let fds = lb.open_fds().len() - fds_before;
    assert!(
        fds <= 2 * CONNECTIONS + 16,
        "{fds} more descriptors for {CONNECTIONS} idle connections"
    );
    let per_connection = after.saturating_sub(before) * 1024 / CONNECTIONS as u64;
    eprintln!("{per_connection} bytes per idle connection");
    assert!(
        per_connection <= BOUND_PER_CONNECTION,
        "{per_connection} bytes per idle connection ({before} kB before, {after} kB with {} open)",
        held.len()
    );
}
