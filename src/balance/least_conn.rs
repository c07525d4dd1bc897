//! `least-conn`: the ready backend with the fewest active connections for its weight;
//! ties in turn.

use std::net::IpAddr;
use std::sync::Arc;

use super::{BalanceState, Load, RoundRobin, Select};
use crate::snapshot::{Backend, BackendId};

/// Scans every ready backend's active count (kept in its `BackendStats`, which outlive
/// snapshots, so connections placed under an older snapshot still count).
#[derive(Debug)]
pub struct LeastConn {
    /// Breaks ties: among equally loaded backends (all idle, say) connections go in the
    /// weighted round-robin turn, so weights count even when load does not tell.
    turn: RoundRobin,
}

impl Select for LeastConn {
    fn build(backends: &[Arc<Backend>], state: &BalanceState) -> Self {
        LeastConn {
            turn: RoundRobin::build(backends, state),
        }
    }

    fn pick(&self, backends: &[Arc<Backend>], _: IpAddr, skip: &[BackendId]) -> Option<usize> {
        // The lightest load for its weight, as carried by one of the backends...
        let mut least: Option<(usize, Load)> = None;
        for (i, backend) in backends.iter().enumerate() {
            if skip.contains(&backend.id) {
                continue;
            }
            let load = Load::of(backend);
            if least.is_none_or(|(_, l)| load.lighter_than(l)) {
                least = Some((i, load));
            }
        }
        let (least, lightest) = least?;
        // ...and of the backends that light, the next in turn. Counts may move between
        // the two looks (other connections); then the first look's answer stands.
        let tied = |i: usize| {
            !skip.contains(&backends[i].id) && !lightest.lighter_than(Load::of(&backends[i]))
        };
        Some(self.turn.next_where(tied).unwrap_or(least))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{backends, load};
    use super::*;

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn selector(backends: &[Arc<Backend>]) -> LeastConn {
        LeastConn::build(backends, &BalanceState::default())
    }

    #[test]
    fn the_least_busy_backend_wins() {
        let b = backends(&[1, 1, 1]);
        let _busy = [load(&b[0], 3), load(&b[1], 1), load(&b[2], 2)];
        let lc = selector(&b);
        for _ in 0..6 {
            assert_eq!(lc.pick(&b, CLIENT, &[]), Some(1));
        }
    }

    #[test]
    fn ties_go_in_turn() {
        let b = backends(&[1, 1, 1]);
        let lc = selector(&b);
        let picks: Vec<_> = (0..6).map(|_| lc.pick(&b, CLIENT, &[]).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        let _busy = load(&b[0], 1);
        let picks: Vec<_> = (0..4).map(|_| lc.pick(&b, CLIENT, &[]).unwrap()).collect();
        assert_eq!(picks, vec![1, 2, 1, 2]);
    }

    #[test]
    fn load_is_weighed_by_weight() {
        let b = backends(&[3, 1]);
        // 2/3 < 1/1: the heavier backend still has room.
        let (_a, _b) = (load(&b[0], 2), load(&b[1], 1));
        assert_eq!(selector(&b).pick(&b, CLIENT, &[]), Some(0));
        // 3/3 = 1/1: a tie, broken by the turn (weighted: backend 0 three times in four).
        let _c = load(&b[0], 1);
        let lc = selector(&b);
        let picks: Vec<_> = (0..4).map(|_| lc.pick(&b, CLIENT, &[]).unwrap()).collect();
        assert_eq!(picks, vec![0, 0, 1, 0]);
    }

    #[test]
    fn connections_held_open_spread_by_weight() {
        let b = backends(&[2, 1]);
        let lc = selector(&b);
        let held: Vec<_> = (0..30)
            .map(|_| b[lc.pick(&b, CLIENT, &[]).unwrap()].track())
            .collect();
        assert_eq!((b[0].stats.active(), b[1].stats.active()), (20, 10));
        drop(held);
    }

    #[test]
    fn skipped_backends_are_passed_over() {
        let b = backends(&[1, 1, 1]);
        let _busy = [load(&b[0], 5), load(&b[2], 5)];
        let lc = selector(&b);
        // Backend 1 is idle but failed this connection: the others take turns.
        let picks: Vec<_> = (0..4).map(|_| lc.pick(&b, CLIENT, &[1]).unwrap()).collect();
        assert_eq!(picks, vec![0, 2, 0, 2]);
        assert_eq!(lc.pick(&b, CLIENT, &[0, 1, 2]), None);
    }
}
