//! The library API's example, `examples/sync_to_host.rs`, compiled into
//! this binary (so it is the example's code that runs, never a stale
//! build) and run against the test sshd with the built-in client: what it
//! syncs reads back equal to SRC, a second run sends nothing, and a host
//! that is not there is one line naming it.

use std::fs;
use std::path::Path;

use crate::common::{random_bytes, MIB};
use crate::sshd::Sshd;

#[path = "../../examples/sync_to_host.rs"]
#[allow(dead_code)]
mod sync_to_host;

const BIN: &str = env!("CARGO_BIN_EXE_imgsync");

fn args(sshd: &Sshd, src: &Path, dst: &Path) -> Vec<String> {
    vec![
        src.display().to_string(),
        format!("{}@127.0.0.1:{}", sshd.user(), sshd.port()),
        dst.display().to_string(),
        "--identity".into(),
        sshd.client_key().display().to_string(),
        "--known-hosts".into(),
        sshd.known_hosts().display().to_string(),
        "--ssh-config".into(),
        "/dev/null".into(),
        "--remote-imgsync".into(),
        BIN.into(),
    ]
}

#[test]
fn the_example_syncs_an_image_to_the_test_sshd() {
    let env = qemu_env!();
    let Some(sshd) = Sshd::start() else { return };
    let src = env.path("src.raw");
    let dst = env.path("dst.raw");
    // 8 MiB with data at the start and the end, a hole between.
    let f = fs::File::create(&src).unwrap();
    f.set_len(8 * MIB).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&random_bytes(MIB as usize, 7, false), 0)
        .unwrap();
    f.write_all_at(&random_bytes(MIB as usize, 8, false), 7 * MIB)
        .unwrap();
    drop(f);

    let line = sync_to_host::run(&args(&sshd, &src, &dst))
        .unwrap_or_else(|e| panic!("first sync: {} (sshd log: {})", e.one_line(), sshd.log()));
    assert!(line.contains("32 of 32 blocks sent"), "{line}");
    assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());

    // One block changed: one block crosses.
    let f = fs::OpenOptions::new().write(true).open(&src).unwrap();
    f.write_all_at(&random_bytes(4096, 9, false), 7 * MIB + 70_000)
        .unwrap();
    drop(f);
    let line = sync_to_host::run(&args(&sshd, &src, &dst)).unwrap();
    assert!(line.contains(" 1 of 32 blocks sent"), "{line}");
    assert_eq!(fs::read(&src).unwrap(), fs::read(&dst).unwrap());
}

#[test]
fn the_example_names_a_host_that_refuses() {
    let env = qemu_env!();
    let Some(sshd) = Sshd::start() else { return };
    let src = env.path("src.raw");
    fs::write(&src, random_bytes(65536, 1, false)).unwrap();
    let mut a = args(&sshd, &src, &env.path("dst.raw"));
    // A port nobody listens on (the sshd's, after it stopped, is reused
    // by nobody this soon).
    let port = sshd.port();
    drop(sshd);
    a[1] = format!("127.0.0.1:{port}");
    let e = sync_to_host::run(&a).expect_err("no sshd");
    let line = e.one_line();
    assert!(
        line.starts_with(&format!("127.0.0.1:{port}: ")) && !line.contains('\n'),
        "{line}"
    );
    assert!(!env.path("dst.raw").exists());
}
