//! The receiving end of the protocol on hostile bytes: frames are read
//! (length limits, checksums), decoded (every message type), and CHUNK
//! streams go through the receiver's order/bounds checks and its
//! decompression and hash check. Nothing may panic, hang, or allocate
//! beyond the limits.
#![no_main]

use std::sync::Arc;

use imgsync::engine::pipeline::{BufPool, Source};
use imgsync::engine::remote::{ChunkFrames, FrameSource};
use imgsync::protocol::{FrameReader, Limits, Message};
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits {
    max_frame: 1 << 20,
    max_chunk: 1 << 20,
};

fuzz_target!(|data: &[u8]| {
    // The first byte picks how the rest is read.
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        // Any sequence of frames, any message type.
        let mut fr = FrameReader::new(rest, LIMITS.max_frame);
        while let Ok((k, p)) = fr.read_frame() {
            let _ = Message::decode(k, p, &LIMITS);
        }
    } else {
        // A CHUNK stream into a 64 MiB image with 64 KiB clusters.
        let mut fr = FrameReader::new(rest, LIMITS.max_frame);
        let pool = BufPool::new(2);
        let mut frames = ChunkFrames::new(&mut fr, LIMITS, 64 << 20, 1 << 16);
        for job in &mut frames {
            let Ok(job) = job else { break };
            if FrameSource.chunk(job, &pool).is_err() {
                break;
            }
        }
        let _ = frames.check_end();
        let _ = Arc::strong_count(&pool);
    }
});
