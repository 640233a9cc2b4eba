//! What issue 11 ("trust") asks of every run: no false success, no panic,
//! no hang. Errors name the real cause (the source, ssh, a foreign remote
//! command); a closed stdout ends only listings quietly; a closed stderr
//! never panics; a silent peer times out; Ctrl-C ends any wait at once.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{
    assert_one_line_error, assert_one_line_error_code, random_bytes, Env, Qcow2, Raw, MIB,
};
use crate::remote::{ssh_args, url, Via, BOTH};
use crate::sshd::Sshd;

const BIN: &str = env!("CARGO_BIN_EXE_imgsync");

fn imgsync(env: &Env) -> Command {
    let mut c = Command::new(BIN);
    c.current_dir(env.root());
    c
}

/// A qcow2 image holding 24 MiB of pattern data, then cut to 12 MiB.
fn truncated_qcow2(env: &Env) -> String {
    env.create("cut.qcow2", Qcow2::new(32 * MIB))
        .write(&[crate::common::Op::Pattern(7, 0, 24 * MIB)]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(env.path("cut.qcow2"))
        .unwrap();
    f.set_len(12 * MIB).unwrap();
    "cut.qcow2".into()
}

#[test]
fn local_sync_from_a_damaged_source_names_the_source() {
    let env = qemu_env!();
    let src = truncated_qcow2(&env);
    env.create("dst.raw", Raw::new(32 * MIB));
    let before = std::fs::read(env.path("dst.raw")).unwrap();
    for dst in ["dst.raw", "new.raw"] {
        let out = imgsync(&env)
            .args(["sync", "-q", &src, dst])
            .output()
            .unwrap();
        let line = assert_one_line_error(&out, dst);
        assert!(
            line.starts_with("imgsync: cut.qcow2: ") && line.contains("beyond the end of the file"),
            "{dst}: {line}"
        );
        assert!(!line.contains("peer"), "{dst}: {line}");
    }
    assert!(!env.path("new.raw").exists());
    // Nothing was written to the existing DST (the source failed while
    // hashing, before any block was sent).
    assert_eq!(std::fs::read(env.path("dst.raw")).unwrap(), before);
}

/// `imgsync ARGS | head -c N`: reads N bytes of its stdout, closes the
/// pipe, and returns how it ended.
fn read_then_close(env: &Env, args: &[&str], n: usize) -> std::process::Output {
    let mut child = imgsync(env)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut head = vec![0u8; n];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    drop(child.stdout.take());
    child.wait_with_output().unwrap()
}

#[test]
fn convert_into_a_pipe_closed_early_fails() {
    let env = qemu_env!();
    std::fs::write(env.path("r.raw"), random_bytes(8 << 20, 1, false)).unwrap();
    let out = read_then_close(&env, &["convert", "r.raw", "-"], 1000);
    let line = assert_one_line_error(&out, "convert r.raw - | head -c 1000");
    assert!(line.contains("-: writing the stream"), "{line}");
}

#[test]
fn a_listing_into_a_pipe_closed_early_ends_quietly() {
    let env = qemu_env!();
    // 2048 data extents: a listing far longer than a pipe holds.
    let f = std::fs::File::create(env.path("many.raw")).unwrap();
    f.set_len(16 * MIB).unwrap();
    for i in 0..2048u64 {
        std::os::unix::fs::FileExt::write_all_at(&f, &[1u8; 4096], i * 8192).unwrap();
    }
    let out = read_then_close(&env, &["map", "many.raw"], 100);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A pipe whose reader is already gone: every write to it is EPIPE.
fn closed_pipe() -> std::os::fd::OwnedFd {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills the two descriptors it creates; each is owned
    // once, below.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
    use std::os::fd::FromRawFd;
    // SAFETY: both descriptors were just created by pipe(2) and are not
    // owned by anything else.
    let (r, w) = unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    drop(r);
    w
}

#[test]
fn an_error_with_stderr_closed_is_exit_2_not_a_panic() {
    let env = qemu_env!();
    let out = imgsync(&env)
        .args(["info", "missing.img"])
        .stderr(closed_pipe())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    // serve whose client sent garbage and whose stderr (sshd's pipe) is gone.
    let mut child = imgsync(&env)
        .arg("serve")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(closed_pipe())
        .spawn()
        .unwrap();
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"definitely not a frame")
        .unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn an_image_piped_where_a_stream_belongs_is_named() {
    let env = qemu_env!();
    env.create("a.qcow2", Qcow2::new(MIB));
    let img = std::fs::read(env.path("a.qcow2")).unwrap();
    for (what, input) in [("qcow2", img), ("text", b"Welcome to Debian\n".to_vec())] {
        let mut child = imgsync(&env)
            .args(["convert", "-", "out.raw"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let _ = child.stdin.as_mut().unwrap().write_all(&input);
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        let line = assert_one_line_error(&out, what);
        assert!(
            line.starts_with("imgsync: -: not an imgsync stream"),
            "{line}"
        );
        if what == "text" {
            assert!(line.contains("printed \"Welcome to D"), "{line}");
        } else {
            assert!(line.contains("51 46 49 fb"), "{line}");
        }
        assert!(!env.path("out.raw").exists());
    }
}

macro_rules! ssh_env {
    () => {{
        let env = qemu_env!();
        let Some(sshd) = Sshd::start() else { return };
        (env, sshd)
    }};
}

use crate::remote::command as remote_cmd;

#[test]
fn a_banner_or_another_program_is_recognised() {
    let (env, sshd) = ssh_env!();
    env.create("a.raw", Raw::new(MIB));
    let banner = sshd.script(
        "banner",
        &format!("echo 'Welcome to Debian GNU/Linux 12'\nexec {BIN} \"$@\""),
    );
    for via in BOTH {
        let mut args = vec!["info".to_string()];
        args.extend(ssh_args(&sshd, via, &banner.display().to_string()));
        args.push(url(&sshd, &env.path("a.raw")));
        let out = remote_cmd(&env, &sshd, &args).output().unwrap();
        let line = assert_one_line_error(&out, &format!("{via:?}"));
        assert!(
            line.contains("the remote command printed \"Welcome to D")
                && line.contains("instead of speaking the imgsync protocol"),
            "{via:?}: {line}"
        );
    }
}

#[test]
fn ssh_own_failures_are_said_to_be_ssh() {
    let (env, sshd) = ssh_env!();
    env.create("a.raw", Raw::new(MIB));
    let wrong = sshd.ssh_command().replace(
        &sshd.client_key().display().to_string(),
        &sshd.wrong_key().display().to_string(),
    );
    let mut args = vec!["info".to_string(), "-e".into(), wrong];
    args.push("--remote-imgsync".into());
    args.push(BIN.into());
    args.push(url(&sshd, &env.path("a.raw")));
    let out = remote_cmd(&env, &sshd, &args).output().unwrap();
    let line = assert_one_line_error(&out, "wrong key");
    assert!(
        line.contains(": ssh failed: ") && line.contains("Permission denied"),
        "{line}"
    );
    assert!(!line.contains("remote side said"), "{line}");
}

/// A remote command that accepts the channel and never says a word.
fn silent(sshd: &Sshd) -> String {
    sshd.script("silent", "exec sleep 600")
        .display()
        .to_string()
}

#[test]
fn a_silent_peer_times_out() {
    let (env, sshd) = ssh_env!();
    env.create("a.raw", Raw::new(MIB));
    for via in BOTH {
        let mut args = vec!["info".to_string(), "--timeout".into(), "5".into()];
        args.extend(ssh_args(&sshd, via, &silent(&sshd)));
        args.push(url(&sshd, &env.path("a.raw")));
        let t = Instant::now();
        let out = remote_cmd(&env, &sshd, &args).output().unwrap();
        let took = t.elapsed();
        let line = assert_one_line_error(&out, &format!("{via:?}"));
        assert!(
            line.contains("no data from the peer for 5 s"),
            "{via:?}: {line}"
        );
        assert!(
            took >= Duration::from_secs(5) && took < Duration::from_secs(15),
            "{via:?}: {took:?}"
        );
    }
}

#[test]
fn ctrl_c_ends_a_wait_on_the_peer_within_a_second() {
    let (env, sshd) = ssh_env!();
    env.create("a.raw", Raw::new(MIB));
    for via in BOTH {
        for cmd in ["info", "convert"] {
            let mut args = vec![cmd.to_string()];
            args.extend(ssh_args(&sshd, via, &silent(&sshd)));
            if cmd == "convert" {
                args.push("a.raw".into());
                args.push(url(&sshd, &env.path("b.raw")));
            } else {
                args.push(url(&sshd, &env.path("a.raw")));
            }
            let mut child = remote_cmd(&env, &sshd, &args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_secs(2));
            assert!(
                child.try_wait().unwrap().is_none(),
                "{via:?} {cmd}: ended early"
            );
            let t = Instant::now();
            kill(child.id(), "INT");
            let out = child.wait_with_output().unwrap();
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "{via:?} {cmd}: {:?}",
                t.elapsed()
            );
            let line = assert_one_line_error_code(&out, &format!("{via:?} {cmd}"), 130);
            assert!(line.contains("interrupted"), "{via:?} {cmd}: {line}");
        }
    }
}

pub(crate) fn kill(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

#[test]
fn a_busy_peer_is_not_taken_for_dead() {
    let (env, sshd) = ssh_env!();
    env.create("a.raw", Raw::new(MIB));
    // The serve sits 8 s on the request (as a check of a big image would);
    // its keepalives keep a 5 s --timeout from running out.
    let busy = sshd.script(
        "busy",
        &format!("IMGSYNC_TEST_SERVE_STALL_MS=8000 exec {BIN} \"$@\""),
    );
    for via in BOTH {
        let mut args = vec!["info".to_string(), "--timeout".into(), "5".into()];
        args.extend(ssh_args(&sshd, via, &busy.display().to_string()));
        args.push(url(&sshd, &env.path("a.raw")));
        let out = remote_cmd(&env, &sshd, &args).output().unwrap();
        assert!(
            out.status.success(),
            "{via:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("virtual size"));
    }
}

#[test]
fn connect_timeout_bounds_a_server_that_never_greets() {
    let env = crate::common::temp_env();
    // Accepted by the kernel, never answered: no SSH banner ever comes.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::fs::write(env.path("cfg"), "Host *\n  ConnectTimeout 2\n").unwrap();
    let target = format!("ssh://127.0.0.1:{port}/x.raw");
    let cases: [(&str, Vec<&str>); 3] = [
        (
            "--connect-timeout",
            vec!["--connect-timeout", "2", "--ssh-config", "/dev/null"],
        ),
        ("ssh_config ConnectTimeout", vec!["--ssh-config", "cfg"]),
        (
            "-e ssh",
            vec![
                "--connect-timeout",
                "2",
                "-e",
                "ssh -F /dev/null -o BatchMode=yes",
            ],
        ),
    ];
    for (what, extra) in cases {
        let t = Instant::now();
        let out = imgsync(&env)
            .arg("info")
            .args(&extra)
            .arg(&target)
            .env("HOME", env.root())
            .env_remove("SSH_AUTH_SOCK")
            .output()
            .unwrap();
        let took = t.elapsed();
        let line = assert_one_line_error(&out, what);
        assert!(line.contains("127.0.0.1"), "{what}: {line}");
        assert!(
            took < Duration::from_secs(10),
            "{what}: took {took:?}: {line}"
        );
    }
    drop(l);
}

fn rchar(pid: u32) -> u64 {
    crate::remote::rchar(&pid.to_string())
}

/// Starts `imgsync ARGS`, sends SIGINT once `ready` holds, returns its
/// one error line.
fn interrupt_when(env: &Env, args: &[&str], ready: impl Fn(u32) -> bool, what: &str) -> String {
    let mut child = imgsync(env)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    crate::remote::wait_until(|| ready(pid) || child.try_wait().unwrap().is_some(), what);
    kill(pid, "INT");
    let t = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "{what}: {:?}",
        t.elapsed()
    );
    assert_one_line_error_code(&out, what, 130)
}

#[test]
fn an_interrupted_sync_says_what_state_dst_is_in() {
    let env = qemu_env!();
    crate::sync::big_pair(&env);
    let journal = env.path(".dst.raw.imgsync-journal");
    // Still comparing (reading, nothing written): DST is untouched and
    // nothing suggests a rollback.
    crate::sync::copy(&env.path("old.raw"), &env.path("dst.raw"));
    let line = interrupt_when(
        &env,
        &["sync", "--compress-level", "0", "src.raw", "dst.raw"],
        |pid| rchar(pid) > 8 * MIB,
        "while comparing",
    );
    assert_eq!(line, "imgsync: dst.raw: interrupted; dst.raw is untouched");
    assert!(!journal.exists());
    crate::sync::identical(
        &env,
        &env.path("old.raw"),
        &env.path("dst.raw"),
        "untouched",
    );
    // DST absent: nothing appears.
    let line = interrupt_when(
        &env,
        &["sync", "--compress-level", "0", "src.raw", "new.raw"],
        |pid| crate::remote::wchar(&pid.to_string()) > 20 * MIB,
        "new DST",
    );
    assert_eq!(
        line,
        "imgsync: new.raw: interrupted; new.raw was not created (nothing was written)"
    );
    assert!(!env.path("new.raw").exists());
    // Mid-sync, then resumed: the human report and --stats say so.
    let line = interrupt_when(
        &env,
        &["sync", "--compress-level", "0", "src.raw", "dst.raw"],
        |pid| crate::remote::wchar(&pid.to_string()) > 20 * MIB,
        "mid-sync",
    );
    assert!(line.contains("dst.raw is mid-sync"), "{line}");
    assert!(journal.exists());
    let out = imgsync(&env)
        .args(["sync", "src.raw", "dst.raw"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "dst.raw: resumed the interrupted sync; it is complete now\n"
    );
    crate::sync::identical(&env, &env.path("src.raw"), &env.path("dst.raw"), "resumed");
    // --stats of a resumed sync.
    crate::sync::copy(&env.path("old.raw"), &env.path("dst.raw"));
    interrupt_when(
        &env,
        &["sync", "--compress-level", "0", "src.raw", "dst.raw"],
        |pid| crate::remote::wchar(&pid.to_string()) > 20 * MIB,
        "mid-sync again",
    );
    let out = imgsync(&env)
        .args(["sync", "--stats", "src.raw", "dst.raw"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("resumed:         yes"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn sync_progress_covers_comparing_and_sending() {
    let env = qemu_env!();
    crate::sync::big_pair(&env);
    crate::sync::copy(&env.path("old.raw"), &env.path("dst.raw"));
    // -p without a terminal: a line per tenth. SRC holds 96 MiB, all of it
    // different: 96 MiB compared, then 96 MiB sent: 192 MiB in all, and
    // no 100 % before the sending is done.
    let out = imgsync(&env)
        .args(["sync", "-p", "--compress-level", "0", "src.raw", "dst.raw"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    let last = lines.last().copied().unwrap_or_default();
    assert!(last.starts_with("100% 192 MiB of 192 MiB"), "{err}");
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("100%")).count(),
        1,
        "{err}"
    );
}

#[test]
fn serve_whose_client_is_killed_ends_with_2_and_keeps_the_journal() {
    let (env, sshd) = ssh_env!();
    crate::sync::big_pair(&env);
    crate::sync::copy(&env.path("old.raw"), &env.path("dst.raw"));
    let journal = env.path(".dst.raw.imgsync-journal");
    for via in BOTH {
        let _ = std::fs::remove_file(&journal);
        crate::sync::copy(&env.path("old.raw"), &env.path("dst.raw"));
        let pidfile = sshd.path(&format!("serve-{via:?}.pid"));
        let status = sshd.path(&format!("serve-{via:?}.status"));
        let _ = std::fs::remove_file(&pidfile);
        let _ = std::fs::remove_file(&status);
        // The serve's exit status, kept by the shell that ran it (sshd has
        // closed its stderr by then: printing there used to panic, 101).
        let script = sshd.script(
            &format!("serve-{via:?}"),
            &format!(
                "sh -c 'echo $$ > {}; exec {BIN} \"$@\"' serve \"$@\"\necho $? > {}",
                pidfile.display(),
                status.display()
            ),
        );
        let mut a = vec![
            "sync".to_string(),
            "-q".into(),
            "--compress-level".into(),
            "0".into(),
        ];
        a.extend(ssh_args(&sshd, via, &script.display().to_string()));
        a.push("src.raw".into());
        a.push(url(&sshd, &env.path("dst.raw")));
        let mut child = remote_cmd(&env, &sshd, &a)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = crate::remote::wait_for_pid(&pidfile);
        crate::remote::wait_until(|| crate::remote::wchar(&pid) > 20 * MIB, "serve writes");
        kill(child.id(), "KILL");
        let _ = child.wait();
        crate::remote::wait_until(|| status.exists(), "serve ends");
        std::thread::sleep(Duration::from_millis(100));
        let code = std::fs::read_to_string(&status).unwrap();
        assert_eq!(code.trim(), "2", "{via:?}: serve exit status");
        assert!(journal.exists(), "{via:?}: the journal must be kept");
    }
}

#[test]
fn compare_keeps_its_verdict_when_its_reader_left() {
    let env = qemu_env!();
    std::fs::write(env.path("a.raw"), [1u8; 4096]).unwrap();
    std::fs::write(env.path("b.raw"), [2u8; 4096]).unwrap();
    let out = imgsync(&env)
        .args(["compare", "a.raw", "b.raw"])
        .stdout(closed_pipe())
        .output()
        .unwrap();
    // 1 = different, never the 0 of "identical".
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_read_only_copy_can_be_synced_again_by_its_owner() {
    use std::os::unix::fs::PermissionsExt;
    let env = qemu_env!();
    let euid = Command::new("id").arg("-u").output().unwrap();
    if String::from_utf8_lossy(&euid.stdout).trim() != "0"
        || Command::new("setpriv").arg("--version").output().is_err()
    {
        eprintln!("SKIP a_read_only_copy_can_be_synced_again_by_its_owner: needs root and setpriv");
        return;
    }
    let dir = env.path("nobody");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(env.root(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    let (src, dst) = (dir.join("golden.raw"), dir.join("copy.raw"));
    std::fs::write(&src, random_bytes(1 << 20, 3, false)).unwrap();
    std::os::unix::fs::chown(&src, Some(65534), Some(65534)).unwrap();
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o444)).unwrap();
    let sync_as_nobody = || {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
            .args(["sync", "-q"])
            .arg(&src)
            .arg(&dst)
            .output()
            .unwrap()
    };
    let out = sync_as_nobody();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::metadata(&dst).unwrap().permissions().mode() & 0o7777,
        0o444
    );
    // The golden image changes (root writes it); its owner syncs again.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&src)
        .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, &[9u8; 4096], 8192))
        .unwrap();
    let out = sync_as_nobody();
    assert!(
        out.status.success(),
        "second sync: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    assert_eq!(
        std::fs::metadata(&dst).unwrap().permissions().mode() & 0o7777,
        0o444
    );
}

#[test]
fn a_pull_that_fails_before_any_change_does_not_claim_dst_changed() {
    let (env, sshd) = ssh_env!();
    std::fs::write(env.path("dst.raw"), [5u8; 8192]).unwrap();
    for journal in [true, false] {
        let mut a = vec!["sync".to_string(), "-q".into()];
        if !journal {
            a.push("--no-journal".into());
        }
        a.extend(ssh_args(&sshd, Via::Builtin, BIN));
        a.push(url(&sshd, &env.path("missing.raw")));
        a.push("dst.raw".into());
        let out = remote_cmd(&env, &sshd, &a).output().unwrap();
        let line = assert_one_line_error(&out, "pull of a missing SRC");
        assert!(line.contains("missing.raw"), "{line}");
        assert!(
            !line.contains("partly updated") && !line.contains("mid-sync"),
            "journal {journal}: {line}"
        );
        assert_eq!(std::fs::read(env.path("dst.raw")).unwrap(), [5u8; 8192]);
    }
}

#[test]
fn ctrl_c_ends_a_connect_that_hangs() {
    let env = crate::common::temp_env();
    // The kernel accepts, nobody answers: the SSH handshake waits (60 s by
    // default) on a thread the interrupt leaves behind.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let mut child = imgsync(&env)
        .args(["info", "--ssh-config", "/dev/null"])
        .arg(format!("ssh://127.0.0.1:{port}/x.raw"))
        .env("HOME", env.root())
        .env_remove("SSH_AUTH_SOCK")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert!(child.try_wait().unwrap().is_none(), "ended early");
    let t = Instant::now();
    kill(child.id(), "INT");
    let out = child.wait_with_output().unwrap();
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    let line = assert_one_line_error_code(&out, "interrupted connect", 130);
    assert_eq!(
        line,
        format!("imgsync: 127.0.0.1:{port}: interrupted while connecting")
    );
    drop(l);
}
