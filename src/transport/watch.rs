//! Waiting on the peer with limits. Every blocking read or write of a
//! transport wakes up every [`SLICE`] to see whether the user interrupted
//! (SIGINT/SIGTERM: the flag the cli sets) and whether the peer has been
//! silent for longer than `--timeout`. Nothing here waits for ever: a peer
//! that stops talking (a killed host, a black-holed link) is an error after
//! the timeout, and Ctrl-C ends any wait within a slice.
//!
//! An end that is busy with nothing to send keeps the other end's timer
//! from running out with KEEPALIVE frames (the protocol's business, see
//! `FrameWriter::start_keepalive`).

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags, Timespec};

/// How often a blocked read or write wakes up to check the flag and the
/// clock: well under the second Ctrl-C must take.
pub const SLICE: Duration = Duration::from_millis(200);

/// The limits of one connection's waits. Clones share the timeout, so it
/// can be lifted after the handshake for a peer that sends no keepalives
/// (an older imgsync: its silence while busy is not death).
#[derive(Clone, Debug, Default)]
pub struct Watch {
    /// Longest wait for a byte from the peer (or for the peer to take
    /// one), in milliseconds; 0: no limit.
    timeout_ms: Arc<AtomicU64>,
    /// Set by SIGINT/SIGTERM.
    pub cancel: Option<Arc<AtomicBool>>,
}

/// The payload of the io::Error a wait returns when the user interrupted
/// it (SIGINT/SIGTERM).
#[derive(Debug, thiserror::Error)]
#[error("interrupted")]
pub struct Cancelled;

/// Whether `e` (or what it wraps) is a wait the user interrupted.
pub fn is_cancelled(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if c.is::<Cancelled>() {
            return true;
        }
        if let Some(io) = c.downcast_ref::<io::Error>() {
            if io.get_ref().is_some_and(|i| i.is::<Cancelled>()) {
                return true;
            }
        }
        cur = c.source();
    }
    false
}

/// Whether `e` (or what it wraps) is a wait that ran out of `--timeout`.
pub fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if c.downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::TimedOut)
        {
            return true;
        }
        cur = c.source();
    }
    false
}

/// Which way a wait goes, for the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    Read,
    Write,
}

impl Watch {
    pub fn new(timeout: Option<Duration>, cancel: Option<Arc<AtomicBool>>) -> Watch {
        let w = Watch {
            timeout_ms: Arc::default(),
            cancel,
        };
        w.set_timeout(timeout);
        w
    }

    pub fn timeout(&self) -> Option<Duration> {
        match self.timeout_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// Changes the limit for every clone (the waits in progress too).
    pub fn set_timeout(&self, t: Option<Duration>) {
        let ms = t.map_or(0, |t| t.as_millis().clamp(1, u64::MAX.into()) as u64);
        self.timeout_ms.store(ms, Ordering::Relaxed);
    }

    pub fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    }

    /// An error when the user interrupted, or when `since` (the last byte
    /// from the peer, or the start of this wait) is longer ago than the
    /// timeout.
    pub fn check(&self, since: Instant, dir: Dir) -> io::Result<()> {
        if self.cancelled() {
            return Err(io::Error::other(Cancelled));
        }
        if let Some(t) = self.timeout() {
            if since.elapsed() >= t {
                return Err(timed_out(t, dir));
            }
        }
        Ok(())
    }
}

pub fn timed_out(t: Duration, dir: Dir) -> io::Error {
    let secs = t.as_secs_f64();
    io::Error::new(
        io::ErrorKind::TimedOut,
        match dir {
            Dir::Read => format!("no data from the peer for {secs} s (--timeout)"),
            Dir::Write => format!("the peer took no data for {secs} s (--timeout)"),
        },
    )
}

/// A pipe or socket read with a [`Watch`] (the descriptor is made
/// non-blocking).
pub struct FdReader<F> {
    f: F,
    watch: Watch,
}

impl<F: AsFd> FdReader<F> {
    pub fn new(f: F, watch: Watch) -> io::Result<Self> {
        rustix::io::ioctl_fionbio(&f, true)?;
        Ok(FdReader { f, watch })
    }
}

impl<F: AsFd + Read> Read for FdReader<F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let since = Instant::now();
        loop {
            match self.f.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
            self.watch.check(since, Dir::Read)?;
            wait_for(&self.f, PollFlags::IN)?;
        }
    }
}

/// A pipe or socket written with a [`Watch`] (the descriptor is made
/// non-blocking, so a write never blocks past a slice).
pub struct FdWriter<F> {
    f: F,
    watch: Watch,
    /// The stream from the peer (a duplicate of the reader's descriptor):
    /// while a write waits for a peer that is busy and not reading, the
    /// peer's keepalives pile up there, unread; their arrival shows the
    /// peer is alive.
    input: Option<OwnedFd>,
}

impl<F: AsFd> FdWriter<F> {
    pub fn new(f: F, watch: Watch) -> io::Result<Self> {
        rustix::io::ioctl_fionbio(&f, true)?;
        Ok(FdWriter {
            f,
            watch,
            input: None,
        })
    }

    /// Counts bytes arriving on `input` (the peer's stream) as a sign of
    /// life while a write waits.
    pub fn hearing(mut self, input: impl AsFd) -> io::Result<Self> {
        self.input = Some(input.as_fd().try_clone_to_owned()?);
        Ok(self)
    }
}

impl<F: AsFd + Write> Write for FdWriter<F> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut since = Instant::now();
        let mut pending = None;
        loop {
            match self.f.write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r,
            }
            if let Some(inp) = &self.input {
                // More unread bytes from the peer than at the last look: it
                // is alive (a keepalive came), only busy.
                if let Ok(n) = rustix::io::ioctl_fionread(inp) {
                    if pending.is_some_and(|p| n > p) {
                        since = Instant::now();
                    }
                    pending = Some(n);
                }
            }
            self.watch.check(since, Dir::Write)?;
            wait_for(&self.f, PollFlags::OUT)?;
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.f.flush()
    }
}

/// Puts a descriptor back in blocking mode when dropped (`serve` shares
/// its stdin and stdout with whoever started it; O_NONBLOCK is a property
/// of the open file, so it must not outlive the run).
pub struct RestoreBlocking(pub OwnedFd);

impl Drop for RestoreBlocking {
    fn drop(&mut self) {
        let _ = rustix::io::ioctl_fionbio(&self.0, false);
    }
}

/// Waits up to one [`SLICE`] for `f` to be ready (or closed).
fn wait_for(f: &impl AsFd, flags: PollFlags) -> io::Result<()> {
    let mut fds = [PollFd::new(f, flags)];
    let slice = Timespec {
        tv_sec: 0,
        tv_nsec: SLICE.as_nanos() as _,
    };
    match poll(&mut fds, Some(&slice)) {
        Ok(_) => Ok(()),
        Err(rustix::io::Errno::INTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_silent_peer_times_out() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut r = FdReader::new(a, Watch::new(Some(Duration::from_millis(300)), None)).unwrap();
        let t = Instant::now();
        let e = r.read(&mut [0u8; 8]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        assert!(is_timeout(&e));
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn the_flag_ends_a_wait_within_a_slice() {
        let (a, _b) = UnixStream::pair().unwrap();
        let flag = Arc::new(AtomicBool::new(false));
        let mut r = FdReader::new(a, Watch::new(None, Some(flag.clone()))).unwrap();
        let f2 = flag.clone();
        let t = Instant::now();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            f2.store(true, Ordering::Relaxed);
        });
        let e = r.read(&mut [0u8; 8]).unwrap_err();
        h.join().unwrap();
        assert!(is_cancelled(&e), "{e}");
        assert!(t.elapsed() < Duration::from_millis(300) + 2 * SLICE + Duration::from_millis(200));
    }

    #[test]
    fn data_and_eof_pass_through() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut r = FdReader::new(a, Watch::default()).unwrap();
        b.write_all(b"abc").unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(r.read(&mut buf).unwrap(), 3);
        drop(b);
        assert_eq!(r.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn a_busy_peer_that_sends_keepalives_keeps_a_blocked_writer_waiting() {
        let (a, b) = UnixStream::pair().unwrap();
        let (inp, mut keep) = UnixStream::pair().unwrap();
        let mut w = FdWriter::new(a, Watch::new(Some(Duration::from_millis(500)), None))
            .unwrap()
            .hearing(&inp)
            .unwrap();
        // The peer reads nothing for 1.5 s but says it is alive every 100 ms,
        // then reads everything.
        let t = std::thread::spawn(move || {
            for _ in 0..15 {
                keep.write_all(b"k").unwrap();
                std::thread::sleep(Duration::from_millis(100));
            }
            let mut b = b;
            let mut sink = vec![0u8; 1 << 20];
            let mut got = 0;
            while got < 8 << 20 {
                got += b.read(&mut sink).unwrap();
            }
        });
        w.write_all(&vec![0u8; 8 << 20]).unwrap();
        t.join().unwrap();
    }

    #[test]
    fn a_peer_that_reads_nothing_times_the_writer_out() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut w = FdWriter::new(a, Watch::new(Some(Duration::from_millis(300)), None)).unwrap();
        let e = w.write_all(&vec![0u8; 8 << 20]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }
}
