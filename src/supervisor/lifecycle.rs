//! A worker's own life as the supervisor sees it: started in its slot, probed until
//! ready, taken out of rotation when a connect fails, and restarted with backoff when
//! it exits unasked.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use nix::unistd::Pid;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::backoff::HEALTHY_UPTIME;
use super::health::Health;
use super::life::{Input, Life, Worker, WorkerId};
use super::rolling::View;
use super::service::{ServiceState, Slot, StaticBackend, worker_backend};
use super::usage::Usage;
use super::{Event, ExitStatus, Supervisor, WorkerState, probe, worker};
use crate::channel::{self, Channel};
use crate::config::{BackendSpec, BackendTarget, ReadyCheck, ServiceConfig, WorkersConfig};
use crate::snapshot::{BackendId, ConnectFailure};

/// How often a starting worker's port is tried.
const READY_PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// How often a static backend that refused a connection is tried again.
const STATIC_PROBE_INTERVAL: Duration = Duration::from_secs(1);

impl Supervisor {
    /// Adds a service with its static backends and empty slots, and starts looking up
    /// the host names among its backends; no worker runs yet.
    pub(super) fn add_service_state(&mut self, config: ServiceConfig) -> usize {
        let mut svc = ServiceState::new(config, &self.metrics);
        for spec in svc.config.backends.clone() {
            if let BackendTarget::Addr(addr) = spec.target {
                let backend = self.static_backend(&svc.config.name, &spec, addr, &spec.label);
                svc.statics.push(backend);
            }
        }
        self.services.push(svc);
        let si = self.services.len() - 1;
        for index in 0..self.services[si].statics.len() {
            self.check_static(si, index);
        }
        self.start_resolving(si);
        self.add_slots(si);
        si
    }

    /// A static backend at `addr` for the entry `spec`, labelled `label`.
    pub(super) fn static_backend(
        &mut self,
        service: &str,
        spec: &BackendSpec,
        addr: SocketAddr,
        label: &str,
    ) -> StaticBackend {
        let id = self.new_id();
        let metrics = self.metrics.backend(service, label);
        StaticBackend::new(
            spec,
            addr,
            label,
            id,
            self.proxy.connections.child_token(),
            metrics,
        )
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
        let id = self
            .spawn_worker(si, slot, cfg)
            .with_context(|| format!("starting worker {name}/{slot}"))?;
        self.services[si].slots[slot].worker = Some(id);
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
    /// the service's last fed value waiting in it), starts waiting for readiness, and
    /// records it. The slot is the caller's to fill.
    pub(super) fn spawn_worker(
        &mut self,
        si: usize,
        slot: usize,
        cfg: Arc<WorkersConfig>,
    ) -> std::io::Result<WorkerId> {
        let in_use = self
            .workers
            .values()
            .map(|w| w.backend.addr.port())
            .collect();
        let port = worker::free_port(&in_use)?;
        let id = self.new_id();
        let close = self.proxy.connections.child_token();
        let name: Arc<str> = self.services[si].config.name.as_str().into();
        let addr = SocketAddr::from((worker::WORKER_HOST, port));
        let backend = worker_backend(id, &name, slot, addr, close, &self.metrics);
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
                service: &name,
                slot,
                port,
            },
            &cfg,
            &backend.label,
            &worker_end,
        )?;
        drop(worker_end);
        self.watchdog.started(pid);
        info!(service = %name, worker = slot, pid = pid.as_raw(), port, "worker started");
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
                    self.services[si].config.proxy_protocol,
                    probe.clone(),
                    self.tx.clone(),
                );
            }
            // It says "ready" on its channel; if it has not by the deadline, it failed.
            ReadyCheck::Message => self.after(cfg.ready_timeout, Event::Probe { id, ok: false }),
        }
        let worker = Worker {
            id,
            service: name,
            slot,
            backend: Arc::new(backend),
            pid,
            config: cfg,
            channel,
            started: Instant::now(),
            ready_at: None,
            life: Life::Starting,
            leave_reason: None,
            probe,
            health: Health::default(),
            usage: Usage::default(),
            dropped: 0,
            last_drop: None,
        };
        self.workers.insert(id, worker);
        Ok(id)
    }

    /// Replaces the worker in its slot, drain first: it leaves rotation and drains, and a
    /// new one starts (counted as a restart for `reason`): at once, or after the slot's
    /// backoff if the worker ran less than a healthy uptime, as after a crash, so a
    /// limit that every fresh worker breaks does not replace workers in a loop (each
    /// drain holding another copy). Does nothing for a worker that no longer fills a slot.
    pub(super) fn replace(&mut self, id: WorkerId, reason: &'static str) {
        let (Some((si, slot)), Some(w)) = (self.slot_of(id), self.workers.get(&id)) else {
            return;
        };
        let (service, uptime) = (Arc::clone(&w.service), w.started.elapsed());
        let s = &mut self.services[si].slots[slot];
        s.restarts += 1;
        s.worker = None;
        self.metrics
            .worker_restarts_total
            .with_label_values(&[&*service, &slot.to_string(), reason])
            .inc();
        self.retire(id, reason);
        // A rollout's replacement already starting takes the slot when ready.
        if self.rollout.starting_for(&service, slot) {
            return;
        }
        if uptime < HEALTHY_UPTIME {
            let delay = self.restart_later(si, slot, uptime);
            warn!(%service, worker = slot, %reason, ?uptime, restart_in = ?delay, "the replaced worker ran only briefly; its replacement waits the slot's backoff");
        } else {
            self.start_or_backoff(si, slot);
        }
    }

    /// The slot a worker fills now, if it is its slot's worker.
    pub(super) fn slot_of(&self, id: WorkerId) -> Option<(usize, usize)> {
        let w = self.workers.get(&id)?;
        let si = self.service_index(&w.service)?;
        let slot = self.services[si].slots.get(w.slot)?;
        (slot.worker == Some(id)).then_some((si, w.slot))
    }

    pub(super) fn exited(&mut self, pid: Pid, status: ExitStatus) {
        let Some(id) = self.workers.values().find(|w| w.pid == pid).map(|w| w.id) else {
            if !self.feed_exited(pid, status) {
                debug!(pid = pid.as_raw(), %status, "reaped a process that was not a worker");
            }
            return;
        };
        let w = &self.workers[&id];
        let (service, slot, leaving) = (Arc::clone(&w.service), w.slot, w.leaving());
        if self.rollout.replacing(id).is_some() {
            let reason =
                format!("replacement for {service}/{slot} exited ({status}) before it was ready");
            let effects = self.rollout.exited(id, reason);
            self.carry_out(effects);
        } else if let Some((si, slot)) = self.slot_of(id) {
            self.slot_lost(si, slot, id, Some(status));
        } else if leaving {
            info!(%service, worker = slot, pid = pid.as_raw(), %status, "retired worker stopped");
        }
        let group_alive = worker::group_alive(pid);
        self.drive(id, Input::Exited { group_alive });
    }

    /// The worker of a slot exited (`status`), or lb gave up waiting for it to (None):
    /// out of rotation at once, then restarted with backoff, unless lb is stopping or a
    /// replacement is about to take the slot.
    pub(super) fn slot_lost(
        &mut self,
        si: usize,
        slot: usize,
        id: WorkerId,
        status: Option<ExitStatus>,
    ) {
        let name = self.services[si].config.name.clone();
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        let (pid, uptime) = (w.pid, w.started.elapsed());
        let status = status.map_or("not reaped after SIGKILL".to_owned(), |s| s.to_string());
        self.services[si].slots[slot].worker = None;
        if !self.phase.keeps_workers() {
            self.services[si].slots[slot].idle_state = WorkerState::Stopped;
            info!(service = %name, worker = slot, pid = pid.as_raw(), %status, "worker stopped");
            return;
        }
        self.count_crash(si, slot);
        // A rollout's replacement that exits within its watch halts the rollout.
        let reason = format!(
            "{name}/{slot} exited ({status}) {uptime:?} after it was started, within rollout_watch"
        );
        let effects = self.rollout.exited(id, reason);
        self.carry_out(effects);
        if self.rollout.starting_for(&name, slot) {
            // Its replacement, already starting, takes the slot when ready.
            self.services[si].slots[slot].idle_state = WorkerState::Backoff;
            warn!(service = %name, worker = slot, pid = pid.as_raw(), %status, "worker exited while being replaced");
        } else {
            let delay = self.restart_later(si, slot, uptime);
            warn!(service = %name, worker = slot, pid = pid.as_raw(), %status, uptime = ?uptime, restart_in = ?delay, "worker exited");
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
        if !self.phase.keeps_workers()
            || s.worker.is_some()
            || self.rollout.starting_for(service, slot)
        {
            return;
        }
        self.start_or_backoff(si, slot);
    }

    pub(super) fn probed(&mut self, id: BackendId, ok: bool) {
        if let Some((si, index)) = self.static_place(id) {
            if ok {
                let svc = &mut self.services[si];
                let backend = &mut svc.statics[index];
                backend.up = true;
                backend.backend.stats.mark_up();
                info!(service = %svc.config.name, backend = %backend.backend.label, "backend accepts connections again");
            }
            return;
        }
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        let (service, slot, pid, was) = (Arc::clone(&w.service), w.slot, w.pid, w.life);
        if ok {
            self.drive(id, Input::Ready);
            if self.workers.get(&id).is_some_and(Worker::in_rotation) && was != Life::Ready {
                let after = self.workers[&id].started.elapsed();
                info!(%service, worker = slot, pid = pid.as_raw(), ?after, "worker ready");
                if was == Life::Starting {
                    self.check_worker(id);
                }
                let watch = self.workers[&id].config.rollout_watch;
                let effects = self.rollout.ready(
                    id,
                    Instant::now(),
                    watch,
                    &View::new(&self.services, &self.workers),
                );
                self.carry_out(effects);
            }
            return;
        }
        // Its deadline for a first readiness passed.
        if w.ready_at.is_some() || w.life != Life::Starting {
            return;
        }
        let timeout = w.config.ready_timeout;
        if self.rollout.replacing(id).is_some() {
            let reason = format!("replacement for {service}/{slot} not ready within ready_timeout");
            let effects = self.rollout.not_ready(id, reason);
            self.carry_out(effects);
        } else {
            warn!(%service, worker = slot, pid = pid.as_raw(), ?timeout, "worker not ready within ready_timeout; killing it");
            self.drive(id, Input::Kill);
        }
    }

    /// A connect to this backend failed: out of rotation until a probe reaches it. A
    /// worker that was serving is not killed for it: an overloaded worker drops connects
    /// too, and killing it would lose every connection it holds.
    pub(super) fn backend_down(&mut self, id: BackendId, why: ConnectFailure) {
        let connect = why.as_str();
        if let Some(w) = self.workers.get_mut(&id) {
            if w.in_rotation() {
                warn!(service = %w.service, worker = w.slot, pid = w.pid.as_raw(), connect, "a connect to the worker failed; out of rotation until it accepts again");
                w.health.down();
                self.drive(id, Input::Refused);
            }
            return;
        }
        let Some((si, index)) = self.static_place(id) else {
            return;
        };
        let svc = &mut self.services[si];
        let backend = &mut svc.statics[index];
        if !backend.up {
            return;
        }
        warn!(service = %svc.config.name, backend = %backend.backend.label, connect, "a connect to the backend failed; out of rotation until it accepts again");
        backend.up = false;
        backend.health.down();
        // With health checks, those bring it back.
        if svc.config.health_check.is_none() {
            let (addr, probe) = (backend.backend.addr, backend.probe.clone());
            probe::until_up(
                id,
                addr,
                STATIC_PROBE_INTERVAL,
                None,
                svc.config.proxy_protocol,
                probe,
                self.tx.clone(),
            );
        }
    }

    /// Where a static backend sits: service index and position.
    pub(super) fn static_place(&self, id: BackendId) -> Option<(usize, usize)> {
        self.services.iter().enumerate().find_map(|(si, svc)| {
            let index = svc.statics.iter().position(|s| s.backend.id == id)?;
            Some((si, index))
        })
    }
}
