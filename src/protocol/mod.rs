//! The wire protocol between two imgsync processes (see `docs/protocol.md`):
//! frames with a type, a length and a crc32 ([`frame`]), the messages they
//! carry ([`msg`]), and the content digest both ends compute ([`digest`]).
//! Everything read from the peer is bounds-checked against [`Limits`]; this
//! layer does no I/O policy and uses nothing else in imgsync.
#![forbid(unsafe_code)]

pub mod digest;
pub mod frame;
pub mod msg;

pub use frame::{FrameReader, FrameWriter};
pub use msg::Message;

/// The first bytes of every stream (in the HELLO frame's payload).
pub const MAGIC: [u8; 8] = *b"IMGSYNC\0";

/// The protocol version this build speaks.
pub const VERSION: u16 = 1;

/// Capability bits (HELLO). Unknown bits from a peer are ignored.
pub mod caps {
    /// CHUNK payloads may be zstd-compressed.
    pub const ZSTD: u64 = 1;
    /// KEEPALIVE frames may be sent to this end.
    pub const KEEPALIVE: u64 = 2;
    /// Sync pull: after SYNC_DONE the sender (the server) answers EXIT(0)
    /// when SRC did not change while it was read, or ERROR when it did; a
    /// server without the bit just closes.
    pub const SOURCE_CHECK: u64 = 4;
    /// The sender of an image says which permission bits and owner a new
    /// DST takes (a META frame; see `docs/protocol.md`). Sent only to a
    /// peer that announced it: older readers refuse unknown frames.
    pub const META: u64 = 8;
    /// REQUEST(sync-receive) may say DST's format (flag bit 3 and a
    /// trailing format byte): `sync -O raw`/`-f raw` onto a file that
    /// probes as qcow2. Older receivers refuse the trailing byte.
    pub const DST_FORMAT: u64 = 16;
    /// SyncReceiveRequest.create: a sync push makes an absent DST as a
    /// push of the whole image would, in the format it names.
    pub const SYNC_CREATE: u64 = 32;
    /// A sync request may leave the block size to the receiver (block size
    /// 0): SYNC_INFO then says which (a qcow2 DST's cluster size).
    pub const BLOCK_CHOICE: u64 = 64;
    /// Right after HELLO each end sends INFO (its version, whether it is
    /// a forced or restricted serve, the wire rate it asks of the peer).
    /// Only when both announce it: an older peer refuses an unknown frame.
    pub const SESSION_INFO: u64 = 128;
    pub const ALL: u64 = ZSTD
        | KEEPALIVE
        | SOURCE_CHECK
        | META
        | DST_FORMAT
        | SYNC_CREATE
        | BLOCK_CHOICE
        | SESSION_INFO;
}

/// Largest sizes a peer may send; each side announces its own in HELLO and
/// both use the smaller of the two.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame payload in bytes.
    pub max_frame: u32,
    /// Largest guest range one CHUNK covers.
    pub max_chunk: u32,
}

impl Limits {
    /// Cells are 2 MiB, grown to the output cluster size (2 MiB at most) or
    /// to `-S` (16 MiB at most): 16 MiB chunks, and a frame holds one chunk
    /// stored raw plus its segment table.
    pub const DEFAULT: Limits = Limits {
        max_chunk: 16 << 20,
        max_frame: (16 << 20) + (1 << 20),
    };

    /// The smaller of each limit (never above the defaults, never so small
    /// that nothing fits).
    pub fn negotiate(self, peer: Limits) -> Limits {
        Limits {
            max_frame: self.max_frame.min(peer.max_frame).max(MIN_FRAME),
            max_chunk: self.max_chunk.min(peer.max_chunk).max(MIN_CHUNK),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

/// Limits below these are raised: a chunk of one 64 KiB cluster and a
/// frame that holds it must always fit.
const MIN_CHUNK: u32 = 64 << 10;
const MIN_FRAME: u32 = (64 << 10) + 4096;

/// Protocol failures: what the peer sent is not what the protocol allows,
/// or the stream ended early.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading from the peer")]
    Read(#[source] std::io::Error),
    #[error("writing to the peer")]
    Write(#[source] std::io::Error),
    #[error("the peer closed the connection")]
    Eof,
    /// The stream ended after part of a frame: the peer (or the link)
    /// went away mid-message.
    #[error("the peer closed the connection in the middle of a frame")]
    Truncated,
    #[error("frame of {len} bytes exceeds the limit of {limit}")]
    TooLong { len: u64, limit: u64 },
    #[error("frame checksum mismatch (type {kind}, {len} bytes): corrupted in transit")]
    Checksum { kind: u8, len: u32 },
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("not an imgsync stream (bad magic)")]
    BadMagic,
    #[error("the peer speaks protocol version {peer}; this imgsync speaks {ours}")]
    Version { peer: u16, ours: u16 },
    #[error("malformed {what} frame: {why}")]
    Malformed { what: &'static str, why: String },
    #[error("expected a {expected} frame, got {got}")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
    /// The first bytes of the stream are not a frame of ours: a shell
    /// banner, another program, an image piped where a stream belongs.
    #[error("{} instead of speaking the imgsync protocol", describe_foreign(.0))]
    NotProtocol(Vec<u8>),
    /// The peer reported an error (its message, naming its file).
    #[error("{0}")]
    Remote(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Whether `head`, the first bytes of a stream, can begin a frame of this
/// protocol: a known type, then the zero flag and reserved bytes.
pub fn starts_like_frame(head: &[u8]) -> bool {
    match head.split_first() {
        None => true,
        Some((&k, rest)) => msg::kind_name(k) != "unknown" && rest.iter().take(3).all(|&b| b == 0),
    }
}

/// What a foreign stream starts with, for a one-line error: the text it
/// printed (`printed "Welcome to ..."`), or its first bytes in hex.
pub fn describe_foreign(head: &[u8]) -> String {
    let text = head
        .iter()
        .all(|&b| (0x20..0x7f).contains(&b) || b"\t\r\n".contains(&b) || b >= 0x80);
    if text && !head.is_empty() {
        let s = String::from_utf8_lossy(head);
        let line = s.trim_start().lines().next().unwrap_or("").trim_end();
        format!("printed \"{}...\"", line.escape_debug())
    } else {
        let hex: Vec<String> = head.iter().map(|b| format!("{b:02x}")).collect();
        format!("sent bytes {} ...", hex.join(" "))
    }
}
