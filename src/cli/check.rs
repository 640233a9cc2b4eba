//! `imgsync check`: metadata consistency (exit 0 clean, 3 corruption or
//! leaks found, 2 error), reported like `qemu-img check`.

use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result};
use imgsync_formats::qcow2::check::{check, CheckReport, Problem};
use imgsync_formats::Format;
use serde_json::json;

use super::{exit, OutputFormat};
use crate::io::{open_source, Locking, OpenOptions};

pub fn run(
    path: &Path,
    format: Option<Format>,
    locking: Locking,
    output: OutputFormat,
) -> Result<u8> {
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let code = run_to(&mut out, path, format, locking, output)?;
    out.flush()?;
    Ok(code)
}

/// `run`, printing into `out` (stdout, or the protocol for a remote client).
pub fn run_to(
    out: &mut dyn Write,
    path: &Path,
    format: Option<Format>,
    locking: Locking,
    output: OutputFormat,
) -> Result<u8> {
    let source = open_source(
        path,
        OpenOptions {
            format,
            allow_corrupt: true,
            locking,
        },
    )?;
    super::warn_in_use(&source.in_use, "what is shown");
    let image = source.image;
    if let Some(j) = super::sync::journal_of(path) {
        // Consistent metadata, inconsistent content: part old, part new.
        match output {
            OutputFormat::Json => writeln!(
                out,
                "{}",
                json!({"filename": path.display().to_string(), "sync-in-progress": true, "sync-journal": j.display().to_string(), "check-errors": 0, "corruptions": 1, "leaks": 0})
            )?,
            OutputFormat::Human => writeln!(
                out,
                "The image is in the middle of an interrupted sync (journal {}): part of it is updated, part is not. Rerun the sync to complete it, or roll it back with imgsync sync --rollback.",
                j.display()
            )?,
        }
        return Ok(exit::CORRUPT);
    }
    let Some(q) = image.qcow2() else {
        // A raw image has no metadata that could be inconsistent.
        match output {
            OutputFormat::Json => writeln!(
                out,
                "{}",
                json!({"filename": path.display().to_string(), "format": "raw", "check-errors": 0, "corruptions": 0, "leaks": 0})
            )?,
            OutputFormat::Human => writeln!(
                out,
                "No errors were found on the image (raw: no metadata to check)."
            )?,
        }
        return Ok(exit::OK);
    };
    let report = check(q).with_context(|| path.display().to_string())?;
    match output {
        OutputFormat::Json => print_json(out, path, &report)?,
        OutputFormat::Human => print_human(out, &report)?,
    }
    Ok(if report.is_clean() {
        exit::OK
    } else {
        exit::CORRUPT
    })
}

fn problems_json(list: &[Problem]) -> serde_json::Value {
    list.iter()
        .map(|p| json!({"offset": p.offset, "message": p.message}))
        .collect()
}

fn print_json(out: &mut dyn Write, path: &Path, r: &CheckReport) -> Result<()> {
    let v = json!({
        "filename": path.display().to_string(),
        "format": "qcow2",
        "check-errors": 0,
        "corruptions": r.corruption_count(),
        "leaks": r.leak_count(),
        "warnings": r.warning_count(),
        "image-end-offset": r.stats.image_end_offset,
        "total-clusters": r.stats.total_clusters,
        "allocated-clusters": r.stats.allocated_clusters,
        "compressed-clusters": r.stats.compressed_clusters,
        "fragmented-clusters": r.stats.fragmented_clusters,
        "corruption-list": problems_json(&r.corruptions),
        "leak-list": problems_json(&r.leaks),
        "warning-list": problems_json(&r.warnings),
    });
    serde_json::to_writer_pretty(&mut *out, &v)?;
    writeln!(out)?;
    Ok(())
}

fn print_human(out: &mut dyn Write, r: &CheckReport) -> Result<()> {
    for p in &r.warnings {
        writeln!(out, "Warning: {}", p.message)?;
    }
    for p in &r.corruptions {
        writeln!(out, "ERROR {}", p.message)?;
    }
    for p in &r.leaks {
        writeln!(out, "Leaked cluster: {}", p.message)?;
    }
    let omitted = r.omitted_corruptions + r.omitted_leaks + r.omitted_warnings;
    if omitted > 0 {
        writeln!(out, "({omitted} more problems not listed)")?;
    }
    if r.corruption_count() > 0 {
        writeln!(
            out,
            "\n{} errors were found on the image.",
            r.corruption_count()
        )?;
        writeln!(
            out,
            "Data may be corrupted, or further writes to the image may corrupt it."
        )?;
    }
    if r.leak_count() > 0 {
        writeln!(
            out,
            "\n{} leaked clusters were found on the image.",
            r.leak_count()
        )?;
        writeln!(out, "This means waste of disk space, but no harm to data.")?;
    }
    if r.is_clean() {
        writeln!(out, "No errors were found on the image.")?;
    }
    let s = &r.stats;
    if s.total_clusters > 0 {
        writeln!(
            out,
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            s.allocated_clusters,
            s.total_clusters,
            percent(s.allocated_clusters, s.total_clusters),
            percent(s.fragmented_clusters, s.allocated_clusters),
            percent(s.compressed_clusters, s.allocated_clusters),
        )?;
    }
    writeln!(out, "Image end offset: {}", s.image_end_offset)?;
    Ok(())
}

/// `n` as a percentage of `of` (0 when `of` is 0).
fn percent(n: u64, of: u64) -> f64 {
    if of == 0 {
        0.0
    } else {
        n as f64 * 100.0 / of as f64
    }
}
