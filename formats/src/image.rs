//! One image API for everything above the format layer: a layer (raw or
//! QCOW2) with its backing chain already attached, a virtual size, an extent
//! iterator that resolves the chain like `qemu-img map`, and guest reads.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::qcow2::{ClusterKind, Qcow2};
use crate::raw::Raw;
use crate::{Format, Storage};

/// Backing chains deeper than this are refused (a loop that escaped the
/// opener's checks, or an absurd chain).
pub const MAX_CHAIN_DEPTH: usize = 64;

// One Layer per image in a chain (at most MAX_CHAIN_DEPTH): boxing the larger
// variant would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Layer {
    Raw(Raw),
    Qcow2(Qcow2),
}

impl Layer {
    pub fn format(&self) -> Format {
        match self {
            Layer::Raw(_) => Format::Raw,
            Layer::Qcow2(_) => Format::Qcow2,
        }
    }
    pub fn virtual_size(&self) -> u64 {
        match self {
            Layer::Raw(r) => r.virtual_size(),
            Layer::Qcow2(q) => q.virtual_size(),
        }
    }
    pub fn file(&self) -> &Arc<dyn Storage> {
        match self {
            Layer::Raw(r) => r.file(),
            Layer::Qcow2(q) => q.file(),
        }
    }
}

/// What a guest range holds after resolving the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExtentKind {
    /// Allocated data (in some layer) that must be read.
    Data,
    /// Known zeros (a zero cluster, a raw hole): present, reads as zeros.
    Zero,
    /// Allocated nowhere in the chain: reads as zeros.
    Unallocated,
}

/// A run of guest bytes of one kind, found at `depth` in the chain (0 = top),
/// as `qemu-img map` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    pub kind: ExtentKind,
    pub depth: u32,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.start + self.length
    }
    /// Whether the range reads as zeros without reading data.
    pub fn is_zero(&self) -> bool {
        self.kind != ExtentKind::Data
    }
}

/// Where a run of guest bytes is stored ([`Image::host_run`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostRun {
    pub len: u64,
    /// Host offset of plain data in the layer's own file.
    pub offset: Option<u64>,
    /// Stored in a compressed cluster.
    pub compressed: bool,
    /// The layer of the chain (0 = top).
    pub depth: u32,
}

/// An image with its backing chain.
pub struct Image {
    layer: Layer,
    backing: Option<Box<Image>>,
}

impl Image {
    /// An image with no backing file.
    pub fn new(layer: Layer) -> Image {
        Image {
            layer,
            backing: None,
        }
    }

    /// Attaches `backing` beneath this image; refuses a chain deeper than
    /// MAX_CHAIN_DEPTH.
    pub fn with_backing(layer: Layer, backing: Image) -> Result<Image> {
        if backing.chain_len() >= MAX_CHAIN_DEPTH {
            return Err(Error::TooLarge {
                what: "backing chain depth",
                value: backing.chain_len() as u64 + 1,
                limit: MAX_CHAIN_DEPTH as u64,
            });
        }
        Ok(Image {
            layer,
            backing: Some(Box::new(backing)),
        })
    }

    pub fn layer(&self) -> &Layer {
        &self.layer
    }
    pub fn format(&self) -> Format {
        self.layer.format()
    }
    pub fn backing(&self) -> Option<&Image> {
        self.backing.as_deref()
    }
    pub fn qcow2(&self) -> Option<&Qcow2> {
        match &self.layer {
            Layer::Qcow2(q) => Some(q),
            Layer::Raw(_) => None,
        }
    }
    /// Number of images in the chain, this one included.
    pub fn chain_len(&self) -> usize {
        1 + self.backing.as_ref().map_or(0, |b| b.chain_len())
    }
    pub fn virtual_size(&self) -> u64 {
        self.layer.virtual_size()
    }

    /// The length of a raw copy of this image: a raw file's exact length
    /// (its virtual size is rounded up to a sector, as qemu sees it; the
    /// bytes in between read as zeros and are not part of the file), else
    /// the virtual size. Never more than the virtual size.
    pub fn content_size(&self) -> u64 {
        match &self.layer {
            Layer::Raw(r) => r.file_size(),
            Layer::Qcow2(q) => q.virtual_size(),
        }
    }

    /// The extent starting at `offset`: one kind at one depth, at most
    /// `max_len` bytes (never past the virtual size). Does not read data.
    pub fn block_status(&self, offset: u64, max_len: u64) -> Result<Extent> {
        let size = self.virtual_size();
        let max_len = max_len.min(size.saturating_sub(offset));
        let (kind, len) = match &self.layer {
            Layer::Raw(r) => {
                let run = r.lookup(offset, max_len)?;
                let kind = if run.data {
                    ExtentKind::Data
                } else {
                    ExtentKind::Zero
                };
                (kind, run.len)
            }
            Layer::Qcow2(q) => {
                let m = q.lookup(offset, max_len)?;
                let kind = match m.kind {
                    ClusterKind::Unallocated => ExtentKind::Unallocated,
                    ClusterKind::Zero => ExtentKind::Zero,
                    ClusterKind::Data { .. } | ClusterKind::Compressed { .. } => ExtentKind::Data,
                };
                (kind, m.len)
            }
        };
        if kind == ExtentKind::Unallocated && len > 0 {
            if let Some(b) = &self.backing {
                let bsize = b.virtual_size();
                if offset < bsize {
                    // Resolve in the backing file, within its size.
                    let mut e = b.block_status(offset, len.min(bsize - offset))?;
                    e.depth += 1;
                    return Ok(e);
                }
                // Past the end of a shorter backing file: zeros, reported at
                // this depth as qemu does.
            }
        }
        Ok(Extent {
            start: offset,
            length: len,
            kind,
            depth: 0,
        })
    }

    /// Where the guest bytes at `offset` (up to `max_len`) are stored: a run
    /// of one storage, as `qemu-img map --output=json`'s `offset` and
    /// `compressed` describe it (qemu's `bdrv_co_block_status`). `offset` is
    /// the host offset of plain data in the file of the layer at `depth`
    /// (none for zeros, compressed clusters and an external data file).
    pub fn host_run(&self, offset: u64, max_len: u64) -> Result<HostRun> {
        let size = self.virtual_size();
        let max_len = max_len.min(size.saturating_sub(offset));
        let (run, unallocated) = match &self.layer {
            Layer::Raw(r) => {
                let run = r.lookup(offset, max_len)?;
                // qemu reports a raw file's holes at their offset too.
                let host = Some(offset);
                (
                    HostRun {
                        len: run.len,
                        offset: host,
                        compressed: false,
                        depth: 0,
                    },
                    false,
                )
            }
            Layer::Qcow2(q) => {
                let m = q.lookup(offset, max_len)?;
                let own_file = !q.header().has_data_file();
                let (host, compressed) = match m.kind {
                    ClusterKind::Data { host_offset } => (own_file.then_some(host_offset), false),
                    ClusterKind::Compressed { .. } => (None, true),
                    ClusterKind::Zero | ClusterKind::Unallocated => (None, false),
                };
                let run = HostRun {
                    len: m.len,
                    offset: host,
                    compressed,
                    depth: 0,
                };
                (run, m.kind == ClusterKind::Unallocated)
            }
        };
        if unallocated && run.len > 0 {
            if let Some(b) = &self.backing {
                let bsize = b.virtual_size();
                if offset < bsize {
                    let mut r = b.host_run(offset, run.len.min(bsize - offset))?;
                    r.depth += 1;
                    return Ok(r);
                }
            }
        }
        Ok(run)
    }

    /// Extents covering `[start, start + len)` (clamped to the virtual size),
    /// in order, adjacent runs of equal kind and depth merged.
    pub fn extents(&self, start: u64, len: u64) -> Extents<'_> {
        let end = start.saturating_add(len).min(self.virtual_size());
        Extents {
            image: self,
            pos: start.min(end),
            end,
            pending: None,
            failed: false,
        }
    }

    /// Extents of the whole image.
    pub fn all_extents(&self) -> Extents<'_> {
        self.extents(0, self.virtual_size())
    }

    /// Reads guest bytes at `offset`, following the chain and decompressing.
    /// Reading past the virtual size is an error.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let size = self.virtual_size();
        if offset
            .checked_add(buf.len() as u64)
            .map_or(true, |e| e > size)
        {
            return Err(Error::invalid(format!(
                "read of {:#x} bytes at guest offset {offset:#x} is beyond the virtual size {size:#x}",
                buf.len()
            )));
        }
        match &self.layer {
            Layer::Raw(r) => r.read_at(buf, offset),
            Layer::Qcow2(q) => q.read_at(buf, offset, &mut |out, pos| self.read_backing(out, pos)),
        }
    }

    /// Hints that guest `[offset, offset + len)` will be read soon: the
    /// stores holding its data (this layer's file or data file, the backing
    /// chain where unallocated here) start reading ahead. Metadata lookups
    /// only; failures are ignored (it is only a hint).
    pub fn will_need(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.virtual_size());
        let mut pos = offset;
        while pos < end {
            let step = match &self.layer {
                Layer::Raw(r) => {
                    // Data runs only: reading ahead a hole would fill the
                    // page cache with zeros.
                    let Ok(run) = r.lookup(pos, end - pos) else {
                        return;
                    };
                    if run.data {
                        r.file().will_need(pos, run.len);
                    }
                    run.len
                }
                Layer::Qcow2(q) => {
                    let Ok(m) = q.lookup(pos, end - pos) else {
                        return;
                    };
                    match m.kind {
                        ClusterKind::Data { host_offset } => q.data_will_need(host_offset, m.len),
                        ClusterKind::Compressed {
                            host_offset,
                            compressed_size,
                        } => q.file().will_need(host_offset, compressed_size),
                        ClusterKind::Unallocated => {
                            if let Some(b) = &self.backing {
                                b.will_need(pos, m.len);
                            }
                        }
                        ClusterKind::Zero => {}
                    }
                    m.len
                }
            };
            if step == 0 {
                return;
            }
            pos += step;
        }
    }

    /// Reads what the backing file shows through at `pos` (zeros past its end
    /// or without one).
    fn read_backing(&self, out: &mut [u8], pos: u64) -> Result<()> {
        match &self.backing {
            None => {
                out.fill(0);
                Ok(())
            }
            Some(b) => {
                let bsize = b.virtual_size();
                let inside = bsize.saturating_sub(pos).min(out.len() as u64) as usize;
                let (head, tail) = out.split_at_mut(inside);
                if !head.is_empty() {
                    b.read_at(head, pos)?;
                }
                tail.fill(0);
                Ok(())
            }
        }
    }
}

/// Iterator over an image's extents; see [`Image::extents`].
pub struct Extents<'a> {
    image: &'a Image,
    pos: u64,
    end: u64,
    pending: Option<Extent>,
    failed: bool,
}

impl Iterator for Extents<'_> {
    type Item = Result<Extent>;

    fn next(&mut self) -> Option<Result<Extent>> {
        if self.failed {
            return None;
        }
        loop {
            if self.pos >= self.end {
                return self.pending.take().map(Ok);
            }
            let e = match self.image.block_status(self.pos, self.end - self.pos) {
                Ok(e) if e.length > 0 => e,
                Ok(_) => {
                    self.failed = true;
                    return Some(Err(Error::invalid(format!(
                        "no progress mapping guest offset {:#x}",
                        self.pos
                    ))));
                }
                Err(err) => {
                    self.failed = true;
                    return Some(Err(err));
                }
            };
            self.pos = e.end();
            match &mut self.pending {
                Some(p) if p.kind == e.kind && p.depth == e.depth => p.length += e.length,
                Some(_) => return self.pending.replace(e).map(Ok),
                None => self.pending = Some(e),
            }
        }
    }
}
