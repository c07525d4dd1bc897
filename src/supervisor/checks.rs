//! Health checks as the supervisor applies them: each result is counted per backend
//! ([`Health`]); a static backend leaves and rejoins rotation with its checks, a worker
//! likewise once ready, and a worker its checks keep out of rotation longer than its
//! `ready_timeout` is replaced, drain first (a hung process still completes TCP
//! handshakes in the kernel; only an HTTP check finds it).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Supervisor;
use super::health::{self, Health};
use super::life::{Input, Life, WorkerId};
use crate::snapshot::BackendId;

impl Supervisor {
    /// Starts checking a worker that has just become ready, if its service checks.
    pub(super) fn check_worker(&mut self, id: WorkerId) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        let Some(si) = self.service_index(&w.service) else {
            return;
        };
        let svc = &self.services[si].config;
        if let Some(check) = &svc.health_check {
            health::start(
                id,
                w.backend.addr,
                check.clone(),
                svc.proxy_protocol,
                w.probe.clone(),
                self.tx.clone(),
            );
        }
    }

    /// Starts checking a static backend, if its service checks.
    pub(super) fn check_static(&self, si: usize, index: usize) {
        let svc = &self.services[si];
        if let Some(check) = &svc.config.health_check {
            let s = &svc.statics[index];
            health::start(
                s.backend.id,
                s.backend.addr,
                check.clone(),
                svc.config.proxy_protocol,
                s.probe.clone(),
                self.tx.clone(),
            );
        }
    }

    /// Starts the checks of a service's static backends and ready workers again, with
    /// its new settings; every backend starts up, as a new one does.
    pub(super) fn restart_checks(&mut self, si: usize) {
        let svc = &mut self.services[si];
        for s in &mut svc.statics {
            s.probe.cancel();
            s.probe = CancellationToken::new();
            s.health = Health::default();
            s.up = true;
            s.backend.stats.mark_up();
        }
        for index in 0..self.services[si].statics.len() {
            self.check_static(si, index);
        }
        let svc = &self.services[si];
        let name = Arc::<str>::from(svc.config.name.as_str());
        let checked: Vec<WorkerId> = self
            .workers
            .values_mut()
            .filter(|w| w.service == name && matches!(w.life, Life::Ready | Life::Refused { .. }))
            .map(|w| {
                w.probe.cancel();
                w.probe = CancellationToken::new();
                w.health = Health::default();
                w.id
            })
            .collect();
        for id in checked {
            // A worker out of rotation comes back through its checks, or its probe.
            self.drive(id, Input::Ready);
            self.check_worker(id);
        }
    }

    /// One check of a backend finished.
    pub(super) fn health_checked(&mut self, id: BackendId, ok: bool) {
        if let Some((si, index)) = self.static_place(id) {
            let svc = &mut self.services[si];
            let Some(check) = &svc.config.health_check else {
                return;
            };
            let s = &mut svc.statics[index];
            match s.health.record(ok, check) {
                Some(false) => {
                    warn!(service = %svc.config.name, backend = %s.backend.label, fall = check.fall, "backend failed its health checks; out of rotation");
                    s.up = false;
                }
                Some(true) => {
                    info!(service = %svc.config.name, backend = %s.backend.label, rise = check.rise, "backend passes its health checks again; in rotation");
                    s.up = true;
                    s.backend.stats.mark_up();
                }
                None => {}
            }
            return;
        }
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let Some(si) = self
            .services
            .iter()
            .position(|s| *s.config.name == *w.service)
        else {
            return;
        };
        let Some(check) = &self.services[si].config.health_check else {
            return;
        };
        if w.leaving() {
            return;
        }
        let (service, slot, pid) = (Arc::clone(&w.service), w.slot, w.pid);
        match w.health.record(ok, check) {
            Some(false) => {
                warn!(%service, worker = slot, pid = pid.as_raw(), fall = check.fall, "worker failed its health checks; out of rotation");
                self.drive(id, Input::Unhealthy);
            }
            Some(true) => {
                info!(%service, worker = slot, pid = pid.as_raw(), rise = check.rise, "worker passes its health checks again; in rotation");
                self.drive(id, Input::Ready);
            }
            None => {}
        }
        self.replace_if_kept_out(id);
    }

    /// Replaces a worker its checks have kept out of rotation for longer than its
    /// `ready_timeout`: it drains and stops, and a new one starts in its slot.
    fn replace_if_kept_out(&mut self, id: WorkerId) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        let Life::Refused { since } = w.life else {
            return;
        };
        let out_for = since.elapsed();
        // A worker that no longer fills its slot (a rollout replaced it) is leaving anyway.
        if out_for <= w.config.ready_timeout
            || !self.phase.keeps_workers()
            || self.slot_of(id).is_none()
        {
            return;
        }
        let (service, pid, slot) = (Arc::clone(&w.service), w.pid, w.slot);
        warn!(%service, worker = slot, pid = pid.as_raw(), ?out_for, "worker kept out of rotation by its health checks longer than ready_timeout; replacing it");
        self.replace(id, "health");
    }
}
