//! Which admin connections stay open, so `/healthz` and `/metrics` answer at once however
//! many other clients are connected, idle or slow.
//!
//! lb accepts every connection at once instead of letting new ones queue behind open
//! ones. When [`GENERAL`] connections are open, a new one takes the place of one that
//! waits on its client: first the one that has sent nothing for longest (no request
//! yet, an idle keep-alive), then the one whose request or body has trickled in for
//! longest. nginx closes idle connections the same way when it runs short, and a header
//! timeout (HAProxy's `timeout http-request`) bounds how long any of them waits anyway.
//! A probe that sent its request with its connect is therefore never closed to make
//! room for clients that send nothing. Connections whose request lb is answering are
//! never closed; when all [`GENERAL`] are such, a new connection goes to the probe lane,
//! a small budget of its own that answers only the cheap GETs (`/healthz`, `/metrics`)
//! and closes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio_util::sync::CancellationToken;

/// Connections served in full: enough for scrapers and operators, and far below the
/// file descriptors the proxy needs.
pub const GENERAL: usize = 64;
/// Connections that get only `/healthz` and `/metrics` while every general one is busy.
pub const PROBE: usize = 16;

/// What a connection may ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Every route, keep-alive.
    General,
    /// `GET /healthz` and `GET /metrics` only, one request per connection.
    Probe,
}

#[derive(Debug)]
struct Entry {
    lane: Lane,
    /// Since when the connection waits on its client, as a tick of [`Entries::clock`];
    /// None while lb answers a request.
    waiting_since: Option<u64>,
    /// Whether the client had begun sending a request when it started to wait.
    sending: bool,
    closed: CancellationToken,
}

#[derive(Debug, Default)]
struct Entries {
    /// Counts admissions and answers: only the order of events matters here.
    clock: u64,
    open: HashMap<u64, Entry>,
}

impl Entries {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn count(&self, lane: Lane) -> usize {
        self.open.values().filter(|e| e.lane == lane).count()
    }

    /// Makes room in `lane` if it is full, by closing the connection that has waited
    /// longest on a client that sends nothing, else on one that sends slowly; false if
    /// every one is busy.
    fn make_room(&mut self, lane: Lane, size: usize) -> bool {
        if self.count(lane) < size {
            return true;
        }
        let oldest = self
            .open
            .iter()
            .filter(|(_, e)| e.lane == lane)
            .filter_map(|(id, e)| Some((e.sending, e.waiting_since?, *id)))
            .min();
        let Some((_, _, id)) = oldest else {
            return false;
        };
        if let Some(entry) = self.open.remove(&id) {
            entry.closed.cancel();
        }
        true
    }
}

/// The open admin connections.
#[derive(Debug, Default)]
pub struct Pool {
    entries: Mutex<Entries>,
}

impl Pool {
    /// Takes in a new connection, whose client has already begun `sending` its request
    /// or not, closing an older one if need be; None when every connection of both
    /// lanes is busy answering, and the new one must be closed.
    pub fn admit(self: &Arc<Self>, sending: bool) -> Option<Ticket> {
        let mut entries = self.lock();
        let lane = if entries.make_room(Lane::General, GENERAL) {
            Lane::General
        } else if entries.make_room(Lane::Probe, PROBE) {
            Lane::Probe
        } else {
            return None;
        };
        let id = entries.tick();
        let closed = CancellationToken::new();
        let entry = Entry {
            lane,
            waiting_since: Some(id),
            sending,
            closed: closed.clone(),
        };
        entries.open.insert(id, entry);
        Some(Ticket {
            pool: Arc::clone(self),
            id,
            lane,
            closed,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        // Entries stay consistent whatever panicked while holding the lock.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_waiting(&self, id: u64, waiting: bool) {
        let mut entries = self.lock();
        let since = waiting.then(|| entries.tick());
        if let Some(entry) = entries.open.get_mut(&id) {
            entry.waiting_since = since;
            // After an answer, a keep-alive connection waits for a request not yet begun.
            entry.sending = false;
        }
    }
}

/// One open connection's place in the pool; dropping it frees the place.
#[derive(Debug)]
pub struct Ticket {
    pool: Arc<Pool>,
    id: u64,
    lane: Lane,
    closed: CancellationToken,
}

impl Ticket {
    pub fn lane(&self) -> Lane {
        self.lane
    }

    /// Completes when the pool closed this connection to make room for a newer one.
    pub async fn closed(&self) {
        self.closed.cancelled().await;
    }

    /// Marks the connection busy until the guard drops: lb is answering its request, so
    /// it is not closed to make room.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.pool.set_waiting(self.id, false);
        Busy(Arc::clone(self))
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.pool.lock().open.remove(&self.id);
    }
}

/// See [`Ticket::busy`].
#[derive(Debug)]
pub struct Busy(Arc<Ticket>);

impl Drop for Busy {
    fn drop(&mut self) {
        // Writing the answer and waiting for the next request wait on the client.
        self.0.pool.set_waiting(self.0.id, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(pool: &Arc<Pool>, n: usize) -> Vec<Arc<Ticket>> {
        (0..n)
            .map(|_| Arc::new(pool.admit(false).expect("admitted")))
            .collect()
    }

    fn is_closed(ticket: &Ticket) -> bool {
        ticket.closed.is_cancelled()
    }

    #[test]
    fn a_full_pool_closes_the_connection_that_waited_longest() {
        let pool = Arc::new(Pool::default());
        let mut open = Vec::new();
        for _ in 0..GENERAL {
            open.push(Arc::new(pool.admit(false).expect("admitted")));
        }
        // The first connection answered a request a moment ago: it is the freshest now.
        drop(open[0].busy());
        let newcomer = pool.admit(false).expect("admitted");
        assert_eq!(newcomer.lane(), Lane::General);
        assert!(!is_closed(&open[0]));
        assert!(is_closed(&open[1]), "the oldest waiting one goes");
        assert!(open[2..].iter().all(|t| !is_closed(t)));
    }

    #[test]
    fn clients_that_send_nothing_go_before_those_that_send_a_request() {
        let pool = Arc::new(Pool::default());
        let sending = Arc::new(pool.admit(true).expect("admitted"));
        let silent = fill(&pool, GENERAL - 1);
        let newer = fill(&pool, GENERAL - 1);
        assert!(newer.iter().all(|t| t.lane() == Lane::General));
        assert!(silent.iter().all(|t| is_closed(t)));
        assert!(!is_closed(&sending), "the oldest, but it sends a request");
        // Once answered, it waits like any idle keep-alive connection, and goes in turn.
        drop(sending.busy());
        let _newest = fill(&pool, GENERAL);
        assert!(is_closed(&sending));
    }

    #[test]
    fn busy_connections_stay_and_newcomers_get_the_probe_lane() {
        let pool = Arc::new(Pool::default());
        let general = fill(&pool, GENERAL);
        let _busy: Vec<Busy> = general.iter().map(Ticket::busy).collect();
        let probes = fill(&pool, PROBE);
        assert!(probes.iter().all(|t| t.lane() == Lane::Probe));
        // A full probe lane makes room too; no busy general connection is touched.
        let next = pool.admit(false).expect("admitted");
        assert_eq!(next.lane(), Lane::Probe);
        assert!(is_closed(&probes[0]));
        assert!(general.iter().all(|t| !is_closed(t)));
        // Only when every connection of both lanes is busy is a newcomer refused.
        let _probe_busy: Vec<Busy> = probes[1..].iter().map(Ticket::busy).collect();
        let next = Arc::new(next);
        let _next_busy = next.busy();
        assert!(pool.admit(true).is_none());
    }

    #[test]
    fn a_closed_connection_frees_its_place() {
        let pool = Arc::new(Pool::default());
        let mut general = fill(&pool, GENERAL);
        let _busy: Vec<Busy> = general[1..].iter().map(Ticket::busy).collect();
        drop(general.remove(0));
        assert_eq!(pool.admit(false).map(|t| t.lane()), Some(Lane::General));
        assert!(general.iter().all(|t| !is_closed(t)), "nobody was closed");
    }
}
