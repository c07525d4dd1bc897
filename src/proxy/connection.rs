//! One client connection: pick a backend, connect (retrying others), then copy.

use std::io;
use std::net::SocketAddr;

use tokio::net::TcpStream;
use tracing::debug;

use super::{Proxy, copy};
use crate::snapshot::BackendId;

/// Backends tried per connection: the first pick and up to two more.
const CONNECT_ATTEMPTS: usize = 3;

pub(super) async fn handle(proxy: &Proxy, service: &str, client: TcpStream, peer: SocketAddr) {
    let Some(pool) = proxy.snapshots.ready_pool(service).await else {
        debug!(service, %peer, "no ready backend; closing client");
        return;
    };
    let mut tried: [BackendId; CONNECT_ATTEMPTS] = [BackendId::MAX; CONNECT_ATTEMPTS];
    for attempt in 0..CONNECT_ATTEMPTS {
        let Some(backend) = pool.pick(&tried[..attempt]) else {
            break;
        };
        tried[attempt] = backend.id;
        // Counted from the pick, not from the connect, so a draining worker is not
        // stopped while a connection that picked it is still connecting.
        let active = backend.stats.track();
        let connect =
            tokio::time::timeout(pool.timeouts.connect, TcpStream::connect(backend.addr)).await;
        let upstream = match connect.unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())) {
            Ok(stream) => stream,
            Err(err) => {
                debug!(service, backend = %backend.label, %err, "connect failed");
                report_down(proxy, backend.id, &backend.stats);
                drop(active);
                continue;
            }
        };
        // Small writes (a request line, a keystroke) go out at once, as on a direct connection.
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let idle = pool.timeouts.idle;
        tokio::select! {
            result = copy::bidirectional(client, upstream, idle) => match result {
                Ok((up, down)) => debug!(service, backend = %backend.label, up, down, "connection closed"),
                Err(err) => debug!(service, backend = %backend.label, %err, "connection ended"),
            },
            () = backend.close.cancelled() => debug!(service, backend = %backend.label, "connection closed: backend drained or lb stopping"),
        }
        return;
    }
    debug!(service, %peer, "every backend tried failed; closing client");
}

fn report_down(proxy: &Proxy, id: BackendId, stats: &crate::snapshot::BackendStats) {
    if stats.mark_down() {
        let _ = proxy.down.send(id);
    }
}
