//! Reading a journal back, for a resume, a rollback and [`super::state`]:
//! the header (and what an interrupted create leaves instead), each batch
//! checked whole before any of it is used, and the scan that collects the
//! journaled blocks and finds where the valid batches end.
//!
//! # Torn writes
//!
//! A crash during `sync` can leave the last batch partly written (zeros or
//! a prefix). None of its blocks were overwritten yet (DST is written only
//! after `sync` returns), so it is dropped: an incomplete or invalid batch
//! header, a batch reaching past the end of the file, or a bad entry in the
//! batch that ends the file marks the torn tail. A bad entry in any earlier
//! batch was fsynced, so it is corruption and an error. (Limitation: damage
//! to a batch *header* in the middle, or to the last batch, looks like a
//! torn tail.) A crash during create can leave a journal shorter than its
//! header or with an all-zero header and nothing after: DST was never
//! touched, so such a journal counts as no journal and is removed.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::format::{
    check_version, decode_batch_header, decode_header, old_block_len, parse_entry, EntryRef,
    BATCH_HEADER_LEN, ENTRY_HEADER_LEN, HEADER_LEN, MAGIC, MAX_BATCH_BYTES,
};
use super::{io_err, JournalError, JournalHeader};

/// The header, or `None` when the file is what an interrupted create
/// leaves: shorter than a header, or an all-zero header and nothing more.
pub(super) fn read_header(
    file: &File,
    path: &Path,
    len: u64,
) -> Result<Option<JournalHeader>, JournalError> {
    let mut b = [0u8; HEADER_LEN];
    let have = len.min(HEADER_LEN as u64) as usize;
    file.read_exact_at(&mut b[..have], 0)
        .map_err(io_err(path, "reading the journal header"))?;
    let lead = &b[..have.min(MAGIC.len())];
    let plausible = lead == &MAGIC[..lead.len()] || lead.iter().all(|&x| x == 0);
    if !plausible {
        return Err(JournalError::NotAJournal {
            path: path.to_path_buf(),
        });
    }
    // Another version's header is shorter or longer than ours: judged by
    // its version, not taken for an interrupted create.
    if have >= 12 && b.get(0..8) == Some(&MAGIC[..]) {
        check_version(&b, path)?;
    }
    if len < HEADER_LEN as u64 {
        return Ok(None);
    }
    if b.iter().all(|&x| x == 0) {
        if len == HEADER_LEN as u64 {
            return Ok(None);
        }
        return Err(JournalError::Corrupt {
            path: path.to_path_buf(),
            offset: 0,
            what: "the header is all zeros but entries follow it".into(),
        });
    }
    decode_header(&b, path).map(Some)
}

/// A journal being read.
pub(super) struct Reader<'a> {
    file: &'a File,
    path: &'a Path,
    header: &'a JournalHeader,
    len: u64,
    /// One batch's entries; at most MAX_BATCH_BYTES.
    buf: Vec<u8>,
}

impl<'a> Reader<'a> {
    /// A reader of the journal `file` (named `path`, `len` bytes long)
    /// whose header is `header`.
    pub(super) fn new(
        file: &'a File,
        path: &'a Path,
        header: &'a JournalHeader,
        len: u64,
    ) -> Reader<'a> {
        Reader {
            file,
            path,
            header,
            len,
            buf: Vec::new(),
        }
    }
}

pub(super) enum BatchRead {
    /// A valid batch; the next one starts at `next`.
    Batch { next: u64 },
    /// The end of the file.
    End,
    /// A torn last batch: nothing valid from here on.
    Torn,
}

/// Reads the batch at `pos` (number `seq`), checks all its entries, then
/// passes each to `visit` with its file offset. A torn last batch visits
/// nothing.
pub(super) fn read_batch(
    r: &mut Reader<'_>,
    pos: u64,
    seq: u64,
    visit: &mut dyn FnMut(u64, &EntryRef<'_>) -> Result<(), JournalError>,
) -> Result<BatchRead, JournalError> {
    let corrupt = |offset: u64, what: String| JournalError::Corrupt {
        path: r.path.to_path_buf(),
        offset,
        what,
    };
    let left = r.len.saturating_sub(pos);
    if left == 0 {
        return Ok(BatchRead::End);
    }
    if left < BATCH_HEADER_LEN as u64 {
        return Ok(BatchRead::Torn);
    }
    let mut h = [0u8; BATCH_HEADER_LEN];
    r.file
        .read_exact_at(&mut h, pos)
        .map_err(io_err(r.path, "reading the journal"))?;
    let Some((bytes, count)) = decode_batch_header(&h, seq) else {
        // The start of the write a crash interrupted (or stale bytes after
        // a failed one).
        return Ok(BatchRead::Torn);
    };
    if bytes > MAX_BATCH_BYTES || count == 0 || count as usize > bytes / ENTRY_HEADER_LEN {
        return Err(corrupt(
            pos,
            format!("batch of {bytes} bytes holding {count} entries"),
        ));
    }
    let body_at = pos + BATCH_HEADER_LEN as u64;
    let next = body_at + bytes as u64;
    if next > r.len {
        return Ok(BatchRead::Torn);
    }
    let last = next == r.len;
    r.buf.clear();
    r.buf.resize(bytes, 0);
    r.file
        .read_exact_at(&mut r.buf, body_at)
        .map_err(io_err(r.path, "reading the journal"))?;

    // Check the whole batch before visiting any of it.
    let header = r.header;
    let mut at = 0usize;
    let mut found = 0u32;
    while at < bytes {
        let (e, end) = match parse_entry(&r.buf, at, header.block_size) {
            Ok(v) => v,
            Err(_) if last => return Ok(BatchRead::Torn),
            Err(what) => return Err(corrupt(body_at + at as u64, what.into())),
        };
        // The checksum matched, so these were written as they are: never a
        // torn write.
        let Some(expected) = old_block_len(header, e.block) else {
            return Err(corrupt(
                body_at + at as u64,
                format!("block {} is past the old image size", e.block),
            ));
        };
        if let Some(d) = e.data {
            if d.len() as u64 != expected {
                return Err(corrupt(
                    body_at + at as u64,
                    format!("block {} holds {} bytes, not {expected}", e.block, d.len()),
                ));
            }
        } else if end != at + ENTRY_HEADER_LEN {
            return Err(corrupt(
                body_at + at as u64,
                format!("hole entry for block {} carries data", e.block),
            ));
        }
        found += 1;
        at = end;
    }
    if found != count {
        if last {
            return Ok(BatchRead::Torn);
        }
        return Err(corrupt(
            pos,
            format!("batch header says {count} entries but the batch holds {found}"),
        ));
    }
    let mut at = 0usize;
    while at < bytes {
        let Ok((e, end)) = parse_entry(&r.buf, at, header.block_size) else {
            break; // checked above
        };
        visit(body_at + at as u64, &e)?;
        at = end;
    }
    Ok(BatchRead::Batch { next })
}

pub(super) struct Scan {
    pub(super) journaled: BTreeSet<u64>,
    /// Where the valid batches end (the torn tail, if any, starts here).
    pub(super) end: u64,
    pub(super) batches: u64,
}

/// Checks every batch and collects the journaled blocks.
pub(super) fn scan(r: &mut Reader<'_>) -> Result<Scan, JournalError> {
    let mut journaled = BTreeSet::new();
    let mut pos = HEADER_LEN as u64;
    let mut batches = 0u64;
    let path = r.path;
    loop {
        let mut insert = |at: u64, e: &EntryRef<'_>| {
            if journaled.insert(e.block) {
                Ok(())
            } else {
                Err(JournalError::Corrupt {
                    path: path.to_path_buf(),
                    offset: at,
                    what: format!("block {} is journaled twice", e.block),
                })
            }
        };
        match read_batch(r, pos, batches, &mut insert)? {
            BatchRead::Batch { next } => {
                pos = next;
                batches += 1;
            }
            BatchRead::End | BatchRead::Torn => break,
        }
    }
    Ok(Scan {
        journaled,
        end: pos,
        batches,
    })
}

#[cfg(test)]
mod tests {
    use super::super::format::{encode_batch_header, entry_crc, KIND_HOLE};
    use super::super::testutil::*;
    use super::super::*;

    #[test]
    fn torn_tail_drops_only_the_unsynced_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (_, old) = old_image(dir.path());
        let jpath = dir.path().join("j");
        let mut j = Journal::create(&jpath, header(old.len() as u64, old.len() as u64)).unwrap();
        journal_blocks(&mut j, &old, &[0, 1], 2);
        let first_end = j.bytes();
        journal_blocks(&mut j, &old, &[2, 3], 2);
        let full = j.bytes();
        drop(j);
        let bytes = std::fs::read(&jpath).unwrap();

        // Cut in the second batch's header, in an entry's header, in its
        // data; and zeros in place of the batch (size written, data not).
        let cuts = [
            first_end + 10,
            first_end + BATCH_HEADER_LEN as u64 + 5,
            first_end + BATCH_HEADER_LEN as u64 + ENTRY_HEADER_LEN as u64 + 1000,
            full - 1,
        ];
        for cut in cuts {
            std::fs::write(&jpath, &bytes[..cut as usize]).unwrap();
            let mut j = Journal::open(&jpath, &FAKE).unwrap().unwrap();
            assert_eq!(journaled(&j), [0, 1], "cut at {cut}");
            assert_eq!(std::fs::metadata(&jpath).unwrap().len(), first_end);
            // Appending after the cut works, and reopens.
            journal_blocks(&mut j, &old, &[3], 1);
            drop(j);
            let j = Journal::open(&jpath, &FAKE).unwrap().unwrap();
            assert_eq!(journaled(&j), [0, 1, 3]);
        }
        let mut zeroed = bytes.clone();
        zeroed[first_end as usize..].fill(0);
        std::fs::write(&jpath, &zeroed).unwrap();
        let j = Journal::open(&jpath, &FAKE).unwrap().unwrap();
        assert_eq!(journaled(&j), [0, 1]);
        // A zero page in the middle of the last batch.
        let mut holed = bytes.clone();
        let at = first_end as usize + BATCH_HEADER_LEN + ENTRY_HEADER_LEN + 10;
        holed[at..at + 4096].fill(0);
        drop(j);
        std::fs::write(&jpath, &holed).unwrap();
        let j = Journal::open(&jpath, &FAKE).unwrap().unwrap();
        assert_eq!(journaled(&j), [0, 1]);
    }

    #[test]
    fn corrupt_entry_in_the_middle_is_refused_without_touching_dst() {
        let dir = tempfile::tempdir().unwrap();
        let (dst, old) = old_image(dir.path());
        let jpath = Journal::path_for(&dst);
        let mut j =
            Journal::create(&jpath, header_for(&dst, old.len() as u64, old.len() as u64)).unwrap();
        journal_blocks(&mut j, &old, &[0], 1);
        let second = j.bytes();
        journal_blocks(&mut j, &old, &[2], 1);
        journal_blocks(&mut j, &old, &[3], 1);
        drop(j);
        let new = pattern(77, old.len());
        std::fs::write(&dst, &new).unwrap();
        let mut bytes = std::fs::read(&jpath).unwrap();
        let entry_at = second as usize + BATCH_HEADER_LEN;
        bytes[entry_at + ENTRY_HEADER_LEN + 500] ^= 1;
        std::fs::write(&jpath, &bytes).unwrap();

        let e = Journal::open(&jpath, &id_of(&dst)).err().unwrap();
        assert_eq!(
            e.to_string(),
            format!(
                "{}: corrupt journal at {entry_at:#x}: entry checksum mismatch",
                jpath.display()
            )
        );
        let e = rollback(&dst, &jpath).unwrap_err();
        assert!(e.is_corrupt(), "{e}");
        assert_eq!(std::fs::read(&dst).unwrap(), new);
        assert!(jpath.exists());
    }

    #[test]
    fn valid_entries_with_impossible_content_are_corrupt_even_at_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let jpath = dir.path().join("j");
        let h = header(2 * B, 2 * B);
        let mut j = Journal::create(&jpath, h).unwrap();
        j.record(0, None).unwrap();
        j.sync().unwrap();
        drop(j);
        // A batch with a checksummed entry for a block past old_size.
        let mut body = Vec::new();
        let mut head = [0u8; ENTRY_HEADER_LEN];
        head[0..8].copy_from_slice(&5u64.to_be_bytes());
        head[8] = KIND_HOLE;
        let crc = entry_crc(&head[..13], &[]);
        head[13..17].copy_from_slice(&crc.to_be_bytes());
        body.extend_from_slice(&head);
        let mut bytes = std::fs::read(&jpath).unwrap();
        bytes.extend_from_slice(&encode_batch_header(1, body.len() as u32, 1));
        bytes.extend_from_slice(&body);
        std::fs::write(&jpath, &bytes).unwrap();
        let e = Journal::open(&jpath, &FAKE).err().unwrap();
        assert!(
            e.to_string()
                .ends_with("block 5 is past the old image size"),
            "{e}"
        );
    }

    #[test]
    fn an_interrupted_create_counts_as_no_journal() {
        let dir = tempfile::tempdir().unwrap();
        let (dst, old) = old_image(dir.path());
        let jpath = Journal::path_for(&dst);
        for content in [&b""[..], &MAGIC[..5], &[0u8; HEADER_LEN][..]] {
            std::fs::write(&jpath, content).unwrap();
            assert!(Journal::open(&jpath, &id_of(&dst)).unwrap().is_none());
            assert!(!jpath.exists());
            std::fs::write(&jpath, content).unwrap();
            assert_eq!(rollback(&dst, &jpath).unwrap(), RollbackReport::default());
            assert!(!jpath.exists());
        }
        assert_eq!(std::fs::read(&dst).unwrap(), old);
    }
}
