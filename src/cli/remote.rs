//! `convert` with a remote or `-` end: push (SRC local, DST on a host),
//! pull (SRC on a host, DST local), and one-way protocol streams on
//! stdout/stdin. The host end is `imgsync serve` ([`super::serve`]).

use std::io::{BufReader, BufWriter, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use imgsync_formats::qcow2::CompressionType;
use imgsync_formats::{Format, Image};

use super::convert::{engine_error, Args};
use super::output::human_size;
use super::progress::{interrupt_flag, interrupted, progress_of};
use super::{exit, OutputFormat};
use crate::engine::convert::{self, ConvertOptions};
use crate::engine::remote::{self, handshake, recv_msg, send_msg, SendOptions};
use crate::engine::{self, Progress};
use crate::io::{FileMeta, Output, Source};
use crate::protocol::msg::{
    kind, Hello, ImageInfo, QueryCommand, QueryRequest, ReceiveRequest, Request, SendRequest,
    WireCompression, WireFormat,
};
use crate::protocol::{self, FrameReader, FrameWriter, Limits, Message};
use crate::transport::watch::Watch;
use crate::transport::{self, Host, SshOptions, Waiter};

/// Options of the SSH transports, shared by the commands with remote
/// locations.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SshArgs {
    /// Use this remote shell program instead of the built-in SSH client
    /// (rsync's -e), e.g. "ssh -p 2222 -o ProxyJump=gw"; every OpenSSH
    /// option and ~/.ssh/config then apply
    #[arg(short = 'e', long = "rsh", value_name = "CMD")]
    pub rsh: Option<String>,
    /// The imgsync program on the remote host
    #[arg(long, value_name = "PATH", default_value = "imgsync")]
    pub remote_imgsync: String,
    /// Known hosts file for the built-in client (default ~/.ssh/known_hosts)
    #[arg(long, value_name = "FILE")]
    pub known_hosts: Option<PathBuf>,
    /// Add an unknown host key to the known hosts file (OpenSSH's
    /// accept-new); a changed key is always refused
    #[arg(long)]
    pub accept_new_host_key: bool,
    /// Identity (private key) file for the built-in client, tried after
    /// ssh-agent and before the default keys; may be repeated
    #[arg(short = 'i', long = "identity", value_name = "FILE")]
    pub identity: Vec<PathBuf>,
    /// SSH config file for the built-in client (default ~/.ssh/config)
    #[arg(long, value_name = "FILE")]
    pub ssh_config: Option<PathBuf>,
    /// Give up when the peer sends nothing (and takes nothing) for this
    /// many seconds; 0: wait for ever. A busy peer sends keepalives, so
    /// only a dead peer or link runs it out (rsync's --timeout)
    #[arg(long, value_name = "SECONDS", default_value_t = 60, value_parser = parse_timeout)]
    pub timeout: u64,
    /// Give up connecting and logging in after this many seconds (default:
    /// ConnectTimeout from ssh_config, else 20 s for TCP and 60 s per
    /// login step)
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub connect_timeout: Option<u64>,
}

/// `--timeout`: 0 (none), or at least 5 s (a busy peer says it is alive
/// every second; less would take a hiccup for a dead peer).
pub(super) fn parse_timeout(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if n == 0 || n >= 5 => Ok(n),
        Ok(_) => Err("must be 0 (wait for ever) or at least 5 seconds".into()),
        Err(e) => Err(e.to_string()),
    }
}

impl SshArgs {
    pub fn options(&self) -> SshOptions {
        SshOptions {
            rsh: self.rsh.clone(),
            remote_imgsync: Some(self.remote_imgsync.clone()),
            known_hosts: self.known_hosts.clone(),
            accept_new_host_key: self.accept_new_host_key,
            identities: self.identity.clone(),
            config: self.ssh_config.clone(),
            watch: Watch::new(
                (self.timeout > 0).then(|| Duration::from_secs(self.timeout)),
                Some(interrupt_flag()),
            ),
            connect_timeout: self.connect_timeout.map(Duration::from_secs),
        }
    }
}

/// SendRequest.level for "adaptive, from the default".
pub(super) const AUTO_LEVEL: i8 = i8::MIN;

type Reader = FrameReader<Box<dyn Read + Send>>;
type Writer = FrameWriter<Box<dyn Write + Send>>;

/// A connection to `imgsync serve` on a host, after the handshake.
struct Peer {
    host: Host,
    remote_imgsync: String,
    fr: Reader,
    fw: Writer,
    waiter: Box<dyn Waiter>,
    limits: Limits,
    /// Capabilities both ends announced.
    caps: u64,
}

impl Peer {
    fn connect(host: &Host, ssh: &SshArgs) -> Result<Peer> {
        let opts = ssh.options();
        let watch = opts.watch.clone();
        let conn = transport::connect(host, &opts).map_err(|e| anyhow!(e))?;
        let mut peer = Peer {
            host: host.clone(),
            remote_imgsync: ssh.remote_imgsync.clone(),
            fr: FrameReader::new(conn.reader, Limits::DEFAULT.max_frame),
            fw: FrameWriter::new(conn.writer),
            waiter: conn.waiter,
            limits: Limits::DEFAULT,
            caps: 0,
        };
        match handshake(&mut peer.fr, &mut peer.fw) {
            Ok(n) => {
                peer.limits = n.limits;
                peer.caps = n.caps;
                if n.caps & protocol::caps::KEEPALIVE == 0 {
                    // An older serve says nothing while it is busy (a big
                    // check, hashing): its silence is not death.
                    watch.set_timeout(None);
                }
            }
            Err(e) => return Err(peer.fail(e)),
        }
        Ok(peer)
    }

    /// The error of a failed exchange, in one line naming the host. When
    /// the stream broke, the peer may have said why (an ERROR frame, its
    /// exit status, stderr).
    fn fail(self, e: engine::Error) -> anyhow::Error {
        if let engine::Error::Protocol(protocol::Error::NotProtocol(head)) = &e {
            // Whatever runs there is not imgsync serve (or a login script
            // writes to stdout first); waiting for it to end could be
            // forever.
            return anyhow!(
                "{}: the remote command {} instead of speaking the imgsync protocol; is the remote shell clean (no output from its startup files), and is imgsync serve what runs there (--remote-imgsync)?",
                self.host,
                protocol::describe_foreign(head)
            );
        }
        if interrupted() || transport::watch::is_cancelled(&e) {
            // Ctrl-C: no last word is worth waiting for.
            self.waiter.abort();
            return anyhow!("{}: interrupted", self.host);
        }
        if transport::watch::is_timeout(&e) {
            self.waiter.abort();
            return anyhow!("{}: {}", self.host, one(&e));
        }
        let Peer {
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
                protocol::Error::Write(_) | protocol::Error::Read(_) | protocol::Error::Eof
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
                    Err(protocol::Error::Eof | protocol::Error::Read(_)) => break,
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
            return anyhow!("{host}: {s}");
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
                return anyhow!("{host}: {program} failed: {said}");
            }
            if x.status == Some(127) {
                return anyhow!(
                    "{host}: {remote_imgsync} was not found on the remote host ({}); install imgsync there or pass --remote-imgsync PATH",
                    if stderr.is_empty() { "exit status 127" } else { stderr.trim() }
                );
            }
            if !stderr.is_empty() {
                return anyhow!(
                    "{host}: {}: the remote side said: {}",
                    one(&e),
                    stderr.trim()
                );
            }
            if let Some(st) = x.status.filter(|&s| s != 0) {
                return anyhow!("{host}: {} (remote exit status {st})", one(&e));
            }
        }
        anyhow!("{host}: {}", one(&e))
    }

    fn finish(self) {
        let Peer { fr, fw, waiter, .. } = self;
        drop(fw);
        drop(fr);
        let _ = waiter.wait();
    }
}

fn one(e: &engine::Error) -> String {
    super::output::one_line(&anyhow!(engine_error_text(e)))
}

fn engine_error_text(e: &engine::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(c) = src {
        let t = c.to_string();
        if !s.ends_with(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}

/// A remote location as the user would write it: `host:path`, or an
/// ssh:// URL when there is a port.
fn location_name(host: &Host, path: &str) -> String {
    match host.port {
        Some(port) if host.host.contains(':') => format!("ssh://[{}]:{port}{path}", host.host),
        Some(port) => format!("ssh://{}:{port}{path}", host.host),
        None => format!("{}:{path}", host.host),
    }
}

pub(super) fn wire_format(f: Format) -> WireFormat {
    match f {
        Format::Raw => WireFormat::Raw,
        Format::Qcow2 => WireFormat::Qcow2,
    }
}

pub(super) fn format_of(f: WireFormat) -> Format {
    match f {
        WireFormat::Raw => Format::Raw,
        WireFormat::Qcow2 => Format::Qcow2,
    }
}

fn convert_options(a: &Args, output_format: Format) -> Result<ConvertOptions> {
    if a.compress && output_format != Format::Qcow2 {
        bail!("-c (compression) needs qcow2 output (-O qcow2)");
    }
    Ok(ConvertOptions {
        output_format,
        min_sparse: a.min_sparse,
        compression: a.compress.then_some(a.compression_type),
        cluster_bits: a.cluster_size.trailing_zeros(),
        target_is_zero: a.target_is_zero,
        check_space: !a.no_space_check,
        workers: a
            .threads
            .unwrap_or_else(crate::engine::pipeline::default_workers),
    })
}

fn send_options(a: &Args, opts: &ConvertOptions) -> SendOptions {
    SendOptions {
        min_sparse: a.min_sparse,
        chunk: convert::grid(opts),
        level: a.compress_level.unwrap_or(remote::DEFAULT_LEVEL),
        adaptive: a.compress_level.is_none(),
        workers: opts.workers,
    }
}

/// What a transfer did, for `--stats` and `--output json`.
struct Stats {
    src: String,
    dst: String,
    format: Format,
    virtual_size: u64,
    bytes_read: u64,
    zero_bytes: u64,
    data_sent: u64,
    wire_bytes: u64,
    bytes_written: u64,
    clusters_compressed: u64,
    /// zstd level at the end of the transfer (when this end sent).
    level: Option<i32>,
    seconds: f64,
}

fn print_stats(a: &Args, s: &Stats) -> Result<()> {
    let ratio = if s.wire_bytes > 0 {
        s.data_sent as f64 / s.wire_bytes as f64
    } else {
        0.0
    };
    let rate = s.bytes_read as f64 / s.seconds.max(1e-9);
    let mut out = super::output::stdout();
    if a.output == OutputFormat::Json {
        let v = serde_json::json!({
            "source": s.src,
            "destination": s.dst,
            "format": s.format.name(),
            "virtual-size": s.virtual_size,
            "bytes-read": s.bytes_read,
            "zero-bytes": s.zero_bytes,
            "data-sent": s.data_sent,
            "wire-bytes": s.wire_bytes,
            "compression-ratio": (ratio * 1000.0).round() / 1000.0,
            "bytes-written": s.bytes_written,
            "compressed-clusters": s.clusters_compressed,
            "compress-level": s.level,
            "seconds": s.seconds,
            "rate": rate.round(),
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else if a.stats {
        writeln!(
            out,
            "data read:     {} ({} bytes)",
            human_size(s.bytes_read),
            s.bytes_read
        )?;
        writeln!(out, "zeros skipped: {}", human_size(s.zero_bytes))?;
        writeln!(out, "data sent:     {}", human_size(s.data_sent))?;
        writeln!(
            out,
            "on the wire:   {} ({} bytes, ratio {ratio:.2})",
            human_size(s.wire_bytes),
            s.wire_bytes
        )?;
        if let Some(l) = s.level {
            writeln!(out, "zstd level:    {l} (at the end)")?;
        }
        writeln!(out, "written:       {}", human_size(s.bytes_written))?;
        writeln!(
            out,
            "time:          {:.2} s ({}/s)",
            s.seconds,
            human_size(rate as u64)
        )?;
    }
    Ok(())
}

/// A remote check's JSON report is held in memory to be printed here;
/// qemu-img check's lists are capped (1000 problems each), so a real one is
/// well under this.
const MAX_CHECK_REPORT: usize = 16 << 20;

/// info, map or check of an image on a host: the remote imgsync runs it and
/// its output is printed here. A check is asked for as JSON whatever
/// `output` is, and printed here from that report: its exit status and
/// stderr line then come from the counts, as for a local check (and do not
/// depend on what an older serve thought its status should be).
pub fn query(
    host: &Host,
    path: &str,
    command: QueryCommand,
    format: Option<Format>,
    output: OutputFormat,
    force_share: bool,
    ssh: &SshArgs,
) -> Result<u8> {
    let is_check = command == QueryCommand::Check;
    let mut peer = Peer::connect(host, ssh)?;
    let req = Request::Query(QueryRequest {
        command,
        path: path.as_bytes().to_vec(),
        format: format.map(wire_format),
        json: is_check || output == OutputFormat::Json,
        force_share,
    });
    let mut report = Vec::new();
    let r = (|| -> engine::Result<u8> {
        send_msg(&mut peer.fw, &Message::Request(req))?;
        peer.fw.flush()?;
        let mut out = super::output::stdout();
        loop {
            let (k, p) = peer.fr.read_frame()?;
            match Message::decode(k, p, &peer.limits)? {
                Message::Output(b) if is_check => {
                    if report.len() + b.len() > MAX_CHECK_REPORT {
                        return Err(protocol::Error::Remote(format!(
                            "{path}: check report larger than {MAX_CHECK_REPORT} bytes"
                        ))
                        .into());
                    }
                    report.extend_from_slice(&b);
                }
                Message::Output(b) => {
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
    let code = match r {
        Ok(code) => {
            peer.finish();
            code
        }
        Err(engine::Error::Dest(e)) => return Err(anyhow!(e).context("stdout")),
        Err(e) => return Err(peer.fail(e)),
    };
    if !is_check {
        return Ok(code);
    }
    let report: serde_json::Value = serde_json::from_slice(&report)
        .map_err(|e| anyhow!("{host}: {path}: the check report is not JSON: {e}"))?;
    super::check::print_stdout(&report, output)?;
    super::check::finish(&format!("{host}: {path}"), &report)
}

/// Compares local `local` with the image at `host:path`, pulled as a
/// stream (only its data crosses). Returns the outcome and whether the
/// virtual sizes differ.
#[allow(clippy::too_many_arguments)]
pub fn compare(
    local: &Image,
    local_path: &Path,
    host: &Host,
    path: &str,
    format: Option<Format>,
    force_share: bool,
    ssh: &SshArgs,
    progress: &dyn Progress,
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<(crate::engine::compare::Outcome, bool)> {
    use crate::engine::compare::{compare_chunks, Outcome};
    use crate::engine::pipeline::{BufPool, Source};
    let mut peer = Peer::connect(host, ssh)?;
    let req = Request::Send(SendRequest {
        path: path.as_bytes().to_vec(),
        format: format.map(wire_format),
        min_sparse: 512,
        chunk: convert::CHUNK_BYTES as u32,
        unit: 1 << 16,
        level: AUTO_LEVEL,
        force_share,
    });
    let info = (|| {
        send_msg(&mut peer.fw, &Message::Request(req))?;
        peer.fw.flush()?;
        let info = recv_msg(&mut peer.fr, &peer.limits, kind::IMAGE)?;
        // The file's permissions do not take part in a compare.
        remote::recv_meta(&mut peer.fr, &peer.limits, peer.caps)?;
        Ok(info)
    })();
    let info = match info {
        Ok(Message::Image(i)) => i,
        Ok(_) => unreachable!("recv_msg checks the type"),
        Err(e) => return Err(peer.fail(e)),
    };
    let pool = BufPool::new(2);
    let limits = peer.limits;
    let mut frames = remote::ChunkFrames::new(&mut peer.fr, limits, info.virtual_size, 1);
    let chunks = (&mut frames).map(|job| job.and_then(|j| remote::FrameSource.chunk(j, &pool)));
    let result = compare_chunks(local, info.virtual_size, chunks, progress, cancel);
    let result = result.and_then(|o| {
        if o == Outcome::Identical {
            frames.check_end()?;
        }
        Ok(o)
    });
    match result {
        Ok(o) => {
            if o == Outcome::Identical {
                peer.finish();
            }
            Ok((o, info.virtual_size != local.virtual_size()))
        }
        Err(e @ engine::Error::Protocol(_)) => Err(peer.fail(e)),
        Err(e) => Err(engine_error(e, local_path, local_path, None)),
    }
}

/// sync with DST on a host (push): the remote imgsync is the receiver.
#[allow(clippy::too_many_arguments)]
pub fn sync_push(
    image: &Image,
    src: &Path,
    host: &Host,
    path: &str,
    params: &crate::protocol::msg::SyncParams,
    dst_format: Option<Format>,
    sopts: &crate::engine::sync::SyncSendOptions,
    ssh: &SshArgs,
    progress: &dyn Progress,
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<(crate::engine::sync::SyncReport, u64)> {
    use crate::protocol::msg::SyncReceiveRequest;
    let meta = FileMeta::of_path(src).with_context(|| src.display().to_string())?;
    let mut peer = Peer::connect(host, ssh)?;
    // An older serve cannot be told; it probes DST (and refuses a qcow2
    // one, as before).
    let dst_format = dst_format
        .filter(|_| peer.caps & protocol::caps::DST_FORMAT != 0)
        .map(wire_format);
    let req = Request::SyncReceive(SyncReceiveRequest {
        path: path.as_bytes().to_vec(),
        params: *params,
        dst_format,
    });
    let limits = peer.limits;
    let r = send_msg(&mut peer.fw, &Message::Request(req))
        .and_then(|_| remote::send_meta(&mut peer.fw, peer.caps, &meta, image))
        .and_then(|_| {
            crate::engine::sync::sync_send(
                image,
                &mut peer.fr,
                &mut peer.fw,
                &limits,
                params,
                sopts,
                progress,
                cancel,
            )
        });
    match r {
        Ok(report) => {
            let wire = peer.fw.bytes + peer.fr.bytes;
            peer.finish();
            Ok((report, wire))
        }
        Err(e @ (engine::Error::Source(_) | engine::Error::Internal(_))) => {
            drop(peer);
            Err(engine_error(
                e,
                src,
                Path::new(&location_name(host, path)),
                None,
            ))
        }
        Err(engine::Error::Interrupted) => {
            peer.waiter.abort();
            drop((peer.fr, peer.fw));
            bail!("{}: interrupted", location_name(host, path));
        }
        Err(e) => Err(peer.fail(e)),
    }
}

/// sync with SRC on a host (pull): this end is the receiver.
#[allow(clippy::too_many_arguments)]
pub fn sync_pull(
    host: &Host,
    path: &str,
    format: Option<Format>,
    dst: &Path,
    target: crate::engine::sync::Target,
    block_size: u32,
    key: [u8; 32],
    journal: bool,
    check_space: bool,
    reread: bool,
    level: Option<i32>,
    force_share: bool,
    workers: usize,
    ssh: &SshArgs,
    cancel: &std::sync::atomic::AtomicBool,
    changing: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<(crate::engine::sync::SyncReport, u64)> {
    use crate::protocol::msg::{SyncParams, SyncSendRequest};
    let mut peer = Peer::connect(host, ssh)?;
    let req = Request::SyncSend(SyncSendRequest {
        path: path.as_bytes().to_vec(),
        format: format.map(wire_format),
        block_size,
        key,
        level: level.map_or(AUTO_LEVEL, |l| l.clamp(0, 19) as i8),
        force_share,
    });
    let info = (|| {
        send_msg(&mut peer.fw, &Message::Request(req))?;
        peer.fw.flush()?;
        let info = recv_msg(&mut peer.fr, &peer.limits, kind::IMAGE)?;
        let meta = remote::recv_meta(&mut peer.fr, &peer.limits, peer.caps)?;
        Ok((info, meta))
    })();
    let (info, meta) = match info {
        Ok((Message::Image(i), meta)) => (i, meta),
        Ok(_) => unreachable!("recv_msg checks the type"),
        Err(e) => return Err(peer.fail(e)),
    };
    if let Some(m) = meta {
        if let Err(e) = target.adopt(&remote::io_meta(&m)) {
            drop(peer);
            return Err(anyhow!(e).context(dst.display().to_string()));
        }
    }
    let params = SyncParams {
        block_size,
        key,
        src_size: info.virtual_size,
        journal,
        check_space,
        reread,
    };
    let limits = peer.limits;
    let r = crate::engine::sync::sync_receive(
        target,
        &mut peer.fr,
        &mut peer.fw,
        &limits,
        &params,
        &crate::engine::sync::SyncReceiveOptions {
            workers,
            cache: Some(dst.to_path_buf()),
            changing,
        },
        cancel,
    );
    let src_name = location_name(host, path);
    match r {
        Ok(got) => {
            if peer.caps & protocol::caps::SOURCE_CHECK != 0 {
                // The sender's last word: did SRC hold still while read?
                if let Err(e) = recv_msg(&mut peer.fr, &peer.limits, kind::EXIT) {
                    let e = peer.fail(e);
                    bail!(
                        "{}; {}",
                        super::output::one_line(&e),
                        super::sync::dst_holds_the_copy(&dst.display())
                    );
                }
            }
            let wire = peer.fw.bytes + peer.fr.bytes;
            peer.finish();
            let done = got.done;
            let report = crate::engine::sync::SyncReport {
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
        Err(e @ engine::Error::Protocol(_)) => Err(peer.fail(e)),
        Err(e) => {
            // Tell the sender why, then report it here, named.
            let _ = send_msg(&mut peer.fw, &Message::Error(e.to_string()));
            let _ = peer.fw.flush();
            drop(peer);
            Err(engine_error(e, Path::new(&src_name), dst, None))
        }
    }
}

/// Local SRC to DST on a host.
pub fn push(a: &Args, source: Source, src_path: &Path, host: &Host, path: &str) -> Result<u8> {
    let image = &source.image;
    let started = Instant::now();
    let src = a.src.to_string_lossy().into_owned();
    let meta = FileMeta::of_path(src_path).with_context(|| src.clone())?;
    let output_format = a.output_format.unwrap_or(image.format());
    let opts = convert_options(a, output_format)?;
    let dst_name = location_name(host, path);
    convert::check_options(image, &opts)
        .map_err(|e| engine_error(e, Path::new(&src), Path::new(&dst_name), None))?;
    let info = remote::image_info(image, convert::output_unit(&opts))
        .map_err(|e| engine_error(e, Path::new(&src), Path::new(&dst_name), None))?;
    let cancel = interrupt_flag();
    let mut peer = Peer::connect(host, &a.ssh)?;
    let req = Request::Receive(ReceiveRequest {
        path: path.as_bytes().to_vec(),
        format: wire_format(output_format),
        compression: match opts.compression {
            None => WireCompression::None,
            Some(CompressionType::Zlib) => WireCompression::Zlib,
            Some(CompressionType::Zstd) => WireCompression::Zstd,
        },
        cluster_bits: opts.cluster_bits as u8,
        target_is_zero: opts.target_is_zero,
        check_space: opts.check_space,
    });
    let ready = (|| {
        send_msg(&mut peer.fw, &Message::Request(req))?;
        send_msg(&mut peer.fw, &Message::Image(info))?;
        remote::send_meta(&mut peer.fw, peer.caps, &meta, &image)?;
        peer.fw.flush()?;
        recv_msg(&mut peer.fr, &peer.limits, kind::READY)
    })();
    if let Err(e) = ready {
        return Err(peer.fail(e));
    }
    let bar = a.reporting.bar();
    let progress: &dyn Progress = progress_of(&bar);
    progress.start(info.data_bytes);
    let sopts = send_options(a, &opts);
    let limits = peer.limits;
    let sent = remote::send_chunks(
        image,
        &mut peer.fw,
        &limits,
        &sopts,
        &source.watch,
        progress,
        &cancel,
    );
    drop(bar);
    let sent = match sent {
        Ok(s) => s,
        Err(
            e @ (engine::Error::Source(_)
            | engine::Error::Internal(_)
            | engine::Error::SourceChanged(_)),
        ) => {
            // No END: the receiver puts nothing in place. Say why there.
            let _ = send_msg(&mut peer.fw, &Message::Error(e.to_string()));
            let _ = peer.fw.flush();
            drop(peer);
            return Err(engine_error(e, Path::new(&src), Path::new(&dst_name), None));
        }
        Err(engine::Error::Interrupted) => {
            drop(peer);
            bail!("{dst_name}: interrupted; nothing was written");
        }
        Err(e) => return Err(peer.fail(e)),
    };
    let done = match recv_msg(&mut peer.fr, &peer.limits, kind::DONE) {
        Ok(Message::Done(d)) => d,
        Ok(_) => unreachable!("recv_msg checks the type"),
        Err(e) => return Err(peer.fail(e)),
    };
    let wire = peer.fw.bytes + peer.fr.bytes;
    peer.finish();
    print_stats(
        a,
        &Stats {
            src,
            dst: dst_name,
            format: output_format,
            virtual_size: info.virtual_size,
            bytes_read: sent.bytes_read,
            zero_bytes: sent.zero_bytes,
            data_sent: sent.data_sent,
            wire_bytes: wire,
            bytes_written: done.bytes_written,
            clusters_compressed: done.clusters_compressed,
            level: Some(sent.level),
            seconds: started.elapsed().as_secs_f64(),
        },
    )?;
    Ok(exit::OK)
}

/// SRC on a host to local DST.
pub fn pull(a: &Args, host: &Host, path: &str, dst: &Path) -> Result<u8> {
    let started = Instant::now();
    let src_name = location_name(host, path);
    // The grid and unit depend on the output format, known once IMAGE
    // arrives; ask with the cluster size given (the default 64 KiB): the
    // grid (2 MiB or more, a power of two) suits any cluster size.
    let probe_opts = convert_options(a, a.output_format.unwrap_or(Format::Raw))
        .or_else(|_| convert_options(a, Format::Qcow2))?;
    let cancel = interrupt_flag();
    let mut peer = Peer::connect(host, &a.ssh)?;
    let req = Request::Send(SendRequest {
        path: path.as_bytes().to_vec(),
        format: a.format.map(wire_format),
        min_sparse: a.min_sparse,
        chunk: convert::grid(&probe_opts) as u32,
        unit: 1u64 << probe_opts.cluster_bits,
        level: a
            .compress_level
            .map_or(AUTO_LEVEL, |l| l.clamp(0, 19) as i8),
        force_share: a.force_share,
    });
    let info = (|| {
        send_msg(&mut peer.fw, &Message::Request(req))?;
        peer.fw.flush()?;
        let info = recv_msg(&mut peer.fr, &peer.limits, kind::IMAGE)?;
        let meta = remote::recv_meta(&mut peer.fr, &peer.limits, peer.caps)?;
        Ok((info, meta))
    })();
    let (info, meta) = match info {
        Ok((Message::Image(i), meta)) => (i, meta),
        Ok(_) => unreachable!("recv_msg checks the type"),
        Err(e) => return Err(peer.fail(e)),
    };
    let output_format = a
        .output_format
        .or(info.format.map(format_of))
        .unwrap_or(Format::Raw);
    let opts = convert_options(a, output_format)?;
    let limits = peer.limits;
    let result = receive_into(
        a,
        &mut peer.fr,
        &limits,
        &info,
        Meta::Known(meta),
        &src_name,
        dst,
        &opts,
        &cancel,
    );
    let report = match result {
        Ok(r) => r,
        Err(Fail::Local(e)) => {
            drop(peer);
            return Err(e);
        }
        Err(Fail::Stream(e)) => {
            let e = peer.fail(e);
            bail!(
                "{} (nothing was written to {})",
                super::output::one_line(&e),
                dst.display()
            );
        }
    };
    let wire = peer.fw.bytes + peer.fr.bytes;
    peer.finish();
    print_stats(
        a,
        &Stats {
            src: src_name,
            dst: dst.display().to_string(),
            format: output_format,
            virtual_size: info.virtual_size,
            bytes_read: report.bytes_read,
            zero_bytes: report.zero_bytes,
            data_sent: report.bytes_read - report.zero_bytes,
            wire_bytes: wire,
            bytes_written: report.bytes_written,
            clusters_compressed: report.clusters_compressed,
            level: None,
            seconds: started.elapsed().as_secs_f64(),
        },
    )?;
    Ok(exit::OK)
}

enum Fail {
    /// Named already (the local file).
    Local(anyhow::Error),
    /// The stream or the peer: to be named with the host.
    Stream(engine::Error),
}

/// Where a receiver learns the source file's permission bits and owner.
enum Meta {
    /// A session: META followed IMAGE (`None`: the peer has no `caps::META`).
    Known(Option<protocol::msg::FileMeta>),
    /// A one-way stream whose writer announced `caps::META`: META follows
    /// END (readers that predate it stop reading at END).
    AfterEnd,
}

/// Receives a stream's chunks into a new local DST, committed only when
/// the stream's digest matched.
#[allow(clippy::too_many_arguments)]
fn receive_into<R: Read + Send>(
    a: &Args,
    fr: &mut FrameReader<R>,
    limits: &Limits,
    info: &ImageInfo,
    meta: Meta,
    src_name: &str,
    dst: &Path,
    opts: &ConvertOptions,
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<convert::Report, Fail> {
    let local = |e: engine::Error| Fail::Local(engine_error(e, Path::new(src_name), dst, None));
    convert::check_size_options(info.virtual_size, opts).map_err(local)?;
    let out = Output::create(dst)
        .with_context(|| dst.display().to_string())
        .map_err(Fail::Local)?;
    let bar = a.reporting.bar();
    let progress = progress_of(&bar);
    let result = remote::receive_chunks(fr, limits, info, &out, opts, progress, cancel);
    drop(bar);
    let report = match result {
        Ok(r) => r,
        Err(e @ engine::Error::Protocol(_)) => {
            return Err(Fail::Stream(e));
        }
        Err(e) => return Err(local(e)),
    };
    let meta = match meta {
        Meta::Known(m) => m,
        Meta::AfterEnd => {
            remote::recv_meta(fr, limits, protocol::caps::META).map_err(Fail::Stream)?
        }
    };
    remote::set_content_size(&out, info, opts, meta.as_ref()).map_err(|e| match e {
        e @ engine::Error::Protocol(_) => Fail::Stream(e),
        e => local(e),
    })?;
    if let Some(m) = meta {
        out.adopt(&remote::io_meta(&m))
            .with_context(|| dst.display().to_string())
            .map_err(Fail::Local)?;
    }
    if cancel.load(Ordering::Relaxed) {
        return Err(local(engine::Error::Interrupted));
    }
    out.commit()
        .with_context(|| format!("{}: completing the output", dst.display()))
        .map_err(Fail::Local)?;
    Ok(report)
}

/// Local SRC as a one-way protocol stream on stdout (`convert SRC -`).
pub fn to_stdout(a: &Args, source: Source, src_path: &Path) -> Result<u8> {
    let image = &source.image;
    let stdout = std::io::stdout();
    if stdout.is_terminal() {
        bail!("-: refusing to write an imgsync stream to a terminal (pipe it into `imgsync convert - DST`)");
    }
    let output_format = a.output_format.unwrap_or(image.format());
    let opts = convert_options(a, output_format)?;
    let src = a.src.to_string_lossy().into_owned();
    let named = |e| engine_error(e, Path::new(&src), Path::new("-"), None);
    let info = remote::image_info(image, 1 << 16).map_err(named)?;
    let meta = FileMeta::of_path(src_path).with_context(|| src.clone())?;
    let mut fw = FrameWriter::new(BufWriter::with_capacity(1 << 20, stdout));
    let cancel = interrupt_flag();
    let bar = a.reporting.bar();
    let progress = progress_of(&bar);
    progress.start(info.data_bytes);
    let mut sopts = send_options(a, &opts);
    // The reader's cluster size is unknown: 2 MiB cells (or -S) suit all.
    sopts.chunk = convert::CHUNK_BYTES.max(a.min_sparse.next_power_of_two());
    let r = (|| {
        send_msg(&mut fw, &Message::Hello(Hello::ours()))?;
        send_msg(&mut fw, &Message::Image(info))?;
        let sent = remote::send_chunks(
            image,
            &mut fw,
            &Limits::DEFAULT,
            &sopts,
            &source.watch,
            progress,
            &cancel,
        )?;
        // After END: a reader that predates META stops at END.
        remote::send_meta(&mut fw, protocol::caps::ALL, &meta, image)?;
        // Dropping a BufWriter would swallow the last write's error: a
        // reader that went away before the end must fail the convert.
        fw.flush()?;
        Ok(sent)
    })();
    drop(bar);
    match r {
        Ok(_) => Ok(exit::OK),
        Err(engine::Error::Protocol(protocol::Error::Write(e))) => {
            Err(anyhow!(e).context("-: writing the stream"))
        }
        Err(e) => Err(named(e)),
    }
}

/// A one-way protocol stream on stdin into a local DST (`convert - DST`).
pub fn from_stdin(a: &Args, dst: &Path) -> Result<u8> {
    let started = Instant::now();
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        bail!("-: stdin is a terminal, not an imgsync stream");
    }
    let limits = Limits::DEFAULT;
    let mut fr = FrameReader::new(BufReader::with_capacity(1 << 20, stdin), limits.max_frame);
    let head = (|| -> engine::Result<(u64, ImageInfo)> {
        let caps = match remote::recv_hello(&mut fr, &limits)? {
            Message::Hello(h) => h.caps,
            _ => return Err(engine::Error::Internal("wrong message".into())),
        };
        match recv_msg(&mut fr, &limits, kind::IMAGE)? {
            Message::Image(i) => Ok((caps, i)),
            _ => Err(engine::Error::Internal("wrong message".into())),
        }
    })();
    let (caps, info) = head.map_err(|e| match e {
        engine::Error::Protocol(protocol::Error::NotProtocol(head)) => anyhow!(
            "-: not an imgsync stream: it {}; pipe in what `imgsync convert SRC -` writes, or give an image's path instead of -",
            protocol::describe_foreign(&head)
        ),
        engine::Error::Protocol(protocol::Error::Eof) if fr.first_bytes().is_none_or(<[u8]>::is_empty) => {
            anyhow!("-: the stream is empty (nothing on stdin)")
        }
        e => anyhow!("-: {}", one(&e)),
    })?;
    let meta = if caps & protocol::caps::META != 0 {
        Meta::AfterEnd
    } else {
        Meta::Known(None)
    };
    let output_format = a
        .output_format
        .or(info.format.map(format_of))
        .unwrap_or(Format::Raw);
    let opts = convert_options(a, output_format)?;
    let cancel = interrupt_flag();
    let report = match receive_into(a, &mut fr, &limits, &info, meta, "-", dst, &opts, &cancel) {
        Ok(r) => r,
        Err(Fail::Local(e)) => return Err(e),
        Err(Fail::Stream(e)) => bail!("-: {} (nothing was written to {})", one(&e), dst.display()),
    };
    print_stats(
        a,
        &Stats {
            src: "-".to_string(),
            dst: dst.display().to_string(),
            format: output_format,
            virtual_size: info.virtual_size,
            bytes_read: report.bytes_read,
            zero_bytes: report.zero_bytes,
            data_sent: report.bytes_read - report.zero_bytes,
            wire_bytes: fr.bytes,
            bytes_written: report.bytes_written,
            clusters_compressed: report.clusters_compressed,
            level: None,
            seconds: started.elapsed().as_secs_f64(),
        },
    )?;
    Ok(exit::OK)
}
