//! The in-place QCOW2 updater over arbitrary input. Byte 0 picks the mode,
//! byte 1 the number of 3-byte operations that follow (write 1-3
//! clusters, zero 1-16 clusters, flush, resize); the rest is:
//!
//! - mode 0: the image itself (any bytes; seeds are qemu-made images).
//!   Opening, staging, flushing and resizing may fail, never panic.
//! - mode 1: four parameters of a valid blank image built here (cluster
//!   size 512 B-64 KiB, refcount width 1-64, version 2 or 3, extended L2, a
//!   backing file name). After every flush `check` must find no corruption
//!   and no leak, and the guest content must equal a model.
#![no_main]

use std::sync::Arc;

use imgsync_formats::qcow2::check::check;
use imgsync_formats::qcow2::update::{UpdateFile, Updater};
use imgsync_formats::qcow2::Qcow2;
use libfuzzer_sys::fuzz_target;

/// Guest data staged per input at most (work and memory bound).
const MAX_DATA: u64 = 2 << 20;
/// Largest virtual size of a blank image or a resize in mode 1.
const MAX_VALID_SIZE: u64 = 2 << 20;
/// Intermediate flushes and resizes verified (check and read-back) per
/// input; the final state is always verified. Each verification reads the
/// whole guest, the fuzzer's main cost.
const MAX_VERIFIES: u32 = 2;
/// Largest resize of an image from the input.
const MAX_RESIZE: u64 = 64 << 20;

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// A valid empty image (header, refcount table, one refcount block, L1).
fn blank(cluster_bits: u32, order: u32, version: u32, ext_l2: bool, backing: bool, size: u64) -> Vec<u8> {
    let cs = 1u64 << cluster_bits;
    let coverage = (cs / if ext_l2 { 16 } else { 8 }) * cs;
    let l1_entries = size.div_ceil(coverage);
    let l1_clusters = (l1_entries * 8).div_ceil(cs).max(1);
    let clusters = 3 + l1_clusters;
    let mut b = vec![0u8; (clusters * cs) as usize];
    put32(&mut b, 0, 0x5146_49fb); // magic
    put32(&mut b, 4, version);
    put32(&mut b, 20, cluster_bits);
    put64(&mut b, 24, size);
    put32(&mut b, 36, l1_entries as u32);
    put64(&mut b, 40, 3 * cs); // L1 table
    put64(&mut b, 48, cs); // refcount table
    put32(&mut b, 56, 1);
    let ext_start = if version >= 3 {
        put64(&mut b, 72, if ext_l2 { 1 << 4 } else { 0 });
        put32(&mut b, 96, order);
        put32(&mut b, 100, 112);
        112
    } else {
        72
    };
    if backing {
        let at = ext_start + 8;
        put64(&mut b, 8, at as u64);
        put32(&mut b, 16, 4);
        b[at..at + 4].copy_from_slice(b"base");
    }
    put64(&mut b, cs as usize, 2 * cs); // refcount block
    let block = 2 * cs as usize;
    for c in 0..clusters {
        let bit = (c << order) as usize;
        match order {
            0..=2 => b[block + bit / 8] |= 1 << (bit % 8),
            _ => {
                let n = 1usize << (order - 3);
                let at = block + bit / 8 + n - 1;
                b[at] = 1;
            }
        }
    }
    b
}

/// An in-memory file that refuses to grow past `limit`: a damaged image
/// may rightly place new clusters gigabytes away (every cluster before
/// claims a refcount), which is no bug but would exhaust the fuzzer.
struct Bounded {
    file: Vec<u8>,
    limit: u64,
}

impl UpdateFile for Bounded {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.file.len() as u64)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if offset.saturating_add(buf.len() as u64) > self.limit {
            return Err(std::io::Error::other("past the fuzzer's file limit"));
        }
        self.file.write_all_at(buf, offset)
    }
    fn punch(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.file.punch(offset, len)
    }
    fn barrier(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn backing_byte(pos: u64) -> u8 {
    ((pos / 512) % 251) as u8 | 1
}

/// Fills `buf` (guest bytes from `pos`) with the backing pattern, a 512-byte
/// run at a time (memset, not a byte loop: the fuzzer instruments loops).
fn fill_backing(buf: &mut [u8], pos: u64) {
    let mut done = 0usize;
    while done < buf.len() {
        let at = pos + done as u64;
        let n = ((512 - at % 512) as usize).min(buf.len() - done);
        buf[done..done + n].fill(backing_byte(at));
        done += n;
    }
}

fn read_guest(f: &[u8]) -> Vec<u8> {
    let q = Qcow2::open(Arc::new(f.to_vec())).expect("updated image opens");
    let r = check(&q).expect("check runs");
    assert!(
        r.corruption_count() == 0 && r.leak_count() == 0,
        "corruptions {:?} leaks {:?}",
        r.corruptions,
        r.leaks
    );
    let backing = q.header().backing_file.is_some();
    let mut out = vec![0u8; q.virtual_size() as usize];
    q.read_at(&mut out, 0, &mut |buf: &mut [u8], pos: u64| {
        if backing {
            fill_backing(buf, pos);
        } else {
            buf.fill(0);
        }
        Ok(())
    })
    .expect("updated image reads");
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let Some((&n_ops, rest)) = rest.split_first() else { return };
    let ops_len = (usize::from(n_ops) * 3).min(rest.len());
    let (ops, rest) = rest.split_at(ops_len);
    let valid = mode & 1 == 1;

    let file: Vec<u8> = if valid {
        let p = |i: usize| u32::from(rest.get(i).copied().unwrap_or(0));
        let cluster_bits = 9 + p(0) % 8;
        let version = if p(3) & 1 != 0 { 2 } else { 3 };
        let order = if version == 2 { 4 } else { p(1) % 7 };
        let ext_l2 = version == 3 && p(3) & 2 != 0 && cluster_bits >= 14;
        let backing = p(3) & 4 != 0;
        let cs = 1u64 << cluster_bits;
        let clusters = (1 + u64::from(p(2)) * 2).min(MAX_VALID_SIZE / cs);
        blank(cluster_bits, order, version, ext_l2, backing, clusters * cs)
    } else {
        rest.to_vec()
    };
    let limit = (file.len() as u64).saturating_mul(4).max(64 << 20);
    let mut f = Bounded { file, limit };
    let Ok(mut u) = Updater::open(&f) else {
        assert!(!valid, "a blank image must open");
        return;
    };
    let cs = u.cluster_size();
    let backing = u.header().backing_file.is_some();
    let mut model = if valid { read_guest(&f.file) } else { Vec::new() };
    let mut data_left = MAX_DATA;
    let mut fill = vec![0u8; cs as usize];
    let mut verifies = 0;

    for op in ops.chunks_exact(3) {
        let (k, idx) = (op[0], u64::from(u16::from_be_bytes([op[1], op[2]])));
        let size = u.header().size;
        let clusters = size.div_ceil(cs);
        let at = if clusters == 0 { 0 } else { idx % clusters };
        match k % 8 {
            0..=3 => {
                let n = (1 + u64::from(k >> 3) % 3).min(clusters - at);
                if n * cs > data_left {
                    continue;
                }
                data_left -= n * cs;
                let mut buf = Vec::with_capacity((n * cs) as usize);
                for j in 0..n {
                    let seed = u64::from(k) ^ (at + j) << 8;
                    for (i, run) in fill.chunks_mut(64).enumerate() {
                        run.fill(if k >> 6 == 3 { 0 } else { (seed as u8).wrapping_add(i as u8) | 1 });
                    }
                    buf.extend_from_slice(&fill);
                }
                if u.write(at * cs, &buf).is_ok() && valid {
                    let end = ((at + n) * cs).min(size) as usize;
                    let s = (at * cs) as usize;
                    model[s..end].copy_from_slice(&buf[..end - s]);
                }
            }
            4 | 5 => {
                let n = (1 + u64::from(k >> 3) % 16).min(clusters - at);
                if u.zero(at * cs, n * cs).is_ok() && valid {
                    let end = ((at + n) * cs).min(size) as usize;
                    model[(at * cs) as usize..end].fill(0);
                }
            }
            6 => {
                let r = u.flush(&mut f);
                if valid {
                    r.expect("flush of a valid image");
                    if verifies < MAX_VERIFIES {
                        verifies += 1;
                        assert!(read_guest(&f.file) == model, "content differs after flush");
                    }
                } else if r.is_err() {
                    return;
                }
            }
            _ => {
                // Cluster-aligned sizes: bytes past an unaligned end inside
                // its last cluster are the caller's (see Updater::resize).
                let max = if valid { MAX_VALID_SIZE } else { MAX_RESIZE };
                let new_size = (idx * cs).min(max / cs * cs);
                let r = u.resize(&mut f, new_size);
                if valid {
                    r.expect("resize of a valid image");
                    let old = model.len();
                    model.resize(new_size as usize, 0);
                    if backing && new_size as usize > old {
                        fill_backing(&mut model[old..], old as u64);
                    }
                    if verifies < MAX_VERIFIES {
                        verifies += 1;
                        assert!(read_guest(&f.file) == model, "content differs after resize");
                    }
                } else if r.is_err() {
                    return;
                }
            }
        }
    }
    let r = u.flush(&mut f);
    if valid {
        r.expect("final flush of a valid image");
        assert!(read_guest(&f.file) == model, "content differs at the end");
    }
});
