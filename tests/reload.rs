//! SIGHUP applies only what changed in the config: counts, services, and nothing at all
//! when the file is invalid.

mod common;

use common::config::{Config, Service};
use common::load::Load;
use common::{DEADLINE, Lb, alive, backend, free_port, hello, wait_until};
use nix::sys::signal::Signal;

fn echo_service(count: usize) -> String {
    format!(
        r#"
services:
  - name: web
    listen: {{listen}}
    workers:
      command: ["{{worker}}"]
      count: {count}
      drain_timeout: 10s
"#
    )
}

/// Waits for the `n`th `reload applied` (or `rejected`) line.
fn reloaded(lb: &Lb, what: &str, n: usize) {
    wait_until(&format!("reload {what} #{n}"), DEADLINE, || {
        lb.lines(&format!("reload {what}")).len() >= n
    });
}

#[test]
fn count_two_four_two_scales_without_touching_unchanged_slots_or_failing_requests() {
    let lb = Lb::start(&echo_service(2));
    lb.wait_ready(2);
    let first = lb.ready_pids();
    let load = Load::start(lb.listen, 3, 3);
    load.wait_for(200);

    lb.rewrite_config(&echo_service(4));
    lb.signal(Signal::SIGHUP);
    reloaded(&lb, "applied", 1);
    lb.wait_ready(4);
    load.wait_for(200);
    let scaled_up = lb.ready_pids();
    assert_eq!(scaled_up.len(), 4);
    assert_eq!(
        (scaled_up[&0], scaled_up[&1]),
        (first[&0], first[&1]),
        "slots 0 and 1 were restarted"
    );

    lb.rewrite_config(&echo_service(2));
    lb.signal(Signal::SIGHUP);
    reloaded(&lb, "applied", 2);
    wait_until("slots 2 and 3 stopped", DEADLINE, || {
        !alive(scaled_up[&2]) && !alive(scaled_up[&3])
    });
    load.wait_for(200);
    let report = load.stop();
    assert!(
        report.failures.is_empty(),
        "{:?}\n{}",
        report.failures,
        lb.log()
    );
    let scale_downs = lb.lines("reason=scale");
    assert!(
        scale_downs.iter().any(|l| l.contains("worker=3"))
            && scale_downs.iter().any(|l| l.contains("worker=2"))
    );
    assert!(
        alive(first[&0]) && alive(first[&1]),
        "unchanged slots keep their pids"
    );
    assert_eq!(lb.started_workers().len(), 4, "no other worker was started");
}

#[test]
fn an_invalid_config_on_reload_changes_nothing() {
    let lb = Lb::start(&echo_service(2));
    lb.wait_ready(2);
    let before = lb.ready_pids();
    lb.rewrite_config(&echo_service(2).replace("count: 2", "count: -2"));
    lb.signal(Signal::SIGHUP);
    reloaded(&lb, "rejected", 1);
    let error = lb.lines("services[0].workers.count");
    assert_eq!(error.len(), 1, "{}", lb.log());
    assert!(
        error[0].contains("lb.yaml:9:14: services[0].workers.count: expected a positive integer"),
        "{}",
        error[0]
    );
    assert_eq!(common::echo(lb.listen, b"still serving"), b"still serving");
    assert_eq!(lb.ready_pids(), before);
    assert_eq!(lb.started_workers().len(), 2);
}

#[test]
fn a_service_added_by_reload_serves_on_its_port_and_goes_away_when_removed() {
    let lb = Lb::start(&echo_service(1));
    lb.wait_ready(1);
    let web = lb.worker_pid(0);
    let api_port = free_port();
    let with_api = format!(
        r#"{}
  - name: api
    listen: 127.0.0.1:{api_port}
    workers:
      command: ["{{worker}}"]
      count: 2
      env: {{ HELLO: "1" }}
"#,
        echo_service(1).trim_end()
    );
    lb.rewrite_config(&with_api);
    lb.signal(Signal::SIGHUP);
    reloaded(&lb, "applied", 1);
    lb.wait_ready(3);
    let api_addr = std::net::SocketAddr::from(([127, 0, 0, 1], api_port));
    let line = hello(api_addr).expect("the new service answers");
    assert!(line.contains("service=api"), "{line}");
    let api_pids: Vec<i32> = lb
        .started_workers()
        .into_iter()
        .skip(1)
        .map(|(_, pid)| pid)
        .collect();
    assert_eq!(api_pids.len(), 2);

    lb.rewrite_config(&echo_service(1));
    lb.signal(Signal::SIGHUP);
    reloaded(&lb, "applied", 2);
    wait_until("api workers stopped", DEADLINE, || {
        api_pids.iter().all(|p| !alive(*p))
    });
    wait_until("api port closed", DEADLINE, || {
        std::net::TcpStream::connect(api_addr).is_err()
    });
    assert!(alive(web), "the unchanged service was touched");
    assert_eq!(common::echo(lb.listen, b"web still up"), b"web still up");
}

#[test]
fn renaming_a_service_hands_its_address_over_without_refusing_a_client() {
    let named = |name: &str| echo_service(2).replace("name: web", &format!("name: {name}"));
    let lb = Lb::start(&named("web"));
    lb.wait_ready(2);
    let old: Vec<i32> = lb.ready_pids().into_values().collect();
    let load = Load::start(lb.listen, 3, 0);
    load.wait_for(100);

    lb.rewrite_config(&named("www"));
    lb.signal(Signal::SIGHUP);
    reloaded(&lb, "applied", 1);
    lb.wait_ready(4);
    wait_until("the old service's workers stopped", DEADLINE, || {
        old.iter().all(|p| !alive(*p))
    });
    load.wait_for(100);
    let report = load.stop();
    assert!(
        report.failures.is_empty(),
        "{} of {} failed: {:?}",
        report.failures.len(),
        report.ok,
        &report.failures[..report.failures.len().min(5)]
    );
    let status = lb.cli(&["status", "--json"]);
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains(r#""name": "www""#), "{status}");
    assert!(!status.contains(r#""name": "web""#), "{status}");
}

#[test]
fn a_client_accepted_on_an_address_a_reload_closes_is_still_served() {
    let second = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = |listen: &str| {
        format!(
            r#"
services:
  - name: web
    listen: {listen}
    timeouts: {{ connect: 10s }}
    workers:
      command: ["{{worker}}"]
      count: 1
      env: {{ HELLO: "1", START_DELAY_MS: "1500" }}
"#
        )
    };
    let lb = Lb::start(&config(&format!("['{{listen}}', '{second}']")));
    lb.wait_log("listening");
    let client = common::connect(lb.listen);
    // lb holds the client's socket: accepted, and waiting for the worker to get ready.
    wait_until("lb to accept the client", DEADLINE, || accepted(&client));
    lb.rewrite_config(&config(&format!("'{second}'")));
    lb.signal(Signal::SIGHUP);
    reloaded(&lb, "applied", 1);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(client), &mut line).expect("served");
    assert!(line.contains("service=web"), "{line}");
}

/// Whether the server side of `client` has been accepted: in /proc/net/tcp a connection
/// still in the accept queue has no inode, since no process holds a socket for it yet.
fn accepted(client: &std::net::TcpStream) -> bool {
    let (local, peer) = (
        client.local_addr().expect("client address"),
        client.peer_addr().expect("server address"),
    );
    // The server's end: local = lb's address, remote = the client's, in hex ports.
    let (server_port, client_port) = (
        format!(":{:04X}", peer.port()),
        format!(":{:04X}", local.port()),
    );
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table.lines().skip(1).any(|row| {
        let cols: Vec<&str> = row.split_whitespace().collect();
        cols.len() > 9
            && cols[1].ends_with(&server_port)
            && cols[2].ends_with(&client_port)
            && cols[9] != "0"
    })
}

#[test]
fn widening_a_listen_address_in_one_reload_is_refused_with_the_way_out() {
    let lb = Lb::start(&echo_service(1));
    lb.wait_ready(1);
    let wide = format!("0.0.0.0:{}", lb.listen.port());
    lb.rewrite_config(&echo_service(1).replace("{listen}", &wide));
    let (code, body) = lb.admin("POST", "/reload", b"");
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains(&format!(
            "could not listen on {wide}: it overlaps {}, where lb listens for service web",
            lb.listen
        )),
        "{body}"
    );
    assert_eq!(common::echo(lb.listen, b"still up"), b"still up");
}

#[test]
fn changed_worker_settings_roll_only_that_service() {
    let two = format!(
        r#"{}
  - name: api
    listen: 127.0.0.1:{}
    workers:
      command: ["{{worker}}"]
      count: 2
"#,
        echo_service(2).trim_end(),
        free_port()
    );
    let lb = Lb::start(&two);
    lb.wait_ready(4);
    let web: Vec<i32> = lb
        .started_workers()
        .into_iter()
        .take(2)
        .map(|(_, pid)| pid)
        .collect();
    let api: Vec<i32> = lb
        .started_workers()
        .into_iter()
        .skip(2)
        .map(|(_, pid)| pid)
        .collect();
    let load = Load::start(lb.listen, 2, 2);
    load.wait_for(100);
    // Only the api service gets a new environment variable.
    lb.rewrite_config(
        &two.replacen(
            "      count: 2\n",
            "      count: 2\n      env: { RELEASE: \"2\" }\n",
            2,
        )
        .replacen(
            "      count: 2\n      env: { RELEASE: \"2\" }\n",
            "      count: 2\n",
            1,
        ),
    );
    lb.signal(Signal::SIGHUP);
    lb.wait_log("rollout finished");
    load.wait_for(100);
    let report = load.stop();
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert!(web.iter().all(|p| alive(*p)), "web workers were replaced");
    wait_until("old api workers stopped", DEADLINE, || {
        api.iter().all(|p| !alive(*p))
    });
    assert_eq!(lb.lines("rollout: replacement started").len(), 2);
}

#[test]
fn listen_addresses_and_static_backends_follow_the_config() {
    // Two static backends that say who they are.
    let says = |name: &'static str| {
        backend(move |stream| {
            let _ = std::io::Write::write_all(&mut &stream, format!("{name}\n").as_bytes());
        })
    };
    let (a, b) = (says("a"), says("b"));
    let second = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = |listen: &str, backends: &str| {
        format!("services:\n  - name: edge\n    listen: {listen}\n    backends: [{backends}]\n")
    };
    let lb = Lb::start(&config("{listen}", &format!("'{a}'")));
    lb.wait_log("listening");
    assert_eq!(hello(lb.listen).expect("via a"), "a");

    lb.rewrite_config(&config(
        &format!("['{}', '{second}']", lb.listen),
        &format!("'{b}'"),
    ));
    lb.signal(Signal::SIGHUP);
    reloaded(&lb, "applied", 1);
    for _ in 0..4 {
        assert_eq!(hello(lb.listen).expect("old address"), "b");
        assert_eq!(hello(second).expect("new address"), "b");
    }

    lb.rewrite_config(&config(&format!("'{second}'"), &format!("'{a}', '{b}'")));
    lb.signal(Signal::SIGHUP);
    reloaded(&lb, "applied", 2);
    wait_until("the first address closed", DEADLINE, || {
        std::net::TcpStream::connect(lb.listen).is_err()
    });
    let mut seen: Vec<String> = (0..4).map(|_| hello(second).expect("hello")).collect();
    seen.sort();
    assert_eq!(seen, ["a", "a", "b", "b"]);
}

#[test]
fn lb_reload_says_which_services_came_and_went_and_which_keys_changed() {
    let port = || format!("127.0.0.1:{}", free_port());
    let (api, jobs) = (port(), port());
    let before = Config::new()
        .service(Service::workers("web").count(2))
        .service(Service::workers("api").listen(&api));
    let lb = Lb::start(&before.yaml());
    lb.wait_ready(3);
    let after = Config::new()
        .service(
            Service::workers("web")
                .count(3)
                .set("drain_timeout", "5s")
                .env("MODE", "new"),
        )
        .service(Service::workers("jobs").listen(&jobs));
    lb.rewrite_config(&after.yaml());
    let reload = lb.cli(&["reload"]);
    assert!(reload.status.success(), "{reload:?}");
    assert_eq!(
        String::from_utf8_lossy(&reload.stdout),
        "reload applied\n  added: jobs\n  removed: api\n  changed: web (workers.count 2 -> 3, workers.env, workers.drain_timeout)\n"
    );
}
