//! convert: one image into a new raw or QCOW2 image, through the pipeline.
//! The caller opens the source (with its chain, so the output is what the
//! guest sees) and the output; this module plans, checks space and runs.

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use imgsync_formats::qcow2::writer::WriterOptions;
use imgsync_formats::qcow2::CompressionType;
use imgsync_formats::{Format, Image};

use super::pipeline::{self, ImageSource, PipelineOptions, Source};
use super::plan::{self, DataSummary};
use super::sink::{Qcow2Encoder, Qcow2Sink, RawSink, RawWriter};
use super::{Error, Progress, Result};
use crate::io::Output;

/// Jobs are cells of this size (or one cluster when clusters are larger):
/// big enough for few, large writes, small enough that a few per thread
/// keep memory low.
pub const CHUNK_BYTES: u64 = 2 << 20;

/// A file system allocates in blocks; a data extent can touch a partial
/// block at each end. Used to bound a raw output's allocation.
const FS_BLOCK: u64 = 4096;

#[derive(Clone, Copy, Debug)]
pub struct ConvertOptions {
    pub output_format: Format,
    /// `-S`: zero runs of at least this many bytes become holes; 0 keeps
    /// every allocated byte.
    pub min_sparse: u64,
    /// `-c`: compress QCOW2 clusters with this method.
    pub compression: Option<CompressionType>,
    /// QCOW2 output cluster size, log2.
    pub cluster_bits: u32,
    /// `--target-is-zero`: a block device target already reads zeros, so
    /// ranges without data are not zeroed.
    pub target_is_zero: bool,
    /// Check the destination's free space before writing.
    pub check_space: bool,
    pub workers: usize,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            output_format: Format::Raw,
            min_sparse: 4096,
            compression: None,
            cluster_bits: 16,
            target_is_zero: false,
            check_space: true,
            workers: pipeline::default_workers(),
        }
    }
}

/// What a convert did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Report {
    pub virtual_size: u64,
    /// Source data (allocated) bytes, all read.
    pub bytes_read: u64,
    /// Of those, bytes that were zeros and became holes.
    pub zero_bytes: u64,
    /// Guest data bytes written (raw) or the QCOW2 file's length.
    pub bytes_written: u64,
    /// QCOW2: clusters stored compressed.
    pub clusters_compressed: u64,
    pub elapsed: Duration,
}

/// Space the output needs at most, for the free space check.
pub fn space_needed(summary: &DataSummary, opts: &ConvertOptions) -> Result<u64> {
    Ok(match opts.output_format {
        Format::Raw => summary.data_bytes + summary.data_extents * 2 * FS_BLOCK,
        Format::Qcow2 => {
            writer_options(summary.virtual_size, opts)?.max_file_size(summary.data_units)
        }
    })
}

/// Refuses options the output cannot be made with (a QCOW2 L1 table over
/// qemu's limit, say), before the caller creates the output.
pub fn check_options(image: &Image, opts: &ConvertOptions) -> Result<()> {
    check_size_options(image.virtual_size(), opts)
}

/// [`check_options`] for an image of `virtual_size` bytes.
pub fn check_size_options(virtual_size: u64, opts: &ConvertOptions) -> Result<()> {
    if let Format::Qcow2 = opts.output_format {
        writer_options(virtual_size, opts)?;
    }
    Ok(())
}

fn writer_options(virtual_size: u64, opts: &ConvertOptions) -> Result<WriterOptions> {
    let w = WriterOptions {
        virtual_size,
        cluster_bits: opts.cluster_bits,
        compression_type: opts.compression.unwrap_or(CompressionType::Zlib),
    };
    w.validate().map_err(Error::DestFormat)?;
    Ok(w)
}

/// Converts `image` into `out` (not committed: the caller commits on
/// success and drops on failure, which removes the output).
pub fn convert(
    image: &Image,
    out: &Output,
    opts: &ConvertOptions,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<Report> {
    let started = Instant::now();
    check_options(image, opts)?;
    let summary = plan::summarize(image, output_unit(opts))?;
    check_room(&summary, out, opts)?;
    let source = ImageSource {
        image,
        min_sparse: opts.min_sparse,
    };
    let jobs = plan::jobs(image, grid(opts));
    let mut report = write_output(&source, jobs, &summary, out, opts, progress, cancel)?;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// The allocation unit of the output: a QCOW2 cluster, or a byte.
pub fn output_unit(opts: &ConvertOptions) -> u64 {
    match opts.output_format {
        Format::Raw => 1,
        Format::Qcow2 => 1u64 << opts.cluster_bits,
    }
}

/// The job grid: 2 MiB cells, or one cluster when clusters are larger. A
/// zero run never spans two cells, so cells are at least -S long (at most
/// 16 MiB) for a long -S to find its runs.
pub fn grid(opts: &ConvertOptions) -> u64 {
    CHUNK_BYTES
        .max(1u64 << opts.cluster_bits)
        .max(opts.min_sparse.next_power_of_two())
}

/// Room: a block device must hold the whole image; a file system must
/// have room for the data (the virtual size does not matter).
pub fn check_room(summary: &DataSummary, out: &Output, opts: &ConvertOptions) -> Result<()> {
    let need = space_needed(summary, opts)?;
    if let Some(device) = out.device_size() {
        let need = match opts.output_format {
            Format::Raw => summary.virtual_size,
            Format::Qcow2 => need,
        };
        if need > device {
            return Err(Error::DeviceTooSmall { need, device });
        }
    } else if opts.check_space {
        let free = out.free_space().map_err(Error::Dest)?;
        if need > free {
            return Err(Error::NoSpace { need, free });
        }
    }
    Ok(())
}

/// Writes the chunks `source` makes of `jobs` into `out` as a raw or QCOW2
/// image of `summary.virtual_size` bytes (convert, and the receiving end
/// of a transfer).
pub fn write_output<Src, J>(
    source: &Src,
    jobs: J,
    summary: &DataSummary,
    out: &Output,
    opts: &ConvertOptions,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<Report>
where
    Src: Source,
    J: Iterator<Item = Result<Src::Job>> + Send,
{
    let started = Instant::now();
    let virtual_size = summary.virtual_size;
    let cluster_size = 1u64 << opts.cluster_bits;
    progress.start(summary.data_bytes);
    progress.phase(super::Phase::Write);
    let popts = PipelineOptions {
        workers: opts.workers,
    };
    let mut report = Report {
        virtual_size,
        ..Default::default()
    };
    let stats = match opts.output_format {
        Format::Raw => {
            // A raw file's copy is exactly as long as the file (chunks hold
            // no data past its end: the rest of its last sector is a hole).
            out.set_len(summary.content_size).map_err(Error::Dest)?;
            let zero_fill = out.is_block_device() && !opts.target_is_zero;
            let mut sink = RawSink::new(out, virtual_size, zero_fill);
            let stats = pipeline::run(
                source,
                jobs,
                || Ok(RawWriter::new(out, !zero_fill)),
                &mut sink,
                popts,
                progress,
                cancel,
            )?;
            sink.finish()?;
            report.bytes_written = sink.bytes_written;
            stats
        }
        Format::Qcow2 => {
            let wopts = writer_options(virtual_size, opts)?;
            let mut sink = Qcow2Sink::new(out, wopts)?;
            let stats = pipeline::run(
                source,
                jobs,
                || Qcow2Encoder::new(cluster_size, opts.compression),
                &mut sink,
                popts,
                progress,
                cancel,
            )?;
            report.clusters_compressed = sink.clusters_compressed;
            let len = sink.finish()?;
            if !out.is_block_device() {
                out.set_len(len).map_err(Error::Dest)?;
            }
            report.bytes_written = len;
            stats
        }
    };
    progress.finish();
    report.bytes_read = stats.bytes_read;
    report.zero_bytes = stats.zero_bytes;
    report.elapsed = started.elapsed();
    Ok(report)
}
