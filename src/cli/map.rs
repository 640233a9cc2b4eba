//! `imgsync map`: the guest's extents after resolving the backing chain, as
//! `qemu-img map` reports them. No data cluster is read.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use imgsync_formats::{Extent, ExtentKind, Format, HostRun, Image};

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
                for piece in host_pieces(&image, &e) {
                    let piece = piece.with_context(|| path.display().to_string())?;
                    if !first {
                        writeln!(out, ",")?;
                    }
                    write!(out, "{}", json_extent(&piece.0, piece.1))?;
                    first = false;
                }
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

/// An allocated extent split where its storage changes (qemu-img map's
/// `offset` and `compressed`): runs of contiguous host offsets, compressed
/// runs, runs in an external data file. Unallocated extents stay whole.
fn host_pieces<'a>(
    image: &'a Image,
    e: &Extent,
) -> impl Iterator<Item = imgsync_formats::Result<(Extent, Option<HostRun>)>> + 'a {
    let e = *e;
    let mut pos = e.start;
    let mut pending: Option<(Extent, HostRun)> = None;
    let mut failed = false;
    std::iter::from_fn(move || {
        if e.kind == ExtentKind::Unallocated {
            if pos < e.end() {
                pos = e.end();
                return Some(Ok((e, None)));
            }
            return None;
        }
        loop {
            if failed {
                return None;
            }
            if pos >= e.end() {
                return pending.take().map(|(x, r)| Ok((x, Some(r))));
            }
            let r = match image.host_run(pos, e.end() - pos) {
                Ok(r) if r.len > 0 => r,
                Ok(_) => {
                    failed = true;
                    return Some(Err(imgsync_formats::Error::Invalid(format!(
                        "no progress mapping guest offset {pos:#x}"
                    ))));
                }
                Err(err) => {
                    failed = true;
                    return Some(Err(err));
                }
            };
            let piece = Extent {
                start: pos,
                length: r.len,
                ..e
            };
            pos += r.len;
            match &mut pending {
                Some((p, pr))
                    if pr.compressed == r.compressed
                        && pr.depth == r.depth
                        && match (pr.offset, r.offset) {
                            (Some(a), Some(b)) => a + p.length == b,
                            (None, None) => true,
                            _ => false,
                        } =>
                {
                    p.length += r.len;
                }
                Some(_) => return pending.replace((piece, r)).map(|(x, r)| Ok((x, Some(r)))),
                None => pending = Some((piece, r)),
            }
        }
    })
}

/// One extent with qemu-img's keys and meanings: `data` must be read, `zero`
/// reads as zeros, `present` is allocated in some layer of the chain,
/// `compressed` stored in compressed clusters, `offset` where plain data
/// lies in its layer's own file (when it does).
pub fn json_extent(e: &Extent, host: Option<HostRun>) -> String {
    let offset = match host.and_then(|h| h.offset) {
        Some(o) => format!(", \"offset\": {o}"),
        None => String::new(),
    };
    format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}{offset}}}",
        e.start,
        e.length,
        e.depth,
        e.kind != ExtentKind::Unallocated,
        e.kind != ExtentKind::Data,
        e.kind == ExtentKind::Data,
        host.is_some_and(|h| h.compressed)
    )
}
