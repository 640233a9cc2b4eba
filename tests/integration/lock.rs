//! A source that a running qemu writes, or that changes while it is read:
//! qemu's image locks (held against a real `qemu-io`, the oracle for what
//! qemu-img refuses) and the before/after comparison of SRC, locally, on a
//! block device and over a real sshd (pull: the serve end detects it).
//!
//! Changes land at a known moment through the test-only hook
//! `IMGSYNC_TEST_PAUSE_BEFORE_SOURCE_CHECK=FILE`: imgsync, done reading,
//! creates FILE and waits until the test removes it.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use crate::common::{assert_one_line_error, random_bytes, Env, Op, Qcow2, Raw, MIB};
use crate::convert::Loop;
use crate::remote::{ok, run, same, ssh_args, url, wait_until, BOTH};
use crate::sshd::Sshd;

const BIN: &str = env!("CARGO_BIN_EXE_imgsync");
const HOOK: &str = "IMGSYNC_TEST_PAUSE_BEFORE_SOURCE_CHECK";
const IN_USE: &str = "is in use by another process (a running VM?); stop it, copy a snapshot, or pass -U/--force-share to read it anyway";
const CHANGED: &str = "changed while it was being read; the copy is not a consistent image: copy a snapshot or a stopped VM's image";

/// A qemu-io holding `img` open (read-write unless `read_only`) until
/// dropped, like a running VM.
struct Holder(Child);

impl Holder {
    fn start(env: &Env, fmt: &str, img: &str, read_only: bool) -> Holder {
        let mut cmd = Command::new("qemu-io");
        if read_only {
            cmd.arg("-r");
        }
        let child = cmd
            .args(["-f", fmt, img])
            .current_dir(env.root())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-io");
        let ino = fs::metadata(env.path(img)).unwrap().ino();
        wait_until(|| lock_count(ino) > 0, "qemu-io locks the image");
        Holder(child)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// OFD locks on inode `ino` (/proc/locks: `N: OFDLCK ADVISORY READ -1
/// MAJ:MIN:INO START END`).
fn lock_count(ino: u64) -> usize {
    let suffix = format!(":{ino}");
    fs::read_to_string("/proc/locks")
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.contains("OFDLCK")
                && l.split_whitespace()
                    .nth(5)
                    .is_some_and(|f| f.ends_with(&suffix))
        })
        .count()
}

/// Whether qemu-io can open `img` for writing now (qemu's own check).
fn qemu_can_write(env: &Env, fmt: &str, img: &str) -> bool {
    let out = env.run("qemu-io", &["-f", fmt, "-c", "read 0 512", img]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.status.success() && !text.contains("lock")
}

fn sparse_source(path: &Path, mib: u64) {
    let f = File::create(path).unwrap();
    for i in 0..mib / 8 {
        f.write_all_at(&random_bytes(4 * MIB as usize, 7 + i, false), i * 8 * MIB)
            .unwrap();
    }
    f.set_len(mib * 2 * MIB).unwrap();
}

/// Runs `cmd` with the pause hook; once imgsync has read everything and
/// waits, `change` runs, then imgsync goes on.
fn with_change_before_check(mut cmd: Command, hook: &Path, change: impl FnOnce()) -> Output {
    let _ = fs::remove_file(hook);
    let child = cmd
        .env(HOOK, hook)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start imgsync");
    wait_until(|| hook.exists(), "imgsync pauses before checking SRC");
    change();
    fs::remove_file(hook).unwrap();
    child.wait_with_output().unwrap()
}

fn imgsync(env: &Env, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args).current_dir(env.root());
    cmd
}

/// Overwrites 4 KiB at `off` with new bytes, as a guest would.
fn scribble(path: &Path, off: u64) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&[0x5a; 4096], off).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn an_image_a_running_qemu_writes_is_refused_unless_force_share() {
    let env = qemu_env!();
    for fmt in ["qcow2", "raw"] {
        let img = format!("vm.{fmt}");
        env.qemu_img(&["create", "-q", "-f", fmt, &img, "64M"]);
        env.qemu_io(fmt, &img, &[crate::common::Op::Pattern(0x11, 0, MIB)]);
        let holder = Holder::start(&env, fmt, &img, false);
        let cases: Vec<Vec<&str>> = vec![
            vec!["convert", "-O", "raw", &img, "copy.raw"],
            vec!["sync", &img, "synced.raw"],
            vec!["info", &img],
            vec!["map", &img],
            vec!["compare", &img, &img],
        ];
        for args in &cases {
            let out = env.imgsync(args);
            let line = assert_one_line_error(&out, &format!("{fmt} {args:?}"));
            assert_eq!(line, format!("imgsync: {img}: {IN_USE}"), "{args:?}");
        }
        assert!(!env.path("copy.raw").exists() && !env.path("synced.raw").exists());
        // check's exit status for an image it cannot open is its own.
        let out = env.imgsync(&["check", &img]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains(IN_USE));

        // -U reads it anyway, saying once that it may be inconsistent.
        let out = env.imgsync(&["convert", "-U", "-O", "raw", &img, "copy.raw"]);
        ok(&out, "convert -U");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            stderr.trim_end(),
            format!("imgsync: {img}: warning: in use by another process (a running VM?) and read anyway (-U): the copy may be inconsistent"),
        );
        let out = env.run("qemu-img", &["compare", "-U", "-f", fmt, &img, "copy.raw"]);
        assert!(out.status.success(), "{out:?}");
        ok(&env.imgsync(&["sync", "-U", &img, "synced.raw"]), "sync -U");
        ok(&env.imgsync(&["info", "-U", &img]), "info -U");
        drop(holder);
        fs::remove_file(env.path("copy.raw")).unwrap();
        fs::remove_file(env.path("synced.raw")).unwrap();

        // A read-only holder (a VM's backing file, qemu-io -r) is no writer.
        let holder = Holder::start(&env, fmt, &img, true);
        ok(
            &env.imgsync(&["convert", &img, "copy.raw"]),
            "convert beside a reader",
        );
        ok(&env.imgsync(&["info", &img]), "info beside a reader");
        drop(holder);
        fs::remove_file(env.path("copy.raw")).unwrap();
    }
}

#[test]
fn a_backing_file_a_running_qemu_writes_is_refused_by_name() {
    let env = qemu_env!();
    env.create("base.qcow2", Qcow2::new(16 * MIB));
    env.create("top.qcow2", Qcow2::overlay("base.qcow2", "qcow2"));
    let _holder = Holder::start(&env, "qcow2", "base.qcow2", false);
    let out = env.imgsync(&["convert", "-f", "qcow2", "top.qcow2", "flat.raw"]);
    let line = assert_one_line_error(&out, "convert of an overlay");
    assert_eq!(line, format!("imgsync: base.qcow2: {IN_USE}"));
    assert!(!env.path("flat.raw").exists());
}

#[test]
fn while_imgsync_reads_an_image_qemu_cannot_open_it_for_writing() {
    let env = qemu_env!();
    sparse_source(&env.path("base.raw"), 16);
    env.create("top.qcow2", Qcow2::overlay("base.raw", "raw"));
    assert!(qemu_can_write(&env, "qcow2", "top.qcow2"));
    let hook = env.path("pause");
    let cmd = imgsync(&env, &["convert", "-f", "qcow2", "top.qcow2", "flat.raw"]);
    let out = with_change_before_check(cmd, &hook, || {
        assert!(!qemu_can_write(&env, "qcow2", "top.qcow2"), "the overlay");
        assert!(!qemu_can_write(&env, "raw", "base.raw"), "its backing file");
    });
    ok(&out, "convert");
    assert!(qemu_can_write(&env, "qcow2", "top.qcow2"));
    same(&env, &env.path("top.qcow2"), &env.path("flat.raw"));
}

#[test]
fn a_destination_a_running_qemu_uses_is_refused_untouched_and_locked_while_written() {
    let env = qemu_env!();
    sparse_source(&env.path("src.raw"), 16);
    env.create("dst.raw", Raw::new(32 * MIB));
    fs::write(env.path("before"), fs::read(env.path("dst.raw")).unwrap()).unwrap();
    let holder = Holder::start(&env, "raw", "dst.raw", false);
    let line = assert_one_line_error(&env.imgsync(&["sync", "src.raw", "dst.raw"]), "sync");
    assert_eq!(
        line,
        "imgsync: dst.raw: is in use by another process (a running VM?); stop it before writing to it"
    );
    drop(holder);
    assert!(fs::read(env.path("dst.raw")).unwrap() == fs::read(env.path("before")).unwrap());
    assert!(!env.path(".dst.raw.imgsync-journal").exists());

    ok(&env.imgsync(&["sync", "src.raw", "dst.raw"]), "sync");
    same(&env, &env.path("src.raw"), &env.path("dst.raw"));

    // A block device DST (convert writes it in place): refused while a
    // qemu uses it, and no VM can start on it while it is written (the
    // pause comes before the output is completed).
    let disk = env.path("disk.img");
    File::create(&disk).unwrap().set_len(32 * MIB).unwrap();
    let Some(dev) = Loop::attach(&disk) else {
        return;
    };
    let holder = Holder::start(&env, "raw", &dev.0, false);
    let line = assert_one_line_error(&env.imgsync(&["convert", "src.raw", &dev.0]), "convert");
    assert_eq!(
        line,
        format!("imgsync: {}: is in use by another process (a running VM?); stop it before writing to it", dev.0)
    );
    drop(holder);
    let hook = env.path("pause");
    let cmd = imgsync(&env, &["convert", "src.raw", &dev.0]);
    let out = with_change_before_check(cmd, &hook, || {
        assert!(!qemu_can_write(&env, "raw", &dev.0));
    });
    ok(&out, "convert onto the device");
    same(&env, &env.path("src.raw"), Path::new(&dev.0));
}

#[test]
fn a_qcow2_destination_a_running_qemu_uses_is_refused_untouched() {
    let env = qemu_env!();
    env.create("dst.qcow2", Qcow2::new(32 * MIB))
        .write(&[Op::Data(0, MIB), Op::Data(9 * MIB, MIB)]);
    env.qemu_img(&["convert", "-O", "raw", "dst.qcow2", "src.raw"]);
    scribble(&env.path("src.raw"), 4 * MIB);
    let before = fs::read(env.path("dst.qcow2")).unwrap();
    let holder = Holder::start(&env, "qcow2", "dst.qcow2", false);
    let line = assert_one_line_error(&env.imgsync(&["sync", "src.raw", "dst.qcow2"]), "sync");
    assert_eq!(
        line,
        "imgsync: dst.qcow2: is in use by another process (a running VM?); stop it before writing to it"
    );
    drop(holder);
    assert!(
        fs::read(env.path("dst.qcow2")).unwrap() == before,
        "DST changed"
    );
    assert!(!env.path(".dst.qcow2.imgsync-journal").exists());
    // With the VM gone, the same sync updates it in place.
    ok(&env.imgsync(&["sync", "src.raw", "dst.qcow2"]), "sync");
    same(&env, &env.path("src.raw"), &env.path("dst.qcow2"));
}

#[test]
fn a_source_written_while_read_fails_convert_and_sync_locally() {
    let env = qemu_env!();
    let src = env.path("src.raw");
    sparse_source(&src, 200);
    let old = env.path("old.raw");
    ok(
        &env.imgsync(&["convert", "src.raw", "old.raw"]),
        "reference copy",
    );
    let hook = env.path("pause");

    let cmd = imgsync(&env, &["convert", "-O", "qcow2", "src.raw", "copy.qcow2"]);
    let out = with_change_before_check(cmd, &hook, || scribble(&src, 100 * MIB));
    let line = assert_one_line_error(&out, "convert");
    assert_eq!(line, format!("imgsync: src.raw: {CHANGED}"));
    assert!(
        !env.path("copy.qcow2").exists(),
        "nothing linked into place"
    );

    // Sync onto an older copy: DST ends as complete as what was sent (the
    // content read before the write), and the error says so.
    let dst = env.path("dst.raw");
    fs::copy(&old, &dst).unwrap();
    scribble(&dst, 8 * MIB);
    let cmd = imgsync(&env, &["sync", "src.raw", "dst.raw"]);
    let out = with_change_before_check(cmd, &hook, || scribble(&src, 40 * MIB));
    let line = assert_one_line_error(&out, "sync");
    assert_eq!(
        line,
        format!("imgsync: src.raw: {CHANGED}; dst.raw holds that copy (all the data read was written, and its digest matched)")
    );
    // What was read: SRC before the second scribble (the first at 100 MiB).
    scribble(&old, 100 * MIB);
    same(&env, &old, &dst);

    // Untouched meanwhile: success.
    let cmd = imgsync(&env, &["sync", "src.raw", "dst.raw"]);
    ok(
        &with_change_before_check(cmd, &hook, || {}),
        "sync of a still SRC",
    );
    same(&env, &src, &dst);
}

#[test]
fn a_qcow2_chain_member_written_while_read_is_named() {
    let env = qemu_env!();
    sparse_source(&env.path("base.raw"), 16);
    env.create("top.qcow2", Qcow2::overlay("base.raw", "raw"));
    let hook = env.path("pause");
    let cmd = imgsync(&env, &["convert", "-f", "qcow2", "top.qcow2", "flat.raw"]);
    let out = with_change_before_check(cmd, &hook, || scribble(&env.path("base.raw"), MIB));
    let line = assert_one_line_error(&out, "convert");
    assert_eq!(line, format!("imgsync: base.raw: {CHANGED}"));
    assert!(!env.path("flat.raw").exists());
}

/// Block devices have no meaningful times: the device's count of sectors
/// written catches a write through it.
#[test]
fn a_block_device_source_written_while_read_is_caught() {
    let env = qemu_env!();
    let backing = env.path("disk.img");
    sparse_source(&backing, 16);
    let Some(dev) = Loop::attach(&backing) else {
        return;
    };
    let hook = env.path("pause");
    let cmd = imgsync(&env, &["convert", "-f", "raw", &dev.0, "copy.raw"]);
    let out = with_change_before_check(cmd, &hook, || {
        let mut f = fs::OpenOptions::new().write(true).open(&dev.0).unwrap();
        f.write_all(&[0x33; 4096]).unwrap();
        f.sync_all().unwrap();
    });
    let line = assert_one_line_error(&out, "convert of a device");
    assert_eq!(line, format!("imgsync: {}: {CHANGED}", dev.0));
    assert!(!env.path("copy.raw").exists());
    // And unchanged, it converts.
    let cmd = imgsync(&env, &["convert", "-f", "raw", &dev.0, "copy.raw"]);
    ok(
        &with_change_before_check(cmd, &hook, || {}),
        "convert of a still device",
    );
}

/// The pull's sender is the serve end: it detects the change and says so.
#[test]
fn a_source_written_while_pulled_over_ssh_fails_and_says_where() {
    let env = qemu_env!();
    let Some(sshd) = Sshd::start() else { return };
    let src = env.path("src.raw");
    sparse_source(&src, 64);
    let old = env.path("old.raw");
    ok(
        &env.imgsync(&["convert", "src.raw", "old.raw"]),
        "reference copy",
    );
    let hook = env.path("pause");
    let script = sshd.script(
        "paused-serve",
        &format!("{HOOK}={} exec {BIN} \"$@\"", hook.display()),
    );
    let script = script.display().to_string();
    for via in BOTH {
        let _ = fs::remove_file(env.path("pulled.raw"));
        let mut a = vec!["convert".to_string()];
        a.extend(ssh_args(&sshd, via, &script));
        a.push(url(&sshd, &src));
        a.push("pulled.raw".into());
        let out = pull_with_change(&env, &sshd, &a, &hook, || scribble(&src, 24 * MIB));
        let line = assert_one_line_error(&out, &format!("{via:?} convert pull"));
        assert!(
            line.contains(&format!("{}: {CHANGED}", src.display())),
            "{via:?}: {line}"
        );
        assert!(!env.path("pulled.raw").exists(), "{via:?}");

        // sync pull onto the old copy: complete as sent, and said so.
        let dst = env.path(&format!("dst-{via:?}.raw"));
        fs::copy(&old, &dst).unwrap();
        let before = fs::read(&src).unwrap();
        let mut a = vec!["sync".to_string()];
        a.extend(ssh_args(&sshd, via, &script));
        a.push(url(&sshd, &src));
        a.push(dst.display().to_string());
        let out = pull_with_change(&env, &sshd, &a, &hook, || scribble(&src, 48 * MIB));
        let line = assert_one_line_error(&out, &format!("{via:?} sync pull"));
        assert!(
            line.contains(&format!("{}: {CHANGED}", src.display()))
                && line.ends_with(&format!(
                    "{} holds that copy (all the data read was written, and its digest matched)",
                    dst.display()
                )),
            "{via:?}: {line}"
        );
        fs::write(env.path("read.raw"), before).unwrap();
        same(&env, &env.path("read.raw"), &dst);
        fs::copy(&src, &old).unwrap();
    }
}

fn pull_with_change(
    env: &Env,
    sshd: &Sshd,
    args: &[String],
    hook: &Path,
    change: impl FnOnce(),
) -> Output {
    let _ = fs::remove_file(hook);
    let mut cmd = Command::new(BIN);
    cmd.args(args).current_dir(env.root());
    sshd.env(&mut cmd);
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start imgsync");
    wait_until(|| hook.exists(), "the serve end pauses before checking SRC");
    change();
    fs::remove_file(hook).unwrap();
    child.wait_with_output().unwrap()
}

/// -U crosses to the serve end (info, convert and sync of a remote image a
/// running qemu writes); without it the serve end refuses, naming the file.
#[test]
fn force_share_is_passed_to_the_remote_end() {
    let env = qemu_env!();
    let Some(sshd) = Sshd::start() else { return };
    env.create("vm.qcow2", Qcow2::new(16 * MIB));
    let img: PathBuf = env.path("vm.qcow2");
    let _holder = Holder::start(&env, "qcow2", "vm.qcow2", false);
    for via in BOTH {
        for (cmd, dst) in [
            ("info", None),
            ("convert", Some("pulled.qcow2")),
            ("sync", Some("synced.raw")),
        ] {
            let _ = fs::remove_file(env.path("pulled.qcow2"));
            let _ = fs::remove_file(env.path("synced.raw"));
            let mut a = vec![cmd.to_string()];
            a.extend(ssh_args(&sshd, via, BIN));
            a.push(url(&sshd, &img));
            a.extend(dst.map(String::from));
            let out = run(&env, &sshd, &a, &[]);
            let line = assert_one_line_error(&out, &format!("{via:?} {cmd}"));
            assert!(
                line.ends_with(&format!("{}: {IN_USE}", img.display())),
                "{via:?} {cmd}: {line}"
            );
            a.insert(1, "-U".into());
            ok(&run(&env, &sshd, &a, &[]), &format!("{via:?} {cmd} -U"));
        }
    }
}
