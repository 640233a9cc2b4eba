//! Integration tests for reading raw and qcow2 images, with qemu-img as the
//! oracle. Each image case is built with qemu-img/qemu-io in a temp dir and
//! held to three oracles (see `common::check_against_qemu`):
//!   (a) `imgsync info --output json` agrees with `qemu-img info --output=json`
//!       on the shared keys;
//!   (b) `imgsync map --output json` agrees with `qemu-img map --output=json`
//!       as sets of data / zero / present byte ranges;
//!   (c) the guest view read through `open_image` + `read_at` equals
//!       `qemu-img convert -O raw` byte for byte.
//! The opener tests check refusals (loops, probed names, json:, missing
//! files): one line on stderr starting `imgsync: `, exit status 2 (1 for
//! `check`, as qemu-img check). `info` and `check` open no file but the
//! image: they show what it names instead of refusing.
//!
//! Without qemu-img every test prints SKIP and passes, unless
//! IMGSYNC_REQUIRE_QEMU=1.

use std::fs::OpenOptions as FsOpenOptions;
use std::os::unix::fs::FileExt;

use crate::common::{
    assert_one_line_error_code, check_against_qemu, explicit, probed, random_bytes, Created, Env,
    Op, Qcow2, KIB, MIB,
};
use imgsync::formats::Format;
use imgsync::io::{open_image, OpenOptions};
use Op::*;

const QCOW2: Format = Format::Qcow2;
const RAW: Format = Format::Raw;

/// A layout of writes for a cluster size `cs`: aligned and unaligned data,
/// writes crossing cluster and L2-table boundaries, zeroes and discards.
fn layout(cs: u64, size: u64) -> Vec<Op> {
    let l2_cov = cs / 8 * cs; // guest bytes one L2 table maps (standard entries)
    let mut ops = vec![
        Data(0, 3 * cs + 100),
        Data(cs * 7 + 1000, 5000),
        Pattern(0x5a, 2 * MIB - 4 * KIB, 12 * KIB),
        Data(5 * MIB, 512 * KIB),
        Zero(5 * MIB + 128 * KIB, 128 * KIB),
        ZeroUnmap(5 * MIB + 256 * KIB, 64 * KIB),
        Discard(5 * MIB + 384 * KIB, 64 * KIB),
        Zero(9 * MIB, 256 * KIB), // on unallocated clusters
        Data(15 * MIB - 3000, 3000),
    ];
    if l2_cov + cs <= size {
        ops.push(Data(l2_cov - cs / 2, cs)); // crosses an L2 table boundary
    }
    ops
}

/// `img.qcow2` made as `q` says, holding the `layout` for its cluster size.
fn qcow2_with_layout(env: &Env, q: Qcow2) -> Created<'_> {
    let size = q.size().expect("the image has a size of its own");
    let img = env.create("img.qcow2", q);
    img.write(&layout(cluster_size(env, "img.qcow2"), size))
}

fn cluster_size(env: &Env, img: &str) -> u64 {
    env.qemu_json(&["info", "--output=json", "-f", "qcow2", img])["cluster-size"]
        .as_u64()
        .expect("cluster-size")
}

/// Writes a raw file of `size` bytes with data at `chunks` (offset, length)
/// and holes elsewhere.
fn sparse_raw(env: &Env, name: &str, size: u64, chunks: &[(u64, u64)]) {
    let f = FsOpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(env.path(name))
        .expect("create raw");
    for (i, &(off, len)) in chunks.iter().enumerate() {
        f.write_all_at(&random_bytes(len as usize, 1000 + i as u64, false), off)
            .expect("write raw");
    }
    f.set_len(size).expect("truncate raw");
}

// ---------------------------------------------------------------------------
// qcow2 versions and cluster sizes

#[test]
fn qcow2_v2_compat_0_10() {
    let env = qemu_env!();
    qcow2_with_layout(&env, Qcow2::new(16 * MIB).compat("0.10"));
    check_against_qemu(&env, probed("img.qcow2", QCOW2));
}

#[test]
fn qcow2_v3_compat_1_1() {
    let env = qemu_env!();
    qcow2_with_layout(&env, Qcow2::new(16 * MIB).compat("1.1"));
    check_against_qemu(&env, probed("img.qcow2", QCOW2));
}

#[test]
fn cluster_size_512() {
    let env = qemu_env!();
    qcow2_with_layout(&env, Qcow2::new(16 * MIB).cluster(512));
    check_against_qemu(&env, probed("img.qcow2", QCOW2));
}

#[test]
fn cluster_size_4k() {
    let env = qemu_env!();
    qcow2_with_layout(&env, Qcow2::new(16 * MIB).cluster(4 * KIB));
    check_against_qemu(&env, probed("img.qcow2", QCOW2));
}

#[test]
fn cluster_size_64k() {
    let env = qemu_env!();
    qcow2_with_layout(&env, Qcow2::new(16 * MIB).cluster(64 * KIB));
    check_against_qemu(&env, probed("img.qcow2", QCOW2));
}

#[test]
fn cluster_size_2m() {
    let env = qemu_env!();
    qcow2_with_layout(&env, Qcow2::new(64 * MIB).cluster(2 * MIB))
        .write(&[Data(40 * MIB + 5, 3 * MIB), Zero(50 * MIB, 4 * MIB)]);
    check_against_qemu(&env, probed("img.qcow2", QCOW2));
}

// ---------------------------------------------------------------------------
// zeroes, discards, compression, subclusters

#[test]
fn zero_clusters() {
    let env = qemu_env!();
    env.create("img.qcow2", Qcow2::new(16 * MIB)).write(&[
        Data(0, 4 * MIB),
        Zero(MIB, 256 * KIB),          // allocated zero clusters
        ZeroUnmap(2 * MIB, 512 * KIB), // plain zero clusters
        Zero(3 * MIB + 1000, 5000),    // partial clusters: written zeros
        Zero(8 * MIB, MIB),            // on unallocated clusters
        ZeroUnmap(12 * MIB, 64 * KIB),
        Data(8 * MIB + 64 * KIB, 4 * KIB), // data inside a zero cluster
    ]);
    env.assert_qemu_map_has("qcow2", "img.qcow2", "zero clusters", |e| {
        e["zero"] == true && e["present"] == true && e["data"] == false
    });
    check_against_qemu(&env, probed("img.qcow2", QCOW2));
}

#[test]
fn discarded_ranges() {
    let env = qemu_env!();
    env.create("img.qcow2", Qcow2::new(16 * MIB)).write(&[
        Data(0, 8 * MIB),
        Discard(MIB, MIB),
        Discard(3 * MIB + 4 * KIB, 100 * KIB), // partial clusters at both ends
        Discard(6 * MIB, 4 * MIB),             // runs past the data
        Data(6 * MIB + 64 * KIB, 64 * KIB),    // reallocated after discard
    ]);
    check_against_qemu(&env, probed("img.qcow2", QCOW2));
}

/// A raw source with compressible and incompressible clusters and holes,
/// converted with `-c`: both compressed and plain clusters in the result.
fn compressed(env: &Env, opts: &str) {
    let f = FsOpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(env.path("src.raw"))
        .expect("create src.raw");
    f.write_all_at(&random_bytes((2 * MIB) as usize, 1, true), 0)
        .expect("write");
    f.write_all_at(&random_bytes((MIB) as usize, 2, false), 3 * MIB)
        .expect("write");
    f.write_all_at(&random_bytes(100_000, 3, true), 5 * MIB + 1234)
        .expect("write");
    f.write_all_at(&[7u8; 70_000], 7 * MIB).expect("write");
    f.set_len(24 * MIB).expect("truncate");
    env.qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        opts,
        "src.raw",
        "img.qcow2",
    ]);
    // Compressed writes into the existing image, and plain data over a
    // compressed cluster.
    let cs = cluster_size(env, "img.qcow2");
    let at = (9 * MIB).next_multiple_of(cs); // compressed writes are whole clusters
    env.qemu_io(
        "qcow2",
        "img.qcow2",
        &[
            Compressed(at, 4 * cs),
            Data(cs + 17, 300),
            Zero(at + cs, cs),
        ],
    );
    env.assert_qemu_map_has("qcow2", "img.qcow2", "compressed clusters", |e| {
        e["compressed"] == true
    });
    env.assert_qemu_map_has("qcow2", "img.qcow2", "uncompressed data", |e| {
        e["data"] == true && e["compressed"] == false
    });
    check_against_qemu(env, probed("img.qcow2", QCOW2));
}

#[test]
fn compressed_zlib() {
    let env = qemu_env!();
    compressed(&env, "compression_type=zlib");
}

#[test]
fn compressed_zlib_4k_clusters() {
    let env = qemu_env!();
    compressed(&env, "compression_type=zlib,cluster_size=4k");
}

#[test]
fn compressed_zstd() {
    let env = qemu_env!();
    compressed(&env, "compression_type=zstd");
}

#[test]
fn compressed_zstd_2m_clusters() {
    let env = qemu_env!();
    compressed(&env, "compression_type=zstd,cluster_size=2M");
}

#[test]
fn compressed_v2_compat_0_10() {
    let env = qemu_env!();
    compressed(&env, "compat=0.10");
}

/// Extended L2 entries: 64 KiB clusters have 32 subclusters of 2 KiB.
fn subcluster_ops() -> Vec<Op> {
    const C: u64 = 64 * KIB;
    const SC: u64 = 2 * KIB;
    vec![
        Data(C + SC, 4 * KIB),          // subclusters 1-2
        Data(3 * C + 15 * SC, 4 * KIB), // 15-16
        Data(5 * C + 31 * SC, 4 * KIB), // last of one cluster, first of the next
        Zero(7 * C + 3 * SC, SC),       // zero subcluster in an unallocated cluster
        Data(8 * C, C),                 // whole cluster, then zeroes inside it
        Zero(8 * C + 5 * SC, 2 * SC),
        ZeroUnmap(8 * C + 20 * SC, 4 * SC),
        Data(9 * C + 100, 300),            // inside one subcluster
        Data(11 * C + 7 * SC, 9 * SC + 5), // odd length
        Discard(8 * C + 28 * SC, 2 * SC),
        Pattern(0x33, 12 * C, 32 * SC),
    ]
}

/// qemu-img map shows data and zero runs shorter than a cluster.
fn assert_subclusters(env: &Env) {
    let partial = |e: &serde_json::Value| e["length"].as_u64().is_some_and(|l| l % (64 * KIB) != 0);
    env.assert_qemu_map_has("qcow2", "img.qcow2", "data subclusters", |e| {
        e["data"] == true && e["depth"] == 0 && partial(e)
    });
    env.assert_qemu_map_has("qcow2", "img.qcow2", "zero subclusters", |e| {
        e["zero"] == true && e["present"] == true && e["depth"] == 0 && partial(e)
    });
}

#[test]
fn extended_l2_subclusters() {
    let env = qemu_env!();
    env.create(
        "img.qcow2",
        Qcow2::new(16 * MIB).extended_l2().cluster(64 * KIB),
    )
    .write(&subcluster_ops());
    assert_subclusters(&env);
    check_against_qemu(&env, probed("img.qcow2", QCOW2));
}

#[test]
fn extended_l2_subclusters_over_backing() {
    let env = qemu_env!();
    env.create("base.qcow2", Qcow2::new(16 * MIB))
        .write(&[Data(0, 2 * MIB), Pattern(0x77, 4 * MIB, MIB)]);
    env.create(
        "img.qcow2",
        Qcow2::overlay("base.qcow2", "qcow2")
            .extended_l2()
            .cluster(64 * KIB),
    )
    .write(&subcluster_ops())
    .write(&[
        Data(4 * MIB + 6 * KIB, 2 * KIB),
        Zero(4 * MIB + 64 * KIB + 2 * KIB, 4 * KIB),
    ]);
    assert_subclusters(&env);
    env.assert_qemu_map_has("qcow2", "img.qcow2", "backing data showing through", |e| {
        e["depth"] == 1
    });
    check_against_qemu(&env, explicit("img.qcow2", QCOW2));
}

// ---------------------------------------------------------------------------
// backing chains (relative names, resolved against the naming image's dir)

/// What every overlay gets: data, zeroes and discards over backing data,
/// writes where the backing file is unallocated, and partial-cluster writes
/// (copy-on-write from the backing file).
fn overlay_ops() -> Vec<Op> {
    vec![
        Data(MIB, 512 * KIB),
        Zero(2 * MIB, 256 * KIB),
        ZeroUnmap(2 * MIB + 512 * KIB, 128 * KIB),
        Discard(3 * MIB, 256 * KIB),
        Data(6 * MIB + 1000, 3000),
        Data(14 * MIB, MIB),
    ]
}

#[test]
fn backing_qcow2_over_qcow2() {
    let env = qemu_env!();
    env.create("base.qcow2", Qcow2::new(16 * MIB)).write(&[
        Data(0, 4 * MIB),
        Zero(4 * MIB, MIB),
        Data(6 * MIB, 2 * MIB),
        ZeroUnmap(7 * MIB, 64 * KIB),
    ]);
    env.create("top.qcow2", Qcow2::overlay("base.qcow2", "qcow2"))
        .write(&overlay_ops());
    check_against_qemu(&env, explicit("top.qcow2", QCOW2));
    check_against_qemu(&env, probed("base.qcow2", QCOW2));
}

#[test]
fn backing_qcow2_over_raw() {
    let env = qemu_env!();
    sparse_raw(
        &env,
        "base.raw",
        16 * MIB,
        &[(0, 3 * MIB), (6 * MIB, 64 * KIB), (10 * MIB + 5, 2 * MIB)],
    );
    env.create("top.qcow2", Qcow2::overlay("base.raw", "raw"))
        .write(&overlay_ops());
    check_against_qemu(&env, explicit("top.qcow2", QCOW2));
}

#[test]
fn backing_chain_depth_3() {
    // top.qcow2 -> sub/mid2.qcow2 -> sub/mid1.qcow2 -> ../base.qcow2, all
    // names relative to the image that holds them.
    let env = qemu_env!();
    std::fs::create_dir(env.path("sub")).expect("mkdir");
    env.create("base.qcow2", Qcow2::new(16 * MIB).cluster(4 * KIB))
        .write(&[Data(0, 8 * MIB), Zero(MIB, 64 * KIB)]);
    env.create("sub/mid1.qcow2", Qcow2::overlay("../base.qcow2", "qcow2"))
        .write(&[
            Data(512 * KIB, MIB),
            Zero(3 * MIB, MIB),
            Data(9 * MIB, 100_000),
        ]);
    env.create(
        "sub/mid2.qcow2",
        Qcow2::overlay("mid1.qcow2", "qcow2").cluster(16 * KIB),
    )
    .write(&[
        Data(3 * MIB + 8 * KIB, 8 * KIB),
        Discard(6 * MIB, 512 * KIB),
        Data(11 * MIB, 4 * KIB),
    ]);
    env.create("top.qcow2", Qcow2::overlay("sub/mid2.qcow2", "qcow2"))
        .write(&overlay_ops());
    let top = open_image(
        &env.path("top.qcow2"),
        OpenOptions {
            format: Some(QCOW2),
            allow_corrupt: false,
            ..Default::default()
        },
    )
    .expect("open chain");
    assert_eq!(top.chain_len(), 4);
    env.assert_qemu_map_has("qcow2", "top.qcow2", "data from the base", |e| {
        e["depth"] == 3
    });
    check_against_qemu(&env, explicit("top.qcow2", QCOW2));
    check_against_qemu(&env, explicit("sub/mid2.qcow2", QCOW2));
}

#[test]
fn backing_file_shorter_than_overlay() {
    // base: 4 MiB + 512 (its last cluster is partial); overlay: 16 MiB. What
    // lies past the base's end reads as zeros and maps as zero, including
    // the copy-on-write of a cluster that straddles the base's end.
    let env = qemu_env!();
    env.create("base.qcow2", Qcow2::new(4 * MIB + 512))
        .write(&[Data(0, 4 * MIB + 512)]);
    env.create(
        "top.qcow2",
        Qcow2::new(16 * MIB).backing("base.qcow2", "qcow2"),
    )
    .write(&[
        Data(2 * MIB, 64 * KIB),
        Data(4 * MIB + 100, 200),
        Data(8 * MIB, 4 * KIB),
    ]);
    check_against_qemu(&env, explicit("top.qcow2", QCOW2));
}

#[test]
fn backing_raw_shorter_than_overlay_odd_size() {
    let env = qemu_env!();
    sparse_raw(
        &env,
        "base.raw",
        3 * MIB + 100,
        &[(0, MIB), (3 * MIB - 10, 110)],
    );
    env.create("top.qcow2", Qcow2::new(8 * MIB).backing("base.raw", "raw"))
        .write(&[Data(512 * KIB, 4 * KIB), Data(3 * MIB + 50, 100)]);
    check_against_qemu(&env, explicit("top.qcow2", QCOW2));
}

// ---------------------------------------------------------------------------
// snapshots, external data files, bitmaps, preallocation, refcounts

#[test]
fn internal_snapshots() {
    let env = qemu_env!();
    let img = env.create("img.qcow2", Qcow2::new(16 * MIB));
    img.write(&[Data(0, 2 * MIB), Data(8 * MIB, MIB)]);
    env.qemu_img(&["snapshot", "-c", "s1", "img.qcow2"]);
    img.write(&[
        Data(MIB, 2 * MIB),
        Discard(0, 512 * KIB),
        Zero(8 * MIB, 256 * KIB),
        Data(8 * MIB + 300, 1000),
    ]);
    env.qemu_img(&["snapshot", "-c", "s2", "img.qcow2"]);
    img.write(&[Data(12 * MIB, 64 * KIB), Discard(MIB, 64 * KIB)]);
    let info = env.qemu_json(&["info", "--output=json", "img.qcow2"]);
    assert_eq!(
        info["snapshots"].as_array().map(Vec::len),
        Some(2),
        "{info}"
    );
    check_against_qemu(&env, probed("img.qcow2", QCOW2));
}

#[test]
fn external_data_file() {
    let env = qemu_env!();
    env.create("img.qcow2", Qcow2::new(16 * MIB).data_file("data.raw"))
        .write(&layout(64 * KIB, 16 * MIB));
    check_against_qemu(&env, explicit("img.qcow2", QCOW2));
}

#[test]
fn external_data_file_raw() {
    let env = qemu_env!();
    env.create(
        "img.qcow2",
        Qcow2::new(16 * MIB)
            .data_file("data.raw")
            .opts("data_file_raw=on"),
    )
    .write(&layout(64 * KIB, 16 * MIB));
    check_against_qemu(&env, explicit("img.qcow2", QCOW2));
}

#[test]
fn persistent_dirty_bitmap() {
    let env = qemu_env!();
    let img = env.create("img.qcow2", Qcow2::new(16 * MIB));
    img.write(&[Data(0, MIB)]);
    env.qemu_img(&["bitmap", "--add", "--enable", "img.qcow2", "bm0"]);
    img.write(&[
        Data(4 * MIB, MIB),
        Zero(512 * KIB, 64 * KIB),
        Discard(6 * MIB, MIB),
    ]);
    let info = env.qemu_json(&["info", "--output=json", "img.qcow2"]);
    assert!(
        info.pointer("/format-specific/data/bitmaps/0/name")
            .is_some(),
        "the image has no bitmap: {info}"
    );
    check_against_qemu(&env, probed("img.qcow2", QCOW2));
}

/// A crash with lazy refcounts on leaves the dirty bit set and refcounts
/// behind the L2 tables: reading must work all the same.
#[test]
fn dirty_image_with_lazy_refcounts_reads_fine() {
    let env = qemu_env!();
    env.create("img.qcow2", Qcow2::new(16 * MIB).opts("lazy_refcounts=on"));
    // qemu-io's `abort` kills the process after the writes: no clean close.
    let status = std::process::Command::new("qemu-io")
        .current_dir(env.root())
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 7 0 1M",
            "-c",
            "write -P 8 4M 64k",
            "-c",
            "abort",
            "img.qcow2",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run qemu-io");
    assert!(!status.success(), "qemu-io abort should not exit cleanly");
    let info = env.qemu_json(&["info", "--output=json", "img.qcow2"]);
    assert_eq!(
        info["dirty-flag"],
        serde_json::json!(true),
        "image is not dirty: {info}"
    );
    check_against_qemu(&env, probed("img.qcow2", QCOW2));
}

#[test]
fn preallocation_metadata() {
    let env = qemu_env!();
    qcow2_with_layout(&env, Qcow2::new(16 * MIB).opts("preallocation=metadata"));
    check_against_qemu(&env, probed("img.qcow2", QCOW2));
}

#[test]
fn preallocation_full() {
    let env = qemu_env!();
    qcow2_with_layout(&env, Qcow2::new(16 * MIB).opts("preallocation=full"));
    check_against_qemu(&env, probed("img.qcow2", QCOW2));
}

#[test]
fn refcount_bits_1() {
    let env = qemu_env!();
    qcow2_with_layout(&env, Qcow2::new(16 * MIB).opts("refcount_bits=1"));
    check_against_qemu(&env, probed("img.qcow2", QCOW2));
}

#[test]
fn refcount_bits_64() {
    let env = qemu_env!();
    let img = qcow2_with_layout(&env, Qcow2::new(16 * MIB).opts("refcount_bits=64"));
    env.qemu_img(&["snapshot", "-c", "s1", "img.qcow2"]);
    img.write(&[Data(0, 64 * KIB)]);
    check_against_qemu(&env, probed("img.qcow2", QCOW2));
}

// ---------------------------------------------------------------------------
// sizes and raw images

#[test]
fn unaligned_virtual_size_qcow2() {
    let env = qemu_env!();
    env.create("img.qcow2", Qcow2::new(10 * MIB + 512)).write(&[
        Data(0, 100 * KIB),
        Data(10 * MIB - 4 * KIB, 4 * KIB + 512),
        Zero(5 * MIB, 64 * KIB),
    ]);
    check_against_qemu(&env, probed("img.qcow2", QCOW2));
}

#[test]
fn raw_odd_size() {
    // qemu rounds a raw file's size up to 512-byte sectors; the tail past
    // the end of the file reads as zeros.
    let env = qemu_env!();
    sparse_raw(
        &env,
        "img.raw",
        3 * MIB + 123,
        &[(0, 4 * KIB), (3 * MIB - 100, 223)],
    );
    check_against_qemu(&env, probed("img.raw", RAW));
}

#[test]
fn raw_sparse() {
    let env = qemu_env!();
    sparse_raw(
        &env,
        "img.raw",
        16 * MIB,
        &[
            (0, 64 * KIB),
            (MIB, 4 * KIB + 17),
            (5 * MIB + 3, 100),
            (8 * MIB, MIB),
            (16 * MIB - 4 * KIB, 4 * KIB),
        ],
    );
    env.qemu_io(
        "raw",
        "img.raw",
        &[ZeroUnmap(8 * MIB + 256 * KIB, 256 * KIB)],
    );
    check_against_qemu(&env, probed("img.raw", RAW));
    check_against_qemu(&env, explicit("img.raw", RAW));
}

#[test]
fn raw_fully_allocated() {
    let env = qemu_env!();
    sparse_raw(&env, "img.raw", 2 * MIB, &[(0, 2 * MIB)]);
    check_against_qemu(&env, probed("img.raw", RAW));
}

// ---------------------------------------------------------------------------
// the opener: refusals

/// The commands that read guest data through the files an image names.
const READERS: &[&str] = &["map", "convert", "compare", "sync"];
const ALL: &[&str] = &["info", "check", "map", "convert", "compare", "sync"];

/// Runs each of `cmds` on `img` (with `args` before it; convert and sync
/// get a destination, compare a blank raw second image) and checks each
/// fails with one line containing every one of `needles`, exit status 2
/// (1 for `check`, as qemu-img check), writing nothing.
fn assert_refused(env: &Env, cmds: &[&str], args: &[&str], img: &str, needles: &[&str]) {
    std::fs::write(env.path("blank.raw"), vec![0u8; 4096]).expect("write blank.raw");
    for &cmd in cmds {
        let mut a = vec![cmd];
        if cmd == "sync" {
            // The output is raw whatever -f says (-f names DST's format too).
            a.extend_from_slice(&["-O", "raw"]);
        }
        a.extend_from_slice(args);
        a.push(img);
        match cmd {
            "convert" | "sync" => a.push("out.raw"),
            "compare" => a.extend_from_slice(&["-F", "raw", "blank.raw"]),
            _ => {}
        }
        let out = env.imgsync(&a);
        let code = if cmd == "check" { 1 } else { 2 };
        let line = assert_one_line_error_code(&out, &format!("imgsync {a:?}"), code);
        for n in needles {
            assert!(
                line.contains(n),
                "imgsync {a:?}: error {line:?} does not mention {n:?}"
            );
        }
        assert!(!env.path("out.raw").exists(), "imgsync {a:?} wrote out.raw");
    }
}

/// `info` and `check` of `img` (with `args` before it) open no file but the
/// image: info shows `key` (`backing-filename` or `data-file`) as `name`,
/// check exits 0 (the image's own tables are clean).
fn assert_metadata_shown(env: &Env, args: &[&str], img: &str, key: &str, name: &str) {
    let mut a = vec!["info", "--output", "json"];
    a.extend_from_slice(args);
    a.push(img);
    let info = env.imgsync_json(&a);
    let shown = if key == "data-file" {
        &info["format-specific"]["data"][key]
    } else {
        &info[key]
    };
    assert_eq!(shown, name, "imgsync {a:?}: {info}");
    let mut a = vec!["check"];
    a.extend_from_slice(args);
    a.push(img);
    let out = env.imgsync(&a);
    assert_eq!(
        out.status.code(),
        Some(0),
        "imgsync {a:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn backing_loop_is_refused() {
    let env = qemu_env!();
    env.create("a.qcow2", Qcow2::new(MIB));
    env.create("b.qcow2", Qcow2::new(MIB));
    env.qemu_img(&[
        "rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2",
    ]);
    env.qemu_img(&[
        "rebase", "-u", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2",
    ]);
    assert_refused(
        &env,
        READERS,
        &["-f", "qcow2"],
        "a.qcow2",
        &["loop", "a.qcow2"],
    );
    assert_metadata_shown(
        &env,
        &["-f", "qcow2"],
        "a.qcow2",
        "backing-filename",
        "b.qcow2",
    );
    let err = open_image(
        &env.path("a.qcow2"),
        OpenOptions {
            format: Some(QCOW2),
            allow_corrupt: false,
            ..Default::default()
        },
    )
    .err()
    .expect("a loop must not open");
    assert!(err.to_string().contains("loop"), "{err}");
}

#[test]
fn backing_self_reference_is_refused() {
    let env = qemu_env!();
    env.create("a.qcow2", Qcow2::new(MIB));
    env.qemu_img(&[
        "rebase", "-u", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "a.qcow2",
    ]);
    assert_refused(
        &env,
        READERS,
        &["-f", "qcow2"],
        "a.qcow2",
        &["loop", "a.qcow2"],
    );
    assert_metadata_shown(
        &env,
        &["-f", "qcow2"],
        "a.qcow2",
        "backing-filename",
        "a.qcow2",
    );
}

#[test]
fn backing_loop_through_another_name_is_refused() {
    // ./a.qcow2 names sub/../a.qcow2: the same file by another path.
    let env = qemu_env!();
    std::fs::create_dir(env.path("sub")).expect("mkdir");
    env.create("a.qcow2", Qcow2::new(MIB));
    env.qemu_img(&[
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        "sub/../a.qcow2",
        "-F",
        "qcow2",
        "a.qcow2",
    ]);
    assert_refused(&env, READERS, &["-f", "qcow2"], "a.qcow2", &["loop"]);
    assert_metadata_shown(
        &env,
        &["-f", "qcow2"],
        "a.qcow2",
        "backing-filename",
        "sub/../a.qcow2",
    );
}

#[test]
fn probed_raw_disk_with_qcow2_header_naming_backing_is_refused() {
    // A guest can write a qcow2 header naming a host file into its raw disk.
    let env = qemu_env!();
    env.create("x", Qcow2::new(MIB).backing("/etc/passwd", "raw"));
    assert_refused(&env, READERS, &[], "x", &["x", "-f qcow2", "/etc/passwd"]);
    // info and check follow no name: they show it.
    assert_metadata_shown(&env, &[], "x", "backing-filename", "/etc/passwd");
    let err = open_image(&env.path("x"), OpenOptions::default())
        .err()
        .expect("refused");
    assert!(err.to_string().contains("-f qcow2"), "{err}");
    // Told it is raw, it reads as the raw bytes it is.
    check_against_qemu(&env, explicit("x", RAW));
}

#[test]
fn probed_image_naming_data_file_is_refused() {
    let env = qemu_env!();
    env.create("img.qcow2", Qcow2::new(MIB).data_file("data.raw"));
    assert_refused(
        &env,
        READERS,
        &[],
        "img.qcow2",
        &["img.qcow2", "-f qcow2", "data.raw"],
    );
    assert_metadata_shown(&env, &[], "img.qcow2", "data-file", "data.raw");
}

#[test]
fn json_backing_name_is_refused() {
    let env = qemu_env!();
    env.create("base.qcow2", Qcow2::new(MIB));
    env.create("top.qcow2", Qcow2::new(MIB));
    env.qemu_img(&[
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        r#"json:{"file":{"driver":"file","filename":"base.qcow2"}}"#,
        "-F",
        "qcow2",
        "top.qcow2",
    ]);
    assert_refused(
        &env,
        READERS,
        &["-f", "qcow2"],
        "top.qcow2",
        &["top.qcow2", "json:"],
    );
    assert_metadata_shown(
        &env,
        &["-f", "qcow2"],
        "top.qcow2",
        "backing-filename",
        r#"json:{"file":{"driver":"file","filename":"base.qcow2"}}"#,
    );
}

#[test]
fn missing_backing_file_is_named() {
    let env = qemu_env!();
    env.create("gone.qcow2", Qcow2::new(MIB));
    env.create("top.qcow2", Qcow2::overlay("gone.qcow2", "qcow2"));
    std::fs::remove_file(env.path("gone.qcow2")).expect("rm");
    assert_refused(
        &env,
        READERS,
        &["-f", "qcow2"],
        "top.qcow2",
        &["gone.qcow2"],
    );
    // As qemu-img info: the name is shown, the file is not needed.
    for args in [&[][..], &["-f", "qcow2"]] {
        assert_metadata_shown(&env, args, "top.qcow2", "backing-filename", "gone.qcow2");
    }
    let err = open_image(
        &env.path("top.qcow2"),
        OpenOptions {
            format: Some(QCOW2),
            allow_corrupt: false,
            ..Default::default()
        },
    )
    .err()
    .expect("missing backing file");
    assert!(
        err.path().ends_with("gone.qcow2"),
        "error path {:?}",
        err.path()
    );
}

#[test]
fn missing_data_file_is_named() {
    let env = qemu_env!();
    env.create("img.qcow2", Qcow2::new(MIB).data_file("gone.raw"));
    std::fs::remove_file(env.path("gone.raw")).expect("rm");
    assert_refused(&env, READERS, &["-f", "qcow2"], "img.qcow2", &["gone.raw"]);
    for args in [&[][..], &["-f", "qcow2"]] {
        assert_metadata_shown(&env, args, "img.qcow2", "data-file", "gone.raw");
    }
}

#[test]
fn nonexistent_image_is_named() {
    let env = crate::common::temp_env(); // needs no qemu-img
    assert_refused(&env, ALL, &[], "no-such.img", &["no-such.img"]);
    assert_refused(
        &env,
        ALL,
        &["-f", "qcow2", "--output", "json"],
        "no-such.img",
        &["no-such.img"],
    );
}

// ---------------------------------------------------------------------------
// `imgsync check`: every image case above is also held to `qemu-img check`
// (oracle (d) in `check_against_qemu`). Here: images damaged on purpose.

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A 64 KiB-cluster qcow2 with data in its first two clusters; returns the
/// image bytes and the file offset of its first L2 table.
fn damaged_base(env: &Env) -> (Vec<u8>, usize) {
    env.create("img.qcow2", Qcow2::new(16 * MIB))
        .write(&[Data(0, 128 * KIB)]);
    let b = std::fs::read(env.path("img.qcow2")).expect("read image");
    let l1 = be64(&b, 40) as usize; // l1_table_offset
    let l2 = (be64(&b, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    assert_ne!(l2, 0, "L1 entry 0 is allocated");
    (b, l2)
}

/// Runs `imgsync check` (human) and asserts qemu-img check's exit status
/// `code` (2 corruption, 3 only leaks), one stderr line naming the image and
/// the counts, and that the report carries every needle; then holds the
/// image to `qemu-img check`'s verdict.
fn assert_check_finds(env: &Env, code: i32, needles: &[&str]) {
    let out = env.imgsync(&["check", "img.qcow2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(code), "imgsync check: {text}");
    for needle in needles {
        assert!(
            text.contains(needle),
            "imgsync check: no {needle:?} in {text}"
        );
    }
    let json = env.imgsync_json_code(&["check", "--output", "json", "img.qcow2"], code);
    let (c, l) = (&json["corruptions"], &json["leaks"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!(
            "imgsync: img.qcow2: check found {c} corruption{} and {l} leaked cluster{}\n",
            if c == 1 { "" } else { "s" },
            if l == 1 { "" } else { "s" }
        ),
    );
    crate::common::check_check(env, probed("img.qcow2", QCOW2), false);
}

#[test]
fn check_finds_leaked_cluster() {
    let env = qemu_env!();
    let (mut b, l2) = damaged_base(&env);
    // Drop the second data cluster from its L2 table: its refcount stays 1.
    let entry = be64(&b, l2 + 8) & 0x00ff_ffff_ffff_fe00;
    b[l2 + 8..l2 + 16].fill(0);
    std::fs::write(env.path("img.qcow2"), &b).expect("write");
    assert_check_finds(
        &env,
        3,
        &[&format!("{entry:#x}"), "leaked clusters were found"],
    );
}

#[test]
fn check_finds_data_cluster_over_l1_table() {
    let env = qemu_env!();
    let (mut b, l2) = damaged_base(&env);
    // Point the first data cluster at the L1 table: metadata and data overlap.
    let l1 = be64(&b, 40);
    b[l2..l2 + 8].copy_from_slice(&(l1 | 1 << 63).to_be_bytes());
    std::fs::write(env.path("img.qcow2"), &b).expect("write");
    assert_check_finds(
        &env,
        2,
        &["errors were found on the image", &format!("{l1:#x}")],
    );
}

#[test]
fn check_finds_l2_table_beyond_end_of_file() {
    let env = qemu_env!();
    let (mut b, _) = damaged_base(&env);
    let l1 = be64(&b, 40) as usize;
    let far: u64 = 1 << 40;
    b[l1..l1 + 8].copy_from_slice(&(far | 1 << 63).to_be_bytes());
    std::fs::write(env.path("img.qcow2"), &b).expect("write");
    assert_check_finds(&env, 2, &[&format!("{far:#x}")]);
}

#[test]
fn check_counts_problems_beyond_the_listed_ones() {
    let env = qemu_env!();
    // 512 B clusters, 1 MiB of data: 2048 data clusters and 32 L2 tables.
    env.create("img.qcow2", Qcow2::new(2 * MIB).cluster(512))
        .write(&[Data(0, MIB)]);
    let mut b = std::fs::read(env.path("img.qcow2")).expect("read image");
    let l1 = be64(&b, 40) as usize;
    let l1_size = u32::from_be_bytes(b[36..40].try_into().expect("4 bytes")) as usize;
    // Unhook every L2 table: all of them and their data clusters leak.
    b[l1..l1 + 8 * l1_size].fill(0);
    std::fs::write(env.path("img.qcow2"), &b).expect("write");
    let json = env.imgsync(&["check", "--output", "json", "img.qcow2"]);
    assert_eq!(json.status.code(), Some(3));
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json");
    assert_eq!(v["leaks"], 2048 + 32, "{v}");
    assert_eq!(v["leak-list"].as_array().map(Vec::len), Some(1000));
    let human = env.imgsync(&["check", "img.qcow2"]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("(1080 more problems not listed)"), "{text}");
    assert!(text.contains("2080 leaked clusters were found"), "{text}");
    crate::common::check_check(&env, probed("img.qcow2", QCOW2), true);
}

#[test]
fn check_of_a_raw_image_is_clean() {
    let env = crate::common::temp_env(); // needs no qemu-img
    std::fs::write(env.path("disk.raw"), vec![7u8; 4096]).expect("write");
    let out = env.imgsync(&["check", "disk.raw"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("No errors were found"));
}

#[test]
fn check_refuses_what_it_cannot_open() {
    let env = crate::common::temp_env(); // needs no qemu-img
    std::fs::write(env.path("short.qcow2"), b"QFI\xfb\0\0\0\x03").expect("write");
    // qemu-img check's 1: the check could not be completed (2 would read
    // as "corruption found").
    for args in [&["-f", "qcow2"][..], &[], &["--output", "json"]] {
        let mut a = vec!["check"];
        a.extend_from_slice(args);
        a.push("short.qcow2");
        let out = env.imgsync(&a);
        let line = assert_one_line_error_code(&out, &format!("imgsync {a:?}"), 1);
        assert!(line.contains("short.qcow2"), "{line}");
    }
    // A file that cannot be read at all.
    std::fs::create_dir(env.path("dir.qcow2")).expect("mkdir");
    let out = env.imgsync(&["check", "dir.qcow2"]);
    let line = assert_one_line_error_code(&out, "imgsync check dir.qcow2", 1);
    assert!(line.contains("dir.qcow2"), "{line}");
    // A usage error is no verdict on any image either.
    let out = env.imgsync(&["check", "--no-such-option", "short.qcow2"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[test]
fn check_exit_status_is_corruption_over_leaks() {
    let env = qemu_env!();
    let (mut b, l2) = damaged_base(&env);
    // A leak (the second data cluster unhooked) and a corruption (the first
    // pointed at the L1 table): 2, corruption, whatever the leaks.
    b[l2 + 8..l2 + 16].fill(0);
    let l1 = be64(&b, 40);
    b[l2..l2 + 8].copy_from_slice(&(l1 | 1 << 63).to_be_bytes());
    std::fs::write(env.path("img.qcow2"), &b).expect("write");
    let json = env.imgsync_json_code(&["check", "--output", "json", "img.qcow2"], 2);
    assert!(json["leaks"].as_u64() > Some(0), "{json}");
    assert_check_finds(
        &env,
        2,
        &[
            "errors were found on the image",
            "leaked clusters were found",
        ],
    );
}

/// `(host offset, end)` of every compressed cluster descriptor in the active
/// L2 tables of qcow2 `b` (the end rounded up to the descriptor's last
/// 512-byte sector, as the spec's sector count gives it).
fn compressed_ranges(b: &[u8]) -> Vec<(u64, u64)> {
    let cluster_bits = u32::from_be_bytes(b[20..24].try_into().expect("4 bytes"));
    let l1_size = u32::from_be_bytes(b[36..40].try_into().expect("4 bytes")) as usize;
    let l1 = be64(b, 40) as usize;
    // Descriptor: bits 0..x the host offset, x..61 the sectors after the
    // first, x = 62 - (cluster_bits - 8).
    let x = 62 - (cluster_bits - 8);
    let mut ranges = Vec::new();
    for i in 0..l1_size {
        let l2 = (be64(b, l1 + 8 * i) & 0x00ff_ffff_ffff_fe00) as usize;
        if l2 == 0 {
            continue;
        }
        for j in 0..(1usize << cluster_bits) / 8 {
            let e = be64(b, l2 + 8 * j);
            if e & 1 << 62 != 0 {
                let host = e & ((1 << x) - 1);
                let sectors = ((e >> x) & ((1 << (cluster_bits - 8)) - 1)) + 1;
                ranges.push((host, host / 512 * 512 + sectors * 512));
            }
        }
    }
    ranges
}

#[test]
fn compressed_cluster_cut_short_by_its_last_sector_is_metadata_damage() {
    let env = qemu_env!();
    env.create("img.qcow2", Qcow2::new(4 * MIB))
        .write(&[Compressed(0, MIB)]);
    let b = std::fs::read(env.path("img.qcow2")).expect("read image");
    let (host, end) = compressed_ranges(&b)
        .into_iter()
        .max_by_key(|r| r.1)
        .expect("compressed clusters");
    let len = b.len() as u64;
    // As qemu-io wrote it, the last compressed cluster's range passes the
    // end of the file inside its last sector: valid.
    assert!(
        end - 512 < len && len <= end && len % 512 != 0,
        "file of {len:#x} bytes, last compressed range {host:#x}..{end:#x}"
    );
    crate::common::check_check(&env, probed("img.qcow2", QCOW2), true);
    let map = env.imgsync(&["map", "img.qcow2"]);
    assert_eq!(map.status.code(), Some(0), "{map:?}");
    // Cut so that the file ends before that sector: the descriptor names
    // bytes the file lacks. map and check say so without reading the data.
    for cut in [end - 512, end - 1024] {
        std::fs::write(env.path("img.qcow2"), &b[..cut as usize]).expect("write");
        // (map streams: the lines before the damage may be out already.)
        let out = env.imgsync(&["map", "img.qcow2"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "cut at {cut:#x}: {stderr}");
        let line = stderr.strip_suffix('\n').expect("one line");
        assert!(!line.contains('\n'), "cut at {cut:#x}: {stderr}");
        for needle in [
            "img.qcow2",
            "compressed cluster",
            &format!("{host:#x}"),
            "beyond the end of the file",
        ] {
            assert!(line.contains(needle), "cut at {cut:#x}: {line}");
        }
        let out = env.imgsync(&["check", "img.qcow2"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(2), "cut at {cut:#x}: {text}");
        assert!(
            text.contains(&format!("compressed cluster at {host:#x}"))
                && text.contains("beyond the end of the file"),
            "cut at {cut:#x}: {text}"
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            "imgsync: img.qcow2: check found 1 corruption and 0 leaked clusters\n",
            "cut at {cut:#x}"
        );
    }
}

#[test]
fn check_verdict_survives_a_reader_that_left() {
    // `imgsync check img | head -1` style: the reader is gone before check
    // prints (EPIPE); the exit status must still be the verdict, not the
    // quiet 0 of a broken pipe.
    let env = qemu_env!();
    let (mut b, l2) = damaged_base(&env);
    let l1 = be64(&b, 40);
    b[l2..l2 + 8].copy_from_slice(&(l1 | 1 << 63).to_be_bytes());
    std::fs::write(env.path("img.qcow2"), &b).expect("write");
    for output in ["human", "json"] {
        let script = format!(
            "(sleep 0.5; '{}' check --output {output} img.qcow2 2>/dev/null; echo $? >rc) | true",
            env!("CARGO_BIN_EXE_imgsync")
        );
        let out = env.run("sh", &["-c", &script]);
        assert!(out.status.success(), "{out:?}");
        let rc = std::fs::read_to_string(env.path("rc")).expect("rc");
        assert_eq!(rc.trim(), "2", "--output {output}");
    }
}
