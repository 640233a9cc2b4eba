//! `imgsync convert`: SRC (with its backing chain, flattened) into a new
//! raw or QCOW2 image at DST, appearing only when complete.

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use imgsync_formats::qcow2::CompressionType;
use imgsync_formats::Format;

use super::location::Location;
use super::progress::{interrupt_flag, progress_of, Reporting};
use super::remote::{self, SshArgs};
use super::{exit, OutputFormat};
use crate::engine;
use crate::engine::convert::{self, ConvertOptions};
use crate::io::{open_source, FileMeta, OpenOptions, Output, Source};

/// Largest `-S` accepted (qemu-img's limit).
const MAX_MIN_SPARSE: u64 = 16 << 20;

pub struct Args {
    pub src: OsString,
    pub dst: OsString,
    pub format: Option<Format>,
    pub output_format: Option<Format>,
    pub compress: bool,
    pub compression_type: CompressionType,
    pub min_sparse: u64,
    pub cluster_size: u64,
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

pub fn run(a: Args) -> Result<u8> {
    if a.min_sparse % 512 != 0 || a.min_sparse > MAX_MIN_SPARSE {
        bail!(
            "-S {}: the size must be 0 or a multiple of 512 up to 16 MiB",
            a.min_sparse
        );
    }
    if !a.cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&a.cluster_size) {
        bail!(
            "--cluster-size {}: must be a power of two from 512 to 2M",
            a.cluster_size
        );
    }
    let src = Location::parse(&a.src)?;
    let dst = Location::parse(&a.dst)?;
    match (&src, &dst) {
        (Location::Local(s), Location::Local(d)) => run_local(&a, s, d),
        (Location::Local(s), Location::Remote { host, path }) => {
            remote::push(&a, open_src(&a, s)?, s, host, path)
        }
        (Location::Remote { host, path }, Location::Local(d)) => remote::pull(&a, host, path, d),
        (Location::Local(s), Location::Stdio) => remote::to_stdout(&a, open_src(&a, s)?, s),
        (Location::Stdio, Location::Local(d)) => remote::from_stdin(&a, d),
        _ => bail!(
            "{} -> {}: one side must be a local file (remote to remote and stream to stream are not supported)",
            src,
            dst
        ),
    }
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

fn run_local(a: &Args, src: &Path, dst: &Path) -> Result<u8> {
    let source = open_src(a, src)?;
    let (image, files) = (&source.image, &source.files);
    let output_format = a.output_format.unwrap_or(image.format());
    if a.compress && output_format != Format::Qcow2 {
        bail!("-c (compression) needs qcow2 output (-O qcow2)");
    }
    refuse_overwriting_source(dst, files)?;

    let opts = ConvertOptions {
        output_format,
        min_sparse: a.min_sparse,
        compression: a.compress.then_some(a.compression_type),
        cluster_bits: a.cluster_size.trailing_zeros(),
        target_is_zero: a.target_is_zero,
        check_space: !a.no_space_check,
        workers: a
            .threads
            .unwrap_or_else(crate::engine::pipeline::default_workers),
    };
    convert::check_options(image, &opts).map_err(|e| engine_error(e, src, dst, None))?;
    let cancel = interrupt_flag();
    let out = Output::create(dst).with_context(|| dst.display().to_string())?;
    out.adopt(&FileMeta::of_path(src).with_context(|| src.display().to_string())?)
        .with_context(|| dst.display().to_string())?;
    let bar = a.reporting.bar();
    let progress = progress_of(&bar);
    let result = convert::convert(image, &out, &opts, progress, &cancel);
    drop(bar);
    let report = match result {
        Ok(r) => r,
        // `out` is dropped on return: nothing appears under DST.
        Err(e) => return Err(engine_error(e, src, dst, None)),
    };
    if cancel.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(engine_error(engine::Error::Interrupted, src, dst, None));
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
    if a.output == OutputFormat::Json {
        use std::io::Write;
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
            "seconds": report.elapsed.as_secs_f64(),
        });
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    }
    Ok(exit::OK)
}

/// Names the file an engine error belongs to.
pub fn engine_error(
    e: engine::Error,
    src: &Path,
    dst: &Path,
    other: Option<&Path>,
) -> anyhow::Error {
    let src = src.display();
    let dst = dst.display();
    match e {
        engine::Error::Source(e) => anyhow!(e).context(src.to_string()),
        engine::Error::Other(e) => {
            anyhow!(e).context(other.map_or(dst.to_string(), |p| p.display().to_string()))
        }
        engine::Error::Dest(e) => anyhow!(e).context(dst.to_string()),
        engine::Error::DestFormat(e) => anyhow!(e).context(dst.to_string()),
        e @ engine::Error::NoSpace { .. } => {
            anyhow!("{dst}: {e} (nothing was written; --no-space-check skips this check)")
        }
        e @ engine::Error::DeviceTooSmall { .. } => anyhow!("{dst}: {e}"),
        engine::Error::Interrupted => anyhow!("{dst}: interrupted; nothing was written"),
        e @ engine::Error::Internal(_) => anyhow!("{src}: {e}"),
        // Names the file of the chain that changed.
        e @ engine::Error::SourceChanged(_) => anyhow!(e),
        engine::Error::Protocol(e) => anyhow!(e),
    }
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
