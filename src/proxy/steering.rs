//! Which connection thread a new connection goes to. The sockets of one listen address
//! form a `SO_REUSEPORT` group, one socket per thread; by default the kernel picks a
//! socket by a hash of the connection's addresses. Given a CPU each
//! (`SO_INCOMING_CPU`), they take the connections whose handshake arrived on their CPU
//! instead (Linux 6.2 and later), so the connections whose packets one CPU processes
//! belong to one thread: a burst of their packets wakes that thread once, to serve them
//! together, where the hash wakes every thread for a few each (docs/benchmarks.md has
//! what it saves). Where one CPU receives every handshake (a NIC with one queue and no
//! RPS), steering would give every connection to one thread: a socket that takes far
//! more than its share gives its CPU back for a while, and the hash spreads that CPU's
//! connections again.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sched::{CpuSet, sched_getaffinity};
use nix::unistd::Pid;
use socket2::SockRef;
use tracing::info;

/// Connections one socket accepts between two looks at its share.
pub(super) const WINDOW: u64 = 1024;

/// What the sockets of one steered group have accepted.
#[derive(Debug)]
pub(super) struct Group {
    /// Each socket's CPU.
    cpus: Box<[usize]>,
    accepted: Box<[Count]>,
}

/// One socket's count, in a cache line (two, against the adjacent-line prefetcher) of its
/// own: each thread adds to its count on every accept.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Count(AtomicU64);

/// Gives each socket of a `SO_REUSEPORT` group a CPU lb may run on, in turn, if every
/// such CPU gets the same number of sockets: a CPU with none would fall back to the hash
/// for its connections, and one with fewer sockets than the others would give its
/// threads more than their share. Best effort: a socket that refuses is picked by the
/// hash, as without steering.
pub(super) fn steer<S: AsFd>(sockets: &[S]) -> Option<Arc<Group>> {
    let cpus = allowed_cpus();
    if cpus.is_empty() || !sockets.len().is_multiple_of(cpus.len()) {
        return None;
    }
    let cpus: Box<[usize]> = cpus.iter().copied().cycle().take(sockets.len()).collect();
    for (socket, &cpu) in sockets.iter().zip(&cpus) {
        let _ = SockRef::from(socket).set_cpu_affinity(cpu);
    }
    let accepted = cpus.iter().map(|_| Count::default()).collect();
    Some(Arc::new(Group { cpus, accepted }))
}

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    let Ok(set) = sched_getaffinity(Pid::from_raw(0)) else {
        return Vec::new();
    };
    (0..CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect()
}

/// One steered socket's part of its group, kept by the accept loop of that socket.
#[derive(Debug)]
pub(super) struct Share {
    group: Arc<Group>,
    index: usize,
    /// The group's total at this socket's last look.
    seen: u64,
    /// Windows until the socket takes its CPU's connections again; 0 while it does.
    off: u32,
    /// Whether the socket has given its CPU back before, so it says so only once.
    said: bool,
}

/// Windows a socket that gave its CPU back waits before taking it again: imbalance can be
/// passing (clients that moved between CPUs for a while), and a CPU that still receives
/// every connection is given back again after one window.
const RETRY_AFTER: u32 = 64;

/// What a socket does with its CPU at the end of a window.
#[derive(Debug, PartialEq, Eq)]
enum Turn {
    Keep,
    GiveBack,
    TakeAgain,
}

/// The next `off` and what to do, given `off` and whether the window's share was too big.
fn turn(off: u32, over: bool) -> (u32, Turn) {
    match off {
        0 if over => (RETRY_AFTER, Turn::GiveBack),
        0 => (0, Turn::Keep),
        1 => (0, Turn::TakeAgain),
        _ => (off - 1, Turn::Keep),
    }
}

impl Share {
    /// The part of socket `index` of `group`, for a new accept loop on it. A socket handed
    /// over by a reload may have given its CPU back under its previous loop: it waits
    /// before taking it again, as it would have.
    pub(super) fn new(group: Arc<Group>, index: usize, socket: impl AsFd) -> Share {
        let cpu = SockRef::from(&socket).cpu_affinity().ok();
        let off = if cpu == Some(group.cpus[index]) {
            0
        } else {
            RETRY_AFTER
        };
        Share {
            group,
            index,
            seen: 0,
            off,
            said: off != 0,
        }
    }

    /// Counts a connection `socket` accepted; every [`WINDOW`] of them, a socket that took
    /// more than its share of the group's connections since its last look gives its CPU
    /// back for a while.
    pub(super) fn accepted(&mut self, socket: impl AsFd) {
        let accepted = &self.group.accepted;
        let mine = accepted[self.index].0.fetch_add(1, Ordering::Relaxed) + 1;
        if !mine.is_multiple_of(WINDOW) {
            return;
        }
        let total: u64 = accepted.iter().map(|c| c.0.load(Ordering::Relaxed)).sum();
        let since = total - std::mem::replace(&mut self.seen, total);
        let (off, turn) = turn(self.off, over_share(WINDOW, since, accepted.len()));
        self.off = off;
        let socket = SockRef::from(&socket);
        match turn {
            Turn::Keep => {}
            Turn::GiveBack => {
                // socket2 passes the CPU on as a C int: -1, which the kernel reads as none.
                let _ = socket.set_cpu_affinity(usize::MAX);
                if !std::mem::replace(&mut self.said, true) {
                    let addr = socket.local_addr().ok().and_then(|a| a.as_socket());
                    info!(
                        ?addr,
                        "new connections arrive on few CPUs; spreading them by hash"
                    );
                }
            }
            Turn::TakeAgain => {
                let _ = socket.set_cpu_affinity(self.group.cpus[self.index]);
            }
        }
    }
}

/// Whether `mine` of `all` connections is more than 1.5 times a fair share of `sockets`.
fn over_share(mine: u64, all: u64, sockets: usize) -> bool {
    let sockets = u64::try_from(sockets).unwrap_or(u64::MAX);
    mine.saturating_mul(sockets).saturating_mul(2) > all.saturating_mul(3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_is_too_much_past_one_and_a_half_times_fair() {
        assert!(!over_share(1024, 2048, 2));
        assert!(!over_share(1024, 1366, 2));
        assert!(over_share(1024, 1365, 2));
        assert!(over_share(1024, 1024, 2));
        assert!(!over_share(1024, 8192, 8));
        assert!(over_share(1024, 5000, 8));
        // One socket alone always has its fair share.
        assert!(!over_share(1024, 1024, 1));
    }

    #[test]
    fn a_socket_gives_its_cpu_back_for_a_while_then_takes_it_again() {
        assert_eq!(turn(0, false), (0, Turn::Keep));
        let (mut off, first) = turn(0, true);
        assert_eq!(first, Turn::GiveBack);
        // While given back, its share says nothing: the hash made it.
        for _ in 1..RETRY_AFTER {
            let (next, t) = turn(off, off % 2 == 0);
            assert_eq!(t, Turn::Keep);
            off = next;
        }
        assert_eq!(turn(off, true), (0, Turn::TakeAgain));
    }
}
