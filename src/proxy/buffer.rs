//! Copy buffers, lent from a small per-thread pool: a read borrows one and usually gives
//! it back within the same poll, so a connection keeps one only while a peer has not
//! taken what was read for it.

use std::cell::RefCell;

/// Bytes per read: HAProxy's default `tune.bufsize`, and the most a direction holds.
/// Offsets into a buffer are `u16`, which keeps a direction small.
pub(super) const CHUNK: usize = 16 * 1024;
const _: () = assert!(CHUNK <= u16::MAX as usize);

/// Free buffers a thread keeps. A few cover every connection a thread serves; more would
/// only be memory kept after a burst of slow peers.
const POOL_CAP: usize = 8;

/// A thin pointer, so a direction that holds nothing costs 8 bytes.
pub(super) type Buffer = Box<[u8; CHUNK]>;

thread_local! {
    static POOL: RefCell<Vec<Buffer>> = const { RefCell::new(Vec::new()) };
}

/// A buffer from this thread's pool, or a new one when every pooled buffer is held by a
/// connection whose peer is slow.
pub(super) fn take() -> Buffer {
    POOL.with(|pool| pool.borrow_mut().pop())
        .unwrap_or_else(|| {
            vec![0; CHUNK]
                .into_boxed_slice()
                .try_into()
                .expect("the vector has CHUNK bytes")
        })
}

/// Returns a drained buffer to this thread's pool, or frees it if the pool is full.
pub(super) fn give_back(buf: Buffer) {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < POOL_CAP {
            pool.push(buf);
        }
    });
}
