//! How a service picks the backend of each new connection (§7): one small type per
//! `balance` strategy behind the [`Select`] trait, and [`Selector`], the one a pool holds.
//!
//! A selector is built by the supervisor for every snapshot, over that snapshot's ready
//! backends; anything expensive or that must outlive a snapshot (the turn, the Maglev
//! table) lives in the service's [`BalanceState`] and is shared by `Arc`. `pick` runs
//! once per connection: it takes no lock and allocates nothing.

mod least_conn;
mod maglev;
mod random_two;
mod round_robin;
mod source_hash;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

pub use least_conn::LeastConn;
pub use maglev::{Maglev, Member};
pub use random_two::RandomTwo;
pub use round_robin::RoundRobin;
pub use source_hash::SourceHash;

use crate::config::{Balance, ServiceConfig};
use crate::snapshot::{Backend, BackendId};

/// A selection strategy over the ready backends of one snapshot.
pub trait Select: Sized {
    /// Prepares picks over `backends` (the pool's ready backends, in pool order).
    fn build(backends: &[Arc<Backend>], state: &BalanceState) -> Self;

    /// The index in `backends` of the backend for a new connection from `client`; never
    /// one whose id is in `skip` (those this connection already failed to reach).
    fn pick(&self, backends: &[Arc<Backend>], client: IpAddr, skip: &[BackendId]) -> Option<usize>;
}

/// The strategy a service's `balance` names, ready to pick.
#[derive(Debug)]
pub enum Selector {
    RoundRobin(RoundRobin),
    LeastConn(LeastConn),
    RandomTwo(RandomTwo),
    SourceHash(SourceHash),
}

impl Selector {
    pub fn new(balance: Balance, backends: &[Arc<Backend>], state: &BalanceState) -> Self {
        match balance {
            Balance::RoundRobin => Selector::RoundRobin(RoundRobin::build(backends, state)),
            Balance::LeastConn => Selector::LeastConn(LeastConn::build(backends, state)),
            Balance::RandomTwo => Selector::RandomTwo(RandomTwo::build(backends, state)),
            Balance::SourceHash => Selector::SourceHash(SourceHash::build(backends, state)),
        }
    }

    /// See [`Select::pick`].
    pub fn pick(
        &self,
        backends: &[Arc<Backend>],
        client: IpAddr,
        skip: &[BackendId],
    ) -> Option<usize> {
        match self {
            Selector::RoundRobin(s) => s.pick(backends, client, skip),
            Selector::LeastConn(s) => s.pick(backends, client, skip),
            Selector::RandomTwo(s) => s.pick(backends, client, skip),
            Selector::SourceHash(s) => s.pick(backends, client, skip),
        }
    }
}

/// What a service's selection carries from one snapshot to the next. Owned by the
/// supervisor's record of the service; every pool it builds shares these by `Arc`.
#[derive(Debug, Default)]
pub struct BalanceState {
    /// The round-robin turn (least-conn breaks ties with it), so a swap does not
    /// restart the turn.
    cursor: Arc<AtomicUsize>,
    /// Source-hash's table over the configured backends, and the set it was built for.
    maglev: Option<(Configured, Arc<Maglev>)>,
}

/// The configured set a Maglev table is built over: worker slots and static backends.
#[derive(Debug, PartialEq, Eq)]
struct Configured {
    slots: usize,
    /// Label and weight of each static backend, sorted.
    statics: Vec<(String, u32)>,
}

impl Configured {
    /// A worker slot is `service/slot`, as in its backend's label; a static backend is
    /// its label: its address as configured, or for a host name each address it
    /// resolved to, as `ip:port`.
    fn members(&self, service: &str) -> Vec<Member> {
        let slots = (0..self.slots).map(|slot| Member::new(format!("{service}/{slot}"), 1));
        let statics = self
            .statics
            .iter()
            .map(|(label, weight)| Member::new(label.clone(), *weight));
        slots.chain(statics).collect()
    }
}

impl BalanceState {
    /// Brings the state in line with `config` and the service's static backends now
    /// (`statics`: label and weight of each, up or down, host names' addresses
    /// included): for source-hash, a Maglev table over those and the configured worker
    /// slots, rebuilt only when that set changes (the supervisor calls this on every
    /// publish, which happens after every event).
    pub fn configure(&mut self, config: &ServiceConfig, mut statics: Vec<(String, u32)>) {
        if config.balance != Balance::SourceHash {
            self.maglev = None;
            return;
        }
        statics.sort();
        let configured = Configured {
            slots: config.workers.as_ref().map_or(0, |w| w.count.get()),
            statics,
        };
        if self.maglev.as_ref().is_some_and(|(c, _)| *c == configured) {
            return;
        }
        let table = Arc::new(Maglev::new(&configured.members(&config.name)));
        self.maglev = Some((configured, table));
    }

    fn maglev(&self) -> Option<&Arc<Maglev>> {
        self.maglev.as_ref().map(|(_, table)| table)
    }

    /// A state holding `table`, for the strategies' tests.
    #[cfg(test)]
    fn with_table(table: Arc<Maglev>) -> Self {
        let configured = Configured {
            slots: 0,
            statics: Vec::new(),
        };
        BalanceState {
            cursor: Arc::default(),
            maglev: Some((configured, table)),
        }
    }
}

/// A backend's active connections for its weight, read once.
#[derive(Debug, Clone, Copy)]
struct Load {
    active: u64,
    weight: u32,
}

impl Load {
    fn of(backend: &Backend) -> Self {
        Load {
            active: backend.stats.active() as u64,
            weight: backend.weight,
        }
    }

    /// `self.active / self.weight < other.active / other.weight`, without division.
    fn lighter_than(self, other: Load) -> bool {
        u128::from(self.active) * u128::from(other.weight)
            < u128::from(other.active) * u128::from(self.weight)
    }
}

/// The first backend from `start` on (cyclically) that is not in `skip`: the last resort
/// of strategies whose preferred picks were all skipped.
fn first_not_skipped(backends: &[Arc<Backend>], start: usize, skip: &[BackendId]) -> Option<usize> {
    let n = backends.len();
    (0..n)
        .map(|step| (start + step) % n)
        .find(|&i| !skip.contains(&backends[i].id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(balance: &str, count: usize, backends: &[&str]) -> ServiceConfig {
        let backends: String = backends.iter().map(|b| format!("\n      - {b}")).collect();
        let yaml = format!(
            "services:\n  - name: web\n    listen: 127.0.0.1:0\n    balance: {balance}\n    \
             workers:\n      command: [\"true\"]\n      count: {count}\n    backends:{backends}\n"
        );
        let config = crate::config::parse(&yaml, "lb.yaml", std::path::Path::new("/"))
            .expect("a valid config");
        config.services.into_iter().next().expect("one service")
    }

    /// What the supervisor passes for a config's static backends written as addresses.
    fn statics(config: &ServiceConfig) -> Vec<(String, u32)> {
        config
            .backends
            .iter()
            .map(|b| (b.label.clone(), b.weight))
            .collect()
    }

    fn configure(state: &mut BalanceState, config: &ServiceConfig) {
        state.configure(config, statics(config));
    }

    fn table(state: &BalanceState) -> Arc<Maglev> {
        Arc::clone(state.maglev().expect("a table"))
    }

    #[test]
    fn the_table_covers_configured_slots_and_static_backends() {
        let mut state = BalanceState::default();
        configure(
            &mut state,
            &service(
                "source-hash",
                2,
                &["127.0.0.1:9001", "{ address: 127.0.0.1:9002, weight: 2 }"],
            ),
        );
        let table = table(&state);
        let names: Vec<(&str, u32)> = table
            .members()
            .iter()
            .map(|m| (&*m.name, m.weight))
            .collect();
        assert_eq!(
            names,
            vec![
                ("127.0.0.1:9001", 1),
                ("127.0.0.1:9002", 2),
                ("web/0", 1),
                ("web/1", 1)
            ]
        );
    }

    #[test]
    fn each_address_of_a_host_name_is_a_member_of_its_own() {
        let config = service("source-hash", 1, &["api.internal:80"]);
        let mut state = BalanceState::default();
        // What the supervisor passes once the name resolved to three addresses, in any
        // order: the table does not depend on it.
        let addrs = ["10.0.0.3:80", "10.0.0.1:80", "10.0.0.2:80"];
        state.configure(
            &config,
            addrs.iter().map(|a| ((*a).to_owned(), 1)).collect(),
        );
        let first = table(&state);
        let names: Vec<&str> = first.members().iter().map(|m| &*m.name).collect();
        assert_eq!(
            names,
            vec!["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "web/0"]
        );
        let reordered = addrs.iter().rev().map(|a| ((*a).to_owned(), 1)).collect();
        state.configure(&config, reordered);
        assert!(Arc::ptr_eq(&first, &table(&state)));
    }

    #[test]
    fn the_table_is_rebuilt_only_when_the_configured_set_changes() {
        let mut state = BalanceState::default();
        let config = service("source-hash", 3, &["127.0.0.1:9001"]);
        configure(&mut state, &config);
        let first = table(&state);
        configure(&mut state, &config.clone());
        assert!(Arc::ptr_eq(&first, &table(&state)));
        configure(&mut state, &service("source-hash", 4, &["127.0.0.1:9001"]));
        assert!(!Arc::ptr_eq(&first, &table(&state)));
        configure(&mut state, &service("least-conn", 4, &["127.0.0.1:9001"]));
        assert!(state.maglev().is_none());
    }

    #[test]
    fn every_strategy_is_built_from_its_name() {
        let backends = testing::backends(&[1, 1]);
        let client = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
        for balance in ["round-robin", "least-conn", "random-two", "source-hash"] {
            let config = service(balance, 2, &[]);
            let mut state = BalanceState::default();
            configure(&mut state, &config);
            let selector = Selector::new(config.balance, &backends, &state);
            assert_eq!(selector.pick(&backends, client, &[0]), Some(1), "{balance}");
            assert_eq!(selector.pick(&backends, client, &[0, 1]), None, "{balance}");
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Backends for the strategies' unit tests.

    use std::net::SocketAddr;
    use std::sync::Arc;

    use tokio_util::sync::CancellationToken;

    use crate::snapshot::{Backend, BackendStats};

    /// Backends with ids 0, 1, … and the given weights, labelled `web/0`, `web/1`, ….
    pub(crate) fn backends(weights: &[u32]) -> Vec<Arc<Backend>> {
        let labels: Vec<String> = (0..weights.len()).map(|i| format!("web/{i}")).collect();
        labelled(
            &labels
                .iter()
                .map(String::as_str)
                .zip(weights.iter().copied())
                .collect::<Vec<_>>(),
        )
    }

    /// Backends with ids 0, 1, … and the given labels and weights.
    pub(crate) fn labelled(members: &[(&str, u32)]) -> Vec<Arc<Backend>> {
        let metrics = crate::metrics::Metrics::default();
        members
            .iter()
            .enumerate()
            .map(|(i, (label, weight))| {
                Arc::new(Backend {
                    id: i as u64,
                    addr: SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)),
                    label: (*label).into(),
                    weight: *weight,
                    stats: Arc::new(BackendStats::default()),
                    metrics: metrics.backend("test", &i.to_string()),
                    close: CancellationToken::new(),
                })
            })
            .collect()
    }

    /// Marks `n` connections active on `backend` for as long as the guards live.
    pub(crate) fn load(backend: &Arc<Backend>, n: usize) -> Vec<crate::snapshot::ActiveGuard> {
        (0..n).map(|_| backend.track()).collect()
    }
}
