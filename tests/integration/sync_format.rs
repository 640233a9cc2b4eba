//! `sync -f FMT` / `-O FMT`: the format the user names for SRC applies to
//! DST too unless -O says otherwise. `sync -f raw disk.qcow2 DST` (the
//! qcow2 file synced as bytes, as rsync users do) works every time, not
//! just while DST is absent; a qcow2 DST is refused (sync writes raw images
//! only for now) with the option to pass, never silently made raw.

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
    // -O qcow2: refused, nothing created (never a raw file instead).
    let out = env.imgsync(&["sync", "-O", "qcow2", "disk.raw", "new.qcow2"]);
    let line = assert_one_line_error(&out, "sync -O qcow2");
    assert!(
        line.contains("-O qcow2") && line.contains("raw images"),
        "{line}"
    );
    assert!(!env.path("new.qcow2").exists());
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
    // Nothing special asked and DST probes as qcow2: refused as before,
    // untouched, saying which option syncs onto its bytes.
    fs::copy(env.path("disk.qcow2"), env.path("keep.qcow2")).unwrap();
    let out = env.imgsync(&["sync", "disk.raw", "keep.qcow2"]);
    let line = assert_one_line_error(&out, "qcow2 DST, no options");
    assert!(
        line.contains("keep.qcow2: is a qcow2 image") && line.contains("-O raw"),
        "{line}"
    );
    cmp(
        &env.path("disk.qcow2"),
        &env.path("keep.qcow2"),
        "refused DST",
    );
}
