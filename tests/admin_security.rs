//! A safe admin API (contract §5, §1): POST needs the token of `admin.token_file`, a
//! public `admin.listen` needs one, client commands send it, no output shows it, and
//! `/healthz` answers within a second whatever other admin clients do.

mod common;

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::config::{Config, Service};
use common::{DEADLINE, LB, Lb, WORKER, free_port, wait_until};

/// The secret in the test's token file; found nowhere lb writes.
const TOKEN: &str = "7e57-s3cr3t-d0-n0t-pr1nt-9b1f4c";

/// A running lb whose admin API needs [`TOKEN`], from `admin-token` beside its config.
struct Secured {
    lb: Lb,
    config: PathBuf,
    admin: SocketAddr,
}

impl Secured {
    fn start() -> Secured {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("admin-token"), format!("  {TOKEN}\n")).expect("token");
        let listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let yaml = Config::new()
            .set(
                "admin",
                &format!("{{ listen: {admin}, token_file: admin-token }}"),
            )
            .service(Service::workers("web").listen(listen).command(&[WORKER]))
            .yaml();
        let config = dir.path().join("lb.yaml");
        std::fs::write(&config, yaml).expect("write config");
        let mut lb = Lb::start_at(dir, &config, listen);
        lb.admin = Some(admin);
        lb.wait_ready(1);
        Secured { lb, config, admin }
    }

    fn token_file(&self) -> PathBuf {
        self.lb.dir.path().join("admin-token")
    }

    /// An lb client command run from another folder, with `LB_ADMIN_TOKEN` set to
    /// `env_token` (else unset), and with this lb's config file when `with_config`.
    fn client(&self, args: &[&str], env_token: Option<&str>, with_config: bool) -> Output {
        let elsewhere = tempfile::tempdir().expect("temp dir");
        let mut command = Command::new(LB);
        command
            .current_dir(elsewhere.path())
            .env_remove("LB_ADMIN_TOKEN")
            .args(["--admin", &self.admin.to_string()]);
        if with_config {
            command.arg("--config").arg(&self.config);
        }
        if let Some(token) = env_token {
            command.env("LB_ADMIN_TOKEN", token);
        }
        command.args(args).output().expect("run lb client")
    }
}

/// One request on a fresh connection, with `Authorization: Bearer TOKEN` when given;
/// returns the status code and the whole response (head and body).
fn request(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: lb\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    common::http_exchange(addr, &head, b"")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn post_needs_the_token_and_get_stays_open() {
    let s = Secured::start();
    let mut said = String::new();
    for path in ["/reload", "/restart", "/broadcast"] {
        let (code, response) = request(s.admin, "POST", path, None);
        assert_eq!(code, 401, "{response}");
        assert!(
            response
                .to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{response}"
        );
        said.push_str(&response);
    }
    for wrong in ["wrong", &TOKEN[..TOKEN.len() - 1], &format!("{TOKEN}x")] {
        let (code, response) = request(s.admin, "POST", "/reload", Some(wrong));
        assert_eq!(code, 401, "{response}");
        said.push_str(&response);
    }
    let (code, response) = request(s.admin, "POST", "/reload", Some(TOKEN));
    assert_eq!(code, 200, "{response}");
    for path in ["/status", "/healthz", "/metrics"] {
        let (code, response) = request(s.admin, "GET", path, None);
        assert_eq!(code, 200, "{path}: {response}");
        said.push_str(&response);
    }
    assert_eq!(request(s.admin, "HEAD", "/healthz", None).0, 200);
    // The secret is in no answer and no log line.
    assert!(!said.contains(TOKEN), "{said}");
    assert!(!s.lb.log().contains(TOKEN), "{}", s.lb.log());
}

#[test]
fn client_commands_send_the_token_from_the_environment_or_the_config_file() {
    let s = Secured::start();
    // No token: one line that says how to give one.
    let out = s.client(&["reload"], None, false);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "lb: the admin API needs a token: set LB_ADMIN_TOKEN or admin.token_file\n"
    );
    let out = s.client(&["reload"], Some("not-the-token"), false);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "lb: the admin API refused the token from LB_ADMIN_TOKEN\n"
    );
    let mut said = String::new();
    // From the environment, and from admin.token_file (relative to the config's folder,
    // while the client runs elsewhere).
    for (env, with_config) in [(Some(TOKEN), false), (None, true)] {
        for args in [&["reload"][..], &["broadcast", r#"{"hi":1}"#], &["status"]] {
            let out = s.client(args, env, with_config);
            assert!(out.status.success(), "{args:?}: {out:?}");
            said.push_str(&text(&out));
        }
    }
    assert!(said.contains("delivered to 1 workers"), "{said}");
    // GET commands need no token at all.
    assert!(s.client(&["status"], None, false).status.success());
    assert!(s.client(&["health"], None, false).status.success());
    assert!(!said.contains(TOKEN), "{said}");
    assert!(!s.lb.log().contains(TOKEN), "{}", s.lb.log());
}

#[test]
fn a_token_rotated_in_the_file_applies_to_the_next_request() {
    let s = Secured::start();
    let rotated = "r0tated-t0ken-42";
    std::fs::write(s.token_file(), rotated).expect("rotate the token");
    assert_eq!(request(s.admin, "POST", "/reload", Some(TOKEN)).0, 401);
    assert_eq!(request(s.admin, "POST", "/reload", Some(rotated)).0, 200);
    // The client reads the same file, so `lb reload` goes on working.
    let out = s.client(&["reload"], None, true);
    assert!(out.status.success(), "{out:?}");
    // An emptied file refuses every POST instead of accepting an empty token, and
    // changes nothing that runs: GET still answers.
    std::fs::write(s.token_file(), "\n").expect("empty the token");
    let (code, response) = request(s.admin, "POST", "/reload", Some(rotated));
    assert_eq!(code, 503, "{response}");
    assert_eq!(request(s.admin, "GET", "/healthz", None).0, 200);
}

/// Writes `yaml` as `lb.yaml` (with `files` beside it) and runs `lb check` on it.
fn check(yaml: &str, files: &[(&str, &str)]) -> (tempfile::TempDir, Output) {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, content) in files {
        std::fs::write(dir.path().join(name), content).expect("write file");
    }
    let path = dir.path().join("lb.yaml");
    std::fs::write(&path, yaml).expect("write config");
    let out = common::lb_check(&path);
    (dir, out)
}

fn one_line_error(out: &Output, config: &Path) -> String {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with(&format!("{}:", config.display())), "{err}");
    err
}

#[test]
fn a_public_admin_listen_needs_a_token_file_that_holds_one() {
    let service = Service::workers("web").listen("127.0.0.1:8080");
    let public = |extra: &str| {
        Config::new()
            .set("admin", &format!("{{ listen: 0.0.0.0:9900{extra} }}"))
            .service(service.clone())
            .yaml()
    };
    let (dir, out) = check(&public(""), &[]);
    let err = one_line_error(&out, &dir.path().join("lb.yaml"));
    assert!(
        err.contains(":1:18: admin.listen: 0.0.0.0:9900 is not a loopback address")
            && err.contains("set admin.token_file"),
        "{err}"
    );
    let (dir, out) = check(&public(", token_file: token"), &[("token", " \n")]);
    let err = one_line_error(&out, &dir.path().join("lb.yaml"));
    assert!(
        err.contains(":1:44: admin.token_file: token is empty"),
        "{err}"
    );
    // Loopback, IPv4 or IPv6, needs none; with a token, any address will do, and the
    // summary names the file but never shows the secret.
    for listen in ["127.0.0.2:9900", "\"[::1]:9900\""] {
        let yaml = Config::new()
            .set("admin", &format!("{{ listen: {listen} }}"))
            .service(service.clone())
            .yaml();
        let (_dir, out) = check(&yaml, &[]);
        assert!(out.status.success(), "{listen}: {out:?}");
    }
    let (dir, out) = check(&public(", token_file: token"), &[("token", TOKEN)]);
    assert!(out.status.success(), "{out:?}");
    let summary = String::from_utf8_lossy(&out.stdout);
    let file = dir.path().join("token");
    assert!(
        summary.contains(&format!("POST needs the token from {}", file.display())),
        "{summary}"
    );
    assert!(!summary.contains(TOKEN), "{summary}");
}

/// How an abusive client holds its admin connection: it reconnects whenever lb closes
/// it, after a short pause, so the pressure never lets up.
#[derive(Clone, Copy)]
enum Abuse {
    /// Connected, sending nothing.
    Idle,
    /// Sending a request line one byte every 500 ms (slowloris).
    Stalled,
}

/// How many connections the abusive clients opened, and how many bytes the stalled ones
/// trickled.
#[derive(Default)]
struct Pressure {
    connects: AtomicUsize,
    stalled_bytes: AtomicUsize,
}

async fn abuse(addr: SocketAddr, how: Abuse, pressure: Arc<Pressure>, until: Instant) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let until = tokio::time::Instant::from_std(until);
    while tokio::time::Instant::now() < until {
        if let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await {
            pressure.connects.fetch_add(1, Ordering::Relaxed);
            let held = async {
                match how {
                    Abuse::Idle => {
                        let mut buf = [0u8; 64];
                        while stream.read(&mut buf).await.is_ok_and(|n| n > 0) {}
                    }
                    Abuse::Stalled => {
                        for byte in b"GET /status HTTP/1.1\r\nHost: lb\r\nX-Slow: "
                            .iter()
                            .cycle()
                        {
                            if stream.write_all(&[*byte]).await.is_err() {
                                break;
                            }
                            pressure.stalled_bytes.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
            };
            let _ = tokio::time::timeout_at(until, held).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET path` on a fresh connection: the status code (0 if none came) and how long the
/// whole answer took, giving up after about `limit`.
fn timed_get(addr: SocketAddr, path: &str, limit: Duration) -> (u16, Duration) {
    let started = Instant::now();
    let exchange = || -> std::io::Result<String> {
        let mut stream = std::net::TcpStream::connect_timeout(&addr, limit)?;
        stream.set_read_timeout(Some(limit))?;
        let head = format!("GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n");
        stream.write_all(head.as_bytes())?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        Ok(response)
    };
    let code = exchange()
        .ok()
        .and_then(|response| response.split(' ').nth(1)?.parse().ok())
        .unwrap_or(0);
    (code, started.elapsed())
}

#[test]
fn healthz_answers_within_a_second_while_idle_and_stalled_clients_hold_the_admin_port() {
    // 250 sockets here: far below the usual 1024 open files.
    let lb = Lb::start(&Config::new().service(Service::workers("web")).yaml());
    lb.wait_ready(1);
    let admin = lb.admin.expect("admin API");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let until = Instant::now() + DEADLINE;
    let pressure = Arc::new(Pressure::default());
    let abusers: Vec<_> = (0..250)
        .map(|i| {
            let how = if i < 200 { Abuse::Idle } else { Abuse::Stalled };
            runtime.spawn(abuse(admin, how, Arc::clone(&pressure), until))
        })
        .collect();
    wait_until("250 abusive admin connections", DEADLINE, || {
        pressure.connects.load(Ordering::Relaxed) >= 250
    });
    let limit = Duration::from_secs(1);
    for i in 0..5 {
        // Each probe comes after every stalled client sent about one more byte (500 ms):
        // the five span more than lb's 2 s header timeout.
        let seen = pressure.stalled_bytes.load(Ordering::Relaxed);
        wait_until("the stalled clients trickling on", DEADLINE, || {
            pressure.stalled_bytes.load(Ordering::Relaxed) >= seen + 50
        });
        let (code, took) = timed_get(admin, "/healthz", limit);
        assert!(
            code == 200 && took < limit,
            "probe {i}: GET /healthz answered {code} after {took:?}"
        );
    }
    let (code, took) = timed_get(admin, "/metrics", limit);
    assert!(
        code == 200 && took < limit,
        "GET /metrics answered {code} after {took:?}"
    );
    for task in abusers {
        task.abort();
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
    // lb itself came through it whole.
    assert_eq!(lb.admin("GET", "/status", b"").0, 200);
}

#[test]
fn healthz_answers_while_every_admin_connection_is_busy_with_a_slow_body() {
    let lb = Lb::start(&Config::new().service(Service::workers("web")).yaml());
    lb.wait_ready(1);
    let admin = lb.admin.expect("admin API");
    // Each POST announces a body and never sends it: lb is reading it, so none of these
    // connections is closed to make room. More are opened until they fill every general
    // connection: then `/status`, which needs one, is refused.
    let slow_post = || {
        let mut stream = common::connect(admin);
        stream
            .write_all(b"POST /broadcast HTTP/1.1\r\nHost: lb\r\nContent-Length: 100\r\n\r\n")
            .expect("send request head");
        stream
    };
    let mut slow: Vec<std::net::TcpStream> = (0..64).map(|_| slow_post()).collect();
    wait_until("every general admin connection busy", DEADLINE, || {
        let full = request(admin, "GET", "/status", None).0 == 503;
        slow.push(slow_post());
        full
    });
    let limit = Duration::from_secs(1);
    for path in ["/healthz", "/metrics"] {
        let (code, took) = timed_get(admin, path, limit);
        assert!(
            code == 200 && took < limit,
            "GET {path} answered {code} after {took:?}"
        );
    }
    // Anything else waits for a general connection to free up.
    let (code, response) = request(admin, "GET", "/status", None);
    assert_eq!(code, 503, "{response}");
    assert!(
        response.contains("GET /healthz and /metrics still answer"),
        "{response}"
    );
    drop(slow);
    wait_until("GET /status answered again", DEADLINE, || {
        request(admin, "GET", "/status", None).0 == 200
    });
}
