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

use std::io::{self, IoSlice};
use std::net::SocketAddr;

use std::pin::Pin;
use std::task::{Context, Poll};

use socket2::{Domain, SockRef, Socket, Type};
use tokio::io::{AsyncRead as _, AsyncWriteExt as _, Interest, ReadBuf};
use tokio::net::TcpStream;

use super::buffer::{Buffer, give_back, take};
use super::copy::Early;
use super::proxy_protocol;
use crate::config::ProxyProtocol;

/// What goes to the backend first: the PROXY header (when on; not the client's bytes, so
/// never counted), then what the client had sent. The header is kept inline and a copy
/// buffer is taken only for the client's bytes, so a client that sent nothing holds no
/// buffer while lb connects.
pub(super) struct Opening {
    version: ProxyProtocol,
    header: [u8; proxy_protocol::MAX_HEADER],
    header_len: u8,
    data: Option<Buffer>,
    data_len: u16,
}

impl Opening {
    /// The PROXY header for `peer` (when on) and what `client` has sent so far, read
    /// without waiting: tokio takes a socket it has just accepted for readable, so the
    /// read is tried, and a short one clears that, so the copy's first read waits for the
    /// event loop rather than finding nothing. (A client accepted while lb stops comes
    /// from the plain socket and is not taken for readable: nothing is read here, and the
    /// copy reads it.) An error is the client's: it reset the connection before it was
    /// served. An EOF read here is read again by the copy (a socket's EOF stays).
    pub(super) fn read(
        cx: &mut Context<'_>,
        client: &mut TcpStream,
        version: ProxyProtocol,
        peer: SocketAddr,
        listen: SocketAddr,
    ) -> io::Result<Opening> {
        let mut opening = Opening {
            version: ProxyProtocol::Off,
            header: [0; proxy_protocol::MAX_HEADER],
            header_len: 0,
            data: None,
            data_len: 0,
        };
        opening.set_version(version, client, peer, listen);
        let mut buf = take();
        let mut read = ReadBuf::new(&mut buf[..]);
        match Pin::new(client).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) if !read.filled().is_empty() => {
                opening.data_len = u16::try_from(read.filled().len()).expect("at most CHUNK bytes");
                opening.data = Some(buf);
            }
            Poll::Ready(Ok(())) | Poll::Pending => give_back(buf),
            Poll::Ready(Err(err)) => {
                give_back(buf);
                return Err(err);
            }
        }
        Ok(opening)
    }

    /// Makes the header the one `version` asks for: a reload between two tries may have
    /// changed the service's `proxy_protocol`.
    pub(super) fn set_version(
        &mut self,
        version: ProxyProtocol,
        client: &TcpStream,
        peer: SocketAddr,
        listen: SocketAddr,
    ) {
        if version == self.version {
            return;
        }
        let local = if version == ProxyProtocol::Off {
            listen
        } else {
            client.local_addr().unwrap_or(listen)
        };
        let len = proxy_protocol::relayed(version, peer, local, &mut self.header);
        self.header_len = u8::try_from(len).expect("a PROXY header is short");
        self.version = version;
    }

    fn header(&self) -> &[u8] {
        &self.header[..usize::from(self.header_len)]
    }

    fn data(&self) -> &[u8] {
        self.data
            .as_ref()
            .map_or(&[], |buf| &buf[..usize::from(self.data_len)])
    }

    fn is_empty(&self) -> bool {
        self.header_len == 0 && self.data_len == 0
    }

    /// Sends what it can of the header and the client's bytes in one segment, without
    /// waiting: how many bytes went, 0 while the socket is still connecting.
    fn send(&self, socket: SockRef<'_>) -> io::Result<usize> {
        let parts = [IoSlice::new(self.header()), IoSlice::new(self.data())];
        match socket.send_vectored_with_flags(&parts, nix::libc::MSG_NOSIGNAL) {
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => Ok(0),
            sent => sent,
        }
    }

    /// What the copy still has to send of the client's bytes, `sent` bytes of the opening
    /// having gone with the connect (the whole header among them).
    pub(super) fn rest(self, sent: usize) -> Option<Early> {
        let sent = sent.saturating_sub(self.header().len());
        let buf = self.data?;
        let sent = u16::try_from(sent).expect("at most what the opening held");
        Some(Early {
            buf,
            start: sent,
            end: self.data_len,
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
    // connection. The client has `TCP_NODELAY` from its listening socket already. Both
    // options only save time or packets: a socket that refuses one still connects.
    let _ = socket.set_tcp_nodelay(true);
    if !opening.is_empty() {
        let _ = socket.set_tcp_quickack(false);
    }
    match socket.connect(&backend.into()) {
        Err(err) if err.raw_os_error() != Some(nix::libc::EINPROGRESS) => return Err(err),
        _ => {}
    }
    let mut sent = if opening.is_empty() {
        0
    } else {
        opening.send(SockRef::from(&socket))?
    };
    let mut upstream = TcpStream::from_std(socket.into())?;
    if sent == 0 {
        // Still connecting (a backend farther than loopback), or nothing to send.
        upstream.writable().await?;
        if let Some(err) = SockRef::from(&upstream).take_error()? {
            return Err(err);
        }
        if !opening.is_empty() {
            sent = upstream.try_io(Interest::WRITABLE, || {
                opening.send(SockRef::from(&upstream))
            })?;
        }
    }
    // The header is not the client's, and the copy counts every byte it sends: it sends
    // none of the header.
    let header = opening.header();
    if sent < header.len() {
        upstream.write_all(&header[sent..]).await?;
        sent = header.len();
    }
    Ok((upstream, sent))
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;

    /// A client that sent `hello`, as lb accepted it, and the listener it reached.
    async fn client_that_sent_hello() -> (TcpStream, TcpStream, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let listen = listener.local_addr().expect("address");
        let mut client = TcpStream::connect(listen).await.expect("connect");
        client.write_all(b"hello").await.expect("send");
        let (accepted, _) = listener.accept().await.expect("accept");
        (client, accepted, listen)
    }

    /// A retry after a reload that turned the PROXY protocol on sends the new header, then
    /// the client's bytes read for the first try, and counts only those.
    #[tokio::test]
    async fn a_retry_sends_the_header_its_pool_asks_for_then_the_clients_bytes() {
        let (client, mut accepted, listen) = client_that_sent_hello().await;
        let peer = client.local_addr().expect("client address");
        let mut opening = poll_fn(|cx| {
            Poll::Ready(Opening::read(
                cx,
                &mut accepted,
                ProxyProtocol::Off,
                peer,
                listen,
            ))
        })
        .await
        .expect("read");
        assert_eq!(opening.data(), b"hello");
        opening.set_version(ProxyProtocol::V1, &accepted, peer, listen);
        let backend = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = backend.local_addr().expect("address");
        let ((upstream, sent), (mut far, _)) = tokio::join!(
            async { connect(addr, &opening).await.expect("connect") },
            async { backend.accept().await.expect("accept") },
        );
        let header = format!(
            "PROXY TCP4 127.0.0.1 127.0.0.1 {} {}\r\n",
            peer.port(),
            listen.port()
        );
        let early = opening.rest(sent).expect("the client's bytes");
        // What the connect sent beyond the header is what the copy counts as sent.
        assert_eq!(usize::from(early.start), sent - header.len());
        drop(upstream);
        let mut got = Vec::new();
        far.read_to_end(&mut got).await.expect("read");
        let mut expected = header.into_bytes();
        expected.extend_from_slice(&b"hello"[..usize::from(early.start)]);
        assert_eq!(got, expected);
    }
}
