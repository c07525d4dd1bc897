//! lb's own graceful stop (SIGTERM/SIGINT, contract §4):
//!
//! 1. `/healthz` answers 503 at once, and lb keeps accepting for `shutdown_delay`, so a
//!    load balancer in front sees it leave before any client is refused;
//! 2. the listeners stop: each accepts what the kernel has already queued (as
//!    `max_connections` allows) and closes, so no client that completed its handshake
//!    is reset;
//! 3. every worker leaves rotation the way a rollout retires one: the drain message, its
//!    own `drain_timeout`, its own `stop_signal`, SIGKILL after its own `stop_timeout`;
//!    connections to static backends get the longest drain time;
//! 4. lb exits once every worker is gone and every connection has ended.
//!
//! A second signal SIGKILLs everything at once.

use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use super::life::{Input, Life};
use super::{Event, Supervisor};
use crate::config::STATIC_DRAIN_TIMEOUT;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Running,
    /// `/healthz` answers 503; listeners accept until `shutdown_delay` passes.
    Leaving,
    /// Listeners accept only what the kernel has queued, then close; every drain
    /// deadline counts from `since`; `open` services still have a listener.
    Closing {
        since: Instant,
        open: usize,
    },
    /// Listeners closed; workers drain and stop, connections finish.
    Draining {
        connections_done: bool,
    },
    /// A second signal: everything was SIGKILLed.
    Killing,
}

impl Phase {
    /// Whether a worker that exits is restarted: as long as lb still takes clients.
    pub(super) fn keeps_workers(self) -> bool {
        matches!(
            self,
            Phase::Running | Phase::Leaving | Phase::Closing { .. }
        )
    }
}

impl Supervisor {
    pub(super) fn stop(&mut self) {
        if self.phase != Phase::Running {
            info!("stopping now: closing connections and killing workers");
            self.kill_all();
            return;
        }
        self.phase = Phase::Leaving;
        self.notifier.stopping();
        if self.rollout.active() {
            warn!("rollout abandoned: lb is stopping");
        }
        let effects = self.rollout.abort();
        self.carry_out(effects);
        if self.shutdown_delay.is_zero() {
            self.close_listeners();
        } else {
            info!(shutdown_delay = ?self.shutdown_delay, "stopping: /healthz answers 503; still accepting until shutdown_delay passes");
            self.after(self.shutdown_delay, Event::DelayOver);
        }
    }

    pub(super) fn delay_over(&mut self) {
        if self.phase == Phase::Leaving {
            self.close_listeners();
        }
    }

    /// Stops every listener; each accepts what is already queued (for at most its
    /// service's drain time), then closes. The longest drain time starts now.
    fn close_listeners(&mut self) {
        let since = Instant::now();
        self.phase = Phase::Closing {
            since,
            open: self.services.len(),
        };
        let drain = self.longest_drain();
        info!(connections = self.proxy.tracker.len(), drain_timeout = ?drain, "stopping: listeners closed to new clients; serving the queued and open connections");
        for svc in &mut self.services {
            // No new connection will need a backend's address.
            svc.names.stop();
            let closing = svc
                .listeners
                .close_gracefully(since + svc.config.drain_timeout());
            let (tx, service) = (self.tx.clone(), svc.config.name.clone());
            tokio::spawn(async move {
                for accept_loop in closing {
                    let _ = accept_loop.await;
                }
                let _ = tx.send(Event::ListenersClosed { service });
            });
        }
        self.after(drain, Event::DrainDeadline);
        self.all_listeners_closed();
    }

    /// Every client queued for `service` is accepted: its workers leave rotation and
    /// drain, each until its drain time from when lb stopped taking new clients is over,
    /// so a stop takes no longer than `lb check` says.
    pub(super) fn listeners_closed(&mut self, service: &str) {
        let Phase::Closing { since, open } = &mut self.phase else {
            return;
        };
        *open = open.saturating_sub(1);
        let since = *since;
        let retiring: Vec<_> = self
            .workers
            .values()
            .filter(|w| *w.service == *service)
            .map(|w| (w.id, since + w.config.drain_timeout))
            .collect();
        for (id, until) in retiring {
            self.retire_until(id, "stop", until);
        }
        self.all_listeners_closed();
    }

    /// Once no service has a listener left: every worker drains, connections finish.
    fn all_listeners_closed(&mut self) {
        let Phase::Closing { since, open: 0 } = self.phase else {
            return;
        };
        self.phase = Phase::Draining {
            connections_done: false,
        };
        // Workers of no service (removed by a reload, still draining) keep their own
        // deadlines; any other goes now.
        let rest: Vec<_> = self
            .workers
            .values()
            .map(|w| (w.id, since + w.config.drain_timeout))
            .collect();
        for (id, until) in rest {
            self.retire_until(id, "stop", until);
        }
        let (tracker, tx) = (self.proxy.tracker.clone(), self.tx.clone());
        tracker.close();
        tokio::spawn(async move {
            tracker.wait().await;
            let _ = tx.send(Event::ConnectionsDone);
        });
    }

    /// Every proxied connection has ended.
    pub(super) fn connections_done(&mut self) {
        if let Phase::Draining { connections_done } = &mut self.phase {
            *connections_done = true;
            info!("all connections finished");
        }
    }

    /// The longest drain time is over: whatever is still open is closed.
    pub(super) fn drain_deadline(&mut self) {
        if matches!(
            self.phase,
            Phase::Closing { .. }
                | Phase::Draining {
                    connections_done: false
                }
        ) {
            warn!(
                connections = self.proxy.tracker.len(),
                "drain_timeout passed; closing the remaining connections"
            );
            self.proxy.connections.cancel();
        }
    }

    pub(super) fn kill_all(&mut self) {
        if self.phase == Phase::Killing {
            return;
        }
        self.phase = Phase::Killing;
        let effects = self.rollout.abort();
        self.carry_out(effects);
        for svc in &mut self.services {
            svc.listeners.close_all();
        }
        self.proxy.tracker.close();
        self.proxy.connections.cancel();
        if !self.workers.is_empty() {
            warn!(workers = self.workers.len(), "killing every worker");
        }
        let ids: Vec<_> = self.workers.keys().copied().collect();
        for id in ids {
            self.drive(id, Input::Kill);
        }
    }

    pub(super) fn finished(&self) -> bool {
        match self.phase {
            Phase::Running | Phase::Leaving | Phase::Closing { .. } => false,
            Phase::Draining { connections_done } => connections_done && self.workers.is_empty(),
            Phase::Killing => self.workers.is_empty(),
        }
    }

    /// How long open connections may take to finish: the longest `drain_timeout` of any
    /// service, or of any worker still running older settings.
    fn longest_drain(&self) -> Duration {
        let configured = self.services.iter().map(|s| s.config.drain_timeout());
        let running = self.workers.values().filter_map(|w| match w.life {
            Life::Draining { until } => Some(until.saturating_duration_since(Instant::now())),
            Life::Starting | Life::Ready | Life::Refused { .. } => Some(w.config.drain_timeout),
            Life::Stopping { .. } | Life::Lingering { .. } => None,
        });
        configured
            .chain(running)
            .max()
            .unwrap_or(STATIC_DRAIN_TIMEOUT)
    }
}
