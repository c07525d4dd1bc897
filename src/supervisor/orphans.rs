//! Processes a worker started outside its own process group (a daemon that double-forked
//! and called `setsid`). lb is a child subreaper, so once their parent is gone they
//! become lb's children; group signals miss them. lb finds them by their parent (lb)
//! and tells them apart by the environment they inherited from their worker (its
//! `LB_SERVICE` and `PORT`, unique among live workers), so they are signalled with
//! their worker and killed when it is gone, and whatever is left dies with lb.
//!
//! Reading `/proc` is file I/O, so it runs on a blocking thread, never on the
//! supervisor's task.

use std::fs;
use std::sync::Arc;

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, getpid};

use super::procfs;

/// A process lb adopted: its pid and process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Adopted {
    pid: Pid,
    group: Pid,
}

/// Sends `signal` to every adopted process that came from the worker serving `service`
/// on `port`, except those in its own group `group` (the group signal reaches them).
pub(super) fn signal(service: Arc<str>, port: u16, group: Pid, signal: Signal) {
    tokio::task::spawn_blocking(move || {
        let port = port.to_string();
        for orphan in adopted() {
            if orphan.group != group && came_from(orphan.pid, &service, &port) {
                tracing::info!(pid = orphan.pid.as_raw(), service = %service, %signal, "signalling a process the worker left outside its group");
                let _ = kill(orphan.pid, signal);
            }
        }
    });
}

/// Kills every process lb adopted but `keep` (lb is exiting).
pub(super) fn kill_all(keep: Option<Pid>) {
    for orphan in adopted() {
        if Some(orphan.pid) != keep {
            tracing::info!(
                pid = orphan.pid.as_raw(),
                "killing a process a worker left behind"
            );
            let _ = kill(orphan.pid, Signal::SIGKILL);
        }
    }
}

/// lb's children whose parent is lb, from `/proc`.
fn adopted() -> Vec<Adopted> {
    let me = getpid().as_raw();
    procfs::processes()
        .filter(|p| p.ppid == me && !p.zombie)
        .map(|p| Adopted {
            pid: Pid::from_raw(p.pid),
            group: Pid::from_raw(p.group),
        })
        .collect()
}

/// Whether `pid`'s environment says it came from the worker of `service` on `port`.
fn came_from(pid: Pid, service: &str, port: &str) -> bool {
    let Ok(environ) = fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let has = |key: &str, value: &str| {
        environ.split(|b| *b == 0).any(|var| {
            var.strip_prefix(key.as_bytes())
                .and_then(|rest| rest.strip_prefix(b"="))
                == Some(value.as_bytes())
        })
    };
    has("LB_SERVICE", service) && has("PORT", port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_is_known_by_the_service_and_port_it_inherited() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env("LB_SERVICE", "web")
            .env("PORT", "41234")
            .spawn()
            .expect("run sleep");
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits"));
        // `spawn` may return before the child has run `exec`: until then its
        // environment is still ours.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !came_from(pid, "web", "41234") {
            assert!(
                std::time::Instant::now() < deadline,
                "never saw the environment"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!came_from(pid, "web", "4123"));
        assert!(!came_from(pid, "api", "41234"));
        // The test process is its parent, so `adopted` would list it under lb.
        let _ = child.kill();
        let _ = child.wait();
    }
}
