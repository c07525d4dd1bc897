//! Bidirectional byte copy with half-close and an idle timeout.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Per direction and connection; allocated once per connection, never per read.
const BUFFER_SIZE: usize = 16 * 1024;

/// Copies both ways until both sides are done. One side's EOF shuts down the other side's
/// write half, so a half-closed client still receives the backend's reply. Returns the
/// bytes sent to the backend and to the client.
pub(super) async fn bidirectional(
    mut client: TcpStream,
    mut upstream: TcpStream,
    idle: Duration,
) -> io::Result<(u64, u64)> {
    let start = Instant::now();
    let last_activity = AtomicU64::new(0);
    let (mut client_read, mut client_write) = client.split();
    let (mut upstream_read, mut upstream_write) = upstream.split();
    let both = async {
        tokio::try_join!(
            pipe(&mut client_read, &mut upstream_write, &last_activity, start),
            pipe(&mut upstream_read, &mut client_write, &last_activity, start),
        )
    };
    tokio::pin!(both);
    let mut deadline = start + idle;
    loop {
        tokio::select! {
            result = &mut both => return result,
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
) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER_SIZE];
    let mut total = 0u64;
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            writer.shutdown().await?;
            return Ok(total);
        }
        writer.write_all(&buf[..n]).await?;
        total += n as u64;
        let elapsed = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        last_activity.store(elapsed, Ordering::Relaxed);
    }
}
