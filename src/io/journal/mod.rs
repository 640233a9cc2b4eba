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
//! # Durability order
//!
//! Sync: the journal is created (`O_EXCL`) and locked, its header written
//! and fsynced, then its directory fsynced, so the marker survives a crash
//! → entries are buffered by [`Journal::record`] → [`Journal::sync`] writes
//! them as one batch and fdatasyncs the journal → only then does the caller
//! write those blocks of DST → … → the caller fsyncs DST →
//! [`Journal::remove`] unlinks the journal and fsyncs its directory.
//! Rollback has an order of its own, in `rollback.rs`.
//!
//! An exclusive `flock` on the journal keeps two imgsync processes from
//! using it at once (no-op on filesystems without locks).
//!
//! # Where the code is
//!
//! - this file: the writer ([`Journal`]), the destination's identity
//!   ([`DstId`]), where journals live ([`path_of`], [`device_dir`]),
//!   whether a journal is ours and whose it is ([`state`]), the journal
//!   file's lifecycle (open, lock, remove) and [`JournalError`];
//! - `format.rs`: the on-disk format: its table, the encoding and decoding
//!   of the header, batch headers and entries, and their checksums;
//! - `reader.rs`: reading a journal back: the header, each batch checked
//!   whole, the scan, and what counts as a torn tail;
//! - `rollback.rs`: [`rollback()`] and its durability order.
//!
//! Making holes and zeros (for rollback) is [`super::zero`]'s.

mod format;
mod reader;
mod rollback;
#[cfg(test)]
mod testutil;

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, OFlags};
use rustix::io::Errno;

pub use format::{space_needed, MAGIC, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, VERSION};
pub use rollback::{rollback, RollbackReport};

use format::{
    check_header, encode_batch_header, encode_entry_head, encode_header, old_block_len,
    BATCH_HEADER_LEN, ENTRY_HEADER_LEN, HEADER_LEN, MAX_BATCH_BYTES,
};
use reader::{read_header, scan, Reader};

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
        let mut reader = Reader::new(&file, path, &header, len);
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
        // data.len() == expected ≤ block_size.
        self.pending
            .extend_from_slice(&encode_entry_head(block, old));
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

/// The journal at `dst`'s journal name and what it says about `dst`,
/// whatever name `dst` gives the image (`None`: DST cannot be opened).
pub fn state_of(dst: &Path) -> Option<(PathBuf, JournalState)> {
    let file = File::open(dst).ok()?;
    let meta = file.metadata().ok()?;
    let id = DstId::of(&file).ok()?;
    let j = path_of(dst, &meta);
    let state = state(&j, &id);
    Some((j, state))
}

/// The journal of an interrupted sync of `dst`, if there is one.
pub fn in_progress(dst: &Path) -> Option<PathBuf> {
    match state_of(dst) {
        Some((j, JournalState::InProgress)) => Some(j),
        _ => None,
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

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

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
}
