//! The QCOW2 writer against the reader and the checker: arbitrary bytes
//! choose a cluster size, a virtual size and a sequence of cluster writes
//! (plain, short, compressed with zlib or zstd); the image written must
//! open, pass `check` with no corruption or leak, and read back exactly what
//! was written, zeros elsewhere.
#![no_main]

use std::sync::{Arc, Mutex};

use imgsync_formats::qcow2::check::check;
use imgsync_formats::qcow2::compress::ClusterCompressor;
use imgsync_formats::qcow2::writer::{ClusterData, Qcow2Writer, WriterOptions};
use imgsync_formats::qcow2::{CompressionType, Qcow2};
use imgsync_formats::Storage;
use libfuzzer_sys::fuzz_target;

/// Guest clusters written per input at most (work bound).
const MAX_WRITES: usize = 600;

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else { return };
    let Some((&size_byte, rest)) = rest.split_first() else { return };
    // 512 B to 16 KiB clusters keep inputs fast and cross refcount windows.
    let cluster_bits = 9 + u32::from(head % 6);
    let ty = if head & 0x80 != 0 { CompressionType::Zstd } else { CompressionType::Zlib };
    let cs = 1u64 << cluster_bits;
    let clusters_total = 1 + u64::from(size_byte) * 4;
    let tail = u64::from(head & 0x40 != 0) * 100; // an unaligned virtual size
    let virtual_size = clusters_total * cs - tail;
    let opts = WriterOptions { virtual_size, cluster_bits, compression_type: ty };
    let out = Mutex::new(Vec::new());
    let mut w = Qcow2Writer::new(&out, opts).expect("writer");
    let mut comp = ClusterCompressor::new(ty).expect("compressor");
    let mut expected = vec![0u8; virtual_size as usize];
    let mut idx = 0u64;
    // Owned cluster payloads, flushed in batches through write_clusters
    // (a batch ends where an op says so), to exercise vectored runs.
    let mut batch: Vec<(u64, bool, Vec<u8>)> = Vec::new();
    let flush = |w: &mut Qcow2Writer<&Mutex<Vec<u8>>>, batch: &mut Vec<(u64, bool, Vec<u8>)>| {
        let items: Vec<(u64, ClusterData<'_>)> = batch
            .iter()
            .map(|(i, c, b)| (*i, if *c { ClusterData::Compressed(b) } else { ClusterData::Plain(b) }))
            .collect();
        w.write_clusters(&items).expect("write clusters");
        batch.clear();
    };
    let mut buf = Vec::new();
    for op in rest.chunks(2).take(MAX_WRITES) {
        let (step, fill) = (op[0], *op.get(1).unwrap_or(&0));
        idx += u64::from(step & 0x1f);
        if idx >= clusters_total {
            break;
        }
        let start = (idx * cs) as usize;
        let len = (cs as usize).min(virtual_size as usize - start);
        // Compressible content for even fills, noise for odd ones.
        let mut content: Vec<u8> = (0..len)
            .map(|i| if fill & 1 == 0 { fill ^ (i / 64) as u8 } else { (i as u8).wrapping_mul(fill).wrapping_add((i >> 8) as u8 ^ (i as u8 >> 3)) })
            .collect();
        let mut compressed = false;
        if step & 0x80 != 0 {
            let mut padded = content.clone();
            padded.resize(cs as usize, 0);
            if comp.compress(&padded, &mut buf).expect("compress") {
                compressed = true;
            }
        }
        expected[start..start + len].copy_from_slice(&content);
        if compressed {
            content = buf.clone();
        }
        batch.push((idx, compressed, content));
        if step & 0x40 != 0 {
            flush(&mut w, &mut batch);
        }
        idx += 1;
    }
    flush(&mut w, &mut batch);
    w.finish().expect("finish");
    let bytes = out.into_inner().expect("lock");
    let q = Qcow2::open(Arc::new(bytes) as Arc<dyn Storage>).expect("written image opens");
    let report = check(&q).expect("check runs");
    assert!(report.is_clean(), "written image is not clean: {report:?}");
    let mut got = vec![0u8; virtual_size as usize];
    q.read_at(&mut got, 0, &mut |o, _| {
        o.fill(0);
        Ok(())
    })
    .expect("read back");
    assert!(got == expected, "written image reads back different");
});
