//! Backends found by DNS: every address a host name in `backends` resolves to is a
//! static backend of its own, labelled `ip:port`, with the entry's weight. Answers
//! arrive from the lookup task ([`resolve`](super::resolve)) as events; an address that
//! joins the answer joins rotation (with health checks, if the service has them), one
//! that leaves it leaves rotation as a backend removed by a reload does: its open
//! connections finish, and its metric series go. A failed lookup keeps the name's last
//! good addresses, and is logged once per streak of failures.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Supervisor;
use super::resolve::{self, Answer};
use crate::config::{BackendSpec, BackendTarget};

/// The host names among a service's backends.
#[derive(Debug, Default)]
pub(super) struct Names {
    /// Stops the lookups of the current `generation`.
    lookups: Option<CancellationToken>,
    /// Tells answers of lookups started before the last (re)start apart.
    generation: u64,
    /// By entry label (`host:port` as written).
    answers: BTreeMap<String, NameState>,
}

#[derive(Debug, Default)]
struct NameState {
    /// The last good answer; empty until there is one.
    addrs: Vec<SocketAddr>,
    /// Lookups are failing: the failure has been logged, the recovery will be.
    failing: bool,
}

impl Names {
    /// Stops looking names up.
    pub(super) fn stop(&mut self) {
        if let Some(lookups) = self.lookups.take() {
            lookups.cancel();
        }
    }
}

impl Supervisor {
    /// Looks up the host names among a service's backends now and then every
    /// `resolve_every`, stopping the lookups it ran before: at start and on every
    /// reload. Names still configured keep their addresses until the new answers come.
    pub(super) fn start_resolving(&mut self, si: usize) {
        let generation = self.new_id();
        let svc = &mut self.services[si];
        svc.names.stop();
        svc.names.generation = generation;
        let names: Vec<resolve::Name> = svc
            .config
            .backends
            .iter()
            .filter_map(|spec| match &spec.target {
                BackendTarget::Name { host, port } => Some(resolve::Name {
                    label: spec.label.clone(),
                    host: host.clone(),
                    port: *port,
                }),
                BackendTarget::Addr(_) => None,
            })
            .collect();
        svc.names
            .answers
            .retain(|label, _| names.iter().any(|n| n.label == *label));
        for name in &names {
            svc.names.answers.entry(name.label.clone()).or_default();
        }
        if !names.is_empty() {
            let cancel = CancellationToken::new();
            resolve::start(
                svc.config.name.clone(),
                generation,
                names,
                Arc::clone(&self.resolvers),
                svc.config.resolve_every,
                cancel.clone(),
                self.tx.clone(),
            );
            svc.names.lookups = Some(cancel);
        }
        self.sync_resolved(si);
    }

    /// A lookup of the name of entry `label` in `service`'s backends ended.
    pub(super) fn resolved(&mut self, service: &str, generation: u64, label: &str, answer: Answer) {
        let Some(si) = self.service_index(service) else {
            return;
        };
        let svc = &mut self.services[si];
        if svc.names.generation != generation {
            return;
        }
        let Some(state) = svc.names.answers.get_mut(label) else {
            return;
        };
        match answer {
            Ok(addrs) => {
                if state.failing {
                    info!(%service, backend = %label, "host name resolves again");
                    state.failing = false;
                }
                if addrs == state.addrs {
                    return;
                }
                let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                info!(%service, backend = %label, addresses = %list.join(" "), "host name resolved");
                state.addrs = addrs;
                self.sync_resolved(si);
            }
            Err(err) => {
                if !state.failing {
                    state.failing = true;
                    let kept = state.addrs.len();
                    warn!(%service, backend = %label, %err, kept, "host name lookup failed; keeping its last addresses until a lookup succeeds");
                }
            }
        }
    }

    /// Makes a service's resolved backends match its names' last answers: new addresses
    /// join, vanished ones leave. An address given by two entries, or written as an
    /// address too, is one backend: the first entry's.
    fn sync_resolved(&mut self, si: usize) {
        let svc = &self.services[si];
        let mut wanted: Vec<(SocketAddr, BackendSpec)> = Vec::new();
        for spec in svc
            .config
            .backends
            .iter()
            .filter(|b| b.host_name().is_some())
        {
            let Some(state) = svc.names.answers.get(&spec.label) else {
                continue;
            };
            for &addr in &state.addrs {
                let taken = wanted.iter().any(|(a, _)| *a == addr)
                    || svc
                        .statics
                        .iter()
                        .any(|s| !s.resolved() && s.backend.addr == addr);
                if !taken {
                    wanted.push((addr, spec.clone()));
                }
            }
        }
        let is_wanted = |addr: SocketAddr, from: &BackendSpec| {
            wanted.iter().any(|(a, spec)| *a == addr && spec == from)
        };
        let (keep, gone): (Vec<_>, Vec<_>) = std::mem::take(&mut self.services[si].statics)
            .into_iter()
            .partition(|s| !s.resolved() || is_wanted(s.backend.addr, &s.from));
        let added: Vec<(SocketAddr, BackendSpec)> = wanted
            .into_iter()
            .filter(|(addr, spec)| {
                !keep
                    .iter()
                    .any(|s| s.resolved() && s.backend.addr == *addr && s.from == *spec)
            })
            .collect();
        let name = self.services[si].config.name.clone();
        self.services[si].statics = keep;
        // Its connections are not closed: they finish, as a removed backend's do. Its
        // series go first, so an address that comes back starts new ones.
        for s in gone {
            s.probe.cancel();
            self.metrics.forget_backend(&name, &s.backend.label);
            info!(service = %name, backend = %s.backend.label, name = %s.from.label, active = s.backend.stats.active(), "address left its host name's answer; out of rotation, its connections finish");
        }
        for (addr, spec) in added {
            let label = addr.to_string();
            let backend = self.static_backend(&name, &spec, addr, &label);
            self.services[si].statics.push(backend);
            self.check_static(si, self.services[si].statics.len() - 1);
            info!(service = %name, backend = %label, name = %spec.label, "address of a host name in rotation");
        }
    }
}
