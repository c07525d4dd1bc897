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
/// Bytes counted locally before they are added to the shared counter, so a busy
/// connection does not touch a contended cache line on every read.
const COUNT_BATCH: u64 = 256 * 1024;

/// The service's byte counters, one per direction.
pub(super) struct Counters<'a> {
    pub to_backend: &'a IntCounter,
    pub to_client: &'a IntCounter,
}

/// Copies both ways until both sides are done. One side's EOF shuts down the other side's
/// write half, so a half-closed client still receives the backend's reply.
pub(super) async fn bidirectional(
    mut client: TcpStream,
    mut upstream: TcpStream,
    idle: Duration,
    counters: Counters<'_>,
) -> io::Result<()> {
    let start = Instant::now();
    let last_activity = AtomicU64::new(0);
    let (mut client_read, mut client_write) = client.split();
    let (mut upstream_read, mut upstream_write) = upstream.split();
    let both = async {
        tokio::try_join!(
            pipe(
                &mut client_read,
                &mut upstream_write,
                &last_activity,
                start,
                counters.to_backend
            ),
            pipe(
                &mut upstream_read,
                &mut client_write,
                &last_activity,
                start,
                counters.to_client
            ),
        )
    };
    tokio::pin!(both);
    let mut deadline = start + idle;
    loop {
        tokio::select! {
            result = &mut both => return result.map(|_| ()),
            () = tokio::time::sleep_until(deadline) => {
                let last = start + Duration::from_millis(last_activity.load(Ordering::Relaxed));
                if last + idle <= Instant::now() {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "idle timeout"));
                }
                deadline = last + idle;
            }
        }
    }
}

async fn pipe<R, W>(
    reader: &mut R,
    writer: &mut W,
    last_activity: &AtomicU64,
    start: Instant,
    counter: &IntCounter,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER_SIZE];
    let mut tally = Tally {
        counter,
        pending: 0,
    };
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            writer.shutdown().await?;
            return Ok(());
        }
        writer.write_all(&buf[..n]).await?;
        tally.add(n as u64);
        let elapsed = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        last_activity.store(elapsed, Ordering::Relaxed);
    }
}

/// Bytes not yet added to the shared counter; added on drop too, so a connection that
/// ends by error, timeout or cancellation is still counted.
struct Tally<'a> {
    counter: &'a IntCounter,
    pending: u64,
}

impl Tally<'_> {
    fn add(&mut self, n: u64) {
        self.pending += n;
        if self.pending >= COUNT_BATCH {
            self.counter.inc_by(std::mem::take(&mut self.pending));
        }
    }
}

impl Drop for Tally<'_> {
    fn drop(&mut self) {
        self.counter.inc_by(self.pending);
    }
}
