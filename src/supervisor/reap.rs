//! The single reaper: on every SIGCHLD, collect every exited child with `waitpid(-1)`,
//! workers and orphans alike (lb may be PID 1), and tell the supervisor which pid ended.
//! lb never waits on a child anywhere else, so no exit status is stolen or lost.

use std::fmt;

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;

use super::{Event, sys};

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(Signal),
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(code) => write!(f, "exit code {code}"),
            ExitStatus::Signal(sig) => write!(f, "signal {sig}"),
        }
    }
}

/// Starts reaping; call before the first child is spawned so no SIGCHLD is missed.
pub(super) fn start(events: mpsc::UnboundedSender<Event>) -> std::io::Result<()> {
    let mut sigchld = signal(SignalKind::child())?;
    // Orphans of a worker (the app a wrapper shell started, once the shell is gone)
    // become lb's children rather than init's: lb reaps them, and knows when a stopped
    // worker's whole process group is gone. Without it (an old kernel) init reaps them.
    let _ = nix::sys::prctl::set_child_subreaper(true);
    tokio::spawn(async move {
        loop {
            // SIGCHLDs coalesce, so each wake-up collects every child that has exited.
            for (pid, status) in reap_exited() {
                if events.send(Event::Exited { pid, status }).is_err() {
                    return;
                }
            }
            if sigchld.recv().await.is_none() {
                return;
            }
        }
    });
    Ok(())
}

fn reap_exited() -> Vec<(Pid, ExitStatus)> {
    let _spawning = sys::spawn_lock();
    let mut exited = Vec::new();
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => exited.push((pid, ExitStatus::Code(code))),
            Ok(WaitStatus::Signaled(pid, sig, _)) => exited.push((pid, ExitStatus::Signal(sig))),
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return exited,
            Err(Errno::EINTR) | Ok(_) => {}
            Err(err) => {
                tracing::error!(%err, "waitpid failed");
                return exited;
            }
        }
    }
}
