//! A worker's own life: started in its slot, probed until ready, taken out of rotation
//! when a connect fails, and restarted with backoff when it exits unasked.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::service::{ServiceState, Slot, StaticBackend, Worker, worker_backend};
use super::stop::Phase;
use super::{Event, ExitStatus, Place, Supervisor, WorkerState, probe, worker};
use crate::channel::{self, Channel};
use crate::config::{BackendSpec, ReadyCheck, ServiceConfig, WorkersConfig};
use crate::snapshot::BackendId;

/// How often a starting worker's port is tried.
const READY_PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// How often a backend that refused a connection is tried again.
const RECHECK_INTERVAL: Duration = Duration::from_millis(250);
/// How often a static backend that refused a connection is tried again.
const STATIC_PROBE_INTERVAL: Duration = Duration::from_secs(1);

impl Supervisor {
    /// Adds a service with its static backends and empty slots; no worker runs yet.
    pub(super) fn add_service_state(&mut self, config: ServiceConfig) -> usize {
        let mut svc = ServiceState::new(config, &self.metrics);
        for spec in svc.config.backends.clone() {
            let backend = self.static_backend(&svc.config.name, &spec);
            svc.statics.push(backend);
        }
        self.services.push(svc);
        let si = self.services.len() - 1;
        self.add_slots(si);
        si
    }

    pub(super) fn static_backend(&mut self, service: &str, spec: &BackendSpec) -> StaticBackend {
        let id = self.new_id();
        let metrics = self.metrics.backend(service, &spec.label);
        StaticBackend::new(spec, id, self.proxy.connections.child_token(), metrics)
    }

    /// Adds empty slots up to the configured count (the caller fills them).
    pub(super) fn add_slots(&mut self, si: usize) {
        let Some(cfg) = self.services[si].config.workers.clone() else {
            return;
        };
        let cfg = Arc::new(cfg);
        while self.services[si].slots.len() < cfg.count.get() {
            let id = self.new_id();
            let svc = &mut self.services[si];
            self.metrics
                .slot(&svc.config.name, &svc.slots.len().to_string());
            svc.slots.push(Slot::new(id, Arc::clone(&cfg)));
        }
    }

    /// Starts the worker of an empty slot with the slot's settings; an error names the
    /// worker.
    pub(super) fn start_slot(&mut self, si: usize, slot: usize) -> anyhow::Result<()> {
        let name = self.services[si].config.name.clone();
        let cfg = Arc::clone(&self.services[si].slots[slot].config);
        let worker = self
            .spawn_worker(si, slot, cfg)
            .with_context(|| format!("starting worker {name}/{slot}"))?;
        self.services[si].slots[slot].worker = Some(worker);
        Ok(())
    }

    /// Starts the worker of an empty slot, or schedules another try with backoff.
    pub(super) fn start_or_backoff(&mut self, si: usize, slot: usize) {
        if let Err(err) = self.start_slot(si, slot) {
            let service = self.services[si].config.name.clone();
            let delay = self.restart_later(si, slot, Duration::ZERO);
            warn!(%service, worker = slot, err = format!("{err:#}"), restart_in = ?delay, "worker could not be started");
        }
    }

    /// Marks the slot as backing off and sets the timer that restarts it; `uptime` is
    /// how long its last worker ran (a healthy run resets the backoff). Returns the delay.
    pub(super) fn restart_later(&mut self, si: usize, slot: usize, uptime: Duration) -> Duration {
        let service = self.services[si].config.name.clone();
        let s = &mut self.services[si].slots[slot];
        let delay = s.backoff.after_exit(uptime);
        s.idle_state = WorkerState::Backoff;
        let slot_id = s.id;
        self.after(
            delay,
            Event::RestartDue {
                service,
                slot,
                slot_id,
            },
        );
        delay
    }

    /// Spawns a worker process for a slot with `cfg`, opens its message channel (with
    /// the service's last fed value waiting in it), and starts waiting for readiness.
    pub(super) fn spawn_worker(
        &mut self,
        si: usize,
        slot: usize,
        cfg: Arc<WorkersConfig>,
    ) -> std::io::Result<Worker> {
        let in_use = self.processes().map(|w| w.backend.addr.port()).collect();
        let port = worker::free_port(&in_use)?;
        let id = self.new_id();
        let close = self.proxy.connections.child_token();
        let name = &self.services[si].config.name;
        let addr = std::net::SocketAddr::from((worker::WORKER_HOST, port));
        let backend = worker_backend(id, name, slot, addr, close, &self.metrics);
        let (lb_end, worker_end) = channel::pair()?;
        // The channel first: once the process runs, nothing may fail before it is tracked.
        let tx = self.tx.clone();
        let channel = Channel::start(lb_end, move |value, in_flight| {
            let _ = tx.send(Event::Message {
                id,
                value,
                in_flight,
            });
        })?;
        let pid = worker::spawn(
            worker::Identity {
                service: name,
                slot,
                port,
            },
            &cfg,
            &backend.label,
            &worker_end,
        )?;
        drop(worker_end);
        self.watchdog.started(pid);
        info!(service = %name, worker = slot, %pid, port, "worker started");
        if let Some(last) = &self.services[si].feed.last {
            channel.send(last);
        }
        let probe = CancellationToken::new();
        match cfg.ready {
            ReadyCheck::Tcp => {
                let deadline = Instant::now() + cfg.ready_timeout;
                probe::until_up(
                    id,
                    addr,
                    READY_PROBE_INTERVAL,
                    Some(deadline),
                    probe.clone(),
                    self.tx.clone(),
                );
            }
            // It says "ready" on its channel; if it has not by the deadline, it failed.
            ReadyCheck::Message => self.after(cfg.ready_timeout, Event::Probe { id, ok: false }),
        }
        Ok(Worker {
            backend: Arc::new(backend),
            pid,
            state: WorkerState::Starting,
            started: Instant::now(),
            probe,
            config: cfg,
            channel,
            dropped: 0,
            last_drop: None,
            ready_once: false,
        })
    }

    pub(super) fn exited(&mut self, pid: Pid, status: ExitStatus) {
        match self.place_of_pid(pid) {
            Some(Place::Current { si, slot }) => self.current_exited(si, slot, status),
            Some(Place::Replacement { si, slot }) => self.replacement_exited(si, slot, status),
            Some(Place::Retiring(i)) => self.retired(i, status),
            Some(Place::Static { .. }) | None => {
                if !self.feed_exited(pid, status) {
                    debug!(%pid, %status, "reaped a process that was not a worker");
                }
            }
        }
    }

    /// The worker in rotation exited: out of the snapshot at once, then restarted with
    /// backoff, unless lb is stopping or a replacement is about to take the slot.
    fn current_exited(&mut self, si: usize, slot: usize, status: ExitStatus) {
        let worker = self.services[si].slots[slot]
            .worker
            .take()
            .expect("place_of_pid found a worker");
        self.reaped(&worker, self.phase == Phase::StoppingWorkers, false);
        let name = self.services[si].config.name.clone();
        let (pid, uptime) = (worker.pid, worker.started.elapsed());
        if self.phase != Phase::Running {
            self.services[si].slots[slot].idle_state = WorkerState::Stopped;
            info!(service = %name, worker = slot, %pid, %status, "worker stopped");
        } else if self.services[si].slots[slot].replacement.is_some() {
            self.count_crash(si, slot);
            // Its replacement, already starting, takes the slot when ready.
            self.services[si].slots[slot].idle_state = WorkerState::Backoff;
            warn!(service = %name, worker = slot, %pid, %status, "worker exited while being replaced");
        } else {
            self.count_crash(si, slot);
            let delay = self.restart_later(si, slot, uptime);
            warn!(service = %name, worker = slot, %pid, %status, uptime = ?uptime, restart_in = ?delay, "worker exited");
        }
    }

    fn count_crash(&mut self, si: usize, slot: usize) {
        let svc = &mut self.services[si];
        svc.slots[slot].restarts += 1;
        let labels = [svc.config.name.as_str(), &slot.to_string(), "crash"];
        self.metrics
            .worker_restarts_total
            .with_label_values(&labels)
            .inc();
    }

    pub(super) fn restart_due(&mut self, service: &str, slot: usize, slot_id: u64) {
        let Some(si) = self.service_index(service) else {
            return;
        };
        let Some(s) = self.services[si]
            .slots
            .get(slot)
            .filter(|s| s.id == slot_id)
        else {
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
                if worker.ready_once {
                    // A deadline for its first readiness, which it met long ago.
                    return;
                }
                let timeout = worker.config.ready_timeout;
                warn!(service = %svc.config.name, worker = slot, pid = %worker.pid, ?timeout, "worker not ready within ready_timeout; killing it");
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
        if worker.state == WorkerState::Ready {
            return;
        }
        worker.state = WorkerState::Ready;
        worker.ready_once = true;
        worker.backend.stats.mark_up();
        info!(service = %svc.config.name, worker = slot, pid = %worker.pid, after = ?worker.started.elapsed(), "worker ready");
    }

    /// A connect to this backend failed: out of rotation until a probe reaches it. A
    /// worker that was serving is not killed for it: an overloaded worker drops connects
    /// too, and killing it would lose every connection it holds.
    pub(super) fn backend_down(&mut self, id: BackendId) {
        match self.place_of_backend(id) {
            Some(Place::Current { si, slot }) => {
                let svc = &mut self.services[si];
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
                let (addr, probe) = (worker.backend.addr, worker.probe.clone());
                probe::until_up(id, addr, RECHECK_INTERVAL, None, probe, self.tx.clone());
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
            }
            Some(Place::Replacement { .. } | Place::Retiring(_)) | None => {}
        }
    }
}
