//! The serving loop: `imgsync serve` is the far end of a transfer, started
//! over SSH (or any pipe) with the protocol on stdin/stdout. The client
//! says in-band what to do: receive an image into a path (push), send one
//! (pull), a query (info, map, check, rollback), or either end of a sync.
//! Errors go back to the client as an ERROR frame naming the file, and to
//! the caller (serve's stderr).

use std::ffi::OsStr;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use imgsync_formats::qcow2::CompressionType;
use imgsync_formats::Format;

use super::error::named;
use super::{format_of, Error, Query, Result, AUTO_LEVEL};
use crate::engine::convert::{self, ConvertOptions};
use crate::engine::remote::{self, handshake_offering, recv_msg, send_msg, SendOptions};
use crate::engine::sync::Target;
use crate::engine::{self, NoProgress};
use crate::io::confine::{ConfineError, Confined};
use crate::io::{open_source, FileMeta, Locking, OpenOptions, Output, Source};
use crate::protocol::msg::{
    kind, Done, Info, QueryCommand, QueryRequest, ReceiveRequest, Request, SendRequest, SyncInfo,
    SyncReceiveRequest, SyncSendRequest, WireCompression, WireFormat,
};
use crate::protocol::{caps, FrameReader, FrameWriter, Limits, Message};
use crate::transport::watch::{FdReader, FdWriter, RestoreBlocking, Watch};

/// What the serving end needs from above: the listings the command line
/// prints (a remote info, map or check prints exactly as a local one),
/// and where warnings go.
pub trait Hooks: Sync {
    /// Prints `query` of the image at `path` into `out`, as the command
    /// line does for a local image; returns its exit status.
    fn query(
        &self,
        query: Query,
        path: &Path,
        format: Option<Format>,
        locking: Locking,
        json: bool,
        out: &mut dyn Write,
    ) -> Result<u8>;

    /// Files a writer holds that are read anyway (`-U`): `what` may be
    /// inconsistent.
    fn warn_in_use(&self, in_use: &[PathBuf], what: &str);

    /// A warning line (naming its file) for this end's stderr.
    fn warn(&self, line: &str);
}

/// How the serving end runs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Give up when the client sends nothing for this long (`None`: never).
    pub timeout: Option<Duration>,
    /// Set to stop (Ctrl-C, SIGTERM).
    pub cancel: Arc<AtomicBool>,
    pub workers: usize,
    /// Set once a sync's DST here may change (its journal is made): what
    /// a failure leaves DST as.
    pub changing: Arc<AtomicBool>,
    /// `--restrict DIR`: every path the client names must lie inside DIR
    /// (resolved by descriptor, checked again after opening).
    pub restrict: Option<PathBuf>,
    /// `--read-only`: requests that write (push, sync push, rollback) are
    /// refused.
    pub read_only: bool,
    /// `--bwlimit`: this end's own cap on what it writes; the client's
    /// (in INFO) applies too, the smaller wins.
    pub bwlimit: Option<u64>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            timeout: Some(crate::transport::DEFAULT_TIMEOUT),
            cancel: Arc::default(),
            workers: crate::engine::pipeline::default_workers(),
            changing: Arc::default(),
            restrict: None,
            read_only: false,
            bwlimit: None,
        }
    }
}

/// Serves one request on stdin/stdout, read and written with the timeout
/// and the cancel flag (sshd gone, a black-holed link: an error, never a
/// serve that waits for ever). The client sends keepalives while it is
/// busy.
pub fn serve_stdio(opts: &ServeOptions, hooks: &dyn Hooks) -> Result<()> {
    let watch = Watch::new(opts.timeout, Some(opts.cancel.clone()));
    let fd = |f: std::io::Result<std::os::fd::OwnedFd>| -> Result<std::os::fd::OwnedFd> {
        f.map_err(|e| Error::at("serve: stdin/stdout", e))
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
        .map_err(|e| Error::at("serve: stdout", e))?;
    let reader = FdReader::new(std::fs::File::from(stdin), watch.clone())
        .map_err(|e| Error::at("serve: stdin", e))?;
    serve(
        BufReader::with_capacity(1 << 20, reader),
        BufWriter::with_capacity(256 << 10, writer),
        Some(&watch),
        opts,
        hooks,
    )
}

/// Serves one request on a connection: handshake, request, answer. On
/// failure the client is told (ERROR) and the error returned.
pub(super) fn serve<R: Read + Send, W: Write + Send + 'static>(
    reader: R,
    writer: W,
    watch: Option<&Watch>,
    opts: &ServeOptions,
    hooks: &dyn Hooks,
) -> Result<()> {
    let mut fr = FrameReader::new(reader, Limits::DEFAULT.max_frame);
    let mut fw = FrameWriter::new(writer);
    // DIR first: a serve that cannot open it refuses everything.
    let jail = match &opts.restrict {
        Some(dir) => Some(Jail {
            dir: Confined::open(dir).map_err(|e| Error::at(dir.display(), e))?,
            shown: dir.clone(),
        }),
        None => None,
    };
    // Test-only: capability bits this serve does not offer in HELLO, as an
    // older imgsync in a forced command would not (SYNC_CREATE is 32).
    let offered = caps::ALL
        & !std::env::var("IMGSYNC_TEST_SERVE_CAPS_MASK")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    let negotiated =
        handshake_offering(&mut fr, &mut fw, offered).map_err(|e| Error::at("serve", e))?;
    let (limits, caps) = (negotiated.limits, negotiated.caps);
    let mut flags = 0;
    if std::env::var_os("SSH_ORIGINAL_COMMAND").is_some() {
        // sshd sets it only when a forced command runs in place of the
        // client's: its --remote-imgsync went unused.
        flags |= Info::FORCED;
    }
    if opts.restrict.is_some() {
        flags |= Info::RESTRICTED;
    }
    if opts.read_only {
        flags |= Info::READ_ONLY;
    }
    let ours = Info {
        // Test-only: another version to report, as an older or newer
        // imgsync in a forced command would.
        version: std::env::var("IMGSYNC_TEST_SERVE_VERSION")
            .unwrap_or_else(|_| super::VERSION.to_string()),
        flags,
        bwlimit: 0,
    };
    let peer = super::exchange_info(&mut fr, &mut fw, &limits, caps, ours)
        .map_err(|e| Error::at("serve", e))?;
    // The wire rate: the client's --bwlimit and this serve's own.
    let rate = [peer.map(|p| p.bwlimit), opts.bwlimit]
        .into_iter()
        .flatten()
        .filter(|&r| r > 0)
        .min();
    fw.set_rate_limit(rate, Some(opts.cancel.clone()));
    if caps & caps::KEEPALIVE == 0 {
        // An older client says nothing while it is busy: its silence is
        // not death.
        if let Some(w) = watch {
            w.set_timeout(None);
        }
    }
    let req = match recv_msg(&mut fr, &limits, kind::REQUEST) {
        Ok(Message::Request(r)) => r,
        Ok(_) => unreachable!("recv_msg checks the type"),
        Err(e) => return Err(Error::at("serve", e)),
    };
    // Test-only: a serve busy for this long before it answers (as a big
    // check or a slow disk would be), to show that keepalives stop the
    // client's --timeout from taking it for dead.
    if let Some(ms) = std::env::var("IMGSYNC_TEST_SERVE_STALL_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        std::thread::sleep(Duration::from_millis(ms));
    }
    let mut end = End {
        fr,
        fw,
        limits,
        caps,
        opts,
        hooks,
        jail,
    };
    let result = match req {
        Request::Receive(r) => end.receive(r),
        Request::Send(r) => end.send(r),
        Request::Query(q) => end.query(q),
        Request::SyncReceive(r) => end.sync_receive(r),
        Request::SyncSend(r) => end.sync_send(r),
    };
    if let Err(e) = &result {
        // Tell the client, then fail the same way here (stderr).
        let _ = send_msg(&mut end.fw, &Message::Error(e.one_line()));
        let _ = end.fw.flush();
    }
    result
}

/// `--restrict DIR`: the directory, and DIR as the admin wrote it (for
/// messages).
struct Jail {
    dir: Confined,
    shown: PathBuf,
}

/// What a request does with a path, for `--restrict` and `--read-only`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    Read,
    /// Writes an existing file or creates it.
    Write,
}

impl Jail {
    /// The wire path as the client named it, for messages.
    fn shown(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }

    /// The canonical path inside DIR that `bytes` names (relative to DIR,
    /// or absolute under it); anything else is refused naming the path.
    fn resolve(&self, bytes: &[u8], access: Access) -> Result<PathBuf> {
        let p = Path::new(OsStr::from_bytes(bytes));
        let r = self.dir.resolve(p, access == Access::Write);
        // Test-only: a pause between the check and the open, for a test
        // that swaps a symlink in meanwhile.
        if let Some(ms) = std::env::var("IMGSYNC_TEST_RESTRICT_STALL_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            std::thread::sleep(Duration::from_millis(ms));
        }
        match r {
            Ok(path) => Ok(path),
            Err(ConfineError::Outside) => Err(self.outside(&Self::shown(bytes))),
            Err(ConfineError::Io(e)) => Err(Error::at(Self::shown(bytes), e)),
        }
    }

    fn outside(&self, shown: &str) -> Error {
        Error::said(format!(
            "{shown}: refused: outside {} (this key runs imgsync serve --restrict {})",
            self.shown.display(),
            self.shown.display()
        ))
    }

    /// After opening: the file behind `fd` must still lie inside DIR (a
    /// symlink swapped in after [`Jail::resolve`] leads elsewhere).
    fn check_open(&self, fd: std::os::fd::BorrowedFd<'_>, path: &Path) -> Result<()> {
        match self.dir.holds(fd) {
            Ok(true) => Ok(()),
            Ok(false) => Err(self.outside(&path.display().to_string())),
            Err(e) => Err(Error::at(path.display(), e)),
        }
    }

    /// Every file of an opened source (the image and its chain).
    fn check_source(&self, source: &Source) -> Result<()> {
        self.check_files(&source.watch)
    }

    /// Every file of an image's chain, by its descriptor.
    fn check_files(&self, chain: &crate::io::watch::SourceWatch) -> Result<()> {
        for (path, file) in chain.files() {
            self.check_open(file.as_fd(), path)?;
        }
        Ok(())
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

/// qemu's locks on what a request reads: qemu-img's, or none in the way
/// with `-U`.
fn locking(force_share: bool) -> Locking {
    if force_share {
        Locking::ForceShare
    } else {
        Locking::Read
    }
}

fn level_of(level: i8) -> (i32, bool) {
    if level == AUTO_LEVEL {
        (remote::DEFAULT_LEVEL, true)
    } else {
        (i32::from(level).clamp(0, 19), false)
    }
}

/// The serving end of one connection.
struct End<'a, R: Read, W: Write> {
    fr: FrameReader<R>,
    fw: FrameWriter<W>,
    limits: Limits,
    caps: u64,
    opts: &'a ServeOptions,
    hooks: &'a dyn Hooks,
    jail: Option<Jail>,
}

impl<R: Read + Send, W: Write> End<'_, R, W> {
    /// The path a request names, as this serve allows it: refused when it
    /// writes and the serve is read-only, or (with `--restrict`) when it
    /// is not inside DIR.
    fn path(&self, bytes: &[u8], access: Access) -> Result<PathBuf> {
        if access == Access::Write && self.opts.read_only {
            return Err(Error::said(format!(
                "{}: refused: this key is read-only (imgsync serve --read-only)",
                Jail::shown(bytes)
            )));
        }
        match &self.jail {
            Some(j) => j.resolve(bytes, access),
            None => Ok(path_of(bytes)),
        }
    }

    fn check_open(&self, fd: std::os::fd::BorrowedFd<'_>, path: &Path) -> Result<()> {
        match &self.jail {
            Some(j) => j.check_open(fd, path),
            None => Ok(()),
        }
    }

    /// push: a new image at the path, appearing only when complete.
    fn receive(&mut self, r: ReceiveRequest) -> Result<()> {
        let dst = self.path(&r.path, Access::Write)?;
        let (limits, caps) = (self.limits, self.caps);
        let info = match recv_msg(&mut self.fr, &limits, kind::IMAGE) {
            Ok(Message::Image(i)) => i,
            Ok(_) => unreachable!("recv_msg checks the type"),
            Err(e) => return Err(Error::at("serve", e)),
        };
        let meta =
            remote::recv_meta(&mut self.fr, &limits, caps).map_err(|e| Error::at("serve", e))?;
        let output_format = format_of(r.format);
        let opts = ConvertOptions {
            output_format,
            min_sparse: 4096,
            compression: compression_of(r.compression),
            cluster_bits: u32::from(r.cluster_bits),
            target_is_zero: r.target_is_zero,
            check_space: r.check_space,
            workers: self.opts.workers,
        };
        if opts.compression.is_some() && output_format != Format::Qcow2 {
            return Err(Error::said(format!(
                "{}: compression needs qcow2 output",
                dst.display()
            )));
        }
        convert::check_size_options(info.virtual_size, &opts)
            .map_err(|e| named(e, Path::new("-"), &dst, None))?;
        let out = Output::create(&dst).map_err(|e| Error::at(dst.display(), e))?;
        self.check_open(out.file().as_fd(), &dst)?;
        if let Some(m) = &meta {
            out.adopt(&remote::io_meta(m))
                .map_err(|e| Error::at(dst.display(), e))?;
        }
        self.receive_new(out, &dst, &info, &opts, meta.as_ref())
    }

    /// A new image at `dst` from IMAGE `info` (already read): READY,
    /// the chunks, then DONE once it is in place.
    fn receive_new(
        &mut self,
        out: Output,
        dst: &Path,
        info: &crate::protocol::msg::ImageInfo,
        opts: &ConvertOptions,
        meta: Option<&crate::protocol::msg::FileMeta>,
    ) -> Result<()> {
        let named = |e: engine::Error| named(e, Path::new("-"), dst, None);
        if opts.compression.is_some() && opts.output_format != Format::Qcow2 {
            return Err(Error::said(format!(
                "{}: compression needs qcow2 output",
                dst.display()
            )));
        }
        convert::check_size_options(info.virtual_size, opts).map_err(named)?;
        remote::check_receive(info, &out, opts).map_err(named)?;
        send_msg(&mut self.fw, &Message::Ready).map_err(named)?;
        self.fw.flush().map_err(|e| named(e.into()))?;
        self.opts.changing.store(true, Ordering::Relaxed);
        let cancel = &self.opts.cancel;
        let limits = self.limits;
        let report =
            remote::receive_chunks(&mut self.fr, &limits, info, &out, opts, &NoProgress, cancel)
                .and_then(|r| remote::set_content_size(&out, info, opts, meta).map(|()| r))
                .map_err(|e| match e {
                    engine::Error::Protocol(p) => Error::said(format!(
                        "{}: {} (nothing was written)",
                        dst.display(),
                        super::one_line(&p)
                    )),
                    e => named(e),
                })?;
        if cancel.load(Ordering::Relaxed) {
            return Err(named(engine::Error::Interrupted));
        }
        out.commit()
            .map_err(|e| Error::at(format!("{}: completing the output", dst.display()), e))?;
        send_msg(
            &mut self.fw,
            &Message::Done(Done {
                bytes_written: report.bytes_written,
                clusters_compressed: report.clusters_compressed,
            }),
        )
        .map_err(named)?;
        self.fw.flush().map_err(|e| named(e.into()))?;
        Ok(())
    }

    /// SRC here, locked as the client asked (`-U` or not) and stamped.
    /// Warnings (`-U` beside a writer) go to this end's stderr.
    fn open_src(
        &self,
        src: &Path,
        format: Option<WireFormat>,
        force_share: bool,
    ) -> Result<Source> {
        let source = open_source(
            src,
            OpenOptions {
                format: format.map(format_of),
                allow_corrupt: false,
                locking: locking(force_share),
            },
        )
        .map_err(Error::other)?;
        // Each file read (a backing file too) must lie inside DIR.
        if let Some(j) = &self.jail {
            j.check_source(&source)?;
        }
        self.hooks.warn_in_use(&source.in_use, "the copy");
        Ok(source)
    }

    /// pull (and a remote compare): SRC sent as a stream.
    fn send(&mut self, r: SendRequest) -> Result<()> {
        let src = self.path(&r.path, Access::Read)?;
        let named = |e: engine::Error| named(e, &src, Path::new("-"), None);
        let source = self.open_src(&src, r.format, r.force_share)?;
        let image = &source.image;
        let chunk = u64::from(r.chunk);
        if !chunk.is_power_of_two() || chunk < 65536 || chunk > u64::from(self.limits.max_chunk) {
            return Err(Error::said(format!(
                "{}: bad chunk size {chunk} requested",
                src.display()
            )));
        }
        if r.min_sparse % 512 != 0 || r.min_sparse > chunk {
            return Err(Error::said(format!(
                "{}: bad -S {} requested",
                src.display(),
                r.min_sparse
            )));
        }
        let info = remote::image_info(image, r.unit).map_err(named)?;
        let meta = FileMeta::of_path(&src).map_err(|e| Error::at(src.display(), e))?;
        send_msg(&mut self.fw, &Message::Image(info)).map_err(named)?;
        remote::send_meta(&mut self.fw, self.caps, &meta, image).map_err(named)?;
        let (level, adaptive) = level_of(r.level);
        let opts = SendOptions {
            min_sparse: r.min_sparse,
            chunk,
            level,
            adaptive,
            ..SendOptions::default()
        };
        // A SRC that changed while read ends the stream with ERROR, not END.
        remote::send_chunks(
            image,
            &mut self.fw,
            &self.limits,
            &opts,
            &source.watch,
            &NoProgress,
            &self.opts.cancel,
        )
        .map_err(named)?;
        Ok(())
    }

    /// Runs info, map, check or rollback and sends what it prints as
    /// OUTPUT frames, then its exit status.
    fn query(&mut self, q: QueryRequest) -> Result<()> {
        let access = match q.command {
            QueryCommand::Rollback => Access::Write,
            _ => Access::Read,
        };
        let path = self.path(&q.path, access)?;
        let format = q.format.map(format_of);
        let mut out = FrameOut {
            fw: &mut self.fw,
            buf: Vec::new(),
        };
        let query = match q.command {
            QueryCommand::Info => Some(Query::Info),
            QueryCommand::Map => Some(Query::Map),
            QueryCommand::Check => Some(Query::Check),
            QueryCommand::Rollback => None,
        };
        let code = match query {
            Some(query) => self.hooks.query(
                query,
                &path,
                format,
                locking(q.force_share),
                q.json,
                &mut out,
            )?,
            None => super::rollback_to(&mut out, &path)?,
        };
        out.flush().map_err(Error::other)?;
        send_msg(out.fw, &Message::Exit(code)).map_err(Error::other)?;
        out.fw.flush().map_err(Error::other)?;
        Ok(())
    }

    /// sync push: DST is here.
    fn sync_receive(&mut self, r: SyncReceiveRequest) -> Result<()> {
        let dst = self.path(&r.path, Access::Write)?;
        let meta = remote::recv_meta(&mut self.fr, &self.limits, self.caps)
            .map_err(|e| Error::at("serve", e))?;
        // 0: left to this end (a client with caps::BLOCK_CHOICE).
        if r.params.block_size != 0 || self.caps & caps::BLOCK_CHOICE == 0 {
            check_block_size(r.params.block_size, &dst)?;
        }
        let target = super::open_target(&dst, r.dst_format.map(format_of))?;
        match &target {
            Target::New(out) => self.check_open(out.file().as_fd(), &dst)?,
            Target::Existing { file, .. } => self.check_open(file.as_fd(), &dst)?,
            Target::Qcow2 { file, chain, .. } => {
                self.check_open(file.as_fd(), &dst)?;
                // Its backing chain is read (hashed) too: each file must
                // lie inside DIR, as a source's.
                if let Some(j) = &self.jail {
                    j.check_files(chain)?;
                }
            }
        }
        if let Some(m) = &meta {
            target
                .adopt(&remote::io_meta(m))
                .map_err(|e| Error::at(dst.display(), e))?;
        }
        let target = match (target, r.create) {
            (Target::New(out), Some(c)) => {
                // DST absent: made as a push of the whole image would.
                send_msg(
                    &mut self.fw,
                    &Message::SyncInfo(SyncInfo {
                        exists: false,
                        dst_size: 0,
                        resumed: false,
                        cached: false,
                        key: r.params.key,
                        block_size: if r.params.block_size == 0 {
                            crate::engine::sync::DEFAULT_BLOCK
                        } else {
                            0
                        },
                    }),
                )
                .map_err(|e| named(e, &dst, &dst, None))?;
                self.fw
                    .flush()
                    .map_err(|e| named(e.into(), &dst, &dst, None))?;
                let info = match recv_msg(&mut self.fr, &self.limits, kind::IMAGE) {
                    Ok(Message::Image(i)) => i,
                    Ok(_) => unreachable!("recv_msg checks the type"),
                    Err(e) => return Err(Error::at("serve", e)),
                };
                let opts = ConvertOptions {
                    output_format: format_of(c.format),
                    min_sparse: 4096,
                    compression: compression_of(c.compression),
                    cluster_bits: u32::from(c.cluster_bits),
                    target_is_zero: false,
                    check_space: r.params.check_space,
                    workers: self.opts.workers,
                };
                return self.receive_new(out, &dst, &info, &opts, meta.as_ref());
            }
            (Target::New(_), None) if r.dst_format == Some(WireFormat::Qcow2) => {
                // Only a client that says how to make it gets a qcow2.
                return Err(Error::said(format!(
                    "{}: a new qcow2 DST needs an imgsync client that can ask for one (update it)",
                    dst.display()
                )));
            }
            (t, _) => t,
        };
        crate::engine::sync::sync_receive(
            target,
            &mut self.fr,
            &mut self.fw,
            &self.limits,
            &r.params,
            &crate::engine::sync::SyncReceiveOptions {
                workers: self.opts.workers,
                cache: Some(dst.clone()),
                changing: self.opts.changing.clone(),
                peer_caps: self.caps,
            },
            None,
            &self.opts.cancel,
        )
        // Everything the receiver reads or writes is DST (its old content
        // is read through the format layer, a "source" to the engine).
        .map_err(|e| named(e, &dst, &dst, None))
        .map(|got| {
            for w in &got.warnings {
                self.hooks.warn(&format!("{}: {w}", dst.display()));
            }
        })
    }

    /// sync pull: SRC is here.
    fn sync_send(&mut self, r: SyncSendRequest) -> Result<()> {
        let src = self.path(&r.path, Access::Read)?;
        check_block_size(r.block_size, &src)?;
        let named = |e: engine::Error| named(e, &src, Path::new("-"), None);
        let source = self.open_src(&src, r.format, r.force_share)?;
        let image = &source.image;
        let mut info = remote::image_info(image, 1 << 16).map_err(named)?;
        // The size DST takes: a raw file's exact length.
        info.virtual_size = image.content_size();
        let meta = FileMeta::of_path(&src).map_err(|e| Error::at(src.display(), e))?;
        send_msg(&mut self.fw, &Message::Image(info)).map_err(named)?;
        remote::send_meta(&mut self.fw, self.caps, &meta, image).map_err(named)?;
        self.fw.flush().map_err(|e| named(e.into()))?;
        let params = crate::protocol::msg::SyncParams {
            block_size: r.block_size,
            key: r.key,
            src_size: image.content_size(),
            journal: true,
            check_space: true,
            reread: false,
        };
        let (level, adaptive) = level_of(r.level);
        let sopts = crate::engine::sync::SyncSendOptions {
            level,
            adaptive,
            workers: self.opts.workers,
            state: Default::default(),
        };
        crate::engine::sync::sync_send(
            image,
            &mut self.fr,
            &mut self.fw,
            &self.limits,
            &params,
            &sopts,
            &NoProgress,
            &self.opts.cancel,
        )
        .map_err(named)?;
        // DST is complete as sent; whether SRC held still meanwhile is the
        // last word (ERROR from `serve` when it did not).
        source.watch.check().map_err(Error::other)?;
        if self.caps & caps::SOURCE_CHECK != 0 {
            send_msg(&mut self.fw, &Message::Exit(0)).map_err(named)?;
            self.fw.flush().map_err(|e| named(e.into()))?;
        }
        Ok(())
    }
}

fn compression_of(c: WireCompression) -> Option<CompressionType> {
    match c {
        WireCompression::None => None,
        WireCompression::Zlib => Some(CompressionType::Zlib),
        WireCompression::Zstd => Some(CompressionType::Zstd),
    }
}

fn check_block_size(bs: u32, path: &Path) -> Result<()> {
    if !bs.is_power_of_two()
        || !(crate::engine::sync::MIN_BLOCK..=crate::engine::sync::MAX_BLOCK).contains(&bs)
    {
        return Err(Error::said(format!(
            "{}: bad block size {bs} requested",
            path.display()
        )));
    }
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
