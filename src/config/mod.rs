//! The validated, typed configuration, and [`load`]: the one way a file becomes a
//! [`Config`], shared by `lb check`, startup and (later) reload.

mod diff;
mod error;
mod raw;
mod types;
mod validate;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;

pub use diff::{Diff, ServiceChange, diff};
pub use error::{ConfigError, ConfigErrors};
pub use types::{BackendSpec, Balance, CommandSpec, ReadyCheck, addresses_clash};

/// Where the admin API listens unless the config says otherwise: loopback only.
pub const DEFAULT_ADMIN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9900);

/// How long connections to static backends may take to finish when lb stops (a
/// service with workers uses their `drain_timeout`).
pub const STATIC_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A whole lb configuration, every default filled in.
#[derive(Debug, Clone)]
pub struct Config {
    /// After SIGTERM, how long lb keeps accepting while `/healthz` answers 503.
    pub shutdown_delay: Duration,
    /// The admin API's address; None when `admin.listen: null` turns it off.
    pub admin: Option<SocketAddr>,
    pub services: Vec<ServiceConfig>,
}

/// One service: its listeners, how it balances, and where its backends come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    pub name: String,
    pub listen: Vec<SocketAddr>,
    pub balance: Balance,
    pub max_connections: NonZeroUsize,
    pub timeouts: Timeouts,
    pub workers: Option<WorkersConfig>,
    pub backends: Vec<BackendSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// How long a connect to a backend may take.
    pub connect: Duration,
    /// A proxied connection with no bytes either way for this long is closed.
    pub idle: Duration,
}

/// How lb runs the worker processes of one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkersConfig {
    pub command: CommandSpec,
    pub count: NonZeroUsize,
    /// Absolute: resolved against the config file's folder.
    pub cwd: PathBuf,
    pub env: BTreeMap<String, String>,
    pub ready: ReadyCheck,
    pub ready_timeout: Duration,
    pub drain_timeout: Duration,
    pub stop_signal: Signal,
    pub stop_timeout: Duration,
    pub restart_backoff: BackoffPolicy,
    pub feed: Option<FeedConfig>,
    /// A rollout's replacement that exits within this long after it became ready
    /// halts the rollout.
    pub rollout_watch: Duration,
}

/// `workers.feed`: a command run every `every` whose JSON output is broadcast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedConfig {
    pub command: CommandSpec,
    pub every: Duration,
}

impl ServiceConfig {
    /// How long its open connections may take to finish when its workers leave or lb
    /// stops.
    pub fn drain_timeout(&self) -> Duration {
        self.workers
            .as_ref()
            .map_or(STATIC_DRAIN_TIMEOUT, |w| w.drain_timeout)
    }
}

impl WorkersConfig {
    /// Whether a worker started with `self` runs as one started with `other` would: every
    /// setting but `count` and `feed`, which are about the service, not the process.
    pub fn same_process(&self, other: &WorkersConfig) -> bool {
        WorkersConfig {
            count: other.count,
            feed: other.feed.clone(),
            ..self.clone()
        } == *other
    }
}

/// Restart delays: `initial`, doubling per crash up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    pub initial: Duration,
    pub max: Duration,
}

/// Reads, parses and validates a config file; every problem comes back as one line.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|err| {
        ConfigErrors(vec![ConfigError {
            file: file.clone(),
            position: None,
            path: String::new(),
            message: format!("could not read: {err}"),
        }])
    })?;
    // A bare `lb.yaml` has an empty parent, which as a working directory fails to spawn.
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    parse(&text, &file, base)
}

/// Parses config text; `file` names it in errors and `base` anchors relative paths.
pub fn parse(text: &str, file: &str, base: &Path) -> Result<Config, ConfigErrors> {
    let raw: raw::RawConfig =
        validate::deserialize(text, file).map_err(|err| ConfigErrors(vec![err]))?;
    validate::build(raw, file, base)
}

/// The admin address for the client commands (`lb status`, `lb reload`, ...), read from
/// `admin.listen` alone, so a file with errors elsewhere (the one about to be reloaded)
/// still names it. The default address if the file cannot be read, is empty or has no
/// `admin.listen`; `Ok(None)` if it turns the API off; an error if it is not YAML.
pub fn admin_address(path: &Path) -> Result<Option<SocketAddr>, ConfigError> {
    #[derive(serde::Deserialize)]
    struct AdminOnly {
        #[serde(default)]
        admin: AdminSection,
    }
    #[derive(Default, serde::Deserialize)]
    struct AdminSection {
        #[serde(default)]
        listen: types::AdminListen,
    }
    let text = std::fs::read_to_string(path).unwrap_or_default();
    if validate::is_blank(&text) {
        return Ok(Some(DEFAULT_ADMIN));
    }
    let parsed: AdminOnly = validate::deserialize(&text, &path.display().to_string())?;
    Ok(parsed.admin.listen.resolve())
}

impl Config {
    /// The one-screen summary `lb check` prints for a valid file.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        match self.admin {
            Some(addr) => {
                let _ = writeln!(
                    out,
                    "admin API: http://{addr}/ (status, metrics, reload, restart)"
                );
            }
            None => out.push_str("admin API: off\n"),
        }
        for svc in &self.services {
            let listen: Vec<String> = svc.listen.iter().map(ToString::to_string).collect();
            let _ = writeln!(
                out,
                "service {}: listen {}, balance {}, max_connections {}, connect timeout {}, idle timeout {}",
                svc.name,
                listen.join(" "),
                svc.balance,
                svc.max_connections,
                humantime::format_duration(svc.timeouts.connect),
                humantime::format_duration(svc.timeouts.idle),
            );
            if let Some(w) = &svc.workers {
                let _ = writeln!(
                    out,
                    "  workers: {} x {:?} in {} (ready by {} within {}, drain {}, stop {} then SIGKILL after {})",
                    w.count,
                    w.command.argv(),
                    w.cwd.display(),
                    w.ready,
                    humantime::format_duration(w.ready_timeout),
                    humantime::format_duration(w.drain_timeout),
                    w.stop_signal,
                    humantime::format_duration(w.stop_timeout),
                );
            }
            for b in &svc.backends {
                let _ = writeln!(out, "  backend: {} (weight {})", b.label, b.weight);
            }
        }
        out
    }
}
