//! `imgsync sync`: DST made identical to SRC in place, locally and over a real
//! sshd (both transports, push and pull). Each change pattern is held to
//! qemu-img compare and to the report's counts (what was sent and punched);
//! interruptions (the process or the remote end killed at several points)
//! are held to "rerun gives SRC" and "--rollback gives the old DST, byte for
//! byte".

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

use crate::common::{
    assert_one_line_error, assert_one_line_error_code, data_regions, random_bytes, Env, Qcow2,
    Tmpfs, KIB, MIB,
};
use crate::remote::{
    entries, json, ok, pid_script, run, same, spawn, ssh_args, url, wait_for_pid, wait_until,
    wchar, Via, BOTH,
};
use crate::sshd::Sshd;

const BIN: &str = env!("CARGO_BIN_EXE_imgsync");
const BS: u64 = 64 * KIB;

/// The base image every pattern starts from: 256 MiB virtual, 16 data runs
/// of 512 KiB (8 MiB of data) at 16 MiB steps.
const BASE_SIZE: u64 = 256 * MIB;

fn base(path: &Path) {
    let f = File::create(path).unwrap();
    for i in 0..16u64 {
        f.write_all_at(
            &random_bytes(512 * KIB as usize, 100 + i, true),
            i * 16 * MIB,
        )
        .unwrap();
    }
    f.set_len(BASE_SIZE).unwrap();
}

/// `cp --sparse=always`: the copy keeps the holes.
pub(crate) fn copy(a: &Path, b: &Path) {
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(a)
        .arg(b)
        .status()
        .unwrap();
    assert!(st.success());
}

fn punch(path: &Path, off: u64, len: u64) {
    let st = Command::new("fallocate")
        .args([
            "--punch-hole",
            "-o",
            &off.to_string(),
            "-l",
            &len.to_string(),
        ])
        .arg(path)
        .status()
        .unwrap();
    assert!(st.success());
}

fn write_at(path: &Path, off: u64, data: &[u8]) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, off).unwrap();
}

/// XORs the byte at `off` of `path` with `mask`, in place.
fn flip(path: &Path, off: u64, mask: u8) {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, off).unwrap();
    f.write_all_at(&[b[0] ^ mask], off).unwrap();
}

/// qemu-img compare exits 0 and the sizes are equal (compare alone lets a
/// longer image pass when its tail is zeros).
pub(crate) fn identical(env: &Env, a: &Path, b: &Path, what: &str) {
    same(env, a, b);
    assert_eq!(
        fs::metadata(a).unwrap().len(),
        fs::metadata(b).unwrap().len(),
        "{what}: sizes"
    );
}

fn sync_local(env: &Env, args: &[&str]) -> Output {
    let mut a = vec!["sync", "-q", "--output", "json"];
    a.extend_from_slice(args);
    env.imgsync(&a)
}

fn report(out: &Output, what: &str) -> Value {
    ok(out, what);
    json(out)
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

/// A change pattern: what it does to SRC (a copy of the base) and what the
/// sync must then send and punch, in blocks.
struct Pattern {
    name: &'static str,
    change: fn(&Path),
    sent: u64,
    punched: u64,
}

const PATTERNS: &[Pattern] = &[
    Pattern {
        name: "identical",
        change: |_| {},
        sent: 0,
        punched: 0,
    },
    Pattern {
        // Five 4 KiB writes, in five different blocks.
        name: "scattered-4k",
        change: |p| {
            for i in 0..5u64 {
                write_at(
                    p,
                    i * 48 * MIB + (i + 1) * 20 * KIB,
                    &random_bytes(4 * KIB as usize, 900 + i, false),
                );
            }
        },
        sent: 5,
        punched: 0,
    },
    Pattern {
        // 1 MiB into a former hole, and a 4 KiB write in the last block.
        name: "new-data-in-holes",
        change: |p| {
            write_at(p, 100 * MIB, &random_bytes(MIB as usize, 7, true));
            write_at(
                p,
                BASE_SIZE - 4 * KIB,
                &random_bytes(4 * KIB as usize, 8, true),
            );
        },
        sent: 17,
        punched: 0,
    },
    Pattern {
        // Two data runs discarded (guest TRIM): holes in SRC over DST data.
        name: "discarded",
        change: |p| {
            punch(p, 16 * MIB, 512 * KIB);
            punch(p, 64 * MIB + 128 * KIB, 256 * KIB);
        },
        sent: 0,
        punched: 12,
    },
    Pattern {
        // Written zeros are zeros too: punched on DST, not sent.
        name: "zeroed",
        change: |p| write_at(p, 32 * MIB, &vec![0; 128 * KIB as usize]),
        sent: 0,
        punched: 2,
    },
    Pattern {
        name: "first-byte",
        change: |p| flip(p, 48 * MIB + BS, 0x5a),
        sent: 1,
        punched: 0,
    },
    Pattern {
        name: "last-byte",
        change: |p| flip(p, 80 * MIB + 3 * BS - 1, 0xa5),
        sent: 1,
        punched: 0,
    },
    Pattern {
        // Grown by 64 MiB with 256 KiB of data at its new end.
        name: "grown",
        change: |p| {
            write_at(
                p,
                BASE_SIZE + 64 * MIB - 256 * KIB,
                &random_bytes(256 * KIB as usize, 11, true),
            );
        },
        sent: 4,
        punched: 0,
    },
    Pattern {
        // Shrunk to 100 MiB + 1 KiB: the data beyond goes, and the last
        // partial block is compared as it is.
        name: "shrunk",
        change: |p| {
            fs::OpenOptions::new()
                .write(true)
                .open(p)
                .unwrap()
                .set_len(100 * MIB + KIB)
                .unwrap()
        },
        sent: 0,
        punched: 0,
    },
];

#[test]
fn change_patterns_local() {
    let env = qemu_env!();
    base(&env.path("base.raw"));
    let base_data = data_regions(&env.path("base.raw"));
    assert_eq!(base_data, 8 * MIB);
    for p in PATTERNS {
        let (src, dst) = (
            env.path(&format!("{}.src", p.name)),
            env.path(&format!("{}.dst", p.name)),
        );
        copy(&env.path("base.raw"), &src);
        copy(&env.path("base.raw"), &dst);
        (p.change)(&src);
        let r = report(
            &sync_local(
                &env,
                &[&src.display().to_string(), &dst.display().to_string()],
            ),
            p.name,
        );
        identical(&env, &src, &dst, p.name);
        assert_eq!(n(&r, "blocks-sent"), p.sent, "{}: {r}", p.name);
        assert_eq!(n(&r, "holes-punched"), p.punched, "{}: {r}", p.name);
        assert_eq!(r["destination-existed"], true, "{}: {r}", p.name);
        assert_eq!(r["resumed"], false, "{}: {r}", p.name);
        // DST is no less sparse than SRC, and only what differs is written.
        assert!(
            data_regions(&dst) <= data_regions(&src).max(base_data),
            "{}: DST allocation {} > SRC {}",
            p.name,
            data_regions(&dst),
            data_regions(&src)
        );
        assert_eq!(n(&r, "blocks-written"), p.sent, "{}: {r}", p.name);
        assert!(n(&r, "data-sent") <= p.sent * BS, "{}: {r}", p.name);
        // Both sides' data blocks are compared; holes on both never read.
        assert!(
            n(&r, "bytes-read") <= 2 * (base_data + 2 * MIB),
            "{}: {r}",
            p.name
        );
        // Nothing is left beside DST.
        assert!(
            !env.path(&format!(".{}.dst.imgsync-journal", p.name))
                .exists(),
            "{}: journal left",
            p.name
        );
    }
    // A discarded range is a hole on DST again.
    assert!(data_regions(&env.path("discarded.dst")) <= base_data - 768 * KIB);
    // Syncing again sends nothing.
    let r = report(
        &sync_local(&env, &["scattered-4k.src", "scattered-4k.dst"]),
        "again",
    );
    assert_eq!(n(&r, "blocks-sent"), 0, "{r}");
    assert_eq!(n(&r, "data-sent"), 0, "{r}");
}

#[test]
fn qcow2_source_with_compressed_clusters_and_absent_destination() {
    let env = qemu_env!();
    base(&env.path("base.raw"));
    copy(&env.path("base.raw"), &env.path("new.raw"));
    write_at(
        &env.path("new.raw"),
        200 * MIB,
        &random_bytes(MIB as usize, 3, true),
    );
    write_at(
        &env.path("new.raw"),
        5 * KIB,
        &random_bytes(4 * KIB as usize, 4, false),
    );
    env.qemu_img(&["convert", "-c", "-O", "qcow2", "new.raw", "new.qcow2"]);
    let map = env.qemu_json(&["map", "--output=json", "new.qcow2"]);
    assert!(
        map.as_array()
            .unwrap()
            .iter()
            .any(|e| e["compressed"] == true),
        "no compressed cluster: {map}"
    );
    // An existing raw DST: only the two changed places cross.
    copy(&env.path("base.raw"), &env.path("dst.raw"));
    let r = report(&sync_local(&env, &["new.qcow2", "dst.raw"]), "qcow2 -> raw");
    identical(
        &env,
        &env.path("new.raw"),
        &env.path("dst.raw"),
        "qcow2 -> raw",
    );
    assert_eq!(n(&r, "blocks-sent"), 17, "{r}");
    // DST absent, -O raw (else it is made a qcow2, SRC's format): a full
    // copy, sparse.
    let r = report(
        &sync_local(&env, &["-O", "raw", "new.qcow2", "fresh.raw"]),
        "absent",
    );
    identical(&env, &env.path("new.raw"), &env.path("fresh.raw"), "absent");
    assert_eq!(r["destination-existed"], false, "{r}");
    assert_eq!(data_regions(&env.path("fresh.raw")), 9 * MIB);
    assert_eq!(n(&r, "blocks-sent"), 9 * MIB / BS, "{r}");
}

#[test]
fn progress_shows_data_compared_and_sent() {
    let env = qemu_env!();
    base(&env.path("src.raw"));
    copy(&env.path("src.raw"), &env.path("dst.raw"));
    write_at(
        &env.path("src.raw"),
        3 * MIB,
        &random_bytes(MIB as usize, 5, false),
    );
    let out = env.imgsync(&["sync", "-p", "src.raw", "dst.raw"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("100%") && last.ends_with("1 MiB sent"),
        "{err}"
    );
}

#[test]
fn block_size_is_honoured() {
    let env = qemu_env!();
    base(&env.path("src.raw"));
    copy(&env.path("src.raw"), &env.path("dst.raw"));
    write_at(&env.path("src.raw"), 3 * MIB + 10, b"x");
    for (bs, sent) in [("4k", 1), ("1M", 1)] {
        copy(&env.path("dst.raw"), &env.path("d.raw"));
        let r = report(
            &sync_local(&env, &["--block-size", bs, "src.raw", "d.raw"]),
            bs,
        );
        identical(&env, &env.path("src.raw"), &env.path("d.raw"), bs);
        assert_eq!(n(&r, "blocks-sent"), sent, "{bs}: {r}");
        let want = if bs == "4k" { 4 * KIB } else { MIB };
        assert!(n(&r, "blocks-compared") >= 8 * MIB / want, "{bs}: {r}");
        fs::remove_file(env.path("d.raw")).unwrap();
    }
    for bad in ["3k", "2k", "32M"] {
        let line = assert_one_line_error(
            &env.imgsync(&["sync", "--block-size", bad, "src.raw", "dst.raw"]),
            bad,
        );
        assert!(line.contains("--block-size"), "{line}");
    }
}

#[test]
fn refusals_are_one_line_errors() {
    let env = qemu_env!();
    base(&env.path("a.raw"));
    env.create("d.qcow2", Qcow2::new(256 * MIB).data_file("d.data"));
    let cases: &[(&[&str], &str)] = &[
        (&["sync", "a.raw", "d.qcow2"], "data file"),
        (&["sync", "a.raw", "a.raw"], "a.raw"),
        (&["sync", "missing.raw", "x.raw"], "missing.raw"),
        (&["sync", "a.raw", "nodir/x.raw"], "nodir"),
        (&["sync", "--rollback", "a.raw"], "no interrupted sync"),
        (&["sync", "a.raw"], "SRC and DST"),
    ];
    for (args, want) in cases {
        let line = assert_one_line_error(&env.imgsync(args), &format!("{args:?}"));
        assert!(line.contains(want), "{args:?}: {line}");
    }
    assert!(!env.path("x.raw").exists());
    // The qcow2 DST is untouched.
    let info = env.qemu_json(&["info", "--output=json", "d.qcow2"]);
    assert_eq!(info["format"], "qcow2");
}

/// SRC with 96 MiB of incompressible data that all differs from DST's, so a
/// sync takes long enough to be killed at chosen points.
pub(crate) fn big_pair(env: &Env) {
    let (src, old) = (env.path("src.raw"), env.path("old.raw"));
    for (p, seed) in [(&src, 1u64), (&old, 1000)] {
        let f = File::create(p).unwrap();
        for i in 0..24u64 {
            f.write_all_at(
                &random_bytes(4 * MIB as usize, seed + i, false),
                i * 16 * MIB,
            )
            .unwrap();
        }
        f.set_len(512 * MIB).unwrap();
    }
    // The old image is longer: the rollback must restore its size too.
    File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_len(600 * MIB)
        .unwrap();
}

fn kill9(pid: &str) {
    Command::new("kill").args(["-KILL", pid]).status().unwrap();
}

#[test]
fn killed_local_sync_resumes_or_rolls_back() {
    let env = qemu_env!();
    big_pair(&env);
    let journal = env.path(".dst.raw.imgsync-journal");
    // Killed after writing 1 MiB (journal), 60 MiB and 150 MiB (journal and
    // DST): each time, --rollback restores the old image, and a killed run
    // followed by a rerun gives SRC.
    for at in [MIB, 60 * MIB, 150 * MIB] {
        for then_rollback in [true, false] {
            copy(&env.path("old.raw"), &env.path("dst.raw"));
            killed_sync(&env, "src.raw", "dst.raw", at);
            assert!(journal.exists(), "at {at}: no journal");
            // info and check say the image is mid-sync.
            let info = env.imgsync_json(&["info", "--output", "json", "dst.raw"]);
            assert!(info["sync-journal"].is_string(), "{info}");
            let check = env.imgsync(&["check", "dst.raw"]);
            // Part old, part new: corruption, as qemu-img check's 2.
            assert_eq!(check.status.code(), Some(2), "at {at}: check");
            assert!(String::from_utf8_lossy(&check.stdout).contains("interrupted sync"));
            if then_rollback {
                let out = env.imgsync(&["sync", "--rollback", "dst.raw"]);
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                identical(&env, &env.path("old.raw"), &env.path("dst.raw"), "rollback");
                assert!(!journal.exists(), "at {at}: journal left after rollback");
            } else {
                let r = report(&sync_local(&env, &["src.raw", "dst.raw"]), "rerun");
                assert_eq!(r["resumed"], true, "at {at}: {r}");
                assert_eq!(r["destination-hashes"], "read", "at {at}: {r}");
                identical(&env, &env.path("src.raw"), &env.path("dst.raw"), "rerun");
                assert!(!journal.exists(), "at {at}: journal left after rerun");
            }
        }
    }
}

#[test]
fn interrupted_local_sync_says_how_to_go_on() {
    let env = qemu_env!();
    big_pair(&env);
    copy(&env.path("old.raw"), &env.path("dst.raw"));
    let child = Command::new(BIN)
        .args(["sync", "--compress-level", "0", "src.raw", "dst.raw"])
        .current_dir(env.root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    wait_until(|| wchar(&pid.to_string()) > 20 * MIB, "sync writes");
    Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    // Ctrl-C's status (128 + 2), after the line.
    let line = assert_one_line_error_code(&out, "SIGINT", 130);
    assert!(
        line.starts_with("imgsync: dst.raw: interrupted; dst.raw is mid-sync")
            && line.contains("--rollback dst.raw"),
        "{line}"
    );
    let out = env.imgsync(&["sync", "--rollback", "dst.raw"]);
    assert!(out.status.success());
    identical(&env, &env.path("old.raw"), &env.path("dst.raw"), "rollback");
}

#[test]
fn small_filesystem_journal_room() {
    let env = qemu_env!();
    let Some(_fs) = Tmpfs::mount(env.path("small"), "48M") else {
        return;
    };
    // 2 GiB virtual, 16 MiB of data: a full copy fits in 48 MiB.
    let src = env.path("src.raw");
    let f = File::create(&src).unwrap();
    for i in 0..16u64 {
        f.write_all_at(&random_bytes(MIB as usize, i, false), i * 100 * MIB)
            .unwrap();
    }
    f.set_len(2048 * MIB).unwrap();
    let dst = env.path("small/dst.raw");
    report(
        &sync_local(&env, &["src.raw", "small/dst.raw"]),
        "full copy into small fs",
    );
    identical(&env, &src, &dst, "full copy");
    // Half the data changes: 8 MiB journal + in place: fits.
    for i in 0..8u64 {
        f.write_all_at(&random_bytes(MIB as usize, 50 + i, false), i * 100 * MIB)
            .unwrap();
    }
    let r = report(&sync_local(&env, &["src.raw", "small/dst.raw"]), "half");
    identical(&env, &src, &dst, "half");
    assert_eq!(n(&r, "blocks-sent"), 8 * MIB / BS, "{r}");
    // 30 MiB of new data and all 16 MiB changed: 16 MiB of journal and
    // 30 MiB more allocation do not fit in what is left. Fails before
    // changing anything.
    copy(&dst, &env.path("before.raw"));
    for i in 0..16u64 {
        f.write_all_at(&random_bytes(MIB as usize, 200 + i, false), i * 100 * MIB)
            .unwrap();
    }
    for i in 0..30u64 {
        f.write_all_at(
            &random_bytes(MIB as usize, 300 + i, false),
            i * 50 * MIB + 1800 * MIB,
        )
        .unwrap();
    }
    f.set_len(4096 * MIB).unwrap();
    let out = sync_local(&env, &["src.raw", "small/dst.raw"]);
    let line = assert_one_line_error(&out, "no room");
    assert!(line.contains("dst.raw") && line.contains("free"), "{line}");
    identical(&env, &env.path("before.raw"), &dst, "untouched");
    // Nothing beside DST (its hash cache, stale with SRC's new size, was
    // removed before anything else).
    assert_eq!(entries(&env.path("small")), vec!["dst.raw".to_string()]);
}

#[test]
fn hash_cache_is_used_only_while_dst_is_unchanged() {
    let env = qemu_env!();
    base(&env.path("src.raw"));
    let (src, dst) = (env.path("src.raw"), env.path("dst.raw"));
    let cache = env.path(".dst.raw.imgsync-hashes");
    let hashes = |r: &Value| r["destination-hashes"].as_str().unwrap().to_string();
    // DST absent: a full copy, and the cache of what it wrote.
    let r = report(&sync_local(&env, &["src.raw", "dst.raw"]), "first");
    assert_eq!(hashes(&r), "none");
    assert!(cache.exists());
    // Unchanged DST: its hashes come from the cache, DST is not read.
    write_at(&src, 5 * MIB, b"new");
    let r = report(&sync_local(&env, &["src.raw", "dst.raw"]), "cached");
    assert_eq!(hashes(&r), "cache", "{r}");
    assert_eq!(n(&r, "blocks-sent"), 1, "{r}");
    identical(&env, &src, &dst, "cached");
    // The cache follows the sync (written, punched, grown blocks).
    punch(&src, 0, 512 * KIB);
    write_at(&src, BASE_SIZE + MIB - 512, &[7; 512]);
    let r = report(&sync_local(&env, &["src.raw", "dst.raw"]), "cached 2");
    assert_eq!(hashes(&r), "read", "size changed: {r}");
    write_at(&src, 7 * MIB, b"x");
    let r = report(&sync_local(&env, &["src.raw", "dst.raw"]), "cached 3");
    assert_eq!(hashes(&r), "cache", "{r}");
    assert_eq!(n(&r, "blocks-sent"), 1, "{r}");
    identical(&env, &src, &dst, "cached 3");
    // DST changed behind imgsync's back (same size): the cache is stale,
    // DST is read and the change undone.
    for off in [16 * MIB + 100, 5 * MIB] {
        flip(&dst, off, 1); // behind imgsync's back
        let r = report(&sync_local(&env, &["src.raw", "dst.raw"]), "poked");
        assert_eq!(hashes(&r), "read", "{r}");
        assert_eq!(n(&r, "blocks-sent"), 1, "{r}");
        identical(&env, &src, &dst, "poked");
    }
    // --checksum reads DST whatever the cache says.
    let r = report(
        &sync_local(&env, &["--checksum", "src.raw", "dst.raw"]),
        "checksum",
    );
    assert_eq!(hashes(&r), "read", "{r}");
    assert_eq!(n(&r, "blocks-sent"), 0, "{r}");
    // Another block size: not used.
    let r = report(
        &sync_local(&env, &["--block-size", "128k", "src.raw", "dst.raw"]),
        "bs",
    );
    assert_eq!(hashes(&r), "read", "{r}");
    // A damaged cache is not used.
    let r = report(&sync_local(&env, &["src.raw", "dst.raw"]), "again");
    assert_eq!(hashes(&r), "read", "block size back: {r}");
    let mut bytes = fs::read(&cache).unwrap();
    let at = bytes.len() - 50;
    bytes[at] ^= 0xff;
    fs::write(&cache, &bytes).unwrap();
    flip(&src, 48 * MIB + 7, 1);
    let r = report(&sync_local(&env, &["src.raw", "dst.raw"]), "damaged");
    assert_eq!(hashes(&r), "read", "{r}");
    assert_eq!(n(&r, "blocks-sent"), 1, "{r}");
    identical(&env, &src, &dst, "damaged");
    // A stale cache that cannot be removed (here a directory squats its
    // name) stops the sync before anything changes.
    fs::remove_file(&cache).unwrap();
    fs::create_dir(&cache).unwrap();
    copy(&dst, &env.path("before.raw"));
    flip(&src, 48 * MIB + 9, 1);
    let line = assert_one_line_error(
        &env.imgsync(&["sync", "src.raw", "dst.raw"]),
        "squatted cache",
    );
    assert!(line.contains(".dst.raw.imgsync-hashes"), "{line}");
    identical(&env, &env.path("before.raw"), &dst, "squatted cache");
    fs::remove_dir(&cache).unwrap();
    // The next sync works, and leaves a valid cache again.
    let r = report(&sync_local(&env, &["src.raw", "dst.raw"]), "unsquatted");
    assert_eq!(n(&r, "blocks-sent"), 1, "{r}");
    identical(&env, &src, &dst, "unsquatted");
    let r = report(&sync_local(&env, &["src.raw", "dst.raw"]), "after");
    assert_eq!(hashes(&r), "cache", "{r}");
}

#[test]
fn block_device_destination() {
    let env = qemu_env!();
    let size = 32 * MIB;
    // The device holds old data everywhere; SRC has data in three places.
    fs::write(env.path("dev.img"), vec![0xeeu8; size as usize]).unwrap();
    let Some(dev) = crate::convert::Loop::attach(&env.path("dev.img")) else {
        return;
    };
    let src = env.path("src.raw");
    let f = File::create(&src).unwrap();
    f.write_all_at(&random_bytes(MIB as usize, 1, true), 0)
        .unwrap();
    f.write_all_at(&random_bytes(3 * MIB as usize, 2, true), 7 * MIB + 512)
        .unwrap();
    f.write_all_at(&vec![0xee; 2 * MIB as usize], 20 * MIB)
        .unwrap();
    f.set_len(size).unwrap();
    let devp = Path::new(&dev.0);
    let name = devp.file_name().unwrap().to_string_lossy().into_owned();
    let r = report(&sync_local(&env, &["src.raw", &dev.0]), "device");
    let out = env.run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", "src.raw", &dev.0],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Everything but the 2 MiB that already matched: sent or zeroed.
    let blocks = size / BS;
    assert_eq!(n(&r, "blocks-sent"), (MIB + 3 * MIB + 64 * KIB) / BS, "{r}");
    assert_eq!(
        n(&r, "holes-punched") + n(&r, "blocks-sent") + 2 * MIB / BS,
        blocks,
        "{r}"
    );
    // Its journal went to root's private directory (named after the
    // device number), and is gone; no hash cache for a device.
    let rdev = {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(devp).unwrap().rdev()
    };
    let dir = Path::new("/var/lib/imgsync/journals");
    assert_eq!(mode_of(dir), 0o700);
    assert!(!dir
        .join(format!(
            "dev-{}:{}.imgsync-journal",
            libc::major(rdev),
            libc::minor(rdev)
        ))
        .exists());
    assert!(!Path::new(&format!("/dev/.{name}.imgsync-hashes")).exists());
    let r = report(&sync_local(&env, &["src.raw", &dev.0]), "again");
    assert_eq!(r["destination-hashes"], "read", "{r}");
    assert_eq!(n(&r, "blocks-sent"), 0, "{r}");
    // A SRC larger than the device: refused before anything changes.
    f.set_len(size + MIB).unwrap();
    f.write_all_at(b"tail", size + 100).unwrap();
    let line = assert_one_line_error(&sync_local(&env, &["src.raw", &dev.0]), "too small");
    assert!(line.contains(&dev.0), "{line}");
    f.set_len(size).unwrap();
    let out = env.run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", "src.raw", &dev.0],
    );
    assert!(out.status.success(), "device changed by the refused sync");
}

// Over SSH (a real sshd; both transports; push and pull)

fn sync_remote(env: &Env, sshd: &Sshd, via: Via, remote: &str, src: &str, dst: &str) -> Output {
    let mut a = vec![
        "sync".to_string(),
        "-q".into(),
        "--output".into(),
        "json".into(),
    ];
    a.extend(ssh_args(sshd, via, remote));
    a.push(src.into());
    a.push(dst.into());
    run(env, sshd, &a, &[])
}

#[test]
fn change_patterns_over_ssh_push_and_pull() {
    let env = qemu_env!();
    let Some(sshd) = Sshd::start() else { return };
    base(&env.path("base.raw"));
    let chosen = [
        "identical",
        "scattered-4k",
        "discarded",
        "grown",
        "shrunk",
        "last-byte",
    ];
    for via in BOTH {
        for p in PATTERNS.iter().filter(|p| chosen.contains(&p.name)) {
            for push in [true, false] {
                let what = format!("{via:?} {} {}", if push { "push" } else { "pull" }, p.name);
                let (src, dst) = (env.path("src.raw"), env.path("dst.raw"));
                copy(&env.path("base.raw"), &src);
                copy(&env.path("base.raw"), &dst);
                (p.change)(&src);
                let out = if push {
                    sync_remote(&env, &sshd, via, BIN, "src.raw", &url(&sshd, &dst))
                } else {
                    sync_remote(&env, &sshd, via, BIN, &url(&sshd, &src), "dst.raw")
                };
                let r = report(&out, &what);
                identical(&env, &src, &dst, &what);
                assert_eq!(n(&r, "blocks-sent"), p.sent, "{what}: {r}");
                assert_eq!(n(&r, "holes-punched"), p.punched, "{what}: {r}");
                assert!(n(&r, "data-sent") <= p.sent * BS, "{what}: {r}");
                if p.name == "identical" {
                    // Nothing but hashes (and the handshake) crosses:
                    // 128 data blocks, a few KiB.
                    assert!(n(&r, "wire-bytes") < 32 * KIB, "{what}: {r}");
                }
                assert_eq!(
                    entries(env.root())
                        .into_iter()
                        .filter(|e| e.contains("imgsync") && !e.ends_with("imgsync-hashes"))
                        .collect::<Vec<_>>(),
                    Vec::<String>::new(),
                    "{what}"
                );
            }
        }
        // DST absent, pushed and pulled: full copies.
        let (src, dst) = (env.path("base.raw"), env.path("fresh.raw"));
        let r = report(
            &sync_remote(&env, &sshd, via, BIN, "base.raw", &url(&sshd, &dst)),
            "push absent",
        );
        identical(&env, &src, &dst, "push absent");
        assert_eq!(r["destination-existed"], false);
        // Again: DST's hashes from its cache on the remote end.
        let r = report(
            &sync_remote(&env, &sshd, via, BIN, "base.raw", &url(&sshd, &dst)),
            "push again",
        );
        assert_eq!(r["destination-hashes"], "cache", "{r}");
        assert_eq!(n(&r, "blocks-sent"), 0, "{r}");
        fs::remove_file(&dst).unwrap();
        report(
            &sync_remote(&env, &sshd, via, BIN, &url(&sshd, &src), "fresh.raw"),
            "pull absent",
        );
        identical(&env, &src, &dst, "pull absent");
        assert!(data_regions(&dst) <= 8 * MIB);
        let r = report(
            &sync_remote(&env, &sshd, via, BIN, &url(&sshd, &src), "fresh.raw"),
            "pull again",
        );
        assert_eq!(r["destination-hashes"], "cache", "{r}");
        assert_eq!(r["destination-existed"], true, "{r}");
        fs::remove_file(&dst).unwrap();
    }
}

#[test]
fn killed_remote_end_then_rerun_or_rollback() {
    let env = qemu_env!();
    let Some(sshd) = Sshd::start() else { return };
    big_pair(&env);
    let journal = env.path(".dst.raw.imgsync-journal");
    for via in BOTH {
        for (push, at) in [(true, 8 * MIB), (true, 100 * MIB), (false, 40 * MIB)] {
            for then_rollback in [false, true] {
                let what = format!(
                    "{via:?} {} killed at {} MiB, then {}",
                    if push {
                        "push: receiver"
                    } else {
                        "pull: sender"
                    },
                    at / MIB,
                    if then_rollback { "rollback" } else { "rerun" }
                );
                copy(&env.path("old.raw"), &env.path("dst.raw"));
                let (script, pidfile) = pid_script(&sshd, &format!("k-{via:?}-{push}-{at}"), "");
                let _ = fs::remove_file(&pidfile);
                let mut a = vec![
                    "sync".to_string(),
                    "-q".into(),
                    "--compress-level".into(),
                    "0".into(),
                ];
                a.extend(ssh_args(&sshd, via, &script.display().to_string()));
                if push {
                    a.push("src.raw".into());
                    a.push(url(&sshd, &env.path("dst.raw")));
                } else {
                    a.push(url(&sshd, &env.path("src.raw")));
                    a.push("dst.raw".into());
                }
                let child = spawn(&env, &sshd, &a);
                let pid = wait_for_pid(&pidfile);
                // The receiver (local on pull) has written `at` bytes.
                let watch = if push {
                    pid.clone()
                } else {
                    child.id().to_string()
                };
                wait_until(|| wchar(&watch) > at, &what);
                kill9(&pid);
                let out = child.wait_with_output().unwrap();
                let line = assert_one_line_error(&out, &what);
                assert!(line.contains("127.0.0.1"), "{what}: {line}");
                assert!(journal.exists(), "{what}: no journal");
                // Whichever end died, the line says DST is mid-sync and how
                // to go on.
                assert!(
                    line.contains("is mid-sync: rerun the same sync to resume it")
                        && line.contains("--rollback"),
                    "{what}: {line}"
                );
                if then_rollback && push {
                    // The DST host is remote here: rolled back through serve.
                    let mut a = vec!["sync".to_string(), "--rollback".into()];
                    a.extend(ssh_args(&sshd, via, BIN));
                    a.push(url(&sshd, &env.path("dst.raw")));
                    let text = ok(&run(&env, &sshd, &a, &[]), &what);
                    assert!(text.contains("rolled back"), "{what}: {text}");
                    identical(&env, &env.path("old.raw"), &env.path("dst.raw"), &what);
                } else if then_rollback {
                    let out = env.imgsync(&["sync", "--rollback", "dst.raw"]);
                    assert!(out.status.success(), "{what}");
                    identical(&env, &env.path("old.raw"), &env.path("dst.raw"), &what);
                } else {
                    let out = if push {
                        sync_remote(
                            &env,
                            &sshd,
                            via,
                            BIN,
                            "src.raw",
                            &url(&sshd, &env.path("dst.raw")),
                        )
                    } else {
                        sync_remote(
                            &env,
                            &sshd,
                            via,
                            BIN,
                            &url(&sshd, &env.path("src.raw")),
                            "dst.raw",
                        )
                    };
                    let r = report(&out, &what);
                    assert_eq!(r["resumed"], true, "{what}: {r}");
                    identical(&env, &env.path("src.raw"), &env.path("dst.raw"), &what);
                }
                assert!(!journal.exists(), "{what}: journal left");
            }
        }
    }
}

#[test]
fn remote_errors_name_the_host() {
    let env = qemu_env!();
    let Some(sshd) = Sshd::start() else { return };
    base(&env.path("a.raw"));
    // A qcow2 DST that cannot be updated in place (its data lives in an
    // external file): the receiver's refusal, named with the host.
    env.create("d.qcow2", Qcow2::new(256 * MIB).data_file("d.data"));
    for via in BOTH {
        let out = sync_remote(
            &env,
            &sshd,
            via,
            BIN,
            "a.raw",
            &url(&sshd, &env.path("d.qcow2")),
        );
        let line = assert_one_line_error(&out, "qcow2 DST");
        assert!(
            line.contains("127.0.0.1") && line.contains("d.qcow2") && line.contains("data file"),
            "{line}"
        );
        let out = sync_remote(
            &env,
            &sshd,
            via,
            BIN,
            &url(&sshd, &env.path("nope.raw")),
            "x.raw",
        );
        let line = assert_one_line_error(&out, "missing remote SRC");
        assert!(
            line.contains("127.0.0.1") && line.contains("nope.raw"),
            "{line}"
        );
        // A remote --rollback with nothing to roll back.
        let mut a = vec!["sync".to_string(), "--rollback".into()];
        a.extend(ssh_args(&sshd, via, BIN));
        a.push(url(&sshd, &env.path("a.raw")));
        let line = assert_one_line_error(&run(&env, &sshd, &a, &[]), "remote rollback");
        assert!(
            line.contains("127.0.0.1") && line.contains("no interrupted sync"),
            "{line}"
        );
        assert!(!env.path("x.raw").exists());
    }
}

// A journal belongs to one destination

/// Starts `imgsync sync -q SRC DST` in `env` and SIGKILLs it once it has
/// written more than `at` bytes (journal and DST).
fn killed_sync(env: &Env, src: &str, dst: &str, at: u64) {
    let mut child = Command::new(BIN)
        .args(["sync", "-q", "--compress-level", "0", src, dst])
        .current_dir(env.root())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    wait_until(
        || wchar(&pid.to_string()) > at || child.try_wait().unwrap().is_some(),
        "sync writes",
    );
    kill9(&pid.to_string());
    let st = child.wait().unwrap();
    assert!(st.code().is_none(), "{dst}: sync ended before the kill");
}

fn cmp(a: &Path, b: &Path) -> bool {
    Command::new("cmp")
        .arg("-s")
        .arg(a)
        .arg(b)
        .status()
        .unwrap()
        .success()
}

fn mode_of(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

/// Two loop devices reached as a/vm1 and b/vm1 (same last name): an
/// interrupted sync of b/vm1 is b's alone. Its journal is named after b's
/// device number in the private journal directory; `--rollback a/vm1`
/// finds nothing and leaves a untouched; a sync of a/vm1 neither resumes
/// nor removes it; `info` reports it by b's other name only; a planted
/// (another uid's, or world-writable) journal is refused by name; and
/// b is rolled back through /dev/loopN.
#[test]
fn device_journals_belong_to_one_device_by_any_name() {
    let env = qemu_env!();
    let size = 64 * MIB;
    for (name, seed) in [("a.img", 500u64), ("b.img", 600)] {
        fs::write(env.path(name), random_bytes(size as usize, seed, false)).unwrap();
    }
    fs::write(env.path("src.raw"), random_bytes(size as usize, 700, false)).unwrap();
    let Some(la) = crate::convert::Loop::attach(&env.path("a.img")) else {
        return;
    };
    let Some(lb) = crate::convert::Loop::attach(&env.path("b.img")) else {
        return;
    };
    for (d, l) in [("a", &la), ("b", &lb)] {
        fs::create_dir(env.path(d)).unwrap();
        std::os::unix::fs::symlink(&l.0, env.path(&format!("{d}/vm1"))).unwrap();
    }
    copy(&env.path("a.img"), &env.path("a-before.img"));
    copy(&env.path("b.img"), &env.path("b-before.img"));
    let (da, db) = (Path::new(&la.0), Path::new(&lb.0));

    killed_sync(&env, "src.raw", "b/vm1", 40 * MIB);
    let rdev = {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(db).unwrap().rdev()
    };
    let dir = Path::new("/var/lib/imgsync/journals");
    let jb = dir.join(format!(
        "dev-{}:{}.imgsync-journal",
        libc::major(rdev),
        libc::minor(rdev)
    ));
    assert!(jb.exists(), "no journal {}", jb.display());
    assert_eq!(mode_of(dir), 0o700);
    assert!(!cmp(db, &env.path("b-before.img")), "b was not changed");
    let b_mid = env.path("b-mid.img");
    copy(db, &b_mid);

    // Nothing to roll back on a, which stays as it was.
    let line = assert_one_line_error(&env.imgsync(&["sync", "--rollback", "a/vm1"]), "a");
    assert!(line.contains("no interrupted sync"), "{line}");
    assert!(cmp(da, &env.path("a-before.img")), "a changed");
    // info: mid-sync by b's other name, not by a's.
    let info = env.imgsync_json(&["info", "--output", "json", &lb.0]);
    assert_eq!(info["sync-journal"], jb.display().to_string(), "{info}");
    let info = env.imgsync_json(&["info", "--output", "json", "a/vm1"]);
    assert!(info.get("sync-in-progress").is_none(), "{info}");
    let check = env.imgsync(&["check", "b/vm1"]);
    assert!(String::from_utf8_lossy(&check.stdout).contains("interrupted sync"));

    // A sync of a/vm1 does not resume (or remove) b's journal.
    let r = report(&sync_local(&env, &["src.raw", "a/vm1"]), "sync a");
    assert_eq!(r["resumed"], false, "{r}");
    assert!(cmp(da, &env.path("src.raw")), "a is not SRC");
    assert!(jb.exists(), "b's journal was consumed by a's sync");
    assert!(cmp(db, &b_mid), "b changed by a's sync");

    // Planted: another uid's, then root's but world-writable: refused by
    // name, neither applied nor removed.
    let saved = fs::read(&jb).unwrap();
    for (uid, mode) in [(65534, 0o600), (0, 0o666)] {
        std::os::unix::fs::chown(&jb, Some(uid), Some(uid)).unwrap();
        chmod(&jb, mode);
        for args in [
            &["sync", "--rollback", &lb.0][..],
            &["sync", "src.raw", "b/vm1"][..],
        ] {
            let line = assert_one_line_error(&env.imgsync(args), "planted");
            assert!(
                line.contains(&jb.display().to_string()) && line.contains("refusing"),
                "uid {uid} mode {mode:o}: {line}"
            );
            assert!(cmp(db, &b_mid), "b changed by a refused journal");
            assert_eq!(fs::read(&jb).unwrap(), saved, "journal changed");
        }
        let info = env.imgsync_json(&["info", "--output", "json", &lb.0]);
        assert!(info["sync-journal-refused"].is_string(), "{info}");
    }
    std::os::unix::fs::chown(&jb, Some(0), Some(0)).unwrap();
    chmod(&jb, 0o600);

    // The loop device is detached and its number handed to another image
    // of the same size: b's journal is not that device's (not resumed, not
    // rolled back onto it); b attached again finds it.
    fs::write(env.path("c.img"), random_bytes(size as usize, 800, false)).unwrap();
    copy(&env.path("c.img"), &env.path("c-before.img"));
    let losetup = |args: &[&str]| {
        let ok = Command::new("losetup")
            .args(args)
            .status()
            .unwrap()
            .success();
        assert!(ok, "losetup {args:?}");
    };
    losetup(&["-d", &lb.0]);
    losetup(&[&lb.0, &env.path("c.img").display().to_string()]);
    let line = assert_one_line_error(&env.imgsync(&["sync", "--rollback", &lb.0]), "reused");
    assert!(!line.contains("rolled back"), "{line}");
    let info = env.imgsync_json(&["info", "--output", "json", &lb.0]);
    assert!(info.get("sync-in-progress").is_none(), "{info}");
    assert!(
        cmp(db, &env.path("c-before.img")),
        "c changed by b's journal"
    );
    assert!(jb.exists(), "b's journal went with c");
    losetup(&["-d", &lb.0]);
    losetup(&[&lb.0, &env.path("b.img").display().to_string()]);

    // Rolled back through the device node's own name.
    let out = env.imgsync(&["sync", "--rollback", &lb.0]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(cmp(db, &env.path("b-before.img")), "b not restored");
    assert!(!jb.exists());
}

/// A file DST's journal lies beside the file a symlink names, so every
/// name finds it; renamed beside another file it is refused there (never
/// applied), and `info` says why.
#[test]
fn file_journals_follow_the_file_and_are_not_applied_to_another() {
    let env = qemu_env!();
    big_pair(&env);
    copy(&env.path("old.raw"), &env.path("x.raw"));
    fs::create_dir(env.path("links")).unwrap();
    std::os::unix::fs::symlink(env.path("x.raw"), env.path("links/vm")).unwrap();
    killed_sync(&env, "src.raw", "links/vm", 60 * MIB);
    let jx = env.path(".x.raw.imgsync-journal");
    assert!(jx.exists(), "no journal beside the file");
    assert!(!env.path("links/.vm.imgsync-journal").exists());
    let info = env.imgsync_json(&["info", "--output", "json", "x.raw"]);
    assert_eq!(info["sync-in-progress"], true, "{info}");

    // Renamed beside y.raw: refused by rollback, sync and info.
    copy(&env.path("old.raw"), &env.path("y.raw"));
    copy(&env.path("old.raw"), &env.path("y-before.raw"));
    let jy = env.path(".y.raw.imgsync-journal");
    fs::rename(&jx, &jy).unwrap();
    for args in [
        &["sync", "--rollback", "y.raw"][..],
        &["sync", "src.raw", "y.raw"][..],
    ] {
        let line = assert_one_line_error(&env.imgsync(args), "renamed journal");
        assert!(
            line.contains(".y.raw.imgsync-journal") && line.contains("belongs to"),
            "{line}"
        );
        assert!(
            cmp(&env.path("y.raw"), &env.path("y-before.raw")),
            "y changed"
        );
        assert!(jy.exists());
    }
    let info = env.imgsync_json(&["info", "--output", "json", "y.raw"]);
    assert!(info.get("sync-in-progress").is_none(), "{info}");
    assert!(
        info["sync-journal-refused"]
            .as_str()
            .is_some_and(|s| s.contains("belongs to")),
        "{info}"
    );
    // Back beside x, it rolls x back (by the symlink's name).
    fs::rename(&jy, &jx).unwrap();
    let out = env.imgsync(&["sync", "--rollback", "links/vm"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    identical(&env, &env.path("old.raw"), &env.path("x.raw"), "rollback");
    assert!(!jx.exists());
}

/// A hash cache that is not ours (another uid's, writable by others, a
/// symlink) is refused by name before DST changes, and kept; another
/// file's cache renamed beside DST is not used.
#[test]
fn hash_caches_that_are_not_ours_are_refused_by_name() {
    let env = qemu_env!();
    let (src, dst) = (env.path("src.raw"), env.path("dst.raw"));
    base(&src);
    copy(&src, &dst);
    report(&sync_local(&env, &["src.raw", "dst.raw"]), "first");
    let cache = env.path(".dst.raw.imgsync-hashes");
    assert!(cache.exists());
    flip(&src, 16 * MIB + 5, 1);
    let before = env.path("before.raw");
    copy(&dst, &before);
    let saved = fs::read(&cache).unwrap();
    let refuse = |what: &str| {
        let line = assert_one_line_error(&env.imgsync(&["sync", "src.raw", "dst.raw"]), what);
        assert!(
            line.contains(".dst.raw.imgsync-hashes") && line.contains("refusing"),
            "{what}: {line}"
        );
        assert!(cmp(&dst, &before), "{what}: DST changed");
        assert!(cache.symlink_metadata().is_ok(), "{what}: cache removed");
    };
    // The cache is ours: its owner is who runs the tests.
    let root = {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(&cache).unwrap().uid() == 0
    };
    if root {
        std::os::unix::fs::chown(&cache, Some(65534), Some(65534)).unwrap();
        refuse("another uid's cache");
        std::os::unix::fs::chown(&cache, Some(0), Some(0)).unwrap();
    }
    chmod(&cache, 0o666);
    refuse("world-writable cache");
    fs::remove_file(&cache).unwrap();
    fs::write(env.path("elsewhere"), &saved).unwrap();
    chmod(&env.path("elsewhere"), 0o600);
    std::os::unix::fs::symlink(env.path("elsewhere"), &cache).unwrap();
    refuse("symlinked cache");
    fs::remove_file(&cache).unwrap();
    fs::write(&cache, &saved).unwrap();
    chmod(&cache, 0o600);

    // Another file's cache beside DST: DST is read instead.
    copy(&dst, &env.path("other.raw"));
    let r = report(&sync_local(&env, &["src.raw", "dst.raw"]), "ours again");
    assert_eq!(n(&r, "blocks-sent"), 1, "{r}");
    fs::rename(&cache, env.path(".other.raw.imgsync-hashes")).unwrap();
    let r = report(
        &sync_local(&env, &["src.raw", "other.raw"]),
        "other's cache",
    );
    assert_eq!(r["destination-hashes"], "read", "{r}");
    identical(&env, &src, &env.path("other.raw"), "other");
}

/// Over SSH (push, pull, rollback and info; both transports) a journal of
/// another file renamed beside DST is refused by name, as locally.
#[test]
fn a_journal_of_another_file_is_refused_over_ssh() {
    let env = qemu_env!();
    let Some(sshd) = Sshd::start() else { return };
    big_pair(&env);
    copy(&env.path("old.raw"), &env.path("x.raw"));
    killed_sync(&env, "src.raw", "x.raw", 60 * MIB);
    copy(&env.path("old.raw"), &env.path("y.raw"));
    let jy = env.path(".y.raw.imgsync-journal");
    fs::rename(env.path(".x.raw.imgsync-journal"), &jy).unwrap();
    let y = env.path("y.raw");
    let refused = |out: &Output, what: &str| {
        let line = assert_one_line_error(out, what);
        assert!(
            line.contains(".y.raw.imgsync-journal") && line.contains("belongs to"),
            "{what}: {line}"
        );
        assert!(cmp(&y, &env.path("old.raw")), "{what}: y changed");
        assert!(jy.exists(), "{what}: journal removed");
    };
    for via in BOTH {
        let push = sync_remote(&env, &sshd, via, BIN, "src.raw", &url(&sshd, &y));
        refused(&push, &format!("{via:?} push"));
        let pull = sync_remote(
            &env,
            &sshd,
            via,
            BIN,
            &url(&sshd, &env.path("src.raw")),
            "y.raw",
        );
        refused(&pull, &format!("{via:?} pull"));
        let mut a: Vec<String> = vec!["sync".into(), "--rollback".into()];
        a.extend(ssh_args(&sshd, via, BIN));
        a.push(url(&sshd, &y));
        refused(&run(&env, &sshd, &a, &[]), &format!("{via:?} rollback"));
        let mut a: Vec<String> = vec!["info".into(), "--output".into(), "json".into()];
        a.extend(ssh_args(&sshd, via, BIN));
        a.push(url(&sshd, &y));
        let info = json(&run(&env, &sshd, &a, &[]));
        assert!(info.get("sync-in-progress").is_none(), "{via:?}: {info}");
        assert!(info["sync-journal-refused"].is_string(), "{via:?}: {info}");
    }
}
