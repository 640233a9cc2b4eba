//! `sync -f FMT` / `-O FMT`: the format the user names for SRC applies to
//! an existing DST too unless -O says otherwise. `sync -f raw disk.qcow2
//! DST` (the qcow2 file synced as bytes, as rsync users do) works every
//! time, not just while DST is absent; an existing qcow2 DST is updated in
//! place (`sync_qcow2` holds those tests). A new
//! DST is made in -O's format, else SRC's, as convert makes it: a qcow2 SRC
//! gives a qcow2 DST (never a raw file named .qcow2 without a word), made
//! as a push of the whole image (SRC read once), local, push and pull.

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::common::{assert_one_line_error, Env, Op, Qcow2, MIB};
use crate::remote::{ok, run, ssh_args, url, BOTH};
use crate::sshd::Sshd;

const BIN: &str = env!("CARGO_BIN_EXE_imgsync");

/// A qcow2 image with data; `seed` changes its content.
fn qcow2(env: &Env, name: &str, seed: u8) {
    env.create(name, Qcow2::new(64 * MIB)).write(&[
        Op::Data(0, MIB),
        Op::Pattern(seed, 8 * MIB, 2 * MIB),
        Op::Data(40 * MIB, 256 * 1024),
    ]);
}

fn cmp(a: &Path, b: &Path, what: &str) {
    let out = Command::new("cmp").arg(a).arg(b).output().unwrap();
    assert!(
        out.status.success(),
        "{what}: cmp: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn sync_f_raw_of_a_qcow2_file_works_every_time() {
    let env = qemu_env!();
    let src = env.path("disk.qcow2");
    let dst = env.path("copy.qcow2");
    for (run_no, seed) in [(1, 0x11), (2, 0x22)] {
        // The second run finds DST probing as qcow2, and SRC has changed.
        qcow2(&env, "disk.qcow2", seed);
        let out = env.imgsync(&["sync", "-q", "-f", "raw", "disk.qcow2", "copy.qcow2"]);
        ok(&out, &format!("local run {run_no}"));
        cmp(&src, &dst, &format!("local run {run_no}"));
    }
    // -O raw names DST's format alone: SRC read as qcow2 (its guest), DST
    // updated as a raw file although it probes as qcow2.
    let out = env.imgsync(&["sync", "-q", "-O", "raw", "disk.qcow2", "copy.qcow2"]);
    ok(&out, "-O raw onto a qcow2 file");
    crate::remote::same(&env, &src, &dst);
    let info = env.qemu_json(&["info", "--output=json", "copy.qcow2"]);
    assert_eq!(info["format"], "raw", "{info}");
}

#[test]
fn sync_f_raw_of_a_qcow2_file_works_every_time_over_ssh() {
    let env = qemu_env!();
    let Some(sshd) = Sshd::start() else { return };
    let src = env.path("disk.qcow2");
    let remote = env.path("remote");
    fs::create_dir(&remote).unwrap();
    for via in BOTH {
        let pushed = remote.join(format!("{via:?}-pushed.qcow2"));
        let pulled = env.path(&format!("{via:?}-pulled.qcow2"));
        for (run_no, seed) in [(1, 0x31), (2, 0x42)] {
            qcow2(&env, "disk.qcow2", seed);
            for (from, to, dst, what) in [
                (
                    src.display().to_string(),
                    url(&sshd, &pushed),
                    &pushed,
                    "push",
                ),
                (
                    url(&sshd, &src),
                    pulled.display().to_string(),
                    &pulled,
                    "pull",
                ),
            ] {
                let mut a: Vec<String> = ["sync", "-q", "-f", "raw"].map(String::from).to_vec();
                a.extend(ssh_args(&sshd, via, BIN));
                a.extend([from, to]);
                ok(
                    &run(&env, &sshd, &a, &[]),
                    &format!("{via:?} {what} run {run_no}"),
                );
                cmp(&src, dst, &format!("{via:?} {what} run {run_no}"));
            }
        }
    }
}

#[test]
fn qcow2_destinations_are_refused_naming_the_option() {
    let env = qemu_env!();
    qcow2(&env, "disk.qcow2", 0x55);
    env.qemu_img(&["convert", "-O", "raw", "disk.qcow2", "disk.raw"]);
    // -O qcow2 onto an existing raw DST: refused, untouched.
    fs::copy(env.path("disk.raw"), env.path("raw-dst.img")).unwrap();
    let out = env.imgsync(&["sync", "-O", "qcow2", "disk.raw", "raw-dst.img"]);
    let line = assert_one_line_error(&out, "sync -O qcow2 onto a raw DST");
    assert!(
        line.contains("raw-dst.img") && line.contains("-O qcow2") && line.contains("not"),
        "{line}"
    );
    cmp(&env.path("disk.raw"), &env.path("raw-dst.img"), "refused");
    // -f qcow2 names DST's format too: the fix is -O raw.
    fs::copy(env.path("disk.raw"), env.path("old.raw")).unwrap();
    fs::write(env.path("dst.raw"), b"old").unwrap();
    let out = env.imgsync(&["sync", "-f", "qcow2", "disk.qcow2", "dst.raw"]);
    let line = assert_one_line_error(&out, "sync -f qcow2");
    assert!(
        line.contains("-f qcow2") && line.contains("-O raw"),
        "{line}"
    );
    assert_eq!(fs::read(env.path("dst.raw")).unwrap(), b"old");
    let out = env.imgsync(&[
        "sync",
        "-q",
        "-f",
        "qcow2",
        "-O",
        "raw",
        "disk.qcow2",
        "dst.raw",
    ]);
    ok(&out, "-f qcow2 -O raw");
    cmp(
        &env.path("disk.raw"),
        &env.path("dst.raw"),
        "-f qcow2 -O raw",
    );
    // Nothing special asked and DST probes as qcow2: updated in place,
    // still a qcow2.
    qcow2(&env, "keep.qcow2", 0x66);
    let out = env.imgsync(&["sync", "-q", "disk.raw", "keep.qcow2"]);
    ok(&out, "qcow2 DST, no options");
    made_as(
        &env,
        "disk.raw",
        &env.path("keep.qcow2"),
        "qcow2",
        "qcow2 DST",
    );
}

/// qemu-img's verdicts on a new DST: `format`, a clean check, and SRC's
/// guest content.
fn made_as(env: &Env, src: &str, dst: &Path, format: &str, what: &str) {
    let info = env.qemu_json(&["info", "--output=json", &dst.display().to_string()]);
    assert_eq!(info["format"], format, "{what}: {info}");
    if format == "qcow2" {
        let out = env.run("qemu-img", &["check", &dst.display().to_string()]);
        assert!(out.status.success(), "{what}: qemu-img check: {out:?}");
    }
    let out = env.run(
        "qemu-img",
        &[
            "compare",
            &env.path(src).display().to_string(),
            &dst.display().to_string(),
        ],
    );
    assert!(out.status.success(), "{what}: qemu-img compare: {out:?}");
}

fn json(out: &std::process::Output, what: &str) -> serde_json::Value {
    let text = ok(out, what);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: {e}: {text}"))
}

#[test]
fn a_new_dst_is_made_in_srcs_format_reading_src_once() {
    let env = qemu_env!();
    qcow2(&env, "disk.qcow2", 0x31);
    let data = 3 * MIB + 256 * 1024;
    // SRC qcow2, DST absent: a qcow2, SRC's data read once.
    let out = env.imgsync(&["sync", "-q", "--output", "json", "disk.qcow2", "new.qcow2"]);
    let r = json(&out, "new qcow2");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    made_as(
        &env,
        "disk.qcow2",
        &env.path("new.qcow2"),
        "qcow2",
        "new qcow2",
    );
    let read = r["bytes-read"].as_u64().unwrap();
    assert!(
        read <= data,
        "SRC read more than once: {read} of {data}: {r}"
    );
    assert_eq!(r["destination-existed"], false, "{r}");
    // -c: compressed clusters, still the same guest.
    let out = env.imgsync(&["sync", "-q", "-c", "disk.qcow2", "small.qcow2"]);
    ok(&out, "-c");
    made_as(&env, "disk.qcow2", &env.path("small.qcow2"), "qcow2", "-c");
    let map = env.qemu_json(&["map", "--output=json", "small.qcow2"]);
    let compressed = map
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["compressed"] == true);
    assert!(compressed, "no compressed cluster: {map}");
    // A second sync finds the qcow2 DST identical: its file stays as it
    // is, byte for byte.
    fs::copy(env.path("new.qcow2"), env.path("before.qcow2")).unwrap();
    let out = env.imgsync(&["sync", "-q", "disk.qcow2", "new.qcow2"]);
    ok(&out, "existing qcow2 DST");
    cmp(
        &env.path("before.qcow2"),
        &env.path("new.qcow2"),
        "identical",
    );
    // -O raw makes a raw copy of a qcow2 SRC, SRC read once there too
    // (each block hashed for the digest and the hash cache as it is sent).
    let to_raw = || {
        env.imgsync(&[
            "sync",
            "-q",
            "--output",
            "json",
            "-O",
            "raw",
            "disk.qcow2",
            "flat.raw",
        ])
    };
    let r = json(&to_raw(), "-O raw");
    made_as(&env, "disk.qcow2", &env.path("flat.raw"), "raw", "-O raw");
    let read = r["bytes-read"].as_u64().unwrap();
    assert!(
        read <= data,
        "-O raw: SRC read more than once: {read} of {data}: {r}"
    );
    // ... and the next sync takes DST's hashes from its cache.
    let r = json(&to_raw(), "-O raw again");
    assert_eq!(r["destination-hashes"], "cache", "{r}");
    assert_eq!(r["blocks-sent"], 0, "{r}");
    // A raw SRC into an absent raw DST: read once, its zeros not sent.
    let out = env.imgsync(&["sync", "-q", "--output", "json", "flat.raw", "flat2.raw"]);
    let r = json(&out, "raw to raw");
    made_as(
        &env,
        "disk.qcow2",
        &env.path("flat2.raw"),
        "raw",
        "raw to raw",
    );
    let read = r["bytes-read"].as_u64().unwrap();
    let src_data = crate::common::data_regions(&env.path("flat.raw"));
    assert!(
        read <= src_data,
        "raw to raw: SRC read more than once: {read} of {src_data}: {r}"
    );
    assert!(
        crate::common::data_regions(&env.path("flat2.raw")) <= src_data,
        "raw to raw: DST less sparse than SRC"
    );
    // -c asks for a qcow2: refused with a raw DST.
    let out = env.imgsync(&["sync", "-c", "-O", "raw", "disk.qcow2", "no.raw"]);
    assert_one_line_error(&out, "-c -O raw");
    assert!(!env.path("no.raw").exists());
}

#[test]
fn a_new_dst_whose_name_says_another_format_is_warned_about() {
    let env = qemu_env!();
    qcow2(&env, "disk.qcow2", 0x41);
    env.qemu_img(&["convert", "-O", "raw", "disk.qcow2", "disk.raw"]);
    // SRC raw into a name ending in .qcow2: raw (SRC's format), one line
    // naming both.
    let out = env.imgsync(&["sync", "disk.raw", "b.qcow2"]);
    ok(&out, "raw into .qcow2");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("imgsync: b.qcow2: warning:")
            && err.contains("raw")
            && err.contains(".qcow2"),
        "{err}"
    );
    made_as(
        &env,
        "disk.raw",
        &env.path("b.qcow2"),
        "raw",
        "raw into .qcow2",
    );
    // -O qcow2 into a name ending in .img: qcow2, and the warning.
    let out = env.imgsync(&["sync", "-O", "qcow2", "disk.raw", "c.img"]);
    ok(&out, "qcow2 into .img");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("c.img: warning:") && err.contains("qcow2") && err.contains(".img"),
        "{err}"
    );
    made_as(
        &env,
        "disk.raw",
        &env.path("c.img"),
        "qcow2",
        "qcow2 into .img",
    );
    // A name that says nothing (or the right thing): no warning.
    for (args, name) in [
        (&["sync", "disk.qcow2", "d.qcow2"][..], "d.qcow2"),
        (&["sync", "disk.raw", "e"][..], "e"),
    ] {
        let out = env.imgsync(args);
        ok(&out, name);
        assert!(
            out.stderr.is_empty(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_new_qcow2_dst_over_ssh_push_and_pull() {
    let env = qemu_env!();
    let Some(sshd) = Sshd::start() else { return };
    qcow2(&env, "disk.qcow2", 0x51);
    for via in BOTH {
        let remote = env.path(&format!("pushed-{via:?}.qcow2"));
        let mut a = vec!["sync".to_string(), "-q".into()];
        a.extend(ssh_args(&sshd, via, BIN));
        a.push("disk.qcow2".into());
        a.push(url(&sshd, &remote));
        let out = run(&env, &sshd, &a, &[]);
        ok(&out, &format!("push {via:?}"));
        made_as(
            &env,
            "disk.qcow2",
            &remote,
            "qcow2",
            &format!("push {via:?}"),
        );
        // Pulled back into a new local DST: a qcow2 again.
        let local = format!("pulled-{via:?}.qcow2");
        let mut a = vec!["sync".to_string(), "-q".into()];
        a.extend(ssh_args(&sshd, via, BIN));
        a.push(url(&sshd, &remote));
        a.push(local.clone());
        let out = run(&env, &sshd, &a, &[]);
        ok(&out, &format!("pull {via:?}"));
        made_as(
            &env,
            "disk.qcow2",
            &env.path(&local),
            "qcow2",
            &format!("pull {via:?}"),
        );
        // A new raw DST pushed and pulled: SRC read once by the sender.
        let data = 3 * MIB + 256 * 1024;
        for (what, from, to) in [
            (
                "raw push",
                "disk.qcow2".to_string(),
                url(&sshd, &env.path(&format!("r-{via:?}.raw"))),
            ),
            (
                "raw pull",
                url(&sshd, &env.path("disk.qcow2")),
                format!("l-{via:?}.raw"),
            ),
        ] {
            let mut a = vec![
                "sync".to_string(),
                "-q".into(),
                "--output".into(),
                "json".into(),
            ];
            a.extend(ssh_args(&sshd, via, BIN));
            a.extend(["-O".into(), "raw".into(), from, to]);
            let r = json(&run(&env, &sshd, &a, &[]), what);
            let read = r["bytes-read"].as_u64().unwrap();
            assert!(
                read <= data,
                "{what} {via:?}: SRC read more than once: {read}: {r}"
            );
            assert_eq!(r["destination-existed"], false, "{what}: {r}");
        }
        for name in [format!("r-{via:?}.raw"), format!("l-{via:?}.raw")] {
            made_as(&env, "disk.qcow2", &env.path(&name), "raw", &name);
        }
        // The second push finds a qcow2 there and updates it in place.
        qcow2(&env, "disk2.qcow2", 0x52);
        let mut a = vec!["sync".to_string(), "-q".into()];
        a.extend(ssh_args(&sshd, via, BIN));
        a.push("disk2.qcow2".into());
        a.push(url(&sshd, &remote));
        let out = run(&env, &sshd, &a, &[]);
        ok(&out, &format!("second push {via:?}"));
        made_as(
            &env,
            "disk2.qcow2",
            &remote,
            "qcow2",
            &format!("second push {via:?}"),
        );
    }
}
