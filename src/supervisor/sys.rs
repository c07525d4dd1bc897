//! The one place lb uses `unsafe`: code that runs in a forked worker before `exec`.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt as _;
use std::process::Command;
use std::sync::{Mutex, MutexGuard, PoisonError};

use nix::sys::prctl;
use nix::sys::signal::Signal;
use nix::unistd::{Pid, getpid, getppid};

/// Held while spawning and while reaping. If `exec` fails, `Command::spawn` waits for
/// the failed child itself and panics if a `waitpid(-1)` elsewhere took it first.
static SPAWN_LOCK: Mutex<()> = Mutex::new(());

pub(super) fn spawn_lock() -> MutexGuard<'static, ()> {
    SPAWN_LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Makes the worker receive SIGKILL when lb dies, even by `kill -9`. Linux delivers it
/// when the *thread* that forked exits; lb forks from its runtime's threads, which live
/// as long as lb.
pub(super) fn die_with_lb(cmd: &mut Command) {
    let lb: Pid = getpid();
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed; prctl and getppid are system calls that
    // neither allocate nor take locks.
    unsafe {
        cmd.pre_exec(move || {
            prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)?;
            // lb may have died between fork and prctl; then nobody would kill us.
            if getppid() != lb {
                return Err(io::Error::other("lb exited while starting this worker"));
            }
            Ok(())
        });
    }
}

/// The file descriptor number the worker finds its channel on (contract §3).
pub(super) const CHANNEL_FD: i32 = 3;

/// Makes `fd` (lb's copy of the worker's end of its channel) the worker's fd 3.
pub(super) fn pass_as_channel(cmd: &mut Command, fd: RawFd) {
    // SAFETY: runs in the child between fork and exec; dup2 and fcntl are
    // async-signal-safe system calls, and `fd` stays open in lb until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if fd == CHANNEL_FD {
                // dup2 onto itself keeps close-on-exec: clear it instead.
                if nix::libc::fcntl(fd, nix::libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
            } else if nix::libc::dup2(fd, CHANNEL_FD) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
