//! Test support shared by the modules that run the real qemu-img/qemu-io
//! (check, update): a temporary directory removed on drop, and a SKIP line
//! when the tools are missing (a failure with IMGSYNC_REQUIRE_QEMU=1).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

pub(crate) struct TempDir(pub(crate) PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A new directory under the system's temp dir; `what` names the tests.
pub(crate) fn temp_dir(what: &str) -> TempDir {
    static N: AtomicU32 = AtomicU32::new(0);
    let p = std::env::temp_dir().join(format!(
        "imgsync-{what}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&p).unwrap();
    TempDir(p)
}

pub(crate) fn have_qemu() -> bool {
    let ok = ["qemu-img", "qemu-io"].iter().all(|t| {
        Command::new(t)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !ok && std::env::var("IMGSYNC_REQUIRE_QEMU").as_deref() == Ok("1") {
        panic!("qemu-img/qemu-io not found and IMGSYNC_REQUIRE_QEMU=1");
    }
    ok
}

/// Returns from the test, with a SKIP line, when qemu-img is missing.
macro_rules! require_qemu {
    () => {
        if !$crate::qcow2::test_qemu::have_qemu() {
            eprintln!("SKIP: qemu-img/qemu-io not found");
            return;
        }
    };
}
pub(crate) use require_qemu;
