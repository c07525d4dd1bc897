//! The supervisor's record of one service: its worker slots, static backends and
//! listeners, and the pool of ready backends they make.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::health::Health;
use super::life::{Worker, WorkerId};
use super::names::Names;
use super::state::WorkerState;
use crate::balance::BalanceState;
use crate::channel::Message;
use crate::config::{BackendSpec, ServiceConfig, WorkersConfig};
use crate::metrics::{BackendMetrics, Metrics, ServiceMetrics};
use crate::proxy::ServiceListeners;
use crate::snapshot::{Backend, BackendId, Pool, Relay};

/// One of `count` worker positions; keeps its id, backoff and restart count across
/// the processes that fill it.
#[derive(Debug)]
pub(super) struct Slot {
    /// Unique for the life of lb, so a timer set for a slot that was removed (and maybe
    /// re-created at the same index) is recognised as stale.
    pub id: u64,
    /// The settings this slot's worker runs, and a crashed one restarts with. A rollout
    /// moves it to the service's settings; until then a slot keeps the old ones, so a
    /// halted rollout leaves the unreplaced slots as they were.
    pub config: Arc<WorkersConfig>,
    /// The worker that fills the slot: starting, in rotation, or out of it after a
    /// refused connect. A rollout's replacement joins it only once ready.
    pub worker: Option<WorkerId>,
    /// The state while `worker` is `None`: `Backoff` or `Stopped`.
    pub idle_state: WorkerState,
    pub backoff: Backoff,
    pub restarts: u32,
}

impl Slot {
    pub(super) fn new(id: u64, config: Arc<WorkersConfig>) -> Self {
        Slot {
            id,
            backoff: Backoff::new(config.restart_backoff),
            config,
            worker: None,
            idle_state: WorkerState::Stopped,
            restarts: 0,
        }
    }

    /// Moves the slot to new settings; a new `restart_backoff` takes effect from the
    /// next crash, with its own first delay.
    pub(super) fn set_config(&mut self, config: Arc<WorkersConfig>) {
        if config.restart_backoff != self.config.restart_backoff {
            self.backoff = Backoff::new(config.restart_backoff);
        }
        self.config = config;
    }
}

/// The `feed` command of a service.
#[derive(Debug, Default)]
pub(super) struct FeedState {
    /// The id of the timer chain that runs it; None when the service has no feed (or
    /// a reload changed it, and a new chain is about to start).
    pub chain: Option<u64>,
    /// The latest value it printed, given to every worker that starts afterwards.
    pub last: Option<Message>,
}

/// A remote backend: an address from `backends`, or one address a host name there
/// resolved to.
#[derive(Debug)]
pub(super) struct StaticBackend {
    pub backend: Arc<Backend>,
    /// The `backends` entry it comes from.
    pub from: BackendSpec,
    pub up: bool,
    /// Cancels its probe after a refused connect, and its health checks.
    pub probe: CancellationToken,
    pub health: Health,
}

impl StaticBackend {
    /// The backend at `addr` for the entry `from`, labelled `label` in logs, metrics
    /// and `/status`.
    pub(super) fn new(
        from: &BackendSpec,
        addr: SocketAddr,
        label: &str,
        id: BackendId,
        close: CancellationToken,
        metrics: BackendMetrics,
    ) -> Self {
        StaticBackend {
            backend: Arc::new(Backend {
                id,
                addr,
                label: label.into(),
                weight: from.weight,
                stats: Arc::default(),
                metrics,
                close,
            }),
            from: from.clone(),
            // Like HAProxy without health checks: a configured server is up until it fails.
            up: true,
            probe: CancellationToken::new(),
            health: Health::default(),
        }
    }

    /// Whether it is one of a host name's addresses.
    pub(super) fn resolved(&self) -> bool {
        self.from.host_name().is_some()
    }
}

#[derive(Debug)]
pub(super) struct ServiceState {
    pub config: ServiceConfig,
    pub slots: Vec<Slot>,
    pub statics: Vec<StaticBackend>,
    pub listeners: ServiceListeners,
    pub metrics: Arc<ServiceMetrics>,
    pub feed: FeedState,
    /// The host names among `backends`: their lookups and last answers.
    pub names: Names,
    /// What balancing carries from pool to pool: the turn, the Maglev table.
    balance: BalanceState,
}

impl ServiceState {
    /// A service with no slots and no static backends yet.
    pub(super) fn new(config: ServiceConfig, metrics: &Metrics) -> Self {
        let listeners = ServiceListeners::new(&config.name, config.max_connections.get());
        let metrics = Arc::new(metrics.service(&config.name));
        ServiceState {
            config,
            slots: Vec::new(),
            statics: Vec::new(),
            listeners,
            metrics,
            feed: FeedState::default(),
            names: Names::default(),
            balance: BalanceState::default(),
        }
    }

    /// The backends that take new connections now, in slot order, then static ones.
    /// Rebuilds the source-hash table first if the configured backends changed.
    pub(super) fn pool(&mut self, workers: &BTreeMap<WorkerId, Worker>) -> Pool {
        let statics = self
            .statics
            .iter()
            .map(|s| (s.backend.label.to_string(), s.backend.weight))
            .collect();
        self.balance.configure(&self.config, statics);
        let workers = self
            .slots
            .iter()
            .filter_map(|s| workers.get(&s.worker?))
            .filter(|w| w.in_rotation())
            .map(|w| Arc::clone(&w.backend));
        let statics = self
            .statics
            .iter()
            .filter(|s| s.up)
            .map(|s| Arc::clone(&s.backend));
        Pool::new(
            workers.chain(statics).collect(),
            self.config.balance,
            &self.balance,
            Relay::of(&self.config),
            Arc::clone(&self.metrics),
        )
    }
}

/// The backend of a worker listening on `addr`.
pub(super) fn worker_backend(
    id: BackendId,
    service: &str,
    slot: usize,
    addr: SocketAddr,
    close: CancellationToken,
    metrics: &Metrics,
) -> Backend {
    Backend {
        id,
        addr,
        label: format!("{service}/{slot}").into(),
        weight: 1,
        stats: Arc::default(),
        // The slot id, not the port: label sets stay bounded across restarts.
        metrics: metrics.backend(service, &slot.to_string()),
        close,
    }
}
