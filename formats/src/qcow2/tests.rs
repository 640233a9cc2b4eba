//! Malformed-input tests for the QCOW2 reader. A minimal valid image is built
//! by hand in memory (a comment per field), checked to map and read back, and
//! then broken one field at a time: each rejection is one named test that
//! asserts the error says what is wrong. Reading hostile bytes must give a
//! clear error or well-defined zeros, never a panic.

use std::io::Write;
use std::sync::Arc;

use super::header::{
    EXT_FEATURE_TABLE, INCOMPAT_COMPRESSION, INCOMPAT_CORRUPT, INCOMPAT_EXTL2, MAGIC,
};
use super::test_bytes::*;
use super::test_bytes::{put16, put32, put64};
use super::*;
use crate::{ErrorKind, Extent, ExtentKind, Image, Layer};

/// The header with `compression_type` padded to 8 bytes, as qemu writes it;
/// the extension area starts here.
const HEADER_LENGTH: u32 = 112;

// Host layout of the hand-built image, in clusters.
const L1_CLUSTER: u64 = 1;
const REFCOUNT_TABLE_CLUSTER: u64 = 2;
const REFCOUNT_BLOCK_CLUSTER: u64 = 3;
const L2_CLUSTER: u64 = 4;
const DATA_CLUSTER: u64 = 5;
/// Only present when built with a compressed cluster.
const COMPRESSED_CLUSTER: u64 = 6;

// Guest layout: cluster 0 data, 1 zero, 2 unallocated, 3 compressed (or
// unallocated).
const GUEST_CLUSTERS: u64 = 4;
const GUEST_DATA: u64 = 0;
const GUEST_ZERO: u64 = 1;
const GUEST_COMPRESSED: u64 = 3;

/// How to build the image.
#[derive(Clone, Copy)]
struct Spec {
    cluster_bits: u32,
    extended_l2: bool,
    /// Put a compressed cluster at guest cluster 3, compressed this way.
    compressed: Option<CompressionType>,
}

impl Default for Spec {
    fn default() -> Spec {
        Spec {
            cluster_bits: 16,
            extended_l2: false,
            compressed: None,
        }
    }
}

/// Contents of the plain data cluster.
fn data_byte(i: u64) -> u8 {
    (i % 251) as u8 ^ 0xa5
}

/// Contents of the compressed cluster (compressible text).
fn compressed_contents(cs: u64) -> Vec<u8> {
    let text = b"imgsync compressed cluster ";
    (0..cs)
        .map(|i| text[(i % text.len() as u64) as usize] ^ (i / 4096) as u8)
        .collect()
}

/// A valid version 3 image: header, L1 table, refcount table and block, one
/// L2 table, one data cluster (and maybe one compressed cluster), every
/// cluster with refcount 1, so `qemu-img check` would call it clean.
fn build(spec: Spec) -> Vec<u8> {
    let cb = spec.cluster_bits;
    let cs = 1u64 << cb;
    let at = |cluster: u64| cluster * cs;
    let clusters = if spec.compressed.is_some() { 7 } else { 6 };
    let mut b = vec![0u8; (clusters * cs) as usize];

    let mut incompatible = 0;
    if spec.extended_l2 {
        incompatible |= INCOMPAT_EXTL2;
    }
    if spec.compressed == Some(CompressionType::Zstd) {
        incompatible |= INCOMPAT_COMPRESSION;
    }
    put32(&mut b, H_MAGIC, MAGIC); // magic: "QFI\xfb"
    put32(&mut b, H_VERSION, 3); // version
    put64(&mut b, H_BACKING_FILE_OFFSET, 0); // backing_file_offset: none
    put32(&mut b, H_BACKING_FILE_SIZE, 0); // backing_file_size
    put32(&mut b, H_CLUSTER_BITS, cb); // cluster_bits
    put64(&mut b, H_SIZE, GUEST_CLUSTERS * cs); // size: virtual size in bytes
    put32(&mut b, H_CRYPT_METHOD, 0); // crypt_method: none
    put32(&mut b, H_L1_SIZE, 1); // l1_size: one L2 table maps everything
    put64(&mut b, H_L1_TABLE_OFFSET, at(L1_CLUSTER)); // l1_table_offset
    let refcount_table = at(REFCOUNT_TABLE_CLUSTER);
    put64(&mut b, H_REFCOUNT_TABLE_OFFSET, refcount_table); // refcount_table_offset
    put32(&mut b, H_REFCOUNT_TABLE_CLUSTERS, 1); // refcount_table_clusters
    put32(&mut b, H_NB_SNAPSHOTS, 0); // nb_snapshots
    put64(&mut b, H_SNAPSHOTS_OFFSET, 0); // snapshots_offset
    put64(&mut b, H_INCOMPATIBLE_FEATURES, incompatible); // incompatible_features
    put64(&mut b, H_COMPATIBLE_FEATURES, 0); // compatible_features
    put64(&mut b, H_AUTOCLEAR_FEATURES, 0); // autoclear_features
    put32(&mut b, H_REFCOUNT_ORDER, 4); // refcount_order: 16-bit refcounts
    put32(&mut b, H_HEADER_LENGTH, HEADER_LENGTH); // header_length
    let zstd = spec.compressed == Some(CompressionType::Zstd);
    b[H_COMPRESSION_TYPE as usize] = u8::from(zstd); // compression_type: 0 zlib, 1 zstd
    put32(&mut b, u64::from(HEADER_LENGTH), 0); // header extension: end marker type
    put32(&mut b, u64::from(HEADER_LENGTH) + 4, 0); // ... and its length

    // L1 table: entry 0 is the L2 table, refcount exactly one (copied).
    put64(&mut b, at(L1_CLUSTER), at(L2_CLUSTER) | OFLAG_COPIED);
    // Refcount table: entry 0 is the refcount block.
    put64(
        &mut b,
        at(REFCOUNT_TABLE_CLUSTER),
        at(REFCOUNT_BLOCK_CLUSTER),
    );
    // Refcount block: every cluster of the file is used once.
    for c in 0..clusters {
        put16(&mut b, at(REFCOUNT_BLOCK_CLUSTER) + 2 * c, 1);
    }

    // L2 table: 8-byte entries, or 16 with extended L2 (entry, then the
    // subcluster bitmap: bits 0-31 allocated, bits 32-63 reads as zeros).
    let entry_size = if spec.extended_l2 { 16 } else { 8 };
    let l2e = |guest_cluster: u64| at(L2_CLUSTER) + guest_cluster * entry_size;
    // Guest cluster 0: the data cluster, refcount one.
    put64(&mut b, l2e(GUEST_DATA), at(DATA_CLUSTER) | OFLAG_COPIED);
    if spec.extended_l2 {
        put64(&mut b, l2e(GUEST_DATA) + 8, 0xffff_ffff); // all 32 subclusters allocated
    }
    // Guest cluster 1: reads as zeros.
    if spec.extended_l2 {
        put64(&mut b, l2e(GUEST_ZERO) + 8, 0xffff_ffff << 32); // all 32 subclusters zero
    } else {
        put64(&mut b, l2e(GUEST_ZERO), OFLAG_ZERO);
    }
    // Guest cluster 2 (and 3 without compression): unallocated, entry 0.

    // The data cluster.
    let data = at(DATA_CLUSTER) as usize;
    for (i, byte) in b[data..data + cs as usize].iter_mut().enumerate() {
        *byte = data_byte(i as u64);
    }

    if let Some(ty) = spec.compressed {
        let packed = compress(ty, &compressed_contents(cs));
        let host = at(COMPRESSED_CLUSTER);
        assert!(packed.len() as u64 <= cs, "test cluster does not compress");
        b[host as usize..host as usize + packed.len()].copy_from_slice(&packed);
        put64(
            &mut b,
            l2e(GUEST_COMPRESSED),
            compressed_entry(cb, host, packed.len() as u64),
        );
    }
    b
}

/// Raw deflate (qemu's zlib type has no zlib header) or a zstd frame.
fn compress(ty: CompressionType, data: &[u8]) -> Vec<u8> {
    match ty {
        CompressionType::Zlib => {
            let mut e =
                flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        CompressionType::Zstd => zstd::bulk::compress(data, 3).unwrap(),
    }
}

/// A compressed cluster descriptor (spec, "Compressed Clusters Descriptor"):
/// bit 62 set, bits 0..x-1 the host offset, bits x..61 the number of 512-byte
/// sectors after the first, where x = 62 - (cluster_bits - 8).
fn compressed_entry(cluster_bits: u32, host_offset: u64, len: u64) -> u64 {
    let x = 62 - (cluster_bits - 8);
    let end = host_offset + len;
    let sectors = end.div_ceil(512) - host_offset / 512;
    OFLAG_COMPRESSED | ((sectors - 1) << x) | host_offset
}

fn cluster_size(b: &[u8]) -> u64 {
    1 << u32::from_be_bytes(
        b[H_CLUSTER_BITS as usize..H_CLUSTER_BITS as usize + 4]
            .try_into()
            .unwrap(),
    )
}
fn cluster_at(b: &[u8], cluster: u64) -> u64 {
    cluster * cluster_size(b)
}
/// Offset of the L2 entry for `guest_cluster` (standard 8-byte entries).
fn l2_entry_at(b: &[u8], guest_cluster: u64) -> u64 {
    cluster_at(b, L2_CLUSTER) + guest_cluster * 8
}

fn open(b: Vec<u8>) -> Result<Qcow2> {
    Qcow2::open(Arc::new(b))
}

fn image(b: Vec<u8>) -> Image {
    Image::new(Layer::Qcow2(open(b).unwrap()))
}

fn extents(img: &Image) -> Result<Vec<Extent>> {
    img.all_extents().collect()
}

fn read(img: &Image, offset: u64, len: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0xeeu8; len as usize];
    img.read_at(&mut buf, offset)?;
    Ok(buf)
}

/// Opens, maps and reads the whole image; the first error on the way.
fn walk(b: Vec<u8>) -> Result<()> {
    let img = Image::new(Layer::Qcow2(open(b)?));
    extents(&img)?;
    read(&img, 0, img.virtual_size())?;
    Ok(())
}

/// The error `walk` must find.
#[track_caller]
fn walk_err(b: Vec<u8>) -> Error {
    match walk(b) {
        Ok(()) => panic!("the image was accepted"),
        Err(e) => e,
    }
}

#[track_caller]
fn open_err(b: Vec<u8>) -> Error {
    match open(b) {
        Ok(q) => panic!("the image was opened: {q:?}"),
        Err(e) => e,
    }
}

#[track_caller]
fn assert_says(e: &Error, needles: &[&str]) {
    let msg = e.to_string();
    for n in needles {
        assert!(msg.contains(n), "error {msg:?} does not mention {n:?}");
    }
}

fn ext(start: u64, length: u64, kind: ExtentKind) -> Extent {
    Extent {
        start,
        length,
        kind,
        depth: 0,
    }
}

// ---- The hand-built image is valid -------------------------------------

#[test]
fn hand_built_image_maps_like_qemu_img() {
    let img = image(build(Spec::default()));
    let cs = 1 << 16;
    assert_eq!(img.virtual_size(), 4 * cs);
    assert_eq!(
        extents(&img).unwrap(),
        [
            ext(0, cs, ExtentKind::Data),
            ext(cs, cs, ExtentKind::Zero),
            ext(2 * cs, 2 * cs, ExtentKind::Unallocated),
        ]
    );
    let q = img.qcow2().unwrap();
    assert_eq!(
        q.lookup(100, 4 * cs).unwrap(),
        Mapping {
            kind: ClusterKind::Data {
                host_offset: DATA_CLUSTER * cs + 100
            },
            len: cs - 100,
        }
    );
}

#[test]
fn hand_built_image_reads_back_its_data() {
    let img = image(build(Spec::default()));
    let cs = 1u64 << 16;
    let all = read(&img, 0, img.virtual_size()).unwrap();
    let expected: Vec<u8> = (0..cs).map(data_byte).collect();
    assert_eq!(all[..cs as usize], expected[..]);
    assert!(all[cs as usize..].iter().all(|&b| b == 0));
    // An unaligned read across the data/zero boundary.
    let part = read(&img, cs - 10, 20).unwrap();
    assert_eq!(part[..10], expected[cs as usize - 10..]);
    assert_eq!(part[10..], [0; 10]);
}

#[test]
fn zero_cluster_reads_zeros() {
    let img = image(build(Spec::default()));
    let cs = 1u64 << 16;
    // `read` prefills with 0xee: zeros must be written, not left alone.
    assert_eq!(read(&img, cs, cs).unwrap(), vec![0; cs as usize]);
    assert_eq!(read(&img, cs + 512, 100).unwrap(), vec![0; 100]);
}

#[test]
fn zero_cluster_with_copied_bit_and_offset_zero_reads_zeros() {
    // qemu's QCOW2_CLUSTER_ZERO_PLAIN whatever the copied bit says.
    let mut b = build(Spec::default());
    let at = l2_entry_at(&b, GUEST_ZERO);
    put64(&mut b, at, OFLAG_ZERO | OFLAG_COPIED);
    let img = image(b);
    let cs = 1u64 << 16;
    assert_eq!(read(&img, cs, cs).unwrap(), vec![0; cs as usize]);
}

#[test]
fn small_cluster_image_reads_back() {
    let img = image(build(Spec {
        cluster_bits: 9,
        ..Spec::default()
    }));
    assert_eq!(
        extents(&img).unwrap(),
        [
            ext(0, 512, ExtentKind::Data),
            ext(512, 512, ExtentKind::Zero),
            ext(1024, 1024, ExtentKind::Unallocated),
        ]
    );
    let expected: Vec<u8> = (0..512).map(data_byte).collect();
    assert_eq!(read(&img, 0, 512).unwrap(), expected);
}

#[track_caller]
fn check_compressed(spec: Spec) {
    let cs = 1u64 << spec.cluster_bits;
    let img = image(build(spec));
    assert_eq!(
        extents(&img).unwrap(),
        [
            ext(0, cs, ExtentKind::Data),
            ext(cs, cs, ExtentKind::Zero),
            ext(2 * cs, cs, ExtentKind::Unallocated),
            ext(3 * cs, cs, ExtentKind::Data),
        ]
    );
    let want = compressed_contents(cs);
    assert_eq!(read(&img, 3 * cs, cs).unwrap(), want);
    // A read from the middle of the compressed cluster.
    assert_eq!(read(&img, 3 * cs + 1000, 3000).unwrap(), want[1000..4000]);
}

#[test]
fn deflate_compressed_cluster_reads_back() {
    check_compressed(Spec {
        compressed: Some(CompressionType::Zlib),
        ..Spec::default()
    });
}

#[test]
fn zstd_compressed_cluster_reads_back() {
    check_compressed(Spec {
        compressed: Some(CompressionType::Zstd),
        ..Spec::default()
    });
}

#[test]
fn deflate_compressed_small_cluster_reads_back() {
    // 512-byte clusters: the descriptor has one bit of sector count.
    let spec = Spec {
        cluster_bits: 9,
        compressed: Some(CompressionType::Zlib),
        ..Spec::default()
    };
    let cs = 512;
    let img = image(build(spec));
    assert_eq!(read(&img, 3 * cs, cs).unwrap(), compressed_contents(cs));
}

#[test]
fn extended_l2_image_reads_back() {
    let img = image(build(Spec {
        extended_l2: true,
        ..Spec::default()
    }));
    let cs = 1u64 << 16;
    assert_eq!(
        extents(&img).unwrap(),
        [
            ext(0, cs, ExtentKind::Data),
            ext(cs, cs, ExtentKind::Zero),
            ext(2 * cs, 2 * cs, ExtentKind::Unallocated),
        ]
    );
    let expected: Vec<u8> = (0..cs).map(data_byte).collect();
    assert_eq!(read(&img, 0, cs).unwrap(), expected);
}

#[test]
fn extended_l2_subclusters_map_separately() {
    // Guest cluster 0: subclusters 0-3 allocated, 4-7 zero, the rest
    // unallocated (2 KiB subclusters of a 64 KiB cluster).
    let mut b = build(Spec {
        extended_l2: true,
        ..Spec::default()
    });
    let bitmap_at = cluster_at(&b, L2_CLUSTER) + 8;
    put64(&mut b, bitmap_at, 0x0000_00f0_0000_000f);
    let img = image(b);
    let sc = 2048;
    assert_eq!(
        extents(&img).unwrap(),
        [
            ext(0, 4 * sc, ExtentKind::Data),
            ext(4 * sc, 4 * sc, ExtentKind::Zero),
            ext(8 * sc, 24 * sc, ExtentKind::Unallocated),
            ext(32 * sc, 32 * sc, ExtentKind::Zero),
            ext(64 * sc, 64 * sc, ExtentKind::Unallocated),
        ]
    );
    let got = read(&img, 0, 8 * sc).unwrap();
    let expected: Vec<u8> = (0..4 * sc).map(data_byte).collect();
    assert_eq!(got[..4 * sc as usize], expected[..]);
    assert!(got[4 * sc as usize..].iter().all(|&b| b == 0));
}

// ---- Header rejections ---------------------------------------------------

#[test]
fn bad_magic_is_rejected() {
    let mut b = build(Spec::default());
    b[3] = 0xfc;
    let e = open_err(b);
    assert_says(&e, &["magic", "0x514649fc"]);
    assert_eq!(e.kind(), ErrorKind::Invalid);
}

#[test]
fn version_1_is_rejected() {
    let mut b = build(Spec::default());
    put32(&mut b, H_VERSION, 1);
    let e = open_err(b);
    assert_says(&e, &["version 1"]);
    assert_eq!(e.kind(), ErrorKind::Unsupported);
}

#[test]
fn version_4_is_rejected() {
    let mut b = build(Spec::default());
    put32(&mut b, H_VERSION, 4);
    let e = open_err(b);
    assert_says(&e, &["version 4"]);
    assert_eq!(e.kind(), ErrorKind::Unsupported);
}

#[test]
fn cluster_bits_8_is_rejected() {
    let mut b = build(Spec::default());
    put32(&mut b, H_CLUSTER_BITS, 8);
    assert_says(&open_err(b.clone()), &["cluster_bits 8"]);
    assert_says(
        &Header::parse(&b, b.len() as u64).unwrap_err(),
        &["cluster_bits 8"],
    );
}

#[test]
fn cluster_bits_22_is_rejected() {
    let mut b = build(Spec::default());
    put32(&mut b, H_CLUSTER_BITS, 22);
    assert_says(&open_err(b.clone()), &["cluster_bits 22"]);
    assert_says(
        &Header::parse(&b, b.len() as u64).unwrap_err(),
        &["cluster_bits 22"],
    );
}

#[test]
fn huge_l1_size_is_rejected() {
    let mut b = build(Spec::default());
    put32(&mut b, H_L1_SIZE, 0x7fff_ffff);
    assert_says(&open_err(b), &["l1_size", "exceeds the limit"]);
}

#[test]
fn l1_table_too_small_for_the_virtual_size_is_rejected() {
    let mut b = build(Spec::default());
    put32(&mut b, H_L1_SIZE, 0);
    assert_says(&open_err(b), &["too small for the virtual size"]);
}

#[test]
fn l1_table_past_eof_is_rejected() {
    let mut b = build(Spec::default());
    let past = b.len() as u64;
    put64(&mut b, H_L1_TABLE_OFFSET, past);
    assert_says(&open_err(b), &["L1 table", "beyond the end of the file"]);
}

#[test]
fn l1_table_misaligned_is_rejected() {
    let mut b = build(Spec::default());
    put64(&mut b, H_L1_TABLE_OFFSET, 0x10200);
    assert_says(&open_err(b), &["L1 table", "0x10200", "not aligned"]);
}

#[test]
fn refcount_table_past_eof_is_rejected() {
    let mut b = build(Spec::default());
    put64(&mut b, H_REFCOUNT_TABLE_OFFSET, 100 << 16);
    assert_says(
        &open_err(b),
        &["refcount table", "beyond the end of the file"],
    );
}

#[test]
fn virtual_size_of_2_pow_62_is_rejected() {
    let mut b = build(Spec::default());
    put64(&mut b, H_SIZE, 1 << 62);
    assert_says(&open_err(b), &["virtual size", "exceeds the limit"]);
}

#[test]
fn virtual_size_of_2_pow_63_is_rejected() {
    let mut b = build(Spec::default());
    put64(&mut b, H_SIZE, 1 << 63);
    assert_says(&open_err(b), &["virtual size", "exceeds the limit"]);
}

#[test]
fn overlong_backing_file_name_is_rejected() {
    let mut b = build(Spec::default());
    put64(&mut b, H_BACKING_FILE_OFFSET, 0x200);
    put32(&mut b, H_BACKING_FILE_SIZE, 1024);
    b[0x200..0x600].fill(b'a');
    assert_says(&open_err(b), &["backing file name length 1024"]);
}

#[test]
fn backing_file_name_outside_the_first_cluster_is_rejected() {
    let mut b = build(Spec::default());
    put64(&mut b, H_BACKING_FILE_OFFSET, 0xfff0);
    put32(&mut b, H_BACKING_FILE_SIZE, 32);
    assert_says(
        &open_err(b),
        &["backing file name", "outside the header cluster"],
    );
}

#[test]
fn backing_file_name_is_read() {
    let mut b = build(Spec::default());
    put64(&mut b, H_BACKING_FILE_OFFSET, 0x200);
    put32(&mut b, H_BACKING_FILE_SIZE, 8);
    b[0x200..0x208].copy_from_slice(b"base.raw");
    let q = open(b).unwrap();
    assert_eq!(q.header().backing_file.as_deref(), Some("base.raw"));
}

#[test]
fn unknown_incompatible_feature_bit_is_rejected() {
    let mut b = build(Spec::default());
    put64(&mut b, H_INCOMPATIBLE_FEATURES, 1 << 10);
    let e = open_err(b);
    assert_says(&e, &["unsupported incompatible features", "bit 10"]);
    assert_eq!(e.kind(), ErrorKind::Unsupported);
}

#[test]
fn unknown_incompatible_feature_bit_is_named_from_the_feature_table() {
    let mut b = build(Spec::default());
    put64(&mut b, H_INCOMPATIBLE_FEATURES, 1 << 10);
    // Feature name table extension: type, length, one 48-byte entry
    // (feature type 0 = incompatible, bit number, NUL-padded name), then the
    // end marker.
    let at = u64::from(HEADER_LENGTH);
    put32(&mut b, at, EXT_FEATURE_TABLE);
    put32(&mut b, at + 4, 48);
    b[at as usize + 8] = 0; // incompatible
    b[at as usize + 9] = 10; // bit 10
    let name = b"frobnicated clusters";
    b[at as usize + 10..at as usize + 10 + name.len()].copy_from_slice(name);
    put64(&mut b, at + 8 + 48, 0); // end of extensions
    assert_says(&open_err(b), &["frobnicated clusters (bit 10)"]);
}

#[test]
fn header_extension_overrunning_its_cluster_is_rejected() {
    let mut b = build(Spec::default());
    let at = u64::from(HEADER_LENGTH);
    put32(&mut b, at, 0x1234_5678); // an unknown extension type
    put32(&mut b, at + 4, 0x1_0000); // 64 KiB of data: past the first cluster
    assert_says(
        &open_err(b),
        &["header extension", "overruns the header cluster"],
    );
}

#[test]
fn header_length_past_the_cluster_is_rejected() {
    let mut b = build(Spec {
        cluster_bits: 9,
        ..Spec::default()
    });
    put32(&mut b, H_HEADER_LENGTH, 1024);
    assert_says(&open_err(b), &["header_length 1024", "cluster size"]);
}

#[test]
fn zstd_without_its_incompatible_bit_is_rejected() {
    let mut b = build(Spec::default());
    b[H_COMPRESSION_TYPE as usize] = 1;
    assert_says(&open_err(b), &["zstd", "bit 3", "disagree"]);
}

#[test]
fn unknown_compression_type_is_rejected() {
    let mut b = build(Spec::default());
    b[H_COMPRESSION_TYPE as usize] = 2;
    put64(&mut b, H_INCOMPATIBLE_FEATURES, INCOMPAT_COMPRESSION);
    assert_says(&open_err(b), &["compression type 2"]);
}

#[test]
fn corrupt_bit_is_rejected() {
    let mut b = build(Spec::default());
    put64(&mut b, H_INCOMPATIBLE_FEATURES, INCOMPAT_CORRUPT);
    assert_says(&open_err(b.clone()), &["marked corrupt"]);
    // `check` may still open it.
    assert!(Qcow2::open_with(
        Arc::new(b),
        OpenOptions {
            allow_corrupt: true
        }
    )
    .is_ok());
}

#[test]
fn encrypted_image_is_rejected() {
    let mut b = build(Spec::default());
    put32(&mut b, H_CRYPT_METHOD, 1);
    let e = open_err(b);
    assert_says(&e, &["encrypted", "crypt_method 1"]);
    assert_eq!(e.kind(), ErrorKind::Unsupported);
}

#[test]
fn extended_l2_with_small_clusters_is_rejected() {
    let mut b = build(Spec {
        cluster_bits: 12,
        ..Spec::default()
    });
    put64(&mut b, H_INCOMPATIBLE_FEATURES, INCOMPAT_EXTL2);
    assert_says(&open_err(b), &["extended L2", "16 KiB"]);
}

#[test]
fn refcount_order_7_is_rejected() {
    let mut b = build(Spec::default());
    put32(&mut b, H_REFCOUNT_ORDER, 7);
    assert_says(&open_err(b), &["refcount_order 7"]);
}

// ---- L2 table and cluster rejections -----------------------------------

#[test]
fn l2_table_past_eof_is_rejected() {
    let mut b = build(Spec::default());
    let l1 = cluster_at(&b, L1_CLUSTER);
    put64(&mut b, l1, (100 << 16) | OFLAG_COPIED);
    assert_says(
        &walk_err(b),
        &["L2 table", "0x640000", "beyond the end of the file"],
    );
}

#[test]
fn l2_table_misaligned_is_rejected() {
    let mut b = build(Spec::default());
    let l1 = cluster_at(&b, L1_CLUSTER);
    put64(&mut b, l1, ((L2_CLUSTER << 16) + 0x200) | OFLAG_COPIED);
    assert_says(&walk_err(b), &["L2 table", "0x40200", "not aligned"]);
}

#[test]
fn l2_table_in_the_header_is_rejected() {
    // Offset 0x200 with 64 KiB clusters: inside the header cluster (and
    // misaligned; the header is the more useful thing to say).
    let mut b = build(Spec::default());
    let l1 = cluster_at(&b, L1_CLUSTER);
    put64(&mut b, l1, 0x200 | OFLAG_COPIED);
    assert_says(&walk_err(b), &["L2 table", "points into the image header"]);
}

#[test]
fn l1_entry_with_offset_zero_is_unallocated() {
    // Spec: an L1 offset of 0 means the L2 table is unallocated, whatever
    // the copied bit says (qemu reads it so).
    let mut b = build(Spec::default());
    let l1 = cluster_at(&b, L1_CLUSTER);
    put64(&mut b, l1, OFLAG_COPIED);
    let img = image(b);
    assert_eq!(
        extents(&img).unwrap(),
        [ext(0, 4 << 16, ExtentKind::Unallocated)]
    );
}

#[test]
fn data_cluster_past_eof_is_rejected() {
    let mut b = build(Spec::default());
    let at = l2_entry_at(&b, GUEST_DATA);
    put64(&mut b, at, (100 << 16) | OFLAG_COPIED);
    assert_says(
        &walk_err(b),
        &["data cluster", "0x640000", "beyond the end of the file"],
    );
}

#[test]
fn data_cluster_misaligned_is_rejected() {
    let mut b = build(Spec::default());
    let at = l2_entry_at(&b, GUEST_DATA);
    put64(&mut b, at, ((DATA_CLUSTER << 16) + 0x200) | OFLAG_COPIED);
    assert_says(&walk_err(b), &["data cluster", "0x50200", "not aligned"]);
}

#[test]
fn data_cluster_in_the_header_is_rejected() {
    let mut b = build(Spec::default());
    let at = l2_entry_at(&b, GUEST_DATA);
    put64(&mut b, at, 0x200 | OFLAG_COPIED);
    assert_says(
        &walk_err(b),
        &["data cluster", "points into the image header"],
    );
}

#[test]
fn data_cluster_at_offset_zero_with_copied_bit_is_rejected() {
    // Host offset 0 with bit 63 set is only valid with an external data file
    // (spec, "Standard Cluster Descriptor"); without one it names the header,
    // and must not silently read as unallocated.
    let mut b = build(Spec::default());
    let at = l2_entry_at(&b, GUEST_DATA);
    put64(&mut b, at, OFLAG_COPIED);
    let e = walk_err(b);
    assert_says(&e, &["data cluster", "0x0", "points into the image header"]);
    assert_eq!(e.kind(), ErrorKind::Invalid);
}

#[test]
fn extended_l2_data_cluster_at_offset_zero_with_copied_bit_is_rejected() {
    let mut b = build(Spec {
        extended_l2: true,
        ..Spec::default()
    });
    let at = cluster_at(&b, L2_CLUSTER);
    put64(&mut b, at, OFLAG_COPIED);
    put64(&mut b, at + 8, 0);
    assert_says(&walk_err(b), &["points into the image header"]);
}

#[test]
fn compressed_cluster_past_eof_is_rejected() {
    let mut b = build(Spec::default());
    let at = l2_entry_at(&b, GUEST_COMPRESSED);
    put64(&mut b, at, compressed_entry(16, 100 << 16, 1000));
    assert_says(
        &walk_err(b),
        &[
            "compressed cluster",
            "0x640000",
            "beyond the end of the file",
        ],
    );
}

#[test]
fn compressed_cluster_in_the_header_is_rejected() {
    let mut b = build(Spec::default());
    let at = l2_entry_at(&b, GUEST_COMPRESSED);
    put64(&mut b, at, compressed_entry(16, 0x200, 1000));
    assert_says(
        &walk_err(b),
        &["compressed cluster", "points into the image header"],
    );
}

#[test]
fn compressed_cluster_overlapping_eof_is_read_as_far_as_it_goes() {
    // The descriptor's length is rounded up to sectors and may run past the
    // end of the file for the last cluster (qemu reads what is there).
    let mut b = build(Spec {
        compressed: Some(CompressionType::Zlib),
        ..Spec::default()
    });
    let cs = 1u64 << 16;
    let packed_len = compress(CompressionType::Zlib, &compressed_contents(cs)).len();
    b.truncate(cluster_at(&b, COMPRESSED_CLUSTER) as usize + packed_len);
    let img = image(b);
    assert_eq!(read(&img, 3 * cs, cs).unwrap(), compressed_contents(cs));
}

/// The hand-built image with its compressed cluster's descriptor covering
/// `sectors` sectors from its (sector-aligned) host offset, and the file
/// cut `short` bytes before the end of the last of them.
fn compressed_cluster_cut(sectors: u64, short: u64) -> Vec<u8> {
    let mut b = build(Spec {
        compressed: Some(CompressionType::Zlib),
        ..Spec::default()
    });
    let host = cluster_at(&b, COMPRESSED_CLUSTER);
    let at = l2_entry_at(&b, GUEST_COMPRESSED);
    put64(&mut b, at, compressed_entry(16, host, sectors * 512));
    b.truncate((host + sectors * 512 - short) as usize);
    b
}

#[test]
fn compressed_cluster_reaching_past_eof_by_its_last_sector_is_rejected() {
    // The file ends one byte into the descriptor's last sector: valid (qemu
    // writes such files), and map needs no data.
    let img = image(compressed_cluster_cut(3, 511));
    assert_eq!(
        extents(&img).unwrap()[3],
        ext(3 << 16, 1 << 16, ExtentKind::Data)
    );
    // Nothing of the last sector is in the file: the descriptor claims
    // bytes the file does not have. Found by map, before any data is read.
    for short in [512, 513, 1024] {
        let b = compressed_cluster_cut(3, short);
        let host = cluster_at(&b, COMPRESSED_CLUSTER);
        let err = extents(&image(b)).unwrap_err();
        assert_says(
            &err,
            &[
                "compressed cluster",
                &format!("{host:#x}"),
                "beyond the end of the file",
            ],
        );
    }
}

#[test]
fn deflate_cluster_that_does_not_decompress_is_rejected() {
    let mut b = build(Spec {
        compressed: Some(CompressionType::Zlib),
        ..Spec::default()
    });
    // 0xff: a final block of the reserved type 3.
    let host = cluster_at(&b, COMPRESSED_CLUSTER) as usize;
    b[host..host + 512].fill(0xff);
    assert_says(&walk_err(b), &["compressed cluster", "does not decompress"]);
}

#[test]
fn deflate_cluster_that_ends_early_is_rejected() {
    // A valid stream of fewer bytes than a cluster.
    let mut b = build(Spec {
        compressed: Some(CompressionType::Zlib),
        ..Spec::default()
    });
    let packed = compress(CompressionType::Zlib, b"too short");
    let host = cluster_at(&b, COMPRESSED_CLUSTER);
    b[host as usize..host as usize + 512].fill(0);
    b[host as usize..host as usize + packed.len()].copy_from_slice(&packed);
    let at = l2_entry_at(&b, GUEST_COMPRESSED);
    put64(&mut b, at, compressed_entry(16, host, packed.len() as u64));
    assert_says(
        &walk_err(b),
        &["does not decompress", "ends after 9 of 65536"],
    );
}

#[test]
fn zstd_cluster_that_does_not_decompress_is_rejected() {
    let mut b = build(Spec {
        compressed: Some(CompressionType::Zstd),
        ..Spec::default()
    });
    let host = cluster_at(&b, COMPRESSED_CLUSTER) as usize;
    b[host..host + 4].copy_from_slice(b"junk");
    assert_says(
        &walk_err(b),
        &["compressed cluster", "does not decompress", "zstd"],
    );
}

#[test]
fn extended_l2_bitmap_allocated_and_zero_is_rejected() {
    let mut b = build(Spec {
        extended_l2: true,
        ..Spec::default()
    });
    let bitmap_at = cluster_at(&b, L2_CLUSTER) + 8;
    put64(&mut b, bitmap_at, 0x0000_0001_0000_0001); // subcluster 0 both
    assert_says(&walk_err(b), &["both allocated and zero", "0x100000001"]);
}

#[test]
fn extended_l2_allocated_subclusters_in_an_unallocated_cluster_are_rejected() {
    let mut b = build(Spec {
        extended_l2: true,
        ..Spec::default()
    });
    // Guest cluster 2: entry 0, but a subcluster marked allocated.
    let at = cluster_at(&b, L2_CLUSTER) + 2 * 16;
    put64(&mut b, at + 8, 1);
    assert_says(
        &walk_err(b),
        &["allocated subclusters in an unallocated cluster"],
    );
}

#[test]
fn extended_l2_compressed_cluster_with_a_bitmap_is_rejected() {
    let mut b = build(Spec {
        extended_l2: true,
        ..Spec::default()
    });
    let at = cluster_at(&b, L2_CLUSTER) + 3 * 16;
    put64(&mut b, at, compressed_entry(16, DATA_CLUSTER << 16, 512));
    put64(&mut b, at + 8, 1);
    assert_says(
        &walk_err(b),
        &["compressed cluster", "non-zero subcluster bitmap"],
    );
}

// ---- Truncated files -----------------------------------------------------

#[test]
fn file_truncated_inside_the_header_is_rejected() {
    let b = build(Spec::default());
    for (cut, needle) in [
        (0, "too short"),
        (3, "too short"),
        (23, "too short"),
        (24, "too short"),
        (71, "too short"),
        (100, "too short for a qcow2 version 3 header"),
        (108, "beyond the end of the file"),
        (200, "beyond the end of the file"),
        (0xffff, "beyond the end of the file"),
    ] {
        let e = open_err(b[..cut].to_vec());
        let msg = e.to_string();
        assert!(
            msg.contains(needle),
            "cut at {cut}: {msg:?} lacks {needle:?}"
        );
    }
}

#[test]
fn file_truncated_inside_the_l1_table_is_rejected() {
    let b = build(Spec::default());
    let cut = cluster_at(&b, L1_CLUSTER) as usize + 4;
    assert_says(
        &open_err(b[..cut].to_vec()),
        &["L1 table", "beyond the end of the file"],
    );
}

#[test]
fn file_truncated_inside_the_l2_table_is_rejected() {
    let b = build(Spec::default());
    let cut = cluster_at(&b, L2_CLUSTER) as usize + 8;
    assert_says(
        &walk_err(b[..cut].to_vec()),
        &["L2 table", "beyond the end of the file"],
    );
}

#[test]
fn file_truncated_inside_a_data_cluster_reads_zeros_past_the_end() {
    // As qemu's file driver: the cluster starts inside the file, and what
    // the file lacks reads as zeros.
    let b = build(Spec::default());
    let cut = cluster_at(&b, DATA_CLUSTER) as usize + 1000;
    let img = image(b[..cut].to_vec());
    let got = read(&img, 0, 4096).unwrap();
    let expected: Vec<u8> = (0..1000).map(data_byte).collect();
    assert_eq!(got[..1000], expected[..]);
    assert!(got[1000..].iter().all(|&b| b == 0));
}

#[test]
fn file_truncated_anywhere_never_panics() {
    for spec in [
        Spec::default(),
        Spec {
            cluster_bits: 9,
            compressed: Some(CompressionType::Zlib),
            ..Spec::default()
        },
        Spec {
            extended_l2: true,
            compressed: Some(CompressionType::Zstd),
            ..Spec::default()
        },
    ] {
        let b = build(spec);
        let cs = 1usize << spec.cluster_bits;
        let step = (cs / 16).max(1);
        let mut cuts: Vec<usize> = (0..b.len()).step_by(step).collect();
        cuts.extend((1..b.len() / cs).flat_map(|c| [c * cs - 1, c * cs + 1, c * cs + 8]));
        for cut in cuts {
            // Any result is fine, as long as it is a result.
            let _ = walk(b[..cut].to_vec());
        }
    }
}
