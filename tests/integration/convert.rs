//! `imgsync convert` and `compare` on their own: zero detection edges, the
//! JSON report, refusals, atomic output (errors, SIGTERM, SIGKILL), the
//! free-space check and ENOSPC on a small tmpfs, block device targets, and
//! compare against `qemu-img compare`. (Every image case of the format
//! tests is also converted; see `common::check_convert`.)

use std::fs::OpenOptions as FsOpenOptions;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{
    assert_one_line_error, assert_one_line_error_code, data_regions, random_bytes, Env, Op, Qcow2,
    Raw, Tmpfs, KIB, MIB,
};

/// Writes a raw file of `size` bytes: `chunks` of (offset, bytes), holes
/// elsewhere.
fn raw_file(path: &Path, size: u64, chunks: &[(u64, Vec<u8>)]) {
    let f = FsOpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .expect("create raw");
    for (off, bytes) in chunks {
        f.write_all_at(bytes, *off).expect("write raw");
    }
    f.set_len(size).expect("size raw");
}

fn qemu_compare(env: &Env, a: &str, fa: &str, b: &str, fb: &str) -> (i32, String) {
    let out = env.run("qemu-img", &["compare", "-f", fa, "-F", fb, a, b]);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

fn convert_ok(env: &Env, args: &[&str]) -> Value {
    let mut v = vec!["convert", "--output", "json"];
    v.extend_from_slice(args);
    env.imgsync_json(&v)
}

/// Files in `dir` (names), sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------
// Zero detection

/// A 4 KiB block that is zero but for its first or its last byte stays
/// data; an allocated all-zero region becomes a hole; `-S 0` keeps it.
#[test]
fn zero_detection_edges() {
    let env = qemu_env!();
    let mut first = vec![0u8; 4096];
    first[0] = 0x11;
    let mut last = vec![0u8; 4096];
    last[4095] = 0x22;
    raw_file(
        &env.path("src.raw"),
        4 * MIB,
        &[
            (0, first),
            (64 * KIB, last),
            (MIB, vec![0u8; 256 * KIB as usize]),
            (2 * MIB, random_bytes(8192, 9, false)),
        ],
    );
    let r = convert_ok(&env, &["-O", "raw", "src.raw", "out.raw"]);
    assert_eq!(qemu_compare(&env, "src.raw", "raw", "out.raw", "raw").0, 0);
    // Read: everything allocated. Zero: the 256 KiB of written zeros and the
    // zero parts of the two 4 KiB blocks (7 sectors each... but only runs of
    // 4 KiB count, so none of those).
    assert_eq!(r["bytes-read"], 4096 + 4096 + 256 * KIB + 8192);
    assert_eq!(r["zero-bytes"], 256 * KIB);
    let map = env.imgsync_json(&["map", "--output", "json", "-f", "raw", "out.raw"]);
    let data_at = |off: u64| {
        map.as_array().unwrap().iter().any(|e| {
            e["data"] == true
                && e["start"].as_u64().unwrap() <= off
                && off < e["start"].as_u64().unwrap() + e["length"].as_u64().unwrap()
        })
    };
    assert!(data_at(0), "first-byte block is data: {map}");
    assert!(data_at(64 * KIB + 4095), "last-byte block is data: {map}");
    assert!(!data_at(MIB + 4096), "allocated zeros became a hole: {map}");
    assert!(data_at(2 * MIB));

    // -S 0: the allocated zeros stay allocated, raw and qcow2.
    let r = convert_ok(&env, &["-O", "raw", "-S", "0", "src.raw", "keep.raw"]);
    assert_eq!(r["zero-bytes"], 0);
    assert!(data_regions(&env.path("keep.raw")) >= 4096 + 4096 + 256 * KIB + 8192);
    convert_ok(&env, &["-O", "qcow2", "-S", "0", "src.raw", "keep.qcow2"]);
    env.assert_qemu_map_has("qcow2", "keep.qcow2", "the zeros allocated", |e| {
        e["data"] == true
            && e["start"].as_u64().unwrap() <= MIB
            && e["length"].as_u64().unwrap() >= 256 * KIB
    });
    assert_eq!(
        qemu_compare(&env, "src.raw", "raw", "keep.qcow2", "qcow2").0,
        0
    );
    // Default -S on qcow2: the zero clusters are not allocated.
    convert_ok(&env, &["-O", "qcow2", "src.raw", "sparse.qcow2"]);
    let m = env.qemu_json(&["map", "--output=json", "-f", "qcow2", "sparse.qcow2"]);
    assert!(
        !m.as_array().unwrap().iter().any(|e| e["data"] == true
            && e["start"].as_u64().unwrap() <= MIB + 64 * KIB
            && MIB + 64 * KIB < e["start"].as_u64().unwrap() + e["length"].as_u64().unwrap()),
        "{m}"
    );
}

#[test]
fn larger_sparse_size_keeps_short_zero_runs() {
    let env = qemu_env!();
    // 16 KiB of zeros between data: a hole with -S 4k, data with -S 64k.
    let mut buf = random_bytes(64 * KIB as usize, 3, false);
    buf[16 * KIB as usize..32 * KIB as usize].fill(0);
    raw_file(&env.path("src.raw"), MIB, &[(0, buf)]);
    let r = convert_ok(&env, &["-O", "raw", "src.raw", "a.raw"]);
    assert_eq!(r["zero-bytes"], 16 * KIB);
    let r = convert_ok(&env, &["-O", "raw", "-S", "64k", "src.raw", "b.raw"]);
    assert_eq!(r["zero-bytes"], 0);
    for f in ["a.raw", "b.raw"] {
        assert_eq!(qemu_compare(&env, "src.raw", "raw", f, "raw").0, 0);
    }
    // A run longer than the 2 MiB pipeline cells still meets a long -S
    // (cells grow to -S; like qemu-img, whose buffers grow to -S, a run is
    // found within one cell).
    let mut big = random_bytes(20 * MIB as usize, 4, false);
    big[8 * MIB as usize..16 * MIB as usize].fill(0);
    raw_file(&env.path("big.raw"), 24 * MIB, &[(0, big)]);
    let r = convert_ok(&env, &["-O", "raw", "-S", "8M", "big.raw", "c.raw"]);
    assert_eq!(r["zero-bytes"], 8 * MIB);
    assert_eq!(qemu_compare(&env, "big.raw", "raw", "c.raw", "raw").0, 0);
}

// ---------------------------------------------------------------------------
// Options and refusals

#[test]
fn output_format_defaults_to_the_source_format() {
    let env = qemu_env!();
    env.create("src.qcow2", Qcow2::new(8 * MIB))
        .write(&[Op::Data(MIB, 100 * KIB)]);
    let r = convert_ok(&env, &["src.qcow2", "out"]);
    assert_eq!(r["format"], "qcow2");
    let info = env.qemu_json(&["info", "--output=json", "out"]);
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["format-specific"]["data"]["compat"], "1.1");
    assert_eq!(
        qemu_compare(&env, "src.qcow2", "qcow2", "out", "qcow2").0,
        0
    );
}

#[test]
fn cluster_size_and_compression_type_reach_the_output() {
    let env = qemu_env!();
    raw_file(
        &env.path("src.raw"),
        8 * MIB,
        &[(0, random_bytes(3 * MIB as usize, 4, true))],
    );
    for (cs, ty) in [("4k", "zlib"), ("2M", "zstd"), ("512", "zstd")] {
        let out = format!("out-{cs}-{ty}.qcow2");
        convert_ok(
            &env,
            &[
                "-O",
                "qcow2",
                "-c",
                "--compression-type",
                ty,
                "--cluster-size",
                cs,
                "src.raw",
                &out,
            ],
        );
        let info = env.qemu_json(&["info", "--output=json", &out]);
        assert_eq!(
            info["cluster-size"].as_u64(),
            Some(common_size(cs)),
            "{out}: {info}"
        );
        assert_eq!(info["format-specific"]["data"]["compression-type"], ty);
        let chk = env.qemu_json(&["check", "--output=json", &out]);
        assert!(
            chk["compressed-clusters"].as_u64().unwrap() > 0,
            "{out}: {chk}"
        );
        assert_eq!(qemu_compare(&env, "src.raw", "raw", &out, "qcow2").0, 0);
    }
}

fn common_size(s: &str) -> u64 {
    match s {
        "4k" => 4096,
        "2M" => 2 * MIB,
        "512" => 512,
        _ => unreachable!(),
    }
}

/// Incompressible clusters are stored plain: the output is no larger than
/// without -c.
#[test]
fn incompressible_data_is_stored_plain() {
    let env = qemu_env!();
    raw_file(
        &env.path("src.raw"),
        4 * MIB,
        &[(0, random_bytes(MIB as usize, 5, false))],
    );
    let r = convert_ok(&env, &["-O", "qcow2", "-c", "src.raw", "c.qcow2"]);
    assert_eq!(r["compressed-clusters"], 0);
    let plain = convert_ok(&env, &["-O", "qcow2", "src.raw", "p.qcow2"]);
    assert_eq!(r["bytes-written"], plain["bytes-written"]);
}

#[test]
fn refusals_are_one_line_errors() {
    let env = qemu_env!();
    raw_file(&env.path("src.raw"), MIB, &[(0, vec![1u8; 4096])]);
    let before = std::fs::read(env.path("src.raw")).unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["convert", "src.raw", "src.raw"], "refusing to overwrite"),
        (
            &["convert", "src.raw", "./src.raw"],
            "refusing to overwrite",
        ),
        (
            &["convert", "-O", "raw", "-c", "src.raw", "x"],
            "needs qcow2 output",
        ),
        (
            &["convert", "-S", "1000", "src.raw", "x"],
            "multiple of 512",
        ),
        (
            &[
                "convert",
                "-O",
                "qcow2",
                "--cluster-size",
                "3000",
                "src.raw",
                "x",
            ],
            "power of two",
        ),
        (&["convert", "src.raw", "nodir/x"], "nodir/x"),
        (&["convert", "missing.raw", "x"], "missing.raw"),
        (&["compare", "src.raw", "missing.raw"], "missing.raw"),
    ];
    for (args, needle) in cases {
        let out = env.imgsync(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let line = assert_one_line_error(&out, needle);
        assert!(line.contains(needle), "{args:?}: {line}");
    }
    // A hard link to the source is the source.
    std::fs::hard_link(env.path("src.raw"), env.path("link.raw")).unwrap();
    let out = env.imgsync(&["convert", "src.raw", "link.raw"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(std::fs::read(env.path("src.raw")).unwrap(), before);
    assert!(!env.path("x").exists());
}

/// A backing file of the source is refused as DST too.
#[test]
fn overwriting_a_backing_file_is_refused() {
    let env = qemu_env!();
    env.create("base.qcow2", Qcow2::new(4 * MIB));
    env.create("top.qcow2", Qcow2::overlay("base.qcow2", "qcow2"));
    let out = env.imgsync(&["convert", "-f", "qcow2", "top.qcow2", "base.qcow2"]);
    assert_eq!(out.status.code(), Some(2));
    assert_one_line_error(&out, "refusing to overwrite");
}

/// An existing DST is replaced only on success, keeping its permissions;
/// a failed convert leaves it as it was.
#[test]
fn existing_destination_is_replaced_only_on_success() {
    let env = qemu_env!();
    raw_file(&env.path("src.raw"), MIB, &[(4096, vec![9u8; 8192])]);
    std::fs::write(env.path("dst.raw"), b"old content").unwrap();
    std::fs::set_permissions(env.path("dst.raw"), std::fs::Permissions::from_mode(0o600)).unwrap();

    damaged_qcow2(&env, "bad.qcow2");
    let out = env.imgsync(&["convert", "-O", "raw", "bad.qcow2", "dst.raw"]);
    assert_eq!(out.status.code(), Some(2));
    assert_one_line_error(&out, "bad.qcow2");
    assert_eq!(std::fs::read(env.path("dst.raw")).unwrap(), b"old content");

    convert_ok(&env, &["-O", "raw", "src.raw", "dst.raw"]);
    assert_eq!(qemu_compare(&env, "src.raw", "raw", "dst.raw", "raw").0, 0);
    let mode = std::fs::metadata(env.path("dst.raw"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // No temporary file left beside DST (src-1.bin is qemu-io's input).
    assert_eq!(
        listing(env.root()),
        ["bad.qcow2", "dst.raw", "src-1.bin", "src.raw"]
    );
}

/// A qcow2 image that opens but fails mid-read: its one data cluster is cut
/// off the end of the file, so its L2 entry points beyond EOF.
fn damaged_qcow2(env: &Env, name: &str) {
    env.create(name, Qcow2::new(MIB))
        .write(&[Op::Data(0, 64 * KIB)]);
    let len = std::fs::metadata(env.path(name)).unwrap().len();
    let f = FsOpenOptions::new()
        .write(true)
        .open(env.path(name))
        .unwrap();
    f.set_len(len - 64 * KIB).unwrap();
}

/// An output the QCOW2 writer cannot make (its L1 table would exceed
/// qemu's 32 MiB limit) is refused before anything is written.
#[test]
fn impossible_qcow2_output_is_refused_before_writing() {
    let env = qemu_env!();
    env.create("huge.qcow2", Qcow2::new(8 << 40)); // 8 TiB
    let out = env.imgsync(&[
        "convert",
        "-O",
        "qcow2",
        "--cluster-size",
        "512",
        "huge.qcow2",
        "out/x.qcow2",
    ]);
    assert_eq!(out.status.code(), Some(2));
    // The directory does not exist: the refusal comes first.
    let line = assert_one_line_error(&out, "out/x.qcow2");
    assert!(line.contains("larger cluster size"), "{line}");
    std::fs::create_dir(env.path("out")).unwrap();
    let out = env.imgsync(&[
        "convert",
        "-O",
        "qcow2",
        "--cluster-size",
        "512",
        "huge.qcow2",
        "out/x.qcow2",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert_one_line_error(&out, "larger cluster size");
    assert_eq!(listing(&env.path("out")), Vec::<String>::new());
}

// ---------------------------------------------------------------------------
// Interruption

/// A source big enough that convert is still running a moment after start.
pub(crate) fn slow_source(env: &Env) -> PathBuf {
    let path = env.path("big.raw");
    let chunk = random_bytes(8 * MIB as usize, 77, true);
    let f = FsOpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .unwrap();
    for i in 0..48u64 {
        f.write_all_at(&chunk, i * 8 * MIB).unwrap();
    }
    f.set_len(1 << 30).unwrap();
    path
}

/// A compressing convert of `slow_source`'s big.raw to `dst` on one
/// thread, slow enough to be signalled midway; stderr captured.
pub(crate) fn slow_convert(env: &Env, dst: &str) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_imgsync"))
        .args([
            "convert",
            "-O",
            "qcow2",
            "-c",
            "--threads",
            "1",
            "big.raw",
            dst,
        ])
        .current_dir(env.root())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn interrupt_midway(signal: &str) {
    let env = qemu_env!();
    slow_source(&env);
    let out_dir = env.path("out");
    std::fs::create_dir(&out_dir).unwrap();
    let mut child = slow_convert(&env, "out/dst.qcow2");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "convert finished before it could be interrupted; make the source bigger"
    );
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(started.elapsed() < Duration::from_secs(20), "slow to stop");
    assert!(!out.status.success());
    if signal == "-TERM" {
        // The shell's status for SIGTERM (128 + 15), after the line.
        let line = assert_one_line_error_code(&out, "interrupted", 143);
        assert!(line.contains("out/dst.qcow2"), "{line}");
    }
    assert_eq!(listing(&out_dir), Vec::<String>::new(), "left behind");
}

#[test]
fn sigterm_midway_leaves_nothing() {
    interrupt_midway("-TERM");
}

#[test]
fn sigkill_midway_leaves_nothing() {
    interrupt_midway("-KILL");
}

// ---------------------------------------------------------------------------
// A small tmpfs as DST's filesystem (needs root; skipped visibly otherwise)

/// 4 GiB virtual with `data` bytes of data in 1 MiB pieces.
fn sparse_source(env: &Env, name: &str, data: u64) {
    let chunks: Vec<_> = (0..data / MIB)
        .map(|i| {
            (
                i * 40 * MIB + 12 * KIB,
                random_bytes(MIB as usize, i, false),
            )
        })
        .collect();
    raw_file(&env.path(name), 4 << 30, &chunks);
}

#[test]
fn small_filesystem_takes_a_large_sparse_image() {
    let env = qemu_env!();
    let Some(fs) = Tmpfs::mount(env.path("small"), "64M") else {
        return;
    };
    sparse_source(&env, "src.raw", 20 * MIB);
    for (fmt, name) in [("raw", "small/out.raw"), ("qcow2", "small/out.qcow2")] {
        convert_ok(&env, &["-O", fmt, "src.raw", name]);
        assert_eq!(qemu_compare(&env, "src.raw", "raw", name, fmt).0, 0);
        std::fs::remove_file(env.path(name)).unwrap();
    }
    drop(fs);
}

#[test]
fn too_little_space_fails_early_and_leaves_nothing() {
    let env = qemu_env!();
    let Some(fs) = Tmpfs::mount(env.path("small"), "64M") else {
        return;
    };
    sparse_source(&env, "src.raw", 100 * MIB);
    for fmt in ["raw", "qcow2"] {
        let started = Instant::now();
        let out = env.imgsync(&["convert", "-O", fmt, "src.raw", "small/out"]);
        assert_eq!(out.status.code(), Some(2));
        let line = assert_one_line_error(&out, "small/out");
        assert!(
            // Sizes human and exact: "needs up to 100 MiB (104857600 bytes)
            // but the file system has 16 MiB free".
            line.contains(" MiB (")
                && line.contains(" bytes) but the file system has ")
                && line.contains(" free")
                && line.contains("--no-space-check"),
            "{line}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(listing(&env.path("small")), Vec::<String>::new());
    }
    // Skipping the check: the disk fills up mid-run; a clear error, and
    // nothing left behind (the space is free again).
    for fmt in ["raw", "qcow2"] {
        let out = env.imgsync(&[
            "convert",
            "--no-space-check",
            "-O",
            fmt,
            "src.raw",
            "small/out",
        ]);
        assert_eq!(out.status.code(), Some(2));
        let line = assert_one_line_error(&out, "small/out");
        assert!(line.contains("No space left on device"), "{line}");
        assert_eq!(listing(&env.path("small")), Vec::<String>::new());
        let df = Command::new("df")
            .args(["--output=used", "-B1"])
            .arg(env.path("small"))
            .output()
            .unwrap();
        let used: u64 = String::from_utf8_lossy(&df.stdout)
            .lines()
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(
            used < MIB,
            "space still used after the failed convert: {used}"
        );
    }
    drop(fs);
}

// ---------------------------------------------------------------------------
// Block device target (loop device; needs root)

pub(crate) struct Loop(pub(crate) String);

impl Loop {
    pub(crate) fn attach(file: &Path) -> Option<Loop> {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output();
        match out {
            Ok(o) if o.status.success() => {
                Some(Loop(String::from_utf8_lossy(&o.stdout).trim().to_string()))
            }
            _ => {
                if std::env::var("IMGSYNC_REQUIRE_LOOP").as_deref() == Ok("1") {
                    panic!("losetup failed but IMGSYNC_REQUIRE_LOOP=1");
                }
                eprintln!("SKIP: losetup unavailable (not root?)");
                None
            }
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn block_device_target_is_written_and_zeroed() {
    let env = qemu_env!();
    let size = 32 * MIB;
    env.create("src.qcow2", Qcow2::new(size)).write(&[
        Op::Data(0, 100 * KIB),
        Op::Data(7 * MIB + 512, 3 * MIB),
        Op::Zero(20 * MIB, MIB),
    ]);
    // The device holds old data everywhere.
    std::fs::write(env.path("dev.img"), vec![0xeeu8; size as usize]).unwrap();
    let Some(dev) = Loop::attach(&env.path("dev.img")) else {
        return;
    };
    convert_ok(&env, &["-O", "raw", "src.qcow2", &dev.0]);
    let (rc, msg) = qemu_compare(&env, "src.qcow2", "qcow2", &dev.0, "raw");
    assert_eq!(rc, 0, "{msg}");

    // --target-is-zero trusts the device: the old data shows through.
    std::fs::write(env.path("dev.img"), vec![0xeeu8; size as usize]).unwrap();
    let _ = Command::new("blockdev")
        .args(["--flushbufs", &dev.0])
        .status();
    convert_ok(
        &env,
        &["-O", "raw", "--target-is-zero", "src.qcow2", &dev.0],
    );
    assert_eq!(qemu_compare(&env, "src.qcow2", "qcow2", &dev.0, "raw").0, 1);

    // A device in use (here: mounted) is refused.
    let mnt = env.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", &dev.0])
        .output();
    if mkfs.is_ok_and(|o| o.status.success())
        && Command::new("mount")
            .arg(&dev.0)
            .arg(&mnt)
            .status()
            .is_ok_and(|s| s.success())
    {
        let out = env.imgsync(&["convert", "-O", "raw", "src.qcow2", &dev.0]);
        let _ = Command::new("umount").arg(&mnt).status();
        assert_eq!(out.status.code(), Some(2));
        assert_one_line_error(&out, "in use");
    } else {
        eprintln!("SKIP part of block_device_target_is_written_and_zeroed: cannot mkfs/mount the loop device");
    }

    // A device smaller than the image is refused before writing.
    env.create("big.raw", Raw::new(64 * MIB));
    let out = env.imgsync(&["convert", "-O", "raw", "big.raw", &dev.0]);
    assert_eq!(out.status.code(), Some(2));
    assert_one_line_error(&out, "device holds");
}

// ---------------------------------------------------------------------------
// compare

fn compare(env: &Env, a: &str, b: &str) -> (i32, String) {
    let out = env.imgsync(&["compare", a, b]);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

#[test]
fn compare_finds_the_first_difference_like_qemu_img() {
    let env = qemu_env!();
    let size = 16 * MIB;
    raw_file(
        &env.path("a.raw"),
        size,
        &[
            (0, random_bytes(MIB as usize, 1, true)),
            (5 * MIB, random_bytes(2 * MIB as usize, 2, true)),
            (size - 64 * KIB, random_bytes(64 * KIB as usize, 3, true)),
        ],
    );
    env.qemu_img(&[
        "convert", "-c", "-f", "raw", "-O", "qcow2", "a.raw", "a.qcow2",
    ]);
    assert_eq!(
        compare(&env, "a.raw", "a.qcow2"),
        (0, "Images are identical.".into())
    );
    assert_eq!(qemu_compare(&env, "a.raw", "raw", "a.qcow2", "qcow2").0, 0);

    // One byte different at the start, at the end, and inside a
    // compressed cluster.
    for (off, what) in [
        (0u64, "start"),
        (size - 1, "end"),
        (5 * MIB + 70_000, "compressed"),
    ] {
        let name = format!("b-{what}.qcow2");
        std::fs::copy(env.path("a.qcow2"), env.path(&name)).unwrap();
        env.qemu_io("qcow2", &name, &[Op::Pattern(0x5c, off, 1)]);
        let ours = compare(&env, "a.raw", &name);
        let theirs = qemu_compare(&env, "a.raw", "raw", &name, "qcow2");
        assert_eq!(ours.0, 1, "{what}: {ours:?}");
        assert_eq!(
            ours.1,
            format!("Content mismatch at offset {off}!"),
            "{what}"
        );
        // qemu-img names the first differing 512-byte sector; imgsync the
        // byte itself.
        assert_eq!(theirs.0, 1, "{what}: {theirs:?}");
        assert_eq!(
            theirs.1,
            format!("Content mismatch at offset {}!", off / 512 * 512),
            "{what}: qemu-img compare agrees on the sector"
        );
    }
    // The compressed case really is compressed in the unmodified image.
    env.assert_qemu_map_has("qcow2", "a.qcow2", "compressed clusters", |e| {
        e["compressed"] == true
    });
}

#[test]
fn compare_data_against_holes_and_sizes() {
    let env = qemu_env!();
    raw_file(&env.path("a.raw"), 4 * MIB, &[(MIB, vec![0u8; 4096])]);
    raw_file(&env.path("b.raw"), 4 * MIB, &[]);
    // Written zeros against a hole: identical.
    assert_eq!(compare(&env, "a.raw", "b.raw").0, 0);
    // A larger image whose extra part is zeros: identical, with a warning
    // (qemu-img compare without -s).
    raw_file(&env.path("c.raw"), 8 * MIB, &[]);
    let (rc, out) = compare(&env, "a.raw", "c.raw");
    assert_eq!(rc, 0);
    assert!(out.starts_with("Warning: Image size mismatch!"), "{out}");
    assert_eq!(qemu_compare(&env, "a.raw", "raw", "c.raw", "raw").0, 0);
    // ... and with data there: different, at that offset.
    raw_file(&env.path("d.raw"), 8 * MIB, &[(6 * MIB + 3, vec![1u8])]);
    let (rc, out) = compare(&env, "a.raw", "d.raw");
    assert_eq!(rc, 1);
    assert!(
        out.ends_with(&format!("Content mismatch at offset {}!", 6 * MIB + 3)),
        "{out}"
    );
    assert_eq!(qemu_compare(&env, "a.raw", "raw", "d.raw", "raw").0, 1);
    // -q prints nothing; the exit status says it.
    let out = env.imgsync(&["compare", "-q", "a.raw", "d.raw"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let j = env.imgsync(&["compare", "--output", "json", "a.raw", "d.raw"]);
    let v: Value = serde_json::from_slice(&j.stdout).unwrap();
    assert_eq!(v["first-difference"].as_u64(), Some(6 * MIB + 3));
}

/// A read failure on either side is exit 2 naming that image, never a
/// verdict.
#[test]
fn compare_names_the_image_that_fails() {
    let env = qemu_env!();
    damaged_qcow2(&env, "bad.qcow2");
    raw_file(&env.path("good.raw"), MIB, &[(0, vec![7u8; 4096])]);
    for (a, b) in [("good.raw", "bad.qcow2"), ("bad.qcow2", "good.raw")] {
        let out = env.imgsync(&["compare", a, b]);
        assert_eq!(out.status.code(), Some(2), "{a} {b}");
        let line = assert_one_line_error(&out, "bad.qcow2");
        assert!(line.starts_with("imgsync: bad.qcow2:"), "{line}");
        assert!(out.stdout.is_empty());
    }
}

/// Progress: `-p` reports on stderr even when it is not a terminal.
#[test]
fn progress_is_reported_when_asked() {
    let env = qemu_env!();
    raw_file(
        &env.path("src.raw"),
        8 * MIB,
        &[(0, random_bytes(4 * MIB as usize, 8, false))],
    );
    let out = env.imgsync(&["convert", "-p", "src.raw", "out.raw"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("100%"), "{err}");
    let out = env.imgsync(&["convert", "-q", "src.raw", "out2.raw"]);
    assert!(out.status.success() && out.stderr.is_empty() && out.stdout.is_empty());
}

/// Empty images convert both ways and pass qemu-img check.
#[test]
fn zero_size_images_convert() {
    let env = qemu_env!();
    env.create("z.qcow2", Qcow2::new(0));
    env.create("z.raw", Raw::new(0));
    for (src, fmt) in [("z.qcow2", "qcow2"), ("z.raw", "raw")] {
        for out_fmt in ["raw", "qcow2"] {
            let out = format!("{src}.{out_fmt}");
            convert_ok(&env, &["-O", out_fmt, src, &out]);
            assert_eq!(qemu_compare(&env, src, fmt, &out, out_fmt).0, 0);
            if out_fmt == "qcow2" {
                let chk = env.run("qemu-img", &["check", &out]);
                assert!(
                    chk.status.success(),
                    "{}",
                    String::from_utf8_lossy(&chk.stdout)
                );
            }
        }
    }
}
