//! The threads that carry connections (`threads`): each runs its own single-threaded
//! event loop, and a connection stays on the thread whose listener accepted it, so its
//! task, sockets and timers are never handed between threads (Pingora's no-steal
//! runtime). The supervisor and the admin API run on lb's other runtime.

use std::io;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::{Builder, Handle};

/// How often each connection thread's own timer fires. tokio's timer wakes its event
/// loop through an eventfd (a `write`, and an `epoll_wait` that returns at once) whenever
/// a timer is armed earlier than the loop's next wake-up; with this timer pending, that
/// wake-up is never more than a second away, so arming a connection's connect timeout
/// (2 s by default) or idle timeout (1 h) costs no system call.
const TICK: Duration = Duration::from_secs(1);

/// Handles on the running connection threads' event loops.
#[derive(Debug, Clone)]
pub(super) struct Threads(Arc<[Handle]>);

impl Threads {
    /// Starts `count` threads; they run until the process exits.
    pub(super) fn start(count: NonZeroUsize) -> io::Result<Threads> {
        let mut handles = Vec::with_capacity(count.get());
        for i in 0..count.get() {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            handles.push(runtime.handle().clone());
            std::thread::Builder::new()
                .name(format!("lb-conn-{i}"))
                .spawn(move || {
                    runtime.block_on(async {
                        loop {
                            tokio::time::sleep(TICK).await;
                        }
                    });
                })?;
        }
        Ok(Threads(handles.into()))
    }

    pub(super) fn handles(&self) -> &[Handle] {
        &self.0
    }
}
