//! Zero-copy moves for a direction that streams: splice(2) from one socket into a pipe
//! and from the pipe into the other socket, so the bytes never enter lb's memory. Pipes
//! come from a small per-thread pool and go back to it whenever one is empty and its
//! reader has nothing more, so an idle connection holds no pipe.

use std::cell::RefCell;
use std::io;
use std::os::fd::OwnedFd;
use std::task::{Context, Poll, ready};

use nix::fcntl::{OFlag, SpliceFFlags, splice};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes moved into a pipe at once: a pipe's default capacity on Linux (16 pages). A
/// pipe four times as large took a quarter of the splice calls but no less CPU per GB.
const PIPE_BYTES: usize = 64 * 1024;

/// Free pipes a thread keeps; as with copy buffers, a pipe is usually back within the
/// poll that took it, so a few cover a thread's streaming connections.
const POOL_CAP: usize = 8;

/// One pipe: the read end and the write end.
#[derive(Debug)]
pub(super) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// A pipe from this thread's pool, or a new one.
pub(super) fn take() -> io::Result<Pipe> {
    if let Some(pipe) = POOL.with(|pool| pool.borrow_mut().pop()) {
        return Ok(pipe);
    }
    let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    Ok(Pipe { read, write })
}

/// Returns an empty pipe to this thread's pool, or closes it if the pool is full. A pipe
/// that still holds bytes must be dropped instead: they belong to its connection.
pub(super) fn give_back(pipe: Pipe) {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOL_CAP {
            pool.push(pipe);
        }
    });
}

/// Pipes in this thread's pool.
#[cfg(test)]
pub(super) fn pooled() -> usize {
    POOL.with(|pool| pool.borrow().len())
}

/// `SPLICE_F_MOVE` asks the kernel to move pages rather than copy them; non-blocking, as
/// the sockets and the pipe are.
fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK
}

/// Moves what `socket` has (up to a pipe's capacity) into the empty `pipe`: `Ok(0)` at
/// the socket's EOF. Unlike a read, a short move does not mean the socket is drained: a
/// pipe holds at most 16 of the socket's packets, however small, so only "would block"
/// clears the socket's readiness.
pub(super) fn poll_fill(
    cx: &mut Context<'_>,
    socket: &TcpStream,
    pipe: &Pipe,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(socket.poll_read_ready(cx))?;
        let attempt = socket.try_io(Interest::READABLE, || {
            splice(socket, None, &pipe.write, None, PIPE_BYTES, flags()).map_err(io::Error::from)
        });
        match attempt {
            Ok(n) => return Poll::Ready(Ok(n)),
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) => return Poll::Ready(Err(err)),
        }
    }
}

/// Moves up to `pending` bytes from `pipe` into `socket`; how many it took (never 0).
pub(super) fn poll_drain(
    cx: &mut Context<'_>,
    pipe: &Pipe,
    socket: &TcpStream,
    pending: usize,
) -> Poll<io::Result<usize>> {
    let n = ready!(poll_writable_io(cx, socket, || {
        splice(&pipe.read, None, socket, None, pending, flags()).map_err(io::Error::from)
    }))?;
    if n == 0 {
        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
    }
    Poll::Ready(Ok(n))
}

/// Runs `write`, a system call that puts bytes into `socket`, once the event loop says the
/// socket can take some, and again after each "would block", which clears that readiness.
pub(super) fn poll_writable_io(
    cx: &mut Context<'_>,
    socket: &TcpStream,
    mut write: impl FnMut() -> io::Result<usize>,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(socket.poll_write_ready(cx))?;
        match socket.try_io(Interest::WRITABLE, &mut write) {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            result => return Poll::Ready(result),
        }
    }
}
