//! `imgsync map`: the guest's extents after resolving the backing chain, as
//! `qemu-img map` reports them. No data cluster is read.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use imgsync_formats::{Extent, ExtentKind, Format};

use super::{exit, OutputFormat};
use crate::io::{open_source, Locking, OpenOptions};

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
    let source = open_source(
        path,
        OpenOptions {
            format,
            allow_corrupt: false,
            locking,
        },
    )?;
    super::warn_in_use(&source.in_use, "what is shown");
    let image = source.image;
    match output {
        OutputFormat::Json => write!(out, "[")?,
        OutputFormat::Human => {
            writeln!(out, "{:<20}{:<20}{:<14}Depth", "Offset", "Length", "Kind")?
        }
    }
    let mut first = true;
    for extent in image.all_extents() {
        let e = extent.with_context(|| path.display().to_string())?;
        match output {
            OutputFormat::Json => {
                if !first {
                    writeln!(out, ",")?;
                }
                write!(out, "{}", json_extent(&e))?;
            }
            OutputFormat::Human => writeln!(
                out,
                "{:<20}{:<20}{:<14}{}",
                format!("{:#x}", e.start),
                format!("{:#x}", e.length),
                kind_name(e.kind),
                e.depth
            )?,
        }
        first = false;
    }
    if output == OutputFormat::Json {
        writeln!(out, "]")?;
    }
    Ok(exit::OK)
}

fn kind_name(k: ExtentKind) -> &'static str {
    match k {
        ExtentKind::Data => "data",
        ExtentKind::Zero => "zero",
        ExtentKind::Unallocated => "unallocated",
    }
}

/// One extent with qemu-img's keys and meanings: `data` must be read, `zero`
/// reads as zeros, `present` is allocated in some layer of the chain.
pub fn json_extent(e: &Extent) -> String {
    format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}}}",
        e.start,
        e.length,
        e.depth,
        e.kind != ExtentKind::Unallocated,
        e.kind != ExtentKind::Data,
        e.kind == ExtentKind::Data
    )
}
