//! The one writer of lb's stdout and stderr: a thread of its own fed through a bounded
//! queue, so a reader that stalls (`lb | less`, a stuck log shipper, Ctrl-S in a
//! terminal) holds up the output and nothing else. Writing from the runtime's threads
//! would block them, and with them every proxied connection and signal.
//!
//! Worker lines wait for room in the queue, which pushes back on the worker's pipe as a
//! terminal would. lb's own log lines cannot wait (the supervisor would stop with them):
//! part of each queue is kept for them, so a chatty worker never crowds them out, and
//! only when the output itself stalls and that part fills up are they dropped, counted,
//! and the count logged as soon as the output moves again.

use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

/// Lines held for a stalled reader before worker pipes are pushed back on.
const QUEUE: usize = 1024;
/// Of those, places only lb's own log lines may take.
const RESERVED_FOR_LB: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout = 0,
    Stderr = 1,
}

enum Item {
    /// A line, and for a worker's line its place in the queue, freed once written.
    Line(Vec<u8>, Option<OwnedSemaphorePermit>),
    /// Answered once every line queued before it is written.
    Flush(std::sync::mpsc::Sender<()>),
}

/// One stream's queue; each stream has its own thread, so stdout piped into a pager
/// that stopped does not hold up the log on stderr.
struct Output {
    queue: mpsc::Sender<Item>,
    /// Places worker lines may take; the queue always has the rest free for lb's lines.
    worker_places: Arc<Semaphore>,
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
                        Item::Line(bytes, place) => {
                            write_now(stream, &bytes);
                            drop(place);
                            report_dropped(stream);
                        }
                        Item::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })?;
        Ok(Output {
            queue,
            worker_places: Arc::new(Semaphore::new(QUEUE - RESERVED_FOR_LB)),
            dropped: AtomicU64::new(0),
        })
    };
    if let (Ok(stdout), Ok(stderr)) = (spawn(Stream::Stdout), spawn(Stream::Stderr)) {
        let _ = OUTPUTS.set([stdout, stderr]);
    }
}

/// Queues a worker's line, waiting while the places for worker lines are taken.
pub async fn write(stream: Stream, line: Vec<u8>) {
    match output(stream) {
        Some(out) => {
            let Ok(place) = Arc::clone(&out.worker_places).acquire_owned().await else {
                return;
            };
            // Never waits: holding a place means the queue has room.
            let _ = out.queue.send(Item::Line(line, Some(place))).await;
        }
        None => write_now(stream, &line),
    }
}

/// Queues a line if there is room; drops and counts it if not.
pub fn try_write(stream: Stream, line: Vec<u8>) {
    match output(stream) {
        Some(out) => {
            if out.queue.try_send(Item::Line(line, None)).is_err() {
                out.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        None => write_now(stream, &line),
    }
}

/// Waits, up to `limit` in all, until every line queued so far is written: lb's last
/// lines must not die with the process, and a stalled reader must not keep it from
/// exiting. Lines dropped on the way are reported first.
pub fn flush(limit: Duration) {
    let deadline = Instant::now() + limit;
    for stream in [Stream::Stdout, Stream::Stderr] {
        report_dropped(stream);
        flush_one(stream, deadline);
    }
}

fn flush_one(stream: Stream, deadline: Instant) {
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

/// Logs how many of lb's lines were dropped, through the log itself, so the note has
/// the log's format (one JSON object per line with `--log-format json`).
fn report_dropped(stream: Stream) {
    let Some(out) = output(stream) else { return };
    let dropped = out.dropped.swap(0, Ordering::Relaxed);
    if dropped > 0 {
        tracing::warn!(dropped, "log lines dropped while the output was blocked");
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
