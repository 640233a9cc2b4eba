//! qemu's image locking, so imgsync and a running qemu keep out of each
//! other's way as `qemu-img` and qemu do.
//!
//! qemu (block/file-posix.c, `raw_apply_lock_bytes` and
//! `raw_check_lock_bytes`) takes shared OFD locks (`F_OFD_SETLK`, `F_RDLCK`)
//! on single bytes of the image file, one per permission bit:
//!
//! | byte | meaning |
//! | --- | --- |
//! | 100 + bit | the holder uses permission `bit` |
//! | 200 + bit | the holder does not share permission `bit`: nobody else may use it |
//!
//! with the bits (include/block/block-common.h) 0 consistent read, 1 write,
//! 2 write unchanged, 3 resize. A conflict is found by testing
//! (`F_OFD_GETLK` with `F_WRLCK`): before using a permission, byte 200+bit
//! must be free of other holders; before unsharing one, byte 100+bit must
//! be. Shared locks never block each other, so a test is what refuses.
//!
//! What imgsync takes (matching qemu-img 10, checked against `qemu-io`):
//!
//! - reading an image (`qemu-img convert`'s source, every file of the
//!   backing chain): uses consistent read, unshares write and resize. A
//!   qemu that has the image open read-write (a running VM) holds 101, so
//!   this is refused; a read-only holder (`qemu-io -r`, a VM's backing
//!   file) is not in the way. While imgsync reads, a qemu cannot open the
//!   image for writing.
//! - `-U/--force-share`: uses consistent read only and shares everything,
//!   as qemu's `force-share=on`; [`Locked::in_use`] tells whether a writer
//!   holds the image (for a warning).
//! - writing an existing image in place (sync's DST, convert onto a block
//!   device): uses consistent read, write and resize, unshares write and
//!   resize, so a VM cannot start on it mid-sync, and a DST that a running
//!   qemu holds (or that a reader has asked to keep unchanged) is refused.
//!
//! The locks belong to the open file description, so they last as long as
//! the file (and its clones) stay open, and end with it.
//!
//! Fallback: a file system without OFD locks (`EINVAL`, `EOPNOTSUPP`,
//! `ENOLCK`, e.g. some network file systems) is used unlocked, as qemu's
//! `locking=auto` does.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// qemu's lock byte bases (`RAW_LOCK_PERM_BASE`, `RAW_LOCK_SHARED_BASE`).
const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// qemu's permission bits (`BLK_PERM_*`).
const CONSISTENT_READ: u32 = 1 << 0;
const WRITE: u32 = 1 << 1;
const WRITE_UNCHANGED: u32 = 1 << 2;
const RESIZE: u32 = 1 << 3;
const ALL: u32 = CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE;

/// How imgsync uses an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Reading it as a source: nobody may write it meanwhile.
    Read,
    /// `-U/--force-share`: reading it whatever others do.
    ReadForceShare,
    /// Writing it in place.
    Write,
}

impl Access {
    /// (permissions used, permissions shared), as qemu-img asks for them.
    fn perms(self) -> (u32, u32) {
        match self {
            Access::Read => (CONSISTENT_READ, CONSISTENT_READ | WRITE_UNCHANGED),
            Access::ReadForceShare => (CONSISTENT_READ, ALL),
            Access::Write => (
                CONSISTENT_READ | WRITE | RESIZE,
                CONSISTENT_READ | WRITE_UNCHANGED,
            ),
        }
    }
}

/// The outcome of locking a file.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds a lock that conflicts with `access`.
    #[error("is in use by another process")]
    InUse,
    #[error("locking the image")]
    Io(#[source] io::Error),
}

/// The locks were taken (or the file system has none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Locked {
    /// With [`Access::ReadForceShare`]: another process has the image
    /// open for writing (the copy may be inconsistent).
    pub in_use: bool,
}

/// Takes qemu's locks for `access` on `file`; a conflict with another
/// process's locks is [`LockError::InUse`] and leaves nothing locked.
pub fn lock(file: &File, access: Access) -> Result<Locked, LockError> {
    let (perm, shared) = access.perms();
    let mut bytes = Vec::new();
    for bit in 0..4 {
        if perm & (1 << bit) != 0 {
            bytes.push(PERM_BASE + bit);
        }
        if ALL & !shared & (1 << bit) != 0 {
            bytes.push(SHARED_BASE + bit);
        }
    }
    for (i, &b) in bytes.iter().enumerate() {
        match set(file, b, libc::F_RDLCK as i16) {
            Ok(()) => {}
            Err(e) if unsupported(&e) => return Ok(Locked::default()),
            Err(e) => {
                unlock(file, &bytes[..i]);
                return Err(LockError::Io(e));
            }
        }
    }
    // As raw_check_lock_bytes: each permission used must not be unshared
    // by another holder, each permission unshared must not be used by one.
    let mut conflicts = Vec::new();
    for bit in 0..4 {
        if perm & (1 << bit) != 0 {
            conflicts.push(SHARED_BASE + bit);
        }
        if ALL & !shared & (1 << bit) != 0 {
            conflicts.push(PERM_BASE + bit);
        }
    }
    for b in conflicts {
        match held_by_other(file, b) {
            Ok(false) => {}
            Ok(true) => {
                unlock(file, &bytes);
                return Err(LockError::InUse);
            }
            Err(e) => {
                unlock(file, &bytes);
                return Err(LockError::Io(e));
            }
        }
    }
    let in_use = access == Access::ReadForceShare
        && held_by_other(file, PERM_BASE + 1).map_err(LockError::Io)?;
    Ok(Locked { in_use })
}

/// What a DST that another process holds is refused with.
pub const IN_USE_FOR_WRITING: &str =
    "is in use by another process (a running VM?); stop it before writing to it";

/// [`lock`] for [`Access::Write`] as an I/O error, for outputs written in
/// place: a conflict says [`IN_USE_FOR_WRITING`].
pub fn lock_for_writing(file: &File) -> io::Result<()> {
    match lock(file, Access::Write) {
        Ok(_) => Ok(()),
        Err(LockError::InUse) => Err(io::Error::other(IN_USE_FOR_WRITING)),
        Err(LockError::Io(e)) => Err(e),
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(libc::ENOLCK)
    )
}

fn unlock(file: &File, bytes: &[i64]) {
    for &b in bytes {
        let _ = set(file, b, libc::F_UNLCK as i16);
    }
}

fn flock_at(byte: i64, kind: i16) -> libc::flock {
    libc::flock {
        l_type: kind,
        l_whence: libc::SEEK_SET as i16,
        l_start: byte,
        l_len: 1,
        // OFD locks require l_pid 0.
        l_pid: 0,
    }
}

/// `F_OFD_SETLK` of one byte (never waits: shared locks do not block
/// each other, and qemu holds no exclusive ones).
fn set(file: &File, byte: i64, kind: i16) -> io::Result<()> {
    let mut fl = flock_at(byte, kind);
    // SAFETY: F_OFD_SETLK reads the `struct flock` the pointer refers to,
    // which lives on this stack frame for the call; `file` keeps the
    // descriptor open.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether another open file description holds a lock on `byte`
/// (`qemu_lock_fd_test`: `F_OFD_GETLK` with a write lock, which only our
/// own locks never conflict with).
fn held_by_other(file: &File, byte: i64) -> io::Result<bool> {
    let mut fl = flock_at(byte, libc::F_WRLCK as i16);
    // SAFETY: F_OFD_GETLK reads and rewrites the `struct flock` the pointer
    // refers to, which lives on this stack frame for the call.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r == -1 {
        let e = io::Error::last_os_error();
        if unsupported(&e) {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(fl.l_type != libc::F_UNLCK as i16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (tempfile::TempDir, File, File) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        File::create(&p).unwrap().set_len(1 << 20).unwrap();
        let a = File::open(&p).unwrap();
        let b = File::open(&p).unwrap();
        (dir, a, b)
    }

    #[test]
    fn readers_share_an_image() {
        let (_d, a, b) = pair();
        lock(&a, Access::Read).unwrap();
        lock(&b, Access::Read).unwrap();
    }

    #[test]
    fn a_writer_keeps_readers_out_and_readers_keep_writers_out() {
        let (_d, a, b) = pair();
        lock(&a, Access::Write).unwrap();
        assert!(matches!(lock(&b, Access::Read), Err(LockError::InUse)));
        assert!(matches!(lock(&b, Access::Write), Err(LockError::InUse)));
        drop(a);
        lock(&b, Access::Read).unwrap();
        let (_d, a, b) = pair();
        lock(&a, Access::Read).unwrap();
        assert!(matches!(lock(&b, Access::Write), Err(LockError::InUse)));
    }

    #[test]
    fn force_share_reads_beside_a_writer_and_says_so() {
        let (_d, a, b) = pair();
        assert!(!lock(&b, Access::ReadForceShare).unwrap().in_use);
        lock(&a, Access::Write).unwrap();
        assert!(lock(&b, Access::ReadForceShare).unwrap().in_use);
    }

    #[test]
    fn a_refused_lock_leaves_nothing_locked() {
        let (d, a, b) = pair();
        lock(&a, Access::Write).unwrap();
        assert!(matches!(lock(&b, Access::Read), Err(LockError::InUse)));
        drop(a);
        // b stays open: had it kept 201 or 203, a writer would be refused.
        let c = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(d.path().join("img"))
            .unwrap();
        lock(&c, Access::Write).unwrap();
        drop(b);
    }
}
