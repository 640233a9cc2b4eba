//! The positioned-read trait every format reads through.

use std::io;

/// A byte store an image lives in: a file, a block device, or a buffer.
///
/// Implementations must be usable from several threads at once (positioned
/// reads, no shared cursor).
pub trait Storage: Send + Sync {
    /// Fills `buf` from `offset`; reading past the end is an
    /// `io::ErrorKind::UnexpectedEof` error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Size in bytes (a file's length, a block device's size).
    fn size(&self) -> io::Result<u64>;

    /// The first data region starting at or after `offset`, as `(start, end)`,
    /// or `None` when only holes remain. Stores that cannot tell holes from
    /// data report everything as data (the default).
    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        let size = self.size()?;
        Ok((offset < size).then_some((offset, size)))
    }

    /// A hint that `[offset, offset + len)` will be read soon (a file
    /// starts reading it ahead). Only a hint: no error, no effect on
    /// content. The default does nothing.
    fn will_need(&self, _offset: u64, _len: u64) {}
}

/// A byte store an image is written to: a file or block device (positioned
/// writes, no shared cursor), or a buffer in tests.
pub trait WriteStorage: Send + Sync {
    /// Writes all of `buf` at `offset`, growing the store when needed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Writes `bufs` back to back from `offset` (a file does it in one
    /// vectored write, without gathering the pieces first).
    fn write_vectored_all_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let mut pos = offset;
        for b in bufs {
            self.write_all_at(b, pos)?;
            pos += b.len() as u64;
        }
        Ok(())
    }

    /// A hint that `[offset, offset + len)` is complete and may be written
    /// back to disk now (a file starts writeback without waiting). Callers
    /// give ranges in order; the default does nothing.
    fn writeback_hint(&self, _offset: u64, _len: u64) {}
}

/// An in-memory store for tests and fuzzers: grows on write.
impl WriteStorage for std::sync::Mutex<Vec<u8>> {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut v = self
            .lock()
            .map_err(|_| io::Error::other("poisoned buffer lock"))?;
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let end = start
            .checked_add(buf.len())
            .ok_or_else(|| io::Error::other("write past the address space"))?;
        if v.len() < end {
            v.resize(end, 0);
        }
        v[start..end].copy_from_slice(buf);
        Ok(())
    }
}

impl<T: WriteStorage + ?Sized> WriteStorage for std::sync::Arc<T> {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_all_at(buf, offset)
    }
    fn write_vectored_all_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        (**self).write_vectored_all_at(bufs, offset)
    }
    fn writeback_hint(&self, offset: u64, len: u64) {
        (**self).writeback_hint(offset, len)
    }
}

impl<T: WriteStorage + ?Sized> WriteStorage for &T {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_all_at(buf, offset)
    }
    fn write_vectored_all_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        (**self).write_vectored_all_at(bufs, offset)
    }
    fn writeback_hint(&self, offset: u64, len: u64) {
        (**self).writeback_hint(offset, len)
    }
}

impl Storage for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_slice().read_exact_at(buf, offset)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

impl Storage for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).ok();
        let src = start
            .and_then(|s| s.checked_add(buf.len()).map(|e| (s, e)))
            .and_then(|(s, e)| self.get(s..e));
        match src {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the image",
            )),
        }
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

impl<T: Storage + ?Sized> Storage for std::sync::Arc<T> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }
    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        (**self).next_data(offset)
    }
    fn will_need(&self, offset: u64, len: u64) {
        (**self).will_need(offset, len)
    }
}

impl<T: Storage + ?Sized> Storage for Box<T> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }
    fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
        (**self).next_data(offset)
    }
    fn will_need(&self, offset: u64, len: u64) {
        (**self).will_need(offset, len)
    }
}
