//! lb running out of descriptors or memory while connecting clients, said once per
//! episode: the first client it has to close logs a warning, the rest are only counted
//! (in `lb_connections_dropped_total{reason="resources"}` too), and the first connect that
//! works again logs how many were closed. A line per client would bury everything else
//! in the log just when it matters.

use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{info, warn};

/// Clients closed in the current episode; 0 outside one.
static CLOSED: AtomicU64 = AtomicU64::new(0);

/// A client is closed because lb could not open a connection for it.
pub(super) fn closed_a_client(service: &str, err: &std::io::Error) {
    if CLOSED.fetch_add(1, Ordering::Relaxed) == 0 {
        warn!(service, %err, "lb is out of resources (descriptors or memory): closing clients it cannot connect until it has some again");
    }
}

/// A connect worked: ends an episode, if one was going on. Outside one this is a read of
/// a value no one writes, so it costs the connection nothing.
pub(super) fn connected() {
    if CLOSED.load(Ordering::Relaxed) != 0 {
        let closed = CLOSED.swap(0, Ordering::Relaxed);
        if closed > 0 {
            info!(closed, "lb has resources again; clients closed meanwhile");
        }
    }
}
