//! A load client: threads opening new connections in a loop, and threads holding
//! keep-alive connections that send request after request, each exchange checked
//! byte for byte against an echo worker.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Exchanges on one keep-alive connection before the client closes it and opens another.
const KEEPALIVE_EXCHANGES: usize = 20;

/// What went wrong for one client, and when in the exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The connect itself failed (refused, reset, timed out).
    Connect(ErrorKind),
    /// The connection broke during an exchange (reset, EOF before the full reply).
    Exchange(ErrorKind),
    /// The reply differed from what was sent.
    WrongReply,
}

#[derive(Debug, Default)]
struct Counters {
    ok: AtomicUsize,
    failures: Mutex<Vec<Failure>>,
}

/// Load running in the background until [`Load::stop`].
pub struct Load {
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    threads: Vec<JoinHandle<()>>,
}

/// The outcome of a load run.
#[derive(Debug)]
pub struct Report {
    pub ok: usize,
    pub failures: Vec<Failure>,
}

impl Load {
    /// Starts `fresh` threads that open a new connection per exchange and `keepalive`
    /// threads that reuse connections.
    pub fn start(addr: SocketAddr, fresh: usize, keepalive: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let mut threads = Vec::new();
        for i in 0..fresh + keepalive {
            let (stop, counters) = (Arc::clone(&stop), Arc::clone(&counters));
            let per_connection = if i < fresh { 1 } else { KEEPALIVE_EXCHANGES };
            threads.push(std::thread::spawn(move || {
                client(addr, per_connection, i, &stop, &counters)
            }));
        }
        Load {
            stop,
            counters,
            threads,
        }
    }

    /// Successful exchanges so far.
    pub fn ok(&self) -> usize {
        self.counters.ok.load(Ordering::Relaxed)
    }

    /// Waits until `more` further exchanges have succeeded (so load truly ran over
    /// whatever happened meanwhile).
    pub fn wait_for(&self, more: usize) {
        let target = self.ok() + more;
        super::wait_until(
            &format!("{more} more successful exchanges"),
            super::DEADLINE,
            || self.ok() >= target,
        );
    }

    pub fn stop(self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("load thread");
        }
        let failures = self
            .counters
            .failures
            .lock()
            .expect("failures lock")
            .clone();
        Report {
            ok: self.counters.ok.load(Ordering::Relaxed),
            failures,
        }
    }
}

fn client(
    addr: SocketAddr,
    per_connection: usize,
    id: usize,
    stop: &AtomicBool,
    counters: &Counters,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let mut stream = match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
            Ok(s) => s,
            Err(err) => {
                counters
                    .failures
                    .lock()
                    .expect("lock")
                    .push(Failure::Connect(err.kind()));
                continue;
            }
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = stream.set_nodelay(true);
        for _ in 0..per_connection {
            n += 1;
            let request = format!("client {id} request {n:>12}\n");
            match exchange(&mut stream, request.as_bytes()) {
                Ok(()) => {
                    counters.ok.fetch_add(1, Ordering::Relaxed);
                }
                Err(failure) => {
                    counters.failures.lock().expect("lock").push(failure);
                    break;
                }
            }
            if per_connection > 1 {
                std::thread::sleep(Duration::from_millis(5));
            }
            if stop.load(Ordering::Relaxed) {
                break;
            }
        }
    }
}

fn exchange(stream: &mut TcpStream, request: &[u8]) -> Result<(), Failure> {
    stream
        .write_all(request)
        .map_err(|e| Failure::Exchange(e.kind()))?;
    let mut reply = vec![0u8; request.len()];
    stream
        .read_exact(&mut reply)
        .map_err(|e| Failure::Exchange(e.kind()))?;
    if reply == request {
        Ok(())
    } else {
        Err(Failure::WrongReply)
    }
}
