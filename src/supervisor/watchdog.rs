//! The watchdog: a tiny helper process (lb itself, run as `lb watchdog`) that kills
//! every worker process group if lb dies without stopping them, even by `kill -9`.
//!
//! The parent-death signal only reaches a worker's first process; whatever that process
//! started (`sh -c "a & b"`, a Node script spawning helpers) would be orphaned. lb tells
//! the watchdog each group it starts and reaps over a pipe; the kernel closes that pipe
//! when lb dies, however it dies, and the watchdog then kills the groups still listed.

use std::collections::HashSet;
use std::io::{self, BufRead, Write};
use std::os::unix::process::CommandExt as _;
use std::process::{Child, ChildStdin, Command, Stdio};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use super::sys;

/// lb's end of the pipe.
#[derive(Debug)]
pub(super) struct Watchdog {
    pipe: Option<ChildStdin>,
    pid: Option<Pid>,
}

impl Watchdog {
    pub(super) fn start() -> io::Result<Self> {
        let mut cmd = Command::new("/proc/self/exe");
        cmd.arg("watchdog")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            // Its own group, so a Ctrl-C meant for lb does not stop it first.
            .process_group(0);
        let mut child: Child = {
            let _no_reaping = sys::spawn_lock();
            cmd.spawn()?
        };
        Ok(Watchdog {
            pipe: child.stdin.take(),
            pid: i32::try_from(child.id()).ok().map(Pid::from_raw),
        })
    }

    /// Its process id: lb's child, not a worker's.
    pub(super) fn pid(&self) -> Option<Pid> {
        self.pid
    }

    pub(super) fn started(&mut self, group: Pid) {
        self.send(&format!("+{group}\n"));
    }

    pub(super) fn reaped(&mut self, group: Pid) {
        self.send(&format!("-{group}\n"));
    }

    fn send(&mut self, line: &str) {
        let Some(pipe) = &mut self.pipe else { return };
        if let Err(err) = pipe.write_all(line.as_bytes()) {
            tracing::warn!(%err, "the watchdog is gone; workers may outlive a crash of lb");
            self.pipe = None;
        }
    }
}

/// The watchdog process: reads `+pgid` / `-pgid` lines until lb's end closes, then kills
/// the groups still running.
pub fn serve() -> io::Result<()> {
    let mut groups = HashSet::new();
    for line in io::stdin().lock().lines() {
        let line = line?;
        let (op, pgid) = line.split_at(line.len().min(1));
        let Ok(pgid) = pgid.parse::<i32>() else {
            continue;
        };
        match op {
            "+" => groups.insert(pgid),
            "-" => groups.remove(&pgid),
            _ => false,
        };
    }
    for pgid in groups {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
    Ok(())
}
