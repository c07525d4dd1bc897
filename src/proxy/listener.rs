//! The accept loop: a permit first (so past `max_connections` clients wait in the
//! kernel's backlog), then accept, then a connection task on the tracker. When lb stops,
//! the loop stops taking new clients but still accepts the ones the kernel already
//! queued, so that no client whose handshake completed is reset when the socket closes.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{Backlog, listen};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{Proxy, connection, is_resource_exhaustion};

/// One accept loop's own parts.
pub(super) struct Accept {
    pub service: Arc<str>,
    /// Where connections arrive; they go to the service that owns it in the snapshot.
    pub addr: SocketAddr,
    pub listener: TcpListener,
    pub limit: Arc<Semaphore>,
    /// Cancelled when a reload closes this address or hands it over: stop at once.
    pub stop: CancellationToken,
    /// Cancelled when lb stops: accept what is queued, then close.
    pub finish: CancellationToken,
}

/// Pause after running out of file descriptors or memory, instead of spinning on accept.
const RESOURCE_BACKOFF: Duration = Duration::from_millis(100);

pub(super) async fn accept_loop(proxy: Proxy, accept: Accept) {
    let mut starved = false;
    let held = loop {
        let permit = tokio::select! {
            permit = accept.limit.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = accept.stop.cancelled() => return,
            () = accept.finish.cancelled() => break None,
        };
        let accepted = tokio::select! {
            accepted = accept.listener.accept() => accepted,
            () = accept.stop.cancelled() => return,
            () = accept.finish.cancelled() => break Some(permit),
        };
        match accepted {
            Ok((client, peer)) => {
                starved = false;
                spawn(&proxy, &accept.service, accept.addr, (client, peer), permit);
            }
            Err(err) if is_resource_exhaustion(&err) => {
                if !starved {
                    warn!(service = %accept.service, %err, "accept failed; backing off");
                    starved = true;
                }
                tokio::select! {
                    () = tokio::time::sleep(RESOURCE_BACKOFF) => {}
                    () = accept.stop.cancelled() => return,
                    () = accept.finish.cancelled() => break None,
                }
            }
            // A client that reset before we accepted it: nothing to do.
            Err(err) => debug!(service = %accept.service, %err, "accept failed"),
        }
    };
    accept_queued(&proxy, accept, held).await;
}

fn spawn(
    proxy: &Proxy,
    service: &Arc<str>,
    addr: SocketAddr,
    (client, peer): (TcpStream, SocketAddr),
    permit: OwnedSemaphorePermit,
) {
    let shared = Arc::clone(&proxy.shared);
    let service = Arc::clone(service);
    proxy.tracker.spawn(async move {
        connection::handle(&shared, &service, addr, client, peer).await;
        drop(permit);
    });
}

/// Accepts every client the kernel has already queued, as permits allow, then closes the
/// socket. The backlog shrinks first, so clients that start a handshake now are not
/// completed (they are refused once the socket closes) while the queue empties.
/// Accepting directly from the socket, not through the runtime's readiness, sees the
/// queue as it is: "would block" means it is empty. Waiting for permits gives up when
/// the proxy's connections are cancelled (the drain deadline, or a second signal).
async fn accept_queued(proxy: &Proxy, accept: Accept, mut held: Option<OwnedSemaphorePermit>) {
    let Accept {
        service,
        addr,
        listener,
        limit,
        ..
    } = accept;
    let Ok(listener) = listener.into_std() else {
        return;
    };
    if let Ok(none) = Backlog::new(0) {
        let _ = listen(&listener, none);
    }
    let give_up = proxy.connections.clone();
    loop {
        let permit = match held.take() {
            Some(permit) => permit,
            None => tokio::select! {
                permit = limit.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                () = give_up.cancelled() => return,
            },
        };
        let accepted = listener.accept().and_then(|(client, peer)| {
            client.set_nonblocking(true)?;
            Ok((TcpStream::from_std(client)?, peer))
        });
        match accepted {
            Ok(client) => spawn(proxy, &service, addr, client, permit),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
            Err(err) if is_resource_exhaustion(&err) => {
                held = Some(permit);
                tokio::select! {
                    () = tokio::time::sleep(RESOURCE_BACKOFF) => {}
                    () = give_up.cancelled() => return,
                }
            }
            Err(err) => {
                held = Some(permit);
                debug!(service = %service, %err, "accept failed");
                if !matches!(
                    err.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                ) {
                    return;
                }
            }
        }
    }
}
