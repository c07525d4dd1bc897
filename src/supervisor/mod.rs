//! The supervisor: the one task that owns worker and backend state. Everything that
//! happens to a worker (spawned, ready, exited, refused a connection) arrives here as an
//! [`Event`]; after each change the supervisor publishes a new snapshot for the proxy.
//! Waits (backoff, drain, stop deadlines) are timers that send events back, so the actor
//! never blocks while a stop or a restart is in progress.

mod backoff;
mod probe;
mod reap;
mod service;
mod state;
mod sys;
mod watchdog;
mod worker;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use reap::ExitStatus;
pub use state::WorkerState;
pub use watchdog::serve as serve_watchdog;

use crate::config::Config;
use crate::proxy::Proxy;
use crate::snapshot::{BackendId, Snapshot, Snapshots};
use service::{ServiceState, Worker};
use watchdog::Watchdog;

/// How often a starting worker's port is tried.
const READY_PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// How often a static backend that refused a connection is tried again.
const STATIC_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Drain time for a stop when no service has workers (and so no `drain_timeout`).
const DEFAULT_DRAIN: Duration = Duration::from_secs(30);
/// After SIGKILL, how long to wait for the kernel to report every worker gone.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// Everything the supervisor reacts to.
#[derive(Debug)]
pub enum Event {
    /// A child process ended (reported by the reaper).
    Exited { pid: Pid, status: ExitStatus },
    /// A probe of a backend finished: it accepts connections, or its deadline passed.
    Probe { id: BackendId, ok: bool },
    /// A crashed worker's backoff delay has passed.
    RestartDue { service: usize, slot: usize },
    /// SIGTERM/SIGINT; a second one, or `fast`, stops at once.
    Stop { fast: bool },
    /// Open connections finished, or the drain deadline passed.
    Drained { timed_out: bool },
    /// Workers had `stop_timeout` to exit after `stop_signal`.
    StopDeadline,
    /// Workers had [`KILL_GRACE`] to be reaped after SIGKILL.
    KillGraceOver,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// Listeners closed; open connections finishing.
    Draining,
    /// `stop_signal` sent to every worker.
    StoppingWorkers,
    /// SIGKILL sent to every worker.
    Killing,
    /// Some worker was never reported gone after SIGKILL; lb exits anyway.
    Abandoned,
}

/// The sending half of the supervisor's inbox, for signals and the reaper.
pub type Inbox = mpsc::UnboundedSender<Event>;

pub struct Supervisor {
    services: Vec<ServiceState>,
    snapshots: Arc<Snapshots>,
    proxy: Proxy,
    tx: Inbox,
    events: mpsc::UnboundedReceiver<Event>,
    /// Backends a connection failed to reach, reported by the proxy.
    down: mpsc::UnboundedReceiver<BackendId>,
    next_id: BackendId,
    phase: Phase,
    watchdog: Watchdog,
}

impl Supervisor {
    /// Creates the supervisor, starts reaping children and starts the watchdog; no
    /// worker runs yet.
    pub fn new(
        config: Config,
        snapshots: Arc<Snapshots>,
        proxy: Proxy,
        down: mpsc::UnboundedReceiver<BackendId>,
    ) -> std::io::Result<(Self, Inbox)> {
        let (tx, events) = mpsc::unbounded_channel();
        reap::start(tx.clone())?;
        let watchdog = Watchdog::start()?;
        let mut next_id = 0;
        let mut ids = || {
            next_id += 1;
            next_id
        };
        let services = config
            .services
            .into_iter()
            .map(|svc| ServiceState::new(svc, &mut ids))
            .collect();
        let sup = Supervisor {
            services,
            snapshots,
            proxy,
            tx: tx.clone(),
            events,
            down,
            next_id,
            phase: Phase::Running,
            watchdog,
        };
        Ok((sup, tx))
    }

    /// Starts every worker. A worker that cannot be started at all (command not found)
    /// fails the whole start, since it would fail the same way on every restart.
    pub fn start(&mut self) -> anyhow::Result<()> {
        for si in 0..self.services.len() {
            for slot in 0..self.services[si].slots.len() {
                let name = &self.services[si].config.name;
                let context = format!("starting worker {name}/{slot}");
                self.spawn_worker(si, slot).context(context)?;
            }
        }
        self.publish();
        Ok(())
    }

    /// Runs until lb has stopped: listeners closed, connections done, workers reaped.
    pub async fn run(mut self) {
        while !self.finished() {
            tokio::select! {
                Some(event) = self.events.recv() => self.handle(event),
                Some(id) = self.down.recv() => self.backend_down(id),
                else => break,
            }
        }
        info!("stopped");
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Exited { pid, status } => self.exited(pid, status),
            Event::Probe { id, ok } => self.probed(id, ok),
            Event::RestartDue { service, slot } => self.restart_due(service, slot),
            Event::Stop { fast } => self.stop(fast),
            Event::Drained { timed_out } => self.drained(timed_out),
            Event::StopDeadline => self.kill_all(),
            Event::KillGraceOver => self.phase = Phase::Abandoned,
        }
    }

    fn spawn_worker(&mut self, si: usize, slot: usize) -> std::io::Result<()> {
        let in_use: HashSet<u16> = self
            .services
            .iter()
            .flat_map(|s| s.live_workers())
            .map(|w| w.backend.addr.port())
            .collect();
        let port = worker::free_port(&in_use)?;
        let id = self.new_id();
        let svc = &mut self.services[si];
        let cfg = svc
            .config
            .workers
            .as_ref()
            .expect("slots exist only with workers");
        let addr = SocketAddr::from((worker::WORKER_HOST, port));
        let backend = service::worker_backend(id, &svc.config.name, slot, addr);
        let identity = worker::Identity {
            service: &svc.config.name,
            slot,
            port,
        };
        let pid = worker::spawn(identity, cfg, &backend.label)?;
        self.watchdog.started(pid);
        info!(service = %svc.config.name, worker = slot, %pid, port, "worker started");
        let probe = CancellationToken::new();
        let deadline = Instant::now() + cfg.ready_timeout;
        probe::until_up(
            id,
            addr,
            READY_PROBE_INTERVAL,
            Some(deadline),
            probe.clone(),
            self.tx.clone(),
        );
        svc.slots[slot].worker = Some(Worker {
            backend: Arc::new(backend),
            pid,
            state: WorkerState::Starting,
            started: Instant::now(),
            probe,
        });
        Ok(())
    }

    fn exited(&mut self, pid: Pid, status: ExitStatus) {
        let found = self
            .services
            .iter()
            .enumerate()
            .find_map(|(si, s)| s.slot_of_pid(pid).map(|slot| (si, slot)));
        let Some((si, slot)) = found else {
            debug!(%pid, %status, "reaped a process that was not a worker");
            return;
        };
        let svc = &mut self.services[si];
        let name = svc.config.name.clone();
        let worker = svc.slots[slot]
            .worker
            .take()
            .expect("slot_of_pid found a worker");
        worker.probe.cancel();
        // The worker's own children die with it.
        worker::signal_group(pid, Signal::SIGKILL);
        self.watchdog.reaped(pid);
        let uptime = worker.started.elapsed();
        if self.phase != Phase::Running {
            svc.slots[slot].idle_state = WorkerState::Stopped;
            info!(service = %name, worker = slot, %pid, %status, "worker stopped");
        } else {
            let s = &mut svc.slots[slot];
            let delay = s.backoff.after_exit(uptime);
            s.restarts += 1;
            s.idle_state = WorkerState::Backoff;
            warn!(service = %name, worker = slot, %pid, %status, uptime = ?uptime, restart_in = ?delay, "worker exited");
            self.after(delay, Event::RestartDue { service: si, slot });
        }
        if worker.state == WorkerState::Ready {
            self.publish();
        }
    }

    fn restart_due(&mut self, si: usize, slot: usize) {
        if self.phase != Phase::Running || self.services[si].slots[slot].worker.is_some() {
            return;
        }
        if let Err(err) = self.spawn_worker(si, slot) {
            let s = &mut self.services[si].slots[slot];
            let delay = s.backoff.after_exit(Duration::ZERO);
            let name = &self.services[si].config.name;
            warn!(service = %name, worker = slot, %err, restart_in = ?delay, "worker could not be started");
            self.after(delay, Event::RestartDue { service: si, slot });
        }
    }

    fn probed(&mut self, id: BackendId, ok: bool) {
        for svc in &mut self.services {
            if let Some(slot) = svc.slot_of_backend(id) {
                let name = &svc.config.name;
                let worker = svc.slots[slot]
                    .worker
                    .as_mut()
                    .expect("slot_of_backend found a worker");
                if ok {
                    worker.state = WorkerState::Ready;
                    worker.backend.stats.mark_up();
                    info!(service = %name, worker = slot, pid = %worker.pid, after = ?worker.started.elapsed(), "worker ready");
                    self.publish();
                } else {
                    let timeout = svc.config.workers.as_ref().map(|w| w.ready_timeout);
                    warn!(service = %name, worker = slot, pid = %worker.pid, ?timeout, "worker not accepting connections within ready_timeout; killing it");
                    worker::signal_group(worker.pid, Signal::SIGKILL);
                }
                return;
            }
            if let Some(i) = svc.static_of_backend(id) {
                let backend = &mut svc.statics[i];
                backend.up = true;
                backend.backend.stats.mark_up();
                info!(service = %svc.config.name, backend = %backend.backend.label, "backend accepts connections again");
                self.publish();
                return;
            }
        }
    }

    /// A connect to this backend failed: out of rotation until a probe reaches it.
    fn backend_down(&mut self, id: BackendId) {
        for svc in &mut self.services {
            if let Some(slot) = svc.slot_of_backend(id) {
                let cfg = svc
                    .config
                    .workers
                    .as_ref()
                    .expect("slots exist only with workers");
                let worker = svc.slots[slot]
                    .worker
                    .as_mut()
                    .expect("slot_of_backend found a worker");
                if worker.state != WorkerState::Ready {
                    return;
                }
                warn!(service = %svc.config.name, worker = slot, pid = %worker.pid, "worker refused a connection; out of rotation until it accepts again");
                worker.state = WorkerState::Starting;
                worker.probe.cancel();
                worker.probe = CancellationToken::new();
                let deadline = Instant::now() + cfg.ready_timeout;
                let (addr, probe) = (worker.backend.addr, worker.probe.clone());
                probe::until_up(
                    id,
                    addr,
                    READY_PROBE_INTERVAL,
                    Some(deadline),
                    probe,
                    self.tx.clone(),
                );
                self.publish();
                return;
            }
            if let Some(i) = svc.static_of_backend(id) {
                let backend = &mut svc.statics[i];
                warn!(service = %svc.config.name, backend = %backend.backend.label, "backend refused a connection; out of rotation until it accepts again");
                backend.up = false;
                let (addr, probe) = (backend.backend.addr, backend.probe.clone());
                probe::until_up(
                    id,
                    addr,
                    STATIC_PROBE_INTERVAL,
                    None,
                    probe,
                    self.tx.clone(),
                );
                self.publish();
                return;
            }
        }
    }

    /// SIGTERM: stop accepting, drain, then stop workers. Any further stop kills at once.
    fn stop(&mut self, fast: bool) {
        if fast || self.phase != Phase::Running {
            info!("stopping now: closing connections and killing workers");
            self.kill_all();
            return;
        }
        self.phase = Phase::Draining;
        self.proxy.accept.cancel();
        self.proxy.tracker.close();
        for w in self
            .services
            .iter_mut()
            .flat_map(|s| s.slots.iter_mut())
            .filter_map(|s| s.worker.as_mut())
        {
            w.state = WorkerState::Draining;
        }
        let drain = self.drain_timeout();
        info!(connections = self.proxy.tracker.len(), drain_timeout = ?drain, "stopping: listeners closed, waiting for open connections");
        let (tracker, tx) = (self.proxy.tracker.clone(), self.tx.clone());
        tokio::spawn(async move {
            let timed_out = tokio::time::timeout(drain, tracker.wait()).await.is_err();
            let _ = tx.send(Event::Drained { timed_out });
        });
    }

    fn drained(&mut self, timed_out: bool) {
        if self.phase != Phase::Draining {
            return;
        }
        if timed_out {
            warn!(
                connections = self.proxy.tracker.len(),
                "drain_timeout passed; closing the remaining connections"
            );
        } else {
            info!("all connections finished");
        }
        self.proxy.connections.cancel();
        self.phase = Phase::StoppingWorkers;
        let mut stop_timeout = Duration::ZERO;
        for svc in &self.services {
            let Some(cfg) = &svc.config.workers else {
                continue;
            };
            for w in svc.live_workers() {
                w.probe.cancel();
                worker::signal_group(w.pid, cfg.stop_signal);
            }
            stop_timeout = stop_timeout.max(cfg.stop_timeout);
        }
        info!(
            workers = self.live_count(),
            ?stop_timeout,
            "stopping workers"
        );
        self.after(stop_timeout, Event::StopDeadline);
    }

    fn kill_all(&mut self) {
        if matches!(self.phase, Phase::Killing | Phase::Abandoned) {
            return;
        }
        self.phase = Phase::Killing;
        self.proxy.accept.cancel();
        self.proxy.tracker.close();
        self.proxy.connections.cancel();
        let remaining = self.live_count();
        if remaining > 0 {
            warn!(workers = remaining, "killing workers that did not stop");
        }
        for w in self.services.iter().flat_map(ServiceState::live_workers) {
            w.probe.cancel();
            worker::signal_group(w.pid, Signal::SIGKILL);
        }
        // A worker the kernel never reports gone (stuck in an uninterruptible wait) must
        // not keep lb from exiting.
        self.after(KILL_GRACE, Event::KillGraceOver);
    }

    fn finished(&self) -> bool {
        match self.phase {
            Phase::Running | Phase::Draining => false,
            Phase::StoppingWorkers | Phase::Killing => self.live_count() == 0,
            Phase::Abandoned => true,
        }
    }

    fn live_count(&self) -> usize {
        self.services.iter().map(|s| s.live_workers().count()).sum()
    }

    fn drain_timeout(&self) -> Duration {
        let configured = self
            .services
            .iter()
            .filter_map(|s| s.config.workers.as_ref())
            .map(|w| w.drain_timeout);
        configured.max().unwrap_or(DEFAULT_DRAIN)
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

    /// Builds the snapshot of every service's ready backends and swaps it in.
    fn publish(&self) {
        let pools = self
            .services
            .iter()
            .map(|s| (s.config.name.clone(), Arc::new(s.pool())))
            .collect();
        self.snapshots.publish(Snapshot { pools });
    }
}
