//! The admin HTTP API (contract §5) on `admin.listen`: metrics, health, status, and the
//! reload / restart / broadcast commands, answered by the supervisor. It runs beside the proxy on
//! the same runtime, and only ever reads the snapshot or asks the supervisor: it never
//! takes a lock on the connection path.

pub mod auth;
pub mod client;
mod pool;
pub mod status;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use crate::channel::Message;
use crate::metrics::Metrics;
use crate::snapshot::Snapshots;
use crate::supervisor::{Command, CommandError, Inbox, Loaded, Scope};
use auth::{Guard, Refusal};
use pool::{Lane, Pool, Ticket};

/// Request bodies larger than this are refused with 413.
pub const MAX_BODY: usize = 1024 * 1024;
/// A client must send its request line and headers within this time, counted from the
/// connection's start or the end of its previous answer (so it is also how long an idle
/// keep-alive connection stays): one round trip takes far less, and a client that
/// trickles its headers (slowloris) is closed.
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// The same for a connection in the probe lane, which only ever answers a cheap GET.
const PROBE_HEADER_TIMEOUT: Duration = Duration::from_secs(1);
/// A client must send its request body within this time (up to [`MAX_BODY`]).
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// What the handlers need.
#[derive(Debug, Clone)]
pub struct Admin {
    pub inbox: Inbox,
    pub snapshots: Arc<Snapshots>,
    pub metrics: Metrics,
    /// Who may POST (`admin.token_file`).
    pub guard: Guard,
}

type Reply = Response<Full<Bytes>>;

/// Binds the admin address (or takes the socket systemd passed for it); like a listen
/// address, failing to is a startup error.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let listener = match crate::systemd::activation::take(addr) {
        Some(passed) => passed,
        None => TcpListener::bind(addr).await,
    };
    listener.with_context(|| format!("admin API: could not listen on {addr}"))
}

/// Serves the admin API until lb exits. Every connection is accepted at once, so a
/// probe never waits behind other clients in the accept queue; [`pool`] decides which
/// connections stay open.
pub fn serve(listener: TcpListener, admin: Admin) {
    let pool = Arc::new(Pool::default());
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                // Out of file descriptors: the proxy has priority; try again shortly.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Some(ticket) = pool.admit(request_arriving(&stream)) else {
                debug!(%peer, "admin connection closed: every connection is busy answering");
                continue;
            };
            tokio::spawn(connection(stream, peer, Arc::new(ticket), admin.clone()));
        }
    });
}

/// Whether the client has already sent the start of a request: a probe sends it with
/// its connect, an idle client sends nothing.
fn request_arriving(stream: &TcpStream) -> bool {
    use nix::sys::socket::{MsgFlags, recv};
    use std::os::fd::AsRawFd as _;
    let mut byte = [0u8; 1];
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
    recv(stream.as_raw_fd(), &mut byte, flags).is_ok_and(|n| n > 0)
}

/// Serves one connection until it ends or the pool closes it to make room.
async fn connection(stream: TcpStream, peer: SocketAddr, ticket: Arc<Ticket>, admin: Admin) {
    let lane = ticket.lane();
    let busy_ticket = Arc::clone(&ticket);
    let service = hyper::service::service_fn(move |req| {
        let busy = busy_ticket.busy();
        let admin = admin.clone();
        async move {
            let reply = handle(admin, lane, req).await;
            drop(busy);
            reply
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new());
    match lane {
        Lane::General => builder.header_read_timeout(HEADER_TIMEOUT),
        Lane::Probe => builder
            .header_read_timeout(PROBE_HEADER_TIMEOUT)
            .keep_alive(false),
    };
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        result = conn => if let Err(err) = result {
            debug!(%peer, %err, "admin connection ended");
        },
        () = ticket.closed() => debug!(%peer, "admin connection closed to make room for a newer one"),
    }
}

async fn handle(admin: Admin, lane: Lane, req: Request<Incoming>) -> Result<Reply, Infallible> {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let query = req.uri().query().unwrap_or_default().to_owned();
    let allowed = match path.as_str() {
        "/metrics" | "/healthz" => Method::GET,
        _ if lane == Lane::Probe => return Ok(busy()),
        "/status" => Method::GET,
        "/reload" | "/restart" | "/broadcast" => Method::POST,
        _ => {
            return Ok(text(
                StatusCode::NOT_FOUND,
                "not found: see GET /status, /metrics, /healthz\n",
            ));
        }
    };
    // HEAD is GET without the body (hyper drops it), as health checkers expect.
    let head_of_get = method == Method::HEAD && allowed == Method::GET;
    if method != allowed && !head_of_get {
        let mut reply = text(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("use {allowed} {path}\n"),
        );
        reply.headers_mut().insert(
            ALLOW,
            allowed
                .as_str()
                .parse()
                .expect("a method is a valid header value"),
        );
        return Ok(reply);
    }
    if allowed == Method::POST
        && let Err(refusal) = admin.guard.check(req.headers()).await
    {
        return Ok(refused(&refusal));
    }
    let body = match tokio::time::timeout(BODY_TIMEOUT, read_body(req)).await {
        Ok(Ok(body)) => body,
        Ok(Err(reply)) => return Ok(reply),
        Err(_) => {
            return Ok(text(
                StatusCode::REQUEST_TIMEOUT,
                "the request body did not arrive in time\n",
            ));
        }
    };
    Ok(match path.as_str() {
        "/metrics" => {
            let mut reply = text(StatusCode::OK, &admin.metrics.render());
            reply.headers_mut().insert(
                CONTENT_TYPE,
                "text/plain; version=0.0.4".parse().expect("valid header"),
            );
            reply
        }
        "/healthz" => healthz(&admin),
        "/status" => status(&admin).await,
        "/reload" => {
            loaded_command(&admin, |config, reply| Command::Reload {
                config,
                reply: Some(reply),
            })
            .await
        }
        "/restart" => match restart_scope(&query) {
            Ok(scope) => {
                loaded_command(&admin, move |config, reply| Command::Restart {
                    scope,
                    config,
                    replies: vec![reply],
                })
                .await
            }
            Err(msg) => text(StatusCode::BAD_REQUEST, &msg),
        },
        _ => match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(value) => {
                let (service, message) = (param(&query, "service"), Message::new(&value));
                let mut reply = command(&admin, |reply| Command::Broadcast {
                    service,
                    message,
                    reply: Some(reply),
                })
                .await;
                if reply.status() == StatusCode::OK {
                    reply.headers_mut().insert(
                        CONTENT_TYPE,
                        "application/json".parse().expect("valid header"),
                    );
                }
                reply
            }
            Err(err) => text(
                StatusCode::BAD_REQUEST,
                &format!("the body must be one JSON value: {err}\n"),
            ),
        },
    })
}

/// Reads the whole body, refusing more than [`MAX_BODY`] with 413.
async fn read_body(req: Request<Incoming>) -> Result<Bytes, Reply> {
    let too_large = || {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("request bodies are limited to {MAX_BODY} bytes\n"),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY) {
        return Err(too_large());
    }
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(err) => Err(text(
            StatusCode::BAD_REQUEST,
            &format!("could not read the request body: {err}\n"),
        )),
    }
}

/// 200 when every service has a ready backend: what a container orchestrator should gate on.
fn healthz(admin: &Admin) -> Reply {
    let snapshot = admin.snapshots.load();
    if snapshot.stopping {
        return stopping();
    }
    let mut unready: Vec<&str> = snapshot
        .pools
        .iter()
        .filter(|(_, p)| p.is_empty())
        .map(|(n, _)| n.as_str())
        .collect();
    if unready.is_empty() {
        return text(StatusCode::OK, "ok\n");
    }
    unready.sort_unstable();
    text(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("no ready backend: {}\n", unready.join(", ")),
    )
}

async fn status(admin: &Admin) -> Reply {
    let (tx, rx) = oneshot::channel();
    if !admin.inbox.send(Command::Status { reply: tx }) {
        return stopping();
    }
    match rx.await {
        Ok(status) => {
            let json = serde_json::to_string_pretty(&status).unwrap_or_default() + "\n";
            let mut reply = text(StatusCode::OK, &json);
            reply.headers_mut().insert(
                CONTENT_TYPE,
                "application/json".parse().expect("valid header"),
            );
            reply
        }
        Err(_) => stopping(),
    }
}

/// `?service=NAME[&worker=ID]` as the workers a restart replaces.
fn restart_scope(query: &str) -> Result<Scope, String> {
    match (param(query, "service"), param(query, "worker")) {
        (None, None) => Ok(Scope::All),
        (Some(service), None) => Ok(Scope::Service(service)),
        (Some(service), Some(id)) => match id.parse() {
            Ok(slot) => Ok(Scope::Worker { service, slot }),
            Err(_) => Err(format!(
                "worker must be a worker id (0, 1, ...), found {id:?}\n"
            )),
        },
        (None, Some(_)) => {
            Err("worker needs service: POST /restart?service=NAME&worker=ID\n".to_owned())
        }
    }
}

/// Sends a command that needs the config file: the file is read off the supervisor's
/// task first.
async fn loaded_command(
    admin: &Admin,
    make: impl FnOnce(Loaded, crate::supervisor::Reply) -> Command + Send + 'static,
) -> Reply {
    let (tx, rx) = oneshot::channel();
    admin.inbox.with_config(move |config| make(config, tx));
    answer(rx).await
}

/// Sends a command to the supervisor and turns its answer into a response.
async fn command(admin: &Admin, make: impl FnOnce(crate::supervisor::Reply) -> Command) -> Reply {
    let (tx, rx) = oneshot::channel();
    if !admin.inbox.send(make(tx)) {
        return stopping();
    }
    answer(rx).await
}

async fn answer(rx: oneshot::Receiver<Result<String, CommandError>>) -> Reply {
    match rx.await {
        Ok(Ok(message)) => text(StatusCode::OK, &format!("{message}\n")),
        Ok(Err(err)) => {
            let code = match err {
                CommandError::Invalid(_) => StatusCode::BAD_REQUEST,
                CommandError::NotFound(_) => StatusCode::NOT_FOUND,
                CommandError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
                CommandError::Stopping => StatusCode::SERVICE_UNAVAILABLE,
            };
            text(code, &format!("{err}\n"))
        }
        Err(_) => stopping(),
    }
}

/// 401 (or 503 when the token file cannot be read), never saying what the token is.
fn refused(refusal: &Refusal) -> Reply {
    let message = match refusal {
        Refusal::Missing => "POST requests need the admin token: Authorization: Bearer TOKEN\n",
        Refusal::Wrong => "the admin token is wrong\n",
        Refusal::Unreadable(err) => {
            warn!("admin.token_file: {err}; POST requests are refused until it can be read");
            return text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the admin token file cannot be read; see lb's log\n",
            );
        }
    };
    let mut reply = text(StatusCode::UNAUTHORIZED, message);
    reply.headers_mut().insert(
        WWW_AUTHENTICATE,
        "Bearer realm=\"lb admin\"".parse().expect("valid header"),
    );
    reply
}

/// What the probe lane answers to anything but its cheap GETs (and then closes).
fn busy() -> Reply {
    let mut reply = text(
        StatusCode::SERVICE_UNAVAILABLE,
        "the admin API is busy answering other requests; GET /healthz and /metrics still answer\n",
    );
    reply
        .headers_mut()
        .insert(RETRY_AFTER, "1".parse().expect("valid header"));
    reply
}

fn stopping() -> Reply {
    text(StatusCode::SERVICE_UNAVAILABLE, "lb is stopping\n")
}

fn text(code: StatusCode, body: &str) -> Reply {
    let mut reply = Response::new(Full::new(Bytes::from(body.to_owned())));
    *reply.status_mut() = code;
    reply
}

/// The value of `key` in a query string such as `service=web`.
fn param(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_owned())
}
