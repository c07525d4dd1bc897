//! The JSON of `GET /status`, shared by the admin server and the `lb status` client.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub services: Vec<ServiceStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub listen: Vec<String>,
    pub balance: String,
    /// Every worker process and idle slot; during a rollout a slot appears twice (the
    /// replacement starting, the old worker draining).
    pub workers: Vec<WorkerStatus>,
    pub backends: Vec<BackendStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// The slot, `LB_WORKER_ID`.
    pub id: usize,
    /// None while the slot has no process (`backoff`, `stopped`).
    pub pid: Option<i32>,
    pub port: Option<u16>,
    /// `starting`, `ready`, `draining`, `stopped` or `backoff`.
    pub state: String,
    /// `up` or `down` by its health checks, `unchecked` without `health_check`.
    pub health: String,
    pub uptime_seconds: Option<f64>,
    /// Resident memory of its whole process group; None without a process.
    pub memory_bytes: Option<u64>,
    /// CPU time its process group has used.
    pub cpu_seconds: Option<f64>,
    /// CPU use over the last second, in percent of one CPU (as `pm2 ls` shows it).
    pub cpu_percent: Option<f64>,
    pub restarts: u32,
    pub active_connections: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    /// Its label: the address as configured, or `ip:port` for one of a host name's
    /// addresses.
    pub address: String,
    /// The `backends` entry (`host:port` as written) whose name resolved to `address`;
    /// absent for an address written as one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub weight: u32,
    /// `ready`, or `down` after a failed connect or failed checks until it is back.
    pub state: String,
    /// `up` or `down` by its health checks, `unchecked` without `health_check`.
    pub health: String,
    pub active_connections: usize,
}

impl Status {
    /// The aligned table `lb status` prints.
    pub fn table(&self) -> String {
        let mut rows = vec![
            [
                "SERVICE",
                "WORKER",
                "PID",
                "PORT",
                "STATE",
                "HEALTH",
                "CPU",
                "MEMORY",
                "UPTIME",
                "RESTARTS",
                "CONNECTIONS",
            ]
            .map(String::from),
        ];
        for svc in &self.services {
            for w in &svc.workers {
                rows.push([
                    svc.name.clone(),
                    w.id.to_string(),
                    w.pid.map_or("-".into(), |p| p.to_string()),
                    w.port.map_or("-".into(), |p| p.to_string()),
                    w.state.clone(),
                    w.health.clone(),
                    w.cpu_percent.map_or("-".into(), |p| format!("{p:.0}%")),
                    w.memory_bytes.map_or("-".into(), memory),
                    w.uptime_seconds.map_or("-".into(), uptime),
                    w.restarts.to_string(),
                    w.active_connections.to_string(),
                ]);
            }
            for b in &svc.backends {
                rows.push([
                    svc.name.clone(),
                    b.address.clone(),
                    "-".into(),
                    "-".into(),
                    b.state.clone(),
                    b.health.clone(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    b.active_connections.to_string(),
                ]);
            }
        }
        let widths: Vec<usize> = (0..rows[0].len())
            .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for row in rows {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            let _ = writeln!(out, "{}", cells.join("  ").trim_end());
        }
        out
    }
}

/// `48.2 MiB`, `1.1 GiB`: as `pm2 ls` shows memory.
fn memory(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `3h 2m`, `4m 10s`, `12s`: coarse, as people read uptimes.
fn uptime(seconds: f64) -> String {
    let s = seconds as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let status = Status {
            services: vec![ServiceStatus {
                name: "web".into(),
                listen: vec!["127.0.0.1:8080".into()],
                balance: "round-robin".into(),
                workers: vec![WorkerStatus {
                    id: 0,
                    pid: Some(4242),
                    port: Some(40000),
                    state: "ready".into(),
                    health: "unchecked".into(),
                    uptime_seconds: Some(125.0),
                    memory_bytes: Some(50_541_773),
                    cpu_seconds: Some(1.5),
                    cpu_percent: Some(2.6),
                    restarts: 1,
                    active_connections: 3,
                }],
                backends: vec![],
            }],
        };
        let table = status.table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "SERVICE  WORKER  PID   PORT   STATE  HEALTH     CPU  MEMORY    UPTIME  RESTARTS  CONNECTIONS"
        );
        assert_eq!(
            lines[1],
            "web      0       4242  40000  ready  unchecked  3%   48.2 MiB  2m 5s   1         3"
        );
    }
}
