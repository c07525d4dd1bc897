//! Running under systemd (contract §8): the readiness protocol of `Type=notify` units
//! and sockets passed by socket activation.

pub mod activation;
pub mod notify;

pub use notify::Notifier;

/// Variables systemd sets for lb alone; a worker that saw them could take lb's sockets
/// or report lb ready.
pub const PRIVATE_ENV: [&str; 6] = [
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];
