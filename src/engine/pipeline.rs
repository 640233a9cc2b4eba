//! The pipeline: a planner thread hands out jobs, worker threads read the
//! data ranges, detect zeros and encode (compress) them, and the calling
//! thread puts the results into a [`Sink`] in guest order. Queues are
//! bounded, so memory is a few chunks per thread whatever the image size,
//! and the first error (or a cancel request) stops every stage: a lost block
//! would be corruption, not a warning.
//!
//! The sink is the only stage that knows where data goes: a local raw or
//! QCOW2 writer now, a network sender later.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};

use imgsync_formats::Image;

use super::plan::Job;
use super::zero::{push_segment, split_zeros, Segment};
use super::{Error, Progress, Result};

/// Chunk buffers go back here when a chunk is dropped, so a run reuses a
/// few buffers instead of allocating (and faulting in) fresh pages for
/// every chunk.
pub struct BufPool {
    free: Mutex<Vec<Vec<u8>>>,
    max: usize,
}

impl BufPool {
    pub fn new(max: usize) -> Arc<BufPool> {
        Arc::new(BufPool {
            free: Mutex::new(Vec::new()),
            max,
        })
    }

    /// A buffer of `len` bytes with unspecified content.
    pub fn get(self: &Arc<Self>, len: usize) -> PooledBuf {
        let mut buf = self
            .free
            .lock()
            .ok()
            .and_then(|mut f| f.pop())
            .unwrap_or_default();
        buf.resize(len, 0);
        PooledBuf {
            buf,
            pool: Some(Arc::clone(self)),
        }
    }
}

/// A buffer that returns to its pool when dropped.
pub struct PooledBuf {
    buf: Vec<u8>,
    pool: Option<Arc<BufPool>>,
}

impl From<Vec<u8>> for PooledBuf {
    fn from(buf: Vec<u8>) -> Self {
        PooledBuf { buf, pool: None }
    }
}

impl std::ops::Deref for PooledBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl std::ops::DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            if let Ok(mut free) = pool.free.lock() {
                if free.len() < pool.max {
                    free.push(std::mem::take(&mut self.buf));
                }
            }
        }
    }
}

/// A job after reading and zero detection: `buf` holds the whole cell
/// (zeros where the source has none), `segments` cover it in order.
pub struct Chunk {
    pub seq: u64,
    pub start: u64,
    pub buf: PooledBuf,
    pub segments: Vec<Segment>,
    /// Source data bytes in this chunk (progress).
    pub data_bytes: u64,
    /// Bytes of source data found to be zeros.
    pub zero_bytes: u64,
}

impl Chunk {
    pub fn end(&self) -> u64 {
        self.start + self.buf.len() as u64
    }
    /// The bytes of `seg` (which must lie inside the chunk).
    pub fn bytes(&self, seg: &Segment) -> &[u8] {
        let from = (seg.offset - self.start) as usize;
        &self.buf[from..from + seg.len as usize]
    }
}

/// Per-worker encoding (compression), run on the worker threads.
pub trait Encoder: Send {
    type Output: Send;
    fn encode(&mut self, chunk: Chunk) -> Result<Self::Output>;
}

/// The in-order consumer of encoded chunks.
pub trait Sink {
    type Item: Send;
    fn put(&mut self, item: Self::Item) -> Result<()>;
}

/// Chunks pass through unencoded (raw output).
pub struct Passthrough;

impl Encoder for Passthrough {
    type Output = Chunk;
    fn encode(&mut self, chunk: Chunk) -> Result<Chunk> {
        Ok(chunk)
    }
}

/// Jobs queued ahead of the workers (and hinted for read-ahead): 16 jobs
/// of 2 MiB cells keep up to 32 MiB of reads in flight.
const JOB_QUEUE: usize = 16;

/// A worker's result for job `seq`: the encoded chunk, data bytes read,
/// bytes found zero.
type Done<T> = (u64, Result<(T, u64, u64)>);

#[derive(Clone, Copy, Debug)]
pub struct PipelineOptions {
    /// Worker threads (reading, zero detection, encoding).
    pub workers: usize,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            workers: default_workers(),
        }
    }
}

/// One worker per core, at most 8.
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8)
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PipelineStats {
    /// Source data bytes read.
    pub bytes_read: u64,
    /// Of those, bytes found to be zeros (not written).
    pub zero_bytes: u64,
}

/// Where the workers get their chunks: reading an image's data ranges
/// ([`ImageSource`]), or decoding frames from a peer.
pub trait Source: Sync {
    type Job: Send;
    fn seq(job: &Self::Job) -> u64;
    /// Called on the planner thread as a job is queued (read-ahead hints).
    fn prepare(&self, _job: &Self::Job) {}
    /// Called on a worker thread: the job's chunk.
    fn chunk(&self, job: Self::Job, pool: &Arc<BufPool>) -> Result<Chunk>;
}

/// Reads an image's data ranges and finds zero runs of `min_sparse` bytes.
pub struct ImageSource<'a> {
    pub image: &'a Image,
    pub min_sparse: u64,
}

impl Source for ImageSource<'_> {
    type Job = Job;
    fn seq(job: &Job) -> u64 {
        job.seq
    }
    fn prepare(&self, job: &Job) {
        for &(off, len) in &job.data {
            self.image.will_need(off, len);
        }
    }
    fn chunk(&self, job: Job, pool: &Arc<BufPool>) -> Result<Chunk> {
        read_chunk(self.image, job, self.min_sparse, pool)
    }
}

/// Runs the pipeline over `jobs` (in guest order, `seq` from 0).
pub fn run<Src, J, E, F, S>(
    source: &Src,
    jobs: J,
    make_encoder: F,
    sink: &mut S,
    opts: PipelineOptions,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<PipelineStats>
where
    Src: Source,
    J: Iterator<Item = Result<Src::Job>> + Send,
    E: Encoder<Output = S::Item>,
    F: Fn() -> Result<E> + Sync,
    S: Sink,
{
    let workers = opts.workers.max(1);
    let stop = AtomicBool::new(false);
    let stopped = || stop.load(Ordering::Relaxed) || cancel.load(Ordering::Relaxed);
    // Jobs carry no data, so the queue can run well ahead: each queued job
    // has had its data ranges hinted to the kernel (read-ahead), keeping
    // many reads in flight for scattered extents.
    let (job_tx, job_rx) = sync_channel::<Src::Job>(JOB_QUEUE.max(workers * 2));
    let (out_tx, out_rx) = sync_channel::<Done<E::Output>>(workers * 2);
    let job_rx = Arc::new(Mutex::new(job_rx));
    // Enough for every chunk that can be in flight.
    let pool = BufPool::new(workers * 5 + 4);
    let mut stats = PipelineStats::default();

    std::thread::scope(|scope| -> Result<PipelineStats> {
        // Planner: a failure is sent as the result of the next sequence
        // number, so the writer sees it in order.
        let planner_out = out_tx.clone();
        let planner = scope.spawn({
            let stopped = &stopped;
            move || {
                let mut next_seq = 0;
                for job in jobs {
                    if stopped() {
                        return;
                    }
                    match job {
                        Ok(j) => {
                            next_seq = Src::seq(&j) + 1;
                            source.prepare(&j);
                            if job_tx.send(j).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = planner_out.send((next_seq, Err(e)));
                            return;
                        }
                    }
                }
            }
        });
        let mut handles = Vec::new();
        for _ in 0..workers {
            let job_rx = Arc::clone(&job_rx);
            let out_tx = out_tx.clone();
            let make_encoder = &make_encoder;
            let stopped = &stopped;
            let pool = Arc::clone(&pool);
            handles.push(scope.spawn(move || {
                let mut encoder = match make_encoder() {
                    Ok(e) => Some(e),
                    Err(e) => {
                        let _ = out_tx.send((0, Err(e)));
                        None
                    }
                };
                loop {
                    let job = match job_rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    let Ok(job) = job else { return };
                    let Some(enc) = encoder.as_mut() else { return };
                    if stopped() {
                        return;
                    }
                    let seq = Src::seq(&job);
                    let result = source.chunk(job, &pool).and_then(|chunk| {
                        let (read, zeros) = (chunk.data_bytes, chunk.zero_bytes);
                        enc.encode(chunk).map(|o| (o, read, zeros))
                    });
                    if out_tx.send((seq, result)).is_err() {
                        return;
                    }
                }
            }));
        }
        drop(job_rx);
        drop(out_tx);

        let result = write_in_order(out_rx, sink, progress, &mut stats, &stopped, cancel);
        if result.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        // out_rx is dropped by now: workers blocked on sending wake up and
        // leave; the planner's queue closes when the last worker is gone.
        // A thread that panicked lost its job: that is an error, never a
        // short output.
        let mut panicked = planner.join().is_err();
        for h in handles {
            panicked |= h.join().is_err();
        }
        result?;
        if panicked {
            return Err(Error::Internal("a pipeline thread panicked".to_string()));
        }
        Ok(stats)
    })
}

fn write_in_order<S: Sink>(
    out_rx: Receiver<Done<S::Item>>,
    sink: &mut S,
    progress: &dyn Progress,
    stats: &mut PipelineStats,
    stopped: &dyn Fn() -> bool,
    cancel: &AtomicBool,
) -> Result<()> {
    let mut pending: BTreeMap<u64, Result<(S::Item, u64, u64)>> = BTreeMap::new();
    let mut next = 0u64;
    for (seq, item) in out_rx.iter() {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Interrupted);
        }
        if let Err(e) = item {
            // Any failure ends the run, in order or not.
            return Err(e);
        }
        pending.insert(seq, item);
        while let Some(item) = pending.remove(&next) {
            let (item, read, zeros) = item?;
            sink.put(item)?;
            stats.bytes_read += read;
            stats.zero_bytes += zeros;
            progress.advance(read);
            next += 1;
        }
        if stopped() {
            break;
        }
    }
    if cancel.load(Ordering::Relaxed) {
        return Err(Error::Interrupted);
    }
    if !pending.is_empty() {
        return Err(Error::Internal(format!(
            "pipeline ended with {} chunks out of order (next {next})",
            pending.len()
        )));
    }
    Ok(())
}

/// Reads a job's data ranges (only those) and splits them into data and
/// zero segments.
pub fn read_chunk(image: &Image, job: Job, min_sparse: u64, pool: &Arc<BufPool>) -> Result<Chunk> {
    let mut buf = pool.get(job.len as usize);
    let mut segments = Vec::with_capacity(job.data.len() * 2 + 1);
    let mut pos = job.start;
    let mut zero_bytes = 0;
    let mut data_bytes = 0;
    for &(off, len) in &job.data {
        if off < pos || off + len > job.end() {
            return Err(Error::Internal(format!(
                "job data range {off:#x}+{len:#x} outside the cell at {:#x}",
                job.start
            )));
        }
        buf[(pos - job.start) as usize..(off - job.start) as usize].fill(0);
        push_segment(
            &mut segments,
            Segment {
                offset: pos,
                len: off - pos,
                data: false,
            },
        );
        let slice = &mut buf[(off - job.start) as usize..(off + len - job.start) as usize];
        image.read_at(slice, off).map_err(Error::Source)?;
        zero_bytes += split_zeros(slice, off, min_sparse, &mut segments);
        data_bytes += len;
        pos = off + len;
    }
    buf[(pos - job.start) as usize..].fill(0);
    push_segment(
        &mut segments,
        Segment {
            offset: pos,
            len: job.end() - pos,
            data: false,
        },
    );
    Ok(Chunk {
        seq: job.seq,
        start: job.start,
        buf,
        segments,
        data_bytes,
        zero_bytes,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Mutex;

    use imgsync_formats::raw::Raw;
    use imgsync_formats::{Layer, Storage};

    use super::*;
    use crate::engine::plan;
    use crate::engine::sink::{RawSink, RawWriter, ZeroRange};
    use crate::engine::NoProgress;

    impl ZeroRange for Mutex<Vec<u8>> {
        fn zero_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
            let mut v = self.lock().unwrap();
            let end = (offset + len) as usize;
            if v.len() < end {
                v.resize(end, 0);
            }
            v[offset as usize..end].fill(0);
            Ok(())
        }
    }

    /// An in-memory raw image: data islands (some all zeros) between zeros.
    pub(crate) fn image(seed: u64) -> (Image, Vec<u8>) {
        let size = 9 << 20;
        let mut bytes = vec![0u8; size];
        let mut x = seed | 1;
        let mut pos = 0usize;
        while pos < size {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % (700 << 10)) as usize + 1;
            let end = (pos + len).min(size);
            if x & 3 == 1 {
                for (i, b) in bytes[pos..end].iter_mut().enumerate() {
                    *b = (i as u64 ^ x) as u8 | 1;
                }
            }
            pos = end;
        }
        let storage: Arc<dyn Storage> = Arc::new(bytes.clone());
        (Image::new(Layer::Raw(Raw::open(storage).unwrap())), bytes)
    }

    fn convert(image: &Image, workers: usize, zero_fill: bool) -> Result<Vec<u8>> {
        let out = Mutex::new(vec![0xeeu8; image.virtual_size() as usize]);
        if !zero_fill {
            out.lock().unwrap().fill(0);
        }
        let mut sink = RawSink::new(&out, image.virtual_size(), zero_fill);
        run(
            &ImageSource {
                image,
                min_sparse: 4096,
            },
            plan::jobs(image, 1 << 20),
            || Ok(RawWriter::new(&out, !zero_fill)),
            &mut sink,
            PipelineOptions { workers },
            &NoProgress,
            &AtomicBool::new(false),
        )?;
        sink.finish()?;
        Ok(out.into_inner().unwrap())
    }

    #[test]
    fn output_equals_input_for_any_worker_count() {
        for seed in [1u64, 7, 99] {
            let (img, bytes) = image(seed);
            for workers in [1, 2, 5] {
                for zero_fill in [false, true] {
                    let got = convert(&img, workers, zero_fill).unwrap();
                    assert!(
                        got == bytes,
                        "seed {seed} workers {workers} zero_fill {zero_fill}"
                    );
                }
            }
        }
    }

    /// An encoder that fails, or panics, on one job: the run is an error,
    /// never a short output.
    struct Faulty {
        at: u64,
        panic: bool,
    }

    impl Encoder for Faulty {
        type Output = Chunk;
        fn encode(&mut self, chunk: Chunk) -> Result<Chunk> {
            if chunk.seq == self.at {
                if self.panic {
                    panic!("test panic in an encoder");
                }
                return Err(Error::Internal("test failure".into()));
            }
            Ok(chunk)
        }
    }

    struct Count(u64);

    impl Sink for Count {
        type Item = Chunk;
        fn put(&mut self, _item: Chunk) -> Result<()> {
            self.0 += 1;
            Ok(())
        }
    }

    #[test]
    fn a_failing_or_panicking_stage_fails_the_run() {
        let (img, _) = image(3);
        let n = plan::jobs(&img, 1 << 20).count() as u64;
        assert!(n > 3);
        for panic in [false, true] {
            for at in [0, n / 2, n - 1] {
                let mut sink = Count(0);
                let r = run(
                    &ImageSource {
                        image: &img,
                        min_sparse: 4096,
                    },
                    plan::jobs(&img, 1 << 20),
                    || Ok(Faulty { at, panic }),
                    &mut sink,
                    PipelineOptions { workers: 2 },
                    &NoProgress,
                    &AtomicBool::new(false),
                );
                assert!(
                    r.is_err(),
                    "panic {panic} at {at}: {:?}",
                    r.map(|s| s.bytes_read)
                );
                assert!(sink.0 <= at);
            }
        }
    }

    #[test]
    fn cancel_stops_the_run() {
        let (img, _) = image(5);
        let mut sink = Count(0);
        let r = run(
            &ImageSource {
                image: &img,
                min_sparse: 4096,
            },
            plan::jobs(&img, 1 << 20),
            || Ok(Passthrough),
            &mut sink,
            PipelineOptions::default(),
            &NoProgress,
            &AtomicBool::new(true),
        );
        assert!(matches!(r, Err(Error::Interrupted)));
    }
}
