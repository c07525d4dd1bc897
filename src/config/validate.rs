//! From raw YAML to a typed [`Config`]: deserialization errors with their position and
//! field path, then cross-field rules, each rule one function that reports every breach.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_path_to_error::Segment;
use serde_saphyr::{Location, MessageFormatter, Spanned, UserMessageFormatter};

use super::raw::{RawAdmin, RawBackoff, RawConfig, RawHealthCheck, RawService, RawWorkers};
use super::types::{Balance, ListenAddrs, ScalarText, WorkerCount, addresses_clash};
use super::{
    BackoffPolicy, Config, ConfigError, ConfigErrors, HealthCheck, ServiceConfig, Timeouts,
    WorkersConfig,
};

const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
const DEFAULT_CONNECT: Duration = Duration::from_secs(2);
const DEFAULT_IDLE: Duration = Duration::from_secs(3600);
const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// A replacement that exits this soon after it became ready halts the rollout (§4).
const DEFAULT_ROLLOUT_WATCH: Duration = Duration::from_secs(10);
const DEFAULT_RESOLVE_EVERY: Duration = Duration::from_secs(30);
const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(2);
const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_FALL: u32 = 3;
const DEFAULT_RISE: u32 = 2;
const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(100);
const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Parses the YAML into raw types; the first error carries its position and field path.
pub(super) fn deserialize<T: serde::de::DeserializeOwned>(
    text: &str,
    file: &str,
) -> Result<T, ConfigError> {
    if is_blank(text) {
        return Err(ConfigError {
            file: file.to_owned(),
            position: None,
            path: String::new(),
            message: "the file is empty; expected a `services:` list".to_owned(),
        });
    }
    let mut path = String::new();
    serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize(de).map_err(|err| {
            path = render_path(err.path());
            err.into_inner()
        })
    })
    .map_err(|err| {
        let plain = err.without_snippet();
        ConfigError {
            file: file.to_owned(),
            position: plain.location().and_then(position),
            path,
            message: message(plain),
        }
    })
}

/// Nothing but blank lines and comments.
pub(super) fn is_blank(text: &str) -> bool {
    text.lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
}

/// The parser's message, in the words of this file's format where the parser's own
/// words are about YAML events rather than what the person wrote.
fn message(err: &serde_saphyr::Error) -> String {
    use serde_saphyr::Error;
    match err {
        Error::Unexpected {
            expected: "sequence start",
            ..
        } => "expected a list (lines starting with `- `)".to_owned(),
        Error::Unexpected {
            expected: "mapping start",
            ..
        } => "expected `key: value` lines".to_owned(),
        other => UserMessageFormatter.format_message(other).into_owned(),
    }
}

/// `services[0].workers.count`, without the `value` hop that `Spanned` wrappers add.
fn render_path(path: &serde_path_to_error::Path) -> String {
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } if key == "value" => {}
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {}
        }
    }
    out
}

fn position(loc: Location) -> Option<(u64, u64)> {
    (loc != Location::UNKNOWN).then(|| (loc.line(), loc.column()))
}

/// Applies the cross-field rules and fills in defaults.
pub(super) fn build(raw: RawConfig, file: &str, base: &Path) -> Result<Config, ConfigErrors> {
    let at = |loc: &Location, path: String, message: String| ConfigError {
        file: file.to_owned(),
        position: position(*loc),
        path,
        message,
    };
    let mut errors = Vec::new();
    if raw.services.value.is_empty() {
        let msg = "expected at least one service".to_owned();
        errors.push(at(&raw.services.referenced, "services".to_owned(), msg));
    }
    let admin = raw.admin.listen.value.resolve();
    let admin_token_file = match admin_token(&raw.admin, base, &at) {
        Ok(file) => file,
        Err(err) => {
            errors.push(err);
            None
        }
    };
    errors.extend(unique_names(&raw.services.value, &at));
    errors.extend(unique_listeners(&raw.services.value, admin, &at));
    errors.extend(backends_present(&raw.services.value, &at));
    let mut services = Vec::new();
    for (i, svc) in raw.services.value.into_iter().enumerate() {
        match service(svc, i, base, &at) {
            Ok(svc) => services.push(svc),
            Err(err) => errors.push(err),
        }
    }
    if errors.is_empty() {
        Ok(Config {
            shutdown_delay: raw.shutdown_delay.map_or(Duration::ZERO, |d| d.0),
            threads: raw.threads.map_or(WorkerCount::Auto, |t| t.0).resolve(),
            resolvers: raw
                .resolvers
                .unwrap_or_default()
                .into_iter()
                .map(|r| r.0)
                .collect(),
            admin,
            admin_token_file,
            services,
        })
    } else {
        errors.sort_by_key(|e| e.position);
        Err(ConfigErrors(errors))
    }
}

type At<'a> = dyn Fn(&Location, String, String) -> ConfigError + 'a;

/// `admin.token_file`, resolved against the config file's folder, holding a usable
/// secret; required when the admin API listens beyond loopback, where anyone who
/// reaches it could otherwise reload, restart and message lb.
fn admin_token(raw: &RawAdmin, base: &Path, at: &At) -> Result<Option<PathBuf>, ConfigError> {
    let Some(file) = &raw.token_file else {
        return match raw.listen.value.resolve() {
            Some(addr) if !addr.ip().to_canonical().is_loopback() => Err(at(
                &raw.listen.referenced,
                "admin.listen".to_owned(),
                format!(
                    "{addr} is not a loopback address, so the admin API needs a token: \
                     set admin.token_file (or listen on 127.0.0.1)"
                ),
            )),
            _ => Ok(None),
        };
    };
    let path = base.join(&file.value);
    match crate::admin::auth::Secret::read(&path) {
        Ok(_) => Ok(Some(std::path::absolute(&path).unwrap_or(path))),
        Err(msg) => Err(at(
            &file.referenced,
            "admin.token_file".to_owned(),
            format!("{} {msg}", file.value),
        )),
    }
}

fn unique_names(services: &[RawService], at: &At) -> Vec<ConfigError> {
    let mut seen: HashMap<&str, u64> = HashMap::new();
    let mut errors = Vec::new();
    for (i, svc) in services.iter().enumerate() {
        let name = &svc.name.value.0;
        let loc = &svc.name.referenced;
        if let Some(first) = seen.insert(name, loc.line()) {
            let msg = format!("duplicate service name {name:?} (first used on line {first})");
            errors.push(at(loc, format!("services[{i}].name"), msg));
        }
    }
    errors
}

/// Every listen address can be bound: none is used twice, overlaps a wildcard on the
/// same port, or is the admin API's.
fn unique_listeners(
    services: &[RawService],
    admin: Option<SocketAddr>,
    at: &At,
) -> Vec<ConfigError> {
    let mut seen: Vec<(SocketAddr, String)> = admin
        .map(|addr| (addr, "the admin API (admin.listen)".to_owned()))
        .into_iter()
        .collect();
    let mut errors = Vec::new();
    for (i, svc) in services.iter().enumerate() {
        let items: Vec<(SocketAddr, &Location, String)> = match &svc.listen.value {
            ListenAddrs::One(addr) => vec![(
                *addr,
                &svc.listen.referenced,
                format!("services[{i}].listen"),
            )],
            ListenAddrs::Many(items) => items
                .iter()
                .enumerate()
                .map(|(j, item)| {
                    (
                        item.value.0,
                        &item.referenced,
                        format!("services[{i}].listen[{j}]"),
                    )
                })
                .collect(),
        };
        for (addr, loc, path) in items {
            match seen.iter().find(|(other, _)| addresses_clash(addr, *other)) {
                Some((other, owner)) if *other == addr => {
                    let msg = format!("address {addr} is already used by {owner}");
                    errors.push(at(loc, path, msg));
                }
                Some((other, owner)) => {
                    let msg = format!("address {addr} overlaps {other}, used by {owner}");
                    errors.push(at(loc, path, msg));
                }
                None => seen.push((addr, format!("service {:?}", svc.name.value.0))),
            }
        }
    }
    errors
}

fn backends_present(services: &[RawService], at: &At) -> Vec<ConfigError> {
    services
        .iter()
        .enumerate()
        .filter(|(_, svc)| svc.workers.is_none() && svc.backends.as_ref().is_none_or(Vec::is_empty))
        .map(|(i, svc)| {
            let msg = "a service needs `workers` or `backends`, and has neither".to_owned();
            at(&svc.name.referenced, format!("services[{i}]"), msg)
        })
        .collect()
}

fn service(raw: RawService, i: usize, base: &Path, at: &At) -> Result<ServiceConfig, ConfigError> {
    let timeouts = raw.timeouts.unwrap_or_default();
    let workers = match raw.workers {
        Some(w) => Some(workers(w, i, base, at)?),
        None => None,
    };
    Ok(ServiceConfig {
        name: raw.name.value.0,
        listen: raw.listen.value.addrs(),
        balance: raw.balance.unwrap_or(Balance::RoundRobin),
        max_connections: raw.max_connections.map_or(
            DEFAULT_MAX_CONNECTIONS
                .try_into()
                .expect("the default is positive"),
            |m| m.0,
        ),
        timeouts: Timeouts {
            connect: timeouts.connect.map_or(DEFAULT_CONNECT, |d| d.0),
            idle: timeouts.idle.map_or(DEFAULT_IDLE, |d| d.0),
        },
        workers,
        backends: raw.backends.unwrap_or_default(),
        resolve_every: raw.resolve_every.map_or(DEFAULT_RESOLVE_EVERY, |d| d.0),
        health_check: raw.health_check.map(|h| health_check(h.value)),
        proxy_protocol: raw.proxy_protocol.unwrap_or_default(),
        log_connections: raw.log_connections.is_some_and(|f| f.0),
    })
}

fn health_check(raw: RawHealthCheck) -> HealthCheck {
    HealthCheck {
        interval: raw.interval.map_or(DEFAULT_CHECK_INTERVAL, |d| d.0),
        timeout: raw.timeout.map_or(DEFAULT_CHECK_TIMEOUT, |d| d.0),
        fall: raw.fall.map_or(DEFAULT_FALL, |n| n.0),
        rise: raw.rise.map_or(DEFAULT_RISE, |n| n.0),
        path: raw.path.map(|p| p.0),
    }
}

fn workers(raw: RawWorkers, i: usize, base: &Path, at: &At) -> Result<WorkersConfig, ConfigError> {
    let cwd = cwd(raw.cwd, i, base, at)?;
    let restart_backoff = backoff(raw.restart_backoff, i, at)?;
    let env = env(raw.env, i, at)?;
    Ok(WorkersConfig {
        command: raw.command,
        count: raw.count.map_or(WorkerCount::Auto, |c| c).resolve(),
        cwd,
        env,
        ready_timeout: raw.ready_timeout.map_or(DEFAULT_READY_TIMEOUT, |d| d.0),
        drain_timeout: raw.drain_timeout.map_or(DEFAULT_DRAIN_TIMEOUT, |d| d.0),
        stop_signal: raw.stop_signal.map_or(Signal::SIGTERM, |s| s.0),
        stop_timeout: raw.stop_timeout.map_or(DEFAULT_STOP_TIMEOUT, |d| d.0),
        ready: raw.ready.unwrap_or_default(),
        feed: raw.feed.map(|f| super::FeedConfig {
            command: f.command,
            every: f.every.0,
        }),
        restart_backoff,
        rollout_watch: raw.rollout_watch.map_or(DEFAULT_ROLLOUT_WATCH, |d| d.0),
        max_memory: raw.max_memory.map(|m| m.0),
    })
}

/// `env`, as the names and values a process environment can hold.
fn env(
    raw: Option<Spanned<BTreeMap<String, ScalarText>>>,
    i: usize,
    at: &At,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(BTreeMap::new());
    };
    let problem = raw.value.iter().find_map(|(name, value)| {
        if name.is_empty() || name.contains(['=', '\0']) {
            Some(format!(
                "{name:?} is not a variable name (empty, or with = or NUL)"
            ))
        } else if value.0.contains('\0') {
            Some(format!("the value of {name} holds a NUL byte"))
        } else {
            None
        }
    });
    match problem {
        Some(msg) => Err(at(
            &raw.referenced,
            format!("services[{i}].workers.env"),
            msg,
        )),
        None => Ok(raw.value.into_iter().map(|(k, v)| (k, v.0)).collect()),
    }
}

/// `cwd`, resolved against the config file's folder; it must be an existing folder.
fn cwd(
    raw: Option<Spanned<String>>,
    i: usize,
    base: &Path,
    at: &At,
) -> Result<PathBuf, ConfigError> {
    let Some(cwd) = raw else {
        return Ok(std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf()));
    };
    let dir = base.join(&cwd.value);
    let problem = match dir.canonicalize() {
        Ok(dir) if dir.is_dir() => return Ok(dir),
        Ok(_) => "is not a folder",
        Err(_) => "does not exist",
    };
    let msg = format!("{} {problem}", cwd.value);
    Err(at(
        &cwd.referenced,
        format!("services[{i}].workers.cwd"),
        msg,
    ))
}

fn backoff(
    raw: Option<Spanned<RawBackoff>>,
    i: usize,
    at: &At,
) -> Result<BackoffPolicy, ConfigError> {
    let Some(raw) = raw else {
        return Ok(BackoffPolicy {
            initial: DEFAULT_BACKOFF_INITIAL,
            max: DEFAULT_BACKOFF_MAX,
        });
    };
    let initial = raw.value.initial.map_or(DEFAULT_BACKOFF_INITIAL, |d| d.0);
    let max = raw.value.max.map_or(DEFAULT_BACKOFF_MAX, |d| d.0);
    if initial <= max {
        return Ok(BackoffPolicy { initial, max });
    }
    let msg = format!(
        "initial ({}) is longer than max ({})",
        humantime::format_duration(initial),
        humantime::format_duration(max)
    );
    Err(at(
        &raw.referenced,
        format!("services[{i}].workers.restart_backoff"),
        msg,
    ))
}
