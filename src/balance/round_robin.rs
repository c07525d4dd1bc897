//! `round-robin`: each new connection goes to the next ready backend in turn, weighted.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{BalanceState, Select};
use crate::snapshot::{Backend, BackendId};

/// Smooth weighted round-robin, unrolled into one cycle so a pick is one atomic add.
#[derive(Debug)]
pub struct RoundRobin {
    /// Indexes into the pool's backends, each repeated by its weight and interleaved.
    rotation: Box<[u32]>,
    /// Shared with the selectors that replace this one, so a swap does not restart the turn.
    cursor: Arc<AtomicUsize>,
}

impl RoundRobin {
    /// The first backend from the current turn on that satisfies `wanted`, and moves the
    /// turn past it; `None` if no backend does. Least-conn breaks ties with it: the turn
    /// moves past the backend picked, so tied backends take turns even when others are
    /// busier. Load-then-store, not atomic: two connections at once may get the same turn.
    pub(super) fn next_where(&self, wanted: impl Fn(usize) -> bool) -> Option<usize> {
        let start = self.cursor.load(Ordering::Relaxed);
        let len = self.rotation.len();
        let (position, index) = (start..start + len)
            .map(|position| (position, self.rotation[position % len] as usize))
            .find(|&(_, index)| wanted(index))?;
        self.cursor
            .store(position.wrapping_add(1), Ordering::Relaxed);
        Some(index)
    }
}

impl Select for RoundRobin {
    fn build(backends: &[Arc<Backend>], state: &BalanceState) -> Self {
        let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
        RoundRobin {
            rotation: smooth_rotation(&weights).into(),
            cursor: Arc::clone(&state.cursor),
        }
    }

    fn pick(&self, backends: &[Arc<Backend>], _: IpAddr, skip: &[BackendId]) -> Option<usize> {
        let len = self.rotation.len();
        if len == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        (0..len)
            .map(|step| self.rotation[(start + step) % len] as usize)
            .find(|&i| !skip.contains(&backends[i].id))
    }
}

/// Nginx's smooth weighted round-robin, unrolled into one cycle: weights 5,1,1 give
/// a,a,b,a,c,a,a rather than a,a,a,a,a,b,c.
fn smooth_rotation(weights: &[u32]) -> Vec<u32> {
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    let weights: Vec<i64> = weights.iter().map(|w| i64::from(w / divisor)).collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut rotation = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        for (c, w) in current.iter_mut().zip(&weights) {
            *c += w;
        }
        let (best, _) = current
            .iter()
            .enumerate()
            .max_by_key(|(i, c)| (**c, std::cmp::Reverse(*i)))
            .expect("total > 0 implies at least one backend");
        current[best] -= total;
        rotation.push(u32::try_from(best).expect("backend count fits in u32"));
    }
    rotation
}

/// Greatest common divisor; weights are divided by it so 2,2 rotates like 1,1.
pub(super) fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::super::testing::backends;
    use super::*;

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn picks(weights: &[u32], skip: &[BackendId], n: usize) -> Vec<u64> {
        let backends = backends(weights);
        let rr = RoundRobin::build(&backends, &BalanceState::default());
        (0..n)
            .map(|_| backends[rr.pick(&backends, CLIENT, skip).expect("a pick")].id)
            .collect()
    }

    #[test]
    fn equal_weights_take_turns() {
        assert_eq!(picks(&[1, 1, 1], &[], 6), vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn weights_interleave() {
        assert_eq!(smooth_rotation(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_rotation(&[2, 2]), vec![0, 1]);
        assert_eq!(picks(&[3, 1], &[], 8), vec![0, 0, 1, 0, 0, 0, 1, 0]);
    }

    #[test]
    fn skipped_backends_are_passed_over() {
        assert_eq!(picks(&[1, 1, 1], &[0, 1], 4), vec![2, 2, 2, 2]);
        let backends = backends(&[1, 1, 1]);
        let rr = RoundRobin::build(&backends, &BalanceState::default());
        assert_eq!(rr.pick(&backends, CLIENT, &[0, 1, 2]), None);
    }

    #[test]
    fn the_turn_survives_a_new_snapshot() {
        let state = BalanceState::default();
        let backends = backends(&[1, 1, 1]);
        let first = RoundRobin::build(&backends, &state);
        assert_eq!(first.pick(&backends, CLIENT, &[]), Some(0));
        let second = RoundRobin::build(&backends, &state);
        assert_eq!(second.pick(&backends, CLIENT, &[]), Some(1));
    }

    #[test]
    fn no_backend_no_pick() {
        assert_eq!(
            RoundRobin::build(&[], &BalanceState::default()).pick(&[], CLIENT, &[]),
            None
        );
    }
}
