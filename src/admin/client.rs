//! The client half of `lb status`, `lb reload`, `lb restart` and `lb broadcast`: one HTTP request to a
//! running lb's admin API.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::header::HOST;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A running lb accepts at once; anything slower is not an lb that works.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends one request and returns the status and body, waiting up to `limit` for the
/// answer (`None` for a rollout, which takes as long as it takes). A refused
/// connection becomes an error that says no lb answers there.
pub async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: String,
    limit: Option<Duration>,
) -> anyhow::Result<(StatusCode, String)> {
    let exchange = exchange(addr, method, path, body);
    match limit {
        Some(limit) => tokio::time::timeout(limit, exchange)
            .await
            .map_err(|_| anyhow::anyhow!("{addr} did not answer within {limit:?}"))?,
        None => exchange.await,
    }
}

async fn exchange(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: String,
) -> anyhow::Result<(StatusCode, String)> {
    let no_lb = || {
        format!(
            "no lb answers at {addr} (is it running, with admin.listen there? pass --admin ADDR otherwise)"
        )
    };
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .with_context(no_lb)?
        .with_context(no_lb)?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .with_context(|| format!("could not talk HTTP to {addr}"))?;
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, addr.to_string())
        .body(Full::new(Bytes::from(body)))
        .context("building the request")?;
    let response = sender
        .send_request(request)
        .await
        .with_context(|| format!("{addr} closed the connection"))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .with_context(|| format!("reading the answer from {addr}"))?;
    Ok((
        status,
        String::from_utf8_lossy(&body.to_bytes()).into_owned(),
    ))
}
