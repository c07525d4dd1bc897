//! One client connection: pick a backend, connect (retrying others), then copy.

use std::io;
use std::net::SocketAddr;

use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::{Shared, copy, is_resource_exhaustion};
use crate::snapshot::{Backend, BackendId};

/// Backends tried per connection: the first pick and up to two more.
const CONNECT_ATTEMPTS: usize = 3;

pub(super) async fn handle(
    proxy: &Shared,
    service: &str,
    listen: SocketAddr,
    client: TcpStream,
    peer: SocketAddr,
) {
    let started = Instant::now();
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
        let upstream = match connect.unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())) {
            Ok(stream) => stream,
            // lb itself is out of descriptors or memory: every backend would fail the
            // same way, and none of them is at fault.
            Err(err) if is_resource_exhaustion(&err) => {
                warn!(service, backend = %backend.label, %err, "could not connect to a backend: lb is out of resources; closing the client");
                return;
            }
            Err(err) => {
                debug!(service, backend = %backend.label, %err, "connect failed");
                backend.metrics.connect_errors_total.inc();
                report_down(proxy, &backend);
                drop(active);
                continue;
            }
        };
        backend.metrics.connections_total.inc();
        // Small writes (a request line, a keystroke) go out at once, as on a direct connection.
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let counters = copy::Counters {
            to_backend: &pool.metrics.bytes_in,
            to_client: &pool.metrics.bytes_out,
        };
        tokio::select! {
            result = copy::bidirectional(client, upstream, pool.timeouts.idle, counters) => match result {
                Ok(()) => debug!(service, backend = %backend.label, "connection closed"),
                Err(err) => debug!(service, backend = %backend.label, %err, "connection ended"),
            },
            () = backend.close.cancelled() => debug!(service, backend = %backend.label, "connection closed: backend drained or lb stopping"),
        }
        pool.metrics
            .connection_duration
            .observe(started.elapsed().as_secs_f64());
        return;
    }
    debug!(service, %peer, "no backend could be reached; closing client");
}

fn report_down(proxy: &Shared, backend: &Backend) {
    if backend.stats.mark_down() {
        let _ = proxy.down.send(backend.id);
    }
}
