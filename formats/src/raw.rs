//! Raw images: guest offset = file offset; allocation from the store's
//! SEEK_DATA/SEEK_HOLE view (everything is data where holes are unknown).

use std::sync::Arc;

use crate::error::{read_exact_at, Error, Result};
use crate::Storage;

pub struct Raw {
    file: Arc<dyn Storage>,
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
        let size = file.size().map_err(|source| Error::Io {
            offset: 0,
            len: 0,
            source,
        })?;
        Ok(Raw { file, size })
    }

    pub fn virtual_size(&self) -> u64 {
        self.size
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

    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        read_exact_at(&*self.file, buf, offset, "raw image data")
    }
}
