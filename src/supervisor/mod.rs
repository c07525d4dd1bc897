//! The supervisor: the one task that owns worker and backend state. Everything that
//! happens to a worker (spawned, ready, exited, refused a connection), every signal and
//! every timer arrives here as an [`Event`]; after each event the supervisor publishes
//! a new snapshot for the proxy. Waits (backoff, drain, stop deadlines) are timers that
//! send events back, so the actor never blocks while a stop, a rollout or a restart is
//! in progress.
//!
//! The handlers live beside this file, one concern each: `lifecycle.rs` (a worker's own
//! life: start, ready, crash, restart), `rollout.rs` (replacing workers one by one),
//! `retire.rs` (draining and stopping a worker that left rotation), `reload.rs`
//! (applying a changed config) and `stop.rs` (lb's own graceful stop).

mod backoff;
mod command;
mod feed;
mod group;
mod lifecycle;
mod messages;
mod probe;
mod reap;
mod reload;
mod report;
mod retire;
mod rollout;
mod service;
mod state;
mod stop;
mod sys;
mod watchdog;
mod worker;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nix::unistd::Pid;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tracing::info;

pub use command::{CommandError, Reply};
pub use reap::ExitStatus;
pub use state::WorkerState;
pub use watchdog::serve as serve_watchdog;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::snapshot::{BackendId, Snapshot, Snapshots};
use retire::Retiring;
use rollout::Rollout;
use service::ServiceState;
use stop::Phase;
use watchdog::Watchdog;

/// Everything the supervisor reacts to.
#[derive(Debug)]
pub enum Event {
    /// A child process ended (reported by the reaper).
    Exited { pid: Pid, status: ExitStatus },
    /// A probe of a backend finished: it accepts connections, or its deadline passed.
    Probe { id: BackendId, ok: bool },
    /// A crashed worker's backoff delay has passed.
    RestartDue {
        service: String,
        slot: usize,
        slot_id: u64,
    },
    /// SIGHUP or `POST /reload`: re-read the config and apply the difference.
    Reload { reply: Option<Reply> },
    /// SIGUSR2 or `POST /restart`: re-read the config and replace every worker of one
    /// service, or of all, one at a time; the reply comes when the rollout ends.
    Restart {
        service: Option<String>,
        reply: Option<Reply>,
    },
    /// A worker sent a message on its channel; `in_flight` lets it send more once dropped.
    Message {
        id: BackendId,
        value: serde_json::Value,
        in_flight: crate::channel::InFlight,
    },
    /// `POST /broadcast`: send a message to every worker of one service or all.
    Broadcast {
        service: Option<String>,
        message: crate::channel::Message,
        reply: Option<Reply>,
    },
    /// Time to run a service's feed command (`chain` tells stale timers apart).
    FeedTick { service: String, chain: u64 },
    /// A feed run ended and printed these values.
    FeedOutput {
        service: String,
        values: Vec<serde_json::Value>,
        error: Option<String>,
    },
    /// `GET /status`.
    Status {
        reply: tokio::sync::oneshot::Sender<crate::admin::status::Status>,
    },
    /// SIGTERM/SIGINT; a second one, or `fast`, stops at once.
    Stop { fast: bool },
    /// lb is stopping: open connections finished, or the drain deadline passed.
    Drained { timed_out: bool },
    /// lb is stopping: workers had `stop_timeout` to exit after `stop_signal`.
    StopDeadline,
    /// lb is stopping: workers had a grace period to be reaped after SIGKILL.
    KillGraceOver,
    /// A retiring worker has no connections left, or its `drain_timeout` passed.
    RetireDrained { id: BackendId, timed_out: bool },
    /// A retiring worker had `stop_timeout` to exit after `stop_signal`.
    RetireDeadline { id: BackendId },
    /// Time to see which lingering process groups are gone.
    GroupCheck,
}

/// The sending half of the supervisor's inbox, for signals and the reaper.
pub type Inbox = mpsc::UnboundedSender<Event>;

/// Listeners bound before the supervisor starts, by service name.
pub type BoundListeners = HashMap<String, Vec<(SocketAddr, TcpListener)>>;

/// Where a process or backend id sits in the supervisor's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// The worker in rotation (or starting) in a slot.
    Current { si: usize, slot: usize },
    /// A rollout's replacement for a slot, not ready yet.
    Replacement { si: usize, slot: usize },
    /// An index into `retiring`.
    Retiring(usize),
    /// A static backend of a service.
    Static { si: usize, index: usize },
}

pub struct Supervisor {
    config_path: PathBuf,
    /// The admin address lb started with (it does not move on reload).
    admin: Option<SocketAddr>,
    services: Vec<ServiceState>,
    /// Workers out of rotation, draining their connections or stopping.
    retiring: Vec<Retiring>,
    /// Process groups of stopped workers whose other processes are still exiting.
    lingering: Vec<group::Lingering>,
    rollout: Rollout,
    snapshots: Arc<Snapshots>,
    proxy: Proxy,
    tx: Inbox,
    events: mpsc::UnboundedReceiver<Event>,
    /// Backends a connection failed to reach, reported by the proxy.
    down: mpsc::UnboundedReceiver<BackendId>,
    next_id: BackendId,
    phase: Phase,
    watchdog: Watchdog,
    metrics: Metrics,
    feed_runs: feed::FeedRuns,
    /// The gauge series last exported, so series of removed slots and services go away.
    exported: report::Exported,
}

impl Supervisor {
    /// Creates the supervisor, starts reaping children and starts the watchdog; no
    /// worker runs yet.
    pub fn new(
        config_path: PathBuf,
        config: &Config,
        snapshots: Arc<Snapshots>,
        proxy: Proxy,
        down: mpsc::UnboundedReceiver<BackendId>,
        metrics: Metrics,
    ) -> std::io::Result<(Self, Inbox)> {
        let (tx, events) = mpsc::unbounded_channel();
        reap::start(tx.clone())?;
        let watchdog = Watchdog::start()?;
        let mut sup = Supervisor {
            config_path,
            admin: config.admin,
            services: Vec::new(),
            retiring: Vec::new(),
            lingering: Vec::new(),
            rollout: Rollout::default(),
            snapshots,
            proxy,
            tx: tx.clone(),
            events,
            down,
            next_id: 0,
            phase: Phase::Running,
            watchdog,
            metrics,
            feed_runs: feed::FeedRuns::default(),
            exported: report::Exported::default(),
        };
        for svc in &config.services {
            sup.add_service_state(svc.clone());
        }
        Ok((sup, tx))
    }

    /// Starts every worker, then accepts on the listeners bound for each service. A
    /// worker that cannot be started at all (command not found) fails the whole start,
    /// since it would fail the same way on every restart.
    pub fn start(&mut self, mut bound: BoundListeners) -> anyhow::Result<()> {
        for si in 0..self.services.len() {
            for slot in 0..self.services[si].slots.len() {
                self.start_slot(si, slot)?;
            }
        }
        self.publish();
        self.start_feeds();
        for svc in &mut self.services {
            for (addr, listener) in bound.remove(&svc.config.name).unwrap_or_default() {
                svc.listeners.serve(&self.proxy, addr, listener);
                info!(service = %svc.config.name, %addr, "listening");
            }
        }
        Ok(())
    }

    /// Runs until lb has stopped: listeners closed, connections done, workers reaped.
    pub async fn run(mut self) {
        while !self.finished() {
            tokio::select! {
                Some(event) = self.events.recv() => {
                    // Only a "ready" among worker messages changes anything.
                    let read_only = match &event {
                        Event::Status { .. } => true,
                        Event::Message { value, .. } => *value != "ready",
                        _ => false,
                    };
                    self.handle(event);
                    // One place publishes, after every change: no handler can forget to,
                    // and nothing between two publishes is ever visible to the proxy.
                    if !read_only {
                        self.publish();
                    }
                }
                Some(id) = self.down.recv() => {
                    self.backend_down(id);
                    self.publish();
                }
                else => break,
            }
        }
        info!("stopped");
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Exited { pid, status } => self.exited(pid, status),
            Event::Probe { id, ok } => self.probed(id, ok),
            Event::RestartDue {
                service,
                slot,
                slot_id,
            } => self.restart_due(&service, slot, slot_id),
            Event::Reload { reply } => {
                let result = self.reload();
                command::answer(reply, result);
            }
            Event::Restart { service, reply } => self.restart(service, reply.into_iter().collect()),
            Event::Message {
                id,
                value,
                in_flight,
            } => {
                self.message(id, value);
                drop(in_flight);
            }
            Event::Broadcast {
                service,
                message,
                reply,
            } => self.broadcast(service, &message, reply),
            Event::FeedTick { service, chain } => self.feed_tick(&service, chain),
            Event::FeedOutput {
                service,
                values,
                error,
            } => self.feed_output(&service, values, error),
            Event::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Event::Stop { fast } => self.stop(fast),
            Event::Drained { timed_out } => self.drained(timed_out),
            Event::StopDeadline => self.kill_all(),
            Event::KillGraceOver => self.phase = Phase::Abandoned,
            Event::RetireDrained { id, timed_out } => self.retire_drained(id, timed_out),
            Event::RetireDeadline { id } => self.retire_deadline(id),
            Event::GroupCheck => self.check_groups(),
        }
    }

    fn service_index(&self, name: &str) -> Option<usize> {
        self.services.iter().position(|s| s.config.name == name)
    }

    fn place_of_pid(&self, pid: Pid) -> Option<Place> {
        self.find(|w| w.pid == pid, |_| false)
    }

    fn place_of_backend(&self, id: BackendId) -> Option<Place> {
        self.find(|w| w.backend.id == id, |b| b.id == id)
    }

    fn find(
        &self,
        worker: impl Fn(&service::Worker) -> bool,
        backend: impl Fn(&crate::snapshot::Backend) -> bool,
    ) -> Option<Place> {
        for (si, svc) in self.services.iter().enumerate() {
            for (slot, s) in svc.slots.iter().enumerate() {
                if s.worker.as_ref().is_some_and(&worker) {
                    return Some(Place::Current { si, slot });
                }
                if s.replacement.as_ref().is_some_and(&worker) {
                    return Some(Place::Replacement { si, slot });
                }
            }
            if let Some(index) = svc.statics.iter().position(|s| backend(&s.backend)) {
                return Some(Place::Static { si, index });
            }
        }
        self.retiring
            .iter()
            .position(|r| worker(&r.worker))
            .map(Place::Retiring)
    }

    /// Every worker process alive: current, replacements and retiring.
    fn processes(&self) -> impl Iterator<Item = &service::Worker> {
        let current = self.services.iter().flat_map(ServiceState::processes);
        current.chain(self.retiring.iter().map(|r| &r.worker))
    }

    /// Sends `event` to ourselves after `delay`.
    fn after(&self, delay: Duration, event: Event) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(event);
        });
    }

    fn new_id(&mut self) -> BackendId {
        self.next_id += 1;
        self.next_id
    }

    /// Builds the snapshot of every service's ready backends and swaps it in, and
    /// updates the gauges that follow worker states.
    fn publish(&mut self) {
        let mut snapshot = Snapshot::default();
        for svc in &self.services {
            let pool = Arc::new(svc.pool());
            for addr in &svc.config.listen {
                snapshot.listeners.insert(*addr, Arc::clone(&pool));
            }
            snapshot.pools.insert(svc.config.name.clone(), pool);
        }
        self.snapshots.publish(snapshot);
        self.export_gauges();
    }
}
