//! `imgsync convert`: SRC (with its backing chain, flattened) into a new
//! raw or QCOW2 image at DST, appearing only when complete. DST or SRC may
//! be on a host (the session's push and pull) or `-` (a one-way stream on
//! stdout or stdin).

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use imgsync_formats::qcow2::CompressionType;
use imgsync_formats::Format;

use super::location::Location;
use super::output::human_size;
use super::progress::{interrupt_flag, Reporter, Reporting};
use super::ssh::SshArgs;
use super::{exit, OutputFormat};
use crate::engine;
use crate::engine::convert;
use crate::io::{open_source, FileMeta, OpenOptions, Output, Source};
use crate::session::{self, named, Client, TransferOptions, TransferReport};

/// Largest `-S` accepted (qemu-img's limit).
const MAX_MIN_SPARSE: u64 = 16 << 20;

pub struct Args {
    pub src: OsString,
    pub dst: OsString,
    pub format: Option<Format>,
    pub output_format: Option<Format>,
    pub compress: bool,
    /// `--compression-type` (None: zstd, or what -o says).
    pub compression_type: Option<CompressionType>,
    pub min_sparse: u64,
    /// `--cluster-size` (None: 64k, or what -o says).
    pub cluster_size: Option<u64>,
    /// `-o` lists, qemu-img's names.
    pub options: Vec<String>,
    pub target_is_zero: bool,
    pub no_space_check: bool,
    pub threads: Option<usize>,
    pub compress_level: Option<i32>,
    pub stats: bool,
    pub force_share: bool,
    pub ssh: SshArgs,
    pub reporting: Reporting,
    pub output: OutputFormat,
}

/// The output options in force: -o (qemu-img's names) with the long
/// options, each given once.
struct OutputOptions {
    cluster_size: u64,
    compression_type: CompressionType,
}

/// Default QCOW2 cluster size (qemu's).
const DEFAULT_CLUSTER_SIZE: u64 = 64 << 10;

/// `-o cluster_size=2M,compression_type=zlib`: the options imgsync has, by
/// qemu-img's names; any other is refused by name.
fn output_options(a: &Args) -> Result<OutputOptions> {
    let mut cluster_size = a.cluster_size;
    let mut compression_type = a.compression_type;
    for list in &a.options {
        for item in list.split(',').filter(|i| !i.is_empty()) {
            let (key, value) = item.split_once('=').unwrap_or((item, ""));
            match key {
                "cluster_size" => {
                    if cluster_size.is_some() {
                        bail!("-o cluster_size: the cluster size is given twice");
                    }
                    cluster_size = Some(
                        super::size::parse_size(value)
                            .map_err(|e| anyhow::anyhow!("-o cluster_size: {e}"))?,
                    );
                }
                "compression_type" => {
                    if compression_type.is_some() {
                        bail!("-o compression_type: the compression type is given twice");
                    }
                    compression_type = Some(match value {
                        "zstd" => CompressionType::Zstd,
                        "zlib" => CompressionType::Zlib,
                        v => bail!("-o compression_type: '{v}' is not zstd or zlib"),
                    });
                }
                k => bail!(
                    "-o {k}: not an option imgsync takes (it takes cluster_size and compression_type)"
                ),
            }
        }
    }
    Ok(OutputOptions {
        cluster_size: cluster_size.unwrap_or(DEFAULT_CLUSTER_SIZE),
        compression_type: compression_type.unwrap_or(CompressionType::Zstd),
    })
}

pub fn run(mut a: Args) -> Result<u8> {
    let o = output_options(&a)?;
    a.cluster_size = Some(o.cluster_size);
    a.compression_type = Some(o.compression_type);
    run_resolved(a)
}

fn run_resolved(a: Args) -> Result<u8> {
    let cluster_size = a.cluster_size.unwrap_or(DEFAULT_CLUSTER_SIZE);
    if a.min_sparse % 512 != 0 || a.min_sparse > MAX_MIN_SPARSE {
        bail!(
            "-S {}: the size must be 0 or a multiple of 512 up to 16 MiB",
            a.min_sparse
        );
    }
    if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
        bail!("--cluster-size {cluster_size}: must be a power of two from 512 to 2M");
    }
    let src = Location::parse(&a.src)?;
    let dst = Location::parse(&a.dst)?;
    // From here on SIGUSR1 prints a progress line.
    let progress = a.reporting.reporter()?;
    let report = match (&src, &dst) {
        (Location::Local(s), Location::Local(d)) => return run_local(&a, s, d, &progress),
        (Location::Local(s), Location::Remote { host, path }) => {
            let source = open_src(&a, s)?;
            // Options DST cannot take are refused before connecting.
            let opts = transfer_options(&a).convert_options(source.image.format())?;
            convert::check_options(&source.image, &opts).map_err(|e| {
                named(e, s, Path::new(&dst_name(&dst)), None)
            })?;
            let client = Client::connect(host, &a.ssh.options_for(a.reporting.quiet))?;
            client.push(&source, s, path, &transfer_options(&a), &progress)?
        }
        (Location::Remote { host, path }, Location::Local(d)) => {
            let opts = transfer_options(&a);
            // The options must suit some output format before connecting.
            opts.convert_options(a.output_format.unwrap_or(Format::Raw))
                .or_else(|_| opts.convert_options(Format::Qcow2))?;
            let client = Client::connect(host, &a.ssh.options_for(a.reporting.quiet))?;
            client.pull(path, d, &opts, &progress)?
        }
        (Location::Local(s), Location::Stdio) => return to_stdout(&a, s, &progress),
        (Location::Stdio, Location::Local(d)) => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                bail!("-: stdin is a terminal, not an imgsync stream");
            }
            session::stream::receive_stream(
                stdin,
                d,
                &transfer_options(&a),
                &progress,
                &interrupt_flag(),
            )?
        }
        _ => bail!(
            "{} -> {}: one side must be a local file (remote to remote and stream to stream are not supported)",
            src,
            dst
        ),
    };
    progress.done();
    drop(progress);
    print_stats(&a, &src.to_string(), &dst_name(&dst), &report)?;
    Ok(exit::OK)
}

/// DST as transfer reports name it (`ssh://host:port/path` with a port).
fn dst_name(dst: &Location) -> String {
    dst.to_string()
}

fn transfer_options(a: &Args) -> TransferOptions {
    TransferOptions {
        src_format: a.format,
        output_format: a.output_format,
        compression: a
            .compress
            .then_some(a.compression_type.unwrap_or(CompressionType::Zstd)),
        min_sparse: a.min_sparse,
        cluster_bits: a
            .cluster_size
            .unwrap_or(DEFAULT_CLUSTER_SIZE)
            .trailing_zeros(),
        target_is_zero: a.target_is_zero,
        check_space: !a.no_space_check,
        workers: a
            .threads
            .unwrap_or_else(crate::engine::pipeline::default_workers),
        level: a.compress_level,
        force_share: a.force_share,
    }
}

/// Local SRC as a one-way protocol stream on stdout (`convert SRC -`).
fn to_stdout(a: &Args, src: &Path, progress: &Reporter) -> Result<u8> {
    let stdout = std::io::stdout();
    if stdout.is_terminal() {
        bail!("-: refusing to write an imgsync stream to a terminal (pipe it into `imgsync convert - DST`)");
    }
    let source = open_src(a, src)?;
    session::stream::send_stream(
        &source,
        src,
        stdout,
        &transfer_options(a),
        progress,
        &interrupt_flag(),
    )?;
    progress.done();
    Ok(exit::OK)
}

/// `--stats` and `--output json` of a transfer with a remote or `-` end.
fn print_stats(a: &Args, src: &str, dst: &str, s: &TransferReport) -> Result<()> {
    let ratio = if s.wire_bytes > 0 {
        s.data_sent as f64 / s.wire_bytes as f64
    } else {
        0.0
    };
    let rate = s.bytes_read as f64 / s.seconds.max(1e-9);
    let mut out = super::output::stdout();
    if a.output == OutputFormat::Json {
        let v = serde_json::json!({
            "source": src,
            "destination": dst,
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
            "seconds": super::output::seconds_f64(s.seconds),
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

/// SRC with its chain, locked as qemu-img locks a source (or not, with
/// `-U`, warning when a writer has it) and stamped.
fn open_src(a: &Args, src: &Path) -> Result<Source> {
    let source = open_source(
        src,
        OpenOptions {
            format: a.format,
            allow_corrupt: false,
            locking: super::locking(a.force_share),
        },
    )?;
    super::warn_in_use(&source.in_use, "the copy");
    Ok(source)
}

fn run_local(a: &Args, src: &Path, dst: &Path, progress: &Reporter) -> Result<u8> {
    let source = open_src(a, src)?;
    let (image, files) = (&source.image, &source.files);
    let opts = transfer_options(a).convert_options(image.format())?;
    let output_format = opts.output_format;
    refuse_overwriting_source(dst, files)?;
    convert::check_options(image, &opts).map_err(|e| named(e, src, dst, None))?;
    let cancel = interrupt_flag();
    let out = Output::create(dst).with_context(|| dst.display().to_string())?;
    out.adopt(&FileMeta::of_path(src).with_context(|| src.display().to_string())?)
        .with_context(|| dst.display().to_string())?;
    let result = convert::convert(image, &out, &opts, progress, &cancel);
    let report = match result {
        Ok(r) => r,
        // `out` is dropped on return: nothing appears under DST.
        Err(e) => return Err(named(e, src, dst, None).into()),
    };
    if cancel.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(named(engine::Error::Interrupted, src, dst, None).into());
    }
    if let Err(e) = source.watch.check() {
        // A file output is dropped unlinked; a device was written in place.
        if out.is_block_device() {
            bail!(
                "{e}; {} was written but holds no consistent image either",
                dst.display()
            );
        }
        return Err(e.into());
    }
    out.commit()
        .with_context(|| format!("{}: completing the output", dst.display()))?;
    progress.done();
    if a.output == OutputFormat::Json {
        let mut out = super::output::stdout();
        let v = serde_json::json!({
            "source": src.display().to_string(),
            "destination": dst.display().to_string(),
            "format": output_format.name(),
            "virtual-size": report.virtual_size,
            "bytes-read": report.bytes_read,
            "zero-bytes": report.zero_bytes,
            "bytes-written": report.bytes_written,
            "compressed-clusters": report.clusters_compressed,
            "seconds": super::output::seconds(report.elapsed),
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    }
    Ok(exit::OK)
}

/// Refuses a DST that is SRC or any file SRC reads (backing files, data
/// files), by inode, so links and other spellings are caught too.
fn refuse_overwriting_source(dst: &Path, files: &[PathBuf]) -> Result<()> {
    let Ok(d) = std::fs::metadata(dst) else {
        return Ok(());
    };
    for f in files {
        if let Ok(m) = std::fs::metadata(f) {
            let same = if d.file_type().is_file() {
                m.dev() == d.dev() && m.ino() == d.ino()
            } else {
                // Block devices: the same device node or device number.
                (m.dev() == d.dev() && m.ino() == d.ino())
                    || (m.rdev() != 0 && m.rdev() == d.rdev())
            };
            if same {
                bail!(
                    "{}: refusing to overwrite {} (the source reads it)",
                    dst.display(),
                    f.display()
                );
            }
        }
    }
    Ok(())
}
