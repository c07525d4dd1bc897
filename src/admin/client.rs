//! The client half of `lb status`, `lb reload`, `lb restart` and `lb broadcast`: one HTTP request to a
//! running lb's admin API, with the admin token when there is one.

use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::header::{AUTHORIZATION, HOST, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::auth::Secret;

/// A running lb accepts at once; anything slower is not an lb that works.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a client command's admin token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// The `LB_ADMIN_TOKEN` variable.
    Env,
    /// The config file's `admin.token_file`.
    File(PathBuf),
}

impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Env => f.write_str("LB_ADMIN_TOKEN"),
            TokenSource::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// The admin token a client command sends (contract §1): `LB_ADMIN_TOKEN` (`env`) if
/// set and not blank, else the secret in the config's `admin.token_file`; None when
/// neither is given. The error, when the token is unusable, follows the source's name.
pub fn token(
    env: Option<OsString>,
    token_file: Option<PathBuf>,
) -> Option<(TokenSource, Result<Secret, String>)> {
    if let Some(value) = env.filter(|v| !v.as_encoded_bytes().trim_ascii().is_empty()) {
        return Some((TokenSource::Env, Secret::new(value.as_encoded_bytes())));
    }
    let file = token_file?;
    let secret = Secret::read(&file);
    Some((TokenSource::File(file), secret))
}

/// Sends one request, with `token` as a bearer token if given, and returns the status
/// and body, waiting up to `limit` for the answer (`None` for a rollout, which takes as
/// long as it takes). A refused connection becomes an error that says no lb answers
/// there.
pub async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    body: String,
    token: Option<&Secret>,
    limit: Option<Duration>,
) -> anyhow::Result<(StatusCode, String)> {
    let exchange = exchange(addr, method, path, body, token);
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
    token: Option<&Secret>,
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
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, addr.to_string())
        .body(Full::new(Bytes::from(body)))
        .context("building the request")?;
    if let Some(token) = token {
        // A secret holds only printable ASCII, which a header value always accepts.
        let mut value =
            HeaderValue::from_str(&token.bearer()).context("putting the token in a header")?;
        value.set_sensitive(true);
        request.headers_mut().insert(AUTHORIZATION, value);
    }
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
