//! Which connection thread a new connection goes to. The sockets of one listen address
//! form a `SO_REUSEPORT` group, one socket per thread; by default the kernel picks a
//! socket by a hash of the connection's addresses. Given a CPU each
//! (`SO_INCOMING_CPU`), they take the connections whose handshake arrived on their CPU
//! instead (Linux 6.2 and later; a CPU without a socket still falls back to the hash),
//! so the connections whose packets one CPU processes belong to one thread: a burst of
//! their packets wakes that thread once, to serve them together, where the hash wakes
//! every thread for a few each (docs/benchmarks.md has what it saves).
//!
//! Steering only pays where packets arrive spread over the CPUs (a NIC with a queue per
//! CPU, or clients on the same host). Where they do not (a NIC with fewer queues than
//! CPUs, and no RPS), it would leave the threads of the quiet CPUs without connections:
//! every [`WINDOW`] connections per socket, the group looks at how its sockets shared
//! them, and if one took less than half or more than 1.5 times an equal share, its
//! sockets leave the choice to the hash for [`HASH_FOR`]. A few long-lived connections
//! never make a window: they stay where their CPUs put them.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sched::{CpuSet, sched_getaffinity};
use nix::unistd::Pid;
use socket2::SockRef;
use tracing::info;

use crate::metrics::Slot;

/// Connections per socket between two looks at how the group shared them: enough that
/// an equal share of them almost never strays by half (16 is one standard deviation).
pub(super) const WINDOW: u64 = 256;

/// A socket's accepts between two checks whether the group has a window to look at.
const CHECK_EVERY: u64 = 64;

/// How long an unevenly shared group leaves the choice to the hash before it steers
/// again: unevenness can pass (clients that moved between CPUs for a while, one that
/// ran alone), and a group whose CPUs still receive unevenly goes back to the hash after
/// one window.
const HASH_FOR: Duration = Duration::from_secs(10);

/// The sockets of one steered address.
#[derive(Debug)]
pub(super) struct Group {
    /// Each socket's CPU.
    cpus: Box<[usize]>,
    /// Each socket's accepts, added to by its thread on every accept.
    accepted: Box<[Slot]>,
    /// Until when, in milliseconds after `born`, the hash chooses; 0 while the sockets
    /// take their CPUs' connections. Each accept loop brings its own socket in line at
    /// its next connection.
    hashed_until: AtomicU64,
    born: Instant,
    look: Mutex<Look>,
}

/// What the group saw at its last look.
#[derive(Debug)]
struct Look {
    /// Each socket's count.
    seen: Box<[u64]>,
    /// Whether the hash chose when the window began: its shares then say nothing of
    /// where the CPUs send connections.
    began_hashed: bool,
    /// Whether the group has gone back to the hash before, so it says so once.
    said: bool,
}

/// Gives each socket of a `SO_REUSEPORT` group a CPU lb may run on, if that keeps their
/// shares equal: a CPU each (fewer sockets than CPUs: the others' connections are
/// hashed over all of them), or the same number on every CPU (a CPU's connections are
/// hashed over its sockets). Otherwise, or with one socket, no socket has a CPU, even
/// one set by an earlier lb on a socket a service manager kept open. Best effort: a
/// socket that refuses is picked by the hash, as without steering.
pub(super) fn steer<S: AsFd>(sockets: &[S]) -> Option<Arc<Group>> {
    let cpus = allowed_cpus();
    let even = sockets.len() <= cpus.len() || sockets.len().is_multiple_of(cpus.len());
    if sockets.len() < 2 || cpus.is_empty() || !even {
        for socket in sockets {
            unsteer(socket);
        }
        return None;
    }
    let cpus: Box<[usize]> = cpus.iter().copied().cycle().take(sockets.len()).collect();
    let set = sockets
        .iter()
        .zip(&cpus)
        .filter(|(socket, cpu)| SockRef::from(socket).set_cpu_affinity(**cpu).is_ok())
        .count();
    if set == 0 {
        return None;
    }
    let look = Look {
        seen: cpus.iter().map(|_| 0).collect(),
        began_hashed: false,
        said: false,
    };
    Some(Arc::new(Group {
        accepted: cpus.iter().map(|_| Slot::default()).collect(),
        cpus,
        hashed_until: AtomicU64::new(0),
        born: Instant::now(),
        look: Mutex::new(look),
    }))
}

/// Leaves `socket`'s connections to the hash. socket2 passes the CPU on as a C int: -1,
/// which the kernel reads as none.
fn unsteer(socket: impl AsFd) {
    let _ = SockRef::from(&socket).set_cpu_affinity(usize::MAX);
}

/// The CPUs this process may run on.
pub(super) fn allowed_cpus() -> Vec<usize> {
    let Ok(set) = sched_getaffinity(Pid::from_raw(0)) else {
        return Vec::new();
    };
    (0..CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .collect()
}

/// One socket of a steered group, as its accept loop holds it.
#[derive(Debug)]
pub(super) struct Member {
    group: Arc<Group>,
    index: usize,
    /// Whether this socket takes its CPU's connections; `None` until the loop first
    /// brings it in line (a socket handed over by a reload may be either).
    steered: Option<bool>,
}

impl Member {
    pub(super) fn new(group: Arc<Group>, index: usize) -> Member {
        Member {
            group,
            index,
            steered: None,
        }
    }

    /// Counts a connection `socket` accepted, brings the socket in line with its group,
    /// and takes the group's look when a window ends.
    pub(super) fn accepted(&mut self, socket: impl AsFd) {
        let group = &*self.group;
        let mine = group.accepted[self.index].0.fetch_add(1, Ordering::Relaxed) + 1;
        if mine.is_multiple_of(CHECK_EVERY) {
            group.look(&socket);
        }
        let steered = group.steers();
        if self.steered != Some(steered) {
            self.steered = Some(steered);
            if steered {
                let _ = SockRef::from(&socket).set_cpu_affinity(group.cpus[self.index]);
            } else {
                unsteer(&socket);
            }
        }
    }
}

impl Group {
    /// Whether the sockets take their CPUs' connections now.
    fn steers(&self) -> bool {
        let until = self.hashed_until.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        if self.now() < until {
            return false;
        }
        // Time is up: back to steering, which reads no clock at an accept.
        let _ = self
            .hashed_until
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed);
        true
    }

    /// Milliseconds since the group was made; never 0.
    fn now(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }

    /// Once the sockets have taken a window's connections since the last look, looks at
    /// how they shared them; if unevenly while steered, the hash chooses for a while.
    /// Another loop taking a look meanwhile has it covered.
    fn look(&self, socket: impl AsFd) {
        let Ok(mut look) = self.look.try_lock() else {
            return;
        };
        let now: Vec<u64> = self
            .accepted
            .iter()
            .map(|c| c.0.load(Ordering::Relaxed))
            .collect();
        let since: Vec<u64> = now
            .iter()
            .zip(&look.seen)
            .map(|(now, seen)| now.saturating_sub(*seen))
            .collect();
        let sockets = u64::try_from(since.len()).unwrap_or(u64::MAX);
        if since.iter().sum::<u64>() < WINDOW.saturating_mul(sockets) {
            return;
        }
        look.seen = now.into();
        let hashed = !self.steers();
        if std::mem::replace(&mut look.began_hashed, hashed) || hashed || !uneven(&since) {
            return;
        }
        let until = self
            .now()
            .saturating_add(u64::try_from(HASH_FOR.as_millis()).unwrap_or(u64::MAX));
        self.hashed_until.store(until, Ordering::Relaxed);
        if !std::mem::replace(&mut look.said, true) {
            let addr = SockRef::from(&socket)
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket());
            info!(
                ?addr,
                "new connections arrive unevenly over the CPUs; spreading them by hash for a while"
            );
        }
    }
}

/// Whether a socket took less than half or more than 1.5 times an equal share.
fn uneven(since: &[u64]) -> bool {
    let total: u64 = since.iter().sum();
    let sockets = u64::try_from(since.len()).unwrap_or(u64::MAX);
    since.iter().any(|&n| {
        let scaled = n.saturating_mul(sockets).saturating_mul(2);
        scaled < total || scaled > total.saturating_mul(3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_under_half_or_over_one_and_a_half_times_equal_is_uneven() {
        assert!(!uneven(&[128, 128]));
        assert!(!uneven(&[100, 156]));
        assert!(uneven(&[256, 0]));
        assert!(uneven(&[60, 196]));
        // Eight of twelve CPUs receive: the other four sockets get nothing.
        let mut eight_of_twelve = vec![32; 8];
        eight_of_twelve.extend([0; 4]);
        assert!(uneven(&eight_of_twelve));
        assert!(!uneven(&[30, 34, 32, 28, 36, 32, 30, 34]));
    }

    #[test]
    fn an_unevenly_shared_window_leaves_the_group_to_the_hash_for_a_while() {
        let sockets: Vec<std::net::TcpListener> = (0..2)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let group = steer(&sockets).expect("two sockets on as many CPUs or fewer");
        assert!(group.steers());
        // Every connection went to the first socket.
        group.accepted[0].0.store(2 * WINDOW, Ordering::Relaxed);
        group.look(&sockets[0]);
        assert!(!group.steers());
        let until = group.hashed_until.load(Ordering::Relaxed);
        let hash_for = u64::try_from(HASH_FOR.as_millis()).unwrap();
        assert!(until >= hash_for && until <= group.now() + hash_for);
        // While hashed, a window says nothing of the CPUs, however uneven: no change.
        group.accepted[1].0.store(2 * WINDOW, Ordering::Relaxed);
        group.look(&sockets[0]);
        assert_eq!(group.hashed_until.load(Ordering::Relaxed), until);
        // Once the time is up the group steers again; the window that began hashed is
        // not judged, the next one is.
        group.hashed_until.store(group.now(), Ordering::Relaxed);
        assert!(group.steers());
        assert_eq!(group.hashed_until.load(Ordering::Relaxed), 0);
        group.accepted[0].0.store(4 * WINDOW, Ordering::Relaxed);
        group.look(&sockets[0]);
        assert!(group.steers());
        group.accepted[0].0.store(6 * WINDOW, Ordering::Relaxed);
        group.look(&sockets[0]);
        assert!(!group.steers());
    }
}
