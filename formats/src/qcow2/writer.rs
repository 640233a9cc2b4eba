//! A streaming QCOW2 v3 (compat 1.1) writer: guest clusters arrive in
//! increasing order and are appended to the file; L2 tables are written as
//! soon as the guest moves past their range, refcount blocks as soon as
//! allocation moves past theirs, so memory stays at one L2 table, one
//! refcount block and a small write buffer whatever the image size.
//!
//! Layout: header (cluster 0), L1 table (clusters 1..), then data clusters,
//! compressed clusters (byte-packed, may share host clusters), L2 tables and
//! refcount blocks in the order they complete, and last the refcount table.
//! Every host cluster below the end of the file is in use, so refcounts are
//! exact and `qemu-img check` finds no leaks.
//!
//! Write order at the end: last L2 → refcount blocks → refcount table → L1 →
//! header. Until the header is written the file is not a QCOW2 image at all;
//! the caller writes into a temporary file and renames it when complete.

use super::header::{
    CompressionType, INCOMPAT_COMPRESSION, MAGIC, MAX_CLUSTER_BITS, MAX_L1_BYTES,
    MAX_REFTABLE_BYTES, MAX_VIRTUAL_SIZE, MIN_CLUSTER_BITS,
};
use super::{OFLAG_COMPRESSED, OFLAG_COPIED};
use crate::error::{Error, Result};
use crate::storage::WriteStorage;

/// The header this writer emits: v3 fields through `compression_type`,
/// padded to a multiple of 8 (what qemu ≥ 5.1 writes).
const HEADER_LEN: u32 = 112;
/// 16-bit refcounts (qemu's default).
const REFCOUNT_ORDER: u32 = 4;
/// Writes of consecutive host bytes are gathered up to this size before
/// they reach the store (fewer, larger writes).
const WRITE_BUFFER_BYTES: usize = 4 << 20;
/// The store is told it may write back what precedes the allocation point
/// after every this many bytes (data is appended in order).
const WRITEBACK_EVERY: u64 = 32 << 20;

#[derive(Clone, Copy, Debug)]
pub struct WriterOptions {
    pub virtual_size: u64,
    pub cluster_bits: u32,
    /// Written to the header; needed only when compressed clusters are
    /// written (zlib is the default every reader knows).
    pub compression_type: CompressionType,
}

impl WriterOptions {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Validates the options as qemu-img create would.
    pub fn validate(&self) -> Result<()> {
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            return Err(Error::invalid(format!(
                "cluster size {} is not a power of two between {} and {}",
                1u64 << self.cluster_bits.min(63),
                1u64 << MIN_CLUSTER_BITS,
                1u64 << MAX_CLUSTER_BITS
            )));
        }
        if self.virtual_size > MAX_VIRTUAL_SIZE {
            return Err(Error::TooLarge {
                what: "virtual size",
                value: self.virtual_size,
                limit: MAX_VIRTUAL_SIZE,
            });
        }
        let l1_bytes = self.l1_entries() * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Error::invalid(format!(
                "virtual size {:#x} needs an L1 table of {l1_bytes} bytes, more than the limit of {MAX_L1_BYTES}; use a larger cluster size",
                self.virtual_size
            )));
        }
        Ok(())
    }

    fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    fn l1_entries(&self) -> u64 {
        self.virtual_size
            .div_ceil(self.l2_entries() << self.cluster_bits)
    }

    fn refblock_entries(&self) -> u64 {
        (self.cluster_size() * 8) >> REFCOUNT_ORDER
    }

    /// An upper bound of the file size for an image holding `data_clusters`
    /// allocated guest clusters (compressed or not): what a free-space check
    /// compares with the room on the destination.
    pub fn max_file_size(&self, data_clusters: u64) -> u64 {
        let cs = self.cluster_size();
        let l1_clusters = (self.l1_entries() * 8).div_ceil(cs).max(1);
        let l2_clusters = data_clusters.min(self.l1_entries());
        let body = 1 + l1_clusters + data_clusters + l2_clusters;
        // Refcount blocks for the body and for themselves, the table, and
        // the extra blocks the final flush can add.
        let refblocks = body.div_ceil(self.refblock_entries()) + 2;
        let reftable = (refblocks * 8).div_ceil(cs) + 1;
        (body + refblocks + reftable).saturating_mul(cs)
    }
}

/// What one guest cluster holds.
#[derive(Clone, Copy, Debug)]
pub enum ClusterData<'a> {
    /// Plain cluster bytes (at most one cluster; a short last cluster of the
    /// image is zero-padded by reading).
    Plain(&'a [u8]),
    /// A compressed stream (shorter than a cluster) made with the writer's
    /// compression type.
    Compressed(&'a [u8]),
}

/// A streaming QCOW2 writer; see the module docs.
pub struct Qcow2Writer<W: WriteStorage> {
    out: W,
    opts: WriterOptions,
    cs: u64,
    l1: Vec<u64>,
    l1_offset: u64,
    /// The L2 table being filled: its L1 index and entries.
    l2: Option<(u64, Vec<u64>)>,
    /// Next free host byte (compressed data packs at byte granularity).
    next_host: u64,
    /// Refcounts of the host clusters in the current refcount window.
    rc_window: u64,
    rc_counts: Vec<u16>,
    /// Finished windows whose refcount blocks still need a cluster: placed
    /// at the next allocation, so multi-cluster structures stay contiguous.
    rc_pending: std::collections::VecDeque<(u64, Vec<u16>)>,
    reftable: Vec<u64>,
    /// The next guest cluster index that may be written.
    next_guest_cluster: u64,
    buf: WriteBuffer,
    /// Host bytes below this were handed to `writeback_hint`.
    written_back: u64,
}

/// Gathers writes to consecutive host offsets.
struct WriteBuffer {
    offset: u64,
    data: Vec<u8>,
}

impl<W: WriteStorage> Qcow2Writer<W> {
    /// Starts an image in `out` (an empty store).
    pub fn new(out: W, opts: WriterOptions) -> Result<Qcow2Writer<W>> {
        opts.validate()?;
        let cs = opts.cluster_size();
        let l1_entries = opts.l1_entries();
        let mut w = Qcow2Writer {
            out,
            opts,
            cs,
            l1: vec![0; l1_entries as usize],
            l1_offset: 0,
            l2: None,
            next_host: 0,
            rc_window: 0,
            rc_counts: vec![0; opts.refblock_entries() as usize],
            rc_pending: std::collections::VecDeque::new(),
            reftable: Vec::new(),
            next_guest_cluster: 0,
            written_back: 0,
            buf: WriteBuffer {
                offset: 0,
                data: Vec::new(),
            },
        };
        // Cluster 0: the header (written last).
        w.alloc_clusters(1)?;
        let l1_clusters = (l1_entries * 8).div_ceil(cs);
        w.l1_offset = if l1_clusters == 0 {
            // An empty image has an empty L1 table: it takes no cluster (a
            // cluster allocated for it would be a leak), but its offset
            // must still be a valid, aligned one.
            cs
        } else {
            w.alloc_clusters(l1_clusters)?
        };
        Ok(w)
    }

    pub fn options(&self) -> &WriterOptions {
        &self.opts
    }

    /// Bytes of the file so far (host allocation).
    pub fn file_len(&self) -> u64 {
        self.next_host
    }

    /// Writes guest cluster `guest_cluster` (index, not offset). Clusters
    /// must come in increasing order; clusters never written read as zeros.
    pub fn write_cluster(&mut self, guest_cluster: u64, data: ClusterData<'_>) -> Result<()> {
        self.write_clusters(&[(guest_cluster, data)])
    }

    /// Writes several guest clusters (increasing indexes). Data that lands
    /// back to back on the host goes out in one vectored write, straight
    /// from the callers' buffers.
    pub fn write_clusters(&mut self, clusters: &[(u64, ClusterData<'_>)]) -> Result<()> {
        let mut run: Vec<&[u8]> = Vec::new();
        let (mut run_start, mut run_end) = (0u64, 0u64);
        for &(guest_cluster, data) in clusters {
            let (host, bytes, entry) = match self.place_cluster(guest_cluster, data) {
                Ok(v) => v,
                Err(e) => {
                    // Keep what was placed consistent with the file.
                    self.write_run(&run, run_start)?;
                    return Err(e);
                }
            };
            if run.is_empty() || host != run_end {
                self.write_run(&run, run_start)?;
                run.clear();
                run_start = host;
            }
            run.push(bytes);
            run_end = host + bytes.len() as u64;
            let slot = (guest_cluster % self.opts.l2_entries()) as usize;
            if let Some((_, table)) = &mut self.l2 {
                table[slot] = entry;
            }
        }
        self.write_run(&run, run_start)
    }

    /// Checks one cluster write, switches L2 tables as needed and allocates
    /// its host space: `(host offset, bytes, L2 entry)`.
    fn place_cluster<'d>(
        &mut self,
        guest_cluster: u64,
        data: ClusterData<'d>,
    ) -> Result<(u64, &'d [u8], u64)> {
        let cs = self.cs;
        let total = self.opts.virtual_size.div_ceil(cs);
        if guest_cluster < self.next_guest_cluster || guest_cluster >= total {
            return Err(Error::invalid(format!(
                "guest cluster {guest_cluster} written out of order or past the end (next {}, count {total})",
                self.next_guest_cluster
            )));
        }
        match data {
            ClusterData::Plain(bytes) if bytes.len() as u64 > cs => {
                return Err(Error::invalid("plain cluster data longer than a cluster"))
            }
            ClusterData::Compressed(bytes) if bytes.is_empty() || bytes.len() as u64 >= cs => {
                return Err(Error::invalid(
                    "compressed cluster data must be shorter than a cluster",
                ))
            }
            _ => {}
        }
        self.next_guest_cluster = guest_cluster + 1;
        let l1_index = guest_cluster / self.opts.l2_entries();
        if self.l2.as_ref().map(|(i, _)| *i) != Some(l1_index) {
            self.flush_l2()?;
            self.l2 = Some((l1_index, vec![0; self.opts.l2_entries() as usize]));
        }
        Ok(match data {
            ClusterData::Plain(bytes) => {
                let host = self.alloc_clusters(1)?;
                (host, bytes, host | OFLAG_COPIED)
            }
            ClusterData::Compressed(bytes) => {
                let host = self.alloc_bytes(bytes.len() as u64)?;
                (host, bytes, self.compressed_entry(host, bytes.len() as u64))
            }
        })
    }

    fn write_run(&mut self, run: &[&[u8]], offset: u64) -> Result<()> {
        if run.is_empty() {
            return Ok(());
        }
        self.out
            .write_vectored_all_at(run, offset)
            .map_err(|source| Error::Write {
                offset,
                len: run.iter().map(|b| b.len() as u64).sum(),
                source,
            })?;
        let end = offset + run.iter().map(|b| b.len() as u64).sum::<u64>();
        if end >= self.written_back + WRITEBACK_EVERY {
            self.out
                .writeback_hint(self.written_back, end - self.written_back);
            self.written_back = end;
        }
        Ok(())
    }

    /// Finishes the image: last L2 table, refcounts, L1, header. Returns the
    /// store and the file length.
    pub fn finish(mut self) -> Result<(W, u64)> {
        self.flush_l2()?;
        // The refcount table goes last; size it for every window up to the
        // end of the file including itself and the final refcount blocks.
        let rb = self.opts.refblock_entries();
        let mut rt_clusters = 1u64;
        loop {
            let end_clusters =
                self.next_host.div_ceil(self.cs) + rt_clusters + 2 + self.rc_pending.len() as u64;
            let need = (end_clusters.div_ceil(rb) * 8).div_ceil(self.cs);
            if need <= rt_clusters {
                break;
            }
            rt_clusters = need;
        }
        if rt_clusters * self.cs > MAX_REFTABLE_BYTES {
            return Err(Error::TooLarge {
                what: "refcount table bytes",
                value: rt_clusters * self.cs,
                limit: MAX_REFTABLE_BYTES,
            });
        }
        let rt_offset = self.alloc_clusters(rt_clusters)?;
        // Place every remaining refcount block; the current window's block
        // goes inside the window when there is room.
        loop {
            self.place_pending()?;
            if self.rc_counts.iter().all(|&c| c == 0) {
                break;
            }
            let window = self.rc_window;
            let host = self.alloc_raw(1)?;
            let counts = if self.rc_window == window {
                // Inside the window: its counts include the block itself.
                self.rc_window += 1;
                std::mem::replace(&mut self.rc_counts, vec![0; rb as usize])
            } else {
                // The block landed past the window, which is now pending.
                let at = self
                    .rc_pending
                    .iter()
                    .position(|(w, _)| *w == window)
                    .ok_or_else(|| Error::invalid("refcount window lost"))?;
                self.rc_pending
                    .remove(at)
                    .map(|(_, c)| c)
                    .unwrap_or_default()
            };
            self.write_refblock(window, host, &counts)?;
        }
        let capacity = (rt_clusters * self.cs / 8) as usize;
        if self.reftable.len() > capacity {
            return Err(Error::invalid(format!(
                "refcount table needs {} entries but {capacity} were reserved",
                self.reftable.len()
            )));
        }
        let mut table = vec![0u8; (rt_clusters * self.cs) as usize];
        for (i, e) in self.reftable.iter().enumerate() {
            table[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        self.write(rt_offset, &table)?;
        // L1.
        let l1_clusters = (self.l1.len() as u64 * 8).div_ceil(self.cs);
        if l1_clusters > 0 {
            let mut l1 = vec![0u8; (l1_clusters * self.cs) as usize];
            for (i, e) in self.l1.iter().enumerate() {
                l1[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
            }
            self.write(self.l1_offset, &l1)?;
        }
        self.flush_buffer()?;
        // Header last.
        let header = self.header_bytes(rt_offset, rt_clusters);
        self.out
            .write_all_at(&header, 0)
            .map_err(|source| Error::Write {
                offset: 0,
                len: header.len() as u64,
                source,
            })?;
        let len = self.next_host;
        Ok((self.out, len))
    }

    fn header_bytes(&self, rt_offset: u64, rt_clusters: u64) -> Vec<u8> {
        let mut h = vec![0u8; self.cs as usize];
        let put32 =
            |h: &mut [u8], at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |h: &mut [u8], at: usize, v: u64| h[at..at + 8].copy_from_slice(&v.to_be_bytes());
        put32(&mut h, 0, MAGIC);
        put32(&mut h, 4, 3); // version
        put64(&mut h, 8, 0); // backing_file_offset
        put32(&mut h, 16, 0); // backing_file_size
        put32(&mut h, 20, self.opts.cluster_bits);
        put64(&mut h, 24, self.opts.virtual_size);
        put32(&mut h, 32, 0); // crypt_method
        put32(&mut h, 36, self.l1.len() as u32); // l1_size
        put64(&mut h, 40, self.l1_offset);
        put64(&mut h, 48, rt_offset);
        put32(&mut h, 56, rt_clusters as u32);
        put32(&mut h, 60, 0); // nb_snapshots
        put64(&mut h, 64, 0); // snapshots_offset
        let zstd = self.opts.compression_type == CompressionType::Zstd;
        let incompat = if zstd { INCOMPAT_COMPRESSION } else { 0 };
        put64(&mut h, 72, incompat);
        put64(&mut h, 80, 0); // compatible_features
        put64(&mut h, 88, 0); // autoclear_features
        put32(&mut h, 96, REFCOUNT_ORDER);
        put32(&mut h, 100, HEADER_LEN);
        // compression_type, then padding to 112; after it the header
        // extensions: only the end marker (8 zero bytes).
        h[104] = u8::from(zstd);
        h
    }

    /// The L2 entry of a compressed cluster at `host` of `len` bytes (spec:
    /// "Compressed Clusters Descriptor": offset in the low x bits, the count
    /// of additional 512-byte sectors above them).
    fn compressed_entry(&self, host: u64, len: u64) -> u64 {
        let x = 62 - (self.opts.cluster_bits - 8);
        let extra_sectors = (host + len - 1) / 512 - host / 512;
        OFLAG_COMPRESSED | (extra_sectors << x) | host
    }

    fn flush_l2(&mut self) -> Result<()> {
        let Some((l1_index, table)) = self.l2.take() else {
            return Ok(());
        };
        if table.iter().all(|&e| e == 0) {
            return Ok(());
        }
        let host = self.alloc_clusters(1)?;
        let mut bytes = vec![0u8; self.cs as usize];
        for (i, e) in table.iter().enumerate() {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        self.write(host, &bytes)?;
        self.l1[l1_index as usize] = host | OFLAG_COPIED;
        Ok(())
    }

    /// Allocates `n` whole, contiguous clusters at the end of the file
    /// (after placing pending refcount blocks).
    fn alloc_clusters(&mut self, n: u64) -> Result<u64> {
        self.place_pending()?;
        self.alloc_raw(n)
    }

    /// Allocates `n` clusters without placing pending blocks.
    fn alloc_raw(&mut self, n: u64) -> Result<u64> {
        let start = self.next_host.next_multiple_of(self.cs);
        self.next_host = start + n * self.cs;
        for c in start / self.cs..self.next_host / self.cs {
            self.incref(c)?;
        }
        Ok(start)
    }

    /// Allocates `len` bytes for compressed data, packed after the previous
    /// allocation; each host cluster the sectors touch gets one reference
    /// (qemu counts compressed clusters per host cluster they touch).
    fn alloc_bytes(&mut self, len: u64) -> Result<u64> {
        self.place_pending()?;
        let start = self.next_host;
        self.next_host = start + len;
        let first = (start & !511) / self.cs;
        let last = (start + len - 1) / self.cs;
        for c in first..=last {
            self.incref(c)?;
        }
        Ok(start)
    }

    /// Counts one reference to host `cluster`. Allocation is monotonic, so
    /// a cluster past the current window closes it (and any windows in
    /// between); closed windows wait in `rc_pending` for a cluster.
    fn incref(&mut self, cluster: u64) -> Result<()> {
        let rb = self.opts.refblock_entries();
        let window = cluster / rb;
        if window < self.rc_window {
            return Err(Error::invalid(format!(
                "refcount for host cluster {cluster} requested after its block was written"
            )));
        }
        while window > self.rc_window {
            let counts = std::mem::replace(&mut self.rc_counts, vec![0; rb as usize]);
            if counts.iter().any(|&c| c != 0) {
                self.rc_pending.push_back((self.rc_window, counts));
            }
            self.rc_window += 1;
        }
        let slot = &mut self.rc_counts[(cluster % rb) as usize];
        *slot = slot
            .checked_add(1)
            .ok_or_else(|| Error::invalid("refcount overflow"))?;
        Ok(())
    }

    /// Gives every closed window's refcount block a cluster (which may
    /// close further windows) and writes it.
    fn place_pending(&mut self) -> Result<()> {
        while let Some((window, counts)) = self.rc_pending.pop_front() {
            let host = self.alloc_raw(1)?;
            self.write_refblock(window, host, &counts)?;
        }
        Ok(())
    }

    fn write_refblock(&mut self, window: u64, host: u64, counts: &[u16]) -> Result<()> {
        let mut bytes = vec![0u8; self.cs as usize];
        for (i, c) in counts.iter().enumerate() {
            bytes[i * 2..i * 2 + 2].copy_from_slice(&c.to_be_bytes());
        }
        self.write(host, &bytes)?;
        let w = window as usize;
        if self.reftable.len() <= w {
            self.reftable.resize(w + 1, 0);
        }
        self.reftable[w] = host;
        Ok(())
    }

    fn write(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        let contiguous = offset == self.buf.offset + self.buf.data.len() as u64;
        if !contiguous || self.buf.data.len() + bytes.len() > WRITE_BUFFER_BYTES {
            self.flush_buffer()?;
            self.buf.offset = offset;
        }
        if bytes.len() >= WRITE_BUFFER_BYTES {
            return self
                .out
                .write_all_at(bytes, offset)
                .map_err(|source| Error::Write {
                    offset,
                    len: bytes.len() as u64,
                    source,
                });
        }
        self.buf.data.extend_from_slice(bytes);
        Ok(())
    }

    fn flush_buffer(&mut self) -> Result<()> {
        if self.buf.data.is_empty() {
            return Ok(());
        }
        let offset = self.buf.offset;
        self.out
            .write_all_at(&self.buf.data, offset)
            .map_err(|source| Error::Write {
                offset,
                len: self.buf.data.len() as u64,
                source,
            })?;
        self.buf.offset += self.buf.data.len() as u64;
        self.buf.data.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::qcow2::compress::ClusterCompressor;
    use crate::qcow2::{check::check, ClusterKind, Qcow2};
    use crate::Storage;

    /// Deterministic, partly compressible bytes.
    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|i| {
                if i % 64 < 40 {
                    (seed as u8).wrapping_add((i / 64) as u8)
                } else {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                }
            })
            .collect()
    }

    /// Writes `clusters` (guest index → bytes) and returns the image bytes.
    fn write_image(
        opts: WriterOptions,
        clusters: &[(u64, Vec<u8>)],
        compress: bool,
    ) -> (Vec<u8>, usize) {
        let out = Mutex::new(Vec::new());
        let mut w = Qcow2Writer::new(&out, opts).unwrap();
        let mut comp = ClusterCompressor::new(opts.compression_type).unwrap();
        let mut buf = Vec::new();
        let mut n_compressed = 0;
        for (idx, data) in clusters {
            let mut full = data.clone();
            full.resize(opts.cluster_size() as usize, 0);
            if compress && comp.compress(&full, &mut buf).unwrap() {
                n_compressed += 1;
                w.write_cluster(*idx, ClusterData::Compressed(&buf))
                    .unwrap();
            } else {
                w.write_cluster(*idx, ClusterData::Plain(data)).unwrap();
            }
        }
        let (_, len) = w.finish().unwrap();
        let bytes = out.into_inner().unwrap();
        assert_eq!(bytes.len() as u64, len, "file length is the allocation end");
        (bytes, n_compressed)
    }

    /// Reads the image back with the reader and checks it: every cluster
    /// reads as written, everything else as zeros, and check finds nothing.
    fn verify(bytes: Vec<u8>, opts: WriterOptions, clusters: &[(u64, Vec<u8>)]) {
        let q = Qcow2::open(Arc::new(bytes) as Arc<dyn Storage>).unwrap();
        assert_eq!(q.virtual_size(), opts.virtual_size);
        assert_eq!(q.header().version, 3);
        let report = check(&q).unwrap();
        assert!(report.is_clean(), "{report:?}");
        let cs = opts.cluster_size();
        let mut expected = vec![0u8; opts.virtual_size as usize];
        for (idx, data) in clusters {
            let at = (idx * cs) as usize;
            expected[at..at + data.len()].copy_from_slice(data);
        }
        let mut got = vec![0u8; opts.virtual_size as usize];
        q.read_at(&mut got, 0, &mut |o, _| {
            o.fill(0);
            Ok(())
        })
        .unwrap();
        assert!(got == expected, "guest content differs");
        // Unwritten clusters are unallocated.
        let written: std::collections::HashSet<u64> = clusters.iter().map(|c| c.0).collect();
        for idx in 0..opts.virtual_size.div_ceil(cs) {
            let m = q.lookup(idx * cs, cs).unwrap();
            assert_eq!(
                m.kind == ClusterKind::Unallocated,
                !written.contains(&idx),
                "cluster {idx}: {:?}",
                m.kind
            );
        }
    }

    fn opts(virtual_size: u64, cluster_bits: u32, ty: CompressionType) -> WriterOptions {
        WriterOptions {
            virtual_size,
            cluster_bits,
            compression_type: ty,
        }
    }

    #[test]
    fn empty_image_is_valid() {
        let o = opts(1 << 30, 16, CompressionType::Zlib);
        let (bytes, _) = write_image(o, &[], false);
        // Header, L1, refcount block, refcount table.
        assert_eq!(bytes.len(), 4 << 16);
        verify(bytes, o, &[]);
    }

    /// A zero-size image: no L1 cluster (qemu-img check would call it a
    /// leak).
    #[test]
    fn zero_size_image_has_no_l1_cluster() {
        let o = opts(0, 16, CompressionType::Zlib);
        let (bytes, _) = write_image(o, &[], false);
        // Header, refcount block, refcount table.
        assert_eq!(bytes.len(), 3 << 16);
        verify(bytes, o, &[]);
    }

    #[test]
    fn scattered_plain_clusters_read_back() {
        let o = opts(64 << 20, 16, CompressionType::Zlib);
        let clusters: Vec<_> = [0u64, 1, 2, 100, 511, 512, 900, 1023]
            .iter()
            .map(|&i| (i, pattern(i, 1 << 16)))
            .collect();
        let (bytes, _) = write_image(o, &clusters, false);
        verify(bytes, o, &clusters);
    }

    /// 512-byte clusters: a refcount block covers 256 clusters, so a few
    /// hundred clusters cross many windows, and L2 tables (64 entries) are
    /// flushed often.
    #[test]
    fn small_clusters_cross_many_refcount_windows() {
        for (compress, ty) in [
            (false, CompressionType::Zlib),
            (true, CompressionType::Zlib),
            (true, CompressionType::Zstd),
        ] {
            let o = opts(4 << 20, 9, ty);
            let clusters: Vec<_> = (0..8192u64)
                .filter(|i| i % 7 != 3)
                .map(|i| (i, pattern(i, 512)))
                .collect();
            let (bytes, n) = write_image(o, &clusters, compress);
            assert_eq!(n > 0, compress);
            verify(bytes, o, &clusters);
        }
    }

    /// 512-byte clusters and a 2 GiB guest: the L1 table alone (1024
    /// clusters) spans four refcount windows, whose blocks must be placed
    /// after it without breaking it up.
    #[test]
    fn multi_window_l1_table_stays_contiguous() {
        let o = opts(2 << 30, 9, CompressionType::Zlib);
        let clusters: Vec<_> = [0u64, 5, 100_000, 4_000_000]
            .iter()
            .map(|&i| (i, pattern(i, 512)))
            .collect();
        let out = Mutex::new(Vec::new());
        let mut w = Qcow2Writer::new(&out, o).unwrap();
        for (i, d) in &clusters {
            w.write_cluster(*i, ClusterData::Plain(d)).unwrap();
        }
        w.finish().unwrap();
        let bytes = out.into_inner().unwrap();
        let q = Qcow2::open(Arc::new(bytes) as Arc<dyn Storage>).unwrap();
        let report = check(&q).unwrap();
        assert!(report.is_clean(), "{report:?}");
        let mut buf = vec![0u8; 512];
        for (i, d) in &clusters {
            q.read_at(&mut buf, i * 512, &mut |o, _| {
                o.fill(0);
                Ok(())
            })
            .unwrap();
            assert!(&buf == d);
        }
    }

    #[test]
    fn compressed_clusters_share_host_clusters_and_read_back() {
        for ty in [CompressionType::Zlib, CompressionType::Zstd] {
            let o = opts(32 << 20, 16, ty);
            let clusters: Vec<_> = (0..300u64).map(|i| (i, pattern(i, 1 << 16))).collect();
            let (bytes, n) = write_image(o, &clusters, true);
            assert_eq!(n, 300);
            assert!(bytes.len() < 300 << 16, "compressed image is smaller");
            verify(bytes, o, &clusters);
        }
    }

    #[test]
    fn short_last_cluster_and_unaligned_size() {
        let o = opts((3 << 16) + 1000, 16, CompressionType::Zlib);
        let clusters = vec![(0, pattern(1, 1 << 16)), (3, pattern(2, 1000))];
        let (bytes, _) = write_image(o, &clusters, false);
        verify(bytes, o, &clusters);
    }

    #[test]
    fn incompressible_cluster_is_not_stored_compressed() {
        let mut comp = ClusterCompressor::new(CompressionType::Zstd).unwrap();
        let mut x = 0x1234_5678_9abc_def1u64;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut out = Vec::new();
        assert!(!comp.compress(&noise, &mut out).unwrap());
        let mut z = ClusterCompressor::new(CompressionType::Zlib).unwrap();
        assert!(!z.compress(&noise, &mut out).unwrap());
        assert!(z.compress(&[0u8; 65536], &mut out).unwrap());
        assert!(out.len() < 1000);
    }

    #[test]
    fn out_of_order_and_oversized_writes_are_refused() {
        let o = opts(1 << 20, 16, CompressionType::Zlib);
        let out = Mutex::new(Vec::new());
        let mut w = Qcow2Writer::new(&out, o).unwrap();
        w.write_cluster(5, ClusterData::Plain(&[1; 512])).unwrap();
        assert!(w.write_cluster(5, ClusterData::Plain(&[1; 512])).is_err());
        assert!(w.write_cluster(16, ClusterData::Plain(&[1; 512])).is_err());
        assert!(w
            .write_cluster(7, ClusterData::Plain(&vec![1; (1 << 16) + 1]))
            .is_err());
        assert!(w
            .write_cluster(8, ClusterData::Compressed(&vec![1; 1 << 16]))
            .is_err());
    }

    #[test]
    fn options_are_validated() {
        assert!(opts(1 << 30, 8, CompressionType::Zlib).validate().is_err());
        assert!(opts(1 << 30, 22, CompressionType::Zlib).validate().is_err());
        // 512-byte clusters: 1 PiB would need a 32 GiB L1 table.
        assert!(opts(1 << 50, 9, CompressionType::Zlib).validate().is_err());
        assert!(opts(1 << 50, 16, CompressionType::Zlib).validate().is_ok());
    }

    #[test]
    fn max_file_size_bounds_the_real_size() {
        for (cb, n) in [(9u32, 5000u64), (16, 300), (21, 3)] {
            let cs = 1u64 << cb;
            let o = opts(n * cs * 3, cb, CompressionType::Zlib);
            let clusters: Vec<_> = (0..n).map(|i| (i * 3, vec![0xa5; cs as usize])).collect();
            let (bytes, _) = write_image(o, &clusters, false);
            assert!(
                (bytes.len() as u64) <= o.max_file_size(n),
                "{} > {}",
                bytes.len(),
                o.max_file_size(n)
            );
        }
    }
}
