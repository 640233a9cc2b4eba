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
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use imgsync_formats::{Format, Storage};

use super::convert::engine_error;
use super::location::Location;
use super::output::human_size;
use super::progress::{interrupt_flag, progress_of, Reporting};
use super::remote::{self, SshArgs};
use super::{exit, OutputFormat};
use crate::engine::sync::{
    self, SyncReceiveOptions, SyncReport, SyncSendOptions, Target, MAX_BLOCK, MIN_BLOCK,
};
use crate::engine::{self, pipeline};
use crate::io::{journal, open_image, FileMeta, LocalFile, OpenOptions, Output};
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
    };
    let cancel = interrupt_flag();
    let started = Instant::now();
    let report = match (&src_loc, &dst_loc) {
        (Location::Local(s), Location::Local(d)) => {
            let image = open_src(s, a.format)?;
            let params = params(&a, image.content_size())?;
            refuse_same(s, d)?;
            let target = open_target(d, dst_format)?;
            target
                .adopt(&FileMeta::of_path(s).with_context(|| s.display().to_string())?)
                .with_context(|| d.display().to_string())?;
            local(&a, &image, s, d, target, &params, &sopts, &cancel)?
        }
        (Location::Local(s), Location::Remote { host, path }) => {
            let image = open_src(s, a.format)?;
            let params = params(&a, image.content_size())?;
            let bar = a.reporting.bar();
            let r = remote::sync_push(
                &image,
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
            r?
        }
        (Location::Remote { host, path }, Location::Local(d)) => {
            let key = random_key()?;
            let target = open_target(d, dst_format)?;
            remote::sync_pull(
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
                workers,
                &a.ssh,
                &cancel,
            )?
        }
        _ => bail!("{src_loc} -> {dst_loc}: sync needs one local side (and no '-')"),
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

fn open_src(path: &Path, format: Option<Format>) -> Result<imgsync_formats::Image> {
    Ok(open_image(
        path,
        OpenOptions {
            format,
            allow_corrupt: false,
        },
    )?)
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
    let file = opts.open(dst).map_err(|e| {
        if is_device && e.raw_os_error() == Some(libc::EBUSY) {
            anyhow!(
                "{}: the device is in use (mounted?); refusing to write to it",
                dst.display()
            )
        } else {
            anyhow!(e).context(name())
        }
    })?;
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
    let image = open_src(dst, Some(Format::Raw))?;
    Ok(Target::Existing {
        file,
        image,
        is_device,
        size,
        journal_path: sync::journal_path(dst, is_device),
    })
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
) -> Result<(SyncReport, u64)> {
    let (ours, theirs) = UnixStream::pair().context("socketpair")?;
    let theirs_w = theirs.try_clone().context("socketpair")?;
    let ours_w = ours.try_clone().context("socketpair")?;
    let limits = Limits::DEFAULT;
    let ropts = SyncReceiveOptions {
        workers: sopts.workers,
        cache: Some(dst.to_path_buf()),
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
        bail!(
            "{}: interrupted; rerun the sync to resume it, or roll it back with imgsync sync --rollback",
            dst.display()
        );
    }
    match (sent, received) {
        (Ok(r), Ok(_)) => Ok((r, 0)),
        // The receiver's own error says more than the sender's view of it.
        (_, Err(e)) => Err(engine_error(e, src, dst, None)),
        (Err(e), Ok(_)) => Err(engine_error(e, src, dst, None)),
    }
}

/// The journal of an interrupted sync of `dst`, if there is one.
pub fn journal_of(dst: &Path) -> Option<std::path::PathBuf> {
    let is_device = std::fs::metadata(dst)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    let j = sync::journal_path(dst, is_device);
    j.symlink_metadata().is_ok().then_some(j)
}

fn rollback(a: &Args, dst: &OsString) -> Result<u8> {
    match Location::parse(dst)? {
        Location::Local(p) if a.reporting.quiet => rollback_to(&mut std::io::sink(), &p),
        Location::Local(p) => rollback_to(&mut std::io::stdout(), &p),
        Location::Remote { host, path } => remote::query(
            &host,
            &path,
            crate::protocol::msg::QueryCommand::Rollback,
            None,
            OutputFormat::Human,
            &a.ssh,
        ),
        Location::Stdio => bail!("-: --rollback needs the destination image"),
    }
}

/// `--rollback` of a local DST; says what it did on `out`.
pub fn rollback_to(out: &mut dyn std::io::Write, dst: &Path) -> Result<u8> {
    let is_device = std::fs::metadata(dst)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    let jpath = sync::journal_path(dst, is_device);
    if !jpath.exists() {
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
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if a.stats {
        println!("blocks compared: {}", r.blocks_compared);
        println!(
            "blocks sent:     {} ({})",
            r.blocks_sent,
            human_size(r.data_sent)
        );
        println!("holes punched:   {}", r.blocks_punched);
        println!("data read:       {}", human_size(r.bytes_read));
        if r.dst_existed {
            println!(
                "DST hashes:      {}",
                if r.dst_cached {
                    "from the last sync's cache (DST not read)"
                } else {
                    "read from DST"
                }
            );
        }
        println!("on the wire:     {} ({wire} bytes)", human_size(wire));
        println!("time:            {seconds:.2} s");
    }
    Ok(())
}
