//! Rolling replacement, one slot at a time: start the replacement on a new port, wait
//! until it is ready, swap it into rotation in place of the old worker, let the old one
//! drain and stop, and only then the next slot. A replacement that fails halts the
//! rollout; the workers not yet replaced keep serving.

use std::collections::VecDeque;

use tokio::time::Instant;
use tracing::{error, info, warn};

use super::command::{CommandError, Reply, answer};
use super::stop::Phase;
use super::{ExitStatus, Supervisor, WorkerState};
use crate::snapshot::BackendId;

#[derive(Debug, Default)]
pub(super) struct Rollout {
    /// Slots still to replace, by service name (indexes shift when services change).
    queue: VecDeque<(String, usize)>,
    step: Option<Step>,
    /// Requests answered when this rollout finishes or halts.
    waiters: Vec<Reply>,
    /// Restarts requested during this rollout, coalesced into one that runs after it.
    pending: Option<Pending>,
    started: Option<Instant>,
    replaced: usize,
}

/// The slot being replaced now.
#[derive(Debug)]
struct Step {
    service: String,
    slot: usize,
    /// Set once the replacement is in rotation and the old worker retires.
    old: Option<BackendId>,
}

/// A restart waiting for the current rollout to end; `scope` None means every service.
#[derive(Debug)]
struct Pending {
    scope: Option<String>,
    waiters: Vec<Reply>,
}

impl Rollout {
    fn active(&self) -> bool {
        self.step.is_some() || !self.queue.is_empty()
    }
}

impl Supervisor {
    /// SIGUSR2 and `POST /restart`: re-read the config, then replace every worker of
    /// `scope` (one service, or all). During a rollout the request is coalesced: one
    /// more rollout runs after the current one. `waiters` are answered when it ends.
    pub(super) fn restart(&mut self, scope: Option<String>, waiters: Vec<Reply>) {
        let fail = |waiters: Vec<Reply>, err: CommandError| {
            for w in waiters {
                answer(Some(w), Err(err.clone()));
            }
        };
        if self.phase != Phase::Running {
            return fail(waiters, CommandError::Stopping);
        }
        if self.rollout.active() {
            let pending = self.rollout.pending.get_or_insert(Pending {
                scope: scope.clone(),
                waiters: Vec::new(),
            });
            if pending.scope != scope {
                pending.scope = None;
            }
            pending.waiters.extend(waiters);
            info!("rollout in progress; one more rollout will follow it");
            return;
        }
        if let Err(err) = self.reload() {
            return fail(waiters, err);
        }
        let in_scope = |name: &str| scope.as_deref().is_none_or(|s| s == name);
        if let Some(name) = scope.as_deref().filter(|n| self.service_index(n).is_none()) {
            return fail(
                waiters,
                CommandError::NotFound(format!("no service named {name:?}")),
            );
        }
        let slots: Vec<(String, usize)> = self
            .services
            .iter()
            .filter(|s| in_scope(&s.config.name))
            .flat_map(|s| (0..s.slots.len()).map(|slot| (s.config.name.clone(), slot)))
            .collect();
        self.rollout.waiters.extend(waiters);
        self.roll(slots);
    }

    /// Queues slots for replacement and starts replacing if idle.
    pub(super) fn roll(&mut self, slots: Vec<(String, usize)>) {
        self.queue_rollout(slots);
        if self.rollout.step.is_none() {
            self.advance();
        }
    }

    /// Queues slots for replacement without starting (a reload applies everything first).
    pub(super) fn queue_rollout(&mut self, slots: Vec<(String, usize)>) {
        for item in slots {
            let current = self
                .rollout
                .step
                .as_ref()
                .is_some_and(|s| (&s.service, s.slot) == (&item.0, item.1));
            if !current && !self.rollout.queue.contains(&item) {
                self.rollout.queue.push_back(item);
            }
        }
        if self.rollout.started.is_none() && self.rollout.active() {
            self.rollout.started = Some(Instant::now());
            info!(workers = self.rollout.queue.len(), "rollout started");
        }
    }

    /// Starts the replacement for the next queued slot, or ends the rollout.
    fn advance(&mut self) {
        while let Some((service, slot)) = self.rollout.queue.pop_front() {
            let Some(si) = self.service_index(&service) else {
                continue;
            };
            if slot >= self.services[si].slots.len() {
                continue;
            }
            match self.spawn_worker(si, slot) {
                Ok(worker) => {
                    info!(%service, worker = slot, pid = %worker.pid, "rollout: replacement started");
                    self.services[si].slots[slot].replacement = Some(worker);
                    self.rollout.step = Some(Step {
                        service,
                        slot,
                        old: None,
                    });
                }
                Err(err) => self.halt(format!(
                    "could not start a replacement for {service}/{slot}: {err}"
                )),
            }
            return;
        }
        self.finish();
    }

    fn finish(&mut self) {
        let replaced = std::mem::take(&mut self.rollout.replaced);
        if let Some(started) = self.rollout.started.take() {
            info!(replaced, took = ?started.elapsed(), "rollout finished");
            self.metrics
                .rollouts_total
                .with_label_values(&["finished"])
                .inc();
        }
        let message = format!("rollout finished: {replaced} workers replaced");
        for w in std::mem::take(&mut self.rollout.waiters) {
            answer(Some(w), Ok(message.clone()));
        }
        if let Some(next) = self.rollout.pending.take() {
            self.restart(next.scope, next.waiters);
        }
    }

    /// The replacement accepts connections: it takes the slot in the same snapshot swap
    /// that takes the old worker out of rotation.
    pub(super) fn replacement_ready(&mut self, si: usize, slot: usize) {
        let svc = &mut self.services[si];
        let mut new = svc.slots[slot]
            .replacement
            .take()
            .expect("place_of_backend found a replacement");
        new.state = WorkerState::Ready;
        new.backend.stats.mark_up();
        info!(service = %svc.config.name, worker = slot, pid = %new.pid, after = ?new.started.elapsed(), "rollout: replacement ready, in rotation");
        let old = svc.slots[slot].worker.replace(new);
        let (name, cfg) = (
            svc.config.name.clone(),
            svc.config
                .workers
                .clone()
                .expect("slots exist only with workers"),
        );
        self.metrics
            .worker_restarts_total
            .with_label_values(&[&name, &slot.to_string(), "rollout"])
            .inc();
        self.rollout.replaced += 1;
        self.publish();
        match old {
            Some(old) => {
                if let Some(step) = &mut self.rollout.step {
                    step.old = Some(old.backend.id);
                }
                self.retire(&name, slot, old, &cfg, "rollout");
            }
            None => {
                self.rollout.step = None;
                self.advance();
            }
        }
    }

    pub(super) fn replacement_failed(&mut self, si: usize, slot: usize, reason: String) {
        if let Some(worker) = self.services[si].slots[slot].replacement.take() {
            let name = self.services[si].config.name.clone();
            self.discard(&name, slot, worker);
        }
        self.halt(reason);
        self.refill(si, slot);
    }

    pub(super) fn replacement_exited(&mut self, si: usize, slot: usize, status: ExitStatus) {
        let worker = self.services[si].slots[slot]
            .replacement
            .take()
            .expect("place_of_pid found a replacement");
        self.reaped(&worker);
        let name = &self.services[si].config.name;
        self.halt(format!(
            "replacement for {name}/{slot} exited ({status}) before it was ready"
        ));
        self.refill(si, slot);
    }

    /// A slot whose old worker died while its replacement failed is restarted as usual.
    fn refill(&mut self, si: usize, slot: usize) {
        if self.services[si].slots[slot].worker.is_none() && self.phase == Phase::Running {
            self.start_or_backoff(si, slot);
        }
    }

    /// A retiring worker is gone; if it was the one this step replaced, go on.
    pub(super) fn rollout_retired(&mut self, id: BackendId) {
        if self
            .rollout
            .step
            .as_ref()
            .is_some_and(|s| s.old == Some(id))
        {
            self.rollout.step = None;
            self.advance();
        }
    }

    /// The current step's slot or service is gone (reload): drop the step. The reload
    /// resumes the rollout once every change is applied.
    pub(super) fn rollout_forget(&mut self, service: &str, from_slot: usize) {
        let gone = self
            .rollout
            .step
            .as_ref()
            .is_some_and(|s| s.service == service && s.slot >= from_slot && s.old.is_none());
        if gone {
            self.rollout.step = None;
        }
    }

    /// Stops the rollout; every request waiting on it, or on one after it, gets `reason`.
    fn halt(&mut self, reason: String) {
        let remaining = self.rollout.queue.len();
        error!(%reason, remaining, "rollout halted; the workers not yet replaced keep serving");
        self.metrics
            .rollouts_total
            .with_label_values(&["halted"])
            .inc();
        self.end_rollout(&CommandError::Failed(format!("rollout halted: {reason}")));
    }

    /// lb is stopping: no more replacements.
    pub(super) fn rollout_abort(&mut self) {
        if self.rollout.active() {
            warn!("rollout abandoned: lb is stopping");
        }
        self.end_rollout(&CommandError::Stopping);
    }

    fn end_rollout(&mut self, err: &CommandError) {
        let rollout = std::mem::take(&mut self.rollout);
        let pending = rollout.pending.into_iter().flat_map(|p| p.waiters);
        for w in rollout.waiters.into_iter().chain(pending) {
            answer(Some(w), Err(err.clone()));
        }
    }
}
