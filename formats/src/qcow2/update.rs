//! In-place updates of an existing QCOW2 image: the format-layer core of
//! "sync into an existing qcow2". New guest content for whole clusters is
//! staged ([`Updater::write`], [`Updater::zero`]) and applied by
//! [`Updater::flush`] in qemu's order, with a barrier between the steps, so
//! that a crash at any barrier leaves an image `qemu-img check` finds no
//! corruption in (leaked clusters at most):
//!
//! 1. refcounts of newly allocated clusters raised (new refcount blocks and
//!    a moved refcount table written first, then hooked into the refcount
//!    table or the header); qemu `update_refcount`, `alloc_refcount_block`;
//! 2. data written (in place or into new clusters), new L2 tables (and a
//!    moved L1 table) written whole;
//! 3. entries of existing L2 tables, then L1 entries (or the header's L1
//!    pointer and the virtual size in one write); qemu
//!    `qcow2_alloc_cluster_link_l2`, `l2_allocate`;
//! 4. refcounts of clusters no longer referenced lowered
//!    (qemu `qcow2_free_any_cluster`);
//! 5. clusters whose refcount reached 0 punched.
//!
//! References are counted as qemu counts them: once per L1 table that
//! reaches an L2 table, so a data cluster in an L2 table shared with an
//! internal snapshot has a refcount of 2 even though one table names it.
//! Copying such a table (COW) leaves its data clusters' refcounts alone.
//!
//! No paths, no policy: the caller's [`UpdateFile`] journals, syncs and may
//! stop. Every size comes from the file's length, never from a header count
//! alone, and arithmetic on image data is checked: hostile input yields an
//! error, never a panic. Planning happens in memory before anything is
//! written, so an invalid structure found while planning leaves the file as
//! it was. Work is done in batches of at most [`BATCH_TABLE_BYTES`] of L2
//! tables, each batch a complete run of the five steps, so memory follows
//! the staged data, not the image size.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io;

use super::header::{
    Header, AUTOCLEAR_BITMAPS, MAX_L1_BYTES, MAX_REFTABLE_BYTES, MAX_VIRTUAL_SIZE,
};
use super::{
    compressed_descriptor, L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED,
    OFLAG_ZERO,
};
use crate::error::{Error, Result};

/// Refcount table entry: bits 9-63 are the refcount block offset, 0-8 reserved.
const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
const REFT_RESERVED_MASK: u64 = 0x1ff;
/// Extended L2 bitmap (second word of an entry): bits 0-31 "allocated",
/// bits 32-63 "reads as zeros", one bit per subcluster.
const EXT_ALL_ALLOCATED: u64 = 0x0000_0000_ffff_ffff;
const EXT_ALL_ZERO: u64 = 0xffff_ffff_0000_0000;
/// Metadata is rewritten in whole 512-byte sectors: a sector write is what
/// qemu (and the spec's crash model) treats as atomic.
const SECTOR: u64 = 512;
/// Host offsets must fit bits 9-55 of an L2 entry.
const MAX_HOST_OFFSET: u64 = 1 << 56;
/// L2 tables one batch of a flush may hold in memory (with at least one
/// table, and at most MAX_BATCH_TABLES of them for tiny clusters).
pub const BATCH_TABLE_BYTES: u64 = 32 << 20;
const MAX_BATCH_TABLES: u64 = 4096;
/// Consecutive data clusters are gathered into writes of up to this size.
const WRITE_GATHER_BYTES: usize = 4 << 20;

/// Header field offsets (spec: "Header").
const HDR_SIZE: u64 = 24;
const HDR_REFTABLE: u64 = 48;
const HDR_AUTOCLEAR: u64 = 88;

/// The image file being updated. The caller's policy lives here: it journals
/// the old bytes of anything below the file's original end before a write or
/// punch overwrites them, makes `barrier` an fdatasync, and may stop at the
/// Nth barrier in crash tests.
#[allow(clippy::len_without_is_empty)]
pub trait UpdateFile {
    fn len(&self) -> io::Result<u64>;
    /// Reads exactly; bytes past the end read as zeros.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Deallocates a range (FALLOC_FL_PUNCH_HOLE); it reads as zeros after.
    fn punch(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// Everything written before is durable before anything written after.
    fn barrier(&mut self) -> io::Result<()>;
}

/// An image in memory, for tests and fuzzers. Writes may grow it up to
/// [`VEC_FILE_LIMIT`] bytes; a punch zeroes and never grows it.
impl UpdateFile for Vec<u8> {
    fn len(&self) -> io::Result<u64> {
        Ok(self.as_slice().len() as u64)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        buf.fill(0);
        let Ok(start) = usize::try_from(offset) else {
            return Ok(());
        };
        if let Some(src) = self.get(start..) {
            let n = src.len().min(buf.len());
            buf[..n].copy_from_slice(&src[..n]);
        }
        Ok(())
    }
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= VEC_FILE_LIMIT)
            .ok_or_else(|| io::Error::other("write past the in-memory file limit"))?;
        let (start, end) = (offset as usize, end as usize);
        if self.as_slice().len() < end {
            self.resize(end, 0);
        }
        self[start..end].copy_from_slice(buf);
        Ok(())
    }
    fn punch(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let n = self.as_slice().len() as u64;
        let start = offset.min(n) as usize;
        let end = offset.saturating_add(len).min(n) as usize;
        self[start..end].fill(0);
        Ok(())
    }
    fn barrier(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How large the in-memory [`UpdateFile`] may grow (a bound for fuzzers).
pub const VEC_FILE_LIMIT: u64 = 1 << 32;

/// What an update did, for `--stats` and JSON output.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpdateStats {
    /// Host clusters whose refcount went from 0 to 1 (data, L2 tables,
    /// refcount blocks, moved tables).
    pub clusters_allocated: u64,
    /// Host clusters whose refcount went down to 0.
    pub clusters_freed: u64,
    /// Bytes written to metadata (refcount blocks and table, L2, L1, header).
    pub metadata_bytes_written: u64,
}

/// Bytes a cluster write puts at a host offset.
enum Payload {
    Owned(Vec<u8>),
    /// A cluster of zeros (version 2 with a backing file has no zero flag).
    Zeros,
}

/// What one batch writes, step by step. Refcount increments are applied to
/// the cached refcount blocks as clusters are allocated; decrements wait in
/// `decs` for step 4.
#[derive(Default)]
struct Plan {
    /// Step 2: data clusters, at host offsets.
    data: Vec<(u64, Payload)>,
    /// Step 2: new L2 tables (new ranges, COW copies), written whole.
    new_l2: Vec<(u64, Vec<u64>)>,
    /// Step 3: existing L2 tables with the sectors that changed.
    l2_updates: Vec<(u64, Vec<u64>, BTreeSet<u64>)>,
    /// Step 3: changed L1 entries (unless the L1 table moved).
    l1_dirty: BTreeSet<u64>,
    /// Step 3: a new virtual size for the header.
    new_size: Option<u64>,
    /// Step 4: refcount decrements per host cluster index.
    decs: BTreeMap<u64, u64>,
}

impl Plan {
    fn is_empty(&self) -> bool {
        self.data.is_empty()
            && self.new_l2.is_empty()
            && self.l2_updates.is_empty()
            && self.l1_dirty.is_empty()
            && self.new_size.is_none()
            && self.decs.is_empty()
    }
}

/// A refcount block in memory.
struct RefBlock {
    data: Vec<u8>,
    /// Allocated in this batch: written whole, then hooked into the table.
    is_new: bool,
    /// Sectors changed since the block was last written.
    dirty: BTreeSet<u64>,
}

/// The host clusters an L2 entry references.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HostRef {
    None,
    /// A standard cluster (data, or preallocated zeros): its cluster index.
    Cluster(u64),
    /// A compressed cluster: the first and last host cluster its bytes touch.
    Compressed(u64, u64),
}

/// The staged work for one L2 table's range (guest cluster indices).
#[derive(Default)]
struct TableOps {
    l1_index: u64,
    data: Vec<(u64, Vec<u8>)>,
    zeros: Vec<(u64, u64)>,
    /// Shrinking: entries from this guest cluster on become unallocated.
    discard_from: Option<u64>,
    /// Shrinking: the whole table goes (L1 entry cleared).
    drop: bool,
}

/// An open QCOW2 image being updated in place.
pub struct Updater {
    header: Header,
    cs: u64,
    /// Guest clusters one L2 table maps, and u64 words per L2 entry.
    l2_entries: u64,
    l2_words: u64,
    /// log2 of the entries in one refcount block.
    rb_bits: u32,
    file_len: u64,
    l1: Vec<u64>,
    l1_offset: u64,
    l1_clusters: u64,
    /// The L1 table's old place while a moved one is not yet in the header.
    l1_moved_from: Option<(u64, u64)>,
    reftable: Vec<u64>,
    rt_offset: u64,
    rt_clusters: u64,
    rt_moved_from: Option<(u64, u64)>,
    /// Refcount table entries changed in place (new refcount blocks).
    rt_dirty: BTreeSet<u64>,
    blocks: HashMap<u64, RefBlock>,
    /// Clusters the refcount table names as refcount blocks: never free,
    /// never data, whatever a (damaged) refcount says.
    block_clusters: HashSet<u64>,
    /// Clusters allocated in this batch: a reference to one of them found in
    /// the image means its refcount was wrong (0) before.
    alloc_now: HashSet<u64>,
    /// No free cluster below this index (qemu's free_cluster_index).
    free_hint: u64,
    /// One past the highest cluster in the file or allocated.
    alloc_end: u64,
    growing_reftable: bool,
    staged_data: BTreeMap<u64, Vec<u8>>,
    /// Zero ranges of guest clusters, start -> end (exclusive), disjoint.
    staged_zero: BTreeMap<u64, u64>,
    staged_bytes: u64,
    batch_tables: u64,
    stats: UpdateStats,
    /// An error while applying left memory and file out of step.
    poisoned: bool,
}

fn read(f: &dyn UpdateFile, buf: &mut [u8], offset: u64) -> Result<()> {
    f.read_exact_at(buf, offset).map_err(|source| Error::Io {
        offset,
        len: buf.len() as u64,
        source,
    })
}

fn words_from(raw: &[u8]) -> Vec<u64> {
    raw.chunks_exact(8)
        .map(|c| c.try_into().map_or(0, u64::from_be_bytes))
        .collect()
}

fn words_to_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_be_bytes()).collect()
}

/// Entry `i` of a refcount block of `1 << order`-bit entries (sub-byte widths
/// from the least significant bit; qemu `get_refcount_ro0..6`).
fn rc_get(block: &[u8], i: u64, order: u32) -> u64 {
    let bit = i << order;
    let at = (bit / 8) as usize;
    match order {
        0..=2 => {
            let width = 1u32 << order;
            let byte = block.get(at).copied().unwrap_or(0);
            u64::from(byte >> (bit % 8)) & ((1u64 << width) - 1)
        }
        3 => block.get(at).copied().map_or(0, u64::from),
        _ => {
            let n = 1usize << (order - 3);
            block
                .get(at..at + n)
                .map_or(0, |b| b.iter().fold(0u64, |v, &x| v << 8 | u64::from(x)))
        }
    }
}

fn rc_put(block: &mut [u8], i: u64, order: u32, v: u64) {
    let bit = i << order;
    let at = (bit / 8) as usize;
    match order {
        0..=2 => {
            let width = 1u32 << order;
            let mask = ((1u16 << width) - 1) as u8;
            let shift = (bit % 8) as u32;
            if let Some(b) = block.get_mut(at) {
                *b = (*b & !(mask << shift)) | (((v as u8) & mask) << shift);
            }
        }
        _ => {
            let n = 1usize << (order - 3);
            if let Some(b) = block.get_mut(at..at + n) {
                b.copy_from_slice(&v.to_be_bytes()[8 - n..]);
            }
        }
    }
}

/// Merges sector indices into (first, count) runs.
fn sector_runs(sectors: &BTreeSet<u64>) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &s in sectors {
        match runs.last_mut() {
            Some((first, n)) if *first + *n == s => *n += 1,
            _ => runs.push((s, 1)),
        }
    }
    runs
}

impl Updater {
    /// Reads the header, L1 and refcount table. Refuses encryption, an
    /// external data file, the dirty or corrupt bit, unknown incompatible
    /// features and tables outside the file.
    pub fn open(f: &dyn UpdateFile) -> Result<Updater> {
        let file_len = f.len().map_err(|source| Error::Io {
            offset: 0,
            len: 0,
            source,
        })?;
        if file_len < 72 {
            return Err(Error::invalid(format!(
                "file is too short for a qcow2 header ({file_len} bytes)"
            )));
        }
        let mut prefix = [0u8; 24];
        read(f, &mut prefix, 0)?;
        let first_len = Header::first_cluster_len(&prefix)?.min(file_len);
        let mut first = vec![0u8; first_len as usize];
        read(f, &mut first, 0)?;
        // Unknown incompatible features, crypt_method, tables outside the
        // file: refused here.
        let header = Header::parse(&first, file_len)?;
        if header.has_crypto_extension {
            return Err(Error::unsupported("image is encrypted"));
        }
        if header.has_data_file() {
            return Err(Error::unsupported(
                "image keeps its data in an external data file",
            ));
        }
        if header.corrupt() {
            return Err(Error::invalid(
                "image is marked corrupt (incompatible feature bit 1)",
            ));
        }
        if header.dirty() {
            return Err(Error::invalid(
                "image was not closed cleanly (dirty bit set): its refcounts may be stale",
            ));
        }
        let cs = header.cluster_size();
        // Both tables were checked to lie inside the file (Header::parse),
        // so these allocations are bounded by its length.
        let l1_bytes = u64::from(header.l1_size) * 8;
        let mut raw = vec![0u8; l1_bytes as usize];
        read(f, &mut raw, header.l1_table_offset)?;
        let l1 = words_from(&raw);
        let rt_bytes = u64::from(header.refcount_table_clusters) << header.cluster_bits;
        let mut raw = vec![0u8; rt_bytes as usize];
        read(f, &mut raw, header.refcount_table_offset)?;
        let reftable = words_from(&raw);
        let block_clusters = reftable
            .iter()
            .map(|e| (e & REFT_OFFSET_MASK) / cs)
            .filter(|&c| c != 0)
            .collect();
        let l2_words = header.l2_entry_size() / 8;
        Ok(Updater {
            cs,
            l2_entries: cs / header.l2_entry_size(),
            l2_words,
            rb_bits: header.cluster_bits + 3 - header.refcount_order,
            file_len,
            l1,
            l1_offset: header.l1_table_offset,
            l1_clusters: l1_bytes.div_ceil(cs),
            l1_moved_from: None,
            reftable,
            rt_offset: header.refcount_table_offset,
            rt_clusters: u64::from(header.refcount_table_clusters),
            rt_moved_from: None,
            rt_dirty: BTreeSet::new(),
            blocks: HashMap::new(),
            block_clusters,
            alloc_now: HashSet::new(),
            free_hint: 1,
            alloc_end: file_len.div_ceil(cs),
            growing_reftable: false,
            staged_data: BTreeMap::new(),
            staged_zero: BTreeMap::new(),
            staged_bytes: 0,
            batch_tables: (BATCH_TABLE_BYTES / cs).clamp(1, MAX_BATCH_TABLES),
            stats: UpdateStats::default(),
            poisoned: false,
            header,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn cluster_size(&self) -> u64 {
        self.cs
    }

    pub fn stats(&self) -> UpdateStats {
        self.stats
    }

    /// Bytes of guest data staged and not yet flushed (the caller flushes
    /// when this grows past its memory budget).
    pub fn staged_bytes(&self) -> u64 {
        self.staged_bytes
    }

    /// Persistent bitmaps claim to be consistent (bitmaps extension present,
    /// autoclear bit 0 set).
    pub fn bitmaps_in_use(&self) -> bool {
        self.header.bitmaps.is_some() && self.header.autoclear_features & AUTOCLEAR_BITMAPS != 0
    }

    /// Clears autoclear bit 0 (the spec's way to mark the bitmaps
    /// inconsistent), durably (write + barrier), before any other change.
    /// qemu then ignores the bitmaps, and `qemu-img check` counts their
    /// clusters as leaked until `qemu-img check -r leaks` frees them.
    pub fn invalidate_bitmaps(&mut self, f: &mut dyn UpdateFile) -> Result<()> {
        self.usable()?;
        if self.header.autoclear_features & AUTOCLEAR_BITMAPS == 0 || self.header.version < 3 {
            return Ok(());
        }
        // The clusters the bitmaps hold, found (and validated) before
        // anything is written.
        let mut plan = Plan::default();
        self.plan_bitmap_release(&*f, &mut plan)?;
        let v = self.header.autoclear_features & !AUTOCLEAR_BITMAPS;
        let r = self
            .put_meta(f, &v.to_be_bytes(), HDR_AUTOCLEAR)
            .and_then(|()| barrier(f));
        if r.is_err() {
            self.poisoned = true;
        }
        r?;
        self.header.autoclear_features = v;
        // With the bit clear, qemu reads the bitmaps extension as absent:
        // its directory, tables and data are no one's, and are freed (else
        // `qemu-img check` finds them leaked). A crash before this leaves
        // leaks only.
        let r = self.execute(f, plan);
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    /// Step-4 decrements for every cluster of the persistent bitmaps: the
    /// directory, each bitmap table and each data cluster a table names
    /// (spec: "Bitmaps extension", "Bitmap directory", "Bitmap table").
    fn plan_bitmap_release(&mut self, f: &dyn UpdateFile, plan: &mut Plan) -> Result<()> {
        let Some(ext) = self.header.bitmaps else {
            return Ok(());
        };
        let cs = self.cs;
        let in_file = |off: u64, len: u64| off.checked_add(len).is_some_and(|e| e <= self.file_len);
        let dir_len = ext.bitmap_directory_size;
        let dir_off = ext.bitmap_directory_offset;
        if dir_len == 0 || dir_off % cs != 0 || dir_off == 0 || !in_file(dir_off, dir_len) {
            return Err(Error::invalid(format!(
                "bitmap directory at {dir_off:#x} ({dir_len} bytes) does not fit the file"
            )));
        }
        let mut dir = vec![0u8; dir_len as usize];
        read(f, &mut dir, dir_off)?;
        let mut clusters: Vec<u64> = (dir_off / cs..(dir_off + dir_len).div_ceil(cs)).collect();
        let mut at = 0usize;
        for _ in 0..ext.nb_bitmaps {
            let field = |a: usize, n: usize| dir.get(at + a..at + a + n);
            let (Some(t), Some(sz), Some(ns), Some(xs)) =
                (field(0, 8), field(8, 4), field(18, 2), field(20, 4))
            else {
                return Err(Error::invalid("bitmap directory entry cut short"));
            };
            let table_off = u64::from_be_bytes(t.try_into().unwrap_or_default()) & L1E_OFFSET_MASK;
            let entries = u64::from(u32::from_be_bytes(sz.try_into().unwrap_or_default()));
            let name = usize::from(u16::from_be_bytes(ns.try_into().unwrap_or_default()));
            let extra = u32::from_be_bytes(xs.try_into().unwrap_or_default()) as usize;
            let table_len = entries * 8;
            if table_off % cs != 0 || table_off == 0 || !in_file(table_off, table_len) {
                return Err(Error::invalid(format!(
                    "bitmap table at {table_off:#x} does not fit the file"
                )));
            }
            let mut table = vec![0u8; table_len as usize];
            read(f, &mut table, table_off)?;
            clusters.extend(
                table_off / cs..(table_off + table_len).div_ceil(cs).max(table_off / cs + 1),
            );
            for w in words_from(&table) {
                let data = w & L1E_OFFSET_MASK;
                if data != 0 {
                    if data % cs != 0 || !in_file(data, cs) {
                        return Err(Error::invalid(format!(
                            "bitmap data cluster at {data:#x} does not fit the file"
                        )));
                    }
                    clusters.push(data / cs);
                }
            }
            // The entry: 24 bytes, extra data, the name, padded to 8.
            at = (at + 24 + extra + name).next_multiple_of(8);
        }
        for c in clusters {
            self.plan_dec(f, plan, c)?;
        }
        Ok(())
    }

    fn usable(&self) -> Result<()> {
        if self.poisoned {
            return Err(Error::invalid(
                "an earlier failed update left the image state unknown; reopen it",
            ));
        }
        Ok(())
    }

    fn guest_clusters(&self) -> u64 {
        self.header.size.div_ceil(self.cs)
    }

    /// Checks a staged range: cluster aligned, whole clusters, inside the
    /// virtual size (the last cluster may extend past it). Returns the first
    /// guest cluster and the count.
    fn staged_range(&self, guest_offset: u64, len: u64) -> Result<(u64, u64)> {
        let cs = self.cs;
        if guest_offset % cs != 0 || len % cs != 0 {
            return Err(Error::invalid(format!(
                "update at guest offset {guest_offset:#x} (length {len:#x}) is not in whole clusters of {cs:#x} bytes"
            )));
        }
        let first = guest_offset / cs;
        let n = len / cs;
        match first.checked_add(n) {
            Some(end) if end <= self.guest_clusters() => Ok((first, n)),
            _ => Err(Error::invalid(format!(
                "update at guest offset {guest_offset:#x} (length {len:#x}) reaches past the virtual size {:#x}",
                self.header.size
            ))),
        }
    }

    /// Stages new guest content for whole clusters (see the module doc). An
    /// all-zero cluster is staged as [`Updater::zero`]. Nothing is written
    /// until [`Updater::flush`].
    pub fn write(&mut self, guest_offset: u64, data: &[u8]) -> Result<()> {
        self.usable()?;
        let (first, _) = self.staged_range(guest_offset, data.len() as u64)?;
        for (k, chunk) in data.chunks_exact(self.cs as usize).enumerate() {
            let c = first + k as u64;
            if chunk.iter().all(|&b| b == 0) {
                self.stage_zero(c, c + 1);
                continue;
            }
            self.unstage_zero(c);
            if self.staged_data.insert(c, chunk.to_vec()).is_none() {
                self.staged_bytes += self.cs;
            }
        }
        Ok(())
    }

    /// Stages "reads as zeros" for whole clusters.
    pub fn zero(&mut self, guest_offset: u64, len: u64) -> Result<()> {
        self.usable()?;
        let (first, n) = self.staged_range(guest_offset, len)?;
        if n > 0 {
            self.stage_zero(first, first + n);
        }
        Ok(())
    }

    fn stage_zero(&mut self, a: u64, b: u64) {
        let keys: Vec<u64> = self.staged_data.range(a..b).map(|(&k, _)| k).collect();
        for k in keys {
            self.staged_data.remove(&k);
            self.staged_bytes -= self.cs;
        }
        let (mut lo, mut hi) = (a, b);
        if let Some((&s, &e)) = self.staged_zero.range(..=a).next_back() {
            if e >= a {
                lo = s;
                hi = hi.max(e);
                self.staged_zero.remove(&s);
            }
        }
        while let Some((&s, &e)) = self.staged_zero.range(lo..=hi).next() {
            hi = hi.max(e);
            self.staged_zero.remove(&s);
        }
        self.staged_zero.insert(lo, hi);
    }

    fn unstage_zero(&mut self, c: u64) {
        if let Some((&s, &e)) = self.staged_zero.range(..=c).next_back() {
            if c < e {
                self.staged_zero.remove(&s);
                if s < c {
                    self.staged_zero.insert(s, c);
                }
                if c + 1 < e {
                    self.staged_zero.insert(c + 1, e);
                }
            }
        }
    }

    fn has_staged(&self) -> bool {
        !self.staged_data.is_empty() || !self.staged_zero.is_empty()
    }

    /// Takes the staged work of the lowest L2 table's range.
    fn take_table(&mut self) -> Option<TableOps> {
        let d = self.staged_data.keys().next().copied();
        let z = self.staged_zero.keys().next().copied();
        let c = match (d, z) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => return None,
        };
        let l1_index = c / self.l2_entries;
        let hi = (l1_index + 1).saturating_mul(self.l2_entries);
        let rest = self.staged_data.split_off(&hi);
        let taken = std::mem::replace(&mut self.staged_data, rest);
        self.staged_bytes -= taken.len() as u64 * self.cs;
        let mut zeros = Vec::new();
        while let Some((&s, &e)) = self.staged_zero.iter().next() {
            if s >= hi {
                break;
            }
            self.staged_zero.remove(&s);
            if e > hi {
                self.staged_zero.insert(hi, e);
            }
            zeros.push((s, e.min(hi)));
        }
        Some(TableOps {
            l1_index,
            data: taken.into_iter().collect(),
            zeros,
            ..TableOps::default()
        })
    }

    /// Applies everything staged (see the module doc for the steps).
    pub fn flush(&mut self, f: &mut dyn UpdateFile) -> Result<()> {
        self.usable()?;
        let r = self.flush_staged(f);
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    fn refresh_len(&mut self, f: &dyn UpdateFile) -> Result<()> {
        let len = f.len().map_err(|source| Error::Io {
            offset: 0,
            len: 0,
            source,
        })?;
        self.file_len = self.file_len.max(len);
        self.alloc_end = self.alloc_end.max(self.file_len.div_ceil(self.cs));
        Ok(())
    }

    fn flush_staged(&mut self, f: &mut dyn UpdateFile) -> Result<()> {
        self.refresh_len(&*f)?;
        while self.has_staged() {
            let mut plan = Plan::default();
            let mut tables = 0;
            while tables < self.batch_tables {
                let Some(ops) = self.take_table() else { break };
                if self.plan_table(&*f, ops, &mut plan)? {
                    tables += 1;
                }
            }
            self.execute(f, plan)?;
        }
        Ok(())
    }

    /// Sets the virtual size: a larger L1 table when the new size needs one
    /// (a new table at new clusters, the header switched, the old one
    /// freed); clusters past a smaller size freed. Flushes.
    ///
    /// Bytes past the old size inside its last cluster are not cleared, and
    /// a backing file may show through a grown range: the caller writes the
    /// clusters whose content differs from what it wants there.
    pub fn resize(&mut self, f: &mut dyn UpdateFile, new_size: u64) -> Result<()> {
        self.usable()?;
        let r = self.resize_inner(f, new_size);
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    fn resize_inner(&mut self, f: &mut dyn UpdateFile, new_size: u64) -> Result<()> {
        self.flush_staged(f)?;
        let old_size = self.header.size;
        if new_size == old_size {
            return Ok(());
        }
        if new_size > MAX_VIRTUAL_SIZE {
            return Err(Error::TooLarge {
                what: "virtual size",
                value: new_size,
                limit: MAX_VIRTUAL_SIZE,
            });
        }
        let coverage = self.l2_entries << self.header.cluster_bits;
        let needed = new_size.div_ceil(coverage);
        if needed.saturating_mul(8) > MAX_L1_BYTES {
            return Err(Error::TooLarge {
                what: "virtual size needing L1 bytes",
                value: needed.saturating_mul(8),
                limit: MAX_L1_BYTES,
            });
        }
        if new_size > old_size {
            if needed > self.l1.len() as u64 {
                self.move_l1(&*f, needed)?;
            }
        } else {
            // Guest clusters from `keep` on go; L1 entries from
            // `keep_tables` on map nothing that stays.
            let keep = new_size.div_ceil(self.cs);
            let keep_tables = keep.div_ceil(self.l2_entries);
            let mut pending: Vec<TableOps> = Vec::new();
            if keep % self.l2_entries != 0 {
                pending.push(TableOps {
                    l1_index: keep_tables - 1,
                    discard_from: Some(keep),
                    ..TableOps::default()
                });
            }
            for i in keep_tables..self.l1.len() as u64 {
                if self
                    .l1
                    .get(i as usize)
                    .is_some_and(|e| e & L1E_OFFSET_MASK != 0)
                {
                    pending.push(TableOps {
                        l1_index: i,
                        drop: true,
                        ..TableOps::default()
                    });
                }
            }
            let mut pending = pending.into_iter().peekable();
            while pending.peek().is_some() {
                let mut plan = Plan::default();
                let mut tables = 0;
                while tables < self.batch_tables {
                    let Some(ops) = pending.next() else { break };
                    if self.plan_table(&*f, ops, &mut plan)? {
                        tables += 1;
                    }
                }
                self.execute(f, plan)?;
            }
        }
        let plan = Plan {
            new_size: Some(new_size),
            ..Plan::default()
        };
        self.execute(f, plan)
    }

    // ---- refcounts ----

    fn rb_index(&self, c: u64) -> (u64, u64) {
        (c >> self.rb_bits, c & ((1u64 << self.rb_bits) - 1))
    }

    fn block_exists(&self, b: u64) -> bool {
        self.blocks.contains_key(&b)
            || self
                .reftable
                .get(b as usize)
                .is_some_and(|e| e & REFT_OFFSET_MASK != 0)
    }

    /// Loads refcount block `b` into the cache; false when it does not
    /// exist (all its clusters have refcount 0).
    fn load_block(&mut self, f: &dyn UpdateFile, b: u64) -> Result<bool> {
        if self.blocks.contains_key(&b) {
            return Ok(true);
        }
        let e = self.reftable.get(b as usize).copied().unwrap_or(0);
        let offset = e & REFT_OFFSET_MASK;
        if offset == 0 {
            return Ok(false);
        }
        if e & REFT_RESERVED_MASK != 0 {
            return Err(Error::invalid(format!(
                "refcount table entry {b} ({e:#x}) has reserved bits set"
            )));
        }
        self.check_metadata("refcount block", offset)?;
        let mut data = vec![0u8; self.cs as usize];
        read(f, &mut data, offset)?;
        self.blocks.insert(
            b,
            RefBlock {
                data,
                is_new: false,
                dirty: BTreeSet::new(),
            },
        );
        Ok(true)
    }

    /// A metadata cluster must be aligned, past the header, inside the file.
    fn check_metadata(&self, what: &'static str, offset: u64) -> Result<()> {
        if offset < self.cs {
            return Err(Error::invalid(format!(
                "{what} at offset {offset:#x} points into the image header"
            )));
        }
        if offset % self.cs != 0 {
            return Err(Error::Misaligned {
                what,
                offset,
                align: self.cs,
            });
        }
        let c = offset / self.cs;
        let on_block = what != "refcount block" && self.block_clusters.contains(&c);
        if self.in_fixed_tables(c) || on_block {
            return Err(Error::invalid(format!(
                "{what} at offset {offset:#x} overlaps the L1 table, refcount table or a refcount block"
            )));
        }
        crate::error::check_in_file(what, offset, self.cs, self.file_len)
    }

    fn rc(&mut self, f: &dyn UpdateFile, c: u64) -> Result<u64> {
        let (b, i) = self.rb_index(c);
        if !self.load_block(f, b)? {
            return Ok(0);
        }
        let order = self.header.refcount_order;
        Ok(self
            .blocks
            .get(&b)
            .map_or(0, |blk| rc_get(&blk.data, i, order)))
    }

    fn set_rc(&mut self, f: &dyn UpdateFile, c: u64, v: u64) -> Result<()> {
        let (b, i) = self.rb_index(c);
        if !self.load_block(f, b)? {
            return Err(Error::invalid(format!(
                "no refcount block for the cluster at {:#x}",
                c.saturating_mul(self.cs)
            )));
        }
        let order = self.header.refcount_order;
        if let Some(blk) = self.blocks.get_mut(&b) {
            rc_put(&mut blk.data, i, order, v);
            blk.dirty.insert(((i << order) / 8) / SECTOR);
        }
        Ok(())
    }

    /// The header, the L1 table, the refcount table (where they are and
    /// where they were in this batch) and the refcount blocks are never
    /// free, whatever their refcount says.
    fn is_fixed_metadata(&self, c: u64) -> bool {
        self.block_clusters.contains(&c) || self.in_fixed_tables(c)
    }

    /// The header, the L1 table or the refcount table.
    fn in_fixed_tables(&self, c: u64) -> bool {
        let cs = self.cs;
        let within = |(off, n): (u64, u64)| c >= off / cs && c - off / cs < n;
        c == 0
            || within((self.l1_offset, self.l1_clusters))
            || within((self.rt_offset, self.rt_clusters))
            || self.l1_moved_from.is_some_and(within)
            || self.rt_moved_from.is_some_and(within)
    }

    fn is_free(&mut self, f: &dyn UpdateFile, c: u64) -> Result<bool> {
        if self.is_fixed_metadata(c) {
            return Ok(false);
        }
        Ok(self.rc(f, c)? == 0)
    }

    /// The first run of `n` free clusters from the free hint: refcount 0
    /// inside the file are reused before the file grows.
    fn find_free_run(&mut self, f: &dyn UpdateFile, n: u64) -> Result<u64> {
        let mut c = self.free_hint.max(1);
        let mut run_start = c;
        let mut run = 0;
        loop {
            let end = c.checked_add(n).and_then(|e| e.checked_mul(self.cs));
            if !matches!(end, Some(e) if e <= MAX_HOST_OFFSET) {
                return Err(Error::invalid(
                    "no room left for a new cluster below the largest host offset",
                ));
            }
            // A missing refcount block: its whole range is free.
            let (b, i) = self.rb_index(c);
            if !self.block_exists(b) && !self.is_fixed_metadata(c) {
                if run == 0 {
                    run_start = c;
                }
                let span = ((1u64 << self.rb_bits) - i).min(n - run);
                // Fixed metadata never lies in a range without a block in a
                // valid image; step one cluster at a time to be sure.
                let mut k = 0;
                while k < span && !self.is_fixed_metadata(c + k) {
                    k += 1;
                }
                run += k;
                if run >= n {
                    return Ok(run_start);
                }
                if k < span {
                    run = 0;
                    c += k + 1;
                } else {
                    c += k;
                }
                continue;
            }
            if self.is_free(f, c)? {
                if run == 0 {
                    run_start = c;
                }
                run += 1;
                if run == n {
                    return Ok(run_start);
                }
            } else {
                run = 0;
            }
            c += 1;
        }
    }

    fn note_allocated(&mut self, c: u64) {
        self.alloc_now.insert(c);
        self.alloc_end = self.alloc_end.max(c + 1);
        self.stats.clusters_allocated += 1;
    }

    /// Allocates `n` contiguous clusters (refcount 0 -> 1), creating
    /// refcount blocks where needed. Returns the first cluster index.
    fn alloc_run(&mut self, f: &dyn UpdateFile, n: u64) -> Result<u64> {
        loop {
            let start = self.find_free_run(f, n)?;
            let mut created = false;
            let mut c = start;
            while c < start + n {
                let (b, i) = self.rb_index(c);
                if !self.block_exists(b) {
                    self.create_block(f, b, c)?;
                    created = true;
                    break;
                }
                c += (1u64 << self.rb_bits) - i;
            }
            if created {
                continue;
            }
            for c in start..start + n {
                self.set_rc(f, c, 1)?;
                self.note_allocated(c);
            }
            if n == 1 || start == self.free_hint {
                self.free_hint = start + n;
            }
            return Ok(start);
        }
    }

    fn alloc_cluster(&mut self, f: &dyn UpdateFile) -> Result<u64> {
        self.alloc_run(f, 1)
    }

    /// A new refcount block `b` at cluster `c` (inside its own range, so it
    /// describes itself; qemu `alloc_refcount_block`).
    fn create_block(&mut self, f: &dyn UpdateFile, b: u64, c: u64) -> Result<()> {
        if b >= self.reftable.len() as u64 {
            self.grow_reftable(f, b + 1)?;
            // Growing allocated clusters and may have created this block.
            return Ok(());
        }
        if self.block_exists(b) {
            return Ok(());
        }
        let mut data = vec![0u8; self.cs as usize];
        let (_, i) = self.rb_index(c);
        rc_put(&mut data, i, self.header.refcount_order, 1);
        self.blocks.insert(
            b,
            RefBlock {
                data,
                is_new: true,
                dirty: BTreeSet::new(),
            },
        );
        if let Some(e) = self.reftable.get_mut(b as usize) {
            *e = c * self.cs;
        }
        self.block_clusters.insert(c);
        self.rt_dirty.insert(b);
        self.note_allocated(c);
        if c == self.free_hint {
            self.free_hint = c + 1;
        }
        Ok(())
    }

    /// A larger refcount table at new clusters (written whole in step 1,
    /// then switched in the header; the old one freed in step 4). Sized with
    /// headroom so that the clusters it and its blocks take are covered.
    fn grow_reftable(&mut self, f: &dyn UpdateFile, min_entries: u64) -> Result<()> {
        if self.growing_reftable {
            return Err(Error::invalid("refcount table growth did not converge"));
        }
        self.growing_reftable = true;
        let r = self.grow_reftable_inner(f, min_entries);
        self.growing_reftable = false;
        r
    }

    fn grow_reftable_inner(&mut self, f: &dyn UpdateFile, min_entries: u64) -> Result<()> {
        let cs = self.cs;
        let per_cluster = cs / 8;
        let base = min_entries.max(self.reftable.len() as u64);
        let mut entries = base.saturating_add(base / 2 + 1);
        let too_large = |entries: u64| Error::TooLarge {
            what: "refcount table bytes",
            value: entries.saturating_mul(8),
            limit: MAX_REFTABLE_BYTES,
        };
        loop {
            if entries.saturating_mul(8) > MAX_REFTABLE_BYTES {
                return Err(too_large(entries));
            }
            let clusters = entries.div_ceil(per_cluster);
            // Everything this growth allocates lands below `end`: the table,
            // one block per range it crosses, and retries.
            let end = self
                .alloc_end
                .saturating_add(clusters.saturating_mul(2))
                .saturating_add(8);
            let need = end.div_ceil(1u64 << self.rb_bits) + 1;
            if need <= entries {
                break;
            }
            entries = need;
        }
        let clusters = entries.div_ceil(per_cluster);
        if clusters.saturating_mul(cs) > MAX_REFTABLE_BYTES {
            return Err(too_large(clusters.saturating_mul(per_cluster)));
        }
        self.reftable.resize((clusters * per_cluster) as usize, 0);
        let start = self.alloc_run(f, clusters)?;
        match self.rt_moved_from {
            None => self.rt_moved_from = Some((self.rt_offset, self.rt_clusters)),
            Some(_) => {
                // A table placed earlier in this batch and never written:
                // its clusters are free again.
                let first = self.rt_offset / cs;
                for c in first..first + self.rt_clusters {
                    self.set_rc(f, c, 0)?;
                }
                self.free_hint = self.free_hint.min(first);
            }
        }
        self.rt_offset = start * cs;
        self.rt_clusters = clusters;
        Ok(())
    }

    /// A larger L1 table (resize): new clusters, old entries copied, written
    /// whole in step 2, switched in the header in step 3, old one freed in
    /// step 4 (qemu `qcow2_grow_l1_table`).
    fn move_l1(&mut self, f: &dyn UpdateFile, entries: u64) -> Result<()> {
        let clusters = (entries * 8).div_ceil(self.cs);
        let start = self.alloc_run(f, clusters)?;
        self.l1_moved_from = Some((self.l1_offset, self.l1_clusters));
        self.l1.resize(entries as usize, 0);
        self.l1_offset = start * self.cs;
        self.l1_clusters = clusters;
        Ok(())
    }

    /// Records that one reference to cluster `c` goes away (step 4).
    fn plan_dec(&mut self, f: &dyn UpdateFile, plan: &mut Plan, c: u64) -> Result<()> {
        let at = c.saturating_mul(self.cs);
        if self.alloc_now.contains(&c) {
            return Err(Error::invalid(format!(
                "cluster at {at:#x} is referenced but had refcount 0"
            )));
        }
        let rc = self.rc(f, c)?;
        let pending = plan.decs.entry(c).or_insert(0);
        if rc <= *pending {
            return Err(Error::invalid(format!(
                "cluster at {at:#x} has refcount {rc}, fewer than its references"
            )));
        }
        *pending += 1;
        Ok(())
    }

    fn release(&mut self, f: &dyn UpdateFile, plan: &mut Plan, r: HostRef) -> Result<()> {
        match r {
            HostRef::None => Ok(()),
            HostRef::Cluster(c) => self.plan_dec(f, plan, c),
            HostRef::Compressed(a, b) => (a..=b).try_for_each(|c| self.plan_dec(f, plan, c)),
        }
    }

    // ---- L2 entries ----

    /// The host clusters an L2 entry references, validated.
    fn host_ref(&self, entry: u64) -> Result<HostRef> {
        let cs = self.cs;
        if entry & OFLAG_COMPRESSED != 0 {
            let (host, size) = compressed_descriptor(self.header.cluster_bits, entry);
            if host < cs {
                return Err(Error::invalid(format!(
                    "compressed cluster at {host:#x} points into the image header"
                )));
            }
            // The last sector may run past a file that ends inside it.
            match host.checked_add(size) {
                Some(end) if host < self.file_len && end <= self.file_len.next_multiple_of(512) => {
                    let (a, b) = (host / cs, (end - 1) / cs);
                    if (a..=b).any(|c| self.is_fixed_metadata(c)) {
                        return Err(Error::invalid(format!(
                            "compressed cluster at {host:#x} overlaps the L1 table, refcount table or a refcount block"
                        )));
                    }
                    Ok(HostRef::Compressed(a, b))
                }
                _ => Err(Error::BeyondEof {
                    what: "compressed cluster",
                    offset: host,
                    len: size,
                    file_size: self.file_len,
                }),
            }
        } else {
            let offset = entry & L2E_OFFSET_MASK;
            if offset == 0 {
                return Ok(HostRef::None);
            }
            if offset < cs {
                return Err(Error::invalid(format!(
                    "data cluster at {offset:#x} points into the image header"
                )));
            }
            if offset % cs != 0 {
                return Err(Error::Misaligned {
                    what: "data cluster",
                    offset,
                    align: cs,
                });
            }
            if offset >= self.file_len {
                return Err(Error::BeyondEof {
                    what: "data cluster",
                    offset,
                    len: cs,
                    file_size: self.file_len,
                });
            }
            if self.is_fixed_metadata(offset / cs) {
                return Err(Error::invalid(format!(
                    "data cluster at {offset:#x} overlaps the L1 table, refcount table or a refcount block"
                )));
            }
            Ok(HostRef::Cluster(offset / cs))
        }
    }

    fn has_backing(&self) -> bool {
        self.header.backing_file.is_some()
    }

    /// The entry that makes a cluster read as zeros, or None when only
    /// written zeros do (version 2 with a backing file).
    fn zero_entry(&self) -> Option<(u64, u64)> {
        if !self.has_backing() {
            Some((0, 0))
        } else if self.header.extended_l2() {
            Some((0, EXT_ALL_ZERO))
        } else if self.header.version >= 3 {
            Some((OFLAG_ZERO, 0))
        } else {
            None
        }
    }

    /// The entry already reads as zeros without a host cluster.
    fn reads_zero_unallocated(&self, e: u64, bm: u64) -> bool {
        if e & OFLAG_COMPRESSED != 0 || e & L2E_OFFSET_MASK != 0 {
            return false;
        }
        if !self.has_backing() {
            return bm & EXT_ALL_ALLOCATED == 0;
        }
        if self.header.extended_l2() {
            bm == EXT_ALL_ZERO
        } else {
            self.header.version >= 3 && e & OFLAG_ZERO != 0
        }
    }

    fn read_l2(&self, f: &dyn UpdateFile, offset: u64) -> Result<Vec<u64>> {
        self.check_metadata("L2 table", offset)?;
        let mut raw = vec![0u8; self.cs as usize];
        read(f, &mut raw, offset)?;
        Ok(words_from(&raw))
    }

    /// Plans the staged work of one L2 table's range. Returns whether it
    /// touched a table (what a batch counts).
    fn plan_table(&mut self, f: &dyn UpdateFile, ops: TableOps, plan: &mut Plan) -> Result<bool> {
        let cs = self.cs;
        let Some(&l1e) = self.l1.get(ops.l1_index as usize) else {
            return Err(Error::invalid(format!(
                "guest range of L1 entry {} lies outside the L1 table",
                ops.l1_index
            )));
        };
        let old_l2 = l1e & L1E_OFFSET_MASK;
        let zero = self.zero_entry();
        if old_l2 == 0
            && ops.data.is_empty()
            && (ops.drop || ops.discard_from.is_some() || zero == Some((0, 0)))
        {
            return Ok(false);
        }
        let w = self.l2_words as usize;
        if ops.drop {
            // The whole table leaves the active L1: every reference it made
            // through this L1 entry goes (qemu counts per L1 table).
            let table = self.read_l2(f, old_l2)?;
            for i in 0..self.l2_entries as usize {
                let e = table.get(i * w).copied().unwrap_or(0);
                let r = self.host_ref(e)?;
                self.release(f, plan, r)?;
            }
            self.plan_dec(f, plan, old_l2 / cs)?;
            self.set_l1(plan, ops.l1_index, 0);
            return Ok(true);
        }
        let (mut table, shared) = if old_l2 == 0 {
            (
                vec![0u64; (self.l2_entries * self.l2_words) as usize],
                false,
            )
        } else {
            let table = self.read_l2(f, old_l2)?;
            let c = old_l2 / cs;
            if self.alloc_now.contains(&c) {
                return Err(Error::invalid(format!(
                    "L2 table at {old_l2:#x} is referenced but had refcount 0"
                )));
            }
            match self.rc(f, c)? {
                0 => {
                    return Err(Error::invalid(format!(
                        "L2 table at {old_l2:#x} has refcount 0"
                    )))
                }
                rc => (table, rc > 1),
            }
        };
        let ext = self.header.extended_l2();
        let base = ops.l1_index * self.l2_entries;
        let mut dirty: BTreeSet<u64> = BTreeSet::new();
        let entry = |t: &[u64], i: u64| {
            let at = (i * w as u64) as usize;
            (
                t.get(at).copied().unwrap_or(0),
                if ext {
                    t.get(at + 1).copied().unwrap_or(0)
                } else {
                    0
                },
            )
        };
        let mut set = |t: &mut Vec<u64>, i: u64, (e, bm): (u64, u64)| {
            let at = (i * w as u64) as usize;
            if let Some(x) = t.get_mut(at) {
                *x = e;
            }
            if ext {
                if let Some(x) = t.get_mut(at + 1) {
                    *x = bm;
                }
            }
            dirty.insert(at as u64 * 8 / SECTOR);
        };
        let data_entry = |host: u64| (host | OFLAG_COPIED, if ext { EXT_ALL_ALLOCATED } else { 0 });

        // Data: rewritten in place when the cluster is plain and unshared,
        // else into a new cluster (the old one's refcount drops).
        let mut writes: Vec<(u64, Payload)> = ops
            .data
            .into_iter()
            .map(|(c, d)| (c, Payload::Owned(d)))
            .collect();
        let mut zero_ranges = ops.zeros;
        if zero.is_none() {
            // Version 2 with a backing file: zeros are written as data.
            for (a, b) in zero_ranges.drain(..) {
                writes.extend((a..b).map(|c| (c, Payload::Zeros)));
            }
            writes.sort_by_key(|(c, _)| *c);
        }
        for (c, payload) in writes {
            let i = c - base;
            let old = entry(&table, i);
            let r = self.host_ref(old.0)?;
            let in_place = match r {
                HostRef::Cluster(hc) if !shared && !self.alloc_now.contains(&hc) => {
                    self.rc(f, hc)? == 1
                }
                _ => false,
            };
            let host = if in_place {
                old.0 & L2E_OFFSET_MASK
            } else {
                let n = self.alloc_cluster(f)?;
                self.release(f, plan, r)?;
                n * cs
            };
            plan.data.push((host, payload));
            let new = data_entry(host);
            if new != old {
                set(&mut table, i, new);
            }
        }
        // Zeros (and discards past a smaller size): the entry changes, the
        // host clusters it named are released.
        let mut targets: Vec<(u64, u64, (u64, u64), bool)> = Vec::new();
        if let Some(z) = zero {
            targets.extend(zero_ranges.iter().map(|&(a, b)| (a, b, z, false)));
        }
        if let Some(from) = ops.discard_from {
            targets.push((from, base + self.l2_entries, (0, 0), true));
        }
        for (a, b, target, discard) in targets {
            for c in a..b {
                let i = c - base;
                let old = entry(&table, i);
                let unchanged = if discard {
                    old == (0, 0)
                } else {
                    self.reads_zero_unallocated(old.0, old.1)
                };
                if unchanged {
                    continue;
                }
                let r = self.host_ref(old.0)?;
                self.release(f, plan, r)?;
                set(&mut table, i, target);
            }
        }
        if dirty.is_empty() {
            return Ok(old_l2 != 0);
        }
        if old_l2 != 0 && !shared {
            plan.l2_updates.push((old_l2, table, dirty));
            return Ok(true);
        }
        // A new table for a range that had none, or a copy of a table shared
        // with a snapshot (qemu `l2_allocate`): its data clusters keep their
        // refcounts, the old table loses the active L1's reference.
        let n = self.alloc_cluster(f)?;
        if shared {
            self.plan_dec(f, plan, old_l2 / cs)?;
        }
        plan.new_l2.push((n * cs, table));
        self.set_l1(plan, ops.l1_index, (n * cs) | OFLAG_COPIED);
        Ok(true)
    }

    fn set_l1(&mut self, plan: &mut Plan, index: u64, v: u64) {
        if let Some(e) = self.l1.get_mut(index as usize) {
            *e = v;
            plan.l1_dirty.insert(index);
        }
    }

    // ---- writing ----

    fn put_meta(&mut self, f: &mut dyn UpdateFile, buf: &[u8], offset: u64) -> Result<()> {
        put(f, buf, offset)?;
        self.stats.metadata_bytes_written += buf.len() as u64;
        self.file_len = self.file_len.max(offset + buf.len() as u64);
        Ok(())
    }

    fn put_data(&mut self, f: &mut dyn UpdateFile, buf: &[u8], offset: u64) -> Result<()> {
        put(f, buf, offset)?;
        self.file_len = self.file_len.max(offset + buf.len() as u64);
        Ok(())
    }

    /// Writes the sectors `runs` of `bytes`, which live at `offset`.
    fn put_runs(
        &mut self,
        f: &mut dyn UpdateFile,
        bytes: &[u8],
        offset: u64,
        sectors: &BTreeSet<u64>,
    ) -> Result<()> {
        for (first, n) in sector_runs(sectors) {
            let a = (first * SECTOR) as usize;
            let b = ((first + n) * SECTOR) as usize;
            if let Some(part) = bytes.get(a..b.min(bytes.len())) {
                self.put_meta(f, part, offset + a as u64)?;
            }
        }
        Ok(())
    }

    /// Writes refcount blocks: new ones whole, others by changed sectors.
    fn write_blocks(&mut self, f: &mut dyn UpdateFile) -> Result<bool> {
        let mut keys: Vec<u64> = self
            .blocks
            .iter()
            .filter(|(_, b)| b.is_new || !b.dirty.is_empty())
            .map(|(&k, _)| k)
            .collect();
        keys.sort_unstable();
        let wrote = !keys.is_empty();
        for b in keys {
            let offset = self.reftable.get(b as usize).copied().unwrap_or(0) & REFT_OFFSET_MASK;
            let Some(blk) = self.blocks.get_mut(&b) else {
                continue;
            };
            let data = std::mem::take(&mut blk.data);
            let is_new = std::mem::replace(&mut blk.is_new, false);
            let dirty = std::mem::take(&mut blk.dirty);
            let r = if is_new {
                self.put_meta(f, &data, offset)
            } else {
                self.put_runs(f, &data, offset, &dirty)
            };
            if let Some(blk) = self.blocks.get_mut(&b) {
                blk.data = data;
            }
            r?;
        }
        Ok(wrote)
    }

    fn execute(&mut self, f: &mut dyn UpdateFile, mut plan: Plan) -> Result<()> {
        let cs = self.cs;
        // The old places of moved tables lose their reference once the
        // header points elsewhere (validated now, before any write).
        for (off, n) in [self.rt_moved_from, self.l1_moved_from]
            .into_iter()
            .flatten()
        {
            for c in off / cs..off / cs + n {
                self.plan_dec(&*f, &mut plan, c)?;
            }
        }
        let rt_moved = self.rt_moved_from.is_some();
        let l1_moved = self.l1_moved_from.is_some();
        if plan.is_empty()
            && !rt_moved
            && !l1_moved
            && self
                .blocks
                .values()
                .all(|b| !b.is_new && b.dirty.is_empty())
        {
            self.end_batch();
            return Ok(());
        }

        // (1) Raised refcounts: blocks (new ones whole) and a moved table;
        // then the new blocks hooked in, or the header switched.
        let mut wrote = self.write_blocks(f)?;
        if rt_moved {
            let bytes = words_to_bytes(&self.reftable);
            self.put_meta(f, &bytes, self.rt_offset)?;
            wrote = true;
        }
        if wrote {
            barrier(f)?;
        }
        if rt_moved {
            let mut hdr = [0u8; 12];
            hdr[..8].copy_from_slice(&self.rt_offset.to_be_bytes());
            hdr[8..].copy_from_slice(&(self.rt_clusters as u32).to_be_bytes());
            self.put_meta(f, &hdr, HDR_REFTABLE)?;
            self.header.refcount_table_offset = self.rt_offset;
            self.header.refcount_table_clusters = self.rt_clusters as u32;
            barrier(f)?;
        } else if !self.rt_dirty.is_empty() {
            let sectors: BTreeSet<u64> = self.rt_dirty.iter().map(|&i| i * 8 / SECTOR).collect();
            let bytes = words_to_bytes(&self.reftable);
            self.put_runs(f, &bytes, self.rt_offset, &sectors)?;
            barrier(f)?;
        }
        self.rt_dirty.clear();

        // (2) Data, new L2 tables, a moved L1 table.
        let mut wrote = false;
        let mut data = std::mem::take(&mut plan.data);
        data.sort_by_key(|(h, _)| *h);
        let zeros = vec![0u8; cs as usize];
        let mut buf: Vec<u8> = Vec::new();
        let mut buf_at = 0u64;
        for (host, payload) in data {
            let bytes: &[u8] = match &payload {
                Payload::Owned(v) => v,
                Payload::Zeros => &zeros,
            };
            if !buf.is_empty()
                && (buf_at + buf.len() as u64 != host || buf.len() >= WRITE_GATHER_BYTES)
            {
                self.put_data(f, &buf, buf_at)?;
                buf.clear();
            }
            if buf.is_empty() {
                buf_at = host;
            }
            buf.extend_from_slice(bytes);
            wrote = true;
        }
        if !buf.is_empty() {
            self.put_data(f, &buf, buf_at)?;
        }
        drop(buf);
        for (offset, table) in std::mem::take(&mut plan.new_l2) {
            self.put_meta(f, &words_to_bytes(&table), offset)?;
            wrote = true;
        }
        if l1_moved {
            let mut bytes = words_to_bytes(&self.l1);
            bytes.resize((self.l1_clusters * cs) as usize, 0);
            self.put_meta(f, &bytes, self.l1_offset)?;
            wrote = true;
        }
        if wrote {
            barrier(f)?;
        }

        // (3) Entries of existing L2 tables, then L1 entries or the header.
        let mut wrote = false;
        for (offset, table, sectors) in std::mem::take(&mut plan.l2_updates) {
            self.put_runs(f, &words_to_bytes(&table), offset, &sectors)?;
            wrote = true;
        }
        if !l1_moved && !plan.l1_dirty.is_empty() {
            let sectors: BTreeSet<u64> = plan.l1_dirty.iter().map(|&i| i * 8 / SECTOR).collect();
            let bytes = words_to_bytes(&self.l1);
            self.put_runs(f, &bytes, self.l1_offset, &sectors)?;
            wrote = true;
        }
        if l1_moved || plan.new_size.is_some() {
            let size = plan.new_size.unwrap_or(self.header.size);
            let mut hdr = [0u8; 24];
            hdr[..8].copy_from_slice(&size.to_be_bytes());
            hdr[8..12].copy_from_slice(&self.header.crypt_method.to_be_bytes());
            hdr[12..16].copy_from_slice(&(self.l1.len() as u32).to_be_bytes());
            hdr[16..].copy_from_slice(&self.l1_offset.to_be_bytes());
            self.put_meta(f, &hdr, HDR_SIZE)?;
            self.header.size = size;
            self.header.l1_size = self.l1.len() as u32;
            self.header.l1_table_offset = self.l1_offset;
            wrote = true;
        }
        if wrote {
            barrier(f)?;
        }
        self.rt_moved_from = None;
        self.l1_moved_from = None;

        // (4) Lowered refcounts.
        let mut freed: Vec<u64> = Vec::new();
        for (&c, &k) in &plan.decs {
            let rc = self.rc(&*f, c)?;
            let v = rc.checked_sub(k).ok_or_else(|| {
                Error::invalid(format!(
                    "refcount of the cluster at {:#x} would drop below 0",
                    c * cs
                ))
            })?;
            self.set_rc(&*f, c, v)?;
            if v == 0 {
                freed.push(c);
            }
        }
        if self.write_blocks(f)? {
            barrier(f)?;
        }
        self.stats.clusters_freed += freed.len() as u64;
        if let Some(&first) = freed.first() {
            self.free_hint = self.free_hint.min(first);
        }

        // (5) Freed clusters punched, in runs.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for c in freed {
            match runs.last_mut() {
                Some((a, n)) if *a + *n == c => *n += 1,
                _ => runs.push((c, 1)),
            }
        }
        for (a, n) in runs {
            let (offset, len) = (a * cs, n * cs);
            f.punch(offset, len).map_err(|source| Error::Write {
                offset,
                len,
                source,
            })?;
        }
        self.end_batch();
        Ok(())
    }

    fn end_batch(&mut self) {
        self.blocks.clear();
        self.alloc_now.clear();
        self.rt_dirty.clear();
    }
}

fn put(f: &mut dyn UpdateFile, buf: &[u8], offset: u64) -> Result<()> {
    f.write_all_at(buf, offset).map_err(|source| Error::Write {
        offset,
        len: buf.len() as u64,
        source,
    })
}

fn barrier(f: &mut dyn UpdateFile) -> Result<()> {
    f.barrier().map_err(|source| Error::Barrier { source })
}

#[cfg(test)]
mod qemu_tests;
#[cfg(test)]
mod tests;
