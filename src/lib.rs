//! lb: a layer-4 (TCP) load balancer that also runs the app it balances.
//!
//! # Layout
//!
//! Data flows in this order:
//!
//! - [`config`]: the YAML file, validated into a typed [`config::Config`]
//!   (`file:line:col` errors);
//! - [`supervisor`]: the one task that owns worker processes and backends: spawns,
//!   probes, reaps, restarts and rolls them, follows backends' host names in DNS,
//!   applies reloads, and runs the stop sequence;
//! - [`snapshot`]: the immutable set of ready backends the supervisor publishes after
//!   every change, swapped atomically;
//! - [`balance`]: the strategy each snapshot's pool picks a backend with (round-robin,
//!   least-conn, random-two, source-hash), and the Maglev table source-hash uses;
//! - [`proxy`]: on each connection thread (`threads`), accept loops and connection tasks
//!   that read the snapshot without locks and copy (or splice) bytes to the backend they
//!   pick.
//!
//! Beside them: [`channel`] is the fd-3 message channel to each worker, [`admin`] the
//! HTTP API (status, metrics, reload, restart, broadcast) and its client, [`metrics`] the
//! Prometheus registry, [`signals`] turns Unix signals into
//! supervisor events, [`logging`] sets up logs and forwards worker output, [`cli`] is the
//! command line, and [`systemd`] speaks systemd's readiness and socket-activation
//! protocols.
//!
//! # Theory of operation
//!
//! Only the supervisor changes state. Everything that happens (a child exits, a probe or
//! health check answers, a DNS answer arrives, a connect fails, a timer fires, a command
//! comes from a signal or the admin API with the config file it needs already read) is
//! an event in its inbox, handled one at a time; each handler returns at once and leaves
//! waiting to timers and tasks that send further events. A worker's life and a rollout
//! are state machines whose transitions return effects for the supervisor to carry out.
//! After each event the supervisor builds a new snapshot and
//! stores it; a connection reads whichever snapshot is current when it picks a backend.

pub mod admin;
pub mod balance;
pub mod channel;
pub mod cli;
pub mod config;
pub mod lines;
pub mod logging;
pub mod metrics;
pub mod output;
pub mod proxy;
pub mod signals;
pub mod snapshot;
pub mod supervisor;
pub mod systemd;

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::mpsc;

use config::Config;
use metrics::Metrics;
use proxy::Proxy;
use snapshot::Snapshots;
use supervisor::Supervisor;

/// Runs lb on `config`, loaded from `source`, until it is stopped by a signal; returns
/// an error if it cannot start. The source is read again on reload.
pub async fn run(source: config::Source, config: Config) -> anyhow::Result<()> {
    let mut bound = HashMap::new();
    for svc in &config.services {
        bound.insert(
            svc.name.clone(),
            proxy::bind(&svc.name, &svc.listen, config.threads.get())?,
        );
    }
    let admin_listener = match config.admin {
        Some(addr) => Some(admin::bind(addr).await?),
        None => None,
    };
    let metrics = Metrics::default();
    let snapshots = Arc::new(Snapshots::default());
    let (down_tx, down_rx) = mpsc::unbounded_channel();
    let proxy = Proxy::new(Arc::clone(&snapshots), down_tx, config.threads)
        .context("could not start the connection threads")?;
    let (mut supervisor, inbox) = Supervisor::new(
        source,
        &config,
        Arc::clone(&snapshots),
        proxy,
        down_rx,
        metrics.clone(),
    )
    .context("could not watch child processes")?;
    signals::start(inbox.clone()).context("could not install signal handlers")?;
    supervisor.start(bound)?;
    if let Some(listener) = admin_listener {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "admin API listening");
        }
        admin::serve(
            listener,
            admin::Admin {
                inbox,
                snapshots,
                metrics,
                guard: admin::auth::Guard::new(config.admin_token_file.clone()),
            },
        );
    }
    systemd::activation::warn_unused(&config);
    supervisor.run().await;
    logging::forwarded(std::time::Duration::from_secs(1)).await;
    Ok(())
}
