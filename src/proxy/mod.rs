//! The data path: on each connection thread, one accept loop per listen address and one
//! task per connection, bytes copied untouched to a backend picked from the current
//! [`Snapshot`](crate::snapshot).

mod buffer;
mod connection;
mod copy;
mod exhaustion;
mod listener;
mod listening;
pub mod proxy_protocol;
mod splice;
mod steering;
mod threads;
mod upstream;

pub use listening::Listening;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::snapshot::{BackendId, ConnectFailure, Snapshots};

/// Errors that say lb, not a peer, is short of descriptors or memory.
fn is_resource_exhaustion(err: &std::io::Error) -> bool {
    use nix::errno::Errno;
    matches!(
        err.raw_os_error().map(Errno::from_raw),
        Some(Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)
    )
}

/// Pending connections the kernel holds per listener; the usual Linux `somaxconn`.
const LISTEN_BACKLOG: u32 = 4096;

/// What every accept loop shares.
#[derive(Debug, Clone)]
pub struct Proxy {
    /// What connection tasks need; one reference count per connection, no lock.
    shared: Arc<Shared>,
    /// The connection threads' event loops: each address has an accept loop on each.
    threads: threads::Threads,
    /// Cancelled to close every proxied connection (drain deadline, or a second signal);
    /// each backend has a child token that closes only its own connections.
    pub connections: CancellationToken,
    /// Every connection task, so a stop can wait for them to finish.
    pub tracker: TaskTracker,
}

/// What a connection task reads.
#[derive(Debug)]
struct Shared {
    snapshots: Arc<Snapshots>,
    /// Backends a connect failed on, for the supervisor to take out of rotation.
    down: mpsc::UnboundedSender<(BackendId, ConnectFailure)>,
}

impl Proxy {
    /// Starts `threads` connection threads.
    pub fn new(
        snapshots: Arc<Snapshots>,
        down: mpsc::UnboundedSender<(BackendId, ConnectFailure)>,
        threads: NonZeroUsize,
    ) -> std::io::Result<Self> {
        Ok(Proxy {
            shared: Arc::new(Shared { snapshots, down }),
            threads: threads::Threads::start(threads)?,
            connections: CancellationToken::new(),
            tracker: TaskTracker::new(),
        })
    }

    /// How many threads carry connections.
    pub fn threads(&self) -> usize {
        self.threads.handles().len()
    }
}

/// Binds `addrs` for `threads` connection threads, all or none, so an address in use
/// fails a start before anything runs.
pub fn bind(
    service: &str,
    addrs: &[SocketAddr],
    threads: usize,
) -> anyhow::Result<Vec<(SocketAddr, Listening)>> {
    addrs
        .iter()
        .map(|addr| {
            let listening = Listening::open(*addr, threads)
                .with_context(|| format!("service {service}: could not listen on {addr}"))?;
            Ok((*addr, listening))
        })
        .collect()
}

/// Binds one listen address (the first socket of its [`Listening`]), or takes the socket
/// systemd passed for it.
pub fn bind_one(addr: SocketAddr) -> std::io::Result<TcpListener> {
    if let Some(passed) = crate::systemd::activation::take(addr) {
        return passed;
    }
    // The connection threads' sockets share the address through SO_REUSEPORT, which
    // would also let another lb (or a wider address) join them without an error; a plain
    // bind first proves the address free. A port the kernel picks is free anyway.
    if addr.port() != 0 {
        drop(listening::bound(addr, false)?);
    }
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // Lets a restarted lb bind while old connections sit in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The listeners of one service: its connection limit, shared by all of its addresses,
/// and one accept loop per address and connection thread.
#[derive(Debug)]
pub struct ServiceListeners {
    service: Arc<str>,
    limit: Arc<Semaphore>,
    max_connections: usize,
    loops: HashMap<SocketAddr, AcceptLoop>,
}

#[derive(Debug)]
struct AcceptLoop {
    /// Cancelled to stop accepting at once (a reload closes or hands over the address).
    stop: CancellationToken,
    /// Started to stop taking new clients but serve those already queued (lb's stop).
    finish: listener::Finish,
    /// One per connection thread.
    tasks: Vec<JoinHandle<()>>,
    /// Second descriptors of the listening sockets, so a reload can hand the address to
    /// another service; `None` if the process was out of descriptors when it started.
    sockets: Option<Listening>,
    /// The address the sockets are bound to: the configured one, with the port the
    /// kernel chose for port 0.
    bound: SocketAddr,
}

impl ServiceListeners {
    pub fn new(service: &str, max_connections: usize) -> Self {
        ServiceListeners {
            service: service.into(),
            limit: Arc::new(Semaphore::new(max_connections)),
            max_connections,
            loops: HashMap::new(),
        }
    }

    /// Starts accepting on bound sockets, each on its own connection thread; returns the
    /// address they are bound to.
    pub fn serve(&mut self, proxy: &Proxy, addr: SocketAddr, listening: Listening) -> SocketAddr {
        let (stop, finish) = (CancellationToken::new(), listener::Finish::default());
        let sockets = listening.share().ok();
        let bound = listening.local_addr().unwrap_or(addr);
        let tasks = listening
            .into_sockets()
            .zip(proxy.threads.handles())
            .map(|((listener, steering), thread)| {
                let accept = listener::Accept {
                    service: Arc::clone(&self.service),
                    addr,
                    limit: Arc::clone(&self.limit),
                    stop: stop.clone(),
                    finish: finish.clone(),
                    steering,
                };
                thread.spawn(listener::accept_loop(proxy.clone(), accept, listener))
            })
            .collect();
        let accept_loop = AcceptLoop {
            stop,
            finish,
            tasks,
            sockets,
            bound,
        };
        self.loops.insert(addr, accept_loop);
        bound
    }

    /// The address the socket for configured address `addr` is bound to.
    pub fn bound(&self, addr: &SocketAddr) -> Option<SocketAddr> {
        self.loops.get(addr).map(|l| l.bound)
    }

    /// Other handles on the sockets listening on `addr`, for a reload that gives the
    /// address to another service. Binding it anew would fail while these listen, and
    /// closing them first would refuse clients in between; the shared sockets keep their
    /// backlogs and never close.
    pub fn share(&self, addr: &SocketAddr) -> Option<Listening> {
        self.loops.get(addr)?.sockets.as_ref()?.share().ok()
    }

    /// Stops accepting on `addr`; connections already accepted carry on.
    pub fn close(&mut self, addr: &SocketAddr) {
        if let Some(accept_loop) = self.loops.remove(addr) {
            accept_loop.stop.cancel();
        }
    }

    pub fn close_all(&mut self) {
        for (_, accept_loop) in self.loops.drain() {
            accept_loop.stop.cancel();
        }
    }

    /// Stops taking new clients on every address; each loop still accepts the clients
    /// whose handshake the kernel completed (as `max_connections` allows, until `until`
    /// or until the proxy's connections are cancelled), then closes its socket. The
    /// handles end when their loop has.
    pub fn close_gracefully(&mut self, until: Instant) -> Vec<JoinHandle<()>> {
        self.loops
            .drain()
            .flat_map(|(_, accept_loop)| {
                accept_loop.finish.start(until);
                accept_loop.tasks
            })
            .collect()
    }

    pub fn addrs(&self) -> impl Iterator<Item = &SocketAddr> {
        self.loops.keys()
    }

    /// Applies a new `max_connections`. Lowering it waits for connections to finish
    /// before the freed permits disappear; it never cuts a connection.
    pub fn set_limit(&mut self, max_connections: usize) {
        use std::cmp::Ordering;
        match max_connections.cmp(&self.max_connections) {
            Ordering::Greater => self
                .limit
                .add_permits(max_connections - self.max_connections),
            Ordering::Less => {
                let (limit, excess) = (
                    Arc::clone(&self.limit),
                    self.max_connections - max_connections,
                );
                tokio::spawn(async move {
                    let excess = u32::try_from(excess).unwrap_or(u32::MAX);
                    if let Ok(permits) = limit.acquire_many_owned(excess).await {
                        permits.forget();
                    }
                });
            }
            Ordering::Equal => {}
        }
        self.max_connections = max_connections;
    }
}
