//! The command line (contract §1).

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
    /// Internal: the helper lb starts to kill its workers if lb itself is killed.
    #[command(hide = true)]
    Watchdog,
}
