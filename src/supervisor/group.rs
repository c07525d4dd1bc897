//! A worker's process group outlives its first process when that process is a wrapper
//! that does not `exec` (`sh -c "cd app && node server.js"`, `npm start`): the wrapper
//! dies at once on `stop_signal` while the app is still shutting down. When lb asked the
//! worker to stop, the group is given the rest of `stop_timeout` rather than SIGKILLed
//! as soon as its leader is reaped; a worker that ended unasked takes its group with it
//! at once, since nothing is shutting down on purpose there.

use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::time::Instant;
use tracing::{info, warn};

use super::service::Worker;
use super::{Event, Supervisor, worker};
use crate::snapshot::BackendId;

/// How often a lingering group is checked.
const POLL: Duration = Duration::from_millis(50);
/// After SIGKILL, how long a group may take to be gone before lb stops waiting for it.
const KILL_GRACE: Duration = Duration::from_secs(2);

/// The rest of a stopped worker's process group, still running.
#[derive(Debug)]
pub(super) struct Lingering {
    group: Pid,
    /// `service/slot`, for the logs.
    label: Arc<str>,
    /// The retiring worker this was, whose rollout step waits for the whole group.
    retired: Option<BackendId>,
    since: Instant,
    /// SIGKILL then, if lb's own deadlines (retirement, stop) have not come first.
    deadline: Instant,
    killed: Option<Instant>,
}

impl Supervisor {
    /// Cleans up after a worker process the reaper reported gone, and ends its group:
    /// at once, or, if `asked` (lb sent it `stop_signal`), once the group is empty or
    /// its stop deadline SIGKILLs it. True if the group is still running.
    pub(super) fn reaped(&mut self, worker: &Worker, asked: bool, retired: bool) -> bool {
        worker.probe.cancel();
        if asked && group_alive(worker.pid) {
            if self.lingering.is_empty() {
                self.after(POLL, Event::GroupCheck);
            }
            self.lingering.push(Lingering {
                group: worker.pid,
                label: Arc::clone(&worker.backend.label),
                retired: retired.then_some(worker.backend.id),
                since: Instant::now(),
                deadline: Instant::now() + worker.config.stop_timeout,
                killed: None,
            });
            info!(worker = %worker.backend.label, pid = %worker.pid, "worker exited; waiting for the rest of its process group");
            return true;
        }
        worker::signal_group(worker.pid, Signal::SIGKILL);
        self.watchdog.reaped(worker.pid);
        false
    }

    /// SIGKILLs the lingering group of a retired worker whose `stop_timeout` passed.
    pub(super) fn kill_lingering(&mut self, retired: BackendId) {
        for l in self
            .lingering
            .iter_mut()
            .filter(|l| l.retired == Some(retired))
        {
            l.kill();
        }
    }

    /// SIGKILLs every lingering group (lb's own stop deadline).
    pub(super) fn kill_all_lingering(&mut self) {
        for l in &mut self.lingering {
            l.kill();
        }
    }

    pub(super) fn has_lingering(&self) -> bool {
        !self.lingering.is_empty()
    }

    /// Drops the groups that are gone (or were SIGKILLed long enough ago), and lets a
    /// rollout waiting for one go on.
    pub(super) fn check_groups(&mut self) {
        for l in &mut self.lingering {
            if l.deadline <= Instant::now() {
                l.kill();
            }
        }
        let (gone, still): (Vec<Lingering>, Vec<Lingering>) = std::mem::take(&mut self.lingering)
            .into_iter()
            .partition(|l| {
                !group_alive(l.group) || l.killed.is_some_and(|at| at.elapsed() >= KILL_GRACE)
            });
        self.lingering = still;
        for l in gone {
            self.watchdog.reaped(l.group);
            info!(worker = %l.label, group = %l.group, after = ?l.since.elapsed(), "worker's process group stopped");
            if let Some(id) = l.retired {
                self.rollout_retired(id);
            }
        }
        if !self.lingering.is_empty() {
            self.after(POLL, Event::GroupCheck);
        }
    }
}

impl Lingering {
    fn kill(&mut self) {
        if self.killed.is_none() {
            warn!(worker = %self.label, group = %self.group, "worker's process group did not stop within stop_timeout; killing it");
            worker::signal_group(self.group, Signal::SIGKILL);
            self.killed = Some(Instant::now());
        }
    }
}

/// Whether any process of the group still exists.
fn group_alive(group: Pid) -> bool {
    killpg(group, None) != Err(Errno::ESRCH)
}
