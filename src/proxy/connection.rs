//! One client connection: pick a backend, connect (retrying others), then copy.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::{debug, warn};

use super::{Shared, copy, is_resource_exhaustion};
use crate::snapshot::{ActiveGuard, Backend, BackendId, Pool};

/// Backends tried per connection: the first pick and up to two more.
const CONNECT_ATTEMPTS: usize = 3;

/// The connection's task. Everything this future holds stays allocated for as long as the
/// connection lives, idle or not, so it keeps little: the connect phase (snapshot wait,
/// pick, connect timeout, retries) is its own allocation, made here and freed once it
/// ends, holding the client, its address and `connecting` meanwhile; the copy phase is
/// one [`copy::Transfer`]. `connecting` is held until the connection has its backend (or
/// has given up), so a stop takes workers out of rotation only after every accepted
/// client reached one.
pub(super) fn handle<'a>(
    proxy: &'a Shared,
    service: &'a str,
    listen: SocketAddr,
    client: (TcpStream, SocketAddr),
    connecting: TaskTrackerToken,
) -> impl Future<Output = ()> + 'a {
    let connected = Box::pin(connect(proxy, service, listen, client, connecting));
    async move {
        let started = Instant::now();
        let Some(Connected {
            pool,
            backend,
            active,
            client,
            upstream,
        }) = connected.await
        else {
            return;
        };
        backend.metrics.connections_total.inc();
        // Small writes (a request line, a keystroke) go out at once, as on a direct
        // connection.
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        tokio::select! {
            result = copy::Transfer::new(client, upstream, &*pool) => match result {
                Ok(()) => debug!(service, backend = %backend.label, "connection closed"),
                Err(err) => debug!(service, backend = %backend.label, %err, "connection ended"),
            },
            () = backend.close.cancelled() => debug!(service, backend = %backend.label, "connection closed: backend drained or lb stopping"),
        }
        pool.metrics
            .connection_duration
            .observe(started.elapsed().as_secs_f64());
        drop(active);
    }
}

/// A client connected to its backend, and what the copy phase needs of the pick.
struct Connected {
    pool: Arc<Pool>,
    backend: Arc<Backend>,
    active: ActiveGuard,
    client: TcpStream,
    upstream: TcpStream,
}

/// Picks a backend and connects, trying up to [`CONNECT_ATTEMPTS`] of them; `None`
/// (logged) if none could be reached. `connecting` goes when this ends.
async fn connect(
    proxy: &Shared,
    service: &str,
    listen: SocketAddr,
    (client, peer): (TcpStream, SocketAddr),
    connecting: TaskTrackerToken,
) -> Option<Connected> {
    let _connecting = connecting;
    let mut tried: [BackendId; CONNECT_ATTEMPTS] = [BackendId::MAX; CONNECT_ATTEMPTS];
    for attempt in 0..CONNECT_ATTEMPTS {
        // Each try reads the newest snapshot, so a retry right after a rollout's swap
        // finds the new worker rather than only the old one.
        let Some(pool) = proxy.snapshots.ready_pool(service, listen).await else {
            break;
        };
        let Some(backend) = pool.pick(peer.ip(), &tried[..attempt]).cloned() else {
            break;
        };
        tried[attempt] = backend.id;
        // Counted from the pick, not from the connect, so a draining worker is not
        // stopped while a connection that picked it is still connecting.
        let active = backend.track();
        let connect =
            tokio::time::timeout(pool.timeouts.connect, TcpStream::connect(backend.addr)).await;
        match connect.unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())) {
            Ok(upstream) => {
                return Some(Connected {
                    pool,
                    backend,
                    active,
                    client,
                    upstream,
                });
            }
            // lb itself is out of descriptors or memory: every backend would fail the
            // same way, and none of them is at fault.
            Err(err) if is_resource_exhaustion(&err) => {
                warn!(service, backend = %backend.label, %err, "could not connect to a backend: lb is out of resources; closing the client");
                return None;
            }
            Err(err) => {
                debug!(service, backend = %backend.label, %err, "connect failed");
                backend.metrics.connect_errors_total.inc();
                report_down(proxy, &backend);
                drop(active);
            }
        }
    }
    debug!(service, %peer, "no backend could be reached; closing client");
    None
}

impl copy::Service for Pool {
    fn idle(&self) -> Duration {
        self.timeouts.idle
    }

    fn to_backend(&self) -> &IntCounter {
        &self.metrics.bytes_in
    }

    fn to_client(&self) -> &IntCounter {
        &self.metrics.bytes_out
    }
}

fn report_down(proxy: &Shared, backend: &Backend) {
    if backend.stats.mark_down() {
        let _ = proxy.down.send(backend.id);
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::*;

    /// Guards what an idle connection costs: this future is most of its task's allocation
    /// (the rest: tokio's task header, the accept loop's captures, two registrations).
    /// Measured in a debug build, which lays futures out more loosely than a release build.
    #[tokio::test]
    async fn a_connection_task_stays_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, peer) = listener.accept().await.expect("accept");
        let (down, _) = mpsc::unbounded_channel();
        let shared = Shared {
            snapshots: Arc::default(),
            down,
        };
        let connecting = tokio_util::task::TaskTracker::new();
        let connection = handle(&shared, "web", addr, (accepted, peer), connecting.token());
        let size = std::mem::size_of_val(&connection);
        eprintln!("connection future: {size} bytes");
        assert!(size <= 560, "the connection future grew to {size} bytes");
    }
}
