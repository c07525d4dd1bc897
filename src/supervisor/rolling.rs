//! Rollouts as the supervisor carries them out: a restart applies the config it was
//! given and hands the slots to the [`Rollout`](super::rollout::Rollout) state machine;
//! its effects (spawn a replacement, swap it in, discard it, answer) happen here. After
//! a reload, [`Supervisor::converge`] queues every slot whose worker runs outdated
//! settings.

use std::sync::Arc;

use tokio::time::Instant;
use tracing::{error, info, warn};

use super::Supervisor;
use super::backoff::HEALTHY_UPTIME;
use super::command::{Command, CommandError, Reply, answer};
use super::life::{Input, Worker, WorkerId};
use super::rollout::{Effect, Scope, Slots, Target, Why};
use super::service::ServiceState;
use super::stop::Phase;
use crate::config::Config;

/// The slots as the rollout sees them.
pub(super) struct View<'a> {
    services: &'a [ServiceState],
    workers: &'a std::collections::BTreeMap<WorkerId, Worker>,
}

impl<'a> View<'a> {
    /// Takes the two fields rather than the supervisor, so the rollout beside them can
    /// be borrowed mutably at the same time.
    pub(super) fn new(
        services: &'a [ServiceState],
        workers: &'a std::collections::BTreeMap<WorkerId, Worker>,
    ) -> Self {
        View { services, workers }
    }
}

impl Slots for View<'_> {
    fn wanted(&self, target: &Target) -> bool {
        let Some(svc) = self
            .services
            .iter()
            .find(|s| s.config.name == target.service)
        else {
            return false;
        };
        let (Some(cfg), Some(slot)) = (&svc.config.workers, svc.slots.get(target.slot)) else {
            return false;
        };
        let current = slot.worker.and_then(|id| self.workers.get(&id));
        target.why == Why::Restart || !current.is_some_and(|w| w.config.same_process(cfg))
    }
}

impl Supervisor {
    /// SIGUSR2 and `POST /restart`: apply `config`, then replace every worker of `scope`
    /// one at a time. During a rollout the request is coalesced: one more rollout runs
    /// after the current one ends, with the config as it is then.
    pub(super) fn restart(
        &mut self,
        scope: Scope,
        config: Result<Config, crate::config::ConfigErrors>,
        waiters: Vec<Reply>,
    ) {
        let fail = |waiters: Vec<Reply>, err: CommandError| {
            for w in waiters {
                answer(Some(w), Err(err.clone()));
            }
        };
        if self.phase != Phase::Running {
            return fail(waiters, CommandError::Stopping);
        }
        if self.rollout.active() {
            self.rollout.coalesce(scope, waiters);
            info!("rollout in progress; one more rollout will follow it");
            return;
        }
        // A mistyped service name or worker id must change nothing, the config included.
        if let (Some(name), Ok(config)) = (scope.service(), &config) {
            let svc = config.services.iter().find(|s| s.name == name);
            let count = svc
                .and_then(|s| s.workers.as_ref())
                .map_or(0, |w| w.count.get());
            let missing = match (&scope, svc) {
                (_, None) => Some(format!("no service named {name:?}")),
                (Scope::Worker { slot, .. }, Some(_)) if *slot >= count => Some(format!(
                    "service {name:?} has no worker {slot} (it has {count})"
                )),
                _ => None,
            };
            if let Some(msg) = missing {
                return fail(waiters, CommandError::NotFound(msg));
            }
        }
        if let Err(err) = self.reload(config) {
            return fail(waiters, err);
        }
        let targets: Vec<Target> = self
            .services
            .iter()
            .filter(|s| scope.service().is_none_or(|name| name == s.config.name))
            .flat_map(|s| {
                (0..s.slots.len()).map(|slot| Target {
                    service: s.config.name.clone(),
                    slot,
                    why: Why::Restart,
                })
            })
            .filter(|t| match &scope {
                Scope::Worker { slot, .. } => t.slot == *slot,
                _ => true,
            })
            .collect();
        let effects = self.rollout.begin(
            targets,
            waiters,
            Instant::now(),
            &View::new(&self.services, &self.workers),
        );
        self.carry_out(effects);
    }

    /// Queues every slot whose worker runs other settings than its service's (after a
    /// reload, or a halted rollout), and gives idle slots the new settings directly. A
    /// replacement still starting with settings that are no longer wanted (the config
    /// changed again, or back) is discarded rather than let into the slot.
    pub(super) fn converge(&mut self) {
        if let Some(id) = self.rollout.starting() {
            let w = &self.workers[&id];
            let target = self
                .service_index(&w.service)
                .and_then(|si| self.services[si].config.workers.as_ref());
            if !target.is_some_and(|t| w.config.same_process(t)) {
                info!(service = %w.service, worker = w.slot, pid = w.pid.as_raw(), "rollout: replacement outdated by a reload; discarding it");
                let (service, slot) = (Arc::clone(&w.service), w.slot);
                let effects = self.rollout.drop_step(&service, slot);
                self.carry_out(effects);
            }
        }
        let mut stale = Vec::new();
        for svc in &mut self.services {
            let Some(target) = &svc.config.workers else {
                continue;
            };
            for (slot, s) in svc.slots.iter_mut().enumerate() {
                if s.config.same_process(target) {
                    continue;
                }
                match s.worker {
                    None => s.set_config(Arc::new(target.clone())),
                    Some(_) => stale.push(Target {
                        service: svc.config.name.clone(),
                        slot,
                        why: Why::Stale,
                    }),
                }
            }
        }
        let effects = self.rollout.queue(stale, Instant::now());
        self.carry_out(effects);
    }

    /// Starts the next replacement unless one is starting.
    pub(super) fn resume_rollout(&mut self) {
        let effects = self
            .rollout
            .advance(Instant::now(), &View::new(&self.services, &self.workers));
        self.carry_out(effects);
    }

    /// Carries out a rollout's effects, and those that follow from them.
    pub(super) fn carry_out(&mut self, effects: Vec<Effect>) {
        let mut todo: std::collections::VecDeque<Effect> = effects.into();
        while let Some(effect) = todo.pop_front() {
            todo.extend(self.rollout_effect(effect));
        }
    }

    fn rollout_effect(&mut self, effect: Effect) -> Vec<Effect> {
        match effect {
            Effect::Spawn { service, slot } => {
                let spawned = self.service_index(&service).and_then(|si| {
                    let cfg = self.services[si].config.workers.clone()?;
                    Some(self.spawn_worker(si, slot, Arc::new(cfg)))
                });
                match spawned {
                    Some(Ok(id)) => {
                        info!(%service, worker = slot, pid = self.workers[&id].pid.as_raw(), "rollout: replacement started");
                        self.rollout.spawned(id);
                        Vec::new()
                    }
                    Some(Err(err)) => self.rollout.spawn_failed(format!(
                        "could not start a replacement for {service}/{slot}: {err}"
                    )),
                    // The service lost its workers meanwhile: nothing to replace.
                    None => self.rollout.drop_step(&service, slot),
                }
            }
            Effect::Swap { worker } => {
                self.swap(worker);
                Vec::new()
            }
            Effect::Discard { worker } => {
                if let Some(w) = self.workers.get(&worker) {
                    info!(service = %w.service, worker = w.slot, pid = w.pid.as_raw(), "rollout: discarding a replacement");
                }
                self.drive(worker, Input::Kill);
                Vec::new()
            }
            Effect::Refill { service, slot } => {
                let si = self.service_index(&service);
                let empty = si
                    .and_then(|si| self.services[si].slots.get(slot))
                    .is_some_and(|s| s.worker.is_none());
                if let (Some(si), true, true) = (si, empty, self.phase.keeps_workers()) {
                    let delay = self.restart_later(si, slot, std::time::Duration::ZERO);
                    warn!(%service, worker = slot, restart_in = ?delay, "slot left without a worker; restarting it");
                }
                Vec::new()
            }
            Effect::WatchUntil { worker, at } => {
                self.at(at, super::Event::WatchOver { id: worker });
                Vec::new()
            }
            Effect::Began { queued } => {
                info!(workers = queued, "rollout started");
                Vec::new()
            }
            Effect::Finished { replaced, took } => {
                info!(replaced, ?took, "rollout finished");
                self.metrics.rollouts_total.with_label_values(&["ok"]).inc();
                Vec::new()
            }
            Effect::Halted { reason, remaining } => {
                error!(%reason, remaining, "rollout halted; the workers not yet replaced keep serving");
                self.metrics
                    .rollouts_total
                    .with_label_values(&["halted"])
                    .inc();
                Vec::new()
            }
            Effect::Answer { waiters, result } => {
                for w in waiters {
                    answer(Some(w), result.clone());
                }
                Vec::new()
            }
            Effect::Restart { scope, waiters } => {
                // With the config as it is now, read off the supervisor's task.
                self.inbox.with_config(move |config| Command::Restart {
                    scope,
                    config,
                    replies: waiters,
                });
                Vec::new()
            }
        }
    }

    /// A replacement is ready: it takes its slot in the same snapshot swap that takes
    /// the old worker out of rotation, and the old one drains in the background.
    fn swap(&mut self, id: WorkerId) {
        let Some(new) = self.workers.get(&id) else {
            return;
        };
        let (service, slot, config) = (Arc::clone(&new.service), new.slot, Arc::clone(&new.config));
        info!(service = %new.service, worker = new.slot, pid = new.pid.as_raw(), after = ?new.started.elapsed(), "rollout: replacement ready, in rotation");
        let Some(si) = self.service_index(&service) else {
            return self.drive(id, Input::Kill);
        };
        let Some(s) = self.services[si].slots.get_mut(slot) else {
            return self.drive(id, Input::Kill);
        };
        s.set_config(config);
        s.restarts += 1;
        let old = s.worker.replace(id);
        // A worker that served long enough ends the slot's crash streak, even when it
        // leaves by a rollout rather than by exiting.
        if old
            .and_then(|old| self.workers.get(&old))
            .is_some_and(|w| w.started.elapsed() >= HEALTHY_UPTIME)
        {
            self.services[si].slots[slot].backoff.reset();
        }
        self.metrics
            .worker_restarts_total
            .with_label_values(&[&*service, &slot.to_string(), "rollout"])
            .inc();
        if let Some(old) = old {
            self.retire(old, "rollout");
        }
    }
}
