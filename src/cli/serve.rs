//! `imgsync serve`: the far end of a transfer, started over SSH (or any
//! pipe) with the protocol on stdin/stdout. The client says in-band what to
//! do: receive an image into a path (push) or send one (pull). Errors go
//! back to the client as an ERROR frame naming the file, and to stderr.

use std::ffi::OsStr;
use std::io::{BufReader, BufWriter, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use anyhow::{anyhow, Result};

use super::convert::engine_error;
use super::progress::interrupt_flag;
use super::remote::{format_of, AUTO_LEVEL};
use super::{exit, output};
use crate::engine::convert::{self, ConvertOptions};
use crate::engine::remote::{self, handshake, recv_msg, send_msg, SendOptions};
use crate::engine::{self, NoProgress};
use crate::io::{open_source, FileMeta, OpenOptions, Output, Source};
use crate::protocol::msg::{
    kind, Done, QueryCommand, QueryRequest, ReceiveRequest, Request, SendRequest, WireCompression,
    WireFormat,
};
use crate::protocol::{caps, FrameReader, FrameWriter, Limits, Message};
use crate::transport::watch::{FdReader, FdWriter, RestoreBlocking, Watch};
use imgsync_formats::qcow2::CompressionType;
use imgsync_formats::Format;

type Reader = FrameReader<BufReader<FdReader<std::fs::File>>>;
type Writer = FrameWriter<BufWriter<FdWriter<std::fs::File>>>;

pub fn run(timeout: u64) -> Result<u8> {
    // stdin and stdout as plain descriptors, read and written with a
    // timeout and the interrupt flag (sshd gone, a black-holed link: an
    // error, never a serve that waits for ever). The client sends
    // keepalives while it is busy.
    let watch = Watch::new(
        (timeout > 0).then(|| std::time::Duration::from_secs(timeout)),
        Some(interrupt_flag()),
    );
    let fd = |f: std::io::Result<std::os::fd::OwnedFd>| -> Result<std::os::fd::OwnedFd> {
        f.map_err(|e| anyhow!(e).context("serve: stdin/stdout"))
    };
    let stdin = fd(std::io::stdin().as_fd().try_clone_to_owned())?;
    let stdout = fd(std::io::stdout().as_fd().try_clone_to_owned())?;
    // O_NONBLOCK belongs to the open file, which whoever started serve
    // shares: back to blocking when serve ends.
    let _restore = (
        RestoreBlocking(fd(stdin.try_clone())?),
        RestoreBlocking(fd(stdout.try_clone())?),
    );
    let writer = FdWriter::new(std::fs::File::from(stdout), watch.clone())
        .and_then(|w| w.hearing(&stdin))
        .map_err(|e| anyhow!(e).context("serve: stdout"))?;
    let mut fr = FrameReader::new(
        BufReader::with_capacity(
            1 << 20,
            FdReader::new(std::fs::File::from(stdin), watch.clone())
                .map_err(|e| anyhow!(e).context("serve: stdin"))?,
        ),
        Limits::DEFAULT.max_frame,
    );
    let mut fw = FrameWriter::new(BufWriter::with_capacity(256 << 10, writer));
    let negotiated = handshake(&mut fr, &mut fw).map_err(|e| anyhow!(e).context("serve"))?;
    let (limits, caps) = (negotiated.limits, negotiated.caps);
    if caps & caps::KEEPALIVE == 0 {
        // An older client says nothing while it is busy: its silence is
        // not death.
        watch.set_timeout(None);
    }
    let req = match recv_msg(&mut fr, &limits, kind::REQUEST) {
        Ok(Message::Request(r)) => r,
        Ok(_) => unreachable!("recv_msg checks the type"),
        Err(e) => return Err(anyhow!(e).context("serve")),
    };
    // Test-only: a serve busy for this long before it answers (as a big
    // check or a slow disk would be), to show that keepalives stop the
    // client's --timeout from taking it for dead.
    if let Some(ms) = std::env::var("IMGSYNC_TEST_SERVE_STALL_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    let result = match req {
        Request::Receive(r) => receive(&mut fr, &mut fw, &limits, caps, r),
        Request::Send(r) => send(&mut fw, &limits, caps, r),
        Request::Query(q) => query(&mut fw, q),
        Request::SyncReceive(r) => sync_receive(&mut fr, &mut fw, &limits, caps, r),
        Request::SyncSend(r) => sync_send(&mut fr, &mut fw, &limits, caps, r),
    };
    match result {
        Ok(()) => Ok(exit::OK),
        Err(e) => {
            // Tell the client, then fail the same way locally (stderr).
            let line = output::one_line(&e);
            let _ = send_msg(&mut fw, &Message::Error(line));
            let _ = fw.flush();
            Err(e)
        }
    }
}

/// A path from the wire: `~/x` is under $HOME (as scp's shell would do);
/// a relative path is relative to the login directory.
fn path_of(bytes: &[u8]) -> PathBuf {
    let p = Path::new(OsStr::from_bytes(bytes));
    if let Ok(rest) = p.strip_prefix("~") {
        if let Some(home) = std::env::var_os("HOME") {
            return PathBuf::from(home).join(rest);
        }
    }
    p.to_path_buf()
}

fn receive(
    fr: &mut Reader,
    fw: &mut Writer,
    limits: &Limits,
    caps: u64,
    r: ReceiveRequest,
) -> Result<()> {
    let dst = path_of(&r.path);
    let info = match recv_msg(fr, limits, kind::IMAGE) {
        Ok(Message::Image(i)) => i,
        Ok(_) => unreachable!("recv_msg checks the type"),
        Err(e) => return Err(anyhow!(e).context("serve")),
    };
    let meta = remote::recv_meta(fr, limits, caps).map_err(|e| anyhow!(e).context("serve"))?;
    let output_format = format_of(r.format);
    let opts = ConvertOptions {
        output_format,
        min_sparse: 4096,
        compression: match r.compression {
            WireCompression::None => None,
            WireCompression::Zlib => Some(CompressionType::Zlib),
            WireCompression::Zstd => Some(CompressionType::Zstd),
        },
        cluster_bits: u32::from(r.cluster_bits),
        target_is_zero: r.target_is_zero,
        check_space: r.check_space,
        workers: crate::engine::pipeline::default_workers(),
    };
    let named = |e: engine::Error| engine_error(e, Path::new("-"), &dst, None);
    if opts.compression.is_some() && output_format != Format::Qcow2 {
        return Err(anyhow!("{}: compression needs qcow2 output", dst.display()));
    }
    convert::check_size_options(info.virtual_size, &opts).map_err(named)?;
    let out = Output::create(&dst).map_err(|e| anyhow!(e).context(dst.display().to_string()))?;
    if let Some(m) = meta {
        out.adopt(&remote::io_meta(&m))
            .map_err(|e| anyhow!(e).context(dst.display().to_string()))?;
    }
    remote::check_receive(&info, &out, &opts).map_err(named)?;
    send_msg(fw, &Message::Ready).map_err(named)?;
    fw.flush().map_err(|e| named(e.into()))?;
    let cancel = interrupt_flag();
    let report = remote::receive_chunks(fr, limits, &info, &out, &opts, &NoProgress, &cancel)
        .and_then(|r| remote::set_content_size(&out, &info, &opts, meta.as_ref()).map(|()| r))
        .map_err(|e| match e {
            engine::Error::Protocol(p) => anyhow!(
                "{}: {} (nothing was written)",
                dst.display(),
                output::one_line(&anyhow!(p))
            ),
            e => named(e),
        })?;
    if cancel.load(Ordering::Relaxed) {
        return Err(named(engine::Error::Interrupted));
    }
    out.commit()
        .map_err(|e| anyhow!(e).context(format!("{}: completing the output", dst.display())))?;
    send_msg(
        fw,
        &Message::Done(Done {
            bytes_written: report.bytes_written,
            clusters_compressed: report.clusters_compressed,
        }),
    )
    .map_err(named)?;
    fw.flush().map_err(|e| named(e.into()))?;
    Ok(())
}

/// SRC here, locked as the client asked (`-U` or not) and stamped.
/// Warnings (`-U` beside a writer) go to this end's stderr.
fn open_src(src: &Path, format: Option<WireFormat>, force_share: bool) -> Result<Source> {
    let source = open_source(
        src,
        OpenOptions {
            format: format.map(format_of),
            allow_corrupt: false,
            locking: super::locking(force_share),
        },
    )?;
    super::warn_in_use(&source.in_use, "the copy");
    Ok(source)
}

fn send<W: Write>(
    fw: &mut FrameWriter<W>,
    limits: &Limits,
    caps: u64,
    r: SendRequest,
) -> Result<()> {
    let src = path_of(&r.path);
    let named = |e: engine::Error| engine_error(e, &src, Path::new("-"), None);
    let source = open_src(&src, r.format, r.force_share)?;
    let image = &source.image;
    let chunk = u64::from(r.chunk);
    if !chunk.is_power_of_two() || chunk < 65536 || chunk > u64::from(limits.max_chunk) {
        return Err(anyhow!(
            "{}: bad chunk size {chunk} requested",
            src.display()
        ));
    }
    if r.min_sparse % 512 != 0 || r.min_sparse > chunk {
        return Err(anyhow!(
            "{}: bad -S {} requested",
            src.display(),
            r.min_sparse
        ));
    }
    let info = remote::image_info(image, r.unit).map_err(named)?;
    let meta =
        FileMeta::of_path(&src).map_err(|e| anyhow!(e).context(src.display().to_string()))?;
    send_msg(fw, &Message::Image(info)).map_err(named)?;
    remote::send_meta(fw, caps, &meta, &image).map_err(named)?;
    let opts = SendOptions {
        min_sparse: r.min_sparse,
        chunk,
        level: if r.level == AUTO_LEVEL {
            remote::DEFAULT_LEVEL
        } else {
            i32::from(r.level).clamp(0, 19)
        },
        adaptive: r.level == AUTO_LEVEL,
        ..SendOptions::default()
    };
    let cancel = interrupt_flag();
    // A SRC that changed while read ends the stream with ERROR, not END.
    remote::send_chunks(
        image,
        fw,
        limits,
        &opts,
        &source.watch,
        &NoProgress,
        &cancel,
    )
    .map_err(named)?;
    Ok(())
}

/// Runs info, map or check and sends what it prints as OUTPUT frames, then
/// its exit status.
fn query<W: Write>(fw: &mut FrameWriter<W>, q: QueryRequest) -> Result<()> {
    let path = path_of(&q.path);
    let output = if q.json {
        super::OutputFormat::Json
    } else {
        super::OutputFormat::Human
    };
    let format = q.format.map(format_of);
    let locking = super::locking(q.force_share);
    let mut out = FrameOut {
        fw,
        buf: Vec::new(),
    };
    let code = match q.command {
        QueryCommand::Info => super::info::run_to(&mut out, &path, format, locking, output),
        QueryCommand::Map => super::map::run_to(&mut out, &path, format, locking, output),
        QueryCommand::Check => super::check::run_to(&mut out, &path, format, locking, output),
        QueryCommand::Rollback => super::sync::rollback_to(&mut out, &path),
    }?;
    out.flush()?;
    send_msg(out.fw, &Message::Exit(code)).map_err(|e| anyhow!(e))?;
    out.fw.flush().map_err(|e| anyhow!(e))?;
    Ok(())
}

/// Output of a query, sent in OUTPUT frames of up to 256 KiB.
struct FrameOut<'a, W: Write> {
    fw: &'a mut FrameWriter<W>,
    buf: Vec<u8>,
}

const OUTPUT_FRAME: usize = 256 << 10;

impl<W: Write> Write for FrameOut<'_, W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= OUTPUT_FRAME {
            self.send()?;
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

impl<W: Write> FrameOut<'_, W> {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let m = Message::Output(std::mem::take(&mut self.buf));
        send_msg(self.fw, &m).map_err(std::io::Error::other)
    }
}

/// sync push: DST is here.
fn sync_receive(
    fr: &mut Reader,
    fw: &mut Writer,
    limits: &Limits,
    caps: u64,
    r: crate::protocol::msg::SyncReceiveRequest,
) -> Result<()> {
    let dst = path_of(&r.path);
    let meta = remote::recv_meta(fr, limits, caps).map_err(|e| anyhow!(e).context("serve"))?;
    let bs = r.params.block_size;
    if !bs.is_power_of_two()
        || !(crate::engine::sync::MIN_BLOCK..=crate::engine::sync::MAX_BLOCK).contains(&bs)
    {
        return Err(anyhow!("{}: bad block size {bs} requested", dst.display()));
    }
    let target = super::sync::open_target(&dst, r.dst_format.map(format_of))?;
    if let Some(m) = meta {
        target
            .adopt(&remote::io_meta(&m))
            .map_err(|e| anyhow!(e).context(dst.display().to_string()))?;
    }
    let cancel = interrupt_flag();
    crate::engine::sync::sync_receive(
        target,
        fr,
        fw,
        limits,
        &r.params,
        &crate::engine::sync::SyncReceiveOptions {
            workers: crate::engine::pipeline::default_workers(),
            cache: Some(dst.clone()),
            changing: Default::default(),
        },
        &cancel,
    )
    .map_err(|e| engine_error(e, Path::new("-"), &dst, None))?;
    Ok(())
}

/// sync pull: SRC is here.
fn sync_send(
    fr: &mut Reader,
    fw: &mut Writer,
    limits: &Limits,
    caps: u64,
    r: crate::protocol::msg::SyncSendRequest,
) -> Result<()> {
    let src = path_of(&r.path);
    let bs = r.block_size;
    if !bs.is_power_of_two()
        || !(crate::engine::sync::MIN_BLOCK..=crate::engine::sync::MAX_BLOCK).contains(&bs)
    {
        return Err(anyhow!("{}: bad block size {bs} requested", src.display()));
    }
    let named = |e: engine::Error| engine_error(e, &src, Path::new("-"), None);
    let source = open_src(&src, r.format, r.force_share)?;
    let image = &source.image;
    let mut info = remote::image_info(image, 1 << 16).map_err(named)?;
    // The size DST takes: a raw file's exact length.
    info.virtual_size = image.content_size();
    let meta =
        FileMeta::of_path(&src).map_err(|e| anyhow!(e).context(src.display().to_string()))?;
    send_msg(fw, &Message::Image(info)).map_err(named)?;
    remote::send_meta(fw, caps, &meta, &image).map_err(named)?;
    fw.flush().map_err(|e| named(e.into()))?;
    let params = crate::protocol::msg::SyncParams {
        block_size: bs,
        key: r.key,
        src_size: image.content_size(),
        journal: true,
        check_space: true,
        reread: false,
    };
    let sopts = crate::engine::sync::SyncSendOptions {
        level: if r.level == AUTO_LEVEL {
            remote::DEFAULT_LEVEL
        } else {
            i32::from(r.level).clamp(0, 19)
        },
        adaptive: r.level == AUTO_LEVEL,
        workers: crate::engine::pipeline::default_workers(),
        state: Default::default(),
    };
    let cancel = interrupt_flag();
    crate::engine::sync::sync_send(image, fr, fw, limits, &params, &sopts, &NoProgress, &cancel)
        .map_err(named)?;
    // DST is complete as sent; whether SRC held still meanwhile is the
    // last word (ERROR from `run` when it did not).
    source.watch.check().map_err(|e| anyhow!(e))?;
    if caps & caps::SOURCE_CHECK != 0 {
        send_msg(fw, &Message::Exit(exit::OK)).map_err(named)?;
        fw.flush().map_err(|e| named(e.into()))?;
    }
    Ok(())
}
