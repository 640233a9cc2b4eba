//! Mapping and reading arbitrary bytes as an image: as QCOW2 (L1/L2 walk,
//! extended L2 bitmaps, compressed clusters) and as raw. The work per input is
//! bounded: at most MAX_EXTENTS extents, and at most MAX_READ guest bytes read
//! from the starts of the first extents.
#![no_main]

use std::sync::Arc;

use imgsync_formats::qcow2::Qcow2;
use imgsync_formats::raw::Raw;
use imgsync_formats::{Image, Layer, Storage};
use libfuzzer_sys::fuzz_target;

const MAX_EXTENTS: usize = 10_000;
/// Guest bytes read per input, in total.
const MAX_READ: u64 = 256 << 10;
/// Guest bytes read from the start of one extent.
const MAX_READ_PER_EXTENT: u64 = 64 << 10;

fn exercise(image: &Image) {
    let size = image.virtual_size();
    let mut starts = Vec::new();
    for (n, e) in image.all_extents().enumerate() {
        if n >= MAX_EXTENTS {
            break;
        }
        let Ok(e) = e else { break };
        assert!(
            e.length > 0 && e.end() <= size,
            "bad extent {e:?} in size {size:#x}"
        );
        if starts.len() < 16 {
            starts.push((e.start, e.length));
        }
    }
    let mut budget = MAX_READ;
    let mut buf = Vec::new();
    for (start, len) in starts {
        let n = len.min(MAX_READ_PER_EXTENT).min(budget);
        if n == 0 {
            break;
        }
        budget -= n;
        buf.resize(n as usize, 0);
        let _ = image.read_at(&mut buf, start);
    }
    // A read straddling the virtual size must fail, not panic.
    let mut tail = [0u8; 4096];
    let _ = image.read_at(&mut tail, size.saturating_sub(100));
}

fuzz_target!(|data: &[u8]| {
    let file: Arc<dyn Storage> = Arc::new(data.to_vec());
    if let Ok(q) = Qcow2::open(file.clone()) {
        exercise(&Image::new(Layer::Qcow2(q)));
    }
    if let Ok(r) = Raw::open(file) {
        exercise(&Image::new(Layer::Raw(r)));
    }
});
