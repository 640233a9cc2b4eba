//! Frames: a 12-byte header (type u8, flags u8, reserved u16, payload
//! length u32, crc32 u32, all big-endian) and the payload. The crc32 covers
//! the first 8 header bytes and the payload, so a flipped bit anywhere is
//! caught. A payload longer than the negotiated limit is refused before
//! anything is allocated for it.

use std::io::{Read, Write};

use super::{Error, Result};

pub const HEADER_LEN: usize = 12;

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub len: u32,
    pub crc: u32,
}

/// Decodes a header, refusing lengths over `max_len` and non-zero flag or
/// reserved bytes (this version defines none).
pub fn decode_header(h: &[u8; HEADER_LEN], max_len: u32) -> Result<Header> {
    let kind = h[0];
    let len = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
    let crc = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
    if len > max_len {
        return Err(Error::TooLong {
            len: len.into(),
            limit: max_len.into(),
        });
    }
    if h[1] != 0 || h[2] != 0 || h[3] != 0 {
        return Err(Error::Malformed {
            what: "frame",
            why: format!(
                "reserved header bytes {:02x}{:02x}{:02x} set",
                h[1], h[2], h[3]
            ),
        });
    }
    Ok(Header { kind, len, crc })
}

fn crc_of(head: &[u8], payload: &[u8]) -> u32 {
    let mut c = crc32fast::Hasher::new();
    c.update(head);
    c.update(payload);
    c.finalize()
}

/// Builds a whole frame (header and payload) into one buffer, so workers
/// can encode frames in parallel and the writer only copies bytes out.
/// `fill` appends the payload to the vector it is given.
pub fn build(kind: u8, fill: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut v = Vec::new();
    build_into(&mut v, kind, fill);
    v
}

/// [`build`] into a reused vector (cleared first).
pub fn build_into(v: &mut Vec<u8>, kind: u8, fill: impl FnOnce(&mut Vec<u8>)) {
    v.clear();
    v.extend_from_slice(&[0u8; HEADER_LEN]);
    fill(v);
    let len = (v.len() - HEADER_LEN) as u32;
    v[0] = kind;
    v[4..8].copy_from_slice(&len.to_be_bytes());
    let crc = crc_of(&v[..8], &v[HEADER_LEN..]);
    v[8..12].copy_from_slice(&crc.to_be_bytes());
}

/// Reads frames, checking length limits and checksums, and counts bytes.
pub struct FrameReader<R> {
    inner: R,
    max_len: u32,
    buf: Vec<u8>,
    /// The bytes of the first header as they arrived (even a partial one),
    /// so a stream that is not ours (a shell banner, a raw image on `-`)
    /// can be shown for what it is.
    first: Option<Vec<u8>>,
    /// Bytes read so far (headers included).
    pub bytes: u64,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R, max_len: u32) -> Self {
        FrameReader {
            inner,
            max_len,
            buf: Vec::new(),
            first: None,
            bytes: 0,
        }
    }

    /// The first bytes the stream carried (up to one header), once a read
    /// was attempted.
    pub fn first_bytes(&self) -> Option<&[u8]> {
        self.first.as_deref()
    }

    pub fn set_max_len(&mut self, max_len: u32) {
        self.max_len = max_len;
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    /// The next frame: its type and payload (valid until the next call).
    /// A clean end of stream before a header is [`Error::Eof`].
    pub fn read_frame(&mut self) -> Result<(u8, &[u8])> {
        let mut h = [0u8; HEADER_LEN];
        if self.first.is_none() {
            let mut got = 0;
            let r = read_some(&mut self.inner, &mut h, &mut got);
            self.first = Some(h[..got].to_vec());
            r?;
        } else {
            read_full(&mut self.inner, &mut h, true)?;
        }
        let header = decode_header(&h, self.max_len)?;
        self.buf.clear();
        // Bounded by max_len, checked above; filled as it arrives so a
        // lying peer costs no more memory than it sends.
        let len = header.len as usize;
        let mut got = 0;
        while got < len {
            let step = (len - got).min(1 << 20);
            self.buf.resize(got + step, 0);
            read_full(&mut self.inner, &mut self.buf[got..got + step], false)?;
            got += step;
        }
        if crc_of(&h[..8], &self.buf) != header.crc {
            return Err(Error::Checksum {
                kind: header.kind,
                len: header.len,
            });
        }
        self.bytes += (HEADER_LEN + len) as u64;
        Ok((header.kind, &self.buf))
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8], eof_ok_at_start: bool) -> Result<()> {
    let mut got = 0;
    read_into(r, buf, &mut got, eof_ok_at_start)
}

/// [`read_full`] of a first header, counting what arrived in `got`.
fn read_some(r: &mut impl Read, buf: &mut [u8], got: &mut usize) -> Result<()> {
    read_into(r, buf, got, true)
}

fn read_into(
    r: &mut impl Read,
    buf: &mut [u8],
    got: &mut usize,
    eof_ok_at_start: bool,
) -> Result<()> {
    while *got < buf.len() {
        match r.read(&mut buf[*got..]) {
            Ok(0) => {
                return Err(if *got == 0 && eof_ok_at_start {
                    Error::Eof
                } else {
                    Error::Malformed {
                        what: "frame",
                        why: "the stream ended inside a frame".to_string(),
                    }
                })
            }
            Ok(n) => *got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Read(e)),
        }
    }
    Ok(())
}

/// A test-only fault hook: `IMGSYNC_TEST_CORRUPT_FRAME=N` flips one payload
/// bit of the N-th frame (counting from 0) after its checksum was computed,
/// so tests can show that corruption in transit is caught.
fn corrupt_frame_index() -> Option<u64> {
    std::env::var("IMGSYNC_TEST_CORRUPT_FRAME")
        .ok()
        .and_then(|v| v.parse().ok())
}

/// Writes frames and counts bytes.
pub struct FrameWriter<W> {
    inner: W,
    frames: u64,
    corrupt: Option<u64>,
    scratch: Vec<u8>,
    /// Bytes written so far (headers included).
    pub bytes: u64,
}

impl<W: Write> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        FrameWriter {
            inner,
            frames: 0,
            corrupt: corrupt_frame_index(),
            scratch: Vec::new(),
            bytes: 0,
        }
    }

    pub fn into_inner(self) -> W {
        self.inner
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Writes a frame whose payload `fill` appends.
    pub fn write_frame(&mut self, kind: u8, fill: impl FnOnce(&mut Vec<u8>)) -> Result<()> {
        let mut v = std::mem::take(&mut self.scratch);
        build_into(&mut v, kind, fill);
        let r = self.write_built(&v);
        self.scratch = v;
        r
    }

    /// Writes a frame made by [`build`].
    pub fn write_built(&mut self, frame: &[u8]) -> Result<()> {
        let n = self.frames;
        self.frames += 1;
        if self.corrupt == Some(n) && frame.len() > HEADER_LEN {
            let mut bad = frame.to_vec();
            let last = bad.len() - 1;
            bad[last] ^= 0x10;
            self.inner.write_all(&bad).map_err(Error::Write)?;
        } else {
            self.inner.write_all(frame).map_err(Error::Write)?;
        }
        self.bytes += frame.len() as u64;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        self.inner.flush().map_err(Error::Write)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_frame() {
        let f = build(7, |v| v.extend_from_slice(b"abc"));
        // type 7, flags 0, reserved 0, length 3, crc32 of the 8 header bytes + "abc".
        let crc = crc_of(&[7, 0, 0, 0, 0, 0, 0, 3], b"abc");
        let mut want = vec![7, 0, 0, 0, 0, 0, 0, 3];
        want.extend_from_slice(&crc.to_be_bytes());
        want.extend_from_slice(b"abc");
        assert_eq!(f, want);
        // crc32 (IEEE) as Python's zlib.crc32 computes it.
        assert_eq!(crc, 0x9a6c_9351);
    }

    #[test]
    fn round_trip_and_byte_counts() {
        let mut w = FrameWriter::new(Vec::new());
        w.write_frame(1, |v| v.extend_from_slice(&[9; 100]))
            .unwrap();
        w.write_frame(2, |_| {}).unwrap();
        let bytes = w.bytes;
        let data = w.into_inner();
        assert_eq!(bytes, data.len() as u64);
        let mut r = FrameReader::new(&data[..], 1000);
        assert_eq!(r.read_frame().unwrap(), (1, &[9u8; 100][..]));
        assert_eq!(r.read_frame().unwrap(), (2, &[][..]));
        assert!(matches!(r.read_frame(), Err(Error::Eof)));
        assert_eq!(r.bytes, bytes);
    }

    #[test]
    fn oversized_length_is_refused_before_reading() {
        let mut h = vec![1u8, 0, 0, 0];
        h.extend_from_slice(&u32::MAX.to_be_bytes());
        h.extend_from_slice(&[0; 4]);
        let mut r = FrameReader::new(&h[..], 1 << 20);
        match r.read_frame() {
            Err(Error::TooLong { len, limit }) => {
                assert_eq!(len, u64::from(u32::MAX));
                assert_eq!(limit, 1 << 20);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let f = build(5, |v| v.extend_from_slice(b"payload bytes"));
        for bit in 0..f.len() * 8 {
            let mut bad = f.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let mut r = FrameReader::new(&bad[..], 1 << 20);
            assert!(r.read_frame().is_err(), "bit {bit} flipped went unnoticed");
        }
    }

    #[test]
    fn truncated_frame_is_an_error_not_eof() {
        let f = build(5, |v| v.extend_from_slice(b"payload"));
        for cut in 1..f.len() {
            let mut r = FrameReader::new(&f[..cut], 1 << 20);
            assert!(
                matches!(r.read_frame(), Err(Error::Malformed { .. })),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn reserved_bytes_are_refused() {
        let mut f = build(5, |_| {});
        f[1] = 1;
        let mut r = FrameReader::new(&f[..], 10);
        assert!(matches!(r.read_frame(), Err(Error::Malformed { .. })));
    }
}
