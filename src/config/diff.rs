//! What a reload changes: old services vs new ones, matched by name, so lb touches only
//! what differs and unchanged workers keep running.

use std::net::SocketAddr;

use super::{BackendSpec, ServiceConfig, WorkersConfig};

/// The changes a reload makes, service by service.
#[derive(Debug, Default)]
pub struct Diff {
    pub added: Vec<ServiceConfig>,
    pub removed: Vec<String>,
    /// Services present before and after, with their new config and what changed.
    pub changed: Vec<(ServiceConfig, ServiceChange)>,
}

/// How one service that exists before and after a reload differs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ServiceChange {
    pub listen_added: Vec<SocketAddr>,
    pub listen_removed: Vec<SocketAddr>,
    /// A worker setting other than `count` changed: every worker is rolled.
    pub roll: bool,
    /// Worker slots before and after (0 without `workers`).
    pub count: (usize, usize),
    pub backends_added: Vec<BackendSpec>,
    pub backends_removed: Vec<BackendSpec>,
    /// The keys whose values differ, as written in the file (`listen`,
    /// `workers.count`, ...), for the reload's answer.
    pub keys: Vec<&'static str>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

/// Compares two configs; a service whose config is identical appears nowhere.
pub fn diff(old: &[ServiceConfig], new: &[ServiceConfig]) -> Diff {
    let mut out = Diff::default();
    for before in old {
        if !new.iter().any(|s| s.name == before.name) {
            out.removed.push(before.name.clone());
        }
    }
    for after in new {
        match old.iter().find(|s| s.name == after.name) {
            None => out.added.push(after.clone()),
            Some(before) if before != after => {
                out.changed.push((after.clone(), change(before, after)))
            }
            Some(_) => {}
        }
    }
    out
}

fn change(before: &ServiceConfig, after: &ServiceConfig) -> ServiceChange {
    let count = |s: &ServiceConfig| s.workers.as_ref().map_or(0, |w| w.count.get());
    let roll = match (&before.workers, &after.workers) {
        (Some(b), Some(a)) => !b.same_process(a),
        _ => false,
    };
    ServiceChange {
        listen_added: missing_from(&after.listen, &before.listen),
        listen_removed: missing_from(&before.listen, &after.listen),
        roll,
        count: (count(before), count(after)),
        backends_added: missing_from(&after.backends, &before.backends),
        backends_removed: missing_from(&before.backends, &after.backends),
        keys: changed_keys(before, after),
    }
}

/// The keys of a service whose values differ between `before` and `after`. Each config
/// is taken apart field by field, so a key added to either struct must be named here.
fn changed_keys(before: &ServiceConfig, after: &ServiceConfig) -> Vec<&'static str> {
    let ServiceConfig {
        name: _,
        listen,
        balance,
        max_connections,
        timeouts,
        workers,
        backends,
        resolve_every,
        health_check,
        proxy_protocol,
        log_connections,
    } = before;
    let mut keys = differing(&[
        ("listen", *listen != after.listen),
        ("balance", *balance != after.balance),
        ("max_connections", *max_connections != after.max_connections),
        (
            "timeouts.connect",
            timeouts.connect != after.timeouts.connect,
        ),
        ("timeouts.idle", timeouts.idle != after.timeouts.idle),
        ("backends", *backends != after.backends),
        ("resolve_every", *resolve_every != after.resolve_every),
        ("health_check", *health_check != after.health_check),
        ("proxy_protocol", *proxy_protocol != after.proxy_protocol),
        ("log_connections", *log_connections != after.log_connections),
    ]);
    match (workers, &after.workers) {
        (Some(b), Some(a)) => keys.extend(changed_worker_keys(b, a)),
        (None, None) => {}
        _ => keys.push("workers"),
    }
    keys
}

fn changed_worker_keys(before: &WorkersConfig, after: &WorkersConfig) -> Vec<&'static str> {
    let WorkersConfig {
        command,
        count,
        cwd,
        env,
        ready,
        ready_timeout,
        drain_timeout,
        stop_signal,
        stop_timeout,
        restart_backoff,
        feed,
        rollout_watch,
        max_memory,
    } = before;
    let a = after;
    differing(&[
        ("workers.command", *command != a.command),
        ("workers.count", *count != a.count),
        ("workers.cwd", *cwd != a.cwd),
        ("workers.env", *env != a.env),
        ("workers.ready", *ready != a.ready),
        ("workers.ready_timeout", *ready_timeout != a.ready_timeout),
        ("workers.drain_timeout", *drain_timeout != a.drain_timeout),
        ("workers.stop_signal", *stop_signal != a.stop_signal),
        ("workers.stop_timeout", *stop_timeout != a.stop_timeout),
        (
            "workers.restart_backoff",
            *restart_backoff != a.restart_backoff,
        ),
        ("workers.feed", *feed != a.feed),
        ("workers.rollout_watch", *rollout_watch != a.rollout_watch),
        ("workers.max_memory", *max_memory != a.max_memory),
    ])
}

fn differing(keys: &[(&'static str, bool)]) -> Vec<&'static str> {
    keys.iter()
        .filter_map(|&(key, differs)| differs.then_some(key))
        .collect()
}

/// Items of `these` that `those` lacks.
fn missing_from<T: Clone + PartialEq>(these: &[T], those: &[T]) -> Vec<T> {
    these
        .iter()
        .filter(|x| !those.contains(x))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn services(yaml: &str) -> Vec<ServiceConfig> {
        crate::config::parse(yaml, "test.yaml", Path::new("."))
            .expect("valid config")
            .services
    }

    const BASE: &str = "
services:
  - name: web
    listen: 127.0.0.1:8080
    workers: { command: [app], count: 2 }
  - name: api
    listen: 127.0.0.1:8081
    backends: [127.0.0.1:9000]
";

    #[test]
    fn identical_configs_change_nothing() {
        assert!(diff(&services(BASE), &services(BASE)).is_empty());
    }

    #[test]
    fn count_alone_scales_without_rolling() {
        let new = BASE.replace("count: 2", "count: 4");
        let d = diff(&services(BASE), &services(&new));
        assert_eq!(d.changed.len(), 1);
        assert_eq!(
            d.changed[0].1,
            ServiceChange {
                count: (2, 4),
                keys: vec!["workers.count"],
                ..ServiceChange::default()
            }
        );
    }

    #[test]
    fn a_worker_setting_rolls() {
        let new = BASE.replace("command: [app]", "command: [app2]");
        let d = diff(&services(BASE), &services(&new));
        assert!(d.changed[0].1.roll);
        assert_eq!(d.changed[0].1.keys, ["workers.command"]);
    }

    #[test]
    fn services_and_addresses_added_and_removed() {
        let new = "
services:
  - name: web
    listen: [127.0.0.1:8080, 127.0.0.1:8090]
    workers: { command: [app], count: 2 }
  - name: admin
    listen: 127.0.0.1:8082
    backends: [127.0.0.1:9001, { address: 127.0.0.1:9002, weight: 2 }]
";
        let d = diff(&services(BASE), &services(new));
        assert_eq!(d.removed, vec!["api".to_owned()]);
        assert_eq!(d.added.len(), 1);
        let (svc, change) = &d.changed[0];
        assert_eq!(svc.name, "web");
        assert_eq!(change.listen_added, vec!["127.0.0.1:8090".parse().unwrap()]);
        assert!(change.listen_removed.is_empty() && !change.roll);
    }
}
