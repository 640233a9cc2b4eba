//! Helpers shared by the journal's unit tests: headers, identities, test
//! images and journals filled as a sync would fill them.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use imgsync_formats::Storage;

use super::{DstId, Journal, JournalHeader};
use crate::io::LocalFile;

pub(super) const BS: u32 = 64 << 10;
pub(super) const B: u64 = BS as u64;

/// The identity of journals not applied to a real file.
pub(super) const FAKE: DstId = DstId::File { dev: 1, ino: 2 };

pub(super) fn header(old_size: u64, new_size: u64) -> JournalHeader {
    JournalHeader {
        block_size: BS,
        old_size,
        new_size,
        sync_id: [7; 32],
        dst: FAKE,
    }
}

pub(super) fn id_of(path: &Path) -> DstId {
    DstId::of(&File::open(path).unwrap()).unwrap()
}

/// A journal header for the image at `dst`.
pub(super) fn header_for(dst: &Path, old_size: u64, new_size: u64) -> JournalHeader {
    JournalHeader {
        dst: id_of(dst),
        ..header(old_size, new_size)
    }
}

pub(super) fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

/// Whether the filesystem under `dir` reports holes through SEEK_DATA.
pub(super) fn has_holes(dir: &Path) -> bool {
    let p = dir.join("probe");
    let f = File::create(&p).unwrap();
    f.set_len(4 << 20).unwrap();
    f.write_all_at(b"x", 2 << 20).unwrap();
    let lf = LocalFile::open(&p).unwrap();
    let first = lf.next_data(0).unwrap();
    std::fs::remove_file(&p).unwrap();
    matches!(first, Some((s, _)) if s > 0)
}

pub(super) fn is_hole(path: &Path, offset: u64, len: u64) -> bool {
    let lf = LocalFile::open(path).unwrap();
    match lf.next_data(offset).unwrap() {
        None => true,
        Some((s, _)) => s >= offset + len,
    }
}

/// An old image of 3.5 blocks: data, hole, data, short data.
pub(super) fn old_image(dir: &Path) -> (PathBuf, Vec<u8>) {
    let path = dir.join("dst.img");
    let size = 3 * B + B / 2;
    let f = File::create(&path).unwrap();
    f.set_len(size).unwrap();
    let mut content = vec![0u8; size as usize];
    for (block, len) in [(0u64, B), (2, B), (3, B / 2)] {
        let data = pattern(block as u8, len as usize);
        f.write_all_at(&data, block * B).unwrap();
        content[(block * B) as usize..(block * B + len) as usize].copy_from_slice(&data);
    }
    (path, content)
}

/// Journals blocks of `old` (holes where it is all zeros), as a sync
/// would, one batch per `per_sync` blocks.
pub(super) fn journal_blocks(j: &mut Journal, old: &[u8], blocks: &[u64], per_sync: usize) {
    for chunk in blocks.chunks(per_sync) {
        for &b in chunk {
            let start = (b * B) as usize;
            let end = (start + BS as usize).min(old.len());
            let data = &old[start..end];
            if data.iter().all(|&x| x == 0) {
                j.record(b, None).unwrap();
            } else {
                j.record(b, Some(data)).unwrap();
            }
        }
        j.sync().unwrap();
    }
}

pub(super) fn journaled(j: &Journal) -> Vec<u64> {
    j.journaled.iter().copied().collect()
}
