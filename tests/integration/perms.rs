//! New images keep the source's permissions (as `rsync -a`): a new DST
//! gets SRC's permission bits and, when the receiving imgsync is root,
//! SRC's owner and group; an existing DST keeps its own; the hash cache
//! stays 0600. Every path: convert and sync, local, push and pull over a
//! real sshd (both transports), and `-` streams.

use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use crate::common::{random_bytes, Env, MIB};
use crate::remote::{ok, run, same, ssh_args, url, Via, BOTH};
use crate::sshd::Sshd;

const BIN: &str = env!("CARGO_BIN_EXE_imgsync");

/// The owner and group SRC gets when the tests run as root (ids that no
/// test user has, so a DST owned by the writer shows).
const SRC_OWNER: (u32, u32) = (1234, 5678);

fn is_root() -> bool {
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// (mode & 0o7777, uid, gid) of `p`.
fn meta(p: &Path) -> (u32, u32, u32) {
    let m = fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.mode() & 0o7777, m.uid(), m.gid())
}

/// A 4 MiB raw image with 1 MiB of data, with `mode` and (as root)
/// [`SRC_OWNER`]; returns what DST must carry.
fn source(path: &Path, mode: u32) -> (u32, u32, u32) {
    let f = File::create(path).unwrap();
    f.write_all_at(&random_bytes(MIB as usize, 7, true), MIB)
        .unwrap();
    f.set_len(4 * MIB).unwrap();
    if is_root() {
        std::os::unix::fs::chown(path, Some(SRC_OWNER.0), Some(SRC_OWNER.1)).unwrap();
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    meta(path)
}

fn imgsync(env: &Env, args: &[&str]) {
    let out = env.imgsync(args);
    ok(&out, &args.join(" "));
}

#[test]
fn new_images_take_the_source_mode_and_owner_locally() {
    let env = qemu_env!();
    // 0600 would become 0644 under the usual umask, 0664 would lose g+w.
    for mode in [0o600, 0o664] {
        let src = env.path(&format!("src-{mode:o}.raw"));
        let want = source(&src, mode);
        let s = src.to_str().unwrap();
        for (name, args) in [
            ("conv.raw", &["convert", "-q", "-O", "raw"][..]),
            ("conv.qcow2", &["convert", "-q", "-O", "qcow2"][..]),
            ("synced.raw", &["sync", "-q"][..]),
        ] {
            let dst = env.path(&format!("{mode:o}-{name}"));
            let mut a = args.to_vec();
            a.extend([s, dst.to_str().unwrap()]);
            imgsync(&env, &a);
            same(&env, &src, &dst);
            assert_eq!(meta(&dst), want, "{}", a.join(" "));
        }
        // A one-way stream carries it too.
        let piped = env.path(&format!("{mode:o}-piped.raw"));
        let out = Command::new("sh")
            .args([
                "-c",
                &format!(
                    "{BIN} convert {s} - | {BIN} convert -O raw - {}",
                    piped.display()
                ),
            ])
            .current_dir(env.root())
            .output()
            .unwrap();
        ok(&out, "pipe");
        same(&env, &src, &piped);
        assert_eq!(meta(&piped), want, "stream");
    }
    // The hash cache beside a synced DST stays private whatever SRC's mode.
    let cache = env.path(".664-synced.raw.imgsync-hashes");
    assert_eq!(meta(&cache).0, 0o600, "hash cache");
}

#[test]
fn existing_destinations_keep_their_own_mode_and_owner() {
    let env = qemu_env!();
    let src = env.path("src.raw");
    source(&src, 0o600);
    let s = src.to_str().unwrap();
    for args in [&["convert", "-q", "-O", "raw"][..], &["sync", "-q"][..]] {
        let dst = env.path("dst.raw");
        fs::write(&dst, b"old content").unwrap();
        if is_root() {
            std::os::unix::fs::chown(&dst, Some(4321), Some(8765)).unwrap();
        }
        fs::set_permissions(&dst, fs::Permissions::from_mode(0o644)).unwrap();
        let before = meta(&dst);
        let mut a = args.to_vec();
        a.extend([s, dst.to_str().unwrap()]);
        imgsync(&env, &a);
        same(&env, &src, &dst);
        assert_eq!(meta(&dst), before, "{}", a.join(" "));
        fs::remove_file(&dst).unwrap();
    }
}

/// Not root: the bits are kept but setuid/setgid are dropped (rsync -p,
/// cp -p), and the file is the writer's. Runs imgsync as nobody; needs
/// root and setpriv, skipped visibly otherwise.
#[test]
fn without_root_the_set_id_bits_are_dropped_and_the_writer_owns_the_copy() {
    let env = qemu_env!();
    if !is_root() || Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("SKIP without_root_the_set_id_bits_are_dropped: needs root and setpriv");
        return;
    }
    let dir = env.path("nobody");
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(env.root(), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    let src = dir.join("src.raw");
    source(&src, 0o6754);
    let dst = dir.join("dst.raw");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
        .args(["convert", "-q", "-O", "raw"])
        .arg(&src)
        .arg(&dst)
        .output()
        .unwrap();
    ok(&out, "convert as nobody");
    same(&env, &src, &dst);
    assert_eq!(meta(&dst), (0o754, 65534, 65534));
}

/// `imgsync ARGS... SRC DST` through `via`.
fn remote_run(env: &Env, sshd: &Sshd, via: Via, args: &[&str], src: &str, dst: &str) {
    let mut a: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    a.extend(ssh_args(sshd, via, BIN));
    a.push(src.to_string());
    a.push(dst.to_string());
    let out = run(env, sshd, &a, &[]);
    ok(&out, &a.join(" "));
}

#[test]
fn new_images_take_the_source_mode_and_owner_over_ssh() {
    let env = qemu_env!();
    let Some(sshd) = Sshd::start() else { return };
    let src = env.path("src.raw");
    let want = source(&src, 0o640);
    let s = src.to_str().unwrap();
    let remote = env.path("remote");
    fs::create_dir(&remote).unwrap();
    for via in BOTH {
        for (name, args) in [
            ("conv.raw", &["convert", "-q", "-O", "raw"][..]),
            ("conv.qcow2", &["convert", "-q", "-O", "qcow2"][..]),
            ("synced.raw", &["sync", "-q"][..]),
        ] {
            // Push: the serve end creates DST.
            let pushed = remote.join(format!("{via:?}-pushed-{name}"));
            remote_run(&env, &sshd, via, args, s, &url(&sshd, &pushed));
            same(&env, &src, &pushed);
            assert_eq!(meta(&pushed), want, "{via:?} push {}", args.join(" "));
            // Pull: SRC's metadata comes over the wire.
            let pulled = env.path(&format!("{via:?}-pulled-{name}"));
            remote_run(
                &env,
                &sshd,
                via,
                args,
                &url(&sshd, &src),
                pulled.to_str().unwrap(),
            );
            same(&env, &src, &pulled);
            assert_eq!(meta(&pulled), want, "{via:?} pull {}", args.join(" "));
        }
        // A pushed convert over an existing DST keeps DST's own.
        let existing = remote.join(format!("{via:?}-existing.raw"));
        fs::write(&existing, b"old").unwrap();
        if is_root() {
            std::os::unix::fs::chown(&existing, Some(4321), Some(8765)).unwrap();
        }
        fs::set_permissions(&existing, fs::Permissions::from_mode(0o604)).unwrap();
        let before = meta(&existing);
        remote_run(
            &env,
            &sshd,
            via,
            &["convert", "-q", "-O", "raw"],
            s,
            &url(&sshd, &existing),
        );
        same(&env, &src, &existing);
        assert_eq!(meta(&existing), before, "{via:?} push over an existing DST");
    }
}
