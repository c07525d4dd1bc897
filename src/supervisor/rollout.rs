//! Rolling replacement, one slot at a time: start the replacement on a new port with the
//! service's current settings, wait until it is ready, swap it into rotation in place of
//! the old worker, let the old one drain and stop, and only then the next slot. A
//! replacement that fails halts the rollout; the slots not yet replaced keep their
//! workers and their settings.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::time::Instant;
use tracing::{error, info, warn};

use super::backoff::HEALTHY_UPTIME;
use super::command::{CommandError, Reply, answer};
use super::stop::Phase;
use super::{ExitStatus, Supervisor, WorkerState};
use crate::snapshot::BackendId;

#[derive(Debug, Default)]
pub(super) struct Rollout {
    /// Slots still to replace, by service name (indexes shift when services change).
    queue: VecDeque<Queued>,
    step: Option<Step>,
    /// Requests answered when this rollout finishes or halts.
    waiters: Vec<Reply>,
    /// Restarts requested during this rollout, coalesced into one that runs after it.
    pending: Option<Pending>,
    started: Option<Instant>,
    replaced: usize,
}

#[derive(Debug)]
struct Queued {
    service: String,
    slot: usize,
    why: Why,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// A restart replaces every worker, whatever it runs.
    Restart,
    /// The worker runs other settings than its service's; skipped if it no longer
    /// does by its turn (the change was reverted).
    Stale,
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

    /// Whether this step's replacement for `slot` is still starting.
    fn starting_replacement(&self, service: &str, slot: usize) -> bool {
        self.step
            .as_ref()
            .is_some_and(|s| s.service == service && s.slot == slot && s.old.is_none())
    }
}

impl Supervisor {
    /// SIGUSR2 and `POST /restart`: re-read the config, then replace every worker of
    /// `scope` (one service, or all). During a rollout the request is coalesced: one
    /// more rollout runs after the current one ends, even if that one halts (the next
    /// may carry the fix). `waiters` are answered when their rollout ends.
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
        // A mistyped service name must change nothing, the config included.
        if let Some(name) = scope.as_deref() {
            let named = crate::config::load(&self.config_path)
                .map(|config| config.services.iter().any(|s| s.name == name));
            if named == Ok(false) {
                return fail(
                    waiters,
                    CommandError::NotFound(format!("no service named {name:?}")),
                );
            }
        }
        if let Err(err) = self.reload() {
            return fail(waiters, err);
        }
        let in_scope = |name: &str| scope.as_deref().is_none_or(|s| s == name);
        let slots: Vec<(String, usize)> = self
            .services
            .iter()
            .filter(|s| in_scope(&s.config.name))
            .flat_map(|s| (0..s.slots.len()).map(|slot| (s.config.name.clone(), slot)))
            .collect();
        self.rollout.waiters.extend(waiters);
        self.queue_rollout(slots, Why::Restart);
        self.resume_rollout();
    }

    /// Queues every slot whose worker runs other settings than its service's (after a
    /// reload, or a halted rollout), and gives idle slots the new settings directly. A
    /// replacement still starting with settings that are no longer wanted (the config
    /// changed again, or back) is discarded rather than let into the slot.
    pub(super) fn converge(&mut self) {
        let outdated: Vec<(usize, usize)> = self
            .services
            .iter()
            .enumerate()
            .flat_map(|(si, svc)| {
                let target = svc.config.workers.as_ref();
                svc.slots.iter().enumerate().filter_map(move |(slot, s)| {
                    let r = s.replacement.as_ref()?;
                    (!target.is_some_and(|t| r.config.same_process(t))).then_some((si, slot))
                })
            })
            .collect();
        // A slot whose worker died while being replaced is left empty by the discard:
        // it restarts as after a crash, with the new settings.
        let emptied: Vec<(usize, usize)> = outdated
            .into_iter()
            .filter(|&(si, slot)| self.discard_replacement(si, slot))
            .collect();
        let mut stale = Vec::new();
        for svc in &mut self.services {
            let Some(target) = &svc.config.workers else {
                continue;
            };
            for (slot, s) in svc.slots.iter_mut().enumerate() {
                if s.replacement.is_some() || s.config.same_process(target) {
                    continue;
                }
                if s.worker.is_none() {
                    s.set_config(Arc::new(target.clone()));
                } else {
                    stale.push((svc.config.name.clone(), slot));
                }
            }
        }
        for (si, slot) in emptied {
            self.refill(si, slot);
        }
        self.queue_rollout(stale, Why::Stale);
    }

    /// Kills the replacement starting in `slot`; the rollout goes on with its next slot.
    /// True if that leaves the slot without a worker.
    fn discard_replacement(&mut self, si: usize, slot: usize) -> bool {
        let service = self.services[si].config.name.clone();
        if let Some(worker) = self.services[si].slots[slot].replacement.take() {
            info!(%service, worker = slot, pid = %worker.pid, "rollout: replacement outdated by a reload; discarding it");
            self.discard(&service, slot, worker);
        }
        if self.rollout.starting_replacement(&service, slot) {
            self.rollout.step = None;
        }
        self.services[si].slots[slot].worker.is_none()
    }

    /// Queues slots for replacement; [`Self::resume_rollout`] starts them. A slot whose
    /// replacement is starting now already gets the newest settings (a reload discards
    /// one that does not), so it is not queued again.
    fn queue_rollout(&mut self, slots: Vec<(String, usize)>, why: Why) {
        for (service, slot) in slots {
            if self.rollout.starting_replacement(&service, slot) {
                continue;
            }
            let queued = self
                .rollout
                .queue
                .iter_mut()
                .find(|q| q.service == service && q.slot == slot);
            match queued {
                Some(q) if why == Why::Restart => q.why = why,
                Some(_) => {}
                None => self.rollout.queue.push_back(Queued { service, slot, why }),
            }
        }
        if self.rollout.started.is_none() && self.rollout.active() {
            self.rollout.started = Some(Instant::now());
            info!(workers = self.rollout.queue.len(), "rollout started");
        }
    }

    /// Starts the next replacement unless one is under way.
    pub(super) fn resume_rollout(&mut self) {
        if self.rollout.step.is_none() {
            self.advance();
        }
    }

    /// Starts the replacement for the next queued slot, or ends the rollout.
    fn advance(&mut self) {
        while let Some(Queued { service, slot, why }) = self.rollout.queue.pop_front() {
            let Some(si) = self.service_index(&service) else {
                continue;
            };
            let Some(cfg) = self.services[si].config.workers.clone() else {
                continue;
            };
            let Some(s) = self.services[si].slots.get(slot) else {
                continue;
            };
            if why == Why::Stale && s.worker.is_some() && s.config.same_process(&cfg) {
                continue;
            }
            match self.spawn_worker(si, slot, Arc::new(cfg)) {
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
        let name = svc.config.name.clone();
        let s = &mut svc.slots[slot];
        let mut new = s
            .replacement
            .take()
            .expect("place_of_backend found a replacement");
        new.state = WorkerState::Ready;
        new.ready_once = true;
        new.backend.stats.mark_up();
        info!(service = %name, worker = slot, pid = %new.pid, after = ?new.started.elapsed(), "rollout: replacement ready, in rotation");
        s.set_config(Arc::clone(&new.config));
        let old = s.worker.replace(new);
        // A worker that served long enough ends the slot's crash streak, even when it
        // leaves by a rollout rather than by exiting.
        if old
            .as_ref()
            .is_some_and(|w| w.started.elapsed() >= HEALTHY_UPTIME)
        {
            s.backoff.reset();
        }
        self.metrics
            .worker_restarts_total
            .with_label_values(&[&name, &slot.to_string(), "rollout"])
            .inc();
        self.rollout.replaced += 1;
        match old {
            Some(old) => {
                if let Some(step) = &mut self.rollout.step {
                    step.old = Some(old.backend.id);
                }
                self.retire(&name, slot, old, "rollout");
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
        self.refill(si, slot);
        self.halt(reason);
    }

    pub(super) fn replacement_exited(&mut self, si: usize, slot: usize, status: ExitStatus) {
        let worker = self.services[si].slots[slot]
            .replacement
            .take()
            .expect("place_of_pid found a replacement");
        self.reaped(&worker, self.phase == Phase::StoppingWorkers, false);
        let name = &self.services[si].config.name;
        let reason = format!("replacement for {name}/{slot} exited ({status}) before it was ready");
        self.refill(si, slot);
        self.halt(reason);
    }

    /// A slot whose old worker died while its replacement failed restarts as after a
    /// crash, with backoff and its own settings.
    fn refill(&mut self, si: usize, slot: usize) {
        if self.services[si].slots[slot].worker.is_none() && self.phase == Phase::Running {
            let delay = self.restart_later(si, slot, std::time::Duration::ZERO);
            let service = &self.services[si].config.name;
            warn!(%service, worker = slot, restart_in = ?delay, "slot left without a worker; restarting it");
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

    /// Stops the rollout and fails its waiters; a restart requested meanwhile still runs.
    /// While lb stops, the rollout is already abandoned and a replacement that dies
    /// with the rest is no failure.
    fn halt(&mut self, reason: String) {
        if self.phase != Phase::Running {
            return;
        }
        let remaining = self.rollout.queue.len();
        error!(%reason, remaining, "rollout halted; the workers not yet replaced keep serving");
        self.metrics
            .rollouts_total
            .with_label_values(&["halted"])
            .inc();
        let rollout = std::mem::take(&mut self.rollout);
        let err = CommandError::Failed(format!("rollout halted: {reason}"));
        for w in rollout.waiters {
            answer(Some(w), Err(err.clone()));
        }
        if let Some(next) = rollout.pending {
            self.restart(next.scope, next.waiters);
        }
    }

    /// lb is stopping: no more replacements; everyone waiting is told so.
    pub(super) fn rollout_abort(&mut self) {
        if self.rollout.active() {
            warn!("rollout abandoned: lb is stopping");
        }
        let rollout = std::mem::take(&mut self.rollout);
        let pending = rollout.pending.into_iter().flat_map(|p| p.waiters);
        for w in rollout.waiters.into_iter().chain(pending) {
            answer(Some(w), Err(CommandError::Stopping));
        }
    }
}
