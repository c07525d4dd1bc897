//! Prometheus metrics (contract §6). One registry owned by lb (not the global one).
//! Label lookups happen when a backend or service is created, never per connection or
//! per read: the connection path only increments handles resolved beforehand.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::{
    CounterVec, Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric family of the contract.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    connections_total: IntCounterVec,
    connections_active: IntGaugeVec,
    bytes_total: IntCounterVec,
    connect_errors_total: IntCounterVec,
    connection_duration: HistogramVec,
    pub workers: IntGaugeVec,
    pub worker_restarts_total: IntCounterVec,
    pub reloads_total: IntCounterVec,
    pub backend_up: IntGaugeVec,
    messages_dropped_total: IntCounterVec,
    connections_dropped_total: IntCounterVec,
    /// Rollouts by result (`ok`, `halted`), so a halted
    /// deploy can alert.
    pub rollouts_total: IntCounterVec,
    /// Resident memory of each worker slot's process group.
    pub worker_memory: IntGaugeVec,
    /// CPU time of each worker slot's process groups, every process it has run.
    pub worker_cpu: CounterVec,
    /// Each service's byte counters (in, out), brought into `bytes_total` on every
    /// exposition; the lock also keeps two expositions from adding the same bytes twice.
    bytes: Arc<Mutex<HashMap<String, [Arc<ByteCounter>; 2]>>>,
}

/// One series of `lb_bytes_total`, added to on every write by every connection thread.
/// One shared atomic would move its cache line between cores on every write; instead
/// each thread adds to a slot of its own, and reading sums the slots.
#[derive(Debug)]
pub struct ByteCounter {
    slots: Box<[Slot]>,
    exposed: IntCounter,
}

/// A count in a cache line (two, against the adjacent-line prefetcher) of its own, for
/// counts that each thread adds to on its hot path while others only read them.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Slot(pub(crate) AtomicU64);

/// Slots per counter: threads beyond it share slots, which stays correct.
const SLOTS: usize = 16;

thread_local! {
    /// This thread's slot, handed out in turn as threads first count.
    static SLOT: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) % SLOTS
    };
}

impl ByteCounter {
    /// A counter whose total reaches `exposed` when published.
    pub fn new(exposed: IntCounter) -> Self {
        ByteCounter {
            slots: (0..SLOTS).map(|_| Slot::default()).collect(),
            exposed,
        }
    }

    pub fn add(&self, n: u64) {
        let slot = SLOT.with(|slot| *slot);
        self.slots[slot].0.fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes counted so far.
    pub fn get(&self) -> u64 {
        self.slots.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }

    /// Brings the exposed series up to the total; the caller serializes calls.
    fn publish(&self) {
        let (total, shown) = (self.get(), self.exposed.get());
        if total > shown {
            self.exposed.inc_by(total - shown);
        }
    }
}

/// The handles of one backend (`worker` is the slot id or the static address).
#[derive(Debug, Clone)]
pub struct BackendMetrics {
    pub connections_total: IntCounter,
    pub connections_active: IntGauge,
    pub connect_errors_total: IntCounter,
}

/// The handles of one service.
#[derive(Debug, Clone)]
pub struct ServiceMetrics {
    pub bytes_in: Arc<ByteCounter>,
    pub bytes_out: Arc<ByteCounter>,
    pub connection_duration: prometheus::Histogram,
    pub messages_dropped: IntCounter,
    pub dropped: DroppedMetrics,
}

/// Clients lb closed without serving them, by why (`lb_connections_dropped_total`).
#[derive(Debug, Clone)]
pub struct DroppedMetrics {
    /// No backend was ready within the connect timeout.
    pub no_backend: IntCounter,
    /// Every backend tried refused or timed out.
    pub connect_failed: IntCounter,
    /// lb was out of descriptors or memory.
    pub resources: IntCounter,
}

/// The `reason` label values of `lb_connections_dropped_total`.
const DROP_REASONS: [&str; 3] = ["no_backend", "connect_failed", "resources"];

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    registered(registry, IntCounterVec::new(Opts::new(name, help), labels))
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    registered(registry, IntGaugeVec::new(Opts::new(name, help), labels))
}

/// Registers a metric family lb defines; its name and labels are fixed in the code.
fn registered<M>(registry: &Registry, metric: prometheus::Result<M>) -> M
where
    M: prometheus::core::Collector + Clone + 'static,
{
    let metric = metric.expect("metric names and labels are valid");
    registry
        .register(Box::new(metric.clone()))
        .expect("each metric is registered once");
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        let r = Registry::new();
        let duration = registered(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "lb_connection_duration_seconds",
                    "How long proxied connections lasted.",
                )
                .buckets(vec![
                    0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, 600.0, 3600.0,
                ]),
                &["service"],
            ),
        );
        let metrics = Metrics {
            connections_total: counter(
                &r,
                "lb_connections_total",
                "Connections proxied to a backend.",
                &["service", "worker"],
            ),
            connections_active: gauge(
                &r,
                "lb_connections_active",
                "Connections open to a backend now.",
                &["service", "worker"],
            ),
            bytes_total: counter(
                &r,
                "lb_bytes_total",
                "Bytes proxied; in = from clients, out = to clients.",
                &["service", "direction"],
            ),
            connect_errors_total: counter(
                &r,
                "lb_connect_errors_total",
                "Failed connects to a backend.",
                &["service", "worker"],
            ),
            connection_duration: duration,
            workers: gauge(
                &r,
                "lb_workers",
                "Worker slots by state.",
                &["service", "state"],
            ),
            worker_restarts_total: counter(
                &r,
                "lb_worker_restarts_total",
                "Workers started again in a slot, by reason.",
                &["service", "worker", "reason"],
            ),
            reloads_total: counter(
                &r,
                "lb_reloads_total",
                "Config reloads, by result.",
                &["result"],
            ),
            backend_up: gauge(
                &r,
                "lb_backend_up",
                "1 if the backend takes connections, else 0.",
                &["service", "worker"],
            ),
            messages_dropped_total: counter(
                &r,
                "lb_messages_dropped_total",
                "Messages to workers dropped because a worker did not read its channel.",
                &["service"],
            ),
            connections_dropped_total: counter(
                &r,
                "lb_connections_dropped_total",
                "Clients lb closed without serving them, by reason.",
                &["service", "reason"],
            ),
            rollouts_total: counter(
                &r,
                "lb_rollouts_total",
                "Rolling restarts, by result (ok, halted).",
                &["result"],
            ),
            worker_memory: gauge(
                &r,
                "lb_worker_memory_bytes",
                "Resident memory of the worker's whole process group.",
                &["service", "worker"],
            ),
            worker_cpu: registered(
                &r,
                CounterVec::new(
                    Opts::new(
                        "lb_worker_cpu_seconds_total",
                        "CPU time used by the worker's process group.",
                    ),
                    &["service", "worker"],
                ),
            ),
            bytes: Arc::default(),
            registry: r,
        };
        let build = registered(
            &metrics.registry,
            IntGaugeVec::new(
                Opts::new("lb_build_info", "Always 1; the version of lb running."),
                &["version"],
            ),
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        // lb's own CPU, memory, descriptors and start time (process_*).
        let _ = metrics.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
        // Series with a known label set exist at 0 from the start: an alert on
        // `increase(...)` cannot see the first event of a series that appears at 1.
        for result in ["ok", "error"] {
            metrics.reloads_total.with_label_values(&[result]);
        }
        for result in ["ok", "halted"] {
            metrics.rollouts_total.with_label_values(&[result]);
        }
        metrics
    }
}

impl Metrics {
    pub fn backend(&self, service: &str, worker: &str) -> BackendMetrics {
        let labels = [service, worker];
        BackendMetrics {
            connections_total: self.connections_total.with_label_values(&labels),
            connections_active: self.connections_active.with_label_values(&labels),
            connect_errors_total: self.connect_errors_total.with_label_values(&labels),
        }
    }

    /// Makes a worker slot's restart series visible at 0 from the start.
    pub fn slot(&self, service: &str, slot: &str) {
        for reason in ["crash", "rollout", "scale", "health", "memory"] {
            self.worker_restarts_total
                .with_label_values(&[service, slot, reason]);
        }
    }

    /// The service's handles; also makes its series visible at 0 from the start.
    pub fn service(&self, service: &str) -> ServiceMetrics {
        let [bytes_in, bytes_out] = self
            .bytes
            .lock()
            .expect("no exposition panics while holding the lock")
            .entry(service.to_owned())
            .or_insert_with(|| {
                ["in", "out"].map(|direction| {
                    let exposed = self.bytes_total.with_label_values(&[service, direction]);
                    Arc::new(ByteCounter::new(exposed))
                })
            })
            .clone();
        ServiceMetrics {
            messages_dropped: self.messages_dropped_total.with_label_values(&[service]),
            bytes_in,
            bytes_out,
            connection_duration: self.connection_duration.with_label_values(&[service]),
            dropped: DroppedMetrics {
                no_backend: self.dropped(service, "no_backend"),
                connect_failed: self.dropped(service, "connect_failed"),
                resources: self.dropped(service, "resources"),
            },
        }
    }

    fn dropped(&self, service: &str, reason: &str) -> IntCounter {
        self.connections_dropped_total
            .with_label_values(&[service, reason])
    }

    /// Drops the series of a backend that left the config (a static backend, a slot
    /// scaled away), so label sets stay bounded however often the config changes.
    pub fn forget_backend(&self, service: &str, worker: &str) {
        let labels = [service, worker];
        let _ = self.connections_total.remove_label_values(&labels);
        let _ = self.connections_active.remove_label_values(&labels);
        let _ = self.connect_errors_total.remove_label_values(&labels);
    }

    /// Drops the per-service series of a service that left the config.
    pub fn forget_service(&self, service: &str) {
        self.bytes
            .lock()
            .expect("no exposition panics while holding the lock")
            .remove(service);
        let _ = self.bytes_total.remove_label_values(&[service, "in"]);
        let _ = self.bytes_total.remove_label_values(&[service, "out"]);
        let _ = self.connection_duration.remove_label_values(&[service]);
        let _ = self.messages_dropped_total.remove_label_values(&[service]);
        for reason in DROP_REASONS {
            let _ = self
                .connections_dropped_total
                .remove_label_values(&[service, reason]);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let counters = self
            .bytes
            .lock()
            .expect("no exposition panics while holding the lock");
        for counter in counters.values().flatten() {
            counter.publish();
        }
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exposed(metrics: &Metrics, direction: &str) -> u64 {
        let series = format!("lb_bytes_total{{direction=\"{direction}\",service=\"web\"}} ");
        metrics
            .render()
            .lines()
            .find_map(|line| line.strip_prefix(&series)?.parse().ok())
            .expect("the series")
    }

    #[test]
    fn bytes_added_on_many_threads_are_exposed_exactly_once() {
        let metrics = Metrics::default();
        let web = metrics.service("web");
        std::thread::scope(|scope| {
            for _ in 0..20 {
                scope.spawn(|| {
                    for _ in 0..1000 {
                        web.bytes_in.add(3);
                    }
                    web.bytes_out.add(1);
                });
            }
        });
        assert_eq!(exposed(&metrics, "in"), 60_000);
        // A second exposition adds nothing, and a service's handles are shared.
        assert_eq!(exposed(&metrics, "in"), 60_000);
        metrics.service("web").bytes_out.add(5);
        assert_eq!(exposed(&metrics, "out"), 25);
    }
}
