//! The content digest. Each CHUNK carries the BLAKE3 hash of its cell's
//! guest content (the data segments with their offsets; zero segments are
//! implied by their absence), and the stream's digest is the BLAKE3 hash of
//! the chunks' starts and hashes in order. The receiver checks every chunk
//! against its hash after decompressing it (before writing) and the
//! stream's digest against the sender's END before the output is put in
//! place, so a lost, repeated, reordered or altered chunk is an error.

/// Hash of one cell's data segments: `(offset, data)` pairs, absolute guest
/// offsets, in order.
pub fn chunk_hash<'a>(segments: impl IntoIterator<Item = (u64, &'a [u8])>) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for (off, data) in segments {
        h.update(&off.to_le_bytes());
        h.update(&(data.len() as u64).to_le_bytes());
        h.update(data);
    }
    *h.finalize().as_bytes()
}

/// The running digest over a stream's chunks.
#[derive(Clone, Debug, Default)]
pub struct StreamDigest {
    h: blake3::Hasher,
    pub chunks: u64,
}

impl StreamDigest {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn add(&mut self, start: u64, len: u32, hash: &[u8; 32]) {
        self.h.update(&start.to_le_bytes());
        self.h.update(&len.to_le_bytes());
        self.h.update(hash);
        self.chunks += 1;
    }
    pub fn finish(&self) -> [u8; 32] {
        *self.h.finalize().as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_and_order_matter() {
        let a = chunk_hash([(0, &b"ab"[..]), (10, &b"c"[..])]);
        assert_ne!(a, chunk_hash([(0, &b"ab"[..]), (11, &b"c"[..])]));
        assert_ne!(a, chunk_hash([(0, &b"a"[..]), (10, &b"bc"[..])]));
        let mut s1 = StreamDigest::new();
        s1.add(0, 4, &a);
        s1.add(4, 4, &[0; 32]);
        let mut s2 = StreamDigest::new();
        s2.add(4, 4, &[0; 32]);
        s2.add(0, 4, &a);
        assert_ne!(s1.finish(), s2.finish());
    }
}
