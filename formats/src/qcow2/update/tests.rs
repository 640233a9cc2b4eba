//! Unit tests of the updater on images in memory: blank images built here
//! field by field (every refcount width, version 2 and 3, extended L2, a
//! backing file name), compressed images from the writer. After every flush
//! the image must pass `check` with no corruption and no leak and read back
//! as the model says; a flush recorded write by write is replayed to every
//! barrier (with random subsets of the writes after it) and must leave no
//! corruption and each guest cluster old or new.

use std::sync::Arc;

use super::*;
use crate::qcow2::check::check;
use crate::qcow2::header::{
    INCOMPAT_CORRUPT, INCOMPAT_DATA_FILE, INCOMPAT_DIRTY, INCOMPAT_EXTL2, MAGIC,
};
use crate::qcow2::test_bytes::*;
use crate::qcow2::{CompressionType, OpenOptions, Qcow2};
use crate::ErrorKind;

/// xorshift64*: reproducible test randomness without a dependency.
pub(super) struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What [`blank`] builds.
#[derive(Clone, Copy, Debug)]
pub(super) struct Blank {
    pub version: u32,
    pub cluster_bits: u32,
    pub refcount_order: u32,
    pub ext_l2: bool,
    pub size: u64,
    pub backing: bool,
}

impl Default for Blank {
    fn default() -> Blank {
        Blank {
            version: 3,
            cluster_bits: 16,
            refcount_order: 4,
            ext_l2: false,
            size: 16 << 20,
            backing: false,
        }
    }
}

const BACKING_NAME: &[u8] = b"base.img";

/// An empty image: header (cluster 0), refcount table (1), one refcount
/// block (2), the L1 table (3..), every one of them with refcount 1; no L2
/// tables. The smallest reftable and one block, so updates must grow them.
pub(super) fn blank(s: Blank) -> Vec<u8> {
    let cs = 1u64 << s.cluster_bits;
    let coverage = (cs / if s.ext_l2 { 16 } else { 8 }) * cs;
    let l1_entries = s.size.div_ceil(coverage);
    let l1_clusters = (l1_entries * 8).div_ceil(cs).max(1);
    let clusters = 3 + l1_clusters;
    let mut b = vec![0u8; (clusters * cs) as usize];
    put32(&mut b, 0, MAGIC); // magic
    put32(&mut b, 4, s.version); // version
    put32(&mut b, H_CLUSTER_BITS, s.cluster_bits); // cluster_bits
    put64(&mut b, H_SIZE, s.size); // virtual size
    put32(&mut b, H_CRYPT_METHOD, 0); // no encryption
    put32(&mut b, H_L1_SIZE, l1_entries as u32); // l1_size
    put64(&mut b, H_L1_TABLE_OFFSET, 3 * cs); // l1_table_offset
    put64(&mut b, H_REFCOUNT_TABLE_OFFSET, cs); // refcount_table_offset
    put32(&mut b, H_REFCOUNT_TABLE_CLUSTERS, 1); // refcount_table_clusters
                                                 // Extensions start after the header: 72 bytes (v2) or 112 (v3 with
                                                 // compression_type padded); an end marker (8 zero bytes) is there.
    let ext_start = if s.version >= 3 {
        let incompat = if s.ext_l2 { INCOMPAT_EXTL2 } else { 0 };
        put64(&mut b, H_INCOMPATIBLE_FEATURES, incompat); // incompatible_features
        put32(&mut b, H_REFCOUNT_ORDER, s.refcount_order); // refcount_order
        put32(&mut b, H_HEADER_LENGTH, 112); // header_length
        112
    } else {
        assert_eq!(s.refcount_order, 4, "version 2 has 16-bit refcounts");
        72
    };
    if s.backing {
        // The backing file name follows the end marker.
        let at = ext_start + 8;
        put64(&mut b, H_BACKING_FILE_OFFSET, at);
        put32(&mut b, H_BACKING_FILE_SIZE, BACKING_NAME.len() as u32);
        b[at as usize..at as usize + BACKING_NAME.len()].copy_from_slice(BACKING_NAME);
    }
    // Refcount table entry 0: the block at cluster 2.
    put64(&mut b, cs, 2 * cs);
    for c in 0..clusters {
        rc_put(
            &mut b[(2 * cs) as usize..(3 * cs) as usize],
            c,
            s.refcount_order,
            1,
        );
    }
    b
}

/// What a backing file holds in the tests (never zero).
pub(super) fn backing_byte(pos: u64) -> u8 {
    ((pos / 512) % 251) as u8 | 1
}

/// Guest content of `bytes` through our reader; unallocated ranges read the
/// test backing pattern when the image names a backing file.
pub(super) fn guest(bytes: &[u8]) -> Vec<u8> {
    let q = Qcow2::open(Arc::new(bytes.to_vec())).unwrap();
    let backing = q.header().backing_file.is_some();
    let mut out = vec![0u8; q.virtual_size() as usize];
    q.read_at(&mut out, 0, &mut |buf: &mut [u8], pos: u64| {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = if backing {
                backing_byte(pos + i as u64)
            } else {
                0
            };
        }
        Ok(())
    })
    .unwrap();
    out
}

/// `check` finds no corruption (and no leak unless allowed).
#[track_caller]
pub(super) fn assert_consistent(bytes: &[u8], allow_leaks: bool) {
    let q = Qcow2::open_with(
        Arc::new(bytes.to_vec()),
        OpenOptions {
            allow_corrupt: true,
        },
    )
    .unwrap();
    let r = check(&q).unwrap();
    assert!(
        r.corruption_count() == 0 && (allow_leaks || r.leak_count() == 0),
        "corruptions {:#?} leaks {:#?}",
        r.corruptions,
        r.leaks
    );
}

/// One thing an [`UpdateFile`] was asked to do.
#[derive(Clone, Debug)]
pub(super) enum Ev {
    Write(u64, Vec<u8>),
    Punch(u64, u64),
    Barrier,
}

/// A Vec-backed file that records every write, punch and barrier.
pub(super) struct Recorder {
    pub file: Vec<u8>,
    pub log: Vec<Ev>,
}

impl UpdateFile for Recorder {
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.len() as u64)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.log.push(Ev::Write(offset, buf.to_vec()));
        self.file.write_all_at(buf, offset)
    }
    fn punch(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.log.push(Ev::Punch(offset, len));
        self.file.punch(offset, len)
    }
    fn barrier(&mut self) -> io::Result<()> {
        self.log.push(Ev::Barrier);
        Ok(())
    }
}

pub(super) fn barriers(log: &[Ev]) -> usize {
    log.iter().filter(|e| matches!(e, Ev::Barrier)).count()
}

/// The file after a crash just after barrier `n` (0: before the first
/// one): everything before it applied, and of the events after it (up to
/// the next barrier) the ones `keep` picks, in any case never past it.
pub(super) fn crash_image(
    base: &[u8],
    log: &[Ev],
    n: usize,
    keep: &mut dyn FnMut() -> bool,
) -> Vec<u8> {
    let mut f = base.to_vec();
    let mut seen = 0;
    for e in log {
        let durable = seen < n;
        if matches!(e, Ev::Barrier) {
            seen += 1;
            if seen > n + 1 {
                break;
            }
            continue;
        }
        if seen > n || (!durable && !keep()) {
            continue;
        }
        match e {
            Ev::Write(off, data) => f.write_all_at(data, *off).unwrap(),
            Ev::Punch(off, len) => f.punch(*off, *len).unwrap(),
            Ev::Barrier => {}
        }
    }
    f
}

/// Replays `log` over `base` at every barrier with three subsets of the
/// writes that follow it; each image must have no corruption and read, per
/// guest cluster, either `before` or `after`. Returns the barrier count.
#[track_caller]
pub(super) fn assert_crash_safe(
    base: &[u8],
    log: &[Ev],
    before: &[u8],
    after: &[u8],
    cs: u64,
    rng: &mut Rng,
) -> usize {
    let n = barriers(log);
    for at in 0..=n {
        for variant in 0..3 {
            let img = match variant {
                0 => crash_image(base, log, at, &mut || false),
                1 => crash_image(base, log, at, &mut || true),
                _ => {
                    let seed = rng.next();
                    let mut r = Rng(seed | 1);
                    crash_image(base, log, at, &mut || r.next() & 1 == 0)
                }
            };
            assert_consistent(&img, true);
            let g = guest(&img);
            let size = g.len().min(before.len()).min(after.len());
            for start in (0..size).step_by(cs as usize) {
                let end = (start + cs as usize).min(size);
                assert!(
                    g[start..end] == before[start..end] || g[start..end] == after[start..end],
                    "crash after barrier {at} (variant {variant}): guest cluster at {start:#x} is neither old nor new"
                );
            }
        }
    }
    n
}

/// A cluster of recognisable content.
pub(super) fn pattern(cs: u64, seed: u64) -> Vec<u8> {
    let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut v = vec![0u8; cs as usize];
    for chunk in v.chunks_mut(8) {
        let x = r.next().to_le_bytes();
        chunk.copy_from_slice(&x[..chunk.len()]);
    }
    v
}

/// The model: guest bytes, with the backing pattern where nothing is set.
pub(super) fn model_zero(model: &mut [u8], start: u64, len: u64) {
    let end = (start + len).min(model.len() as u64);
    for b in &mut model[start as usize..end as usize] {
        *b = 0;
    }
}

pub(super) fn model_write(model: &mut [u8], start: u64, data: &[u8]) {
    let end = (start as usize + data.len()).min(model.len());
    let n = end.saturating_sub(start as usize);
    model[start as usize..end].copy_from_slice(&data[..n]);
}

/// Stages `ops` random cluster operations (writes of 1-3 clusters, zeros of
/// 1-8 clusters, rewrites of zeros) on `u` and the model.
pub(super) fn random_ops(u: &mut Updater, model: &mut [u8], rng: &mut Rng, ops: usize) {
    let cs = u.cluster_size();
    let clusters = u.header().size.div_ceil(cs);
    for _ in 0..ops {
        let c = rng.below(clusters);
        match rng.below(10) {
            0..=5 => {
                let n = (1 + rng.below(3)).min(clusters - c);
                let mut data = Vec::new();
                for k in 0..n {
                    data.extend(pattern(cs, rng.next() ^ k));
                }
                u.write(c * cs, &data).unwrap();
                model_write(model, c * cs, &data);
            }
            6..=8 => {
                let n = (1 + rng.below(8)).min(clusters - c);
                u.zero(c * cs, n * cs).unwrap();
                model_zero(model, c * cs, n * cs);
            }
            _ => {
                // Zeros passed as data.
                u.write(c * cs, &vec![0u8; cs as usize]).unwrap();
                model_zero(model, c * cs, cs);
            }
        }
    }
}

// ---- behaviour ----

#[test]
fn writes_into_an_empty_image_allocate_tables_and_data() {
    let mut f = blank(Blank::default());
    let mut model = guest(&f);
    let mut u = Updater::open(&f).unwrap();
    let cs = u.cluster_size();
    for (i, c) in [0u64, 1, 2, 40, 200, 255].into_iter().enumerate() {
        let d = pattern(cs, i as u64);
        u.write(c * cs, &d).unwrap();
        model_write(&mut model, c * cs, &d);
    }
    assert_eq!(u.staged_bytes(), 6 * cs);
    u.flush(&mut f).unwrap();
    assert_eq!(u.staged_bytes(), 0);
    assert_consistent(&f, false);
    assert_eq!(guest(&f), model);
    // Six data clusters and one L2 table (16 MiB fit in one).
    let s = u.stats();
    assert_eq!(s.clusters_allocated, 7);
    assert_eq!(s.clusters_freed, 0);
    assert!(s.metadata_bytes_written > 0);
}

#[test]
fn rewriting_plain_clusters_is_in_place_with_no_metadata_write() {
    let mut f = blank(Blank::default());
    let mut u = Updater::open(&f).unwrap();
    let cs = u.cluster_size();
    u.write(0, &pattern(cs * 3, 1)).unwrap();
    u.flush(&mut f).unwrap();
    let len = f.len();
    let before = u.stats();
    let d = pattern(cs, 9);
    u.write(cs, &d).unwrap();
    u.flush(&mut f).unwrap();
    let after = u.stats();
    assert_eq!(f.len(), len, "an in-place rewrite does not grow the file");
    assert_eq!(after.clusters_allocated, before.clusters_allocated);
    assert_eq!(after.metadata_bytes_written, before.metadata_bytes_written);
    assert_eq!(&guest(&f)[cs as usize..2 * cs as usize], &d[..]);
    assert_consistent(&f, false);
}

#[test]
fn zeros_without_backing_unallocate_and_punch() {
    let mut f = blank(Blank::default());
    let mut u = Updater::open(&f).unwrap();
    let cs = u.cluster_size();
    let data: Vec<u8> = (0..4).flat_map(|k| pattern(cs, k)).collect();
    u.write(8 * cs, &data).unwrap();
    u.flush(&mut f).unwrap();
    let l2 = get64(&f, u.header().l1_table_offset) & L1E_OFFSET_MASK;
    let host = get64(&f, l2 + 9 * 8) & L2E_OFFSET_MASK;
    assert_ne!(host, 0);
    u.zero(9 * cs, cs).unwrap();
    u.write(10 * cs, &vec![0u8; cs as usize]).unwrap();
    u.flush(&mut f).unwrap();
    assert_eq!(get64(&f, l2 + 9 * 8), 0, "entry unallocated");
    assert_eq!(get64(&f, l2 + 10 * 8), 0, "entry unallocated");
    assert!(
        f[host as usize..(host + cs) as usize]
            .iter()
            .all(|&b| b == 0),
        "punched"
    );
    assert_eq!(u.stats().clusters_freed, 2);
    assert_consistent(&f, false);
    let g = guest(&f);
    assert!(g[9 * cs as usize..11 * cs as usize].iter().all(|&b| b == 0));
    assert_eq!(&g[8 * cs as usize..9 * cs as usize], &pattern(cs, 0)[..]);
    // The freed clusters are reused before the file grows.
    let len = f.len();
    u.write(100 * cs, &pattern(cs, 5)).unwrap();
    u.write(101 * cs, &pattern(cs, 6)).unwrap();
    u.flush(&mut f).unwrap();
    assert_eq!(f.len(), len);
    assert_consistent(&f, false);
}

#[test]
fn zeros_over_a_backing_file_use_the_zero_flag() {
    let mut f = blank(Blank {
        backing: true,
        ..Blank::default()
    });
    let mut u = Updater::open(&f).unwrap();
    let cs = u.cluster_size();
    u.write(0, &pattern(cs, 1)).unwrap();
    u.zero(cs, 2 * cs).unwrap();
    u.flush(&mut f).unwrap();
    let l2 = get64(&f, u.header().l1_table_offset) & L1E_OFFSET_MASK;
    assert_eq!(get64(&f, l2 + 8), OFLAG_ZERO);
    assert_eq!(get64(&f, l2 + 16), OFLAG_ZERO);
    assert_eq!(get64(&f, l2 + 24), 0, "untouched: the backing file shows");
    // Data zeroed over a backing file: the cluster is freed, the flag set.
    u.zero(0, cs).unwrap();
    u.flush(&mut f).unwrap();
    assert_eq!(get64(&f, l2), OFLAG_ZERO);
    assert_consistent(&f, false);
    let g = guest(&f);
    assert!(g[..3 * cs as usize].iter().all(|&b| b == 0));
    assert_eq!(g[3 * cs as usize], backing_byte(3 * cs));
}

#[test]
fn zeros_over_a_backing_file_in_extended_l2_set_every_zero_bit() {
    let mut f = blank(Blank {
        backing: true,
        ext_l2: true,
        ..Blank::default()
    });
    let mut u = Updater::open(&f).unwrap();
    let cs = u.cluster_size();
    u.write(0, &pattern(cs, 1)).unwrap();
    u.zero(cs, cs).unwrap();
    u.flush(&mut f).unwrap();
    let l2 = get64(&f, u.header().l1_table_offset) & L1E_OFFSET_MASK;
    assert_eq!(
        get64(&f, l2 + 8),
        EXT_ALL_ALLOCATED,
        "written: all allocated"
    );
    assert_eq!(get64(&f, l2 + 16), 0);
    assert_eq!(get64(&f, l2 + 24), EXT_ALL_ZERO);
    assert_consistent(&f, false);
}

#[test]
fn zeros_over_a_backing_file_in_version_2_are_written() {
    let mut f = blank(Blank {
        version: 2,
        backing: true,
        ..Blank::default()
    });
    let mut u = Updater::open(&f).unwrap();
    let cs = u.cluster_size();
    u.zero(0, 2 * cs).unwrap();
    u.flush(&mut f).unwrap();
    let l2 = get64(&f, u.header().l1_table_offset) & L1E_OFFSET_MASK;
    let host = get64(&f, l2) & L2E_OFFSET_MASK;
    assert_ne!(host, 0, "a cluster of zeros");
    assert_consistent(&f, false);
    let g = guest(&f);
    assert!(g[..2 * cs as usize].iter().all(|&b| b == 0));
    assert_eq!(g[2 * cs as usize], backing_byte(2 * cs));
    // Zeros again: written in place.
    let len = f.len();
    u.zero(0, cs).unwrap();
    u.flush(&mut f).unwrap();
    assert_eq!(f.len(), len);
}

/// Every format variant, random operations in several flushes: check clean
/// and content equal to the model after each flush.
#[test]
fn random_updates_keep_every_variant_consistent() {
    let mut variants = Vec::new();
    for order in 0..=6 {
        variants.push(Blank {
            cluster_bits: 12,
            refcount_order: order,
            size: 4 << 20,
            ..Blank::default()
        });
    }
    for (version, backing) in [(2, false), (2, true), (3, true)] {
        variants.push(Blank {
            version,
            backing,
            cluster_bits: 12,
            size: 4 << 20,
            ..Blank::default()
        });
    }
    variants.push(Blank {
        cluster_bits: 9,
        size: 1 << 20,
        ..Blank::default()
    });
    variants.push(Blank {
        cluster_bits: 9,
        refcount_order: 6,
        size: 2 << 20,
        ..Blank::default()
    });
    variants.push(Blank {
        cluster_bits: 14,
        ext_l2: true,
        backing: true,
        size: 16 << 20,
        ..Blank::default()
    });
    variants.push(Blank {
        cluster_bits: 21,
        size: 24 << 20,
        ..Blank::default()
    });
    for (vi, v) in variants.into_iter().enumerate() {
        let mut rng = Rng(0x1234_5678 + vi as u64);
        let mut f = blank(v);
        let mut model = guest(&f);
        let mut u = Updater::open(&f).unwrap();
        let ops = if v.cluster_bits >= 20 { 12 } else { 150 };
        for round in 0..4 {
            random_ops(&mut u, &mut model, &mut rng, ops);
            u.flush(&mut f).unwrap();
            assert_consistent(&f, false);
            assert!(
                guest(&f) == model,
                "variant {v:?} round {round}: content differs"
            );
            let u2 = Updater::open(&f).unwrap();
            assert_eq!(
                u2.header().refcount_table_offset,
                u.header().refcount_table_offset
            );
        }
    }
}

#[test]
fn refcount_table_grows_when_a_block_has_no_slot() {
    // 512-byte clusters, 64-bit refcounts: a block covers 64 clusters
    // (32 KiB), the one-cluster table 64 blocks (2 MiB of file).
    let mut f = blank(Blank {
        cluster_bits: 9,
        refcount_order: 6,
        size: 4 << 20,
        ..Blank::default()
    });
    let old_rt = Updater::open(&f).unwrap().header().refcount_table_offset;
    let mut model = guest(&f);
    let mut u = Updater::open(&f).unwrap();
    let cs = u.cluster_size();
    let data: Vec<u8> = (0..(3 << 20) / cs).flat_map(|k| pattern(cs, k)).collect();
    u.write(0, &data).unwrap();
    model_write(&mut model, 0, &data);
    u.flush(&mut f).unwrap();
    assert_ne!(u.header().refcount_table_offset, old_rt);
    assert!(u.header().refcount_table_clusters > 1);
    assert_consistent(&f, false);
    assert!(guest(&f) == model);
    let reopened = Updater::open(&f).unwrap();
    assert_eq!(
        reopened.header().refcount_table_offset,
        u.header().refcount_table_offset
    );
}

#[test]
fn crash_at_every_barrier_leaves_no_corruption() {
    let mut rng = Rng(77);
    for v in [
        Blank {
            size: 4 << 20,
            ..Blank::default()
        },
        Blank {
            cluster_bits: 9,
            refcount_order: 6,
            size: 1 << 20,
            ..Blank::default()
        },
        Blank {
            backing: true,
            ext_l2: true,
            cluster_bits: 14,
            size: 4 << 20,
            ..Blank::default()
        },
        Blank {
            version: 2,
            backing: true,
            cluster_bits: 12,
            size: 2 << 20,
            ..Blank::default()
        },
        Blank {
            cluster_bits: 12,
            refcount_order: 0,
            size: 4 << 20,
            ..Blank::default()
        },
    ] {
        let mut f = blank(v);
        let mut model = guest(&f);
        let mut u = Updater::open(&f).unwrap();
        random_ops(&mut u, &mut model, &mut rng, 60);
        u.flush(&mut f).unwrap();
        for _ in 0..3 {
            let before = guest(&f);
            random_ops(&mut u, &mut model, &mut rng, 60);
            let mut rec = Recorder {
                file: f.clone(),
                log: Vec::new(),
            };
            u.flush(&mut rec).unwrap();
            assert!(guest(&rec.file) == model);
            let n = assert_crash_safe(&f, &rec.log, &before, &model, u.cluster_size(), &mut rng);
            assert!(n >= 2, "{v:?}: {n} barriers");
            f = rec.file;
        }
    }
}

#[test]
fn crash_while_the_refcount_table_grows_leaves_no_corruption() {
    let mut rng = Rng(99);
    let mut f = blank(Blank {
        cluster_bits: 9,
        refcount_order: 6,
        size: 4 << 20,
        ..Blank::default()
    });
    let before = guest(&f);
    let mut model = before.clone();
    let mut u = Updater::open(&f).unwrap();
    let cs = u.cluster_size();
    let data: Vec<u8> = (0..(3 << 20) / cs).flat_map(|k| pattern(cs, k)).collect();
    u.write(0, &data).unwrap();
    model_write(&mut model, 0, &data);
    let mut rec = Recorder {
        file: f.clone(),
        log: Vec::new(),
    };
    u.flush(&mut rec).unwrap();
    let n = assert_crash_safe(&f, &rec.log, &before, &model, cs, &mut rng);
    assert!(
        n >= 4,
        "refcount blocks, table switch, data, L1: {n} barriers"
    );
    f = rec.file;
    assert_consistent(&f, false);
}

#[test]
fn resize_grows_the_l1_table_and_shrinks_freeing_clusters() {
    // 512-byte clusters: one L2 table maps 32 KiB.
    let mut f = blank(Blank {
        cluster_bits: 9,
        size: 64 << 10,
        ..Blank::default()
    });
    let mut rng = Rng(5);
    let mut model = guest(&f);
    let mut u = Updater::open(&f).unwrap();
    let cs = u.cluster_size();
    random_ops(&mut u, &mut model, &mut rng, 100);
    u.flush(&mut f).unwrap();
    let old_l1 = u.header().l1_table_offset;
    // Up, past the L1 table's coverage (one cluster maps 2 MiB).
    let new_size = 5 << 20;
    let mut rec = Recorder {
        file: f.clone(),
        log: Vec::new(),
    };
    let before = guest(&f);
    u.resize(&mut rec, new_size).unwrap();
    model.resize(new_size as usize, 0);
    assert_ne!(u.header().l1_table_offset, old_l1);
    assert_eq!(u.header().size, new_size);
    assert!(u.header().l1_size as u64 >= new_size.div_ceil(32 << 10));
    assert_crash_safe(&f, &rec.log, &before, &model, cs, &mut rng);
    f = rec.file;
    assert_consistent(&f, false);
    assert!(guest(&f) == model);
    random_ops(&mut u, &mut model, &mut rng, 300);
    u.flush(&mut f).unwrap();
    assert_consistent(&f, false);
    assert!(guest(&f) == model);
    // Down, to an unaligned size inside an L2 table's range.
    let small = 40_000;
    let freed = u.stats().clusters_freed;
    let before = guest(&f);
    let mut rec = Recorder {
        file: f.clone(),
        log: Vec::new(),
    };
    u.resize(&mut rec, small).unwrap();
    // Clusters past the new size are dropped before the header shrinks.
    let kept = (small.div_ceil(cs) * cs) as usize;
    let mut after = before.clone();
    after[kept..].fill(0);
    assert_crash_safe(&f, &rec.log, &before, &after, cs, &mut rng);
    f = rec.file;
    assert!(u.stats().clusters_freed > freed);
    assert_eq!(u.header().size, small);
    assert_consistent(&f, false);
    assert!(guest(&f)[..] == model[..small as usize]);
    // And up again within the L1 table: reads what the model says below the
    // old size's cluster end, zeros past it.
    u.resize(&mut f, 1 << 20).unwrap();
    assert_consistent(&f, false);
    let g = guest(&f);
    assert!(g[..small as usize] == model[..small as usize]);
    assert!(g[kept..].iter().all(|&b| b == 0));
}

#[test]
fn compressed_clusters_are_replaced_and_their_host_clusters_freed() {
    use crate::qcow2::compress::ClusterCompressor;
    use crate::qcow2::writer::{ClusterData, Qcow2Writer, WriterOptions};
    let cluster_bits = 12;
    let cs = 1u64 << cluster_bits;
    let opts = WriterOptions {
        virtual_size: 64 * cs,
        cluster_bits,
        compression_type: CompressionType::Zlib,
    };
    let out = std::sync::Mutex::new(Vec::new());
    let mut w = Qcow2Writer::new(&out, opts).unwrap();
    let mut comp = ClusterCompressor::new(CompressionType::Zlib).unwrap();
    for c in 0..40u64 {
        let text: Vec<u8> = (0..cs)
            .map(|i| b"compressible "[(i % 13) as usize] ^ c as u8)
            .collect();
        let mut packed = Vec::new();
        assert!(comp.compress(&text, &mut packed).unwrap());
        w.write_cluster(c, ClusterData::Compressed(&packed))
            .unwrap();
    }
    w.finish().unwrap();
    let mut f = out.into_inner().unwrap();
    assert_consistent(&f, false);
    let mut model = guest(&f);
    let mut rng = Rng(3);
    let mut u = Updater::open(&f).unwrap();
    for c in (0..40).step_by(3) {
        let d = pattern(cs, c);
        u.write(c * cs, &d).unwrap();
        model_write(&mut model, c * cs, &d);
    }
    // Every other compressed cluster zeroed: no compressed data is left, so
    // every host cluster that held some is freed.
    for c in (0..40).filter(|c| c % 3 != 0) {
        u.zero(c * cs, cs).unwrap();
        model_zero(&mut model, c * cs, cs);
    }
    let before = guest(&f);
    let mut rec = Recorder {
        file: f.clone(),
        log: Vec::new(),
    };
    u.flush(&mut rec).unwrap();
    assert_crash_safe(&f, &rec.log, &before, &model, cs, &mut rng);
    f = rec.file;
    assert_consistent(&f, false);
    assert!(guest(&f) == model);
    assert!(
        u.stats().clusters_freed > 0,
        "host clusters of compressed data freed"
    );
}

#[test]
fn staged_ranges_outside_the_image_are_rejected() {
    let f = blank(Blank {
        size: 1 << 20,
        ..Blank::default()
    });
    let mut u = Updater::open(&f).unwrap();
    let cs = u.cluster_size();
    assert!(u.write(1, &vec![1u8; cs as usize]).is_err());
    assert!(u.write(0, &[1u8; 100]).is_err());
    assert!(u.write(1 << 20, &vec![1u8; cs as usize]).is_err());
    assert!(u.zero(0, (1 << 20) + cs).is_err());
    assert!(u.zero(u64::MAX - cs + 1, cs).is_err());
    u.zero(0, 1 << 20).unwrap();
}

#[test]
fn bitmaps_are_not_in_use_without_the_extension() {
    let mut f = blank(Blank::default());
    let mut u = Updater::open(&f).unwrap();
    assert!(!u.bitmaps_in_use());
    let before = f.clone();
    u.invalidate_bitmaps(&mut f).unwrap();
    assert_eq!(f, before);
}

// ---- refusals ----

#[track_caller]
fn refused(f: &[u8], kind: ErrorKind, needle: &str) {
    let e = match Updater::open(&f.to_vec()) {
        Ok(_) => panic!("opened an image that must be refused ({needle})"),
        Err(e) => e,
    };
    assert_eq!(e.kind(), kind, "{e}");
    assert!(e.to_string().contains(needle), "{e:?} lacks {needle:?}");
}

#[test]
fn dirty_image_is_refused() {
    let mut f = blank(Blank::default());
    put64(&mut f, H_INCOMPATIBLE_FEATURES, INCOMPAT_DIRTY);
    refused(&f, ErrorKind::Invalid, "dirty bit");
}

#[test]
fn corrupt_image_is_refused() {
    let mut f = blank(Blank::default());
    put64(&mut f, H_INCOMPATIBLE_FEATURES, INCOMPAT_CORRUPT);
    refused(&f, ErrorKind::Invalid, "marked corrupt");
}

#[test]
fn external_data_file_is_refused() {
    let mut f = blank(Blank::default());
    put64(&mut f, H_INCOMPATIBLE_FEATURES, INCOMPAT_DATA_FILE);
    // The data file name extension (type 0x44415441, "DATA").
    put32(&mut f, 112, 0x4441_5441);
    put32(&mut f, 116, 4);
    f[120..124].copy_from_slice(b"d.rw");
    put64(&mut f, 128, 0);
    refused(&f, ErrorKind::Unsupported, "external data file");
}

#[test]
fn encrypted_image_is_refused() {
    let mut f = blank(Blank::default());
    put32(&mut f, H_CRYPT_METHOD, 1);
    refused(&f, ErrorKind::Unsupported, "encrypted");
}

#[test]
fn unknown_incompatible_feature_is_refused() {
    let mut f = blank(Blank::default());
    put64(&mut f, H_INCOMPATIBLE_FEATURES, 1 << 40);
    refused(&f, ErrorKind::Unsupported, "incompatible features");
}

#[test]
fn l1_table_past_eof_is_refused() {
    let mut f = blank(Blank::default());
    put64(&mut f, H_L1_TABLE_OFFSET, 1 << 30);
    refused(&f, ErrorKind::Invalid, "L1 table");
}

#[test]
fn l2_table_past_eof_fails_the_flush_and_leaves_the_file() {
    let mut f = blank(Blank::default());
    let l1 = get64(&f, H_L1_TABLE_OFFSET);
    put64(&mut f, l1, (1 << 30) | OFLAG_COPIED);
    let before = f.clone();
    let mut u = Updater::open(&f).unwrap();
    u.write(0, &pattern(u.cluster_size(), 1)).unwrap();
    let e = u.flush(&mut f).unwrap_err();
    assert!(e.to_string().contains("L2 table"), "{e}");
    assert_eq!(f, before, "nothing written");
    assert!(u.flush(&mut f).is_err(), "unusable after a failed flush");
}

#[test]
fn data_cluster_with_refcount_zero_fails_the_flush_and_leaves_the_file() {
    let mut f = blank(Blank::default());
    let mut u = Updater::open(&f).unwrap();
    let cs = u.cluster_size();
    u.write(0, &pattern(cs, 1)).unwrap();
    u.flush(&mut f).unwrap();
    // Point guest cluster 1 at a cluster past the ones in use (refcount 0).
    let l2 = get64(&f, u.header().l1_table_offset) & L1E_OFFSET_MASK;
    let host = get64(&f, l2) & L2E_OFFSET_MASK;
    f.resize(f.len() + 4 * cs as usize, 0);
    put64(&mut f, l2 + 8, (host + 2 * cs) | OFLAG_COPIED);
    let before = f.clone();
    let mut u = Updater::open(&f).unwrap();
    u.zero(cs, cs).unwrap();
    let e = u.flush(&mut f).unwrap_err();
    assert!(e.to_string().contains("refcount"), "{e}");
    assert_eq!(f, before);
}

/// Damaged images: random bytes flipped in a valid image with data, then
/// random updates. Errors are fine; panics are not.
#[test]
fn damaged_images_never_panic() {
    let mut base = blank(Blank {
        cluster_bits: 9,
        size: 256 << 10,
        ..Blank::default()
    });
    let mut model = guest(&base);
    let mut rng = Rng(31);
    let mut u = Updater::open(&base).unwrap();
    random_ops(&mut u, &mut model, &mut rng, 200);
    u.flush(&mut base).unwrap();
    for round in 0..400 {
        let mut f = base.clone();
        for _ in 0..1 + rng.below(8) {
            let at = rng.below(f.len() as u64) as usize;
            f[at] = rng.next() as u8;
        }
        if round % 7 == 0 {
            let at = rng.below(f.len() as u64);
            f.truncate(at as usize);
        }
        let Ok(mut u) = Updater::open(&f) else {
            continue;
        };
        let mut m = vec![0u8; u.header().size.min(1 << 20) as usize];
        if u.header().size > 1 << 20 {
            continue;
        }
        random_ops(&mut u, &mut m, &mut rng, 30);
        let _ = u.flush(&mut f);
        let _ = u.resize(&mut f, rng.below(1 << 20));
    }
}

/// Found by the fuzzer: a refcount block whose own refcount (and every
/// other) reads 0. The block must not be handed out as a free cluster (data
/// written over it made every cluster look used, and the next allocation
/// went 2 GiB out).
#[test]
fn refcount_block_with_refcount_zero_is_never_allocated() {
    let mut f = blank(Blank::default());
    let cs = 1u64 << 16;
    // The block (cluster 2) says every cluster is free.
    f[(2 * cs) as usize..(3 * cs) as usize].fill(0);
    let mut u = Updater::open(&f).unwrap();
    u.write(0, &pattern(cs, 1)).unwrap();
    u.write(cs, &pattern(cs, 2)).unwrap();
    u.flush(&mut f).unwrap();
    let l2 = get64(&f, u.header().l1_table_offset) & L1E_OFFSET_MASK;
    for (what, at) in [
        ("L2 table", l2),
        ("data", get64(&f, l2) & L2E_OFFSET_MASK),
        ("data", get64(&f, l2 + 8) & L2E_OFFSET_MASK),
    ] {
        assert!(
            at != 0 && at != 2 * cs,
            "{what} placed on the refcount block"
        );
        assert!(at < 16 * cs, "{what} at {at:#x}: far past the file");
    }
}
