//! The messages frames carry, and their encodings (big-endian integers,
//! byte strings as a u32 length and the bytes). Decoding checks every
//! count and length against the frame it came in and the negotiated
//! [`Limits`]; nothing is allocated from a peer's count alone.

use super::{Error, Limits, Result, MAGIC, VERSION};

/// Frame types.
pub mod kind {
    pub const HELLO: u8 = 1;
    pub const REQUEST: u8 = 2;
    pub const IMAGE: u8 = 3;
    pub const READY: u8 = 4;
    pub const CHUNK: u8 = 5;
    pub const END: u8 = 6;
    pub const DONE: u8 = 7;
    pub const ERROR: u8 = 8;
    pub const OUTPUT: u8 = 9;
    pub const EXIT: u8 = 10;
    pub const SYNC_INFO: u8 = 11;
    pub const HASHES: u8 = 12;
    pub const HASHES_END: u8 = 13;
    pub const PLAN: u8 = 14;
    pub const BLOCKS: u8 = 15;
    pub const PUNCH: u8 = 16;
    pub const SYNC_END: u8 = 17;
    pub const SYNC_DONE: u8 = 18;
    /// No payload; sent by a busy end when the peer has the KEEPALIVE
    /// capability, and dropped by the reader (`FrameReader`).
    pub const KEEPALIVE: u8 = 19;
    pub const META: u8 = 20;
    pub const INFO: u8 = 21;
}

pub fn kind_name(k: u8) -> &'static str {
    match k {
        kind::HELLO => "HELLO",
        kind::REQUEST => "REQUEST",
        kind::IMAGE => "IMAGE",
        kind::READY => "READY",
        kind::CHUNK => "CHUNK",
        kind::END => "END",
        kind::DONE => "DONE",
        kind::ERROR => "ERROR",
        kind::OUTPUT => "OUTPUT",
        kind::EXIT => "EXIT",
        kind::SYNC_INFO => "SYNC_INFO",
        kind::HASHES => "HASHES",
        kind::HASHES_END => "HASHES_END",
        kind::PLAN => "PLAN",
        kind::BLOCKS => "BLOCKS",
        kind::PUNCH => "PUNCH",
        kind::SYNC_END => "SYNC_END",
        kind::SYNC_DONE => "SYNC_DONE",
        kind::KEEPALIVE => "KEEPALIVE",
        kind::META => "META",
        kind::INFO => "INFO",
        _ => "unknown",
    }
}

/// Image formats on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireFormat {
    Raw = 1,
    Qcow2 = 2,
}

impl WireFormat {
    fn decode(b: u8, what: &'static str) -> Result<Option<WireFormat>> {
        match b {
            0 => Ok(None),
            1 => Ok(Some(WireFormat::Raw)),
            2 => Ok(Some(WireFormat::Qcow2)),
            _ => Err(malformed(what, format!("unknown image format {b}"))),
        }
    }
}

/// QCOW2 cluster compression asked of a receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireCompression {
    None = 0,
    Zlib = 1,
    Zstd = 2,
}

/// A new image's cluster size from the peer, as log2: qcow2's range
/// (512 B to 2 MiB, the spec's limits), whatever the output format. The
/// receiver shifts by it (`1 << bits`), so nothing else may pass.
const CLUSTER_BITS: std::ops::RangeInclusive<u8> = 9..=21;

fn cluster_bits(b: u8, what: &'static str) -> Result<u8> {
    if CLUSTER_BITS.contains(&b) {
        Ok(b)
    } else {
        Err(malformed(what, format!("cluster bits {b}")))
    }
}

impl WireCompression {
    fn decode(b: u8, what: &'static str) -> Result<WireCompression> {
        Ok(match b {
            0 => WireCompression::None,
            1 => WireCompression::Zlib,
            2 => WireCompression::Zstd,
            b => return Err(malformed(what, format!("unknown compression {b}"))),
        })
    }
}

/// Both ends' first frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub caps: u64,
    pub limits: Limits,
}

impl Hello {
    pub fn ours() -> Hello {
        Hello {
            version: VERSION,
            caps: super::caps::ALL,
            limits: Limits::DEFAULT,
        }
    }
}

/// Push: the server receives an image and writes it at `path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceiveRequest {
    pub path: Vec<u8>,
    pub format: WireFormat,
    pub compression: WireCompression,
    pub cluster_bits: u8,
    pub target_is_zero: bool,
    pub check_space: bool,
}

/// Pull: the server reads the image at `path` and sends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendRequest {
    pub path: Vec<u8>,
    /// None: probe.
    pub format: Option<WireFormat>,
    /// Zero runs of at least this many bytes are not sent (0: none).
    pub min_sparse: u64,
    /// Grid cell (chunk) size the sender should use.
    pub chunk: u32,
    /// Output cluster size for the space estimate in IMAGE.
    pub unit: u64,
    /// zstd level for the payloads (0: uncompressed).
    pub level: i8,
    /// Read the image even while a qemu has it open for writing
    /// (`-U/--force-share`; see [`ReadFlags`]).
    pub force_share: bool,
}

/// The server runs a read-only command on the image at `path` and sends
/// its output (OUTPUT frames) and exit status (EXIT).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryRequest {
    pub command: QueryCommand,
    pub path: Vec<u8>,
    pub format: Option<WireFormat>,
    pub json: bool,
    /// `-U/--force-share` (see [`ReadFlags`]).
    pub force_share: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueryCommand {
    Info = 1,
    Map = 2,
    Check = 3,
    /// `imgsync sync --rollback` of a remote DST.
    Rollback = 4,
}

/// The parameters of a sync both ends share: the block size, the session's
/// hash key (random per sync, so blocks cannot be crafted to collide), and
/// the source's virtual size (DST's size after the sync).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncParams {
    pub block_size: u32,
    pub key: [u8; 32],
    pub src_size: u64,
    /// Keep an undo journal (off: `--no-journal`).
    pub journal: bool,
    pub check_space: bool,
    /// Read and hash all of DST even when its hash cache is valid
    /// (`--checksum`).
    pub reread: bool,
}

/// Sync push: the server holds DST and receives the changed blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncReceiveRequest {
    pub path: Vec<u8>,
    pub params: SyncParams,
    /// DST's format as the user named it (`-O`, else `-f`); `None`: DST is
    /// probed. Sent only to a peer with `caps::DST_FORMAT`.
    pub dst_format: Option<WireFormat>,
    /// How to make DST when it does not exist: the receiver answers
    /// SYNC_INFO (exists = false) and the exchange goes on as a push's
    /// (IMAGE, READY, CHUNK*, END, DONE), so SRC is read once and DST is
    /// made in this format. Sent only to a peer with `caps::SYNC_CREATE`.
    pub create: Option<CreateParams>,
}

/// A new DST's format, as a push's RECEIVE request gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreateParams {
    pub format: WireFormat,
    pub compression: WireCompression,
    pub cluster_bits: u8,
}

/// Sync pull: the server holds SRC and sends; it answers with IMAGE, then
/// the client (holding DST) starts the exchange with SYNC_INFO.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyncSendRequest {
    pub path: Vec<u8>,
    pub format: Option<WireFormat>,
    pub block_size: u32,
    pub key: [u8; 32],
    pub level: i8,
    /// `-U/--force-share` (see [`ReadFlags`]).
    pub force_share: bool,
}

/// The optional last byte of the requests that read an image (send,
/// query, sync-send), added after protocol version 1's first release:
/// absent means 0, and it is sent only when a bit is set, so a request
/// without them is what older servers expect (an older server refuses one
/// with them as trailing bytes rather than ignoring it).
pub struct ReadFlags;

impl ReadFlags {
    /// Bit 0: read the image whatever qemu's locks say (`-U`).
    pub const FORCE_SHARE: u8 = 1;
    pub const KNOWN: u8 = Self::FORCE_SHARE;

    fn encode(v: &mut Vec<u8>, force_share: bool) {
        if force_share {
            v.push(Self::FORCE_SHARE);
        }
    }

    /// Reads the byte if the frame has it; unknown bits are refused.
    fn decode(d: &mut Dec) -> Result<bool> {
        if d.p.is_empty() {
            return Ok(false);
        }
        let b = d.u8()?;
        if b & !Self::KNOWN != 0 {
            return Err(malformed(d.what, format!("unknown read flags {b:#x}")));
        }
        Ok(b & Self::FORCE_SHARE != 0)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Receive(ReceiveRequest),
    Send(SendRequest),
    Query(QueryRequest),
    SyncReceive(SyncReceiveRequest),
    SyncSend(SyncSendRequest),
}

/// What the receiver found at DST.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncInfo {
    pub exists: bool,
    pub dst_size: u64,
    /// An interrupted sync's journal was found and is continued.
    pub resumed: bool,
    /// DST's hashes come from its hash cache (DST is not read).
    pub cached: bool,
    /// The key both ends hash with: the request's, or the cache's.
    pub key: [u8; 32],
    /// The block size the receiver chose, when the request left it to it
    /// (block size 0, sent only to a peer with `caps::BLOCK_CHOICE`): a
    /// qcow2 DST's cluster size (at least 4 KiB), else 64 KiB. 0: as
    /// requested (and not on the wire).
    pub block_size: u32,
}

/// The sender's plan after comparing the hashes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub send_blocks: u64,
    pub punch_blocks: u64,
    /// Changed blocks that hold data on DST (journal entries, at most).
    pub journal_blocks: u64,
    /// Blocks sent where DST has a hole (new allocation, at most).
    pub new_blocks: u64,
}

/// A run of whole blocks' new content (the last block of the image may be
/// short), raw or zstd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Blocks {
    pub first: u64,
    pub count: u32,
    pub zstd: bool,
    pub raw_len: u32,
    pub payload: Vec<u8>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyncDone {
    pub blocks_compared: u64,
    pub blocks_written: u64,
    pub blocks_punched: u64,
    pub journal_bytes: u64,
    /// A qcow2 DST's allocation changes (trailing, sent only to a peer
    /// with `caps::BLOCK_CHOICE`: older readers refuse trailing bytes).
    pub qcow2: Option<Qcow2Done>,
}

/// What updating a qcow2 DST in place did to its file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Qcow2Done {
    pub clusters_allocated: u64,
    pub clusters_freed: u64,
    pub metadata_bytes_written: u64,
}

/// What the sender's image holds (from its metadata, before any data).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: Option<WireFormat>,
    pub virtual_size: u64,
    pub data_bytes: u64,
    pub data_extents: u64,
    /// Cells of `unit` bytes holding data.
    pub data_units: u64,
    pub unit: u64,
}

/// One grid cell of guest data: `segments` cover `[start, start + len)` in
/// order, each data or zeros; the data segments' bytes, concatenated
/// (`raw_len` of them), are the payload, stored raw or zstd-compressed.
/// `hash` is the cell's content digest ([`super::digest::chunk_hash`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkFrame {
    pub start: u64,
    pub len: u32,
    /// Source bytes read for this cell (progress).
    pub read: u32,
    pub segments: Vec<(u32, bool)>,
    pub hash: [u8; 32],
    pub zstd: bool,
    pub raw_len: u32,
    pub payload: Vec<u8>,
}

impl ChunkFrame {
    pub fn end(&self) -> u64 {
        self.start + u64::from(self.len)
    }
}

/// The sender's last frame: how many chunks it sent and the digest over
/// them ([`super::digest::StreamDigest`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct End {
    pub chunks: u64,
    pub digest: [u8; 32],
}

/// Push: the receiver's answer after the output is complete and in place.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Done {
    pub bytes_written: u64,
    pub clusters_compressed: u64,
}

/// The source file's permission bits (`st_mode & 0o7777`) and numeric
/// owner and group, for a DST the receiver creates (as `rsync -a`: the
/// receiver keeps the bits, drops setuid/setgid unless root, and sets the
/// owner only as root). Ids travel as numbers, never names. `size` is the
/// length of a raw copy: a raw source's exact file length, which IMAGE's
/// virtual size rounds up to a sector (as qemu does); else the virtual
/// size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileMeta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
}

/// What each end says of itself right after HELLO (capability
/// `SESSION_INFO`): its imgsync version, how it runs, and the wire rate
/// it asks of the peer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Info {
    /// The imgsync version (`0.1.0`), at most [`Info::MAX_VERSION`] bytes.
    pub version: String,
    /// [`Info::FORCED`], [`Info::RESTRICTED`], [`Info::READ_ONLY`].
    pub flags: u8,
    /// Bytes per second this end asks the peer to write at most (0: no
    /// limit): the client's `--bwlimit`.
    pub bwlimit: u64,
}

impl Info {
    /// The server runs as sshd's forced command (`command=` in
    /// authorized_keys): the client's remote command line was not used.
    pub const FORCED: u8 = 1;
    /// The server runs `serve --restrict DIR`.
    pub const RESTRICTED: u8 = 2;
    /// The server runs `serve --read-only`.
    pub const READ_ONLY: u8 = 4;
    pub const KNOWN: u8 = Self::FORCED | Self::RESTRICTED | Self::READ_ONLY;
    pub const MAX_VERSION: usize = 64;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    Request(Request),
    Image(ImageInfo),
    Ready,
    Chunk(ChunkFrame),
    End(End),
    Done(Done),
    Error(String),
    /// Bytes of a query's output.
    Output(Vec<u8>),
    /// A query's exit status.
    Exit(u8),
    SyncInfo(SyncInfo),
    /// DST's non-zero blocks: (index, first 16 bytes of the keyed hash).
    Hashes(Vec<(u64, [u8; 16])>),
    /// The number of hashes sent.
    HashesEnd(u64),
    Plan(Plan),
    Blocks(Blocks),
    /// Blocks `[first, first + count)` become holes.
    Punch {
        first: u64,
        count: u64,
    },
    /// The sender's digest of SRC's content and the blocks it sent.
    SyncEnd {
        digest: [u8; 32],
        blocks: u64,
        /// Bytes of SRC the sender read (for the receiver's report).
        bytes_read: u64,
    },
    SyncDone(SyncDone),
    /// The source file's metadata (`caps::META`).
    Meta(FileMeta),
    Info(Info),
}

impl Message {
    pub fn kind(&self) -> u8 {
        match self {
            Message::Hello(_) => kind::HELLO,
            Message::Request(_) => kind::REQUEST,
            Message::Image(_) => kind::IMAGE,
            Message::Ready => kind::READY,
            Message::Chunk(_) => kind::CHUNK,
            Message::End(_) => kind::END,
            Message::Done(_) => kind::DONE,
            Message::Error(_) => kind::ERROR,
            Message::Output(_) => kind::OUTPUT,
            Message::Exit(_) => kind::EXIT,
            Message::SyncInfo(_) => kind::SYNC_INFO,
            Message::Hashes(_) => kind::HASHES,
            Message::HashesEnd(_) => kind::HASHES_END,
            Message::Plan(_) => kind::PLAN,
            Message::Blocks(_) => kind::BLOCKS,
            Message::Punch { .. } => kind::PUNCH,
            Message::SyncEnd { .. } => kind::SYNC_END,
            Message::SyncDone(_) => kind::SYNC_DONE,
            Message::Meta(_) => kind::META,
            Message::Info(_) => kind::INFO,
        }
    }

    pub fn name(&self) -> &'static str {
        kind_name(self.kind())
    }

    /// Appends the payload.
    pub fn encode(&self, v: &mut Vec<u8>) {
        match self {
            Message::Hello(h) => {
                v.extend_from_slice(&MAGIC);
                v.extend_from_slice(&h.version.to_be_bytes());
                v.extend_from_slice(&h.caps.to_be_bytes());
                v.extend_from_slice(&h.limits.max_frame.to_be_bytes());
                v.extend_from_slice(&h.limits.max_chunk.to_be_bytes());
            }
            Message::Request(Request::Receive(r)) => {
                v.push(1);
                put_bytes(v, &r.path);
                v.push(r.format as u8);
                v.push(r.compression as u8);
                v.push(r.cluster_bits);
                v.push(u8::from(r.target_is_zero) | (u8::from(r.check_space) << 1));
            }
            Message::Request(Request::Send(r)) => {
                v.push(2);
                put_bytes(v, &r.path);
                v.push(r.format.map_or(0, |f| f as u8));
                v.extend_from_slice(&r.min_sparse.to_be_bytes());
                v.extend_from_slice(&r.chunk.to_be_bytes());
                v.extend_from_slice(&r.unit.to_be_bytes());
                v.push(r.level as u8);
                ReadFlags::encode(v, r.force_share);
            }
            Message::Image(i) => {
                v.push(i.format.map_or(0, |f| f as u8));
                for x in [
                    i.virtual_size,
                    i.data_bytes,
                    i.data_extents,
                    i.data_units,
                    i.unit,
                ] {
                    v.extend_from_slice(&x.to_be_bytes());
                }
            }
            Message::Ready => {}
            Message::Chunk(c) => encode_chunk(
                v,
                ChunkHead {
                    start: c.start,
                    len: c.len,
                    read: c.read,
                    segments: &c.segments,
                    hash: &c.hash,
                    zstd: c.zstd,
                    raw_len: c.raw_len,
                },
                &c.payload,
            ),
            Message::End(e) => {
                v.extend_from_slice(&e.chunks.to_be_bytes());
                v.extend_from_slice(&e.digest);
            }
            Message::Done(d) => {
                v.extend_from_slice(&d.bytes_written.to_be_bytes());
                v.extend_from_slice(&d.clusters_compressed.to_be_bytes());
            }
            Message::Error(s) => put_bytes(v, s.as_bytes()),
            Message::Request(Request::Query(q)) => {
                v.push(3);
                v.push(q.command as u8);
                put_bytes(v, &q.path);
                v.push(q.format.map_or(0, |f| f as u8));
                v.push(u8::from(q.json));
                ReadFlags::encode(v, q.force_share);
            }
            Message::Output(b) => v.extend_from_slice(b),
            Message::Exit(c) => v.push(*c),
            Message::Request(Request::SyncReceive(r)) => {
                v.push(4);
                put_bytes(v, &r.path);
                v.extend_from_slice(&r.params.block_size.to_be_bytes());
                v.extend_from_slice(&r.params.key);
                v.extend_from_slice(&r.params.src_size.to_be_bytes());
                v.push(
                    u8::from(r.params.journal)
                        | (u8::from(r.params.check_space) << 1)
                        | (u8::from(r.params.reread) << 2)
                        | (u8::from(r.dst_format.is_some()) << 3)
                        | (u8::from(r.create.is_some()) << 4),
                );
                if let Some(f) = r.dst_format {
                    v.push(f as u8);
                }
                if let Some(c) = r.create {
                    v.push(c.format as u8);
                    v.push(c.compression as u8);
                    v.push(c.cluster_bits);
                }
            }
            Message::Request(Request::SyncSend(r)) => {
                v.push(5);
                put_bytes(v, &r.path);
                v.push(r.format.map_or(0, |f| f as u8));
                v.extend_from_slice(&r.block_size.to_be_bytes());
                v.extend_from_slice(&r.key);
                v.push(r.level as u8);
                ReadFlags::encode(v, r.force_share);
            }
            Message::SyncInfo(i) => {
                v.push(u8::from(i.exists) | (u8::from(i.resumed) << 1) | (u8::from(i.cached) << 2));
                v.extend_from_slice(&i.dst_size.to_be_bytes());
                v.extend_from_slice(&i.key);
                if i.block_size != 0 {
                    v.extend_from_slice(&i.block_size.to_be_bytes());
                }
            }
            Message::Hashes(h) => {
                v.extend_from_slice(&(h.len() as u32).to_be_bytes());
                for (b, x) in h {
                    v.extend_from_slice(&b.to_be_bytes());
                    v.extend_from_slice(x);
                }
            }
            Message::HashesEnd(n) => v.extend_from_slice(&n.to_be_bytes()),
            Message::Plan(p) => {
                for x in [
                    p.send_blocks,
                    p.punch_blocks,
                    p.journal_blocks,
                    p.new_blocks,
                ] {
                    v.extend_from_slice(&x.to_be_bytes());
                }
            }
            Message::Blocks(b) => {
                encode_blocks_head(v, b.first, b.count, b.zstd, b.raw_len);
                v.extend_from_slice(&b.payload);
            }
            Message::Punch { first, count } => {
                v.extend_from_slice(&first.to_be_bytes());
                v.extend_from_slice(&count.to_be_bytes());
            }
            Message::SyncEnd {
                digest,
                blocks,
                bytes_read,
            } => {
                v.extend_from_slice(digest);
                v.extend_from_slice(&blocks.to_be_bytes());
                v.extend_from_slice(&bytes_read.to_be_bytes());
            }
            Message::SyncDone(d) => {
                for x in [
                    d.blocks_compared,
                    d.blocks_written,
                    d.blocks_punched,
                    d.journal_bytes,
                ] {
                    v.extend_from_slice(&x.to_be_bytes());
                }
                if let Some(q) = d.qcow2 {
                    for x in [
                        q.clusters_allocated,
                        q.clusters_freed,
                        q.metadata_bytes_written,
                    ] {
                        v.extend_from_slice(&x.to_be_bytes());
                    }
                }
            }
            Message::Meta(m) => {
                for x in [m.mode, m.uid, m.gid] {
                    v.extend_from_slice(&x.to_be_bytes());
                }
                v.extend_from_slice(&m.size.to_be_bytes());
            }
            Message::Info(i) => {
                put_bytes(v, i.version.as_bytes());
                v.push(i.flags);
                v.extend_from_slice(&i.bwlimit.to_be_bytes());
            }
        }
    }

    /// Decodes a frame's payload. An ERROR frame decodes to
    /// `Message::Error`; callers usually want [`Message::expect`].
    pub fn decode(k: u8, p: &[u8], limits: &Limits) -> Result<Message> {
        let what = kind_name(k);
        let mut d = Dec { p, what };
        let m = match k {
            kind::HELLO => {
                if d.take(8)? != MAGIC {
                    return Err(Error::BadMagic);
                }
                let version = d.u16()?;
                if version != VERSION {
                    return Err(Error::Version {
                        peer: version,
                        ours: VERSION,
                    });
                }
                Message::Hello(Hello {
                    version,
                    caps: d.u64()?,
                    limits: Limits {
                        max_frame: d.u32()?,
                        max_chunk: d.u32()?,
                    },
                })
            }
            kind::REQUEST => match d.u8()? {
                1 => {
                    let path = d.bytes(4096)?.to_vec();
                    let format = WireFormat::decode(d.u8()?, what)?
                        .ok_or_else(|| malformed(what, "no output format".to_string()))?;
                    let compression = WireCompression::decode(d.u8()?, what)?;
                    let cluster_bits = cluster_bits(d.u8()?, what)?;
                    let flags = d.u8()?;
                    Message::Request(Request::Receive(ReceiveRequest {
                        path,
                        format,
                        compression,
                        cluster_bits,
                        target_is_zero: flags & 1 != 0,
                        check_space: flags & 2 != 0,
                    }))
                }
                2 => Message::Request(Request::Send(SendRequest {
                    path: d.bytes(4096)?.to_vec(),
                    format: WireFormat::decode(d.u8()?, what)?,
                    min_sparse: d.u64()?,
                    chunk: d.u32()?,
                    unit: d.u64()?,
                    level: d.u8()? as i8,
                    force_share: ReadFlags::decode(&mut d)?,
                })),
                3 => {
                    let command = match d.u8()? {
                        1 => QueryCommand::Info,
                        2 => QueryCommand::Map,
                        3 => QueryCommand::Check,
                        4 => QueryCommand::Rollback,
                        c => return Err(malformed(what, format!("unknown query {c}"))),
                    };
                    Message::Request(Request::Query(QueryRequest {
                        command,
                        path: d.bytes(4096)?.to_vec(),
                        format: WireFormat::decode(d.u8()?, what)?,
                        json: d.u8()? != 0,
                        force_share: ReadFlags::decode(&mut d)?,
                    }))
                }
                4 => {
                    let path = d.bytes(4096)?.to_vec();
                    let block_size = d.u32()?;
                    let key = d.array()?;
                    let src_size = d.u64()?;
                    let flags = d.u8()?;
                    let dst_format = if flags & 8 != 0 {
                        Some(
                            WireFormat::decode(d.u8()?, what)?
                                .ok_or_else(|| malformed(what, "no DST format".to_string()))?,
                        )
                    } else {
                        None
                    };
                    let create = if flags & 16 != 0 {
                        let format = WireFormat::decode(d.u8()?, what)?
                            .ok_or_else(|| malformed(what, "no format to create".to_string()))?;
                        let compression = WireCompression::decode(d.u8()?, what)?;
                        let cluster_bits = cluster_bits(d.u8()?, what)?;
                        Some(CreateParams {
                            format,
                            compression,
                            cluster_bits,
                        })
                    } else {
                        None
                    };
                    if flags & !31 != 0 {
                        return Err(malformed(what, format!("unknown sync flags {flags:#x}")));
                    }
                    Message::Request(Request::SyncReceive(SyncReceiveRequest {
                        create,
                        dst_format,
                        path,
                        params: SyncParams {
                            block_size,
                            key,
                            src_size,
                            journal: flags & 1 != 0,
                            check_space: flags & 2 != 0,
                            reread: flags & 4 != 0,
                        },
                    }))
                }
                5 => Message::Request(Request::SyncSend(SyncSendRequest {
                    path: d.bytes(4096)?.to_vec(),
                    format: WireFormat::decode(d.u8()?, what)?,
                    block_size: d.u32()?,
                    key: d.array()?,
                    level: d.u8()? as i8,
                    force_share: ReadFlags::decode(&mut d)?,
                })),
                op => return Err(malformed(what, format!("unknown operation {op}"))),
            },
            kind::IMAGE => Message::Image(ImageInfo {
                format: WireFormat::decode(d.u8()?, what)?,
                virtual_size: d.u64()?,
                data_bytes: d.u64()?,
                data_extents: d.u64()?,
                data_units: d.u64()?,
                unit: d.u64()?,
            }),
            kind::READY => Message::Ready,
            kind::CHUNK => Message::Chunk(decode_chunk(&mut d, limits)?),
            kind::END => Message::End(End {
                chunks: d.u64()?,
                digest: d.array()?,
            }),
            kind::DONE => Message::Done(Done {
                bytes_written: d.u64()?,
                clusters_compressed: d.u64()?,
            }),
            kind::ERROR => {
                let b = d.bytes(64 << 10)?;
                Message::Error(String::from_utf8_lossy(b).into_owned())
            }
            kind::OUTPUT => Message::Output(d.rest().to_vec()),
            kind::EXIT => Message::Exit(d.u8()?),
            kind::SYNC_INFO => {
                let flags = d.u8()?;
                Message::SyncInfo(SyncInfo {
                    exists: flags & 1 != 0,
                    resumed: flags & 2 != 0,
                    cached: flags & 4 != 0,
                    dst_size: d.u64()?,
                    key: d.array()?,
                    block_size: if d.p.is_empty() { 0 } else { d.u32()? },
                })
            }
            kind::HASHES => {
                let n = d.u32()? as usize;
                // 24 bytes each: a count beyond the frame is refused first.
                if n > d.p.len() / 24 {
                    return Err(malformed(what, format!("{n} hashes")));
                }
                let mut h = Vec::with_capacity(n);
                for _ in 0..n {
                    h.push((d.u64()?, d.array()?));
                }
                Message::Hashes(h)
            }
            kind::HASHES_END => Message::HashesEnd(d.u64()?),
            kind::PLAN => Message::Plan(Plan {
                send_blocks: d.u64()?,
                punch_blocks: d.u64()?,
                journal_blocks: d.u64()?,
                new_blocks: d.u64()?,
            }),
            kind::BLOCKS => {
                let first = d.u64()?;
                let count = d.u32()?;
                let zstd = match d.u8()? {
                    0 => false,
                    1 => true,
                    e => return Err(malformed(what, format!("unknown encoding {e}"))),
                };
                let raw_len = d.u32()?;
                if count == 0 || raw_len == 0 || raw_len > limits.max_chunk {
                    return Err(malformed(
                        what,
                        format!(
                            "{count} blocks of {raw_len} bytes (limit {})",
                            limits.max_chunk
                        ),
                    ));
                }
                let payload = d.rest();
                if !zstd && payload.len() != raw_len as usize {
                    return Err(malformed(
                        what,
                        format!("{} payload bytes for {raw_len} raw bytes", payload.len()),
                    ));
                }
                Message::Blocks(Blocks {
                    first,
                    count,
                    zstd,
                    raw_len,
                    payload: payload.to_vec(),
                })
            }
            kind::PUNCH => Message::Punch {
                first: d.u64()?,
                count: d.u64()?,
            },
            kind::SYNC_END => Message::SyncEnd {
                digest: d.array()?,
                blocks: d.u64()?,
                bytes_read: d.u64()?,
            },
            kind::SYNC_DONE => Message::SyncDone(SyncDone {
                blocks_compared: d.u64()?,
                blocks_written: d.u64()?,
                blocks_punched: d.u64()?,
                journal_bytes: d.u64()?,
                qcow2: if d.p.is_empty() {
                    None
                } else {
                    Some(Qcow2Done {
                        clusters_allocated: d.u64()?,
                        clusters_freed: d.u64()?,
                        metadata_bytes_written: d.u64()?,
                    })
                },
            }),
            kind::META => {
                let mode = d.u32()?;
                // Permission bits only: a file type or unknown bit from the
                // peer is refused, never passed to chmod.
                if mode & !0o7777 != 0 {
                    return Err(malformed(what, format!("mode {mode:#o}")));
                }
                Message::Meta(FileMeta {
                    mode,
                    uid: d.u32()?,
                    gid: d.u32()?,
                    size: d.u64()?,
                })
            }
            kind::INFO => {
                let version = String::from_utf8_lossy(d.bytes(Info::MAX_VERSION)?).into_owned();
                let flags = d.u8()?;
                if flags & !Info::KNOWN != 0 {
                    return Err(malformed(what, format!("unknown flags {flags:#x}")));
                }
                Message::Info(Info {
                    version,
                    flags,
                    bwlimit: d.u64()?,
                })
            }
            other => return Err(Error::UnknownType(other)),
        };
        d.finish()?;
        Ok(m)
    }

    /// Decodes a frame that must be of type `want`; an ERROR frame becomes
    /// [`Error::Remote`] with the peer's message.
    pub fn expect(k: u8, p: &[u8], limits: &Limits, want: u8) -> Result<Message> {
        let m = Message::decode(k, p, limits)?;
        if let Message::Error(s) = m {
            return Err(Error::Remote(s));
        }
        if k != want {
            return Err(Error::Unexpected {
                expected: kind_name(want),
                got: kind_name(k),
            });
        }
        Ok(m)
    }
}

/// The BLOCKS payload up to the data.
pub fn encode_blocks_head(v: &mut Vec<u8>, first: u64, count: u32, zstd: bool, raw_len: u32) {
    v.extend_from_slice(&first.to_be_bytes());
    v.extend_from_slice(&count.to_be_bytes());
    v.push(u8::from(zstd));
    v.extend_from_slice(&raw_len.to_be_bytes());
}

/// A CHUNK frame's fields, borrowed (workers encode frames without
/// building a [`ChunkFrame`]).
pub struct ChunkHead<'a> {
    pub start: u64,
    pub len: u32,
    pub read: u32,
    pub segments: &'a [(u32, bool)],
    pub hash: &'a [u8; 32],
    pub zstd: bool,
    pub raw_len: u32,
}

/// Appends a CHUNK payload: start u64, len u32, read u32, segment count
/// u32, segments (len u32 with the top bit set for data), hash [32],
/// encoding u8 (0 raw, 1 zstd), raw_len u32, then the payload bytes.
pub fn encode_chunk(v: &mut Vec<u8>, c: ChunkHead<'_>, payload: &[u8]) {
    encode_chunk_head(v, &c);
    v.extend_from_slice(payload);
}

/// The CHUNK payload up to the data (the caller appends the data).
pub fn encode_chunk_head(v: &mut Vec<u8>, c: &ChunkHead<'_>) {
    v.extend_from_slice(&c.start.to_be_bytes());
    v.extend_from_slice(&c.len.to_be_bytes());
    v.extend_from_slice(&c.read.to_be_bytes());
    v.extend_from_slice(&(c.segments.len() as u32).to_be_bytes());
    for &(len, data) in c.segments {
        let word = len | if data { DATA_BIT } else { 0 };
        v.extend_from_slice(&word.to_be_bytes());
    }
    v.extend_from_slice(c.hash);
    v.push(u8::from(c.zstd));
    v.extend_from_slice(&c.raw_len.to_be_bytes());
}

const DATA_BIT: u32 = 1 << 31;

fn decode_chunk(d: &mut Dec<'_>, limits: &Limits) -> Result<ChunkFrame> {
    let what = d.what;
    let start = d.u64()?;
    let len = d.u32()?;
    let read = d.u32()?;
    if len == 0 || len > limits.max_chunk {
        return Err(malformed(
            what,
            format!("chunk length {len} outside 1..={}", limits.max_chunk),
        ));
    }
    if start.checked_add(u64::from(len)).is_none() {
        return Err(malformed(what, format!("chunk at {start:#x} overflows")));
    }
    if read > len {
        return Err(malformed(
            what,
            format!("{read} bytes read of a {len}-byte chunk"),
        ));
    }
    let count = d.u32()? as usize;
    // Each segment takes 4 bytes of this frame: a count beyond what the
    // frame holds is refused before allocating for it.
    if count == 0 || count > d.p.len() / 4 {
        return Err(malformed(what, format!("{count} segments")));
    }
    let mut segments = Vec::with_capacity(count);
    let (mut total, mut data) = (0u64, 0u64);
    for _ in 0..count {
        let w = d.u32()?;
        let slen = w & !DATA_BIT;
        let is_data = w & DATA_BIT != 0;
        if slen == 0 {
            return Err(malformed(what, "empty segment".to_string()));
        }
        total += u64::from(slen);
        if is_data {
            data += u64::from(slen);
        }
        segments.push((slen, is_data));
    }
    if total != u64::from(len) {
        return Err(malformed(
            what,
            format!("segments cover {total} bytes of a {len}-byte chunk"),
        ));
    }
    let hash = d.array()?;
    let zstd = match d.u8()? {
        0 => false,
        1 => true,
        e => return Err(malformed(what, format!("unknown encoding {e}"))),
    };
    let raw_len = d.u32()?;
    if u64::from(raw_len) != data {
        return Err(malformed(
            what,
            format!("{raw_len} data bytes but the segments hold {data}"),
        ));
    }
    let payload = d.rest();
    if !zstd && payload.len() != raw_len as usize {
        return Err(malformed(
            what,
            format!("{} payload bytes for {raw_len} raw bytes", payload.len()),
        ));
    }
    Ok(ChunkFrame {
        start,
        len,
        read,
        segments,
        hash,
        zstd,
        raw_len,
        payload: payload.to_vec(),
    })
}

fn put_bytes(v: &mut Vec<u8>, b: &[u8]) {
    v.extend_from_slice(&(b.len() as u32).to_be_bytes());
    v.extend_from_slice(b);
}

fn malformed(what: &'static str, why: String) -> Error {
    Error::Malformed { what, why }
}

/// A cursor over a payload; every read is bounds-checked.
struct Dec<'a> {
    p: &'a [u8],
    what: &'static str,
}

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.p.len() < n {
            return Err(malformed(self.what, "too short".to_string()));
        }
        let (a, b) = self.p.split_at(n);
        self.p = b;
        Ok(a)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn bytes(&mut self, max: usize) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(malformed(self.what, format!("string of {n} bytes")));
        }
        self.take(n)
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.p)
    }
    fn finish(&self) -> Result<()> {
        if !self.p.is_empty() {
            return Err(malformed(
                self.what,
                format!("{} trailing bytes", self.p.len()),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(m: Message) {
        let mut v = Vec::new();
        m.encode(&mut v);
        let back = Message::decode(m.kind(), &v, &Limits::DEFAULT).unwrap();
        assert_eq!(back, m);
        // Every truncation is refused, never a panic.
        for cut in 0..v.len() {
            if let Ok(short) = Message::decode(m.kind(), &v[..cut], &Limits::DEFAULT) {
                // Only a CHUNK's zstd payload can be cut and still parse,
                // or a request's optional read flags byte be left off.
                assert!(
                    matches!(short, Message::Chunk(ref c) if c.zstd)
                        || matches!(short, Message::Blocks(ref b) if b.zstd)
                        || (cut + 1 == v.len() && without_read_flags(&m) == Some(short.clone()))
                        // The optional trailing fields of SYNC_INFO and SYNC_DONE.
                        || matches!((&m, &short), (Message::SyncInfo(a), Message::SyncInfo(b))
                            if cut + 4 == v.len() && b.block_size == 0 && SyncInfo { block_size: 0, ..*a } == *b)
                        || matches!((&m, &short), (Message::SyncDone(a), Message::SyncDone(b))
                            if cut + 24 == v.len() && b.qcow2.is_none() && SyncDone { qcow2: None, ..*a } == *b),
                    "{cut}: {short:?}"
                );
            }
        }
    }

    /// `m` as a server that gets no read flags byte decodes it.
    fn without_read_flags(m: &Message) -> Option<Message> {
        let mut m = m.clone();
        match &mut m {
            Message::Request(Request::Send(r)) if r.force_share => r.force_share = false,
            Message::Request(Request::Query(q)) if q.force_share => q.force_share = false,
            Message::Request(Request::SyncSend(r)) if r.force_share => r.force_share = false,
            _ => return None,
        }
        Some(m)
    }

    /// A request without -U is byte for byte what the first release sent
    /// (older servers refuse trailing bytes); with it, one byte more.
    #[test]
    fn read_flags_are_sent_only_when_set_and_unknown_bits_are_refused() {
        let q = |force_share| {
            let mut v = Vec::new();
            Message::Request(Request::Query(QueryRequest {
                command: QueryCommand::Info,
                path: b"/i".to_vec(),
                format: None,
                json: false,
                force_share,
            }))
            .encode(&mut v);
            v
        };
        // op 3, command 1, path (u32 length 2, "/i"), format 0, json 0
        assert_eq!(q(false), [3, 1, 0, 0, 0, 2, b'/', b'i', 0, 0]);
        let mut with = q(true);
        assert_eq!(with[..with.len() - 1], q(false)[..]);
        assert_eq!(with.last(), Some(&ReadFlags::FORCE_SHARE));
        *with.last_mut().unwrap() = 0x02;
        let e = Message::decode(kind::REQUEST, &with, &Limits::DEFAULT).unwrap_err();
        assert!(e.to_string().contains("unknown read flags"), "{e}");
    }

    fn chunk() -> ChunkFrame {
        ChunkFrame {
            start: 2 << 20,
            len: 8192,
            read: 8192,
            segments: vec![(4096, true), (4096, false)],
            hash: [7; 32],
            zstd: false,
            raw_len: 4096,
            payload: vec![1; 4096],
        }
    }

    #[test]
    fn messages_round_trip() {
        round_trip(Message::Hello(Hello::ours()));
        round_trip(Message::Request(Request::Receive(ReceiveRequest {
            path: b"/var/lib/x.qcow2".to_vec(),
            format: WireFormat::Qcow2,
            compression: WireCompression::Zstd,
            cluster_bits: 16,
            target_is_zero: true,
            check_space: false,
        })));
        round_trip(Message::Request(Request::Send(SendRequest {
            path: b"a b".to_vec(),
            format: None,
            min_sparse: 4096,
            chunk: 2 << 20,
            unit: 65536,
            level: -1,
            force_share: false,
        })));
        round_trip(Message::Request(Request::Send(SendRequest {
            path: b"vm.qcow2".to_vec(),
            format: Some(WireFormat::Qcow2),
            min_sparse: 512,
            chunk: 2 << 20,
            unit: 65536,
            level: 3,
            force_share: true,
        })));
        round_trip(Message::Image(ImageInfo {
            format: Some(WireFormat::Raw),
            virtual_size: 1 << 40,
            data_bytes: 5,
            data_extents: 1,
            data_units: 1,
            unit: 65536,
        }));
        round_trip(Message::Ready);
        round_trip(Message::Chunk(chunk()));
        round_trip(Message::End(End {
            chunks: 3,
            digest: [9; 32],
        }));
        round_trip(Message::Done(Done {
            bytes_written: 1,
            clusters_compressed: 2,
        }));
        round_trip(Message::Error("x: no space".to_string()));
        round_trip(Message::Request(Request::Query(QueryRequest {
            command: QueryCommand::Rollback,
            path: b"/d".to_vec(),
            format: None,
            json: false,
            force_share: false,
        })));
        round_trip(Message::Request(Request::Query(QueryRequest {
            command: QueryCommand::Map,
            path: b"/x".to_vec(),
            format: Some(WireFormat::Qcow2),
            json: true,
            force_share: true,
        })));
        round_trip(Message::Exit(3));
        let params = SyncParams {
            block_size: 65536,
            key: [3; 32],
            src_size: 1 << 30,
            journal: true,
            check_space: false,
            reread: true,
        };
        round_trip(Message::Request(Request::SyncReceive(SyncReceiveRequest {
            path: b"/d".to_vec(),
            params,
            dst_format: None,
            create: None,
        })));
        round_trip(Message::Request(Request::SyncReceive(SyncReceiveRequest {
            path: b"/d".to_vec(),
            params,
            dst_format: Some(WireFormat::Raw),
            create: None,
        })));
        round_trip(Message::Request(Request::SyncReceive(SyncReceiveRequest {
            path: b"/d".to_vec(),
            params,
            dst_format: None,
            create: Some(CreateParams {
                format: WireFormat::Qcow2,
                compression: WireCompression::Zlib,
                cluster_bits: 12,
            }),
        })));
        round_trip(Message::Request(Request::SyncSend(SyncSendRequest {
            path: b"/s".to_vec(),
            format: None,
            block_size: 4096,
            key: [1; 32],
            level: -128,
            force_share: false,
        })));
        round_trip(Message::Request(Request::SyncSend(SyncSendRequest {
            path: b"/s".to_vec(),
            format: Some(WireFormat::Raw),
            block_size: 65536,
            key: [2; 32],
            level: 1,
            force_share: true,
        })));
        round_trip(Message::SyncInfo(SyncInfo {
            exists: true,
            dst_size: 5,
            resumed: true,
            cached: true,
            key: [7; 32],
            block_size: 0,
        }));
        round_trip(Message::SyncInfo(SyncInfo {
            exists: true,
            dst_size: 5,
            resumed: false,
            cached: false,
            key: [7; 32],
            block_size: 2 << 20,
        }));
        round_trip(Message::Hashes(vec![(1, [2; 16]), (9, [3; 16])]));
        round_trip(Message::HashesEnd(2));
        round_trip(Message::Plan(Plan {
            send_blocks: 1,
            punch_blocks: 2,
            journal_blocks: 3,
            new_blocks: 4,
        }));
        round_trip(Message::Blocks(Blocks {
            first: 7,
            count: 2,
            zstd: false,
            raw_len: 3,
            payload: vec![1, 2, 3],
        }));
        round_trip(Message::Punch { first: 1, count: 2 });
        round_trip(Message::SyncEnd {
            digest: [4; 32],
            blocks: 6,
            bytes_read: 7,
        });
        round_trip(Message::SyncDone(SyncDone {
            blocks_compared: 1,
            blocks_written: 2,
            blocks_punched: 3,
            journal_bytes: 4,
            qcow2: None,
        }));
        round_trip(Message::SyncDone(SyncDone {
            blocks_compared: 1,
            blocks_written: 2,
            blocks_punched: 3,
            journal_bytes: 4,
            qcow2: Some(Qcow2Done {
                clusters_allocated: 5,
                clusters_freed: 6,
                metadata_bytes_written: 7,
            }),
        }));
        round_trip(Message::Meta(FileMeta {
            mode: 0o4750,
            uid: 1000,
            gid: u32::MAX,
            size: 1000003,
        }));
    }

    #[test]
    fn golden_info() {
        let m = Message::Info(Info {
            version: "0.1.0".into(),
            flags: Info::FORCED | Info::RESTRICTED,
            bwlimit: 20 << 20,
        });
        let mut v = Vec::new();
        m.encode(&mut v);
        let want = [
            0, 0, 0, 5, b'0', b'.', b'1', b'.', b'0', // version
            3,    // flags: forced, restricted
            0, 0, 0, 0, 0x01, 0x40, 0, 0, // bwlimit 20 MiB/s
        ];
        assert_eq!(v, want);
        round_trip(m);
        let mut bad = v.clone();
        bad[9] = 8;
        assert!(Message::decode(kind::INFO, &bad, &Limits::DEFAULT).is_err());
        let mut long = Vec::new();
        put_bytes(&mut long, &[b'x'; 65]);
        long.extend_from_slice(&[0; 9]);
        assert!(Message::decode(kind::INFO, &long, &Limits::DEFAULT).is_err());
    }

    #[test]
    fn golden_meta() {
        let mut v = Vec::new();
        Message::Meta(FileMeta {
            mode: 0o640,
            uid: 0x3e8,
            gid: 6,
            size: 0xf4243,
        })
        .encode(&mut v);
        let want = [
            0, 0, 0x01, 0xa0, // mode 0o640
            0, 0, 0x03, 0xe8, // uid 1000
            0, 0, 0, 6, // gid 6
            0, 0, 0, 0, 0, 0x0f, 0x42, 0x43, // size 1000003
        ];
        assert_eq!(v, want);
    }

    #[test]
    fn meta_with_bits_beyond_the_permissions_is_refused() {
        let mut v = Vec::new();
        Message::Meta(FileMeta {
            mode: 0o100644, // S_IFREG | 0644
            uid: 0,
            gid: 0,
            size: 0,
        })
        .encode(&mut v);
        assert!(matches!(
            Message::decode(kind::META, &v, &Limits::DEFAULT),
            Err(Error::Malformed { .. })
        ));
    }

    /// A peer's cluster size outside qcow2's range is refused where it is
    /// decoded (the receiver shifts by it), in both requests that carry one.
    #[test]
    fn cluster_bits_out_of_range_are_refused() {
        for bits in [0u8, 8, 22, 64, 255] {
            let mut v = Vec::new();
            Message::Request(Request::Receive(ReceiveRequest {
                path: b"/d".to_vec(),
                format: WireFormat::Raw,
                compression: WireCompression::None,
                cluster_bits: bits,
                target_is_zero: false,
                check_space: true,
            }))
            .encode(&mut v);
            assert!(
                matches!(
                    Message::decode(kind::REQUEST, &v, &Limits::DEFAULT),
                    Err(Error::Malformed { .. })
                ),
                "receive, {bits}"
            );
            let mut v = Vec::new();
            Message::Request(Request::SyncReceive(SyncReceiveRequest {
                path: b"/d".to_vec(),
                params: SyncParams {
                    block_size: 65536,
                    key: [0; 32],
                    src_size: 1,
                    journal: true,
                    check_space: true,
                    reread: false,
                },
                dst_format: None,
                create: Some(CreateParams {
                    format: WireFormat::Qcow2,
                    compression: WireCompression::None,
                    cluster_bits: bits,
                }),
            }))
            .encode(&mut v);
            assert!(
                matches!(
                    Message::decode(kind::REQUEST, &v, &Limits::DEFAULT),
                    Err(Error::Malformed { .. })
                ),
                "sync-receive create, {bits}"
            );
        }
    }

    #[test]
    fn golden_hello() {
        let mut v = Vec::new();
        Message::Hello(Hello::ours()).encode(&mut v);
        let mut want = b"IMGSYNC\0".to_vec();
        want.extend_from_slice(&[0, 1]); // version 1
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0xff]); // caps: zstd, keepalive, source check, meta, DST format, sync create, block choice, session info
        want.extend_from_slice(&[0x01, 0x10, 0, 0]); // max frame 17 MiB
        want.extend_from_slice(&[0x01, 0, 0, 0]); // max chunk 16 MiB
        assert_eq!(v, want);
    }

    #[test]
    fn golden_chunk() {
        let c = ChunkFrame {
            start: 0x10,
            len: 0x20,
            read: 0x20,
            segments: vec![(0x10, false), (0x10, true)],
            hash: [0xaa; 32],
            zstd: false,
            raw_len: 0x10,
            payload: vec![0x55; 16],
        };
        let mut v = Vec::new();
        Message::Chunk(c).encode(&mut v);
        let mut want = vec![0, 0, 0, 0, 0, 0, 0, 0x10]; // start
        want.extend_from_slice(&[0, 0, 0, 0x20]); // len
        want.extend_from_slice(&[0, 0, 0, 0x20]); // read
        want.extend_from_slice(&[0, 0, 0, 2]); // two segments
        want.extend_from_slice(&[0, 0, 0, 0x10]); // 16 zero bytes
        want.extend_from_slice(&[0x80, 0, 0, 0x10]); // 16 data bytes
        want.extend_from_slice(&[0xaa; 32]); // hash
        want.push(0); // raw
        want.extend_from_slice(&[0, 0, 0, 0x10]); // raw length
        want.extend_from_slice(&[0x55; 16]);
        assert_eq!(v, want);
    }

    fn decode_chunk_bytes(c: &ChunkFrame, limits: &Limits) -> Result<Message> {
        let mut v = Vec::new();
        Message::Chunk(c.clone()).encode(&mut v);
        Message::decode(kind::CHUNK, &v, limits)
    }

    #[test]
    fn chunk_longer_than_the_limit_is_refused() {
        let mut c = chunk();
        c.len = (16 << 20) + 1;
        c.segments = vec![(c.len - 4096, false), (4096, true)];
        assert!(decode_chunk_bytes(&c, &Limits::DEFAULT).is_err());
    }

    #[test]
    fn segments_must_cover_the_chunk() {
        let mut c = chunk();
        c.segments = vec![(4096, true), (4095, false)];
        assert!(decode_chunk_bytes(&c, &Limits::DEFAULT).is_err());
        let mut c = chunk();
        c.segments = vec![(4096, true), (0, false), (4096, false)];
        assert!(decode_chunk_bytes(&c, &Limits::DEFAULT).is_err());
    }

    #[test]
    fn raw_length_must_match_the_data_segments_and_payload() {
        let mut c = chunk();
        c.raw_len = 4095;
        assert!(decode_chunk_bytes(&c, &Limits::DEFAULT).is_err());
        let mut c = chunk();
        c.payload.pop();
        assert!(decode_chunk_bytes(&c, &Limits::DEFAULT).is_err());
    }

    #[test]
    fn huge_segment_count_is_refused_without_allocating() {
        let mut v = Vec::new();
        Message::Chunk(chunk()).encode(&mut v);
        v[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(Message::decode(kind::CHUNK, &v, &Limits::DEFAULT).is_err());
    }

    #[test]
    fn wrong_magic_and_version_are_refused() {
        let mut v = Vec::new();
        Message::Hello(Hello::ours()).encode(&mut v);
        let mut bad = v.clone();
        bad[0] = b'X';
        assert!(matches!(
            Message::decode(kind::HELLO, &bad, &Limits::DEFAULT),
            Err(Error::BadMagic)
        ));
        let mut bad = v.clone();
        bad[9] = 2;
        assert!(matches!(
            Message::decode(kind::HELLO, &bad, &Limits::DEFAULT),
            Err(Error::Version { peer: 2, .. })
        ));
    }

    #[test]
    fn error_frame_becomes_remote_error() {
        let mut v = Vec::new();
        Message::Error("disk: full".into()).encode(&mut v);
        match Message::expect(kind::ERROR, &v, &Limits::DEFAULT, kind::READY) {
            Err(Error::Remote(s)) => assert_eq!(s, "disk: full"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Message::expect(kind::READY, &[], &Limits::DEFAULT, kind::DONE),
            Err(Error::Unexpected { .. })
        ));
    }
}
