//! A sync with both ends on this host: the same client and serving loop
//! as over SSH, joined by a socket pair, the server on a thread. Both ends
//! are here, so the end that failed first says why in its own words (the
//! other only saw the socket close, or the first end's ERROR frame).

use std::io::{BufReader, BufWriter, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use imgsync_formats::Format;

use super::client::{send_side, source_held_still, Client, SyncOptions};
use super::error::named;
use super::serve::{serve, Hooks, ServeOptions};
use super::target::{local_state, with_state};
use super::{Error, Query, Result};
use crate::engine::sync::{SyncReport, SyncSendOptions};
use crate::engine::{self, Progress};
use crate::io::{FileMeta, Locking, Source};
use crate::protocol::msg::SyncParams;
use crate::transport::{self, Waiter};

/// What a local sync does: `source` (at `src`) onto `dst`.
pub struct LocalSync<'a> {
    pub source: &'a Source,
    pub src: &'a Path,
    pub dst: &'a Path,
    pub opts: SyncOptions,
}

/// Runs a local sync. Returns the report and the bytes that crossed a
/// network (none). A failure says what it left DST as.
pub fn sync_local(
    s: &LocalSync<'_>,
    progress: &dyn Progress,
    cancel: &Arc<AtomicBool>,
) -> Result<(SyncReport, u64)> {
    refuse_same(s.src, s.dst)?;
    // Both ends are this imgsync: the receiver chooses the block size.
    let (params, send) = send_side(s.source, &s.opts, crate::protocol::caps::ALL)?;
    let existed = Some(std::fs::metadata(s.dst).is_ok());
    let changing = Arc::new(AtomicBool::new(false));
    let dst_name = s.dst.display().to_string();
    match exchange(s, &params, &send, progress, cancel, &changing) {
        Ok(r) => {
            source_held_still(s.source, &dst_name)?;
            s.opts.warn_new(&r.0, &dst_name, s.source.image.format());
            Ok(r)
        }
        Err(e) => {
            let state = local_state(s.dst, existed, params.journal, &changing);
            Err(with_state(e, &dst_name, state, cancel))
        }
    }
}

fn exchange(
    s: &LocalSync<'_>,
    params: &SyncParams,
    send: &SyncSendOptions,
    progress: &dyn Progress,
    cancel: &Arc<AtomicBool>,
    changing: &Arc<AtomicBool>,
) -> Result<(SyncReport, u64)> {
    let meta = FileMeta::of_path(s.src).map_err(|e| Error::at(s.src.display(), e))?;
    let pair = |e| Error::at("socketpair", e);
    let (ours, theirs) = UnixStream::pair().map_err(pair)?;
    let theirs_w = theirs.try_clone().map_err(pair)?;
    let ours_w = ours.try_clone().map_err(pair)?;
    let opts = ServeOptions {
        timeout: None,
        cancel: cancel.clone(),
        workers: send.workers,
        changing: changing.clone(),
        ..ServeOptions::default()
    };
    let (sent, received) = std::thread::scope(|scope| {
        let server = scope.spawn(|| {
            serve(
                BufReader::with_capacity(1 << 20, theirs),
                BufWriter::with_capacity(1 << 20, theirs_w),
                None,
                &opts,
                &NoQueries(s.opts.warn.clone()),
            )
        });
        let sent = Client::over(
            &s.dst.display().to_string(),
            Box::new(ours),
            Box::new(BufWriter::with_capacity(1 << 20, ours_w)),
            Box::new(NoWaiter),
            cancel.clone(),
        )
        .and_then(|mut client| {
            use std::os::unix::ffi::OsStrExt;
            let r = client.sync_exchange(
                s.source,
                &meta,
                s.dst.as_os_str().as_bytes(),
                params,
                s.opts.dst_format,
                &s.opts.create(),
                send,
                progress,
            );
            // EOF to the server whatever happened: it may be waiting.
            drop(client);
            r
        });
        (sent, server.join())
    });
    let received =
        received.map_err(|_| Error::said("internal error: the receiving thread panicked"))?;
    if cancel.load(Ordering::Relaxed) || matches!(&sent, Err(engine::Error::Interrupted)) {
        // sync_local says what state DST is in.
        return Err(Error::said(format!("{}: interrupted", s.dst.display())));
    }
    let through_socket = |e: &engine::Error| matches!(e, engine::Error::Protocol(_));
    match (sent, received) {
        (Ok(r), Ok(())) => Ok((r, 0)),
        (Err(e), Err(r)) if through_socket(&e) && !said_by_peer(&r) => Err(r),
        (Err(e), _) if !through_socket(&e) => Err(named(e, s.src, s.dst, None)),
        (_, Err(r)) => Err(r),
        (Err(e), Ok(())) => Err(named(e, s.src, s.dst, None)),
    }
}

/// Whether the serving end's error is only what it saw of the client
/// (the socket closed, or the client's ERROR frame).
fn said_by_peer(e: &Error) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = next {
        if c.is::<crate::protocol::Error>() {
            return true;
        }
        next = c.source();
    }
    false
}

fn refuse_same(src: &Path, dst: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(a), Ok(b)) = (std::fs::metadata(src), std::fs::metadata(dst)) {
        if a.dev() == b.dev() && a.ino() == b.ino() {
            return Err(Error::said(format!(
                "{}: refusing to sync an image onto itself",
                dst.display()
            )));
        }
    }
    Ok(())
}

/// The serving thread of a local sync is joined, not waited for.
struct NoWaiter;

impl Waiter for NoWaiter {
    fn wait(self: Box<Self>) -> std::result::Result<transport::Exit, transport::Error> {
        Ok(transport::Exit::default())
    }
    fn abort(self: Box<Self>) {}
}

/// A local sync asks for no listing; its warnings go where the caller's do.
struct NoQueries(Option<super::client::Warn>);

impl Hooks for NoQueries {
    fn query(
        &self,
        _: Query,
        path: &Path,
        _: Option<Format>,
        _: Locking,
        _: bool,
        _: &mut dyn Write,
    ) -> Result<u8> {
        Err(Error::said(format!(
            "{}: a local sync serves no queries",
            path.display()
        )))
    }
    fn warn_in_use(&self, _: &[PathBuf], _: &str) {}

    fn warn(&self, line: &str) {
        if let Some(w) = &self.0 {
            w(line)
        }
    }
}
