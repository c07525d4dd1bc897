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
//!   and send `"ready"` on the channel (fd `LB_CHANNEL_FD`). It never reads its channel
//!   unless `CHANNEL_LOG` is set too.
//! - `CHANNEL_LOG=1`: read the channel line by line and print each line as
//!   `channel: <line>` (so a test sees a drain message arrive, and its order relative
//!   to the `stopping` that `STOP_DELAY_MS` prints on SIGTERM).
//! - `EXIT_AFTER_MS=N`: exit with code 5 N ms after it starts listening (a release that
//!   dies soon after it became ready).
//! - `DAEMON=1`: before anything else, start a daemon the classic way: a child that
//!   calls `setsid()`, starts a grandchild and exits at once (each by running this
//!   binary again, so no `fork` in unsafe code), which prints
//!   `daemon pid=<grandchild pid>`. The daemon sleeps forever with its stdio on
//!   /dev/null, keeping every other descriptor it inherited (fd 3 too, as a careless
//!   daemon does); its environment has `LB_TEST_DAEMON=run`, so a test can tell it from
//!   a process that reused its pid.
//! - `CLOSE_CHANNEL=1`: once listening, shut its channel down both ways (a worker that
//!   takes no messages).
//! - `ALLOCATE_MB=N`: once listening, allocate N MiB, touch every page and keep it (a
//!   worker that grows past `max_memory`).
//! - `HEALTH_FILE=path`: a connection whose first bytes are an HTTP `GET` is answered
//!   `HTTP/1.1 <status>` and closed, `<status>` read from that file each time (200 if
//!   it is missing): a health endpoint a test can turn bad. Echoing is as usual for
//!   other connections. A PROXY protocol header before the request is skipped.

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

/// Where a `DAEMON=1` worker's helper processes are in the double fork.
const DAEMON_STAGE: &str = "LB_TEST_DAEMON";

fn main() {
    match std::env::var(DAEMON_STAGE).as_deref() {
        Ok("detach") => detach(),
        Ok("run") => loop {
            std::thread::sleep(Duration::from_secs(3600));
        },
        _ => {}
    }
    if std::env::var("DAEMON").is_ok() {
        start_daemon();
    }
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
    if std::env::var("CLOSE_CHANNEL").is_ok() {
        let _ = channel().shutdown(Shutdown::Both);
    }
    // Written to, so the pages are resident rather than only reserved.
    let ballast = vec![1u8; usize::try_from(env_num("ALLOCATE_MB")).unwrap_or(0) << 20];
    std::hint::black_box(&ballast);
    if let Ok(after) = std::env::var("READY_MESSAGE_AFTER_MS") {
        let after = Duration::from_millis(after.parse().unwrap_or(0));
        std::thread::spawn(move || {
            std::thread::sleep(after);
            send_ready();
        });
    }
    if std::env::var("CHANNEL_LOG").is_ok() {
        let channel = channel().try_clone().expect("clone the channel");
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(channel).lines() {
                let Ok(line) = line else { break };
                println!("channel: {line}");
            }
        });
    }
    let exit_after_ms = env_num("EXIT_AFTER_MS");
    if std::env::var("EXIT_AFTER_MS").is_ok() {
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(exit_after_ms));
            eprintln!("exiting {exit_after_ms} ms after it started listening");
            std::process::exit(5);
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

/// The channel lb passed as `LB_CHANNEL_FD`, opened once and kept open for the life of
/// the process.
fn channel() -> &'static std::os::unix::net::UnixStream {
    static CHANNEL: std::sync::OnceLock<std::os::unix::net::UnixStream> =
        std::sync::OnceLock::new();
    CHANNEL.get_or_init(|| {
        use std::os::fd::FromRawFd as _;
        let fd: i32 = std::env::var("LB_CHANNEL_FD")
            .ok()
            .and_then(|v| v.parse().ok())
            .expect("lb sets LB_CHANNEL_FD");
        // SAFETY: lb opened this descriptor for us; from here on only this static owns it.
        #[allow(unsafe_code)]
        unsafe {
            std::os::unix::net::UnixStream::from_raw_fd(fd)
        }
    })
}

/// Writes `"ready"` on the channel.
fn send_ready() {
    // Printed first: anything lb routes here after "ready" is logged after this line.
    println!("sending ready");
    let mut channel = channel();
    channel.write_all(b"\"ready\"\n").expect("write ready");
}

/// `DAEMON=1`: the first fork of the double fork. Waits for the detaching child, which
/// prints the daemon's pid, so the line comes before `listening on`.
fn start_daemon() {
    let exe = std::env::current_exe().expect("own executable");
    let status = std::process::Command::new(exe)
        .env(DAEMON_STAGE, "detach")
        .status()
        .expect("start the detaching child");
    assert!(status.success(), "the detaching child failed: {status}");
}

/// The detaching child: a session of its own, then the daemon, then exit so the daemon
/// is orphaned (adopted by the nearest subreaper, or init).
fn detach() -> ! {
    nix::unistd::setsid().expect("setsid");
    let exe = std::env::current_exe().expect("own executable");
    let daemon = std::process::Command::new(exe)
        .env(DAEMON_STAGE, "run")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the daemon");
    println!("daemon pid={}", daemon.id());
    std::process::exit(0);
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
    let mut first = true;
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) if std::mem::take(&mut first) && health_request(&buf[..n]) => {
                let status = std::env::var("HEALTH_FILE")
                    .ok()
                    .and_then(|f| std::fs::read_to_string(f).ok())
                    .map_or("200".to_owned(), |s| s.trim().to_owned());
                let reply = format!(
                    "HTTP/1.1 {status} -\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let _ = stream.write_all(reply.as_bytes());
                break;
            }
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

/// Whether a connection's first bytes are an HTTP GET (after a PROXY header, if any),
/// and this worker answers those.
fn health_request(data: &[u8]) -> bool {
    if std::env::var_os("HEALTH_FILE").is_none() {
        return false;
    }
    let v2 = b"\r\n\r\n\0\r\nQUIT\n";
    let rest = if data.starts_with(v2) && data.len() >= 16 {
        let len = usize::from(u16::from_be_bytes([data[14], data[15]]));
        data.get(16 + len..).unwrap_or_default()
    } else if data.starts_with(b"PROXY ") {
        data.iter()
            .position(|b| *b == b'\n')
            .map_or(&[][..], |end| &data[end + 1..])
    } else {
        data
    };
    rest.starts_with(b"GET ")
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
