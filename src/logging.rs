//! Log setup (text or JSON on stderr) and the forwarding of worker output, each line
//! prefixed with `[service/id]`.

use std::io::{IsTerminal as _, Write as _};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use tokio::io::AsyncReadExt as _;
use tracing_subscriber::EnvFilter;

use crate::lines::LineBuffer;

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// A longer line from a worker is forwarded in pieces of this size, so one endless line
/// neither grows lb's memory nor stalls the worker on a full pipe.
const MAX_LINE: usize = 64 * 1024;

static FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// Installs the global subscriber. The level comes from `LB_LOG` (default `info`).
pub fn init(format: LogFormat) {
    let _ = FORMAT.set(format);
    let filter = EnvFilter::try_from_env("LB_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Which of a worker's output streams a line came from; lb re-emits it on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// Forwards a worker's output pipe until the worker closes it.
pub fn forward_output(label: Arc<str>, stream: OutputStream, fd: OwnedFd) {
    tokio::spawn(async move {
        let Ok(mut pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
            return;
        };
        let mut lines = LineBuffer::default();
        loop {
            let read = pipe.read_buf(lines.buf_mut()).await;
            while let Some(line) = lines.next_line() {
                emit(&label, stream, &line);
            }
            let done = !matches!(read, Ok(n) if n > 0);
            if (done || lines.pending() >= MAX_LINE) && lines.pending() > 0 {
                emit(&label, stream, &lines.take_pending());
            }
            if done {
                return;
            }
        }
    });
}

fn emit(label: &str, stream: OutputStream, line: &[u8]) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if FORMAT.get() == Some(&LogFormat::Json) {
        let text = String::from_utf8_lossy(line);
        let stream = match stream {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
        };
        tracing::info!(worker = label, stream, "{text}");
        return;
    }
    // One write per line so lines from different workers never interleave.
    let mut out = Vec::with_capacity(label.len() + line.len() + 4);
    out.push(b'[');
    out.extend_from_slice(label.as_bytes());
    out.extend_from_slice(b"] ");
    out.extend_from_slice(line);
    out.push(b'\n');
    let _ = match stream {
        OutputStream::Stdout => std::io::stdout().lock().write_all(&out),
        OutputStream::Stderr => std::io::stderr().lock().write_all(&out),
    };
}
