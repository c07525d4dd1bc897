//! Messages to and from workers: what a worker sends on its channel (`"ready"`, or
//! anything else, logged), and broadcasts (`POST /broadcast`, and the feed's values).

use std::time::Duration;

use serde_json::Value;
use tracing::{debug, info, warn};

use super::Supervisor;
use super::command::{CommandError, Reply, answer};
use super::life::WorkerId;
use crate::channel::{Message, Sent};
use crate::config::ReadyCheck;

/// How long a worker that dropped messages must go without a drop (and with an empty
/// outbox) before it counts as reading its channel again.
const DROP_QUIET: Duration = Duration::from_secs(1);

impl Supervisor {
    /// A worker sent `value` on its channel.
    pub(super) fn message(&mut self, id: WorkerId, value: Value) {
        let Some(worker) = self.workers.get(&id) else {
            return;
        };
        if value == "ready" && worker.config.ready == ReadyCheck::Message {
            self.probed(id, true);
            return;
        }
        debug!(worker = %worker.backend.label, content = %value, "message from worker");
    }

    /// Sends `message` to every worker of `service` (or of all services), starting ones
    /// included, as Node's cluster does, and answers with how many took it.
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
                delivered += self.deliver(si, message);
            }
        }
        answer(reply, Ok(format!("{{\"delivered\":{delivered}}}")));
    }

    /// Queues `message` for every worker of a service, starting ones too (a worker that
    /// starts during a rollout must not miss a broadcast, nor start serving with an
    /// empty cache of fed values); counts and logs drops once per run of drops, not once
    /// per message.
    pub(super) fn deliver(&mut self, si: usize, message: &Message) -> usize {
        let svc = &self.services[si];
        let mut delivered = 0;
        let workers = self
            .workers
            .values_mut()
            .filter(|w| *w.service == svc.config.name && !w.leaving());
        for w in workers {
            // A run of drops ends once the worker has taken everything queued and a
            // while has passed without drops, so a burst logs one line, not one per gap.
            let caught_up =
                w.channel.backlog() == 0 && w.last_drop.is_some_and(|t| t.elapsed() >= DROP_QUIET);
            match w.channel.send(message) {
                Sent::Queued => {
                    if w.dropped > 0 && caught_up {
                        info!(worker = %w.backend.label, dropped = w.dropped, "worker reads its channel again");
                        w.dropped = 0;
                    }
                    delivered += 1;
                }
                // It reads nothing more: not delivered, and not a reader falling behind.
                Sent::Closed => {}
                Sent::Full => {
                    if w.dropped == 0 {
                        warn!(worker = %w.backend.label, "worker is not reading its channel; dropping messages until it does");
                    }
                    w.dropped += 1;
                    w.last_drop = Some(tokio::time::Instant::now());
                    svc.metrics.messages_dropped.inc();
                }
            }
        }
        delivered
    }
}
