//! The serde mirror of the YAML file: every key of the contract, unknown keys refused,
//! no defaults and no cross-field logic (that is `validate.rs`).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

use super::types::{
    AdminListen, BackendSpec, Balance, ByteSize, CheckCount, CommandSpec, ConnectionLimit,
    DurationStr, Flag, HttpPath, ListenAddrs, PositiveDuration, ProxyProtocol, ReadyCheck,
    Resolver, ScalarText, ServiceName, SignalName, ThreadCount, WorkerCount,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub shutdown_delay: Option<DurationStr>,
    #[serde(default)]
    pub threads: Option<ThreadCount>,
    #[serde(default)]
    pub resolvers: Option<Vec<Resolver>>,
    #[serde(default)]
    pub admin: RawAdmin,
    pub services: Spanned<Vec<RawService>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    #[serde(default = "default_admin_listen")]
    pub listen: Spanned<AdminListen>,
    #[serde(default)]
    pub token_file: Option<Spanned<String>>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            listen: default_admin_listen(),
            token_file: None,
        }
    }
}

/// An absent `admin.listen`: the default address, with no place in the file.
fn default_admin_listen() -> Spanned<AdminListen> {
    Spanned::new(AdminListen::Default, Location::UNKNOWN, Location::UNKNOWN)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawService {
    pub name: Spanned<ServiceName>,
    pub listen: Spanned<ListenAddrs>,
    #[serde(default)]
    pub balance: Option<Balance>,
    #[serde(default)]
    pub max_connections: Option<ConnectionLimit>,
    #[serde(default)]
    pub timeouts: Option<RawTimeouts>,
    #[serde(default)]
    pub workers: Option<RawWorkers>,
    #[serde(default)]
    pub backends: Option<Vec<BackendSpec>>,
    #[serde(default)]
    pub resolve_every: Option<PositiveDuration>,
    #[serde(default)]
    pub health_check: Option<Spanned<RawHealthCheck>>,
    #[serde(default)]
    pub proxy_protocol: Option<ProxyProtocol>,
    #[serde(default)]
    pub log_connections: Option<Flag>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealthCheck {
    #[serde(default)]
    pub interval: Option<PositiveDuration>,
    #[serde(default)]
    pub timeout: Option<PositiveDuration>,
    #[serde(default)]
    pub fall: Option<CheckCount>,
    #[serde(default)]
    pub rise: Option<CheckCount>,
    #[serde(default)]
    pub path: Option<HttpPath>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTimeouts {
    #[serde(default)]
    pub connect: Option<PositiveDuration>,
    #[serde(default)]
    pub idle: Option<PositiveDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWorkers {
    pub command: CommandSpec,
    #[serde(default)]
    pub count: Option<WorkerCount>,
    #[serde(default)]
    pub cwd: Option<Spanned<String>>,
    #[serde(default)]
    pub env: Option<Spanned<BTreeMap<String, ScalarText>>>,
    #[serde(default)]
    pub ready: Option<ReadyCheck>,
    #[serde(default)]
    pub ready_timeout: Option<PositiveDuration>,
    #[serde(default)]
    pub drain_timeout: Option<DurationStr>,
    #[serde(default)]
    pub stop_signal: Option<SignalName>,
    #[serde(default)]
    pub stop_timeout: Option<DurationStr>,
    #[serde(default)]
    pub restart_backoff: Option<Spanned<RawBackoff>>,
    #[serde(default)]
    pub feed: Option<RawFeed>,
    #[serde(default)]
    pub rollout_watch: Option<DurationStr>,
    #[serde(default)]
    pub max_memory: Option<ByteSize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFeed {
    pub command: CommandSpec,
    pub every: PositiveDuration,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackoff {
    #[serde(default)]
    pub initial: Option<PositiveDuration>,
    #[serde(default)]
    pub max: Option<DurationStr>,
}
