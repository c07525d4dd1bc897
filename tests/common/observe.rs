//! A running lb's state as its users see it: `/status`, `/metrics` and `/healthz`, and
//! client commands run with a time limit.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{LB, Lb};

impl Lb {
    /// `GET /status` as JSON.
    pub fn status(&self) -> serde_json::Value {
        let (code, body) = self.admin("GET", "/status", b"");
        assert_eq!(code, 200, "GET /status: {body}");
        serde_json::from_str(&body).expect("/status is JSON")
    }

    /// The `workers` entries of `service` in `/status`: one per process, so a slot
    /// appears twice while its old worker drains beside its replacement.
    pub fn status_workers(&self, service: &str) -> Vec<serde_json::Value> {
        let status = self.status();
        let services = status["services"].as_array().expect("services");
        let found = services
            .iter()
            .find(|s| s["name"] == service)
            .unwrap_or_else(|| panic!("no service {service} in /status: {status}"));
        found["workers"].as_array().expect("workers").clone()
    }

    /// Slot → pid of every worker of `service` in `state` (`ready`, `draining`, ...).
    pub fn pids_in_state(&self, service: &str, state: &str) -> Vec<(usize, i32)> {
        self.status_workers(service)
            .iter()
            .filter(|w| w["state"] == state)
            .filter_map(|w| Some((w["id"].as_u64()? as usize, w["pid"].as_i64()? as i32)))
            .collect()
    }

    /// Slot → pid of the ready worker of each slot of `service`.
    pub fn ready_slots(&self, service: &str) -> BTreeMap<usize, i32> {
        self.pids_in_state(service, "ready").into_iter().collect()
    }

    /// Slot → `restarts` of the ready worker of each slot of `service`.
    pub fn restarts(&self, service: &str) -> BTreeMap<usize, u64> {
        self.status_workers(service)
            .iter()
            .filter(|w| w["state"] == "ready")
            .filter_map(|w| Some((w["id"].as_u64()? as usize, w["restarts"].as_u64()?)))
            .collect()
    }

    /// As [`super::wait_until`], and on timeout the panic message shows `/status`.
    pub fn wait_status(&self, what: &str, limit: Duration, mut done: impl FnMut(&Lb) -> bool) {
        let start = Instant::now();
        while !done(self) {
            if start.elapsed() > limit {
                panic!(
                    "timed out after {limit:?} waiting for {what}; /status: {}",
                    self.status()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The sum of every sample of metric `name` whose labels include all of `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let (code, text) = self.admin("GET", "/metrics", b"");
        assert_eq!(code, 200, "GET /metrics: {text}");
        metric_sum(&text, name, labels)
    }

    /// Runs an lb client command against this lb, killing it after `limit`. Returns its
    /// output (`None` if it was killed) and how long it ran.
    pub fn cli_within(&self, args: &[&str], limit: Duration) -> (Option<Output>, Duration) {
        let admin = self
            .admin
            .expect("lb started with an admin API")
            .to_string();
        let started = Instant::now();
        let mut child = Command::new(LB)
            .args(["--admin", &admin])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run lb client");
        loop {
            if child.try_wait().expect("try_wait lb client").is_some() {
                let took = started.elapsed();
                return (Some(child.wait_with_output().expect("client output")), took);
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                return (None, started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The status code of `GET /healthz`, or `None` when nothing answers.
pub fn healthz(admin: SocketAddr) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&admin, Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.split(' ').nth(1)?.parse().ok()
}

/// Sends `data`, half-closes, and reads everything back: the error instead of a panic
/// when the connection is refused or reset.
pub fn try_echo(addr: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(data)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    let mut received = Vec::new();
    stream.read_to_end(&mut received)?;
    Ok(received)
}

/// The sum of every sample of `name` in a metrics exposition whose labels include all
/// of `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            let wanted = metric == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            wanted.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}
