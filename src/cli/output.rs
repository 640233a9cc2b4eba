//! Shared output helpers: one-line errors, sizes as qemu-img prints them.

use std::io;

/// The error and its causes on one line, `outer: inner: cause`, with
/// repeated parts and newlines removed.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let s = cause.to_string().replace('\n', " ");
        if s.is_empty() || parts.last().is_some_and(|p| p.ends_with(&s)) {
            continue;
        }
        parts.push(s);
    }
    parts.join(": ")
}

/// Standard output for reports and listings. A write that fails because
/// the reader went away (`imgsync map img | head`) carries a
/// [`StdoutClosed`] marker, so `main` can tell it from a broken pipe to the
/// peer or to a file, which must never end quietly.
pub fn stdout() -> Stdout {
    Stdout(io::stdout())
}

pub struct Stdout(io::Stdout);

/// The payload of the io::Error a write to a closed stdout returns.
#[derive(Debug, thiserror::Error)]
#[error("stdout: the reader closed the pipe")]
pub struct StdoutClosed;

fn mark(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::BrokenPipe {
        io::Error::new(io::ErrorKind::BrokenPipe, StdoutClosed)
    } else {
        e
    }
}

impl io::Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf).map_err(mark)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush().map_err(mark)
    }
}

/// Whether `e` is a write to stdout whose reader went away (and nothing
/// else: a broken pipe to the peer or to a `-` stream is a real error).
pub fn is_stdout_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .and_then(|io| io.get_ref())
            .is_some_and(|inner| inner.is::<StdoutClosed>())
            || c.is::<StdoutClosed>()
    })
}

/// Runs a listing's printer `f` on a buffered stdout, flushed at the end.
pub fn listing(f: impl FnOnce(&mut dyn io::Write) -> anyhow::Result<u8>) -> anyhow::Result<u8> {
    let mut out = io::BufWriter::new(stdout());
    let code = f(&mut out)?;
    io::Write::flush(&mut out)?;
    Ok(code)
}

/// A line on stderr that never panics: with stderr closed (sshd gone, a
/// closed pipe) there is nobody to tell, and the exit status still says it.
pub fn eprint_line(line: &str) {
    use io::Write;
    let mut e = io::stderr().lock();
    let _ = writeln!(e, "{line}");
    let _ = e.flush();
}

pub use crate::engine::units::human_size;

/// Seconds for a JSON report: rounded to milliseconds.
pub fn seconds(d: std::time::Duration) -> f64 {
    seconds_f64(d.as_secs_f64())
}

/// [`seconds`] of a float.
pub fn seconds_f64(s: f64) -> f64 {
    (s * 1000.0).round() / 1000.0
}
