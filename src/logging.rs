//! Log setup (text or JSON on stderr) and the forwarding of worker output, each line
//! prefixed with `[service/id]`. Both are written by [`crate::output`].

use std::io::IsTerminal as _;
use std::os::fd::OwnedFd;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};

use tokio::io::AsyncReadExt as _;
use tokio_util::task::TaskTracker;
use tracing_subscriber::EnvFilter;

use crate::lines::LineBuffer;
use crate::output::{self, Stream};

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
        .with_writer(|| output::LogWriter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Every forwarding task, so lb can let them finish before it exits.
static FORWARDERS: LazyLock<TaskTracker> = LazyLock::new(TaskTracker::new);

/// Forwards a worker's output pipe until the worker closes it.
pub fn forward_output(label: Arc<str>, stream: Stream, fd: OwnedFd) {
    FORWARDERS.spawn(async move {
        let Ok(mut pipe) = tokio::net::unix::pipe::Receiver::from_owned_fd(fd) else {
            return;
        };
        let mut lines = LineBuffer::default();
        loop {
            let read = pipe.read_buf(lines.buf_mut()).await;
            while let Some(line) = lines.next_line() {
                emit(&label, stream, &line).await;
            }
            let done = !matches!(read, Ok(n) if n > 0);
            if (done || lines.pending() >= MAX_LINE) && lines.pending() > 0 {
                emit(&label, stream, &lines.take_pending()).await;
            }
            if done {
                return;
            }
        }
    });
}

/// Waits, up to `limit`, until the output of every worker is forwarded: the last lines
/// a stopping worker prints are often the ones that matter. A pipe still held open (a
/// daemon the worker left behind) must not keep lb from exiting.
pub async fn forwarded(limit: Duration) {
    FORWARDERS.close();
    let _ = tokio::time::timeout(limit, FORWARDERS.wait()).await;
}

/// Writes one worker line, waiting while lb's output is blocked (which stops this
/// worker's pipe from being read, so the worker waits too, as on a terminal).
async fn emit(label: &str, stream: Stream, line: &[u8]) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if FORMAT.get() == Some(&LogFormat::Json) {
        // The fields tracing's JSON lines have, so every line of the stream parses alike.
        let record = serde_json::json!({
            "timestamp": humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
            "level": "INFO",
            "message": String::from_utf8_lossy(line),
            "worker": label,
            "stream": match stream {
                Stream::Stdout => "stdout",
                Stream::Stderr => "stderr",
            },
        });
        let mut out = record.to_string().into_bytes();
        out.push(b'\n');
        return output::write(Stream::Stderr, out).await;
    }
    // One write per line so lines from different workers never interleave.
    let mut out = Vec::with_capacity(label.len() + line.len() + 4);
    out.push(b'[');
    out.extend_from_slice(label.as_bytes());
    out.extend_from_slice(b"] ");
    out.extend_from_slice(line);
    out.push(b'\n');
    output::write(stream, out).await;
}
