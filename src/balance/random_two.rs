//! `random-two`: two ready backends drawn at random by weight; the one with fewer active
//! connections for its weight wins ("the power of two choices").

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use super::{BalanceState, Load, Select};
use crate::snapshot::{Backend, BackendId};

/// Draws before a pick gives up on chance and takes the first backend not skipped: only
/// reached when most of the weight belongs to backends this connection already failed.
const DRAWS: usize = 8;

/// Weighted draws without replacement, over the running sum of the weights.
#[derive(Debug)]
pub struct RandomTwo {
    /// `ends[i]` is where backend `i`'s share of `0..total` ends; it starts at `ends[i-1]`.
    ends: Box<[u64]>,
}

impl RandomTwo {
    fn total(&self) -> u64 {
        self.ends.last().copied().unwrap_or(0)
    }

    fn share(&self, i: usize) -> (u64, u64) {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        (start, self.ends[i] - start)
    }

    /// A backend drawn by weight, never `except` nor one in `skip`.
    fn draw(
        &self,
        backends: &[Arc<Backend>],
        skip: &[BackendId],
        except: Option<usize>,
    ) -> Option<usize> {
        let (hole_start, hole) = except.map_or((0, 0), |e| self.share(e));
        let span = self.total() - hole;
        for _ in 0..DRAWS {
            if span == 0 {
                break;
            }
            let mut point = random() % span;
            if point >= hole_start {
                point += hole;
            }
            let i = self.ends.partition_point(|&end| end <= point);
            if !skip.contains(&backends[i].id) {
                return Some(i);
            }
        }
        let n = backends.len();
        let start = (random() % n.max(1) as u64) as usize;
        (0..n)
            .map(|step| (start + step) % n)
            .find(|&i| Some(i) != except && !skip.contains(&backends[i].id))
    }
}

impl Select for RandomTwo {
    fn build(backends: &[Arc<Backend>], _: &BalanceState) -> Self {
        let ends = backends
            .iter()
            .scan(0u64, |sum, b| {
                *sum += u64::from(b.weight);
                Some(*sum)
            })
            .collect();
        RandomTwo { ends }
    }

    fn pick(&self, backends: &[Arc<Backend>], _: IpAddr, skip: &[BackendId]) -> Option<usize> {
        let first = self.draw(backends, skip, None)?;
        let Some(second) = self.draw(backends, skip, Some(first)) else {
            return Some(first);
        };
        if Load::of(&backends[second]).lighter_than(Load::of(&backends[first])) {
            Some(second)
        } else {
            Some(first)
        }
    }
}

thread_local! {
    /// Each thread's own generator state: no lock, no shared cache line.
    static RNG: Cell<u64> = const { Cell::new(0) };
}

/// wyrand: a fast 64-bit generator, plenty for spreading load (not for secrets). Seeded
/// per thread from the standard library's random hash keys.
fn random() -> u64 {
    RNG.with(|state| {
        let mut s = state.get();
        if s == 0 {
            s = std::hash::RandomState::new().build_hasher().finish() | 1;
        }
        s = s.wrapping_add(0xa076_1d64_78bd_642f);
        state.set(s);
        let t = u128::from(s) * u128::from(s ^ 0xe703_7ed1_a0b4_28db);
        (t as u64) ^ ((t >> 64) as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::super::testing::{backends, load};
    use super::*;

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn selector(backends: &[Arc<Backend>]) -> RandomTwo {
        RandomTwo::build(backends, &BalanceState::default())
    }

    #[test]
    fn of_two_backends_the_busier_never_wins() {
        let b = backends(&[1, 1]);
        let _busy = load(&b[1], 1);
        let r2 = selector(&b);
        for _ in 0..1000 {
            assert_eq!(r2.pick(&b, CLIENT, &[]), Some(0));
        }
    }

    #[test]
    fn the_busiest_of_many_never_wins() {
        let b = backends(&[1, 1, 1, 1]);
        let _busy = load(&b[2], 3);
        let r2 = selector(&b);
        let mut counts = [0; 4];
        for _ in 0..4000 {
            counts[r2.pick(&b, CLIENT, &[]).unwrap()] += 1;
        }
        assert_eq!(counts[2], 0, "{counts:?}");
        assert!(
            counts.iter().enumerate().all(|(i, c)| i == 2 || *c > 1000),
            "{counts:?}"
        );
    }

    #[test]
    fn idle_backends_are_drawn_by_weight() {
        let b = backends(&[3, 1]);
        let r2 = selector(&b);
        let mut draws = [0u32; 2];
        for _ in 0..40_000 {
            draws[r2.draw(&b, &[], None).unwrap()] += 1;
        }
        // Expected 30,000 : 10,000.
        assert!((29_000..31_000).contains(&draws[0]), "{draws:?}");
    }

    #[test]
    fn the_second_draw_is_another_backend() {
        let b = backends(&[5, 1, 1]);
        let r2 = selector(&b);
        for _ in 0..1000 {
            let first = r2.draw(&b, &[], None).unwrap();
            assert_ne!(r2.draw(&b, &[], Some(first)), Some(first));
        }
    }

    #[test]
    fn held_connections_spread_by_weight() {
        let b = backends(&[2, 1]);
        let r2 = selector(&b);
        let held: Vec<_> = (0..300)
            .map(|_| b[r2.pick(&b, CLIENT, &[]).unwrap()].track())
            .collect();
        let (a, c) = (b[0].stats.active(), b[1].stats.active());
        assert!((190..=210).contains(&a) && a + c == 300, "{a} {c}");
        drop(held);
    }

    #[test]
    fn skipped_backends_are_passed_over() {
        let b = backends(&[100, 1, 1]);
        let r2 = selector(&b);
        for _ in 0..200 {
            assert_ne!(r2.pick(&b, CLIENT, &[0]), Some(0));
        }
        assert_eq!(r2.pick(&b, CLIENT, &[0, 1]), Some(2));
        assert_eq!(r2.pick(&b, CLIENT, &[0, 1, 2]), None);
        assert_eq!(selector(&[]).pick(&[], CLIENT, &[]), None);
    }
}
