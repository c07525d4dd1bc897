//! lb's own graceful stop (SIGTERM/SIGINT): stop accepting, let connections finish up
//! to the longest `drain_timeout`, send every worker its `stop_signal`, SIGKILL what is
//! left after `stop_timeout`. A second stop skips straight to SIGKILL.

use std::time::Duration;

use nix::sys::signal::Signal;
use tracing::{info, warn};

use super::service::ServiceState;
use super::{Event, Supervisor, WorkerState, worker};

/// Drain time for a stop when no service has workers (and so no `drain_timeout`).
const DEFAULT_DRAIN: Duration = Duration::from_secs(30);
/// After SIGKILL, how long to wait for the kernel to report every worker gone.
const KILL_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Running,
    /// Listeners closed; open connections finishing.
    Draining,
    /// `stop_signal` sent to every worker.
    StoppingWorkers,
    /// SIGKILL sent to every worker.
    Killing,
    /// Some worker was never reported gone after SIGKILL; lb exits anyway.
    Abandoned,
}

impl Supervisor {
    pub(super) fn stop(&mut self, fast: bool) {
        if fast || self.phase != Phase::Running {
            info!("stopping now: closing connections and killing workers");
            self.kill_all();
            return;
        }
        self.phase = Phase::Draining;
        self.rollout_abort();
        self.close_listeners();
        self.proxy.tracker.close();
        for svc in &mut self.services {
            for w in svc.slots.iter_mut().filter_map(|s| s.worker.as_mut()) {
                w.state = WorkerState::Draining;
            }
        }
        let drain = self.drain_timeout();
        info!(connections = self.proxy.tracker.len(), drain_timeout = ?drain, "stopping: listeners closed, waiting for open connections");
        let (tracker, tx) = (self.proxy.tracker.clone(), self.tx.clone());
        tokio::spawn(async move {
            let timed_out = tokio::time::timeout(drain, tracker.wait()).await.is_err();
            let _ = tx.send(Event::Drained { timed_out });
        });
    }

    pub(super) fn drained(&mut self, timed_out: bool) {
        if self.phase != Phase::Draining {
            return;
        }
        if timed_out {
            warn!(
                connections = self.proxy.tracker.len(),
                "drain_timeout passed; closing the remaining connections"
            );
        } else {
            info!("all connections finished");
        }
        self.proxy.connections.cancel();
        self.phase = Phase::StoppingWorkers;
        let mut stop_timeout = Duration::ZERO;
        for w in self.services.iter().flat_map(ServiceState::processes) {
            w.probe.cancel();
            worker::signal_group(w.pid, w.config.stop_signal);
            stop_timeout = stop_timeout.max(w.config.stop_timeout);
        }
        for r in self.retiring.iter_mut().filter(|r| !r.stopping) {
            worker::signal_group(r.worker.pid, r.worker.config.stop_signal);
            r.stopping = true;
            stop_timeout = stop_timeout.max(r.worker.config.stop_timeout);
        }
        info!(
            workers = self.processes().count(),
            ?stop_timeout,
            "stopping workers"
        );
        self.after(stop_timeout, Event::StopDeadline);
    }

    pub(super) fn kill_all(&mut self) {
        if matches!(self.phase, Phase::Killing | Phase::Abandoned) {
            return;
        }
        self.phase = Phase::Killing;
        self.rollout_abort();
        self.close_listeners();
        self.proxy.tracker.close();
        self.proxy.connections.cancel();
        let remaining = self.processes().count();
        if remaining > 0 {
            warn!(workers = remaining, "killing workers that did not stop");
        }
        for w in self.processes() {
            w.probe.cancel();
            worker::signal_group(w.pid, Signal::SIGKILL);
        }
        self.kill_all_lingering();
        // A worker the kernel never reports gone (stuck in an uninterruptible wait) must
        // not keep lb from exiting.
        self.after(KILL_GRACE, Event::KillGraceOver);
    }

    /// Stops accepting and closes every listening socket, the copies kept for reload
    /// hand-overs included, so new clients are refused at once rather than left in a
    /// backlog nobody accepts from.
    fn close_listeners(&mut self) {
        self.proxy.accept.cancel();
        for svc in &mut self.services {
            svc.listeners.close_all();
        }
    }

    pub(super) fn finished(&self) -> bool {
        match self.phase {
            Phase::Running | Phase::Draining => false,
            Phase::StoppingWorkers | Phase::Killing => {
                self.processes().next().is_none() && !self.has_lingering()
            }
            Phase::Abandoned => true,
        }
    }

    /// The longest `drain_timeout` of any worker running, retiring ones included.
    fn drain_timeout(&self) -> Duration {
        let configured = self
            .services
            .iter()
            .filter_map(|s| s.config.workers.as_ref())
            .map(|w| w.drain_timeout);
        let running = self.processes().map(|w| w.config.drain_timeout);
        configured.chain(running).max().unwrap_or(DEFAULT_DRAIN)
    }
}
