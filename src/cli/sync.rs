//! `imgsync sync SRC DST`: make DST (a raw file or block device, local or
//! remote) identical to SRC in place, sending only the blocks that differ,
//! with an undo journal; `imgsync sync --rollback DST` undoes an
//! interrupted sync.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use imgsync_formats::{Format, Storage};

use super::convert::engine_error;
use super::location::Location;
use super::output::human_size;
use super::progress::{interrupt_flag, interrupted, progress_of, Reporting};
use super::remote::{self, SshArgs};
use super::{exit, OutputFormat};
use crate::engine::sync::{
    self, SyncReceiveOptions, SyncReport, SyncSendOptions, Target, MAX_BLOCK, MIN_BLOCK,
};
use crate::engine::{self, pipeline};
use crate::io::{
    journal, lock, open_image, open_source, FileMeta, LocalFile, Locking, OpenOptions, Output,
};
use crate::protocol::msg::SyncParams;
use crate::protocol::{FrameReader, FrameWriter, Limits};

pub struct Args {
    pub paths: Vec<OsString>,
    pub format: Option<Format>,
    /// `-O`: DST's format (else `-f`'s, else DST is probed).
    pub output_format: Option<Format>,
    pub block_size: u64,
    pub no_journal: bool,
    pub checksum: bool,
    pub rollback: bool,
    pub no_space_check: bool,
    pub compress_level: Option<i32>,
    pub threads: Option<usize>,
    pub stats: bool,
    pub force_share: bool,
    pub ssh: SshArgs,
    pub reporting: Reporting,
    pub output: OutputFormat,
}

pub fn run(a: Args) -> Result<u8> {
    if a.rollback {
        let [dst] = &a.paths[..] else {
            bail!("--rollback takes one argument: the destination to restore");
        };
        return rollback(&a, dst);
    }
    let [src, dst] = &a.paths[..] else {
        bail!("sync needs SRC and DST (or --rollback DST)");
    };
    let bs = a.block_size;
    if !bs.is_power_of_two() || !(u64::from(MIN_BLOCK)..=u64::from(MAX_BLOCK)).contains(&bs) {
        bail!("--block-size {bs}: must be a power of two from 4k to 16M");
    }
    let src_loc = Location::parse(src)?;
    let dst_loc = Location::parse(dst)?;
    let dst_format = dst_format(&a, &dst_loc)?;
    let workers = a.threads.unwrap_or_else(pipeline::default_workers);
    let sopts = SyncSendOptions {
        level: a.compress_level.unwrap_or(engine::remote::DEFAULT_LEVEL),
        adaptive: a.compress_level.is_none(),
        workers,
        state: Default::default(),
    };
    let cancel = interrupt_flag();
    let started = Instant::now();
    // Whether DST existed before this run (None: not known yet), and
    // whether the receiver here began to change it.
    let mut existed = None;
    let changing = Arc::new(AtomicBool::new(false));
    let report = (|| -> Result<((SyncReport, u64), Option<crate::io::Source>)> {
        Ok(match (&src_loc, &dst_loc) {
            (Location::Local(s), Location::Local(d)) => {
                let source = open_src(&a, s)?;
                let params = params(&a, source.image.content_size())?;
                refuse_same(s, d)?;
                let target = open_target(d, dst_format)?;
                existed = Some(matches!(target, Target::Existing { .. }));
                target
                    .adopt(&FileMeta::of_path(s).with_context(|| s.display().to_string())?)
                    .with_context(|| d.display().to_string())?;
                let r = local(
                    &a,
                    &source.image,
                    s,
                    d,
                    target,
                    &params,
                    &sopts,
                    &cancel,
                    &changing,
                )?;
                (r, Some(source))
            }
            (Location::Local(s), Location::Remote { host, path }) => {
                let source = open_src(&a, s)?;
                let params = params(&a, source.image.content_size())?;
                let bar = a.reporting.bar();
                let r = remote::sync_push(
                    &source.image,
                    s,
                    host,
                    path,
                    &params,
                    dst_format,
                    &sopts,
                    &a.ssh,
                    progress_of(&bar),
                    &cancel,
                );
                drop(bar);
                (r?, Some(source))
            }
            (Location::Remote { host, path }, Location::Local(d)) => {
                let key = random_key()?;
                let target = open_target(d, dst_format)?;
                existed = Some(matches!(target, Target::Existing { .. }));
                let r = remote::sync_pull(
                    host,
                    path,
                    a.format,
                    d,
                    target,
                    bs as u32,
                    key,
                    !a.no_journal,
                    !a.no_space_check,
                    a.checksum,
                    a.compress_level,
                    a.force_share,
                    workers,
                    &a.ssh,
                    &cancel,
                    changing.clone(),
                )?;
                (r, None)
            }
            _ => bail!("{src_loc} -> {dst_loc}: sync needs one local side (and no '-')"),
        })
    })();
    let report = match report {
        Ok((r, source)) => {
            // DST is complete as what was read; a SRC that changed meanwhile
            // is still an error (its own message says what DST holds).
            if let Some(source) = source {
                source_held_still(&source, &dst_loc)?;
            }
            r
        }
        Err(e) => {
            let state = match &dst_loc {
                Location::Local(d) => local_state(d, existed, !a.no_journal, &changing),
                _ => remote_state(&sopts.state, !a.no_journal),
            };
            return Err(with_state(e, &dst_loc.to_string(), state));
        }
    };
    let wire = report.1;
    print_report(
        &a,
        &src_loc,
        &dst_loc,
        &report.0,
        wire,
        started.elapsed().as_secs_f64(),
    )?;
    Ok(exit::OK)
}

/// DST's format as the user named it: `-O`, else `-f` (the format given
/// for SRC applies to DST too, as the bytes rsync users sync). sync writes
/// raw images and block devices only for now: a qcow2 DST is refused here,
/// naming the option that asked for it.
fn dst_format(a: &Args, dst: &Location) -> Result<Option<Format>> {
    match (a.output_format, a.format) {
        (Some(Format::Qcow2), _) => bail!(
            "{dst}: -O qcow2: sync writes raw images and block devices only for now (imgsync convert -O qcow2 makes a qcow2 copy)"
        ),
        (None, Some(Format::Qcow2)) => bail!(
            "{dst}: -f qcow2 names DST's format too, and sync writes raw images and block devices only for now; pass -O raw to sync the image's content into a raw DST"
        ),
        (o, f) => Ok(o.or(f)),
    }
}

fn params(a: &Args, src_size: u64) -> Result<SyncParams> {
    Ok(SyncParams {
        block_size: a.block_size as u32,
        key: random_key()?,
        src_size,
        journal: !a.no_journal,
        check_space: !a.no_space_check,
        reread: a.checksum,
    })
}

/// The session's hash key: 32 bytes from the kernel's random source.
pub fn random_key() -> Result<[u8; 32]> {
    let mut k = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut k))
        .context("/dev/urandom")?;
    Ok(k)
}

/// SRC with its chain, locked as qemu-img locks a source (or, with `-U`,
/// not in a writer's way, with a warning when one has it) and stamped.
fn open_src(a: &Args, path: &Path) -> Result<crate::io::Source> {
    let source = open_source(
        path,
        OpenOptions {
            format: a.format,
            allow_corrupt: false,
            locking: super::locking(a.force_share),
        },
    )?;
    super::warn_in_use(&source.in_use, "the copy");
    Ok(source)
}

/// After a sync that completed: SRC must be as it was opened, or the copy
/// DST now holds is of no consistent image.
fn source_held_still(source: &crate::io::Source, dst: &Location) -> Result<()> {
    source
        .watch
        .check()
        .map_err(|e| anyhow!("{e}; {}", dst_holds_the_copy(dst)))
}

/// What DST holds after a sync whose SRC changed while it was read.
pub fn dst_holds_the_copy(dst: &dyn std::fmt::Display) -> String {
    format!("{dst} holds that copy (all the data read was written, and its digest matched)")
}

fn refuse_same(src: &Path, dst: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    if let (Ok(a), Ok(b)) = (std::fs::metadata(src), std::fs::metadata(dst)) {
        if a.dev() == b.dev() && a.ino() == b.ino() {
            bail!("{}: refusing to sync an image onto itself", dst.display());
        }
    }
    Ok(())
}

/// DST as the receiver sees it: an existing raw file or block device, or
/// a new output when absent. `format` is DST's format as the user named
/// it (`None`: probed); a DST that probes as qcow2 is refused unless the
/// user named it raw (then it is a file of bytes, as rsync sees it).
pub fn open_target(dst: &Path, format: Option<Format>) -> Result<Target> {
    let name = || dst.display().to_string();
    if format == Some(Format::Qcow2) {
        bail!(
            "{}: sync writes raw images and block devices only for now, not qcow2",
            dst.display()
        );
    }
    let meta = match std::fs::metadata(dst) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Target::New(Output::create(dst).with_context(name)?));
        }
        Err(e) => return Err(anyhow!(e).context(name())),
    };
    let is_device = meta.file_type().is_block_device();
    if !is_device && !meta.is_file() {
        bail!("{}: not a regular file or block device", dst.display());
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(true);
    if is_device {
        // O_EXCL on a block device: refused while it is mounted or held
        // by another exclusive user (as convert does).
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_EXCL);
    }
    let file = open_writable(&opts, dst, &meta).map_err(|e| {
        if is_device && e.raw_os_error() == Some(libc::EBUSY) {
            anyhow!(
                "{}: the device is in use (mounted?); refusing to write to it",
                dst.display()
            )
        } else {
            anyhow!(e).context(name())
        }
    })?;
    // qemu's write locks, held while `file` is open: a running qemu's
    // image is refused, and no VM can start on DST mid-sync.
    lock::lock_for_writing(&file).with_context(name)?;
    let mut magic = [0u8; 4];
    if format.is_none()
        && std::os::unix::fs::FileExt::read_exact_at(&file, &mut magic, 0).is_ok()
        && magic == *b"QFI\xfb"
    {
        bail!(
            "{}: is a qcow2 image; sync updates raw images and block devices only for now (pass -O raw to sync SRC onto the file's bytes as a raw image; or sync into a raw copy, or convert it)",
            dst.display()
        );
    }
    let size = LocalFile::open(dst)
        .and_then(|f| f.size())
        .with_context(name)?;
    // Read through a second descriptor, unlocked: `file`'s locks cover it
    // (and its own read locks would conflict with them).
    let image = open_image(
        dst,
        OpenOptions {
            format: Some(Format::Raw),
            allow_corrupt: false,
            locking: Locking::None,
        },
    )?;
    // The identity of the file opened, not of whatever the name means by
    // the time the journal is checked.
    let id = journal::DstId::of(&file).with_context(name)?;
    if is_device {
        journal::prepare_device_dir()?;
    }
    Ok(Target::Existing {
        file,
        image,
        is_device,
        size,
        id,
        journal_path: journal::path_of(dst, &meta),
    })
}

/// Opens DST read-write. A file of ours without its owner-write bit (a
/// copy of a read-only source keeps 0444, as `rsync -a` makes it) is opened
/// as rsync --inplace does: write permission added for the open, the mode
/// put back at once (the descriptor stays writable).
fn open_writable(
    opts: &std::fs::OpenOptions,
    dst: &Path,
    meta: &std::fs::Metadata,
) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    match opts.open(dst) {
        Err(e)
            if e.kind() == std::io::ErrorKind::PermissionDenied
                && meta.is_file()
                && meta.mode() & 0o200 == 0
                && meta.uid() == rustix::process::geteuid().as_raw() =>
        {
            let mode = meta.mode() & 0o7777;
            std::fs::set_permissions(dst, std::fs::Permissions::from_mode(mode | 0o200))?;
            let opened = opts.open(dst);
            std::fs::set_permissions(dst, std::fs::Permissions::from_mode(mode))?;
            opened
        }
        r => r,
    }
}

/// Both ends local: the receiver runs on a thread, joined to the sender by
/// a socket pair (the same exchange as over SSH).
#[allow(clippy::too_many_arguments)]
fn local(
    a: &Args,
    image: &imgsync_formats::Image,
    src: &Path,
    dst: &Path,
    target: Target,
    params: &SyncParams,
    sopts: &SyncSendOptions,
    cancel: &AtomicBool,
    changing: &Arc<AtomicBool>,
) -> Result<(SyncReport, u64)> {
    let (ours, theirs) = UnixStream::pair().context("socketpair")?;
    let theirs_w = theirs.try_clone().context("socketpair")?;
    let ours_w = ours.try_clone().context("socketpair")?;
    let limits = Limits::DEFAULT;
    let ropts = SyncReceiveOptions {
        workers: sopts.workers,
        cache: Some(dst.to_path_buf()),
        changing: changing.clone(),
    };
    let bar = a.reporting.bar();
    let progress = progress_of(&bar);
    let (sent, received) = std::thread::scope(|s| {
        let receiver = s.spawn(move || {
            let mut fr = FrameReader::new(theirs, limits.max_frame);
            let mut fw = FrameWriter::new(std::io::BufWriter::with_capacity(1 << 20, theirs_w));
            let r = sync::sync_receive(target, &mut fr, &mut fw, &limits, params, &ropts, cancel);
            if let Err(e) = &r {
                // Tell the sender, which may be waiting for us.
                let _ = engine::remote::send_msg(
                    &mut fw,
                    &crate::protocol::Message::Error(e.to_string()),
                );
                let _ = fw.flush();
            }
            drop(fw);
            drop(fr);
            r
        });
        let mut fr = FrameReader::new(ours, limits.max_frame);
        let mut fw = FrameWriter::new(std::io::BufWriter::with_capacity(1 << 20, ours_w));
        let sent = sync::sync_send(
            image, &mut fr, &mut fw, &limits, params, sopts, progress, cancel,
        );
        // Unblock the receiver if the sender stopped early.
        drop(fw);
        drop(fr);
        (sent, receiver.join())
    });
    drop(bar);
    let received =
        received.map_err(|_| anyhow!("internal error: the receiving thread panicked"))?;
    let interrupted = |e: &engine::Error| matches!(e, engine::Error::Interrupted);
    if matches!(&received, Err(e) if interrupted(e)) || matches!(&sent, Err(e) if interrupted(e)) {
        // run() says what state DST is in.
        bail!("{}: interrupted", dst.display());
    }
    // Both ends are here, so the end that failed first says why in its own
    // words: the other end only saw the socket close ("the peer closed the
    // connection") or the first end's ERROR frame.
    let seen_through_socket = |e: &engine::Error| matches!(e, engine::Error::Protocol(_));
    match (sent, received) {
        (Ok(r), Ok(_)) => Ok((r, 0)),
        (Err(e), Err(r)) if seen_through_socket(&e) && !seen_through_socket(&r) => {
            Err(receiver_error(r, dst))
        }
        (Err(e), _) if !seen_through_socket(&e) => Err(engine_error(e, src, dst, None)),
        (_, Err(r)) => Err(receiver_error(r, dst)),
        (Err(e), Ok(_)) => Err(engine_error(e, src, dst, None)),
    }
}

/// What a failed or interrupted sync left DST as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DstState {
    /// DST did not exist and was not created.
    Absent,
    /// Nothing of DST changed.
    Untouched,
    /// DST is mid-sync, with its journal: resume or roll back.
    MidSync,
    /// DST may be partly updated and has no journal (--no-journal).
    Partly,
}

/// DST on this host: its journal says whether it is mid-sync; without a
/// journal, whether the receiver here had begun to change it.
fn local_state(
    dst: &Path,
    existed: Option<bool>,
    journal: bool,
    changing: &AtomicBool,
) -> DstState {
    match existed {
        None => DstState::Untouched,
        Some(false) => DstState::Absent,
        Some(true) if journal_of(dst).is_some() => DstState::MidSync,
        Some(true) if !journal && changing.load(std::sync::atomic::Ordering::Relaxed) => {
            DstState::Partly
        }
        Some(true) => DstState::Untouched,
    }
}

/// DST on the other host (push): what the receiver said before it failed.
fn remote_state(sent: &sync::SendState, journal: bool) -> DstState {
    use std::sync::atomic::Ordering::Relaxed;
    if !sent.informed.load(Relaxed) {
        return DstState::Untouched;
    }
    if !sent.exists.load(Relaxed) {
        return DstState::Absent;
    }
    if sent.resumed.load(Relaxed) || (journal && sent.ready.load(Relaxed)) {
        return DstState::MidSync;
    }
    if sent.ready.load(Relaxed) {
        return DstState::Partly;
    }
    DstState::Untouched
}

/// The one line of a failed sync: what went wrong, then what DST is now
/// and how to go on. An interruption says only that.
fn with_state(e: anyhow::Error, dst: &str, state: DstState) -> anyhow::Error {
    let words = match state {
        DstState::Absent => format!("{dst} was not created (nothing was written)"),
        DstState::Untouched => format!("{dst} is untouched"),
        DstState::MidSync => format!(
            "{dst} is mid-sync: rerun the same sync to resume it, or undo it with `imgsync sync --rollback {dst}`"
        ),
        DstState::Partly => format!(
            "{dst} is partly updated and has no journal (--no-journal): rerun the same sync to complete it"
        ),
    };
    if interrupted() {
        return anyhow!("{dst}: interrupted; {words}");
    }
    match state {
        DstState::MidSync | DstState::Partly => {
            anyhow!("{}; {words}", super::output::one_line(&e))
        }
        DstState::Absent | DstState::Untouched => e,
    }
}

/// An error of the receiving end: everything it touches is DST (it reads
/// DST's old content through the format layer, which the engine reports as
/// a source error).
fn receiver_error(e: engine::Error, dst: &Path) -> anyhow::Error {
    engine_error(e, dst, dst, None)
}

/// The journal of an interrupted sync of `dst`, if there is one (whatever
/// name `dst` gives the image).
pub fn journal_of(dst: &Path) -> Option<std::path::PathBuf> {
    match journal_state(dst) {
        Some((j, journal::JournalState::InProgress)) => Some(j),
        _ => None,
    }
}

/// The journal at `dst`'s journal name and what it says about `dst`
/// (`None`: DST cannot be opened).
pub fn journal_state(dst: &Path) -> Option<(std::path::PathBuf, journal::JournalState)> {
    let file = std::fs::File::open(dst).ok()?;
    let meta = file.metadata().ok()?;
    let id = journal::DstId::of(&file).ok()?;
    let j = journal::path_of(dst, &meta);
    let state = journal::state(&j, &id);
    Some((j, state))
}

fn rollback(a: &Args, dst: &OsString) -> Result<u8> {
    match Location::parse(dst)? {
        Location::Local(p) if a.reporting.quiet => rollback_to(&mut std::io::sink(), &p),
        Location::Local(p) => rollback_to(&mut super::output::stdout(), &p),
        Location::Remote { host, path } => remote::query(
            &host,
            &path,
            crate::protocol::msg::QueryCommand::Rollback,
            None,
            OutputFormat::Human,
            false,
            &a.ssh,
        ),
        Location::Stdio => bail!("-: --rollback needs the destination image"),
    }
}

/// `--rollback` of a local DST; says what it did on `out`.
pub fn rollback_to(out: &mut dyn std::io::Write, dst: &Path) -> Result<u8> {
    let meta = std::fs::metadata(dst).with_context(|| dst.display().to_string())?;
    if meta.file_type().is_block_device() {
        journal::prepare_device_dir()?;
    }
    let jpath = journal::path_of(dst, &meta);
    if jpath.symlink_metadata().is_err() {
        bail!(
            "{}: no interrupted sync to roll back ({} not found)",
            dst.display(),
            jpath.display()
        );
    }
    let r = journal::rollback(dst, &jpath)
        .map_err(|e| anyhow!(e).context(dst.display().to_string()))?;
    writeln!(
        out,
        "{}: rolled back to the image before the sync ({} blocks restored)",
        dst.display(),
        r.entries
    )?;
    Ok(exit::OK)
}

fn print_report(
    a: &Args,
    src: &Location,
    dst: &Location,
    r: &SyncReport,
    wire: u64,
    seconds: f64,
) -> Result<()> {
    use std::io::Write;
    let mut out = super::output::stdout();
    if a.output == OutputFormat::Json {
        let v = serde_json::json!({
            "source": src.to_string(),
            "destination": dst.to_string(),
            "virtual-size": r.src_size,
            "destination-existed": r.dst_existed,
            "resumed": r.resumed,
            "destination-hashes": if r.dst_cached { "cache" } else if r.dst_existed { "read" } else { "none" },
            "bytes-read": r.bytes_read,
            "blocks-compared": r.blocks_compared,
            "blocks-sent": r.blocks_sent,
            "blocks-written": r.done.blocks_written,
            "holes-punched": r.blocks_punched,
            "data-sent": r.data_sent,
            "wire-bytes": wire,
            "journal-bytes": r.done.journal_bytes,
            "seconds": seconds,
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else if a.stats {
        if r.resumed {
            writeln!(
                out,
                "resumed:         yes (an interrupted sync of {dst} was completed)"
            )?;
        }
        writeln!(out, "blocks compared: {}", r.blocks_compared)?;
        writeln!(
            out,
            "blocks sent:     {} ({})",
            r.blocks_sent,
            human_size(r.data_sent)
        )?;
        writeln!(out, "holes punched:   {}", r.blocks_punched)?;
        writeln!(out, "data read:       {}", human_size(r.bytes_read))?;
        if r.dst_existed {
            writeln!(
                out,
                "DST hashes:      {}",
                if r.dst_cached {
                    "from the last sync's cache (DST not read)"
                } else {
                    "read from DST"
                }
            )?;
        }
        writeln!(out, "on the wire:     {} ({wire} bytes)", human_size(wire))?;
        writeln!(out, "time:            {seconds:.2} s")?;
    } else if r.resumed && !a.reporting.quiet {
        // A run that finished what an interrupted one left is worth a
        // word even when a plain sync prints nothing.
        writeln!(
            out,
            "{dst}: resumed the interrupted sync; it is complete now"
        )?;
    }
    Ok(())
}
