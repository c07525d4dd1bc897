//! `source-hash`: Maglev consistent hashing of the client's IP over the *configured*
//! backends, so a client keeps its backend while that one stays ready, and a worker
//! replaced in its slot keeps its clients.

use std::net::IpAddr;
use std::sync::Arc;

use super::{BalanceState, Maglev, Select, first_not_skipped};
use crate::snapshot::{Backend, BackendId};

/// Marks a configured member with no ready backend in this snapshot.
const NOT_READY: u32 = u32::MAX;

/// The service's table, and where each of its members is among this snapshot's ready
/// backends.
///
/// A client goes to the first ready (and not skipped) member in its own order of
/// preference over the table ([`Maglev::preference`]). While every backend is ready that
/// is the owner of its entry; while one is down, only that one's clients move, each to
/// the next ready member in its own order: spread over the others by their shares, the
/// same as long as the ready set is, and left as soon as the backend is back.
#[derive(Debug)]
pub struct SourceHash {
    table: Option<Arc<Maglev>>,
    /// For each member of the table, its index in the pool's backends, or [`NOT_READY`].
    ready: Box<[u32]>,
}

impl Select for SourceHash {
    fn build(backends: &[Arc<Backend>], state: &BalanceState) -> Self {
        let table = state.maglev().cloned();
        let mut ready = vec![NOT_READY; table.as_ref().map_or(0, |t| t.members().len())];
        if let Some(table) = &table {
            for (i, backend) in backends.iter().enumerate() {
                if let Some(member) = table.index_of(&backend.label) {
                    ready[member] = u32::try_from(i).expect("backend count fits in u32");
                }
            }
        }
        SourceHash {
            table,
            ready: ready.into(),
        }
    }

    fn pick(&self, backends: &[Arc<Backend>], client: IpAddr, skip: &[BackendId]) -> Option<usize> {
        if !skip.is_empty() && backends.iter().all(|b| skip.contains(&b.id)) {
            return None;
        }
        if let Some(table) = &self.table {
            let found = table
                .preference(client)
                .map(|member| self.ready[member])
                .filter(|&i| i != NOT_READY)
                .map(|i| i as usize)
                .find(|&i| !skip.contains(&backends[i].id));
            if found.is_some() {
                return found;
            }
        }
        // Ready backends that are not in the table (none, as the supervisor builds them
        // from one config): better served in order than refused.
        first_not_skipped(backends, 0, skip)
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::super::Member;
    use super::super::testing::labelled;
    use super::*;

    /// A state whose table is built over `configured` (name, weight) members.
    fn state(configured: &[(&str, u32)]) -> BalanceState {
        let members: Vec<Member> = configured
            .iter()
            .map(|(n, w)| Member::new(*n, *w))
            .collect();
        BalanceState::with_table(Arc::new(Maglev::new(&members)))
    }

    fn client(i: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
    }

    /// The label of the backend each of `clients` clients is sent to.
    fn mapping(state: &BalanceState, ready: &[(&str, u32)], clients: u32) -> Vec<String> {
        let backends = labelled(ready);
        let sh = SourceHash::build(&backends, state);
        (0..clients)
            .map(|c| {
                backends[sh.pick(&backends, client(c), &[]).unwrap()]
                    .label
                    .to_string()
            })
            .collect()
    }

    const FOUR: [(&str, u32); 4] = [("web/0", 1), ("web/1", 1), ("web/2", 1), ("web/3", 1)];

    #[test]
    fn a_client_keeps_its_backend() {
        let state = state(&FOUR);
        let first = mapping(&state, &FOUR, 2000);
        assert_eq!(first, mapping(&state, &FOUR, 2000));
        for name in ["web/0", "web/1", "web/2", "web/3"] {
            let n = first.iter().filter(|l| *l == name).count();
            assert!((400..600).contains(&n), "{name}: {n} of 2000");
        }
    }

    #[test]
    fn only_the_clients_of_a_down_backend_move_and_they_come_back() {
        let state = state(&FOUR);
        let all = mapping(&state, &FOUR, 2000);
        let without_1 = [FOUR[0], FOUR[2], FOUR[3]];
        let down = mapping(&state, &without_1, 2000);
        for (before, during) in all.iter().zip(&down) {
            if before != "web/1" {
                assert_eq!(before, during);
            }
        }
        // The moved clients spread over the others rather than piling onto one.
        for name in ["web/0", "web/2", "web/3"] {
            let moved = all
                .iter()
                .zip(&down)
                .filter(|(b, d)| *b == "web/1" && *d == name)
                .count();
            assert!(moved > 80, "{name} took {moved} of about 500");
        }
        // The fallback is stable, and the clients return when the backend is back.
        assert_eq!(down, mapping(&state, &without_1, 2000));
        assert_eq!(all, mapping(&state, &FOUR, 2000));
    }

    #[test]
    fn a_pool_in_another_order_maps_the_same() {
        let state = state(&FOUR);
        let shuffled = [FOUR[2], FOUR[0], FOUR[3], FOUR[1]];
        assert_eq!(mapping(&state, &FOUR, 500), mapping(&state, &shuffled, 500));
    }

    #[test]
    fn skipped_backends_are_passed_over() {
        let state = state(&FOUR);
        let backends = labelled(&FOUR);
        let sh = SourceHash::build(&backends, &state);
        for c in 0..200 {
            let first = sh.pick(&backends, client(c), &[]).unwrap();
            let retry = sh.pick(&backends, client(c), &[first as u64]).unwrap();
            assert_ne!(first, retry);
        }
        assert_eq!(sh.pick(&backends, client(0), &[0, 1, 2, 3]), None);
    }

    #[test]
    fn weights_set_the_shares() {
        let weighted = [("10.0.0.1:80", 3), ("10.0.0.2:80", 1)];
        let state = state(&weighted);
        let map = mapping(&state, &weighted, 4000);
        let heavy = map.iter().filter(|l| *l == "10.0.0.1:80").count();
        assert!((2800..3200).contains(&heavy), "{heavy} of 4000");
    }

    #[test]
    fn backends_outside_the_table_still_serve() {
        let backends = labelled(&[("other", 1)]);
        let sh = SourceHash::build(&backends, &state(&FOUR));
        assert_eq!(sh.pick(&backends, client(1), &[]), Some(0));
        let sh = SourceHash::build(&backends, &BalanceState::default());
        assert_eq!(sh.pick(&backends, client(1), &[]), Some(0));
        assert_eq!(sh.pick(&[], client(1), &[]), None);
    }
}
