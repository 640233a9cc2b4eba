//! Where an output image is written: a new file that appears under its final
//! name only when complete, or a block device written in place.
//!
//! Files: the data goes to an unnamed `O_TMPFILE` in the destination's
//! directory, so nothing is ever left behind, even after SIGKILL or a power
//! cut. On commit it is fsynced, linked into the directory (straight to the
//! final name when that is free, else to a temporary name renamed over the
//! old file) and the directory is fsynced. Fallback order when the
//! filesystem has no `O_TMPFILE` (EOPNOTSUPP, EISDIR, EINVAL): a named
//! temporary file `.NAME.imgsync-PID-N` in the same directory, removed when
//! the output is dropped without commit (errors, and SIGINT/SIGTERM, which
//! the engine turns into errors).
//!
//! Block devices: written in place (there is no temporary to rename), with
//! qemu's write locks taken (refused while a running qemu uses it); ranges
//! that must read as zeros are zeroed through
//! [`super::zero::zero_device_range`] (BLKZEROOUT, with the fallback order
//! documented there).
//!
//! Permissions (as `rsync -a`): a new file takes the source's permission
//! bits ([`Output::adopt`]) and, when this process is root, its owner and
//! group; setuid/setgid are dropped when not root. A replaced file keeps
//! its own mode, owner and group; a block device's node is never touched.
//! Both are set on the descriptor before the file is linked, so the file
//! never appears under its name with wider permissions, whatever the umask.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use imgsync_formats::WriteStorage;
use rustix::fs::{AtFlags, Mode, OFlags, CWD};
use rustix::io::Errno;

/// An output being written; see the module docs.
pub struct Output {
    file: File,
    path: PathBuf,
    kind: Kind,
    /// The file this output replaces kept its own metadata: `adopt` is a
    /// no-op.
    replaces: bool,
    committed: bool,
    /// A named temporary file (no O_TMPFILE) is created 0600, so nobody
    /// else can open the disk's data while it is written; the mode a new
    /// file gets when no source says otherwise (0666 less the umask) is
    /// set at commit unless [`Output::adopt`] set one.
    default_mode: Option<u32>,
    adopted: std::sync::atomic::AtomicBool,
}

/// The process's umask, read without changing it (`umask(2)` can only set
/// it, racing with other threads); 022 when /proc does not say.
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

/// A source file's permission bits and owner, for a new output to take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileMeta {
    /// `st_mode & 0o7777`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl FileMeta {
    /// The permission bits and owner of the file at `path` (following
    /// symlinks, as the image is read through them).
    pub fn of_path(path: &Path) -> io::Result<FileMeta> {
        Ok(FileMeta::of(&std::fs::metadata(path)?))
    }

    pub fn of(m: &std::fs::Metadata) -> FileMeta {
        FileMeta {
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
        }
    }
}

/// setuid and setgid: kept only by root (as rsync and cp -p do).
const SET_ID_BITS: u32 = 0o6000;

/// Whether this process runs as root (may give files away).
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Gives `file` the owner (root only: others cannot give files away) and
/// then the permission bits of `meta`. The owner goes first: chown clears
/// setuid/setgid.
fn apply_meta(file: &File, meta: &FileMeta) -> io::Result<()> {
    let root = is_root();
    if root {
        std::os::unix::fs::fchown(file, Some(meta.uid), Some(meta.gid))?;
    }
    let mode = if root {
        meta.mode & 0o7777
    } else {
        meta.mode & 0o7777 & !SET_ID_BITS
    };
    file.set_permissions(std::fs::Permissions::from_mode(mode))
}

enum Kind {
    /// An unnamed O_TMPFILE in `dir`.
    Unnamed { dir: File },
    /// A named temporary file in `dir`.
    Named { dir: File, temp: PathBuf },
    /// A block device written in place.
    BlockDevice { size: u64 },
}

/// A counter making temporary names unique within the process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Output {
    /// Prepares to write `path`. An existing regular file is replaced only
    /// on commit (its permissions are kept); an existing block device is
    /// opened for writing in place; anything else is refused.
    pub fn create(path: &Path) -> io::Result<Output> {
        Output::create_with(path, true)
    }

    /// `create`, optionally without trying O_TMPFILE (to test the fallback).
    fn create_with(path: &Path, try_tmpfile: bool) -> io::Result<Output> {
        match std::fs::metadata(path) {
            Ok(m) if m.file_type().is_block_device() => {
                // O_EXCL on a block device: refused (EBUSY) while it is
                // mounted or otherwise held, so a live file system is never
                // written over.
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(OFlags::EXCL.bits() as i32)
                    .open(path)
                    .map_err(|e| {
                        if e.raw_os_error() == Some(Errno::BUSY.raw_os_error()) {
                            io::Error::other(
                                "the device is in use (mounted, or held by another program)",
                            )
                        } else {
                            e
                        }
                    })?;
                // qemu's write locks (see `lock`), held while the output is
                // open: a device a running qemu uses is refused.
                super::lock::lock_for_writing(&file)?;
                let size = rustix::fs::seek(&file, rustix::fs::SeekFrom::End(0))?;
                return Ok(Output {
                    file,
                    path: path.to_path_buf(),
                    kind: Kind::BlockDevice { size },
                    replaces: true,
                    committed: false,
                    default_mode: None,
                    adopted: Default::default(),
                });
            }
            Ok(m) if m.is_dir() => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "is a directory",
                ))
            }
            Ok(m) if !m.is_file() => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "exists and is not a regular file or block device",
                ))
            }
            _ => {}
        }
        let existing = std::fs::metadata(path).ok().map(|m| FileMeta::of(&m));
        let name = path
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "names no file"))?;
        let dir_path = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let dir = File::open(dir_path)?;
        let mode = Mode::from_raw_mode(existing.map_or(0o666, |m| m.mode));
        let unnamed = if try_tmpfile {
            rustix::fs::openat(
                &dir,
                ".",
                OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
                mode,
            )
        } else {
            Err(Errno::OPNOTSUPP)
        };
        let (file, kind) = match unnamed {
            Ok(fd) => (File::from(fd), Kind::Unnamed { dir }),
            Err(Errno::OPNOTSUPP) | Err(Errno::ISDIR) | Err(Errno::INVAL) => {
                let temp = dir_path.join(temp_name(name));
                let fd = rustix::fs::openat(
                    CWD,
                    &temp,
                    OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )?;
                (File::from(fd), Kind::Named { dir, temp })
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(old) = existing {
            // The umask may have narrowed the mode at creation; keep the old
            // file's permissions and owner, as an in-place rewrite would.
            // Only root can give the file to another user; anyone may set a
            // group it is in, and otherwise the new file is the writer's
            // (as with any replace-by-rename).
            let me = file.metadata()?;
            if old.uid != me.uid() || old.gid != me.gid() {
                let uid = (is_root() && old.uid != me.uid()).then_some(old.uid);
                match std::os::unix::fs::fchown(&file, uid, Some(old.gid)) {
                    Ok(()) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
                    Err(e) => return Err(e),
                }
            }
            let mode = if is_root() {
                old.mode
            } else {
                old.mode & !SET_ID_BITS
            };
            file.set_permissions(std::fs::Permissions::from_mode(mode))?;
        }
        let default_mode =
            (matches!(kind, Kind::Named { .. }) && existing.is_none()).then(|| 0o666 & !umask());
        Ok(Output {
            file,
            path: path.to_path_buf(),
            kind,
            replaces: existing.is_some(),
            committed: false,
            default_mode,
            adopted: Default::default(),
        })
    }

    /// Gives a new file the source's permission bits and, for root, its
    /// owner and group (see the module docs). A replaced file and a block
    /// device keep their own: this does nothing for them. Call before
    /// [`Output::commit`].
    pub fn adopt(&self, meta: &FileMeta) -> io::Result<()> {
        if self.replaces || self.is_block_device() {
            return Ok(());
        }
        apply_meta(&self.file, meta)?;
        self.adopted
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn is_block_device(&self) -> bool {
        matches!(self.kind, Kind::BlockDevice { .. })
    }

    /// A block device's size; `None` for files.
    pub fn device_size(&self) -> Option<u64> {
        match self.kind {
            Kind::BlockDevice { size } => Some(size),
            _ => None,
        }
    }

    /// Bytes free for an unprivileged writer on the destination filesystem
    /// (statvfs `f_bavail`); a block device's size.
    pub fn free_space(&self) -> io::Result<u64> {
        if let Kind::BlockDevice { size } = self.kind {
            return Ok(size);
        }
        let st = rustix::fs::fstatvfs(&self.file)?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// Sets a file's length (sparse: no blocks are allocated). Block devices
    /// keep their size.
    pub fn set_len(&self, len: u64) -> io::Result<()> {
        if self.is_block_device() {
            return Ok(());
        }
        self.file.set_len(len)
    }

    /// Makes `[offset, offset + len)` read as zeros on a block device
    /// ([`super::zero::zero_device_range`]). Files are new and read zeros
    /// wherever nothing was written, so this is a no-op for them.
    pub fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        if !self.is_block_device() || len == 0 {
            return Ok(());
        }
        super::zero::zero_device_range(&self.file, offset, len)
    }

    /// Makes the output durable and visible under its final name.
    pub fn commit(mut self) -> io::Result<()> {
        if let Some(mode) = self.default_mode {
            if !self.adopted.load(std::sync::atomic::Ordering::Relaxed) {
                self.file
                    .set_permissions(std::fs::Permissions::from_mode(mode))?;
            }
        }
        self.file.sync_all()?;
        match &self.kind {
            Kind::BlockDevice { .. } => {}
            Kind::Unnamed { dir } => {
                let name = self.path.file_name().unwrap_or_default().to_os_string();
                let proc_path = format!("/proc/self/fd/{}", {
                    use std::os::fd::AsRawFd;
                    self.file.as_raw_fd()
                });
                let link = |target: &Path| -> io::Result<()> {
                    match rustix::fs::linkat(CWD, &proc_path, dir, target, AtFlags::SYMLINK_FOLLOW)
                    {
                        // No /proc: the same through AT_EMPTY_PATH (needs
                        // CAP_DAC_READ_SEARCH).
                        Err(Errno::NOENT) => rustix::fs::linkat(
                            self.file.as_fd(),
                            "",
                            dir,
                            target,
                            AtFlags::EMPTY_PATH,
                        )?,
                        r => r?,
                    }
                    Ok(())
                };
                // Straight to the final name when it is free: no window in
                // which a temporary name exists.
                match link(Path::new(&name)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        let temp = PathBuf::from(temp_name(&name));
                        link(&temp)?;
                        if let Err(e) = rustix::fs::renameat(dir, &temp, dir, Path::new(&name)) {
                            let _ = rustix::fs::unlinkat(dir, &temp, AtFlags::empty());
                            return Err(e.into());
                        }
                    }
                    Err(e) => return Err(e),
                }
                rustix::fs::fsync(dir)?;
            }
            Kind::Named { dir, temp } => {
                std::fs::rename(temp, &self.path)?;
                rustix::fs::fsync(dir)?;
            }
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if let Kind::Named { temp, .. } = &self.kind {
            if !self.committed {
                let _ = std::fs::remove_file(temp);
            }
        }
    }
}

impl Output {
    /// A write past the end of a block device is refused (a file grows).
    fn check_in_device(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.kind {
            Kind::BlockDevice { size } if offset.saturating_add(len) > size => {
                Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "write at {offset:#x} of {len} bytes is past the end of the device ({size} bytes)"
                    ),
                ))
            }
            _ => Ok(()),
        }
    }
}

impl WriteStorage for Output {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_in_device(offset, buf.len() as u64)?;
        FileExt::write_all_at(&self.file, buf, offset)
    }

    fn write_vectored_all_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        /// Slices per pwritev (Linux's IOV_MAX).
        const IOV_MAX: usize = 1024;
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.check_in_device(offset, total)?;
        let mut pos = offset;
        let mut first = 0usize; // index of the first slice not fully written
        let mut skip = 0usize; // bytes of bufs[first] already written
        loop {
            while first < bufs.len() && bufs[first].len() == skip {
                first += 1;
                skip = 0;
            }
            if first >= bufs.len() {
                break;
            }
            let end = (first + IOV_MAX).min(bufs.len());
            let mut iov: Vec<io::IoSlice<'_>> = Vec::with_capacity(end - first);
            iov.push(io::IoSlice::new(&bufs[first][skip..]));
            for b in &bufs[first + 1..end] {
                iov.push(io::IoSlice::new(b));
            }
            let mut n = match rustix::io::pwritev(&self.file, &iov, pos) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            };
            pos += n as u64;
            // Advance past what was written.
            while n > 0 && first < bufs.len() {
                let left = bufs[first].len() - skip;
                if n >= left {
                    n -= left;
                    first += 1;
                    skip = 0;
                } else {
                    skip += n;
                    n = 0;
                }
            }
        }
        Ok(())
    }

    /// Starts writeback of a completed range without waiting
    /// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): with the default dirty
    /// limits (10 % of RAM) the kernel would otherwise write nothing until
    /// the final fsync, which then waits for all of it after the reading is
    /// done. Only a hint: durability comes from the fsync at commit, so
    /// errors are ignored.
    fn writeback_hint(&self, offset: u64, len: u64) {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: sync_file_range takes a file descriptor and integers, and
        // `self.file` keeps the descriptor open for the duration of the call.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                offset,
                len,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
}

fn temp_name(name: &std::ffi::OsStr) -> OsString {
    let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut s = OsString::from(".");
    // Keep the temporary name within NAME_MAX.
    let bytes = name.as_bytes();
    s.push(std::ffi::OsStr::from_bytes(&bytes[..bytes.len().min(200)]));
    s.push(format!(".imgsync-{}-{n}", std::process::id()));
    s
}

/// Free bytes (for an unprivileged writer) on the file system holding
/// `file`.
pub fn free_space_of(file: &File) -> io::Result<u64> {
    let st = rustix::fs::fstatvfs(file)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Free bytes on the file system holding the directory `dir`.
pub fn free_space_at(dir: &Path) -> io::Result<u64> {
    let st = rustix::fs::statvfs(dir)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_named_temporary_is_private_until_it_is_committed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        for adopt in [false, true] {
            let path = dir.path().join(format!("new-{adopt}.raw"));
            let out = Output::create_with(&path, false).unwrap();
            let temp_mode = out.file().metadata().unwrap().permissions().mode() & 0o7777;
            assert_eq!(
                temp_mode, 0o600,
                "the data is written where only we can read it"
            );
            if adopt {
                out.adopt(&FileMeta {
                    mode: 0o640,
                    uid: rustix::process::geteuid().as_raw(),
                    gid: rustix::process::getegid().as_raw(),
                })
                .unwrap();
            }
            out.commit().unwrap();
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
            let want = if adopt { 0o640 } else { 0o666 & !umask() };
            assert_eq!(mode, want, "adopt {adopt}");
        }
    }
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn output_appears_only_on_commit_for_both_kinds() {
        for tmpfile in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("out.img");
            let out = Output::create_with(&path, tmpfile).unwrap();
            out.write_all_at(b"hello", 4096).unwrap();
            out.set_len(1 << 20).unwrap();
            assert!(!path.exists(), "visible before commit (tmpfile {tmpfile})");
            out.commit().unwrap();
            let data = std::fs::read(&path).unwrap();
            assert_eq!(data.len(), 1 << 20);
            assert_eq!(&data[4096..4101], b"hello");
            assert_eq!(names(dir.path()), ["out.img"]);
        }
    }

    #[test]
    fn dropped_output_leaves_nothing_and_keeps_the_old_file() {
        for tmpfile in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("out.img");
            std::fs::write(&path, b"old").unwrap();
            let out = Output::create_with(&path, tmpfile).unwrap();
            out.write_all_at(b"new data", 0).unwrap();
            drop(out);
            assert_eq!(std::fs::read(&path).unwrap(), b"old");
            assert_eq!(names(dir.path()), ["out.img"], "tmpfile {tmpfile}");
        }
    }

    #[test]
    fn replacing_keeps_the_mode_of_the_old_file() {
        for tmpfile in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("out.img");
            std::fs::write(&path, b"old").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
            let out = Output::create_with(&path, tmpfile).unwrap();
            out.write_all_at(b"new", 0).unwrap();
            out.commit().unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), b"new");
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o640);
            assert_eq!(names(dir.path()), ["out.img"]);
        }
    }

    /// A new file takes the source's bits exactly: neither widened nor
    /// narrowed by the umask (0666 would be 0644 under the usual 022).
    #[test]
    fn new_file_adopts_the_source_mode_whatever_the_umask() {
        for tmpfile in [true, false] {
            for mode in [0o600, 0o666, 0o1750] {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("out.img");
                let out = Output::create_with(&path, tmpfile).unwrap();
                let me = out.file().metadata().unwrap();
                out.adopt(&FileMeta {
                    mode,
                    uid: me.uid(),
                    gid: me.gid(),
                })
                .unwrap();
                out.commit().unwrap();
                let m = std::fs::metadata(&path).unwrap();
                assert_eq!(m.mode() & 0o7777, mode, "tmpfile {tmpfile}");
            }
        }
    }

    /// As root, a new file takes the source's owner and group, and keeps
    /// setuid/setgid. Needs root; skipped visibly otherwise.
    #[test]
    fn new_file_takes_the_source_owner_as_root() {
        if !is_root() {
            eprintln!("SKIP new_file_takes_the_source_owner_as_root: not root");
            return;
        }
        for tmpfile in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("out.img");
            let out = Output::create_with(&path, tmpfile).unwrap();
            out.adopt(&FileMeta {
                mode: 0o6750,
                uid: 1234,
                gid: 5678,
            })
            .unwrap();
            out.commit().unwrap();
            let m = std::fs::metadata(&path).unwrap();
            assert_eq!((m.uid(), m.gid()), (1234, 5678), "tmpfile {tmpfile}");
            assert_eq!(
                m.mode() & 0o7777,
                0o6750,
                "chown must not clear set-id bits"
            );
        }
    }

    /// A replaced file keeps its own mode and owner whatever the source's;
    /// the owner part needs root.
    #[test]
    fn replaced_file_keeps_its_mode_and_owner_not_the_sources() {
        for tmpfile in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("out.img");
            std::fs::write(&path, b"old").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
            let owner = if is_root() {
                std::os::unix::fs::chown(&path, Some(4321), Some(8765)).unwrap();
                (4321, 8765)
            } else {
                let m = std::fs::metadata(&path).unwrap();
                (m.uid(), m.gid())
            };
            let out = Output::create_with(&path, tmpfile).unwrap();
            out.adopt(&FileMeta {
                mode: 0o600,
                uid: 1,
                gid: 1,
            })
            .unwrap();
            out.write_all_at(b"new", 0).unwrap();
            out.commit().unwrap();
            let m = std::fs::metadata(&path).unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), b"new");
            assert_eq!(m.mode() & 0o7777, 0o640, "tmpfile {tmpfile}");
            assert_eq!((m.uid(), m.gid()), owner, "tmpfile {tmpfile}");
        }
    }

    /// More slices than one pwritev takes (IOV_MAX), empty ones among them.
    #[test]
    fn vectored_writes_land_back_to_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.img");
        let out = Output::create(&path).unwrap();
        let pieces: Vec<Vec<u8>> = (0..3000u32)
            .map(|i| vec![(i % 251) as u8; (i % 7) as usize * 100])
            .collect();
        let slices: Vec<&[u8]> = pieces.iter().map(|p| p.as_slice()).collect();
        out.write_vectored_all_at(&slices, 512).unwrap();
        out.write_vectored_all_at(&[&[][..], &[][..]], 0).unwrap();
        out.commit().unwrap();
        let data = std::fs::read(&path).unwrap();
        let expected: Vec<u8> = pieces.concat();
        assert_eq!(&data[512..], &expected[..]);
        assert!(data[..512].iter().all(|&b| b == 0));
    }

    #[test]
    fn directories_and_missing_parents_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Output::create(dir.path()).is_err());
        assert!(Output::create(&dir.path().join("no/such/file")).is_err());
    }

    #[test]
    fn free_space_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let out = Output::create(&dir.path().join("x")).unwrap();
        assert!(out.free_space().unwrap() > 0);
        assert_eq!(out.device_size(), None);
    }
}
