//! Messages to and from workers: what a worker sends on its channel (`"ready"`, or
//! anything else, logged), broadcasts (`POST /broadcast`), and the `feed` command whose
//! JSON output is broadcast every `every`.

use std::io::Read as _;
use std::process::ChildStdout;
use std::time::Duration;

use nix::unistd::Pid;
use serde_json::Value;
use tracing::{debug, info, warn};

use super::command::{CommandError, Reply, answer};
use super::stop::Phase;
use super::{Event, ExitStatus, Place, Supervisor, worker};
use crate::channel::Message;
use crate::config::ReadyCheck;
use crate::snapshot::BackendId;

/// How long a worker that dropped messages must go without a drop (and with an empty
/// outbox) before it counts as reading its channel again.
const DROP_QUIET: Duration = Duration::from_secs(1);

/// The most output one feed run may print; the rest is ignored.
const MAX_FEED_OUTPUT: u64 = 16 * 1024 * 1024;

impl Supervisor {
    /// A worker sent `value` on its channel.
    pub(super) fn message(&mut self, id: BackendId, value: Value) {
        let Some(place) = self.place_of_backend(id) else {
            return;
        };
        let worker = match place {
            Place::Current { si, slot } => self.services[si].slots[slot].worker.as_ref(),
            Place::Replacement { si, slot } => self.services[si].slots[slot].replacement.as_ref(),
            Place::Retiring(i) => Some(&self.retiring[i].worker),
            Place::Static { .. } => None,
        };
        let Some(worker) = worker else { return };
        if value == "ready" && worker.config.ready == ReadyCheck::Message {
            self.probed(id, true);
            return;
        }
        debug!(worker = %worker.backend.label, content = %value, "message from worker");
    }

    /// Sends `message` to every ready worker of `service` (or of all services) and
    /// answers with how many took it.
    pub(super) fn broadcast(
        &mut self,
        service: Option<String>,
        message: &Message,
        reply: Option<Reply>,
    ) {
        if let Some(name) = service
            .as_deref()
            .filter(|n| self.service_index(n).is_none())
        {
            return answer(
                reply,
                Err(CommandError::NotFound(format!("no service named {name:?}"))),
            );
        }
        let mut delivered = 0;
        for si in 0..self.services.len() {
            if service
                .as_deref()
                .is_none_or(|s| s == self.services[si].config.name)
            {
                delivered += self.deliver(si, message, Reach::Ready);
            }
        }
        answer(reply, Ok(format!("{{\"delivered\":{delivered}}}")));
    }

    /// Queues `message` for the workers of a service that `reach` names; counts and logs
    /// drops once per run of drops, not once per message.
    fn deliver(&mut self, si: usize, message: &Message, reach: Reach) -> usize {
        let svc = &mut self.services[si];
        let mut delivered = 0;
        let workers = svc
            .slots
            .iter_mut()
            .flat_map(|s| s.worker.iter_mut().chain(s.replacement.iter_mut()));
        for w in workers {
            if reach == Reach::Ready && w.state != super::WorkerState::Ready {
                continue;
            }
            // A run of drops ends once the worker has taken everything queued and a
            // while has passed without drops, so a burst logs one line, not one per gap.
            let caught_up =
                w.channel.backlog() == 0 && w.last_drop.is_some_and(|t| t.elapsed() >= DROP_QUIET);
            if w.channel.send(message) {
                if w.dropped > 0 && caught_up {
                    info!(worker = %w.backend.label, dropped = w.dropped, "worker reads its channel again");
                    w.dropped = 0;
                }
                delivered += 1;
            } else {
                if w.dropped == 0 {
                    warn!(worker = %w.backend.label, "worker is not reading its channel; dropping messages until it does");
                }
                w.dropped += 1;
                w.last_drop = Some(tokio::time::Instant::now());
                svc.metrics.messages_dropped.inc();
            }
        }
        delivered
    }

    /// Starts the feed timer of every service that has a feed and no timer yet.
    pub(super) fn start_feeds(&mut self) {
        for si in 0..self.services.len() {
            let has_feed = self.services[si]
                .config
                .workers
                .as_ref()
                .is_some_and(|w| w.feed.is_some());
            if has_feed && self.services[si].feed.chain.is_none() {
                let chain = self.new_id();
                self.services[si].feed.chain = Some(chain);
                let service = self.services[si].config.name.clone();
                self.after(Duration::ZERO, Event::FeedTick { service, chain });
            }
        }
    }

    /// Runs the feed unless a run is still going, and sets the next tick.
    pub(super) fn feed_tick(&mut self, service: &str, chain: u64) {
        let Some(si) = self.service_index(service) else {
            return;
        };
        let svc = &mut self.services[si];
        let feed = svc.config.workers.as_ref().and_then(|w| w.feed.clone());
        let (Some(feed), Some(cfg), true) = (
            feed,
            svc.config.workers.clone(),
            svc.feed.chain == Some(chain),
        ) else {
            if svc.feed.chain == Some(chain) {
                svc.feed.chain = None;
            }
            return;
        };
        if self.phase != Phase::Running {
            return;
        }
        if let Some(pid) = svc.feed.running {
            warn!(service, %pid, "feed: the previous run is still going; this one is skipped");
        } else {
            match worker::spawn_feed(service, &cfg, &feed) {
                Ok((pid, stdout)) => {
                    self.watchdog.started(pid);
                    self.services[si].feed.running = Some(pid);
                    read_feed(service.to_owned(), stdout, self.tx.clone());
                }
                Err(err) => warn!(service, %err, "feed: could not run"),
            }
        }
        self.after(
            feed.every,
            Event::FeedTick {
                service: service.to_owned(),
                chain,
            },
        );
    }

    /// A feed run printed `values`: broadcast each, and keep the last for new workers.
    pub(super) fn feed_output(&mut self, service: &str, values: Vec<Value>, error: Option<String>) {
        let Some(si) = self.service_index(service) else {
            return;
        };
        if let Some(err) = error {
            warn!(service, %err, "feed: output is not a stream of JSON values; the rest is ignored");
        }
        let mut delivered = 0;
        for value in &values {
            let message = Message::new(value);
            delivered += self.deliver(si, &message, Reach::Running);
            self.services[si].feed.last = Some(message);
        }
        debug!(service, values = values.len(), delivered, "feed: broadcast");
    }

    /// The reaper reported `pid` gone: true if it was a feed run.
    pub(super) fn feed_exited(&mut self, pid: Pid, status: ExitStatus) -> bool {
        let Some(svc) = self
            .services
            .iter_mut()
            .find(|s| s.feed.running == Some(pid))
        else {
            return false;
        };
        svc.feed.running = None;
        if status != ExitStatus::Code(0) {
            warn!(service = %svc.config.name, %pid, %status, "feed: the command failed");
        }
        self.watchdog.reaped(pid);
        true
    }
}

/// Which workers a message goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reach {
    /// Workers in rotation: broadcasts (contract §5).
    Ready,
    /// Every worker running, starting ones too: fed values, so no worker starts serving
    /// with an empty cache.
    Running,
}

/// Reads a feed run's output to its end on a blocking thread, then reports its values.
fn read_feed(service: String, stdout: ChildStdout, tx: super::Inbox) {
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        let _ = stdout.take(MAX_FEED_OUTPUT).read_to_end(&mut out);
        let mut values = Vec::new();
        let mut error = None;
        for value in serde_json::Deserializer::from_slice(&out).into_iter::<Value>() {
            match value {
                Ok(value) => values.push(value),
                Err(err) => {
                    error = Some(err.to_string());
                    break;
                }
            }
        }
        let _ = tx.send(Event::FeedOutput {
            service,
            values,
            error,
        });
    });
}
