//! One-way protocol streams with no peer to answer: `convert SRC -` writes
//! HELLO, IMAGE, the chunks, END and META to a pipe; `convert - DST` reads
//! them into a new image. Also the receiving half a pull shares with them.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use imgsync_formats::Format;

use super::error::{engine_line, named};
use super::{format_of, Error, Result, TransferOptions, TransferReport};
use crate::engine::convert::{self, ConvertOptions};
use crate::engine::remote::{self, recv_msg, send_msg};
use crate::engine::{self, Progress};
use crate::io::{FileMeta, Output, Source};
use crate::protocol::msg::{kind, Hello, ImageInfo};
use crate::protocol::{self, FrameReader, FrameWriter, Limits, Message};

pub(super) enum Fail {
    /// Named already (the local file).
    Local(Error),
    /// The stream or the peer: to be named with the host.
    Stream(engine::Error),
}

/// Where a receiver learns the source file's permission bits and owner.
pub(super) enum Meta {
    /// A session: META followed IMAGE (`None`: the peer has no `caps::META`).
    Known(Option<protocol::msg::FileMeta>),
    /// A one-way stream whose writer announced `caps::META`: META follows
    /// END (readers that predate it stop reading at END).
    AfterEnd,
}

/// Receives a stream's chunks into a new local DST, committed only when
/// the stream's digest matched.
#[allow(clippy::too_many_arguments)]
pub(super) fn receive_into<R: Read + Send>(
    fr: &mut FrameReader<R>,
    limits: &Limits,
    info: &ImageInfo,
    meta: Meta,
    src_name: &str,
    dst: &Path,
    opts: &ConvertOptions,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<convert::Report, Fail> {
    let local = |e: engine::Error| Fail::Local(named(e, Path::new(src_name), dst, None));
    let at_dst = |e: std::io::Error| Fail::Local(Error::at(dst.display(), e));
    convert::check_size_options(info.virtual_size, opts).map_err(local)?;
    let out = Output::create(dst).map_err(at_dst)?;
    let result = remote::receive_chunks(fr, limits, info, &out, opts, progress, cancel);
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
        out.adopt(&remote::io_meta(&m)).map_err(at_dst)?;
    }
    if cancel.load(Ordering::Relaxed) {
        return Err(local(engine::Error::Interrupted));
    }
    out.commit().map_err(|e| {
        Fail::Local(Error::at(
            format!("{}: completing the output", dst.display()),
            e,
        ))
    })?;
    Ok(report)
}

/// `source` (at `src`) as a one-way protocol stream on `out`
/// (`convert SRC -`).
pub fn send_stream<W: Write + Send + 'static>(
    source: &Source,
    src: &Path,
    out: W,
    opts: &TransferOptions,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<()> {
    let image = &source.image;
    let copts = opts.convert_options(image.format())?;
    let named = |e| named(e, src, Path::new("-"), None);
    let info = remote::image_info(image, 1 << 16).map_err(named)?;
    let meta = FileMeta::of_path(src).map_err(|e| Error::at(src.display(), e))?;
    let mut fw = FrameWriter::new(BufWriter::with_capacity(1 << 20, out));
    progress.start(info.data_bytes);
    let mut sopts = opts.send_options(&copts);
    // The reader's cluster size is unknown: 2 MiB cells (or -S) suit all.
    sopts.chunk = convert::CHUNK_BYTES.max(opts.min_sparse.next_power_of_two());
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
            cancel,
        )?;
        // After END: a reader that predates META stops at END.
        remote::send_meta(&mut fw, protocol::caps::ALL, &meta, image)?;
        // Dropping a BufWriter would swallow the last write's error: a
        // reader that went away before the end must fail the convert.
        fw.flush()?;
        Ok(sent)
    })();
    match r {
        Ok(_) => Ok(()),
        Err(engine::Error::Protocol(protocol::Error::Write(e))) => {
            Err(Error::at("-: writing the stream", e))
        }
        Err(e) => Err(named(e)),
    }
}

/// A one-way protocol stream read from `input` into a new local DST
/// (`convert - DST`).
pub fn receive_stream<R: Read + Send>(
    input: R,
    dst: &Path,
    opts: &TransferOptions,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<TransferReport> {
    let started = Instant::now();
    let limits = Limits::DEFAULT;
    let mut fr = FrameReader::new(BufReader::with_capacity(1 << 20, input), limits.max_frame);
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
        engine::Error::Protocol(protocol::Error::NotProtocol(head)) => Error::said(format!(
            "-: not an imgsync stream: it {}; pipe in what `imgsync convert SRC -` writes, or give an image's path instead of -",
            protocol::describe_foreign(&head)
        )),
        engine::Error::Protocol(protocol::Error::Eof)
            if fr.first_bytes().map_or(true, <[u8]>::is_empty) =>
        {
            Error::said("-: the stream is empty (nothing on stdin)")
        }
        e => Error::said(format!("-: {}", engine_line(&e))),
    })?;
    let meta = if caps & protocol::caps::META != 0 {
        Meta::AfterEnd
    } else {
        Meta::Known(None)
    };
    let output_format = opts
        .output_format
        .or(info.format.map(format_of))
        .unwrap_or(Format::Raw);
    let copts = opts.convert_options(output_format)?;
    let report = match receive_into(
        &mut fr, &limits, &info, meta, "-", dst, &copts, progress, cancel,
    ) {
        Ok(r) => r,
        Err(Fail::Local(e)) => return Err(e),
        Err(Fail::Stream(e)) => {
            return Err(Error::said(format!(
                "-: {} (nothing was written to {})",
                engine_line(&e),
                dst.display()
            )))
        }
    };
    Ok(TransferReport::received(
        output_format,
        &info,
        &report,
        fr.bytes,
        started,
    ))
}
