//! Client connections held open across a rollout, a reload or a stop, each knowing which
//! worker process it reached (the test worker's `HELLO=1` line).

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};

/// One open connection through lb to a `HELLO=1` worker.
pub struct Held {
    stream: TcpStream,
    /// The slot and pid of the worker process at the other end.
    pub slot: usize,
    pub pid: i32,
    exchanges: usize,
}

impl Held {
    /// Connects and reads the worker's hello line.
    pub fn open(addr: SocketAddr) -> Held {
        let mut stream = super::connect(addr);
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        // Byte by byte, so nothing after the line is read ahead and lost.
        while byte[0] != b'\n' {
            stream
                .read_exact(&mut byte)
                .expect("the worker's hello line");
            line.push(byte[0]);
        }
        let line = format!(" {}", String::from_utf8_lossy(&line).trim_end());
        let number = |key| -> i64 {
            super::field(&line, key)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in hello line {line:?}"))
        };
        Held {
            slot: number("id") as usize,
            pid: number("pid") as i32,
            stream,
            exchanges: 0,
        }
    }

    /// Sends a line and reads the same line back.
    pub fn try_exchange(&mut self) -> std::io::Result<()> {
        self.exchanges += 1;
        let msg = format!("exchange {} with pid {}\n", self.exchanges, self.pid);
        self.stream.write_all(msg.as_bytes())?;
        let mut reply = vec![0u8; msg.len()];
        self.stream.read_exact(&mut reply)?;
        if reply == msg.as_bytes() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "sent {msg:?}, got back {:?}",
                String::from_utf8_lossy(&reply)
            )))
        }
    }

    /// As [`Held::try_exchange`]; panics naming the worker when it fails.
    pub fn exchange(&mut self) {
        if let Err(err) = self.try_exchange() {
            panic!(
                "the connection to worker {} (pid {}) failed: {err}",
                self.slot, self.pid
            );
        }
    }
}

/// Opens connections until each of slots `0..count` holds one (round-robin spreads
/// them); the extra connections are closed. Sorted by slot.
pub fn one_per_slot(addr: SocketAddr, count: usize) -> Vec<Held> {
    let mut held: Vec<Held> = Vec::new();
    for _ in 0..count * 8 {
        let conn = Held::open(addr);
        if !held.iter().any(|h| h.slot == conn.slot) {
            held.push(conn);
        }
        if held.len() == count {
            held.sort_by_key(|h| h.slot);
            for conn in &mut held {
                conn.exchange();
            }
            return held;
        }
    }
    panic!(
        "{count} slots, but connections reached only {:?}",
        held.iter().map(|h| h.slot).collect::<Vec<_>>()
    );
}

/// Closes every connection at once.
pub fn close_all(held: Vec<Held>) {
    for conn in held {
        let _ = conn.stream.shutdown(std::net::Shutdown::Both);
    }
}
