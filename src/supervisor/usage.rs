//! Memory and CPU of each worker's whole process group, read from /proc on a blocking
//! thread (never on the supervisor's task) every [`SAMPLE_EVERY`], and `max_memory`'s
//! verdict on them. A sample sums every live process of the group: resident memory,
//! and CPU time including that of the children each one has reaped, so work done by
//! short-lived helpers is counted once.

use std::collections::HashMap;
use std::time::Duration;

use nix::unistd::{Pid, SysconfVar, sysconf};
use tokio::time::Instant;
use tracing::warn;

use super::life::WorkerId;
use super::procfs;
use super::{Event, Supervisor};

/// How often workers are sampled: often enough for `lb status` to read like `pm2 ls`,
/// and for a worker that runs away with memory to be caught within seconds.
pub(super) const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Samples in a row above `max_memory` that make lb replace a worker: a brief peak
/// (a large request, a garbage collector's high tide) is not a leak.
pub(super) const OVER_SAMPLES: u32 = 3;

/// One reading of a process group.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Sample {
    pub memory_bytes: u64,
    pub cpu_seconds: f64,
}

/// What lb knows of a worker's resource use.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Usage {
    pub memory_bytes: u64,
    /// CPU time used since the worker started; it never goes down.
    pub cpu_seconds: f64,
    /// CPU use over the last sampling period, in percent of one CPU.
    pub cpu_percent: f64,
    /// The group's CPU time at the last sample.
    last: f64,
    /// Samples in a row above `max_memory`.
    over: u32,
    at: Option<Instant>,
}

impl Usage {
    /// Records `sample`, taken at `at`; returns the CPU seconds added since the last one
    /// and whether the worker has now stayed above `limit` for [`OVER_SAMPLES`] samples.
    pub(super) fn record(
        &mut self,
        sample: Sample,
        at: Instant,
        limit: Option<u64>,
    ) -> (f64, bool) {
        // A group whose busiest process exited shows less CPU time than before; what it
        // had is not taken back.
        let added = (sample.cpu_seconds - self.last).max(0.0);
        self.cpu_percent = match self.at {
            Some(before) if at > before => 100.0 * added / (at - before).as_secs_f64(),
            _ => 0.0,
        };
        self.memory_bytes = sample.memory_bytes;
        self.cpu_seconds += added;
        self.last = sample.cpu_seconds;
        self.at = Some(at);
        self.over = match limit {
            Some(limit) if sample.memory_bytes > limit => self.over + 1,
            _ => 0,
        };
        (added, self.over >= OVER_SAMPLES)
    }
}

/// Reads every process in /proc once and sums those of the groups led by `leaders`.
/// Blocking: run it on a blocking thread.
pub(super) fn sample(leaders: &[(WorkerId, Pid)]) -> Vec<(WorkerId, Sample)> {
    let tick = sysconf(SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    let page = sysconf(SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    let mut groups: HashMap<i32, (u64, u64)> = leaders
        .iter()
        .map(|(_, pid)| (pid.as_raw(), (0, 0)))
        .collect();
    for process in procfs::processes() {
        if let Some((pages, ticks)) = groups.get_mut(&process.group) {
            *pages += process.pages;
            *ticks += process.ticks;
        }
    }
    leaders
        .iter()
        .filter_map(|(id, pid)| {
            let (pages, ticks) = groups.get(&pid.as_raw())?;
            Some((
                *id,
                Sample {
                    memory_bytes: pages * page,
                    cpu_seconds: *ticks as f64 / tick,
                },
            ))
        })
        .collect()
}

impl Supervisor {
    /// Samples every worker process lb runs, on a blocking thread; the answer comes back
    /// as [`Event::Sampled`], which sets the next sample.
    pub(super) fn sample_usage(&self) {
        // Static backends only: nothing to read /proc for.
        if self.workers.is_empty() {
            self.after(SAMPLE_EVERY, Event::SampleTick);
            return;
        }
        let leaders: Vec<(WorkerId, Pid)> = self.workers.values().map(|w| (w.id, w.pid)).collect();
        let tx = self.tx.clone();
        tokio::task::spawn_blocking(move || {
            let samples = sample(&leaders);
            let _ = tx.send(Event::Sampled {
                samples,
                at: Instant::now(),
            });
        });
    }

    /// Records what the workers use, exports it, and replaces a ready worker that has
    /// stayed above its `max_memory`.
    pub(super) fn sampled(&mut self, samples: Vec<(WorkerId, Sample)>, at: Instant) {
        let mut over = Vec::new();
        for (id, sample) in samples {
            let Some(w) = self.workers.get_mut(&id) else {
                continue;
            };
            let limit = w.config.max_memory;
            let (added, above) = w.usage.record(sample, at, limit);
            let slot = w.slot.to_string();
            // A draining worker of a removed slot or service would bring back the series
            // that export_gauges removed, for good.
            if self.exported.has_slot(&w.service, &slot) {
                self.metrics
                    .worker_cpu
                    .with_label_values(&[&*w.service, &slot])
                    .inc_by(added);
            }
            // Workers that are leaving are on their way out.
            if above && w.in_rotation() {
                over.push((id, limit.unwrap_or_default()));
            }
        }
        if self.phase.keeps_workers() {
            for (id, limit) in over {
                // A rollout's old worker in its last moments fills no slot: it is leaving.
                if self.slot_of(id).is_none() {
                    continue;
                }
                if let Some(w) = self.workers.get(&id) {
                    warn!(service = %w.service, worker = w.slot, pid = w.pid.as_raw(), memory_bytes = w.usage.memory_bytes, max_memory = limit, "worker stayed above max_memory; replacing it");
                }
                self.replace(id, "memory");
            }
        }
        self.after(SAMPLE_EVERY, Event::SampleTick);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_own_group_is_sampled() {
        let me = nix::unistd::getpgrp();
        let samples = sample(&[(7, me)]);
        let (id, s) = samples.first().copied().expect("our group");
        assert_eq!(id, 7);
        assert!(s.memory_bytes > 1 << 20, "{s:?}");
    }

    #[test]
    fn a_worker_is_over_its_limit_after_samples_in_a_row() {
        let mut usage = Usage::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let big = |cpu: f64| Sample {
            memory_bytes: 600,
            cpu_seconds: cpu,
        };
        let small = Sample {
            memory_bytes: 100,
            cpu_seconds: 2.0,
        };
        assert_eq!(usage.record(big(0.5), at(0), Some(500)), (0.5, false));
        assert_eq!(usage.record(big(1.0), at(1), Some(500)), (0.5, false));
        assert!((usage.cpu_percent - 50.0).abs() < 1e-9);
        // Below the limit once: the count starts again.
        assert!(!usage.record(small, at(2), Some(500)).1);
        for s in 3..5 {
            assert!(!usage.record(big(2.0), at(s), Some(500)).1);
        }
        assert!(usage.record(big(2.0), at(5), Some(500)).1);
        // No limit: never over.
        assert!(!usage.record(big(2.0), at(6), None).1);
        // CPU time that went away with an exited process is not taken back, and what
        // the group uses after that is added.
        assert_eq!(usage.record(big(1.0), at(7), None).0, 0.0);
        assert_eq!(usage.record(big(1.5), at(8), None).0, 0.5);
        assert_eq!(usage.cpu_seconds, 2.5);
    }

    #[test]
    fn a_worker_whose_name_is_not_ascii_is_sampled() {
        use std::os::unix::process::CommandExt as _;
        // comm is cut at 15 bytes, here in the middle of an 'é': /proc/PID/stat is not UTF-8.
        let dir = tempfile::tempdir().expect("temp dir");
        let exe = dir.path().join("ééééééééé");
        std::fs::copy("/bin/sleep", &exe).expect("copy sleep");
        let mut child = std::process::Command::new(&exe)
            .arg("30")
            .process_group(0)
            .spawn()
            .expect("spawn");
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("a pid"));
        // Sampled once it runs the copy, not the forked test binary.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .as_deref()
            != Some(&exe)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the child never ran {exe:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // Just after the exec the new image may not have touched a page yet.
        let sampled = loop {
            let samples = sample(&[(1, pid)]);
            if samples.first().is_some_and(|(_, s)| s.memory_bytes > 0) {
                break Ok(());
            }
            if std::time::Instant::now() > deadline {
                break Err(samples);
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(sampled, Ok(()), "never sampled with memory");
    }
}
