//! QCOW2 reading: L1/L2 lookup into runs of guest bytes (unallocated, zero,
//! data at a host offset, compressed), and cluster decompression. Follows
//! qemu's `docs/interop/qcow2.rst`; lookups mirror `qcow2_get_host_offset`
//! (block/qcow2-cluster.c), returning runs rather than single clusters.

pub mod check;
pub mod compress;
pub mod header;
pub mod snapshot;
#[cfg(test)]
mod test_bytes;
#[cfg(test)]
pub(crate) mod test_qemu;
#[cfg(test)]
mod tests;
pub mod update;
pub mod writer;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{check_in_file, read_exact_at, Error, Result};
use crate::Storage;
pub use header::{CompressionType, Header};

/// L1 entry: bits 9-55 are the L2 table offset, bit 63 "copied".
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L2 entry (standard cluster): bits 9-55 are the host cluster offset.
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63: refcount is exactly one (copied); bit 62: compressed cluster.
pub const OFLAG_COPIED: u64 = 1 << 63;
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard L2 entry (version 3, no extended L2): reads as zeros.
pub const OFLAG_ZERO: u64 = 1;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;

/// Bytes of L2 tables the cache keeps, and a bound on their number (512-byte
/// clusters would otherwise mean 64k tiny tables). Every reader walks the
/// guest in order (a few tables in use at a time, one per worker), so a
/// small cache serves it: 8 MiB is 128 tables of 64 KiB clusters, the map
/// of 64 GiB. It is memory per open image, and a sync holds two
/// (`bench/sync-big-qcow2.sh`: 32 MiB here took a 1 TiB local update
/// near 256 MiB of RSS).
const L2_CACHE_BYTES: u64 = 8 << 20;
const L2_CACHE_MAX_TABLES: usize = 4096;

/// Where a run of guest bytes lives in this one image file (no backing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterKind {
    /// Not allocated here: the backing file (or zeros) shows through.
    Unallocated,
    /// Reads as zeros (zero flag, zero subclusters).
    Zero,
    /// Plain data at `host_offset` in the data file (the image itself, or the
    /// external data file), contiguous for the whole run.
    Data { host_offset: u64 },
    /// Inside one compressed cluster; the run never crosses a cluster.
    Compressed {
        host_offset: u64,
        compressed_size: u64,
    },
}

/// A run of guest bytes of one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub kind: ClusterKind,
    pub len: u64,
}

/// What an opener may tolerate.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOptions {
    /// Open even with the corrupt bit set (for `check`).
    pub allow_corrupt: bool,
}

/// An open QCOW2 image file (one layer; the chain is [`crate::Image`]'s job).
pub struct Qcow2 {
    header: Header,
    file: Arc<dyn Storage>,
    file_size: u64,
    data_file: Option<Arc<dyn Storage>>,
    l1: Vec<u64>,
    l2_cache: Mutex<L2Cache>,
}

struct L2Cache {
    tables: HashMap<u64, (Arc<[u64]>, u64)>,
    tick: u64,
    capacity: usize,
}

impl std::fmt::Debug for Qcow2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2")
            .field("header", &self.header)
            .finish()
    }
}

impl Qcow2 {
    pub fn open(file: Arc<dyn Storage>) -> Result<Qcow2> {
        Qcow2::open_with(file, OpenOptions::default())
    }

    pub fn open_with(file: Arc<dyn Storage>, opts: OpenOptions) -> Result<Qcow2> {
        let file_size = file.size().map_err(|source| Error::Io {
            offset: 0,
            len: 0,
            source,
        })?;
        let mut prefix = vec![0u8; 24.min(file_size as usize)];
        read_exact_at(&*file, &mut prefix, 0, "header")?;
        let cluster_len = Header::first_cluster_len(&prefix)?.min(file_size);
        let mut first = vec![0u8; cluster_len as usize];
        read_exact_at(&*file, &mut first, 0, "header")?;
        let header = Header::parse(&first, file_size)?;
        if header.corrupt() && !opts.allow_corrupt {
            return Err(Error::invalid(
                "image is marked corrupt (incompatible feature bit 1); run 'imgsync check' or 'qemu-img check -r all'",
            ));
        }

        // L1 table: size already capped and inside the file (Header::parse).
        let mut raw = vec![0u8; header.l1_size as usize * 8];
        read_exact_at(&*file, &mut raw, header.l1_table_offset, "L1 table")?;
        let l1 = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();

        let capacity =
            ((L2_CACHE_BYTES / header.cluster_size()) as usize).clamp(1, L2_CACHE_MAX_TABLES);
        Ok(Qcow2 {
            header,
            file,
            file_size,
            data_file: None,
            l1,
            l2_cache: Mutex::new(L2Cache {
                tables: HashMap::new(),
                tick: 0,
                capacity,
            }),
        })
    }

    /// Attaches the external data file the header names (the opener resolves
    /// the name; this crate sees no paths).
    pub fn set_data_file(&mut self, data: Arc<dyn Storage>) {
        self.data_file = Some(data);
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn virtual_size(&self) -> u64 {
        self.header.size
    }

    pub fn file(&self) -> &Arc<dyn Storage> {
        &self.file
    }

    pub fn file_size(&self) -> u64 {
        self.file_size
    }

    pub fn l1_table(&self) -> &[u64] {
        &self.l1
    }

    /// The store guest data lives in: the external data file, or the image.
    fn data_store(&self) -> Result<&Arc<dyn Storage>> {
        if self.header.has_data_file() {
            self.data_file.as_ref().ok_or_else(|| {
                Error::invalid("the external data file is needed but was not opened")
            })
        } else {
            Ok(&self.file)
        }
    }

    /// Reads and decodes the L2 table at `l2_offset` (through the cache).
    /// Entries are raw u64 words: one per cluster, or two with extended L2.
    pub fn l2_table(&self, l2_offset: u64) -> Result<Arc<[u64]>> {
        let cs = self.header.cluster_size();
        {
            let mut cache = self.l2_cache.lock().unwrap_or_else(|e| e.into_inner());
            cache.tick += 1;
            let tick = cache.tick;
            if let Some(entry) = cache.tables.get_mut(&l2_offset) {
                entry.1 = tick;
                return Ok(entry.0.clone());
            }
        }
        self.check_metadata_offset("L2 table", l2_offset, cs)?;
        let mut raw = vec![0u8; cs as usize];
        read_exact_at(&*self.file, &mut raw, l2_offset, "L2 table")?;
        let table: Arc<[u64]> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        let mut cache = self.l2_cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.tables.len() >= cache.capacity {
            if let Some(&oldest) = cache.tables.iter().min_by_key(|(_, v)| v.1).map(|(k, _)| k) {
                cache.tables.remove(&oldest);
            }
        }
        let tick = cache.tick;
        cache.tables.insert(l2_offset, (table.clone(), tick));
        Ok(table)
    }

    /// A metadata cluster (L2 table, refcount block) must be aligned, past the
    /// header cluster and inside the file.
    fn check_metadata_offset(&self, what: &'static str, offset: u64, len: u64) -> Result<()> {
        let cs = self.header.cluster_size();
        // The header first: an offset inside it is also misaligned, but
        // "points into the image header" says more.
        if offset < cs {
            return Err(Error::invalid(format!(
                "{what} at offset {offset:#x} points into the image header"
            )));
        }
        if offset % cs != 0 {
            return Err(Error::Misaligned {
                what,
                offset,
                align: cs,
            });
        }
        check_in_file(what, offset, len, self.file_size)
    }

    /// The run of guest bytes starting at `guest_offset` that share one kind
    /// (and, for data, one contiguous host range), at most `max_len` bytes and
    /// never past the virtual size or the end of one L2 table.
    pub fn lookup(&self, guest_offset: u64, max_len: u64) -> Result<Mapping> {
        let h = &self.header;
        let max_len = max_len.min(h.size.saturating_sub(guest_offset));
        if max_len == 0 {
            return Ok(Mapping {
                kind: ClusterKind::Unallocated,
                len: 0,
            });
        }
        let cs = h.cluster_size();
        let cov = h.l2_coverage();
        let mut l1_index = guest_offset / cov;
        let l2_offset = self
            .l1
            .get(l1_index as usize)
            .map_or(0, |e| e & L1E_OFFSET_MASK);
        if l2_offset == 0 {
            // Unallocated L2 table: extend over following empty L1 entries,
            // so mapping a mostly-empty multi-TB image stays cheap.
            let mut len = cov - guest_offset % cov;
            while len < max_len {
                l1_index += 1;
                if self
                    .l1
                    .get(l1_index as usize)
                    .is_some_and(|e| e & L1E_OFFSET_MASK != 0)
                {
                    break;
                }
                len = len.saturating_add(cov);
            }
            return Ok(Mapping {
                kind: ClusterKind::Unallocated,
                len: len.min(max_len),
            });
        }
        let table = self.l2_table(l2_offset)?;
        let entries_per_table = cov >> h.cluster_bits;
        let mut index = (guest_offset % cov) >> h.cluster_bits;
        let mut in_cluster = guest_offset & (cs - 1);
        let mut run: Option<Mapping> = None;
        while index < entries_per_table {
            let (kind, len) = self.decode(&table, index, in_cluster, guest_offset)?;
            match &mut run {
                None => run = Some(Mapping { kind, len }),
                Some(r) => {
                    let continues = match (r.kind, kind) {
                        (
                            ClusterKind::Data { host_offset: a },
                            ClusterKind::Data { host_offset: b },
                        ) => a.checked_add(r.len) == Some(b),
                        (ClusterKind::Compressed { .. }, _) => false,
                        (a, b) => a == b,
                    };
                    if !continues {
                        break;
                    }
                    r.len += len;
                }
            }
            let r = run.as_ref().map_or(0, |r| r.len);
            // A run ends early inside a cluster (subclusters) or at max_len.
            if r >= max_len
                || in_cluster + len < cs
                || matches!(kind, ClusterKind::Compressed { .. })
            {
                break;
            }
            index += 1;
            in_cluster = 0;
        }
        let mut m = run.unwrap_or(Mapping {
            kind: ClusterKind::Unallocated,
            len: 0,
        });
        m.len = m.len.min(max_len);
        Ok(m)
    }

    /// Decodes the L2 entry `index` of `table` from `in_cluster` bytes into its
    /// cluster: the kind, and how many bytes of the cluster from there it covers.
    fn decode(
        &self,
        table: &[u64],
        index: u64,
        in_cluster: u64,
        guest_offset: u64,
    ) -> Result<(ClusterKind, u64)> {
        let h = &self.header;
        let cs = h.cluster_size();
        let ext = h.extended_l2();
        let slot = (index * if ext { 2 } else { 1 }) as usize;
        let entry = table.get(slot).copied().unwrap_or(0);
        let bitmap = if ext {
            table.get(slot + 1).copied().unwrap_or(0)
        } else {
            0
        };
        let whole = cs - in_cluster;

        if entry & OFLAG_COMPRESSED != 0 {
            if h.has_data_file() {
                return Err(Error::invalid(format!(
                    "compressed cluster for guest offset {guest_offset:#x} in an image with an external data file"
                )));
            }
            if ext && bitmap != 0 {
                return Err(Error::invalid(format!(
                    "compressed cluster for guest offset {guest_offset:#x} has a non-zero subcluster bitmap {bitmap:#x}"
                )));
            }
            let (host_offset, compressed_size) = self.compressed_descriptor(entry);
            if host_offset >= self.file_size {
                return Err(Error::BeyondEof {
                    what: "compressed cluster",
                    offset: host_offset,
                    len: compressed_size,
                    file_size: self.file_size,
                });
            }
            if host_offset < cs {
                return Err(Error::invalid(format!(
                    "compressed cluster for guest offset {guest_offset:#x} at {host_offset:#x} points into the image header"
                )));
            }
            // The descriptor counts whole 512-byte sectors and its last sector
            // holds at least one byte of the cluster (spec, "Compressed
            // Clusters Descriptor"), so the file may end inside that sector
            // (qemu writes the compressed bytes only), never before it: a
            // range reaching further past the end is damaged metadata, found
            // here by map and check rather than by reading the data.
            if host_offset.saturating_add(compressed_size) > self.file_size.next_multiple_of(512) {
                return Err(Error::BeyondEof {
                    what: "compressed cluster",
                    offset: host_offset,
                    len: compressed_size,
                    file_size: self.file_size,
                });
            }
            return Ok((
                ClusterKind::Compressed {
                    host_offset,
                    compressed_size,
                },
                whole,
            ));
        }

        let offset = entry & L2E_OFFSET_MASK;
        let external = h.has_data_file();
        let copied = entry & OFLAG_COPIED != 0;
        let allocated = offset != 0 || (external && copied);
        // Host offset 0 with bit 63 set is only valid with an external data
        // file (spec, "Standard Cluster Descriptor"); without one it names the
        // header. qemu's qcow2_get_cluster_type reads it as unallocated, which
        // would silently show the backing file; refuse it instead. A version 3
        // zero cluster reads as zeros whatever its offset (ZERO_PLAIN).
        let zero_flag = !ext && h.version >= 3 && entry & OFLAG_ZERO != 0;
        if !external && offset < cs && (offset != 0 || (copied && !zero_flag)) {
            return Err(Error::invalid(format!(
                "data cluster for guest offset {guest_offset:#x} at host offset {offset:#x} points into the image header"
            )));
        }
        if allocated {
            if offset % cs != 0 {
                return Err(Error::Misaligned {
                    what: "data cluster",
                    offset,
                    align: cs,
                });
            }
            if !external && offset >= self.file_size {
                return Err(Error::BeyondEof {
                    what: "data cluster",
                    offset,
                    len: cs,
                    file_size: self.file_size,
                });
            }
        }

        if !ext {
            let kind = if h.version >= 3 && entry & OFLAG_ZERO != 0 {
                ClusterKind::Zero
            } else if allocated {
                ClusterKind::Data {
                    host_offset: offset + in_cluster,
                }
            } else {
                ClusterKind::Unallocated
            };
            return Ok((kind, whole));
        }

        // Extended L2: bits 0-31 allocated subclusters, bits 32-63 zero subclusters
        // (qcow2_get_subcluster_type).
        let alloc = bitmap as u32;
        let zero = (bitmap >> 32) as u32;
        if alloc & zero != 0 {
            return Err(Error::invalid(format!(
                "subclusters both allocated and zero in the L2 bitmap {bitmap:#x} for guest offset {guest_offset:#x}"
            )));
        }
        if !allocated && alloc != 0 {
            return Err(Error::invalid(format!(
                "allocated subclusters in an unallocated cluster (L2 bitmap {bitmap:#x}) for guest offset {guest_offset:#x}"
            )));
        }
        let sc_size = cs / u64::from(SUBCLUSTERS);
        let first = (in_cluster / sc_size) as u32;
        let state = |sc: u32| (alloc >> sc & 1, zero >> sc & 1);
        let s0 = state(first);
        let mut last = first + 1;
        while last < SUBCLUSTERS && state(last) == s0 {
            last += 1;
        }
        let len = u64::from(last) * sc_size - in_cluster;
        let kind = match s0 {
            (1, _) => ClusterKind::Data {
                host_offset: offset + in_cluster,
            },
            (_, 1) => ClusterKind::Zero,
            _ => ClusterKind::Unallocated,
        };
        Ok((kind, len))
    }

    /// Host offset and byte length of a compressed cluster descriptor
    /// (spec: "Compressed Clusters Descriptor"; qemu
    /// `qcow2_parse_compressed_l2_entry`).
    pub fn compressed_descriptor(&self, entry: u64) -> (u64, u64) {
        compressed_descriptor(self.header.cluster_bits, entry)
    }

    /// Decompresses the compressed cluster at `host_offset` into `out` (one
    /// cluster long).
    pub fn read_compressed(
        &self,
        host_offset: u64,
        compressed_size: u64,
        out: &mut [u8],
    ) -> Result<()> {
        // The descriptor's size is rounded to sectors and may run past the end
        // of the file for the last cluster; read what is there.
        let avail = self
            .file_size
            .saturating_sub(host_offset)
            .min(compressed_size);
        let mut input = vec![0u8; avail as usize];
        read_exact_at(&*self.file, &mut input, host_offset, "compressed cluster")?;
        compress::decompress(self.header.compression_type, &input, out).map_err(|e| {
            Error::invalid(format!(
                "compressed cluster at offset {host_offset:#x} does not decompress: {e}"
            ))
        })
    }

    /// Reads `buf.len()` guest bytes of this layer at `guest_offset`. Runs
    /// that are unallocated here are passed to `unallocated` (the chain's
    /// job: backing file or zeros).
    pub fn read_at(
        &self,
        buf: &mut [u8],
        guest_offset: u64,
        unallocated: &mut dyn FnMut(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        let cs = self.header.cluster_size();
        let mut done = 0usize;
        let mut cluster_buf: Vec<u8> = Vec::new();
        while done < buf.len() {
            let pos = guest_offset + done as u64;
            let want = (buf.len() - done) as u64;
            let m = self.lookup(pos, want)?;
            if m.len == 0 {
                return Err(Error::invalid(format!(
                    "read at guest offset {pos:#x} is beyond the virtual size {:#x}",
                    self.header.size
                )));
            }
            let out = &mut buf[done..done + m.len as usize];
            match m.kind {
                ClusterKind::Unallocated => unallocated(out, pos)?,
                ClusterKind::Zero => out.fill(0),
                ClusterKind::Data { host_offset } => self.read_data(out, host_offset)?,
                ClusterKind::Compressed {
                    host_offset,
                    compressed_size,
                } => {
                    cluster_buf.resize(cs as usize, 0);
                    self.read_compressed(host_offset, compressed_size, &mut cluster_buf)?;
                    let start = (pos & (cs - 1)) as usize;
                    out.copy_from_slice(&cluster_buf[start..start + out.len()]);
                }
            }
            done += m.len as usize;
        }
        Ok(())
    }

    /// Read-ahead hint for plain data clusters (in the image or the data
    /// file).
    pub fn data_will_need(&self, host_offset: u64, len: u64) {
        if let Ok(store) = self.data_store() {
            store.will_need(host_offset, len);
        }
    }

    /// Reads plain data clusters. An external data file may be shorter than
    /// the guest (sparse, never written at the end): past its end reads zeros,
    /// as qemu's file driver does.
    fn read_data(&self, out: &mut [u8], host_offset: u64) -> Result<()> {
        let store = self.data_store()?;
        if self.header.has_data_file() {
            let size = store.size().map_err(|source| Error::Io {
                offset: host_offset,
                len: 0,
                source,
            })?;
            let avail = size.saturating_sub(host_offset).min(out.len() as u64) as usize;
            let (head, tail) = out.split_at_mut(avail);
            read_exact_at(&**store, head, host_offset, "external data")?;
            tail.fill(0);
            return Ok(());
        }
        // Inside the image: the cluster start was checked against the file
        // size; a file truncated inside the last cluster reads zeros there.
        let avail = self
            .file_size
            .saturating_sub(host_offset)
            .min(out.len() as u64) as usize;
        let (head, tail) = out.split_at_mut(avail);
        read_exact_at(&**store, head, host_offset, "data cluster")?;
        tail.fill(0);
        Ok(())
    }
}

/// Host offset and byte length of a compressed cluster descriptor for
/// clusters of `1 << cluster_bits` bytes (spec: "Compressed Clusters
/// Descriptor"): bits 0..x-1 the host offset, bits x..61 the number of
/// additional 512-byte sectors, x = 62 - (cluster_bits - 8).
pub(crate) fn compressed_descriptor(cluster_bits: u32, entry: u64) -> (u64, u64) {
    let x = 62 - (cluster_bits - 8);
    let host_offset = entry & ((1u64 << x) - 1);
    let sectors = ((entry >> x) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
    (host_offset, sectors * 512 - (host_offset & 511))
}
