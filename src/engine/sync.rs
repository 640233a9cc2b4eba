//! sync: make DST identical to SRC in place, sending only the blocks whose
//! content differs. Both ends walk their images in guest order: the
//! receiver (DST) hashes its non-zero blocks and streams the hashes, the
//! sender (SRC) hashes its own in the same pipeline as convert reads and
//! compares as the hashes arrive, building a plan (runs of blocks to send
//! or to punch). No round trip per block and no whole-image hash table:
//! memory follows the number of changed runs. Holes and zero ranges on
//! both sides are never read.
//!
//! The receiver journals a block's old content (fsynced) before writing it,
//! so an interruption can be resumed (rerun: blocks already written compare
//! equal) or rolled back (`io::journal`). At the end it checks a digest of
//! its content against the sender's: the sum (mod 2^256) of the keyed
//! BLAKE3 hashes of every non-zero block with its index. The receiver
//! starts from the sum over DST's hashed blocks and replaces each changed
//! block's old hash by its new one, so no block is read twice.
//!
//! The exchange (docs/protocol.md), receiver R and sender S:
//! R: SYNC_INFO, HASHES*, HASHES_END; S: PLAN; R: READY; S: PUNCH*,
//! BLOCKS*, SYNC_END; R: SYNC_DONE. Each end only reads or only writes in a
//! phase, as the libssh2 transport needs.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use imgsync_formats::Image;

use super::pipeline::{self, BufPool, Chunk, Encoder, ImageSource, PipelineOptions, Sink, Source};
use super::plan;
use super::remote::{recv_msg, send_msg, LevelTuner};
use super::zero::{is_zero, Segment};
use super::{Error, Progress, Result};
use crate::io::hashcache;
use crate::io::journal::{self, Journal, JournalHeader};
use crate::protocol::msg::{encode_blocks_head, kind, Plan, SyncDone, SyncInfo, SyncParams};
use crate::protocol::{self, frame, FrameReader, FrameWriter, Limits, Message};

/// Default block size (`--block-size`).
pub const DEFAULT_BLOCK: u32 = 64 << 10;
/// Block sizes accepted.
pub const MIN_BLOCK: u32 = 4 << 10;
pub const MAX_BLOCK: u32 = 16 << 20;

/// Hash entries per HASHES frame.
const HASHES_PER_FRAME: usize = 4096;
/// Data per BLOCKS frame (whole blocks; one block when blocks are larger).
const BLOCKS_BYTES: u64 = 2 << 20;
/// The receiver applies (journals, syncs, writes) in batches of this much.
const APPLY_BATCH: u64 = 32 << 20;

/// The keyed hash of block `index` (None: all zeros, which counts as a
/// hole on both sides).
pub fn block_hash(key: &[u8; 32], index: u64, data: &[u8]) -> Option<[u8; 32]> {
    if is_zero(data) {
        return None;
    }
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(&index.to_le_bytes());
    h.update(data);
    Some(*h.finalize().as_bytes())
}

fn short(h: &[u8; 32]) -> [u8; 16] {
    let mut s = [0u8; 16];
    s.copy_from_slice(&h[..16]);
    s
}

/// The sum of block hashes, as a 256-bit little-endian integer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SumDigest([u64; 4]);

impl SumDigest {
    fn limbs(h: &[u8; 32]) -> [u64; 4] {
        let mut l = [0u64; 4];
        for (i, c) in h.chunks_exact(8).enumerate() {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            l[i] = u64::from_le_bytes(a);
        }
        l
    }
    pub fn add(&mut self, h: &[u8; 32]) {
        let b = Self::limbs(h);
        let mut carry = 0u64;
        for (x, y) in self.0.iter_mut().zip(b) {
            let (s1, c1) = x.overflowing_add(y);
            let (s2, c2) = s1.overflowing_add(carry);
            *x = s2;
            carry = u64::from(c1) + u64::from(c2);
        }
    }
    pub fn sub(&mut self, h: &[u8; 32]) {
        let b = Self::limbs(h);
        let mut borrow = 0u64;
        for (x, y) in self.0.iter_mut().zip(b) {
            let (d1, b1) = x.overflowing_sub(y);
            let (d2, b2) = d1.overflowing_sub(borrow);
            *x = d2;
            borrow = u64::from(b1) + u64::from(b2);
        }
    }
    pub fn bytes(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, l) in self.0.iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&l.to_le_bytes());
        }
        out
    }
}

fn blocks_of(size: u64, bs: u64) -> u64 {
    size.div_ceil(bs)
}

/// Worker side of both ends' hashing: the non-zero blocks of a cell, with
/// their keyed hashes. Blocks are measured against `size` (SRC's virtual
/// size on both ends); a DST shorter than that reads as zeros past its end.
struct BlockHasher {
    key: [u8; 32],
    bs: u64,
    size: u64,
    scratch: Vec<u8>,
}

impl Encoder for BlockHasher {
    type Output = (Vec<(u64, [u8; 32])>, u64);

    fn encode(&mut self, chunk: Chunk) -> Result<(Vec<(u64, [u8; 32])>, u64)> {
        Ok(self.hashes(&chunk))
    }
}

impl BlockHasher {
    /// The hashes of `chunk`'s non-zero blocks, and how many blocks with
    /// data it holds.
    fn hashes(&mut self, chunk: &Chunk) -> (Vec<(u64, [u8; 32])>, u64) {
        let mut out = Vec::new();
        let bs = self.bs;
        let first = chunk.start / bs;
        let last = blocks_of(chunk.end().min(self.size), bs);
        let mut blocks = 0;
        for b in first..last {
            let from = b * bs;
            let to = ((b + 1) * bs).min(self.size);
            // Skip blocks without data in this chunk (holes read as zeros).
            let touched = chunk
                .segments
                .iter()
                .any(|s| s.data && s.offset < to && s.end() > from);
            if !touched {
                continue;
            }
            blocks += 1;
            let in_chunk = to.min(chunk.end());
            let bytes =
                &chunk.buf[(from - chunk.start) as usize..(in_chunk - chunk.start) as usize];
            let h = if in_chunk < to {
                self.scratch.clear();
                self.scratch.extend_from_slice(bytes);
                self.scratch.resize((to - from) as usize, 0);
                block_hash(&self.key, b, &self.scratch)
            } else {
                block_hash(&self.key, b, bytes)
            };
            if let Some(h) = h {
                out.push((b, h));
            }
        }
        (out, blocks)
    }
}

fn grid(bs: u64) -> u64 {
    (2u64 << 20).max(bs)
}

fn hash_pipeline<S: Sink<Item = (Vec<(u64, [u8; 32])>, u64)>>(
    image: &Image,
    params: &SyncParams,
    sink: &mut S,
    workers: usize,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<pipeline::PipelineStats> {
    let bs = u64::from(params.block_size);
    let source = ImageSource {
        image,
        min_sparse: 0,
    };
    pipeline::run(
        &source,
        plan::jobs(image, grid(bs)),
        || {
            Ok(BlockHasher {
                key: params.key,
                bs,
                size: params.src_size,
                scratch: Vec::new(),
            })
        },
        sink,
        PipelineOptions { workers },
        progress,
        cancel,
    )
}

// ------------------------------------------------------------------ sender

#[derive(Clone, Debug)]
pub struct SyncSendOptions {
    pub level: i32,
    pub adaptive: bool,
    pub workers: usize,
    /// How far the exchange got, for the caller to say what state DST is
    /// in when it fails.
    pub state: Arc<SendState>,
}

/// The sender's view of DST while a sync runs (read by the caller after a
/// failure: the receiver may be on another host).
#[derive(Debug, Default)]
pub struct SendState {
    /// SYNC_INFO arrived: `exists` and `resumed` are DST's.
    pub informed: AtomicBool,
    pub exists: AtomicBool,
    /// DST was already mid-sync (an interrupted sync's journal).
    pub resumed: AtomicBool,
    /// READY arrived: the receiver has made its journal and may change DST
    /// from now on.
    pub ready: AtomicBool,
}

/// What a sync did (the sender's view, with the receiver's SYNC_DONE).
#[derive(Clone, Copy, Debug, Default)]
pub struct SyncReport {
    pub src_size: u64,
    pub dst_existed: bool,
    pub resumed: bool,
    /// DST's hashes came from its hash cache (DST was not read).
    pub dst_cached: bool,
    /// SRC data bytes read (hashing and sending).
    pub bytes_read: u64,
    /// SRC blocks holding data that were compared (hashed).
    pub blocks_compared: u64,
    pub blocks_sent: u64,
    pub blocks_punched: u64,
    /// Block data sent (before compression).
    pub data_sent: u64,
    pub done: SyncDone,
    pub elapsed: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Send,
    Punch,
}

/// Runs of blocks to send or punch, merged as they are appended.
#[derive(Default)]
struct RunList {
    runs: Vec<(u64, u64, Op)>,
}

impl RunList {
    fn push(&mut self, b: u64, op: Op) {
        if let Some(last) = self.runs.last_mut() {
            if last.2 == op && last.0 + last.1 == b {
                last.1 += 1;
                return;
            }
        }
        self.runs.push((b, 1, op));
    }
}

/// Merges SRC's block hashes (in order, from the pipeline) with DST's (in
/// order, from the receiver) into the plan.
struct MergeSink<'a, R: Read> {
    fr: &'a mut FrameReader<R>,
    progress: &'a dyn Progress,
    bs: u64,
    size: u64,
    limits: Limits,
    /// DST hashes received, not yet matched.
    pending: std::collections::VecDeque<(u64, [u8; 16])>,
    dst_done: bool,
    dst_count: u64,
    src_blocks: u64,
    runs: RunList,
    plan: Plan,
    digest: SumDigest,
    compared: u64,
}

impl<R: Read> MergeSink<'_, R> {
    /// The next DST hash, reading HASHES frames as needed.
    fn peek(&mut self) -> Result<Option<(u64, [u8; 16])>> {
        while self.pending.is_empty() && !self.dst_done {
            match recv_any(self.fr, &self.limits)? {
                Message::Hashes(h) => {
                    let mut last = self.pending.back().map(|p| p.0);
                    for (b, x) in h {
                        if last.is_some_and(|l| b <= l) || b >= self.src_blocks {
                            return Err(bad("HASHES", format!("block {b} out of order or range")));
                        }
                        last = Some(b);
                        self.pending.push_back((b, x));
                        self.dst_count += 1;
                    }
                }
                Message::HashesEnd(n) => {
                    if n != self.dst_count {
                        return Err(bad(
                            "HASHES_END",
                            format!("{n} hashes announced, {} received", self.dst_count),
                        ));
                    }
                    self.dst_done = true;
                }
                m => return Err(unexpected("HASHES", &m)),
            }
        }
        Ok(self.pending.front().copied())
    }

    /// Bytes of block `b` (the last one may be short).
    fn block_len(&self, b: u64) -> u64 {
        self.size
            .saturating_sub(b.saturating_mul(self.bs))
            .min(self.bs)
    }

    /// DST blocks before `b` that SRC does not hold: punched.
    fn punch_before(&mut self, b: u64) -> Result<()> {
        while let Some((d, _)) = self.peek()? {
            if d >= b {
                break;
            }
            self.pending.pop_front();
            self.runs.push(d, Op::Punch);
            self.plan.punch_blocks += 1;
            self.plan.journal_blocks += 1;
        }
        Ok(())
    }
}

impl<R: Read> Sink for MergeSink<'_, R> {
    type Item = (Vec<(u64, [u8; 32])>, u64);

    fn put(&mut self, (blocks, compared): (Vec<(u64, [u8; 32])>, u64)) -> Result<()> {
        self.compared += compared;
        for (b, h) in blocks {
            self.digest.add(&h);
            self.punch_before(b)?;
            match self.peek()? {
                Some((d, dh)) if d == b => {
                    self.pending.pop_front();
                    if dh != short(&h) {
                        self.runs.push(b, Op::Send);
                        self.plan.send_blocks += 1;
                        self.plan.journal_blocks += 1;
                        self.progress.grow(self.block_len(b));
                    }
                }
                _ => {
                    // A hole (or zeros) on DST: sent without comparing.
                    self.runs.push(b, Op::Send);
                    self.plan.send_blocks += 1;
                    self.plan.new_blocks += 1;
                    self.progress.grow(self.block_len(b));
                }
            }
        }
        Ok(())
    }
}

fn bad(what: &'static str, why: String) -> Error {
    protocol::Error::Malformed { what, why }.into()
}

fn unexpected(expected: &'static str, m: &Message) -> Error {
    match m {
        Message::Error(s) => protocol::Error::Remote(s.clone()).into(),
        m => protocol::Error::Unexpected {
            expected,
            got: m.name(),
        }
        .into(),
    }
}

fn recv_any<R: Read>(fr: &mut FrameReader<R>, limits: &Limits) -> Result<Message> {
    let (k, p) = fr.read_frame()?;
    Ok(Message::decode(k, p, limits)?)
}

/// The sending end: SRC is `image`. The receiver has been told `params`
/// (in REQUEST, or by the caller when both ends are local).
#[allow(clippy::too_many_arguments)]
pub fn sync_send<R: Read, W: Write>(
    image: &Image,
    fr: &mut FrameReader<R>,
    fw: &mut FrameWriter<W>,
    limits: &Limits,
    params: &SyncParams,
    opts: &SyncSendOptions,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<SyncReport> {
    let info = recv_sync_info(fr, fw, limits)?;
    sync_send_after(image, info, fr, fw, limits, params, opts, progress, cancel)
}

/// The receiver's first word: what it found at DST. Flushes what the
/// caller sent (REQUEST) first.
pub fn recv_sync_info<R: Read, W: Write>(
    fr: &mut FrameReader<R>,
    fw: &mut FrameWriter<W>,
    limits: &Limits,
) -> Result<SyncInfo> {
    fw.flush()?;
    match recv_msg(fr, limits, kind::SYNC_INFO)? {
        Message::SyncInfo(i) => Ok(i),
        m => Err(unexpected("SYNC_INFO", &m)),
    }
}

/// [`sync_send`] once SYNC_INFO has arrived.
#[allow(clippy::too_many_arguments)]
pub fn sync_send_after<R: Read, W: Write>(
    image: &Image,
    info: SyncInfo,
    fr: &mut FrameReader<R>,
    fw: &mut FrameWriter<W>,
    limits: &Limits,
    params: &SyncParams,
    opts: &SyncSendOptions,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<SyncReport> {
    let started = Instant::now();
    // The receiver's choice, when the block size was left to it.
    let params = &SyncParams {
        block_size: if info.block_size != 0 {
            info.block_size
        } else {
            params.block_size
        },
        ..*params
    };
    if !params.block_size.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&params.block_size)
    {
        return Err(bad(
            "SYNC_INFO",
            format!("block size {} chosen", params.block_size),
        ));
    }
    let bs = u64::from(params.block_size);
    let read_at_start = fr.bytes;
    // The receiver's key: the request's, or its hash cache's.
    opts.state.exists.store(info.exists, Ordering::Relaxed);
    opts.state.resumed.store(info.resumed, Ordering::Relaxed);
    opts.state.informed.store(true, Ordering::Relaxed);
    let params = &SyncParams {
        key: info.key,
        ..*params
    };
    if !info.exists {
        return send_new(image, info, fr, fw, limits, params, opts, progress, cancel);
    }
    let summary = plan::summarize(image, 1)?;
    progress.start(summary.data_bytes);
    progress.phase(super::Phase::Compare);
    let mut merge = MergeSink {
        fr,
        progress,
        bs,
        size: params.src_size,
        limits: *limits,
        pending: Default::default(),
        dst_done: !info.exists,
        dst_count: 0,
        src_blocks: blocks_of(params.src_size, bs),
        runs: RunList::default(),
        plan: Plan::default(),
        digest: SumDigest::default(),
        compared: 0,
    };
    let stats = hash_pipeline(image, params, &mut merge, opts.workers, progress, cancel)?;
    merge.punch_before(u64::MAX)?;
    let MergeSink {
        fr,
        runs,
        plan,
        digest,
        compared,
        ..
    } = merge;
    let hashes_read = fr.bytes - read_at_start;
    send_msg(fw, &Message::Plan(plan))?;
    fw.flush()?;
    recv_msg(fr, limits, kind::READY)?;
    opts.state.ready.store(true, Ordering::Relaxed);
    progress.phase(super::Phase::Send);
    // The receiver's hashes crossed the wire while comparing.
    progress.wire(hashes_read);

    // Punches first (they carry no data), then the blocks through the
    // pipeline: read, compress, frame on the workers; write in order.
    for &(first, count, op) in &runs.runs {
        if op == Op::Punch {
            send_msg(fw, &Message::Punch { first, count })?;
        }
    }
    let per_frame = (BLOCKS_BYTES / bs).max(1);
    let mut seq = 0u64;
    let jobs = runs
        .runs
        .iter()
        .filter(|r| r.2 == Op::Send)
        .flat_map(|&(first, count, _)| {
            (0..count.div_ceil(per_frame)).map(move |i| {
                let f = first + i * per_frame;
                (f, per_frame.min(first + count - f))
            })
        })
        .map(|(first, count)| {
            let j = RunJob { seq, first, count };
            seq += 1;
            Ok(j)
        });
    let level = Arc::new(AtomicI32::new(opts.level));
    let mut sink = BlocksSink::new(fw, progress, opts, &level);
    let source = RunSource {
        image,
        bs,
        size: params.src_size,
    };
    let sent_stats = pipeline::run(
        &source,
        jobs,
        || BlocksEncoder::new(Arc::clone(&level), bs),
        &mut sink,
        PipelineOptions {
            workers: opts.workers,
        },
        &super::NoProgress,
        cancel,
    )?;
    let (blocks_sent, data_sent) = (sink.sent, sink.data);
    let done = end_send(
        fr,
        fw,
        limits,
        progress,
        &digest,
        blocks_sent,
        stats.bytes_read + sent_stats.bytes_read,
    )?;
    Ok(SyncReport {
        src_size: params.src_size,
        dst_existed: info.exists,
        resumed: info.resumed,
        dst_cached: info.cached,
        bytes_read: stats.bytes_read + sent_stats.bytes_read,
        blocks_compared: compared,
        blocks_sent,
        blocks_punched: plan.punch_blocks,
        data_sent,
        done,
        elapsed: started.elapsed(),
    })
}

/// The sender's last word (SYNC_END: SRC's digest, blocks sent, bytes
/// read) and the receiver's verdict.
#[allow(clippy::too_many_arguments)]
fn end_send<R: Read, W: Write>(
    fr: &mut FrameReader<R>,
    fw: &mut FrameWriter<W>,
    limits: &Limits,
    progress: &dyn Progress,
    digest: &SumDigest,
    blocks: u64,
    bytes_read: u64,
) -> Result<SyncDone> {
    send_msg(
        fw,
        &Message::SyncEnd {
            digest: digest.bytes(),
            blocks,
            bytes_read,
        },
    )?;
    fw.flush()?;
    progress.phase(super::Phase::Verify);
    let done = match recv_msg(fr, limits, kind::SYNC_DONE)? {
        Message::SyncDone(d) => d,
        m => return Err(unexpected("SYNC_DONE", &m)),
    };
    progress.finish();
    Ok(done)
}

/// A sync whose DST does not exist: nothing to compare, so SRC is read
/// once, each block hashed (for the digest) and sent as it is read. The
/// plan counts the blocks SRC's map says hold data (without reading
/// them): an upper bound of what is sent, for the receiver's space check.
#[allow(clippy::too_many_arguments)]
fn send_new<R: Read, W: Write>(
    image: &Image,
    info: SyncInfo,
    fr: &mut FrameReader<R>,
    fw: &mut FrameWriter<W>,
    limits: &Limits,
    params: &SyncParams,
    opts: &SyncSendOptions,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<SyncReport> {
    let started = Instant::now();
    let bs = u64::from(params.block_size);
    let summary = plan::summarize(image, bs)?;
    let blocks = summary.data_units.min(blocks_of(params.src_size, bs));
    let plan = Plan {
        send_blocks: blocks,
        punch_blocks: 0,
        journal_blocks: 0,
        new_blocks: blocks,
    };
    send_msg(fw, &Message::Plan(plan))?;
    fw.flush()?;
    recv_msg(fr, limits, kind::READY)?;
    opts.state.ready.store(true, Ordering::Relaxed);
    progress.start(summary.data_bytes);
    progress.phase(super::Phase::Send);
    let level = Arc::new(AtomicI32::new(opts.level));
    let mut sink = NewBlocksSink {
        inner: BlocksSink::new(fw, progress, opts, &level),
        digest: SumDigest::default(),
        compared: 0,
    };
    let stats = pipeline::run(
        &ImageSource {
            image,
            min_sparse: 0,
        },
        plan::jobs(image, grid(bs)),
        || {
            Ok(NewBlocksEncoder {
                hasher: BlockHasher {
                    key: params.key,
                    bs,
                    size: params.src_size,
                    scratch: Vec::new(),
                },
                frames: BlocksEncoder::new(Arc::clone(&level), bs)?,
            })
        },
        &mut sink,
        PipelineOptions {
            workers: opts.workers,
        },
        progress,
        cancel,
    )?;
    let NewBlocksSink {
        inner,
        digest,
        compared,
        ..
    } = sink;
    let (fw, blocks_sent, data_sent) = (inner.fw, inner.sent, inner.data);
    let done = end_send(
        fr,
        fw,
        limits,
        progress,
        &digest,
        blocks_sent,
        stats.bytes_read,
    )?;
    Ok(SyncReport {
        src_size: params.src_size,
        dst_existed: false,
        resumed: info.resumed,
        dst_cached: false,
        bytes_read: stats.bytes_read,
        blocks_compared: compared,
        blocks_sent,
        blocks_punched: 0,
        data_sent,
        done,
        elapsed: started.elapsed(),
    })
}

/// Worker side of [`send_new`]: a cell's non-zero blocks hashed, and
/// framed as BLOCKS (a frame per run of them).
struct NewBlocksEncoder {
    hasher: BlockHasher,
    frames: BlocksEncoder,
}

/// The frames of a cell, the hashes of its blocks, and the blocks with
/// data that were looked at.
type NewBlocks = (Vec<EncodedBlocks>, Vec<[u8; 32]>, u64);

impl Encoder for NewBlocksEncoder {
    type Output = NewBlocks;
    fn encode(&mut self, chunk: Chunk) -> Result<NewBlocks> {
        let start = chunk.start;
        let size = self.hasher.size;
        let bs = self.hasher.bs;
        let (hashed, looked) = self.hasher.hashes(&chunk);
        // A block past the cell's end (never: cells are whole blocks up
        // to the image's end) reads as zeros there.
        let need = chunk.end().min(size).next_multiple_of(bs).min(size);
        let padded;
        let buf: &[u8] = if need > chunk.end() {
            let mut v = chunk.buf.to_vec();
            v.resize((need - start) as usize, 0);
            padded = v;
            &padded
        } else {
            &chunk.buf
        };
        let mut frames = Vec::new();
        let mut hashes = Vec::with_capacity(hashed.len());
        let mut i = 0;
        while i < hashed.len() {
            let first = hashed[i].0;
            let mut n = 1;
            while i + n < hashed.len() && hashed[i + n].0 == first + n as u64 {
                n += 1;
            }
            let from = first * bs;
            let to = ((first + n as u64) * bs).min(size);
            let raw = &buf[(from - start) as usize..(to - start) as usize];
            frames.push(self.frames.frame(first, n as u64, raw)?);
            hashes.extend(hashed[i..i + n].iter().map(|x| x.1));
            i += n;
        }
        Ok((frames, hashes, looked))
    }
}

struct NewBlocksSink<'a, W: Write> {
    inner: BlocksSink<'a, W>,
    digest: SumDigest,
    compared: u64,
}

impl<W: Write> Sink for NewBlocksSink<'_, W> {
    type Item = NewBlocks;
    fn put(&mut self, (frames, hashes, looked): NewBlocks) -> Result<()> {
        for f in frames {
            self.inner.send(f)?;
        }
        for h in &hashes {
            self.digest.add(h);
        }
        self.compared += looked;
        Ok(())
    }
}

struct RunJob {
    seq: u64,
    first: u64,
    count: u64,
}

struct RunSource<'a> {
    image: &'a Image,
    bs: u64,
    size: u64,
}

impl Source for RunSource<'_> {
    type Job = RunJob;
    fn seq(job: &RunJob) -> u64 {
        job.seq
    }
    fn prepare(&self, job: &RunJob) {
        self.image
            .will_need(job.first * self.bs, job.count * self.bs);
    }
    fn chunk(&self, job: RunJob, pool: &Arc<BufPool>) -> Result<Chunk> {
        let start = job.first * self.bs;
        let end = ((job.first + job.count) * self.bs).min(self.size);
        if end <= start {
            return Err(Error::Internal(format!(
                "block run {} past the end",
                job.first
            )));
        }
        let mut buf = pool.get((end - start) as usize);
        self.image.read_at(&mut buf, start).map_err(Error::Source)?;
        Ok(Chunk {
            seq: job.seq,
            start,
            buf,
            segments: vec![Segment {
                offset: start,
                len: end - start,
                data: true,
            }],
            data_bytes: end - start,
            zero_bytes: 0,
        })
    }
}

struct BlocksEncoder {
    level: Arc<AtomicI32>,
    ctx: zstd::bulk::Compressor<'static>,
    ctx_level: i32,
    bs: u64,
    packed: Vec<u8>,
}

impl BlocksEncoder {
    fn new(level: Arc<AtomicI32>, bs: u64) -> Result<Self> {
        let l = level.load(Ordering::Relaxed).max(1);
        Ok(BlocksEncoder {
            ctx: zstd::bulk::Compressor::new(l)
                .map_err(|e| Error::Internal(format!("zstd: {e}")))?,
            ctx_level: l,
            level,
            bs,
            packed: Vec::new(),
        })
    }
}

/// A BLOCKS frame, its block count and raw bytes.
type EncodedBlocks = (Vec<u8>, u64, u64);

impl Encoder for BlocksEncoder {
    type Output = EncodedBlocks;
    fn encode(&mut self, chunk: Chunk) -> Result<EncodedBlocks> {
        let raw: &[u8] = &chunk.buf;
        let first = chunk.start / self.bs;
        let count = (raw.len() as u64).div_ceil(self.bs);
        self.frame(first, count, raw)
    }
}

impl BlocksEncoder {
    /// The BLOCKS frame of `count` blocks from `first` (`raw`, the last
    /// block cut at SRC's size), compressed when that makes it smaller.
    fn frame(&mut self, first: u64, count: u64, raw: &[u8]) -> Result<EncodedBlocks> {
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
                .reserve(zstd::zstd_safe::compress_bound(raw.len()));
            let n = self
                .ctx
                .compress_to_buffer(raw, &mut self.packed)
                .map_err(|e| Error::Internal(format!("zstd: {e}")))?;
            zstd = n < raw.len();
        }
        let payload: &[u8] = if zstd { &self.packed } else { raw };
        let f = frame::build(kind::BLOCKS, |v| {
            v.reserve(payload.len() + 32);
            encode_blocks_head(v, first, count as u32, zstd, raw.len() as u32);
            v.extend_from_slice(payload);
        });
        Ok((f, count, raw.len() as u64))
    }
}

struct BlocksSink<'a, W: Write> {
    fw: &'a mut FrameWriter<W>,
    progress: &'a dyn Progress,
    sent: u64,
    data: u64,
    tuner: Option<LevelTuner>,
    last: Option<Instant>,
}

impl<W: Write> Sink for BlocksSink<'_, W> {
    type Item = EncodedBlocks;
    fn put(&mut self, frame: EncodedBlocks) -> Result<()> {
        let raw = frame.2;
        self.send(frame)?;
        self.progress.advance(raw);
        Ok(())
    }
}

impl<'a, W: Write> BlocksSink<'a, W> {
    fn new(
        fw: &'a mut FrameWriter<W>,
        progress: &'a dyn Progress,
        opts: &SyncSendOptions,
        level: &Arc<AtomicI32>,
    ) -> Self {
        BlocksSink {
            fw,
            progress,
            sent: 0,
            data: 0,
            tuner: (opts.adaptive && opts.level > 0).then(|| LevelTuner::new(Arc::clone(level))),
            last: None,
        }
    }

    /// Writes one frame (progress: wire and sent, not done).
    fn send(&mut self, (f, count, raw): EncodedBlocks) -> Result<()> {
        let arrived = Instant::now();
        self.fw.write_built(&f)?;
        self.progress.wire(f.len() as u64);
        if let Some(t) = &mut self.tuner {
            let done = Instant::now();
            t.record(
                self.last.map_or(Duration::ZERO, |l| arrived - l),
                done - arrived,
            );
            self.last = Some(done);
        }
        self.sent += count;
        self.data += raw;
        self.progress.sent(raw);
        Ok(())
    }
}

// ---------------------------------------------------------------- receiver

fn jerr(e: journal::JournalError) -> Error {
    Error::Dest(std::io::Error::other(e))
}

/// What the receiving end works on.
#[allow(clippy::large_enum_variant)] // one per sync
pub enum Target {
    /// An existing raw file or block device, updated in place.
    Existing {
        file: File,
        /// DST read through the format layer (hashing).
        image: Image,
        is_device: bool,
        size: u64,
        /// What DST's journal records and is checked against
        /// (`io::journal`): a journal of another destination is refused.
        id: journal::DstId,
        /// `io::journal::path_of`: beside a file, or in the private
        /// directory of device journals.
        journal_path: PathBuf,
    },
    /// DST did not exist: a new output, linked into place at the end.
    New(crate::io::Output),
    /// An existing qcow2 image, updated in place through the format layer
    /// (`super::qcow2_dst`).
    Qcow2 {
        /// DST's file, read-write and locked.
        file: File,
        /// DST's guest view, backing chain included (hashing, old content).
        image: Image,
        /// Its virtual size.
        size: u64,
        id: journal::DstId,
        journal_path: PathBuf,
        /// An interrupted sync's journal was rolled back first: this sync
        /// starts afresh from the image before it (a qcow2 DST resumes so).
        rolled_back: bool,
        /// Every file `image` reads (DST and its backing chain), by the
        /// descriptors it reads them through (`serve --restrict` checks
        /// that each lies inside its directory).
        chain: crate::io::watch::SourceWatch,
    },
}

impl Target {
    /// A new DST takes SRC's permission bits (and owner, for root); an
    /// existing one keeps its own.
    pub fn adopt(&self, meta: &crate::io::FileMeta) -> std::io::Result<()> {
        match self {
            Target::New(out) => out.adopt(meta),
            Target::Existing { .. } | Target::Qcow2 { .. } => Ok(()),
        }
    }
}

#[derive(Clone, Debug)]
pub struct SyncReceiveOptions {
    pub workers: usize,
    /// DST's path, for its hash cache (`io::hashcache`; never kept for a
    /// block device, whose node's times do not follow writes). None: no
    /// cache.
    pub cache: Option<PathBuf>,
    /// Set once DST may change (READY sent): what a failure leaves DST as.
    pub changing: Arc<AtomicBool>,
    /// The sender's capabilities (`protocol::caps`): what SYNC_DONE may say.
    pub peer_caps: u64,
}

/// The receiving end: DST is `target`; SRC's size, block size and key are
/// in `params`. Returns what it reports in SYNC_DONE.
/// What the receiving end did (a pull reports from here).
#[derive(Clone, Debug)]
pub struct Received {
    pub done: SyncDone,
    /// DST existed (else it was created, as convert does).
    pub existed: bool,
    /// An interrupted sync's journal was found and continued.
    pub resumed: bool,
    /// DST's hashes came from its hash cache (DST was not read).
    pub cached: bool,
    /// Bytes of SRC the sender read (as it reported).
    pub src_bytes_read: u64,
    /// Bytes of block content received (before compression).
    pub data: u64,
    /// What the user should hear about DST (a qcow2 DST's bitmaps made
    /// inconsistent), without DST's name.
    pub warnings: Vec<String>,
}

/// `progress` (a pull's, where this end is the client; none at a serve):
/// comparing is hashing DST's data, then writing what arrives; each BLOCKS
/// frame read counts on the wire.
#[allow(clippy::too_many_arguments)]
pub fn sync_receive<R: Read + Send, W: Write>(
    target: Target,
    fr: &mut FrameReader<R>,
    fw: &mut FrameWriter<W>,
    limits: &Limits,
    params: &SyncParams,
    opts: &SyncReceiveOptions,
    progress: Option<&dyn Progress>,
    cancel: &AtomicBool,
) -> Result<Received> {
    let shown = progress.is_some();
    let progress = progress.unwrap_or(&super::NoProgress);
    let r = receive(
        target, fr, fw, limits, params, opts, progress, shown, cancel,
    );
    if r.is_ok() {
        progress.finish();
    }
    r
}

/// A failure to read DST's image (hashing it here goes through the
/// reader SRC's hashing uses, whose errors are SRC's): DST's.
fn dst_read(e: Error) -> Error {
    match e {
        Error::Source(f) => Error::DestFormat(f),
        e => e,
    }
}

/// Counts the frames read and written since the last call on the wire.
struct WireTick {
    last: u64,
}

impl WireTick {
    fn tick<R: Read, W: Write>(
        &mut self,
        fr: &FrameReader<R>,
        fw: &FrameWriter<W>,
        progress: &dyn Progress,
    ) {
        let now = fr.bytes + fw.bytes;
        progress.wire(now.saturating_sub(self.last));
        self.last = now;
    }
}

/// `shown`: someone watches `progress` (its total is worth a walk of
/// DST's map).
#[allow(clippy::too_many_arguments)]
fn receive<R: Read + Send, W: Write>(
    target: Target,
    fr: &mut FrameReader<R>,
    fw: &mut FrameWriter<W>,
    limits: &Limits,
    params: &SyncParams,
    opts: &SyncReceiveOptions,
    progress: &dyn Progress,
    shown: bool,
    cancel: &AtomicBool,
) -> Result<Received> {
    // A qcow2 DST: its updater (refusing what it cannot update before
    // anything is said).
    let updater = match &target {
        Target::Qcow2 { file, .. } => {
            let view = super::qcow2_dst::JournaledFile::new(file, None, u64::from(MIN_BLOCK))
                .map_err(Error::Dest)?;
            Some(imgsync_formats::qcow2::update::Updater::open(&view).map_err(Error::DestFormat)?)
        }
        _ => None,
    };
    // The block size, when the sender left it to this end: a qcow2 DST's
    // cluster size (at least the smallest block), else the default.
    let chosen = match (params.block_size, &updater) {
        (0, Some(u)) => (u.cluster_size() as u32).clamp(MIN_BLOCK, MAX_BLOCK),
        (0, None) => DEFAULT_BLOCK,
        _ => 0,
    };
    let params = &SyncParams {
        block_size: if chosen != 0 {
            chosen
        } else {
            params.block_size
        },
        ..*params
    };
    let bs = u64::from(params.block_size);
    if let Some(u) = &updater {
        if bs % u.cluster_size() != 0 {
            return Err(Error::Dest(std::io::Error::other(format!(
                "--block-size {bs} is not a multiple of DST's cluster size ({}): pass --block-size {}, or leave it out",
                u.cluster_size(),
                u.cluster_size().max(u64::from(MIN_BLOCK))
            ))));
        }
    }
    let src_blocks = blocks_of(params.src_size, bs);
    // An interrupted sync's journal: continued (its entries hold the
    // original content), if it was made with this block size.
    let mut journal = None;
    let (exists, dst_size) = match &target {
        Target::Existing {
            size,
            journal_path,
            is_device,
            id,
            ..
        } => {
            if *is_device && params.src_size > *size {
                return Err(Error::DeviceTooSmall {
                    need: params.src_size,
                    device: *size,
                });
            }
            if let Some(j) = Journal::open(journal_path, id).map_err(jerr)? {
                if j.header().block_size != params.block_size {
                    return Err(Error::Dest(std::io::Error::other(format!(
                        "an interrupted sync with --block-size {} is in progress ({}); rerun it with that block size or roll it back with `imgsync sync --rollback`",
                        j.header().block_size,
                        journal_path.display()
                    ))));
                }
                journal = Some(j);
            }
            (true, *size)
        }
        Target::New(_) => (false, 0),
        Target::Qcow2 { size, .. } => (true, *size),
    };
    let resumed = journal.is_some()
        || matches!(
            target,
            Target::Qcow2 {
                rolled_back: true,
                ..
            }
        );
    // A qcow2 DST: its updater (refusing what it cannot update before
    // anything is said), and blocks of whole clusters.
    // DST's hash cache, if it still describes DST (not after an
    // interruption: DST changed since). A cache not used is removed
    // before DST changes; a new one is written at the end.
    // A qcow2 DST has one when it has no backing file (whose changes would
    // change DST's guest view without touching DST's file) and is a file.
    let cache_path = match &target {
        Target::Existing {
            is_device: true, ..
        } => None,
        Target::Qcow2 { file, image, .. } => {
            let backed = image
                .qcow2()
                .map_or(true, |q| q.header().backing_file.is_some());
            let is_file = file.metadata().is_ok_and(|m| m.is_file());
            if backed || !is_file {
                None
            } else {
                opts.cache.as_deref().map(hashcache::path_for)
            }
        }
        _ => opts.cache.as_deref().map(hashcache::path_for),
    };
    let mut cache = None;
    let dst_file = match &target {
        Target::Existing { file, .. } | Target::Qcow2 { file, .. } => Some(file),
        Target::New(_) => None,
    };
    if let (Some(cp), Some(file)) = (&cache_path, dst_file) {
        // Another user's cache (or a symlink) is neither used nor removed.
        hashcache::check_owned(cp).map_err(|u| {
            Error::Dest(std::io::Error::other(format!(
                "refusing the hash cache {}: {}",
                u.path.display(),
                u.why
            )))
        })?;
        if !resumed && !params.reread {
            cache = hashcache::Cache::open(cp, file, params.block_size, params.src_size);
        }
        if cache.is_none() {
            match std::fs::remove_file(cp) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                // Never left behind stale: a cache that cannot go stops
                // the sync before anything changes.
                Err(e) => {
                    return Err(Error::Dest(std::io::Error::new(
                        e.kind(),
                        format!("removing the stale hash cache {}: {e}", cp.display()),
                    )))
                }
            }
        }
    }
    let params = &SyncParams {
        key: cache.as_ref().map_or(params.key, |c| c.key()),
        ..*params
    };
    send_msg(
        fw,
        &Message::SyncInfo(SyncInfo {
            exists,
            dst_size,
            resumed,
            cached: cache.is_some(),
            key: params.key,
            block_size: chosen,
        }),
    )?;
    // DST's hashes before the sync, kept for the new cache.
    let spool_dir = cache_path.as_deref().and_then(Path::parent).map(|d| {
        if d.as_os_str().is_empty() {
            Path::new(".")
        } else {
            d
        }
    });
    let mut old_hashes = match spool_dir {
        // The cache is an optimisation: no room or no write access for
        // it only means no cache.
        Some(d) => hashcache::Spool::new_in(d).ok(),
        None => None,
    };
    let mut digest = SumDigest::default();
    let mut compared = 0;
    let mut wire = WireTick {
        last: fr.bytes + fw.bytes,
    };
    // Comparing: DST's data hashed (nothing read with its hash cache).
    let hashed_total = match &target {
        Target::Existing { image, .. } | Target::Qcow2 { image, .. }
            if cache.is_none() && shown =>
        {
            plan::summarize(image, 1).map_err(dst_read)?.data_bytes
        }
        _ => 0,
    };
    progress.start(hashed_total);
    if exists {
        progress.phase(super::Phase::Compare);
    }
    if let Target::Existing { image, .. } | Target::Qcow2 { image, .. } = &target {
        let mut sink = HashSink {
            fw: &mut *fw,
            batch: Vec::new(),
            sent: 0,
            digest: SumDigest::default(),
            src_blocks,
            spool: old_hashes.as_mut(),
        };
        if let Some(c) = &mut cache {
            let mut v = Vec::new();
            loop {
                if cancel.load(Ordering::Relaxed) {
                    return Err(Error::Interrupted);
                }
                c.read_batch(&mut v, HASHES_PER_FRAME)
                    .map_err(Error::Dest)?;
                if v.is_empty() {
                    break;
                }
                sink.put((std::mem::take(&mut v), 0))?;
            }
        } else {
            hash_pipeline(image, params, &mut sink, opts.workers, progress, cancel)
                .map_err(dst_read)?;
        }
        sink.flush()?;
        digest = sink.digest;
        compared = sink.sent;
        send_msg(fw, &Message::HashesEnd(compared))?;
    }
    fw.flush()?;
    let plan = match recv_msg(fr, limits, kind::PLAN)? {
        Message::Plan(p) => p,
        m => return Err(unexpected("PLAN", &m)),
    };
    wire.tick(fr, fw, progress);
    // Writing: what the plan says comes (at most; the last block may be
    // short, and a new DST's count is what SRC's map says holds data).
    let coming = plan.send_blocks.saturating_mul(bs).min(params.src_size);
    progress.grow(coming);
    progress.phase(super::Phase::Write);
    let mut receiving = Receiving {
        progress,
        wire: &mut wire,
        coming,
        received: 0,
    };
    // Room for the journal and the new allocation, before anything changes.
    let journal_need = if params.journal && exists {
        journal::space_needed(params.block_size, plan.journal_blocks)
    } else {
        0
    };
    let alloc_need = plan.new_blocks.saturating_mul(bs);
    match &target {
        Target::Existing {
            file,
            is_device,
            journal_path,
            ..
        } => {
            if params.check_space {
                let dir = match journal_path.parent() {
                    Some(d) if !d.as_os_str().is_empty() => d,
                    _ => Path::new("."),
                };
                let jfree = crate::io::output::free_space_at(dir).map_err(Error::Dest)?;
                let dfree = if *is_device {
                    u64::MAX
                } else {
                    crate::io::output::free_space_of(file).map_err(Error::Dest)?
                };
                let same_fs = !*is_device;
                let need_dst = if same_fs {
                    alloc_need + journal_need
                } else {
                    alloc_need
                };
                if journal_need > jfree || need_dst > dfree {
                    return Err(Error::NoSpace {
                        need: need_dst.max(journal_need),
                        free: dfree.min(jfree),
                    });
                }
            }
        }
        Target::New(out) => {
            if params.check_space {
                let free = out.free_space().map_err(Error::Dest)?;
                if alloc_need > free {
                    return Err(Error::NoSpace {
                        need: alloc_need,
                        free,
                    });
                }
            }
        }
        Target::Qcow2 { file, .. } => {
            if params.check_space {
                // New clusters, and the journal: the data blocks changed,
                // and for the metadata one L2 table and one refcount
                // block per 512 changed blocks, at least 16 blocks.
                let changed = plan.send_blocks + plan.punch_blocks;
                let meta = 2 * changed.div_ceil(512) + 16;
                let journal_need = if params.journal {
                    journal::space_needed(params.block_size, plan.journal_blocks + meta)
                } else {
                    0
                };
                let need = alloc_need + meta * bs + journal_need;
                let free = crate::io::output::free_space_of(file).map_err(Error::Dest)?;
                if need > free {
                    return Err(Error::NoSpace { need, free });
                }
            }
        }
    }
    if let (
        Target::Qcow2 {
            file,
            image,
            id,
            journal_path,
            ..
        },
        Some(updater),
    ) = (&target, updater)
    {
        let changes = plan.send_blocks + plan.punch_blocks > 0 || params.src_size != dst_size;
        let journal = if params.journal && changes {
            let old_size = file.metadata().map_err(Error::Dest)?.len();
            Some(
                Journal::create(
                    journal_path,
                    JournalHeader {
                        block_size: params.block_size,
                        old_size,
                        new_size: old_size,
                        sync_id: [0; 32],
                        dst: *id,
                    },
                )
                .map_err(jerr)?,
            )
        } else {
            None
        };
        let jfile = super::qcow2_dst::JournaledFile::new(file, journal, bs).map_err(Error::Dest)?;
        let mut applier = super::qcow2_dst::Qcow2Applier::new(
            updater,
            jfile,
            image,
            bs,
            params.src_size,
            params.key,
            digest,
        );
        // For the new hash cache: what changed.
        applier.changed_spool = match (&old_hashes, spool_dir) {
            (Some(_), Some(d)) => hashcache::Spool::new_in(d).ok(),
            _ => None,
        };
        opts.changing.store(true, Ordering::Relaxed);
        send_msg(fw, &Message::Ready)?;
        fw.flush()?;
        let mut warnings = Vec::new();
        if changes && applier.updater.bitmaps_in_use() {
            // Kept true would mean setting the bits of every range written;
            // the spec's other way: autoclear bit 0 cleared, and qemu then
            // treats them as inconsistent. Never left claiming "clean".
            let (u, f) = (&mut applier.updater, &mut applier.file);
            u.invalidate_bitmaps(f).map_err(Error::DestFormat)?;
            warnings.push(
                "warning: its persistent dirty bitmaps were marked inconsistent (qcow2 autoclear bit 0 cleared); an incremental backup needs them made anew"
                    .to_string(),
            );
        }
        if changes {
            applier.grow()?;
        }
        let ((src_digest, src_read), data) = recv_changes(
            fr,
            fw,
            limits,
            params,
            src_blocks,
            cancel,
            &mut applier,
            &mut receiving,
        )?;
        receiving.end();
        let stats = applier.finish()?;
        applier.verify(file)?;
        same_digest(&applier.digest, &src_digest)?;
        let journal_bytes = applier.file.journal_bytes();
        if let Some(j) = applier.file.take_journal() {
            j.remove().map_err(jerr)?;
        }
        let punched_runs = std::mem::take(&mut applier.punched_runs);
        let changed = applier.changed_spool.take();
        let (written, punched) = (applier.written, applier.punched);
        drop(applier);
        write_cache(
            cache_path.as_deref(),
            Some(file),
            params,
            old_hashes,
            changed,
            &punched_runs,
        );
        let done = SyncDone {
            blocks_compared: compared,
            blocks_written: written,
            blocks_punched: punched,
            journal_bytes,
            qcow2: (opts.peer_caps & protocol::caps::BLOCK_CHOICE != 0).then_some(
                crate::protocol::msg::Qcow2Done {
                    clusters_allocated: stats.clusters_allocated,
                    clusters_freed: stats.clusters_freed,
                    metadata_bytes_written: stats.metadata_bytes_written,
                },
            ),
        };
        send_msg(fw, &Message::SyncDone(done))?;
        fw.flush()?;
        return Ok(Received {
            done,
            existed: true,
            resumed,
            cached: cache.is_some(),
            src_bytes_read: src_read,
            data,
            warnings,
        });
    }
    // A resumed sync's journal knows DST's size before the first run (the
    // file may have grown since).
    let old_size = journal.as_ref().map_or(dst_size, |j| j.header().old_size);
    let mut applier = Applier {
        target: &target,
        journal: None,
        bs,
        src_size: params.src_size,
        old_size,
        key: params.key,
        digest,
        batch: Vec::new(),
        batch_bytes: 0,
        old_data: Default::default(),
        changed: match spool_dir {
            Some(d) => hashcache::Spool::new_in(d).ok(),
            None => None,
        },
        punched_runs: Vec::new(),
        written: 0,
        punched: 0,
    };
    match &target {
        Target::Existing {
            file,
            is_device,
            journal_path,
            id,
            ..
        } => {
            let changes = plan.send_blocks + plan.punch_blocks > 0 || params.src_size != dst_size;
            if params.journal && changes {
                applier.journal = Some(match journal {
                    Some(j) => j,
                    None => Journal::create(
                        journal_path,
                        JournalHeader {
                            block_size: params.block_size,
                            old_size: dst_size,
                            new_size: params.src_size,
                            sync_id: [0; 32],
                            dst: *id,
                        },
                    )
                    .map_err(jerr)?,
                });
            } else if let Some(j) = journal {
                applier.journal = Some(j);
            }
            if !*is_device && params.src_size > dst_size {
                file.set_len(params.src_size).map_err(Error::Dest)?;
            }
        }
        Target::New(out) => out.set_len(params.src_size).map_err(Error::Dest)?,
        Target::Qcow2 { .. } => unreachable!("a qcow2 DST is received above"),
    }
    opts.changing.store(true, Ordering::Relaxed);
    send_msg(fw, &Message::Ready)?;
    fw.flush()?;

    let (end, data_bytes) = recv_changes(
        fr,
        fw,
        limits,
        params,
        src_blocks,
        cancel,
        &mut applier,
        &mut receiving,
    )?;
    receiving.end();
    applier.flush()?;
    applier.finish_size()?;
    let (src_digest, src_read) = end;
    same_digest(&applier.digest, &src_digest)?;
    let journal_bytes = applier.journal.as_ref().map_or(0, |j| j.bytes());
    let (written, punched, data) = (applier.written, applier.punched, data_bytes);
    if let Some(j) = applier.journal.take() {
        j.remove().map_err(jerr)?;
    }
    let changed = applier.changed.take();
    let punched_runs = std::mem::take(&mut applier.punched_runs);
    drop(applier);
    let dst_file = match target {
        Target::New(out) => {
            out.commit().map_err(Error::Dest)?;
            opts.cache.as_deref().and_then(|p| File::open(p).ok())
        }
        Target::Existing { file, .. } => Some(file),
        Target::Qcow2 { .. } => unreachable!("a qcow2 DST is received apart"),
    };
    write_cache(
        cache_path.as_deref(),
        dst_file.as_ref(),
        params,
        old_hashes,
        changed,
        &punched_runs,
    );
    let done = SyncDone {
        blocks_compared: compared,
        blocks_written: written,
        blocks_punched: punched,
        journal_bytes,
        qcow2: None,
    };
    send_msg(fw, &Message::SyncDone(done))?;
    fw.flush()?;
    Ok(Received {
        done,
        existed: exists,
        resumed,
        cached: cache.is_some(),
        src_bytes_read: src_read,
        data,
        warnings: Vec::new(),
    })
}

/// The receiver's last check: DST's digest, as updated block by block,
/// is SRC's.
fn same_digest(ours: &SumDigest, src: &[u8; 32]) -> Result<()> {
    if ours.bytes() != *src {
        return Err(Error::Dest(std::io::Error::other(
            "content digest mismatch after the sync: the destination does not read back as the source (the journal is kept: rerun the sync or roll it back)",
        )));
    }
    Ok(())
}

/// DST's new hash cache: its hashes before the sync (`old`) merged with
/// what changed. An optimisation: a failure only means the next sync
/// reads DST.
fn write_cache(
    path: Option<&Path>,
    dst: Option<&File>,
    params: &SyncParams,
    old: Option<hashcache::Spool>,
    changed: Option<hashcache::Spool>,
    punched: &[(u64, u64)],
) {
    if let (Some(path), Some(dst), Some(mut old), Some(mut changed)) = (path, dst, old, changed) {
        let _ = hashcache::write(
            path,
            dst,
            params.block_size,
            params.key,
            params.src_size,
            &mut old,
            &mut changed,
            punched,
        );
    }
}

/// Where the receiver puts the changes as they arrive.
trait Apply {
    fn put_blocks(&mut self, first: u64, data: Vec<u8>) -> Result<()>;
    fn put_punch(&mut self, first: u64, count: u64) -> Result<()>;
}

impl Apply for Applier<'_> {
    fn put_blocks(&mut self, first: u64, data: Vec<u8>) -> Result<()> {
        Applier::put_blocks(self, first, data)
    }
    fn put_punch(&mut self, first: u64, count: u64) -> Result<()> {
        Applier::put_punch(self, first, count)
    }
}

impl Apply for super::qcow2_dst::Qcow2Applier<'_> {
    fn put_blocks(&mut self, first: u64, data: Vec<u8>) -> Result<()> {
        super::qcow2_dst::Qcow2Applier::put_blocks(self, first, data)
    }
    fn put_punch(&mut self, first: u64, count: u64) -> Result<()> {
        super::qcow2_dst::Qcow2Applier::put_punch(self, first, count)
    }
}

/// The receiver's progress while changes arrive.
struct Receiving<'a> {
    progress: &'a dyn Progress,
    wire: &'a mut WireTick,
    /// What the plan announced (bytes).
    coming: u64,
    received: u64,
}

impl Receiving<'_> {
    fn got<R: Read, W: Write>(&mut self, bytes: u64, fr: &FrameReader<R>, fw: &FrameWriter<W>) {
        let counted = bytes.min(self.coming.saturating_sub(self.received));
        self.received += counted;
        self.progress.advance(counted);
        self.wire.tick(fr, fw, self.progress);
    }

    /// Everything arrived: the part of the announced total that did not
    /// come (zero blocks of a new DST, a short last block) is done too,
    /// and what is left is checking and making it durable.
    fn end(&mut self) {
        self.progress
            .advance(self.coming.saturating_sub(self.received));
        self.received = self.coming;
        self.progress.phase(super::Phase::Verify);
    }
}

/// The sender's PUNCH and BLOCKS frames up to SYNC_END, checked against
/// SRC's size and handed to `applier`. Returns SYNC_END's digest and bytes
/// read, and the block bytes received.
#[allow(clippy::too_many_arguments)]
fn recv_changes<R: Read, W: Write>(
    fr: &mut FrameReader<R>,
    fw: &FrameWriter<W>,
    limits: &Limits,
    params: &SyncParams,
    src_blocks: u64,
    cancel: &AtomicBool,
    applier: &mut dyn Apply,
    receiving: &mut Receiving,
) -> Result<(([u8; 32], u64), u64)> {
    let bs = u64::from(params.block_size);
    let mut zstd_buf = Vec::new();
    let mut data_bytes = 0u64;
    let end = loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Interrupted);
        }
        match recv_any(fr, limits)? {
            Message::Blocks(b) => {
                let last = b.first.checked_add(u64::from(b.count));
                let want = last.map(|l| {
                    (l.min(src_blocks) * bs).min(params.src_size)
                        - (b.first * bs).min(params.src_size)
                });
                if last.is_none_or_past(src_blocks) || want != Some(u64::from(b.raw_len)) {
                    return Err(bad(
                        "BLOCKS",
                        format!(
                            "{} blocks at {} of {} bytes do not fit the image",
                            b.count, b.first, b.raw_len
                        ),
                    ));
                }
                let data: Vec<u8> = if b.zstd {
                    zstd_buf.clear();
                    zstd_buf.reserve(b.raw_len as usize);
                    let n =
                        zstd::zstd_safe::decompress(&mut zstd_buf, &b.payload).map_err(|c| {
                            bad(
                                "BLOCKS",
                                format!("zstd: {}", zstd::zstd_safe::get_error_name(c)),
                            )
                        })?;
                    if n != b.raw_len as usize {
                        return Err(bad(
                            "BLOCKS",
                            format!("{n} bytes decompressed, {} expected", b.raw_len),
                        ));
                    }
                    std::mem::take(&mut zstd_buf)
                } else {
                    b.payload
                };
                data_bytes += data.len() as u64;
                receiving.got(data.len() as u64, fr, fw);
                applier.put_blocks(b.first, data)?;
            }
            Message::Punch { first, count } => {
                let last = first.checked_add(count);
                if count == 0 || last.is_none_or_past(src_blocks) {
                    return Err(bad("PUNCH", format!("{count} blocks at {first}")));
                }
                applier.put_punch(first, count)?;
            }
            Message::SyncEnd {
                digest, bytes_read, ..
            } => break (digest, bytes_read),
            m => return Err(unexpected("BLOCKS", &m)),
        }
    };
    Ok((end, data_bytes))
}

trait PastEnd {
    fn is_none_or_past(&self, end: u64) -> bool;
}

impl PastEnd for Option<u64> {
    fn is_none_or_past(&self, end: u64) -> bool {
        match self {
            None => true,
            Some(v) => *v > end,
        }
    }
}

/// Receiver side of the hashing: HASHES frames of DST's non-zero blocks.
struct HashSink<'a, W: Write> {
    fw: &'a mut FrameWriter<W>,
    batch: Vec<(u64, [u8; 16])>,
    sent: u64,
    digest: SumDigest,
    src_blocks: u64,
    spool: Option<&'a mut hashcache::Spool>,
}

impl<W: Write> HashSink<'_, W> {
    fn flush(&mut self) -> Result<()> {
        if !self.batch.is_empty() {
            let m = Message::Hashes(std::mem::take(&mut self.batch));
            send_msg(self.fw, &m)?;
        }
        Ok(())
    }
}

impl<W: Write> Sink for HashSink<'_, W> {
    type Item = (Vec<(u64, [u8; 32])>, u64);
    fn put(&mut self, (blocks, _): (Vec<(u64, [u8; 32])>, u64)) -> Result<()> {
        for (b, h) in blocks {
            if b >= self.src_blocks {
                continue;
            }
            self.digest.add(&h);
            self.batch.push((b, short(&h)));
            self.sent += 1;
            if let Some(s) = &mut self.spool {
                s.push(b, Some(&h));
            }
            if self.batch.len() >= HASHES_PER_FRAME {
                self.flush()?;
            }
        }
        Ok(())
    }
}

enum Change {
    Write(u64, Vec<u8>),
    Punch(u64, u64),
}

/// Applies changes in batches: journal the old content of every block in
/// the batch, make the journal durable, then write.
struct Applier<'a> {
    target: &'a Target,
    journal: Option<Journal>,
    bs: u64,
    src_size: u64,
    old_size: u64,
    key: [u8; 32],
    digest: SumDigest,
    batch: Vec<Change>,
    batch_bytes: u64,
    /// Blocks of this batch whose old content holds data (the others read
    /// as zeros: their zero parts need no writing).
    old_data: std::collections::HashSet<u64>,
    /// For the new hash cache: each block written (its new hash, none
    /// when zero), and the runs punched.
    changed: Option<hashcache::Spool>,
    punched_runs: Vec<(u64, u64)>,
    written: u64,
    punched: u64,
}

/// Within a written block, zero runs of this size are left as holes (or
/// punched), so DST is as sparse as SRC.
const SPARSE_UNIT: usize = 4096;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Act {
    Write,
    Punch,
    Skip,
}

impl Applier<'_> {
    fn put_blocks(&mut self, first: u64, data: Vec<u8>) -> Result<()> {
        self.batch_bytes += data.len() as u64;
        self.batch.push(Change::Write(first, data));
        if self.batch_bytes >= APPLY_BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn put_punch(&mut self, first: u64, count: u64) -> Result<()> {
        self.batch.push(Change::Punch(first, count));
        self.batch_bytes += count.saturating_mul(self.bs).min(APPLY_BATCH);
        if self.batch_bytes >= APPLY_BATCH {
            self.flush()?;
        }
        Ok(())
    }

    fn file(&self) -> Option<&File> {
        match self.target {
            Target::Existing { file, .. } => Some(file),
            Target::New(_) | Target::Qcow2 { .. } => None,
        }
    }

    /// Block `b`'s current content over `[b*bs, b*bs + len)`, zeros past
    /// the file's end.
    fn read_old(&self, file: &File, b: u64, len: u64) -> Result<Vec<u8>> {
        let from = b * self.bs;
        let mut buf = vec![0u8; len as usize];
        let file_len = match self.target {
            Target::Existing {
                is_device: true,
                size,
                ..
            } => *size,
            _ => file.metadata().map_err(Error::Dest)?.len(),
        };
        let avail = file_len.saturating_sub(from).min(len) as usize;
        if avail > 0 {
            file.read_exact_at(&mut buf[..avail], from)
                .map_err(Error::Dest)?;
        }
        Ok(buf)
    }

    /// Journals block `b`'s old content and takes its hash out of the
    /// digest; notes whether it held data.
    fn retire(&mut self, b: u64) -> Result<()> {
        let Some(file) = self.file() else {
            return Ok(());
        };
        let from = b * self.bs;
        let hash_len = (self.src_size.saturating_sub(from)).min(self.bs);
        let old_len = (self.old_size.saturating_sub(from)).min(self.bs);
        let old = self.read_old(file, b, hash_len.max(old_len))?;
        if let Some(h) = block_hash(&self.key, b, &old[..hash_len as usize]) {
            self.digest.sub(&h);
        }
        if !is_zero(&old) {
            self.old_data.insert(b);
        }
        if let Some(j) = &mut self.journal {
            let content = &old[..old_len as usize];
            let entry = if old_len == 0 || is_zero(content) {
                None
            } else {
                Some(content)
            };
            j.record(b, entry).map_err(jerr)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        if batch.is_empty() {
            return Ok(());
        }
        for c in &batch {
            match *c {
                Change::Write(first, ref data) => {
                    let n = (data.len() as u64).div_ceil(self.bs);
                    for b in first..first + n {
                        self.retire(b)?;
                    }
                }
                Change::Punch(first, count) => {
                    for b in first..first + count {
                        self.retire(b)?;
                    }
                }
            }
        }
        if let Some(j) = &mut self.journal {
            j.sync().map_err(jerr)?;
        }
        for c in batch {
            match c {
                Change::Write(first, data) => {
                    let off = first * self.bs;
                    for (i, block) in data.chunks(self.bs as usize).enumerate() {
                        let h = block_hash(&self.key, first + i as u64, block);
                        if let Some(h) = &h {
                            self.digest.add(h);
                        }
                        if let Some(s) = &mut self.changed {
                            s.push(first + i as u64, h.as_ref());
                        }
                    }
                    self.write_sparse(off, &data)?;
                    self.written += (data.len() as u64).div_ceil(self.bs);
                }
                Change::Punch(first, count) => {
                    let off = first * self.bs;
                    let len = (count * self.bs).min(self.src_size.max(self.old_size) - off);
                    if let Target::Existing {
                        file, is_device, ..
                    } = self.target
                    {
                        crate::io::zero::punch_range(file, *is_device, off, len)
                            .map_err(Error::Dest)?;
                    }
                    self.punched += count;
                    if self.changed.is_some() {
                        self.punched_runs.push((first, count));
                    }
                }
            }
        }
        self.old_data.clear();
        Ok(())
    }

    /// Writes `data` at `off`, leaving its zero runs (in SPARSE_UNIT
    /// pieces) as holes: skipped where DST's old block read as zeros,
    /// punched where it held data.
    fn write_sparse(&self, off: u64, data: &[u8]) -> Result<()> {
        let act = |i: usize, piece: &[u8]| {
            if !is_zero(piece) {
                Act::Write
            } else if self.old_data.contains(&((off + i as u64) / self.bs)) {
                Act::Punch
            } else {
                Act::Skip
            }
        };
        let mut run: Option<(usize, Act)> = None;
        for (k, piece) in data.chunks(SPARSE_UNIT).enumerate() {
            let i = k * SPARSE_UNIT;
            let a = act(i, piece);
            match run {
                Some((_, r)) if r == a => {}
                _ => {
                    if let Some((start, r)) = run {
                        self.apply(r, off + start as u64, &data[start..i])?;
                    }
                    run = Some((i, a));
                }
            }
        }
        if let Some((start, r)) = run {
            self.apply(r, off + start as u64, &data[start..])?;
        }
        Ok(())
    }

    fn apply(&self, act: Act, off: u64, bytes: &[u8]) -> Result<()> {
        match (act, self.target) {
            (Act::Skip, _) | (Act::Punch, Target::New(_)) => Ok(()),
            // The raw applier never sees a qcow2 DST (`qcow2_dst` does).
            (_, Target::Qcow2 { .. }) => Err(Error::Internal(
                "the raw applier was given a qcow2 DST".into(),
            )),
            (Act::Write, Target::Existing { file, .. }) => {
                file.write_all_at(bytes, off).map_err(Error::Dest)
            }
            (Act::Write, Target::New(out)) => {
                use imgsync_formats::WriteStorage;
                out.write_all_at(bytes, off).map_err(Error::Dest)
            }
            (
                Act::Punch,
                Target::Existing {
                    file, is_device, ..
                },
            ) => crate::io::zero::punch_range(file, *is_device, off, bytes.len() as u64)
                .map_err(Error::Dest),
        }
    }

    /// DST's size becomes SRC's: a shrink first journals the data past
    /// the new end. Then DST is made durable.
    fn finish_size(&mut self) -> Result<()> {
        let Target::Existing {
            file, is_device, ..
        } = self.target
        else {
            return Ok(());
        };
        if !*is_device && self.src_size < self.old_size {
            if self.journal.is_some() {
                let first = self.src_size / self.bs;
                let last = blocks_of(self.old_size, self.bs);
                let f = crate::io::LocalFile::from_file(file.try_clone().map_err(Error::Dest)?)
                    .map_err(Error::Dest)?;
                let mut pos = first * self.bs;
                while let Some((a, e)) =
                    imgsync_formats::Storage::next_data(&f, pos).map_err(Error::Dest)?
                {
                    if a >= self.old_size {
                        break;
                    }
                    for b in (a / self.bs).max(first)..blocks_of(e, self.bs).min(last) {
                        let from = b * self.bs;
                        let len = self.old_size.saturating_sub(from).min(self.bs);
                        let old = self.read_old(file, b, len)?;
                        let entry = (!is_zero(&old)).then_some(&old[..]);
                        if let Some(j) = &mut self.journal {
                            j.record(b, entry).map_err(jerr)?;
                        }
                    }
                    pos = e;
                }
                if let Some(j) = &mut self.journal {
                    j.sync().map_err(jerr)?;
                }
            }
            file.set_len(self.src_size).map_err(Error::Dest)?;
        }
        file.sync_all().map_err(Error::Dest)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_sum_is_order_free_and_subtraction_undoes_addition() {
        let key = [7u8; 32];
        let h: Vec<[u8; 32]> = (0..5u64)
            .map(|i| block_hash(&key, i, &[i as u8 + 1; 100]).unwrap())
            .collect();
        let mut a = SumDigest::default();
        let mut b = SumDigest::default();
        for x in &h {
            a.add(x);
        }
        for x in h.iter().rev() {
            b.add(x);
        }
        assert_eq!(a, b);
        // Replacing block 2's hash by another and back.
        let other = block_hash(&key, 2, &[9; 100]).unwrap();
        a.sub(&h[2]);
        a.add(&other);
        assert_ne!(a, b);
        a.sub(&other);
        a.add(&h[2]);
        assert_eq!(a, b);
        // Carries: 0xff.. + 1 wraps across all limbs.
        let mut c = SumDigest([u64::MAX; 4]);
        let mut one = [0u8; 32];
        one[0] = 1;
        c.add(&one);
        assert_eq!(c, SumDigest::default());
        c.sub(&one);
        assert_eq!(c, SumDigest([u64::MAX; 4]));
    }

    #[test]
    fn block_hash_depends_on_key_index_and_content_and_zero_is_none() {
        let k1 = [1u8; 32];
        let k2 = [2u8; 32];
        assert_eq!(block_hash(&k1, 0, &[0; 4096]), None);
        let a = block_hash(&k1, 0, &[1; 4096]);
        assert!(a.is_some());
        assert_ne!(a, block_hash(&k2, 0, &[1; 4096]));
        assert_ne!(a, block_hash(&k1, 1, &[1; 4096]));
        let mut last = [1u8; 4096];
        last[4095] = 2;
        assert_ne!(a, block_hash(&k1, 0, &last));
    }

    #[test]
    fn runs_merge_adjacent_blocks_of_one_kind() {
        let mut r = RunList::default();
        for b in [1, 2, 3] {
            r.push(b, Op::Send);
        }
        r.push(4, Op::Punch);
        r.push(6, Op::Punch);
        assert_eq!(
            r.runs,
            vec![(1, 3, Op::Send), (4, 1, Op::Punch), (6, 1, Op::Punch)]
        );
    }
}
