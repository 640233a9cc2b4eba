//! The journal's on-disk format: its layout, the encoding and decoding of
//! the header, batch headers and entries, their checksums, and the sizes
//! that follow from them. Bytes in, values out: `reader.rs` reads the file
//! and decides what a bad batch means (a torn tail or corruption).
//!
//! # On-disk format (version 2, big-endian)
//!
//! ```text
//! header (100 bytes, at 0):
//!    0  magic       [u8; 8]  b"IMGSYNCJ"
//!    8  version     u32      2
//!   12  block_size  u32      power of two, 4 KiB..=16 MiB
//!   16  flags       u32      0 (any other bit: unsupported)
//!   20  old_size    u64      DST's size before the sync
//!   28  new_size    u64      DST's size after the sync
//!   36  sync_id     [u8; 32] chosen by the caller; resume compares it
//!   68  dst_kind    u32      1 = regular file, 2 = block device
//!   72  dst_dev     u64      file: st_dev; device: st_rdev
//!   80  dst_ino     u64      file: st_ino; device: sysfs fingerprint (0: none)
//!   88  dst_size    u64      device: its size (BLKGETSIZE64); file: 0
//!   96  crc         u32      crc32 of bytes 0..96
//! then batches, one per `Journal::sync`, back to back:
//!   batch header (24 bytes):
//!    0  tag         [u8; 4]  b"JBAT"
//!    4  seq         u64      batches before this one (0, 1, 2, …)
//!   12  bytes       u32      length of the entries that follow (≤ 32 MiB)
//!   16  entries     u32      number of entries that follow (≥ 1)
//!   20  crc         u32      crc32 of bytes 0..20
//!   entries (17 bytes + data):
//!    0  block       u64      block index (offset = block × block_size)
//!    8  kind        u8       1 = data, 2 = hole (punch back on rollback)
//!    9  len         u32      data length: min(block_size, old_size − offset)
//!                            for data, 0 for a hole
//!   13  crc         u32      crc32 of block, kind, len and the data
//!   17  data        [u8; len]
//! ```
//!
//! Every length read from the file is checked against the header's block
//! size, the old size and the file's length before anything is allocated.

use std::path::Path;

use super::{DstId, JournalError, JournalHeader};

/// The first bytes of every journal.
pub const MAGIC: [u8; 8] = *b"IMGSYNCJ";
/// The format version this code writes and reads.
pub const VERSION: u32 = 2;
/// Smallest block size: the page size, below which punching holes is moot.
pub const MIN_BLOCK_SIZE: u32 = 4 << 10;
/// Largest block size: bounds one entry's allocation on read.
pub const MAX_BLOCK_SIZE: u32 = 16 << 20;

pub(super) const HEADER_LEN: usize = 100;
/// Bytes of the header its crc covers.
const HEADER_CRC_AT: usize = HEADER_LEN - 4;
const DST_FILE: u32 = 1;
const DST_DEVICE: u32 = 2;
pub(super) const BATCH_HEADER_LEN: usize = 24;
pub(super) const ENTRY_HEADER_LEN: usize = 17;
const BATCH_TAG: [u8; 4] = *b"JBAT";
const KIND_DATA: u8 = 1;
pub(super) const KIND_HOLE: u8 = 2;
/// Largest batch: `record` syncs before a batch would grow past it, and a
/// reader allocates at most this much for one batch. Above one entry of the
/// largest block size (16 MiB + 17), so any entry fits in a batch.
pub(super) const MAX_BATCH_BYTES: usize = 32 << 20;

/// An upper bound of the journal's length for `entries` entries of
/// `block_size` bytes: the header, and each entry in a batch of its own.
pub fn space_needed(block_size: u32, entries: u64) -> u64 {
    let per_entry = (BATCH_HEADER_LEN + ENTRY_HEADER_LEN) as u64 + u64::from(block_size);
    (HEADER_LEN as u64).saturating_add(entries.saturating_mul(per_entry))
}

/// Length of `block` before the sync; `None` when it starts at or past
/// `old_size`.
pub(super) fn old_block_len(header: &JournalHeader, block: u64) -> Option<u64> {
    let offset = block.checked_mul(u64::from(header.block_size))?;
    let left = header.old_size.checked_sub(offset).filter(|&l| l > 0)?;
    Some(left.min(u64::from(header.block_size)))
}

pub(super) fn check_header(h: &JournalHeader) -> Result<(), String> {
    if !h.block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&h.block_size)
    {
        return Err(format!(
            "block size {} is not a power of two from 4 KiB to 16 MiB",
            h.block_size
        ));
    }
    // File offsets are signed.
    if h.old_size > i64::MAX as u64 || h.new_size > i64::MAX as u64 {
        return Err(format!(
            "image size {} is past the largest file offset",
            h.old_size.max(h.new_size)
        ));
    }
    Ok(())
}

pub(super) fn encode_header(h: &JournalHeader) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_be_bytes());
    b[12..16].copy_from_slice(&h.block_size.to_be_bytes());
    // 16..20: flags, none defined.
    b[20..28].copy_from_slice(&h.old_size.to_be_bytes());
    b[28..36].copy_from_slice(&h.new_size.to_be_bytes());
    b[36..68].copy_from_slice(&h.sync_id);
    let (kind, dev, ino, size) = match h.dst {
        DstId::File { dev, ino } => (DST_FILE, dev, ino, 0),
        // A device has no inode: its fingerprint takes that slot.
        DstId::Device { rdev, size, stable } => (DST_DEVICE, rdev, stable, size),
    };
    b[68..72].copy_from_slice(&kind.to_be_bytes());
    b[72..80].copy_from_slice(&dev.to_be_bytes());
    b[80..88].copy_from_slice(&ino.to_be_bytes());
    b[88..96].copy_from_slice(&size.to_be_bytes());
    let crc = crc32fast::hash(&b[..HEADER_CRC_AT]);
    b[HEADER_CRC_AT..].copy_from_slice(&crc.to_be_bytes());
    b
}

pub(super) fn decode_header(
    b: &[u8; HEADER_LEN],
    path: &Path,
) -> Result<JournalHeader, JournalError> {
    let corrupt = |what: String| JournalError::Corrupt {
        path: path.to_path_buf(),
        offset: 0,
        what,
    };
    if b.get(0..8) != Some(&MAGIC[..]) {
        return Err(JournalError::NotAJournal {
            path: path.to_path_buf(),
        });
    }
    check_version(b, path)?;
    let stored = be_u32(b, HEADER_CRC_AT).unwrap_or(0);
    let computed = crc32fast::hash(b.get(..HEADER_CRC_AT).unwrap_or(&[]));
    if stored != computed {
        return Err(corrupt(format!(
            "header checksum {stored:#010x} does not match its content ({computed:#010x})"
        )));
    }
    let flags = be_u32(b, 16).unwrap_or(0);
    if flags != 0 {
        return Err(corrupt(format!("unknown header flags {flags:#x}")));
    }
    let mut sync_id = [0u8; 32];
    sync_id.copy_from_slice(b.get(36..68).unwrap_or(&[0; 32]));
    let (dev, ino, size) = (
        be_u64(b, 72).unwrap_or(0),
        be_u64(b, 80).unwrap_or(0),
        be_u64(b, 88).unwrap_or(0),
    );
    let dst = match be_u32(b, 68).unwrap_or(0) {
        DST_FILE if size == 0 => DstId::File { dev, ino },
        DST_DEVICE => DstId::Device {
            rdev: dev,
            size,
            stable: ino,
        },
        kind => {
            return Err(corrupt(format!(
                "destination kind {kind} with inode {ino} and size {size}"
            )))
        }
    };
    let h = JournalHeader {
        block_size: be_u32(b, 12).unwrap_or(0),
        old_size: be_u64(b, 20).unwrap_or(0),
        new_size: be_u64(b, 28).unwrap_or(0),
        sync_id,
        dst,
    };
    check_header(&h).map_err(corrupt)?;
    Ok(h)
}

pub(super) fn check_version(b: &[u8], path: &Path) -> Result<(), JournalError> {
    match be_u32(b, 8).unwrap_or(0) {
        VERSION => Ok(()),
        1 => Err(JournalError::Unbound {
            path: path.to_path_buf(),
        }),
        version => Err(JournalError::Version {
            path: path.to_path_buf(),
            version,
        }),
    }
}

pub(super) fn encode_batch_header(seq: u64, bytes: u32, entries: u32) -> [u8; BATCH_HEADER_LEN] {
    let mut b = [0u8; BATCH_HEADER_LEN];
    b[0..4].copy_from_slice(&BATCH_TAG);
    b[4..12].copy_from_slice(&seq.to_be_bytes());
    b[12..16].copy_from_slice(&bytes.to_be_bytes());
    b[16..20].copy_from_slice(&entries.to_be_bytes());
    let crc = crc32fast::hash(&b[..20]);
    b[20..24].copy_from_slice(&crc.to_be_bytes());
    b
}

/// The header of batch `seq`'s entries, `bytes` long and `entries` many,
/// or `None` when `b` is not the header of batch `seq` (wrong tag,
/// checksum or sequence number). Sizes are the reader's to judge.
pub(super) fn decode_batch_header(b: &[u8; BATCH_HEADER_LEN], seq: u64) -> Option<(usize, u32)> {
    let valid = b.get(0..4) == Some(&BATCH_TAG[..])
        && be_u32(b, 20) == Some(crc32fast::hash(b.get(..20).unwrap_or(&[])))
        && be_u64(b, 4) == Some(seq);
    if !valid {
        return None;
    }
    Some((
        be_u32(b, 12).unwrap_or(0) as usize,
        be_u32(b, 16).unwrap_or(0),
    ))
}

/// The header of the entry for `block`: its old content `data` (at most a
/// block, which the caller checked), or `None` for a hole.
pub(super) fn encode_entry_head(block: u64, data: Option<&[u8]>) -> [u8; ENTRY_HEADER_LEN] {
    let (kind, data) = match data {
        Some(d) => (KIND_DATA, d),
        None => (KIND_HOLE, &[][..]),
    };
    let mut head = [0u8; ENTRY_HEADER_LEN];
    head[0..8].copy_from_slice(&block.to_be_bytes());
    head[8] = kind;
    // data.len() ≤ block_size, a u32.
    head[9..13].copy_from_slice(&(data.len() as u32).to_be_bytes());
    let crc = entry_crc(&head[..13], data);
    head[13..17].copy_from_slice(&crc.to_be_bytes());
    head
}

/// crc32 of an entry's block, kind and length (`head`) and its data.
pub(super) fn entry_crc(head: &[u8], data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(head);
    h.update(data);
    h.finalize()
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// One entry, borrowed from a batch's buffer.
pub(super) struct EntryRef<'a> {
    pub(super) block: u64,
    /// `None`: a hole.
    pub(super) data: Option<&'a [u8]>,
}

/// Parses the entry at `at` in a batch's entries. `Err` says why the bytes
/// are not an entry (torn, or corrupt when not in the last batch).
pub(super) fn parse_entry(
    body: &[u8],
    at: usize,
    block_size: u32,
) -> Result<(EntryRef<'_>, usize), &'static str> {
    let head = body
        .get(at..at + ENTRY_HEADER_LEN)
        .ok_or("entry header past the end of its batch")?;
    let block = be_u64(head, 0).ok_or("short entry header")?;
    let kind = *head.get(8).ok_or("short entry header")?;
    let len = be_u32(head, 9).ok_or("short entry header")?;
    let stored = be_u32(head, 13).ok_or("short entry header")?;
    if len > block_size {
        return Err("entry longer than a block");
    }
    let start = at + ENTRY_HEADER_LEN;
    let end = start + len as usize;
    let data = body
        .get(start..end)
        .ok_or("entry data past the end of its batch")?;
    if entry_crc(head.get(..13).unwrap_or(&[]), data) != stored {
        return Err("entry checksum mismatch");
    }
    let data = match kind {
        KIND_DATA => Some(data),
        KIND_HOLE => None,
        _ => return Err("unknown entry kind"),
    };
    Ok((EntryRef { block, data }, end))
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::*;
    use super::*;

    #[test]
    fn bad_block_sizes_are_refused_at_create() {
        let dir = tempfile::tempdir().unwrap();
        for bs in [0, 512, 3 << 12, 32 << 20] {
            let h = JournalHeader {
                block_size: bs,
                ..header(B, B)
            };
            let e = Journal::create(&dir.path().join("j"), h).err().unwrap();
            assert!(matches!(e, JournalError::Invalid { .. }), "{e}");
            assert!(!dir.path().join("j").exists());
        }
    }

    #[test]
    fn corrupt_header_is_refused_without_touching_dst() {
        let dir = tempfile::tempdir().unwrap();
        let (dst, old) = old_image(dir.path());
        let jpath = Journal::path_for(&dst);
        let mut j = Journal::create(&jpath, header_for(&dst, old.len() as u64, B)).unwrap();
        journal_blocks(&mut j, &old, &[0, 2, 3], 1);
        drop(j);
        let f = File::options().write(true).open(&dst).unwrap();
        f.set_len(B).unwrap();
        drop(f);
        let mut bytes = std::fs::read(&jpath).unwrap();
        bytes[25] ^= 0x40; // old_size
        std::fs::write(&jpath, &bytes).unwrap();

        let e = Journal::open(&jpath, &id_of(&dst)).err().unwrap();
        assert!(e.is_corrupt(), "{e}");
        assert!(
            e.to_string().starts_with(&format!(
                "{}: corrupt journal at 0x0: header checksum",
                jpath.display()
            )),
            "{e}"
        );
        let e = rollback(&dst, &jpath).unwrap_err();
        assert!(e.is_corrupt(), "{e}");
        assert_eq!(std::fs::metadata(&dst).unwrap().len(), B);
        assert!(jpath.exists());

        // Not a journal at all, and a future version.
        std::fs::write(
            &jpath,
            b"#!/bin/sh\necho hello, this is not a journal at all\n",
        )
        .unwrap();
        let e = Journal::open(&jpath, &id_of(&dst)).err().unwrap();
        assert!(matches!(e, JournalError::NotAJournal { .. }), "{e}");
        bytes[11] = 3;
        std::fs::write(&jpath, &bytes).unwrap();
        let e = rollback(&dst, &jpath).unwrap_err();
        assert!(matches!(e, JournalError::Version { version: 3, .. }), "{e}");
    }

    /// Version 1 recorded no destination: refused (not applied, not taken
    /// for an interrupted create and removed), even when only its 72-byte
    /// header was written.
    #[test]
    fn a_version_1_journal_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (dst, old) = old_image(dir.path());
        let jpath = Journal::path_for(&dst);
        let mut v1 = vec![0u8; 72];
        v1[..8].copy_from_slice(&MAGIC);
        v1[8..12].copy_from_slice(&1u32.to_be_bytes());
        v1[12..16].copy_from_slice(&BS.to_be_bytes());
        v1[20..28].copy_from_slice(&B.to_be_bytes());
        let crc = crc32fast::hash(&v1[..68]);
        v1[68..72].copy_from_slice(&crc.to_be_bytes());
        for len in [72, 72 + 24 + 17] {
            let mut bytes = v1.clone();
            bytes.resize(len, 0);
            std::fs::write(&jpath, &bytes).unwrap();
            let e = Journal::open(&jpath, &id_of(&dst)).err().unwrap();
            assert!(matches!(e, JournalError::Unbound { .. }), "{e}");
            assert!(e.to_string().contains("older imgsync"), "{e}");
            let e = rollback(&dst, &jpath).unwrap_err();
            assert!(matches!(e, JournalError::Unbound { .. }), "{e}");
            assert!(matches!(
                state(&jpath, &id_of(&dst)),
                JournalState::Refused(JournalError::Unbound { .. })
            ));
            assert_eq!(std::fs::read(&jpath).unwrap(), bytes);
        }
        assert_eq!(std::fs::read(&dst).unwrap(), old);
    }

    #[test]
    fn space_needed_bounds_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let size = 10 * B + 123;
        let old = pattern(1, size as usize);
        let jpath = dir.path().join("j");
        let mut j = Journal::create(&jpath, header(size, size)).unwrap();
        assert!(j.bytes() <= space_needed(BS, 0));
        // The worst case: a sync after every entry.
        let blocks: Vec<u64> = (0..11).collect();
        journal_blocks(&mut j, &old, &blocks, 1);
        let len = std::fs::metadata(&jpath).unwrap().len();
        assert_eq!(j.bytes(), len);
        assert!(len <= space_needed(BS, 11), "{len}");
        assert!(len > space_needed(BS, 10));
    }
}
