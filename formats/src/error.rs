//! Errors of the format layer. Messages are lower case, offsets in hex; the
//! caller adds the file name by wrapping.

use std::io;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, coarsely: mapped to exit codes in exactly one place (cli).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Reading the underlying store failed.
    Io,
    /// The bytes are not a valid image (bad magic, out-of-range field, bad table entry).
    Invalid,
    /// The image is valid but uses something imgsync does not implement.
    Unsupported,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("read of {len} bytes at offset {offset:#x} failed")]
    Io {
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    #[error("write of {len} bytes at offset {offset:#x} failed")]
    Write {
        offset: u64,
        len: u64,
        #[source]
        source: io::Error,
    },
    /// A write barrier (fdatasync) failed: what was written before it may
    /// not be durable.
    #[error("write barrier failed")]
    Barrier {
        #[source]
        source: io::Error,
    },
    #[error("{what} at offset {offset:#x} (length {len:#x}) lies beyond the end of the file ({file_size:#x} bytes)")]
    BeyondEof {
        what: &'static str,
        offset: u64,
        len: u64,
        file_size: u64,
    },
    #[error("{what} offset {offset:#x} is not aligned to {align:#x}")]
    Misaligned {
        what: &'static str,
        offset: u64,
        align: u64,
    },
    #[error("{what} {value} exceeds the limit of {limit}")]
    TooLarge {
        what: &'static str,
        value: u64,
        limit: u64,
    },
    /// A structural problem, described in full.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unsupported(String),
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } | Error::Write { .. } | Error::Barrier { .. } => ErrorKind::Io,
            Error::Unsupported(_) => ErrorKind::Unsupported,
            _ => ErrorKind::Invalid,
        }
    }

    pub(crate) fn invalid(msg: impl Into<String>) -> Error {
        Error::Invalid(msg.into())
    }

    pub(crate) fn unsupported(msg: impl Into<String>) -> Error {
        Error::Unsupported(msg.into())
    }
}

/// Reads `buf.len()` bytes at `offset`, turning a short read into a clear
/// "beyond the end of the file" error naming `what`.
pub(crate) fn read_exact_at(
    storage: &dyn crate::Storage,
    buf: &mut [u8],
    offset: u64,
    what: &'static str,
) -> Result<()> {
    storage.read_exact_at(buf, offset).map_err(|source| {
        if source.kind() == io::ErrorKind::UnexpectedEof {
            Error::BeyondEof {
                what,
                offset,
                len: buf.len() as u64,
                file_size: storage.size().unwrap_or(0),
            }
        } else {
            Error::Io {
                offset,
                len: buf.len() as u64,
                source,
            }
        }
    })
}

/// Checks that `[offset, offset + len)` lies inside a file of `file_size` bytes.
pub(crate) fn check_in_file(
    what: &'static str,
    offset: u64,
    len: u64,
    file_size: u64,
) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= file_size => Ok(()),
        _ => Err(Error::BeyondEof {
            what,
            offset,
            len,
            file_size,
        }),
    }
}
