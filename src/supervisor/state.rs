//! The lifecycle states of a worker slot, as `/status` and logs name them.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Spawned, not yet accepting connections: out of rotation.
    Starting,
    /// Accepting connections: in rotation.
    Ready,
    /// Out of rotation, finishing its open connections before it is stopped.
    Draining,
    /// Not running, and not to be restarted (lb is stopping).
    Stopped,
    /// Exited unasked; restarts when its backoff delay ends.
    Backoff,
}

impl fmt::Display for WorkerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Draining => "draining",
            WorkerState::Stopped => "stopped",
            WorkerState::Backoff => "backoff",
        })
    }
}
