//! A local file or block device as a [`Storage`].
//!
//! Allocation comes from `lseek(SEEK_DATA/SEEK_HOLE)`, looped to the end.
//! Fallback order: a filesystem or device that rejects SEEK_DATA (EINVAL,
//! EOPNOTSUPP) reports the whole file as data; no FIEMAP.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use imgsync_formats::Storage;
use rustix::fs::SeekFrom;
use rustix::io::Errno;

pub struct LocalFile {
    file: File,
    size: u64,
    is_block_device: bool,
}

impl LocalFile {
    /// Opens `path` read-only. A block device's size is its device size
    /// (seek to the end), a file's its length.
    pub fn open(path: &Path) -> io::Result<LocalFile> {
        let file = File::open(path)?;
        LocalFile::from_file(file)
    }

    pub fn from_file(file: File) -> io::Result<LocalFile> {
        let meta = file.metadata()?;
        let is_block_device = meta.file_type().is_block_device();
        let size = if is_block_device {
            rustix::fs::seek(&file, SeekFrom::End(0))?
        } else if meta.is_file() {
            meta.len()
        } else if meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "is a directory",
            ));
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or block device",
            ));
        };
        Ok(LocalFile {
            file,
            size,
            is_block_device,
        })
    }

    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Storage for LocalFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(&self.file, buf, offset)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.size)
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        if offset >= self.size {
            return Ok(None);
        }
        let start = match rustix::fs::seek(&self.file, SeekFrom::Data(offset)) {
            Ok(s) => s,
            // No data at or after offset.
            Err(Errno::NXIO) => return Ok(None),
            // No hole support: everything is data.
            Err(Errno::INVAL) | Err(Errno::OPNOTSUPP) => return Ok(Some((offset, self.size))),
            Err(e) => return Err(e.into()),
        };
        if start >= self.size {
            return Ok(None);
        }
        let end = match rustix::fs::seek(&self.file, SeekFrom::Hole(start)) {
            Ok(e) => e.min(self.size),
            Err(Errno::NXIO) => self.size,
            Err(e) => return Err(e.into()),
        };
        Ok(Some((start, end.max(start + 1).min(self.size))))
    }

    /// `posix_fadvise(WILLNEED)`: the kernel starts reading the range into
    /// the page cache without waiting, so many reads are in flight at once
    /// (data extents of a sparse image are scattered; one read at a time
    /// waits on each).
    fn will_need(&self, offset: u64, len: u64) {
        if let Some(len) = std::num::NonZeroU64::new(len) {
            let _ =
                rustix::fs::fadvise(&self.file, offset, Some(len), rustix::fs::Advice::WillNeed);
        }
    }
}

/// A descriptor the caller was handed open (`--progress-fd N`, as a shell
/// opens `3>log`), duplicated (close-on-exec) into a `File` of our own: `n`
/// itself is never closed. An `n` that is not open is EBADF.
pub fn dup_inherited_fd(n: i32) -> io::Result<File> {
    use std::os::fd::FromRawFd;
    if n < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: F_DUPFD_CLOEXEC takes any number; the kernel checks that it
    // is open (EBADF otherwise) and returns a new descriptor (>= 3).
    let fd = unsafe { libc::fcntl(n, libc::F_DUPFD_CLOEXEC, 3) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created by fcntl and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::Command;

    /// Walks all data regions through `next_data`.
    fn data_regions(s: &dyn Storage) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut pos = 0;
        while let Some((start, end)) = s.next_data(pos).unwrap() {
            assert!(
                start >= pos && end > start,
                "progress at {pos}: {start}..{end}"
            );
            out.push((start, end));
            pos = end;
        }
        out
    }

    fn sparse_file(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
        let path = dir.join("sparse.raw");
        let size = 8u64 << 20;
        let f = File::create(&path).unwrap();
        f.set_len(size).unwrap();
        let mut content = vec![0u8; size as usize];
        for (off, byte) in [(1u64 << 20, 0xaau8), (5 << 20, 0x55)] {
            let data = vec![byte; 128 << 10];
            f.write_all_at(&data, off).unwrap();
            content[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
        (path, content)
    }

    #[test]
    fn sparse_file_reports_its_data_regions_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let (path, content) = sparse_file(dir.path());
        let f = LocalFile::open(&path).unwrap();
        assert_eq!(f.size().unwrap(), content.len() as u64);
        let regions = data_regions(&f);
        // Content is checked always; exact allocation only where holes exist.
        let mut buf = vec![0u8; content.len()];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert!(buf == content);
        let covered: u64 = regions.iter().map(|(s, e)| e - s).sum();
        if covered < content.len() as u64 {
            // Holes supported: data regions cover both writes and little else.
            for off in [1u64 << 20, 5 << 20] {
                assert!(
                    regions
                        .iter()
                        .any(|&(s, e)| s <= off && off + (128 << 10) <= e),
                    "{regions:?}"
                );
            }
            assert!(
                covered <= 2 * (1 << 20),
                "too much data reported: {regions:?}"
            );
        }
    }

    #[test]
    fn reading_past_the_end_is_unexpected_eof() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("small");
        File::create(&path).unwrap().write_all(b"0123").unwrap();
        let f = LocalFile::open(&path).unwrap();
        let mut buf = [0u8; 8];
        let err = f.read_exact_at(&mut buf, 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(f.next_data(4).unwrap(), None);
    }

    #[test]
    fn fully_written_file_is_one_data_region() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("full");
        File::create(&path)
            .unwrap()
            .write_all(&[7u8; 100_000])
            .unwrap();
        let f = LocalFile::open(&path).unwrap();
        assert_eq!(data_regions(&f), vec![(0, 100_000)]);
    }

    #[test]
    fn directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = LocalFile::open(dir.path()).err().unwrap();
        assert!(err.to_string().contains("directory"), "{err}");
    }

    /// The fallback for stores without hole support: everything is data.
    #[test]
    fn storage_without_hole_support_reports_all_data() {
        let v = vec![0u8; 4096];
        assert_eq!(data_regions(&v), vec![(0, 4096)]);
    }

    /// A block device's size is the device size (loop device over a sparse
    /// file). Needs root and losetup; skipped visibly otherwise.
    #[test]
    fn block_device_size_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let (path, content) = sparse_file(dir.path());
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&path)
            .output();
        let dev = match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
            _ => {
                eprintln!("SKIP block_device_size_and_data: losetup unavailable (not root?)");
                return;
            }
        };
        let result = std::panic::catch_unwind(|| {
            let f = LocalFile::open(Path::new(&dev)).unwrap();
            assert!(f.is_block_device());
            assert_eq!(f.size().unwrap(), content.len() as u64);
            let mut buf = vec![0u8; 128 << 10];
            f.read_exact_at(&mut buf, 5 << 20).unwrap();
            assert!(buf.iter().all(|&b| b == 0x55));
            let covered: u64 = data_regions(&f).iter().map(|(s, e)| e - s).sum();
            assert!(covered > 0);
        });
        let _ = Command::new("losetup").args(["-d", &dev]).status();
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
    }
}
