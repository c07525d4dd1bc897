//! Health checks (`health_check`, contract §2): every `interval`, a TCP connect or an
//! HTTP/1.1 GET of `path` that must answer 2xx or 3xx within `timeout`. `fall` failures
//! in a row take a backend out of rotation, `rise` passes in a row bring it back. The
//! counting is [`Health`], a plain value; the checking is a task per backend that reports
//! each result to the supervisor.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Event;
use crate::config::{HealthCheck, ProxyProtocol};
use crate::proxy::proxy_protocol;
use crate::snapshot::BackendId;

/// What a backend's checks say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Health {
    pub up: bool,
    /// Results in a row that disagree with `up`.
    streak: u32,
}

impl Default for Health {
    /// A backend starts up, as HAProxy's servers do: a worker has just passed its
    /// readiness probe, and a static backend is taken out by its first failures.
    fn default() -> Self {
        Health {
            up: true,
            streak: 0,
        }
    }
}

impl Health {
    /// Counts one result; returns the new state when it changes.
    pub(super) fn record(&mut self, passed: bool, check: &HealthCheck) -> Option<bool> {
        if passed == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { check.fall } else { check.rise };
        if self.streak < needed {
            return None;
        }
        self.up = passed;
        self.streak = 0;
        Some(passed)
    }

    /// Out at once (a connect from the proxy failed); `rise` passes bring it back.
    pub(super) fn down(&mut self) {
        self.up = false;
        self.streak = 0;
    }
}

/// Checks `addr` every `interval` until `cancel` fires, reporting each result.
pub(super) fn start(
    id: BackendId,
    addr: SocketAddr,
    check: HealthCheck,
    proxy: ProxyProtocol,
    cancel: CancellationToken,
    events: mpsc::UnboundedSender<Event>,
) {
    tokio::spawn(async move {
        let checks = async {
            loop {
                tokio::time::sleep(check.interval).await;
                let ok = tokio::time::timeout(check.timeout, check_once(addr, &check, proxy))
                    .await
                    .unwrap_or(false);
                if events.send(Event::Health { id, ok }).is_err() {
                    return;
                }
            }
        };
        tokio::select! {
            () = checks => {}
            () = cancel.cancelled() => {}
        }
    });
}

/// Connects to `addr` and, with the PROXY protocol on, says the connection is lb's own.
pub(super) async fn connect(addr: SocketAddr, proxy: ProxyProtocol) -> std::io::Result<TcpStream> {
    let mut stream = TcpStream::connect(addr).await?;
    let header = proxy_protocol::local(proxy);
    if !header.is_empty() {
        stream.write_all(header).await?;
    }
    Ok(stream)
}

async fn check_once(addr: SocketAddr, check: &HealthCheck, proxy: ProxyProtocol) -> bool {
    let Some(path) = &check.path else {
        return connect(addr, proxy).await.is_ok();
    };
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return false;
    };
    // The PROXY header and the request in one write, as a client's first bytes would be.
    let mut request = proxy_protocol::local(proxy).to_vec();
    request.extend_from_slice(
        format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: lb-health-check\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    );
    if stream.write_all(&request).await.is_err() {
        return false;
    }
    // The status line is all that matters: `HTTP/1.1 204 No Content`.
    let mut head = [0u8; 64];
    let mut len = 0;
    while len < 12 {
        match stream.read(&mut head[len..]).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => len += n,
        }
    }
    passes(&head[..len])
}

/// Whether a response starting with `head` is a 2xx or 3xx.
fn passes(head: &[u8]) -> bool {
    let status = head
        .strip_prefix(b"HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| std::str::from_utf8(code).ok()?.parse::<u16>().ok());
    status.is_some_and(|code| (200..400).contains(&code))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn check(fall: u32, rise: u32) -> HealthCheck {
        HealthCheck {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            fall,
            rise,
            path: None,
        }
    }

    #[test]
    fn fall_failures_in_a_row_take_it_out_and_rise_passes_bring_it_back() {
        let c = check(3, 2);
        let mut h = Health::default();
        assert_eq!(h.record(false, &c), None);
        assert_eq!(h.record(false, &c), None);
        // A pass in between starts the count over.
        assert_eq!(h.record(true, &c), None);
        assert_eq!(h.record(false, &c), None);
        assert_eq!(h.record(false, &c), None);
        assert_eq!(h.record(false, &c), Some(false));
        assert_eq!(h.record(false, &c), None);
        assert_eq!(h.record(true, &c), None);
        assert_eq!(h.record(true, &c), Some(true));
        assert!(h.up);
    }

    #[test]
    fn a_refused_connect_takes_it_out_until_rise_passes() {
        let c = check(3, 2);
        let mut h = Health::default();
        h.down();
        assert!(!h.up);
        assert_eq!(h.record(true, &c), None);
        assert_eq!(h.record(true, &c), Some(true));
    }

    #[test]
    fn only_2xx_and_3xx_pass() {
        assert!(passes(b"HTTP/1.1 200 OK\r\n"));
        assert!(passes(b"HTTP/1.0 302 Found\r\n"));
        assert!(!passes(b"HTTP/1.1 500 Internal Server Error\r\n"));
        assert!(!passes(b"HTTP/1.1 404 Not Found\r\n"));
        assert!(!passes(b"SSH-2.0-OpenSSH\r\n"));
        assert!(!passes(b"HTTP/1.1 2"));
    }
}
