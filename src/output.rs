//! The one writer of lb's stdout and stderr: a thread of its own fed through a bounded
//! queue, so a reader that stalls (`lb | less`, a stuck log shipper, Ctrl-S in a
//! terminal) holds up the output and nothing else. Writing from the runtime's threads
//! would block them, and with them every proxied connection and signal.
//!
//! Worker lines wait for room in the queue, which pushes back on the worker's pipe as a
//! terminal would. lb's own log lines cannot wait (the supervisor would stop with them),
//! so when the queue is full they are dropped and counted, and the count is written as
//! soon as the output moves again.

use std::io::Write as _;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

/// Lines held for a stalled reader before worker pipes are pushed back on.
const QUEUE: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout = 0,
    Stderr = 1,
}

enum Item {
    Line(Vec<u8>),
    /// Answered once every line queued before it is written.
    Flush(std::sync::mpsc::Sender<()>),
}

/// One stream's queue; each stream has its own thread, so stdout piped into a pager
/// that stopped does not hold up the log on stderr.
struct Output {
    queue: mpsc::Sender<Item>,
    dropped: AtomicU64,
}

static OUTPUTS: OnceLock<[Output; 2]> = OnceLock::new();

fn output(stream: Stream) -> Option<&'static Output> {
    OUTPUTS.get().map(|outputs| &outputs[stream as usize])
}

/// Starts the writer threads; until then (and if they cannot start) lines are written
/// directly.
pub fn start() {
    let spawn = |stream: Stream| -> std::io::Result<Output> {
        let (queue, mut rx) = mpsc::channel(QUEUE);
        std::thread::Builder::new()
            .name(format!("lb-{stream:?}").to_lowercase())
            .spawn(move || {
                while let Some(item) = rx.blocking_recv() {
                    match item {
                        Item::Line(bytes) => {
                            report_dropped(stream);
                            write_now(stream, &bytes);
                        }
                        Item::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })?;
        Ok(Output {
            queue,
            dropped: AtomicU64::new(0),
        })
    };
    if let (Ok(stdout), Ok(stderr)) = (spawn(Stream::Stdout), spawn(Stream::Stderr)) {
        let _ = OUTPUTS.set([stdout, stderr]);
    }
}

/// Queues a line, waiting while the queue is full.
pub async fn write(stream: Stream, line: Vec<u8>) {
    match output(stream) {
        Some(out) => {
            let _ = out.queue.send(Item::Line(line)).await;
        }
        None => write_now(stream, &line),
    }
}

/// Queues a line if there is room; drops and counts it if not.
pub fn try_write(stream: Stream, line: Vec<u8>) {
    match output(stream) {
        Some(out) => {
            if out.queue.try_send(Item::Line(line)).is_err() {
                out.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        None => write_now(stream, &line),
    }
}

/// Waits, up to `limit` in all, until every line queued so far is written: lb's last
/// lines must not die with the process, and a stalled reader must not keep it from
/// exiting.
pub fn flush(limit: Duration) {
    let deadline = Instant::now() + limit;
    for stream in [Stream::Stdout, Stream::Stderr] {
        let Some(out) = output(stream) else { return };
        let (done, written) = std::sync::mpsc::channel();
        let mut item = Item::Flush(done);
        loop {
            match out.queue.try_send(item) {
                Ok(()) => break,
                Err(mpsc::error::TrySendError::Full(back)) if Instant::now() < deadline => {
                    item = back;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => return,
            }
        }
        let _ = written.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}

fn report_dropped(stream: Stream) {
    let Some(out) = output(stream) else { return };
    let dropped = out.dropped.swap(0, Ordering::Relaxed);
    if dropped > 0 {
        let note = format!("lb: {dropped} log lines dropped while the output was blocked\n");
        write_now(stream, note.as_bytes());
    }
}

fn write_now(stream: Stream, bytes: &[u8]) {
    let _ = match stream {
        Stream::Stdout => std::io::stdout().lock().write_all(bytes),
        Stream::Stderr => std::io::stderr().lock().write_all(bytes),
    };
}

/// lb's own log lines (tracing's writer): never waits.
pub struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        try_write(Stream::Stderr, buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
