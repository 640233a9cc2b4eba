//! Decompression of QCOW2 compressed clusters: raw deflate (qemu
//! `qcow2_zlib_decompress`) and zstd (`qcow2_zstd_decompress`). Both must fill
//! the whole output cluster; trailing input (sector padding) is ignored.

use super::CompressionType;

/// The largest zstd window a compressed cluster needs (clusters are at most
/// 2 MiB); a frame asking for more is refused instead of allocating it.
const ZSTD_MAX_WINDOW_LOG: u32 = 22;

pub fn decompress(ty: CompressionType, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match ty {
        CompressionType::Zlib => inflate_raw(input, out),
        CompressionType::Zstd => zstd_decompress(input, out),
    }
}

fn inflate_raw(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    let mut d = flate2::Decompress::new(false);
    // One call with the whole input; like qemu, success means the output is
    // full (the stream may or may not have reached its end marker).
    loop {
        let before_in = d.total_in();
        let before_out = d.total_out();
        let at_in = before_in as usize;
        let at_out = before_out as usize;
        let status = d
            .decompress(
                input.get(at_in..).unwrap_or(&[]),
                out.get_mut(at_out..).unwrap_or(&mut []),
                flate2::FlushDecompress::Finish,
            )
            .map_err(|e| format!("deflate: {e}"))?;
        if d.total_out() as usize >= out.len() {
            return Ok(());
        }
        let progressed = d.total_in() != before_in || d.total_out() != before_out;
        if status == flate2::Status::StreamEnd || !progressed {
            return Err(format!(
                "deflate stream ends after {} of {} bytes",
                d.total_out(),
                out.len()
            ));
        }
    }
}

fn zstd_decompress(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    use zstd::stream::raw::{DParameter, Decoder, InBuffer, Operation, OutBuffer};
    let mut d = Decoder::new().map_err(|e| format!("zstd: {e}"))?;
    d.set_parameter(DParameter::WindowLogMax(ZSTD_MAX_WINDOW_LOG))
        .map_err(|e| format!("zstd: {e}"))?;
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    loop {
        let (in_before, out_before) = (inb.pos(), outb.pos());
        let hint = d
            .run(&mut inb, &mut outb)
            .map_err(|e| format!("zstd: {e}"))?;
        if outb.pos() == outb.capacity() {
            return Ok(());
        }
        if hint == 0 || (inb.pos() == in_before && outb.pos() == out_before) {
            return Err(format!(
                "zstd frame ends after {} of {} bytes",
                outb.pos(),
                outb.capacity()
            ));
        }
    }
}

/// The deflate window qemu uses for compressed clusters (`qcow2_compress`:
/// windowBits -12). A stream using a larger window would not inflate in qemu.
const DEFLATE_WINDOW_BITS: u8 = 12;

/// zstd level for compressed clusters: qemu's choice (`ZSTD_CLEVEL_DEFAULT`).
pub const ZSTD_DEFAULT_LEVEL: i32 = 3;

/// Compresses whole clusters for a QCOW2 writer, reusing one context (keep
/// one per thread).
pub struct ClusterCompressor {
    ty: CompressionType,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    deflate: Option<flate2::Compress>,
}

impl ClusterCompressor {
    pub fn new(ty: CompressionType) -> std::io::Result<ClusterCompressor> {
        let (zstd, deflate) = match ty {
            CompressionType::Zstd => (Some(zstd::bulk::Compressor::new(ZSTD_DEFAULT_LEVEL)?), None),
            CompressionType::Zlib => (
                None,
                Some(flate2::Compress::new_with_window_bits(
                    flate2::Compression::default(),
                    false,
                    DEFLATE_WINDOW_BITS,
                )),
            ),
        };
        Ok(ClusterCompressor { ty, zstd, deflate })
    }

    pub fn compression_type(&self) -> CompressionType {
        self.ty
    }

    /// Compresses `input` (one cluster) into `out`. Returns false, with `out`
    /// unspecified, when the result would not be smaller than the input: such
    /// a cluster is stored uncompressed (as qemu does).
    pub fn compress(&mut self, input: &[u8], out: &mut Vec<u8>) -> std::io::Result<bool> {
        out.clear();
        // Anything not strictly smaller is useless: size the buffer so
        // that a bigger result fails instead of growing.
        let limit = input.len().saturating_sub(1);
        out.reserve(limit);
        if let Some(z) = &mut self.zstd {
            return match z.compress_to_buffer(input, out) {
                Ok(n) => Ok(n < input.len()),
                // "Destination buffer is too small".
                Err(_) => Ok(false),
            };
        }
        if let Some(d) = &mut self.deflate {
            d.reset();
            out.resize(limit, 0);
            let status = d
                .compress(input, out, flate2::FlushCompress::Finish)
                .map_err(std::io::Error::other)?;
            let n = d.total_out() as usize;
            out.truncate(n);
            return Ok(status == flate2::Status::StreamEnd && n < input.len());
        }
        Ok(false)
    }
}
