//! One client connection: pick a backend, connect (retrying others) and send it who the
//! client is (PROXY protocol, when on) with what the client has sent so far (see
//! [`super::upstream`]), then copy; with `log_connections`, one line when it ends, as
//! HAProxy's `tcplog`.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use prometheus::IntCounter;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::{debug, info};

use super::{Shared, copy, exhaustion, is_resource_exhaustion, upstream};
use crate::metrics::{ByteCounter, DroppedMetrics};
use crate::snapshot::{ActiveGuard, Backend, BackendId, ConnectFailure, Pool};

/// Backends tried per connection: the first pick and up to two more.
const CONNECT_ATTEMPTS: usize = 3;

/// The connection's task. Everything this future holds stays allocated for as long as the
/// connection lives, idle or not, so it keeps little: the connect phase (snapshot wait,
/// pick, connect timeout, retries) is its own allocation, made here and freed once it
/// ends, holding the client, its address and `connecting` meanwhile; the copy phase is
/// one [`copy::Transfer`]. `connecting` is held until the connection has its backend (or
/// has given up), so a stop takes workers out of rotation only after every accepted
/// client reached one.
pub(super) fn handle<'a>(
    proxy: &'a Shared,
    service: &'a str,
    listen: SocketAddr,
    client: (TcpStream, SocketAddr),
    connecting: TaskTrackerToken,
) -> impl Future<Output = ()> + 'a {
    let connected = Box::pin(connect(proxy, service, listen, client, connecting));
    async move {
        let started = Instant::now();
        let Some(Connected {
            pool,
            backend,
            active,
            client,
            upstream,
            early,
            logged,
        }) = connected.await
        else {
            return;
        };
        backend.metrics.connections_total.inc();
        let transfer = copy::Transfer::new(client, upstream, &*pool, early);
        tokio::pin!(transfer);
        let ended = tokio::select! {
            result = &mut transfer => match result {
                Ok(()) => Ended::Closed,
                Err(err) if err.kind() == io::ErrorKind::TimedOut => Ended::IdleTimeout,
                Err(err) => {
                    debug!(service, backend = %backend.label, %err, "connection ended");
                    Ended::Reset
                }
            },
            () = backend.close.cancelled() => Ended::ClosedByLb,
        };
        let took = started.elapsed();
        pool.metrics.connection_duration.observe(took.as_secs_f64());
        if let Some(peer) = logged {
            log_closed(
                service,
                Some(*peer),
                &backend.label,
                transfer.bytes(),
                took,
                ended,
            );
        }
        drop(active);
    }
}

/// How a connection ended, as its log line says.
#[derive(Debug, Clone, Copy)]
enum Ended {
    /// Both sides finished.
    Closed,
    IdleTimeout,
    /// A side reset the connection (or failed), and lb passed the reset on.
    Reset,
    /// lb closed it: its backend's drain time ran out, or lb stopped.
    ClosedByLb,
    /// lb closed the client unserved.
    Dropped(Dropped),
}

/// Why lb closed a client unserved: the `reason` of `lb_connections_dropped_total`.
#[derive(Debug, Clone, Copy)]
enum Dropped {
    NoBackend,
    ConnectFailed,
    Resources,
}

impl Dropped {
    fn as_str(self) -> &'static str {
        match self {
            Dropped::NoBackend => "no_backend",
            Dropped::ConnectFailed => "connect_failed",
            Dropped::Resources => "resources",
        }
    }

    fn counter(self, metrics: &DroppedMetrics) -> &IntCounter {
        match self {
            Dropped::NoBackend => &metrics.no_backend,
            Dropped::ConnectFailed => &metrics.connect_failed,
            Dropped::Resources => &metrics.resources,
        }
    }
}

impl Ended {
    fn as_str(self) -> &'static str {
        match self {
            Ended::Closed => "closed",
            Ended::IdleTimeout => "idle_timeout",
            Ended::Reset => "reset",
            Ended::ClosedByLb => "closed_by_lb",
            Ended::Dropped(why) => why.as_str(),
        }
    }
}

/// The `log_connections` line: client, backend, bytes each way, duration, the end.
fn log_closed(
    service: &str,
    client: Option<SocketAddr>,
    backend: &str,
    (bytes_in, bytes_out): (u64, u64),
    took: Duration,
    ended: Ended,
) {
    let client = client.map_or_else(|| "-".to_owned(), |c| c.to_string());
    let duration_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
    let ended = ended.as_str();
    info!(service, %client, backend, bytes_in, bytes_out, duration_ms, ended, "connection");
}

/// A client connected to its backend, and what the copy phase needs of the pick.
struct Connected {
    pool: Arc<Pool>,
    backend: Arc<Backend>,
    active: ActiveGuard,
    client: TcpStream,
    upstream: TcpStream,
    /// What the client sent while lb connected, for the copy to pass on.
    early: Option<copy::Early>,
    /// The client's address, kept for the log line only with `log_connections` (the
    /// socket no longer tells it once closed); boxed, so a connection without it keeps
    /// a pointer, not the address.
    logged: Option<Box<SocketAddr>>,
}

/// Picks a backend and connects, trying up to [`CONNECT_ATTEMPTS`] of them, and sends
/// the PROXY header and what the client has sent; `None` if none could be reached
/// (counted, and logged) or if the client reset first (logged). `connecting` goes when
/// this ends.
async fn connect(
    proxy: &Shared,
    service: &str,
    listen: SocketAddr,
    (mut client, peer): (TcpStream, SocketAddr),
    connecting: TaskTrackerToken,
) -> Option<Connected> {
    let _connecting = connecting;
    let started = Instant::now();
    let mut tried: [BackendId; CONNECT_ATTEMPTS] = [BackendId::MAX; CONNECT_ATTEMPTS];
    // Read once a backend is picked, not before: a client waiting for one to be ready
    // holds no buffer. Every try sends the same client bytes, after the header its pool
    // asks for.
    let mut opening: Option<upstream::Opening> = None;
    for attempt in 0..CONNECT_ATTEMPTS {
        // Each try reads the newest snapshot, so a retry right after a rollout's swap
        // finds the new worker rather than only the old one.
        let Some(pool) = proxy.snapshots.ready_pool(service, listen).await else {
            break;
        };
        let Some(backend) = pool.pick(peer.ip(), &tried[..attempt]).cloned() else {
            break;
        };
        tried[attempt] = backend.id;
        // Counted from the pick, not from the connect, so a draining worker is not
        // stopped while a connection that picked it is still connecting.
        let active = backend.track();
        let version = pool.relay.proxy_protocol;
        let first = match opening.take() {
            Some(mut first) => {
                first.set_version(version, &client, peer, listen);
                first
            }
            None => {
                let read = poll_fn(|cx| {
                    let read = upstream::Opening::read(cx, &mut client, version, peer, listen);
                    Poll::Ready(read)
                });
                match read.await {
                    Ok(first) => first,
                    Err(err) => {
                        client_gone(&pool, service, peer, started, &err);
                        return None;
                    }
                }
            }
        };
        let connect = tokio::time::timeout(
            pool.relay.timeouts.connect,
            upstream::connect(backend.addr, &first),
        )
        .await;
        match connect.unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into())) {
            Ok((upstream, sent)) => {
                exhaustion::connected();
                let logged = pool.relay.log_connections.then(|| Box::new(peer));
                return Some(Connected {
                    pool,
                    backend,
                    active,
                    client,
                    upstream,
                    early: first.rest(sent),
                    logged,
                });
            }
            // lb itself is out of descriptors or memory: every backend would fail the
            // same way, and none of them is at fault.
            Err(err) if is_resource_exhaustion(&err) => {
                exhaustion::closed_a_client(service, &err);
                dropped(&pool, service, peer, started, Dropped::Resources);
                return None;
            }
            Err(err) => {
                debug!(service, backend = %backend.label, %err, "connect failed");
                backend.metrics.connect_errors_total.inc();
                report_down(proxy, &backend, ConnectFailure::of(&err));
                drop(active);
                opening = Some(first);
            }
        }
    }
    debug!(service, %peer, "no backend could be reached; closing client");
    // With no pool at all the service is gone (a reload removed it): nothing to count.
    if let Some(pool) = proxy.snapshots.pool(service, listen) {
        let why = if tried[0] == BackendId::MAX {
            Dropped::NoBackend
        } else {
            Dropped::ConnectFailed
        };
        dropped(&pool, service, peer, started, why);
    }
    None
}

/// A client that reset before lb reached a backend for it: no backend is at fault and lb
/// dropped no one, so nothing is counted; with `log_connections`, its line says `reset`.
fn client_gone(pool: &Pool, service: &str, peer: SocketAddr, started: Instant, err: &io::Error) {
    debug!(service, %peer, %err, "client gone before it reached a backend");
    if pool.relay.log_connections {
        let took = started.elapsed();
        log_closed(service, Some(peer), "-", (0, 0), took, Ended::Reset);
    }
}

/// Counts (and with `log_connections` logs) a client lb closed unserved.
fn dropped(pool: &Pool, service: &str, peer: SocketAddr, started: Instant, why: Dropped) {
    why.counter(&pool.metrics.dropped).inc();
    if pool.relay.log_connections {
        let ended = Ended::Dropped(why);
        log_closed(service, Some(peer), "-", (0, 0), started.elapsed(), ended);
    }
}

impl copy::Service for Pool {
    fn idle(&self) -> Duration {
        self.relay.timeouts.idle
    }

    fn to_backend(&self) -> &ByteCounter {
        &self.metrics.bytes_in
    }

    fn to_client(&self) -> &ByteCounter {
        &self.metrics.bytes_out
    }
}

fn report_down(proxy: &Shared, backend: &Backend, why: ConnectFailure) {
    if backend.stats.mark_down() {
        let _ = proxy.down.send((backend.id, why));
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::*;

    /// Guards what an idle connection costs: this future is most of its task's allocation
    /// (the rest: tokio's task header, the accept loop's captures, two registrations).
    /// Measured in a debug build, which lays futures out more loosely than a release build.
    #[tokio::test]
    async fn a_connection_task_stays_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, peer) = listener.accept().await.expect("accept");
        let (down, _) = mpsc::unbounded_channel();
        let shared = Shared {
            snapshots: Arc::default(),
            down,
        };
        let connecting = tokio_util::task::TaskTracker::new();
        let connection = handle(&shared, "web", addr, (accepted, peer), connecting.token());
        let size = std::mem::size_of_val(&connection);
        eprintln!("connection future: {size} bytes");
        assert!(size <= 560, "the connection future grew to {size} bytes");
    }
}
