//! systemd's readiness protocol (sd_notify(3)): one datagram of `KEY=VALUE` lines to the
//! Unix socket named by `NOTIFY_SOCKET`, so a `Type=notify` unit is started only once lb
//! serves, shows reloads and stops, and is restarted when lb stops answering its
//! watchdog. Without `NOTIFY_SOCKET` every call does nothing.
//!
//! Sending never blocks: the socket is non-blocking and a datagram that cannot be sent
//! at once is dropped (systemd reads its socket promptly; a lost `WATCHDOG=1` is followed
//! by the next one well within the timeout).

use std::ffi::OsStr;
use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use nix::time::{ClockId, clock_gettime};
use tracing::warn;

/// Where lb tells systemd how it is doing.
#[derive(Debug, Default)]
pub struct Notifier {
    socket: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` and `WATCHDOG_USEC`/`WATCHDOG_PID` from lb's environment.
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            match connect(&path) {
                Ok(socket) => Some(socket),
                Err(err) => {
                    warn!(socket = %path.to_string_lossy(), %err, "NOTIFY_SOCKET is set but unusable; systemd is not told when lb is ready");
                    None
                }
            }
        });
        let watchdog = watchdog_usec(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        Notifier {
            watchdog: socket.as_ref().and(watchdog),
            socket,
        }
    }

    /// How often to send `WATCHDOG=1`: half the timeout systemd set, as sd_watchdog_enabled(3)
    /// advises; `None` without a watchdog.
    pub fn watchdog_every(&self) -> Option<Duration> {
        self.watchdog.map(|timeout| timeout / 2)
    }

    /// Listeners are bound and every service has a ready backend (also the end of a reload).
    pub fn ready(&self) {
        self.send("READY=1\nSTATUS=serving\n");
    }

    /// A reload has begun; `READY=1` ends it. systemd matches the two by the time.
    pub fn reloading(&self) {
        let usec = clock_gettime(ClockId::CLOCK_MONOTONIC)
            .map(|t| Duration::from(t).as_micros())
            .unwrap_or_default();
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading\n"
        ));
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping: draining connections\n");
    }

    pub fn watchdog(&self) {
        self.send("WATCHDOG=1\n");
    }

    fn send(&self, message: &str) {
        if let Some((socket, addr)) = &self.socket {
            let _ = socket.send_to_addr(message.as_bytes(), addr);
        }
    }
}

/// An unbound, non-blocking datagram socket and the address of systemd's: a path, or
/// `@name` for the abstract namespace.
fn connect(path: &OsStr) -> std::io::Result<(UnixDatagram, SocketAddr)> {
    let addr = match path.as_bytes().strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(path)?,
    };
    let socket = UnixDatagram::unbound()?;
    socket.set_nonblocking(true)?;
    Ok((socket, addr))
}

/// The watchdog timeout, if systemd set one for this process: `WATCHDOG_PID`, when
/// present, names the process it is meant for.
fn watchdog_usec(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if pid.is_some_and(|pid| pid.parse() != Ok(me)) {
        return None;
    }
    let usec: u64 = usec?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

#[cfg(test)]
mod tests {
    use super::watchdog_usec;
    use std::time::Duration;

    #[test]
    fn the_watchdog_is_for_this_process_only() {
        let two_s = Some(Duration::from_secs(2));
        assert_eq!(watchdog_usec(Some("2000000"), None, 7), two_s);
        assert_eq!(watchdog_usec(Some("2000000"), Some("7"), 7), two_s);
        assert_eq!(watchdog_usec(Some("2000000"), Some("8"), 7), None);
        assert_eq!(watchdog_usec(Some("0"), None, 7), None);
        assert_eq!(watchdog_usec(Some("soon"), None, 7), None);
        assert_eq!(watchdog_usec(None, Some("7"), 7), None);
    }
}
