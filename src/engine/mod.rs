//! The engine: planning what to read, the multi-threaded pipeline that reads,
//! detects zeros and encodes blocks, the writers' sinks (raw, QCOW2), convert
//! and compare. It sees images ([`imgsync_formats::Image`]) and outputs
//! ([`crate::io::Output`]), never paths: the caller names files in errors.
#![forbid(unsafe_code)]

pub mod compare;
pub mod convert;
pub mod pipeline;
pub mod plan;
pub mod progress;
pub mod qcow2_dst;
pub mod remote;
pub mod sink;
pub mod sync;
pub mod units;
pub mod zero;

use imgsync_formats as formats;

pub use progress::{NoProgress, Phase, Progress};

/// Which side of an operation failed, so the caller can name the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or decoding the source image (or image A of compare).
    #[error(transparent)]
    Source(formats::Error),
    /// Image B of compare.
    #[error(transparent)]
    Other(formats::Error),
    /// Writing the destination.
    #[error(transparent)]
    Dest(std::io::Error),
    /// Building the destination image's structures.
    #[error(transparent)]
    DestFormat(formats::Error),
    #[error(
        "the output needs up to {} but the file system has {} free",
        units::Bytes(*need),
        units::human_size(*free)
    )]
    NoSpace { need: u64, free: u64 },
    #[error(
        "the device holds {} but the image needs {}",
        units::Bytes(*device),
        units::Bytes(*need)
    )]
    DeviceTooSmall { need: u64, device: u64 },
    #[error("interrupted")]
    Interrupted,
    /// The stream from the peer, or the peer's own error.
    #[error(transparent)]
    Protocol(#[from] crate::protocol::Error),
    /// The source changed while it was read (the message names the file).
    #[error(transparent)]
    SourceChanged(#[from] crate::io::watch::WatchError),
    /// A broken invariant inside imgsync (a bug), not bad input.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
