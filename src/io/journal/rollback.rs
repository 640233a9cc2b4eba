//! Rolling DST back to what it held before the sync: [`rollback`], which
//! writes every journaled block's old content back, and DST opened for it.
//!
//! # Durability order
//!
//! The whole journal is validated first (a corrupt journal is refused
//! before DST is touched) → every entry's old content is written back
//! (holes punched) → DST fsynced → its size set back to `old_size` (files)
//! → fsynced → the journal unlinked → its directory fsynced. Every step
//! writes the same result when repeated, so a crash during rollback and a
//! rerun give the same image.
//!
//! Holes go back through [`crate::io::zero::punch_range`]: a hole again in a
//! file, zeros on a block device, with the fallback order documented there.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;

use rustix::fs::OFlags;
use rustix::io::Errno;

use crate::io::zero;

use super::format::{old_block_len, EntryRef, HEADER_LEN};
use super::reader::{read_batch, read_header, scan, BatchRead, Reader};
use super::{
    belongs, io_err, is_same_file, journal_len, lock, open_existing, remove_journal, DstId,
    JournalError,
};

/// What [`rollback`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RollbackReport {
    /// Entries restored (data and holes).
    pub entries: u64,
    /// Bytes of old content written back.
    pub data_bytes: u64,
    /// Blocks made holes (or zeros) again.
    pub holes: u64,
    /// The size DST was given back; `None` when the journal had no header
    /// yet (the sync stopped while creating it, before touching DST).
    pub old_size: Option<u64>,
}

/// Restores DST from its journal: old contents written back, holes punched
/// back, then the old size (files), with the order in the module docs.
/// A corrupt journal is refused before DST is touched. Without a journal:
/// [`JournalError::NotInProgress`].
pub fn rollback(dst: &Path, journal: &Path) -> Result<RollbackReport, JournalError> {
    let not_in_progress = || JournalError::NotInProgress {
        path: dst.to_path_buf(),
    };
    let Some(jfile) = open_existing(journal, false)? else {
        return Err(not_in_progress());
    };
    lock(&jfile, journal)?;
    if !is_same_file(&jfile, journal)? {
        return Err(not_in_progress());
    }
    let len = journal_len(&jfile, journal)?;
    let Some(header) = read_header(&jfile, journal, len)? else {
        // The sync stopped while creating its journal: DST is untouched.
        remove_journal(journal)?;
        return Ok(RollbackReport::default());
    };
    let mut reader = Reader::new(&jfile, journal, &header, len);
    // Validate everything before changing DST.
    let scan = scan(&mut reader)?;

    let target = Target::open(dst)?;
    let id = DstId::of(&target.file).map_err(io_err(dst, "reading the image's identity"))?;
    belongs(&header, journal, &id)?;
    if let Some(device) = target.device_size {
        if device < header.old_size {
            return Err(JournalError::DeviceTooSmall {
                path: dst.to_path_buf(),
                device,
                old_size: header.old_size,
            });
        }
    }
    let mut report = RollbackReport {
        old_size: Some(header.old_size),
        ..RollbackReport::default()
    };
    let mut pos = HEADER_LEN as u64;
    let mut seq = 0u64;
    while pos < scan.end {
        let mut apply = |_at: u64, e: &EntryRef<'_>| -> Result<(), JournalError> {
            let offset = e.block * u64::from(header.block_size);
            match e.data {
                Some(data) => {
                    target
                        .file
                        .write_all_at(data, offset)
                        .map_err(io_err(dst, "restoring old content"))?;
                    report.data_bytes += data.len() as u64;
                }
                None => {
                    // Validated: the block starts before old_size.
                    let len = old_block_len(&header, e.block).unwrap_or(0);
                    target
                        .restore_hole(offset, len)
                        .map_err(io_err(dst, "restoring a hole"))?;
                    report.holes += 1;
                }
            }
            report.entries += 1;
            Ok(())
        };
        match read_batch(&mut reader, pos, seq, &mut apply)? {
            BatchRead::Batch { next } => {
                pos = next;
                seq += 1;
            }
            BatchRead::End | BatchRead::Torn => {
                return Err(JournalError::Corrupt {
                    path: journal.to_path_buf(),
                    offset: pos,
                    what: "the journal changed during rollback".into(),
                })
            }
        }
    }
    target
        .file
        .sync_all()
        .map_err(io_err(dst, "syncing the restored image"))?;
    if target.device_size.is_none() {
        target
            .file
            .set_len(header.old_size)
            .map_err(io_err(dst, "restoring the old size"))?;
        target
            .file
            .sync_all()
            .map_err(io_err(dst, "syncing the restored image"))?;
    }
    drop(target);
    remove_journal(journal)?;
    Ok(report)
}

/// DST opened for rollback.
struct Target {
    file: File,
    /// A block device's size; `None` for files.
    device_size: Option<u64>,
}

impl Target {
    fn open(dst: &Path) -> Result<Target, JournalError> {
        let meta = std::fs::metadata(dst).map_err(io_err(dst, "opening the image to restore"))?;
        let is_device = meta.file_type().is_block_device();
        if !is_device && !meta.is_file() {
            return Err(JournalError::Invalid {
                path: dst.to_path_buf(),
                what: "not a regular file or block device".into(),
            });
        }
        let mut opts = std::fs::OpenOptions::new();
        opts.read(true).write(true);
        if is_device {
            // As Output: refused (EBUSY) while mounted or otherwise held.
            opts.custom_flags(OFlags::EXCL.bits() as i32);
        }
        let file = opts.open(dst).map_err(|e| {
            let e = if is_device && e.raw_os_error() == Some(Errno::BUSY.raw_os_error()) {
                io::Error::other("the device is in use (mounted, or held by another program)")
            } else {
                e
            };
            io_err(dst, "opening the image to restore")(e)
        })?;
        let device_size = if is_device {
            Some(
                rustix::fs::seek(&file, rustix::fs::SeekFrom::End(0))
                    .map_err(|e| io_err(dst, "reading the device size")(e.into()))?,
            )
        } else {
            None
        };
        Ok(Target { file, device_size })
    }

    /// Makes `[offset, offset + len)` a hole again (files) or zeros
    /// (devices), with the fallbacks of [`crate::io::zero`].
    fn restore_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        zero::punch_range(&self.file, self.device_size.is_some(), offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::*;

    #[test]
    fn grow_round_trip_restores_content_holes_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let holes = has_holes(dir.path());
        let (dst, old) = old_image(dir.path());
        let jpath = Journal::path_for(&dst);
        let h = header_for(&dst, old.len() as u64, 6 * B);
        let mut j = Journal::create(&jpath, h).unwrap();
        assert!(matches!(
            state(&jpath, &id_of(&dst)),
            JournalState::InProgress
        ));
        journal_blocks(&mut j, &old, &[0, 1, 2, 3], 2);
        assert_eq!(j.entries(), 4);
        assert_eq!(j.bytes(), std::fs::metadata(&jpath).unwrap().len());
        // The sync overwrites everything and grows DST, then is interrupted.
        let f = std::fs::OpenOptions::new().write(true).open(&dst).unwrap();
        f.write_all_at(&pattern(99, 6 * B as usize), 0).unwrap();
        drop(f);
        drop(j);

        let j = Journal::open(&jpath, &id_of(&dst)).unwrap().unwrap();
        assert_eq!(*j.header(), h);
        assert_eq!(journaled(&j), [0, 1, 2, 3]);
        assert!(j.is_journaled(1) && !j.is_journaled(4));
        drop(j);

        let report = rollback(&dst, &jpath).unwrap();
        assert_eq!(
            report,
            RollbackReport {
                entries: 4,
                data_bytes: 2 * B + B / 2,
                holes: 1,
                old_size: Some(old.len() as u64),
            }
        );
        assert_eq!(std::fs::read(&dst).unwrap(), old);
        if holes {
            assert!(is_hole(&dst, B, B), "block 1 is a hole again");
        }
        assert!(!jpath.exists());
        assert!(matches!(state(&jpath, &id_of(&dst)), JournalState::None));
    }

    #[test]
    fn shrink_round_trip_restores_the_cut_blocks_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let holes = has_holes(dir.path());
        let (dst, old) = old_image(dir.path());
        let jpath = Journal::path_for(&dst);
        let mut j = Journal::create(&jpath, header_for(&dst, old.len() as u64, B)).unwrap();
        // Block 0 is rewritten; blocks 2 and 3 are cut off (block 1, a
        // hole, needs nothing: it reads as zeros after regrowing).
        journal_blocks(&mut j, &old, &[0, 2, 3], 8);
        let f = std::fs::OpenOptions::new().write(true).open(&dst).unwrap();
        f.write_all_at(&pattern(50, B as usize), 0).unwrap();
        f.set_len(B).unwrap();
        drop(f);
        j.sync().unwrap();
        drop(j);

        let report = rollback(&dst, &jpath).unwrap();
        assert_eq!(report.entries, 3);
        assert_eq!(std::fs::read(&dst).unwrap(), old);
        if holes {
            assert!(is_hole(&dst, B, B));
        }
        assert!(!jpath.exists());
    }

    #[test]
    fn rollback_ignores_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let (dst, old) = old_image(dir.path());
        let jpath = Journal::path_for(&dst);
        let mut j =
            Journal::create(&jpath, header_for(&dst, old.len() as u64, old.len() as u64)).unwrap();
        journal_blocks(&mut j, &old, &[0], 1);
        // Block 2's entry is torn: the sync never got to write block 2.
        j.record(2, Some(&old[2 * B as usize..3 * B as usize]))
            .unwrap();
        j.sync().unwrap();
        let len = j.bytes();
        drop(j);
        File::options()
            .write(true)
            .open(&jpath)
            .unwrap()
            .set_len(len - 100)
            .unwrap();
        let f = File::options().write(true).open(&dst).unwrap();
        f.write_all_at(&pattern(9, B as usize), 0).unwrap();
        drop(f);
        let report = rollback(&dst, &jpath).unwrap();
        assert_eq!(report.entries, 1);
        assert_eq!(std::fs::read(&dst).unwrap(), old);
    }

    #[test]
    fn rollback_twice_says_no_sync_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let (dst, old) = old_image(dir.path());
        let jpath = Journal::path_for(&dst);
        let mut j =
            Journal::create(&jpath, header_for(&dst, old.len() as u64, old.len() as u64)).unwrap();
        journal_blocks(&mut j, &old, &[0, 1], 2);
        drop(j);
        rollback(&dst, &jpath).unwrap();
        let e = rollback(&dst, &jpath).unwrap_err();
        assert!(matches!(e, JournalError::NotInProgress { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            format!("{}: no sync in progress", dst.display())
        );
    }

    /// A crash during rollback (simulated: the journal is put back after a
    /// completed one, and DST partly rewritten) and a rerun give the same
    /// image.
    #[test]
    fn rollback_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let (dst, old) = old_image(dir.path());
        let jpath = Journal::path_for(&dst);
        let mut j = Journal::create(&jpath, header_for(&dst, old.len() as u64, 5 * B)).unwrap();
        journal_blocks(&mut j, &old, &[0, 1, 2, 3], 3);
        drop(j);
        let saved = std::fs::read(&jpath).unwrap();
        std::fs::write(&dst, pattern(4, 5 * B as usize)).unwrap();
        rollback(&dst, &jpath).unwrap();
        std::fs::write(&jpath, &saved).unwrap();
        File::options()
            .write(true)
            .open(&dst)
            .unwrap()
            .write_all_at(&pattern(5, B as usize), 2 * B)
            .unwrap();
        rollback(&dst, &jpath).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), old);
    }
}
