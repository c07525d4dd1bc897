//! The validated, typed configuration, and [`load`]: the one way a file becomes a
//! [`Config`], shared by `lb check`, startup and (later) reload.

mod diff;
mod error;
mod raw;
mod source;
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
pub use source::{RunFlags, Source};
pub use types::{
    BackendSpec, BackendTarget, Balance, CommandSpec, ProxyProtocol, ReadyCheck, addresses_clash,
};

/// Where the admin API listens unless the config says otherwise: loopback only.
pub const DEFAULT_ADMIN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9900);

/// How long connections of a service with only static backends may finish when lb
/// stops: such a service has no `workers.drain_timeout`, so it gets that key's default.
pub const STATIC_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A whole lb configuration, every default filled in.
#[derive(Debug, Clone)]
pub struct Config {
    /// After SIGTERM, how long lb keeps accepting while `/healthz` answers 503.
    pub shutdown_delay: Duration,
    /// Threads that carry connections (`threads`, `auto` resolved to the CPUs available).
    pub threads: NonZeroUsize,
    /// DNS servers for host names in `backends`; empty: the system's.
    pub resolvers: Vec<SocketAddr>,
    /// The admin API's address; None when `admin.listen: null` turns it off.
    pub admin: Option<SocketAddr>,
    /// `admin.token_file`, absolute: the file whose secret POST requests must carry.
    pub admin_token_file: Option<PathBuf>,
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
    /// How often host names in `backends` are looked up again.
    pub resolve_every: Duration,
    pub health_check: Option<HealthCheck>,
    pub proxy_protocol: ProxyProtocol,
    /// One log line per closed connection.
    pub log_connections: bool,
}

/// `health_check`: how backends are checked, and how many results in a row count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub interval: Duration,
    pub timeout: Duration,
    /// Failed checks in a row that take a backend out of rotation.
    pub fall: u32,
    /// Passed checks in a row that bring it back.
    pub rise: u32,
    /// An HTTP/1.1 GET of this path that must answer 2xx or 3xx; without it, a TCP
    /// connect.
    pub path: Option<String>,
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
    /// A worker whose process group's resident memory stays above this many bytes is
    /// replaced, drain first.
    pub max_memory: Option<u64>,
}

/// `workers.feed`: a command run every `every` whose JSON output is broadcast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedConfig {
    pub command: CommandSpec,
    pub every: Duration,
}

impl ServiceConfig {
    /// How long this service's open connections may finish once they are told to: its
    /// workers' `drain_timeout`, or [`STATIC_DRAIN_TIMEOUT`] without workers.
    pub fn drain_timeout(&self) -> Duration {
        self.workers
            .as_ref()
            .map_or(STATIC_DRAIN_TIMEOUT, |w| w.drain_timeout)
    }

    /// The longest this service takes to stop once lb stops accepting: its drain, then
    /// its workers' `stop_timeout` before SIGKILL (nothing to stop without workers).
    fn drain_and_stop(&self) -> Duration {
        self.drain_timeout().saturating_add(
            self.workers
                .as_ref()
                .map_or(Duration::ZERO, |w| w.stop_timeout),
        )
    }
}

impl WorkersConfig {
    /// Whether a worker started with `self` runs as one started with `other` would: every
    /// setting but `count`, `feed`, `rollout_watch` and `max_memory`, which are about the
    /// service, its rollouts and how lb watches it, not the process.
    pub fn same_process(&self, other: &WorkersConfig) -> bool {
        WorkersConfig {
            count: other.count,
            feed: other.feed.clone(),
            rollout_watch: other.rollout_watch,
            max_memory: other.max_memory,
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
    parse(&text, &file, base_dir(path))
}

/// Parses config text; `file` names it in errors and `base` anchors relative paths.
pub fn parse(text: &str, file: &str, base: &Path) -> Result<Config, ConfigErrors> {
    let raw: raw::RawConfig =
        validate::deserialize(text, file).map_err(|err| ConfigErrors(vec![err]))?;
    validate::build(raw, file, base)
}

/// What the client commands (`lb status`, `lb reload`, ...) read from the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminClient {
    /// `admin.listen`; None when it turns the API off.
    pub listen: Option<SocketAddr>,
    /// `admin.token_file`, resolved against the config file's folder as lb does.
    pub token_file: Option<PathBuf>,
}

/// The admin section for the client commands, read alone, so a file with errors
/// elsewhere (the one about to be reloaded) still names it. The default address and no
/// token if the file cannot be read, is empty or has no `admin:`; an error if it is not
/// YAML.
pub fn admin_client(path: &Path) -> Result<AdminClient, ConfigError> {
    #[derive(serde::Deserialize)]
    struct AdminOnly {
        #[serde(default)]
        admin: AdminSection,
    }
    #[derive(Default, serde::Deserialize)]
    struct AdminSection {
        #[serde(default)]
        listen: types::AdminListen,
        #[serde(default)]
        token_file: Option<PathBuf>,
    }
    let text = std::fs::read_to_string(path).unwrap_or_default();
    if validate::is_blank(&text) {
        return Ok(AdminClient {
            listen: Some(DEFAULT_ADMIN),
            token_file: None,
        });
    }
    let parsed: AdminOnly = validate::deserialize(&text, &path.display().to_string())?;
    Ok(AdminClient {
        listen: parsed.admin.listen.resolve(),
        token_file: parsed
            .admin
            .token_file
            .map(|file| base_dir(path).join(file)),
    })
}

/// The folder relative paths in the config file start from. A bare `lb.yaml` has an
/// empty parent, which as a working directory fails to spawn.
fn base_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

impl Config {
    /// The longest a graceful stop (SIGTERM) can take, for `docker stop -t` and
    /// `terminationGracePeriodSeconds`: `shutdown_delay`, then the slowest service's
    /// drain and its workers' `stop_timeout` (services drain and stop side by side).
    pub fn longest_stop(&self) -> Duration {
        let slowest = self
            .slowest_to_stop()
            .map_or(Duration::ZERO, ServiceConfig::drain_and_stop);
        self.shutdown_delay.saturating_add(slowest)
    }

    /// The service whose drain and stop take longest; the first of those that tie.
    fn slowest_to_stop(&self) -> Option<&ServiceConfig> {
        self.services
            .iter()
            .rev()
            .max_by_key(|svc| svc.drain_and_stop())
    }

    /// The summary's line for [`Config::longest_stop`], saying where the figure comes
    /// from. The total is in whole seconds, rounded up: the unit of `docker stop -t` and
    /// `terminationGracePeriodSeconds`.
    fn longest_stop_line(&self) -> String {
        let show = |d: Duration| humantime::format_duration(d).to_string();
        let total = self.longest_stop();
        let seconds = total.as_secs() + u64::from(total.subsec_nanos() > 0);
        let mut why = format!("shutdown_delay {}", show(self.shutdown_delay));
        if let Some(svc) = self.slowest_to_stop() {
            let _ = write!(why, " + drain_timeout {}", show(svc.drain_timeout()));
            match &svc.workers {
                Some(w) => {
                    let _ = write!(
                        why,
                        " + stop_timeout {} of service {}",
                        show(w.stop_timeout),
                        svc.name
                    );
                }
                None => {
                    let _ = write!(why, " of service {}, static backends only", svc.name);
                }
            }
        }
        format!(
            "longest stop: {seconds}s ({why}); set docker stop -t / terminationGracePeriodSeconds above it"
        )
    }

    /// The one-screen summary `lb check` prints for a valid file.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        match (self.admin, &self.admin_token_file) {
            (Some(addr), None) => {
                let _ = writeln!(
                    out,
                    "admin API: http://{addr}/ (status, metrics, reload, restart)"
                );
            }
            (Some(addr), Some(file)) => {
                let _ = writeln!(
                    out,
                    "admin API: http://{addr}/ (status, metrics, reload, restart); POST needs the token from {}",
                    file.display()
                );
            }
            (None, _) => out.push_str("admin API: off\n"),
        }
        let _ = writeln!(out, "connection threads: {}", self.threads);
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
                    "  workers: {} x {:?} in {} (ready by {} within {}, rollout watch {}, drain {}, stop {} then SIGKILL after {})",
                    w.count,
                    w.command.argv(),
                    w.cwd.display(),
                    w.ready,
                    humantime::format_duration(w.ready_timeout),
                    humantime::format_duration(w.rollout_watch),
                    humantime::format_duration(w.drain_timeout),
                    w.stop_signal,
                    humantime::format_duration(w.stop_timeout),
                );
            }
            for b in &svc.backends {
                let _ = write!(out, "  backend: {} (weight {})", b.label, b.weight);
                if b.host_name().is_some() {
                    let _ = write!(
                        out,
                        ", every address of the name, looked up every {}",
                        humantime::format_duration(svc.resolve_every)
                    );
                }
                out.push('\n');
            }
            if let Some(h) = &svc.health_check {
                let what = h
                    .path
                    .as_ref()
                    .map_or("TCP connect".to_owned(), |p| format!("HTTP GET {p}"));
                let _ = writeln!(
                    out,
                    "  health check: {what} every {} (timeout {}), out after {} failures, back after {} passes",
                    humantime::format_duration(h.interval),
                    humantime::format_duration(h.timeout),
                    h.fall,
                    h.rise,
                );
            }
            if svc.proxy_protocol != ProxyProtocol::Off || svc.log_connections {
                let _ = writeln!(
                    out,
                    "  proxy protocol {}, connection log {}",
                    svc.proxy_protocol,
                    if svc.log_connections { "on" } else { "off" }
                );
            }
        }
        if !self.resolvers.is_empty() {
            let list: Vec<String> = self.resolvers.iter().map(ToString::to_string).collect();
            let _ = writeln!(out, "resolvers: {}", list.join(" "));
        }
        out.push_str(&self.longest_stop_line());
        out.push('\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        parse(yaml, "test.yaml", Path::new(".")).expect("a valid config")
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn rollout_watch_and_count_do_not_make_a_worker_outdated_but_its_env_does() {
        let workers = |extra: &str| {
            let yaml = format!(
                "services:\n  - name: web\n    listen: 127.0.0.1:8080\n    workers: {{ command: [x]{extra} }}\n"
            );
            config(&yaml).services[0].workers.clone().expect("workers")
        };
        let base = workers("");
        assert!(base.same_process(&workers(", rollout_watch: 1s, count: 7")));
        assert!(!base.same_process(&workers(", env: { A: b }")));
    }

    #[test]
    fn longest_stop_of_the_defaults_is_drain_plus_stop() {
        let c = config(
            "services:\n  - name: web\n    listen: 127.0.0.1:8080\n    workers: { command: [x] }\n",
        );
        assert_eq!(c.services[0].drain_timeout(), 30 * SECOND);
        assert_eq!(c.longest_stop(), 40 * SECOND);
        assert!(
            c.summary().ends_with(
                "longest stop: 40s (shutdown_delay 0s + drain_timeout 30s + stop_timeout 10s of service web); \
                 set docker stop -t / terminationGracePeriodSeconds above it\n"
            ),
            "{}",
            c.summary()
        );
    }

    #[test]
    fn longest_stop_takes_the_slowest_service_as_a_whole() {
        // api has the longest drain, jobs the longest stop_timeout; the slowest service
        // as a whole (drain + its own stop) counts, not the two maxima added up.
        let c = config(
            "shutdown_delay: 5s
services:
  - name: api
    listen: 127.0.0.1:8080
    workers: { command: [x], drain_timeout: 20s, stop_timeout: 2s }
  - name: jobs
    listen: 127.0.0.1:8081
    workers: { command: [x], drain_timeout: 3s, stop_timeout: 15s }
",
        );
        assert_eq!(c.longest_stop(), 5 * SECOND + 22 * SECOND);
        assert!(
            c.summary().contains(
                "longest stop: 27s (shutdown_delay 5s + drain_timeout 20s + stop_timeout 2s of service api)"
            ),
            "{}",
            c.summary()
        );
    }

    #[test]
    fn static_backends_drain_for_the_default_and_stop_nothing() {
        let c = config(
            "services:
  - name: db
    listen: 127.0.0.1:8080
    backends: [127.0.0.1:5432]
  - name: web
    listen: 127.0.0.1:8081
    workers: { command: [x], drain_timeout: 10s, stop_timeout: 5s }
",
        );
        assert_eq!(c.services[0].drain_timeout(), STATIC_DRAIN_TIMEOUT);
        assert_eq!(c.longest_stop(), STATIC_DRAIN_TIMEOUT);
        assert!(
            c.summary().contains(
                "longest stop: 30s (shutdown_delay 0s + drain_timeout 30s of service db, static backends only)"
            ),
            "{}",
            c.summary()
        );
    }

    #[test]
    fn a_service_with_workers_and_backends_drains_for_its_workers() {
        let c = config(
            "services:
  - name: web
    listen: 127.0.0.1:8080
    backends: [127.0.0.1:9000]
    workers: { command: [x], drain_timeout: 1s, stop_timeout: 1s }
",
        );
        assert_eq!(c.services[0].drain_timeout(), SECOND);
        assert_eq!(c.longest_stop(), 2 * SECOND);
    }

    #[test]
    fn longest_stop_rounds_up_to_whole_seconds_in_the_summary() {
        let c = config(
            "shutdown_delay: 1500ms
services:
  - name: web
    listen: 127.0.0.1:8080
    workers: { command: [x], drain_timeout: 1m, stop_timeout: 250ms }
",
        );
        assert_eq!(c.longest_stop(), Duration::from_millis(61_750));
        assert!(
            c.summary().contains(
                "longest stop: 62s (shutdown_delay 1s 500ms + drain_timeout 1m + stop_timeout 250ms of service web)"
            ),
            "{}",
            c.summary()
        );
    }

    #[test]
    fn the_summary_shows_rollout_watch() {
        let c = config(
            "services:\n  - name: web\n    listen: 127.0.0.1:8080\n    workers: { command: [x], rollout_watch: 3s }\n",
        );
        assert_eq!(
            c.services[0].workers.as_ref().map(|w| w.rollout_watch),
            Some(3 * SECOND)
        );
        assert!(
            c.summary().contains(", rollout watch 3s, "),
            "{}",
            c.summary()
        );
    }
}
