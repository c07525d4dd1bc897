//! Carries out what a worker's life transitions ask for ([`Effect`]): signals to
//! its process group, probes, the drain message and drain watch, deadlines, and the
//! check that a stopped worker's whole group is gone.

use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::life::{Effect, Input, Life, WorkerId};
use super::{Event, Supervisor, orphans, probe, worker};
use crate::channel::Message;
use crate::snapshot::BackendStats;

/// How often a draining worker's open connections are counted.
const DRAIN_POLL: Duration = Duration::from_millis(50);
/// How often a worker that refused a connection is tried again.
const RECHECK_INTERVAL: Duration = Duration::from_millis(250);
/// How often lingering process groups are checked.
const GROUP_POLL: Duration = Duration::from_millis(50);

impl Supervisor {
    /// Feeds `input` to a worker's life and carries out what it says.
    pub(super) fn drive(&mut self, id: WorkerId, input: Input) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        for effect in w.on(input, Instant::now()) {
            self.worker_effect(id, effect);
        }
    }

    /// Takes a worker out of rotation for good: it is told to let its connections go,
    /// drains them for its `drain_timeout`, then stops.
    pub(super) fn retire(&mut self, id: WorkerId, reason: &'static str) {
        if let Some(w) = self.workers.get(&id) {
            let until = Instant::now() + w.config.drain_timeout;
            self.retire_until(id, reason, until);
        }
    }

    /// As [`Self::retire`], with its connections closed at `until`.
    pub(super) fn retire_until(&mut self, id: WorkerId, reason: &'static str, until: Instant) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        if w.leaving() {
            return;
        }
        w.leave_reason = Some(reason);
        info!(service = %w.service, worker = w.slot, pid = w.pid.as_raw(), %reason, connections = w.backend.stats.active(), "worker out of rotation, draining");
        self.drive(id, Input::Retire { until });
    }

    /// A worker's deadline passed: SIGKILL if it was stopping.
    pub(super) fn deadline(&mut self, id: WorkerId, at: Instant) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        if w.life
            == (Life::Stopping {
                until: at,
                killed: false,
            })
        {
            warn!(service = %w.service, worker = w.slot, pid = w.pid.as_raw(), "worker did not stop within stop_timeout; killing it");
        }
        self.drive(id, Input::Deadline(at));
    }

    /// A draining worker has no connection left, or its deadline passed.
    pub(super) fn drained(&mut self, id: WorkerId) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        if let Life::Draining { .. } = w.life {
            let open = w.backend.stats.active();
            if open > 0 {
                warn!(service = %w.service, worker = w.slot, pid = w.pid.as_raw(), connections = open, "drain_timeout passed; closing the remaining connections");
            } else {
                info!(service = %w.service, worker = w.slot, pid = w.pid.as_raw(), "worker drained");
            }
        }
        self.drive(id, Input::Drained);
    }

    fn worker_effect(&mut self, id: WorkerId, effect: Effect) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        match effect {
            Effect::MarkUp => w.backend.stats.mark_up(),
            Effect::Recheck => {
                let svc = self.services.iter().find(|s| *s.config.name == *w.service);
                let Some(svc) = svc.filter(|s| s.config.health_check.is_none()) else {
                    // Its health checks go on, and bring it back.
                    return;
                };
                w.probe.cancel();
                w.probe = CancellationToken::new();
                let (addr, token) = (w.backend.addr, w.probe.clone());
                let proxy = svc.config.proxy_protocol;
                probe::until_up(
                    id,
                    addr,
                    RECHECK_INTERVAL,
                    None,
                    proxy,
                    token,
                    self.tx.clone(),
                );
            }
            Effect::CancelProbe => w.probe.cancel(),
            // Sent once the snapshot without it is published: an app that stops
            // accepting on it must no longer be picked.
            Effect::SendDrain { timeout_ms } => self.drain_messages.push((id, timeout_ms)),
            Effect::WatchDrain { until } => {
                watch_drain(Arc::clone(&w.backend.stats), until, id, self.tx.clone());
            }
            Effect::CloseConnections => w.backend.close.cancel(),
            Effect::Signal(signal) => {
                worker::signal_group(w.pid, signal);
                // Its stop signal reaches what it left outside its group too; a SIGKILL
                // is always followed by `Forget`, which kills those, so one scan of
                // /proc per worker is enough.
                if signal != Signal::SIGKILL {
                    orphans::signal(Arc::clone(&w.service), w.backend.addr.port(), w.pid, signal);
                }
            }
            Effect::DeadlineAt(at) => self.at(at, Event::Deadline { id, at }),
            Effect::WatchGroup => {
                info!(service = %w.service, worker = w.slot, pid = w.pid.as_raw(), "worker exited; waiting for the rest of its process group");
                self.watch_groups();
            }
            Effect::Forget => {
                // Still its slot's worker: lb gave up waiting for it to be reaped (stuck
                // in the kernel after SIGKILL); the slot must not stay empty for good.
                if let Some((si, slot)) = self.slot_of(id) {
                    self.slot_lost(si, slot, id, None);
                }
                if let Some(w) = self.workers.remove(&id) {
                    w.probe.cancel();
                    self.watchdog.reaped(w.pid);
                    // Whatever it left behind outside its group (a double-forked daemon)
                    // goes with it.
                    orphans::signal(w.service, w.backend.addr.port(), w.pid, Signal::SIGKILL);
                }
            }
        }
    }

    /// Sends the drain messages of workers that have just left rotation; called once the
    /// snapshot without them is published.
    pub(super) fn send_drain_messages(&mut self) {
        for (id, timeout_ms) in std::mem::take(&mut self.drain_messages) {
            if let Some(w) = self.workers.get(&id) {
                let drain = serde_json::json!({ "lb": "drain", "timeout_ms": timeout_ms });
                w.channel.send(&Message::new(&drain));
            }
        }
    }

    fn watch_groups(&mut self) {
        if !self.checking_groups {
            self.checking_groups = true;
            self.after(GROUP_POLL, Event::GroupCheck);
        }
    }

    /// Lets the workers whose process group is gone go.
    pub(super) fn check_groups(&mut self) {
        self.checking_groups = false;
        let lingering: Vec<(WorkerId, nix::unistd::Pid)> = self
            .workers
            .values()
            .filter(|w| matches!(w.life, Life::Lingering { .. }))
            .map(|w| (w.id, w.pid))
            .collect();
        let mut still = false;
        for (id, group) in lingering {
            if worker::group_alive(group) {
                still = true;
            } else {
                info!(%group, "worker's process group stopped");
                self.drive(id, Input::GroupGone);
            }
        }
        if still {
            self.watch_groups();
        }
    }
}

/// Reports when `stats` has no open connection left, or when `until` passes.
fn watch_drain(
    stats: Arc<BackendStats>,
    until: Instant,
    id: WorkerId,
    tx: tokio::sync::mpsc::UnboundedSender<Event>,
) {
    tokio::spawn(async move {
        // One poll period first: a connection that picked this worker from the previous
        // snapshot counts itself an instant after the swap.
        tokio::time::sleep(DRAIN_POLL.min(until.saturating_duration_since(Instant::now()))).await;
        while stats.active() > 0 && Instant::now() < until {
            tokio::time::sleep(DRAIN_POLL.min(until - Instant::now())).await;
        }
        let _ = tx.send(Event::Drained { id });
    });
}
