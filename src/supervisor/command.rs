//! What the outside asks of the supervisor (signals and the admin API), and how it is
//! answered. A command that needs the config file carries it already loaded: the file
//! (and any DNS look-up in it) is read on a blocking thread before the command reaches
//! the supervisor, so no handler waits on a disk or a resolver.

use std::fmt;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::Event;
use super::rollout::Scope;
use crate::admin::status::Status;
use crate::channel::Message;
use crate::config::{Config, ConfigError, ConfigErrors, Source};

/// The config file as a command found it.
pub type Loaded = Box<Result<Config, ConfigErrors>>;

/// A request to the supervisor.
#[derive(Debug)]
pub enum Command {
    /// SIGHUP or `POST /reload`: apply the difference to `config`.
    Reload {
        config: Loaded,
        reply: Option<Reply>,
    },
    /// SIGUSR2 or `POST /restart`: apply `config`, then replace the workers of `scope`
    /// one at a time; the replies come when the rollout ends.
    Restart {
        scope: Scope,
        config: Loaded,
        replies: Vec<Reply>,
    },
    /// `POST /broadcast`: send a message to every worker of one service or all.
    Broadcast {
        service: Option<String>,
        message: Message,
        reply: Option<Reply>,
    },
    /// `GET /status`.
    Status { reply: oneshot::Sender<Status> },
    /// SIGTERM/SIGINT: a graceful stop; a second one stops at once.
    Stop,
}

/// Why a request to the supervisor failed; the admin API maps each to an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandError {
    /// The config on disk is invalid or cannot be applied (400).
    Invalid(String),
    /// No such service or worker (404).
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

/// Builds a command from the config file as it is now.
type Make = Box<dyn FnOnce(Loaded) -> Command + Send>;

/// The sending half of the supervisor's inbox, for signals and the admin API.
#[derive(Debug, Clone)]
pub struct Inbox {
    tx: mpsc::UnboundedSender<Event>,
    /// To the one task that reads the config file for commands, in the order asked.
    loads: mpsc::UnboundedSender<Make>,
}

impl Inbox {
    /// Also starts the task that reads the config for commands: one read at a time, so
    /// two reloads asked in a row apply in that order.
    pub(super) fn new(tx: mpsc::UnboundedSender<Event>, source: &Arc<Source>) -> Self {
        let (loads, mut todo) = mpsc::unbounded_channel::<Make>();
        let (events, source) = (tx.clone(), Arc::clone(source));
        tokio::spawn(async move {
            while let Some(make) = todo.recv().await {
                let from = Arc::clone(&source);
                let loaded = tokio::task::spawn_blocking(move || from.load())
                    .await
                    .unwrap_or_else(|err| {
                        Err(ConfigErrors(vec![ConfigError {
                            file: source.to_string(),
                            position: None,
                            path: String::new(),
                            message: format!("could not be read: {err}"),
                        }]))
                    });
                if events.send(Event::Command(make(Box::new(loaded)))).is_err() {
                    return;
                }
            }
        });
        Inbox { tx, loads }
    }

    /// Sends a command; false once the supervisor has stopped.
    pub fn send(&self, command: Command) -> bool {
        self.tx.send(Event::Command(command)).is_ok()
    }

    /// Reads the config file off the supervisor's task, then sends the command `make`
    /// builds from it.
    pub fn with_config(&self, make: impl FnOnce(Loaded) -> Command + Send + 'static) {
        let _ = self.loads.send(Box::new(make));
    }
}
