//! The lifecycle states of a worker slot, as `/status`, metrics and logs name them.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

impl WorkerState {
    pub const ALL: [WorkerState; 5] = [
        WorkerState::Starting,
        WorkerState::Ready,
        WorkerState::Draining,
        WorkerState::Stopped,
        WorkerState::Backoff,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Draining => "draining",
            WorkerState::Stopped => "stopped",
            WorkerState::Backoff => "backoff",
        }
    }
}

impl fmt::Display for WorkerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
