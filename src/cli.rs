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
    /// config file's admin.listen, else 127.0.0.1:9900); with `lb run`, where it listens.
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
    /// Ask a running lb to replace its workers one at a time (as SIGUSR2), or one worker;
    /// waits until the rollout ends and fails if it halted.
    Restart {
        /// Only this service's workers.
        #[arg(long, value_parser = service_name)]
        service: Option<String>,
        /// Only this worker (its slot id, LB_WORKER_ID) of the service.
        #[arg(long, value_name = "ID", requires = "service")]
        worker: Option<usize>,
    },
    /// Send a JSON message to every worker of a running lb (on its channel, fd 3).
    Broadcast {
        /// One JSON value, e.g. '{"usersCount":25}'.
        message: String,
        /// Only this service's workers.
        #[arg(long, value_parser = service_name)]
        service: Option<String>,
    },
    /// Run COMMAND as workers behind one address, with no config file: every other key
    /// at its default (`lb run -- node server.js`).
    Run {
        /// The service's name.
        #[arg(long, default_value = "app", value_parser = service_name)]
        name: String,
        /// Where clients connect.
        #[arg(long, default_value = "0.0.0.0:8080", value_name = "ADDR")]
        listen: SocketAddr,
        /// How many workers: a positive number, or auto for one per available CPU.
        #[arg(long, default_value = "auto", value_parser = worker_count, value_name = "N|auto")]
        count: String,
        /// When a worker is ready: once a connect to its PORT succeeds (tcp), or once it
        /// sends "ready" on its channel (message).
        #[arg(long, default_value = "tcp", value_parser = ["tcp", "message"])]
        ready: String,
        /// The worker's command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Exit 0 when a running lb's GET /healthz answers 200 (every service has a ready
    /// backend), else 1 with one line: a Docker HEALTHCHECK or a Kubernetes exec probe.
    Health,
    /// Internal: the helper lb starts to kill its workers if lb itself is killed.
    #[command(hide = true)]
    Watchdog,
}

/// `--count`: `auto` or a positive number, as `workers.count` takes it.
fn worker_count(count: &str) -> Result<String, String> {
    match count.parse::<usize>() {
        Ok(n) if n > 0 => Ok(count.to_owned()),
        _ if count == "auto" => Ok(count.to_owned()),
        _ => Err("expected a positive number or auto".to_owned()),
    }
}

/// A service name as the config allows it (`[a-z0-9_-]+`), checked before it goes into
/// an admin API query string.
fn service_name(name: &str) -> Result<String, String> {
    let ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if ok {
        Ok(name.to_owned())
    } else {
        Err("expected a service name made of a-z, 0-9, _ and -".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::{Cli, Command};

    fn restart(args: &[&str]) -> Result<(Option<String>, Option<usize>), clap::Error> {
        let cli = Cli::try_parse_from([&["lb", "restart"], args].concat())?;
        match cli.command {
            Some(Command::Restart { service, worker }) => Ok((service, worker)),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn restart_takes_a_service_and_a_worker() {
        assert_eq!(restart(&[]).unwrap(), (None, None));
        assert_eq!(
            restart(&["--service", "web"]).unwrap(),
            (Some("web".to_owned()), None)
        );
        assert_eq!(
            restart(&["--service", "web", "--worker", "2"]).unwrap(),
            (Some("web".to_owned()), Some(2))
        );
    }

    #[test]
    fn restart_worker_needs_its_service() {
        let err = restart(&["--worker", "2"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        assert!(restart(&["--service", "web", "--worker", "-1"]).is_err());
        assert!(restart(&["--service", "web&worker=1"]).is_err());
    }
}
