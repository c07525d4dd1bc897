//! What the supervisor tells the outside: the `/status` document and the gauges that
//! follow worker states (`lb_workers`, `lb_backend_up`).

use std::collections::HashSet;

use super::service::{ServiceState, Worker};
use super::{Supervisor, WorkerState};
use crate::admin::status::{BackendStatus, ServiceStatus, Status, WorkerStatus};

/// The label sets exported last time, so series of removed slots and services are
/// deleted instead of lingering at their last value.
#[derive(Debug, Default)]
pub(super) struct Exported {
    backends: HashSet<(String, String)>,
    services: HashSet<String>,
}

impl Supervisor {
    pub(super) fn status(&self) -> Status {
        Status {
            services: self
                .services
                .iter()
                .map(|svc| self.service_status(svc))
                .collect(),
        }
    }

    fn service_status(&self, svc: &ServiceState) -> ServiceStatus {
        let mut workers = Vec::new();
        for (slot, s) in svc.slots.iter().enumerate() {
            match &s.worker {
                Some(w) => workers.push(worker_status(slot, w, s.restarts)),
                None => workers.push(WorkerStatus {
                    id: slot,
                    pid: None,
                    port: None,
                    state: s.idle_state.to_string(),
                    uptime_seconds: None,
                    restarts: s.restarts,
                    active_connections: 0,
                }),
            }
            if let Some(w) = &s.replacement {
                workers.push(worker_status(slot, w, s.restarts));
            }
        }
        let retiring = self
            .retiring
            .iter()
            .filter(|r| r.service == svc.config.name);
        workers.extend(retiring.map(|r| worker_status(r.slot, &r.worker, 0)));
        ServiceStatus {
            name: svc.config.name.clone(),
            listen: svc.config.listen.iter().map(ToString::to_string).collect(),
            balance: svc.config.balance.to_string(),
            workers,
            backends: svc
                .statics
                .iter()
                .map(|s| BackendStatus {
                    address: s.backend.label.to_string(),
                    weight: s.backend.weight,
                    state: if s.up { "ready" } else { "down" }.to_owned(),
                    active_connections: s.backend.stats.active(),
                })
                .collect(),
        }
    }

    pub(super) fn export_gauges(&mut self) {
        let mut exported = Exported::default();
        for svc in &self.services {
            let name = &svc.config.name;
            let mut counts = [0i64; WorkerState::ALL.len()];
            for (slot, s) in svc.slots.iter().enumerate() {
                counts[s.state() as usize] += 1;
                if s.replacement.is_some() {
                    counts[WorkerState::Starting as usize] += 1;
                }
                let up = s
                    .worker
                    .as_ref()
                    .is_some_and(|w| w.state == WorkerState::Ready);
                let slot = slot.to_string();
                self.metrics
                    .backend_up
                    .with_label_values(&[name, &slot])
                    .set(i64::from(up));
                exported.backends.insert((name.clone(), slot));
            }
            for s in &svc.statics {
                let label = s.backend.label.to_string();
                self.metrics
                    .backend_up
                    .with_label_values(&[name, &label])
                    .set(i64::from(s.up));
                exported.backends.insert((name.clone(), label));
            }
            counts[WorkerState::Draining as usize] +=
                self.retiring.iter().filter(|r| &r.service == name).count() as i64;
            for state in WorkerState::ALL {
                self.metrics
                    .workers
                    .with_label_values(&[name, state.as_str()])
                    .set(counts[state as usize]);
            }
            exported.services.insert(name.clone());
        }
        for (service, worker) in self.exported.backends.difference(&exported.backends) {
            let _ = self
                .metrics
                .backend_up
                .remove_label_values(&[service, worker]);
        }
        for service in self.exported.services.difference(&exported.services) {
            for state in WorkerState::ALL {
                let _ = self
                    .metrics
                    .workers
                    .remove_label_values(&[service, state.as_str()]);
            }
        }
        self.exported = exported;
    }
}

fn worker_status(slot: usize, w: &Worker, restarts: u32) -> WorkerStatus {
    WorkerStatus {
        id: slot,
        pid: Some(w.pid.as_raw()),
        port: Some(w.backend.addr.port()),
        state: w.state.to_string(),
        uptime_seconds: Some(w.started.elapsed().as_secs_f64()),
        restarts,
        active_connections: w.backend.stats.active(),
    }
}
