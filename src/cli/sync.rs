//! `imgsync sync SRC DST`: make DST (a raw file or block device, local or
//! remote) identical to SRC in place, sending only the blocks that differ,
//! with an undo journal; `imgsync sync --rollback DST` undoes an
//! interrupted sync.

use std::ffi::OsString;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Result};
use imgsync_formats::Format;

use super::location::Location;
use super::output::human_size;
use super::progress::{interrupt_flag, Reporting};
use super::ssh::SshArgs;
use super::{exit, OutputFormat};
use crate::engine::pipeline;
use crate::engine::sync::{SyncReport, MAX_BLOCK, MIN_BLOCK};
use crate::io::{open_source, OpenOptions};
use crate::session::{self, Client, LocalSync, SyncOptions};

pub struct Args {
    pub paths: Vec<OsString>,
    pub format: Option<Format>,
    /// `-O`: DST's format (an existing DST: else `-f`'s, else probed; a
    /// new one: else SRC's).
    pub output_format: Option<Format>,
    pub compress: bool,
    pub compression_type: imgsync_formats::qcow2::CompressionType,
    pub cluster_size: u64,
    /// `None`: the receiver's choice (a qcow2 DST's cluster size, else
    /// 64 KiB).
    pub block_size: Option<u64>,
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
    if let Some(bs) = a.block_size {
        if !bs.is_power_of_two() || !(u64::from(MIN_BLOCK)..=u64::from(MAX_BLOCK)).contains(&bs) {
            bail!("--block-size {bs}: must be a power of two from 4k to 16M");
        }
    }
    let src_loc = Location::parse(src)?;
    let dst_loc = Location::parse(dst)?;
    let dst_format = dst_format(&a, &dst_loc)?;
    let workers = a.threads.unwrap_or_else(pipeline::default_workers);
    let opts = SyncOptions {
        src_format: a.format,
        dst_format,
        new_format: a.output_format,
        compression: a.compress.then_some(a.compression_type),
        cluster_bits: a.cluster_size.trailing_zeros(),
        warn: Some(std::sync::Arc::new(|w: &str| {
            super::output::eprint_line(&format!("imgsync: {w}"))
        })),
        block_size: a.block_size.map(|b| b as u32),
        journal: !a.no_journal,
        check_space: !a.no_space_check,
        reread: a.checksum,
        level: a.compress_level,
        force_share: a.force_share,
        workers,
    };
    let cancel = interrupt_flag();
    // From here on SIGUSR1 prints a progress line.
    let progress = a.reporting.reporter()?;
    let started = Instant::now();
    let report = match (&src_loc, &dst_loc) {
        (Location::Local(s), Location::Local(d)) => {
            let source = open_src(&a, s)?;
            refuse_compress(&a, &source)?;
            let sync = LocalSync {
                source: &source,
                src: s,
                dst: d,
                opts,
            };
            session::sync_local(&sync, &progress, &cancel)?
        }
        (Location::Local(s), Location::Remote { host, path }) => {
            let source = open_src(&a, s)?;
            refuse_compress(&a, &source)?;
            let client = Client::connect(host, &a.ssh.options_for(a.reporting.quiet))?;
            client.sync_push(&source, s, path, &opts, &progress)?
        }
        (Location::Remote { host, path }, Location::Local(d)) => {
            let target = session::open_target(d, dst_format)?;
            let client = Client::connect(host, &a.ssh.options_for(a.reporting.quiet))?;
            client.sync_pull(path, d, target, &opts, &progress)?
        }
        _ => bail!("{src_loc} -> {dst_loc}: sync needs one local side (and no '-')"),
    };
    progress.done();
    drop(progress);
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

/// An existing DST's format as the user named it: `-O`, else `-f` (the
/// format given for SRC applies to DST too, as the bytes rsync users sync).
/// A qcow2 one is refused where DST is opened: existing qcow2 DSTs are not
/// updated yet.
fn dst_format(a: &Args, _dst: &Location) -> Result<Option<Format>> {
    if a.compress && a.output_format == Some(Format::Raw) {
        bail!("-c (compression) needs a qcow2 DST, not -O raw");
    }
    if !a.cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&a.cluster_size) {
        bail!(
            "--cluster-size {}: must be a power of two from 512 to 2M",
            a.cluster_size
        );
    }
    Ok(a.output_format.or(a.format))
}

/// `-c` makes a new DST's qcow2 clusters compressed: it needs one.
fn refuse_compress(a: &Args, source: &crate::io::Source) -> Result<()> {
    if a.compress && a.output_format.unwrap_or(source.image.format()) != Format::Qcow2 {
        bail!("-c (compression) needs a qcow2 DST: SRC is raw, pass -O qcow2");
    }
    Ok(())
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

fn rollback(a: &Args, dst: &OsString) -> Result<u8> {
    let mut out: Box<dyn std::io::Write> = if a.reporting.quiet {
        Box::new(std::io::sink())
    } else {
        Box::new(super::output::stdout())
    };
    Ok(match Location::parse(dst)? {
        Location::Local(p) => session::rollback_to(&mut out, &p)?,
        Location::Remote { host, path } => {
            Client::connect(&host, &a.ssh.options_for(a.reporting.quiet))?
                .rollback(&path, &mut out)?
        }
        Location::Stdio => bail!("-: --rollback needs the destination image"),
    })
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
        let mut v = serde_json::json!({
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
            "seconds": super::output::seconds_f64(seconds),
        });
        // A qcow2 DST updated in place: what happened to its allocation.
        if let (Some(q), Some(m)) = (r.done.qcow2, v.as_object_mut()) {
            m.insert("clusters-allocated".into(), q.clusters_allocated.into());
            m.insert("clusters-freed".into(), q.clusters_freed.into());
            m.insert(
                "metadata-bytes-written".into(),
                q.metadata_bytes_written.into(),
            );
        }
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
        if let Some(q) = r.done.qcow2 {
            writeln!(
                out,
                "qcow2 clusters:  {} allocated, {} freed; {} of metadata written",
                q.clusters_allocated,
                q.clusters_freed,
                human_size(q.metadata_bytes_written)
            )?;
        }
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
