//! The cost of one `pick` per balancing strategy, at 4, 64 and 1024 ready backends, and
//! its ratio to round-robin; the time to build source-hash's Maglev table (done by the
//! supervisor when the configured set changes, never per connection); and the cost of
//! building a PROXY protocol header (per connection when `proxy_protocol` is on; sending
//! it is one more small write before the client's bytes).
//!
//!     cargo bench --bench balance
//!
//! One thread, no contention: it measures the strategy, not the machine's cache traffic.
//! A pick is one of the connection path's steps; the whole per-connection cost (accept,
//! connect, copy) is `benches/throughput/run.sh`'s new-connection run.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lb::balance::{BalanceState, Maglev, Member};
use lb::config::{Balance, ProxyProtocol, Timeouts};
use lb::metrics::Metrics;
use lb::proxy::proxy_protocol;
use lb::snapshot::{Backend, BackendStats, Pool, Relay};
use tokio_util::sync::CancellationToken;

const STRATEGIES: [(Balance, &str); 4] = [
    (Balance::RoundRobin, "round-robin"),
    (Balance::LeastConn, "least-conn"),
    (Balance::RandomTwo, "random-two"),
    (Balance::SourceHash, "source-hash"),
];

fn main() {
    println!("| backends | strategy | ns per pick | ratio to round-robin |");
    println!("| ---: | --- | ---: | ---: |");
    for n in [4, 64, 1024] {
        let mut round_robin = 0.0;
        for (balance, name) in STRATEGIES {
            let ns = per_pick(balance, n);
            if balance == Balance::RoundRobin {
                round_robin = ns;
            }
            println!("| {n} | {name} | {ns:.1} | {:.2} |", ns / round_robin);
        }
    }
    println!();
    println!("| backends | Maglev table entries | build time |");
    println!("| ---: | ---: | ---: |");
    for n in [4, 64, 1024] {
        let members: Vec<Member> = (0..n).map(|i| Member::new(label(i), 1)).collect();
        let started = Instant::now();
        let table = black_box(Maglev::new(&members));
        println!("| {n} | {} | {:?} |", table.len(), started.elapsed());
    }
    println!();
    println!("| PROXY header | ns per header |");
    println!("| --- | ---: |");
    for (version, name) in [
        (ProxyProtocol::V1, "v1, IPv4"),
        (ProxyProtocol::V2, "v2, IPv4"),
    ] {
        println!("| {name} | {:.1} |", per_header(version));
    }
}

/// Nanoseconds to build one header for a new client address.
fn per_header(version: ProxyProtocol) -> f64 {
    let local = SocketAddr::from(([10, 0, 0, 1], 8080));
    let mut buf = [0u8; proxy_protocol::MAX_HEADER];
    let mut headers = 0u64;
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(300) {
        for _ in 0..10_000 {
            let client = SocketAddr::from((Ipv4Addr::from(headers as u32), 40_000));
            black_box(proxy_protocol::relayed(
                version,
                black_box(client),
                local,
                &mut buf,
            ));
            headers += 1;
        }
    }
    started.elapsed().as_nanos() as f64 / headers as f64
}

fn label(i: usize) -> String {
    format!("10.0.{}.{}:8080", i / 250, i % 250 + 1)
}

/// Nanoseconds per pick over about half a second, from distinct client addresses, with
/// every backend carrying a few connections so least-conn and random-two compare loads.
fn per_pick(balance: Balance, n: usize) -> f64 {
    let metrics = Metrics::default();
    let backends: Vec<Arc<Backend>> = (0..n)
        .map(|i| {
            Arc::new(Backend {
                id: i as u64,
                addr: SocketAddr::from(([10, 0, 0, 1], 8080)),
                label: label(i).into(),
                weight: 1,
                stats: Arc::new(BackendStats::default()),
                metrics: metrics.backend("bench", &i.to_string()),
                close: CancellationToken::new(),
            })
        })
        .collect();
    let _held: Vec<_> = backends
        .iter()
        .enumerate()
        .flat_map(|(i, b)| (0..i % 3).map(|_| b.track()).collect::<Vec<_>>())
        .collect();
    let mut state = BalanceState::default();
    let statics = (0..n).map(|i| (label(i), 1)).collect();
    state.configure(&service(balance, n), statics);
    let relay = Relay {
        timeouts: Timeouts {
            connect: Duration::from_secs(1),
            idle: Duration::from_secs(1),
        },
        proxy_protocol: ProxyProtocol::Off,
        log_connections: false,
    };
    let pool = Pool::new(
        backends,
        balance,
        &state,
        relay,
        Arc::new(metrics.service("bench")),
    );
    let mut picks = 0u64;
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(500) {
        for _ in 0..10_000 {
            let client = IpAddr::V4(Ipv4Addr::from(picks as u32));
            black_box(pool.pick(black_box(client), &[]));
            picks += 1;
        }
    }
    started.elapsed().as_nanos() as f64 / picks as f64
}

/// A service with `n` static backends, as `label` names them.
fn service(balance: Balance, n: usize) -> lb::config::ServiceConfig {
    let backends: String = (0..n).map(|i| format!("\n      - {}", label(i))).collect();
    let yaml = format!(
        "services:\n  - name: bench\n    listen: 127.0.0.1:0\n    balance: {balance}\n    backends:{backends}\n"
    );
    let config = lb::config::parse(&yaml, "bench.yaml", Path::new("/")).expect("a valid config");
    config.services.into_iter().next().expect("one service")
}
