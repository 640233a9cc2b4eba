//! `imgsync check`: metadata consistency, reported like `qemu-img check`
//! and with its exit status: 0 clean, 2 corruption found, 3 only leaked
//! clusters, 1 the check could not be completed (the image cannot be opened
//! or read; main maps every error of `check` to 1). A report with problems
//! also gets one stderr line naming the image and the counts.
//!
//! The report is built as the JSON object first (qemu-img check's keys);
//! the human text, the exit status and the stderr line are derived from it,
//! so a remote check (whose serve sends that JSON) prints, exits and warns
//! exactly as a local one.

use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result};
use imgsync_formats::qcow2::check::{check, Problem};
use imgsync_formats::Format;
use serde_json::{json, Value};

use super::{exit, OutputFormat};
use crate::io::{open_metadata_source, Locking, OpenOptions};

pub fn run(
    path: &Path,
    format: Option<Format>,
    locking: Locking,
    output: OutputFormat,
) -> Result<u8> {
    let report = report(path, format, locking)?;
    print_stdout(&report, output)?;
    finish(&path.display().to_string(), &report)
}

/// Prints a report on stdout. A reader that went away (`check img | head
/// -1`) does not change the verdict: the exit status still says what was
/// found, never the quiet 0 of a broken pipe elsewhere.
pub fn print_stdout(report: &Value, output: OutputFormat) -> Result<()> {
    let mut out = BufWriter::new(super::output::stdout());
    match print(&mut out, report, output).and_then(|()| Ok(out.flush()?)) {
        Err(e) if super::output::is_stdout_closed(&e) => Ok(()),
        r => r,
    }
}

/// `run`, printing into `out` (stdout, or the protocol for a remote client).
pub fn run_to(
    out: &mut dyn Write,
    path: &Path,
    format: Option<Format>,
    locking: Locking,
    output: OutputFormat,
) -> Result<u8> {
    let report = report(path, format, locking)?;
    print(out, &report, output)?;
    exit_code(&report)
}

/// The end of a check whose report was printed: its exit status, after the
/// stderr line naming `name` and the counts when it found problems.
pub fn finish(name: &str, report: &Value) -> Result<u8> {
    let code = exit_code(report)?;
    if code != exit::OK {
        super::output::eprint_line(&format!("imgsync: {name}: {}", summary(report)));
    }
    Ok(code)
}

/// qemu-img check's exit status for a report: corruption first, then
/// leaks. A report without the counts is not a report.
pub fn exit_code(report: &Value) -> Result<u8> {
    let count = |key: &str| {
        report
            .get(key)
            .and_then(Value::as_u64)
            .with_context(|| format!("check report without a '{key}' count"))
    };
    let (errors, corruptions, leaks) = (
        count("check-errors")?,
        count("corruptions")?,
        count("leaks")?,
    );
    Ok(if errors > 0 {
        exit::CHECK_INCOMPLETE
    } else if corruptions > 0 {
        exit::CHECK_CORRUPT
    } else if leaks > 0 {
        exit::CHECK_LEAKS
    } else {
        exit::OK
    })
}

/// What the stderr line says of a report with problems.
fn summary(report: &Value) -> String {
    let n = |key: &str| report.get(key).and_then(Value::as_u64).unwrap_or(0);
    let plural = |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let mut s = format!(
        "check found {} and {}",
        plural(n("corruptions"), "corruption", "corruptions"),
        plural(n("leaks"), "leaked cluster", "leaked clusters")
    );
    if report.get("sync-in-progress").and_then(Value::as_bool) == Some(true) {
        s.push_str(" (an interrupted sync left the image partly updated)");
    }
    s
}

/// Checks the image's own metadata (a backing file or data file it names
/// is not opened: checking one image's tables needs no other file).
fn report(path: &Path, format: Option<Format>, locking: Locking) -> Result<Value> {
    let filename = path.display().to_string();
    let source = open_metadata_source(
        path,
        OpenOptions {
            format,
            allow_corrupt: true,
            locking,
        },
    )?;
    super::warn_in_use(&source.in_use, "what is shown");
    let image = source.image;
    if let Some(j) = crate::io::journal::in_progress(path) {
        // Consistent metadata, inconsistent content: part old, part new.
        return Ok(
            json!({"filename": filename, "sync-in-progress": true, "sync-journal": j.display().to_string(), "check-errors": 0, "corruptions": 1, "leaks": 0}),
        );
    }
    let Some(q) = image.qcow2() else {
        // A raw image has no metadata that could be inconsistent.
        return Ok(
            json!({"filename": filename, "format": "raw", "check-errors": 0, "corruptions": 0, "leaks": 0}),
        );
    };
    let r = check(q).with_context(|| filename.clone())?;
    Ok(json!({
        "filename": filename,
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
    }))
}

fn problems_json(list: &[Problem]) -> Value {
    list.iter()
        .map(|p| json!({"offset": p.offset, "message": p.message}))
        .collect()
}

/// Prints a report as `output` asks.
fn print(out: &mut dyn Write, report: &Value, output: OutputFormat) -> Result<()> {
    match output {
        OutputFormat::Json => {
            if report.get("total-clusters").is_some() {
                serde_json::to_writer_pretty(&mut *out, report)?;
            } else {
                // The short reports (raw, interrupted sync) on one line.
                serde_json::to_writer(&mut *out, report)?;
            }
            writeln!(out)?;
        }
        OutputFormat::Human => print_human(out, report)?,
    }
    Ok(())
}

fn print_human(out: &mut dyn Write, r: &Value) -> Result<()> {
    let n = |key: &str| r.get(key).and_then(Value::as_u64).unwrap_or(0);
    let list = |key: &str| -> Vec<String> {
        r.get(key)
            .and_then(Value::as_array)
            .map(|l| {
                l.iter()
                    .map(|p| p["message"].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    if let Some(j) = r.get("sync-journal").and_then(Value::as_str) {
        writeln!(
            out,
            "The image is in the middle of an interrupted sync (journal {j}): part of it is updated, part is not. Rerun the sync to complete it, or roll it back with imgsync sync --rollback."
        )?;
        return Ok(());
    }
    if r.get("format").and_then(Value::as_str) == Some("raw") {
        writeln!(
            out,
            "No errors were found on the image (raw: no metadata to check)."
        )?;
        return Ok(());
    }
    let (warnings, corruptions, leaks) = (
        list("warning-list"),
        list("corruption-list"),
        list("leak-list"),
    );
    for m in &warnings {
        writeln!(out, "Warning: {m}")?;
    }
    for m in &corruptions {
        writeln!(out, "ERROR {m}")?;
    }
    for m in &leaks {
        writeln!(out, "Leaked cluster: {m}")?;
    }
    let listed = (warnings.len() + corruptions.len() + leaks.len()) as u64;
    let omitted = (n("warnings") + n("corruptions") + n("leaks")).saturating_sub(listed);
    if omitted > 0 {
        writeln!(out, "({omitted} more problems not listed)")?;
    }
    if n("corruptions") > 0 {
        writeln!(
            out,
            "\n{} errors were found on the image.",
            n("corruptions")
        )?;
        writeln!(
            out,
            "Data may be corrupted, or further writes to the image may corrupt it."
        )?;
    }
    if n("leaks") > 0 {
        writeln!(
            out,
            "\n{} leaked clusters were found on the image.",
            n("leaks")
        )?;
        writeln!(out, "This means waste of disk space, but no harm to data.")?;
    }
    if n("corruptions") == 0 && n("leaks") == 0 {
        writeln!(out, "No errors were found on the image.")?;
    }
    let total = n("total-clusters");
    if total > 0 {
        let allocated = n("allocated-clusters");
        writeln!(
            out,
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            allocated,
            total,
            percent(allocated, total),
            percent(n("fragmented-clusters"), allocated),
            percent(n("compressed-clusters"), allocated),
        )?;
    }
    writeln!(out, "Image end offset: {}", n("image-end-offset"))?;
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
