//! The supervisor: the one task that owns worker and backend state. Every command
//! (signals, admin API), every child that exits, probe that answers, connect that fails
//! and timer that fires arrives here as an `Event`; after each event the supervisor
//! publishes a new snapshot for the proxy. Waits (backoff, drain, stop deadlines) are
//! timers that send events back, so the actor never blocks.
//!
//! Each worker process is one `life::Worker` record, addressed by its id, whose
//! transitions are plain functions from (state, input) to (state, effects); a rollout is
//! the `rollout::Rollout` state machine, built the same way. The files beside this one
//! carry out those effects, one concern each: `drive.rs` (a worker's life effects:
//! signals, drains, deadlines), `lifecycle.rs` (spawning, readiness, exits, restarts),
//! `checks.rs` (health checks), `names.rs` (backends found by DNS, looked up by
//! `resolve.rs`), `rolling.rs` (a rollout's effects and restarts),
//! `reload.rs` (applying a changed config), `stop.rs` (lb's own graceful stop) and
//! `orphans.rs` (processes a worker left outside its group).

mod backoff;
mod checks;
mod command;
mod drive;
mod feed;
mod health;
mod life;
mod lifecycle;
mod messages;
mod names;
mod orphans;
mod probe;
mod procfs;
mod reap;
mod reload;
mod report;
mod resolve;
mod rolling;
mod rollout;
mod service;
mod state;
mod stop;
mod sys;
mod usage;
mod watchdog;
mod worker;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nix::unistd::Pid;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::info;

pub use command::{Command, CommandError, Inbox, Loaded, Reply};
pub use reap::ExitStatus;
pub use rollout::Scope;
pub use state::WorkerState;
pub use watchdog::serve as serve_watchdog;

use crate::config::{Config, Source};
use crate::metrics::Metrics;
use crate::proxy::{Listening, Proxy};
use crate::snapshot::{BackendId, ConnectFailure, Snapshot, Snapshots};
use crate::systemd::Notifier;
use life::{Worker, WorkerId};
use rollout::Rollout;
use service::ServiceState;
use stop::Phase;
use watchdog::Watchdog;

/// Everything the supervisor reacts to; commands come from outside, the rest from its
/// own tasks and timers.
#[derive(Debug)]
enum Event {
    Command(Command),
    /// A child process ended (reported by the reaper).
    Exited {
        pid: Pid,
        status: ExitStatus,
    },
    /// A probe of a backend finished: it accepts connections, or its deadline passed.
    Probe {
        id: BackendId,
        ok: bool,
    },
    /// A health check of a backend finished.
    Health {
        id: BackendId,
        ok: bool,
    },
    /// A lookup of a host name in a service's backends ended (`generation` tells
    /// lookups started before a reload apart).
    Resolved {
        service: String,
        generation: u64,
        label: String,
        answer: resolve::Answer,
    },
    /// A crashed worker's backoff delay has passed.
    RestartDue {
        service: String,
        slot: usize,
        slot_id: u64,
    },
    /// A worker sent a message on its channel; `in_flight` lets it send more once dropped.
    Message {
        id: WorkerId,
        value: serde_json::Value,
        in_flight: crate::channel::InFlight,
    },
    /// Time to run a service's feed command (`chain` tells stale timers apart).
    FeedTick {
        service: String,
        chain: u64,
    },
    /// A feed run ended and printed these values.
    FeedOutput {
        service: String,
        values: Vec<serde_json::Value>,
        error: Option<String>,
    },
    /// A draining worker has no connection left, or its drain deadline passed.
    Drained {
        id: WorkerId,
    },
    /// A worker's deadline set for `at` passed.
    Deadline {
        id: WorkerId,
        at: Instant,
    },
    /// Time to see which lingering process groups are gone.
    GroupCheck,
    /// A rollout's replacement has stayed up for its `rollout_watch`.
    WatchOver {
        id: WorkerId,
    },
    /// lb is stopping: `shutdown_delay` has passed.
    DelayOver,
    /// lb is stopping: a service's listeners have accepted what the kernel had queued,
    /// and closed.
    ListenersClosed {
        service: String,
    },
    /// lb is stopping: the longest drain time has passed.
    DrainDeadline,
    /// lb is stopping: every proxied connection has ended.
    ConnectionsDone,
    /// Time to tell systemd's watchdog that the supervisor still handles events.
    WatchdogTick,
    /// Time to sample the workers' memory and CPU.
    SampleTick,
    /// The workers' memory and CPU, read at `at`.
    Sampled {
        samples: Vec<(WorkerId, usage::Sample)>,
        at: Instant,
    },
}

/// Listeners bound before the supervisor starts, by service name.
pub type BoundListeners = HashMap<String, Vec<(SocketAddr, Listening)>>;

pub struct Supervisor {
    /// Where the config is read again on reload.
    source: Arc<Source>,
    /// The admin address lb started with (it does not move on reload).
    admin: Option<SocketAddr>,
    /// The admin token's file lb started with (read on every POST; another file applies
    /// only when lb restarts).
    admin_token_file: Option<std::path::PathBuf>,
    /// How long lb keeps accepting after SIGTERM, as the config said at start or at the
    /// last reload.
    shutdown_delay: Duration,
    /// The DNS servers for host names in backends (`resolvers`); empty: the system's.
    resolvers: Arc<[SocketAddr]>,
    services: Vec<ServiceState>,
    /// Every worker process lb runs: in its slot, starting as a replacement, or leaving.
    workers: BTreeMap<WorkerId, Worker>,
    rollout: Rollout,
    snapshots: Arc<Snapshots>,
    proxy: Proxy,
    tx: mpsc::UnboundedSender<Event>,
    inbox: Inbox,
    events: mpsc::UnboundedReceiver<Event>,
    /// Backends a connection failed to reach, reported by the proxy.
    down: mpsc::UnboundedReceiver<(BackendId, ConnectFailure)>,
    next_id: u64,
    phase: Phase,
    /// A `GroupCheck` timer is set.
    checking_groups: bool,
    /// Drain messages to send once the next snapshot is published.
    drain_messages: Vec<(WorkerId, u64)>,
    watchdog: Watchdog,
    /// systemd's `Type=notify` socket, if lb runs under it.
    notifier: Notifier,
    /// `READY=1` has been sent: every service had a ready backend once.
    told_ready: bool,
    metrics: Metrics,
    feed_runs: feed::FeedRuns,
    /// The gauge series last exported, so series of removed slots and services go away.
    exported: report::Exported,
}

impl Supervisor {
    /// Creates the supervisor, starts reaping children and starts the watchdog; no
    /// worker runs yet.
    pub fn new(
        source: Source,
        config: &Config,
        snapshots: Arc<Snapshots>,
        proxy: Proxy,
        down: mpsc::UnboundedReceiver<(BackendId, ConnectFailure)>,
        metrics: Metrics,
    ) -> std::io::Result<(Self, Inbox)> {
        let (tx, events) = mpsc::unbounded_channel();
        reap::start(tx.clone())?;
        let watchdog = Watchdog::start()?;
        let source = Arc::new(source);
        let inbox = Inbox::new(tx.clone(), &source);
        let mut sup = Supervisor {
            source,
            admin: config.admin,
            admin_token_file: config.admin_token_file.clone(),
            shutdown_delay: config.shutdown_delay,
            resolvers: config.resolvers.as_slice().into(),
            services: Vec::new(),
            workers: BTreeMap::new(),
            rollout: Rollout::default(),
            snapshots,
            proxy,
            tx,
            inbox: inbox.clone(),
            events,
            down,
            next_id: 0,
            phase: Phase::Running,
            checking_groups: false,
            drain_messages: Vec::new(),
            watchdog,
            notifier: Notifier::from_env(),
            told_ready: false,
            metrics,
            feed_runs: feed::FeedRuns::default(),
            exported: report::Exported::default(),
        };
        for svc in &config.services {
            sup.add_service_state(svc.clone());
        }
        Ok((sup, inbox))
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
        for si in 0..self.services.len() {
            let listeners = bound
                .remove(&self.services[si].config.name)
                .unwrap_or_default();
            self.serve(si, listeners);
        }
        if let Some(every) = self.notifier.watchdog_every() {
            self.after(every, Event::WatchdogTick);
        }
        self.sample_usage();
        Ok(())
    }

    /// Runs until lb has stopped: listeners closed, connections done, workers reaped.
    pub async fn run(mut self) {
        while !self.finished() {
            tokio::select! {
                Some(event) = self.events.recv() => {
                    // Only a "ready" among worker messages changes anything.
                    let read_only = match &event {
                        Event::Command(Command::Status { .. }) => true,
                        Event::Message { value, .. } => *value != "ready",
                        Event::WatchdogTick | Event::SampleTick => true,
                        _ => false,
                    };
                    self.handle(event);
                    // One place publishes, after every change: no handler can forget to,
                    // and nothing between two publishes is ever visible to the proxy.
                    if !read_only {
                        self.publish();
                    }
                }
                Some((id, why)) = self.down.recv() => {
                    self.backend_down(id, why);
                    self.publish();
                }
                else => break,
            }
        }
        orphans::kill_all(self.watchdog.pid());
        info!("stopped");
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Command(command) => self.command(command),
            Event::Exited { pid, status } => self.exited(pid, status),
            Event::Probe { id, ok } => self.probed(id, ok),
            Event::Health { id, ok } => self.health_checked(id, ok),
            Event::Resolved {
                service,
                generation,
                label,
                answer,
            } => self.resolved(&service, generation, &label, answer),
            Event::RestartDue {
                service,
                slot,
                slot_id,
            } => self.restart_due(&service, slot, slot_id),
            Event::Message {
                id,
                value,
                in_flight,
            } => {
                self.message(id, value);
                drop(in_flight);
            }
            Event::FeedTick { service, chain } => self.feed_tick(&service, chain),
            Event::FeedOutput {
                service,
                values,
                error,
            } => self.feed_output(&service, values, error),
            Event::Drained { id } => self.drained(id),
            Event::Deadline { id, at } => self.deadline(id, at),
            Event::GroupCheck => self.check_groups(),
            Event::WatchOver { id } => {
                let effects = self.rollout.watch_over(
                    id,
                    Instant::now(),
                    &rolling::View::new(&self.services, &self.workers),
                );
                self.carry_out(effects);
            }
            Event::DelayOver => self.delay_over(),
            Event::ListenersClosed { service } => self.listeners_closed(&service),
            Event::DrainDeadline => self.drain_deadline(),
            Event::ConnectionsDone => self.connections_done(),
            Event::SampleTick => self.sample_usage(),
            Event::Sampled { samples, at } => self.sampled(samples, at),
            Event::WatchdogTick => {
                // Sent from the actor itself, so a supervisor that stops handling events
                // stops the pings and systemd restarts lb.
                self.notifier.watchdog();
                if let Some(every) = self.notifier.watchdog_every() {
                    self.after(every, Event::WatchdogTick);
                }
            }
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Reload { config, reply } => {
                // After STOPPING=1 systemd hears nothing more of reloads (which a stopping
                // lb refuses anyway); before the first READY=1, the next publish with
                // every service served sends it.
                let running = self.phase == Phase::Running;
                if running {
                    self.notifier.reloading();
                }
                let result = self.reload(*config);
                if running && self.told_ready {
                    self.notifier.ready();
                }
                command::answer(reply, result);
            }
            Command::Restart {
                scope,
                config,
                replies,
            } => self.restart(scope, *config, replies),
            Command::Broadcast {
                service,
                message,
                reply,
            } => self.broadcast(service, &message, reply),
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Command::Stop => self.stop(),
        }
    }

    fn service_index(&self, name: &str) -> Option<usize> {
        self.services.iter().position(|s| s.config.name == name)
    }

    /// Sends `event` to ourselves after `delay`.
    fn after(&self, delay: Duration, event: Event) {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(event);
        });
    }

    /// Sends `event` to ourselves at `at`.
    fn at(&self, at: Instant, event: Event) {
        self.after(at.saturating_duration_since(Instant::now()), event);
    }

    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Builds the snapshot of every service's ready backends and swaps it in, updates
    /// the gauges that follow worker states, then tells the workers that left rotation.
    fn publish(&mut self) {
        let mut snapshot = Snapshot {
            stopping: self.phase != Phase::Running,
            ..Snapshot::default()
        };
        for svc in &mut self.services {
            let pool = Arc::new(svc.pool(&self.workers));
            for addr in &svc.config.listen {
                snapshot.listeners.insert(*addr, Arc::clone(&pool));
            }
            snapshot.pools.insert(svc.config.name.clone(), pool);
        }
        let serving = snapshot.pools.values().all(|pool| !pool.is_empty());
        self.snapshots.publish(snapshot);
        if serving && !self.told_ready && self.phase == Phase::Running {
            self.notifier.ready();
            self.told_ready = true;
        }
        self.export_gauges();
        self.send_drain_messages();
    }
}
