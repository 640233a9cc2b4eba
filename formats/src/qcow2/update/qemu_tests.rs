//! The updater against qemu-img as the oracle, on images qemu made: a matrix
//! of `qemu-img create` options (+ `qemu-io` writes, internal snapshots,
//! compressed images from `convert -c`, backing files, preallocation,
//! persistent bitmaps). Random writes and zeros go through the updater (on
//! the image's bytes in memory, written back sparsely: punched clusters are
//! holes); then `qemu-img check` must exit 0, the guest content
//! (`convert -O raw`) must equal the model, internal snapshots must read as
//! before, and the file's allocation must stay close to a fresh `convert`.
//! The second flush of each case is recorded and replayed to every barrier:
//! `qemu-img check` must exit 0 or 3 (leaks), never 2 (corruption).
//!
//! Skipped with a SKIP line when qemu-img is missing, unless
//! IMGSYNC_REQUIRE_QEMU=1.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::{Command, Output};

use super::tests::{
    assert_consistent, barriers, crash_image, model_write, pattern, random_ops, Recorder, Rng,
};
use super::*;
use crate::qcow2::test_bytes::get64;

use crate::qcow2::test_qemu::{require_qemu, TempDir};
fn temp_dir() -> TempDir {
    crate::qcow2::test_qemu::temp_dir("update")
}

fn tool(dir: &Path, name: &str, args: &[&str]) -> Output {
    Command::new(name)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

#[track_caller]
fn run(dir: &Path, name: &str, args: &[&str]) {
    let out = tool(dir, name, args);
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img check`'s exit status: 0 clean, 2 corruption, 3 leaks only.
fn check_status(dir: &Path, img: &str) -> (i32, String) {
    let out = tool(dir, "qemu-img", &["check", img]);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Guest content through qemu (`-l` a snapshot).
fn raw(dir: &Path, img: &str, snapshot: Option<&str>) -> Vec<u8> {
    let out = dir.join("out.raw");
    let _ = std::fs::remove_file(&out);
    let mut args = vec!["convert", "-U", "-O", "raw"];
    let l;
    if let Some(s) = snapshot {
        l = format!("snapshot.name={s}");
        args.extend(["-l", &l]);
    }
    args.extend([img, "out.raw"]);
    run(dir, "qemu-img", &args);
    std::fs::read(out).unwrap()
}

/// Writes `bytes` with every all-zero 4 KiB block left a hole, as punched
/// clusters are in a real file.
fn write_sparse(path: &Path, bytes: &[u8]) {
    let _ = std::fs::remove_file(path);
    let f = std::fs::File::create(path).unwrap();
    f.set_len(bytes.len() as u64).unwrap();
    for (i, chunk) in bytes.chunks(4096).enumerate() {
        if chunk.iter().any(|&b| b != 0) {
            f.write_all_at(chunk, i as u64 * 4096).unwrap();
        }
    }
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// One image recipe.
#[derive(Clone, Default)]
struct Case {
    name: &'static str,
    opts: &'static str,
    size: &'static str,
    /// qemu-io commands run on the image before anything else.
    io: &'static [&'static str],
    /// Create a backing file with data; the image is created on it.
    backing: bool,
    /// Two internal snapshots, with writes between and after them.
    snapshots: bool,
    /// No write after the second snapshot: every L2 table is shared with
    /// it, so the updater must copy (COW) the tables it changes.
    snapshot_last: bool,
    /// The image is then `qemu-img convert -c`'d with these options.
    compress: Option<&'static str>,
    /// A persistent bitmap is added.
    bitmap: bool,
    /// Random operations per round.
    ops: usize,
}

/// Builds the case's image as `img.qcow2` in `dir`.
fn make(dir: &Path, c: &Case) {
    if c.backing {
        run(
            dir,
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "base.qcow2", c.size],
        );
        run(
            dir,
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 0x5b 0 1M",
                "-c",
                "write -P 0x5c 3M 2M",
                "base.qcow2",
            ],
        );
        run(
            dir,
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                c.opts,
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "img.qcow2",
                c.size,
            ],
        );
    } else {
        run(
            dir,
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                c.opts,
                "img.qcow2",
                c.size,
            ],
        );
    }
    let io = |cmds: &[&str]| {
        if cmds.is_empty() {
            return;
        }
        let mut args = vec!["-f", "qcow2"];
        for cmd in cmds {
            args.extend(["-c", cmd]);
        }
        args.push("img.qcow2");
        run(dir, "qemu-io", &args);
    };
    io(c.io);
    if c.snapshots {
        run(dir, "qemu-img", &["snapshot", "-c", "s1", "img.qcow2"]);
        io(&["write -P 0x71 512k 256k", "write -z 1M 64k"]);
        run(dir, "qemu-img", &["snapshot", "-c", "s2", "img.qcow2"]);
        if !c.snapshot_last {
            io(&["write -P 0x72 640k 64k", "write -P 0x73 2M 128k"]);
        }
    }
    if let Some(opts) = c.compress {
        run(
            dir,
            "qemu-img",
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                opts,
                "img.qcow2",
                "c.qcow2",
            ],
        );
        std::fs::rename(dir.join("c.qcow2"), dir.join("img.qcow2")).unwrap();
    }
    if c.bitmap {
        run(dir, "qemu-img", &["bitmap", "--add", "img.qcow2", "b0"]);
    }
    let (st, out) = check_status(dir, "img.qcow2");
    assert_eq!(st, 0, "{}: qemu-img check of the new image: {out}", c.name);
}

/// What one case found.
struct Outcome {
    barriers: usize,
    crash_images: usize,
}

fn run_case(c: &Case, seed: u64) -> Outcome {
    let dir = temp_dir();
    let d = &dir.0;
    make(d, c);
    let img = d.join("img.qcow2");
    let snaps: Vec<(&str, Vec<u8>)> = if c.snapshots {
        vec![
            ("s1", raw(d, "img.qcow2", Some("s1"))),
            ("s2", raw(d, "img.qcow2", Some("s2"))),
        ]
    } else {
        Vec::new()
    };
    let mut model = raw(d, "img.qcow2", None);
    let mut f = std::fs::read(&img).unwrap();
    let mut u = Updater::open(&f).unwrap();
    // L2 tables shared with a snapshot: L1 entries without the copied flag.
    let shared = |f: &[u8], h: &Header| {
        (0..u64::from(h.l1_size))
            .map(|i| get64(f, h.l1_table_offset + i * 8))
            .filter(|e| e & L1E_OFFSET_MASK != 0 && e & OFLAG_COPIED == 0)
            .count()
    };
    let shared_before = shared(&f, u.header());
    if c.snapshot_last {
        assert!(shared_before > 0, "{}: no shared L2 table to copy", c.name);
    }
    assert_eq!(u.bitmaps_in_use(), c.bitmap, "{}", c.name);
    if u.bitmaps_in_use() {
        u.invalidate_bitmaps(&mut f).unwrap();
        assert!(!u.bitmaps_in_use());
    }
    let mut rng = Rng(seed);
    // Round 1: plain flush.
    random_ops(&mut u, &mut model, &mut rng, c.ops);
    u.flush(&mut f).unwrap();
    // Round 2: recorded, then replayed at every barrier through qemu-img check.
    let base = f.clone();
    random_ops(&mut u, &mut model, &mut rng, c.ops);
    let mut rec = Recorder {
        file: f,
        log: Vec::new(),
    };
    u.flush(&mut rec).unwrap();
    let f = rec.file;
    let n = barriers(&rec.log);
    let mut crash_images = 0;
    for at in 0..=n {
        for variant in 0..2 {
            let mut r = Rng(seed ^ (at as u64) << 8 ^ variant);
            let image = crash_image(&base, &rec.log, at, &mut || {
                variant == 1 && r.next() & 1 == 0
            });
            write_sparse(&d.join("crash.qcow2"), &image);
            let (st, out) = check_status(d, "crash.qcow2");
            assert!(
                st == 0 || st == 3,
                "{}: crash after barrier {at} of {n} (variant {variant}): qemu-img check exit {st}: {out}",
                c.name
            );
            crash_images += 1;
        }
    }

    write_sparse(&img, &f);
    let (st, out) = check_status(d, "img.qcow2");
    // Invalidated bitmaps: qemu ignores them, and their clusters were
    // freed with them, so nothing leaks.
    assert_eq!(st, 0, "{}: qemu-img check after the update: {out}", c.name);
    assert_consistent(&f, false);
    if c.snapshot_last {
        assert!(
            shared(&f, u.header()) < shared_before,
            "{}: no L2 table was copied",
            c.name
        );
    }
    assert!(
        raw(d, "img.qcow2", None) == model,
        "{}: guest content differs from the model",
        c.name
    );
    for (name, before) in &snaps {
        assert!(
            &raw(d, "img.qcow2", Some(name)) == before,
            "{}: snapshot {name} changed",
            c.name
        );
    }
    if !c.snapshots && !c.backing && !c.bitmap {
        // Allocation close to a fresh convert of the same content (whose
        // options are the image's, without preallocation).
        run(
            d,
            "qemu-img",
            &[
                "convert",
                "-O",
                "qcow2",
                "-o",
                c.opts
                    .replace("preallocation=metadata", "preallocation=off")
                    .as_str(),
                "img.qcow2",
                "fresh.qcow2",
            ],
        );
        let ours = allocated(&img);
        let fresh = allocated(&d.join("fresh.qcow2"));
        let cs = u.cluster_size();
        let l2_tables = (0..u.header().l1_size as u64)
            .filter(|i| get64(&f, u.header().l1_table_offset + i * 8) & L1E_OFFSET_MASK != 0)
            .count() as u64;
        // Files are measured in 4 KiB blocks: a cluster costs at least one.
        let slack = l2_tables * cs.max(4096) + 4 * cs.max(4096);
        assert!(
            ours <= fresh + fresh / 20 + slack,
            "{}: {ours} bytes allocated, a fresh convert takes {fresh} (+5 % + {slack})",
            c.name
        );
    }
    Outcome {
        barriers: n,
        crash_images,
    }
}

fn cases() -> Vec<Case> {
    let io: &[&str] = &[
        "write -P 0x11 0 1M",
        "write -P 0x22 2M 64k",
        "write -z 2560k 128k",
        "write -P 0x33 6M 512k",
    ];
    vec![
        Case {
            name: "v3 64k",
            opts: "cluster_size=64k",
            size: "8M",
            io,
            ops: 40,
            ..Case::default()
        },
        Case {
            name: "v2 64k",
            opts: "compat=0.10,cluster_size=64k",
            size: "8M",
            io: &["write -P 0x11 0 1M", "write -P 0x33 6M 512k"],
            ops: 40,
            ..Case::default()
        },
        Case {
            name: "512 B clusters",
            opts: "cluster_size=512",
            size: "4M",
            io: &[
                "write -P 0x11 0 256k",
                "write -z 1M 64k",
                "write -P 0x22 3M 4k",
            ],
            ops: 200,
            ..Case::default()
        },
        Case {
            name: "2 MiB clusters",
            opts: "cluster_size=2M",
            size: "32M",
            io: &["write -P 0x11 0 3M", "write -P 0x22 20M 4k"],
            ops: 6,
            ..Case::default()
        },
        Case {
            name: "refcount_bits=1",
            opts: "refcount_bits=1,cluster_size=4k",
            size: "8M",
            io,
            ops: 60,
            ..Case::default()
        },
        Case {
            name: "refcount_bits=64 snapshots",
            opts: "refcount_bits=64,cluster_size=4k",
            size: "4M",
            io: &["write -P 0x11 0 1M", "write -P 0x22 2M 64k"],
            snapshots: true,
            ops: 60,
            ..Case::default()
        },
        Case {
            name: "two snapshots",
            opts: "cluster_size=64k",
            size: "8M",
            io,
            snapshots: true,
            ops: 40,
            ..Case::default()
        },
        Case {
            name: "snapshot last",
            opts: "cluster_size=64k",
            size: "8M",
            io,
            snapshots: true,
            snapshot_last: true,
            ops: 40,
            ..Case::default()
        },
        Case {
            name: "snapshot last 4k refcount_bits=64",
            opts: "refcount_bits=64,cluster_size=4k",
            size: "8M",
            io,
            snapshots: true,
            snapshot_last: true,
            ops: 60,
            ..Case::default()
        },
        Case {
            name: "v2 snapshot last 512",
            opts: "compat=0.10,cluster_size=512",
            size: "4M",
            io: &["write -P 0x11 0 256k", "write -P 0x22 3M 4k"],
            snapshots: true,
            snapshot_last: true,
            ops: 150,
            ..Case::default()
        },
        Case {
            name: "v2 snapshots",
            opts: "compat=0.10,cluster_size=64k",
            size: "8M",
            io,
            snapshots: true,
            ops: 40,
            ..Case::default()
        },
        Case {
            name: "extended L2",
            opts: "extended_l2=on,cluster_size=64k",
            size: "8M",
            io: &[
                "write -P 0x11 0 1M",
                "write -P 0x22 2M 4k",
                "write -z 3M 8k",
            ],
            ops: 40,
            ..Case::default()
        },
        Case {
            name: "extended L2 backing",
            opts: "extended_l2=on,cluster_size=64k",
            size: "8M",
            io: &["write -P 0x11 4k 8k"],
            backing: true,
            ops: 40,
            ..Case::default()
        },
        Case {
            name: "preallocation=metadata",
            opts: "preallocation=metadata,cluster_size=64k",
            size: "8M",
            io: &["write -P 0x11 0 128k"],
            ops: 40,
            ..Case::default()
        },
        Case {
            name: "backing",
            opts: "cluster_size=64k",
            size: "8M",
            io: &["write -P 0x11 1M 64k"],
            backing: true,
            ops: 40,
            ..Case::default()
        },
        Case {
            name: "v2 backing",
            opts: "compat=0.10,cluster_size=64k",
            size: "8M",
            io: &["write -P 0x11 1M 64k"],
            backing: true,
            ops: 40,
            ..Case::default()
        },
        Case {
            name: "compressed zlib",
            opts: "cluster_size=64k",
            size: "8M",
            io,
            compress: Some("cluster_size=64k"),
            ops: 40,
            ..Case::default()
        },
        Case {
            name: "compressed zstd 4k",
            opts: "cluster_size=4k",
            size: "8M",
            io,
            compress: Some("cluster_size=4k,compression_type=zstd"),
            ops: 100,
            ..Case::default()
        },
        Case {
            name: "persistent bitmap",
            opts: "cluster_size=64k",
            size: "8M",
            io,
            bitmap: true,
            ops: 40,
            ..Case::default()
        },
    ]
}

#[test]
fn updates_of_qemu_images_pass_qemu_img_check_and_read_back() {
    require_qemu!();
    let mut total_barriers = 0;
    let mut images = 0;
    for (i, c) in cases().iter().enumerate() {
        let o = run_case(c, 0x5eed_0000 + i as u64);
        eprintln!(
            "{}: {} barriers in the recorded flush, {} crash images checked",
            c.name, o.barriers, o.crash_images
        );
        total_barriers += o.barriers;
        images += o.crash_images;
    }
    eprintln!("{total_barriers} barriers, {images} crash images, all passed qemu-img check");
}

#[test]
fn resize_of_a_qemu_image_with_snapshots() {
    require_qemu!();
    let dir = temp_dir();
    let d = &dir.0;
    // 512-byte clusters: an L2 table maps 32 KiB, an L1 cluster 2 MiB.
    let c = Case {
        name: "resize",
        opts: "cluster_size=512",
        size: "1M",
        io: &["write -P 0x11 0 600k"],
        ..Case::default()
    };
    make(d, &c);
    run(d, "qemu-img", &["snapshot", "-c", "s1", "img.qcow2"]);
    let snap = raw(d, "img.qcow2", Some("s1"));
    let mut model = raw(d, "img.qcow2", None);
    let mut f = std::fs::read(d.join("img.qcow2")).unwrap();
    let mut u = Updater::open(&f).unwrap();
    let cs = u.cluster_size();
    let old_l1 = u.header().l1_table_offset;

    // Up past the L1 table's coverage, then data past the old end.
    let big = 6 << 20;
    u.resize(&mut f, big).unwrap();
    assert_ne!(u.header().l1_table_offset, old_l1);
    model.resize(big as usize, 0);
    let mut rng = Rng(17);
    for k in 0..50u64 {
        let at = (1 << 20) + rng.below((big - (1 << 20)) / cs) * cs;
        let d = pattern(cs, k);
        u.write(at, &d).unwrap();
        model_write(&mut model, at, &d);
    }
    random_ops(&mut u, &mut model, &mut rng, 100);
    u.flush(&mut f).unwrap();
    write_sparse(&d.join("img.qcow2"), &f);
    let (st, out) = check_status(d, "img.qcow2");
    assert_eq!(st, 0, "after growing: {out}");
    assert!(raw(d, "img.qcow2", None) == model);
    // `convert -l` reads a snapshot at the image's current size (qemu does
    // the same after its own `qemu-img resize`): zeros past the snapshot's.
    let at_size = |size: u64| {
        let mut v = snap.clone();
        v.resize(size as usize, 0);
        v
    };
    assert!(raw(d, "img.qcow2", Some("s1")) == at_size(big));

    // Down, below the snapshot's data.
    let small = 300 << 10;
    u.resize(&mut f, small).unwrap();
    write_sparse(&d.join("img.qcow2"), &f);
    let (st, out) = check_status(d, "img.qcow2");
    assert_eq!(st, 0, "after shrinking: {out}");
    assert!(raw(d, "img.qcow2", None)[..] == model[..small as usize]);
    assert!(raw(d, "img.qcow2", Some("s1")) == at_size(small));
    // The snapshot keeps the clusters past the new size: reverting to it
    // (on a copy) gives all of it back.
    std::fs::copy(d.join("img.qcow2"), d.join("rev.qcow2")).unwrap();
    run(d, "qemu-img", &["snapshot", "-a", "s1", "rev.qcow2"]);
    assert!(raw(d, "rev.qcow2", None) == snap);
    assert_eq!(check_status(d, "rev.qcow2").0, 0);
    let out = tool(d, "qemu-img", &["info", "--output=json", "img.qcow2"]);
    let info = String::from_utf8_lossy(&out.stdout);
    assert!(
        info.contains(&format!("\"virtual-size\": {small}")),
        "{info}"
    );
}

/// 512-byte clusters with 64-bit refcounts: a refcount block covers 32 KiB
/// of file, so 3 MiB of new data needs new blocks and a larger refcount
/// table. Every barrier of the flush is replayed through qemu-img check.
#[test]
fn refcount_table_growth_in_a_qemu_image() {
    require_qemu!();
    let dir = temp_dir();
    let d = &dir.0;
    make(
        d,
        &Case {
            name: "growth",
            opts: "cluster_size=512,refcount_bits=64",
            size: "8M",
            io: &["write -P 0x11 0 64k"],
            ..Case::default()
        },
    );
    let mut model = raw(d, "img.qcow2", None);
    let base = std::fs::read(d.join("img.qcow2")).unwrap();
    let mut u = Updater::open(&base).unwrap();
    let cs = u.cluster_size();
    let old_rt = (
        u.header().refcount_table_offset,
        u.header().refcount_table_clusters,
    );
    let data: Vec<u8> = (0..(3 << 20) / cs).flat_map(|k| pattern(cs, k)).collect();
    u.write(1 << 20, &data).unwrap();
    model_write(&mut model, 1 << 20, &data);
    let mut rec = Recorder {
        file: base.clone(),
        log: Vec::new(),
    };
    u.flush(&mut rec).unwrap();
    let new_rt = (
        u.header().refcount_table_offset,
        u.header().refcount_table_clusters,
    );
    assert_ne!(old_rt, new_rt, "the refcount table moved");
    assert!(new_rt.1 > old_rt.1);
    let n = barriers(&rec.log);
    for at in 0..=n {
        for variant in 0..2u64 {
            let mut r = Rng(at as u64 * 2 + variant + 1);
            let image = crash_image(&base, &rec.log, at, &mut || {
                variant == 1 && r.next() & 1 == 0
            });
            write_sparse(&d.join("crash.qcow2"), &image);
            let (st, out) = check_status(d, "crash.qcow2");
            assert!(
                st == 0 || st == 3,
                "crash after barrier {at} of {n}: exit {st}: {out}"
            );
        }
    }
    write_sparse(&d.join("img.qcow2"), &rec.file);
    let (st, out) = check_status(d, "img.qcow2");
    assert_eq!(st, 0, "{out}");
    assert!(raw(d, "img.qcow2", None) == model);
    eprintln!("refcount table {old_rt:?} -> {new_rt:?}, {n} barriers");
}
