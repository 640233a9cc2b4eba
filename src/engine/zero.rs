//! Zero detection: which parts of a data buffer are runs of zeros long
//! enough (`-S`) to become holes. Scanned in 512-byte sectors aligned to
//! guest offsets, like qemu-img convert's `is_allocated_sectors_min`: a zero
//! run shorter than the minimum stays data, so a sector is never split and
//! a single non-zero byte keeps its sector as data.

/// The scan granularity.
pub const SECTOR: u64 = 512;

/// A run of guest bytes inside a chunk: data to write, or zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub len: u64,
    pub data: bool,
}

impl Segment {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Whether every byte is zero. Folds 64-byte blocks with OR (no early exit
/// inside a block, so the compiler vectorizes it).
pub fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    for c in &mut chunks {
        let mut acc = 0u64;
        for w in c.chunks_exact(8) {
            acc |= u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
        }
        if acc != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// Appends `seg` to `out`, merging it with the last segment when adjacent
/// and of the same kind.
pub fn push_segment(out: &mut Vec<Segment>, seg: Segment) {
    if seg.len == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.data == seg.data && last.end() == seg.offset {
            last.len += seg.len;
            return;
        }
    }
    out.push(seg);
}

/// Splits the data at guest `[offset, offset + buf.len())` into data and
/// zero segments appended to `out`; zero runs shorter than `min_run` bytes
/// stay data. `min_run == 0` keeps everything as data without scanning.
/// Returns the bytes found zero.
pub fn split_zeros(buf: &[u8], offset: u64, min_run: u64, out: &mut Vec<Segment>) -> u64 {
    let end = offset + buf.len() as u64;
    if min_run == 0 {
        push_segment(
            out,
            Segment {
                offset,
                len: buf.len() as u64,
                data: true,
            },
        );
        return 0;
    }
    let mut zeros = 0;
    let mut run_start: Option<u64> = None;
    let mut pos = offset;
    let mut close_run = |out: &mut Vec<Segment>, start: u64, stop: u64| {
        let len = stop - start;
        let data = len < min_run;
        if !data {
            zeros += len;
        }
        push_segment(
            out,
            Segment {
                offset: start,
                len,
                data,
            },
        );
    };
    while pos < end {
        let sector_end = ((pos / SECTOR + 1) * SECTOR).min(end);
        let slice = &buf[(pos - offset) as usize..(sector_end - offset) as usize];
        if is_zero(slice) {
            run_start.get_or_insert(pos);
        } else {
            if let Some(start) = run_start.take() {
                close_run(out, start, pos);
            }
            push_segment(
                out,
                Segment {
                    offset: pos,
                    len: sector_end - pos,
                    data: true,
                },
            );
        }
        pos = sector_end;
    }
    if let Some(start) = run_start {
        close_run(out, start, end);
    }
    zeros
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(buf: &[u8], offset: u64, min: u64) -> Vec<(u64, u64, bool)> {
        let mut out = Vec::new();
        split_zeros(buf, offset, min, &mut out);
        out.iter().map(|s| (s.offset, s.len, s.data)).collect()
    }

    #[test]
    fn is_zero_sees_every_byte() {
        for len in [0usize, 1, 63, 64, 65, 4096, 4097] {
            let mut b = vec![0u8; len];
            assert!(is_zero(&b));
            for i in 0..len {
                b[i] = 1;
                assert!(!is_zero(&b), "len {len} byte {i}");
                b[i] = 0;
            }
        }
    }

    /// A 4 KiB block that is zero but for its first or last byte: the
    /// sector holding that byte stays data, the zero runs around it (>= 4 KiB)
    /// become holes.
    #[test]
    fn block_zero_but_first_or_last_byte_stays_data() {
        let mut b = vec![0u8; 12288];
        b[4096] = 0xff;
        assert_eq!(
            split(&b, 0, 4096),
            vec![(0, 4096, false), (4096, 512, true), (4608, 7680, false)]
        );
        let mut b = vec![0u8; 12288];
        b[8191] = 0xff;
        assert_eq!(
            split(&b, 0, 4096),
            vec![(0, 7680, false), (7680, 512, true), (8192, 4096, false)]
        );
    }

    #[test]
    fn runs_shorter_than_the_minimum_stay_data() {
        let mut b = vec![0u8; 8192];
        b[0] = 1;
        b[8191] = 1;
        // 7168 zero bytes between the first and last sectors.
        assert_eq!(split(&b, 0, 8192), vec![(0, 8192, true)]);
        assert_eq!(
            split(&b, 0, 4096),
            vec![(0, 512, true), (512, 7168, false), (7680, 512, true)]
        );
    }

    #[test]
    fn min_run_zero_keeps_everything() {
        let b = vec![0u8; 8192];
        assert_eq!(split(&b, 4096, 0), vec![(4096, 8192, true)]);
        assert_eq!(split(&b, 4096, 512), vec![(4096, 8192, false)]);
    }

    #[test]
    fn unaligned_offsets_follow_guest_sectors() {
        let mut b = vec![0u8; 2000];
        b[100] = 7; // guest offset 400 + 100 = 500, in sector 0
        let segs = split(&b, 400, 512);
        assert_eq!(segs, vec![(400, 112, true), (512, 1888, false)]);
    }
}
