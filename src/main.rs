//! The `lb` binary: parse the command line, then run, check a config, or talk to a
//! running lb.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser as _;
use hyper::{Method, StatusCode};
use lb::admin::{client, status::Status};
use lb::cli::{Cli, Command};
use lb::{config, logging, output};

/// How long `lb status`, `lb reload` and `lb broadcast` wait for an answer.
const ANSWER: Option<Duration> = Some(Duration::from_secs(15));

/// How long `lb health` waits: lb answers /healthz within a second, and a probe that
/// hangs longer than the orchestrator's own timeout tells it nothing.
const HEALTH_ANSWER: Option<Duration> = Some(Duration::from_secs(3));

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::Check { file }) => check(file.as_deref().unwrap_or(&cli.config)),
        Some(Command::Status { json }) => client_command(
            &cli,
            Method::GET,
            "/status",
            String::new(),
            ANSWER,
            |body| {
                if *json {
                    return Ok(body.to_owned());
                }
                let status: Status = serde_json::from_str(body)
                    .map_err(|err| format!("unexpected answer: {err}"))?;
                Ok(status.table())
            },
        ),
        Some(Command::Reload) => client_command(
            &cli,
            Method::POST,
            "/reload",
            String::new(),
            ANSWER,
            |body| Ok(body.to_owned()),
        ),
        Some(Command::Restart { service, worker }) => {
            let path = restart_path(service.as_deref(), *worker);
            // Waits as long as the rollout takes.
            client_command(&cli, Method::POST, &path, String::new(), None, |body| {
                Ok(body.to_owned())
            })
        }
        Some(Command::Broadcast { message, service }) => {
            let path = service.as_ref().map_or("/broadcast".to_owned(), |s| {
                format!("/broadcast?service={s}")
            });
            client_command(&cli, Method::POST, &path, message.clone(), ANSWER, |body| {
                let answer: serde_json::Value = serde_json::from_str(body)
                    .map_err(|err| format!("unexpected answer: {err}"))?;
                Ok(format!("delivered to {} workers\n", answer["delivered"]))
            })
        }
        Some(Command::Health) => client_command(
            &cli,
            Method::GET,
            "/healthz",
            String::new(),
            HEALTH_ANSWER,
            |body| Ok(format!("{}\n", body.trim_end())),
        ),
        Some(Command::Watchdog) => match lb::supervisor::serve_watchdog() {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        },
        Some(Command::Run {
            name,
            listen,
            count,
            ready,
            command,
        }) => {
            let Ok(cwd) = std::env::current_dir() else {
                eprintln!("lb: the current directory is unreadable");
                return ExitCode::FAILURE;
            };
            let flags = config::RunFlags {
                name,
                listen: *listen,
                count,
                ready,
                admin: cli.admin,
                command,
            };
            run(&cli, &config::Source::command_line(&flags, &cwd))
        }
        None => run(&cli, &config::Source::File(cli.config.clone())),
    }
}

/// `POST /restart`'s target: every service, one service, or one worker of one service
/// (clap makes `--worker` require `--service`, and checks the name needs no escaping).
fn restart_path(service: Option<&str>, worker: Option<usize>) -> String {
    match (service, worker) {
        (Some(s), Some(w)) => format!("/restart?service={s}&worker={w}"),
        (Some(s), None) => format!("/restart?service={s}"),
        (None, _) => "/restart".to_owned(),
    }
}

fn check(path: &Path) -> ExitCode {
    match config::load(path) {
        Ok(config) => {
            println!("{}: ok", path.display());
            print!("{}", config.summary());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprintln!("{errors}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli, source: &config::Source) -> ExitCode {
    let code = run_until_stopped(cli, source);
    output::flush(Duration::from_secs(2));
    code
}

fn run_until_stopped(cli: &Cli, source: &config::Source) -> ExitCode {
    output::start();
    logging::init(cli.log_format);
    lb::systemd::activation::adopt();
    let config = match source.load() {
        Ok(config) => config,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    // The supervisor and the admin API; connections run on threads of their own
    // (`threads`), so one worker thread here is plenty.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("lb: could not start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(lb::run(source.clone(), config));
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // After the log lines that led up to it.
            output::flush(Duration::from_secs(2));
            eprintln!("lb: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// What a client command says when lb answers 401 and no token was sent.
const NEEDS_TOKEN: &str = "the admin API needs a token: set LB_ADMIN_TOKEN or admin.token_file";

/// Where the client commands find lb: `--admin`, else the config file's `admin.listen`,
/// else the default address; and the token they send: `LB_ADMIN_TOKEN`, else the config
/// file's `admin.token_file`.
fn admin_target(cli: &Cli) -> Result<(SocketAddr, Option<PathBuf>), String> {
    let settings = match config::admin_client(&cli.config) {
        Ok(settings) => settings,
        Err(_) if cli.admin.is_some() => config::AdminClient {
            listen: cli.admin,
            token_file: None,
        },
        // A running lb still answers, and for `lb reload` it reports the same error
        // itself; the default address is the best guess at where it listens.
        Err(err) => {
            let addr = config::DEFAULT_ADMIN;
            eprintln!("lb: {err}; asking the default admin address {addr} (or pass --admin ADDR)");
            return Ok((addr, None));
        }
    };
    match cli.admin.or(settings.listen) {
        Some(addr) => Ok((addr, settings.token_file)),
        None => Err(format!(
            "{}: admin.listen is null, so lb has no admin API to ask",
            cli.config.display()
        )),
    }
}

/// One request to a running lb; prints the answer (through `show`) on success, or one
/// line on stderr and exit 1. The token goes with every request; only a POST fails
/// when it cannot be had, since GET requests are open.
fn client_command(
    cli: &Cli,
    method: Method,
    path: &str,
    body: String,
    limit: Option<Duration>,
    show: impl Fn(&str) -> Result<String, String>,
) -> ExitCode {
    let fail = |msg: &str| {
        eprintln!("lb: {}", msg.trim_end());
        ExitCode::FAILURE
    };
    let (addr, token_file) = match admin_target(cli) {
        Ok(target) => target,
        Err(msg) => return fail(&msg),
    };
    let token = client::token(std::env::var_os("LB_ADMIN_TOKEN"), token_file);
    let secret = match &token {
        Some((_, Ok(secret))) => Some(secret),
        Some((source, Err(msg))) if method == Method::POST => {
            return fail(&format!("{source} {msg}"));
        }
        _ => None,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => return fail(&format!("could not start the async runtime: {err}")),
    };
    match runtime.block_on(client::call(addr, method, path, body, secret, limit)) {
        Ok((code, body)) if code.is_success() => match show(&body) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(msg) => fail(&msg),
        },
        Ok((StatusCode::UNAUTHORIZED, _)) => match (&token, secret) {
            (Some((source, _)), Some(_)) => {
                fail(&format!("the admin API refused the token from {source}"))
            }
            _ => fail(NEEDS_TOKEN),
        },
        Ok((code, body)) => fail(&format!("{code}: {body}")),
        Err(err) => fail(&format!("{err:#}")),
    }
}

#[cfg(test)]
mod tests {
    use super::restart_path;

    #[test]
    fn restart_asks_for_everything_a_service_or_one_worker() {
        assert_eq!(restart_path(None, None), "/restart");
        assert_eq!(restart_path(Some("web"), None), "/restart?service=web");
        assert_eq!(
            restart_path(Some("web"), Some(2)),
            "/restart?service=web&worker=2"
        );
    }
}
