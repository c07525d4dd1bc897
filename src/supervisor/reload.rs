//! SIGHUP: re-read the config and apply only the difference. Every new listen address is
//! bound first, so an invalid file or an address in use changes nothing; then services
//! are removed, added and changed, and unchanged workers keep running untouched.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;

use tracing::{error, info, warn};

use super::Supervisor;
use super::command::CommandError;
use super::stop::Phase;
use crate::config::{
    self, BackendTarget, Config, ConfigErrors, ServiceChange, ServiceConfig, addresses_clash,
};
use crate::proxy::Listening;

type Bound = Vec<(SocketAddr, Listening)>;

impl Supervisor {
    /// Applies the config file as it is now and says what changed. Changes nothing if
    /// the file is invalid or one of its new addresses cannot be bound; the error then
    /// holds the same lines `lb check` prints.
    pub(super) fn reload(
        &mut self,
        config: Result<Config, ConfigErrors>,
    ) -> Result<String, CommandError> {
        if self.phase != Phase::Running {
            return Err(CommandError::Stopping);
        }
        let result = config
            .map_err(|errors| CommandError::Invalid(errors.to_string()))
            .and_then(|config| self.apply(config));
        let label = if result.is_ok() { "ok" } else { "error" };
        self.metrics.reloads_total.with_label_values(&[label]).inc();
        if let Err(err) = &result {
            for line in err.to_string().lines() {
                error!("{line}");
            }
            warn!(config = %self.source, "reload rejected; nothing changed");
        }
        result
    }

    fn apply(&mut self, config: Config) -> Result<String, CommandError> {
        let path = self.source.to_string();
        if config.admin != self.admin {
            warn!(%path, "admin.listen changed: the admin API moves only when lb restarts");
        }
        crate::systemd::activation::warn_unused(&config);
        if config.admin_token_file != self.admin_token_file {
            warn!(%path, "admin.token_file changed: the admin API reads another file only when lb restarts");
        }
        if config.threads.get() != self.proxy.threads() {
            warn!(%path, "threads changed: the number of connection threads changes only when lb restarts");
        }
        let old: Vec<ServiceConfig> = self.services.iter().map(|s| s.config.clone()).collect();
        let diff = config::diff(&old, &config.services);
        let mut bound = self.bind_new(&diff).map_err(CommandError::Invalid)?;
        self.shutdown_delay = config.shutdown_delay;
        self.resolvers = config.resolvers.as_slice().into();
        let unchanged = diff.is_empty();
        let summary = summary(&diff);
        for name in &diff.removed {
            self.remove_service(name);
        }
        for svc in diff.added {
            let listeners = bound.remove(&svc.name).unwrap_or_default();
            self.add_service(svc, listeners);
        }
        for (svc, change) in diff.changed {
            let listeners = bound.remove(&svc.name).unwrap_or_default();
            self.change_service(svc, change, listeners);
        }
        // Every worker not running its service's settings is replaced, now that every
        // service has its new settings: changed ones, and slots a halted rollout left.
        self.converge();
        self.resume_rollout();
        self.start_feeds();
        // Host names are looked up again on every reload, changed or not.
        for si in 0..self.services.len() {
            self.start_resolving(si);
        }
        if unchanged {
            info!(%path, "reload: no change");
            return Ok("reload: no change".to_owned());
        }
        let changes: Vec<&str> = summary.lines().map(str::trim).collect();
        info!(%path, changes = %changes.join("; "), "reload applied");
        Ok(format!("reload applied\n{}", summary.trim_end()))
    }

    fn remove_service(&mut self, name: &str) {
        let Some(si) = self.service_index(name) else {
            return;
        };
        let mut svc = self.services.remove(si);
        svc.listeners.close_all();
        svc.names.stop();
        for s in &svc.statics {
            s.probe.cancel();
        }
        self.kill_feed(name);
        for s in &svc.statics {
            self.metrics.forget_backend(name, &s.backend.label);
        }
        for slot in 0..svc.slots.len() {
            self.metrics.forget_backend(name, &slot.to_string());
        }
        self.metrics.forget_service(name);
        let effects = self.rollout.drop_step(name, 0);
        self.carry_out(effects);
        for worker in svc.slots.iter().filter_map(|s| s.worker) {
            self.retire(worker, "removed");
        }
        info!(
            service = name,
            "service removed: listeners closed, workers draining"
        );
    }

    fn add_service(&mut self, config: ServiceConfig, listeners: Bound) {
        let si = self.add_service_state(config);
        for slot in 0..self.services[si].slots.len() {
            self.start_or_backoff(si, slot);
        }
        self.serve(si, listeners);
        info!(service = %self.services[si].config.name, "service added");
    }

    fn change_service(&mut self, config: ServiceConfig, change: ServiceChange, listeners: Bound) {
        let Some(si) = self.service_index(&config.name) else {
            return;
        };
        let name = config.name.clone();
        let svc = &mut self.services[si];
        svc.listeners.set_limit(config.max_connections.get());
        for addr in &change.listen_removed {
            svc.listeners.close(addr);
            info!(service = %name, %addr, "stopped listening");
        }
        let metrics = &self.metrics;
        // Addresses of host names follow their names' answers (`start_resolving`).
        svc.statics.retain(|s| {
            let keep = s.resolved() || !change.backends_removed.contains(&s.from);
            if !keep {
                s.probe.cancel();
                metrics.forget_backend(&name, &s.backend.label);
            }
            keep
        });
        let feed = |c: &ServiceConfig| c.workers.as_ref().and_then(|w| w.feed.clone());
        if feed(&svc.config) != feed(&config) {
            // A new timer with the new settings starts at the end of the reload; the old
            // one stops at its next tick. A removed feed's last value goes with it.
            svc.feed.chain = None;
            if feed(&config).is_none() {
                svc.feed.last = None;
            }
        }
        let checks = |c: &ServiceConfig| (c.health_check.clone(), c.proxy_protocol);
        let checks_changed = checks(&svc.config) != checks(&config);
        svc.config = config;
        if checks_changed {
            self.restart_checks(si);
        }
        for spec in &change.backends_added {
            let BackendTarget::Addr(addr) = spec.target else {
                continue;
            };
            let backend = self.static_backend(&name, spec, addr, &spec.label);
            self.services[si].statics.push(backend);
            self.check_static(si, self.services[si].statics.len() - 1);
        }
        self.serve(si, listeners);
        let (from, to) = change.count;
        self.scale_down(si, to);
        self.add_slots(si);
        for slot in from..to {
            self.start_or_backoff(si, slot);
        }
        info!(service = %name, workers = ?change.count, settings_changed = change.roll, "service changed");
    }

    /// Drains and stops the slots from `count` up, highest first.
    fn scale_down(&mut self, si: usize, count: usize) {
        let name = self.services[si].config.name.clone();
        while self.services[si].slots.len() > count {
            let slot = self.services[si].slots.len() - 1;
            let s = self.services[si].slots.pop().expect("len > count >= 0");
            self.metrics
                .worker_restarts_total
                .with_label_values(&[&name, &slot.to_string(), "scale"])
                .inc();
            if let Some(worker) = s.worker {
                self.retire(worker, "scale");
            }
            self.metrics.forget_backend(&name, &slot.to_string());
        }
        let effects = self.rollout.drop_step(&name, count);
        self.carry_out(effects);
    }

    /// Starts accepting on a service's newly bound listeners.
    pub(super) fn serve(&mut self, si: usize, listeners: Bound) {
        let svc = &mut self.services[si];
        for (addr, listener) in listeners {
            // The bound address: with port 0, the port the kernel chose.
            let addr = svc.listeners.serve(&self.proxy, addr, listener);
            info!(service = %svc.config.name, %addr, "listening");
        }
    }

    /// Binds every address the reload adds, or none. An address that a removed service
    /// or listen entry gives up is taken over on its open socket, so renaming a service
    /// or moving an address between services refuses no client.
    fn bind_new(&self, diff: &config::Diff) -> Result<HashMap<String, Bound>, String> {
        let wanted = diff
            .added
            .iter()
            .map(|s| (&s.name, &s.listen))
            .chain(diff.changed.iter().map(|(s, c)| (&s.name, &c.listen_added)));
        let mut bound = HashMap::new();
        for (name, addrs) in wanted {
            let mut listeners = Vec::new();
            for &addr in addrs {
                let listener = match self.released(diff, addr) {
                    Some(listener) => listener,
                    None => Listening::open(addr, self.proxy.threads())
                        .map_err(|err| self.bind_error(name, addr, &err))?,
                };
                listeners.push((addr, listener));
            }
            bound.insert(name.clone(), listeners);
        }
        Ok(bound)
    }

    /// The open socket on `addr`, if this reload takes it from the service holding it.
    fn released(&self, diff: &config::Diff, addr: SocketAddr) -> Option<Listening> {
        let gives_up = |name: &str| {
            diff.removed.iter().any(|removed| removed == name)
                || diff
                    .changed
                    .iter()
                    .any(|(svc, change)| svc.name == name && change.listen_removed.contains(&addr))
        };
        self.services
            .iter()
            .filter(|svc| gives_up(&svc.config.name))
            .find_map(|svc| svc.listeners.share(&addr))
    }

    fn bind_error(&self, service: &str, addr: SocketAddr, err: &std::io::Error) -> String {
        let held = self.services.iter().find_map(|svc| {
            let other = svc
                .listeners
                .addrs()
                .find(|other| addresses_clash(addr, **other))?;
            Some((svc.config.name.as_str(), *other))
        });
        match held {
            Some((owner, other)) => format!(
                "service {service}: could not listen on {addr}: it overlaps {other}, where lb listens for service {owner}; free that address in one reload and take this one in the next, or restart lb"
            ),
            None => format!("service {service}: could not listen on {addr}: {err}"),
        }
    }
}

/// What a reload changed, a line per service: `added: api`, `removed: old`,
/// `changed: web (listen, workers.count 2 -> 4)`.
fn summary(diff: &config::Diff) -> String {
    let mut out = String::new();
    for svc in &diff.added {
        let _ = writeln!(out, "  added: {}", svc.name);
    }
    for name in &diff.removed {
        let _ = writeln!(out, "  removed: {name}");
    }
    for (svc, change) in &diff.changed {
        let keys: Vec<String> = change
            .keys
            .iter()
            .map(|&key| match (key, change.count) {
                ("workers.count", (before, after)) => format!("{key} {before} -> {after}"),
                _ => key.to_owned(),
            })
            .collect();
        let _ = writeln!(out, "  changed: {} ({})", svc.name, keys.join(", "));
    }
    out
}
