//! The accept loop: a permit first (so past `max_connections` clients wait in the
//! kernel's backlog), then accept, then a connection task on the tracker.

use std::net::SocketAddr;
use std::time::Duration;

use tracing::{debug, warn};

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{Proxy, connection, is_resource_exhaustion};

/// One accept loop's own parts.
pub(super) struct Accept {
    pub service: Arc<str>,
    /// Where connections arrive; they go to the service that owns it in the snapshot.
    pub addr: SocketAddr,
    pub listener: TcpListener,
    pub limit: Arc<Semaphore>,
    /// Cancelled when this address is closed (reload) or lb stops.
    pub stop: CancellationToken,
}

/// Pause after running out of file descriptors or memory, instead of spinning on accept.
const RESOURCE_BACKOFF: Duration = Duration::from_millis(100);

pub(super) async fn accept_loop(proxy: Proxy, accept: Accept) {
    let Accept {
        service,
        addr,
        listener,
        limit,
        stop,
    } = accept;
    let mut starved = false;
    loop {
        let permit = tokio::select! {
            permit = limit.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = stop.cancelled() => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        match accepted {
            Ok((client, peer)) => {
                starved = false;
                let shared = Arc::clone(&proxy.shared);
                let service = service.clone();
                proxy.tracker.spawn(async move {
                    connection::handle(&shared, &service, addr, client, peer).await;
                    drop(permit);
                });
            }
            Err(err) if is_resource_exhaustion(&err) => {
                if !starved {
                    warn!(service = %service, %err, "accept failed; backing off");
                    starved = true;
                }
                tokio::select! {
                    () = tokio::time::sleep(RESOURCE_BACKOFF) => {}
                    () = stop.cancelled() => return,
                }
            }
            // A client that reset before we accepted it: nothing to do.
            Err(err) => debug!(service = %service, %err, "accept failed"),
        }
    }
}
