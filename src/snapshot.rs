//! The backend set the proxy reads: an immutable [`Snapshot`] of every service's ready
//! backends, swapped whole behind one `ArcSwap`. Only the supervisor builds snapshots;
//! the connection path only loads them, so it never takes a lock.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::balance::{BalanceState, Selector};
use crate::config::{Balance, ProxyProtocol, ServiceConfig, Timeouts};
use crate::metrics::{BackendMetrics, ServiceMetrics};

/// Identifies a backend in reports from the proxy to the supervisor.
pub type BackendId = u64;

/// How a connect to a backend failed, as the proxy tells the supervisor, which takes the
/// backend out of rotation and says why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    Refused,
    /// No answer within the service's connect timeout.
    TimedOut,
    Other,
}

impl ConnectFailure {
    pub fn of(err: &std::io::Error) -> ConnectFailure {
        match err.kind() {
            std::io::ErrorKind::ConnectionRefused => ConnectFailure::Refused,
            std::io::ErrorKind::TimedOut => ConnectFailure::TimedOut,
            _ => ConnectFailure::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ConnectFailure::Refused => "refused",
            ConnectFailure::TimedOut => "timed out",
            ConnectFailure::Other => "failed",
        }
    }
}

/// One place connections can go: a worker on a localhost port or a static address.
#[derive(Debug)]
pub struct Backend {
    pub id: BackendId,
    pub addr: SocketAddr,
    /// `service/slot` for workers, the address as written for static backends.
    pub label: Arc<str>,
    pub weight: u32,
    pub stats: Arc<BackendStats>,
    pub metrics: BackendMetrics,
    /// Cancelled to close this backend's connections (its drain deadline passed); a
    /// child of the proxy's token, so a stop closes them too.
    pub close: CancellationToken,
}

/// Per-backend counters shared by every snapshot the backend appears in.
#[derive(Debug, Default)]
pub struct BackendStats {
    active: AtomicUsize,
    /// Set by the first connection that fails to connect, so a dead backend is reported
    /// to the supervisor once, not once per client.
    reported_down: AtomicBool,
}

impl BackendStats {
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// True for the one caller that should report this backend down.
    pub fn mark_down(&self) -> bool {
        !self.reported_down.swap(true, Ordering::AcqRel)
    }

    /// Called by the supervisor once the backend answers again.
    pub fn mark_up(&self) {
        self.reported_down.store(false, Ordering::Release);
    }
}

impl Backend {
    /// Counts a connection as active on this backend until the guard drops.
    pub fn track(self: &Arc<Self>) -> ActiveGuard {
        self.stats.active.fetch_add(1, Ordering::Relaxed);
        self.metrics.connections_active.inc();
        ActiveGuard(Arc::clone(self))
    }
}

/// Decrements the active count of a backend when the connection ends.
#[derive(Debug)]
pub struct ActiveGuard(Arc<Backend>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.stats.active.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.connections_active.dec();
    }
}

/// The ready backends of one service and the strategy that picks among them.
#[derive(Debug)]
pub struct Pool {
    pub backends: Vec<Arc<Backend>>,
    selector: Selector,
    pub relay: Relay,
    pub metrics: Arc<ServiceMetrics>,
}

/// How the connection path treats a service's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relay {
    pub timeouts: Timeouts,
    pub proxy_protocol: ProxyProtocol,
    /// One log line per closed connection.
    pub log_connections: bool,
}

impl Relay {
    pub fn of(service: &ServiceConfig) -> Self {
        Relay {
            timeouts: service.timeouts,
            proxy_protocol: service.proxy_protocol,
            log_connections: service.log_connections,
        }
    }
}

impl Pool {
    /// A pool over `backends` that picks as `balance` says, with what the service's
    /// selection carries across snapshots in `state`.
    pub fn new(
        backends: Vec<Arc<Backend>>,
        balance: Balance,
        state: &BalanceState,
        relay: Relay,
        metrics: Arc<ServiceMetrics>,
    ) -> Self {
        Pool {
            selector: Selector::new(balance, &backends, state),
            backends,
            relay,
            metrics,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    /// The backend for a new connection from `client`, not one in `skip` (backends this
    /// connection already failed to reach).
    pub fn pick(&self, client: IpAddr, skip: &[BackendId]) -> Option<&Arc<Backend>> {
        let index = self.selector.pick(&self.backends, client, skip)?;
        self.backends.get(index)
    }
}

/// Every service's pool at one moment.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// lb is stopping: `/healthz` answers 503 even while it still serves.
    pub stopping: bool,
    pub pools: HashMap<String, Arc<Pool>>,
    /// The pool of the service that owns each listen address. A connection goes to the
    /// owner of the address it arrived on, so one that the old loop of an address handed
    /// over in a reload accepts still reaches the address's new service; to the service
    /// that accepted it if the address has no owner any more (a reload closed it).
    pub listeners: HashMap<SocketAddr, Arc<Pool>>,
}

impl Snapshot {
    fn route(&self, service: &str, listen: SocketAddr) -> Option<&Arc<Pool>> {
        self.listeners
            .get(&listen)
            .or_else(|| self.pools.get(service))
    }
}

/// The current snapshot, and a way to wait for the next one.
#[derive(Debug, Default)]
pub struct Snapshots {
    current: ArcSwap<Snapshot>,
    changed: Notify,
}

impl Snapshots {
    pub fn load(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.current.load()
    }

    /// The pool a connection that `service` accepted on `listen` goes to now, ready
    /// backends or not; `None` once neither the address nor the service is there.
    pub fn pool(&self, service: &str, listen: SocketAddr) -> Option<Arc<Pool>> {
        self.load().route(service, listen).map(Arc::clone)
    }

    /// Swaps in a new snapshot and wakes connections waiting for a ready backend.
    pub fn publish(&self, snapshot: Snapshot) {
        self.current.store(Arc::new(snapshot));
        self.changed.notify_waiters();
    }

    /// The pool for a connection that `service` accepted on `listen`, once it has a
    /// ready backend. A client may wait up to the service's connect timeout for one (at
    /// startup, or while every worker restarts) instead of being closed at once; `None`
    /// if none appears by then, or neither the address nor the service is still there.
    pub async fn ready_pool(&self, service: &str, listen: SocketAddr) -> Option<Arc<Pool>> {
        // The common case touches nothing shared but the ArcSwap.
        let pool = Arc::clone(self.load().route(service, listen)?);
        if !pool.is_empty() {
            return Some(pool);
        }
        let deadline = tokio::time::Instant::now() + pool.relay.timeouts.connect;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let pool = Arc::clone(self.load().route(service, listen)?);
            if !pool.is_empty() {
                return Some(pool);
            }
            tokio::time::timeout_at(deadline, changed).await.ok()?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_pool_picks_with_its_strategy() {
        let metrics = crate::metrics::Metrics::default();
        let backends = crate::balance::testing::backends(&[1, 1, 1]);
        let timeouts = Timeouts {
            connect: Duration::from_secs(1),
            idle: Duration::from_secs(1),
        };
        let pool = Pool::new(
            backends,
            Balance::RoundRobin,
            &BalanceState::default(),
            Relay {
                timeouts,
                proxy_protocol: ProxyProtocol::Off,
                log_connections: false,
            },
            Arc::new(metrics.service("test")),
        );
        let client = IpAddr::from([127, 0, 0, 1]);
        let picks: Vec<u64> = (0..4).map(|_| pool.pick(client, &[]).unwrap().id).collect();
        assert_eq!(picks, vec![0, 1, 2, 0]);
        assert_eq!(pool.pick(client, &[0, 2]).unwrap().id, 1);
        assert!(pool.pick(client, &[0, 1, 2]).is_none());
    }

    #[test]
    fn down_is_reported_once() {
        let stats = BackendStats::default();
        assert!(stats.mark_down());
        assert!(!stats.mark_down());
        stats.mark_up();
        assert!(stats.mark_down());
    }
}
