//! The message channel to a worker (contract §3): file descriptor 3 of the worker, a Unix
//! stream socket carrying one JSON value per `\n`-terminated line, both ways, in the
//! format Node's `process.send()` / `process.on('message')` use.
//!
//! lb never blocks on a worker that does not read: messages wait in a small bounded
//! outbox per worker, and past it they are dropped (and counted) rather than queued.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::lines::LineBuffer;

/// Messages a worker may have waiting before more are dropped.
const OUTBOX_MESSAGES: usize = 1024;
/// Bytes a worker may have waiting before more are dropped (one broadcast is at most
/// 1 MiB, so a few fit).
const OUTBOX_BYTES: usize = 4 * 1024 * 1024;
/// A longer line from a worker is discarded: no JSON message of ours is that long.
const MAX_INCOMING_LINE: usize = 1024 * 1024;
/// Messages from one worker that lb has read and not yet handled. Past this, lb stops
/// reading that worker's channel until it catches up, so a chatty worker fills its own
/// socket buffer (and blocks in its own writes) rather than lb's memory.
const MAX_IN_FLIGHT: usize = 64;

/// One message from a worker on its way to being handled; the channel reads more only
/// while fewer than `MAX_IN_FLIGHT` of these exist.
#[derive(Debug)]
pub struct InFlight(
    #[expect(dead_code, reason = "held only so that dropping it frees the slot")]
    OwnedSemaphorePermit,
);

/// One message, encoded once and shared by every worker it is sent to.
#[derive(Debug, Clone)]
pub struct Message(Bytes);

impl Message {
    /// Compact JSON on one line: Node crashes on a pretty-printed or blank line.
    pub fn new(value: &Value) -> Self {
        let mut line = serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec());
        line.push(b'\n');
        Message(Bytes::from(line))
    }
}

/// lb's end of one worker's channel. Dropping it closes lb's end; the supervisor keeps
/// it until the worker is reaped, since Node treats a closed channel as `'disconnect'`
/// and a later `process.send()` then crashes the worker.
#[derive(Debug)]
pub struct Channel {
    outbox: mpsc::Sender<Bytes>,
    queued: Arc<AtomicUsize>,
    /// The worker closed its end: it reads nothing more.
    closed: Arc<AtomicBool>,
}

/// What became of a message sent to a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    Queued,
    /// The worker does not read fast enough: its outbox is full.
    Full,
    /// The worker closed its end of the channel.
    Closed,
}

/// A new channel: lb's end, and the worker's end to place at its fd 3.
pub fn pair() -> io::Result<(StdUnixStream, OwnedFd)> {
    let (lb, worker) = StdUnixStream::pair()?;
    Ok((lb, worker.into()))
}

impl Channel {
    /// Starts reading and writing lb's end. Every JSON value the worker sends goes to
    /// `on_message`, except Node's internal `{"cmd": "NODE_…"}` messages.
    pub fn start(
        lb_end: StdUnixStream,
        on_message: impl Fn(Value, InFlight) + Send + 'static,
    ) -> io::Result<Channel> {
        lb_end.set_nonblocking(true)?;
        let (read, write) = UnixStream::from_std(lb_end)?.into_split();
        let (outbox, rx) = mpsc::channel(OUTBOX_MESSAGES);
        let queued = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicBool::new(false));
        tokio::spawn(write_loop(
            write,
            rx,
            Arc::clone(&queued),
            Arc::clone(&closed),
        ));
        tokio::spawn(read_loop(
            read,
            outbox.clone(),
            Arc::clone(&queued),
            Arc::clone(&closed),
            on_message,
        ));
        Ok(Channel {
            outbox,
            queued,
            closed,
        })
    }

    /// Bytes queued for the worker and not yet written to its socket.
    pub fn backlog(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Queues a message without waiting, unless the outbox is full or the worker closed
    /// its end; then it is dropped.
    pub fn send(&self, message: &Message) -> Sent {
        if self.closed.load(Ordering::Acquire) {
            Sent::Closed
        } else if enqueue(&self.outbox, &self.queued, message.0.clone()) {
            Sent::Queued
        } else {
            Sent::Full
        }
    }
}

fn enqueue(outbox: &mpsc::Sender<Bytes>, queued: &AtomicUsize, line: Bytes) -> bool {
    let len = line.len();
    if queued.fetch_add(len, Ordering::AcqRel) + len > OUTBOX_BYTES {
        queued.fetch_sub(len, Ordering::AcqRel);
        return false;
    }
    if outbox.try_send(line).is_err() {
        queued.fetch_sub(len, Ordering::AcqRel);
        return false;
    }
    true
}

async fn write_loop(
    mut write: tokio::net::unix::OwnedWriteHalf,
    mut rx: mpsc::Receiver<Bytes>,
    queued: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
) {
    while let Some(line) = rx.recv().await {
        let written = write.write_all(&line).await;
        queued.fetch_sub(line.len(), Ordering::AcqRel);
        if written.is_err() {
            closed.store(true, Ordering::Release);
            break;
        }
    }
    // The worker closed its end: keep ours open (and drain the outbox) until the
    // supervisor drops the channel.
    while let Some(line) = rx.recv().await {
        queued.fetch_sub(line.len(), Ordering::AcqRel);
    }
}

async fn read_loop(
    mut read: tokio::net::unix::OwnedReadHalf,
    outbox: mpsc::Sender<Bytes>,
    queued: Arc<AtomicUsize>,
    closed: Arc<AtomicBool>,
    on_message: impl Fn(Value, InFlight),
) {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut lines = LineBuffer::default();
    let mut discarding = false;
    loop {
        match read.read_buf(lines.buf_mut()).await {
            Ok(0) | Err(_) => {
                // The worker closed its end (it exited, or closed fd 3).
                closed.store(true, Ordering::Release);
                return;
            }
            Ok(_) => {}
        }
        while let Some(line) = lines.next_line() {
            if std::mem::take(&mut discarding) {
                continue;
            }
            match serde_json::from_slice::<Value>(&line) {
                Ok(value) if is_node_internal(&value) => {
                    // Node holds back every later send until a handle is acknowledged.
                    if value["cmd"] == "NODE_HANDLE" {
                        enqueue(
                            &outbox,
                            &queued,
                            Bytes::from_static(b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n"),
                        );
                    }
                }
                Ok(value) => {
                    let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
                        return;
                    };
                    on_message(value, InFlight(permit));
                }
                Err(err) => tracing::debug!(%err, "a worker sent a line that is not JSON"),
            }
        }
        if lines.pending() > MAX_INCOMING_LINE {
            lines.take_pending();
            discarding = true;
        }
    }
}

/// Node's own messages: objects whose `cmd` starts with `NODE_`.
fn is_node_internal(value: &Value) -> bool {
    value
        .get("cmd")
        .and_then(Value::as_str)
        .is_some_and(|cmd| cmd.starts_with("NODE_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_compact_single_lines() {
        let value: Value = serde_json::from_str("{ \"usersCount\" :\n 25 }").unwrap();
        assert_eq!(&Message::new(&value).0[..], b"{\"usersCount\":25}\n");
    }

    #[test]
    fn node_internal_messages_are_recognised() {
        assert!(is_node_internal(&serde_json::json!({"cmd": "NODE_HANDLE"})));
        assert!(!is_node_internal(&serde_json::json!({"cmd": "reload"})));
        assert!(!is_node_internal(&serde_json::json!("ready")));
    }

    #[tokio::test]
    async fn a_full_outbox_drops_instead_of_blocking() {
        let (lb, _worker) = pair().unwrap();
        let channel = Channel::start(lb, |_, _| {}).unwrap();
        let big = Message::new(&Value::String("x".repeat(512 * 1024)));
        // The worker never reads: the socket buffer and then the outbox fill up.
        let sent = (0..64)
            .filter(|_| channel.send(&big) == Sent::Queued)
            .count();
        assert!(sent < 64, "every message was accepted");
        assert!(channel.queued.load(Ordering::Relaxed) <= OUTBOX_BYTES);
    }
}
