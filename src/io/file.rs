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
}
