//! compare: whether two images read back identical, as `qemu-img compare`
//! does: ranges that read as zeros in both (holes, zero or unallocated
//! clusters) are not read; a range with data on one side only is read there
//! and must be zeros. When the sizes differ, the larger image's extra part
//! must read as zeros (qemu-img compare without `-s`).

use std::sync::atomic::{AtomicBool, Ordering};

use imgsync_formats::{Extent, Image};

use super::zero::is_zero;
use super::{Error, Progress, Result};

/// Bytes compared per read.
const COMPARE_CHUNK: u64 = 2 << 20;
/// Both images' data this far ahead of the comparison is hinted to the
/// kernel for read-ahead (scattered extents are read with many requests in
/// flight instead of one at a time).
const READ_AHEAD: u64 = 32 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Identical,
    /// The first offset at which the guest contents differ.
    Differs {
        offset: u64,
    },
}

#[derive(Clone, Copy, Debug, Default)]
pub struct CompareStats {
    /// Bytes read from A and from B.
    pub read_a: u64,
    pub read_b: u64,
}

/// A cursor over one image's extents, reading past the end as zeros.
struct Side<'a> {
    image: &'a Image,
    extents: imgsync_formats::Extents<'a>,
    current: Option<Extent>,
    wrap: fn(imgsync_formats::Error) -> Error,
}

impl<'a> Side<'a> {
    fn new(image: &'a Image, wrap: fn(imgsync_formats::Error) -> Error) -> Self {
        Side {
            image,
            extents: image.all_extents(),
            current: None,
            wrap,
        }
    }

    /// Whether `pos` is data here and how far that kind runs from `pos`.
    fn at(&mut self, pos: u64) -> Result<(bool, u64)> {
        loop {
            if let Some(e) = self.current {
                if pos < e.end() {
                    return Ok((!e.is_zero(), e.end()));
                }
            }
            match self.extents.next() {
                Some(e) => self.current = Some(e.map_err(self.wrap)?),
                // Past the end: zeros for ever.
                None => return Ok((false, u64::MAX)),
            }
        }
    }

    fn read(&self, buf: &mut [u8], pos: u64) -> Result<()> {
        self.image.read_at(buf, pos).map_err(self.wrap)
    }
}

/// Compares the guest contents of `a` and `b`.
pub fn compare(
    a: &Image,
    b: &Image,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<(Outcome, CompareStats)> {
    let end = a.virtual_size().max(b.virtual_size());
    let mut sa = Side::new(a, Error::Source);
    let mut sb = Side::new(b, Error::Other);
    let mut stats = CompareStats::default();
    let mut buf_a = Vec::new();
    let mut buf_b = Vec::new();
    progress.start(end);
    progress.phase(super::Phase::Compare);
    let mut pos = 0u64;
    let mut hinted = 0u64;
    while pos < end {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Interrupted);
        }
        if pos + READ_AHEAD / 2 >= hinted {
            let from = hinted.max(pos);
            a.will_need(from, READ_AHEAD);
            b.will_need(from, READ_AHEAD);
            hinted = from + READ_AHEAD;
        }
        let (data_a, end_a) = sa.at(pos)?;
        let (data_b, end_b) = sb.at(pos)?;
        let stop = end_a.min(end_b).min(end).min(pos + COMPARE_CHUNK);
        let len = (stop - pos) as usize;
        if data_a || data_b {
            buf_a.resize(len, 0);
            buf_b.resize(len, 0);
            if data_a {
                sa.read(&mut buf_a, pos)?;
                stats.read_a += len as u64;
            }
            if data_b {
                sb.read(&mut buf_b, pos)?;
                stats.read_b += len as u64;
            }
            let differs = match (data_a, data_b) {
                (true, true) => buf_a != buf_b,
                (true, false) => !is_zero(&buf_a),
                _ => !is_zero(&buf_b),
            };
            if differs {
                let first = match (data_a, data_b) {
                    (true, true) => buf_a.iter().zip(&buf_b).position(|(x, y)| x != y),
                    (true, false) => buf_a.iter().position(|&x| x != 0),
                    _ => buf_b.iter().position(|&x| x != 0),
                };
                let offset = pos + first.unwrap_or(0) as u64;
                progress.finish();
                return Ok((Outcome::Differs { offset }, stats));
            }
        }
        progress.advance(stop - pos);
        pos = stop;
    }
    progress.finish();
    Ok((Outcome::Identical, stats))
}

/// Compares `a` with another image that arrives as chunks in guest order
/// (pulled from a host: only its data crosses the wire); ranges without a
/// chunk read as zeros there. `b_size` is the other image's virtual size.
pub fn compare_chunks<I>(
    a: &Image,
    b_size: u64,
    chunks: I,
    progress: &dyn Progress,
    cancel: &AtomicBool,
) -> Result<Outcome>
where
    I: Iterator<Item = Result<super::pipeline::Chunk>>,
{
    let end = a.virtual_size().max(b_size);
    let mut sa = Side::new(a, Error::Source);
    let mut buf = Vec::new();
    let mut pos = 0u64;
    progress.start(end);
    progress.phase(super::Phase::Compare);
    for chunk in chunks {
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Interrupted);
        }
        let chunk = chunk?;
        if let Some(offset) = a_nonzero(&mut sa, &mut buf, pos, chunk.start)? {
            return Ok(Outcome::Differs { offset });
        }
        // A's bytes over the chunk (zeros past A's end).
        let len = chunk.buf.len();
        buf.clear();
        buf.resize(len, 0);
        let in_a = a.virtual_size().saturating_sub(chunk.start).min(len as u64) as usize;
        if in_a > 0 {
            sa.read(&mut buf[..in_a], chunk.start)?;
        }
        if let Some(i) = buf.iter().zip(chunk.buf.iter()).position(|(x, y)| x != y) {
            return Ok(Outcome::Differs {
                offset: chunk.start + i as u64,
            });
        }
        progress.advance(chunk.end() - pos);
        pos = chunk.end();
    }
    if let Some(offset) = a_nonzero(&mut sa, &mut buf, pos, end)? {
        return Ok(Outcome::Differs { offset });
    }
    progress.finish();
    Ok(Outcome::Identical)
}

/// The first non-zero byte of `a` in `[from, to)`, reading only its data.
fn a_nonzero(sa: &mut Side<'_>, buf: &mut Vec<u8>, from: u64, to: u64) -> Result<Option<u64>> {
    let mut pos = from;
    let size = sa.image.virtual_size();
    while pos < to.min(size) {
        let (data, run_end) = sa.at(pos)?;
        let stop = run_end.min(to).min(size).min(pos + COMPARE_CHUNK);
        if data {
            buf.clear();
            buf.resize((stop - pos) as usize, 0);
            sa.read(buf, pos)?;
            if let Some(i) = buf.iter().position(|&x| x != 0) {
                return Ok(Some(pos + i as u64));
            }
        }
        pos = stop;
    }
    Ok(None)
}
