//! A small builder for test configs that states only what differs from the defaults:
//!
//! ```ignore
//! let yaml = Config::new()
//!     .shutdown_delay("2s")
//!     .service(Service::workers("web").count(3).set("drain_timeout", "20s").env("HELLO", "1"))
//!     .yaml();
//! let lb = Lb::start(&yaml);
//! ```
//!
//! The YAML keeps the harness's placeholders: the first service listens on `{listen}`
//! unless told otherwise, and workers run `{worker}` (the test worker) unless given a
//! command. Values given to `set` and `option` are YAML as written (`20s`, `1`,
//! `{ initial: 100ms, max: 200ms }`).

use std::fmt::Write as _;
use std::net::SocketAddr;

/// A whole config file.
#[derive(Debug, Clone, Default)]
pub struct Config {
    top: Vec<(String, String)>,
    services: Vec<Service>,
}

impl Config {
    pub fn new() -> Config {
        Config::default()
    }

    /// `shutdown_delay` (§4): how long lb keeps accepting after SIGTERM.
    pub fn shutdown_delay(self, delay: &str) -> Config {
        self.set("shutdown_delay", delay)
    }

    /// Any other top-level key.
    pub fn set(mut self, key: &str, value: &str) -> Config {
        self.top.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn service(mut self, service: Service) -> Config {
        self.services.push(service);
        self
    }

    /// The YAML text, for [`super::Lb::start`] or [`super::Lb::rewrite_config`].
    pub fn yaml(&self) -> String {
        let mut out = String::new();
        for (key, value) in &self.top {
            let _ = writeln!(out, "{key}: {value}");
        }
        out.push_str("services:\n");
        for (i, service) in self.services.iter().enumerate() {
            service.render(&mut out, i == 0);
        }
        out
    }
}

/// One service, with workers or with static backends only.
#[derive(Debug, Clone)]
pub struct Service {
    name: String,
    listen: Option<String>,
    options: Vec<(String, String)>,
    /// The workers' argv as JSON; None for a service of static backends only.
    command: Option<String>,
    workers: Vec<(String, String)>,
    env: Vec<(String, String)>,
}

impl Service {
    /// A service named `name` whose workers run the test worker, one of them unless
    /// [`Service::count`] says otherwise.
    pub fn workers(name: &str) -> Service {
        Service {
            name: name.to_owned(),
            listen: None,
            options: Vec::new(),
            command: Some(r#"["{worker}"]"#.to_owned()),
            workers: vec![("count".to_owned(), "1".to_owned())],
            env: Vec::new(),
        }
    }

    /// A service named `name` with these static backends and no workers.
    pub fn backends(name: &str, addrs: &[SocketAddr]) -> Service {
        let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        Service {
            name: name.to_owned(),
            listen: None,
            options: vec![("backends".to_owned(), format!("[{}]", list.join(", ")))],
            command: None,
            workers: Vec::new(),
            env: Vec::new(),
        }
    }

    /// A service named `name` with these `backends` entries as written (`host:port`
    /// names, addresses, `{ address: ..., weight: N }`) and no workers.
    pub fn backend_entries(name: &str, entries: &[&str]) -> Service {
        Service {
            name: name.to_owned(),
            listen: None,
            options: vec![("backends".to_owned(), format!("[{}]", entries.join(", ")))],
            command: None,
            workers: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Where it listens; the first service defaults to the harness's `{listen}`.
    pub fn listen(mut self, addr: impl ToString) -> Service {
        self.listen = Some(addr.to_string());
        self
    }

    /// A service-level key (`max_connections`, `balance`, ...).
    pub fn option(mut self, key: &str, value: &str) -> Service {
        self.options.push((key.to_owned(), value.to_owned()));
        self
    }

    /// The workers' argv instead of the test worker.
    pub fn command(mut self, argv: &[&str]) -> Service {
        self.command = Some(serde_json::to_string(argv).expect("argv as JSON"));
        self
    }

    pub fn count(self, count: usize) -> Service {
        self.set("count", &count.to_string())
    }

    /// A key under `workers:` (`drain_timeout`, `stop_timeout`, `rollout_watch`, ...);
    /// setting a key again replaces its value.
    pub fn set(mut self, key: &str, value: &str) -> Service {
        match self.workers.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value.to_owned(),
            None => self.workers.push((key.to_owned(), value.to_owned())),
        }
        self
    }

    /// A variable in the workers' `env`.
    pub fn env(mut self, key: &str, value: &str) -> Service {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    fn render(&self, out: &mut String, first: bool) {
        let listen = match (&self.listen, first) {
            (Some(addr), _) => addr.as_str(),
            (None, true) => "{listen}",
            (None, false) => panic!("service {}: only the first may omit listen", self.name),
        };
        let _ = writeln!(out, "  - name: {}\n    listen: {listen}", self.name);
        for (key, value) in &self.options {
            let _ = writeln!(out, "    {key}: {value}");
        }
        let Some(command) = &self.command else {
            return;
        };
        let _ = writeln!(out, "    workers:\n      command: {command}");
        for (key, value) in &self.workers {
            let _ = writeln!(out, "      {key}: {value}");
        }
        if !self.env.is_empty() {
            out.push_str("      env:\n");
            for (key, value) in &self.env {
                let _ = writeln!(out, "        {key}: {}", quoted(value));
            }
        }
    }
}

/// A YAML double-quoted scalar (JSON's string syntax is a subset of YAML's).
fn quoted(value: &str) -> String {
    serde_json::to_string(value).expect("string as JSON")
}
