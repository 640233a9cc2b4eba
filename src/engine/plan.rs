//! Planning: which guest ranges hold data, cut into jobs on a fixed grid so
//! that an output cluster never spans two jobs. Only the image's metadata is
//! consulted; holes, zero and unallocated clusters are never read.

use imgsync_formats::{Extent, ExtentKind, Extents, Image};

use super::{Error, Result};

/// One unit of work: the grid cell `[start, start + len)` and the data
/// ranges inside it (absolute guest offsets, in order). The rest of the cell
/// reads as zeros.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub seq: u64,
    pub start: u64,
    pub len: u64,
    pub data: Vec<(u64, u64)>,
}

impl Job {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
    pub fn data_bytes(&self) -> u64 {
        self.data.iter().map(|d| d.1).sum()
    }
}

/// What a pass over the map found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataSummary {
    pub virtual_size: u64,
    /// The length of a raw copy: a raw source's exact file length (its
    /// virtual size is rounded up to a sector), else the virtual size.
    pub content_size: u64,
    /// Bytes in data extents (what will be read).
    pub data_bytes: u64,
    /// Number of data extents.
    pub data_extents: u64,
    /// Grid cells of `unit` bytes that hold data (an upper bound of the
    /// output clusters a QCOW2 writer allocates with clusters of `unit`).
    pub data_units: u64,
}

/// Walks the map once and sums the data (for progress totals and the free
/// space check).
pub fn summarize(image: &Image, unit: u64) -> Result<DataSummary> {
    let mut s = DataSummary {
        virtual_size: image.virtual_size(),
        content_size: image.content_size(),
        ..Default::default()
    };
    let mut last_unit: Option<u64> = None;
    for e in image.all_extents() {
        let e = e.map_err(Error::Source)?;
        if e.kind != ExtentKind::Data {
            continue;
        }
        s.data_bytes += e.length;
        s.data_extents += 1;
        let first = e.start / unit;
        let last = (e.end() - 1) / unit;
        let overlap = u64::from(last_unit == Some(first));
        s.data_units += last - first + 1 - overlap;
        last_unit = Some(last);
    }
    Ok(s)
}

/// The jobs of an image, in guest order; see [`Job`].
pub struct Jobs<'a> {
    extents: Extents<'a>,
    grid: u64,
    size: u64,
    pending: Option<Job>,
    /// The part of the current data extent not yet placed in a job.
    rest: Option<(u64, u64)>,
    seq: u64,
    done: bool,
}

/// Jobs for every grid cell of `grid` bytes that holds data.
pub fn jobs(image: &Image, grid: u64) -> Jobs<'_> {
    Jobs {
        extents: image.all_extents(),
        grid: grid.max(1),
        size: image.virtual_size(),
        pending: None,
        rest: None,
        seq: 0,
        done: false,
    }
}

impl Iterator for Jobs<'_> {
    type Item = Result<Job>;

    fn next(&mut self) -> Option<Result<Job>> {
        if self.done {
            return None;
        }
        loop {
            let (start, end) = match self.rest.take() {
                Some(r) => r,
                None => match self.extents.next() {
                    None => {
                        self.done = true;
                        return self.pending.take().map(Ok);
                    }
                    Some(Err(e)) => {
                        self.done = true;
                        return Some(Err(Error::Source(e)));
                    }
                    Some(Ok(Extent {
                        kind: ExtentKind::Data,
                        start,
                        length,
                        ..
                    })) => (start, start + length),
                    Some(Ok(_)) => continue,
                },
            };
            let cell_start = start / self.grid * self.grid;
            let cell_end = (cell_start + self.grid).min(self.size);
            let piece_end = end.min(cell_end);
            if piece_end < end {
                self.rest = Some((piece_end, end));
            }
            match &mut self.pending {
                Some(job) if job.start == cell_start => match job.data.last_mut() {
                    Some(last) if last.0 + last.1 == start => last.1 += piece_end - start,
                    _ => job.data.push((start, piece_end - start)),
                },
                _ => {
                    let job = Job {
                        seq: self.seq,
                        start: cell_start,
                        len: cell_end - cell_start,
                        data: vec![(start, piece_end - start)],
                    };
                    self.seq += 1;
                    if let Some(done) = self.pending.replace(job) {
                        return Some(Ok(done));
                    }
                }
            }
        }
    }
}
