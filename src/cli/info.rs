//! `imgsync info`: what qemu-img info prints, with the same JSON key names.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{Context, Result};
use imgsync_formats::{Format, Image};
use serde_json::{json, Map, Value};

use super::output::human_size;
use super::{exit, OutputFormat};
use crate::io::journal::JournalState;
use crate::io::{open_metadata_source, Locking, OpenOptions};

pub fn run(
    path: &Path,
    format: Option<Format>,
    locking: Locking,
    output: OutputFormat,
) -> Result<u8> {
    super::output::listing(|out| run_to(out, path, format, locking, output))
}

/// `run`, printing into `out` (stdout, or the protocol for a remote client).
pub fn run_to(
    out: &mut dyn Write,
    path: &Path,
    format: Option<Format>,
    locking: Locking,
    output: OutputFormat,
) -> Result<u8> {
    // Only this image's metadata: info reads nothing through a backing
    // file or data file, so it opens none (and shows their names even for
    // a probed image, as qemu-img info does).
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
    let actual_size = std::fs::metadata(path)
        .with_context(|| path.display().to_string())?
        .blocks()
        * 512;
    let info = describe(path, &image, actual_size)?;
    match output {
        OutputFormat::Json => {
            serde_json::to_writer_pretty(&mut *out, &info)?;
            writeln!(out)?;
        }
        OutputFormat::Human => print_human(out, &info)?,
    }
    Ok(exit::OK)
}

/// The info object, keyed as `qemu-img info --output=json`.
pub fn describe(path: &Path, image: &Image, actual_size: u64) -> Result<Value> {
    let mut o = Map::new();
    o.insert("filename".into(), json!(path.display().to_string()));
    o.insert("format".into(), json!(image.format().name()));
    o.insert("virtual-size".into(), json!(image.virtual_size()));
    o.insert("actual-size".into(), json!(actual_size));
    let mut dirty = false;
    if let Some(q) = image.qcow2() {
        let h = q.header();
        dirty = h.dirty();
        o.insert("cluster-size".into(), json!(h.cluster_size()));
        if let Some(b) = &h.backing_file {
            o.insert("backing-filename".into(), json!(b));
            let dir = path.parent().unwrap_or(Path::new("."));
            if let Ok(full) = crate::io::open::resolve_name(dir, b) {
                o.insert(
                    "full-backing-filename".into(),
                    json!(full.display().to_string()),
                );
            }
        }
        if let Some(f) = &h.backing_format {
            o.insert("backing-filename-format".into(), json!(f));
        }
        // As qemu's qcow2_get_specific_info: compression-type for every
        // version; lazy-refcounts, corrupt and extended-l2 only for version 3.
        let mut data = Map::new();
        data.insert("compat".into(), json!(h.compat()));
        data.insert("compression-type".into(), json!(h.compression_type.name()));
        if h.version >= 3 {
            data.insert("lazy-refcounts".into(), json!(h.lazy_refcounts()));
        }
        data.insert("refcount-bits".into(), json!(h.refcount_bits()));
        if h.version >= 3 {
            data.insert("corrupt".into(), json!(h.corrupt()));
            data.insert("extended-l2".into(), json!(h.extended_l2()));
        }
        if let Some(df) = &h.data_file {
            data.insert("data-file".into(), json!(df));
            data.insert("data-file-raw".into(), json!(h.data_file_raw()));
        }
        if let Some(b) = &h.bitmaps {
            data.insert("bitmaps-count".into(), json!(b.nb_bitmaps));
        }
        o.insert(
            "format-specific".into(),
            json!({"type": "qcow2", "data": Value::Object(data)}),
        );
        let snaps = q.snapshots().with_context(|| path.display().to_string())?;
        if !snaps.is_empty() {
            let list: Vec<Value> = snaps
                .iter()
                .map(|s| {
                    json!({
                        "id": s.id,
                        "name": s.name,
                        "vm-state-size": s.vm_state_size,
                        "date-sec": s.date_sec,
                        "date-nsec": s.date_nsec,
                        "vm-clock-sec": s.vm_clock_nsec / 1_000_000_000,
                        "vm-clock-nsec": s.vm_clock_nsec % 1_000_000_000,
                    })
                })
                .collect();
            o.insert("snapshots".into(), Value::Array(list));
        }
    }
    o.insert("dirty-flag".into(), json!(dirty));
    match crate::io::journal::state_of(path) {
        Some((j, JournalState::InProgress)) => {
            // imgsync's own key: an interrupted sync left DST partly updated.
            o.insert("sync-in-progress".into(), json!(true));
            o.insert("sync-journal".into(), json!(j.display().to_string()));
        }
        Some((_, JournalState::Refused(e))) => {
            // A journal at this image's journal name that is not its own
            // (or not ours): a sync would refuse it too.
            o.insert("sync-journal-refused".into(), json!(e.to_string()));
        }
        _ => {}
    }
    Ok(Value::Object(o))
}

fn print_human(out: &mut dyn Write, info: &Value) -> Result<()> {
    let get = |k: &str| info.get(k).cloned().unwrap_or(Value::Null);
    let u = |k: &str| get(k).as_u64().unwrap_or(0);
    writeln!(out, "image: {}", get("filename").as_str().unwrap_or(""))?;
    writeln!(out, "file format: {}", get("format").as_str().unwrap_or(""))?;
    let vs = u("virtual-size");
    writeln!(out, "virtual size: {} ({vs} bytes)", human_size(vs))?;
    writeln!(out, "disk size: {}", human_size(u("actual-size")))?;
    if let Some(cs) = get("cluster-size").as_u64() {
        writeln!(out, "cluster_size: {cs}")?;
    }
    if let Some(b) = get("backing-filename").as_str() {
        match get("full-backing-filename").as_str() {
            Some(full) if full != b => writeln!(out, "backing file: {b} (actual path: {full})")?,
            _ => writeln!(out, "backing file: {b}")?,
        }
    }
    if let Some(f) = get("backing-filename-format").as_str() {
        writeln!(out, "backing file format: {f}")?;
    }
    if let Some(Value::Array(snaps)) = info.get("snapshots") {
        writeln!(out, "Snapshot list:")?;
        writeln!(
            out,
            "ID        TAG               VM SIZE                DATE     VM CLOCK"
        )?;
        for s in snaps {
            writeln!(
                out,
                "{:<9} {:<17} {:>7} {:>20} {:>12}",
                s["id"].as_str().unwrap_or(""),
                s["name"].as_str().unwrap_or(""),
                human_size(s["vm-state-size"].as_u64().unwrap_or(0)),
                s["date-sec"].as_u64().unwrap_or(0),
                s["vm-clock-sec"].as_u64().unwrap_or(0),
            )?;
        }
    }
    if let Some(data) = info
        .pointer("/format-specific/data")
        .and_then(Value::as_object)
    {
        writeln!(out, "Format specific information:")?;
        for (k, v) in data {
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            writeln!(out, "    {}: {v}", k.replace('-', " "))?;
        }
    }
    if get("dirty-flag").as_bool() == Some(true) {
        writeln!(out, "dirty flag: true")?;
    }
    if let Some(why) = get("sync-journal-refused").as_str() {
        writeln!(out, "sync journal not used: {why}")?;
    }
    if let Some(j) = get("sync-journal").as_str() {
        writeln!(
            out,
            "sync in progress: yes (journal {j}): the image is partly updated; rerun the sync to complete it, or imgsync sync --rollback to restore it"
        )?;
    }
    Ok(())
}
