//! The accept loop of one listen address on one connection thread: accept, then a
//! permit, then a connection task on the tracker. Past `max_connections` a loop holds the
//! one client it accepted until a permit frees and accepts no other, so the rest wait in
//! the kernel's backlog. (A permit taken before the accept would sit with an idle loop
//! while a client waits in another thread's queue.) When lb stops, the loop stops taking
//! new clients but still accepts the ones the kernel already queued, so that no client
//! whose handshake completed is reset when the socket closes.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd as _;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use nix::sys::socket::{Backlog, listen};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::{Proxy, connection, is_resource_exhaustion, steering};

/// One accept loop's own parts.
pub(super) struct Accept {
    pub service: Arc<str>,
    /// Where connections arrive; they go to the service that owns it in the snapshot.
    pub addr: SocketAddr,
    pub limit: Arc<Semaphore>,
    /// Cancelled when a reload closes this address or hands it over: stop at once.
    pub stop: CancellationToken,
    /// Started when lb stops: accept what is queued, then close.
    pub finish: Finish,
    /// This socket in its address's steering by CPU, if the address has it.
    pub steering: Option<steering::Member>,
}

/// lb's stop as one accept loop sees it: the moment to stop taking new clients, and
/// how long the queued ones may wait for a permit.
#[derive(Debug, Clone, Default)]
pub(super) struct Finish {
    now: CancellationToken,
    until: Arc<OnceLock<Instant>>,
}

impl Finish {
    /// Stops taking new clients; queued ones wait for a permit until `until`.
    pub(super) fn start(&self, until: Instant) {
        let _ = self.until.set(until);
        self.now.cancel();
    }

    async fn started(&self) {
        self.now.cancelled().await;
    }

    fn until(&self) -> Instant {
        self.until.get().copied().unwrap_or_else(Instant::now)
    }
}

/// Pause after running out of file descriptors or memory, instead of spinning on accept.
const RESOURCE_BACKOFF: Duration = Duration::from_millis(100);

/// Accepts on `listener` (registered here, with the event loop of the thread this runs
/// on) until a reload closes the address or lb stops.
pub(super) async fn accept_loop(proxy: Proxy, mut accept: Accept, listener: std::net::TcpListener) {
    // A socket from a service manager may come blocking; tokio needs it non-blocking.
    let registered = listener
        .set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(listener));
    let listener = match registered {
        Ok(listener) => listener,
        Err(err) => {
            warn!(service = %accept.service, addr = %accept.addr, %err, "could not accept on this thread");
            return;
        }
    };
    // The connections this loop accepted that have no backend yet.
    let connecting = TaskTracker::new();
    let mut starved = false;
    let held = loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = accept.stop.cancelled() => return,
            () = accept.finish.started() => break None,
        };
        match accepted {
            Ok(client) => {
                starved = false;
                if let Some(member) = &mut accept.steering {
                    member.accepted(&listener);
                }
                let Some(permit) = permit(&proxy, &accept).await else {
                    break Some(client);
                };
                let this = (&accept.service, accept.addr, &connecting);
                spawn(&proxy, this, client, permit);
            }
            Err(err) if is_resource_exhaustion(&err) => {
                if !starved {
                    warn!(service = %accept.service, %err, "accept failed; backing off");
                    starved = true;
                }
                tokio::select! {
                    () = tokio::time::sleep(RESOURCE_BACKOFF) => {}
                    () = accept.stop.cancelled() => return,
                    () = accept.finish.started() => break None,
                }
            }
            // A client that reset before we accepted it: nothing to do.
            Err(err) => debug!(service = %accept.service, %err, "accept failed"),
        }
    };
    if let Ok(listener) = listener.into_std() {
        accept_queued(&proxy, accept, listener, held, &connecting).await;
    }
    // The loop has ended only once every client it took has reached a backend: the
    // workers leave rotation after that.
    connecting.close();
    connecting.wait().await;
}

/// A permit for a client just accepted: at once below `max_connections`, else once a
/// connection ends. A reload that closes the address does not drop the client: it is
/// served when its turn comes. `None` when lb stops meanwhile: the client is served with
/// the queued ones.
async fn permit(proxy: &Proxy, accept: &Accept) -> Option<OwnedSemaphorePermit> {
    if let Ok(permit) = Arc::clone(&accept.limit).try_acquire_owned() {
        return Some(permit);
    }
    tokio::select! {
        permit = Arc::clone(&accept.limit).acquire_owned() => Some(permit.expect("the semaphore is never closed")),
        () = accept.finish.started() => None,
        () = proxy.connections.cancelled() => None,
    }
}

fn spawn(
    proxy: &Proxy,
    accept: (&Arc<str>, SocketAddr, &TaskTracker),
    client: (TcpStream, SocketAddr),
    permit: OwnedSemaphorePermit,
) {
    let (service, addr, connecting) = accept;
    let shared = Arc::clone(&proxy.shared);
    let service = Arc::clone(service);
    let connecting = connecting.token();
    proxy.tracker.spawn(async move {
        connection::handle(&shared, &service, addr, client, connecting).await;
        drop(permit);
    });
}

/// Accepts every client the kernel has already queued, as permits allow, then closes the
/// socket. The backlog shrinks to its least first, so while the queue empties almost no
/// new handshake completes (Linux still completes one into an empty queue, which the
/// next accept takes); the clients left in the middle of one are refused once the socket
/// closes, and retry elsewhere.
/// Accepting directly from the socket, not through the runtime's readiness, sees the
/// queue as it is: "would block" means it is empty. Waiting for permits gives up at the
/// service's drain deadline, or when the proxy's connections are cancelled (a second
/// signal). `held`: a client the loop accepted and has no permit for yet; it goes first.
async fn accept_queued(
    proxy: &Proxy,
    accept: Accept,
    listener: std::net::TcpListener,
    mut held: Option<(TcpStream, SocketAddr)>,
    connecting: &TaskTracker,
) {
    let Accept {
        service,
        addr,
        limit,
        finish,
        ..
    } = accept;
    let until = finish.until();
    // A socket systemd passed stays open after lb closes its copy, and the next lb
    // takes its queue: its backlog stays whole.
    if !crate::systemd::activation::is_passed(listener.as_fd())
        && let Ok(none) = Backlog::new(0)
    {
        let _ = listen(&listener, none);
    }
    let give_up = proxy.connections.clone();
    loop {
        let permit = tokio::select! {
            permit = limit.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            () = give_up.cancelled() => return,
            () = tokio::time::sleep_until(until) => return,
        };
        let accepted = match held.take() {
            Some(client) => Ok(client),
            None => listener.accept().and_then(|(client, peer)| {
                client.set_nonblocking(true)?;
                Ok((TcpStream::from_std(client)?, peer))
            }),
        };
        match accepted {
            Ok(client) => spawn(proxy, (&service, addr, connecting), client, permit),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
            Err(err) if is_resource_exhaustion(&err) => {
                drop(permit);
                tokio::select! {
                    () = tokio::time::sleep(RESOURCE_BACKOFF) => {}
                    () = give_up.cancelled() => return,
                }
            }
            Err(err) => {
                debug!(service = %service, %err, "accept failed");
                // accept(2): errors of one pending connection (aborted, protocol or
                // network errors) call for the next accept; only a broken socket ends it.
                if is_broken_listener(&err) {
                    return;
                }
            }
        }
    }
}

/// Errors that say the listening socket itself is unusable, not one pending connection.
fn is_broken_listener(err: &io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        err.raw_os_error().map(Errno::from_raw),
        Some(Errno::EBADF | Errno::EINVAL | Errno::ENOTSOCK | Errno::EOPNOTSUPP | Errno::EFAULT)
    )
}
