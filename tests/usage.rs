//! What each worker uses (contract §5 and §6): resident memory of its process group and
//! CPU time in `/status`, `lb status` and metrics; `max_memory` replacing a worker that
//! stays above it, drain first; lb's own `process_*` metrics and `lb_build_info`.

mod common;

use common::config::{Config, Service};
use common::held::Held;
use common::{DEADLINE, Lb};

fn has_usage(worker: &serde_json::Value) -> bool {
    worker["memory_bytes"].as_u64().is_some_and(|m| m > 0)
        && worker["cpu_seconds"].as_f64().is_some()
        && worker["cpu_percent"].as_f64().is_some()
}

#[test]
fn status_and_metrics_show_each_workers_memory_and_cpu() {
    let lb = Lb::start(
        &Config::new()
            .service(Service::workers("web").count(2))
            .yaml(),
    );
    lb.wait_ready(2);
    lb.wait_status("memory of both workers", DEADLINE, |lb| {
        let workers = lb.status_workers("web");
        workers.len() == 2 && workers.iter().all(has_usage)
    });
    for slot in ["0", "1"] {
        let labels = [("service", "web"), ("worker", slot)];
        assert!(lb.metric("lb_worker_memory_bytes", &labels) > 0.0);
    }
    let table = lb.cli(&["status"]);
    let table = String::from_utf8_lossy(&table.stdout);
    let header = table.lines().next().unwrap_or_default();
    assert!(
        header.contains(" CPU ") && header.contains(" MEMORY "),
        "{table}"
    );
    assert!(
        table.contains(" MiB ") || table.contains(" KiB "),
        "{table}"
    );

    // lb's own process and build.
    assert!(lb.metric("process_resident_memory_bytes", &[]) > 0.0);
    assert!(lb.metric("process_open_fds", &[]) > 0.0);
    assert!(lb.metric("process_start_time_seconds", &[]) > 0.0);
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(lb.metric("lb_build_info", &[("version", version)]), 1.0);
}

#[test]
fn a_worker_that_stays_above_max_memory_is_replaced_drain_first() {
    // The worker holds 64 MiB; the limit is 40 MiB. Every worker of this service grows
    // past it, so lb keeps replacing them, one restart per slot at a time.
    let service = Service::workers("web")
        .set("max_memory", "40MiB")
        .set("drain_timeout", "30s")
        .env("ALLOCATE_MB", "64")
        .env("HELLO", "1");
    let lb = Lb::start(&Config::new().service(service).yaml());
    lb.wait_ready(1);
    let first = lb.worker_pid(0);
    let mut held = Held::open(lb.listen);
    held.exchange();

    let memory = [("service", "web"), ("worker", "0"), ("reason", "memory")];
    lb.wait_status("a replacement for memory", DEADLINE, |lb| {
        lb.metric("lb_worker_restarts_total", &memory) >= 1.0
    });
    // It drains: the connection it holds is still served, new ones go elsewhere.
    lb.wait_status("the first worker draining", DEADLINE, |lb| {
        lb.pids_in_state("web", "draining").contains(&(0, first))
    });
    held.exchange();
    let restarts = lb
        .status_workers("web")
        .iter()
        .filter(|w| w["id"] == 0 && w["pid"] != first)
        .filter_map(|w| w["restarts"].as_u64())
        .max();
    assert!(restarts >= Some(1), "{:?}", lb.status_workers("web"));
}

fn series(lb: &Lb, name: &str, worker: &str) -> bool {
    let (_, text) = lb.admin("GET", "/metrics", b"");
    let label = format!("worker=\"{worker}\"");
    text.lines()
        .any(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))
}

#[test]
fn a_scaled_down_slot_leaves_no_cpu_series_behind() {
    let service = |count| {
        Service::workers("web")
            .count(count)
            .set("drain_timeout", "30s")
            .env("HELLO", "1")
    };
    let lb = Lb::start(&Config::new().service(service(2)).yaml());
    lb.wait_ready(2);
    lb.wait_status("slot 1 sampled", DEADLINE, |lb| {
        series(lb, "lb_worker_cpu_seconds_total", "1")
    });
    // Slot 1's worker drains for a while: it holds a connection.
    let held = common::held::one_per_slot(lb.listen, 2);
    lb.rewrite_config(&Config::new().service(service(1)).yaml());
    let out = lb.cli(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    lb.wait_status("slot 1 draining", DEADLINE, |lb| {
        !lb.pids_in_state("web", "draining").is_empty()
    });
    // Several samples of the draining worker.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let backend_up = series(&lb, "lb_backend_up", "1");
    let cpu = series(&lb, "lb_worker_cpu_seconds_total", "1");
    drop(held);
    assert!(!backend_up, "lb_backend_up of the removed slot");
    assert!(
        !cpu,
        "lb_worker_cpu_seconds_total of the removed slot is back"
    );
}
