//! Opening a connection's backend side in as few packets and system calls as the kernel
//! allows, as HAProxy's `tcp-smart-connect` does.
//!
//! Before connecting, lb reads what the client has already sent (for a protocol where the
//! client speaks first, the request has usually arrived by then). With bytes to send,
//! the PROXY header or the client's, the socket delays its acknowledgements
//! (`TCP_QUICKACK` off), so the handshake's last ACK leaves with the first bytes rather
//! than on its own, and those bytes are sent right after `connect`: on a near backend the
//! handshake has completed inside `connect`, so the send succeeds, and it also tells that
//! the connect did, without waiting for the event loop or asking `SO_ERROR`. With
//! nothing to send, as for a protocol where the server speaks first, the socket
//! acknowledges at once, or the server would not accept it until the delayed ACK left.

use std::io;
use std::net::SocketAddr;

use std::pin::Pin;
use std::task::{Context, Poll};

use socket2::{Domain, SockRef, Socket, Type};
use tokio::io::{AsyncRead as _, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;

use super::buffer::{Buffer, give_back, take};
use super::copy::Early;
use super::proxy_protocol;
use crate::config::ProxyProtocol;

/// What goes to the backend first: `buf[..header]` the PROXY header (not the client's
/// bytes, so not counted), then `buf[header..end]` what the client had sent.
pub(super) struct Opening {
    buf: Option<Buffer>,
    header: u16,
    end: u16,
}

impl Opening {
    /// The PROXY header for `peer` (when on) and what `client` has sent so far, read
    /// without waiting: tokio takes a socket just accepted for readable, so the read is
    /// tried, and a short one clears that, so the copy's first read waits for the event
    /// loop rather than finding nothing. An error is the client's: it reset the connection
    /// before it was served. An EOF read here is read again by the copy (a socket's EOF
    /// stays).
    pub(super) fn read(
        cx: &mut Context<'_>,
        client: &mut TcpStream,
        version: ProxyProtocol,
        peer: SocketAddr,
        listen: SocketAddr,
    ) -> io::Result<Opening> {
        let mut buf = take();
        let mut header = 0;
        if version != ProxyProtocol::Off {
            let local = client.local_addr().unwrap_or(listen);
            let mut relayed = [0u8; proxy_protocol::MAX_HEADER];
            header = proxy_protocol::relayed(version, peer, local, &mut relayed);
            buf[..header].copy_from_slice(&relayed[..header]);
        }
        let mut read = ReadBuf::new(&mut buf[header..]);
        let end = match Pin::new(client).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => header + read.filled().len(),
            Poll::Pending => header,
            Poll::Ready(Err(err)) => {
                give_back(buf);
                return Err(err);
            }
        };
        let buf = if end == 0 {
            give_back(buf);
            None
        } else {
            Some(buf)
        };
        Ok(Opening {
            buf,
            header: u16::try_from(header).expect("a PROXY header is short"),
            end: u16::try_from(end).expect("at most CHUNK bytes"),
        })
    }

    fn bytes(&self) -> &[u8] {
        self.buf
            .as_ref()
            .map_or(&[], |buf| &buf[..self.end as usize])
    }

    /// What the copy still has to send of the client's bytes, `sent` of these bytes having
    /// gone with the connect (the whole header among them).
    pub(super) fn rest(self, sent: usize) -> Option<Early> {
        let buf = self.buf?;
        let sent = u16::try_from(sent).expect("at most what the opening held");
        Some(Early {
            buf,
            start: sent,
            end: self.end,
            sent: sent - self.header,
        })
    }
}

/// Connects to `backend` and sends what it can of `opening` at once: the connected
/// socket, and how many bytes of the opening went (all of the PROXY header at least).
pub(super) async fn connect(
    backend: SocketAddr,
    opening: &Opening,
) -> io::Result<(TcpStream, usize)> {
    let kind = Type::STREAM.nonblocking().cloexec();
    let socket = Socket::new(Domain::for_address(backend), kind, None)?;
    // Small writes (a request line, a keystroke) go out at once, as on a direct
    // connection. The client has `TCP_NODELAY` from its listening socket already.
    socket.set_tcp_nodelay(true)?;
    let first = opening.bytes();
    if !first.is_empty() {
        socket.set_tcp_quickack(false)?;
    }
    match socket.connect(&backend.into()) {
        Err(err) if err.raw_os_error() != Some(nix::libc::EINPROGRESS) => return Err(err),
        _ => {}
    }
    let mut sent = 0;
    if !first.is_empty() {
        match socket.send_with_flags(first, nix::libc::MSG_NOSIGNAL) {
            Ok(n) => sent = n,
            // Still connecting: the copy sends the bytes once it is done.
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) => return Err(err),
        }
    }
    let mut upstream = TcpStream::from_std(socket.into())?;
    if sent == 0 {
        upstream.writable().await?;
        if let Some(err) = SockRef::from(&upstream).take_error()? {
            return Err(err);
        }
    }
    // The header is not the client's, and the copy counts every byte it sends: it sends
    // none of the header.
    let header = usize::from(opening.header);
    if sent < header {
        upstream.write_all(&first[sent..header]).await?;
        sent = header;
    }
    Ok((upstream, sent))
}
