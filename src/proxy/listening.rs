//! The sockets of one listen address: one per connection thread, so each thread accepts
//! its own clients from its own queue and a new connection wakes one thread, not all.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd as _, OwnedFd};

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, bind, getsockopt, listen,
    setsockopt, socket, sockopt,
};
use tracing::warn;

use super::LISTEN_BACKLOG;

/// The listening sockets of one address, at most one per connection thread.
#[derive(Debug)]
pub struct Listening(Vec<std::net::TcpListener>);

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
        Listening(sockets)
    }

    /// Other descriptors of the same sockets, for a reload that hands the address to
    /// another service: binding anew would fail while these listen, and closing them
    /// first would refuse clients in between.
    pub fn share(&self) -> io::Result<Listening> {
        self.0
            .iter()
            .map(std::net::TcpListener::try_clone)
            .collect::<io::Result<_>>()
            .map(Listening)
    }

    /// Where the sockets listen: with port 0, the port the kernel chose.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.0.first()?.local_addr().ok()
    }

    pub(super) fn into_sockets(self) -> Vec<std::net::TcpListener> {
        self.0
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
