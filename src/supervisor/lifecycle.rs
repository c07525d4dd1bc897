//! A worker's own life: started in its slot, probed until ready, taken out of rotation
//! when a connect fails, and restarted with backoff when it exits unasked.

use anyhow::Context as _;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::service::{ServiceState, StaticBackend, Worker, worker_backend};
use super::stop::Phase;
use super::{Event, ExitStatus, Place, Supervisor, WorkerState, probe, worker};
use crate::config::{BackendSpec, ServiceConfig};
use crate::snapshot::BackendId;

/// How often a starting worker's port is tried.
const READY_PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);
/// How often a static backend that refused a connection is tried again.
const STATIC_PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

impl Supervisor {
    /// The state for a new service, its static backends included; no worker runs yet.
    pub(super) fn new_service(&mut self, config: ServiceConfig) -> ServiceState {
        let mut svc = ServiceState::new(config, &self.metrics);
        for spec in svc.config.backends.clone() {
            let backend = self.static_backend(&svc.config.name, &spec);
            svc.statics.push(backend);
        }
        svc
    }

    pub(super) fn static_backend(&mut self, service: &str, spec: &BackendSpec) -> StaticBackend {
        let id = self.new_id();
        let metrics = self.metrics.backend(service, &spec.label);
        StaticBackend::new(spec, id, self.proxy.connections.child_token(), metrics)
    }

    /// Starts the worker of an empty slot; an error names the worker.
    pub(super) fn start_slot(&mut self, si: usize, slot: usize) -> anyhow::Result<()> {
        let name = self.services[si].config.name.clone();
        let worker = self
            .spawn_worker(si, slot)
            .with_context(|| format!("starting worker {name}/{slot}"))?;
        self.services[si].slots[slot].worker = Some(worker);
        Ok(())
    }

    /// Starts the worker of an empty slot, or schedules another try with backoff.
    pub(super) fn start_or_backoff(&mut self, si: usize, slot: usize) {
        if let Err(err) = self.start_slot(si, slot) {
            let s = &mut self.services[si].slots[slot];
            let delay = s.backoff.after_exit(std::time::Duration::ZERO);
            s.idle_state = WorkerState::Backoff;
            let service = self.services[si].config.name.clone();
            warn!(%service, worker = slot, err = format!("{err:#}"), restart_in = ?delay, "worker could not be started");
            self.after(delay, Event::RestartDue { service, slot });
        }
    }

    /// Spawns a worker process for a slot with the service's current settings, and
    /// starts probing its port.
    pub(super) fn spawn_worker(&mut self, si: usize, slot: usize) -> std::io::Result<Worker> {
        let in_use = self.processes().map(|w| w.backend.addr.port()).collect();
        let port = worker::free_port(&in_use)?;
        let id = self.new_id();
        let close = self.proxy.connections.child_token();
        let svc = &self.services[si];
        let cfg = svc
            .config
            .workers
            .as_ref()
            .expect("slots exist only with workers");
        let addr = std::net::SocketAddr::from((worker::WORKER_HOST, port));
        let backend = worker_backend(id, &svc.config.name, slot, addr, close, &self.metrics);
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
        Ok(Worker {
            backend: std::sync::Arc::new(backend),
            pid,
            state: WorkerState::Starting,
            started: Instant::now(),
            probe,
        })
    }

    /// Cleans up after a worker process that the reaper reported gone.
    pub(super) fn reaped(&mut self, worker: &Worker) {
        worker.probe.cancel();
        // The worker's own children die with it.
        worker::signal_group(worker.pid, Signal::SIGKILL);
        self.watchdog.reaped(worker.pid);
    }

    pub(super) fn exited(&mut self, pid: Pid, status: ExitStatus) {
        match self.place_of_pid(pid) {
            Some(Place::Current { si, slot }) => self.current_exited(si, slot, status),
            Some(Place::Replacement { si, slot }) => self.replacement_exited(si, slot, status),
            Some(Place::Retiring(i)) => self.retired(i, status),
            Some(Place::Static { .. }) | None => {
                debug!(%pid, %status, "reaped a process that was not a worker");
            }
        }
    }

    fn current_exited(&mut self, si: usize, slot: usize, status: ExitStatus) {
        let worker = self.services[si].slots[slot]
            .worker
            .take()
            .expect("place_of_pid found a worker");
        self.reaped(&worker);
        let name = self.services[si].config.name.clone();
        let (pid, uptime) = (worker.pid, worker.started.elapsed());
        let s = &mut self.services[si].slots[slot];
        if self.phase != Phase::Running {
            s.idle_state = WorkerState::Stopped;
            info!(service = %name, worker = slot, %pid, %status, "worker stopped");
        } else if s.replacement.is_some() {
            // Its replacement, already starting, takes the slot when ready.
            warn!(service = %name, worker = slot, %pid, %status, "worker exited while being replaced");
        } else {
            let delay = s.backoff.after_exit(uptime);
            s.restarts += 1;
            s.idle_state = WorkerState::Backoff;
            self.metrics
                .worker_restarts_total
                .with_label_values(&[&name, &slot.to_string(), "crash"])
                .inc();
            warn!(service = %name, worker = slot, %pid, %status, uptime = ?uptime, restart_in = ?delay, "worker exited");
            self.after(
                delay,
                Event::RestartDue {
                    service: name,
                    slot,
                },
            );
        }
        if worker.state == WorkerState::Ready {
            self.publish();
        }
    }

    pub(super) fn restart_due(&mut self, service: &str, slot: usize) {
        let Some(si) = self.service_index(service) else {
            return;
        };
        let Some(s) = self.services[si].slots.get(slot) else {
            return;
        };
        if self.phase != Phase::Running || s.worker.is_some() || s.replacement.is_some() {
            return;
        }
        self.start_or_backoff(si, slot);
    }

    pub(super) fn probed(&mut self, id: BackendId, ok: bool) {
        match self.place_of_backend(id) {
            Some(Place::Current { si, slot }) if ok => self.worker_ready(si, slot),
            Some(Place::Current { si, slot }) => {
                let svc = &self.services[si];
                let worker = svc.slots[slot]
                    .worker
                    .as_ref()
                    .expect("place_of_backend found a worker");
                let timeout = svc.config.workers.as_ref().map(|w| w.ready_timeout);
                warn!(service = %svc.config.name, worker = slot, pid = %worker.pid, ?timeout, "worker not accepting connections within ready_timeout; killing it");
                worker::signal_group(worker.pid, Signal::SIGKILL);
            }
            Some(Place::Replacement { si, slot }) if ok => self.replacement_ready(si, slot),
            Some(Place::Replacement { si, slot }) => {
                let name = &self.services[si].config.name;
                let reason =
                    format!("replacement for {name}/{slot} not ready within ready_timeout");
                self.replacement_failed(si, slot, reason);
            }
            Some(Place::Static { si, index }) => {
                let svc = &mut self.services[si];
                let backend = &mut svc.statics[index];
                backend.up = true;
                backend.backend.stats.mark_up();
                info!(service = %svc.config.name, backend = %backend.backend.label, "backend accepts connections again");
                self.publish();
            }
            Some(Place::Retiring(_)) | None => {}
        }
    }

    fn worker_ready(&mut self, si: usize, slot: usize) {
        let svc = &mut self.services[si];
        let worker = svc.slots[slot]
            .worker
            .as_mut()
            .expect("place_of_backend found a worker");
        worker.state = WorkerState::Ready;
        worker.backend.stats.mark_up();
        info!(service = %svc.config.name, worker = slot, pid = %worker.pid, after = ?worker.started.elapsed(), "worker ready");
        self.publish();
    }

    /// A connect to this backend failed: out of rotation until a probe reaches it.
    pub(super) fn backend_down(&mut self, id: BackendId) {
        match self.place_of_backend(id) {
            Some(Place::Current { si, slot }) => {
                let svc = &mut self.services[si];
                let cfg = svc
                    .config
                    .workers
                    .as_ref()
                    .expect("slots exist only with workers");
                let worker = svc.slots[slot]
                    .worker
                    .as_mut()
                    .expect("place_of_backend found a worker");
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
            }
            Some(Place::Static { si, index }) => {
                let svc = &mut self.services[si];
                let backend = &mut svc.statics[index];
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
            }
            Some(Place::Replacement { .. } | Place::Retiring(_)) | None => {}
        }
    }
}
