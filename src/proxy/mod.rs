//! The data path: one accept loop per listen address, one task per connection, bytes
//! copied untouched to a backend picked from the current [`Snapshot`](crate::snapshot).

mod connection;
mod copy;
mod listener;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ServiceConfig;
use crate::snapshot::{BackendId, Snapshots};

/// Pending connections the kernel holds per listener; the usual Linux `somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

/// What every connection task shares.
#[derive(Debug, Clone)]
pub struct Proxy {
    snapshots: Arc<Snapshots>,
    /// Backends a connect failed on, for the supervisor to take out of rotation.
    down: mpsc::UnboundedSender<BackendId>,
    /// Cancelled to stop accepting (graceful stop).
    pub accept: CancellationToken,
    /// Cancelled to close proxied connections (drain deadline, or a second signal).
    pub connections: CancellationToken,
    /// Every connection task, so a stop can wait for them to finish.
    pub tracker: TaskTracker,
}

/// A bound listener waiting for [`Proxy::serve`].
#[derive(Debug)]
pub struct Bound {
    service: Arc<str>,
    listener: TcpListener,
    limit: Arc<Semaphore>,
}

impl Proxy {
    pub fn new(snapshots: Arc<Snapshots>, down: mpsc::UnboundedSender<BackendId>) -> Self {
        Proxy {
            snapshots,
            down,
            accept: CancellationToken::new(),
            connections: CancellationToken::new(),
            tracker: TaskTracker::new(),
        }
    }

    /// Starts the accept loops; they run until [`Proxy::accept`] is cancelled.
    pub fn serve(&self, bound: Vec<Bound>) {
        for b in bound {
            tokio::spawn(listener::accept_loop(self.clone(), b));
        }
    }
}

/// Binds every listen address of every service, before any worker starts, so an address
/// in use is a startup error and not a half-started lb.
pub fn bind_all(services: &[ServiceConfig]) -> anyhow::Result<Vec<Bound>> {
    let mut bound = Vec::new();
    for svc in services {
        // One limit per service, shared by all of its listeners.
        let limit = Arc::new(Semaphore::new(svc.max_connections.get()));
        let service: Arc<str> = svc.name.as_str().into();
        for addr in &svc.listen {
            let listener = bind(*addr)
                .with_context(|| format!("service {}: could not listen on {addr}", svc.name))?;
            bound.push(Bound {
                service: Arc::clone(&service),
                listener,
                limit: Arc::clone(&limit),
            });
        }
    }
    Ok(bound)
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // Lets a restarted lb bind while old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

impl Bound {
    /// The address actually bound (the port is known even for `:0`).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}
