//! The undo journal of `imgsync sync`: the old content of every block of the
//! destination (DST) that an in-place sync overwrites, punches or cuts off,
//! so that an interrupted sync can be resumed or rolled back exactly.
//!
//! Where it lives ([`path_of`]): a file DST's journal is `.NAME.imgsync-journal`
//! beside the file (symbolic links resolved first, so every name of DST
//! finds it); a block device's is `dev-MAJ:MIN.imgsync-journal` in a
//! private directory ([`device_dir`]: `/var/lib/imgsync/journals` for root),
//! named after the device number, so every node of the device (`/dev/vg/x`,
//! `/dev/mapper/vg-x`, a symlink) finds it and two devices never share one.
//! Its existence means "sync in progress".
//!
//! A journal belongs to one destination: its header records DST's identity
//! (a file's device and inode; a block device's device number, size and sysfs identity),
//! and a journal is used only for the DST with that identity (a journal
//! renamed or copied beside another file is refused, never applied). It is
//! also used only when it is ours ([`super::owned`]): opened without
//! following a symlink, owned by the running user and writable by nobody
//! else; any other is refused by name and neither read, applied nor
//! removed. Version 1 journals recorded no identity: they are refused too
//! (finish or roll back such a sync with the imgsync that wrote it).
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
//!
//! # Durability order
//!
//! Sync: the journal is created (`O_EXCL`) and locked, its header written
//! and fsynced, then its directory fsynced, so the marker survives a crash
//! → entries are buffered by [`Journal::record`] → [`Journal::sync`] writes
//! them as one batch and fdatasyncs the journal → only then does the caller
//! write those blocks of DST → … → the caller fsyncs DST →
//! [`Journal::remove`] unlinks the journal and fsyncs its directory.
//!
//! Rollback: the whole journal is validated first (a corrupt journal is
//! refused before DST is touched) → every entry's old content is written
//! back (holes punched) → DST fsynced → its size set back to `old_size`
//! (files) → fsynced → the journal unlinked → its directory fsynced. Every
//! step writes the same result when repeated, so a crash during rollback and
//! a rerun give the same image.
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
//!
//! Holes on rollback: files get `fallocate(PUNCH_HOLE | KEEP_SIZE)`,
//! falling back to writing zeros (EOPNOTSUPP, EINVAL, ENOSYS); block devices
//! get BLKZEROOUT, then `fallocate(ZERO_RANGE | KEEP_SIZE)`, then zeros (the
//! order of [`super::Output::zero_range`]).
//!
//! An exclusive `flock` on the journal keeps two imgsync processes from
//! using it at once (no-op on filesystems without locks).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{FallocateFlags, FlockOperation, OFlags};
use rustix::io::Errno;

/// The first bytes of every journal.
pub const MAGIC: [u8; 8] = *b"IMGSYNCJ";
/// The format version this code writes and reads.
pub const VERSION: u32 = 2;
/// Smallest block size: the page size, below which punching holes is moot.
pub const MIN_BLOCK_SIZE: u32 = 4 << 10;
/// Largest block size: bounds one entry's allocation on read.
pub const MAX_BLOCK_SIZE: u32 = 16 << 20;

const HEADER_LEN: usize = 100;
/// Bytes of the header its crc covers.
const HEADER_CRC_AT: usize = HEADER_LEN - 4;
const DST_FILE: u32 = 1;
const DST_DEVICE: u32 = 2;
const BATCH_HEADER_LEN: usize = 24;
const ENTRY_HEADER_LEN: usize = 17;
const BATCH_TAG: [u8; 4] = *b"JBAT";
const KIND_DATA: u8 = 1;
const KIND_HOLE: u8 = 2;
/// Largest batch: `record` syncs before a batch would grow past it, and a
/// reader allocates at most this much for one batch. Above one entry of the
/// largest block size (16 MiB + 17), so any entry fits in a batch.
const MAX_BATCH_BYTES: usize = 32 << 20;
const JOURNAL_SUFFIX: &str = ".imgsync-journal";
/// NAME_MAX on Linux.
const NAME_MAX: usize = 255;
/// Where root keeps block devices' journals (/dev is not durable, and
/// /var/tmp is writable by everyone).
pub const DEVICE_DIR: &str = "/var/lib/imgsync/journals";

/// The destination a journal belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DstId {
    /// A regular file: its file system's device and its inode.
    File { dev: u64, ino: u64 },
    /// A block device: its device number and size in bytes, and a
    /// fingerprint of what the kernel says the device is (0: nothing to
    /// say). Loop and device-mapper numbers are handed out again: a loop
    /// device later backed by another file, or another LV that gets the
    /// same minor, must not take this journal.
    Device { rdev: u64, size: u64, stable: u64 },
}

/// The fingerprint of block device `rdev` (see [`DstId::Device`]): BLAKE3
/// of what sysfs says identifies it — a device-mapper UUID (LVM's VG and LV
/// UUIDs), a loop device's backing file and offset, a disk's WWID or
/// serial — or 0 when sysfs says none of it.
fn device_fingerprint(rdev: u64) -> u64 {
    let base = format!(
        "/sys/dev/block/{}:{}",
        rustix::fs::major(rdev),
        rustix::fs::minor(rdev)
    );
    let mut h = blake3::Hasher::new();
    let mut any = false;
    for f in [
        "dm/uuid",
        "loop/backing_file",
        "loop/offset",
        "wwid",
        "device/wwid",
        "device/serial",
    ] {
        if let Ok(v) = std::fs::read(format!("{base}/{f}")) {
            h.update(f.as_bytes());
            h.update(&v);
            any = true;
        }
    }
    if !any {
        return 0;
    }
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d.as_bytes()[..8]);
    u64::from_be_bytes(b).max(1)
}

impl DstId {
    /// The identity of the open DST.
    pub fn of(file: &File) -> io::Result<DstId> {
        let meta = file.metadata()?;
        if meta.file_type().is_block_device() {
            // Seeking to the end gives the device's size (what
            // BLKGETSIZE64 reports).
            let size = rustix::fs::seek(file, rustix::fs::SeekFrom::End(0))?;
            Ok(DstId::Device {
                rdev: meta.rdev(),
                size,
                stable: device_fingerprint(meta.rdev()),
            })
        } else {
            Ok(DstId::File {
                dev: meta.dev(),
                ino: meta.ino(),
            })
        }
    }
}

impl std::fmt::Display for DstId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mm = |d: u64| (rustix::fs::major(d), rustix::fs::minor(d));
        match *self {
            DstId::File { dev, ino } => {
                let (ma, mi) = mm(dev);
                write!(f, "the file with inode {ino} on device {ma}:{mi}")
            }
            DstId::Device { rdev, size, stable } => {
                let (ma, mi) = mm(rdev);
                write!(f, "block device {ma}:{mi} of {size} bytes")?;
                if stable != 0 {
                    // What the kernel says it is (backing file, dm UUID).
                    write!(f, " (identity {stable:016x})")?;
                }
                Ok(())
            }
        }
    }
}

/// What a journal records about the sync; fixed at creation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalHeader {
    /// Power of two, 4 KiB..=16 MiB.
    pub block_size: u32,
    /// DST's size (bytes) before the sync.
    pub old_size: u64,
    /// DST's size after the sync (SRC's virtual size).
    pub new_size: u64,
    /// Identifies the sync (caller-chosen); resume checks it.
    pub sync_id: [u8; 32],
    /// The destination the journal belongs to.
    pub dst: DstId,
}

/// A journal or rollback failure. Each message names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{}: {what}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{}: not an imgsync journal", path.display())]
    NotAJournal { path: PathBuf },
    #[error("{}: journal version {version} is not supported", path.display())]
    Version { path: PathBuf, version: u32 },
    /// A version 1 journal: it does not say which image it belongs to.
    #[error("{}: a journal of an older imgsync (format 1), which does not record which image it belongs to; not used: finish or roll back that sync with the imgsync that wrote it, or remove the journal", path.display())]
    Unbound { path: PathBuf },
    /// Not ours, writable by others, or a symlink: never read or applied.
    #[error("{}: refusing the journal: {why}", path.display())]
    Untrusted { path: PathBuf, why: String },
    /// The directory of device journals (or one above it) is not ours.
    #[error("{}: refusing the journal directory: {why}", path.display())]
    UntrustedDir { path: PathBuf, why: String },
    /// The journal belongs to another destination.
    #[error("{}: the journal belongs to {recorded}, not to this destination ({actual}); not used", path.display())]
    OtherDestination {
        path: PathBuf,
        recorded: DstId,
        actual: DstId,
    },
    #[error("{}: corrupt journal at {offset:#x}: {what}", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        what: String,
    },
    #[error("{}: a journal already exists: another sync is in progress", path.display())]
    Exists { path: PathBuf },
    #[error("{}: the journal is in use by another imgsync process", path.display())]
    Locked { path: PathBuf },
    /// `path` is DST.
    #[error("{}: no sync in progress", path.display())]
    NotInProgress { path: PathBuf },
    /// The caller asked for something impossible (a bug in the caller).
    #[error("{}: {what}", path.display())]
    Invalid { path: PathBuf, what: String },
    #[error("{}: an earlier write to the journal failed; it can no longer be trusted", path.display())]
    Poisoned { path: PathBuf },
    #[error("{}: the device holds {device} bytes but the image held {old_size} before the sync", path.display())]
    DeviceTooSmall {
        path: PathBuf,
        device: u64,
        old_size: u64,
    },
}

impl JournalError {
    /// The file at fault (the journal, or DST).
    pub fn path(&self) -> &Path {
        match self {
            JournalError::Io { path, .. }
            | JournalError::NotAJournal { path }
            | JournalError::Version { path, .. }
            | JournalError::Unbound { path }
            | JournalError::Untrusted { path, .. }
            | JournalError::UntrustedDir { path, .. }
            | JournalError::OtherDestination { path, .. }
            | JournalError::Corrupt { path, .. }
            | JournalError::Exists { path }
            | JournalError::Locked { path }
            | JournalError::NotInProgress { path }
            | JournalError::Invalid { path, .. }
            | JournalError::Poisoned { path }
            | JournalError::DeviceTooSmall { path, .. } => path,
        }
    }

    /// A corrupt or unreadable journal (as opposed to an I/O failure or a
    /// journal in use).
    pub fn is_corrupt(&self) -> bool {
        matches!(
            self,
            JournalError::Corrupt { .. }
                | JournalError::NotAJournal { .. }
                | JournalError::Version { .. }
        )
    }
}

fn io_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> JournalError + 'a {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

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

/// An open journal, locked for this process, appended to by a sync.
pub struct Journal {
    file: File,
    path: PathBuf,
    header: JournalHeader,
    journaled: BTreeSet<u64>,
    /// Length of the batches written so far (the file's length).
    end: u64,
    /// The next batch's sequence number.
    next_seq: u64,
    /// The next batch: room for its header, then its entries.
    pending: Vec<u8>,
    pending_entries: u32,
    /// A write or fdatasync failed: what is on disk is unknown (after a
    /// failed fsync the kernel may have dropped the dirty pages), so no
    /// further sync may claim durability.
    poisoned: bool,
}

impl Journal {
    /// `.NAME.imgsync-journal` in DST's directory, for DST as named
    /// ([`path_of`] resolves symlinks first, so every name of DST finds the
    /// same journal).
    pub fn path_for(dst: &Path) -> PathBuf {
        let dir = dst.parent().unwrap_or(Path::new(""));
        let name = dst.file_name().map(|n| n.as_bytes()).unwrap_or(b"image");
        // Keep the journal's name within NAME_MAX.
        let keep = name.len().min(NAME_MAX - 1 - JOURNAL_SUFFIX.len());
        let mut s = Vec::with_capacity(NAME_MAX);
        s.push(b'.');
        s.extend_from_slice(name.get(..keep).unwrap_or(name));
        s.extend_from_slice(JOURNAL_SUFFIX.as_bytes());
        dir.join(OsString::from_vec(s))
    }

    /// Creates the journal (fails if one exists), writes and fsyncs the
    /// header, and fsyncs the directory so the marker survives a crash.
    pub fn create(path: &Path, header: JournalHeader) -> Result<Journal, JournalError> {
        check_header(&header).map_err(|what| JournalError::Invalid {
            path: path.to_path_buf(),
            what,
        })?;
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(JournalError::Exists {
                    path: path.to_path_buf(),
                })
            }
            Err(e) => return Err(io_err(path, "creating the journal")(e)),
        };
        let init = || -> Result<(), JournalError> {
            lock(&file, path)?;
            // Between create and lock, a resuming process may have found the
            // empty file (an interrupted create) and removed it.
            if !is_same_file(&file, path)? {
                return Err(io_err(path, "creating the journal")(io::Error::other(
                    "it was removed by another process while being created",
                )));
            }
            file.write_all_at(&encode_header(&header), 0)
                .map_err(io_err(path, "writing the journal header"))?;
            file.sync_all()
                .map_err(io_err(path, "syncing the journal header"))?;
            sync_dir_of(path)
        };
        if let Err(e) = init() {
            // Nothing was changed yet: leave no marker behind (unless the
            // name now belongs to another process's journal).
            if is_same_file(&file, path).unwrap_or(false) {
                let _ = std::fs::remove_file(path);
            }
            return Err(e);
        }
        Ok(Journal {
            file,
            path: path.to_path_buf(),
            header,
            journaled: BTreeSet::new(),
            end: HEADER_LEN as u64,
            next_seq: 0,
            pending: vec![0; BATCH_HEADER_LEN],
            pending_entries: 0,
            poisoned: false,
        })
    }

    /// Opens an existing journal of the destination `dst` to resume its
    /// sync: checks that it is ours and belongs to `dst`, validates it,
    /// collects the journaled blocks and cuts off a torn last batch.
    /// `Ok(None)` when there is no journal (one left by an interrupted
    /// create, holding no complete header, is removed).
    pub fn open(path: &Path, dst: &DstId) -> Result<Option<Journal>, JournalError> {
        let Some(file) = open_existing(path, true)? else {
            return Ok(None);
        };
        lock(&file, path)?;
        if !is_same_file(&file, path)? {
            // Removed (the sync finished) while we waited for it.
            return Ok(None);
        }
        let len = journal_len(&file, path)?;
        let Some(header) = read_header(&file, path, len)? else {
            remove_journal(path)?;
            return Ok(None);
        };
        belongs(&header, path, dst)?;
        let mut reader = Reader {
            file: &file,
            path,
            header: &header,
            len,
            buf: Vec::new(),
        };
        let scan = scan(&mut reader)?;
        if scan.end < len {
            file.set_len(scan.end)
                .map_err(io_err(path, "cutting the torn end of the journal"))?;
            rustix::fs::fdatasync(&file)
                .map_err(|e| io_err(path, "syncing the journal")(e.into()))?;
        }
        Ok(Some(Journal {
            file,
            path: path.to_path_buf(),
            header,
            journaled: scan.journaled,
            end: scan.end,
            next_seq: scan.batches,
            pending: vec![0; BATCH_HEADER_LEN],
            pending_entries: 0,
            poisoned: false,
        }))
    }

    pub fn header(&self) -> &JournalHeader {
        &self.header
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `block` has an entry (synced or still buffered).
    pub fn is_journaled(&self, block: u64) -> bool {
        self.journaled.contains(&block)
    }

    /// Appends an entry for `block` with its old content: `Some(bytes)`,
    /// exactly the block's length before the sync (`block_size`, or less for
    /// the last block), or `None` for a hole / zeros, punched back on
    /// rollback. A no-op when `block` is already journaled (the journal keeps
    /// the original content) or starts at or past `old_size` (nothing to
    /// restore there: rollback's truncation to `old_size` removes it).
    /// Buffered: not durable until [`Journal::sync`], which this calls
    /// itself when the buffer reaches 32 MiB.
    pub fn record(&mut self, block: u64, old: Option<&[u8]>) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned {
                path: self.path.clone(),
            });
        }
        if self.journaled.contains(&block) {
            return Ok(());
        }
        let Some(expected) = old_block_len(&self.header, block) else {
            return Ok(());
        };
        if let Some(data) = old {
            if data.len() as u64 != expected {
                return Err(JournalError::Invalid {
                    path: self.path.clone(),
                    what: format!(
                        "block {block}: {} bytes of old content, but the block held {expected} bytes",
                        data.len()
                    ),
                });
            }
        }
        let data = old.unwrap_or(&[]);
        let entry_len = ENTRY_HEADER_LEN + data.len();
        if self.pending_entries > 0
            && self.pending.len() - BATCH_HEADER_LEN + entry_len > MAX_BATCH_BYTES
        {
            self.sync()?;
        }
        let kind = if old.is_some() { KIND_DATA } else { KIND_HOLE };
        let mut head = [0u8; ENTRY_HEADER_LEN];
        head[0..8].copy_from_slice(&block.to_be_bytes());
        head[8] = kind;
        // data.len() == expected ≤ block_size, a u32.
        head[9..13].copy_from_slice(&(data.len() as u32).to_be_bytes());
        let crc = entry_crc(&head[..13], data);
        head[13..17].copy_from_slice(&crc.to_be_bytes());
        self.pending.extend_from_slice(&head);
        self.pending.extend_from_slice(data);
        self.pending_entries += 1;
        self.journaled.insert(block);
        Ok(())
    }

    /// Writes the recorded entries as one batch and fdatasyncs the journal.
    /// The caller writes those blocks of DST only after this returns.
    pub fn sync(&mut self) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned {
                path: self.path.clone(),
            });
        }
        if self.pending_entries == 0 {
            return Ok(());
        }
        let body = (self.pending.len() - BATCH_HEADER_LEN) as u32;
        let head = encode_batch_header(self.next_seq, body, self.pending_entries);
        self.pending[..BATCH_HEADER_LEN].copy_from_slice(&head);
        let written = self
            .file
            .write_all_at(&self.pending, self.end)
            .map_err(io_err(&self.path, "writing to the journal"))
            .and_then(|()| {
                rustix::fs::fdatasync(&self.file)
                    .map_err(|e| io_err(&self.path, "syncing the journal")(e.into()))
            });
        if let Err(e) = written {
            self.poisoned = true;
            // Best effort: a resume then finds no partial batch.
            let _ = self.file.set_len(self.end);
            return Err(e);
        }
        self.end += self.pending.len() as u64;
        self.next_seq += 1;
        self.pending.truncate(BATCH_HEADER_LEN);
        self.pending_entries = 0;
        Ok(())
    }

    /// Bytes the journal holds, counting entries not yet synced.
    pub fn bytes(&self) -> u64 {
        if self.pending_entries == 0 {
            self.end
        } else {
            self.end + self.pending.len() as u64
        }
    }

    /// Blocks journaled, counting entries not yet synced.
    pub fn entries(&self) -> u64 {
        self.journaled.len() as u64
    }

    /// Removes the journal (unlink, then fsync its directory): the sync is
    /// complete and DST has been fsynced.
    pub fn remove(self) -> Result<(), JournalError> {
        // The lock is held until `self.file` closes, after the unlink.
        remove_journal(&self.path)
    }
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
    let mut reader = Reader {
        file: &jfile,
        path: journal,
        header: &header,
        len,
        buf: Vec::new(),
    };
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

/// [`Journal::path_for`].
pub fn path_for(dst: &Path) -> PathBuf {
    Journal::path_for(dst)
}

/// The journal of `dst`, whose metadata (symlinks followed) is `meta`: for
/// a block device `dev-MAJ:MIN.imgsync-journal` in [`device_dir`], else
/// `.NAME.imgsync-journal` beside the file DST names once symlinks are
/// resolved. Every name of a destination gives the same journal.
pub fn path_of(dst: &Path, meta: &std::fs::Metadata) -> PathBuf {
    if meta.file_type().is_block_device() {
        let rdev = meta.rdev();
        device_dir().join(format!(
            "dev-{}:{}{JOURNAL_SUFFIX}",
            rustix::fs::major(rdev),
            rustix::fs::minor(rdev)
        ))
    } else {
        let real = std::fs::canonicalize(dst).unwrap_or_else(|_| dst.to_path_buf());
        Journal::path_for(&real)
    }
}

/// The directory of block devices' journals: [`DEVICE_DIR`] for root; for
/// another user (who may own a device) `$XDG_STATE_HOME/imgsync/journals`
/// (by default `~/.local/state/imgsync/journals`).
pub fn device_dir() -> PathBuf {
    if super::owned::euid() == 0 {
        return PathBuf::from(DEVICE_DIR);
    }
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/state")));
    match state {
        Some(s) => s.join("imgsync/journals"),
        None => PathBuf::from(DEVICE_DIR),
    }
}

/// [`device_dir`], made (mode 0700) if missing and checked: ours, and no
/// directory on its path writable by anyone else.
pub fn prepare_device_dir() -> Result<PathBuf, JournalError> {
    let dir = device_dir();
    super::owned::private_dir(&dir).map_err(|u| JournalError::UntrustedDir {
        path: u.path,
        why: u.why,
    })?;
    Ok(dir)
}

/// What a journal says about a destination ([`state`]).
#[derive(Debug)]
pub enum JournalState {
    /// No journal (or one whose creation was interrupted before DST was
    /// touched).
    None,
    /// The journal of this destination: a sync is in progress.
    InProgress,
    /// A journal at the destination's journal name that is not used for
    /// it: not ours, of another destination, unreadable or corrupt.
    Refused(JournalError),
}

/// Whether the journal at `path` is an interrupted sync of the
/// destination `dst` (for `info` and `check`: reads the header only).
pub fn state(path: &Path, dst: &DstId) -> JournalState {
    let header = || -> Result<Option<JournalHeader>, JournalError> {
        let Some(file) = open_existing(path, false)? else {
            return Ok(None);
        };
        let len = journal_len(&file, path)?;
        read_header(&file, path, len)
    };
    match header() {
        Ok(None) => JournalState::None,
        Ok(Some(h)) => match belongs(&h, path, dst) {
            Ok(()) => JournalState::InProgress,
            Err(e) => JournalState::Refused(e),
        },
        Err(e) => JournalState::Refused(e),
    }
}

/// Refuses a journal that records another destination than `dst`.
fn belongs(header: &JournalHeader, path: &Path, dst: &DstId) -> Result<(), JournalError> {
    if header.dst == *dst {
        Ok(())
    } else {
        Err(JournalError::OtherDestination {
            path: path.to_path_buf(),
            recorded: header.dst,
            actual: *dst,
        })
    }
}

/// Opens an existing journal (read-only, or also for writing) without
/// following a symlink at its name, and checks that it is ours
/// ([`super::owned`]) before anything is read. `Ok(None)`: there is none.
fn open_existing(path: &Path, write: bool) -> Result<Option<File>, JournalError> {
    let untrusted = |why: String| JournalError::Untrusted {
        path: path.to_path_buf(),
        why,
    };
    // O_NONBLOCK: a FIFO planted at the name must not block the open.
    let flags = OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(flags.bits() as i32)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(Errno::LOOP.raw_os_error()) => {
            return Err(untrusted(
                "is a symbolic link; not used (check where it came from, and remove it)".into(),
            ))
        }
        Err(e) => return Err(io_err(path, "opening the journal")(e)),
    };
    let meta = file
        .metadata()
        .map_err(io_err(path, "reading the journal's metadata"))?;
    match super::owned::file_problem(&meta) {
        None => Ok(Some(file)),
        Some(why) => Err(untrusted(why)),
    }
}

/// An upper bound of the journal's length for `entries` entries of
/// `block_size` bytes: the header, and each entry in a batch of its own.
pub fn space_needed(block_size: u32, entries: u64) -> u64 {
    let per_entry = (BATCH_HEADER_LEN + ENTRY_HEADER_LEN) as u64 + u64::from(block_size);
    (HEADER_LEN as u64).saturating_add(entries.saturating_mul(per_entry))
}

/// Length of `block` before the sync; `None` when it starts at or past
/// `old_size`.
fn old_block_len(header: &JournalHeader, block: u64) -> Option<u64> {
    let offset = block.checked_mul(u64::from(header.block_size))?;
    let left = header.old_size.checked_sub(offset).filter(|&l| l > 0)?;
    Some(left.min(u64::from(header.block_size)))
}

fn check_header(h: &JournalHeader) -> Result<(), String> {
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

fn encode_header(h: &JournalHeader) -> [u8; HEADER_LEN] {
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

fn decode_header(b: &[u8; HEADER_LEN], path: &Path) -> Result<JournalHeader, JournalError> {
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

/// The header, or `None` when the file is what an interrupted create
/// leaves: shorter than a header, or an all-zero header and nothing more.
fn read_header(file: &File, path: &Path, len: u64) -> Result<Option<JournalHeader>, JournalError> {
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

fn check_version(b: &[u8], path: &Path) -> Result<(), JournalError> {
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

fn encode_batch_header(seq: u64, bytes: u32, entries: u32) -> [u8; BATCH_HEADER_LEN] {
    let mut b = [0u8; BATCH_HEADER_LEN];
    b[0..4].copy_from_slice(&BATCH_TAG);
    b[4..12].copy_from_slice(&seq.to_be_bytes());
    b[12..16].copy_from_slice(&bytes.to_be_bytes());
    b[16..20].copy_from_slice(&entries.to_be_bytes());
    let crc = crc32fast::hash(&b[..20]);
    b[20..24].copy_from_slice(&crc.to_be_bytes());
    b
}

/// crc32 of an entry's block, kind and length (`head`) and its data.
fn entry_crc(head: &[u8], data: &[u8]) -> u32 {
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

/// A journal being read.
struct Reader<'a> {
    file: &'a File,
    path: &'a Path,
    header: &'a JournalHeader,
    len: u64,
    /// One batch's entries; at most MAX_BATCH_BYTES.
    buf: Vec<u8>,
}

enum BatchRead {
    /// A valid batch; the next one starts at `next`.
    Batch { next: u64 },
    /// The end of the file.
    End,
    /// A torn last batch: nothing valid from here on.
    Torn,
}

/// One entry, borrowed from a batch's buffer.
struct EntryRef<'a> {
    block: u64,
    /// `None`: a hole.
    data: Option<&'a [u8]>,
}

/// Parses the entry at `at` in a batch's entries. `Err` says why the bytes
/// are not an entry (torn, or corrupt when not in the last batch).
fn parse_entry(
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

/// Reads the batch at `pos` (number `seq`), checks all its entries, then
/// passes each to `visit` with its file offset. A torn last batch visits
/// nothing.
fn read_batch(
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
    let valid = h.get(0..4) == Some(&BATCH_TAG[..])
        && be_u32(&h, 20) == Some(crc32fast::hash(h.get(..20).unwrap_or(&[])))
        && be_u64(&h, 4) == Some(seq);
    if !valid {
        // The start of the write a crash interrupted (or stale bytes after
        // a failed one).
        return Ok(BatchRead::Torn);
    }
    let bytes = be_u32(&h, 12).unwrap_or(0) as usize;
    let count = be_u32(&h, 16).unwrap_or(0);
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

struct Scan {
    journaled: BTreeSet<u64>,
    /// Where the valid batches end (the torn tail, if any, starts here).
    end: u64,
    batches: u64,
}

/// Checks every batch and collects the journaled blocks.
fn scan(r: &mut Reader<'_>) -> Result<Scan, JournalError> {
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

fn journal_len(file: &File, path: &Path) -> Result<u64, JournalError> {
    let meta = file
        .metadata()
        .map_err(io_err(path, "reading the journal's metadata"))?;
    if !meta.is_file() {
        return Err(JournalError::NotAJournal {
            path: path.to_path_buf(),
        });
    }
    Ok(meta.len())
}

/// Takes the journal's exclusive lock without waiting.
fn lock(file: &File, path: &Path) -> Result<(), JournalError> {
    match rustix::fs::flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(()),
        Err(Errno::WOULDBLOCK) => Err(JournalError::Locked {
            path: path.to_path_buf(),
        }),
        // A filesystem without locks: go on unlocked.
        Err(Errno::NOLCK) | Err(Errno::OPNOTSUPP) | Err(Errno::NOSYS) => Ok(()),
        Err(e) => Err(io_err(path, "locking the journal")(e.into())),
    }
}

/// Whether `path` still names the open `file` (it may have been removed
/// or replaced while we waited for it).
fn is_same_file(file: &File, path: &Path) -> Result<bool, JournalError> {
    let ours = file
        .metadata()
        .map_err(io_err(path, "reading the journal's metadata"))?;
    match path.symlink_metadata() {
        Ok(m) => Ok(m.dev() == ours.dev() && m.ino() == ours.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err(path, "reading the journal's metadata")(e)),
    }
}

fn sync_dir_of(path: &Path) -> Result<(), JournalError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let d = File::open(dir).map_err(io_err(dir, "opening the journal's directory"))?;
    rustix::fs::fsync(&d).map_err(|e| io_err(dir, "syncing the journal's directory")(e.into()))
}

/// Unlinks the journal, then fsyncs its directory.
fn remove_journal(path: &Path) -> Result<(), JournalError> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(path, "removing the journal")(e)),
    }
    sync_dir_of(path)
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
    /// (devices), with the fallbacks in the module docs.
    fn restore_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if self.device_size.is_some() {
            return zero_device_range(&self.file, offset, len);
        }
        match rustix::fs::fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(Errno::OPNOTSUPP) | Err(Errno::INVAL) | Err(Errno::NOSYS) => {
                zero_file_range(&self.file, offset, len)
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// The files' fallback: zeros over the part of the range inside the file
/// (past its end it reads as zeros already, and writing there would grow
/// a file that shrank during the sync).
fn zero_file_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let size = file.metadata()?.len();
    let end = offset.saturating_add(len).min(size);
    if end > offset {
        write_zeros(file, offset, end - offset)?;
    }
    Ok(())
}

/// BLKZEROOUT, then `fallocate(ZERO_RANGE | KEEP_SIZE)`, then zeros: the
/// order of `Output::zero_range`.
fn zero_device_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    match blkzeroout(file, offset, len) {
        Ok(()) => return Ok(()),
        Err(Errno::NOTTY) | Err(Errno::OPNOTSUPP) | Err(Errno::INVAL) => {}
        Err(e) => return Err(e.into()),
    }
    match rustix::fs::fallocate(
        file,
        FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    ) {
        Ok(()) => return Ok(()),
        Err(Errno::OPNOTSUPP) | Err(Errno::INVAL) | Err(Errno::NOSYS) => {}
        Err(e) => return Err(e.into()),
    }
    write_zeros(file, offset, len)
}

/// BLKZEROOUT from linux/fs.h: `_IO(0x12, 127)`, argument `uint64_t[2]`
/// (start, length), both multiples of the logical block size. (A copy of
/// output.rs's private helper.)
fn blkzeroout(file: &File, offset: u64, len: u64) -> Result<(), Errno> {
    const BLKZEROOUT: rustix::ioctl::Opcode = rustix::ioctl::opcode::none(0x12, 127);
    // SAFETY: BLKZEROOUT reads a `uint64_t[2]` through the pointer the Setter
    // passes; `[u64; 2]` has that layout, and the kernel does not keep it.
    unsafe {
        let arg = rustix::ioctl::Setter::<BLKZEROOUT, [u64; 2]>::new([offset, len]);
        rustix::ioctl::ioctl(file, arg)
    }
}

/// The last fallback: write zeros, 1 MiB at a time.
fn write_zeros(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut pos = offset;
    let end = offset.saturating_add(len);
    while pos < end {
        let n = (end - pos).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::LocalFile;
    use imgsync_formats::Storage;

    const BS: u32 = 64 << 10;
    const B: u64 = BS as u64;

    /// The identity of journals not applied to a real file.
    const FAKE: DstId = DstId::File { dev: 1, ino: 2 };

    fn header(old_size: u64, new_size: u64) -> JournalHeader {
        JournalHeader {
            block_size: BS,
            old_size,
            new_size,
            sync_id: [7; 32],
            dst: FAKE,
        }
    }

    fn id_of(path: &Path) -> DstId {
        DstId::of(&File::open(path).unwrap()).unwrap()
    }

    /// A journal header for the image at `dst`.
    fn header_for(dst: &Path, old_size: u64, new_size: u64) -> JournalHeader {
        JournalHeader {
            dst: id_of(dst),
            ..header(old_size, new_size)
        }
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    /// Whether the filesystem under `dir` reports holes through SEEK_DATA.
    fn has_holes(dir: &Path) -> bool {
        let p = dir.join("probe");
        let f = File::create(&p).unwrap();
        f.set_len(4 << 20).unwrap();
        f.write_all_at(b"x", 2 << 20).unwrap();
        let lf = LocalFile::open(&p).unwrap();
        let first = lf.next_data(0).unwrap();
        std::fs::remove_file(&p).unwrap();
        matches!(first, Some((s, _)) if s > 0)
    }

    fn is_hole(path: &Path, offset: u64, len: u64) -> bool {
        let lf = LocalFile::open(path).unwrap();
        match lf.next_data(offset).unwrap() {
            None => true,
            Some((s, _)) => s >= offset + len,
        }
    }

    /// An old image of 3.5 blocks: data, hole, data, short data.
    fn old_image(dir: &Path) -> (PathBuf, Vec<u8>) {
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
    fn journal_blocks(j: &mut Journal, old: &[u8], blocks: &[u64], per_sync: usize) {
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

    fn journaled(j: &Journal) -> Vec<u64> {
        j.journaled.iter().copied().collect()
    }

    #[test]
    fn path_is_a_hidden_name_beside_dst() {
        assert_eq!(
            Journal::path_for(Path::new("/var/img/vm.raw")),
            Path::new("/var/img/.vm.raw.imgsync-journal")
        );
        assert_eq!(
            Journal::path_for(Path::new("vm.raw")),
            Path::new(".vm.raw.imgsync-journal")
        );
        let long = "x".repeat(300);
        let p = Journal::path_for(Path::new(&long));
        assert_eq!(p.file_name().unwrap().len(), NAME_MAX);
    }

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
    fn recording_a_journaled_block_keeps_the_original() {
        let dir = tempfile::tempdir().unwrap();
        let (dst, old) = old_image(dir.path());
        let jpath = Journal::path_for(&dst);
        let mut j =
            Journal::create(&jpath, header_for(&dst, old.len() as u64, old.len() as u64)).unwrap();
        j.record(0, Some(&old[..B as usize])).unwrap();
        // Again before and after a sync, and after reopening: no-ops.
        j.record(0, Some(&pattern(1, B as usize))).unwrap();
        j.sync().unwrap();
        let bytes = j.bytes();
        j.record(0, None).unwrap();
        j.sync().unwrap();
        assert_eq!(j.bytes(), bytes);
        drop(j);
        let mut j = Journal::open(&jpath, &id_of(&dst)).unwrap().unwrap();
        j.record(0, Some(&pattern(2, B as usize))).unwrap();
        j.sync().unwrap();
        assert_eq!(j.entries(), 1);
        assert_eq!(j.bytes(), bytes);
        drop(j);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&dst)
            .unwrap()
            .write_all_at(&pattern(3, B as usize), 0)
            .unwrap();
        rollback(&dst, &jpath).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), old);
    }

    #[test]
    fn blocks_past_the_old_size_need_no_entry_and_lengths_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let jpath = dir.path().join("j");
        let mut j = Journal::create(&jpath, header(B + 100, 4 * B)).unwrap();
        j.record(2, Some(&[1; 10])).unwrap();
        j.record(u64::MAX, None).unwrap();
        assert_eq!(j.entries(), 0);
        let e = j.record(1, Some(&[1; 10])).unwrap_err();
        assert!(matches!(e, JournalError::Invalid { .. }), "{e}");
        assert_eq!(
            e.to_string(),
            format!(
                "{}: block 1: 10 bytes of old content, but the block held 100 bytes",
                jpath.display()
            )
        );
        j.record(1, Some(&[1; 100])).unwrap();
        assert!(j.is_journaled(1));
    }

    #[test]
    fn create_refuses_an_existing_journal_and_a_second_user_is_locked_out() {
        let dir = tempfile::tempdir().unwrap();
        let jpath = dir.path().join("j");
        let j = Journal::create(&jpath, header(B, B)).unwrap();
        let e = Journal::create(&jpath, header(B, B)).err().unwrap();
        assert!(matches!(e, JournalError::Exists { .. }), "{e}");
        let e = Journal::open(&jpath, &FAKE).err().unwrap();
        assert!(matches!(e, JournalError::Locked { .. }), "{e}");
        let e = rollback(&dir.path().join("dst"), &jpath).unwrap_err();
        assert!(matches!(e, JournalError::Locked { .. }), "{e}");
        j.remove().unwrap();
        assert!(!jpath.exists());
        assert!(Journal::open(&jpath, &FAKE).unwrap().is_none());
    }

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

    /// A journal renamed (or copied) beside another file records the first
    /// file: it is neither resumed nor applied to the second.
    #[test]
    fn a_journal_beside_another_file_is_not_applied() {
        let dir = tempfile::tempdir().unwrap();
        let (x, old) = old_image(dir.path());
        let jx = Journal::path_for(&x);
        let mut j =
            Journal::create(&jx, header_for(&x, old.len() as u64, old.len() as u64)).unwrap();
        journal_blocks(&mut j, &old, &[0, 2], 2);
        drop(j);
        let y = dir.path().join("y.img");
        let y_content = pattern(42, old.len());
        std::fs::write(&y, &y_content).unwrap();
        let jy = Journal::path_for(&y);
        std::fs::rename(&jx, &jy).unwrap();
        let e = Journal::open(&jy, &id_of(&y)).err().unwrap();
        assert!(matches!(e, JournalError::OtherDestination { .. }), "{e}");
        assert!(
            e.to_string().starts_with(&format!(
                "{}: the journal belongs to the file with inode",
                jy.display()
            )),
            "{e}"
        );
        let e = rollback(&y, &jy).unwrap_err();
        assert!(matches!(e, JournalError::OtherDestination { .. }), "{e}");
        assert!(matches!(state(&jy, &id_of(&y)), JournalState::Refused(_)));
        assert_eq!(std::fs::read(&y).unwrap(), y_content);
        assert!(jy.exists());
        // Back beside its own file, it applies.
        std::fs::rename(&jy, &jx).unwrap();
        assert!(matches!(state(&jx, &id_of(&x)), JournalState::InProgress));
        rollback(&x, &jx).unwrap();
        assert_eq!(std::fs::read(&x).unwrap(), old);
    }

    /// A journal others can write, another user's, or a symlink at the
    /// journal's name: refused by name, never read, applied or removed.
    #[test]
    fn a_journal_that_is_not_ours_is_refused_by_name_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (dst, old) = old_image(dir.path());
        let jpath = Journal::path_for(&dst);
        let mut j =
            Journal::create(&jpath, header_for(&dst, old.len() as u64, old.len() as u64)).unwrap();
        journal_blocks(&mut j, &old, &[0, 1, 2, 3], 2);
        drop(j);
        let new = pattern(9, old.len());
        std::fs::write(&dst, &new).unwrap();
        let saved = std::fs::read(&jpath).unwrap();
        let refused = |what: &str| {
            let e = Journal::open(&jpath, &id_of(&dst)).err().unwrap();
            assert!(matches!(e, JournalError::Untrusted { .. }), "{what}: {e}");
            assert!(
                e.to_string()
                    .starts_with(&format!("{}: refusing the journal: ", jpath.display())),
                "{what}: {e}"
            );
            let e = rollback(&dst, &jpath).unwrap_err();
            assert!(matches!(e, JournalError::Untrusted { .. }), "{what}: {e}");
            assert!(matches!(
                state(&jpath, &id_of(&dst)),
                JournalState::Refused(JournalError::Untrusted { .. })
            ));
            assert_eq!(std::fs::read(&dst).unwrap(), new, "{what}");
            assert!(jpath.symlink_metadata().is_ok(), "{what}: removed");
        };
        std::fs::set_permissions(&jpath, std::fs::Permissions::from_mode(0o666)).unwrap();
        refused("mode 0666");
        std::fs::set_permissions(&jpath, std::fs::Permissions::from_mode(0o620)).unwrap();
        refused("group-writable");
        std::fs::set_permissions(&jpath, std::fs::Permissions::from_mode(0o600)).unwrap();
        if super::super::owned::euid() == 0 {
            std::os::unix::fs::chown(&jpath, Some(65534), Some(65534)).unwrap();
            refused("owned by nobody");
            std::os::unix::fs::chown(&jpath, Some(0), Some(0)).unwrap();
        }
        let real = dir.path().join("elsewhere");
        std::fs::rename(&jpath, &real).unwrap();
        std::os::unix::fs::symlink(&real, &jpath).unwrap();
        refused("symlink");
        std::fs::remove_file(&jpath).unwrap();
        std::fs::rename(&real, &jpath).unwrap();
        assert_eq!(std::fs::read(&jpath).unwrap(), saved);
        rollback(&dst, &jpath).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), old);
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

    /// More than one batch's worth of records: `record` syncs by itself.
    #[test]
    fn a_full_buffer_is_synced_as_its_own_batch() {
        let dir = tempfile::tempdir().unwrap();
        let bs = 1u32 << 20;
        let h = JournalHeader {
            block_size: bs,
            old_size: 40 * u64::from(bs),
            new_size: 0,
            sync_id: [0; 32],
            dst: FAKE,
        };
        let jpath = dir.path().join("j");
        let mut j = Journal::create(&jpath, h).unwrap();
        let data = vec![0xa5; bs as usize];
        // 31 entries of 1 MiB + 17 fit in 32 MiB; the 32nd starts a batch.
        for b in 0..31 {
            j.record(b, Some(&data)).unwrap();
        }
        assert_eq!(std::fs::metadata(&jpath).unwrap().len(), HEADER_LEN as u64);
        for b in 31..40 {
            j.record(b, Some(&data)).unwrap();
        }
        assert!(std::fs::metadata(&jpath).unwrap().len() > HEADER_LEN as u64);
        j.sync().unwrap();
        drop(j);
        let j = Journal::open(&jpath, &FAKE).unwrap().unwrap();
        assert_eq!(journaled(&j), (0..40).collect::<Vec<u64>>());
        assert_eq!(j.next_seq, 2);
    }

    /// The zeros fallback for filesystems without PUNCH_HOLE, and the
    /// device order's last resort.
    #[test]
    fn zero_fallbacks_write_zeros_within_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, pattern(3, 3 * B as usize)).unwrap();
        let f = File::options().read(true).write(true).open(&p).unwrap();
        zero_file_range(&f, B, 4 * B).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 3 * B);
        write_zeros(&f, 0, 100).unwrap();
        let got = std::fs::read(&p).unwrap();
        assert!(got[..100].iter().all(|&x| x == 0));
        assert_eq!(
            &got[100..B as usize],
            &pattern(3, 3 * B as usize)[100..B as usize]
        );
        assert!(got[B as usize..].iter().all(|&x| x == 0));
        // A regular file is not a block device: BLKZEROOUT says so, and the
        // device order goes on to ZERO_RANGE or zeros.
        std::fs::write(&p, pattern(3, 3 * B as usize)).unwrap();
        assert!(blkzeroout(&f, 0, B).is_err());
        zero_device_range(&f, B, B).unwrap();
        let got = std::fs::read(&p).unwrap();
        assert!(got[B as usize..2 * B as usize].iter().all(|&x| x == 0));
        assert_eq!(
            &got[..B as usize],
            &pattern(3, 3 * B as usize)[..B as usize]
        );
    }
}
