//! The supervisor's record of one service: its worker slots and static backends, and
//! the pool of ready backends they make.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use nix::unistd::Pid;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::state::WorkerState;
use crate::config::{BackendSpec, ServiceConfig};
use crate::snapshot::{Backend, BackendId, Pool};

/// A worker process that lb started in a slot.
#[derive(Debug)]
pub(super) struct Worker {
    pub backend: Arc<Backend>,
    pub pid: Pid,
    pub state: WorkerState,
    pub started: Instant,
    /// Stops this worker's readiness probe when it exits or is stopped.
    pub probe: CancellationToken,
}

/// One of `count` worker positions; keeps its id, backoff and restart count across
/// the processes that fill it.
#[derive(Debug)]
pub(super) struct Slot {
    pub worker: Option<Worker>,
    /// The state while `worker` is `None`: `Backoff` or `Stopped`.
    pub idle_state: WorkerState,
    pub backoff: Backoff,
    pub restarts: u32,
}

/// A configured remote backend.
#[derive(Debug)]
pub(super) struct StaticBackend {
    pub backend: Arc<Backend>,
    pub up: bool,
    pub probe: CancellationToken,
}

#[derive(Debug)]
pub(super) struct ServiceState {
    pub config: ServiceConfig,
    pub slots: Vec<Slot>,
    pub statics: Vec<StaticBackend>,
    /// The round-robin position, carried from pool to pool.
    cursor: Arc<AtomicUsize>,
}

impl ServiceState {
    /// A service with empty slots; `next_id` numbers its static backends.
    pub(super) fn new(config: ServiceConfig, next_id: &mut impl FnMut() -> BackendId) -> Self {
        let slots = config.workers.as_ref().map_or(0, |w| w.count.get());
        let slots = (0..slots)
            .map(|_| Slot {
                worker: None,
                idle_state: WorkerState::Stopped,
                backoff: Backoff::new(
                    config
                        .workers
                        .as_ref()
                        .expect("slots exist only with workers")
                        .restart_backoff,
                ),
                restarts: 0,
            })
            .collect();
        let statics = config
            .backends
            .iter()
            .map(|spec| static_backend(spec, next_id()))
            .collect();
        ServiceState {
            config,
            slots,
            statics,
            cursor: Arc::default(),
        }
    }

    /// The backends that take new connections now, in slot order, then static ones.
    pub(super) fn pool(&self) -> Pool {
        let workers = self
            .slots
            .iter()
            .filter_map(|s| s.worker.as_ref())
            .filter(|w| w.state == WorkerState::Ready)
            .map(|w| Arc::clone(&w.backend));
        let statics = self
            .statics
            .iter()
            .filter(|s| s.up)
            .map(|s| Arc::clone(&s.backend));
        Pool::new(
            workers.chain(statics).collect(),
            Arc::clone(&self.cursor),
            self.config.timeouts,
        )
    }

    pub(super) fn live_workers(&self) -> impl Iterator<Item = &Worker> {
        self.slots.iter().filter_map(|s| s.worker.as_ref())
    }

    pub(super) fn slot_of_pid(&self, pid: Pid) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.worker.as_ref().is_some_and(|w| w.pid == pid))
    }

    pub(super) fn slot_of_backend(&self, id: BackendId) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.worker.as_ref().is_some_and(|w| w.backend.id == id))
    }

    pub(super) fn static_of_backend(&self, id: BackendId) -> Option<usize> {
        self.statics.iter().position(|s| s.backend.id == id)
    }
}

fn static_backend(spec: &BackendSpec, id: BackendId) -> StaticBackend {
    StaticBackend {
        backend: Arc::new(Backend {
            id,
            addr: spec.addr,
            label: spec.label.as_str().into(),
            weight: spec.weight,
            stats: Arc::default(),
        }),
        // Like HAProxy without health checks: a configured server is up until it fails.
        up: true,
        probe: CancellationToken::new(),
    }
}

/// The backend of a worker listening on `port`.
pub(super) fn worker_backend(
    id: BackendId,
    service: &str,
    slot: usize,
    addr: SocketAddr,
) -> Backend {
    Backend {
        id,
        addr,
        label: format!("{service}/{slot}").into(),
        weight: 1,
        stats: Arc::default(),
    }
}
