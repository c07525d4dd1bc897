//! The accept loop: a permit first (so past `max_connections` clients wait in the
//! kernel's backlog), then accept, then a connection task on the tracker.

use std::io;
use std::time::Duration;

use tracing::{debug, warn};

use super::{Bound, Proxy, connection};

/// Pause after running out of file descriptors or memory, instead of spinning on accept.
const RESOURCE_BACKOFF: Duration = Duration::from_millis(100);

pub(super) async fn accept_loop(proxy: Proxy, bound: Bound) {
    let Bound {
        service,
        listener,
        limit,
    } = bound;
    let mut starved = false;
    loop {
        let permit = tokio::select! {
            permit = limit.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = proxy.accept.cancelled() => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = proxy.accept.cancelled() => return,
        };
        match accepted {
            Ok((client, peer)) => {
                starved = false;
                let proxy2 = proxy.clone();
                let service = service.clone();
                proxy.tracker.spawn(async move {
                    connection::handle(&proxy2, &service, client, peer).await;
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
                    () = proxy.accept.cancelled() => return,
                }
            }
            // A client that reset before we accepted it: nothing to do.
            Err(err) => debug!(service = %service, %err, "accept failed"),
        }
    }
}

fn is_resource_exhaustion(err: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        err.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
    )
}
