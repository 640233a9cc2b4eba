//! A raw file is a file: its raw copy has its exact size, whatever the
//! path (convert and sync, local, push and pull over a real sshd, `-`
//! streams), while a qcow2 output's virtual size is rounded up to 512
//! bytes as qemu-img convert -O qcow2 does.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use crate::common::{random_bytes, Env, KIB};
use crate::remote::{ok, run, same, ssh_args, url, BOTH};
use crate::sshd::Sshd;

const BIN: &str = env!("CARGO_BIN_EXE_imgsync");

/// Not a multiple of 512: qemu sees 1000448 bytes.
const ODD: u64 = 1_000_003;

/// A raw SRC of ODD bytes: data at the start, a hole, data up to the last
/// byte (so a copy one byte short or long shows).
fn odd_source(path: &Path) {
    let f = File::create(path).unwrap();
    f.write_all_at(&random_bytes(64 * KIB as usize, 11, false), 0)
        .unwrap();
    let tail = random_bytes(3000, 12, false);
    f.write_all_at(&tail, ODD - tail.len() as u64).unwrap();
    assert_eq!(f.metadata().unwrap().len(), ODD);
}

/// DST is byte for byte SRC, with SRC's exact length.
fn exact_copy(src: &Path, dst: &Path, what: &str) {
    let len = fs::metadata(dst).unwrap().len();
    assert_eq!(len, ODD, "{what}: {} has {len} bytes", dst.display());
    let out = Command::new("cmp").arg(src).arg(dst).output().unwrap();
    assert!(
        out.status.success(),
        "{what}: cmp: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn imgsync(env: &Env, args: &[&str]) {
    let out = env.imgsync(args);
    ok(&out, &args.join(" "));
}

#[test]
fn raw_copies_keep_the_exact_size_locally() {
    let env = qemu_env!();
    let src = env.path("odd.raw");
    odd_source(&src);
    let s = src.to_str().unwrap();

    let conv = env.path("conv.raw");
    imgsync(
        &env,
        &["convert", "-q", "-O", "raw", s, conv.to_str().unwrap()],
    );
    exact_copy(&src, &conv, "convert -O raw");

    // sync: DST absent, then an existing DST of another size and content
    // (longer, and a copy rounded up to 512 by an older imgsync).
    let synced = env.path("synced.raw");
    imgsync(&env, &["sync", "-q", s, synced.to_str().unwrap()]);
    exact_copy(&src, &synced, "sync onto an absent DST");
    for old_len in [2_000_000u64, ODD.next_multiple_of(512)] {
        let f = File::create(&synced).unwrap();
        f.write_all_at(&random_bytes(old_len as usize, 13, false), 0)
            .unwrap();
        drop(f);
        imgsync(&env, &["sync", "-q", s, synced.to_str().unwrap()]);
        exact_copy(
            &src,
            &synced,
            &format!("sync onto a DST of {old_len} bytes"),
        );
    }

    // qcow2: the virtual size is whole sectors, as qemu-img makes it.
    let q = env.path("odd.qcow2");
    imgsync(
        &env,
        &["convert", "-q", "-O", "qcow2", s, q.to_str().unwrap()],
    );
    let info = env.qemu_json(&["info", "--output=json", "odd.qcow2"]);
    assert_eq!(info["virtual-size"], 1_000_448, "{info}");
    same(&env, &src, &q);
    // ... and back to raw it is whole sectors too (its guest has them).
    let back = env.path("back.raw");
    imgsync(
        &env,
        &[
            "convert",
            "-q",
            "-O",
            "raw",
            "odd.qcow2",
            back.to_str().unwrap(),
        ],
    );
    assert_eq!(fs::metadata(&back).unwrap().len(), 1_000_448);
    same(&env, &src, &back);

    // A one-way stream.
    let piped = env.path("piped.raw");
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
    exact_copy(&src, &piped, "stream");
}

#[test]
fn raw_copies_keep_the_exact_size_over_ssh() {
    let env = qemu_env!();
    let Some(sshd) = Sshd::start() else { return };
    let src = env.path("odd.raw");
    odd_source(&src);
    let s = src.to_str().unwrap();
    let remote = env.path("remote");
    fs::create_dir(&remote).unwrap();
    for via in BOTH {
        for (name, args) in [
            ("conv.raw", &["convert", "-q", "-O", "raw"][..]),
            ("synced.raw", &["sync", "-q"][..]),
        ] {
            let go = |from: &str, to: &str| {
                let mut a: Vec<String> = args.iter().map(|x| x.to_string()).collect();
                a.extend(ssh_args(&sshd, via, BIN));
                a.extend([from.to_string(), to.to_string()]);
                ok(&run(&env, &sshd, &a, &[]), &a.join(" "));
            };
            let pushed = remote.join(format!("{via:?}-pushed-{name}"));
            go(s, &url(&sshd, &pushed));
            exact_copy(&src, &pushed, &format!("{via:?} push {}", args.join(" ")));
            let pulled = env.path(&format!("{via:?}-pulled-{name}"));
            go(&url(&sshd, &src), pulled.to_str().unwrap());
            exact_copy(&src, &pulled, &format!("{via:?} pull {}", args.join(" ")));
            if args[0] == "sync" {
                // Again, onto the existing copies.
                go(s, &url(&sshd, &pushed));
                exact_copy(&src, &pushed, &format!("{via:?} push onto DST"));
                go(&url(&sshd, &src), pulled.to_str().unwrap());
                exact_copy(&src, &pulled, &format!("{via:?} pull onto DST"));
            }
        }
        // A qcow2 push is whole sectors.
        let q = remote.join(format!("{via:?}-pushed.qcow2"));
        let mut a = vec![
            "convert".to_string(),
            "-q".into(),
            "-O".into(),
            "qcow2".into(),
        ];
        a.extend(ssh_args(&sshd, via, BIN));
        a.extend([s.to_string(), url(&sshd, &q)]);
        ok(&run(&env, &sshd, &a, &[]), "push -O qcow2");
        let info = env.qemu_json(&["info", "--output=json", q.to_str().unwrap()]);
        assert_eq!(info["virtual-size"], 1_000_448, "{info}");
        same(&env, &src, &q);
    }
}
