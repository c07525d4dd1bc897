//! The command line (contract §1).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::logging::LogFormat;

/// A layer-4 load balancer and worker supervisor: runs your app N times behind one port.
#[derive(Debug, Parser)]
#[command(name = "lb", version, about)]
pub struct Cli {
    /// The config file.
    #[arg(short, long, global = true, default_value = "lb.yaml")]
    pub config: PathBuf,

    /// The admin API of a running lb, for status, reload and restart (default: the
    /// config file's admin.listen, else 127.0.0.1:9900).
    #[arg(long, global = true, value_name = "ADDR")]
    pub admin: Option<SocketAddr>,

    /// How logs are written to stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the config file and print a summary; exit 0 if valid, 1 if not.
    Check {
        /// The config file (instead of --config).
        file: Option<PathBuf>,
    },
    /// Show the services and workers of a running lb.
    Status {
        /// Print the raw JSON of GET /status.
        #[arg(long)]
        json: bool,
    },
    /// Ask a running lb to reload its config (as SIGHUP).
    Reload,
    /// Ask a running lb to replace its workers one at a time (as SIGUSR2); waits until
    /// the rollout ends and fails if it halted.
    Restart {
        /// Only this service's workers.
        #[arg(long)]
        service: Option<String>,
    },
    /// Send a JSON message to every worker of a running lb (on its channel, fd 3).
    Broadcast {
        /// One JSON value, e.g. '{"usersCount":25}'.
        message: String,
        /// Only this service's workers.
        #[arg(long)]
        service: Option<String>,
    },
    /// Internal: the helper lb starts to kill its workers if lb itself is killed.
    #[command(hide = true)]
    Watchdog,
}
