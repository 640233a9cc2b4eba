//! Images as protocol streams: the sending end turns an image's chunks into
//! CHUNK frames (zstd-compressed on the worker threads, hashed, written in
//! guest order), the receiving end turns frames back into chunks for the
//! same writers convert uses. Either end may be local or `imgsync serve`;
//! the transport is whatever Read/Write the caller hands in.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use imgsync_formats::{Format, Image};

use super::convert::{self, ConvertOptions, Report};
use super::pipeline::{self, BufPool, Chunk, Encoder, ImageSource, PipelineOptions, Sink, Source};
use super::plan::{self, DataSummary};
use super::zero::Segment;
use super::{Error, Progress, Result};
use crate::io::watch::SourceWatch;
use crate::io::{self, Output};
use crate::protocol::digest::{chunk_hash, StreamDigest};
use crate::protocol::msg::{
    encode_chunk_head, kind, ChunkFrame, ChunkHead, End, FileMeta, ImageInfo, WireFormat,
};
use crate::protocol::{self, frame, FrameReader, FrameWriter, Limits, Message};

/// zstd level for CHUNK payloads when none is given: the adaptive tuner
/// starts here. Level 1 is the fastest that still compresses well (ratio
/// 2.63 vs 3.01 at level 3 on VM data, at 1.7 times the speed); on a
/// slow link the tuner climbs within a few windows.
pub const DEFAULT_LEVEL: i32 = 1;

#[derive(Clone, Copy, Debug)]
pub struct SendOptions {
    /// Zero runs of at least this many bytes are not sent (0: all data).
    pub min_sparse: u64,
    /// Grid cell size (a power of two, a multiple of the receiver's
    /// cluster size).
    pub chunk: u64,
    /// zstd level; 0 sends payloads uncompressed.
    pub level: i32,
    /// Tune the level while sending: up while the link is the bottleneck,
    /// down while compression is (see [`LevelTuner`]).
    pub adaptive: bool,
    pub workers: usize,
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            min_sparse: 4096,
            chunk: convert::CHUNK_BYTES,
            level: DEFAULT_LEVEL,
            adaptive: false,
            workers: pipeline::default_workers(),
        }
    }
}

/// What a sender sent.
#[derive(Clone, Copy, Debug, Default)]
pub struct SendStats {
    /// Source data bytes read.
    pub bytes_read: u64,
    /// Of those, zeros not sent.
    pub zero_bytes: u64,
    /// Data bytes sent (before compression).
    pub data_sent: u64,
    /// CHUNK frame bytes (after compression, headers included).
    pub chunk_bytes: u64,
    pub chunks: u64,
    /// The zstd level at the end (it moves when adaptive).
    pub level: i32,
    pub elapsed: Duration,
}

fn wire_format(f: Format) -> WireFormat {
    match f {
        Format::Raw => WireFormat::Raw,
        Format::Qcow2 => WireFormat::Qcow2,
    }
}

/// The IMAGE message for `image`, counting data cells of `unit` bytes (the
/// receiver's cluster size) for its space estimate.
pub fn image_info(image: &Image, unit: u64) -> Result<ImageInfo> {
    let unit = unit.clamp(1, 1 << 30);
    let s = plan::summarize(image, unit)?;
    Ok(ImageInfo {
        format: Some(wire_format(image.format())),
        virtual_size: s.virtual_size,
        data_bytes: s.data_bytes,
        data_extents: s.data_extents,
        data_units: s.data_units,
        unit,
    })
}

/// Writes one message as a frame.
pub fn send_msg<W: Write>(fw: &mut FrameWriter<W>, m: &Message) -> Result<()> {
    fw.write_frame(m.kind(), |v| m.encode(v))?;
    Ok(())
}

/// Reads the next frame, which must be of type `want` (an ERROR frame is
/// the peer's error).
pub fn recv_msg<R: Read>(fr: &mut FrameReader<R>, limits: &Limits, want: u8) -> Result<Message> {
    let (k, p) = fr.read_frame()?;
    Ok(Message::expect(k, p, limits, want)?)
}

/// What both ends of a session agreed on in HELLO.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// The smaller of each limit.
    pub limits: Limits,
    /// The capabilities both ends announced.
    pub caps: u64,
}

/// Both ends send HELLO, then read the peer's; the limits are the smaller
/// of each, the capabilities those both have.
pub fn handshake<R: Read, W: Write + Send + 'static>(
    fr: &mut FrameReader<R>,
    fw: &mut FrameWriter<W>,
) -> Result<Negotiated> {
    handshake_offering(fr, fw, protocol::caps::ALL)
}

/// [`handshake`] offering only the capabilities `caps` in HELLO (a serve
/// made to act as an older one, for tests).
pub fn handshake_offering<R: Read, W: Write + Send + 'static>(
    fr: &mut FrameReader<R>,
    fw: &mut FrameWriter<W>,
    caps: u64,
) -> Result<Negotiated> {
    let ours = protocol::msg::Hello {
        caps,
        ..protocol::msg::Hello::ours()
    };
    send_msg(fw, &Message::Hello(ours))?;
    fw.flush()?;
    match recv_hello(fr, &ours.limits)? {
        Message::Hello(h) => {
            let limits = ours.limits.negotiate(h.limits);
            fr.set_max_len(limits.max_frame);
            // A busy end keeps the peer's --timeout from running out; only
            // to a peer that knows the frame.
            if h.caps & protocol::caps::KEEPALIVE != 0 {
                fw.start_keepalive(KEEPALIVE_EVERY);
            }
            Ok(Negotiated {
                limits,
                caps: ours.caps & h.caps,
            })
        }
        _ => unreachable_msg(),
    }
}

/// How often an idle end sends KEEPALIVE: well inside the smallest useful
/// `--timeout` (a few seconds) and cheap (12 bytes).
pub const KEEPALIVE_EVERY: Duration = Duration::from_secs(1);

/// Receives the peer's HELLO; a stream that does not even start like one
/// (a login banner, another program, a disk image on `-`) is
/// [`protocol::Error::NotProtocol`] with what it sent, not a confusing
/// frame error.
pub fn recv_hello<R: Read>(fr: &mut FrameReader<R>, limits: &Limits) -> Result<Message> {
    match recv_msg(fr, limits, kind::HELLO) {
        Err(e @ Error::Protocol(protocol::Error::Read(_))) => Err(e),
        Err(e) => match fr.first_bytes() {
            Some(head) if !head.is_empty() && !protocol::starts_like_frame(head) => {
                Err(protocol::Error::NotProtocol(head.to_vec()).into())
            }
            _ => Err(e),
        },
        ok => ok,
    }
}

/// Reads the META frame a peer with `caps::META` sends (its source file's
/// permission bits and owner); `None` when the peer does not send one.
pub fn recv_meta<R: Read>(
    fr: &mut FrameReader<R>,
    limits: &Limits,
    caps: u64,
) -> Result<Option<FileMeta>> {
    if caps & protocol::caps::META == 0 {
        return Ok(None);
    }
    match recv_msg(fr, limits, kind::META)? {
        Message::Meta(m) => Ok(Some(m)),
        _ => unreachable_msg(),
    }
}

/// Sends the source file's `meta` and the length of a raw copy of
/// `image` as a META frame when the peer reads it (`caps::META`).
pub fn send_meta<W: Write>(
    fw: &mut FrameWriter<W>,
    caps: u64,
    meta: &io::FileMeta,
    image: &Image,
) -> Result<()> {
    if caps & protocol::caps::META == 0 {
        return Ok(());
    }
    send_msg(fw, &Message::Meta(wire_meta(meta, image.content_size())))
}

pub fn wire_meta(m: &io::FileMeta, size: u64) -> FileMeta {
    FileMeta {
        mode: m.mode & 0o7777,
        uid: m.uid,
        gid: m.gid,
        size,
    }
}

/// A raw output received from `info` takes the source's exact length from
/// META (IMAGE's virtual size rounds a raw file up to a sector, and the
/// chunks hold no data past its end). Other outputs keep the virtual size.
pub fn set_content_size(
    out: &Output,
    info: &ImageInfo,
    opts: &ConvertOptions,
    meta: Option<&FileMeta>,
) -> Result<()> {
    let Some(m) = meta else { return Ok(()) };
    if opts.output_format != Format::Raw || m.size == info.virtual_size {
        return Ok(());
    }
    // Only the tail of the last sector may be cut: anything else is not
    // what the sender's own IMAGE said.
    if m.size > info.virtual_size || info.virtual_size - m.size >= 512 {
        return Err(protocol::Error::Malformed {
            what: "META",
            why: format!(
                "size {:#x} for an image of {:#x} bytes",
                m.size, info.virtual_size
            ),
        }
        .into());
    }
    out.set_len(m.size).map_err(Error::Dest)
}

pub fn io_meta(m: &FileMeta) -> io::FileMeta {
    io::FileMeta {
        mode: m.mode,
        uid: m.uid,
        gid: m.gid,
    }
}

fn unreachable_msg<T>() -> Result<T> {
    Err(Error::Internal(
        "decoded message of the wrong type".to_string(),
    ))
}

/// Sends `image`'s data as CHUNK frames followed by END. The caller has
/// sent HELLO and IMAGE (and received READY when the peer answers). Before
/// END, `watch` must find the source as it was opened: a source that
/// changed meanwhile ends the stream without END, so the receiver never
/// puts the copy in place.
/// `level`, when given, is read before each chunk is compressed, so the
/// caller may tune it while the transfer runs.
pub fn send_chunks<W: Write>(
    image: &Image,
    fw: &mut FrameWriter<W>,
    limits: &Limits,
    opts: &SendOptions,
    watch: &SourceWatch,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<SendStats> {
    let started = Instant::now();
    if opts.chunk > u64::from(limits.max_chunk) || !opts.chunk.is_power_of_two() {
        return Err(Error::Internal(format!(
            "chunk size {} over the peer's limit {}",
            opts.chunk, limits.max_chunk
        )));
    }
    let source = ImageSource {
        image,
        min_sparse: opts.min_sparse,
    };
    let jobs = plan::jobs(image, opts.chunk);
    let level = Arc::new(AtomicI32::new(opts.level));
    progress.phase(super::Phase::Send);
    let mut sink = FrameSink {
        fw,
        progress,
        digest: StreamDigest::new(),
        data_sent: 0,
        chunk_bytes: 0,
        tuner: (opts.adaptive && opts.level > 0).then(|| LevelTuner::new(Arc::clone(&level))),
    };
    let stats = pipeline::run(
        &source,
        jobs,
        || FrameEncoder::new(Arc::clone(&level)),
        &mut sink,
        PipelineOptions {
            workers: opts.workers,
        },
        progress,
        cancel,
    )?;
    let end = End {
        chunks: sink.digest.chunks,
        digest: sink.digest.finish(),
    };
    let (data_sent, chunk_bytes, chunks) = (sink.data_sent, sink.chunk_bytes, end.chunks);
    let final_level = level.load(Ordering::Relaxed);
    watch.check()?;
    send_msg(fw, &Message::End(end))?;
    fw.flush()?;
    progress.finish();
    Ok(SendStats {
        bytes_read: stats.bytes_read,
        zero_bytes: stats.zero_bytes,
        data_sent,
        chunk_bytes,
        chunks,
        level: final_level,
        elapsed: started.elapsed(),
    })
}

/// A chunk as a ready-to-write CHUNK frame (None: no data in the cell).
pub struct EncodedFrame {
    frame: Option<Vec<u8>>,
    start: u64,
    len: u32,
    hash: [u8; 32],
    raw_len: u64,
}

/// Worker side of the sender: gathers a chunk's data segments, hashes them,
/// compresses them with zstd (kept raw when that is not smaller) and builds
/// the frame.
struct FrameEncoder {
    level: Arc<AtomicI32>,
    ctx: zstd::bulk::Compressor<'static>,
    ctx_level: i32,
    raw: Vec<u8>,
    packed: Vec<u8>,
    segs: Vec<(u32, bool)>,
}

impl FrameEncoder {
    fn new(level: Arc<AtomicI32>) -> Result<Self> {
        let l = level.load(Ordering::Relaxed);
        Ok(FrameEncoder {
            ctx: zstd::bulk::Compressor::new(l.max(1))
                .map_err(|e| Error::Internal(format!("zstd: {e}")))?,
            ctx_level: l.max(1),
            level,
            raw: Vec::new(),
            packed: Vec::new(),
            segs: Vec::new(),
        })
    }
}

impl Encoder for FrameEncoder {
    type Output = EncodedFrame;

    fn encode(&mut self, chunk: Chunk) -> Result<EncodedFrame> {
        let len = u32::try_from(chunk.buf.len())
            .map_err(|_| Error::Internal("chunk over 4 GiB".to_string()))?;
        self.raw.clear();
        self.segs.clear();
        for seg in &chunk.segments {
            self.segs.push((seg.len as u32, seg.data));
            if seg.data {
                self.raw.extend_from_slice(chunk.bytes(seg));
            }
        }
        let hash = chunk_hash(
            chunk
                .segments
                .iter()
                .filter(|s| s.data)
                .map(|s| (s.offset, chunk.bytes(s))),
        );
        let mut out = EncodedFrame {
            frame: None,
            start: chunk.start,
            len,
            hash,
            raw_len: self.raw.len() as u64,
        };
        if self.raw.is_empty() {
            return Ok(out);
        }
        let level = self.level.load(Ordering::Relaxed);
        let mut zstd = false;
        if level > 0 {
            if level != self.ctx_level {
                self.ctx
                    .set_compression_level(level)
                    .map_err(|e| Error::Internal(format!("zstd level {level}: {e}")))?;
                self.ctx_level = level;
            }
            self.packed.clear();
            self.packed
                .reserve(zstd::zstd_safe::compress_bound(self.raw.len()));
            let n = self
                .ctx
                .compress_to_buffer(&self.raw, &mut self.packed)
                .map_err(|e| Error::Internal(format!("zstd: {e}")))?;
            zstd = n < self.raw.len();
        }
        let head = ChunkHead {
            start: chunk.start,
            len,
            read: chunk.data_bytes as u32,
            segments: &self.segs,
            hash: &hash,
            zstd,
            raw_len: self.raw.len() as u32,
        };
        let payload = if zstd { &self.packed } else { &self.raw };
        out.frame = Some(frame::build(kind::CHUNK, |v| {
            v.reserve(payload.len() + 64 + self.segs.len() * 4);
            encode_chunk_head(v, &head);
            v.extend_from_slice(payload);
        }));
        Ok(out)
    }
}

/// Ordered side of the sender: writes frames, keeps the stream digest.
struct FrameSink<'a, W: Write> {
    fw: &'a mut FrameWriter<W>,
    progress: &'a dyn Progress,
    digest: StreamDigest,
    data_sent: u64,
    chunk_bytes: u64,
    tuner: Option<LevelTuner>,
}

/// Picks the zstd level from what limits the transfer, measured on the
/// writing thread over windows of frames: time blocked writing frames (the
/// link, the SSH cipher, the receiver) against time waiting for the
/// workers' next frame (reading, compressing), and the machine's idle CPU
/// time. Mostly writing with CPU to spare: compress harder, so fewer bytes
/// cross the link. Mostly waiting, or no CPU to spare (compression would
/// take it from the SSH cipher or, on one host, from the receiver):
/// lighter.
pub struct LevelTuner {
    level: Arc<AtomicI32>,
    writing: Duration,
    waiting: Duration,
    frames: u32,
    last: Option<Instant>,
    cpu: Option<(u64, u64)>,
}

/// Frames per decision (2 MiB cells: about 32 MiB of data).
const TUNE_WINDOW: u32 = 16;
/// The tuner stays within these levels: beyond 9, zstd costs 2-4 times the
/// CPU and more memory for under 1 % fewer bytes on disk data (measured
/// with bench/remote.sh at 100 Mbit/s).
const TUNE_MIN: i32 = 1;
const TUNE_MAX: i32 = 9;

/// Decision thresholds: the share of time the writer is busy, and of CPU
/// time left idle.
const BUSY_HIGH: f64 = 0.85;
const BUSY_LOW: f64 = 0.5;
const IDLE_HIGH: f64 = 0.4;
const IDLE_LOW: f64 = 0.1;

impl LevelTuner {
    pub fn new(level: Arc<AtomicI32>) -> Self {
        LevelTuner {
            level,
            writing: Duration::ZERO,
            waiting: Duration::ZERO,
            frames: 0,
            last: None,
            cpu: crate::io::cpu::cpu_ticks(),
        }
    }

    /// Records one frame: `waited` for it, then `wrote` it.
    pub fn record(&mut self, waited: Duration, wrote: Duration) {
        self.waiting += waited;
        self.writing += wrote;
        self.frames += 1;
        if self.frames < TUNE_WINDOW {
            return;
        }
        let now = crate::io::cpu::cpu_ticks();
        let idle = match (self.cpu, now) {
            (Some(a), Some(b)) => crate::io::cpu::idle_between(a, b),
            _ => None,
        };
        self.cpu = now;
        self.decide(idle);
    }

    /// One decision over the window; `idle` is the CPU's idle share (None:
    /// unknown, taken as enough).
    fn decide(&mut self, idle: Option<f64>) {
        let total = (self.writing + self.waiting).as_secs_f64();
        let busy = if total > 0.0 {
            self.writing.as_secs_f64() / total
        } else {
            0.0
        };
        let idle = idle.unwrap_or(1.0);
        let l = self.level.load(Ordering::Relaxed);
        let next = if busy < BUSY_LOW || idle < IDLE_LOW {
            (l - 1).max(TUNE_MIN)
        } else if busy > BUSY_HIGH && idle > IDLE_HIGH {
            (l + 1).min(TUNE_MAX)
        } else {
            l
        };
        self.level.store(next, Ordering::Relaxed);
        self.writing = Duration::ZERO;
        self.waiting = Duration::ZERO;
        self.frames = 0;
    }
}

impl<W: Write> Sink for FrameSink<'_, W> {
    type Item = EncodedFrame;

    fn put(&mut self, f: EncodedFrame) -> Result<()> {
        let Some(frame) = f.frame else {
            return Ok(());
        };
        let arrived = Instant::now();
        self.fw.write_built(&frame)?;
        self.progress.wire(frame.len() as u64);
        if let Some(t) = &mut self.tuner {
            let done = Instant::now();
            // The first frame's wait is the pipeline filling up.
            let waited = t.last.map_or(Duration::ZERO, |l| arrived - l);
            t.record(waited, done - arrived);
            t.last = Some(done);
        }
        self.digest.add(f.start, f.len, &f.hash);
        self.data_sent += f.raw_len;
        self.chunk_bytes += frame.len() as u64;
        Ok(())
    }
}

/// A received chunk waiting for a worker.
pub struct RecvJob {
    seq: u64,
    frame: ChunkFrame,
}

/// Reads CHUNK frames until END (on the pipeline's planner thread),
/// checking that chunks come in order, inside the image, aligned to the
/// output's clusters, and keeping the stream digest.
pub struct ChunkFrames<'a, R: Read> {
    fr: &'a mut FrameReader<R>,
    limits: Limits,
    virtual_size: u64,
    align: u64,
    pos: u64,
    seq: u64,
    digest: StreamDigest,
    end: Option<End>,
    failed: bool,
    /// Told of the bytes each frame took on the wire.
    progress: Option<&'a dyn Progress>,
}

impl<'a, R: Read> ChunkFrames<'a, R> {
    /// Reports each frame's wire bytes to `progress`.
    pub fn with_progress(mut self, progress: &'a dyn Progress) -> Self {
        self.progress = Some(progress);
        self
    }

    pub fn new(fr: &'a mut FrameReader<R>, limits: Limits, virtual_size: u64, align: u64) -> Self {
        ChunkFrames {
            fr,
            limits,
            virtual_size,
            align: align.max(1),
            pos: 0,
            seq: 0,
            digest: StreamDigest::new(),
            end: None,
            failed: false,
            progress: None,
        }
    }

    fn next_job(&mut self) -> Result<Option<RecvJob>> {
        let (k, p) = self.fr.read_frame().map_err(|e| match e {
            protocol::Error::Eof => protocol::Error::Malformed {
                what: "stream",
                why: "it ended before the END frame".to_string(),
            },
            e => e,
        })?;
        if let Some(progress) = self.progress {
            progress.wire((protocol::frame::HEADER_LEN + p.len()) as u64);
        }
        match Message::decode(k, p, &self.limits)? {
            Message::Chunk(c) => {
                let end = c.end();
                let aligned_end = end % self.align == 0 || end == self.virtual_size;
                if c.start < self.pos
                    || end > self.virtual_size
                    || c.start % self.align != 0
                    || !aligned_end
                {
                    return Err(protocol::Error::Malformed {
                        what: "CHUNK",
                        why: format!(
                            "chunk {:#x}+{:#x} out of order, beyond the image size {:#x} or not aligned to {:#x}",
                            c.start, c.len, self.virtual_size, self.align
                        ),
                    }
                    .into());
                }
                self.pos = end;
                self.digest.add(c.start, c.len, &c.hash);
                let seq = self.seq;
                self.seq += 1;
                Ok(Some(RecvJob { seq, frame: c }))
            }
            Message::End(e) => {
                self.end = Some(e);
                Ok(None)
            }
            Message::Error(s) => Err(protocol::Error::Remote(s).into()),
            m => Err(protocol::Error::Unexpected {
                expected: "CHUNK",
                got: m.name(),
            }
            .into()),
        }
    }

    /// After the last chunk: the sender's END must match what arrived.
    pub fn check_end(&self) -> Result<()> {
        let Some(end) = self.end else {
            return Err(protocol::Error::Malformed {
                what: "stream",
                why: "no END frame".to_string(),
            }
            .into());
        };
        if end.chunks != self.digest.chunks || end.digest != self.digest.finish() {
            return Err(protocol::Error::Malformed {
                what: "END",
                why: format!(
                    "content digest mismatch ({} chunks sent, {} received)",
                    end.chunks, self.digest.chunks
                ),
            }
            .into());
        }
        Ok(())
    }
}

impl<R: Read> Iterator for ChunkFrames<'_, R> {
    type Item = Result<RecvJob>;
    fn next(&mut self) -> Option<Result<RecvJob>> {
        if self.failed || self.end.is_some() {
            return None;
        }
        match self.next_job() {
            Ok(j) => j.map(Ok),
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// Worker side of the receiver: decompresses a frame into its cell and
/// checks the content against the chunk's hash before anything is written.
pub struct FrameSource;

impl Source for FrameSource {
    type Job = RecvJob;

    fn seq(job: &RecvJob) -> u64 {
        job.seq
    }

    fn chunk(&self, job: RecvJob, pool: &Arc<BufPool>) -> Result<Chunk> {
        let c = job.frame;
        let bad = |why: String| -> Error {
            protocol::Error::Malformed {
                what: "CHUNK",
                why: format!("chunk at {:#x}: {why}", c.start),
            }
            .into()
        };
        let unpacked;
        let data: &[u8] = if c.zstd {
            let mut v = Vec::with_capacity(c.raw_len as usize);
            let n = zstd::zstd_safe::decompress(&mut v, &c.payload)
                .map_err(|code| bad(format!("zstd: {}", zstd::zstd_safe::get_error_name(code))))?;
            if n != c.raw_len as usize {
                return Err(bad(format!(
                    "{n} bytes decompressed, {} expected",
                    c.raw_len
                )));
            }
            unpacked = v;
            &unpacked
        } else {
            &c.payload
        };
        let mut buf = pool.get(c.len as usize);
        let mut segments = Vec::with_capacity(c.segments.len());
        let (mut at, mut from) = (0usize, 0usize);
        for &(len, is_data) in &c.segments {
            let len = len as usize;
            let dst = &mut buf[at..at + len];
            if is_data {
                dst.copy_from_slice(&data[from..from + len]);
                from += len;
            } else {
                dst.fill(0);
            }
            segments.push(Segment {
                offset: c.start + at as u64,
                len: len as u64,
                data: is_data,
            });
            at += len;
        }
        let chunk = Chunk {
            seq: job.seq,
            start: c.start,
            buf,
            segments,
            data_bytes: u64::from(c.read),
            zero_bytes: u64::from(c.read).saturating_sub(u64::from(c.raw_len)),
        };
        let hash = chunk_hash(
            chunk
                .segments
                .iter()
                .filter(|s| s.data)
                .map(|s| (s.offset, chunk.bytes(s))),
        );
        if hash != c.hash {
            return Err(bad("content digest mismatch".to_string()));
        }
        Ok(chunk)
    }
}

/// The space summary of an IMAGE message, for an output with `unit`-byte
/// clusters.
pub fn summary_of(info: &ImageInfo, unit: u64) -> DataSummary {
    let data_units = if unit >= info.unit || info.unit == 0 {
        // Larger clusters: no more of them than smaller cells touched.
        info.data_units
    } else {
        info.data_units.saturating_mul(info.unit / unit.max(1))
    };
    DataSummary {
        virtual_size: info.virtual_size,
        // A raw source's exact length comes later, in META (see
        // `content_size`).
        content_size: info.virtual_size,
        data_bytes: info.data_bytes,
        data_extents: info.data_extents,
        data_units,
    }
}

/// Receives CHUNK frames up to END into `out` (not committed), after the
/// space check. The stream's digest is checked before returning Ok.
#[allow(clippy::too_many_arguments)]
pub fn receive_chunks<R: Read + Send>(
    fr: &mut FrameReader<R>,
    limits: &Limits,
    info: &ImageInfo,
    out: &Output,
    opts: &ConvertOptions,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<Report> {
    let summary = check_receive(info, out, opts)?;
    let align = convert::output_unit(opts);
    let mut frames =
        ChunkFrames::new(fr, *limits, info.virtual_size, align).with_progress(progress);
    let report = convert::write_output(
        &FrameSource,
        &mut frames,
        &summary,
        out,
        opts,
        progress,
        cancel,
    )?;
    progress.phase(super::Phase::Verify);
    frames.check_end()?;
    Ok(report)
}

/// The receiver's checks before anything is written: options, room.
pub fn check_receive(info: &ImageInfo, out: &Output, opts: &ConvertOptions) -> Result<DataSummary> {
    let summary = summary_of(info, convert::output_unit(opts));
    convert::check_size_options(info.virtual_size, opts)?;
    convert::check_room(&summary, out, opts)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::pipeline::tests::image;
    use crate::engine::NoProgress;
    use crate::protocol::msg::Message;

    /// The frames `image` is sent as (IMAGE excluded): CHUNK* END.
    fn stream(img: &Image, level: i32) -> (Vec<u8>, SendStats) {
        let mut fw = FrameWriter::new(Vec::new());
        let opts = SendOptions {
            level,
            workers: 2,
            ..SendOptions::default()
        };
        let stats = send_chunks(
            img,
            &mut fw,
            &Limits::DEFAULT,
            &opts,
            &SourceWatch::default(),
            &NoProgress,
            &AtomicBool::new(false),
        )
        .unwrap();
        (fw.into_inner(), stats)
    }

    fn frames(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut fr = FrameReader::new(bytes, Limits::DEFAULT.max_frame);
        let mut v = Vec::new();
        while let Ok((k, p)) = fr.read_frame() {
            v.push((k, p.to_vec()));
        }
        v
    }

    fn rebuild(frames: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut v = Vec::new();
        for (k, p) in frames {
            v.extend(frame::build(*k, |b| b.extend_from_slice(p)));
        }
        v
    }

    /// Receives `bytes` into a raw file; returns its content or the error.
    fn receive(img: &Image, bytes: &[u8], format: Format) -> Result<Vec<u8>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out");
        let out = Output::create(&path).unwrap();
        let info = image_info(img, 65536).unwrap();
        let opts = ConvertOptions {
            output_format: format,
            workers: 2,
            ..ConvertOptions::default()
        };
        let mut fr = FrameReader::new(bytes, Limits::DEFAULT.max_frame);
        receive_chunks(
            &mut fr,
            &Limits::DEFAULT,
            &info,
            &out,
            &opts,
            &NoProgress,
            &AtomicBool::new(false),
        )?;
        out.commit().unwrap();
        let back = crate::io::open_image(&path, crate::io::OpenOptions::default()).unwrap();
        let mut buf = vec![0u8; back.virtual_size() as usize];
        back.read_at(&mut buf, 0).unwrap();
        Ok(buf)
    }

    /// META is written and read only when both ends announce caps::META:
    /// an older peer never sees a frame it would refuse, and a reader
    /// whose peer does not send one does not wait for it.
    #[test]
    fn meta_crosses_only_when_both_ends_announce_it() {
        let (img, _) = image(5);
        let m = io::FileMeta {
            mode: 0o640,
            uid: 7,
            gid: 8,
        };
        let mut fw = FrameWriter::new(Vec::new());
        send_meta(&mut fw, protocol::caps::ZSTD, &m, &img).unwrap();
        assert!(fw.into_inner().is_empty(), "sent to a peer without META");

        let mut fw = FrameWriter::new(Vec::new());
        send_meta(&mut fw, protocol::caps::ALL, &m, &img).unwrap();
        send_msg(&mut fw, &Message::Ready).unwrap();
        let bytes = fw.into_inner();
        let mut fr = FrameReader::new(&bytes[..], Limits::DEFAULT.max_frame);
        let got = recv_meta(&mut fr, &Limits::DEFAULT, protocol::caps::ALL).unwrap();
        assert_eq!(got.map(|g| io_meta(&g)), Some(m));

        // Without the capability nothing is read: the next frame is READY.
        let mut fw = FrameWriter::new(Vec::new());
        send_msg(&mut fw, &Message::Ready).unwrap();
        let bytes = fw.into_inner();
        let mut fr = FrameReader::new(&bytes[..], Limits::DEFAULT.max_frame);
        assert_eq!(
            recv_meta(&mut fr, &Limits::DEFAULT, protocol::caps::ZSTD).unwrap(),
            None
        );
        assert!(recv_msg(&mut fr, &Limits::DEFAULT, kind::READY).is_ok());
    }

    /// META may only cut the tail of the last sector off a raw output:
    /// a size beyond IMAGE's, or a sector or more short of it, is refused.
    #[test]
    fn meta_size_only_trims_the_last_sector_of_a_raw_output() {
        let dir = tempfile::tempdir().unwrap();
        let out = Output::create(&dir.path().join("out")).unwrap();
        out.set_len(1_000_448).unwrap();
        let info = ImageInfo {
            virtual_size: 1_000_448,
            ..ImageInfo::default()
        };
        let raw = ConvertOptions::default();
        let meta = |size| FileMeta {
            size,
            ..FileMeta::default()
        };
        for bad in [1_000_449, 1_000_448 - 512, 0] {
            assert!(set_content_size(&out, &info, &raw, Some(&meta(bad))).is_err());
        }
        let qcow2 = ConvertOptions {
            output_format: Format::Qcow2,
            ..ConvertOptions::default()
        };
        set_content_size(&out, &info, &qcow2, Some(&meta(1_000_003))).unwrap();
        assert_eq!(out.file().metadata().unwrap().len(), 1_000_448);
        set_content_size(&out, &info, &raw, Some(&meta(1_000_003))).unwrap();
        assert_eq!(out.file().metadata().unwrap().len(), 1_000_003);
    }

    /// A one-way stream puts META after END, where a reader that predates
    /// it has stopped reading: the chunks are received without it.
    #[test]
    fn stream_readers_stop_at_end_before_meta() {
        let (img, content) = image(3);
        let (mut bytes, _) = stream(&img, 0);
        let mut fw = FrameWriter::new(Vec::new());
        send_meta(
            &mut fw,
            protocol::caps::ALL,
            &io::FileMeta {
                mode: 0o600,
                uid: 0,
                gid: 0,
            },
            &img,
        )
        .unwrap();
        bytes.extend(fw.into_inner());
        assert!(receive(&img, &bytes, Format::Raw).unwrap() == content);
    }

    #[test]
    fn tuner_follows_the_bottleneck() {
        let level = Arc::new(AtomicI32::new(3));
        let mut t = LevelTuner::new(Arc::clone(&level));
        let window = |t: &mut LevelTuner, waited: u64, wrote: u64, idle: f64| {
            for _ in 0..TUNE_WINDOW {
                t.waiting += Duration::from_millis(waited);
                t.writing += Duration::from_millis(wrote);
            }
            t.decide(Some(idle));
        };
        let get = || level.load(Ordering::Relaxed);
        // Link-bound with idle CPU: up, one step per window, to the cap.
        for _ in 0..20 {
            window(&mut t, 1, 20, 0.6);
        }
        assert_eq!(get(), TUNE_MAX);
        // Link-bound but no CPU to spare: down.
        window(&mut t, 1, 20, 0.05);
        assert_eq!(get(), TUNE_MAX - 1);
        // Balanced: stays.
        window(&mut t, 10, 10, 0.2);
        assert_eq!(get(), TUNE_MAX - 1);
        // Waiting for the workers: down to the floor.
        for _ in 0..20 {
            window(&mut t, 20, 1, 0.5);
        }
        assert_eq!(get(), TUNE_MIN);
    }

    #[test]
    fn loopback_gives_back_the_image_compressed_or_not() {
        for (seed, level) in [(1, 3), (2, 0), (3, 1)] {
            let (img, bytes) = image(seed);
            let (s, stats) = stream(&img, level);
            assert!(stats.chunks > 0);
            for format in [Format::Raw, Format::Qcow2] {
                assert!(
                    receive(&img, &s, format).unwrap() == bytes,
                    "{seed} {format:?}"
                );
            }
        }
    }

    fn expect_err(img: &Image, bytes: &[u8], what: &str) -> String {
        match receive(img, bytes, Format::Raw) {
            Ok(_) => panic!("{what}: accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn lost_repeated_reordered_or_altered_chunks_are_refused() {
        let (img, _) = image(4);
        let (s, _) = stream(&img, 3);
        let f = frames(&s);
        let n = f.len();
        assert!(n >= 4, "{n} frames");
        assert_eq!(f[n - 1].0, kind::END);
        // A chunk lost (frames stay valid: checksums are recomputed).
        let mut g = f.clone();
        g.remove(1);
        let e = expect_err(&img, &rebuild(&g), "lost");
        assert!(e.contains("digest"), "{e}");
        // Repeated, reordered.
        let mut g = f.clone();
        g.insert(1, f[1].clone());
        expect_err(&img, &rebuild(&g), "repeated");
        let mut g = f.clone();
        g.swap(0, 1);
        expect_err(&img, &rebuild(&g), "reordered");
        // Stream cut before END.
        expect_err(&img, &rebuild(&f[..n - 1]), "cut");
        // One payload byte altered, checksum recomputed: the chunk's hash
        // catches it (raw payload so the byte is guest data).
        let (s0, _) = stream(&img, 0);
        let mut g = frames(&s0);
        let last = g[0].1.len() - 1;
        g[0].1[last] ^= 1;
        let e = expect_err(&img, &rebuild(&g), "altered");
        assert!(e.contains("digest"), "{e}");
        // Another message in the middle of the chunks.
        let mut g = f.clone();
        let mut ready = Vec::new();
        Message::Ready.encode(&mut ready);
        g.insert(1, (kind::READY, ready));
        let e = expect_err(&img, &rebuild(&g), "unexpected");
        assert!(e.contains("READY"), "{e}");
    }
}
