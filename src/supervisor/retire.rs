//! Retiring a worker that left rotation (replaced by a rollout, scaled down, or its
//! service removed): let its open connections finish up to `drain_timeout`, close the
//! rest, send `stop_signal`, and SIGKILL it after `stop_timeout`.

use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::time::Instant;
use tracing::{info, warn};

use super::service::Worker;
use super::{Event, ExitStatus, Inbox, Place, Supervisor, WorkerState, worker};
use crate::snapshot::{BackendId, BackendStats};

/// How often a draining worker's open connections are counted.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// A worker out of rotation, on its way out.
#[derive(Debug)]
pub(super) struct Retiring {
    pub service: String,
    pub slot: usize,
    pub worker: Worker,
    /// Why it retires, for the logs: `rollout`, `scale`, `removed`, `failed`.
    pub reason: &'static str,
    pub since: Instant,
    /// `stop_signal` (or SIGKILL) has been sent.
    pub stopping: bool,
}

impl Supervisor {
    /// Takes a worker that is already out of the slot into retirement.
    pub(super) fn retire(
        &mut self,
        service: &str,
        slot: usize,
        mut worker: Worker,
        reason: &'static str,
    ) {
        worker.state = WorkerState::Draining;
        worker.probe.cancel();
        let stats = Arc::clone(&worker.backend.stats);
        info!(%service, worker = slot, pid = %worker.pid, %reason, connections = stats.active(), "worker out of rotation, draining");
        watch_drain(
            stats,
            worker.config.drain_timeout,
            worker.backend.id,
            self.tx.clone(),
        );
        self.retiring.push(Retiring {
            service: service.to_owned(),
            slot,
            worker,
            reason,
            since: Instant::now(),
            stopping: false,
        });
    }

    /// Kills a worker that never took connections (a failed or abandoned replacement).
    pub(super) fn discard(&mut self, service: &str, slot: usize, mut worker: Worker) {
        worker.state = WorkerState::Stopped;
        worker.probe.cancel();
        worker::signal_group(worker.pid, Signal::SIGKILL);
        self.retiring.push(Retiring {
            service: service.to_owned(),
            slot,
            worker,
            reason: "failed",
            since: Instant::now(),
            stopping: true,
        });
    }

    pub(super) fn retire_drained(&mut self, id: BackendId, timed_out: bool) {
        let Some(Place::Retiring(i)) = self.place_of_backend(id) else {
            return;
        };
        let r = &mut self.retiring[i];
        if r.stopping {
            return;
        }
        let (service, slot, pid) = (&r.service, r.slot, r.worker.pid);
        if timed_out {
            let open = r.worker.backend.stats.active();
            warn!(%service, worker = slot, %pid, connections = open, "drain_timeout passed; closing the remaining connections");
        } else {
            info!(%service, worker = slot, %pid, took = ?r.since.elapsed(), "worker drained");
        }
        r.worker.backend.close.cancel();
        worker::signal_group(pid, r.worker.config.stop_signal);
        r.stopping = true;
        let stop_timeout = r.worker.config.stop_timeout;
        self.after(stop_timeout, Event::RetireDeadline { id });
    }

    pub(super) fn retire_deadline(&mut self, id: BackendId) {
        if let Some(Place::Retiring(i)) = self.place_of_backend(id) {
            let r = &self.retiring[i];
            warn!(service = %r.service, worker = r.slot, pid = %r.worker.pid, "worker did not stop within stop_timeout; killing it");
            worker::signal_group(r.worker.pid, Signal::SIGKILL);
        }
        self.kill_lingering(id);
    }

    /// A retiring worker exited.
    pub(super) fn retired(&mut self, i: usize, status: ExitStatus) {
        let r = self.retiring.remove(i);
        if self.reaped(&r.worker, r.stopping, true) {
            // The rollout goes on once the rest of the group is gone.
            return;
        }
        info!(service = %r.service, worker = r.slot, pid = %r.worker.pid, %status, reason = %r.reason, after = ?r.since.elapsed(), "retired worker stopped");
        self.rollout_retired(r.worker.backend.id);
    }
}

/// Reports when `stats` has no open connection left, or when `timeout` passes.
fn watch_drain(stats: Arc<BackendStats>, timeout: Duration, id: BackendId, tx: Inbox) {
    tokio::spawn(async move {
        let deadline = Instant::now() + timeout;
        // One poll period first: a connection that picked this worker from the previous
        // snapshot counts itself an instant after the swap.
        tokio::time::sleep(DRAIN_POLL.min(timeout)).await;
        while stats.active() > 0 && Instant::now() < deadline {
            tokio::time::sleep(DRAIN_POLL.min(deadline - Instant::now())).await;
        }
        let _ = tx.send(Event::RetireDrained {
            id,
            timed_out: stats.active() > 0,
        });
    });
}
