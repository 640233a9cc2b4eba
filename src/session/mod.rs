//! The session: the conversation with `imgsync serve` on another host.
//!
//! A [`Client`] is a connection through a transport (the built-in SSH
//! client or an `-e` program), after the handshake, with one method per
//! request: [`Client::push`], [`Client::pull`], [`Client::sync_push`],
//! [`Client::sync_pull`], [`Client::rollback`], [`Client::query`] (info,
//! map), [`Client::check`] and [`Client::compare`]. Each takes typed
//! options and a progress sink and returns a typed report; its errors
//! ([`Error`]) are attributed here, once: what the peer said (an ERROR
//! frame), its exit status and stderr, ssh's own failure, "not installed
//! there", a peer that is not imgsync at all.
//!
//! [`serve`] is the other end: read the request, dispatch it to the
//! engine, answer. [`sync_local`] is a sync with both ends on this host:
//! the same client and server, joined by a socket pair. [`stream`] holds
//! the one-way streams of `convert SRC -` and `convert - DST`.
//!
//! Layers: cli → session → engine → {protocol, io, formats}, and session →
//! transport. Nothing above this module sees a frame or a transport.
#![forbid(unsafe_code)]

mod client;
mod error;
mod local;
pub mod serve;
pub mod stream;
mod target;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use imgsync_formats::qcow2::CompressionType;
use imgsync_formats::Format;

use crate::engine::convert::{self, ConvertOptions};
use crate::protocol::msg::WireFormat;
use crate::transport::watch::Watch;
use crate::transport::SshOptions;

pub use client::{Client, CompareReport, SyncOptions, TransferReport};
pub use error::{named, one_line, Error, Result};
pub use local::{sync_local, LocalSync};
pub use serve::{serve_stdio, Hooks, ServeOptions};
pub use target::{open_target, rollback_to};

/// Where a client connects: `[user@]host[:port]`, as the transport takes
/// it (the path is the request's business).
pub use crate::transport::Host;

/// The version of the imgsync protocol this build speaks (a peer must
/// speak the same).
pub const PROTOCOL_VERSION: u16 = crate::protocol::VERSION;

/// How to reach the peer: the transport and its limits.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// A remote shell program instead of the built-in SSH client (rsync's
    /// `-e`), e.g. `ssh -p 2222`.
    pub rsh: Option<String>,
    /// The imgsync program on the remote host.
    pub remote_imgsync: String,
    /// Known hosts file for the built-in client (default
    /// `~/.ssh/known_hosts`).
    pub known_hosts: Option<PathBuf>,
    /// Add an unknown host key (OpenSSH's accept-new); a changed key is
    /// always refused.
    pub accept_new_host_key: bool,
    /// Identity files for the built-in client, tried after ssh-agent.
    pub identities: Vec<PathBuf>,
    /// SSH config file for the built-in client (default `~/.ssh/config`).
    pub config: Option<PathBuf>,
    /// Give up when the peer sends nothing and takes nothing this long
    /// (`None`: wait for ever).
    pub timeout: Option<Duration>,
    /// Longest time to connect and log in (default: ssh_config's
    /// ConnectTimeout, else the transport's own).
    pub connect_timeout: Option<Duration>,
    /// Set to stop every wait on the peer (Ctrl-C).
    pub cancel: Arc<AtomicBool>,
    /// `--bwlimit`: bytes per second on the wire, each way (this end's
    /// writes, and the serving end's, which the client asks for in-band).
    pub bwlimit: Option<u64>,
    /// `-q`: no notices on stderr (a host handed to OpenSSH by its
    /// ssh_config, a forced command's other imgsync).
    pub quiet: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            rsh: None,
            remote_imgsync: "imgsync".into(),
            known_hosts: None,
            accept_new_host_key: false,
            identities: Vec::new(),
            config: None,
            timeout: Some(crate::transport::DEFAULT_TIMEOUT),
            connect_timeout: None,
            cancel: Arc::default(),
            bwlimit: None,
            quiet: false,
        }
    }
}

impl ConnectOptions {
    fn ssh(&self) -> SshOptions {
        SshOptions {
            rsh: self.rsh.clone(),
            remote_imgsync: Some(self.remote_imgsync.clone()),
            known_hosts: self.known_hosts.clone(),
            accept_new_host_key: self.accept_new_host_key,
            identities: self.identities.clone(),
            config: self.config.clone(),
            watch: Watch::new(self.timeout, Some(self.cancel.clone())),
            connect_timeout: self.connect_timeout,
            quiet: self.quiet,
        }
    }
}

/// This build's imgsync version, as INFO carries it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Right after the handshake, when both ends announced
/// `caps::SESSION_INFO`: sends this end's INFO and reads the peer's
/// (both ends send before they read, so neither waits on the other).
fn exchange_info<R: std::io::Read, W: std::io::Write>(
    fr: &mut crate::protocol::FrameReader<R>,
    fw: &mut crate::protocol::FrameWriter<W>,
    limits: &crate::protocol::Limits,
    caps: u64,
    ours: crate::protocol::msg::Info,
) -> crate::engine::Result<Option<crate::protocol::msg::Info>> {
    use crate::engine::remote::{recv_msg, send_msg};
    use crate::protocol::{msg::kind, Message};
    if caps & crate::protocol::caps::SESSION_INFO == 0 {
        return Ok(None);
    }
    send_msg(fw, &Message::Info(ours))?;
    fw.flush()?;
    match recv_msg(fr, limits, kind::INFO)? {
        Message::Info(i) => Ok(Some(i)),
        _ => unreachable!("recv_msg checks the type"),
    }
}

/// What a transfer makes at DST (convert's options).
#[derive(Clone, Debug)]
pub struct TransferOptions {
    /// SRC's format (`None`: probed).
    pub src_format: Option<Format>,
    /// DST's format (`None`: SRC's).
    pub output_format: Option<Format>,
    /// Compressed qcow2 clusters, of this type.
    pub compression: Option<CompressionType>,
    /// Zero runs at least this long become holes (`-S`).
    pub min_sparse: u64,
    /// DST's qcow2 cluster size, as bits.
    pub cluster_bits: u32,
    /// DST is known to read as zeros already.
    pub target_is_zero: bool,
    /// Refuse before writing when DST's file system is too small.
    pub check_space: bool,
    pub workers: usize,
    /// zstd level on the wire (`None`: adaptive from the default).
    pub level: Option<i32>,
    /// Read SRC even while a writer holds it (qemu-img's `-U`).
    pub force_share: bool,
}

impl Default for TransferOptions {
    fn default() -> Self {
        TransferOptions {
            src_format: None,
            output_format: None,
            compression: None,
            min_sparse: 4096,
            cluster_bits: 16,
            target_is_zero: false,
            check_space: true,
            workers: crate::engine::pipeline::default_workers(),
            level: None,
            force_share: false,
        }
    }
}

impl TransferOptions {
    /// The engine's options for an image whose own format is `src`.
    pub fn convert_options(&self, src: Format) -> Result<ConvertOptions> {
        let output_format = self.output_format.unwrap_or(src);
        if self.compression.is_some() && output_format != Format::Qcow2 {
            return Err(Error::said(
                "-c (compression) needs qcow2 output (-O qcow2)",
            ));
        }
        Ok(ConvertOptions {
            output_format,
            min_sparse: self.min_sparse,
            compression: self.compression,
            cluster_bits: self.cluster_bits,
            target_is_zero: self.target_is_zero,
            check_space: self.check_space,
            workers: self.workers,
        })
    }

    fn send_options(&self, opts: &ConvertOptions) -> crate::engine::remote::SendOptions {
        crate::engine::remote::SendOptions {
            min_sparse: self.min_sparse,
            chunk: convert::grid(opts),
            level: self.level.unwrap_or(crate::engine::remote::DEFAULT_LEVEL),
            adaptive: self.level.is_none(),
            workers: opts.workers,
        }
    }
}

/// What the serve end prints for a query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Query {
    Info,
    Map,
    Check,
}

/// SendRequest.level for "adaptive, from the default".
const AUTO_LEVEL: i8 = i8::MIN;

fn wire_format(f: Format) -> WireFormat {
    match f {
        Format::Raw => WireFormat::Raw,
        Format::Qcow2 => WireFormat::Qcow2,
    }
}

fn format_of(f: WireFormat) -> Format {
    match f {
        WireFormat::Raw => Format::Raw,
        WireFormat::Qcow2 => Format::Qcow2,
    }
}

/// A remote location as the user would write it: `host:path`, or an
/// ssh:// URL when there is a port.
pub fn location_name(host: &Host, path: &str) -> String {
    match host.port {
        Some(port) if host.host.contains(':') => format!("ssh://[{}]:{port}{path}", host.host),
        Some(port) => format!("ssh://{}:{port}{path}", host.host),
        None => format!("{}:{path}", host.host),
    }
}

/// The hash key of one sync: 32 bytes from the kernel's random source.
pub fn random_key() -> Result<[u8; 32]> {
    use std::io::Read;
    let mut k = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut k))
        .map_err(|e| Error::at("/dev/urandom", e))?;
    Ok(k)
}

/// What DST holds after a sync whose SRC changed while it was read.
pub fn dst_holds_the_copy(dst: &dyn std::fmt::Display) -> String {
    format!("{dst} holds that copy (all the data read was written, and its digest matched)")
}
