//! Raw images: guest offset = file offset; allocation from the store's
//! SEEK_DATA/SEEK_HOLE view (everything is data where holes are unknown).
//! Like qemu, the virtual size is the file size rounded up to whole 512-byte
//! sectors (`bdrv_co_getlength` counts sectors); the tail past the end of
//! the file is a hole that reads as zeros. A copy into a raw file keeps
//! the file's exact length ([`Raw::file_size`]): a file is a file.

use std::sync::Arc;

use crate::error::{read_exact_at, Error, Result};
use crate::Storage;

/// qemu's BDRV_SECTOR_SIZE: raw virtual sizes are whole sectors.
pub const SECTOR_SIZE: u64 = 512;

pub struct Raw {
    file: Arc<dyn Storage>,
    /// The store's length in bytes.
    file_size: u64,
    /// `file_size` rounded up to SECTOR_SIZE.
    size: u64,
}

/// A run of a raw image: data (allocated in the file) or a hole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawRun {
    pub data: bool,
    pub len: u64,
}

impl Raw {
    pub fn open(file: Arc<dyn Storage>) -> Result<Raw> {
        let file_size = file.size().map_err(|source| Error::Io {
            offset: 0,
            len: 0,
            source,
        })?;
        let size = file_size
            .checked_next_multiple_of(SECTOR_SIZE)
            .ok_or_else(|| Error::invalid(format!("raw file size {file_size:#x} is too large")))?;
        Ok(Raw {
            file,
            file_size,
            size,
        })
    }

    pub fn virtual_size(&self) -> u64 {
        self.size
    }

    /// The file's length in bytes (at most a sector short of the virtual
    /// size): what a raw copy of it holds.
    pub fn file_size(&self) -> u64 {
        self.file_size
    }

    pub fn file(&self) -> &Arc<dyn Storage> {
        &self.file
    }

    /// The run of data or hole starting at `offset`, at most `max_len` bytes.
    pub fn lookup(&self, offset: u64, max_len: u64) -> Result<RawRun> {
        let end = offset.saturating_add(max_len).min(self.size);
        if offset >= end {
            return Ok(RawRun {
                data: false,
                len: 0,
            });
        }
        let next = self.file.next_data(offset).map_err(|source| Error::Io {
            offset,
            len: 0,
            source,
        })?;
        Ok(match next {
            Some((start, data_end)) if start <= offset => RawRun {
                data: true,
                len: data_end
                    .min(end)
                    .saturating_sub(offset)
                    .max(1.min(end - offset)),
            },
            Some((start, _)) => RawRun {
                data: false,
                len: start.min(end) - offset,
            },
            None => RawRun {
                data: false,
                len: end - offset,
            },
        })
    }

    /// Reads guest bytes; past the end of the file (inside the last sector)
    /// reads zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let avail = self.file_size.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(avail);
        if !head.is_empty() {
            read_exact_at(&*self.file, head, offset, "raw image data")?;
        }
        tail.fill(0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_sized_file_rounds_up_to_a_sector_of_zeros() {
        // 1000 bytes of 0xaa: the guest sees 1024 bytes, the last 24 zero.
        let raw = Raw::open(Arc::new(vec![0xaau8; 1000])).unwrap();
        assert_eq!(raw.virtual_size(), 1024);
        assert_eq!(raw.file_size(), 1000);
        let mut buf = [0x55u8; 48];
        raw.read_at(&mut buf, 976).unwrap();
        assert_eq!(buf[..24], [0xaa; 24]);
        assert_eq!(buf[24..], [0; 24]);
        assert_eq!(
            raw.lookup(0, 1024).unwrap(),
            RawRun {
                data: true,
                len: 1000
            }
        );
        assert_eq!(
            raw.lookup(1000, 1024).unwrap(),
            RawRun {
                data: false,
                len: 24
            }
        );
        assert!(raw.read_at(&mut buf, 1000).is_ok());
    }

    #[test]
    fn sector_multiple_keeps_its_size() {
        let raw = Raw::open(Arc::new(vec![1u8; 4096])).unwrap();
        assert_eq!(raw.virtual_size(), 4096);
    }
}
