//! Rolling replacement as a state machine: start a replacement for one slot, and once
//! it is ready swap it into rotation in place of the old worker (which drains in the
//! background with its own deadline) and go on to the next slot at once. Each
//! replacement is watched for `rollout_watch` after it became ready; one that fails to
//! start, is not ready in time, or exits while watched halts the rollout, and the slots
//! not yet replaced keep their workers and their settings.
//!
//! [`Rollout`] only decides: each method takes what happened and returns [`Effect`]s
//! for the supervisor to carry out (spawn, swap, discard, answer). What it needs to know
//! of the slots comes through [`Slots`], so every interleaving is tested without a
//! process.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use super::command::{CommandError, Reply};
use super::life::WorkerId;

/// Which workers a restart replaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    Service(String),
    Worker { service: String, slot: usize },
}

impl Scope {
    /// The smallest scope covering both.
    fn union(self, other: Scope) -> Scope {
        match (self, other) {
            (a, b) if a == b => a,
            (Scope::Service(a) | Scope::Worker { service: a, .. }, other)
                if other.service() == Some(a.as_str()) =>
            {
                Scope::Service(a)
            }
            _ => Scope::All,
        }
    }

    pub fn service(&self) -> Option<&str> {
        match self {
            Scope::All => None,
            Scope::Service(s) | Scope::Worker { service: s, .. } => Some(s),
        }
    }
}

/// One slot to replace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Target {
    pub service: String,
    pub slot: usize,
    pub why: Why,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Why {
    /// A restart replaces the worker, whatever it runs.
    Restart,
    /// The worker runs other settings than its service's (after a reload); skipped if it
    /// no longer does by its turn (the change was reverted).
    Stale,
}

/// What the rollout needs to know of the slots.
pub(super) trait Slots {
    /// Whether `target` is still to be replaced now: its slot exists, and for a stale
    /// target its worker still runs other settings than its service's.
    fn wanted(&self, target: &Target) -> bool;
}

/// What the supervisor does for the rollout.
#[derive(Debug)]
pub(super) enum Effect {
    /// Start a replacement for the slot with its service's current settings, then call
    /// [`Rollout::spawned`] or [`Rollout::spawn_failed`].
    Spawn { service: String, slot: usize },
    /// The replacement is ready: it takes its slot, and the old worker retires, in one
    /// snapshot swap.
    Swap { worker: WorkerId },
    /// Stop a replacement that will not take its slot.
    Discard { worker: WorkerId },
    /// The slot may have lost its worker while it was being replaced: restart it like a
    /// crashed one if it has none.
    Refill { service: String, slot: usize },
    /// Call [`Rollout::watch_over`] for this worker at `at`.
    WatchUntil { worker: WorkerId, at: Instant },
    /// The rollout began with this many slots queued.
    Began { queued: usize },
    /// The rollout ended well.
    Finished { replaced: usize, took: Duration },
    /// The rollout stopped on a failure.
    Halted { reason: String, remaining: usize },
    Answer {
        waiters: Vec<Reply>,
        result: Result<String, CommandError>,
    },
    /// Run a restart that was requested during the rollout that just ended.
    Restart { scope: Scope, waiters: Vec<Reply> },
}

#[derive(Debug, Default)]
pub(super) struct Rollout {
    queue: VecDeque<Target>,
    /// The slot whose replacement is starting; its worker is None until spawned.
    step: Option<Step>,
    /// Replacements in rotation still within their `rollout_watch`.
    watched: Vec<WorkerId>,
    /// Requests answered when this rollout ends.
    waiters: Vec<Reply>,
    /// A restart requested during this rollout, run after it ends, even if it halts
    /// (the next one may carry the fix).
    pending: Option<(Scope, Vec<Reply>)>,
    started: Option<Instant>,
    replaced: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Step {
    service: String,
    slot: usize,
    why: Why,
    worker: Option<WorkerId>,
}

impl Rollout {
    pub(super) fn active(&self) -> bool {
        self.step.is_some() || !self.queue.is_empty() || !self.watched.is_empty()
    }

    /// The slot whose replacement this worker is, while it is starting.
    pub(super) fn replacing(&self, worker: WorkerId) -> Option<(&str, usize)> {
        self.step
            .as_ref()
            .filter(|s| s.worker == Some(worker))
            .map(|s| (s.service.as_str(), s.slot))
    }

    /// Whether a replacement for this slot is starting.
    pub(super) fn starting_for(&self, service: &str, slot: usize) -> bool {
        self.step
            .as_ref()
            .is_some_and(|s| s.service == service && s.slot == slot)
    }

    /// The replacement starting now, if any.
    pub(super) fn starting(&self) -> Option<WorkerId> {
        self.step.as_ref().and_then(|s| s.worker)
    }

    /// A restart asked for during this rollout: it runs once this one ends.
    pub(super) fn coalesce(&mut self, scope: Scope, waiters: Vec<Reply>) {
        let (old, mut all) = self.pending.take().unwrap_or((scope.clone(), Vec::new()));
        all.extend(waiters);
        self.pending = Some((old.union(scope), all));
    }

    /// Starts a rollout of `targets`; `waiters` are answered when it ends.
    pub(super) fn begin(
        &mut self,
        targets: Vec<Target>,
        waiters: Vec<Reply>,
        now: Instant,
        slots: &impl Slots,
    ) -> Vec<Effect> {
        self.waiters.extend(waiters);
        let mut effects = self.queue(targets, now);
        effects.extend(self.advance(now, slots));
        effects
    }

    /// Queues slots (a restart's, or the stale ones after a reload). A slot already
    /// queued stays in its place; one whose replacement starts now already gets the
    /// newest settings (a reload discards one that does not).
    pub(super) fn queue(&mut self, targets: Vec<Target>, now: Instant) -> Vec<Effect> {
        for target in targets {
            let starting = self
                .step
                .as_mut()
                .filter(|s| s.service == target.service && s.slot == target.slot);
            // A restart of the slot starting now makes its step a restart's too, so a
            // reload that outdates the replacement does not cancel the restart.
            let starting = starting
                .map(|s| {
                    if target.why == Why::Restart {
                        s.why = Why::Restart;
                    }
                })
                .is_some();
            let queued = self
                .queue
                .iter_mut()
                .find(|q| q.service == target.service && q.slot == target.slot);
            match queued {
                Some(q) if target.why == Why::Restart => q.why = Why::Restart,
                Some(_) => {}
                None if starting => {}
                None => self.queue.push_back(target),
            }
        }
        if self.started.is_none() && self.active() {
            self.started = Some(now);
            return vec![Effect::Began {
                queued: self.queue.len(),
            }];
        }
        Vec::new()
    }

    /// Starts the next wanted slot's replacement unless one is starting; ends the
    /// rollout once nothing is queued, starting or watched.
    pub(super) fn advance(&mut self, now: Instant, slots: &impl Slots) -> Vec<Effect> {
        if self.step.is_some() {
            return Vec::new();
        }
        while let Some(target) = self.queue.pop_front() {
            if !slots.wanted(&target) {
                continue;
            }
            self.step = Some(Step {
                service: target.service.clone(),
                slot: target.slot,
                why: target.why,
                worker: None,
            });
            return vec![Effect::Spawn {
                service: target.service,
                slot: target.slot,
            }];
        }
        if self.watched.is_empty() {
            return self.finish(now);
        }
        Vec::new()
    }

    /// The replacement of the current step was started.
    pub(super) fn spawned(&mut self, worker: WorkerId) {
        if let Some(step) = &mut self.step {
            step.worker = Some(worker);
        }
    }

    /// The replacement of the current step could not be started.
    pub(super) fn spawn_failed(&mut self, reason: String) -> Vec<Effect> {
        let Some(step) = self.step.take() else {
            return Vec::new();
        };
        let mut effects = vec![Effect::Refill {
            service: step.service,
            slot: step.slot,
        }];
        effects.extend(self.halt(reason));
        effects
    }

    /// A worker became ready: if it is this step's replacement, it takes its slot, is
    /// watched for `watch`, and the next slot starts.
    pub(super) fn ready(
        &mut self,
        worker: WorkerId,
        now: Instant,
        watch: Duration,
        slots: &impl Slots,
    ) -> Vec<Effect> {
        if self.replacing(worker).is_none() {
            return Vec::new();
        }
        self.step = None;
        self.replaced += 1;
        let mut effects = vec![Effect::Swap { worker }];
        if !watch.is_zero() {
            self.watched.push(worker);
            effects.push(Effect::WatchUntil {
                worker,
                at: now + watch,
            });
        }
        effects.extend(self.advance(now, slots));
        effects
    }

    /// This step's replacement was not ready within its `ready_timeout`.
    pub(super) fn not_ready(&mut self, worker: WorkerId, reason: String) -> Vec<Effect> {
        let Some(step) = self.step.take_if(|s| s.worker == Some(worker)) else {
            return Vec::new();
        };
        let mut effects = vec![
            Effect::Discard { worker },
            Effect::Refill {
                service: step.service,
                slot: step.slot,
            },
        ];
        effects.extend(self.halt(reason));
        effects
    }

    /// A worker exited unasked: this step's replacement before it was ready, or a
    /// replacement within its watch; either halts the rollout.
    pub(super) fn exited(&mut self, worker: WorkerId, reason: String) -> Vec<Effect> {
        if let Some(step) = self.step.take_if(|s| s.worker == Some(worker)) {
            let mut effects = vec![Effect::Refill {
                service: step.service,
                slot: step.slot,
            }];
            effects.extend(self.halt(reason));
            return effects;
        }
        if self.watched.contains(&worker) {
            // It is its slot's worker now: the slot restarts it like any crashed one.
            return self.halt(reason);
        }
        Vec::new()
    }

    /// A replacement stayed up for its whole `rollout_watch`.
    pub(super) fn watch_over(
        &mut self,
        worker: WorkerId,
        now: Instant,
        slots: &impl Slots,
    ) -> Vec<Effect> {
        let before = self.watched.len();
        self.watched.retain(|w| *w != worker);
        if self.watched.len() == before {
            return Vec::new();
        }
        self.advance(now, slots)
    }

    /// Gives up this step's replacement if it is for `service` at `from_slot` or above:
    /// scaled down, removed, or started with settings a reload no longer wants. A slot a
    /// restart asked for goes back to the front of the queue (it is skipped if it is
    /// gone). The caller resumes the rollout once its change is applied.
    pub(super) fn drop_step(&mut self, service: &str, from_slot: usize) -> Vec<Effect> {
        let Some(step) = self
            .step
            .take_if(|s| s.service == service && s.slot >= from_slot)
        else {
            return Vec::new();
        };
        if step.why == Why::Restart {
            self.queue.push_front(Target {
                service: step.service.clone(),
                slot: step.slot,
                why: Why::Restart,
            });
        }
        abandon(step)
    }

    /// lb is stopping: no more replacements; everyone waiting is told so.
    pub(super) fn abort(&mut self) -> Vec<Effect> {
        let rollout = std::mem::take(self);
        let pending = rollout.pending.into_iter().flat_map(|(_, w)| w);
        let waiters: Vec<Reply> = rollout.waiters.into_iter().chain(pending).collect();
        let mut effects: Vec<Effect> = rollout
            .step
            .and_then(|s| s.worker)
            .map(|worker| Effect::Discard { worker })
            .into_iter()
            .collect();
        if !waiters.is_empty() {
            effects.push(Effect::Answer {
                waiters,
                result: Err(CommandError::Stopping),
            });
        }
        effects
    }

    /// Ends the rollout on a failure. A replacement still starting for the next slot
    /// (the failure was an earlier replacement's, within its watch) is stopped.
    fn halt(&mut self, reason: String) -> Vec<Effect> {
        let rollout = std::mem::take(self);
        let mut effects = rollout.step.map(abandon).unwrap_or_default();
        effects.extend([
            Effect::Halted {
                reason: reason.clone(),
                remaining: rollout.queue.len(),
            },
            Effect::Answer {
                waiters: rollout.waiters,
                result: Err(CommandError::Failed(format!("rollout halted: {reason}"))),
            },
        ]);
        if let Some((scope, waiters)) = rollout.pending {
            effects.push(Effect::Restart { scope, waiters });
        }
        effects
    }

    fn finish(&mut self, now: Instant) -> Vec<Effect> {
        let rollout = std::mem::take(self);
        let mut effects = Vec::new();
        if let Some(started) = rollout.started {
            effects.push(Effect::Finished {
                replaced: rollout.replaced,
                took: now - started,
            });
        }
        if !rollout.waiters.is_empty() {
            effects.push(Effect::Answer {
                waiters: rollout.waiters,
                result: Ok(format!(
                    "rollout finished: {} workers replaced",
                    rollout.replaced
                )),
            });
        }
        if let Some((scope, waiters)) = rollout.pending {
            effects.push(Effect::Restart { scope, waiters });
        }
        effects
    }
}

/// Stops a step's replacement, if it was started, and lets its slot restart if it has
/// lost its worker meanwhile.
fn abandon(step: Step) -> Vec<Effect> {
    let mut effects: Vec<Effect> = step
        .worker
        .map(|worker| Effect::Discard { worker })
        .into_iter()
        .collect();
    effects.push(Effect::Refill {
        service: step.service,
        slot: step.slot,
    });
    effects
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// Slots that exist, and the ones whose worker runs outdated settings.
    #[derive(Default)]
    struct World {
        slots: HashSet<(String, usize)>,
        stale: HashSet<(String, usize)>,
    }

    impl World {
        fn new(service: &str, count: usize) -> Self {
            let slots = (0..count).map(|i| (service.to_owned(), i)).collect();
            World {
                slots,
                stale: HashSet::new(),
            }
        }
    }

    impl Slots for World {
        fn wanted(&self, t: &Target) -> bool {
            let key = (t.service.clone(), t.slot);
            self.slots.contains(&key) && (t.why == Why::Restart || self.stale.contains(&key))
        }
    }

    fn restart(service: &str, slots: std::ops::Range<usize>) -> Vec<Target> {
        slots
            .map(|slot| Target {
                service: service.to_owned(),
                slot,
                why: Why::Restart,
            })
            .collect()
    }

    fn stale(service: &str, slot: usize) -> Target {
        Target {
            service: service.to_owned(),
            slot,
            why: Why::Stale,
        }
    }

    /// What a list of effects says, in short: `spawn web/0`, `swap 7`, …
    fn say(effects: &[Effect]) -> Vec<String> {
        effects
            .iter()
            .map(|e| match e {
                Effect::Spawn { service, slot } => format!("spawn {service}/{slot}"),
                Effect::Swap { worker } => format!("swap {worker}"),
                Effect::Discard { worker } => format!("discard {worker}"),
                Effect::Refill { service, slot } => format!("refill {service}/{slot}"),
                Effect::WatchUntil { worker, .. } => format!("watch {worker}"),
                Effect::Began { queued } => format!("began {queued}"),
                Effect::Finished { replaced, .. } => format!("finished {replaced}"),
                Effect::Halted { remaining, .. } => format!("halted {remaining}"),
                Effect::Answer { waiters, result } => {
                    format!("answer {} {}", waiters.len(), result.is_ok())
                }
                Effect::Restart { scope, waiters } => {
                    format!("restart {scope:?} {}", waiters.len())
                }
            })
            .collect()
    }

    fn waiter() -> (
        Reply,
        tokio::sync::oneshot::Receiver<Result<String, CommandError>>,
    ) {
        tokio::sync::oneshot::channel()
    }

    const WATCH: Duration = Duration::from_secs(10);

    #[test]
    fn the_next_slot_starts_as_soon_as_the_previous_replacement_is_ready() {
        let world = World::new("web", 2);
        let now = Instant::now();
        let mut r = Rollout::default();
        let (tx, _rx) = waiter();
        let effects = r.begin(restart("web", 0..2), vec![tx], now, &world);
        assert_eq!(say(&effects), ["began 2", "spawn web/0"]);
        r.spawned(10);
        let effects = r.ready(10, now, WATCH, &world);
        assert_eq!(say(&effects), ["swap 10", "watch 10", "spawn web/1"]);
        r.spawned(11);
        let effects = r.ready(11, now, WATCH, &world);
        assert_eq!(say(&effects), ["swap 11", "watch 11"]);
        // Finished only once every replacement has stayed up for its watch.
        assert!(say(&r.watch_over(10, now, &world)).is_empty());
        let effects = r.watch_over(11, now + WATCH, &world);
        assert_eq!(say(&effects), ["finished 2", "answer 1 true"]);
        assert!(!r.active());
    }

    #[test]
    fn a_replacement_that_exits_within_its_watch_halts_the_rollout() {
        let world = World::new("web", 3);
        let now = Instant::now();
        let mut r = Rollout::default();
        let (tx, _rx) = waiter();
        r.begin(restart("web", 0..3), vec![tx], now, &world);
        r.spawned(10);
        r.ready(10, now, WATCH, &world);
        r.spawned(11);
        let effects = r.exited(10, "exited".into());
        // The next slot's replacement, starting meanwhile, is stopped with it.
        assert_eq!(
            say(&effects),
            ["discard 11", "refill web/1", "halted 1", "answer 1 false"]
        );
        assert!(!r.active());
        assert_eq!(r.replacing(11), None);
    }

    #[test]
    fn a_replacement_not_ready_in_time_is_discarded_and_its_slot_refilled() {
        let world = World::new("web", 2);
        let now = Instant::now();
        let mut r = Rollout::default();
        r.begin(restart("web", 0..2), Vec::new(), now, &world);
        r.spawned(10);
        let effects = r.not_ready(10, "late".into());
        assert_eq!(
            say(&effects),
            ["discard 10", "refill web/0", "halted 1", "answer 0 false"]
        );
        // A late report for it changes nothing.
        assert!(r.ready(10, now, WATCH, &world).is_empty());
    }

    #[test]
    fn a_replacement_that_exits_before_it_is_ready_refills_its_slot() {
        let world = World::new("web", 1);
        let now = Instant::now();
        let mut r = Rollout::default();
        r.begin(restart("web", 0..1), Vec::new(), now, &world);
        r.spawned(10);
        let effects = r.exited(10, "crashed".into());
        assert_eq!(
            say(&effects),
            ["refill web/0", "halted 0", "answer 0 false"]
        );
    }

    #[test]
    fn restarts_during_a_rollout_coalesce_into_one_that_runs_after_it() {
        let world = World::new("web", 1);
        let now = Instant::now();
        let mut r = Rollout::default();
        r.begin(restart("web", 0..1), Vec::new(), now, &world);
        r.spawned(10);
        let (a, _ra) = waiter();
        let (b, _rb) = waiter();
        r.coalesce(
            Scope::Worker {
                service: "web".into(),
                slot: 0,
            },
            vec![a],
        );
        r.coalesce(Scope::Service("web".into()), vec![b]);
        let effects = r.ready(10, now, Duration::ZERO, &world);
        assert_eq!(
            say(&effects),
            ["swap 10", "finished 1", "restart Service(\"web\") 2"]
        );
    }

    #[test]
    fn a_coalesced_restart_runs_even_after_a_halt() {
        let world = World::new("web", 1);
        let now = Instant::now();
        let mut r = Rollout::default();
        r.begin(restart("web", 0..1), Vec::new(), now, &world);
        r.spawned(10);
        r.coalesce(Scope::Service("api".into()), Vec::new());
        r.coalesce(Scope::Service("web".into()), Vec::new());
        let effects = r.not_ready(10, "late".into());
        assert_eq!(say(&effects).last().unwrap(), "restart All 0");
    }

    #[test]
    fn a_reverted_change_skips_its_stale_slots() {
        let mut world = World::new("web", 2);
        world.stale.insert(("web".into(), 0));
        world.stale.insert(("web".into(), 1));
        let now = Instant::now();
        let mut r = Rollout::default();
        r.queue(vec![stale("web", 0), stale("web", 1)], now);
        assert_eq!(say(&r.advance(now, &world)), ["spawn web/0"]);
        r.spawned(10);
        // The change is reverted: slot 1 runs its service's settings again.
        world.stale.clear();
        let effects = r.ready(10, now, Duration::ZERO, &world);
        assert_eq!(say(&effects), ["swap 10", "finished 1"]);
    }

    #[test]
    fn a_reload_during_a_rollout_drops_the_step_of_a_removed_slot_and_goes_on() {
        let mut world = World::new("web", 3);
        let now = Instant::now();
        let mut r = Rollout::default();
        r.begin(restart("web", 0..3), Vec::new(), now, &world);
        r.spawned(10);
        r.ready(10, now, Duration::ZERO, &world);
        r.spawned(11);
        // Scaled down to one worker: slot 1's replacement and slot 2 are gone.
        world.slots.remove(&("web".into(), 1));
        world.slots.remove(&("web".into(), 2));
        assert_eq!(say(&r.drop_step("web", 1)), ["discard 11", "refill web/1"]);
        // Slot 1 goes back to the queue, and is skipped now that it is gone.
        // A stale slot queued by the same reload is taken next.
        world.stale.insert(("web".into(), 0));
        r.queue(vec![stale("web", 0)], now);
        assert_eq!(say(&r.advance(now, &world)), ["spawn web/0"]);
    }

    #[test]
    fn a_restart_of_a_slot_whose_stale_replacement_starts_survives_a_reverted_reload() {
        let mut world = World::new("web", 1);
        world.stale.insert(("web".into(), 0));
        let now = Instant::now();
        let mut r = Rollout::default();
        r.queue(vec![stale("web", 0)], now);
        r.advance(now, &world);
        r.spawned(10);
        // `lb restart` after the reload that queued it: the step becomes a restart's.
        r.begin(restart("web", 0..1), Vec::new(), now, &world);
        world.stale.clear();
        assert_eq!(say(&r.drop_step("web", 0)), ["discard 10", "refill web/0"]);
        assert_eq!(say(&r.advance(now, &world)), ["spawn web/0"]);
    }

    #[test]
    fn a_slot_a_restart_asked_for_is_still_replaced_after_a_reverted_reload() {
        let world = World::new("web", 2);
        let now = Instant::now();
        let mut r = Rollout::default();
        r.begin(restart("web", 0..2), Vec::new(), now, &world);
        r.spawned(10);
        // A reload made slot 0's replacement outdated: it is dropped, not the restart.
        assert_eq!(say(&r.drop_step("web", 0)), ["discard 10", "refill web/0"]);
        assert_eq!(say(&r.advance(now, &world)), ["spawn web/0"]);
    }

    #[test]
    fn a_restart_upgrades_a_queued_stale_slot_and_a_starting_slot_is_not_queued_twice() {
        let mut world = World::new("web", 2);
        world.stale.insert(("web".into(), 0));
        world.stale.insert(("web".into(), 1));
        let now = Instant::now();
        let mut r = Rollout::default();
        r.queue(vec![stale("web", 0), stale("web", 1)], now);
        r.advance(now, &world);
        r.spawned(10);
        r.queue(restart("web", 0..2), now);
        // Slot 0 is starting now; slot 1 is a restart now, so it is replaced even
        // once its settings are current again.
        world.stale.clear();
        r.ready(10, now, Duration::ZERO, &world);
        assert_eq!(r.step.as_ref().map(|s| s.slot), Some(1));
        r.spawned(11);
        assert_eq!(
            say(&r.ready(11, now, Duration::ZERO, &world)),
            ["swap 11", "finished 2"]
        );
    }

    #[test]
    fn stopping_discards_the_starting_replacement_and_answers_everyone() {
        let world = World::new("web", 2);
        let now = Instant::now();
        let mut r = Rollout::default();
        let (a, _ra) = waiter();
        let (b, _rb) = waiter();
        r.begin(restart("web", 0..2), vec![a], now, &world);
        r.spawned(10);
        r.coalesce(Scope::All, vec![b]);
        assert_eq!(say(&r.abort()), ["discard 10", "answer 2 false"]);
        assert!(!r.active());
    }

    #[test]
    fn a_slot_that_fails_to_spawn_halts_and_is_refilled() {
        let world = World::new("web", 2);
        let now = Instant::now();
        let mut r = Rollout::default();
        r.begin(restart("web", 0..2), Vec::new(), now, &world);
        assert_eq!(
            say(&r.spawn_failed("no such file".into())),
            ["refill web/0", "halted 1", "answer 0 false"]
        );
    }

    #[test]
    fn scopes_widen_to_cover_every_request() {
        let w = |slot| Scope::Worker {
            service: "web".into(),
            slot,
        };
        assert_eq!(w(1).union(w(1)), w(1));
        assert_eq!(w(1).union(w(2)), Scope::Service("web".into()));
        assert_eq!(
            Scope::Service("web".into()).union(w(2)),
            Scope::Service("web".into())
        );
        assert_eq!(
            Scope::Service("web".into()).union(Scope::Service("api".into())),
            Scope::All
        );
    }
}
