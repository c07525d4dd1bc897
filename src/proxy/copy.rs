//! Bidirectional byte copy with half-close, an idle timeout and exact byte counts, holding
//! no buffer while a connection is idle.
//!
//! Each read borrows a buffer from a small per-thread pool and writes what it read at
//! once; when the peer takes everything, the buffer goes straight back to the pool. Only
//! bytes a peer has not taken yet keep a buffer on the connection, until they drain. An
//! idle connection therefore costs its task and its two sockets, not two buffers.
//!
//! A direction that streams (three full reads in a row, HAProxy's `splice-auto` rule)
//! moves its bytes with splice(2) through a pooled pipe from then on, without copying
//! them through lb (see [`super::splice`]).

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd as _;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;

use nix::sys::socket::{MsgFlags, send};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::buffer::{Buffer, CHUNK, give_back, take};
use super::splice::{self, Pipe};
use crate::metrics::ByteCounter;

/// Full reads in a row after which a direction moves its bytes with splice(2): a
/// direction that fills the buffer this often is streaming, and a request or a reply that
/// fits in a few reads is not worth a pipe.
const SPLICE_AFTER: u8 = 3;

/// What a transfer reads from its service: the idle timeout and one byte counter per
/// direction. A transfer keeps one reference to it instead of three fields.
pub(super) trait Service {
    fn idle(&self) -> Duration;
    /// Bytes from the client to the backend (`direction="in"`).
    fn to_backend(&self) -> &ByteCounter;
    /// Bytes from the backend to the client (`direction="out"`).
    fn to_client(&self) -> &ByteCounter;
}

pin_project! {
    /// Copies both ways until both sides are done. One side's EOF shuts down the other
    /// side's write half, so a half-closed client still receives the backend's reply. A
    /// side that fails (a reset) makes lb reset the other side too, as a direct connection
    /// would have shown it, rather than end it with a FIN that passes a cut-off stream for
    /// a whole one. With no bytes either way for `idle`, it ends with `TimedOut`.
    ///
    /// A hand-written future rather than an `async fn`: all of it stays allocated for the
    /// connection's whole life, so it holds each field once and nothing else. `last` is when
    /// bytes last moved either way; `timer` wakes once per `idle` rather than once per
    /// read, and when it fires early (bytes moved since it was armed) it is armed again
    /// from `last`.
    pub(super) struct Transfer<'a, S: Service> {
        client: TcpStream,
        upstream: TcpStream,
        to_backend: Direction,
        to_client: Direction,
        last: Instant,
        service: &'a S,
        #[pin]
        timer: Sleep,
    }

    // A transfer that ends while a failed direction's last bytes still wait for a peer
    // that has not taken them (an idle timeout, or lb closing the connection at its drain
    // deadline) resets both sides: the other side learns of the failure as a reset, as it
    // would have once those bytes were through, not as a FIN.
    impl<S: Service> PinnedDrop for Transfer<'_, S> {
        fn drop(this: Pin<&mut Self>) {
            if this.to_backend.failed().or(this.to_client.failed()).is_some() {
                let _ = this.client.set_zero_linger();
                let _ = this.upstream.set_zero_linger();
            }
        }
    }
}

/// Client bytes read before the transfer began, while lb connected: `buf[..start]` went
/// with the connect (counted when the transfer starts) and `buf[start..end]` is still to
/// be sent.
pub(super) struct Early {
    pub buf: Buffer,
    pub start: u16,
    pub end: u16,
}

impl<'a, S: Service> Transfer<'a, S> {
    pub(super) fn new(
        client: TcpStream,
        upstream: TcpStream,
        service: &'a S,
        early: Option<Early>,
    ) -> Self {
        let last = Instant::now();
        let mut to_backend = Direction::default();
        if let Some(Early { buf, start, end }) = early {
            service.to_backend().add(start.into());
            to_backend.bytes = start.into();
            if start < end {
                (to_backend.held, to_backend.start, to_backend.end) = (Some(buf), start, end);
            } else {
                give_back(buf);
            }
        }
        Transfer {
            client,
            upstream,
            to_backend,
            to_client: Direction::default(),
            last,
            service,
            timer: tokio::time::sleep_until(last + service.idle()),
        }
    }

    /// Bytes moved so far: (client to backend, backend to client).
    pub(super) fn bytes(&self) -> (u64, u64) {
        (self.to_backend.bytes, self.to_client.bytes)
    }
}

impl<S: Service> Future for Transfer<'_, S> {
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut this = self.project();
        let mut moved = false;
        let (client, upstream) = (&mut *this.client, &mut *this.upstream);
        let done = this.to_client.flow == Flow::Done;
        let up = this.to_backend.poll(
            cx,
            client,
            upstream,
            this.service.to_backend(),
            done,
            &mut moved,
        );
        let done = this.to_backend.flow == Flow::Done;
        let down = this.to_client.poll(
            cx,
            upstream,
            client,
            this.service.to_client(),
            done,
            &mut moved,
        );
        if moved {
            *this.last = Instant::now();
        }
        match (up, down) {
            (Poll::Ready(Err(err)), _) | (_, Poll::Ready(Err(err))) => {
                let _ = client.set_zero_linger();
                let _ = upstream.set_zero_linger();
                return Poll::Ready(Err(err));
            }
            (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => return Poll::Ready(Ok(())),
            _ => {}
        }
        while this.timer.as_mut().poll(cx).is_ready() {
            let deadline = *this.last + this.service.idle();
            if deadline <= Instant::now() {
                // A side failed while its last bytes waited for a peer that never took
                // them: the connection ended with that failure (and dropping the transfer
                // resets both sides), not with a timeout.
                let failed = this.to_backend.failed().or(this.to_client.failed());
                return Poll::Ready(Err(match failed {
                    Some(kind) => kind.into(),
                    None => io::Error::new(io::ErrorKind::TimedOut, "idle timeout"),
                }));
            }
            this.timer.as_mut().reset(deadline);
        }
        Poll::Pending
    }
}

/// One direction's state: what it read and the writer has not taken yet, if anything.
#[derive(Default)]
struct Direction {
    /// Holds `held[start..end]` for the writer; `None` while nothing is pending.
    held: Option<Buffer>,
    /// Holds `in_pipe` bytes for the writer while splicing; `None` while nothing is
    /// pending.
    pipe: Option<Pipe>,
    in_pipe: u32,
    start: u16,
    end: u16,
    flow: Flow,
    /// Full reads in a row; at [`SPLICE_AFTER`] the direction splices.
    streak: u8,
    /// Bytes written so far, for the connection's log line.
    bytes: u64,
}

/// Where a direction is between its first byte and its EOF passed on.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Flow {
    #[default]
    Open,
    /// The reader saw EOF; once the bytes held are written, the writer's write half is
    /// shut down.
    Closing,
    /// The reader failed, with this error, after the bytes held were read; once they are
    /// written, the transfer fails.
    Failed(io::ErrorKind),
    Done,
}

impl Direction {
    /// The error of a reader that failed while the bytes it read before failing are still
    /// on their way to the writer.
    fn failed(&self) -> Option<io::ErrorKind> {
        match self.flow {
            Flow::Failed(kind) => Some(kind),
            _ => None,
        }
    }

    /// Moves bytes from `reader` to `writer` until one of them would block. Every write,
    /// partial or whole, is counted at once and counts as activity: a slow reader that
    /// takes a buffer in small pieces is busy, not idle, and the byte counters are exact
    /// even for a connection that is cut mid-write. `other_done`: the opposite direction
    /// has finished, so this one's EOF ends the transfer.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut TcpStream,
        writer: &mut TcpStream,
        counter: &ByteCounter,
        other_done: bool,
        moved: &mut bool,
    ) -> Poll<io::Result<()>> {
        loop {
            if let Some(buf) = &self.held {
                // With the reader's end already seen, the FIN follows these bytes at once.
                let fin_follows = self.flow == Flow::Closing;
                while self.start < self.end {
                    let pending = &buf[self.start as usize..self.end as usize];
                    let written = ready!(poll_write(cx, writer, pending, fin_follows))?;
                    if written == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    self.start += u16::try_from(written).expect("at most CHUNK bytes");
                    sent(written, &mut self.bytes, counter, moved);
                }
                if let Some(buf) = self.held.take() {
                    give_back(buf);
                }
            }
            match self.flow {
                Flow::Done => return Poll::Ready(Ok(())),
                Flow::Failed(kind) => {
                    self.flow = Flow::Done;
                    return Poll::Ready(Err(kind.into()));
                }
                // With the other direction done too, the transfer ends now and dropping
                // the writer closes it, which sends the same FIN: its bytes were all read
                // (that direction reached EOF), so the close cannot turn into a reset.
                // One `shutdown` call fewer per connection.
                Flow::Closing if other_done => {
                    self.flow = Flow::Done;
                    return Poll::Ready(Ok(()));
                }
                Flow::Closing => {
                    ready!(Pin::new(&mut *writer).poll_shutdown(cx))?;
                    self.flow = Flow::Done;
                    return Poll::Ready(Ok(()));
                }
                Flow::Open => {}
            }
            if self.streak >= SPLICE_AFTER {
                ready!(self.poll_splice(cx, reader, writer, counter, moved))?;
                continue;
            }
            // tokio's `poll_read` clears the socket's readiness after a short read, so the
            // next poll waits for epoll instead of trying a read that would block.
            let mut buf = take();
            let mut read = ReadBuf::new(&mut buf[..]);
            let polled = Pin::new(&mut *reader).poll_read(cx, &mut read);
            let n = read.filled().len();
            match polled {
                Poll::Ready(Ok(())) if n > 0 => {
                    *moved = true;
                    self.streak = if n == CHUNK { self.streak + 1 } else { 0 };
                    let more = if n < CHUNK {
                        self.read_ahead(cx, reader, &mut buf[n..])
                    } else {
                        0
                    };
                    self.held = Some(buf);
                    (self.start, self.end) =
                        (0, u16::try_from(n + more).expect("at most CHUNK bytes"));
                }
                Poll::Ready(Ok(())) => {
                    give_back(buf);
                    self.flow = Flow::Closing;
                }
                Poll::Ready(Err(err)) => {
                    give_back(buf);
                    return Poll::Ready(Err(err));
                }
                Poll::Pending => {
                    give_back(buf);
                    return Poll::Pending;
                }
            }
        }
    }

    /// After a short read, takes what the reader has already received besides, above all
    /// its EOF: bytes known to be the last leave with the FIN in one packet (HAProxy does
    /// the same), so a connection that closes after its reply costs two packets fewer,
    /// the peer's acknowledgement of the bytes and the lone FIN. tokio keeps a socket's
    /// closed state when a short read clears its readiness, so an EOF that has arrived
    /// shows as readiness here; without one this makes no system call. A read that fails
    /// here fails the direction once the bytes in hand are passed on, as they would have
    /// been without this look ahead. How many bytes it added to `space`.
    fn read_ahead(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut TcpStream,
        space: &mut [u8],
    ) -> usize {
        if reader.poll_read_ready(cx).is_pending() {
            return 0;
        }
        let mut read = ReadBuf::new(space);
        match Pin::new(&mut *reader).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) if read.filled().is_empty() => self.flow = Flow::Closing,
            Poll::Ready(Ok(())) | Poll::Pending => {}
            Poll::Ready(Err(err)) => self.flow = Flow::Failed(err.kind()),
        }
        read.filled().len()
    }
}

/// Writes `data`; with `fin_follows`, with `MSG_MORE`, so the kernel holds a last small
/// piece back for the FIN that the caller sends next (the shutdown, or the close), and both
/// leave in one packet.
fn poll_write(
    cx: &mut Context<'_>,
    writer: &mut TcpStream,
    data: &[u8],
    fin_follows: bool,
) -> Poll<io::Result<usize>> {
    if !fin_follows {
        return Pin::new(writer).poll_write(cx, data);
    }
    // nix names no `MSG_MORE`.
    let flags = MsgFlags::from_bits_retain(nix::libc::MSG_MORE) | MsgFlags::MSG_NOSIGNAL;
    splice::poll_writable_io(cx, writer, || {
        send(writer.as_raw_fd(), data, flags).map_err(io::Error::from)
    })
}

/// Counts `n` bytes a writer took, in the metric and the direction's total: exact at
/// every write, and activity.
fn sent(n: usize, bytes: &mut u64, counter: &ByteCounter, moved: &mut bool) {
    counter.add(n as u64);
    *bytes += n as u64;
    *moved = true;
}

impl Direction {
    /// Moves bytes with splice(2) until the reader or the writer would block; `Ready(Ok)`
    /// once the reader is at EOF (the flow is then `Closing`), or when no pipe can be had
    /// (the direction copies again). The pipe stays only while it holds bytes.
    fn poll_splice(
        &mut self,
        cx: &mut Context<'_>,
        reader: &TcpStream,
        writer: &TcpStream,
        counter: &ByteCounter,
        moved: &mut bool,
    ) -> Poll<io::Result<()>> {
        loop {
            if let Some(pipe) = &self.pipe {
                while self.in_pipe > 0 {
                    let pending = self.in_pipe as usize;
                    let n = ready!(splice::poll_drain(cx, pipe, writer, pending))?;
                    self.in_pipe -= u32::try_from(n).expect("at most what the pipe held");
                    sent(n, &mut self.bytes, counter, moved);
                }
            }
            // Out of descriptors for a pipe: copy, which needs none.
            let Ok(pipe) = self.pipe.take().map_or_else(splice::take, Ok) else {
                self.streak = 0;
                return Poll::Ready(Ok(()));
            };
            // The pipe is empty here: it goes back to the pool unless it now holds bytes.
            match splice::poll_fill(cx, reader, &pipe) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    *moved = true;
                    self.in_pipe = u32::try_from(n).expect("at most a pipe's capacity");
                    self.pipe = Some(pipe);
                }
                Poll::Ready(Ok(_)) => {
                    splice::give_back(pipe);
                    self.flow = Flow::Closing;
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Err(err)) => {
                    splice::give_back(pipe);
                    return Poll::Ready(Err(err));
                }
                Poll::Pending => {
                    splice::give_back(pipe);
                    return Poll::Pending;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
    use tokio::net::{TcpSocket, TcpStream};

    use super::*;

    struct TestService {
        idle: Duration,
        to_backend: ByteCounter,
        to_client: ByteCounter,
    }

    impl Service for TestService {
        fn idle(&self) -> Duration {
            self.idle
        }
        fn to_backend(&self) -> &ByteCounter {
            &self.to_backend
        }
        fn to_client(&self) -> &ByteCounter {
            &self.to_client
        }
    }

    fn counter(name: &str) -> ByteCounter {
        ByteCounter::new(prometheus::IntCounter::new(name, name).expect("counter"))
    }

    /// Kernel buffers of the test sockets.
    #[derive(Clone, Copy)]
    enum Buffers {
        /// Small, so a slow reader soon leaves the transfer holding bytes its peer has not
        /// taken; reads seldom fill a copy buffer, so the transfer copies.
        Small,
        /// The system's, so a stream fills every read and the transfer splices.
        Default,
    }

    fn socket(buffers: Buffers) -> TcpSocket {
        const KERNEL_BUFFER: u32 = 4096;
        let socket = TcpSocket::new_v4().expect("socket");
        if let Buffers::Small = buffers {
            socket
                .set_recv_buffer_size(KERNEL_BUFFER)
                .expect("SO_RCVBUF");
            socket
                .set_send_buffer_size(KERNEL_BUFFER)
                .expect("SO_SNDBUF");
        }
        socket
    }

    /// A service leaked, so a transfer's task can borrow it for as long as it runs.
    fn test_service(idle: Duration) -> &'static TestService {
        Box::leak(Box::new(TestService {
            idle,
            to_backend: counter("in"),
            to_client: counter("out"),
        }))
    }

    /// Waits until the event loop has seen the reset `socket` received, so a transfer's
    /// first read finds it (an accepted socket counts as readable at first, so yield
    /// until the loop has polled it).
    async fn seen_reset(socket: &TcpStream) {
        while !socket
            .ready(Interest::READABLE)
            .await
            .expect("readiness")
            .is_read_closed()
        {
            tokio::task::yield_now().await;
        }
    }

    /// Two connected loopback sockets.
    async fn socket_pair(buffers: Buffers) -> (TcpStream, TcpStream) {
        let listening = socket(buffers);
        listening
            .bind("127.0.0.1:0".parse().expect("address"))
            .expect("bind");
        let listener = listening.listen(16).expect("listen");
        let near = socket(buffers)
            .connect(listener.local_addr().expect("address"))
            .await
            .expect("connect");
        let (far, _) = listener.accept().await.expect("accept");
        (near, far)
    }

    /// A client and a backend, with a transfer between them running in its own task.
    async fn proxied(
        idle: Duration,
    ) -> (
        TcpStream,
        TcpStream,
        &'static TestService,
        tokio::task::JoinHandle<io::Result<()>>,
    ) {
        proxied_with(idle, Buffers::Small).await
    }

    async fn proxied_with(
        idle: Duration,
        buffers: Buffers,
    ) -> (
        TcpStream,
        TcpStream,
        &'static TestService,
        tokio::task::JoinHandle<io::Result<()>>,
    ) {
        let (client, client_side) = socket_pair(buffers).await;
        let (upstream_side, backend) = socket_pair(buffers).await;
        let service = test_service(idle);
        let transfer = tokio::spawn(Transfer::new(client_side, upstream_side, service, None));
        (client, backend, service, transfer)
    }

    /// xorshift: reproducible pseudo-random numbers without a crate.
    struct Random(u64);

    impl Random {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next() as u8).collect()
        }
    }

    /// Writes `data` in random pieces, sometimes pausing (a slow writer), then half-closes.
    async fn send_slowly(mut stream: tokio::net::tcp::OwnedWriteHalf, data: Vec<u8>, seed: u64) {
        let mut random = Random(seed);
        let mut rest = &data[..];
        while !rest.is_empty() {
            let n = (1 + random.below(40_000)).min(rest.len());
            stream.write_all(&rest[..n]).await.expect("send");
            rest = &rest[n..];
            if random.below(8) == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        stream.shutdown().await.expect("half-close");
    }

    /// Reads to EOF in random small pieces, sometimes pausing (a slow reader), so the
    /// transfer finds the peer full and has to hold what it read.
    async fn receive_slowly(mut stream: tokio::net::tcp::OwnedReadHalf, seed: u64) -> Vec<u8> {
        let mut random = Random(seed);
        let mut received = Vec::new();
        let mut piece = vec![0u8; 5000];
        loop {
            let want = 1 + random.below(piece.len());
            let n = stream.read(&mut piece[..want]).await.expect("receive");
            if n == 0 {
                return received;
            }
            received.extend_from_slice(&piece[..n]);
            if random.below(16) == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }

    /// Random sizes each way, slow writers and slow readers, checked byte for byte and
    /// counted exactly.
    async fn random_transfers(seeds: std::ops::RangeInclusive<u64>, buffers: Buffers) {
        for seed in seeds {
            let (client, backend, service, transfer) =
                proxied_with(Duration::from_secs(30), buffers).await;
            let mut random = Random(seed);
            let (up_len, down_len) = (random.below(3 << 20), random.below(3 << 20));
            let up = random.bytes(up_len);
            let down = random.bytes(down_len);
            let (client_read, client_write) = client.into_split();
            let (backend_read, backend_write) = backend.into_split();
            let (got_up, got_down, (), ()) = tokio::join!(
                receive_slowly(backend_read, seed),
                receive_slowly(client_read, seed + 100),
                send_slowly(client_write, up.clone(), seed + 200),
                send_slowly(backend_write, down.clone(), seed + 300),
            );
            assert!(got_up == up, "seed {seed}: client to backend differs");
            assert!(got_down == down, "seed {seed}: backend to client differs");
            transfer.await.expect("task").expect("clean end");
            assert_eq!(service.to_backend.get(), up.len() as u64, "seed {seed}");
            assert_eq!(service.to_client.get(), down.len() as u64, "seed {seed}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn random_sizes_arrive_byte_exact_both_ways_with_slow_readers_and_writers() {
        random_transfers(1..=4, Buffers::Small).await;
    }

    /// One thread, so the pipes the transfer used come back to the pool the test reads.
    #[tokio::test(flavor = "current_thread")]
    async fn streaming_directions_splice_byte_exact_with_slow_readers_and_writers() {
        random_transfers(5..=8, Buffers::Default).await;
        assert!(splice::pooled() > 0, "no direction spliced");
    }

    /// Streams until the transfer surely splices (the system's buffers fill every read).
    async fn stream_a_while(client: &mut TcpStream, backend: &mut TcpStream) {
        let chunk = vec![7u8; 256 * 1024];
        for _ in 0..8 {
            let mut back = vec![0u8; chunk.len()];
            let (sent, received) =
                tokio::join!(client.write_all(&chunk), backend.read_exact(&mut back));
            sent.expect("send");
            received.expect("passed on");
            assert!(back == chunk);
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_client_reset_while_splicing_reaches_the_backend_as_a_reset() {
        let (mut client, mut backend, service, transfer) =
            proxied_with(Duration::from_secs(30), Buffers::Default).await;
        stream_a_while(&mut client, &mut backend).await;
        assert_eq!(service.to_backend.get(), 8 * 256 * 1024);
        reset(client);
        a_reset_reaches(backend, transfer).await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_splicing_connection_still_ends_after_the_idle_timeout() {
        let idle = Duration::from_millis(300);
        let (mut client, mut backend, _, transfer) = proxied_with(idle, Buffers::Default).await;
        stream_a_while(&mut client, &mut backend).await;
        let quiet = Instant::now();
        let err = transfer.await.expect("task").expect_err("idle timeout");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(quiet.elapsed() >= idle - Duration::from_millis(50));
    }

    #[tokio::test]
    async fn a_half_closed_client_still_receives_the_backend_reply() {
        let (mut client, mut backend, service, transfer) = proxied(Duration::from_secs(30)).await;
        client.write_all(b"request").await.expect("send");
        client.shutdown().await.expect("half-close");
        let mut request = Vec::new();
        backend
            .read_to_end(&mut request)
            .await
            .expect("EOF passed on");
        assert_eq!(request, b"request");
        backend.write_all(b"reply").await.expect("reply");
        backend.shutdown().await.expect("close");
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).await.expect("reply");
        assert_eq!(reply, b"reply");
        transfer.await.expect("task").expect("clean end");
        assert_eq!((service.to_backend.get(), service.to_client.get()), (7, 5));
    }

    #[tokio::test]
    async fn a_half_closed_backend_still_receives_the_client_data() {
        let (mut client, mut backend, _, transfer) = proxied(Duration::from_secs(30)).await;
        backend.write_all(b"greeting").await.expect("send");
        backend.shutdown().await.expect("half-close");
        let mut greeting = Vec::new();
        client
            .read_to_end(&mut greeting)
            .await
            .expect("EOF passed on");
        assert_eq!(greeting, b"greeting");
        client.write_all(b"late data").await.expect("send");
        client.shutdown().await.expect("close");
        let mut data = Vec::new();
        backend.read_to_end(&mut data).await.expect("data");
        assert_eq!(data, b"late data");
        transfer.await.expect("task").expect("clean end");
    }

    /// Closes with a reset (RST) instead of a FIN.
    fn reset(stream: TcpStream) {
        stream.set_zero_linger().expect("SO_LINGER 0");
    }

    /// After a reset on one side: `peer` reads a reset, not an EOF, and the transfer
    /// ends with an error.
    async fn a_reset_reaches(
        mut peer: TcpStream,
        transfer: tokio::task::JoinHandle<io::Result<()>>,
    ) {
        let err = peer
            .read(&mut [0u8; 16])
            .await
            .expect_err("a reset, not EOF");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        assert!(transfer.await.expect("task").is_err());
    }

    #[tokio::test]
    async fn a_client_reset_reaches_the_backend_as_a_reset() {
        let (mut client, mut backend, _, transfer) = proxied(Duration::from_secs(30)).await;
        client.write_all(b"hello").await.expect("send");
        let mut hello = [0u8; 5];
        backend.read_exact(&mut hello).await.expect("hello");
        reset(client);
        a_reset_reaches(backend, transfer).await;
    }

    /// A client's last bytes and its reset arrive together, before the transfer first
    /// reads: the bytes reach the backend, then the reset does.
    #[tokio::test]
    async fn bytes_that_arrived_with_a_reset_are_passed_on_before_it() {
        let (mut client, client_side) = socket_pair(Buffers::Small).await;
        let (upstream_side, mut backend) = socket_pair(Buffers::Small).await;
        client.write_all(b"last words").await.expect("send");
        reset(client);
        seen_reset(&client_side).await;
        let service = test_service(Duration::from_secs(30));
        let transfer = tokio::spawn(Transfer::new(client_side, upstream_side, service, None));
        let mut words = [0u8; 10];
        backend
            .read_exact(&mut words)
            .await
            .expect("the bytes before the reset");
        assert_eq!(&words, b"last words");
        assert_eq!(service.to_backend.get(), 10);
        a_reset_reaches(backend, transfer).await;
    }

    #[tokio::test]
    async fn a_backend_reset_reaches_the_client_as_a_reset() {
        let (mut client, mut backend, _, transfer) = proxied(Duration::from_secs(30)).await;
        backend.write_all(b"partial").await.expect("send");
        let mut partial = [0u8; 7];
        client.read_exact(&mut partial).await.expect("partial");
        reset(backend);
        a_reset_reaches(client, transfer).await;
    }

    /// The backend's last bytes and its reset have arrived while the client has taken
    /// nothing for a while (the path to it is full): the transfer's first poll reads the
    /// bytes, finds the reset behind them, and holds the bytes for the client. The client
    /// and the transfer, not yet polled.
    async fn failed_behind_a_full_client(
        idle: Duration,
    ) -> (TcpStream, Transfer<'static, TestService>) {
        let (client, client_side) = socket_pair(Buffers::Small).await;
        let (upstream_side, mut backend) = socket_pair(Buffers::Default).await;
        // Past tokio's readiness, straight to the kernel, until it takes no more.
        let filler = [0u8; 4096];
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        while send(client_side.as_raw_fd(), &filler, flags).is_ok() {}
        // Less than one read's buffer, so the read is short and looks ahead (finding the
        // reset); more than the client side can free once its peer acknowledges what it
        // holds (4 KiB buffers, which the kernel doubles and then keeps).
        backend.write_all(&[1u8; 15 * 1024]).await.expect("send");
        reset(backend);
        seen_reset(&upstream_side).await;
        let service = test_service(idle);
        (
            client,
            Transfer::new(client_side, upstream_side, service, None),
        )
    }

    /// Reads to the end, which must be a reset, not an EOF.
    async fn read_until_a_reset(mut client: TcpStream) {
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0;
        loop {
            match client.read(&mut buf).await {
                Ok(0) => panic!("a clean EOF after {total} bytes, not a reset"),
                Ok(n) => total += n,
                Err(err) => {
                    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
                    return;
                }
            }
        }
    }

    #[tokio::test]
    async fn a_failure_still_waiting_for_a_full_client_is_a_reset_at_the_idle_timeout() {
        let idle = Duration::from_millis(300);
        let (client, transfer) = failed_behind_a_full_client(idle).await;
        let started = Instant::now();
        let err = tokio::spawn(transfer)
            .await
            .expect("task")
            .expect_err("the backend's reset");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        assert!(started.elapsed() >= idle - Duration::from_millis(50));
        read_until_a_reset(client).await;
    }

    /// lb closes a connection (its drain deadline) by dropping its transfer.
    #[tokio::test]
    async fn a_failure_still_waiting_for_a_full_client_is_a_reset_when_lb_closes_it() {
        let (client, transfer) = failed_behind_a_full_client(Duration::from_secs(30)).await;
        let mut transfer = Box::pin(transfer);
        let polled = std::future::poll_fn(|cx| Poll::Ready(transfer.as_mut().poll(cx))).await;
        assert!(polled.is_pending(), "the client took the bytes");
        assert_eq!(
            transfer.to_client.failed(),
            Some(io::ErrorKind::ConnectionReset)
        );
        assert!(
            transfer.to_client.held.is_some(),
            "no bytes wait for the client"
        );
        drop(transfer);
        read_until_a_reset(client).await;
    }

    #[tokio::test]
    async fn traffic_keeps_a_connection_open_and_silence_ends_it_after_the_idle_timeout() {
        let idle = Duration::from_millis(300);
        let (mut client, mut backend, _, transfer) = proxied(idle).await;
        // Bytes every 100 ms for 900 ms: three idle periods, none of them silent.
        for _ in 0..9 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            client.write_all(b".").await.expect("send");
            backend.read_exact(&mut [0u8; 1]).await.expect("passed on");
        }
        assert!(!transfer.is_finished(), "closed while bytes were moving");
        let quiet = Instant::now();
        let err = transfer.await.expect("task").expect_err("idle timeout");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(quiet.elapsed() >= idle - Duration::from_millis(50));
        // A timeout ends both sides with a FIN, not a reset.
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.expect("a clean end");
        backend.read_to_end(&mut rest).await.expect("a clean end");
    }
}
