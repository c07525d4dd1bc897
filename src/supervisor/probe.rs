//! TCP probes: a worker is ready once a connect to its port succeeds; a backend taken
//! out of rotation comes back the same way. With the PROXY protocol on, each probe says
//! it is lb's own connection.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Event, health};
use crate::config::ProxyProtocol;
use crate::snapshot::BackendId;

/// Long enough for a busy worker's accept queue; a closed port answers at once anyway.
const PROBE_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Tries `addr` every `interval` until a connect succeeds (sends `ok: true`), the
/// `deadline` passes (sends `ok: false`) or `cancel` fires (sends nothing).
pub(super) fn until_up(
    id: BackendId,
    addr: SocketAddr,
    interval: Duration,
    deadline: Option<Instant>,
    proxy: ProxyProtocol,
    cancel: CancellationToken,
    events: mpsc::UnboundedSender<Event>,
) {
    tokio::spawn(async move {
        let probe = async {
            loop {
                let attempt =
                    tokio::time::timeout(PROBE_CONNECT_TIMEOUT, health::connect(addr, proxy));
                if let Ok(Ok(_)) = attempt.await {
                    return true;
                }
                if deadline.is_some_and(|d| Instant::now() + interval >= d) {
                    return false;
                }
                tokio::time::sleep(interval).await;
            }
        };
        tokio::select! {
            ok = probe => { let _ = events.send(Event::Probe { id, ok }); }
            () = cancel.cancelled() => {}
        }
    });
}
