//! The sockets of one listen address: one per connection thread, so each thread accepts
//! its own clients from its own queue and a new connection wakes one thread, not all.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::sync::Arc;

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, bind, getsockopt, listen,
    setsockopt, socket, sockopt,
};
use tracing::warn;

use super::{LISTEN_BACKLOG, steering};

/// The listening sockets of one address, at most one per connection thread.
#[derive(Debug)]
pub struct Listening {
    sockets: Vec<std::net::TcpListener>,
    /// Set when each socket takes the connections of a CPU of its own.
    steered: Option<Arc<steering::Group>>,
}

impl Listening {
    /// Binds `addr` for `threads` connection threads.
    pub fn open(addr: SocketAddr, threads: usize) -> io::Result<Listening> {
        let first = super::bind_one(addr)?.into_std()?;
        Ok(Listening::per_thread(first, threads))
    }

    /// `first` and up to `threads - 1` siblings. Where `first` has `SO_REUSEPORT`, a
    /// sibling is a new socket in its group, and the kernel spreads new connections over
    /// the group by a hash of their addresses. A socket without it (one passed in by a
    /// service manager) gets other descriptors of itself instead: the threads then share
    /// its one queue, and a new connection wakes each of them.
    pub fn per_thread(first: std::net::TcpListener, threads: usize) -> Listening {
        nodelay(&first);
        let grouped = getsockopt(&first, sockopt::ReusePort).unwrap_or(false);
        let mut sockets = vec![first];
        while sockets.len() < threads {
            let sibling = if grouped {
                sockets[0].local_addr().and_then(sibling)
            } else {
                sockets[0].try_clone()
            };
            match sibling {
                Ok(socket) => {
                    nodelay(&socket);
                    sockets.push(socket);
                }
                Err(err) => {
                    let addr = sockets[0].local_addr().ok();
                    warn!(?addr, %err, accepting = sockets.len(), threads, "could not open a listening socket per thread; fewer threads accept on this address");
                    break;
                }
            }
        }
        let steered = if grouped {
            steering::steer(&sockets)
        } else {
            None
        };
        Listening { sockets, steered }
    }

    /// Other descriptors of the same sockets, for a reload that hands the address to
    /// another service: binding anew would fail while these listen, and closing them
    /// first would refuse clients in between.
    pub fn share(&self) -> io::Result<Listening> {
        let sockets = self
            .sockets
            .iter()
            .map(std::net::TcpListener::try_clone)
            .collect::<io::Result<_>>()?;
        let steered = self.steered.clone();
        Ok(Listening { sockets, steered })
    }

    /// Where the sockets listen: with port 0, the port the kernel chose.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.sockets.first()?.local_addr().ok()
    }

    /// Each socket, with its place in the group's steering if the group is steered.
    pub(super) fn into_sockets(
        self,
    ) -> impl Iterator<Item = (std::net::TcpListener, Option<steering::Member>)> {
        let steered = self.steered;
        self.sockets
            .into_iter()
            .enumerate()
            .map(move |(index, socket)| {
                let member = steered
                    .as_ref()
                    .map(|group| steering::Member::new(Arc::clone(group), index));
                (socket, member)
            })
    }
}

/// Sets `TCP_NODELAY` on a listening socket. Linux copies it to every connection the
/// socket accepts, so small writes to clients (a reply line, a keystroke) go out at once,
/// as on a direct connection, without a `setsockopt` per connection. Best effort: a
/// socket that refuses it only delays small writes.
fn nodelay(socket: &std::net::TcpListener) {
    let _ = setsockopt(socket, sockopt::TcpNoDelay, &true);
}

/// A new socket in the `SO_REUSEPORT` group listening on `addr`.
fn sibling(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = bound(addr, true)?;
    let backlog = Backlog::new(i32::try_from(LISTEN_BACKLOG).unwrap_or(i32::MAX))?;
    listen(&socket, backlog)?;
    Ok(socket.into())
}

/// A non-blocking TCP socket bound to `addr`, with `SO_REUSEADDR` (a restarted lb binds
/// while old connections sit in TIME_WAIT) and, if asked, `SO_REUSEPORT`.
pub(super) fn bound(addr: SocketAddr, reuseport: bool) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
    let socket = socket(family, SockType::Stream, flags, None)?;
    setsockopt(&socket, sockopt::ReuseAddr, &true)?;
    if reuseport {
        setsockopt(&socket, sockopt::ReusePort, &true)?;
    }
    match addr {
        SocketAddr::V4(v4) => bind(socket.as_raw_fd(), &SockaddrIn::from(v4))?,
        SocketAddr::V6(v6) => bind(socket.as_raw_fd(), &SockaddrIn6::from(v6))?,
    }
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use std::io::ErrorKind;
    use std::net::{TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    use nix::sched::{CpuSet, sched_setaffinity};
    use nix::unistd::Pid;
    use socket2::SockRef;

    use super::steering::{Member, WINDOW, allowed_cpus};
    use super::*;

    type Group = Vec<(TcpListener, Option<Member>)>;

    /// A group of `threads` sockets on a port of its own.
    fn group(threads: usize) -> Group {
        let first = sibling("127.0.0.1:0".parse().unwrap()).unwrap();
        let group: Group = Listening::per_thread(first, threads)
            .into_sockets()
            .collect();
        assert_eq!(group.len(), threads, "could not open every socket");
        group
    }

    /// The CPU each socket takes the connections of; `usize::MAX` for none.
    fn cpus_of(group: &Group) -> Vec<usize> {
        let cpu = |socket| SockRef::from(socket).cpu_affinity().unwrap();
        group.iter().map(|(socket, _)| cpu(socket)).collect()
    }

    /// Runs `f` on a thread that may run only on `cpu`: on loopback, the handshakes of
    /// its connections are processed there.
    fn on_cpu<T: Send + 'static>(cpu: usize, f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(move || {
            let mut only = CpuSet::new();
            only.set(cpu).unwrap();
            sched_setaffinity(Pid::from_raw(0), &only).unwrap();
            f()
        })
        .join()
        .unwrap()
    }

    /// One connection from `socket`, waiting for the kernel to finish its handshake (a
    /// loaded machine can leave the last step to ksoftirqd).
    fn accept(socket: &TcpListener) -> Option<TcpStream> {
        match socket.accept() {
            Ok((stream, _)) => Some(stream),
            Err(err) if err.kind() == ErrorKind::WouldBlock => None,
            Err(err) => panic!("accept: {err}"),
        }
    }

    /// Takes `expected` queued connections from the group: how many each socket had.
    fn queued(group: &Group, expected: usize) -> Vec<usize> {
        let mut counts = vec![0; group.len()];
        let deadline = Instant::now() + Duration::from_secs(10);
        while counts.iter().sum::<usize>() < expected {
            assert!(
                Instant::now() < deadline,
                "only {counts:?} of {expected} arrived"
            );
            let mut none = true;
            for ((socket, _), count) in group.iter().zip(&mut counts) {
                while accept(socket).is_some() {
                    *count += 1;
                    none = false;
                }
            }
            if none {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        counts
    }

    /// Whether the kernel steers by CPU within a `SO_REUSEPORT` group (Linux 6.2) and
    /// loopback packets are processed on the sender's CPU (no RPS on `lo`).
    fn kernel_steers() -> bool {
        let uname = nix::sys::utsname::uname().unwrap();
        let release = uname.release().to_string_lossy();
        let mut parts = release.split(['.', '-']).map(|p| p.parse().unwrap_or(0));
        let version: (u32, u32) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        let rps =
            std::fs::read_to_string("/sys/class/net/lo/queues/rx-0/rps_cpus").unwrap_or_default();
        let spread = rps.trim().chars().any(|c| c != '0' && c != ',');
        if version < (6, 2) || spread {
            eprintln!("skipped: Linux {release} does not steer loopback connections by CPU");
        }
        version >= (6, 2) && !spread
    }

    /// The CPUs to test on: a group per CPU on a machine with hundreds of them would
    /// open more sockets than a test may.
    fn cpus() -> Vec<usize> {
        allowed_cpus().into_iter().take(32).collect()
    }

    #[test]
    fn each_socket_has_a_cpu_while_the_cpus_share_them_equally() {
        let cpus = allowed_cpus();
        if !(2..=32).contains(&cpus.len()) {
            return;
        }
        assert_eq!(cpus_of(&group(cpus.len())), cpus);
        let twice: Vec<usize> = cpus.iter().chain(&cpus).copied().collect();
        assert_eq!(cpus_of(&group(2 * cpus.len())), twice);
        if cpus.len() > 2 {
            assert_eq!(cpus_of(&group(2)), cpus[..2]);
        }
    }

    #[test]
    fn a_group_whose_cpus_would_take_unequal_shares_is_not_steered() {
        let cpus = allowed_cpus().len();
        if !(2..=32).contains(&cpus) {
            return;
        }
        // One CPU gets two sockets, the others one.
        let uneven = group(cpus + 1);
        assert_eq!(cpus_of(&uneven), vec![usize::MAX; cpus + 1]);
        assert!(uneven.iter().all(|(_, member)| member.is_none()));
    }

    #[test]
    fn a_socket_left_with_a_cpu_joins_an_unsteered_group_without_it() {
        let cpus = allowed_cpus().len();
        if !(2..=32).contains(&cpus) {
            return;
        }
        // As a socket a service manager kept open from an lb that steered.
        let first = sibling("127.0.0.1:0".parse().unwrap()).unwrap();
        SockRef::from(&first).set_cpu_affinity(0).unwrap();
        let listening = Listening::per_thread(first, cpus + 1);
        let cpu = SockRef::from(&listening.sockets[0]).cpu_affinity().unwrap();
        assert_eq!(cpu, usize::MAX);
    }

    #[test]
    fn a_connection_goes_to_the_socket_of_the_cpu_that_received_it() {
        if !kernel_steers() {
            return;
        }
        let cpus = cpus();
        let group = group(cpus.len());
        let addr = group[0].0.local_addr().unwrap();
        for (index, &cpu) in cpus.iter().enumerate() {
            let clients = on_cpu(cpu, move || {
                (0..8)
                    .map(|_| TcpStream::connect(addr).unwrap())
                    .collect::<Vec<_>>()
            });
            let mut expected = vec![0; cpus.len()];
            expected[index] = clients.len();
            assert_eq!(queued(&group, clients.len()), expected, "from CPU {cpu}");
        }
    }

    #[test]
    fn connections_that_all_arrive_on_one_cpu_are_spread_by_hash() {
        let cpus = cpus();
        if cpus.len() < 2 || !kernel_steers() {
            return;
        }
        let mut group = group(cpus.len());
        let addr = group[0].0.local_addr().unwrap();
        let sockets = u64::try_from(cpus.len()).unwrap();
        // Every connection arrives on the first CPU, as from a NIC with one queue: the
        // first socket takes them all, until the group has seen a window of them.
        let (first, member) = group.remove(0);
        let (first, member) = on_cpu(cpus[0], move || {
            let mut member = member.unwrap();
            for _ in 0..WINDOW * sockets {
                let _client = TcpStream::connect(addr).unwrap();
                let deadline = Instant::now() + Duration::from_secs(10);
                while accept(&first).is_none() {
                    assert!(Instant::now() < deadline, "a connection went elsewhere");
                    std::thread::sleep(Duration::from_millis(1));
                }
                member.accepted(&first);
            }
            (first, member)
        });
        group.insert(0, (first, Some(member)));
        assert_eq!(cpus_of(&group)[0], usize::MAX);
        let _clients = on_cpu(cpus[0], move || {
            (0..64)
                .map(|_| TcpStream::connect(addr).unwrap())
                .collect::<Vec<_>>()
        });
        let spread = queued(&group, 64);
        assert!(
            spread[0] < 64,
            "the first CPU's connections still all go to its socket"
        );
    }
}
