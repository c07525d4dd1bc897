//! The Maglev lookup table (Eisenbud et al., "Maglev: A Fast and Reliable Software
//! Network Load Balancer", NSDI 2016): a prime-sized table in which each backend owns
//! about its weighted share of the entries, filled from per-backend permutations, so
//! that adding or removing a backend changes few entries.
//!
//! Everything is derived from the members' names with fixed seeds, and the members are
//! sorted first: two lb processes given the same set build the same table, whatever the
//! order of the config file.

use std::net::IpAddr;
use std::sync::Arc;

use super::round_robin::gcd;

/// Table sizes: primes, each about four times the last. The table takes the smallest
/// at least [`ENTRIES_PER_MEMBER`] × members, so each member's share is even to about 1 %.
const SIZES: [usize; 7] = [257, 1_031, 4_099, 16_411, 65_537, 262_147, 1_048_583];

/// Entries per member the table size aims at (Maglev's paper uses M ≥ 100 × N).
const ENTRIES_PER_MEMBER: usize = 100;

/// Fixed hash seeds: part of lb's behaviour, as two instances must agree. Changing one
/// moves every client.
const OFFSET_SEED: u64 = 0x6c62_2d6d_6167_6c65; // "lb-magle"
const SKIP_SEED: u64 = 0x762d_736b_6970_2d31; // "v-skip-1"
const CLIENT_SEED: u64 = 0x6c62_2d63_6c69_656e; // "lb-clien"
const CLIENT_STEP_SEED: u64 = 0x742d_7374_6570_2d31; // "t-step-1"

/// A backend the table is built over: its identity and its weight.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Member {
    pub name: Arc<str>,
    pub weight: u32,
}

impl Member {
    pub fn new(name: impl Into<Arc<str>>, weight: u32) -> Self {
        Member {
            name: name.into(),
            weight,
        }
    }
}

/// A built table: which member owns each entry.
#[derive(Debug)]
pub struct Maglev {
    /// The members, sorted by name; an entry holds an index into this list.
    members: Box<[Member]>,
    entries: Box<[u32]>,
}

impl Maglev {
    /// Builds the table over `members` (duplicates by name count once).
    pub fn new(members: &[Member]) -> Self {
        let mut members = members.to_vec();
        members.sort();
        members.dedup_by(|a, b| a.name == b.name);
        let entries = populate(&members, table_size(members.len()));
        Maglev {
            members: members.into(),
            entries: entries.into(),
        }
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The number of entries: a prime, 0 without members.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The member owning `entry`, as an index into [`Maglev::members`].
    pub fn owner(&self, entry: usize) -> usize {
        self.entries[entry] as usize
    }

    /// The members in `client`'s own order of preference: the owner of its entry first,
    /// then the owners of every other entry once, in a sequence drawn from its address
    /// (a member appears as often as it owns entries). Its backend is the first ready one.
    pub fn preference(&self, client: IpAddr) -> impl Iterator<Item = usize> + '_ {
        let len = self.entries.len() as u64;
        // An IPv4 client seen on an IPv6 socket (::ffff:a.b.c.d) is the same client.
        let (first, step) = match client.to_canonical() {
            IpAddr::V4(ip) => client_hashes(&ip.octets()),
            IpAddr::V6(ip) => client_hashes(&ip.octets()),
        };
        // A step in 1..len visits every entry of a prime-sized table once.
        let (start, step) = match len {
            0 => (0, 1),
            1 => (0, 1),
            _ => (first % len, step % (len - 1) + 1),
        };
        (0..len).map(move |k| self.owner(((start + k * step) % len) as usize))
    }

    /// The index of the member named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.members.binary_search_by(|m| (*m.name).cmp(name)).ok()
    }
}

/// The smallest listed prime with [`ENTRIES_PER_MEMBER`] entries per member, capped at
/// the largest (about 10,000 members; more get fewer entries each).
fn table_size(members: usize) -> usize {
    if members == 0 {
        return 0;
    }
    let wanted = members.saturating_mul(ENTRIES_PER_MEMBER);
    SIZES
        .iter()
        .copied()
        .find(|&size| size >= wanted)
        .unwrap_or(SIZES[SIZES.len() - 1])
}

/// Maglev's population: members take turns claiming the next free entry of their own
/// permutation (`offset`, `offset + skip`, … mod `size`), each as many turns per round
/// as its weight (divided by the weights' common divisor), until every entry is owned.
fn populate(members: &[Member], size: usize) -> Vec<u32> {
    const FREE: u32 = u32::MAX;
    let mut entries = vec![FREE; size];
    if members.is_empty() {
        return entries;
    }
    let divisor = members.iter().map(|m| m.weight).fold(0, gcd).max(1);
    let size64 = size as u64;
    let mut walks: Vec<(u64, u64, u32)> = members
        .iter()
        .map(|m| {
            let offset = hash(OFFSET_SEED, m.name.as_bytes()) % size64;
            // In 1..size: with a prime size every step visits every entry once.
            let skip = hash(SKIP_SEED, m.name.as_bytes()) % (size64 - 1) + 1;
            (offset, skip, (m.weight / divisor).max(1))
        })
        .collect();
    let mut filled = 0;
    loop {
        for (index, (next, skip, turns)) in walks.iter_mut().enumerate() {
            for _ in 0..*turns {
                while entries[*next as usize] != FREE {
                    *next = (*next + *skip) % size64;
                }
                entries[*next as usize] = u32::try_from(index).expect("members fit in u32");
                *next = (*next + *skip) % size64;
                filled += 1;
                if filled == size {
                    return entries;
                }
            }
        }
    }
}

/// Where a client's preference starts in the table, and the step it walks it with.
fn client_hashes(address: &[u8]) -> (u64, u64) {
    (hash(CLIENT_SEED, address), hash(CLIENT_STEP_SEED, address))
}

/// FNV-1a over `bytes`, started from a seeded basis and finished with MurmurHash3's
/// 64-bit mixer, so every input bit reaches every output bit. Stable across builds and
/// platforms, unlike the standard library's hashers.
fn hash(seed: u64, bytes: &[u8]) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = 0xcbf2_9ce4_8422_2325 ^ seed;
    for &byte in bytes {
        h ^= u64::from(byte);
        h = h.wrapping_mul(PRIME);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use proptest::prelude::*;

    use super::*;

    fn members(n: usize) -> Vec<Member> {
        (0..n).map(|i| Member::new(format!("web/{i}"), 1)).collect()
    }

    /// How many entries each member owns.
    fn shares(table: &Maglev) -> Vec<usize> {
        let mut shares = vec![0; table.members().len()];
        for entry in 0..table.len() {
            shares[table.owner(entry)] += 1;
        }
        shares
    }

    fn owner_name(table: &Maglev, entry: usize) -> &str {
        &table.members()[table.owner(entry)].name
    }

    #[test]
    fn the_size_is_a_listed_prime_with_100_entries_per_member() {
        assert_eq!(table_size(0), 0);
        assert_eq!(table_size(1), 257);
        assert_eq!(table_size(2), 257);
        assert_eq!(table_size(3), 1_031);
        assert_eq!(table_size(11), 4_099);
        assert_eq!(table_size(100), 16_411);
        assert_eq!(table_size(1_000_000), 1_048_583);
    }

    #[test]
    fn the_hash_is_fixed() {
        // Pinned: a change here moves the clients of every lb that upgrades.
        assert_eq!(hash(0, b""), 0xefd0_1f60_ba99_2926);
        assert_eq!(hash(CLIENT_SEED, &[10, 1, 2, 3]), 0xc53f_b7a6_be3e_e301);
        let table = Maglev::new(&members(3));
        assert_eq!(table.entries[..12], [0, 1, 2, 1, 1, 1, 1, 1, 2, 0, 2, 2]);
        let client = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
        let order: Vec<usize> = table.preference(client).take(6).collect();
        assert_eq!(order, [1, 1, 0, 1, 1, 0]);
    }

    #[test]
    fn a_preference_visits_every_entry_once() {
        let table = Maglev::new(&[Member::new("a:1", 2), Member::new("b:1", 1)]);
        let client = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
        let mut seen = vec![0; 2];
        for member in table.preference(client) {
            seen[member] += 1;
        }
        assert_eq!(seen, shares(&table));
    }

    #[test]
    fn weights_set_the_shares() {
        let table = Maglev::new(&[Member::new("a:1", 3), Member::new("b:1", 1)]);
        let shares = shares(&table);
        assert_eq!(shares.iter().sum::<usize>(), 257);
        // 3/4 of 257 is 192.75.
        assert!((190..=195).contains(&shares[0]), "{shares:?}");
    }

    #[test]
    fn the_order_of_members_does_not_matter() {
        let mut reversed = members(5);
        reversed.reverse();
        let (a, b) = (Maglev::new(&members(5)), Maglev::new(&reversed));
        assert_eq!(a.entries, b.entries);
        assert_eq!(a.index_of("web/3"), Some(3));
        assert_eq!(a.index_of("web/9"), None);
    }

    #[test]
    fn ipv4_mapped_clients_are_ipv4_clients() {
        let table = Maglev::new(&members(4));
        let v4 = Ipv4Addr::new(192, 0, 2, 7);
        let order = |ip: IpAddr| table.preference(ip).take(20).collect::<Vec<_>>();
        assert_eq!(
            order(IpAddr::V4(v4)),
            order(IpAddr::V6(v4.to_ipv6_mapped()))
        );
        assert_eq!(order(IpAddr::V6(Ipv6Addr::LOCALHOST)).len(), 20);
        assert_eq!(
            Maglev::new(&[])
                .preference(IpAddr::V6(Ipv6Addr::LOCALHOST))
                .count(),
            0
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Each of N equal members owns about 1/N of the table.
        #[test]
        fn each_member_owns_about_its_share(n in 1usize..40) {
            let table = Maglev::new(&members(n));
            let fair = table.len() as f64 / n as f64;
            for share in shares(&table) {
                let ratio = share as f64 / fair;
                prop_assert!((0.9..=1.1).contains(&ratio), "share {share} of fair {fair}");
            }
        }

        /// Removing one of N members moves its own entries, about 1/N of the table, and
        /// few others: Maglev gives up a little stability for balance (the paper's
        /// figure 12), here at most 3 % of the table for up to 40 members.
        #[test]
        fn removing_a_member_moves_about_its_share(n in 2usize..40, removed in 0usize..40) {
            let gone = format!("web/{}", removed % n);
            let before = Maglev::new(&members(n));
            let rest: Vec<Member> = members(n).into_iter().filter(|m| *m.name != *gone).collect();
            let after = Maglev::new(&rest);
            prop_assume!(before.len() == after.len());
            let (mut own, mut others) = (0, 0);
            for entry in 0..before.len() {
                let (was, is) = (owner_name(&before, entry), owner_name(&after, entry));
                if was == gone {
                    own += 1;
                } else if was != is {
                    others += 1;
                }
            }
            let share = before.len() as f64 / n as f64;
            prop_assert!((own as f64) <= share * 1.1, "{} entries of the removed member, about {} expected", own, share);
            prop_assert!(others as f64 <= 0.03 * before.len() as f64, "{} entries of members that stayed moved", others);
        }

        /// The same members give the same table and the same entry for every client.
        #[test]
        fn tables_are_deterministic(n in 1usize..30, clients in proptest::collection::vec(any::<u32>(), 1..50)) {
            let (a, b) = (Maglev::new(&members(n)), Maglev::new(&members(n)));
            prop_assert_eq!(&a.entries, &b.entries);
            for c in clients {
                let ip = IpAddr::V4(Ipv4Addr::from(c));
                prop_assert!(a.preference(ip).take(10).eq(b.preference(ip).take(10)));
            }
        }
    }
}
