//! Bidirectional byte copy with half-close, an idle timeout, and byte counts.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Per direction and connection; allocated once per connection, never per read.
const BUFFER_SIZE: usize = 16 * 1024;

/// The service's byte counters, one per direction.
pub(super) struct Counters<'a> {
    pub to_backend: &'a IntCounter,
    pub to_client: &'a IntCounter,
}

/// Copies both ways until both sides are done. One side's EOF shuts down the other side's
/// write half, so a half-closed client still receives the backend's reply. A side that
/// fails (a reset) makes lb reset the other side too, as a direct connection would have
/// shown it, rather than end it with a FIN that passes a cut-off stream for a whole one.
pub(super) async fn bidirectional(
    mut client: TcpStream,
    mut upstream: TcpStream,
    idle: Duration,
    counters: Counters<'_>,
) -> io::Result<()> {
    let result = copy(&mut client, &mut upstream, idle, counters).await;
    if let Err(err) = &result
        && err.kind() != io::ErrorKind::TimedOut
    {
        let _ = client.set_zero_linger();
        let _ = upstream.set_zero_linger();
    }
    result
}

async fn copy(
    client: &mut TcpStream,
    upstream: &mut TcpStream,
    idle: Duration,
    counters: Counters<'_>,
) -> io::Result<()> {
    let activity = Activity::new();
    let (mut client_read, mut client_write) = client.split();
    let (mut upstream_read, mut upstream_write) = upstream.split();
    let both = async {
        tokio::try_join!(
            pipe(
                &mut client_read,
                &mut upstream_write,
                &activity,
                counters.to_backend
            ),
            pipe(
                &mut upstream_read,
                &mut client_write,
                &activity,
                counters.to_client
            ),
        )
    };
    tokio::pin!(both);
    let mut deadline = activity.start + idle;
    loop {
        tokio::select! {
            result = &mut both => return result.map(|_| ()),
            () = tokio::time::sleep_until(deadline) => {
                let last = activity.last();
                if last + idle <= Instant::now() {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout"));
                }
                deadline = last + idle;
            }
        }
    }
}

/// When bytes last moved either way, so the idle timer, which wakes once per `idle`
/// rather than once per read, can tell a quiet connection from a busy one.
struct Activity {
    start: Instant,
    /// Milliseconds from `start`.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(elapsed, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }
}

/// Copies one direction. Every partial write counts as activity and is counted at once:
/// a slow reader that takes a buffer in small pieces is busy, not idle, and the byte
/// counters are exact even for a connection that is cut mid-write.
async fn pipe<R, W>(
    reader: &mut R,
    writer: &mut W,
    activity: &Activity,
    counter: &IntCounter,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER_SIZE];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            writer.shutdown().await?;
            return Ok(());
        }
        activity.touch();
        let mut pending = &buf[..n];
        while !pending.is_empty() {
            let written = writer.write(pending).await?;
            if written == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            pending = &pending[written..];
            counter.inc_by(written as u64);
            activity.touch();
        }
    }
}
