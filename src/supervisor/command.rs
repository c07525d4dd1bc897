//! Requests that want an answer (the admin API): what can go wrong, and the reply half.

use std::fmt;

use tokio::sync::oneshot;

/// Why a request to the supervisor failed; the admin API maps each to an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandError {
    /// The config on disk is invalid or cannot be applied (400).
    Invalid(String),
    /// No such service (404).
    NotFound(String),
    /// The operation ran and failed, e.g. a halted rollout (500).
    Failed(String),
    /// lb is stopping (503).
    Stopping,
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandError::Invalid(msg)
            | CommandError::NotFound(msg)
            | CommandError::Failed(msg) => f.write_str(msg),
            CommandError::Stopping => f.write_str("lb is stopping"),
        }
    }
}

/// Where the answer to a request goes: a success message or the error.
pub type Reply = oneshot::Sender<Result<String, CommandError>>;

/// Answers a request if anyone is waiting for it.
pub(super) fn answer(reply: Option<Reply>, result: Result<String, CommandError>) {
    if let Some(reply) = reply {
        // The client may have gone away; the operation itself is done either way.
        let _ = reply.send(result);
    }
}
