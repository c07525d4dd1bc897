//! From raw YAML to a typed [`Config`]: deserialization errors with their position and
//! field path, then cross-field rules, each rule one function that reports every breach.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_path_to_error::Segment;
use serde_saphyr::{Location, MessageFormatter, UserMessageFormatter};

use super::raw::{RawConfig, RawService, RawWorkers};
use super::types::Balance;
use super::{
    BackoffPolicy, Config, ConfigError, ConfigErrors, ServiceConfig, Timeouts, WorkersConfig,
};

const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
const DEFAULT_CONNECT: Duration = Duration::from_secs(2);
const DEFAULT_IDLE: Duration = Duration::from_secs(3600);
const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(100);
const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Parses the YAML into raw types; the first error carries its position and field path.
pub(super) fn deserialize(text: &str, file: &str) -> Result<RawConfig, ConfigError> {
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
            message: UserMessageFormatter.format_message(plain).into_owned(),
        }
    })
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
    errors.extend(unique_names(&raw.services, &at));
    errors.extend(unique_listeners(&raw.services, &at));
    errors.extend(backends_present(&raw.services, &at));
    let mut services = Vec::new();
    for (i, svc) in raw.services.into_iter().enumerate() {
        match service(svc, i, base, &at) {
            Ok(svc) => services.push(svc),
            Err(err) => errors.push(err),
        }
    }
    if errors.is_empty() {
        Ok(Config { services })
    } else {
        errors.sort_by_key(|e| e.position);
        Err(ConfigErrors(errors))
    }
}

type At<'a> = dyn Fn(&Location, String, String) -> ConfigError + 'a;

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

fn unique_listeners(services: &[RawService], at: &At) -> Vec<ConfigError> {
    let mut seen = HashMap::new();
    let mut errors = Vec::new();
    for (i, svc) in services.iter().enumerate() {
        for addr in &svc.listen.value.0 {
            if let Some(owner) = seen.insert(*addr, &svc.name.value.0) {
                let msg = format!("address {addr} is already used by service {owner:?}");
                errors.push(at(
                    &svc.listen.referenced,
                    format!("services[{i}].listen"),
                    msg,
                ));
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
        listen: raw.listen.value.0,
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
    })
}

fn workers(raw: RawWorkers, i: usize, base: &Path, at: &At) -> Result<WorkersConfig, ConfigError> {
    let cwd = match raw.cwd {
        Some(cwd) => {
            let dir = base.join(&cwd.value);
            if !dir.is_dir() {
                let msg = format!("{} is not a folder", dir.display());
                return Err(at(
                    &cwd.referenced,
                    format!("services[{i}].workers.cwd"),
                    msg,
                ));
            }
            dir
        }
        None => base.to_path_buf(),
    };
    let restart_backoff = match raw.restart_backoff {
        Some(b) => {
            let initial = b.value.initial.map_or(DEFAULT_BACKOFF_INITIAL, |d| d.0);
            let max = b.value.max.map_or(DEFAULT_BACKOFF_MAX, |d| d.0);
            if initial.is_zero() || initial > max {
                let msg = "expected 0 < initial <= max".to_owned();
                return Err(at(
                    &b.referenced,
                    format!("services[{i}].workers.restart_backoff"),
                    msg,
                ));
            }
            BackoffPolicy { initial, max }
        }
        None => BackoffPolicy {
            initial: DEFAULT_BACKOFF_INITIAL,
            max: DEFAULT_BACKOFF_MAX,
        },
    };
    Ok(WorkersConfig {
        command: raw.command,
        count: raw
            .count
            .map_or(super::types::WorkerCount::Auto, |c| c)
            .resolve(),
        cwd: std::path::absolute(&cwd).unwrap_or(cwd),
        env: raw.env.into_iter().map(|(k, v)| (k, v.0)).collect(),
        ready_timeout: raw.ready_timeout.map_or(DEFAULT_READY_TIMEOUT, |d| d.0),
        drain_timeout: raw.drain_timeout.map_or(DEFAULT_DRAIN_TIMEOUT, |d| d.0),
        stop_signal: raw.stop_signal.map_or(Signal::SIGTERM, |s| s.0),
        stop_timeout: raw.stop_timeout.map_or(DEFAULT_STOP_TIMEOUT, |d| d.0),
        restart_backoff,
    })
}
