//! One worker process, from spawn to reaped, as one record addressed by its id, and its
//! life as a state machine: [`Worker::on`] takes an event and returns the effects the
//! supervisor carries out (signals, probes, timers, messages). Nothing here touches a
//! process, a socket or a clock of its own, so every transition is tested without one.
//!
//! ```text
//! Starting ──ready──▶ Ready ──refused, unhealthy──▶ Refused ──ready──▶ Ready
//!     │                 │                   │
//!     └──────retire─────┴───────────────────┴──▶ Draining ──drained──▶ Stopping
//!                                                                       │
//!          (any state) ──kill──▶ Stopping{killed}       leader reaped, group alive
//!                                                                       ▼
//!                                                                   Lingering ──group gone──▶ gone
//! ```

use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::health::Health;
use super::state::WorkerState;
use super::usage::Usage;
use crate::channel::Channel;
use crate::config::WorkersConfig;
use crate::snapshot::{Backend, BackendId};

/// A worker's id: the id of its backend, unique for the life of lb.
pub(super) type WorkerId = BackendId;

/// After SIGKILL, how long a process group may take to be gone before lb stops waiting.
pub(super) const KILL_GRACE: Duration = Duration::from_secs(2);

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Life {
    /// Spawned; probed until it accepts connections (or says "ready").
    Starting,
    /// In rotation.
    Ready,
    /// It was ready, then a connect to it failed or its health checks did: out of
    /// rotation since `since`, until it accepts (or passes its checks) again.
    Refused { since: Instant },
    /// Out of rotation for good; its open connections finish until `until`.
    Draining { until: Instant },
    /// `stop_signal` (or SIGKILL, when `killed`) sent; SIGKILL at `until`.
    Stopping { until: Instant, killed: bool },
    /// Its first process was reaped after lb asked it to stop, while the rest of its
    /// process group still runs (a wrapper shell that did not `exec`).
    Lingering { until: Instant, killed: bool },
}

/// What happens to a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Input {
    /// Its probe connected, or it said "ready".
    Ready,
    /// A connect from the proxy failed.
    Refused,
    /// Its health checks failed `fall` times in a row.
    Unhealthy,
    /// Take it out of rotation for good (rollout, scale-down, removal, lb's stop); its
    /// connections may finish until `until`.
    Retire { until: Instant },
    /// Its open connections are gone, or its drain deadline passed.
    Drained,
    /// Stop it at once (a replacement that failed or is no longer wanted).
    Kill,
    /// The deadline set for this instant passed (one set for an earlier state is stale).
    Deadline(Instant),
    /// Its first process was reaped; `group_alive`: other processes of its group remain.
    Exited { group_alive: bool },
    /// Its process group is gone.
    GroupGone,
}

/// What the supervisor does for a worker after a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Effect {
    /// Put it (back) in rotation: clear its connect-failure mark.
    MarkUp,
    /// Find out when it accepts again: its health checks, or else a probe.
    Recheck,
    /// Stop probing and checking it.
    CancelProbe,
    /// Tell it on its channel to let its idle connections go, with what is left of its
    /// drain time (contract §3).
    SendDrain { timeout_ms: u64 },
    /// Report `Drained` once it has no open connection, or at `until`.
    WatchDrain { until: Instant },
    /// Close every connection still open to it.
    CloseConnections,
    /// Signal its whole process group.
    Signal(Signal),
    /// Report `Deadline` for this instant when it comes.
    DeadlineAt(Instant),
    /// Poll whether its process group is gone.
    WatchGroup,
    /// Its record can go: the process and its group are gone.
    Forget,
}

/// A worker process that lb started.
#[derive(Debug)]
pub(super) struct Worker {
    pub id: WorkerId,
    pub service: Arc<str>,
    pub slot: usize,
    pub backend: Arc<Backend>,
    /// Its first process; also its process group id.
    pub pid: Pid,
    /// The settings it was started with; it drains and stops by them too.
    pub config: Arc<WorkersConfig>,
    /// lb's end of its message channel, open until the worker is reaped.
    pub channel: Channel,
    pub started: Instant,
    /// When it first became ready.
    pub ready_at: Option<Instant>,
    pub life: Life,
    /// Why it left rotation (`rollout`, `scale`, `removed`, `health`, `stop`).
    pub leave_reason: Option<&'static str>,
    /// Cancels its readiness or recheck probe, and its health checks.
    pub probe: CancellationToken,
    /// What its health checks say, once it is ready.
    pub health: Health,
    /// Its memory and CPU, sampled every second.
    pub usage: Usage,
    /// Messages dropped in the current run of drops (0: it reads its channel).
    pub dropped: u64,
    pub last_drop: Option<Instant>,
}

impl Worker {
    /// Applies `input` at `now` and returns what to do about it.
    pub(super) fn on(&mut self, input: Input, now: Instant) -> Vec<Effect> {
        let (life, effects) = transition(self.life, input, now, self.config.as_ref());
        if life != self.life && matches!(life, Life::Ready) && self.ready_at.is_none() {
            self.ready_at = Some(now);
        }
        self.life = life;
        effects
    }

    /// Whether it takes new connections.
    pub(super) fn in_rotation(&self) -> bool {
        self.life == Life::Ready
    }

    /// Whether it has left rotation for good.
    pub(super) fn leaving(&self) -> bool {
        matches!(
            self.life,
            Life::Draining { .. } | Life::Stopping { .. } | Life::Lingering { .. }
        )
    }

    /// The state `/status` and `lb_workers` show.
    pub(super) fn state(&self) -> WorkerState {
        match self.life {
            Life::Starting | Life::Refused { .. } => WorkerState::Starting,
            Life::Ready => WorkerState::Ready,
            Life::Draining { .. } | Life::Stopping { .. } | Life::Lingering { .. } => {
                WorkerState::Draining
            }
        }
    }
}

/// The settings a transition reads.
pub(super) trait Timing {
    fn stop_signal(&self) -> Signal;
    fn stop_timeout(&self) -> Duration;
}

impl Timing for WorkersConfig {
    fn stop_signal(&self) -> Signal {
        self.stop_signal
    }
    fn stop_timeout(&self) -> Duration {
        self.stop_timeout
    }
}

/// The whole life of a worker: (state, input) → (state, effects).
pub(super) fn transition(
    life: Life,
    input: Input,
    now: Instant,
    cfg: &impl Timing,
) -> (Life, Vec<Effect>) {
    use Effect as E;
    use Life as L;
    let kill = |until| {
        (
            L::Stopping {
                until,
                killed: true,
            },
            vec![
                E::CancelProbe,
                E::CloseConnections,
                E::Signal(Signal::SIGKILL),
                E::DeadlineAt(until),
            ],
        )
    };
    match (life, input) {
        (L::Stopping { until, .. } | L::Lingering { until, .. }, Input::Deadline(at))
            if at != until =>
        {
            (life, Vec::new())
        }
        (L::Starting | L::Refused { .. }, Input::Ready) => (L::Ready, vec![E::MarkUp]),
        (L::Ready, Input::Refused) => (L::Refused { since: now }, vec![E::Recheck]),
        // Its checks go on and bring it back.
        (L::Ready, Input::Unhealthy) => (L::Refused { since: now }, Vec::new()),
        (L::Starting | L::Ready | L::Refused { .. }, Input::Retire { until }) => {
            let left = until.saturating_duration_since(now);
            let timeout_ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
            (
                L::Draining { until },
                vec![
                    E::CancelProbe,
                    E::SendDrain { timeout_ms },
                    E::WatchDrain { until },
                ],
            )
        }
        (L::Draining { .. }, Input::Drained) => {
            let until = now + cfg.stop_timeout();
            (
                L::Stopping {
                    until,
                    killed: false,
                },
                vec![
                    E::CloseConnections,
                    E::Signal(cfg.stop_signal()),
                    E::DeadlineAt(until),
                ],
            )
        }
        (L::Stopping { killed: true, .. } | L::Lingering { killed: true, .. }, Input::Kill) => {
            (life, Vec::new())
        }
        // SIGKILLed and still not gone (stuck in the kernel): lb stops waiting for it.
        (
            L::Stopping { killed: true, .. } | L::Lingering { killed: true, .. },
            Input::Deadline(_),
        ) => (life, vec![E::Forget]),
        (L::Stopping { .. }, Input::Kill | Input::Deadline(_)) => kill(now + KILL_GRACE),
        (L::Lingering { .. }, Input::Kill | Input::Deadline(_)) => {
            let until = now + KILL_GRACE;
            (
                L::Lingering {
                    until,
                    killed: true,
                },
                vec![E::Signal(Signal::SIGKILL), E::DeadlineAt(until)],
            )
        }
        (L::Stopping { .. } | L::Lingering { .. }, Input::Exited { group_alive: false })
        | (L::Lingering { .. }, Input::GroupGone) => (life, vec![E::Forget]),
        (L::Stopping { until, killed } | L::Lingering { until, killed }, Input::Exited { .. }) => {
            (L::Lingering { until, killed }, vec![E::WatchGroup])
        }
        (_, Input::Kill) => kill(now + KILL_GRACE),
        // It quit on its own while draining (the drain message told it to): the rest of
        // its group may still be finishing, and gets its stop_timeout, as if asked.
        (L::Draining { .. }, Input::Exited { group_alive: true }) => {
            let until = now + cfg.stop_timeout();
            (
                L::Lingering {
                    until,
                    killed: false,
                },
                vec![E::CloseConnections, E::WatchGroup, E::DeadlineAt(until)],
            )
        }
        // Exited unasked, in rotation or starting (a crash): its group goes with it,
        // since nothing there is shutting down on purpose.
        (_, Input::Exited { .. }) => (
            life,
            vec![E::CancelProbe, E::Signal(Signal::SIGKILL), E::Forget],
        ),
        // Stale reports: a probe that finished after the worker left rotation, a second
        // drain report, a deadline of a state it already left.
        _ => (life, Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Cfg;
    impl Timing for Cfg {
        fn stop_signal(&self) -> Signal {
            Signal::SIGINT
        }
        fn stop_timeout(&self) -> Duration {
            Duration::from_secs(10)
        }
    }

    fn step(life: Life, input: Input, now: Instant) -> (Life, Vec<Effect>) {
        transition(life, input, now, &Cfg)
    }

    #[test]
    fn ready_and_refused_move_in_and_out_of_rotation() {
        let now = Instant::now();
        assert_eq!(
            step(Life::Starting, Input::Ready, now),
            (Life::Ready, vec![Effect::MarkUp])
        );
        let refused = Life::Refused { since: now };
        assert_eq!(
            step(Life::Ready, Input::Refused, now),
            (refused, vec![Effect::Recheck])
        );
        assert_eq!(
            step(refused, Input::Ready, now),
            (Life::Ready, vec![Effect::MarkUp])
        );
        // A second report of a refused connect changes nothing, nor does its being
        // found unhealthy too: it stays out since the first.
        let later = now + Duration::from_secs(1);
        assert_eq!(step(refused, Input::Refused, later), (refused, vec![]));
        assert_eq!(step(refused, Input::Unhealthy, later), (refused, vec![]));
        // Failed checks take it out with no probe of their own: the checks go on.
        assert_eq!(step(Life::Ready, Input::Unhealthy, now), (refused, vec![]));
    }

    #[test]
    fn retiring_sends_the_drain_message_with_its_own_deadline() {
        let now = Instant::now();
        let until = now + Duration::from_secs(30);
        let (life, effects) = step(Life::Ready, Input::Retire { until }, now);
        assert_eq!(life, Life::Draining { until });
        assert_eq!(
            effects,
            vec![
                Effect::CancelProbe,
                Effect::SendDrain { timeout_ms: 30_000 },
                Effect::WatchDrain { until }
            ]
        );
        // A late probe result does not bring a draining worker back.
        assert_eq!(step(life, Input::Ready, now).0, life);
        assert_eq!(step(life, Input::Retire { until }, now), (life, vec![]));
        // Retired with part of its drain time already spent (lb's stop counts it from
        // when the listeners closed), the message says what is left.
        let (_, effects) = step(
            Life::Ready,
            Input::Retire { until },
            now + Duration::from_secs(12),
        );
        assert_eq!(effects[1], Effect::SendDrain { timeout_ms: 18_000 });
    }

    #[test]
    fn drained_sends_its_own_stop_signal_then_sigkill_at_its_deadline() {
        let now = Instant::now();
        let draining = Life::Draining { until: now };
        let until = now + Duration::from_secs(10);
        let (life, effects) = step(draining, Input::Drained, now);
        assert_eq!(
            life,
            Life::Stopping {
                until,
                killed: false
            }
        );
        assert_eq!(
            effects,
            vec![
                Effect::CloseConnections,
                Effect::Signal(Signal::SIGINT),
                Effect::DeadlineAt(until)
            ]
        );
        let (life, effects) = step(life, Input::Deadline(until), until);
        assert!(matches!(life, Life::Stopping { killed: true, .. }));
        assert!(effects.contains(&Effect::Signal(Signal::SIGKILL)));
        let grace = until + KILL_GRACE;
        // Killed once; a deadline set for an earlier state is stale; still there after
        // the grace period: lb stops waiting for it.
        assert_eq!(step(life, Input::Kill, until), (life, vec![]));
        assert_eq!(step(life, Input::Deadline(until), grace), (life, vec![]));
        assert_eq!(
            step(life, Input::Deadline(grace), grace),
            (life, vec![Effect::Forget])
        );
    }

    #[test]
    fn a_wrapper_that_exits_first_leaves_its_group_lingering_until_the_same_deadline() {
        let now = Instant::now();
        let stopping = Life::Stopping {
            until: now,
            killed: false,
        };
        let (life, effects) = step(stopping, Input::Exited { group_alive: true }, now);
        assert_eq!(
            life,
            Life::Lingering {
                until: now,
                killed: false
            }
        );
        assert_eq!(effects, vec![Effect::WatchGroup]);
        let (life, effects) = step(life, Input::Deadline(now), now);
        assert!(matches!(life, Life::Lingering { killed: true, .. }));
        assert!(effects.contains(&Effect::Signal(Signal::SIGKILL)));
        assert_eq!(step(life, Input::GroupGone, now).1, vec![Effect::Forget]);
    }

    #[test]
    fn exiting_unasked_takes_the_group_with_it() {
        let now = Instant::now();
        for life in [Life::Starting, Life::Ready, Life::Refused { since: now }] {
            let (_, effects) = step(life, Input::Exited { group_alive: true }, now);
            assert_eq!(
                effects,
                vec![
                    Effect::CancelProbe,
                    Effect::Signal(Signal::SIGKILL),
                    Effect::Forget
                ]
            );
        }
    }

    #[test]
    fn a_stop_during_a_drain_keeps_its_deadline_and_a_second_signal_kills() {
        let now = Instant::now();
        let until = now + Duration::from_secs(30);
        let draining = Life::Draining { until };
        // lb's graceful stop retires every worker; one already draining from a rollout
        // keeps its own, earlier deadline.
        let later = now + Duration::from_secs(40);
        assert_eq!(
            step(draining, Input::Retire { until: later }, now),
            (draining, vec![])
        );
        // A second SIGTERM: closed and killed at once.
        let (life, effects) = step(draining, Input::Kill, now);
        assert!(matches!(life, Life::Stopping { killed: true, .. }));
        assert!(effects.contains(&Effect::CloseConnections));
        assert!(effects.contains(&Effect::Signal(Signal::SIGKILL)));
    }

    #[test]
    fn a_draining_app_that_quits_leaves_its_group_its_stop_timeout() {
        let now = Instant::now();
        let draining = Life::Draining { until: now };
        let until = now + Duration::from_secs(10);
        let (life, effects) = step(draining, Input::Exited { group_alive: true }, now);
        assert_eq!(
            life,
            Life::Lingering {
                until,
                killed: false
            }
        );
        assert!(!effects.contains(&Effect::Signal(Signal::SIGKILL)));
        assert_eq!(
            step(draining, Input::Exited { group_alive: false }, now).1,
            vec![
                Effect::CancelProbe,
                Effect::Signal(Signal::SIGKILL),
                Effect::Forget
            ]
        );
    }

    #[test]
    fn a_killed_replacement_is_forgotten_once_reaped() {
        let now = Instant::now();
        let (life, effects) = step(Life::Starting, Input::Kill, now);
        assert!(matches!(life, Life::Stopping { killed: true, .. }));
        assert!(effects.contains(&Effect::Signal(Signal::SIGKILL)));
        assert_eq!(
            step(life, Input::Exited { group_alive: false }, now).1,
            vec![Effect::Forget]
        );
    }
}
