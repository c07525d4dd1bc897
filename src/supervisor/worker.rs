//! Starting one worker process: its argv and environment (contract §3), its own process
//! group, death with lb, and its output forwarded line by line with a `[service/id]` prefix.

use std::collections::HashSet;
use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::process::{ChildStdout, Command, Stdio};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use super::sys;
use crate::config::{FeedConfig, WorkersConfig};
use crate::logging;
use crate::output::Stream;

/// Where a worker must listen. Every worker binds its own port on loopback.
pub(super) const WORKER_HOST: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// What lb tells a worker about itself.
#[derive(Debug, Clone, Copy)]
pub(super) struct Identity<'a> {
    pub service: &'a str,
    pub slot: usize,
    pub port: u16,
}

impl Identity<'_> {
    /// Replaces `${PORT}`, `${LB_WORKER_ID}` and `${LB_SERVICE}`, so off-the-shelf
    /// servers that take their port as an argument work unchanged.
    fn substitute(&self, text: &str) -> String {
        text.replace("${PORT}", &self.port.to_string())
            .replace("${LB_WORKER_ID}", &self.slot.to_string())
            .replace("${LB_SERVICE}", self.service)
    }
}

/// Starts a worker with its channel at fd 3, and returns its pid, which is also its
/// process group id.
pub(super) fn spawn(
    id: Identity<'_>,
    cfg: &WorkersConfig,
    label: &str,
    channel: &OwnedFd,
) -> io::Result<Pid> {
    let argv: Vec<String> = cfg
        .command
        .argv()
        .iter()
        .map(|a| id.substitute(a))
        .collect();
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).current_dir(&cfg.cwd);
    keep_lbs_own_env(&mut cmd)
        .envs(cfg.env.iter().map(|(k, v)| (k, id.substitute(v))))
        .env("PORT", id.port.to_string())
        .env("HOST", WORKER_HOST.to_string())
        .env("LB_WORKER_ID", id.slot.to_string())
        .env("NODE_APP_INSTANCE", id.slot.to_string())
        .env("LB_SERVICE", id.service)
        .env("LB_CHANNEL_FD", sys::CHANNEL_FD.to_string())
        // Node opens its IPC channel from these before any user code runs.
        .env("NODE_CHANNEL_FD", sys::CHANNEL_FD.to_string())
        .env("NODE_CHANNEL_SERIALIZATION_MODE", "json");
    sys::pass_as_channel(&mut cmd, channel.as_raw_fd());
    let (pid, _) = launch(cmd, &argv[0], label, false)?;
    Ok(pid)
}

/// Starts a service's feed command in the workers' folder and environment; its stdout
/// is returned to be read as JSON values.
pub(super) fn spawn_feed(
    service: &str,
    cfg: &WorkersConfig,
    feed: &FeedConfig,
) -> io::Result<(Pid, ChildStdout)> {
    let argv = feed.command.argv();
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).current_dir(&cfg.cwd);
    keep_lbs_own_env(&mut cmd)
        .envs(&cfg.env)
        .env("LB_SERVICE", service);
    let (pid, stdout) = launch(cmd, &argv[0], &format!("{service}/feed"), true)?;
    Ok((pid, stdout.expect("launch captures stdout when asked")))
}

/// Removes what lb inherited for itself from a child's environment; `env` in the
/// config can still set any of it.
fn keep_lbs_own_env(cmd: &mut Command) -> &mut Command {
    // Inherited from a Node parent, it turns the worker into a cluster worker whose
    // listen() never completes.
    cmd.env_remove("NODE_UNIQUE_ID");
    for name in crate::systemd::PRIVATE_ENV {
        cmd.env_remove(name);
    }
    cmd
}

/// Spawns `cmd` in its own process group, dying with lb, with its stderr (and stdout,
/// unless `capture_stdout`) forwarded to lb's under `label`.
fn launch(
    mut cmd: Command,
    program: &str,
    label: &str,
    capture_stdout: bool,
) -> io::Result<(Pid, Option<ChildStdout>)> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group: a stop or a crash cleans up the process's children with it.
        .process_group(0);
    sys::die_with_lb(&mut cmd);
    let mut child = {
        let _no_reaping = sys::spawn_lock();
        cmd.spawn().map_err(|err| {
            io::Error::new(err.kind(), format!("could not run {program:?}: {err}"))
        })?
    };
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pids fit in i32"));
    let stdout = child.stdout.take();
    if let Some(err) = child.stderr.take() {
        logging::forward_output(label.into(), Stream::Stderr, err.into());
    }
    // The reaper collects the exit status; dropping a std Child neither waits nor kills.
    drop(child);
    match stdout {
        Some(out) if !capture_stdout => {
            logging::forward_output(label.into(), Stream::Stdout, out.into());
            Ok((pid, None))
        }
        stdout => Ok((pid, stdout)),
    }
}

/// Signals the worker's whole process group.
pub(super) fn signal_group(pid: Pid, signal: Signal) {
    // ESRCH: the group is already gone, which is what we wanted.
    let _ = killpg(pid, signal);
}

/// Whether any process of the group still exists.
pub(super) fn group_alive(group: Pid) -> bool {
    killpg(group, None) != Err(nix::errno::Errno::ESRCH)
}

/// A free port on loopback for a new worker, not one a live worker of ours holds.
pub(super) fn free_port(in_use: &HashSet<u16>) -> io::Result<u16> {
    for _ in 0..64 {
        let port = TcpListener::bind((WORKER_HOST, 0))?.local_addr()?.port();
        if !in_use.contains(&port) {
            return Ok(port);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        "no free port on 127.0.0.1",
    ))
}
