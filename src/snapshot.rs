//! The backend set the proxy reads: an immutable [`Snapshot`] of every service's ready
//! backends, swapped whole behind one `ArcSwap`. Only the supervisor builds snapshots;
//! the connection path only loads them, so it never takes a lock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Timeouts;
use crate::metrics::{BackendMetrics, ServiceMetrics};

/// Identifies a backend in reports from the proxy to the supervisor.
pub type BackendId = u64;

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

/// The ready backends of one service and the order in which they take connections.
#[derive(Debug)]
pub struct Pool {
    pub backends: Vec<Arc<Backend>>,
    /// Indexes into `backends`, each repeated by its weight and interleaved (smooth
    /// weighted round-robin), so picking is one atomic increment.
    rotation: Vec<u32>,
    /// Shared with the pools that replace this one, so a swap does not restart the turn.
    cursor: Arc<AtomicUsize>,
    pub timeouts: Timeouts,
    pub metrics: Arc<ServiceMetrics>,
}

impl Pool {
    pub fn new(
        backends: Vec<Arc<Backend>>,
        cursor: Arc<AtomicUsize>,
        timeouts: Timeouts,
        metrics: Arc<ServiceMetrics>,
    ) -> Self {
        let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
        Pool {
            rotation: smooth_rotation(&weights),
            backends,
            cursor,
            timeouts,
            metrics,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    /// The next backend in turn that is not in `skip` (backends this connection already
    /// failed to reach).
    pub fn pick(&self, skip: &[BackendId]) -> Option<&Arc<Backend>> {
        if self.rotation.is_empty() {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        (0..self.rotation.len())
            .map(|step| {
                &self.backends[self.rotation[(start + step) % self.rotation.len()] as usize]
            })
            .find(|b| !skip.contains(&b.id))
    }
}

/// Nginx's smooth weighted round-robin, unrolled into one cycle: weights 5,1,1 give
/// a,a,b,a,c,a,a rather than a,a,a,a,a,b,c.
fn smooth_rotation(weights: &[u32]) -> Vec<u32> {
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    let weights: Vec<i64> = weights.iter().map(|w| i64::from(w / divisor)).collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut rotation = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        for (c, w) in current.iter_mut().zip(&weights) {
            *c += w;
        }
        let (best, _) = current
            .iter()
            .enumerate()
            .max_by_key(|(i, c)| (**c, std::cmp::Reverse(*i)))
            .expect("total > 0 implies at least one backend");
        current[best] -= total;
        rotation.push(u32::try_from(best).expect("backend count fits in u32"));
    }
    rotation
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
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
        let deadline = tokio::time::Instant::now() + pool.timeouts.connect;
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

    fn pool(weights: &[u32]) -> Pool {
        let metrics = crate::metrics::Metrics::default();
        let backends = weights
            .iter()
            .enumerate()
            .map(|(i, w)| {
                Arc::new(Backend {
                    id: i as u64,
                    addr: SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)),
                    label: format!("b{i}").into(),
                    weight: *w,
                    stats: Arc::default(),
                    metrics: metrics.backend("test", &i.to_string()),
                    close: CancellationToken::new(),
                })
            })
            .collect();
        let timeouts = Timeouts {
            connect: Duration::from_secs(1),
            idle: Duration::from_secs(1),
        };
        Pool::new(
            backends,
            Arc::default(),
            timeouts,
            Arc::new(metrics.service("test")),
        )
    }

    #[test]
    fn round_robin_is_even() {
        let p = pool(&[1, 1, 1]);
        let picks: Vec<u64> = (0..6).map(|_| p.pick(&[]).unwrap().id).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn weights_interleave() {
        assert_eq!(smooth_rotation(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_rotation(&[2, 2]), vec![0, 1]);
    }

    #[test]
    fn pick_skips_failed_backends() {
        let p = pool(&[1, 1, 1]);
        for _ in 0..5 {
            assert_eq!(p.pick(&[0, 1]).unwrap().id, 2);
        }
        assert!(p.pick(&[0, 1, 2]).is_none());
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
