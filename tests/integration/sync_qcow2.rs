//! sync into an existing qcow2 DST, updated in place (issue 13): DST kinds
//! (v2, v3, cluster sizes, refcount widths, compressed, extended L2,
//! internal snapshots, a backing file, preallocation=metadata, persistent
//! bitmaps) × change patterns, each judged by qemu-img: `check` clean,
//! `compare SRC DST` equal, snapshots reading as before, DST staying
//! compact. Then interruptions (the crash hook at every barrier, with and
//! without the journal: rollback gives the file back byte for byte, a
//! rerun converges, `--no-journal` leaves no corruption) and refusals.

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Output;

use serde_json::Value;

use crate::common::{assert_one_line_error, random_bytes, Env, Op, Qcow2, Tmpfs, KIB, MIB};
use crate::remote::{ok, run, ssh_args, url, BOTH};
use crate::sshd::Sshd;

const BIN: &str = env!("CARGO_BIN_EXE_imgsync");
const SIZE: u64 = 64 * MIB;

/// DST's content before a sync: data spread over the image, some of it
/// zeros written, some compressed where asked.
fn base_ops(compressed: bool, cluster: u64) -> Vec<Op> {
    let c = cluster.max(64 * KIB);
    let mut ops = vec![
        Op::Data(0, 2 * MIB),
        Op::Pattern(0x5a, 8 * MIB, 3 * MIB),
        Op::Data(20 * MIB + 4 * KIB, 500 * KIB),
        Op::Zero(30 * MIB, 2 * MIB),
        Op::Data(40 * MIB, 4 * MIB),
        Op::Data(SIZE - c, c),
    ];
    if compressed {
        ops.push(Op::Compressed(48 * MIB, 4 * MIB));
    }
    ops
}

/// A change pattern applied to SRC (a raw copy of DST's guest content).
struct Pattern {
    name: &'static str,
    change: fn(&Path),
}

fn write_at(p: &Path, off: u64, data: &[u8]) {
    let f = fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(data, off).unwrap();
}

fn punch(p: &Path, off: u64, len: u64) {
    let f = fs::OpenOptions::new().write(true).open(p).unwrap();
    rustix::fs::fallocate(
        &f,
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        off,
        len,
    )
    .unwrap();
}

const PATTERNS: &[Pattern] = &[
    Pattern {
        name: "identical",
        change: |_| {},
    },
    Pattern {
        name: "scattered-4k",
        change: |p| {
            for (i, off) in [
                5 * KIB,
                9 * MIB + 100,
                21 * MIB,
                41 * MIB + 64 * KIB,
                60 * MIB,
            ]
            .into_iter()
            .enumerate()
            {
                write_at(p, off, &random_bytes(4096, 100 + i as u64, false));
            }
        },
    },
    Pattern {
        name: "holes-filled",
        change: |p| {
            write_at(p, 12 * MIB, &random_bytes(2 * MIB as usize, 7, false));
            write_at(p, 55 * MIB, &random_bytes(256 * KIB as usize, 8, true));
        },
    },
    Pattern {
        name: "discarded",
        change: |p| {
            punch(p, 0, MIB);
            punch(p, 40 * MIB, 4 * MIB);
        },
    },
    Pattern {
        name: "zeros-over-data",
        change: |p| write_at(p, 8 * MIB, &vec![0u8; 2 * MIB as usize]),
    },
    Pattern {
        name: "grown",
        change: |p| {
            let f = fs::OpenOptions::new().write(true).open(p).unwrap();
            f.set_len(SIZE + 40 * MIB).unwrap();
            f.write_all_at(&random_bytes(MIB as usize, 9, false), SIZE + 30 * MIB)
                .unwrap();
        },
    },
    Pattern {
        name: "shrunk",
        change: |p| {
            let f = fs::OpenOptions::new().write(true).open(p).unwrap();
            f.set_len(36 * MIB).unwrap();
        },
    },
];

/// DST kinds: how qemu-img makes it, the cluster size, and whether its
/// allocation is held to convert's.
struct Kind {
    name: &'static str,
    make: fn(&Env, &str),
    cluster: u64,
    compact: bool,
}

fn plain(env: &Env, name: &str, q: Qcow2, cluster: u64, compressed: bool) {
    env.create(name, q).write(&base_ops(compressed, cluster));
}

const KINDS: &[Kind] = &[
    Kind {
        name: "v3",
        make: |e, n| plain(e, n, Qcow2::new(SIZE), 64 * KIB, false),
        cluster: 64 * KIB,
        compact: true,
    },
    Kind {
        name: "v2",
        make: |e, n| plain(e, n, Qcow2::new(SIZE).compat("0.10"), 64 * KIB, false),
        cluster: 64 * KIB,
        compact: true,
    },
    Kind {
        name: "cluster-512",
        make: |e, n| plain(e, n, Qcow2::new(SIZE).cluster(512), 512, false),
        cluster: 512,
        compact: false,
    },
    Kind {
        name: "cluster-2M",
        make: |e, n| plain(e, n, Qcow2::new(SIZE).cluster(2 * MIB), 2 * MIB, false),
        cluster: 2 * MIB,
        compact: true,
    },
    Kind {
        name: "refcount-1",
        make: |e, n| {
            plain(
                e,
                n,
                Qcow2::new(SIZE).opts("refcount_bits=1"),
                64 * KIB,
                false,
            )
        },
        cluster: 64 * KIB,
        compact: true,
    },
    Kind {
        name: "refcount-64",
        make: |e, n| {
            plain(
                e,
                n,
                Qcow2::new(SIZE).opts("refcount_bits=64"),
                64 * KIB,
                false,
            )
        },
        cluster: 64 * KIB,
        compact: true,
    },
    Kind {
        name: "compressed",
        make: |e, n| plain(e, n, Qcow2::new(SIZE), 64 * KIB, true),
        cluster: 64 * KIB,
        compact: false,
    },
    Kind {
        name: "extended-l2",
        make: |e, n| plain(e, n, Qcow2::new(SIZE).extended_l2(), 64 * KIB, false),
        cluster: 64 * KIB,
        compact: true,
    },
    Kind {
        name: "snapshots",
        make: |e, n| {
            plain(e, n, Qcow2::new(SIZE), 64 * KIB, false);
            e.qemu_img(&["snapshot", "-c", "s1", n]);
            e.qemu_io(
                "qcow2",
                n,
                &[Op::Data(9 * MIB, MIB), Op::Discard(40 * MIB, MIB)],
            );
            e.qemu_img(&["snapshot", "-c", "s2", n]);
        },
        cluster: 64 * KIB,
        compact: false,
    },
    Kind {
        name: "backing",
        make: |e, n| {
            e.create("kind-base.qcow2", Qcow2::new(SIZE))
                .write(&[Op::Pattern(0x33, 0, 16 * MIB), Op::Data(50 * MIB, 2 * MIB)]);
            e.create(n, Qcow2::new(SIZE).backing("kind-base.qcow2", "qcow2"))
                .write(&base_ops(false, 64 * KIB));
        },
        cluster: 64 * KIB,
        compact: false,
    },
    Kind {
        name: "preallocated",
        make: |e, n| {
            plain(
                e,
                n,
                Qcow2::new(SIZE).opts("preallocation=metadata"),
                64 * KIB,
                false,
            )
        },
        cluster: 64 * KIB,
        compact: false,
    },
];

fn sync(env: &Env, args: &[&str]) -> Output {
    let mut a = vec!["sync", "-q", "--output", "json"];
    a.extend_from_slice(args);
    env.imgsync(&a)
}

fn json(out: &Output, what: &str) -> Value {
    let text = ok(out, what);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: {e}: {text}"))
}

fn check_clean(env: &Env, dst: &str, what: &str) {
    let out = env.run("qemu-img", &["check", dst]);
    assert!(
        out.status.success(),
        "{what}: qemu-img check: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn same(env: &Env, src: &str, dst: &str, what: &str) {
    let out = env.run("qemu-img", &["compare", "-f", "raw", src, dst]);
    assert!(
        out.status.success(),
        "{what}: qemu-img compare: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn allocated(p: &Path) -> u64 {
    fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn qcow2_dsts_of_every_kind_follow_every_pattern() {
    let env = qemu_env!();
    for kind in KINDS {
        for p in PATTERNS {
            let what = format!("{} {}", kind.name, p.name);
            let dst = format!("dst-{}.qcow2", kind.name);
            let _ = fs::remove_file(env.path(&dst));
            (kind.make)(&env, &dst);
            env.qemu_img(&["convert", "-O", "raw", &dst, "src.raw"]);
            let snaps: Vec<(String, Vec<u8>)> = if kind.name == "snapshots" {
                ["s1", "s2"]
                    .iter()
                    .map(|s| {
                        let f = format!("snap-{s}.raw");
                        env.qemu_img(&["convert", "-l", s, "-O", "raw", &dst, &f]);
                        (s.to_string(), fs::read(env.path(&f)).unwrap())
                    })
                    .collect()
            } else {
                Vec::new()
            };
            let before = fs::read(env.path(&dst)).unwrap();
            (p.change)(&env.path("src.raw"));
            let bs = format!("{}", kind.cluster.max(4 * KIB));
            let r = json(&sync(&env, &["--block-size", &bs, "src.raw", &dst]), &what);
            assert_eq!(r["destination-existed"], true, "{what}: {r}");
            for key in [
                "clusters-allocated",
                "clusters-freed",
                "metadata-bytes-written",
            ] {
                assert!(r[key].is_u64(), "{what}: no {key}: {r}");
            }
            check_clean(&env, &dst, &what);
            same(&env, "src.raw", &dst, &what);
            for (s, content) in &snaps {
                // The snapshot applied to a copy reads as before (at its
                // own size, whatever DST's is now).
                fs::copy(env.path(&dst), env.path("applied.qcow2")).unwrap();
                env.qemu_img(&["snapshot", "-a", s, "applied.qcow2"]);
                let f = format!("after-{s}.raw");
                env.qemu_img(&["convert", "-O", "raw", "applied.qcow2", &f]);
                assert!(
                    fs::read(env.path(&f)).unwrap() == *content,
                    "{what}: snapshot {s} changed"
                );
            }
            let info = env.qemu_json(&["info", "--output=json", &dst]);
            assert_eq!(info["format"], "qcow2", "{what}");
            if p.name == "identical" {
                assert!(
                    fs::read(env.path(&dst)).unwrap() == before,
                    "{what}: DST's file changed"
                );
                assert_eq!(r["blocks-sent"], 0, "{what}: {r}");
            }
            if kind.compact {
                let cs = kind.cluster.to_string();
                env.qemu_img(&[
                    "convert",
                    "-O",
                    "qcow2",
                    "-o",
                    &format!("cluster_size={cs}"),
                    "src.raw",
                    "ref.qcow2",
                ]);
                let (mine, theirs) = (
                    allocated(&env.path(&dst)),
                    allocated(&env.path("ref.qcow2")),
                );
                let l2_tables = (SIZE + 40 * MIB).div_ceil(kind.cluster / 8 * kind.cluster);
                assert!(
                    mine <= theirs + theirs / 20 + (l2_tables + 1) * kind.cluster,
                    "{what}: DST allocates {mine} bytes, qemu-img convert {theirs}"
                );
            }
        }
    }
}

#[test]
fn bitmaps_are_not_left_claiming_clean() {
    let env = qemu_env!();
    plain(&env, "dst.qcow2", Qcow2::new(SIZE), 64 * KIB, false);
    env.qemu_img(&["bitmap", "--add", "dst.qcow2", "b0"]);
    env.qemu_img(&["convert", "-O", "raw", "dst.qcow2", "src.raw"]);
    write_at(
        &env.path("src.raw"),
        3 * MIB,
        &random_bytes(64 * 1024, 5, false),
    );
    let out = env.imgsync(&["sync", "src.raw", "dst.qcow2"]);
    ok(&out, "bitmaps");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bitmap"), "no word about the bitmaps: {err}");
    check_clean(&env, "dst.qcow2", "bitmaps");
    same(&env, "src.raw", "dst.qcow2", "bitmaps");
    // qemu no longer trusts them: no bitmap claims a clean cluster.
    let info = env.qemu_json(&["info", "--output=json", "dst.qcow2"]);
    let bitmaps = &info["format-specific"]["data"]["bitmaps"];
    assert!(
        bitmaps.as_array().map_or(true, |b| b.iter().all(|b| {
            b["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|f| f == "in-use"))
        })) || bitmaps.is_null(),
        "a bitmap still claims to be consistent: {info}"
    );
}

/// DST's file sha256-equivalent: its bytes.
fn bytes(env: &Env, name: &str) -> Vec<u8> {
    fs::read(env.path(name)).unwrap()
}

#[test]
fn a_crash_at_every_barrier_is_rolled_back_or_rerun() {
    let env = qemu_env!();
    plain(
        &env,
        "orig.qcow2",
        Qcow2::new(SIZE).opts("refcount_bits=16"),
        64 * KIB,
        true,
    );
    env.qemu_img(&["convert", "-O", "raw", "orig.qcow2", "src.raw"]);
    (PATTERNS[2].change)(&env.path("src.raw"));
    (PATTERNS[1].change)(&env.path("src.raw"));
    (PATTERNS[3].change)(&env.path("src.raw"));
    let before = bytes(&env, "orig.qcow2");
    let mut crashed = 0;
    for journal in [true, false] {
        for n in 1.. {
            fs::write(env.path("dst.qcow2"), &before).unwrap();
            let mut a = vec!["sync", "-q"];
            if !journal {
                a.push("--no-journal");
            }
            a.extend(["src.raw", "dst.qcow2"]);
            let out = env
                .imgsync_cmd(&a)
                .env("IMGSYNC_TEST_CRASH_AFTER_BARRIERS", n.to_string())
                .output()
                .unwrap();
            if out.status.success() {
                assert!(n > 3, "only {n} barriers");
                break;
            }
            assert_eq!(out.status.code(), Some(86), "barrier {n}: {out:?}");
            crashed += 1;
            // No corruption at any barrier (leaked clusters at most).
            let check = env.run("qemu-img", &["check", "dst.qcow2"]);
            assert!(
                matches!(check.status.code(), Some(0) | Some(3)),
                "journal {journal}, barrier {n}: {}",
                String::from_utf8_lossy(&check.stdout)
            );
            if journal {
                if n % 2 == 0 {
                    let out = env.imgsync(&["sync", "-q", "--rollback", "dst.qcow2"]);
                    ok(&out, "rollback");
                    assert!(
                        bytes(&env, "dst.qcow2") == before,
                        "barrier {n}: rollback not exact"
                    );
                } else {
                    let out = env.imgsync(&["sync", "-q", "src.raw", "dst.qcow2"]);
                    ok(&out, "rerun");
                    check_clean(&env, "dst.qcow2", &format!("rerun after barrier {n}"));
                    same(
                        &env,
                        "src.raw",
                        "dst.qcow2",
                        &format!("rerun after barrier {n}"),
                    );
                }
            }
        }
    }
    assert!(crashed >= 6, "{crashed} crashes");
}

#[test]
fn qcow2_dsts_that_cannot_be_updated_are_refused_untouched() {
    let env = qemu_env!();
    // The dirty bit (lazy refcounts, qemu-io stops without closing).
    env.create("dirty.qcow2", Qcow2::new(SIZE).opts("lazy_refcounts=on"));
    let _ = env.run(
        "qemu-io",
        &["-c", "write 0 64k", "-c", "abort", "dirty.qcow2"],
    );
    // An external data file.
    env.create("ext.qcow2", Qcow2::new(SIZE).data_file("ext.data"));
    // The corrupt bit: incompatible feature bit 1 set in the header.
    env.create("corrupt.qcow2", Qcow2::new(SIZE));
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(env.path("corrupt.qcow2"))
        .unwrap();
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, 72).unwrap();
    let v = u64::from_be_bytes(b) | 2;
    f.write_all_at(&v.to_be_bytes(), 72).unwrap();
    drop(f);
    fs::write(env.path("src.raw"), random_bytes(MIB as usize, 1, false)).unwrap();
    for (name, want) in [
        ("dirty.qcow2", "qemu-img check -r all"),
        ("ext.qcow2", "data file"),
        ("corrupt.qcow2", "qemu-img check -r all"),
    ] {
        let before = bytes(&env, name);
        let out = env.imgsync(&["sync", "src.raw", name]);
        let line = assert_one_line_error(&out, name);
        assert!(line.contains(name) && line.contains(want), "{name}: {line}");
        assert!(bytes(&env, name) == before, "{name} changed");
    }
}

#[test]
fn qcow2_dsts_over_ssh_push_and_pull() {
    let env = qemu_env!();
    let Some(sshd) = Sshd::start() else { return };
    for via in BOTH {
        for push in [true, false] {
            let what = format!("{via:?} {}", if push { "push" } else { "pull" });
            let _ = fs::remove_file(env.path("dst.qcow2"));
            plain(&env, "dst.qcow2", Qcow2::new(SIZE), 64 * KIB, true);
            env.qemu_img(&["convert", "-O", "raw", "dst.qcow2", "src.raw"]);
            (PATTERNS[1].change)(&env.path("src.raw"));
            (PATTERNS[3].change)(&env.path("src.raw"));
            let mut a = vec![
                "sync".to_string(),
                "-q".into(),
                "--output".into(),
                "json".into(),
            ];
            a.extend(ssh_args(&sshd, via, BIN));
            if push {
                a.push("src.raw".into());
                a.push(url(&sshd, &env.path("dst.qcow2")));
            } else {
                a.push(url(&sshd, &env.path("src.raw")));
                a.push("dst.qcow2".into());
            }
            let out = run(&env, &sshd, &a, &[]);
            let r = json(&out, &what);
            assert!(r["blocks-sent"].as_u64().unwrap() <= 12, "{what}: {r}");
            check_clean(&env, "dst.qcow2", &what);
            same(&env, "src.raw", "dst.qcow2", &what);
        }
    }
}

#[test]
fn a_qcow2_dst_far_larger_than_its_file_system_syncs_when_the_change_fits() {
    let env = qemu_env!();
    let Some(_fs) = Tmpfs::mount(env.path("small"), "48M") else {
        return;
    };
    // 4 GiB virtual, 8 MiB of data, on 48 MiB.
    let dst = "small/dst.qcow2";
    env.create(dst, Qcow2::new(4096 * MIB))
        .write(&[Op::Data(0, 4 * MIB), Op::Data(3000 * MIB, 4 * MIB)]);
    env.qemu_img(&["convert", "-O", "raw", dst, "src.raw"]);
    // A change that fits: 8 MiB more, far apart.
    write_at(
        &env.path("src.raw"),
        1000 * MIB,
        &random_bytes(8 * MIB as usize, 3, false),
    );
    ok(&env.imgsync(&["sync", "-q", "src.raw", dst]), "fits");
    check_clean(&env, dst, "fits");
    same(&env, "src.raw", dst, "fits");
    // One that cannot: refused before anything changes.
    write_at(
        &env.path("src.raw"),
        2000 * MIB,
        &random_bytes(64 * MIB as usize, 4, false),
    );
    let before = bytes(&env, dst);
    let out = env.imgsync(&["sync", "src.raw", dst]);
    let line = assert_one_line_error(&out, "no room");
    assert!(
        line.contains("dst.qcow2") && line.contains("free"),
        "{line}"
    );
    assert!(bytes(&env, dst) == before, "DST changed");
    assert!(!env.path("small/.dst.qcow2.imgsync-journal").exists());
}

/// A qcow2 DST's hash cache (`.NAME.imgsync-hashes`): written after a
/// sync, used by the next one while DST's file is unchanged (its guest
/// view then is too), so DST is not read; not used once anything wrote
/// DST (qemu-io here), and never kept for a DST with a backing file,
/// whose guest view a change of the backing file would change.
#[test]
fn a_qcow2_dsts_hash_cache_is_used_only_while_its_file_is_unchanged() {
    let env = qemu_env!();
    let hashes = |r: &Value| r["destination-hashes"].as_str().unwrap().to_string();
    env.create("dst.qcow2", Qcow2::new(SIZE))
        .write(&base_ops(false, 64 * KIB));
    env.qemu_img(&["convert", "-O", "raw", "dst.qcow2", "src.raw"]);
    write_at(
        &env.path("src.raw"),
        3 * MIB,
        &random_bytes(100 * KIB as usize, 9, false),
    );
    let cache = env.path(".dst.qcow2.imgsync-hashes");
    let r = json(&sync(&env, &["src.raw", "dst.qcow2"]), "first");
    assert_eq!(hashes(&r), "read", "{r}");
    assert!(cache.exists(), "no cache after the first sync");
    same(&env, "src.raw", "dst.qcow2", "first");
    // Unchanged: hashes from the cache, nothing sent, DST's file as it was.
    let before = fs::read(env.path("dst.qcow2")).unwrap();
    let r = json(&sync(&env, &["src.raw", "dst.qcow2"]), "no change");
    assert_eq!(hashes(&r), "cache", "{r}");
    assert_eq!(r["blocks-sent"], 0, "{r}");
    assert!(
        fs::read(env.path("dst.qcow2")).unwrap() == before,
        "DST's file changed"
    );
    // SRC changed (written, punched, zeros over data): the cache stands
    // for DST's old content, the new one follows what was written.
    write_at(
        &env.path("src.raw"),
        41 * MIB,
        &random_bytes(4 * KIB as usize, 10, false),
    );
    punch(&env.path("src.raw"), 8 * MIB, MIB);
    write_at(&env.path("src.raw"), 20 * MIB, &vec![0; 256 * KIB as usize]);
    for what in ["changed", "changed again"] {
        let r = json(&sync(&env, &["src.raw", "dst.qcow2"]), what);
        assert_eq!(hashes(&r), "cache", "{what}: {r}");
        check_clean(&env, "dst.qcow2", what);
        same(&env, "src.raw", "dst.qcow2", what);
        write_at(
            &env.path("src.raw"),
            50 * MIB,
            &random_bytes(KIB as usize, 11, false),
        );
    }
    // DST written behind imgsync's back (same guest size): not used, and
    // the change is undone.
    env.qemu_io(
        "qcow2",
        "dst.qcow2",
        &[Op::Pattern(0x33, 12 * MIB, 64 * KIB)],
    );
    let r = json(&sync(&env, &["src.raw", "dst.qcow2"]), "poked");
    assert_eq!(hashes(&r), "read", "{r}");
    // A hole in SRC: the poked cluster is made zero again.
    assert_eq!(r["blocks-sent"], 0, "{r}");
    assert_eq!(r["holes-punched"], 1, "{r}");
    same(&env, "src.raw", "dst.qcow2", "poked");
    let r = json(&sync(&env, &["src.raw", "dst.qcow2"]), "after poked");
    assert_eq!(hashes(&r), "cache", "{r}");
    assert_eq!(r["blocks-sent"], 0, "{r}");
    // --checksum reads DST.
    let r = json(
        &sync(&env, &["--checksum", "src.raw", "dst.qcow2"]),
        "checksum",
    );
    assert_eq!(hashes(&r), "read", "{r}");
    // SRC grown: another size, DST read.
    fs::OpenOptions::new()
        .write(true)
        .open(env.path("src.raw"))
        .unwrap()
        .set_len(SIZE + 8 * MIB)
        .unwrap();
    let r = json(&sync(&env, &["src.raw", "dst.qcow2"]), "grown");
    assert_eq!(hashes(&r), "read", "{r}");
    same(&env, "src.raw", "dst.qcow2", "grown");
    let r = json(&sync(&env, &["src.raw", "dst.qcow2"]), "after grown");
    assert_eq!(hashes(&r), "cache", "{r}");
    // A DST with a backing file: no cache.
    env.create("base.qcow2", Qcow2::new(SIZE + 8 * MIB))
        .write(&[Op::Data(0, 4 * MIB)]);
    env.create("top.qcow2", Qcow2::overlay("base.qcow2", "qcow2"));
    for what in ["backed", "backed again"] {
        let r = json(&sync(&env, &["src.raw", "top.qcow2"]), what);
        assert_eq!(hashes(&r), "read", "{what}: {r}");
        same(&env, "src.raw", "top.qcow2", what);
    }
    assert!(!env.path(".top.qcow2.imgsync-hashes").exists());
}
