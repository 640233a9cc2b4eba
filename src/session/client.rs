//! [`Client`]: a connection to `imgsync serve` on a host, after the
//! handshake, and one method per request. Each method consumes the client:
//! serve answers one request per connection.
//!
//! Attribution lives in [`Client::fail`]: when an exchange breaks, the
//! peer may have said why (an ERROR frame), and its exit status and stderr
//! (through the transport's waiter) tell a missing imgsync (127), ssh's own
//! failure (OpenSSH's 255) or a remote crash apart.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use imgsync_formats::qcow2::CompressionType;
use imgsync_formats::{Format, Image};

use super::error::{engine_line, named};
use super::target::{local_state, remote_state, with_state};
use super::{
    format_of, location_name, wire_format, ConnectOptions, Error, Host, Query, Result,
    TransferOptions, AUTO_LEVEL,
};
use crate::engine::compare::Outcome;
use crate::engine::convert::{self, ConvertOptions};
use crate::engine::remote::{self, handshake, recv_msg, send_msg};
use crate::engine::sync::{SyncReceiveOptions, SyncReport, SyncSendOptions, Target};
use crate::engine::{self, Progress};
use crate::io::{FileMeta, Source};
use crate::protocol::msg::{
    kind, CreateParams, ImageInfo, Info, QueryCommand, QueryRequest, ReceiveRequest, Request,
    SendRequest, SyncParams, SyncReceiveRequest, SyncSendRequest, WireCompression,
};
use crate::protocol::{self, FrameReader, FrameWriter, Limits, Message};
use crate::transport::{self, Waiter};

pub(super) type Reader = FrameReader<Box<dyn Read + Send>>;
pub(super) type Writer = FrameWriter<Box<dyn Write + Send>>;

/// A connection to `imgsync serve` on a host, after the handshake.
pub struct Client {
    host: Host,
    remote_imgsync: String,
    pub(super) fr: Reader,
    pub(super) fw: Writer,
    waiter: Box<dyn Waiter>,
    pub(super) limits: Limits,
    /// Capabilities both ends announced.
    pub(super) caps: u64,
    cancel: Arc<AtomicBool>,
    /// How it was reached (`None`: a local socket pair), to connect again.
    reach: Option<ConnectOptions>,
}

/// What a push or a pull did (for `--stats` and `--output json`).
#[derive(Clone, Copy, Debug)]
pub struct TransferReport {
    pub format: Format,
    pub virtual_size: u64,
    /// SRC data bytes read.
    pub bytes_read: u64,
    /// Of those, zeros not sent.
    pub zero_bytes: u64,
    /// Data sent (before compression).
    pub data_sent: u64,
    /// Protocol bytes both ways.
    pub wire_bytes: u64,
    pub bytes_written: u64,
    pub clusters_compressed: u64,
    /// zstd level at the end of the transfer (when this end sent).
    pub level: Option<i32>,
    pub seconds: f64,
}

impl TransferReport {
    /// What a receiving end reports of an image it made from a stream.
    pub(super) fn received(
        format: Format,
        info: &ImageInfo,
        report: &convert::Report,
        wire_bytes: u64,
        started: Instant,
    ) -> TransferReport {
        TransferReport {
            format,
            virtual_size: info.virtual_size,
            bytes_read: report.bytes_read,
            zero_bytes: report.zero_bytes,
            data_sent: report.bytes_read - report.zero_bytes,
            wire_bytes,
            bytes_written: report.bytes_written,
            clusters_compressed: report.clusters_compressed,
            level: None,
            seconds: started.elapsed().as_secs_f64(),
        }
    }
}

/// The report of a sync that made DST as a whole-image transfer: every
/// block with data was sent, none compared. `bs`: the sync's block size.
fn created_report(
    src_size: u64,
    bytes_read: u64,
    data_sent: u64,
    bs: u64,
    elapsed: std::time::Duration,
) -> SyncReport {
    let blocks = data_sent.div_ceil(bs.max(u64::from(crate::engine::sync::MIN_BLOCK)));
    SyncReport {
        src_size,
        dst_existed: false,
        resumed: false,
        dst_cached: false,
        bytes_read,
        blocks_compared: 0,
        blocks_sent: blocks,
        blocks_punched: 0,
        data_sent,
        done: crate::protocol::msg::SyncDone {
            blocks_compared: 0,
            blocks_written: blocks,
            blocks_punched: 0,
            journal_bytes: 0,
            qcow2: None,
        },
        elapsed,
    }
}

/// What a compare with a remote image found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompareReport {
    pub outcome: Outcome,
    /// The virtual sizes differ.
    pub size_mismatch: bool,
}

/// How a sync makes DST when it does not exist.
pub(super) struct Create {
    new_format: Option<Format>,
    compression: Option<CompressionType>,
    cluster_bits: u32,
}

impl SyncOptions {
    pub(super) fn create(&self) -> Create {
        Create {
            new_format: self.new_format,
            compression: self.compression,
            cluster_bits: self.cluster_bits,
        }
    }

    /// After a sync that made DST (of SRC's format `src`): the warning
    /// when DST's name says another format.
    pub(super) fn warn_new(&self, report: &SyncReport, dst: &str, src: Format) {
        if report.dst_existed {
            return;
        }
        if let (Some(warn), Some(w)) = (
            &self.warn,
            name_warning(dst, self.new_format.unwrap_or(src)),
        ) {
            warn(&w);
        }
    }
}

/// The warning for a new DST whose name says another format than the one
/// it is made in (`disk.qcow2` made raw, `disk.img` made qcow2).
pub(super) fn name_warning(dst: &str, format: Format) -> Option<String> {
    let ext = Path::new(dst).extension()?.to_str()?.to_ascii_lowercase();
    let named = match ext.as_str() {
        "qcow2" | "qcow" => Format::Qcow2,
        "raw" | "img" => Format::Raw,
        _ => return None,
    };
    (named != format).then(|| {
        format!(
            "{dst}: warning: made as a {} image, though its name ends in .{ext} (-O {} makes it {})",
            format.name(),
            named.name(),
            named.name()
        )
    })
}

/// Called with a warning line (no `imgsync: ` prefix) for stderr.
pub type Warn = Arc<dyn Fn(&str) + Send + Sync>;

/// What a sync does, whichever end is where.
#[derive(Clone)]
pub struct SyncOptions {
    /// SRC's format when SRC is on the host (`None`: probed there).
    pub src_format: Option<Format>,
    /// An existing DST's format as the user named it (`None`: probed).
    pub dst_format: Option<Format>,
    /// A new DST's format (`-O`; `None`: SRC's, as convert).
    pub new_format: Option<Format>,
    /// A new qcow2 DST's compression (`-c`).
    pub compression: Option<CompressionType>,
    /// A new qcow2 DST's cluster size, as bits.
    pub cluster_bits: u32,
    /// Where warnings go (a new DST whose name says another format).
    pub warn: Option<Warn>,
    /// Blocks compared (`None`: a qcow2 DST's cluster size, at least
    /// 4 KiB, else 64 KiB; the receiver chooses).
    pub block_size: Option<u32>,
    pub journal: bool,
    pub check_space: bool,
    /// Read DST's blocks again instead of trusting its hash cache.
    pub reread: bool,
    /// zstd level (`None`: adaptive).
    pub level: Option<i32>,
    pub force_share: bool,
    pub workers: usize,
}

impl Default for SyncOptions {
    /// 64 KiB blocks, a journal, the space check, adaptive zstd.
    fn default() -> Self {
        SyncOptions {
            src_format: None,
            dst_format: None,
            new_format: None,
            compression: None,
            cluster_bits: 16,
            warn: None,
            block_size: None,
            journal: true,
            check_space: true,
            reread: false,
            level: None,
            force_share: false,
            workers: crate::engine::pipeline::default_workers(),
        }
    }
}

/// What to say when sshd ran its forced command instead of ours and
/// that imgsync is another version: `--remote-imgsync` had no effect.
fn forced_note(host: &Host, remote_imgsync: &str, peer: &Info) -> Option<String> {
    if peer.flags & Info::FORCED == 0 || peer.version == super::VERSION {
        return None;
    }
    let path = if remote_imgsync == "imgsync" {
        String::new()
    } else {
        format!(" (--remote-imgsync {remote_imgsync} has no effect there)")
    };
    Some(format!(
        "{host}: sshd ran the key's forced command in place of imgsync's own{path}: the imgsync serving there is {}, this one is {}",
        if peer.version.is_empty() { "unknown" } else { &peer.version },
        super::VERSION
    ))
}

/// A remote check's JSON report is held in memory; qemu-img check's lists
/// are capped (1000 problems each), so a real one is well under this.
const MAX_CHECK_REPORT: usize = 16 << 20;

impl Client {
    /// Connects to `imgsync serve` on `host` and shakes hands.
    pub fn connect(host: &Host, opts: &ConnectOptions) -> Result<Client> {
        let ssh = opts.ssh();
        let watch = ssh.watch.clone();
        let conn = transport::connect(host, &ssh).map_err(Error::other)?;
        let mut client = Client {
            host: host.clone(),
            remote_imgsync: opts.remote_imgsync.clone(),
            fr: FrameReader::new(conn.reader, Limits::DEFAULT.max_frame),
            fw: FrameWriter::new(conn.writer),
            waiter: conn.waiter,
            limits: Limits::DEFAULT,
            caps: 0,
            cancel: opts.cancel.clone(),
            reach: Some(opts.clone()),
        };
        match handshake(&mut client.fr, &mut client.fw) {
            Ok(n) => {
                client.limits = n.limits;
                client.caps = n.caps;
                if n.caps & protocol::caps::KEEPALIVE == 0 {
                    // An older serve says nothing while it is busy (a big
                    // check, hashing): its silence is not death.
                    watch.set_timeout(None);
                }
            }
            Err(e) => return Err(client.fail(e)),
        }
        // --bwlimit: this end's writes here; the serving end's are asked
        // for in INFO (an older serve, without it, is not limited).
        client
            .fw
            .set_rate_limit(opts.bwlimit, Some(opts.cancel.clone()));
        let ours = Info {
            version: super::VERSION.into(),
            flags: 0,
            bwlimit: opts.bwlimit.unwrap_or(0),
        };
        let (limits, caps) = (client.limits, client.caps);
        let peer = match super::exchange_info(&mut client.fr, &mut client.fw, &limits, caps, ours) {
            Ok(p) => p,
            Err(e) => return Err(client.fail(e)),
        };
        if let Some(p) = peer {
            if !opts.quiet {
                if let Some(note) = forced_note(host, &opts.remote_imgsync, &p) {
                    // Never panics on a closed stderr (as eprintln! would).
                    let _ = writeln!(std::io::stderr(), "imgsync: {note}");
                }
            }
        }
        Ok(client)
    }

    /// A client over streams already joined to a serve (the local sync's
    /// socket pair), after the handshake.
    pub(super) fn over(
        name: &str,
        reader: Box<dyn Read + Send>,
        writer: Box<dyn Write + Send>,
        waiter: Box<dyn Waiter>,
        cancel: Arc<AtomicBool>,
    ) -> engine::Result<Client> {
        let mut fr = FrameReader::new(reader, Limits::DEFAULT.max_frame);
        let mut fw = FrameWriter::new(writer);
        let n = handshake(&mut fr, &mut fw)?;
        let ours = Info {
            version: super::VERSION.into(),
            ..Info::default()
        };
        super::exchange_info(&mut fr, &mut fw, &n.limits, n.caps, ours)?;
        Ok(Client {
            host: Host {
                user: None,
                host: name.to_string(),
                port: None,
            },
            remote_imgsync: String::new(),
            fr,
            fw,
            waiter,
            limits: n.limits,
            caps: n.caps,
            cancel,
            reach: None,
        })
    }

    /// The host this client is connected to.
    pub fn host(&self) -> &Host {
        &self.host
    }

    fn interrupted(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// The error of a failed exchange, in one line naming the host. When
    /// the stream broke, the peer may have said why (an ERROR frame, its
    /// exit status, stderr).
    pub(super) fn fail(self, e: engine::Error) -> Error {
        if let engine::Error::Protocol(protocol::Error::NotProtocol(head)) = &e {
            // Whatever runs there is not imgsync serve (or a login script
            // writes to stdout first); waiting for it to end could be
            // forever.
            return Error::said(format!(
                "{}: the remote command {} instead of speaking the imgsync protocol; is the remote shell clean (no output from its startup files), and is imgsync serve what runs there (--remote-imgsync)?",
                self.host,
                protocol::describe_foreign(head)
            ));
        }
        if self.interrupted() || transport::watch::is_cancelled(&e) {
            // Ctrl-C: no last word is worth waiting for.
            self.waiter.abort();
            return Error::said(format!("{}: interrupted", self.host));
        }
        if transport::watch::is_timeout(&e) {
            self.waiter.abort();
            return Error::said(format!("{}: {}", self.host, engine_line(&e)));
        }
        let Client {
            host,
            remote_imgsync,
            mut fr,
            fw,
            waiter,
            ..
        } = self;
        // EOF to the peer first: a peer waiting for us ends and closes.
        drop(fw);
        let broken = matches!(
            e,
            engine::Error::Protocol(
                protocol::Error::Write(_)
                    | protocol::Error::Read(_)
                    | protocol::Error::Eof
                    | protocol::Error::Truncated
            )
        );
        let mut said = None;
        let mut e = e;
        if broken {
            // The peer may have sent an ERROR before it closed, or
            // something that explains the failure better than a broken
            // pipe does (a frame this end refuses, say).
            for _ in 0..4 {
                // A peer that only says it is alive (busy, not reading
                // yet) is not waited for beyond a few seconds.
                match fr.read_frame_unless_idle(5) {
                    Ok(None) => break,
                    Ok(Some((k, p))) => match Message::decode(k, p, &Limits::DEFAULT) {
                        Ok(Message::Error(s)) => {
                            said = Some(s);
                            break;
                        }
                        Ok(_) => continue,
                        Err(pe) => {
                            e = pe.into();
                            break;
                        }
                    },
                    Err(
                        protocol::Error::Eof
                        | protocol::Error::Truncated
                        | protocol::Error::Read(_),
                    ) => break,
                    Err(pe) => {
                        e = pe.into();
                        break;
                    }
                }
            }
        }
        drop(fr);
        if let engine::Error::Protocol(protocol::Error::Remote(s)) = &e {
            said = Some(s.clone());
        }
        let exit = if broken || said.is_some() {
            waiter.wait().ok()
        } else {
            // The peer may still be waiting for data; the connection is
            // closed and it ends on its own.
            drop(waiter);
            None
        };
        if let Some(s) = said {
            return Error::said(format!("{host}: {s}"));
        }
        if let Some(x) = exit {
            // With -e, ssh's notices come first; they are not the remote's.
            let stderr = x
                .stderr
                .lines()
                .find(|l| !l.trim().is_empty() && !l.starts_with("Warning: Permanently added"))
                .unwrap_or("");
            if let Some(program) = &x.transport_failed {
                // ssh's own failure: its last line is the verdict (a
                // changed host key comes after a box of warnings).
                let said = x
                    .stderr
                    .lines()
                    .rfind(|l| !l.trim().is_empty())
                    .map(str::trim)
                    .unwrap_or("no message");
                return Error::said(format!("{host}: {program} failed: {said}"));
            }
            if x.status == Some(127) {
                return Error::said(format!(
                    "{host}: {remote_imgsync} was not found on the remote host ({}); install imgsync there or pass --remote-imgsync PATH",
                    if stderr.is_empty() { "exit status 127" } else { stderr.trim() }
                ));
            }
            if !stderr.is_empty() {
                return Error::said(format!(
                    "{host}: {}: the remote side said: {}",
                    engine_line(&e),
                    stderr.trim()
                ));
            }
            if let Some(st) = x.status.filter(|&s| s != 0) {
                return Error::said(format!(
                    "{host}: {} (remote exit status {st})",
                    engine_line(&e)
                ));
            }
        }
        Error::said(format!("{host}: {}", engine_line(&e)))
    }

    /// Sends `req` (send or sync-send: the peer holds SRC) and reads the
    /// image's IMAGE and META.
    fn request_image(
        &mut self,
        req: Request,
    ) -> engine::Result<(ImageInfo, Option<protocol::msg::FileMeta>)> {
        send_msg(&mut self.fw, &Message::Request(req))?;
        self.fw.flush()?;
        let info = match recv_msg(&mut self.fr, &self.limits, kind::IMAGE)? {
            Message::Image(i) => i,
            m => {
                return Err(protocol::Error::Unexpected {
                    expected: "IMAGE",
                    got: m.name(),
                }
                .into())
            }
        };
        let meta = remote::recv_meta(&mut self.fr, &self.limits, self.caps)?;
        Ok((info, meta))
    }

    /// SRC's data as CHUNK frames up to END (a push's, after READY).
    fn send_image(
        &mut self,
        source: &Source,
        send: &remote::SendOptions,
        progress: &dyn Progress,
    ) -> engine::Result<remote::SendStats> {
        let limits = self.limits;
        remote::send_chunks(
            &source.image,
            &mut self.fw,
            &limits,
            send,
            &source.watch,
            progress,
            &self.cancel,
        )
    }

    /// Ends a completed exchange: EOF to the peer, then its exit.
    fn finish(self) {
        let Client { fr, fw, waiter, .. } = self;
        drop(fw);
        drop(fr);
        let _ = waiter.wait();
    }

    /// Tells the peer why this end stops (it may be waiting for data),
    /// without waiting for it.
    fn tell(mut self, why: &dyn std::fmt::Display) {
        let _ = send_msg(&mut self.fw, &Message::Error(why.to_string()));
        let _ = self.fw.flush();
    }

    fn wire(&self) -> u64 {
        self.fw.bytes + self.fr.bytes
    }

    /// convert with DST on the host: `source` (at `src`, for its
    /// permissions and in messages) becomes a new image at `path` there,
    /// appearing only when complete.
    pub fn push(
        mut self,
        source: &Source,
        src: &Path,
        path: &str,
        opts: &TransferOptions,
        progress: &dyn Progress,
    ) -> Result<TransferReport> {
        let started = Instant::now();
        let image = &source.image;
        let dst_name = location_name(&self.host, path);
        let copts = opts.convert_options(image.format())?;
        let meta = FileMeta::of_path(src).map_err(|e| Error::at(src.display(), e))?;
        let named = |e| named(e, src, Path::new(&dst_name), None);
        convert::check_options(image, &copts).map_err(named)?;
        let info = remote::image_info(image, convert::output_unit(&copts)).map_err(named)?;
        let req = Request::Receive(ReceiveRequest {
            path: path.as_bytes().to_vec(),
            format: wire_format(copts.output_format),
            compression: match copts.compression {
                None => WireCompression::None,
                Some(CompressionType::Zlib) => WireCompression::Zlib,
                Some(CompressionType::Zstd) => WireCompression::Zstd,
            },
            cluster_bits: copts.cluster_bits as u8,
            target_is_zero: copts.target_is_zero,
            check_space: copts.check_space,
        });
        let ready = (|| {
            send_msg(&mut self.fw, &Message::Request(req))?;
            send_msg(&mut self.fw, &Message::Image(info))?;
            remote::send_meta(&mut self.fw, self.caps, &meta, image)?;
            self.fw.flush()?;
            recv_msg(&mut self.fr, &self.limits, kind::READY)
        })();
        if let Err(e) = ready {
            return Err(self.fail(e));
        }
        progress.start(info.data_bytes);
        let sent = self.send_image(source, &opts.send_options(&copts), progress);
        let sent = match sent {
            Ok(s) => s,
            Err(
                e @ (engine::Error::Source(_)
                | engine::Error::Internal(_)
                | engine::Error::SourceChanged(_)),
            ) => {
                // No END: the receiver puts nothing in place. Say why there.
                self.tell(&e);
                return Err(named(e));
            }
            Err(engine::Error::Interrupted) => {
                drop(self);
                return Err(Error::said(format!(
                    "{dst_name}: interrupted; nothing was written"
                )));
            }
            Err(e) => return Err(self.fail(e)),
        };
        progress.phase(engine::Phase::Verify);
        let done = match recv_msg(&mut self.fr, &self.limits, kind::DONE) {
            Ok(Message::Done(d)) => d,
            Ok(_) => unreachable!("recv_msg checks the type"),
            Err(e) => return Err(self.fail(e)),
        };
        let wire = self.wire();
        self.finish();
        Ok(TransferReport {
            format: copts.output_format,
            virtual_size: info.virtual_size,
            bytes_read: sent.bytes_read,
            zero_bytes: sent.zero_bytes,
            data_sent: sent.data_sent,
            wire_bytes: wire,
            bytes_written: done.bytes_written,
            clusters_compressed: done.clusters_compressed,
            level: Some(sent.level),
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// convert with SRC on the host: the image at `path` there becomes a
    /// new image at `dst` here, appearing only when complete.
    pub fn pull(
        mut self,
        path: &str,
        dst: &Path,
        opts: &TransferOptions,
        progress: &dyn Progress,
    ) -> Result<TransferReport> {
        let started = Instant::now();
        let src_name = location_name(&self.host, path);
        // The grid and unit depend on the output format, known once IMAGE
        // arrives; ask with the cluster size given (the default 64 KiB):
        // the grid (2 MiB or more, a power of two) suits any cluster size.
        let probe = opts
            .convert_options(opts.output_format.unwrap_or(Format::Raw))
            .or_else(|_| opts.convert_options(Format::Qcow2))?;
        let req = Request::Send(SendRequest {
            path: path.as_bytes().to_vec(),
            format: opts.src_format.map(wire_format),
            min_sparse: opts.min_sparse,
            chunk: convert::grid(&probe) as u32,
            unit: 1u64 << probe.cluster_bits,
            level: opts.level.map_or(AUTO_LEVEL, |l| l.clamp(0, 19) as i8),
            force_share: opts.force_share,
        });
        let (info, meta) = match self.request_image(req) {
            Ok(x) => x,
            Err(e) => return Err(self.fail(e)),
        };
        let output_format = opts
            .output_format
            .or(info.format.map(format_of))
            .unwrap_or(Format::Raw);
        let copts = opts.convert_options(output_format)?;
        let limits = self.limits;
        let cancel = self.cancel.clone();
        let result = super::stream::receive_into(
            &mut self.fr,
            &limits,
            &info,
            super::stream::Meta::Known(meta),
            &src_name,
            dst,
            &copts,
            progress,
            &cancel,
        );
        let report = match result {
            Ok(r) => r,
            Err(super::stream::Fail::Local(e)) => {
                drop(self);
                return Err(e);
            }
            Err(super::stream::Fail::Stream(e)) => {
                let e = self.fail(e);
                return Err(Error::said(format!(
                    "{} (nothing was written to {})",
                    e.one_line(),
                    dst.display()
                )));
            }
        };
        let wire = self.wire();
        self.finish();
        Ok(TransferReport::received(
            output_format,
            &info,
            &report,
            wire,
            started,
        ))
    }

    /// info or map of the image at `path` there: what the remote imgsync
    /// prints goes to `out`; returns its exit status.
    pub fn query(
        self,
        path: &str,
        query: Query,
        format: Option<Format>,
        json: bool,
        force_share: bool,
        out: &mut dyn Write,
    ) -> Result<u8> {
        let command = match query {
            Query::Info => QueryCommand::Info,
            Query::Map => QueryCommand::Map,
            Query::Check => QueryCommand::Check,
        };
        self.run_query(path, command, format, json, force_share, out, usize::MAX)
    }

    /// check of the image at `path` there: its report, qemu-img check's
    /// JSON object (the caller prints it and derives the exit status, as
    /// for a local check).
    pub fn check(
        self,
        path: &str,
        format: Option<Format>,
        force_share: bool,
    ) -> Result<serde_json::Value> {
        let name = location_name(&self.host, path);
        let mut report = Vec::new();
        self.run_query(
            path,
            QueryCommand::Check,
            format,
            true,
            force_share,
            &mut report,
            MAX_CHECK_REPORT,
        )?;
        serde_json::from_slice(&report)
            .map_err(|e| Error::said(format!("{name}: the check report is not JSON: {e}")))
    }

    /// `sync --rollback` of DST at `path` there: what it did goes to `out`.
    pub fn rollback(self, path: &str, out: &mut dyn Write) -> Result<u8> {
        self.run_query(
            path,
            QueryCommand::Rollback,
            None,
            false,
            false,
            out,
            usize::MAX,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn run_query(
        mut self,
        path: &str,
        command: QueryCommand,
        format: Option<Format>,
        json: bool,
        force_share: bool,
        out: &mut dyn Write,
        max: usize,
    ) -> Result<u8> {
        let req = Request::Query(QueryRequest {
            command,
            path: path.as_bytes().to_vec(),
            format: format.map(wire_format),
            json,
            force_share,
        });
        let mut written = 0usize;
        let r = (|| -> engine::Result<u8> {
            send_msg(&mut self.fw, &Message::Request(req))?;
            self.fw.flush()?;
            loop {
                let (k, p) = self.fr.read_frame()?;
                match Message::decode(k, p, &self.limits)? {
                    Message::Output(b) => {
                        written = written.saturating_add(b.len());
                        if written > max {
                            return Err(protocol::Error::Remote(format!(
                                "{path}: check report larger than {max} bytes"
                            ))
                            .into());
                        }
                        out.write_all(&b).map_err(engine::Error::Dest)?;
                    }
                    Message::Exit(code) => {
                        out.flush().map_err(engine::Error::Dest)?;
                        return Ok(code);
                    }
                    Message::Error(s) => return Err(protocol::Error::Remote(s).into()),
                    m => {
                        return Err(protocol::Error::Unexpected {
                            expected: "OUTPUT",
                            got: m.name(),
                        }
                        .into())
                    }
                }
            }
        })();
        match r {
            Ok(code) => {
                self.finish();
                Ok(code)
            }
            Err(engine::Error::Dest(e)) => Err(Error::at("stdout", e)),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Compares `local` (at `local_path`) with the image at `path` there,
    /// pulled as a stream (only its data crosses).
    #[allow(clippy::too_many_arguments)]
    pub fn compare(
        mut self,
        local: &Image,
        local_path: &Path,
        path: &str,
        format: Option<Format>,
        force_share: bool,
        progress: &dyn Progress,
    ) -> Result<CompareReport> {
        use crate::engine::compare::compare_chunks;
        use crate::engine::pipeline::{BufPool, Source};
        let req = Request::Send(SendRequest {
            path: path.as_bytes().to_vec(),
            format: format.map(wire_format),
            min_sparse: 512,
            chunk: convert::CHUNK_BYTES as u32,
            unit: 1 << 16,
            level: AUTO_LEVEL,
            force_share,
        });
        // The file's permissions do not take part in a compare.
        let info = match self.request_image(req) {
            Ok((info, _meta)) => info,
            Err(e) => return Err(self.fail(e)),
        };
        let pool = BufPool::new(2);
        let limits = self.limits;
        let cancel = self.cancel.clone();
        let mut frames = remote::ChunkFrames::new(&mut self.fr, limits, info.virtual_size, 1);
        let chunks = (&mut frames).map(|job| job.and_then(|j| remote::FrameSource.chunk(j, &pool)));
        let result = compare_chunks(local, info.virtual_size, chunks, progress, &cancel);
        let result = result.and_then(|o| {
            if o == Outcome::Identical {
                frames.check_end()?;
            }
            Ok(o)
        });
        match result {
            Ok(o) => {
                if o == Outcome::Identical {
                    self.finish();
                }
                Ok(CompareReport {
                    outcome: o,
                    size_mismatch: info.virtual_size != local.virtual_size(),
                })
            }
            Err(e @ engine::Error::Protocol(_)) => Err(self.fail(e)),
            Err(e) => Err(named(e, local_path, local_path, None)),
        }
    }

    /// sync with DST at `path` there (push): the remote imgsync is the
    /// receiver. A failure says what it left DST as; a SRC that changed
    /// while read is an error after a complete sync.
    pub fn sync_push(
        self,
        source: &Source,
        src: &Path,
        path: &str,
        opts: &SyncOptions,
        progress: &dyn Progress,
    ) -> Result<(SyncReport, u64)> {
        // As every message spells a remote location (`host:path`, or
        // `ssh://host:port/path` with a port).
        let dst_name = location_name(&self.host, path);
        let cancel = self.cancel.clone();
        let (params, sopts) = send_side(source, opts, self.caps)?;
        let r = self.sync_push_inner(source, src, path, &params, opts, &sopts, progress);
        match r {
            Ok(r) => {
                source_held_still(source, &dst_name)?;
                opts.warn_new(&r.0, &dst_name, source.image.format());
                Ok(r)
            }
            Err(e) => {
                let state = remote_state(&sopts.state, params.journal);
                Err(with_state(e, &dst_name, state, &cancel))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn sync_push_inner(
        mut self,
        source: &Source,
        src: &Path,
        path: &str,
        params: &SyncParams,
        opts: &SyncOptions,
        sopts: &SyncSendOptions,
        progress: &dyn Progress,
    ) -> Result<(SyncReport, u64)> {
        let meta = FileMeta::of_path(src).map_err(|e| Error::at(src.display(), e))?;
        let create = opts.create();
        let r = self.sync_exchange(
            source,
            &meta,
            path.as_bytes(),
            params,
            opts.dst_format,
            &create,
            sopts,
            progress,
        );
        let dst_name = location_name(&self.host, path);
        match r {
            Ok(report) => {
                let wire = self.wire();
                self.finish();
                Ok((report, wire))
            }
            Err(e @ (engine::Error::Source(_) | engine::Error::Internal(_))) => {
                drop(self);
                Err(named(e, src, Path::new(&dst_name), None))
            }
            // This end's verdict on DST (a qcow2 DST an older serve
            // cannot make): named by DST's location.
            Err(engine::Error::Dest(e)) => {
                drop(self);
                Err(Error::said(format!("{dst_name}: {e}")))
            }
            Err(engine::Error::Interrupted) => {
                self.waiter.abort();
                drop((self.fr, self.fw));
                Err(Error::said(format!("{dst_name}: interrupted")))
            }
            Err(e) => Err(self.fail(e)),
        }
    }

    /// The sending end of a sync whose receiver is the peer: request,
    /// META, then the engine's exchange.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn sync_exchange(
        &mut self,
        source: &Source,
        meta: &FileMeta,
        path: &[u8],
        params: &SyncParams,
        dst_format: Option<Format>,
        create: &Create,
        sopts: &SyncSendOptions,
        progress: &dyn Progress,
    ) -> engine::Result<SyncReport> {
        let image = &source.image;
        // An older serve cannot be told; it probes DST (and refuses a
        // qcow2 one, as before).
        let dst_format = dst_format
            .filter(|_| self.caps & protocol::caps::DST_FORMAT != 0)
            .map(wire_format);
        // A new DST is made in -O's format, else SRC's; a qcow2 one as a
        // push of the whole image (a raw one by the sync itself, which
        // leaves the hash cache for the next run).
        let new_format = create.new_format.unwrap_or(image.format());
        let create_params = (new_format == Format::Qcow2
            && self.caps & protocol::caps::SYNC_CREATE != 0)
            .then(|| CreateParams {
                format: wire_format(new_format),
                compression: match create.compression {
                    None => WireCompression::None,
                    Some(CompressionType::Zlib) => WireCompression::Zlib,
                    Some(CompressionType::Zstd) => WireCompression::Zstd,
                },
                cluster_bits: create.cluster_bits as u8,
            });
        let req = Request::SyncReceive(SyncReceiveRequest {
            path: path.to_vec(),
            params: *params,
            dst_format,
            create: create_params,
        });
        let limits = self.limits;
        let cancel = self.cancel.clone();
        send_msg(&mut self.fw, &Message::Request(req))?;
        remote::send_meta(&mut self.fw, self.caps, meta, image)?;
        let info = crate::engine::sync::recv_sync_info(&mut self.fr, &mut self.fw, &limits)?;
        let params = &SyncParams {
            block_size: match info.block_size {
                0 => params.block_size,
                chosen => chosen,
            },
            ..*params
        };
        if !info.exists && new_format == Format::Qcow2 {
            sopts.state.informed.store(true, Ordering::Relaxed);
            if create_params.is_none() {
                // An older serve would make a raw file: never that.
                return Err(engine::Error::Dest(std::io::Error::other(
                    "the imgsync there is too old to create a qcow2 DST in a sync: update it, pass -O raw, or make DST with imgsync convert first",
                )));
            }
            return self.create_exchange(source, params, create, sopts, progress);
        }
        crate::engine::sync::sync_send_after(
            image,
            info,
            &mut self.fr,
            &mut self.fw,
            &limits,
            params,
            sopts,
            progress,
            &cancel,
        )
    }

    /// A sync whose DST did not exist, made as a push of the whole image
    /// in a qcow2 (SRC read once): IMAGE, READY, CHUNK*, END, DONE.
    fn create_exchange(
        &mut self,
        source: &Source,
        params: &SyncParams,
        create: &Create,
        sopts: &SyncSendOptions,
        progress: &dyn Progress,
    ) -> engine::Result<SyncReport> {
        let started = Instant::now();
        let image = &source.image;
        let copts = ConvertOptions {
            output_format: create.new_format.unwrap_or(image.format()),
            min_sparse: 4096,
            compression: create.compression,
            cluster_bits: create.cluster_bits,
            target_is_zero: false,
            check_space: params.check_space,
            workers: sopts.workers,
        };
        convert::check_options(image, &copts)?;
        let info = remote::image_info(image, convert::output_unit(&copts))?;
        send_msg(&mut self.fw, &Message::Image(info))?;
        self.fw.flush()?;
        recv_msg(&mut self.fr, &self.limits, kind::READY)?;
        sopts.state.ready.store(true, Ordering::Relaxed);
        progress.start(info.data_bytes);
        let send = remote::SendOptions {
            min_sparse: 4096,
            chunk: convert::grid(&copts),
            level: sopts.level,
            adaptive: sopts.adaptive,
            workers: sopts.workers,
        };
        let sent = self.send_image(source, &send, progress)?;
        recv_msg(&mut self.fr, &self.limits, kind::DONE)?;
        Ok(created_report(
            params.src_size,
            sent.bytes_read,
            sent.data_sent,
            u64::from(params.block_size),
            started.elapsed(),
        ))
    }

    /// sync with SRC at `path` there (pull): this end is the receiver,
    /// DST is `dst` here, opened by [`super::open_target`] (before
    /// connecting, so a DST that cannot be synced costs no connection). A
    /// failure says what it left DST as.
    pub fn sync_pull(
        self,
        path: &str,
        dst: &Path,
        target: Target,
        opts: &SyncOptions,
        progress: &dyn Progress,
    ) -> Result<(SyncReport, u64)> {
        let changing = Arc::new(AtomicBool::new(false));
        let cancel = self.cancel.clone();
        // Any DST but a new one existed: a qcow2 DST counted as absent had
        // its failure line say nothing of its journal.
        let existed = Some(!matches!(target, Target::New(_)));
        if matches!(target, Target::New(_)) && opts.new_format == Some(Format::Qcow2) {
            // DST absent, to be made a qcow2: a pull of the whole image,
            // SRC read once.
            drop(target);
            return self
                .sync_create_pull(path, dst, opts, progress)
                .map_err(|e| {
                    let state = local_state(dst, existed, opts.journal, &changing);
                    with_state(e, &dst.display().to_string(), state, &cancel)
                });
        }
        let r = super::random_key().and_then(|key| {
            self.sync_pull_inner(path, dst, target, key, opts, changing.clone(), progress)
        });
        r.map_err(|e| {
            let state = local_state(dst, existed, opts.journal, &changing);
            with_state(e, &dst.display().to_string(), state, &cancel)
        })
    }

    fn sync_create_pull(
        self,
        path: &str,
        dst: &Path,
        opts: &SyncOptions,
        progress: &dyn Progress,
    ) -> Result<(SyncReport, u64)> {
        let topts = TransferOptions {
            src_format: opts.src_format,
            output_format: opts.new_format,
            compression: opts.compression,
            min_sparse: 4096,
            cluster_bits: opts.cluster_bits,
            target_is_zero: false,
            check_space: opts.check_space,
            workers: opts.workers,
            level: opts.level,
            force_share: opts.force_share,
        };
        let r = self.pull(path, dst, &topts, progress)?;
        if let (Some(warn), Some(w)) = (
            &opts.warn,
            name_warning(&dst.display().to_string(), r.format),
        ) {
            warn(&w);
        }
        let report = created_report(
            r.virtual_size,
            r.bytes_read,
            r.data_sent,
            u64::from(
                opts.block_size
                    .unwrap_or(crate::engine::sync::DEFAULT_BLOCK),
            ),
            std::time::Duration::from_secs_f64(r.seconds),
        );
        Ok((report, r.wire_bytes))
    }

    #[allow(clippy::too_many_arguments)]
    fn sync_pull_inner(
        mut self,
        path: &str,
        dst: &Path,
        target: Target,
        key: [u8; 32],
        opts: &SyncOptions,
        changing: Arc<AtomicBool>,
        progress: &dyn Progress,
    ) -> Result<(SyncReport, u64)> {
        // This end is the receiver: a qcow2 DST's cluster size, unless
        // the user chose.
        let block_size = opts.block_size.unwrap_or(match &target {
            Target::Qcow2 { image, .. } => {
                image
                    .qcow2()
                    .map_or(crate::engine::sync::DEFAULT_BLOCK, |q| {
                        (q.header().cluster_size() as u32).clamp(
                            crate::engine::sync::MIN_BLOCK,
                            crate::engine::sync::MAX_BLOCK,
                        )
                    })
            }
            _ => crate::engine::sync::DEFAULT_BLOCK,
        });
        let req = Request::SyncSend(SyncSendRequest {
            path: path.as_bytes().to_vec(),
            format: opts.src_format.map(wire_format),
            block_size,
            key,
            level: opts.level.map_or(AUTO_LEVEL, |l| l.clamp(0, 19) as i8),
            force_share: opts.force_share,
        });
        let (info, meta) = match self.request_image(req) {
            Ok(x) => x,
            Err(e) => return Err(self.fail(e)),
        };
        if matches!(target, Target::New(_))
            && opts.new_format.is_none()
            && info.format.map(format_of) == Some(Format::Qcow2)
        {
            // DST absent and SRC a qcow2: DST is made a qcow2 too, by a
            // pull of the whole image on a new connection (this one is
            // dropped before anything was said about DST).
            if let Some(reach) = self.reach.clone() {
                let host = self.host.clone();
                drop(target);
                self.waiter.abort();
                drop((self.fr, self.fw));
                let again = Client::connect(&host, &reach)?;
                let opts = SyncOptions {
                    new_format: Some(Format::Qcow2),
                    ..opts.clone()
                };
                return again.sync_create_pull(path, dst, &opts, progress);
            }
        }
        if let Some(m) = meta {
            if let Err(e) = target.adopt(&remote::io_meta(&m)) {
                drop(self);
                return Err(Error::at(dst.display(), e));
            }
        }
        let params = SyncParams {
            block_size,
            key,
            src_size: info.virtual_size,
            journal: opts.journal,
            check_space: opts.check_space,
            reread: opts.reread,
        };
        let limits = self.limits;
        let cancel = self.cancel.clone();
        let r = crate::engine::sync::sync_receive(
            target,
            &mut self.fr,
            &mut self.fw,
            &limits,
            &params,
            &SyncReceiveOptions {
                workers: opts.workers,
                cache: Some(dst.to_path_buf()),
                changing,
                peer_caps: self.caps,
            },
            Some(progress),
            &cancel,
        );
        let src_name = location_name(&self.host, path);
        match r {
            Ok(got) => {
                if self.caps & protocol::caps::SOURCE_CHECK != 0 {
                    // The sender's last word: did SRC hold still while read?
                    if let Err(e) = recv_msg(&mut self.fr, &self.limits, kind::EXIT) {
                        let e = self.fail(e);
                        return Err(Error::said(format!(
                            "{}; {}",
                            e.one_line(),
                            super::dst_holds_the_copy(&dst.display())
                        )));
                    }
                }
                let wire = self.wire();
                self.finish();
                if let Some(warn) = &opts.warn {
                    for w in &got.warnings {
                        warn(&format!("{}: {w}", dst.display()));
                    }
                }
                let done = got.done;
                let report = SyncReport {
                    src_size: info.virtual_size,
                    dst_existed: got.existed,
                    resumed: got.resumed,
                    dst_cached: got.cached,
                    bytes_read: got.src_bytes_read,
                    blocks_compared: done.blocks_compared,
                    blocks_sent: done.blocks_written,
                    blocks_punched: done.blocks_punched,
                    data_sent: got.data,
                    done,
                    elapsed: Default::default(),
                };
                Ok((report, wire))
            }
            // The caller says what state DST is in.
            Err(e @ engine::Error::Protocol(_)) => Err(self.fail(e)),
            Err(e) => {
                // Tell the sender why, then report it here, named.
                self.tell(&e);
                Err(named(e, Path::new(&src_name), dst, None))
            }
        }
    }
}

/// The sending end's parameters of a sync of `source`: a fresh key, SRC's
/// content size.
/// `caps`: the receiver's; one with `caps::BLOCK_CHOICE` chooses the block
/// size when the user did not.
pub(super) fn send_side(
    source: &Source,
    opts: &SyncOptions,
    caps: u64,
) -> Result<(SyncParams, SyncSendOptions)> {
    let left_to_receiver = caps & protocol::caps::BLOCK_CHOICE != 0;
    let params = SyncParams {
        block_size: opts.block_size.unwrap_or(if left_to_receiver {
            0
        } else {
            crate::engine::sync::DEFAULT_BLOCK
        }),
        key: super::random_key()?,
        src_size: source.image.content_size(),
        journal: opts.journal,
        check_space: opts.check_space,
        reread: opts.reread,
    };
    let sopts = SyncSendOptions {
        level: opts.level.unwrap_or(remote::DEFAULT_LEVEL),
        adaptive: opts.level.is_none(),
        workers: opts.workers,
        state: Default::default(),
    };
    Ok((params, sopts))
}

/// After a sync that completed: SRC must be as it was opened, or the copy
/// DST now holds is of no consistent image.
pub(super) fn source_held_still(source: &Source, dst: &str) -> Result<()> {
    source
        .watch
        .check()
        .map_err(|e| Error::said(format!("{e}; {}", super::dst_holds_the_copy(&dst))))
}
