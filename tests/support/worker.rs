//! A test worker for lb's integration tests: a TCP echo server on `HOST:PORT` whose
//! behaviour is set by environment variables.
//!
//! - `HELLO=1`: on each connection, first send one line
//!   `id=<LB_WORKER_ID> pid=<pid> port=<PORT> host=<HOST> service=<LB_SERVICE>`.
//! - `REPLY_DELAY_MS=N`: wait N ms before echoing each chunk (an exchange in flight).
//! - `EXIT_AFTER=N`: exit with code 3 once N connections have been accepted.
//! - `START_DELAY_MS=N`: wait N ms before listening (a slow start).
//! - `IGNORE_SIGTERM=1`: keep running on SIGTERM (a worker that must be killed).
//! - `STOP_DELAY_MS=N`: on SIGTERM print `stopping`, take N ms to shut down, then print
//!   `stopped cleanly` and exit 0 (an app that finishes its work first).
//! - `CRASH_WITHIN_MS=N`: crash (exit code 4) at a random moment between N/2 and N ms
//!   after it starts listening.
//! - `READY_MESSAGE_AFTER_MS=N`: N ms after it starts listening, print `sending ready`
//!   and send `"ready"` on the channel (fd `LB_CHANNEL_FD`). It never reads its channel.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

fn env_num(name: &str) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    if std::env::var("IGNORE_SIGTERM").is_ok() {
        block_sigterm().expect("block SIGTERM");
    }
    if let Ok(delay) = std::env::var("STOP_DELAY_MS") {
        let delay = Duration::from_millis(delay.parse().unwrap_or(0));
        let sigterm = block_sigterm().expect("block SIGTERM");
        std::thread::spawn(move || {
            let _ = sigterm.wait();
            println!("stopping");
            std::thread::sleep(delay);
            println!("stopped cleanly");
            std::process::exit(0);
        });
    }
    std::thread::sleep(Duration::from_millis(env_num("START_DELAY_MS")));
    let host = std::env::var("HOST").expect("lb sets HOST");
    let port = std::env::var("PORT").expect("lb sets PORT");
    let listener = TcpListener::bind(format!("{host}:{port}")).expect("bind HOST:PORT");
    let hello = std::env::var("HELLO").is_ok().then(|| {
        format!(
            "id={} pid={} port={port} host={host} service={}\n",
            std::env::var("LB_WORKER_ID").unwrap_or_default(),
            std::process::id(),
            std::env::var("LB_SERVICE").unwrap_or_default(),
        )
    });
    println!("listening on {host}:{port}");
    if let Ok(after) = std::env::var("READY_MESSAGE_AFTER_MS") {
        let after = Duration::from_millis(after.parse().unwrap_or(0));
        std::thread::spawn(move || {
            std::thread::sleep(after);
            send_ready();
        });
    }
    let crash_within = env_num("CRASH_WITHIN_MS");
    if crash_within > 0 {
        let at = crash_within / 2 + random() % (crash_within / 2 + 1);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(at));
            eprintln!("crashing after {at} ms");
            std::process::exit(4);
        });
    }
    let exit_after = env_num("EXIT_AFTER") as usize;
    let delay = Duration::from_millis(env_num("REPLY_DELAY_MS"));
    static ACCEPTED: AtomicUsize = AtomicUsize::new(0);
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        println!("accepted a connection");
        let hello = hello.clone();
        std::thread::spawn(move || serve(stream, hello.as_deref(), delay));
        if exit_after > 0 && ACCEPTED.fetch_add(1, Ordering::SeqCst) + 1 >= exit_after {
            eprintln!("exiting after {exit_after} connections");
            std::process::exit(3);
        }
    }
}

/// Writes `"ready"` on the channel lb passed as `LB_CHANNEL_FD`.
fn send_ready() {
    use std::os::fd::FromRawFd as _;
    let fd: i32 = std::env::var("LB_CHANNEL_FD")
        .ok()
        .and_then(|v| v.parse().ok())
        .expect("lb sets LB_CHANNEL_FD");
    // SAFETY: lb opened this descriptor for us and nothing else in this process uses it.
    #[allow(unsafe_code)]
    let mut channel = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
    // Printed first: anything lb routes here after "ready" is logged after this line.
    println!("sending ready");
    channel.write_all(b"\"ready\"\n").expect("write ready");
    // Keep the descriptor open (never read it): dropping would close the channel.
    std::mem::forget(channel);
}

/// Good enough randomness for crash times: differs per process and per start.
fn random() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut x = u64::from(nanos) ^ (u64::from(std::process::id()) << 32) | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// Echoes until the client half-closes, then half-closes back.
fn serve(mut stream: TcpStream, hello: Option<&str>, delay: Duration) {
    if let Some(hello) = hello
        && stream.write_all(hello.as_bytes()).is_err()
    {
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                std::thread::sleep(delay);
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
}

/// A blocked signal stays pending until a thread waits for it: as good as ignoring it,
/// or as a handler, without an unsafe one. Called before any thread starts, so every
/// thread inherits the mask.
fn block_sigterm() -> nix::Result<nix::sys::signal::SigSet> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.thread_block()?;
    Ok(set)
}
