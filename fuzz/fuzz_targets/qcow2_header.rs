//! Header parsing over arbitrary bytes: `Header::parse` on the bytes as the
//! first cluster, then the full opener (which also reads the L1 table) and
//! the snapshot table it points to. Nothing may panic or allocate more than
//! the input justifies.
#![no_main]

use std::sync::Arc;

use imgsync_formats::qcow2::{Header, Qcow2};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Header::parse(data, data.len() as u64);
    // The same bytes claiming to sit in a larger file: tables past the input
    // pass the size checks, so the parser's own bounds are what is tested.
    let _ = Header::parse(data, 1 << 40);
    if let Ok(q) = Qcow2::open(Arc::new(data.to_vec())) {
        let _ = q.snapshots();
    }
});
