//! The files sync leaves beside DST, on hostile bytes: an undo journal
//! (opened as a rerun does, then rolled back onto a scratch DST; with
//! mode bit 1 its header is patched to name that DST) and a hash
//! cache (every check but DST's identity, then read to the end). Nothing
//! may panic, hang, or allocate out of proportion to the file.
#![no_main]

use std::path::PathBuf;

use imgsync::io::hashcache::Cache;
use imgsync::io::journal::{self, DstId, Journal};
use libfuzzer_sys::fuzz_target;

fn scratch() -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let d = base.join(format!("imgsync-fuzz-sync-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let dir = scratch();
    if mode & 1 == 0 {
        let j = dir.join(".dst.imgsync-journal");
        let dst = dir.join("dst");
        std::fs::write(&dst, vec![0x5a; 64 << 10]).unwrap();
        let id = DstId::of(&std::fs::File::open(&dst).unwrap()).unwrap();
        // Mode bit 1: the header is made to name the scratch DST (its
        // checksum fixed), so the bytes after it are reached.
        let mut rest = rest.to_vec();
        if mode & 2 != 0 && rest.len() >= 100 {
            if let DstId::File { dev, ino } = id {
                rest[68..72].copy_from_slice(&1u32.to_be_bytes());
                rest[72..80].copy_from_slice(&dev.to_be_bytes());
                rest[80..88].copy_from_slice(&ino.to_be_bytes());
                rest[88..96].fill(0);
                let crc = crc32fast::hash(&rest[..96]);
                rest[96..100].copy_from_slice(&crc.to_be_bytes());
            }
        }
        let rest = &rest[..];
        std::fs::write(&j, rest).unwrap();
        if let Ok(Some(mut jr)) = Journal::open(&j, &id) {
            let _ = jr.is_journaled(0);
            let _ = jr.entries();
            let _ = jr.record(1, None);
            drop(jr);
        }
        std::fs::write(&j, rest).unwrap();
        let _ = journal::rollback(&dst, &j);
        let _ = std::fs::remove_file(&j);
        let _ = std::fs::remove_file(&dst);
    } else {
        // Block size and size from the next bytes; the rest is the file.
        if rest.len() < 9 {
            return;
        }
        let bs = 1u32 << (12 + (rest[0] % 13));
        let size = u64::from_le_bytes(rest[1..9].try_into().unwrap()) >> (rest[0] % 40);
        let c = dir.join(".dst.imgsync-hashes");
        std::fs::write(&c, &rest[9..]).unwrap();
        if let Some(mut cache) = Cache::open_unverified(&c, bs, size) {
            let mut v = Vec::new();
            loop {
                cache.read_batch(&mut v, 4096).unwrap();
                if v.is_empty() {
                    break;
                }
            }
        }
        let _ = std::fs::remove_file(&c);
    }
});
