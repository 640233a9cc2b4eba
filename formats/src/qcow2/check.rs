//! Metadata consistency check behind `imgsync check`: walks every structure
//! that references host clusters (header, refcount table and blocks, active
//! and snapshot L1/L2 tables, data and compressed clusters, the snapshot
//! table, persistent bitmaps), computes the refcount every host cluster
//! should have, and compares it with the stored one. Modelled on qemu's
//! `qcow2_check_refcounts` (block/qcow2-refcount.c: `check_refcounts_l1/l2`,
//! `calculate_refcounts`, `compare_refcounts`, `check_oflag_copied`).
//!
//! Work and memory are bounded by the real file: per host cluster it keeps a
//! computed count (u16, saturating), the first use, and the stored refcount
//! (u16, with the rare larger values kept aside): 5 bytes per cluster. Each
//! table is read once, however many entries point at it, and a range that
//! overlaps another structure is not walked again.

use std::collections::{BTreeMap, HashMap};

use super::header::{be_u16, be_u32, be_u64, AUTOCLEAR_BITMAPS, MAX_L1_BYTES};
use super::{Qcow2, L1E_OFFSET_MASK, L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
use crate::error::{read_exact_at, Error, ErrorKind, Result};

/// Problems stored per list; the rest are only counted (a badly broken
/// image would otherwise yield one message per cluster).
pub const MAX_PROBLEMS: usize = 1000;

/// L1 entry: bits 0-8 and 56-62 are reserved.
const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Standard L2 entry: bits 1-8 and 56-61 are reserved (bit 0 is the zero
/// flag in version 3 without extended L2, reserved otherwise).
const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Refcount table entry: bits 9-63 are the refcount block offset, 0-8 reserved.
const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
const REFT_RESERVED_MASK: u64 = 0x1ff;
/// Bitmap table entry: bits 9-55 the data cluster offset; bit 0 "all ones"
/// (only with offset 0); bits 1-8 and 56-63 reserved.
const BME_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const BME_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
const BME_ALL_ONES: u64 = 1;
/// qemu's QCOW2_MAX_BITMAPS and QCOW2_MAX_BITMAP_DIRECTORY_SIZE.
const MAX_BITMAPS: u32 = 65535;
const MAX_BITMAP_DIRECTORY_BYTES: u64 = 1024 * MAX_BITMAPS as u64;
/// Fixed part of a bitmap directory entry.
const BITMAP_ENTRY_FIXED: usize = 24;
/// Tables of unbounded length (snapshot L1s, bitmap tables) are read in
/// pieces of this size, so memory does not follow a header field.
const TABLE_CHUNK_BYTES: usize = 1 << 20;

/// One problem found: where (a host offset, when there is one) and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub offset: Option<u64>,
    /// Lower case, names the structure and where it is, offsets in hex.
    pub message: String,
}

/// Numbers in the spirit of `qemu-img check`'s summary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckStats {
    /// Guest clusters (virtual size in clusters).
    pub total_clusters: u64,
    /// Guest clusters the active L1 maps to host clusters (data, preallocated
    /// zero, compressed).
    pub allocated_clusters: u64,
    pub compressed_clusters: u64,
    /// Allocated clusters not directly after the previous one in their L2
    /// table (compressed clusters always count, as in qemu).
    pub fragmented_clusters: u64,
    /// End of the last host cluster that is referenced or has a refcount.
    pub image_end_offset: u64,
}

/// The outcome of [`check`].
#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    /// Real corruption: the image is not safe to use or write.
    pub corruptions: Vec<Problem>,
    /// Clusters whose refcount is higher than their references (wasted space).
    pub leaks: Vec<Problem>,
    /// Inconsistencies that are expected or harmless (refcounts of a dirty
    /// image with lazy refcounts, the corrupt bit, ...).
    pub warnings: Vec<Problem>,
    /// Problems found past [`MAX_PROBLEMS`] per list: counted, not stored.
    pub omitted_corruptions: u64,
    pub omitted_leaks: u64,
    pub omitted_warnings: u64,
    pub stats: CheckStats,
}

impl CheckReport {
    /// No corruptions and no leaks (warnings do not count).
    pub fn is_clean(&self) -> bool {
        self.corruption_count() == 0 && self.leak_count() == 0
    }
    pub fn corruption_count(&self) -> u64 {
        self.corruptions.len() as u64 + self.omitted_corruptions
    }
    pub fn leak_count(&self) -> u64 {
        self.leaks.len() as u64 + self.omitted_leaks
    }
    pub fn warning_count(&self) -> u64 {
        self.warnings.len() as u64 + self.omitted_warnings
    }
}

/// Checks the metadata of `q` (this layer only; the external data file is
/// not read). Returns `Err` only when the check cannot proceed at all (an
/// I/O error); everything wrong with the image is in the report.
pub fn check(q: &Qcow2) -> Result<CheckReport> {
    let mut c = Checker::new(q)?;
    let h = q.header();
    if h.corrupt() {
        c.warning(
            None,
            "the image is marked corrupt (incompatible feature bit 1)".to_string(),
        );
    }
    if h.dirty() && h.lazy_refcounts() {
        c.warning(
            None,
            "the image was not closed cleanly (dirty bit, lazy refcounts): its refcounts \
             may be stale; opening it read-write in qemu, or `qemu-img check -r all`, \
             repairs them"
                .to_string(),
        );
    }
    c.reference(Use::Header, 0, c.cs, 1, || "header".to_string());
    c.read_refcounts()?;
    let snapshots = c.snapshot_table()?;
    c.l1_tables(&snapshots)?;
    c.l2_tables()?;
    c.bitmaps()?;
    c.compare();
    Ok(c.report)
}

/// What a host cluster was first found to hold; a second, different use is
/// an overlap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Use {
    Free,
    Header,
    RefcountTable,
    RefcountBlock,
    L1Table,
    L2Table,
    Data,
    Compressed,
    SnapshotTable,
    BitmapDirectory,
    BitmapTable,
    BitmapData,
}

impl Use {
    fn name(self) -> &'static str {
        match self {
            Use::Free => "free cluster",
            Use::Header => "image header",
            Use::RefcountTable => "refcount table",
            Use::RefcountBlock => "refcount block",
            Use::L1Table => "L1 table",
            Use::L2Table => "L2 table",
            Use::Data => "data cluster",
            Use::Compressed => "compressed cluster",
            Use::SnapshotTable => "snapshot table",
            Use::BitmapDirectory => "bitmap directory",
            Use::BitmapTable => "bitmap table",
            Use::BitmapData => "bitmap data cluster",
        }
    }
    /// Uses a cluster may legitimately have more than once: L2 tables and
    /// data shared by snapshots, several compressed clusters in one host
    /// cluster.
    fn shareable(self) -> bool {
        matches!(self, Use::L2Table | Use::Data | Use::Compressed)
    }
}

/// How a reference went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ref {
    Ok,
    /// Overlaps another structure (reported).
    Overlap,
    /// Partly or wholly past the end of the file (reported).
    BeyondEof,
}

/// Where L2 tables are referenced from, gathered before reading them.
#[derive(Clone, Copy, Debug)]
struct L2Use {
    /// L1 entries (over all L1 tables) pointing here.
    times: u64,
    /// Reachable from the active L1 (its OFLAG_COPIED flags must be exact).
    active: bool,
    walked: bool,
}

struct Checker<'a> {
    q: &'a Qcow2,
    cs: u64,
    cluster_bits: u32,
    file_size: u64,
    nb_clusters: u64,
    /// Computed references per host cluster (saturating).
    refs: Vec<u16>,
    uses: Vec<Use>,
    /// Stored refcount per host cluster, saturating at u16::MAX; the rare
    /// larger values are kept exactly in `stored_large`.
    stored: Vec<u16>,
    stored_large: HashMap<u64, u64>,
    /// Per refcount block (index into the refcount table): whether its
    /// refcounts could be read; false when the table entry is broken.
    block_ok: Vec<bool>,
    entries_per_block: u64,
    /// Dirty with lazy refcounts: refcount mismatches are expected.
    lazy_dirty: bool,
    l2s: BTreeMap<u64, L2Use>,
    report: CheckReport,
}

impl<'a> Checker<'a> {
    fn new(q: &'a Qcow2) -> Result<Checker<'a>> {
        let h = q.header();
        let cs = h.cluster_size();
        let file_size = q.file_size();
        let nb_clusters = file_size.div_ceil(cs);
        let n = usize::try_from(nb_clusters).map_err(|_| {
            Error::invalid(format!(
                "file of {file_size:#x} bytes is too large to check"
            ))
        })?;
        let entries_per_block = (cs * 8) >> h.refcount_order;
        let nb_blocks = nb_clusters.div_ceil(entries_per_block) as usize;
        Ok(Checker {
            q,
            cs,
            cluster_bits: h.cluster_bits,
            file_size,
            nb_clusters,
            refs: vec![0; n],
            uses: vec![Use::Free; n],
            stored: vec![0; n],
            stored_large: HashMap::new(),
            block_ok: vec![true; nb_blocks],
            entries_per_block,
            lazy_dirty: h.dirty() && h.lazy_refcounts(),
            l2s: BTreeMap::new(),
            report: CheckReport {
                stats: CheckStats {
                    total_clusters: h.size.div_ceil(cs),
                    ..CheckStats::default()
                },
                ..CheckReport::default()
            },
        })
    }

    fn corruption(&mut self, offset: Option<u64>, message: String) {
        push(
            &mut self.report.corruptions,
            &mut self.report.omitted_corruptions,
            offset,
            message,
        );
    }
    fn leak(&mut self, offset: Option<u64>, message: String) {
        push(
            &mut self.report.leaks,
            &mut self.report.omitted_leaks,
            offset,
            message,
        );
    }
    fn warning(&mut self, offset: Option<u64>, message: String) {
        push(
            &mut self.report.warnings,
            &mut self.report.omitted_warnings,
            offset,
            message,
        );
    }
    /// Refcount and OFLAG_COPIED inconsistencies: corruption, as `qemu-img
    /// check` counts them, even in a dirty image with lazy refcounts, where
    /// they are the expected state after a crash (qemu repairs them when it
    /// opens the image read-write); the message says so.
    fn refcount_problem(&mut self, offset: Option<u64>, message: String) {
        let message = self.lazy_hint(message);
        self.corruption(offset, message);
    }
    /// Says, in a dirty image with lazy refcounts, that a refcount problem
    /// is the expected state after a crash.
    fn lazy_hint(&self, message: String) -> String {
        if self.lazy_dirty {
            format!("{message} (expected: dirty image with lazy refcounts)")
        } else {
            message
        }
    }

    /// Turns a failed read into a reported corruption, passing I/O errors up.
    fn soft<T>(&mut self, r: Result<T>, offset: u64) -> Result<Option<T>> {
        match r {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == ErrorKind::Io => Err(e),
            Err(e) => {
                self.corruption(Some(offset), e.to_string());
                Ok(None)
            }
        }
    }

    /// Counts `times` references to every host cluster `[offset, offset +
    /// len)` touches, as `what`. `at` describes the referrer for messages
    /// (only called when there is a problem). Stops at the first overlap
    /// with another structure, so hostile tables that all claim the same
    /// range cost at most one pass over the file's clusters.
    fn reference(
        &mut self,
        what: Use,
        offset: u64,
        len: u64,
        times: u64,
        at: impl Fn() -> String,
    ) -> Ref {
        if len == 0 {
            return Ref::Ok;
        }
        let first = offset >> self.cluster_bits;
        let last = offset
            .checked_add(len - 1)
            .map_or(u64::MAX, |e| e >> self.cluster_bits);
        let mut status = Ref::Ok;
        if last >= self.nb_clusters {
            self.corruption(
                Some(offset),
                format!(
                    "{} at {offset:#x} (length {len:#x}, {}) lies beyond the end of the file ({:#x} bytes)",
                    what.name(),
                    at(),
                    self.file_size
                ),
            );
            status = Ref::BeyondEof;
        }
        let times16 = u16::try_from(times).unwrap_or(u16::MAX);
        let end = last.min(self.nb_clusters.saturating_sub(1));
        let mut k = first;
        while k <= end && first < self.nb_clusters {
            let i = k as usize;
            if let Some(r) = self.refs.get_mut(i) {
                *r = r.saturating_add(times16);
            }
            let prev = self.uses.get(i).copied().unwrap_or(Use::Free);
            if prev == Use::Free {
                if let Some(u) = self.uses.get_mut(i) {
                    *u = what;
                }
            } else if !(prev == what && what.shareable()) {
                let cluster = k << self.cluster_bits;
                let msg = if prev == what {
                    format!(
                        "{} at {offset:#x} ({}) overlaps another {} in the cluster at {cluster:#x}",
                        what.name(),
                        at(),
                        prev.name()
                    )
                } else {
                    format!(
                        "{} at {offset:#x} ({}) overlaps the {} in the cluster at {cluster:#x}",
                        what.name(),
                        at(),
                        prev.name()
                    )
                };
                self.corruption(Some(cluster), msg);
                return Ref::Overlap;
            }
            k += 1;
        }
        status
    }

    /// The stored refcount of the host cluster at `offset`, if known.
    fn stored_refcount(&self, offset: u64) -> Option<u64> {
        let k = offset >> self.cluster_bits;
        let ok = self
            .block_ok
            .get((k / self.entries_per_block) as usize)
            .copied()
            .unwrap_or(false);
        if !ok {
            return None;
        }
        self.stored_at(k)
    }

    fn stored_at(&self, k: u64) -> Option<u64> {
        let s = *self.stored.get(k as usize)?;
        if s == u16::MAX {
            return self.stored_large.get(&k).copied().or(Some(s.into()));
        }
        Some(s.into())
    }

    /// A metadata table of `len` bytes at `offset` must be cluster aligned,
    /// past the header cluster, and inside the file. Reports and returns
    /// false otherwise.
    fn table_placement(&mut self, what: &str, offset: u64, len: u64) -> bool {
        if offset % self.cs != 0 {
            self.corruption(
                Some(offset),
                format!(
                    "{what} offset {offset:#x} is not aligned to the cluster size {:#x}",
                    self.cs
                ),
            );
            return false;
        }
        if offset < self.cs {
            self.corruption(
                Some(offset),
                format!("{what} at offset {offset:#x} points into the image header"),
            );
            return false;
        }
        if offset.checked_add(len).map_or(true, |e| e > self.file_size) {
            self.corruption(
                Some(offset),
                format!(
                    "{what} at {offset:#x} (length {len:#x}) lies beyond the end of the file ({:#x} bytes)",
                    self.file_size
                ),
            );
            return false;
        }
        true
    }

    /// Reads the refcount table and blocks into `stored`, counting them as
    /// references (qemu `check_refblocks`).
    fn read_refcounts(&mut self) -> Result<()> {
        let q = self.q;
        let h = q.header();
        let rt_offset = h.refcount_table_offset;
        // Inside the file and at most MAX_REFTABLE_BYTES (Header::parse).
        let rt_len = u64::from(h.refcount_table_clusters) << self.cluster_bits;
        self.reference(Use::RefcountTable, rt_offset, rt_len, 1, || {
            "header".to_string()
        });
        let mut raw = vec![0u8; rt_len as usize];
        let r = read_exact_at(&**q.file(), &mut raw, rt_offset, "refcount table");
        if self.soft(r, rt_offset)?.is_none() {
            self.block_ok.fill(false);
            return Ok(());
        }
        let cs = self.cs;
        let mut block = vec![0u8; cs as usize];
        for (i, chunk) in raw.chunks_exact(8).enumerate() {
            let i = i as u64;
            let entry = be_u64(chunk, 0);
            if entry == 0 {
                continue;
            }
            let first_cluster = i.saturating_mul(self.entries_per_block);
            let covers_file = first_cluster < self.nb_clusters;
            let offset = entry & REFT_OFFSET_MASK;
            let mark_bad = |c: &mut Self| {
                if let Some(b) = c.block_ok.get_mut(i as usize) {
                    *b = false;
                }
            };
            if entry & REFT_RESERVED_MASK != 0 {
                self.corruption(
                    Some(rt_offset + i * 8),
                    format!("refcount table entry {i} ({entry:#x}) has reserved bits set"),
                );
                mark_bad(self);
                continue;
            }
            if offset.checked_add(cs).map_or(true, |e| e > self.file_size) {
                self.corruption(
                    Some(offset),
                    format!(
                        "refcount block at {offset:#x} (refcount table entry {i}) lies beyond the end of the file ({:#x} bytes)",
                        self.file_size
                    ),
                );
                mark_bad(self);
                continue;
            }
            self.reference(Use::RefcountBlock, offset, cs, 1, || {
                format!("refcount table entry {i}")
            });
            if !covers_file {
                // Refcounts of clusters past the end of the file: not compared.
                continue;
            }
            // Reads here are bounded: one block per nb_clusters/entries_per_block.
            let r = read_exact_at(&**q.file(), &mut block, offset, "refcount block");
            if self.soft(r, offset)?.is_none() {
                mark_bad(self);
                continue;
            }
            let n = self.entries_per_block.min(self.nb_clusters - first_cluster);
            let order = h.refcount_order;
            for j in 0..n {
                let v = refcount_entry(&block, j as usize, order);
                let k = first_cluster + j;
                if let Some(s) = self.stored.get_mut(k as usize) {
                    *s = u16::try_from(v).unwrap_or(u16::MAX);
                }
                if v > u64::from(u16::MAX) {
                    self.stored_large.insert(k, v);
                }
            }
        }
        Ok(())
    }

    /// Reads the snapshot table, counting its clusters.
    fn snapshot_table(&mut self) -> Result<Vec<super::snapshot::Snapshot>> {
        let h = self.q.header();
        if h.nb_snapshots == 0 {
            return Ok(Vec::new());
        }
        let offset = h.snapshots_offset;
        let r = self.q.snapshots();
        let Some(list) = self.soft(r, offset)? else {
            return Ok(Vec::new());
        };
        let len = list.last().map_or(0, |s| {
            s.entry_offset
                .saturating_add(s.entry_len)
                .saturating_sub(offset)
        });
        self.reference(Use::SnapshotTable, offset, len, 1, || "header".to_string());
        Ok(list)
    }

    /// Checks one L1 entry and records the L2 table it points at.
    fn l1_entry(&mut self, l1_name: &str, l1_offset: u64, index: u64, entry: u64, active: bool) {
        if entry & L1E_RESERVED_MASK != 0 {
            self.corruption(
                Some(l1_offset.saturating_add(index * 8)),
                format!("{l1_name} entry {index} ({entry:#x}) has reserved bits set"),
            );
        }
        let l2_offset = entry & L1E_OFFSET_MASK;
        if l2_offset == 0 {
            return;
        }
        // The mask keeps offsets aligned to 512; clusters are larger.
        if l2_offset % self.cs != 0 {
            self.corruption(
                Some(l2_offset),
                format!(
                    "L2 table offset {l2_offset:#x} in {l1_name} entry {index} is not aligned to the cluster size {:#x}",
                    self.cs
                ),
            );
            return;
        }
        let r = self.reference(Use::L2Table, l2_offset, self.cs, 1, || {
            format!("{l1_name} entry {index}")
        });
        if r == Ref::BeyondEof || l2_offset + self.cs > self.file_size {
            if r != Ref::BeyondEof {
                self.corruption(
                    Some(l2_offset),
                    format!(
                        "L2 table at {l2_offset:#x} ({l1_name} entry {index}) runs past the end of the file ({:#x} bytes)",
                        self.file_size
                    ),
                );
            }
            return;
        }
        let u = self.l2s.entry(l2_offset).or_insert(L2Use {
            times: 0,
            active: false,
            walked: false,
        });
        u.times = u.times.saturating_add(1);
        u.active |= active;
        if active {
            // qemu check_oflag_copied: bit 63 iff the refcount is exactly one.
            if let Some(rc) = self.stored_refcount(l2_offset) {
                let copied = entry & OFLAG_COPIED != 0;
                if copied != (rc == 1) {
                    self.refcount_problem(
                        Some(l2_offset),
                        format!(
                            "active L1 entry {index} ({entry:#x}) for the L2 table at {l2_offset:#x} has the copied flag {} but the refcount is {rc}",
                            if copied { "set" } else { "clear" }
                        ),
                    );
                }
            }
        }
    }

    /// Walks the active L1 table and every snapshot's L1 table, counting the
    /// tables and recording which L2 tables they use (read later, once each).
    fn l1_tables(&mut self, snapshots: &[super::snapshot::Snapshot]) -> Result<()> {
        let q = self.q;
        let h = q.header();
        // Placement and size were checked by Header::parse.
        let l1_len = u64::from(h.l1_size) * 8;
        self.reference(Use::L1Table, h.l1_table_offset, l1_len, 1, || {
            "active L1 table".to_string()
        });
        for (i, &e) in q.l1_table().iter().enumerate() {
            self.l1_entry("active L1", h.l1_table_offset, i as u64, e, true);
        }

        for (n, s) in snapshots.iter().enumerate() {
            let name = format!(
                "snapshot {} ({}) L1",
                for_message(&s.id),
                for_message(&s.name)
            );
            let l1_offset = s.l1_table_offset;
            if s.l1_size == 0 {
                continue;
            }
            let len = u64::from(s.l1_size) * 8;
            if len > MAX_L1_BYTES {
                self.corruption(
                    Some(s.entry_offset),
                    format!(
                        "{name} table of {} entries (snapshot table entry {n} at {:#x}) exceeds the limit of {}",
                        s.l1_size,
                        s.entry_offset,
                        MAX_L1_BYTES / 8
                    ),
                );
                continue;
            }
            if !self.table_placement(&format!("{name} table"), s.l1_table_offset, len) {
                continue;
            }
            let r = self.reference(Use::L1Table, s.l1_table_offset, len, 1, || {
                format!("snapshot table entry {n}")
            });
            if r != Ref::Ok {
                // Overlapping tables are not walked: hostile snapshot tables
                // could otherwise make us read one region many times.
                continue;
            }
            self.read_table(
                s.l1_table_offset,
                u64::from(s.l1_size),
                "snapshot L1 table",
                |c, i, e| {
                    c.l1_entry(&name, l1_offset, i, e, false);
                },
            )?;
        }
        Ok(())
    }

    /// Calls `f` with each 8-byte big-endian entry of the table of `count`
    /// entries at `offset` (already checked to be inside the file), reading
    /// in bounded pieces.
    fn read_table(
        &mut self,
        offset: u64,
        count: u64,
        what: &'static str,
        mut f: impl FnMut(&mut Self, u64, u64),
    ) -> Result<()> {
        let q = self.q;
        let per_chunk = (TABLE_CHUNK_BYTES / 8) as u64;
        let mut buf = Vec::new();
        let mut done = 0u64;
        while done < count {
            let n = (count - done).min(per_chunk);
            buf.resize(n as usize * 8, 0);
            let at = offset + done * 8;
            let r = read_exact_at(&**q.file(), &mut buf, at, what);
            if self.soft(r, at)?.is_none() {
                return Ok(());
            }
            for (j, e) in buf.chunks_exact(8).enumerate() {
                f(self, done + j as u64, be_u64(e, 0));
            }
            done += n;
        }
        Ok(())
    }

    /// Reads each L2 table once: those of the active L1 first, in guest
    /// order (for the fragmentation numbers), then the snapshots' own.
    fn l2_tables(&mut self) -> Result<()> {
        let q = self.q;
        let mut buf = vec![0u8; self.cs as usize];
        for (i, &e) in q.l1_table().iter().enumerate() {
            let off = e & L1E_OFFSET_MASK;
            let Some(u) = self.l2s.get_mut(&off) else {
                continue;
            };
            if u.walked {
                continue;
            }
            u.walked = true;
            let u = *u;
            self.l2_table(off, &format!("active L1 entry {i}"), u, true, &mut buf)?;
        }
        let rest: Vec<(u64, L2Use)> = self
            .l2s
            .iter()
            .filter(|(_, u)| !u.walked)
            .map(|(&k, &u)| (k, u))
            .collect();
        for (off, u) in rest {
            self.l2_table(off, "snapshot L1", u, false, &mut buf)?;
        }
        Ok(())
    }

    /// Checks one L2 table and counts what it references, `u.times` times
    /// (once per L1 entry pointing at it; qemu walks it that many times).
    fn l2_table(
        &mut self,
        l2_offset: u64,
        from: &str,
        u: L2Use,
        stats: bool,
        buf: &mut [u8],
    ) -> Result<()> {
        let q = self.q;
        let h = q.header();
        let r = read_exact_at(&**q.file(), buf, l2_offset, "L2 table");
        if self.soft(r, l2_offset)?.is_none() {
            return Ok(());
        }
        let cs = self.cs;
        let ext = h.extended_l2();
        let external = h.has_data_file();
        let esz = h.l2_entry_size() as usize;
        let nb_entries = cs as usize / esz;
        let mut next_contiguous = 0u64;
        for i in 0..nb_entries {
            let entry = be_u64(buf, i * esz);
            let bitmap = if ext { be_u64(buf, i * esz + 8) } else { 0 };
            let entry_offset = l2_offset + (i * esz) as u64;
            let at = || format!("L2 table at {l2_offset:#x} entry {i}, from {from}");
            if entry == 0 && bitmap == 0 {
                continue;
            }
            if entry & OFLAG_COMPRESSED != 0 {
                if entry & OFLAG_COPIED != 0 {
                    self.corruption(
                        Some(entry_offset),
                        format!(
                            "compressed cluster in {} has the copied flag set ({entry:#x})",
                            at()
                        ),
                    );
                }
                if external {
                    self.corruption(
                        Some(entry_offset),
                        format!(
                            "compressed cluster in {} in an image with an external data file",
                            at()
                        ),
                    );
                }
                if bitmap != 0 {
                    self.corruption(
                        Some(entry_offset),
                        format!(
                            "compressed cluster in {} has a non-zero subcluster bitmap {bitmap:#x}",
                            at()
                        ),
                    );
                }
                let (host, size) = q.compressed_descriptor(entry);
                if stats && u.active {
                    self.report.stats.allocated_clusters += 1;
                    self.report.stats.compressed_clusters += 1;
                    // Compressed clusters are fragmented by nature (qemu).
                    self.report.stats.fragmented_clusters += 1;
                }
                if host < cs {
                    self.corruption(
                        Some(host),
                        format!(
                            "compressed cluster at {host:#x} ({}) points into the image header",
                            at()
                        ),
                    );
                    continue;
                }
                // The last sector may run past the end of a file that ends
                // inside it (qemu writes the compressed bytes only); a range
                // reaching further is damaged metadata (as Qcow2::lookup).
                let end = host.saturating_add(size);
                if end > self.file_size.next_multiple_of(512) {
                    self.corruption(
                        Some(host),
                        format!(
                            "compressed cluster at {host:#x} (length {size:#x}, {}) lies beyond the end of the file ({:#x} bytes)",
                            at(),
                            self.file_size
                        ),
                    );
                }
                // The part inside the file is still referenced: counting it
                // keeps its clusters from being called leaked (a repair of
                // leaks would free them under the descriptor).
                let len = size.min(self.file_size.saturating_sub(host));
                self.reference(Use::Compressed, host, len, u.times, at);
                continue;
            }

            let offset = entry & L2E_OFFSET_MASK;
            let mut reserved = entry & L2E_STD_RESERVED_MASK;
            if ext {
                reserved |= entry & OFLAG_ZERO;
            } else if h.version < 3 && entry & OFLAG_ZERO != 0 {
                // Reserved in version 2, but qemu reads it as the zero flag
                // and does not complain.
                self.warning(
                    Some(entry_offset),
                    format!(
                        "{} ({entry:#x}) has the zero flag set in a version 2 image",
                        at()
                    ),
                );
            }
            if reserved != 0 {
                self.corruption(
                    Some(entry_offset),
                    format!("{} ({entry:#x}) has reserved bits {reserved:#x} set", at()),
                );
            }
            let allocated = offset != 0 || (external && entry & OFLAG_COPIED != 0);
            if ext {
                // Bits 0-31 allocated subclusters, 32-63 zero subclusters.
                let alloc = bitmap as u32;
                let zero = (bitmap >> 32) as u32;
                if alloc & zero != 0 {
                    self.corruption(
                        Some(entry_offset),
                        format!(
                            "invalid subcluster bitmap {bitmap:#x} in {}: subclusters both allocated and zero",
                            at()
                        ),
                    );
                }
                if !allocated && alloc != 0 {
                    self.corruption(
                        Some(entry_offset),
                        format!(
                            "invalid subcluster bitmap {bitmap:#x} in {}: allocated subclusters in an unallocated cluster",
                            at()
                        ),
                    );
                }
            }
            if !allocated {
                continue;
            }
            if stats && u.active {
                let s = &mut self.report.stats;
                s.allocated_clusters += 1;
                if next_contiguous != 0 && offset != next_contiguous {
                    s.fragmented_clusters += 1;
                }
                next_contiguous = offset.saturating_add(cs);
            }
            if offset % cs != 0 {
                self.corruption(
                    Some(offset),
                    format!(
                        "data cluster offset {offset:#x} in {} is not aligned to the cluster size {cs:#x}",
                        at()
                    ),
                );
                continue;
            }
            if external {
                // Guest offset = data file offset; not refcounted here.
                if u.active && entry & OFLAG_COPIED == 0 {
                    self.refcount_problem(
                        Some(entry_offset),
                        format!(
                            "data cluster in {} ({entry:#x}) of an image with an external data file has the copied flag clear",
                            at()
                        ),
                    );
                }
                continue;
            }
            let r = self.reference(Use::Data, offset, cs, u.times, at);
            if u.active && r != Ref::BeyondEof {
                if let Some(rc) = self.stored_refcount(offset) {
                    let copied = entry & OFLAG_COPIED != 0;
                    if copied != (rc == 1) {
                        self.refcount_problem(
                            Some(offset),
                            format!(
                                "data cluster at {offset:#x} ({}, {entry:#x}) has the copied flag {} but the refcount is {rc}",
                                at(),
                                if copied { "set" } else { "clear" }
                            ),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Persistent bitmaps: the directory, each bitmap's table and data
    /// clusters are referenced (qemu `qcow2_check_bitmaps_refcounts`). Only
    /// when the autoclear bit says the extension is current; qemu ignores a
    /// stale one.
    fn bitmaps(&mut self) -> Result<()> {
        let q = self.q;
        let h = q.header();
        let Some(bm) = h.bitmaps else {
            return Ok(());
        };
        if h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            return Ok(());
        }
        let dir_offset = bm.bitmap_directory_offset;
        let dir_size = bm.bitmap_directory_size;
        if bm.nb_bitmaps > MAX_BITMAPS {
            self.corruption(
                None,
                format!(
                    "bitmaps extension lists {} bitmaps, more than the limit of {MAX_BITMAPS}",
                    bm.nb_bitmaps
                ),
            );
            return Ok(());
        }
        if bm.nb_bitmaps == 0 {
            return Ok(());
        }
        if dir_size > MAX_BITMAP_DIRECTORY_BYTES {
            self.corruption(
                Some(dir_offset),
                format!("bitmap directory of {dir_size:#x} bytes exceeds the limit of {MAX_BITMAP_DIRECTORY_BYTES:#x}"),
            );
            return Ok(());
        }
        if !self.table_placement("bitmap directory", dir_offset, dir_size) {
            return Ok(());
        }
        self.reference(Use::BitmapDirectory, dir_offset, dir_size, 1, || {
            "bitmaps extension".to_string()
        });
        let mut dir = vec![0u8; dir_size as usize];
        let r = read_exact_at(&**q.file(), &mut dir, dir_offset, "bitmap directory");
        if self.soft(r, dir_offset)?.is_none() {
            return Ok(());
        }
        let mut at = 0usize;
        for n in 0..bm.nb_bitmaps {
            let e = dir.get(at..).unwrap_or(&[]);
            // bitmap_table_offset (8), bitmap_table_size (4), flags (4),
            // type (1), granularity_bits (1), name_size (2),
            // extra_data_size (4), then extra data, name, padding to 8.
            let entry_offset = dir_offset + at as u64;
            if e.len() < BITMAP_ENTRY_FIXED {
                self.corruption(
                    Some(entry_offset),
                    format!("bitmap directory entry {n} at {entry_offset:#x} runs past the end of the directory"),
                );
                return Ok(());
            }
            let table_offset = be_u64(e, 0);
            let table_size = be_u32(e, 8);
            let name_len = be_u16(e, 18) as usize;
            let extra_len = be_u32(e, 20) as usize;
            let len = BITMAP_ENTRY_FIXED
                .saturating_add(extra_len)
                .saturating_add(name_len);
            let Some(whole) = e.get(..len) else {
                self.corruption(
                    Some(entry_offset),
                    format!("bitmap directory entry {n} at {entry_offset:#x} runs past the end of the directory"),
                );
                return Ok(());
            };
            let name_start = BITMAP_ENTRY_FIXED + extra_len;
            let name =
                String::from_utf8_lossy(whole.get(name_start..len).unwrap_or(&[])).into_owned();
            at = at.saturating_add(len.next_multiple_of(8));

            let what = format!("bitmap {} table", for_message(&name));
            let table_len = u64::from(table_size) * 8;
            if table_size == 0 {
                continue;
            }
            if !self.table_placement(&what, table_offset, table_len) {
                continue;
            }
            let r = self.reference(Use::BitmapTable, table_offset, table_len, 1, || {
                format!("bitmap directory entry {n}")
            });
            if r != Ref::Ok {
                continue;
            }
            self.read_table(
                table_offset,
                u64::from(table_size),
                "bitmap table",
                |c, i, entry| {
                    c.bitmap_entry(&what, table_offset, i, entry);
                },
            )?;
        }
        Ok(())
    }

    fn bitmap_entry(&mut self, what: &str, table_offset: u64, i: u64, entry: u64) {
        let offset = entry & BME_OFFSET_MASK;
        let mut reserved = entry & BME_RESERVED_MASK;
        if offset != 0 {
            reserved |= entry & BME_ALL_ONES;
        }
        if reserved != 0 {
            self.corruption(
                Some(table_offset + i * 8),
                format!("{what} entry {i} ({entry:#x}) has reserved bits {reserved:#x} set"),
            );
        }
        if offset == 0 {
            return;
        }
        if offset % self.cs != 0 {
            self.corruption(
                Some(offset),
                format!(
                    "bitmap data offset {offset:#x} in {what} entry {i} is not aligned to the cluster size {:#x}",
                    self.cs
                ),
            );
            return;
        }
        self.reference(Use::BitmapData, offset, self.cs, 1, || {
            format!("{what} entry {i}")
        });
    }

    /// Compares stored and computed refcounts of every host cluster in the
    /// file (qemu `compare_refcounts`).
    fn compare(&mut self) {
        let mut highest: Option<u64> = None;
        for k in 0..self.nb_clusters {
            let i = k as usize;
            let computed = self.refs.get(i).copied().unwrap_or(0);
            let known = self
                .block_ok
                .get((k / self.entries_per_block) as usize)
                .copied()
                .unwrap_or(false);
            let stored = if known {
                self.stored_at(k).unwrap_or(0)
            } else {
                0
            };
            if stored > 0 || computed > 0 {
                highest = Some(k);
            }
            if !known {
                // The broken refcount table entry was reported.
                continue;
            }
            let offset = k << self.cluster_bits;
            let c = u64::from(computed);
            if computed == u16::MAX && stored >= c {
                // Saturated count: cannot tell.
                continue;
            }
            if stored < c {
                let use_ = self.uses.get(i).copied().unwrap_or(Use::Free).name();
                self.refcount_problem(
                    Some(offset),
                    format!("refcount for cluster at {offset:#x} ({use_}) is {stored} but {c} references exist"),
                );
            } else if stored > c {
                let msg = if c == 0 {
                    format!("cluster at {offset:#x} has refcount {stored} but is not referenced")
                } else {
                    let use_ = self.uses.get(i).copied().unwrap_or(Use::Free).name();
                    format!("refcount for cluster at {offset:#x} ({use_}) is {stored} but only {c} references exist")
                };
                let msg = self.lazy_hint(msg);
                self.leak(Some(offset), msg);
            }
        }
        self.report.stats.image_end_offset = highest.map_or(0, |k| (k + 1) << self.cluster_bits);
    }
}

/// A name from the image, for a message: escaped, and cut short (names
/// may be 64 KiB and hold control characters).
fn for_message(name: &str) -> String {
    const MAX_CHARS: usize = 64;
    let mut out: String = name
        .chars()
        .take(MAX_CHARS)
        .flat_map(char::escape_debug)
        .collect();
    if name.chars().nth(MAX_CHARS).is_some() {
        out.push_str("...");
    }
    format!("'{out}'")
}

fn push(list: &mut Vec<Problem>, omitted: &mut u64, offset: Option<u64>, message: String) {
    if list.len() < MAX_PROBLEMS {
        list.push(Problem { offset, message });
    } else {
        *omitted += 1;
    }
}

/// Entry `index` of a refcount block of `1 << order`-bit big-endian entries.
/// Sub-byte widths pack from the least significant bit of each byte (spec:
/// "bit 0 means the least significant bit"; qemu `get_refcount_ro0..2`).
fn refcount_entry(block: &[u8], index: usize, order: u32) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let byte = block.get(index / per_byte).copied().unwrap_or(0);
            let shift = (index % per_byte) * bits;
            u64::from(byte >> shift) & ((1u64 << bits) - 1)
        }
        3 => block.get(index).copied().map_or(0, u64::from),
        4 => u64::from(be_u16(block, index * 2)),
        5 => u64::from(be_u32(block, index * 4)),
        _ => be_u64(block, index * 8),
    }
}

#[cfg(test)]
mod tests {
    //! Real images from qemu-img/qemu-io (the oracle: `qemu-img check` must
    //! agree they are clean), then corrupted byte by byte in memory.

    use super::*;
    use crate::qcow2::test_bytes::{get64, put16, put64};
    use crate::qcow2::OpenOptions;
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::sync::Arc;

    use crate::qcow2::test_qemu::{require_qemu, TempDir};
    fn temp_dir() -> TempDir {
        crate::qcow2::test_qemu::temp_dir("check")
    }

    fn run(dir: &Path, tool: &str, args: &[&str]) {
        let out = Command::new(tool)
            .current_dir(dir)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Creates `img.qcow2` with `opts` and `size`, applies qemu-io commands,
    /// then the `after` qemu-img commands; asserts `qemu-img check` calls it
    /// clean and returns the bytes.
    fn image(opts: &str, size: &str, io: &[&str], after: &[&[&str]]) -> Vec<u8> {
        let dir = temp_dir();
        run(
            &dir.0,
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", opts, "img.qcow2", size],
        );
        if !io.is_empty() {
            let mut args = vec!["-f", "qcow2"];
            for c in io {
                args.extend(["-c", c]);
            }
            args.push("img.qcow2");
            run(&dir.0, "qemu-io", &args);
        }
        for a in after {
            run(&dir.0, "qemu-img", a);
        }
        let st = Command::new("qemu-img")
            .current_dir(&dir.0)
            .args(["check", "-q", "img.qcow2"])
            .status()
            .unwrap();
        assert!(st.success(), "qemu-img check does not call the image clean");
        std::fs::read(dir.0.join("img.qcow2")).unwrap()
    }

    fn check_bytes(bytes: Vec<u8>) -> CheckReport {
        let q = Qcow2::open_with(
            Arc::new(bytes),
            OpenOptions {
                allow_corrupt: true,
            },
        )
        .unwrap();
        check(&q).unwrap()
    }

    fn assert_clean(bytes: Vec<u8>) -> CheckReport {
        let r = check_bytes(bytes);
        assert!(
            r.is_clean() && r.warnings.is_empty(),
            "expected clean, got corruptions {:#?} leaks {:#?} warnings {:#?}",
            r.corruptions,
            r.leaks,
            r.warnings
        );
        r
    }

    fn has(list: &[Problem], needle: &str) -> bool {
        list.iter().any(|p| p.message.contains(needle))
    }
    #[track_caller]
    fn assert_has(list: &[Problem], needle: &str) {
        assert!(
            has(list, needle),
            "no problem containing {needle:?} in {list:#?}"
        );
    }

    /// Offsets in a test image: header fields (spec: "Header").
    struct Layout {
        cs: u64,
        l1: u64,
        reftable: u64,
    }
    fn layout(b: &[u8]) -> Layout {
        Layout {
            cs: 1 << u32::from_be_bytes(b[20..24].try_into().unwrap()),
            l1: get64(b, 40),
            reftable: get64(b, 48),
        }
    }
    /// Byte offset of the 16-bit refcount of the cluster at `host` (first
    /// refcount block only, enough for test images).
    fn refcount16_at(b: &[u8], host: u64) -> u64 {
        let l = layout(b);
        let block = get64(b, l.reftable) & REFT_OFFSET_MASK;
        assert!((host / l.cs) < l.cs / 2, "test image too large");
        block + (host / l.cs) * 2
    }

    /// 64 KiB clusters, data at 0 (1 MiB) and 3 MiB, a zero range.
    fn data_image() -> Vec<u8> {
        image(
            "cluster_size=65536",
            "8M",
            &[
                "write -P 0xaa 0 1M",
                "write -P 0xbb 3M 64k",
                "write -z 5M 128k",
            ],
            &[],
        )
    }
    /// First L2 table and its first data cluster.
    fn first_l2_and_data(b: &[u8]) -> (u64, u64) {
        let l = layout(b);
        let l2 = get64(b, l.l1) & L1E_OFFSET_MASK;
        let data = get64(b, l2) & L2E_OFFSET_MASK;
        assert!(l2 != 0 && data != 0);
        (l2, data)
    }

    // ---- clean images ----

    #[test]
    fn clean_image_with_data_is_clean() {
        require_qemu!();
        let r = assert_clean(data_image());
        assert_eq!(r.stats.total_clusters, 128);
        assert_eq!(r.stats.allocated_clusters, 17);
        assert_eq!(r.stats.compressed_clusters, 0);
    }

    #[test]
    fn empty_image_is_clean() {
        require_qemu!();
        assert_clean(image("cluster_size=65536", "1G", &[], &[]));
    }

    #[test]
    fn zero_clusters_are_clean() {
        require_qemu!();
        // Preallocated zero clusters (offset + zero flag) and plain ones.
        assert_clean(image(
            "cluster_size=4096",
            "4M",
            &["write -P 1 0 256k", "write -z 0 64k", "write -z -u 1M 64k"],
            &[],
        ));
    }

    #[test]
    fn compressed_clusters_are_clean() {
        require_qemu!();
        let r = assert_clean(image(
            "cluster_size=4096",
            "4M",
            &[
                "write -c -P 1 0 64k",
                "write -c -P 2 1M 4k",
                "write -P 3 2M 8k",
            ],
            &[],
        ));
        assert_eq!(r.stats.compressed_clusters, 17);
    }

    #[test]
    fn snapshots_are_clean() {
        require_qemu!();
        let dir = temp_dir();
        let d = &dir.0;
        run(
            d,
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "img.qcow2", "8M"],
        );
        run(d, "qemu-io", &["-c", "write -P 1 0 1M", "img.qcow2"]);
        run(d, "qemu-img", &["snapshot", "-c", "s1", "img.qcow2"]);
        run(
            d,
            "qemu-io",
            &[
                "-c",
                "write -P 2 512k 1M",
                "-c",
                "write -c -P 5 6M 64k",
                "img.qcow2",
            ],
        );
        run(d, "qemu-img", &["snapshot", "-c", "s2", "img.qcow2"]);
        run(d, "qemu-io", &["-c", "write -P 3 0 64k", "img.qcow2"]);
        let st = Command::new("qemu-img")
            .current_dir(d)
            .args(["check", "-q", "img.qcow2"])
            .status()
            .unwrap();
        assert!(st.success());
        assert_clean(std::fs::read(d.join("img.qcow2")).unwrap());
    }

    #[test]
    fn extended_l2_is_clean() {
        require_qemu!();
        assert_clean(image(
            "extended_l2=on,cluster_size=65536",
            "8M",
            &[
                "write -P 1 0 4k",
                "write -z 64k 8k",
                "write -P 2 200k 12k",
                "write -c -P 3 1M 64k",
            ],
            &[],
        ));
    }

    #[test]
    fn refcount_widths_are_clean() {
        require_qemu!();
        for bits in [1, 2, 4, 8, 16, 32, 64] {
            let opts = format!("refcount_bits={bits},cluster_size=4096");
            let r = check_bytes(image(
                &opts,
                "4M",
                &["write -P 1 0 100k", "write -P 2 1M 4k"],
                &[],
            ));
            assert!(
                r.is_clean(),
                "refcount_bits={bits}: {:#?} {:#?}",
                r.corruptions,
                r.leaks
            );
        }
    }

    #[test]
    fn snapshot_with_64_bit_refcounts_is_clean() {
        require_qemu!();
        assert_clean(image(
            "refcount_bits=64",
            "4M",
            &["write -P 1 0 256k"],
            &[&["snapshot", "-c", "s1", "img.qcow2"]],
        ));
    }

    #[test]
    fn version_2_small_clusters_is_clean() {
        require_qemu!();
        assert_clean(image(
            "compat=0.10,cluster_size=512",
            "2M",
            &["write -P 1 0 100k", "write -P 2 1M 3k"],
            &[],
        ));
    }

    #[test]
    fn persistent_bitmap_is_clean() {
        require_qemu!();
        let dir = temp_dir();
        let d = &dir.0;
        run(
            d,
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4096",
                "img.qcow2",
                "64M",
            ],
        );
        run(d, "qemu-io", &["-c", "write -P 1 0 64k", "img.qcow2"]);
        run(d, "qemu-img", &["bitmap", "--add", "img.qcow2", "b0"]);
        // The bitmap is enabled: these writes set bits, so it gets data clusters.
        run(
            d,
            "qemu-io",
            &[
                "-c",
                "write -P 2 0 1M",
                "-c",
                "write -P 3 40M 64k",
                "img.qcow2",
            ],
        );
        let st = Command::new("qemu-img")
            .current_dir(d)
            .args(["check", "-q", "img.qcow2"])
            .status()
            .unwrap();
        assert!(st.success());
        let b = std::fs::read(d.join("img.qcow2")).unwrap();
        let q = Qcow2::open(Arc::new(b.clone())).unwrap();
        assert!(q.header().bitmaps.is_some());
        assert_clean(b);
    }

    #[test]
    fn external_data_file_is_clean() {
        require_qemu!();
        assert_clean(image(
            "data_file=img.raw",
            "4M",
            &["write -P 1 0 256k", "write -z 1M 64k"],
            &[],
        ));
    }

    #[test]
    fn preallocation_metadata_is_clean() {
        require_qemu!();
        assert_clean(image(
            "preallocation=metadata,cluster_size=65536",
            "16M",
            &[],
            &[],
        ));
    }

    #[test]
    fn dirty_image_with_lazy_refcounts_reports_what_qemu_img_check_does() {
        require_qemu!();
        let dir = temp_dir();
        let d = &dir.0;
        run(
            d,
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "lazy_refcounts=on",
                "img.qcow2",
                "16M",
            ],
        );
        // `abort` kills qemu-io after the writes: the dirty bit stays set.
        let st = Command::new("qemu-io")
            .current_dir(d)
            .args([
                "-f",
                "qcow2",
                "-c",
                "write -P 7 0 1M",
                "-c",
                "write -P 8 4M 64k",
                "-c",
                "abort",
                "img.qcow2",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(!st.success());
        // qemu-img check (read-only, no repair) counts the stale refcounts
        // of the crashed image as corruptions; so do we, and say why.
        let out = Command::new("qemu-img")
            .current_dir(d)
            .args(["check", "--output=json", "img.qcow2"])
            .output()
            .unwrap();
        let qemu = String::from_utf8_lossy(&out.stdout).to_string();
        let qemu_corruptions: u64 = qemu
            .split("\"corruptions\":")
            .nth(1)
            .and_then(|t| t.trim().split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no corruption count in qemu-img check output: {qemu}"));
        assert!(qemu_corruptions > 0, "{qemu}");
        let b = std::fs::read(d.join("img.qcow2")).unwrap();
        let r = check_bytes(b);
        assert_eq!(r.corruption_count(), qemu_corruptions, "{r:#?}");
        assert!(r.corruptions.iter().all(|p| p
            .message
            .ends_with("(expected: dirty image with lazy refcounts)")));
        assert_has(&r.warnings, "not closed cleanly");
    }

    // ---- corruptions ----

    #[test]
    fn zeroed_refcount_of_data_cluster_is_corruption() {
        require_qemu!();
        let mut b = data_image();
        let (_, data) = first_l2_and_data(&b);
        let at = refcount16_at(&b, data);
        put16(&mut b, at, 0);
        let r = check_bytes(b);
        assert_has(
            &r.corruptions,
            &format!(
                "refcount for cluster at {data:#x} (data cluster) is 0 but 1 references exist"
            ),
        );
        // OFLAG_COPIED is set, the refcount is not 1.
        assert_has(&r.corruptions, &format!("data cluster at {data:#x}"));
        assert!(!r.is_clean());
    }

    #[test]
    fn bumped_refcount_is_leak() {
        require_qemu!();
        let mut b = data_image();
        let (_, data) = first_l2_and_data(&b);
        let at = refcount16_at(&b, data);
        put16(&mut b, at, 2);
        let r = check_bytes(b);
        assert_has(
            &r.leaks,
            &format!(
                "refcount for cluster at {data:#x} (data cluster) is 2 but only 1 references exist"
            ),
        );
        assert_has(
            &r.corruptions,
            "has the copied flag set but the refcount is 2",
        );
    }

    #[test]
    fn refcount_on_unreferenced_cluster_is_leak() {
        require_qemu!();
        let mut b = data_image();
        let l = layout(&b);
        let end = (b.len() as u64).next_multiple_of(l.cs);
        b.resize((end + l.cs) as usize, 0);
        let at = refcount16_at(&b, end);
        put16(&mut b, at, 1);
        let r = check_bytes(b);
        assert!(r.corruptions.is_empty(), "{:#?}", r.corruptions);
        assert_has(
            &r.leaks,
            &format!("cluster at {end:#x} has refcount 1 but is not referenced"),
        );
        assert_eq!(r.stats.image_end_offset, end + l.cs);
    }

    #[test]
    fn l2_entry_pointing_at_l1_table_is_corruption() {
        require_qemu!();
        let mut b = data_image();
        let l = layout(&b);
        let (l2, _) = first_l2_and_data(&b);
        put64(&mut b, l2, l.l1 | OFLAG_COPIED);
        let r = check_bytes(b);
        assert_has(&r.corruptions, &format!("data cluster at {:#x}", l.l1));
        assert_has(&r.corruptions, "overlaps the L1 table");
    }

    #[test]
    fn l2_table_shared_with_refcount_block_is_corruption() {
        require_qemu!();
        let mut b = data_image();
        let l = layout(&b);
        let block = get64(&b, l.reftable) & REFT_OFFSET_MASK;
        let e = get64(&b, l.l1);
        put64(&mut b, l.l1, (e & !L1E_OFFSET_MASK) | block);
        let r = check_bytes(b);
        assert_has(&r.corruptions, "overlaps the refcount block");
    }

    #[test]
    fn misaligned_l2_offset_in_l1_is_corruption() {
        require_qemu!();
        let mut b = data_image();
        let l = layout(&b);
        let (l2, _) = first_l2_and_data(&b);
        put64(&mut b, l.l1, (l2 + 512) | OFLAG_COPIED);
        let r = check_bytes(b);
        assert_has(
            &r.corruptions,
            &format!(
                "L2 table offset {:#x} in active L1 entry 0 is not aligned",
                l2 + 512
            ),
        );
    }

    #[test]
    fn l1_entry_with_reserved_bits_is_corruption() {
        require_qemu!();
        let mut b = data_image();
        let l = layout(&b);
        let e = get64(&b, l.l1);
        put64(&mut b, l.l1, e | 1 << 60);
        let r = check_bytes(b);
        assert_has(&r.corruptions, "active L1 entry 0");
        assert_has(&r.corruptions, "has reserved bits set");
    }

    #[test]
    fn l2_table_past_eof_is_corruption() {
        require_qemu!();
        let mut b = data_image();
        let l = layout(&b);
        let past = (b.len() as u64).next_multiple_of(l.cs) + 16 * l.cs;
        put64(&mut b, l.l1, past | OFLAG_COPIED);
        let r = check_bytes(b);
        assert_has(&r.corruptions, &format!("L2 table at {past:#x}"));
        assert_has(&r.corruptions, "lies beyond the end of the file");
    }

    #[test]
    fn data_cluster_past_eof_is_corruption() {
        require_qemu!();
        let mut b = data_image();
        let l = layout(&b);
        let (l2, _) = first_l2_and_data(&b);
        let past = (b.len() as u64).next_multiple_of(l.cs) + 4 * l.cs;
        put64(&mut b, l2, past | OFLAG_COPIED);
        let r = check_bytes(b);
        assert_has(&r.corruptions, &format!("data cluster at {past:#x}"));
        assert_has(&r.corruptions, "lies beyond the end of the file");
    }

    #[test]
    fn misaligned_data_cluster_is_corruption() {
        require_qemu!();
        let mut b = data_image();
        let (l2, data) = first_l2_and_data(&b);
        put64(&mut b, l2, (data + 4096) | OFLAG_COPIED);
        let r = check_bytes(b);
        assert_has(
            &r.corruptions,
            &format!("data cluster offset {:#x}", data + 4096),
        );
        assert_has(&r.corruptions, "is not aligned");
    }

    #[test]
    fn refcount_block_past_eof_is_corruption() {
        require_qemu!();
        let mut b = data_image();
        let l = layout(&b);
        let past = (b.len() as u64).next_multiple_of(l.cs) + 8 * l.cs;
        put64(&mut b, l.reftable, past);
        let r = check_bytes(b);
        assert_has(&r.corruptions, &format!("refcount block at {past:#x} (refcount table entry 0) lies beyond the end of the file"));
    }

    #[test]
    fn misaligned_refcount_block_is_corruption() {
        require_qemu!();
        let mut b = data_image();
        let l = layout(&b);
        let block = get64(&b, l.reftable);
        put64(&mut b, l.reftable, block | 0x100);
        let r = check_bytes(b);
        assert_has(&r.corruptions, "refcount table entry 0");
        assert_has(&r.corruptions, "has reserved bits set");
    }

    #[test]
    fn cleared_copied_flag_is_corruption() {
        require_qemu!();
        let mut b = data_image();
        let (l2, data) = first_l2_and_data(&b);
        put64(&mut b, l2, data);
        let r = check_bytes(b);
        assert_has(
            &r.corruptions,
            "has the copied flag clear but the refcount is 1",
        );
    }

    #[test]
    fn refcount_mismatch_in_dirty_lazy_image_is_corruption_with_a_hint() {
        require_qemu!();
        let mut b = data_image();
        let (_, data) = first_l2_and_data(&b);
        // incompatible_features (72): dirty; compatible_features (80): lazy refcounts.
        let inc = get64(&b, 72);
        put64(&mut b, 72, inc | 1);
        let compat = get64(&b, 80);
        put64(&mut b, 80, compat | 1);
        let at = refcount16_at(&b, data);
        put16(&mut b, at, 0);
        let r = check_bytes(b);
        assert!(!r.is_clean(), "{r:#?}");
        assert_has(
            &r.corruptions,
            &format!(
                "refcount for cluster at {data:#x} (data cluster) is 0 but 1 references exist \
                 (expected: dirty image with lazy refcounts)"
            ),
        );
        assert_has(&r.warnings, "not closed cleanly");
    }

    #[test]
    fn zeroed_bit_in_one_bit_refcounts_is_corruption() {
        require_qemu!();
        let mut b = image(
            "refcount_bits=1,cluster_size=4096",
            "4M",
            &["write -P 1 0 100k"],
            &[],
        );
        let l = layout(&b);
        let (_, data) = first_l2_and_data(&b);
        let block = get64(&b, l.reftable) & REFT_OFFSET_MASK;
        let k = data / l.cs;
        // Bit k % 8 from the least significant bit of byte k / 8.
        let byte = (block + k / 8) as usize;
        assert_ne!(
            b[byte] & (1 << (k % 8)),
            0,
            "refcount bit not where the spec says"
        );
        b[byte] &= !(1 << (k % 8));
        let r = check_bytes(b);
        assert_has(
            &r.corruptions,
            &format!(
                "refcount for cluster at {data:#x} (data cluster) is 0 but 1 references exist"
            ),
        );
    }

    fn ext_l2_image() -> Vec<u8> {
        image(
            "extended_l2=on,cluster_size=65536",
            "8M",
            &[
                "write -P 1 0 4k",
                "write -P 2 128k 64k",
                "write -c -P 3 1M 64k",
            ],
            &[],
        )
    }

    #[test]
    fn subclusters_both_allocated_and_zero_are_corruption() {
        require_qemu!();
        let mut b = ext_l2_image();
        let (l2, _) = first_l2_and_data(&b);
        // Entry 0's bitmap: subcluster 0 allocated; also mark it zero.
        let bm = get64(&b, l2 + 8);
        put64(&mut b, l2 + 8, bm | 1 << 32);
        let r = check_bytes(b);
        assert_has(&r.corruptions, "subclusters both allocated and zero");
    }

    #[test]
    fn allocated_subclusters_in_unallocated_cluster_are_corruption() {
        require_qemu!();
        let mut b = ext_l2_image();
        let (l2, _) = first_l2_and_data(&b);
        // Entry 1 (guest 64k) is unallocated.
        assert_eq!(get64(&b, l2 + 16), 0);
        put64(&mut b, l2 + 24, 0xf);
        let r = check_bytes(b);
        assert_has(
            &r.corruptions,
            "allocated subclusters in an unallocated cluster",
        );
    }

    #[test]
    fn compressed_cluster_with_subcluster_bitmap_is_corruption() {
        require_qemu!();
        let mut b = ext_l2_image();
        let (l2, _) = first_l2_and_data(&b);
        // Guest 1M is entry 16 with 16-byte entries.
        let e = get64(&b, l2 + 16 * 16);
        assert_ne!(e & OFLAG_COMPRESSED, 0);
        put64(&mut b, l2 + 16 * 16 + 8, 1);
        let r = check_bytes(b);
        assert_has(&r.corruptions, "compressed cluster in L2 table");
        assert_has(&r.corruptions, "non-zero subcluster bitmap 0x1");
    }

    #[test]
    fn compressed_cluster_past_eof_is_corruption() {
        require_qemu!();
        let mut b = image("cluster_size=4096", "4M", &["write -c -P 1 0 4k"], &[]);
        let (l2, _) = first_l2_and_data(&b);
        let e = get64(&b, l2);
        assert_ne!(e & OFLAG_COMPRESSED, 0);
        // Host offset field: bits 0..(62 - (12 - 8)) = 0..58.
        let past = b.len() as u64 + 8192;
        put64(&mut b, l2, (e & !((1u64 << 58) - 1)) | past);
        let r = check_bytes(b);
        assert_has(&r.corruptions, &format!("compressed cluster at {past:#x}"));
    }

    #[test]
    fn compressed_cluster_cut_short_is_corruption_not_a_leak() {
        require_qemu!();
        let b = image("cluster_size=4096", "4M", &["write -c -P 1 0 4k"], &[]);
        let (l2, _) = first_l2_and_data(&b);
        let e = get64(&b, l2);
        assert_ne!(e & OFLAG_COMPRESSED, 0);
        // 4 KiB clusters: host offset in bits 0..58, sectors after the
        // first in bits 58..61.
        let host = e & ((1u64 << 58) - 1);
        let end = host / 512 * 512 + ((e >> 58 & 0xf) + 1) * 512;
        let len = b.len() as u64;
        assert!(end - 512 < len && len <= end, "the cluster ends the file");
        // Two more sectors claimed: the file ends before the descriptor's
        // last sector, so corruption; the part in the file stays referenced
        // (not a leak, which a repair would free under the descriptor).
        let mut b = b;
        put64(&mut b, l2, e + (2 << 58));
        let r = check_bytes(b);
        assert_has(&r.corruptions, &format!("compressed cluster at {host:#x}"));
        assert_has(&r.corruptions, "beyond the end of the file");
        assert!(r.leaks.is_empty(), "{:#?}", r.leaks);
    }

    #[test]
    fn snapshot_l1_pointing_at_active_l1_is_corruption() {
        require_qemu!();
        let mut b = image(
            "cluster_size=65536",
            "8M",
            &["write -P 1 0 128k"],
            &[&["snapshot", "-c", "s1", "img.qcow2"]],
        );
        let l = layout(&b);
        let snapshots_offset = get64(&b, 64);
        put64(&mut b, snapshots_offset, l.l1);
        let r = check_bytes(b);
        assert_has(&r.corruptions, "L1 table at");
        assert_has(&r.corruptions, "overlaps another L1 table");
    }

    #[test]
    fn bitmap_data_cluster_on_l2_table_is_corruption() {
        require_qemu!();
        let dir = temp_dir();
        let d = &dir.0;
        run(
            d,
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4096",
                "img.qcow2",
                "64M",
            ],
        );
        run(d, "qemu-img", &["bitmap", "--add", "img.qcow2", "b0"]);
        run(d, "qemu-io", &["-c", "write -P 2 0 1M", "img.qcow2"]);
        let mut b = std::fs::read(d.join("img.qcow2")).unwrap();
        let (l2, _) = first_l2_and_data(&b);
        let q = Qcow2::open(Arc::new(b.clone())).unwrap();
        let dir_offset = q.header().bitmaps.unwrap().bitmap_directory_offset;
        let table = get64(&b, dir_offset);
        assert_ne!(
            get64(&b, table) & BME_OFFSET_MASK,
            0,
            "bitmap has no data cluster"
        );
        put64(&mut b, table, l2);
        let r = check_bytes(b);
        assert_has(&r.corruptions, "bitmap data cluster at");
        assert_has(&r.corruptions, "overlaps the L2 table");
    }

    /// Random byte damage in metadata must never panic or hang.
    #[test]
    fn damaged_metadata_never_panics() {
        require_qemu!();
        let base = image(
            "cluster_size=1024,refcount_bits=8",
            "1M",
            &[
                "write -P 1 0 64k",
                "write -c -P 2 128k 8k",
                "write -z 256k 4k",
            ],
            &[&["snapshot", "-c", "s1", "img.qcow2"]],
        );
        let metadata_end = 64 * 1024; // header, tables: early in a small image
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            seed >> 33
        };
        let (mut opened, mut found) = (0, 0);
        for _ in 0..300 {
            let mut b = base.clone();
            for _ in 0..8 {
                let at = (next() % (metadata_end.min(b.len() as u64))) as usize;
                b[at] = next() as u8;
            }
            if let Ok(q) = Qcow2::open_with(
                Arc::new(b),
                OpenOptions {
                    allow_corrupt: true,
                },
            ) {
                opened += 1;
                if check(&q).is_ok_and(|r| !r.is_clean()) {
                    found += 1;
                }
            }
        }
        eprintln!("{opened} damaged images opened, {found} reported not clean");
        assert!(opened > 100 && found > 50);
    }
}
