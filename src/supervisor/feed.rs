//! The `feed` command of a service: run every `every`, never two runs at once; each JSON
//! value it prints is sent to every worker, and the last one is kept for workers that
//! start later (the cluster tutorial's "one database query for N workers").

use std::collections::HashMap;
use std::process::ChildStdout;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::AsyncReadExt as _;
use tracing::{debug, warn};

use super::stop::Phase;
use super::{Event, ExitStatus, Supervisor, worker};
use crate::channel::Message;

/// The most output one feed run may print; the rest is ignored.
const MAX_FEED_OUTPUT: u64 = 16 * 1024 * 1024;

/// Feed runs in progress, by pid: kept by the supervisor, not by the service, so a run
/// is reaped and cleaned up even if a reload removed its service meanwhile.
pub(super) type FeedRuns = HashMap<Pid, String>;

impl Supervisor {
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

    /// Runs the feed and sets the next tick. A run still going when the next one is due
    /// took longer than `every`: it is killed, and this tick is skipped.
    pub(super) fn feed_tick(&mut self, service: &str, chain: u64) {
        let Some(si) = self.service_index(service) else {
            return;
        };
        let svc = &mut self.services[si];
        if svc.feed.chain != Some(chain) {
            return;
        }
        let cfg = svc.config.workers.clone();
        let Some((cfg, feed)) = cfg.and_then(|w| w.feed.clone().map(|f| (w, f))) else {
            svc.feed.chain = None;
            return;
        };
        if self.phase != Phase::Running {
            return;
        }
        self.after(
            feed.every,
            Event::FeedTick {
                service: service.to_owned(),
                chain,
            },
        );
        if let Some((&pid, _)) = self.feed_runs.iter().find(|(_, s)| *s == service) {
            warn!(service, pid = pid.as_raw(), every = ?feed.every, "feed: the previous run did not finish within `every`; killed it");
            worker::signal_group(pid, Signal::SIGKILL);
            return;
        }
        match worker::spawn_feed(service, &cfg, &feed) {
            Ok((pid, stdout)) => {
                self.watchdog.started(pid);
                self.feed_runs.insert(pid, service.to_owned());
                read_feed(service.to_owned(), stdout, self.tx.clone());
            }
            Err(err) => warn!(service, %err, "feed: could not run"),
        }
    }

    /// A feed run printed `values`: send each to every running worker, keep the last.
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
            delivered += self.deliver(si, &message);
            self.services[si].feed.last = Some(message);
        }
        debug!(service, values = values.len(), delivered, "feed: broadcast");
    }

    /// The reaper reported `pid` gone: true if it was a feed run. Whatever the run left
    /// in the background dies with it, so its output ends and nothing piles up.
    pub(super) fn feed_exited(&mut self, pid: Pid, status: ExitStatus) -> bool {
        let Some(service) = self.feed_runs.remove(&pid) else {
            return false;
        };
        worker::signal_group(pid, Signal::SIGKILL);
        self.watchdog.reaped(pid);
        if status != ExitStatus::Code(0) {
            warn!(%service, pid = pid.as_raw(), %status, "feed: the command failed");
        }
        true
    }

    /// Kills a service's feed run (its service is going away).
    pub(super) fn kill_feed(&mut self, service: &str) {
        for (pid, _) in self.feed_runs.iter().filter(|(_, s)| *s == service) {
            worker::signal_group(*pid, Signal::SIGKILL);
        }
    }
}

/// Reads a feed run's output to its end (the run exited and its group was killed), then
/// reports its values.
fn read_feed(service: String, stdout: ChildStdout, tx: tokio::sync::mpsc::UnboundedSender<Event>) {
    tokio::spawn(async move {
        let mut out = Vec::new();
        if let Ok(pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(stdout.into()) {
            let _ = pipe.take(MAX_FEED_OUTPUT).read_to_end(&mut out).await;
        }
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
