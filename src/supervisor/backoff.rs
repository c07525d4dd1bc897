//! Restart delays for a crashing worker slot: doubling up to a cap, and back to the
//! first delay once a worker has stayed up long enough to count as healthy.

use std::time::Duration;

use crate::config::BackoffPolicy;

/// A worker up at least this long before it exits starts the backoff over (contract §2).
pub(super) const HEALTHY_UPTIME: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub(super) struct Backoff {
    policy: BackoffPolicy,
    next: Duration,
}

impl Backoff {
    pub(super) fn new(policy: BackoffPolicy) -> Self {
        Backoff {
            policy,
            next: policy.initial,
        }
    }

    /// Back to the first delay.
    pub(super) fn reset(&mut self) {
        self.next = self.policy.initial;
    }

    /// The delay before restarting a worker that exited after `uptime`.
    pub(super) fn after_exit(&mut self, uptime: Duration) -> Duration {
        if uptime >= HEALTHY_UPTIME {
            self.reset();
        }
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(self.policy.max);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn doubles_up_to_the_cap() {
        let mut b = Backoff::new(BackoffPolicy {
            initial: ms(100),
            max: ms(500),
        });
        let delays: Vec<Duration> = (0..5).map(|_| b.after_exit(ms(1))).collect();
        assert_eq!(delays, vec![ms(100), ms(200), ms(400), ms(500), ms(500)]);
    }

    #[test]
    fn resets_after_a_healthy_run() {
        let mut b = Backoff::new(BackoffPolicy {
            initial: ms(100),
            max: ms(10_000),
        });
        b.after_exit(ms(1));
        b.after_exit(ms(1));
        assert_eq!(b.after_exit(HEALTHY_UPTIME), ms(100));
        assert_eq!(b.after_exit(ms(1)), ms(200));
    }
}
