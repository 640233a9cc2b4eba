//! The writing ends of the pipeline: a sparse raw writer and a QCOW2 writer,
//! both over a [`WriteStorage`] (a local [`Output`] in convert; the SSH
//! receiver will use the same sinks).

use imgsync_formats::qcow2::compress::ClusterCompressor;
use imgsync_formats::qcow2::writer::{ClusterData, Qcow2Writer, WriterOptions};
use imgsync_formats::qcow2::CompressionType;
use imgsync_formats::WriteStorage;

use super::pipeline::{Chunk, Encoder, PooledBuf, Sink};
use super::zero::Segment;
use super::{Error, Result};

/// Zeroing ranges of the destination (a block device must be zeroed where
/// the image has no data; a new file needs nothing).
pub trait ZeroRange {
    fn zero_range(&self, offset: u64, len: u64) -> std::io::Result<()>;
}

impl ZeroRange for crate::io::Output {
    fn zero_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
        crate::io::Output::zero_range(self, offset, len)
    }
}

/// Raw output, worker side: writes a chunk's data segments at their guest
/// offsets. Raw writes are positioned and independent of each other, so
/// the workers write in parallel (the page cache copy is the main cost of
/// a raw convert) and the ordered sink only sees the layout.
///
/// Not when the sink zeroes ranges (a block device): zeroing a range
/// invalidates the device's page cache around it, and a concurrent write
/// of a page that straddles the range could bring old sectors back; there
/// the sink writes the data itself, in order.
pub struct RawWriter<'a, W: WriteStorage> {
    out: &'a W,
    in_workers: bool,
}

impl<'a, W: WriteStorage> RawWriter<'a, W> {
    /// `in_workers`: write on the worker threads (files); otherwise the
    /// chunk is passed on for the sink to write.
    pub fn new(out: &'a W, in_workers: bool) -> Self {
        RawWriter { out, in_workers }
    }
}

/// A chunk's layout after a [`RawWriter`]: its range and segments, the
/// data bytes written, and the buffer itself when the sink must write it.
pub struct Written {
    pub start: u64,
    pub end: u64,
    pub segments: Vec<Segment>,
    pub bytes: u64,
    pub unwritten: Option<PooledBuf>,
}

impl<W: WriteStorage> Encoder for RawWriter<'_, W> {
    type Output = Written;

    fn encode(&mut self, chunk: Chunk) -> Result<Written> {
        let mut bytes = 0;
        if self.in_workers {
            for seg in chunk.segments.iter().filter(|s| s.data) {
                self.out
                    .write_all_at(chunk.bytes(seg), seg.offset)
                    .map_err(Error::Dest)?;
                bytes += seg.len;
            }
        }
        let end = chunk.end();
        Ok(Written {
            start: chunk.start,
            end,
            segments: chunk.segments,
            bytes,
            // Written already: the buffer goes back to the pool now.
            unwritten: (!self.in_workers).then_some(chunk.buf),
        })
    }
}

/// Raw output, in order: nothing for zeros on a new file (it was sized
/// with ftruncate and reads zeros there); with `zero_fill` (a block device
/// that may hold old data), zero ranges are zeroed, merged into as few
/// calls as possible.
pub struct RawSink<'a, W: ZeroRange + WriteStorage> {
    out: &'a W,
    /// Output below this offset was handed to `writeback_hint`.
    written_back: u64,
    zero_fill: bool,
    virtual_size: u64,
    /// Everything before this offset is handled.
    pos: u64,
    /// A zero range waiting to be zeroed (extended while zeros continue).
    zero_from: Option<u64>,
    pub bytes_written: u64,
}

impl<'a, W: ZeroRange + WriteStorage> RawSink<'a, W> {
    pub fn new(out: &'a W, virtual_size: u64, zero_fill: bool) -> Self {
        RawSink {
            out,
            written_back: 0,
            zero_fill,
            virtual_size,
            pos: 0,
            zero_from: None,
            bytes_written: 0,
        }
    }

    fn zeros_until(&mut self, end: u64) {
        if self.zero_fill && end > self.pos && self.zero_from.is_none() {
            self.zero_from = Some(self.pos);
        }
        self.pos = self.pos.max(end);
    }

    fn flush_zeros(&mut self) -> Result<()> {
        if let Some(from) = self.zero_from.take() {
            self.out
                .zero_range(from, self.pos - from)
                .map_err(Error::Dest)?;
        }
        Ok(())
    }

    /// Zeroes the tail (block devices) after the last chunk.
    pub fn finish(&mut self) -> Result<()> {
        self.zeros_until(self.virtual_size);
        self.flush_zeros()
    }
}

/// A raw output's completed prefix is handed to writeback in steps of this
/// size (in guest order, so the file system allocates in order although the
/// workers write out of order).
const WRITEBACK_EVERY: u64 = 32 << 20;

impl<W: ZeroRange + WriteStorage> Sink for RawSink<'_, W> {
    type Item = Written;

    fn put(&mut self, w: Written) -> Result<()> {
        self.zeros_until(w.start);
        for seg in &w.segments {
            if seg.data {
                self.flush_zeros()?;
                if let Some(buf) = &w.unwritten {
                    let from = (seg.offset - w.start) as usize;
                    self.out
                        .write_all_at(&buf[from..from + seg.len as usize], seg.offset)
                        .map_err(Error::Dest)?;
                    self.bytes_written += seg.len;
                }
                self.pos = seg.end();
            } else {
                self.zeros_until(seg.end());
            }
        }
        self.zeros_until(w.end);
        self.bytes_written += w.bytes;
        if w.end >= self.written_back + WRITEBACK_EVERY {
            self.out
                .writeback_hint(self.written_back, w.end - self.written_back);
            self.written_back = w.end;
        }
        Ok(())
    }
}

/// The clusters of a chunk a QCOW2 output stores: plain ranges of the
/// chunk's buffer, or compressed bytes.
pub struct EncodedClusters {
    chunk: Chunk,
    clusters: Vec<(u64, EncodedCluster)>,
}

enum EncodedCluster {
    Plain { from: usize, len: usize },
    Compressed(Vec<u8>),
}

/// Picks the clusters holding data and compresses them (worker side).
pub struct Qcow2Encoder {
    cluster_size: u64,
    compressor: Option<ClusterCompressor>,
    scratch: Vec<u8>,
}

impl Qcow2Encoder {
    pub fn new(cluster_size: u64, compression: Option<CompressionType>) -> Result<Self> {
        let compressor = match compression {
            Some(ty) => Some(ClusterCompressor::new(ty).map_err(Error::Dest)?),
            None => None,
        };
        Ok(Qcow2Encoder {
            cluster_size,
            compressor,
            scratch: Vec::new(),
        })
    }
}

impl Encoder for Qcow2Encoder {
    type Output = EncodedClusters;

    fn encode(&mut self, chunk: Chunk) -> Result<EncodedClusters> {
        let cs = self.cluster_size;
        let mut clusters = Vec::new();
        let mut last: Option<u64> = None;
        for seg in chunk.segments.iter().filter(|s| s.data) {
            let first = (seg.offset / cs).max(last.map_or(0, |l| l + 1));
            let end = (seg.end() - 1) / cs;
            for idx in first..=end {
                let from = (idx * cs).max(chunk.start);
                let to = ((idx + 1) * cs).min(chunk.end());
                if from != idx * cs {
                    return Err(Error::Internal(format!(
                        "chunk at {:#x} is not aligned to the cluster size",
                        chunk.start
                    )));
                }
                let bytes = &chunk.buf[(from - chunk.start) as usize..(to - chunk.start) as usize];
                let encoded = match &mut self.compressor {
                    Some(c) => {
                        // A short last cluster is compressed zero-padded:
                        // readers inflate whole clusters.
                        let padded;
                        let input = if bytes.len() as u64 == cs {
                            bytes
                        } else {
                            let mut p = bytes.to_vec();
                            p.resize(cs as usize, 0);
                            padded = p;
                            &padded
                        };
                        if c.compress(input, &mut self.scratch).map_err(Error::Dest)? {
                            Some(EncodedCluster::Compressed(self.scratch.clone()))
                        } else {
                            None
                        }
                    }
                    None => None,
                };
                let encoded = encoded.unwrap_or(EncodedCluster::Plain {
                    from: (from - chunk.start) as usize,
                    len: bytes.len(),
                });
                clusters.push((idx, encoded));
                last = Some(idx);
            }
        }
        Ok(EncodedClusters { chunk, clusters })
    }
}

/// Feeds encoded clusters to a [`Qcow2Writer`] in guest order.
pub struct Qcow2Sink<W: WriteStorage> {
    writer: Qcow2Writer<W>,
    pub clusters_compressed: u64,
}

impl<W: WriteStorage> Qcow2Sink<W> {
    pub fn new(out: W, opts: WriterOptions) -> Result<Self> {
        Ok(Qcow2Sink {
            writer: Qcow2Writer::new(out, opts).map_err(Error::DestFormat)?,
            clusters_compressed: 0,
        })
    }

    /// Writes the metadata; returns the file length.
    pub fn finish(self) -> Result<u64> {
        let (_, len) = self.writer.finish().map_err(Error::DestFormat)?;
        Ok(len)
    }
}

impl<W: WriteStorage> Sink for Qcow2Sink<W> {
    type Item = EncodedClusters;

    fn put(&mut self, item: EncodedClusters) -> Result<()> {
        let clusters: Vec<(u64, ClusterData<'_>)> = item
            .clusters
            .iter()
            .map(|(idx, c)| {
                let data = match c {
                    EncodedCluster::Plain { from, len } => {
                        ClusterData::Plain(&item.chunk.buf[*from..*from + *len])
                    }
                    EncodedCluster::Compressed(bytes) => ClusterData::Compressed(bytes),
                };
                (*idx, data)
            })
            .collect();
        self.writer.write_clusters(&clusters).map_err(|e| match e {
            imgsync_formats::Error::Write { source, .. } => Error::Dest(source),
            e => Error::DestFormat(e),
        })?;
        self.clusters_compressed += clusters
            .iter()
            .filter(|(_, d)| matches!(d, ClusterData::Compressed(_)))
            .count() as u64;
        Ok(())
    }
}
