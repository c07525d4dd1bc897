//! What the supervisor tells the outside: the `/status` document and the gauges that
//! follow worker states (`lb_workers`, `lb_backend_up`).

use std::collections::HashSet;

use super::life::Worker;
use super::service::ServiceState;
use super::{Supervisor, WorkerState};
use crate::admin::status::{BackendStatus, ServiceStatus, Status, WorkerStatus};

/// The label sets exported last time, so series of removed slots and services are
/// deleted instead of lingering at their last value.
#[derive(Debug, Default)]
pub(super) struct Exported {
    backends: HashSet<(String, String)>,
    services: HashSet<String>,
}

impl Exported {
    /// Whether the series of this service's slot are exported (the slot still exists).
    pub(super) fn has_slot(&self, service: &str, slot: &str) -> bool {
        self.backends
            .contains(&(service.to_owned(), slot.to_owned()))
    }
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
        let name = svc.config.name.as_str();
        let checked = svc.config.health_check.is_some();
        let mut workers = Vec::new();
        for (slot, s) in svc.slots.iter().enumerate() {
            match s.worker.and_then(|id| self.workers.get(&id)) {
                Some(w) => workers.push(worker_status(w, s.restarts, checked)),
                None => workers.push(WorkerStatus {
                    id: slot,
                    pid: None,
                    port: None,
                    state: s.idle_state.to_string(),
                    health: health(checked, None),
                    uptime_seconds: None,
                    memory_bytes: None,
                    cpu_seconds: None,
                    cpu_percent: None,
                    restarts: s.restarts,
                    active_connections: 0,
                }),
            }
        }
        // Replacements starting, and workers leaving, beside the slots they belong to.
        let others = self.workers.values().filter(|w| {
            &*w.service == name && svc.slots.get(w.slot).is_none_or(|s| s.worker != Some(w.id))
        });
        workers.extend(
            others.map(|w| {
                worker_status(w, svc.slots.get(w.slot).map_or(0, |s| s.restarts), checked)
            }),
        );
        ServiceStatus {
            name: svc.config.name.clone(),
            listen: svc
                .config
                .listen
                .iter()
                .map(|addr| svc.listeners.bound(addr).unwrap_or(*addr).to_string())
                .collect(),
            balance: svc.config.balance.to_string(),
            workers,
            backends: svc
                .statics
                .iter()
                .map(|s| BackendStatus {
                    address: s.backend.label.to_string(),
                    name: s.resolved().then(|| s.from.label.clone()),
                    weight: s.backend.weight,
                    state: if s.up { "ready" } else { "down" }.to_owned(),
                    health: health(checked, Some(s.health.up)),
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
            for s in svc.slots.iter().filter(|s| s.worker.is_none()) {
                counts[s.idle_state as usize] += 1;
            }
            for w in self.workers.values().filter(|w| &*w.service == name) {
                counts[w.state() as usize] += 1;
            }
            for (slot, s) in svc.slots.iter().enumerate() {
                let worker = s.worker.and_then(|id| self.workers.get(&id));
                let up = worker.is_some_and(Worker::in_rotation);
                let slot = slot.to_string();
                self.metrics
                    .backend_up
                    .with_label_values(&[name, &slot])
                    .set(i64::from(up));
                let memory = worker.map_or(0, |w| w.usage.memory_bytes);
                self.metrics
                    .worker_memory
                    .with_label_values(&[name, &slot])
                    .set(i64::try_from(memory).unwrap_or(i64::MAX));
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
            for state in WorkerState::ALL {
                self.metrics
                    .workers
                    .with_label_values(&[name, state.as_str()])
                    .set(counts[state as usize]);
            }
            exported.services.insert(name.clone());
        }
        for (service, worker) in self.exported.backends.difference(&exported.backends) {
            let labels = [service.as_str(), worker.as_str()];
            let _ = self.metrics.backend_up.remove_label_values(&labels);
            let _ = self.metrics.worker_memory.remove_label_values(&labels);
            let _ = self.metrics.worker_cpu.remove_label_values(&labels);
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

fn worker_status(w: &Worker, restarts: u32, checked: bool) -> WorkerStatus {
    // Checks start once a worker is ready; a starting one has no verdict yet.
    let verdict = (w.ready_at.is_some() && !w.leaving()).then_some(w.health.up);
    WorkerStatus {
        id: w.slot,
        pid: Some(w.pid.as_raw()),
        port: Some(w.backend.addr.port()),
        state: w.state().to_string(),
        health: health(checked, verdict),
        uptime_seconds: Some(w.started.elapsed().as_secs_f64()),
        memory_bytes: Some(w.usage.memory_bytes),
        cpu_seconds: Some(w.usage.cpu_seconds),
        cpu_percent: Some(w.usage.cpu_percent),
        restarts,
        active_connections: w.backend.stats.active(),
    }
}

/// `up`, `down`, or `unchecked` (no `health_check`, or nothing checked yet).
fn health(checked: bool, up: Option<bool>) -> String {
    match (checked, up) {
        (true, Some(true)) => "up",
        (true, Some(false)) => "down",
        _ => "unchecked",
    }
    .to_owned()
}
