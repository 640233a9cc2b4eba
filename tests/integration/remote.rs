//! convert over SSH, end to end, against a real OpenSSH server started by
//! each test (`sshd::Sshd`), with both transports: the built-in libssh2
//! client and `-e ssh ...`. imgsync runs on both ends (`--remote-imgsync`
//! names the binary under test); qemu-img is the oracle for the results.

use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{
    assert_one_line_error, assert_one_line_error_code, data_regions, random_bytes, Env, Op, Qcow2,
    Tmpfs, KIB, MIB,
};
use crate::sshd::Sshd;

const BIN: &str = env!("CARGO_BIN_EXE_imgsync");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Via {
    /// The built-in libssh2 client.
    Builtin,
    /// `-e "ssh ..."` (OpenSSH's client).
    External,
}

pub(crate) const BOTH: [Via; 2] = [Via::Builtin, Via::External];

/// A test's temp dir and its own sshd, or return after a SKIP line.
macro_rules! ssh_env {
    () => {{
        let env = qemu_env!();
        let Some(sshd) = Sshd::start() else { return };
        (env, sshd)
    }};
}

/// `ssh://127.0.0.1:PORT/abs/path` for a path in the test's dir.
pub(crate) fn url(sshd: &Sshd, path: &Path) -> String {
    format!("ssh://127.0.0.1:{}{}", sshd.port(), path.display())
}

/// The transport options for `via`, with `remote` as the remote imgsync.
pub(crate) fn ssh_args(sshd: &Sshd, via: Via, remote: &str) -> Vec<String> {
    let mut a = vec!["--remote-imgsync".to_string(), remote.to_string()];
    match via {
        Via::Builtin => {
            a.push("--known-hosts".into());
            a.push(sshd.known_hosts().display().to_string());
            a.push("-i".into());
            a.push(sshd.client_key().display().to_string());
            a.push("--ssh-config".into());
            a.push("/dev/null".into());
        }
        Via::External => {
            a.push("-e".into());
            a.push(sshd.ssh_command());
        }
    }
    a
}

/// imgsync in the test dir, blind to the real ~/.ssh and agent.
pub(crate) fn command(env: &Env, sshd: &Sshd, args: &[String]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args).current_dir(env.root());
    sshd.env(&mut cmd);
    cmd
}

/// Runs imgsync (see [`command`]) to the end.
pub(crate) fn run(env: &Env, sshd: &Sshd, args: &[String], envs: &[(&str, &str)]) -> Output {
    command(env, sshd, args)
        .envs(envs.iter().copied())
        .output()
        .expect("run imgsync")
}

/// Starts imgsync (see [`command`]) with its output captured.
pub(crate) fn spawn(env: &Env, sshd: &Sshd, args: &[String]) -> Child {
    command(env, sshd, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start imgsync")
}

fn convert(env: &Env, sshd: &Sshd, via: Via, extra: &[&str], src: &str, dst: &str) -> Output {
    let mut args = vec!["convert".to_string(), "-q".to_string()];
    args.extend(ssh_args(sshd, via, BIN));
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(src.to_string());
    args.push(dst.to_string());
    run(env, sshd, &args, &[])
}

pub(crate) fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn same(env: &Env, a: &Path, b: &Path) {
    let out = env.run(
        "qemu-img",
        &[
            "compare",
            &a.display().to_string(),
            &b.display().to_string(),
        ],
    );
    assert!(
        out.status.success(),
        "qemu-img compare {} {}: {}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

fn qcow2_check_clean(env: &Env, p: &Path) {
    let out = env.run("qemu-img", &["check", &p.display().to_string()]);
    assert!(
        out.status.success(),
        "qemu-img check {}: {}",
        p.display(),
        String::from_utf8_lossy(&out.stdout)
    );
}

fn format_of(env: &Env, p: &Path) -> String {
    let v = env.qemu_json(&["info", "--output=json", &p.display().to_string()]);
    v["format"].as_str().unwrap().to_string()
}

/// Files in `dir` (a failed transfer must leave none behind).
pub(crate) fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A 2 GiB qcow2 with data, written zeros, compressed clusters and holes;
/// returns its data bytes (allocated, non-zero).
fn source_qcow2(env: &Env, name: &str) -> u64 {
    env.create(name, Qcow2::new(2048 * MIB)).write(&[
        Op::Data(0, 3 * MIB),
        Op::Compressed(64 * MIB, 2 * MIB),
        Op::Pattern(0, 300 * MIB, MIB), // allocated zeros: not sent
        Op::Data(1024 * MIB + 4 * KIB, 5 * MIB),
        Op::Zero(1500 * MIB, 4 * MIB),
        Op::Data(2048 * MIB - 64 * KIB, 64 * KIB),
    ]);
    3 * MIB + 2 * MIB + 5 * MIB + 64 * KIB
}

pub(crate) fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bad JSON ({e}): {} / {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn push_and_pull_raw_and_qcow2_with_both_transports() {
    let (env, sshd) = ssh_env!();
    let data = source_qcow2(&env, "src.qcow2");
    let src = env.path("src.qcow2");
    env.qemu_img(&["convert", "-O", "raw", "src.qcow2", "src.raw"]);
    let src_raw = env.path("src.raw");
    let remote = env.path("remote");
    fs::create_dir(&remote).unwrap();
    for via in BOTH {
        let tag = format!("{via:?}");
        // Push qcow2 -> raw, with a JSON report.
        let dst = remote.join(format!("{tag}-pushed.raw"));
        let mut args = vec!["convert".to_string(), "-q".into()];
        args.extend(ssh_args(&sshd, via, BIN));
        args.extend(["-O", "raw", "--output", "json"].map(String::from));
        args.push(src.display().to_string());
        args.push(url(&sshd, &dst));
        let out = run(&env, &sshd, &args, &[]);
        ok(&out, &format!("{tag} push qcow2->raw"));
        let report = json(&out);
        same(&env, &src, &dst);
        assert_eq!(format_of(&env, &dst), "raw");
        assert!(
            data_regions(&dst) <= data,
            "{tag}: pushed raw not sparse: {} > {data}",
            data_regions(&dst)
        );
        // All allocated data is read (the qcow2's partly written clusters
        // too); only the non-zero data is sent.
        let read = report["bytes-read"].as_u64().unwrap();
        let zeros = report["zero-bytes"].as_u64().unwrap();
        assert!(read >= data + MIB, "{report}");
        assert_eq!(read - zeros, data, "{report}");
        assert_eq!(report["data-sent"].as_u64().unwrap(), data, "{report}");
        let wire = report["wire-bytes"].as_u64().unwrap();
        // Random data does not compress; the compressed clusters do.
        assert!(
            wire < data + 64 * KIB,
            "{tag}: {wire} bytes on the wire for {data}"
        );

        // Push raw -> qcow2 (compressed clusters), scp-free URL form.
        let dst = remote.join(format!("{tag}-pushed.qcow2"));
        ok(
            &convert(
                &env,
                &sshd,
                via,
                &["-O", "qcow2", "-c"],
                &src_raw.display().to_string(),
                &url(&sshd, &dst),
            ),
            &format!("{tag} push raw->qcow2"),
        );
        same(&env, &src, &dst);
        qcow2_check_clean(&env, &dst);
        assert_eq!(format_of(&env, &dst), "qcow2");

        // Pull qcow2 -> raw and raw -> qcow2.
        let local = env.path(&format!("{tag}-pulled.raw"));
        ok(
            &convert(
                &env,
                &sshd,
                via,
                &["-O", "raw"],
                &url(&sshd, &remote.join(format!("{tag}-pushed.qcow2"))),
                &local.display().to_string(),
            ),
            &format!("{tag} pull qcow2->raw"),
        );
        same(&env, &src, &local);
        assert!(data_regions(&local) <= data, "{tag}: pulled raw not sparse");
        let local = env.path(&format!("{tag}-pulled.qcow2"));
        ok(
            &convert(
                &env,
                &sshd,
                via,
                &["-O", "qcow2"],
                &url(&sshd, &remote.join(format!("{tag}-pushed.raw"))),
                &local.display().to_string(),
            ),
            &format!("{tag} pull raw->qcow2"),
        );
        same(&env, &src, &local);
        qcow2_check_clean(&env, &local);
    }
}

#[test]
fn scp_style_location_uses_the_default_port_from_ssh_config() {
    let (env, sshd) = ssh_env!();
    source_qcow2(&env, "src.qcow2");
    // host:path has no port: it comes from the config file (built-in) or
    // from `ssh -p` (external).
    let config = env.path("ssh_config");
    fs::write(
        &config,
        format!(
            "Host backup\n  HostName 127.0.0.1\n  Port {}\n  IdentityFile {}\n",
            sshd.port(),
            sshd.client_key().display()
        ),
    )
    .unwrap();
    let dst = env.path("scp.raw");
    let out = run(
        &env,
        &sshd,
        &[
            "convert".into(),
            "-q".into(),
            "--remote-imgsync".into(),
            BIN.into(),
            "--ssh-config".into(),
            config.display().to_string(),
            "--known-hosts".into(),
            sshd.known_hosts().display().to_string(),
            "src.qcow2".into(),
            format!("backup:{}", dst.display()),
        ],
        &[],
    );
    ok(&out, "scp-style push through a config Host entry");
    same(&env, &env.path("src.qcow2"), &dst);
    let mut args = vec!["convert".to_string(), "-q".into()];
    args.extend(["--remote-imgsync", BIN, "-e"].map(String::from));
    args.push(format!("{} -p {}", sshd.ssh_command(), sshd.port()));
    args.push("src.qcow2".into());
    args.push(format!("127.0.0.1:{}", env.path("scp2.raw").display()));
    ok(
        &run(&env, &sshd, &args, &[]),
        "scp-style push with -e 'ssh -p'",
    );
    same(&env, &env.path("src.qcow2"), &env.path("scp2.raw"));
}

#[test]
fn unknown_host_key_is_refused_unless_accept_new() {
    let (env, sshd) = ssh_env!();
    source_qcow2(&env, "src.qcow2");
    let empty = env.path("empty_known_hosts");
    fs::write(&empty, "").unwrap();
    let dst = env.path("out.raw");
    let args = |extra: &[&str]| {
        let mut a = vec!["convert".to_string()];
        a.extend(
            [
                "--remote-imgsync",
                BIN,
                "--known-hosts",
                &empty.display().to_string(),
                "-i",
                &sshd.client_key().display().to_string(),
                "--ssh-config",
                "/dev/null",
            ]
            .map(String::from),
        );
        a.extend(extra.iter().map(|s| s.to_string()));
        a.push("src.qcow2".into());
        a.push(url(&sshd, &dst));
        a
    };
    let out = run(&env, &sshd, &args(&[]), &[]);
    let line = assert_one_line_error(&out, "unknown host key");
    assert!(line.contains("127.0.0.1"), "{line}");
    assert!(line.contains("--accept-new-host-key"), "{line}");
    assert!(!dst.exists());
    // accept-new adds the key; then it is known.
    ok(
        &run(&env, &sshd, &args(&["--accept-new-host-key"]), &[]),
        "accept new",
    );
    same(&env, &env.path("src.qcow2"), &dst);
    let known = fs::read_to_string(&empty).unwrap();
    assert!(
        known.contains(&format!("[127.0.0.1]:{}", sshd.port())),
        "{known}"
    );
    fs::remove_file(&dst).unwrap();
    ok(&run(&env, &sshd, &args(&[]), &[]), "key now known");

    // External: OpenSSH's own StrictHostKeyChecking refuses it.
    let mut a = vec!["convert".to_string(), "--remote-imgsync".into(), BIN.into()];
    a.push("-e".into());
    a.push(
        sshd.ssh_command()
            .replace(&sshd.known_hosts().display().to_string(), "/dev/null"),
    );
    a.push("src.qcow2".into());
    a.push(url(&sshd, &env.path("ext.raw")));
    let out = run(&env, &sshd, &a, &[]);
    let line = assert_one_line_error(&out, "external unknown host key");
    assert!(line.contains("127.0.0.1"), "{line}");
    assert!(!env.path("ext.raw").exists());
}

#[test]
fn changed_host_key_is_always_refused() {
    let (env, sshd) = ssh_env!();
    source_qcow2(&env, "src.qcow2");
    let bad = sshd.bad_known_hosts();
    let before = fs::read_to_string(&bad).unwrap();
    for extra in [&[][..], &["--accept-new-host-key"][..]] {
        let mut a = vec!["convert".to_string()];
        a.extend(
            [
                "--remote-imgsync",
                BIN,
                "--known-hosts",
                &bad.display().to_string(),
                "-i",
                &sshd.client_key().display().to_string(),
                "--ssh-config",
                "/dev/null",
            ]
            .map(String::from),
        );
        a.extend(extra.iter().map(|s| s.to_string()));
        a.push("src.qcow2".into());
        a.push(url(&sshd, &env.path("out.raw")));
        let out = run(&env, &sshd, &a, &[]);
        let line = assert_one_line_error(&out, "changed host key");
        assert!(line.to_lowercase().contains("changed"), "{line}");
        assert!(!env.path("out.raw").exists());
    }
    assert_eq!(
        fs::read_to_string(&bad).unwrap(),
        before,
        "known_hosts modified"
    );
    // External.
    let mut a = vec!["convert".to_string(), "--remote-imgsync".into(), BIN.into()];
    a.push("-e".into());
    a.push(sshd.ssh_command().replace(
        &sshd.known_hosts().display().to_string(),
        &bad.display().to_string(),
    ));
    a.push("src.qcow2".into());
    a.push(url(&sshd, &env.path("out.raw")));
    let out = run(&env, &sshd, &a, &[]);
    let line = assert_one_line_error(&out, "external changed host key");
    assert!(line.contains("127.0.0.1"), "{line}");
    assert!(!env.path("out.raw").exists());
}

#[test]
fn wrong_key_is_a_clear_auth_error() {
    let (env, sshd) = ssh_env!();
    source_qcow2(&env, "src.qcow2");
    for via in BOTH {
        let mut a = vec!["convert".to_string()];
        a.extend(ssh_args(&sshd, via, BIN).into_iter().map(|s| {
            s.replace(
                &sshd.client_key().display().to_string(),
                &sshd.wrong_key().display().to_string(),
            )
        }));
        a.push("src.qcow2".into());
        a.push(url(&sshd, &env.path("out.raw")));
        let out = run(&env, &sshd, &a, &[]);
        let line = assert_one_line_error(&out, &format!("{via:?} wrong key"));
        assert!(line.contains("127.0.0.1"), "{via:?}: {line}");
        assert!(
            line.contains("authentication failed") || line.contains("Permission denied"),
            "{via:?}: {line}"
        );
        assert!(!env.path("out.raw").exists());
    }
}

#[test]
fn missing_remote_imgsync_says_how_to_fix_it() {
    let (env, sshd) = ssh_env!();
    source_qcow2(&env, "src.qcow2");
    for via in BOTH {
        let mut a = vec!["convert".to_string()];
        a.extend(ssh_args(&sshd, via, "/nonexistent/imgsync"));
        a.push("src.qcow2".into());
        a.push(url(&sshd, &env.path("out.raw")));
        let out = run(&env, &sshd, &a, &[]);
        let line = assert_one_line_error(&out, &format!("{via:?} missing imgsync"));
        assert!(line.contains("not found"), "{via:?}: {line}");
        assert!(line.contains("--remote-imgsync"), "{via:?}: {line}");
    }
}

#[test]
fn remote_errors_name_the_host_and_path() {
    let (env, sshd) = ssh_env!();
    source_qcow2(&env, "src.qcow2");
    let ro = env.path("ro");
    fs::create_dir(&ro).unwrap();
    for via in BOTH {
        // Directory missing.
        let mut a = vec!["convert".to_string()];
        a.extend(ssh_args(&sshd, via, BIN));
        a.push("src.qcow2".into());
        a.push(url(&sshd, Path::new("/nonexistent-dir/out.raw")));
        let line =
            assert_one_line_error(&run(&env, &sshd, &a, &[]), &format!("{via:?} missing dir"));
        assert!(
            line.contains("127.0.0.1") && line.contains("/nonexistent-dir/out.raw"),
            "{via:?}: {line}"
        );
        // Not writable: a path under a regular file.
        let mut a = vec!["convert".to_string()];
        a.extend(ssh_args(&sshd, via, BIN));
        a.push("src.qcow2".into());
        a.push(url(&sshd, &env.path("src.qcow2").join("x.raw")));
        let line = assert_one_line_error(&run(&env, &sshd, &a, &[]), &format!("{via:?} not a dir"));
        assert!(line.contains("x.raw"), "{via:?}: {line}");
        // Pull of a missing remote file.
        let mut a = vec!["convert".to_string()];
        a.extend(ssh_args(&sshd, via, BIN));
        a.push(url(&sshd, &env.path("missing.qcow2")));
        a.push("local.raw".into());
        let line =
            assert_one_line_error(&run(&env, &sshd, &a, &[]), &format!("{via:?} pull missing"));
        assert!(
            line.contains("127.0.0.1") && line.contains("missing.qcow2"),
            "{via:?}: {line}"
        );
        assert!(!env.path("local.raw").exists());
    }
}

#[test]
fn remote_filesystem_too_small_fails_before_writing() {
    let (env, sshd) = ssh_env!();
    let Some(_fs) = Tmpfs::mount(env.path("small"), "8M") else {
        return;
    };
    // 16 MiB of incompressible data into an 8 MiB file system.
    let src = env.path("big.raw");
    let f = fs::File::create(&src).unwrap();
    for i in 0..16u64 {
        f.write_all_at(&random_bytes(MIB as usize, i, false), i * 64 * MIB)
            .unwrap();
    }
    f.set_len(2 << 30).unwrap();
    for via in BOTH {
        let mut a = vec!["convert".to_string()];
        a.extend(ssh_args(&sshd, via, BIN));
        a.push("big.raw".into());
        a.push(url(&sshd, &env.path("small/out.raw")));
        let out = run(&env, &sshd, &a, &[]);
        let line = assert_one_line_error(&out, &format!("{via:?} small fs"));
        assert!(
            line.contains("127.0.0.1") && line.contains("out.raw") && line.contains("free"),
            "{via:?}: {line}"
        );
        assert!(entries(&env.path("small")).is_empty());
    }
}

/// A remote imgsync that records its PID, then runs the real one.
pub(crate) fn pid_script(sshd: &Sshd, name: &str, env_prefix: &str) -> (PathBuf, PathBuf) {
    let pidfile = sshd.path(&format!("{name}.pid"));
    let script = sshd.script(
        name,
        &format!(
            "echo $$ > {}\n{env_prefix} exec {BIN} \"$@\"",
            pidfile.display()
        ),
    );
    (script, pidfile)
}

/// Bytes the process has read (from /proc/PID/io).
pub(crate) fn rchar(pid: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("rchar: ")
                    .map(|v| v.trim().parse().unwrap_or(0))
            })
        })
        .unwrap_or(0)
}

pub(crate) fn wchar(pid: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("wchar: ")
                    .map(|v| v.trim().parse().unwrap_or(0))
            })
        })
        .unwrap_or(0)
}

/// Incompressible data, so a transfer takes long enough to be cut.
fn big_source(env: &Env, name: &str, mib: u64) {
    let f = fs::File::create(env.path(name)).unwrap();
    for i in 0..mib / 4 {
        f.write_all_at(&random_bytes(4 * MIB as usize, i, false), i * 8 * MIB)
            .unwrap();
    }
    f.set_len(4 << 30).unwrap();
}

#[test]
fn killed_receiver_or_sender_mid_transfer_leaves_no_destination() {
    let (env, sshd) = ssh_env!();
    big_source(&env, "big.raw", 256);
    let remote = env.path("remote");
    fs::create_dir(&remote).unwrap();
    for via in BOTH {
        // Push: kill the remote receiver once it has read 32 MiB.
        let (script, pidfile) = pid_script(&sshd, &format!("push-{via:?}"), "");
        let mut a = vec![
            "convert".to_string(),
            "-q".into(),
            "--compress-level".into(),
            "0".into(),
        ];
        a.extend(ssh_args(&sshd, via, &script.display().to_string()));
        a.push("big.raw".into());
        a.push(url(&sshd, &remote.join("out.raw")));
        let child = spawn(&env, &sshd, &a);
        let pid = wait_for_pid(&pidfile);
        wait_until(|| rchar(&pid) > 32 * MIB, "receiver reads 32 MiB");
        Command::new("kill").args(["-KILL", &pid]).status().unwrap();
        let out = child.wait_with_output().unwrap();
        let line = assert_one_line_error(&out, &format!("{via:?} receiver killed"));
        assert!(line.contains("127.0.0.1"), "{via:?}: {line}");
        assert!(
            entries(&remote).is_empty(),
            "{via:?}: {:?}",
            entries(&remote)
        );

        // Pull: kill the remote sender once it has written 32 MiB.
        let (script, pidfile) = pid_script(&sshd, &format!("pull-{via:?}"), "");
        let mut a = vec![
            "convert".to_string(),
            "-q".into(),
            "--compress-level".into(),
            "0".into(),
        ];
        a.extend(ssh_args(&sshd, via, &script.display().to_string()));
        a.push(url(&sshd, &env.path("big.raw")));
        a.push("remote/pulled.raw".into());
        let child = spawn(&env, &sshd, &a);
        let pid = wait_for_pid(&pidfile);
        wait_until(|| wchar(&pid) > 32 * MIB, "sender writes 32 MiB");
        Command::new("kill").args(["-KILL", &pid]).status().unwrap();
        let out = child.wait_with_output().unwrap();
        let line = assert_one_line_error(&out, &format!("{via:?} sender killed"));
        assert!(line.contains("127.0.0.1"), "{via:?}: {line}");
        assert!(
            entries(&remote).is_empty(),
            "{via:?}: {:?}",
            entries(&remote)
        );
    }
}

pub(crate) fn wait_for_pid(pidfile: &Path) -> String {
    let mut pid = String::new();
    wait_until(
        || {
            pid = fs::read_to_string(pidfile)
                .unwrap_or_default()
                .trim()
                .to_string();
            !pid.is_empty()
        },
        "remote imgsync starts",
    );
    pid
}

pub(crate) fn wait_until(mut f: impl FnMut() -> bool, what: &str) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(60), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn corrupted_frame_is_detected_and_nothing_is_renamed_into_place() {
    let (env, sshd) = ssh_env!();
    big_source(&env, "src.raw", 16);
    let remote = env.path("remote");
    fs::create_dir(&remote).unwrap();
    for via in BOTH {
        // Push: the client corrupts its 4th frame (a CHUNK).
        let mut a = vec!["convert".to_string()];
        a.extend(ssh_args(&sshd, via, BIN));
        a.push("src.raw".into());
        a.push(url(&sshd, &remote.join("out.raw")));
        let out = run(&env, &sshd, &a, &[("IMGSYNC_TEST_CORRUPT_FRAME", "4")]);
        let line = assert_one_line_error(&out, &format!("{via:?} corrupted push"));
        assert!(line.contains("checksum"), "{via:?}: {line}");
        assert!(entries(&remote).is_empty(), "{via:?}");

        // Pull: the remote sender corrupts its 3rd frame.
        let script = sshd.script(
            &format!("corrupt-{via:?}"),
            &format!("IMGSYNC_TEST_CORRUPT_FRAME=3 exec {BIN} \"$@\""),
        );
        let mut a = vec!["convert".to_string()];
        a.extend(ssh_args(&sshd, via, &script.display().to_string()));
        a.push(url(&sshd, &env.path("src.raw")));
        a.push("remote/pulled.raw".into());
        let line = assert_one_line_error(
            &run(&env, &sshd, &a, &[]),
            &format!("{via:?} corrupted pull"),
        );
        assert!(line.contains("checksum"), "{via:?}: {line}");
        assert!(entries(&remote).is_empty(), "{via:?}");
    }
}

/// A valid HELLO frame as imgsync sends it.
fn hello() -> Vec<u8> {
    use imgsync::protocol::msg::Hello;
    use imgsync::protocol::Message;
    let m = Message::Hello(Hello::ours());
    imgsync::protocol::frame::build(m.kind(), |v| m.encode(v))
}

#[test]
fn oversized_length_from_a_peer_is_refused() {
    let env = qemu_env!();
    // A client that sends HELLO, then a frame header claiming 4 GiB.
    let mut bytes = hello();
    bytes.extend_from_slice(&[2, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
    let mut child = Command::new(BIN)
        .arg("serve")
        .current_dir(env.root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&bytes).unwrap();
    let t = Instant::now();
    let out = child.wait_with_output().unwrap();
    assert!(t.elapsed() < Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exceeds the limit"), "{err}");

    // A server that answers a pull with HELLO and an oversized frame.
    let reply = env.path("reply.bin");
    fs::write(&reply, &bytes).unwrap();
    let rsh = env.path("evil-rsh");
    fs::write(
        &rsh,
        format!("#!/bin/sh\ncat {}\ncat > /dev/null\n", reply.display()),
    )
    .unwrap();
    Command::new("chmod").arg("+x").arg(&rsh).status().unwrap();
    let out = env.imgsync(&[
        "convert",
        "-e",
        &rsh.display().to_string(),
        "evil:/x.raw",
        "pulled.raw",
    ]);
    let line = assert_one_line_error(&out, "evil server");
    assert!(
        line.contains("evil") && line.contains("exceeds the limit"),
        "{line}"
    );
    assert!(!env.path("pulled.raw").exists());
}

#[test]
fn streams_through_a_pipe() {
    let env = qemu_env!();
    source_qcow2(&env, "src.qcow2");
    let sh = format!(
        "{BIN} convert src.qcow2 - | {BIN} convert -O raw - piped.raw && \
         {BIN} convert -O raw src.qcow2 - | {BIN} convert -O qcow2 -c - piped.qcow2"
    );
    let out = Command::new("sh")
        .args(["-c", &sh])
        .current_dir(env.root())
        .output()
        .unwrap();
    ok(&out, "pipe");
    same(&env, &env.path("src.qcow2"), &env.path("piped.raw"));
    same(&env, &env.path("src.qcow2"), &env.path("piped.qcow2"));
    qcow2_check_clean(&env, &env.path("piped.qcow2"));
    // A truncated stream writes nothing.
    let out = Command::new("sh")
        .args([
            "-c",
            &format!(
                "{BIN} convert src.qcow2 - 2>sender.err | head -c 100000 | {BIN} convert - cut.raw"
            ),
        ])
        .current_dir(env.root())
        .output()
        .unwrap();
    let line = assert_one_line_error(&out, "truncated stream");
    assert!(line.starts_with("imgsync: -: "), "{line}");
    assert!(!env.path("cut.raw").exists());
    // The sender whose reader went away says so too (never a silent 0).
    let sender = std::fs::read_to_string(env.path("sender.err")).unwrap();
    assert!(
        sender.starts_with("imgsync: -: writing the stream: "),
        "{sender}"
    );
}

#[test]
fn info_map_and_check_of_a_remote_image_print_what_they_print_locally() {
    let (env, sshd) = ssh_env!();
    source_qcow2(&env, "src.qcow2");
    let src = env.path("src.qcow2");
    for via in BOTH {
        for (cmd, out) in [
            ("info", "json"),
            ("map", "json"),
            ("map", "human"),
            ("check", "human"),
        ] {
            let local = env.imgsync(&[cmd, "--output", out, &src.display().to_string()]);
            let mut a = vec![cmd.to_string(), "--output".into(), out.into()];
            a.extend(ssh_args(&sshd, via, BIN));
            a.push(url(&sshd, &src));
            let remote = run(&env, &sshd, &a, &[]);
            assert_eq!(remote.status.code(), local.status.code(), "{via:?} {cmd}");
            assert_eq!(
                String::from_utf8_lossy(&remote.stdout),
                String::from_utf8_lossy(&local.stdout),
                "{via:?} {cmd} {out}"
            );
        }
        let mut a = vec!["info".to_string()];
        a.extend(ssh_args(&sshd, via, BIN));
        a.push(url(&sshd, &env.path("missing.qcow2")));
        let line = assert_one_line_error(&run(&env, &sshd, &a, &[]), "remote info, missing");
        assert!(
            line.contains("127.0.0.1") && line.contains("missing.qcow2"),
            "{line}"
        );
    }
}

/// `check host:IMG` exits as qemu-img check (0 clean, 2 corruption, 3 only
/// leaks, 1 not completed) and prints what a local check prints, its stderr
/// line naming the host and the image; `info` and `check` of an overlay
/// whose backing file is gone work without -f.
#[test]
fn check_of_a_remote_image_exits_as_qemu_img_check() {
    let (env, sshd) = ssh_env!();
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    env.create("clean.qcow2", Qcow2::new(16 * MIB))
        .write(&[Op::Data(0, 128 * KIB)]);
    let b = fs::read(env.path("clean.qcow2")).unwrap();
    let l1 = be64(&b, 40);
    let l2 = (be64(&b, l1 as usize) & 0x00ff_ffff_ffff_fe00) as usize;
    // Leak: the second data cluster unhooked from its L2 table.
    let mut leak = b.clone();
    leak[l2 + 8..l2 + 16].fill(0);
    fs::write(env.path("leak.qcow2"), &leak).unwrap();
    // Corruption: the first data cluster pointed at the L1 table.
    let mut corrupt = b.clone();
    corrupt[l2..l2 + 8].copy_from_slice(&(l1 | 1 << 63).to_be_bytes());
    fs::write(env.path("corrupt.qcow2"), &corrupt).unwrap();
    env.create("base.qcow2", Qcow2::new(16 * MIB));
    env.create("top.qcow2", Qcow2::overlay("base.qcow2", "qcow2"));
    fs::remove_file(env.path("base.qcow2")).unwrap();
    let host = format!("127.0.0.1:{}", sshd.port());
    for via in BOTH {
        for (img, code) in [
            ("clean.qcow2", 0),
            ("leak.qcow2", 3),
            ("corrupt.qcow2", 2),
            ("top.qcow2", 0),
        ] {
            let p = env.path(img);
            for out in ["human", "json"] {
                let local = env.imgsync(&["check", "--output", out, &p.display().to_string()]);
                assert_eq!(local.status.code(), Some(code), "local check {img}");
                let mut a = vec!["check".to_string(), "--output".into(), out.into()];
                a.extend(ssh_args(&sshd, via, BIN));
                a.push(url(&sshd, &p));
                let remote = run(&env, &sshd, &a, &[]);
                let what = format!("{via:?} check {img} --output {out}");
                assert_eq!(remote.status.code(), Some(code), "{what}");
                assert_eq!(
                    String::from_utf8_lossy(&remote.stdout),
                    String::from_utf8_lossy(&local.stdout),
                    "{what}"
                );
                let local_err = String::from_utf8_lossy(&local.stderr);
                let remote_err = String::from_utf8_lossy(&remote.stderr);
                if code == 0 {
                    assert_eq!(remote_err, "", "{what}");
                } else {
                    assert!(local_err.contains("check found"), "{what}: {local_err}");
                    // The image named as the command line spelled it.
                    assert_eq!(
                        remote_err,
                        local_err.replacen(
                            &format!("imgsync: {}", p.display()),
                            &format!("imgsync: {}", url(&sshd, &p)),
                            1
                        ),
                        "{what}"
                    );
                }
            }
        }
        // Cannot be opened: 1, one line naming the host and the image.
        let mut a = vec!["check".to_string()];
        a.extend(ssh_args(&sshd, via, BIN));
        a.push(url(&sshd, &env.path("missing.qcow2")));
        let line = assert_one_line_error_code(&run(&env, &sshd, &a, &[]), "remote check", 1);
        assert!(
            line.contains(&host) && line.contains("missing.qcow2"),
            "{line}"
        );
        // The overlay's backing file is shown, not opened.
        let mut a = vec!["info".to_string(), "--output".into(), "json".into()];
        a.extend(ssh_args(&sshd, via, BIN));
        a.push(url(&sshd, &env.path("top.qcow2")));
        let info = json(&run(&env, &sshd, &a, &[]));
        assert_eq!(info["backing-filename"], "base.qcow2", "{via:?}: {info}");
    }
}

#[test]
fn compare_with_a_remote_image() {
    let (env, sshd) = ssh_env!();
    source_qcow2(&env, "src.qcow2");
    env.qemu_img(&["convert", "-O", "raw", "src.qcow2", "same.raw"]);
    env.qemu_img(&["convert", "-O", "raw", "src.qcow2", "other.raw"]);
    // One byte inside a former hole, one inside data.
    env.qemu_io("raw", "other.raw", &[Op::Pattern(9, 700 * MIB + 3, 1)]);
    let src = env.path("src.qcow2");
    for via in BOTH {
        let cmp = |a: String, b: String| {
            let mut args = vec!["compare".to_string()];
            args.extend(ssh_args(&sshd, via, BIN));
            args.push(a);
            args.push(b);
            run(&env, &sshd, &args, &[])
        };
        let out = cmp(src.display().to_string(), url(&sshd, &env.path("same.raw")));
        assert_eq!(out.status.code(), Some(0), "{via:?}: {}", ok(&out, "same"));
        let out = cmp(url(&sshd, &env.path("same.raw")), src.display().to_string());
        assert_eq!(out.status.code(), Some(0), "{via:?}");
        for (a, b) in [
            (
                src.display().to_string(),
                url(&sshd, &env.path("other.raw")),
            ),
            (
                url(&sshd, &env.path("other.raw")),
                src.display().to_string(),
            ),
        ] {
            let out = cmp(a, b);
            assert_eq!(out.status.code(), Some(1), "{via:?}");
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                stdout.contains(&format!("offset {}!", 700 * MIB + 3)),
                "{via:?}: {stdout}"
            );
        }
        let out = cmp(src.display().to_string(), url(&sshd, &env.path("nope.raw")));
        let line = assert_one_line_error(&out, "compare, missing remote");
        assert!(
            line.contains("127.0.0.1") && line.contains("nope.raw"),
            "{line}"
        );
    }
}
