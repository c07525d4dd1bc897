//! Sockets passed by socket activation (sd_listen_fds(3)): when `LISTEN_PID` names this
//! process, descriptors 3 … 3+`LISTEN_FDS`-1 are listening sockets made by systemd (or
//! `systemd-socket-activate`). A listen address, a service's or the admin API's, that
//! matches one of them takes it instead of binding: a privileged port needs no root,
//! and while lb restarts the socket stays open in systemd, so clients wait in its queue
//! instead of being refused.
//!
//! Descriptors are process-wide, so the passed sockets are too: adopted once at start,
//! and a copy handed to every bind of their address (at start or on a reload), since
//! systemd keeps the socket open whatever lb closes.
#![allow(unsafe_code)]

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd};
use std::sync::{Mutex, OnceLock, PoisonError};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::socket::{SockType, SockaddrStorage, getsockname, getsockopt, sockopt};
use nix::sys::stat::fstat;
use tokio::net::TcpListener;

use crate::config::Config;
use tracing::{info, warn};

/// sd_listen_fds(3): the first passed descriptor.
const FIRST: RawFd = 3;

/// Passed sockets by the address they listen on. lb keeps its copy: systemd holds the
/// socket anyway, so a listener that a reload closes (or a reload that fails after
/// taking it) must be able to take it again.
static PASSED: Mutex<Vec<(SocketAddr, OwnedFd)>> = Mutex::new(Vec::new());

/// (device, inode) of every passed socket, taken or not: they outlive lb.
static IDENTITIES: OnceLock<Vec<(u64, u64)>> = OnceLock::new();

/// Adopts the sockets passed to lb, if any; later calls do nothing. Called before lb
/// opens anything else, so the descriptors named are the ones that were passed.
pub fn adopt() {
    if IDENTITIES.get().is_some() {
        return;
    }
    let mut identities = Vec::new();
    let count = passed_count(
        std::env::var("LISTEN_PID").ok().as_deref(),
        std::env::var("LISTEN_FDS").ok().as_deref(),
        std::process::id(),
    );
    let mut passed = PASSED.lock().unwrap_or_else(PoisonError::into_inner);
    for raw in FIRST..FIRST.saturating_add(count) {
        // Passed descriptors are consecutive: the first one that is not open ends them,
        // so a count larger than what was passed neither makes lb own a descriptor that
        // something else opens later nor walks a huge range.
        if std::fs::symlink_metadata(format!("/proc/self/fd/{raw}")).is_err() {
            warn!(
                fd = raw,
                count,
                "LISTEN_FDS names more descriptors than are open; taking those before this one"
            );
            break;
        }
        // SAFETY: sd_listen_fds(3) hands descriptors 3 … 3+LISTEN_FDS-1 to the process
        // LISTEN_PID names; this one is open, and nothing in lb has claimed it, since
        // this runs once (IDENTITIES is set below), before lb opens anything of its own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // Workers must not inherit it (systemd passes it without close-on-exec).
        let _ = fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
        match listening_address(&fd) {
            Ok(addr) => {
                info!(fd = raw, %addr, "socket passed by systemd");
                if let Ok(stat) = fstat(&fd) {
                    identities.push((stat.st_dev, stat.st_ino));
                }
                passed.push((addr, fd));
            }
            Err(why) => warn!(fd = raw, "descriptor passed by systemd ignored: {why}"),
        }
    }
    let _ = IDENTITIES.set(identities);
}

/// A copy of the passed socket listening on exactly `addr`, if there is one, ready for
/// the runtime (so called inside it).
pub fn take(addr: SocketAddr) -> Option<io::Result<TcpListener>> {
    let fd = {
        let passed = PASSED.lock().unwrap_or_else(PoisonError::into_inner);
        let (_, fd) = passed.iter().find(|(a, _)| *a == addr)?;
        match fd.try_clone() {
            Ok(fd) => fd,
            Err(err) => return Some(Err(err)),
        }
    };
    let listener = std::net::TcpListener::from(fd);
    Some(
        listener
            .set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(listener)),
    )
}

/// Warns about every passed socket that no listen address of `config` uses: systemd
/// keeps it open, so clients still connect there and wait, unserved, in its queue.
pub fn warn_unused(config: &Config) {
    let passed = PASSED.lock().unwrap_or_else(PoisonError::into_inner);
    let used = |addr: &SocketAddr| {
        config.admin == Some(*addr) || config.services.iter().any(|s| s.listen.contains(addr))
    };
    for (addr, _) in passed.iter().filter(|(addr, _)| !used(addr)) {
        warn!(%addr, "a socket passed by systemd matches no listen address: clients connecting there wait unserved; remove it from the socket unit or listen on it");
    }
}

/// Whether `socket` was passed by systemd, which keeps it open after lb closes its copy
/// (and whose next lb will accept from its queue).
pub fn is_passed(socket: BorrowedFd<'_>) -> bool {
    let Some(identities) = IDENTITIES.get().filter(|ids| !ids.is_empty()) else {
        return false;
    };
    fstat(socket).is_ok_and(|stat| identities.contains(&(stat.st_dev, stat.st_ino)))
}

/// How many descriptors were passed to process `me`.
fn passed_count(pid: Option<&str>, fds: Option<&str>, me: u32) -> RawFd {
    if pid.and_then(|p| p.parse::<u32>().ok()) != Some(me) {
        return 0;
    }
    fds.and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// The address a passed descriptor listens on, if it is a listening TCP socket.
fn listening_address(fd: &impl AsFd) -> Result<SocketAddr, &'static str> {
    let not_tcp = "not a TCP socket (lb takes ListenStream= sockets)";
    if getsockopt(fd, sockopt::SockType) != Ok(SockType::Stream) {
        return Err(not_tcp);
    }
    if getsockopt(fd, sockopt::AcceptConn) != Ok(true) {
        return Err("not listening");
    }
    let addr: SockaddrStorage = getsockname(fd.as_fd().as_raw_fd()).map_err(|_| not_tcp)?;
    if let Some(v4) = addr.as_sockaddr_in() {
        return Ok(SocketAddr::V4((*v4).into()));
    }
    if let Some(v6) = addr.as_sockaddr_in6() {
        return Ok(SocketAddr::V6((*v6).into()));
    }
    Err(not_tcp)
}

#[cfg(test)]
mod tests {
    use super::passed_count;

    #[test]
    fn sockets_are_passed_to_the_process_listen_pid_names() {
        assert_eq!(passed_count(Some("42"), Some("2"), 42), 2);
        assert_eq!(passed_count(Some("41"), Some("2"), 42), 0);
        assert_eq!(passed_count(None, Some("2"), 42), 0);
        assert_eq!(passed_count(Some("42"), None, 42), 0);
        assert_eq!(passed_count(Some("42"), Some("many"), 42), 0);
    }
}
