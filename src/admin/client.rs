//! The client half of `lb status`, `lb reload`, `lb restart` and `lb broadcast`: one HTTP request to a
//! running lb's admin API.

use std::net::SocketAddr;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::header::HOST;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Sends one request and returns the status and body. A refused connection becomes an
/// error that says no lb answers there.
pub async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: String,
) -> anyhow::Result<(StatusCode, String)> {
    let stream = TcpStream::connect(addr).await.with_context(|| {
        format!("no lb answers at {addr} (is it running, with admin.listen there? pass --admin ADDR otherwise)")
    })?;
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
