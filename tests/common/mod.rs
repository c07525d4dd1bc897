//! The integration-test harness: starts the real `lb` binary on a config written to a
//! temp dir, reads its log, and cleans up every process it started.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod config;
pub mod held;
pub mod load;
pub mod observe;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// Long enough for a loaded 2-core CI machine; a passing test never waits this long.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub const LB: &str = env!("CARGO_BIN_EXE_lb");

/// `lb check CONFIG`: its exit status and what it printed.
pub fn lb_check(config: &std::path::Path) -> std::process::Output {
    Command::new(LB)
        .arg("check")
        .arg(config)
        .output()
        .expect("run lb check")
}
pub const WORKER: &str = env!("CARGO_BIN_EXE_lb-test-worker");

/// Polls `done` every 20 ms until it holds; panics naming `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A port that was free a moment ago, for configs that must name their listen port.
///
/// Taken from below the kernel's ephemeral range: a port from `bind(:0)` can be handed
/// to a client socket's `connect` (or to lb's workers) before lb binds it, which made
/// tests fail with "address in use" under parallel load. Below the range only other
/// `free_port` calls compete: a counter keeps this process's apart, and the start
/// point, taken from the pid, keeps test processes apart.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FIRST: u32 = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral.saturating_sub(FIRST);
    if span < 1_000 {
        return TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("bind :0");
    }
    let start = std::process::id().wrapping_mul(7_919) % span;
    (0..span)
        .map(|_| (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span)
        .filter_map(|offset| u16::try_from(FIRST + offset).ok())
        .find(|port| TcpListener::bind(("127.0.0.1", *port)).is_ok())
        .expect("a free port below the ephemeral range")
}

/// A static backend on 127.0.0.1 that runs `serve` on each connection, on a thread of
/// its own; it lives as long as the test process.
pub fn backend(serve: impl Fn(TcpStream) + Send + Sync + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a backend");
    let addr = listener.local_addr().expect("backend address");
    let serve = std::sync::Arc::new(serve);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let serve = std::sync::Arc::clone(&serve);
            std::thread::spawn(move || serve(stream));
        }
    });
    addr
}

/// The value of `key=value` in a log line, without quotes.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    let end = rest.find(' ').unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"'))
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Where lb's stdout goes.
#[derive(Clone, Copy)]
enum Output {
    /// With stderr, into the log file.
    Log,
    /// Into a pipe that nobody reads.
    StdoutStalled,
}

/// A running lb and the temp dir holding its config and log.
pub struct Lb {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub log: PathBuf,
    pub listen: SocketAddr,
    /// The admin API, on a free port unless the config names its own.
    pub admin: Option<SocketAddr>,
}

impl Lb {
    /// Writes `config` to `lb.yaml` in a temp dir and starts lb on it. In `config`,
    /// `{listen}` becomes a free 127.0.0.1 address and `{worker}` the test worker binary.
    pub fn start(config: &str) -> Lb {
        Lb::start_with(config, &[])
    }

    /// As [`Lb::start`], with more environment variables for lb.
    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Lb {
        Lb::start_full(config, &[], &[], env, Output::Log)
    }

    /// As [`Lb::start`], with lb run by `wrapper` (`wrapper… lb --config FILE`) and more
    /// environment variables; `{listen}` and `{admin}` in `wrapper` become the addresses
    /// the config's placeholders get.
    pub fn start_under(config: &str, wrapper: &[&str], env: &[(&str, &str)]) -> Lb {
        Lb::start_full(config, wrapper, &[], env, Output::Log)
    }

    /// As [`Lb::start`], with more command-line arguments for lb.
    pub fn start_with(config: &str, args: &[&str]) -> Lb {
        Lb::start_full(config, &[], args, &[], Output::Log)
    }

    /// As [`Lb::start`], with lb's stdout a pipe that nobody reads (a stalled pager or
    /// log shipper); its stderr is the log as usual.
    pub fn start_with_stdout_stalled(config: &str) -> Lb {
        Lb::start_full(config, &[], &[], &[], Output::StdoutStalled)
    }

    fn start_full(
        config: &str,
        wrapper: &[&str],
        args: &[&str],
        env: &[(&str, &str)],
        output: Output,
    ) -> Lb {
        let dir = tempfile::tempdir().expect("temp dir");
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let path = dir.path().join("lb.yaml");
        std::fs::write(&path, expand(config, listen, admin)).expect("write config");
        let wrapper: Vec<String> = wrapper
            .iter()
            .map(|arg| {
                arg.replace("{listen}", &listen.to_string())
                    .replace("{admin}", &admin.to_string())
            })
            .chain([LB.to_owned()])
            .collect();
        let mut command = Command::new(&wrapper[0]);
        command
            .args(&wrapper[1..])
            .args(args)
            .arg("--config")
            .arg(&path)
            .envs(env.iter().copied());
        let mut lb = Lb::spawn_with(dir, listen, &mut command, output);
        lb.admin = (!config.contains("admin:")).then_some(admin);
        lb
    }

    /// Starts lb on a config already written inside `dir`.
    pub fn start_at(dir: tempfile::TempDir, config: &Path, listen: SocketAddr) -> Lb {
        Lb::spawn(dir, listen, Command::new(LB).arg("--config").arg(config))
    }

    /// Starts `command` (lb itself, or a wrapper such as `unshare` around it).
    pub fn spawn(dir: tempfile::TempDir, listen: SocketAddr, command: &mut Command) -> Lb {
        Lb::spawn_with(dir, listen, command, Output::Log)
    }

    fn spawn_with(
        dir: tempfile::TempDir,
        listen: SocketAddr,
        command: &mut Command,
        output: Output,
    ) -> Lb {
        let log = dir.path().join("lb.log");
        let err = File::create(&log).expect("create log");
        let out = match output {
            Output::Log => Stdio::from(err.try_clone().expect("clone log handle")),
            // The child keeps the read end unread for as long as it lives.
            Output::StdoutStalled => Stdio::piped(),
        };
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start lb");
        Lb {
            child: Some(child),
            dir,
            log,
            listen,
            admin: None,
        }
    }

    /// The numbers of the file descriptors lb has open.
    pub fn open_fds(&self) -> Vec<u32> {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{}/fd", self.pid())) else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect()
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("lb running").id() as i32)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Log lines containing `needle`.
    pub fn lines(&self, needle: &str) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }

    /// Waits until `n` workers in all have logged ready.
    pub fn wait_ready(&self, n: usize) {
        wait_until(
            &format!("{n} workers ready\n{}", self.log()),
            DEADLINE,
            || self.lines("worker ready").len() >= n,
        );
    }

    /// Waits until the log has a line containing `needle`.
    pub fn wait_log(&self, needle: &str) {
        wait_until(&format!("log line {needle:?}"), DEADLINE, || {
            !self.lines(needle).is_empty()
        });
    }

    /// `(slot, pid)` of every worker process lb has started, oldest first.
    pub fn started_workers(&self) -> Vec<(usize, i32)> {
        self.lines("worker started")
            .iter()
            .filter_map(|l| {
                Some((
                    field(l, "worker")?.parse().ok()?,
                    field(l, "pid")?.parse().ok()?,
                ))
            })
            .collect()
    }

    /// Rewrites the config file lb was started with (`{listen}` and `{worker}` as in
    /// [`Lb::start`]), for a reload.
    pub fn rewrite_config(&self, config: &str) {
        let admin = self.admin.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)));
        std::fs::write(
            self.dir.path().join("lb.yaml"),
            expand(config, self.listen, admin),
        )
        .expect("rewrite config");
    }

    /// Runs an lb client command (`status`, `broadcast`, ...) against this lb.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let admin = self
            .admin
            .expect("lb started with an admin API")
            .to_string();
        Command::new(LB)
            .args(["--admin", &admin])
            .args(args)
            .output()
            .expect("run lb client")
    }

    /// One admin API request; returns the status code and body.
    pub fn admin(&self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        http(
            self.admin.expect("lb started with an admin API"),
            method,
            path,
            body,
        )
    }

    /// Pids of the workers in rotation now, slot by slot: the newest ready process of
    /// each slot (from the `worker ready` and `replacement ready` log lines).
    pub fn ready_pids(&self) -> std::collections::BTreeMap<usize, i32> {
        self.log()
            .lines()
            .filter(|l| l.contains("worker ready") || l.contains("replacement ready"))
            .filter_map(|l| {
                Some((
                    field(l, "worker")?.parse().ok()?,
                    field(l, "pid")?.parse().ok()?,
                ))
            })
            .collect()
    }

    /// The pid of the newest process in `slot`.
    pub fn worker_pid(&self, slot: usize) -> i32 {
        self.started_workers()
            .into_iter()
            .rev()
            .find(|(s, _)| *s == slot)
            .expect("slot started")
            .1
    }

    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("signal lb");
    }

    /// Waits for lb to exit and returns its status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let child = self.child.as_mut().expect("lb running");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().expect("try_wait lb") {
                return status;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "lb did not exit\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `{listen}` and `{worker}` filled in, and an admin API on `admin` unless the config
/// has its own `admin:` section.
fn expand(config: &str, listen: SocketAddr, admin: SocketAddr) -> String {
    let text = config
        .replace("{listen}", &listen.to_string())
        .replace("{worker}", WORKER);
    if config.contains("admin:") {
        text
    } else {
        format!("admin:\n  listen: {admin}\n{text}")
    }
}

/// A minimal HTTP/1.1 request, so tests see exactly what lb answers on the wire; returns
/// the status code and the body.
pub fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: lb\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let (code, response) = http_exchange(addr, &head, body);
    (code, response_body(&response).to_owned())
}

/// Sends `head` and `body` on a fresh connection and reads until the server closes;
/// returns the status code (0 if none came) and the whole response.
pub fn http_exchange(addr: SocketAddr, head: &str, body: &[u8]) -> (u16, String) {
    let mut stream = connect(addr);
    stream
        .write_all(head.as_bytes())
        .expect("send request head");
    // lb may answer (413) before reading all of a large body; that is fine.
    let _ = stream.write_all(body);
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let code = response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, response)
}

/// What follows the head of an HTTP response.
pub fn response_body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

impl Drop for Lb {
    /// Kills lb and every worker it started, even when the test failed half way, and
    /// then shows the end of lb's log if it did.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            // The test's own message says what went wrong; lb's log says why.
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- last lines of lb's log ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        for (_, pid) in self.started_workers() {
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// A client connection with timeouts, so a broken proxy fails a test instead of hanging it.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect to lb");
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(Duration::from_secs(15)))
        .expect("write timeout");
    stream
}

/// Connects and returns the first line a `HELLO=1` worker sends.
pub fn hello(addr: SocketAddr) -> std::io::Result<String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    stream.set_read_timeout(Some(Duration::from_secs(15)))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before hello",
        ));
    }
    Ok(line.trim_end().to_owned())
}

/// Sends `data` and reads back everything until the other side closes.
pub fn echo(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut stream = connect(addr);
    let mut writer = stream.try_clone().expect("clone stream");
    let data = data.to_vec();
    let sender = std::thread::spawn(move || {
        writer.write_all(&data).expect("send");
        writer
            .shutdown(std::net::Shutdown::Write)
            .expect("half-close");
    });
    let mut received = Vec::new();
    stream.read_to_end(&mut received).expect("receive");
    sender.join().expect("sender thread");
    received
}
