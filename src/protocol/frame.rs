//! Frames: a 12-byte header (type u8, flags u8, reserved u16, payload
//! length u32, crc32 u32, all big-endian) and the payload. The crc32 covers
//! the first 8 header bytes and the payload, so a flipped bit anywhere is
//! caught. A payload longer than the negotiated limit is refused before
//! anything is allocated for it.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Error, Result};

pub const HEADER_LEN: usize = 12;

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub len: u32,
    pub crc: u32,
}

/// Decodes a header, refusing lengths over `max_len` and non-zero flag or
/// reserved bytes (this version defines none).
pub fn decode_header(h: &[u8; HEADER_LEN], max_len: u32) -> Result<Header> {
    let kind = h[0];
    let len = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
    let crc = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
    if len > max_len {
        return Err(Error::TooLong {
            len: len.into(),
            limit: max_len.into(),
        });
    }
    if h[1] != 0 || h[2] != 0 || h[3] != 0 {
        return Err(Error::Malformed {
            what: "frame",
            why: format!(
                "reserved header bytes {:02x}{:02x}{:02x} set",
                h[1], h[2], h[3]
            ),
        });
    }
    Ok(Header { kind, len, crc })
}

fn crc_of(head: &[u8], payload: &[u8]) -> u32 {
    let mut c = crc32fast::Hasher::new();
    c.update(head);
    c.update(payload);
    c.finalize()
}

/// Builds a whole frame (header and payload) into one buffer, so workers
/// can encode frames in parallel and the writer only copies bytes out.
/// `fill` appends the payload to the vector it is given.
pub fn build(kind: u8, fill: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut v = Vec::new();
    build_into(&mut v, kind, fill);
    v
}

/// [`build`] into a reused vector (cleared first).
pub fn build_into(v: &mut Vec<u8>, kind: u8, fill: impl FnOnce(&mut Vec<u8>)) {
    v.clear();
    v.extend_from_slice(&[0u8; HEADER_LEN]);
    fill(v);
    let len = (v.len() - HEADER_LEN) as u32;
    v[0] = kind;
    v[4..8].copy_from_slice(&len.to_be_bytes());
    let crc = crc_of(&v[..8], &v[HEADER_LEN..]);
    v[8..12].copy_from_slice(&crc.to_be_bytes());
}

/// Reads frames, checking length limits and checksums, and counts bytes.
pub struct FrameReader<R> {
    inner: R,
    max_len: u32,
    buf: Vec<u8>,
    /// The bytes of the first header as they arrived (even a partial one),
    /// so a stream that is not ours (a shell banner, a raw image on `-`)
    /// can be shown for what it is.
    first: Option<Vec<u8>>,
    /// Bytes read so far (headers included).
    pub bytes: u64,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R, max_len: u32) -> Self {
        FrameReader {
            inner,
            max_len,
            buf: Vec::new(),
            first: None,
            bytes: 0,
        }
    }

    /// The first bytes the stream carried (up to one header), once a read
    /// was attempted.
    pub fn first_bytes(&self) -> Option<&[u8]> {
        self.first.as_deref()
    }

    pub fn set_max_len(&mut self, max_len: u32) {
        self.max_len = max_len;
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    /// The next frame: its type and payload (valid until the next call).
    /// A clean end of stream before a header is [`Error::Eof`].
    pub fn read_frame(&mut self) -> Result<(u8, &[u8])> {
        // KEEPALIVE frames only say the peer is alive (the wait that read
        // them is over): never seen above this layer.
        loop {
            let kind = self.read_one()?;
            if kind != super::msg::kind::KEEPALIVE {
                return Ok((kind, &self.buf));
            }
        }
    }

    /// [`FrameReader::read_frame`], but `None` once `max_keepalives`
    /// KEEPALIVE frames came in a row: a peer that is alive but has
    /// nothing to say (when only a last word is wanted from it).
    pub fn read_frame_unless_idle(&mut self, max_keepalives: u32) -> Result<Option<(u8, &[u8])>> {
        let mut idle = 0;
        loop {
            let kind = self.read_one()?;
            if kind != super::msg::kind::KEEPALIVE {
                return Ok(Some((kind, &self.buf)));
            }
            idle += 1;
            if idle >= max_keepalives {
                return Ok(None);
            }
        }
    }

    fn read_one(&mut self) -> Result<u8> {
        let mut h = [0u8; HEADER_LEN];
        if self.first.is_none() {
            let mut got = 0;
            let r = read_some(&mut self.inner, &mut h, &mut got);
            self.first = Some(h[..got].to_vec());
            r?;
        } else {
            read_full(&mut self.inner, &mut h, true)?;
        }
        let header = decode_header(&h, self.max_len)?;
        self.buf.clear();
        // Bounded by max_len, checked above; filled as it arrives so a
        // lying peer costs no more memory than it sends.
        let len = header.len as usize;
        let mut got = 0;
        while got < len {
            let step = (len - got).min(1 << 20);
            self.buf.resize(got + step, 0);
            read_full(&mut self.inner, &mut self.buf[got..got + step], false)?;
            got += step;
        }
        if crc_of(&h[..8], &self.buf) != header.crc {
            return Err(Error::Checksum {
                kind: header.kind,
                len: header.len,
            });
        }
        self.bytes += (HEADER_LEN + len) as u64;
        Ok(header.kind)
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8], eof_ok_at_start: bool) -> Result<()> {
    let mut got = 0;
    read_into(r, buf, &mut got, eof_ok_at_start)
}

/// [`read_full`] of a first header, counting what arrived in `got`.
fn read_some(r: &mut impl Read, buf: &mut [u8], got: &mut usize) -> Result<()> {
    read_into(r, buf, got, true)
}

fn read_into(
    r: &mut impl Read,
    buf: &mut [u8],
    got: &mut usize,
    eof_ok_at_start: bool,
) -> Result<()> {
    while *got < buf.len() {
        match r.read(&mut buf[*got..]) {
            Ok(0) => {
                return Err(if *got == 0 && eof_ok_at_start {
                    Error::Eof
                } else {
                    Error::Truncated
                })
            }
            Ok(n) => *got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Read(e)),
        }
    }
    Ok(())
}

/// A test-only fault hook: `IMGSYNC_TEST_CORRUPT_FRAME=N` flips one payload
/// bit of the N-th frame (counting from 0) after its checksum was computed,
/// so tests can show that corruption in transit is caught.
fn corrupt_frame_index() -> Option<u64> {
    std::env::var("IMGSYNC_TEST_CORRUPT_FRAME")
        .ok()
        .and_then(|v| v.parse().ok())
}

/// Writes frames and counts bytes. With [`FrameWriter::start_keepalive`],
/// a thread sends a KEEPALIVE frame whenever nothing was written for a
/// while, so the peer's `--timeout` does not run out while this end is busy
/// (hashing a long unchanged stretch, an fsync, a check of a big image).
/// Frames never interleave: each is written whole under the writer's lock.
pub struct FrameWriter<W> {
    inner: Arc<Mutex<W>>,
    frames: u64,
    corrupt: Option<u64>,
    scratch: Vec<u8>,
    /// Bytes written so far (headers included; keepalives not counted).
    pub bytes: u64,
    keepalive: Option<Keepalive>,
    pacer: Option<Pacer>,
}

/// `--bwlimit`: a token bucket on the bytes written, holding at most one
/// frame. A frame goes out whole; the next write (or a flush) waits until
/// the bucket has refilled what it took, so over any stretch the bytes
/// written are at most `rate × time` plus one frame, and a transfer that
/// ends with a flush has lasted at least `bytes / rate`. KEEPALIVE frames
/// (12 bytes, from another thread, only while nothing else is written)
/// are not counted.
struct Pacer {
    bytes_per_sec: u64,
    /// When the bucket is full again (the bytes written so far are paid).
    due: Option<Instant>,
    cancel: Option<Arc<AtomicBool>>,
}

/// How long a pacing wait sleeps at a time (to see the cancel flag).
const PACE_SLICE: Duration = Duration::from_millis(100);

impl Pacer {
    /// Waits until the bytes written so far are paid for.
    fn wait(&mut self) -> Result<()> {
        let Some(due) = self.due else { return Ok(()) };
        loop {
            let now = Instant::now();
            if now >= due {
                return Ok(());
            }
            if self
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Relaxed))
            {
                return Err(Error::Write(std::io::Error::new(
                    std::io::ErrorKind::Interrupted,
                    "interrupted",
                )));
            }
            std::thread::sleep((due - now).min(PACE_SLICE));
        }
    }

    /// Takes `n` bytes out of the bucket, for a write that `began` then
    /// (the time the write itself took is part of what it paid for: a
    /// write that blocks on a slow peer must not cost twice).
    fn charge(&mut self, n: usize, began: Instant) {
        let start = self.due.map_or(began, |d| d.max(began));
        let cost = Duration::from_secs_f64(n as f64 / self.bytes_per_sec as f64);
        self.due = Some(start + cost);
    }
}

struct Keepalive {
    stop: Arc<AtomicBool>,
    /// Milliseconds since `base` of the last write.
    last: Arc<AtomicU64>,
    base: Instant,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn lock<W>(m: &Mutex<W>) -> std::sync::MutexGuard<'_, W> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        FrameWriter {
            inner: Arc::new(Mutex::new(inner)),
            frames: 0,
            corrupt: corrupt_frame_index(),
            scratch: Vec::new(),
            bytes: 0,
            keepalive: None,
            pacer: None,
        }
    }

    /// Caps the rate of the frames written at `bytes_per_sec` (`None` or
    /// 0: no cap); a pacing wait ends early, as an error, once `cancel` is
    /// set.
    pub fn set_rate_limit(&mut self, bytes_per_sec: Option<u64>, cancel: Option<Arc<AtomicBool>>) {
        self.pacer = bytes_per_sec.filter(|&r| r > 0).map(|r| Pacer {
            bytes_per_sec: r,
            due: None,
            cancel,
        });
    }

    /// The cap set with [`FrameWriter::set_rate_limit`].
    pub fn rate_limit(&self) -> Option<u64> {
        self.pacer.as_ref().map(|p| p.bytes_per_sec)
    }

    /// The writer back (after stopping the keepalive thread).
    pub fn into_inner(mut self) -> W {
        if let Some(mut k) = self.keepalive.take() {
            k.stop.store(true, Ordering::Relaxed);
            if let Some(t) = k.thread.take() {
                let _ = t.join();
            }
        }
        match Arc::try_unwrap(self.inner) {
            Ok(m) => m.into_inner().unwrap_or_else(|e| e.into_inner()),
            Err(_) => unreachable!("the keepalive thread was joined"),
        }
    }

    /// Writes a frame whose payload `fill` appends.
    pub fn write_frame(&mut self, kind: u8, fill: impl FnOnce(&mut Vec<u8>)) -> Result<()> {
        let mut v = std::mem::take(&mut self.scratch);
        build_into(&mut v, kind, fill);
        let r = self.write_built(&v);
        self.scratch = v;
        r
    }

    /// Writes a frame made by [`build`].
    pub fn write_built(&mut self, frame: &[u8]) -> Result<()> {
        if let Some(p) = &mut self.pacer {
            p.wait()?;
        }
        let began = Instant::now();
        let n = self.frames;
        self.frames += 1;
        let mut w = lock(&self.inner);
        if self.corrupt == Some(n) && frame.len() > HEADER_LEN {
            let mut bad = frame.to_vec();
            let last = bad.len() - 1;
            bad[last] ^= 0x10;
            w.write_all(&bad).map_err(Error::Write)?;
        } else {
            w.write_all(frame).map_err(Error::Write)?;
        }
        drop(w);
        self.bytes += frame.len() as u64;
        if let Some(p) = &mut self.pacer {
            p.charge(frame.len(), began);
        }
        self.touch();
        Ok(())
    }

    /// Flushes; with a rate cap, returns only once what was written is
    /// paid for (so a flushed transfer never beats the rate).
    pub fn flush(&mut self) -> Result<()> {
        lock(&self.inner).flush().map_err(Error::Write)?;
        if let Some(p) = &mut self.pacer {
            p.wait()?;
        }
        self.touch();
        Ok(())
    }

    fn touch(&self) {
        if let Some(k) = &self.keepalive {
            k.last
                .store(k.base.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
    }
}

impl<W: Write + Send + 'static> FrameWriter<W> {
    /// Sends a KEEPALIVE frame (and flushes) whenever nothing was written
    /// for `every`; only once the peer said in HELLO that it knows them.
    /// The thread stops when the writer is dropped.
    pub fn start_keepalive(&mut self, every: Duration) {
        if self.keepalive.is_some() {
            return;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let last = Arc::new(AtomicU64::new(0));
        let base = Instant::now();
        let inner = Arc::clone(&self.inner);
        let (s2, l2) = (Arc::clone(&stop), Arc::clone(&last));
        let every_ms = every.as_millis().max(1) as u64;
        let thread = std::thread::Builder::new()
            .name("imgsync-keepalive".into())
            .spawn(move || {
                let frame = build(super::msg::kind::KEEPALIVE, |_| {});
                let tick = Duration::from_millis(every_ms.min(100));
                loop {
                    std::thread::sleep(tick);
                    if s2.load(Ordering::Relaxed) {
                        return;
                    }
                    let now = base.elapsed().as_millis() as u64;
                    if now.saturating_sub(l2.load(Ordering::Relaxed)) < every_ms {
                        continue;
                    }
                    // A writer busy (or blocked on a peer that takes
                    // nothing) is not interrupted mid-frame.
                    let Ok(mut w) = inner.try_lock() else {
                        continue;
                    };
                    if w.write_all(&frame).and_then(|_| w.flush()).is_err() {
                        // The stream is broken: the main thread finds out
                        // on its next write or read.
                        return;
                    }
                    l2.store(base.elapsed().as_millis() as u64, Ordering::Relaxed);
                }
            });
        if let Ok(t) = thread {
            self.keepalive = Some(Keepalive {
                stop,
                last,
                base,
                thread: Some(t),
            });
        }
    }
}

impl Drop for Keepalive {
    fn drop(&mut self) {
        // Not joined: the thread may sit in a write to a dead peer for up
        // to the timeout; it ends on its own and drops its handle on the
        // stream then.
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_frame() {
        let f = build(7, |v| v.extend_from_slice(b"abc"));
        // type 7, flags 0, reserved 0, length 3, crc32 of the 8 header bytes + "abc".
        let crc = crc_of(&[7, 0, 0, 0, 0, 0, 0, 3], b"abc");
        let mut want = vec![7, 0, 0, 0, 0, 0, 0, 3];
        want.extend_from_slice(&crc.to_be_bytes());
        want.extend_from_slice(b"abc");
        assert_eq!(f, want);
        // crc32 (IEEE) as Python's zlib.crc32 computes it.
        assert_eq!(crc, 0x9a6c_9351);
    }

    #[test]
    fn round_trip_and_byte_counts() {
        let mut w = FrameWriter::new(Vec::new());
        w.write_frame(1, |v| v.extend_from_slice(&[9; 100]))
            .unwrap();
        w.write_frame(2, |_| {}).unwrap();
        let bytes = w.bytes;
        let data = w.into_inner();
        assert_eq!(bytes, data.len() as u64);
        let mut r = FrameReader::new(&data[..], 1000);
        assert_eq!(r.read_frame().unwrap(), (1, &[9u8; 100][..]));
        assert_eq!(r.read_frame().unwrap(), (2, &[][..]));
        assert!(matches!(r.read_frame(), Err(Error::Eof)));
        assert_eq!(r.bytes, bytes);
    }

    #[test]
    fn oversized_length_is_refused_before_reading() {
        let mut h = vec![1u8, 0, 0, 0];
        h.extend_from_slice(&u32::MAX.to_be_bytes());
        h.extend_from_slice(&[0; 4]);
        let mut r = FrameReader::new(&h[..], 1 << 20);
        match r.read_frame() {
            Err(Error::TooLong { len, limit }) => {
                assert_eq!(len, u64::from(u32::MAX));
                assert_eq!(limit, 1 << 20);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let f = build(5, |v| v.extend_from_slice(b"payload bytes"));
        for bit in 0..f.len() * 8 {
            let mut bad = f.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let mut r = FrameReader::new(&bad[..], 1 << 20);
            assert!(r.read_frame().is_err(), "bit {bit} flipped went unnoticed");
        }
    }

    #[test]
    fn truncated_frame_is_an_error_not_eof() {
        let f = build(5, |v| v.extend_from_slice(b"payload"));
        for cut in 1..f.len() {
            let mut r = FrameReader::new(&f[..cut], 1 << 20);
            assert!(matches!(r.read_frame(), Err(Error::Truncated)), "cut {cut}");
        }
    }

    #[test]
    fn keepalives_are_sent_when_idle_and_never_seen_by_the_reader() {
        #[derive(Clone, Default)]
        struct Shared(Arc<Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = Shared::default();
        let mut w = FrameWriter::new(out.clone());
        w.start_keepalive(Duration::from_millis(50));
        w.write_frame(1, |v| v.extend_from_slice(b"first")).unwrap();
        std::thread::sleep(Duration::from_millis(400));
        w.write_frame(2, |v| v.extend_from_slice(b"second"))
            .unwrap();
        let data = out.0.lock().unwrap().clone();
        let keepalives = {
            let mut n = 0;
            let mut at = 0;
            while at < data.len() {
                let len = u32::from_be_bytes(data[at + 4..at + 8].try_into().unwrap()) as usize;
                n += usize::from(data[at] == super::super::msg::kind::KEEPALIVE);
                at += HEADER_LEN + len;
            }
            n
        };
        assert!(keepalives >= 2, "{keepalives} keepalives in 400 ms of idle");
        let mut r = FrameReader::new(&data[..], 1 << 20);
        assert_eq!(r.read_frame().unwrap(), (1, &b"first"[..]));
        assert_eq!(r.read_frame().unwrap(), (2, &b"second"[..]));
        assert!(matches!(r.read_frame(), Err(Error::Eof)));
        assert_eq!(r.bytes, data.len() as u64);
    }

    #[test]
    fn a_rate_limit_paces_frames_with_a_burst_of_one() {
        let mut w = FrameWriter::new(Vec::new());
        w.set_rate_limit(Some(100_000), None);
        let t = Instant::now();
        // The first frame goes at once (a full bucket holds one frame).
        w.write_frame(1, |v| v.resize(v.len() + 20_000 - HEADER_LEN, 0))
            .unwrap();
        assert!(t.elapsed() < Duration::from_millis(50));
        // 5 frames of 20 kB at 100 kB/s: the flush returns after ~1 s.
        for _ in 0..4 {
            w.write_frame(1, |v| v.resize(v.len() + 20_000 - HEADER_LEN, 0))
                .unwrap();
        }
        w.flush().unwrap();
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(1000), "{took:?}");
        assert!(took < Duration::from_millis(1500), "{took:?}");
        assert_eq!(w.bytes, 100_000);
    }

    #[test]
    fn a_pacing_wait_ends_when_cancelled() {
        let cancel = Arc::new(AtomicBool::new(false));
        let mut w = FrameWriter::new(Vec::new());
        // 1 MB at 1 kB/s would take 1000 s.
        w.set_rate_limit(Some(1000), Some(cancel.clone()));
        w.write_frame(1, |v| v.resize(1 << 20, 0)).unwrap();
        let c = cancel.clone();
        let h = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            c.store(true, Ordering::Relaxed);
        });
        let t = Instant::now();
        assert!(matches!(w.flush(), Err(Error::Write(_))));
        assert!(t.elapsed() < Duration::from_secs(1));
        h.join().unwrap();
    }

    #[test]
    fn reserved_bytes_are_refused() {
        let mut f = build(5, |_| {});
        f[1] = 1;
        let mut r = FrameReader::new(&f[..], 10);
        assert!(matches!(r.read_frame(), Err(Error::Malformed { .. })));
    }
}
