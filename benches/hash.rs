//! Block hash speed: the keyed BLAKE3 sync uses (`engine::sync::block_hash`)
//! vs XXH3-128 with a per-session secret-derived seed, one core, on
//! incompressible blocks in memory (L2-sized working set and beyond).
//! `cargo bench --bench hash` prints GB/s for each and the ratio.
//!
//! Why BLAKE3 was kept: XXH3 is not a keyed PRF, so a guest that can write
//! chosen blocks could aim for collisions; BLAKE3 keyed is, and at 64 KiB
//! blocks it runs at several GB/s per core with AVX2, above what a disk
//! delivers to one hashing thread.

use std::time::Instant;

fn main() {
    let key = [0x42u8; 32];
    let total: usize = 1 << 30;
    let mut data = vec![0u8; 64 << 20];
    let mut x = 0x9e3779b97f4a7c15u64;
    for c in data.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    println!("| block | BLAKE3 keyed GB/s | XXH3-128 GB/s | BLAKE3 / XXH3 time |");
    println!("|---:|---:|---:|---:|");
    for bs in [4usize << 10, 64 << 10, 1 << 20] {
        let t = Instant::now();
        let mut done = 0;
        let mut i = 0u64;
        while done < total {
            for b in data.chunks_exact(bs) {
                let h = imgsync::engine::sync::block_hash(&key, i, b).unwrap();
                std::hint::black_box(h);
                i += 1;
            }
            done += data.len();
        }
        let blake = done as f64 / t.elapsed().as_secs_f64() / 1e9;
        let seed = u64::from_le_bytes(key[..8].try_into().unwrap());
        let t = Instant::now();
        let mut done = 0;
        while done < total {
            for b in data.chunks_exact(bs) {
                std::hint::black_box(xxhash_rust::xxh3::xxh3_128_with_seed(b, seed));
            }
            done += data.len();
        }
        let xxh = done as f64 / t.elapsed().as_secs_f64() / 1e9;
        println!(
            "| {} KiB | {blake:.2} | {xxh:.2} | {:.2} |",
            bs >> 10,
            xxh / blake
        );
    }
}
