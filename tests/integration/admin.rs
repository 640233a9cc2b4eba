//! SSH as admins run it, against real sshds: an ssh_config with a jump
//! host is handed to OpenSSH (never silently bypassed), a backup host's
//! key forces `imgsync serve --restrict DIR [--read-only]`, and
//! `--bwlimit` caps the wire rate both ways.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use crate::common::{assert_one_line_error, random_bytes, Env, MIB};
use crate::remote::{ok, run, same, ssh_args, url, Via};
use crate::sshd::Sshd;

const BIN: &str = env!("CARGO_BIN_EXE_imgsync");

macro_rules! ssh_env {
    () => {{
        let env = qemu_env!();
        let Some(sshd) = Sshd::start() else { return };
        (env, sshd)
    }};
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A raw image of `len` random (incompressible) bytes.
fn random_raw(env: &Env, name: &str, len: usize, seed: u64) -> std::path::PathBuf {
    let p = env.path(name);
    fs::write(&p, random_bytes(len, seed, false)).unwrap();
    p
}

/// Built-in transport options without a config file of their own.
fn builtin(sshd: &Sshd) -> Vec<String> {
    ssh_args(sshd, Via::Builtin, BIN)
}

fn args(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| s.to_string()).collect()
}

/// The ssh_config of the jump test: `viajump` is the target behind
/// `jumphost`; both log in with their own client key and are checked
/// against one known_hosts file.
fn jump_config(env: &Env, target: &Sshd, jump: &Sshd) -> String {
    let known = env.path("jump_known_hosts");
    fs::write(
        &known,
        format!("{}{}", target.known_hosts_line(), jump.known_hosts_line()),
    )
    .unwrap();
    let common = format!(
        "  HostName 127.0.0.1\n  IdentityFile {}\n  IdentityFile {}\n  IdentitiesOnly yes\n  UserKnownHostsFile {}\n  StrictHostKeyChecking yes\n  BatchMode yes\n",
        target.client_key().display(),
        jump.client_key().display(),
        known.display()
    );
    format!(
        "Host viajump\n  Port {}\n  ProxyJump jumphost\n{common}\nHost jumphost\n  Port {}\n{common}",
        target.port(),
        jump.port()
    )
}

#[test]
fn proxy_jump_is_handed_to_openssh_and_goes_through_the_jump_host() {
    let (env, target) = ssh_env!();
    let Some(jump) = Sshd::start_with("LogLevel VERBOSE\n") else {
        return;
    };
    let src = random_raw(&env, "src.raw", 3 * MIB as usize, 1);
    let config = env.path("ssh_config");
    fs::write(&config, jump_config(&env, &target, &jump)).unwrap();

    // --ssh-config FILE: the built-in client hands the host to OpenSSH,
    // says so in one line, and the transfer goes through the jump host.
    let dst = env.path("out1.raw");
    let mut a = args(&["convert", "--remote-imgsync", BIN, "--ssh-config"]);
    a.push(config.display().to_string());
    a.push(src.display().to_string());
    a.push(format!("viajump:{}", dst.display()));
    let out = run(&env, &target, &a, &[]);
    ok(&out, "push through ProxyJump");
    same(&env, &src, &dst);
    let said = stderr(&out);
    assert_eq!(said.lines().count(), 1, "{said}");
    assert!(
        said.starts_with("imgsync: viajump: ProxyJump jumphost (")
            && said.contains(&format!("{} line 3)", config.display()))
            && said.contains("OpenSSH"),
        "{said}"
    );
    let log = jump.log();
    assert!(
        log.contains("Accepted publickey"),
        "the jump host saw no login: {log}"
    );

    // -q: not a word.
    let dst = env.path("out2.raw");
    let mut a = args(&["convert", "-q", "--remote-imgsync", BIN, "--ssh-config"]);
    a.push(config.display().to_string());
    a.push(src.display().to_string());
    a.push(format!("viajump:{}", dst.display()));
    let out = run(&env, &target, &a, &[]);
    ok(&out, "quiet push through ProxyJump");
    assert_eq!(stderr(&out), "");
    same(&env, &src, &dst);

    // The default path: ~/.ssh/config (HOME is the test's), pulled back.
    let ssh_dir = target.home().join(".ssh");
    fs::create_dir_all(&ssh_dir).unwrap();
    fs::copy(&config, ssh_dir.join("config")).unwrap();
    let back = env.path("back.raw");
    let mut a = args(&["convert", "-q", "--remote-imgsync", BIN]);
    a.push(format!("viajump:{}", dst.display()));
    a.push(back.display().to_string());
    ok(&run(&env, &target, &a, &[]), "pull through ~/.ssh/config");
    same(&env, &src, &back);

    // No ssh program: refused, naming the setting; nothing written.
    let empty = env.path("empty-bin");
    fs::create_dir_all(&empty).unwrap();
    let dst = env.path("out3.raw");
    let mut a = args(&["convert", "--remote-imgsync", BIN]);
    a.push(src.display().to_string());
    a.push(format!("viajump:{}", dst.display()));
    let out = run(
        &env,
        &target,
        &a,
        &[("PATH", empty.display().to_string().as_str())],
    );
    let line = assert_one_line_error(&out, "no ssh program");
    assert!(
        line.starts_with("imgsync: viajump: ")
            && line.contains("ProxyJump jumphost needs OpenSSH's ssh, which is not installed"),
        "{line}"
    );
    assert!(!dst.exists());
}

#[test]
fn strict_host_key_checking_no_in_the_config_is_refused() {
    let (env, sshd) = ssh_env!();
    let src = random_raw(&env, "src.raw", 64 * 1024, 2);
    let config = env.path("ssh_config");
    fs::write(&config, "Host *\n  StrictHostKeyChecking no\n").unwrap();
    let mut a = args(&["convert", "--remote-imgsync", BIN, "--ssh-config"]);
    a.push(config.display().to_string());
    a.extend(args(&["-i", &sshd.client_key().display().to_string()]));
    a.push(src.display().to_string());
    a.push(url(&sshd, &env.path("out.raw")));
    let out = run(&env, &sshd, &a, &[]);
    let line = assert_one_line_error(&out, "StrictHostKeyChecking no");
    assert!(
        line.contains("StrictHostKeyChecking no is refused") && line.contains("line 2"),
        "{line}"
    );
    assert!(!env.path("out.raw").exists());
}

/// A backup host's layout: DIR with a subdirectory, a file outside DIR,
/// and symlinks inside DIR that lead out.
struct Backup {
    dir: std::path::PathBuf,
    outside: std::path::PathBuf,
}

fn backup_dir(env: &Env) -> Backup {
    let dir = env.path("srv/backup");
    fs::create_dir_all(dir.join("sub")).unwrap();
    let outside = env.path("outside");
    fs::create_dir_all(&outside).unwrap();
    fs::write(
        outside.join("secret.raw"),
        random_bytes(64 * 1024, 9, false),
    )
    .unwrap();
    symlink(outside.join("secret.raw"), dir.join("link-out.raw")).unwrap();
    symlink("../../outside", dir.join("dir-out")).unwrap();
    Backup { dir, outside }
}

/// imgsync against a key that forces `serve ARGS`: the client's own
/// remote command (`--remote-imgsync /nonexistent`) is never run.
fn forced(env: &Env, sshd: &Sshd, cmd: &[&str], extra: &[&str]) -> Output {
    let mut a = vec![cmd[0].to_string()];
    a.extend(ssh_args(sshd, Via::Builtin, "/nonexistent/imgsync"));
    a.extend(args(extra));
    a.extend(args(&cmd[1..]));
    run(env, sshd, &a, &[])
}

fn at(sshd: &Sshd, path: &str) -> String {
    format!("ssh://127.0.0.1:{}{}", sshd.port(), path)
}

/// `127.0.0.1:PORT:PATH` is not a form; a relative remote path is
/// `host:PATH` with the port in ssh_config, so relative names go through
/// an alias.
fn alias_config(env: &Env, sshd: &Sshd) -> String {
    let config = env.path("alias_config");
    fs::write(
        &config,
        format!(
            "Host backup\n  HostName 127.0.0.1\n  Port {}\n",
            sshd.port()
        ),
    )
    .unwrap();
    config.display().to_string()
}

#[test]
fn forced_restrict_keeps_every_path_inside_dir() {
    let (env, sshd) = ssh_env!();
    let b = backup_dir(&env);
    sshd.force_command(&format!("{BIN} serve --restrict {}", b.dir.display()));
    let src = random_raw(&env, "src.raw", 2 * MIB as usize, 3);
    let s = src.display().to_string();

    // Inside DIR: an absolute path under it, and a relative one (from DIR).
    let out = forced(
        &env,
        &sshd,
        &[
            "convert",
            &s,
            &at(&sshd, &b.dir.join("vm1.raw").display().to_string()),
        ],
        &[],
    );
    ok(&out, "push into DIR");
    same(&env, &src, &b.dir.join("vm1.raw"));
    let cfg = alias_config(&env, &sshd);
    let mut a = vec!["sync".to_string()];
    a.extend(ssh_args(&sshd, Via::Builtin, "/nonexistent/imgsync"));
    a.pop();
    a.pop();
    a.extend(args(&["--ssh-config", &cfg, &s, "backup:sub/vm2.raw"]));
    ok(&run(&env, &sshd, &a, &[]), "sync push, relative to DIR");
    same(&env, &src, &b.dir.join("sub/vm2.raw"));
    // The hash cache lies beside DST, inside DIR.
    assert!(b.dir.join("sub/.vm2.raw.imgsync-hashes").exists());
    // Pull back, and a remote info.
    let back = env.path("back.raw");
    let out = forced(
        &env,
        &sshd,
        &[
            "convert",
            &at(&sshd, &b.dir.join("sub/vm2.raw").display().to_string()),
            &back.display().to_string(),
        ],
        &[],
    );
    ok(&out, "pull from DIR");
    same(&env, &src, &back);

    // Escapes: .., an absolute path elsewhere, a symlink inside DIR that
    // leads out (file or directory), both ways.
    let escapes = [
        format!("{}/../../outside/new.raw", b.dir.display()),
        b.outside.join("new.raw").display().to_string(),
        b.dir.join("link-out.raw").display().to_string(),
        b.dir.join("dir-out/new.raw").display().to_string(),
    ];
    for path in &escapes {
        let out = forced(&env, &sshd, &["convert", &s, &at(&sshd, path)], &[]);
        let line = assert_one_line_error(&out, &format!("push to {path}"));
        assert!(
            line.contains(&format!("{path}: refused: outside {}", b.dir.display())),
            "{line}"
        );
        let out = forced(&env, &sshd, &["sync", &s, &at(&sshd, path)], &[]);
        let line = assert_one_line_error(&out, &format!("sync to {path}"));
        assert!(line.contains("refused: outside"), "{line}");
    }
    for path in [&escapes[0], &escapes[2]] {
        let path = path.replace("new.raw", "secret.raw");
        let out = forced(
            &env,
            &sshd,
            &[
                "convert",
                &at(&sshd, &path),
                &env.path("stolen.raw").display().to_string(),
            ],
            &[],
        );
        let line = assert_one_line_error(&out, &format!("pull of {path}"));
        assert!(line.contains("refused: outside"), "{line}");
        assert!(!env.path("stolen.raw").exists());
    }
    let mut listing: Vec<_> = fs::read_dir(&b.outside)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    listing.sort();
    assert_eq!(listing, ["secret.raw"], "nothing written outside DIR");

    // A qcow2 inside DIR whose backing file lies outside: not read.
    // A qcow2 overlay at `top` over the raw image `base` (absolute).
    let overlay_of = |base: &Path, top: &Path| {
        let st = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(base)
            .arg(top)
            .status()
            .unwrap();
        assert!(st.success(), "qemu-img create {}", top.display());
    };
    let base = b.outside.join("secret.raw");
    let overlay = b.dir.join("overlay.qcow2");
    overlay_of(&base, &overlay);
    let out = forced(
        &env,
        &sshd,
        &[
            "convert",
            &at(&sshd, &overlay.display().to_string()),
            &env.path("o.raw").display().to_string(),
        ],
        &["-f", "qcow2"],
    );
    let line = assert_one_line_error(&out, "backing file outside DIR");
    assert!(
        line.contains(&format!("{}: refused: outside", base.display())),
        "{line}"
    );
    // The same overlay as a sync DST: its guest view would be read
    // (hashed) through the backing file outside DIR, so refused by that
    // file's name, and left as it was.
    let before = fs::read(&overlay).unwrap();
    let out = forced(
        &env,
        &sshd,
        &["sync", &s, &at(&sshd, &overlay.display().to_string())],
        &[],
    );
    let line = assert_one_line_error(&out, "qcow2 DST backed outside DIR");
    assert!(
        line.contains(&format!("{}: refused: outside", base.display())),
        "{line}"
    );
    assert!(fs::read(&overlay).unwrap() == before, "the overlay changed");
    // A qcow2 DST whose backing file lies inside DIR is synced in place.
    let inner_base = b.dir.join("base.raw");
    fs::write(&inner_base, random_bytes(2 * MIB as usize, 5, false)).unwrap();
    let inner = b.dir.join("inner.qcow2");
    overlay_of(&inner_base, &inner);
    let out = forced(
        &env,
        &sshd,
        &["sync", &s, &at(&sshd, &inner.display().to_string())],
        &[],
    );
    ok(&out, "sync into a qcow2 DST backed inside DIR");
    let cmp = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "qcow2"])
        .arg(&src)
        .arg(&inner)
        .status()
        .unwrap();
    assert!(cmp.success(), "the backed qcow2 DST is not SRC");
}

#[test]
fn a_symlink_swapped_in_after_the_check_is_caught_by_descriptor() {
    let (env, sshd) = ssh_env!();
    let b = backup_dir(&env);
    // serve pauses 2 s between its check of the path and the open.
    sshd.force_command(&format!(
        "env IMGSYNC_TEST_RESTRICT_STALL_MS=2000 {BIN} serve --restrict {}",
        b.dir.display()
    ));
    let src = random_raw(&env, "src.raw", MIB as usize, 4);
    let s = src.display().to_string();
    let target = b.dir.join("sub/vm.raw").display().to_string();
    let dst = at(&sshd, &target);
    let mut child = {
        let mut a = vec!["convert".to_string()];
        a.extend(ssh_args(&sshd, Via::Builtin, "/nonexistent/imgsync"));
        a.push(s.clone());
        a.push(dst.clone());
        crate::remote::spawn(&env, &sshd, &a)
    };
    // While it waits, DIR/sub becomes a symlink to the outside directory.
    std::thread::sleep(Duration::from_millis(1000));
    fs::rename(b.dir.join("sub"), b.dir.join("sub.old")).unwrap();
    symlink(&b.outside, b.dir.join("sub")).unwrap();
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("{target}: refused: outside {}", b.dir.display())),
        "{err}"
    );
    assert!(!b.outside.join("vm.raw").exists());
    let listing: Vec<_> = fs::read_dir(&b.outside).unwrap().collect();
    assert_eq!(listing.len(), 1, "nothing left outside DIR");
}

#[test]
fn a_read_only_key_reads_and_refuses_every_write() {
    let (env, sshd) = ssh_env!();
    let b = backup_dir(&env);
    let img = b.dir.join("vm.raw");
    fs::write(&img, random_bytes(MIB as usize, 5, false)).unwrap();
    sshd.force_command(&format!(
        "{BIN} serve --restrict {} --read-only",
        b.dir.display()
    ));
    let src = random_raw(&env, "src.raw", MIB as usize, 6);
    let s = src.display().to_string();
    let remote = at(&sshd, &img.display().to_string());
    let before = fs::read(&img).unwrap();
    for (cmd, extra) in [
        (vec!["convert", s.as_str(), remote.as_str()], "push"),
        (vec!["sync", s.as_str(), remote.as_str()], "sync push"),
        (vec!["sync", "--rollback", remote.as_str()], "rollback"),
    ] {
        let out = forced(&env, &sshd, &cmd, &[]);
        let line = assert_one_line_error(&out, extra);
        assert!(
            line.contains(&format!(
                "{}: refused: this key is read-only (imgsync serve --read-only)",
                img.display()
            )),
            "{extra}: {line}"
        );
    }
    assert_eq!(fs::read(&img).unwrap(), before);
    let back = env.path("back.raw");
    ok(
        &forced(
            &env,
            &sshd,
            &["convert", &remote, &back.display().to_string()],
            &[],
        ),
        "pull with a read-only key",
    );
    same(&env, &img, &back);
    ok(
        &forced(&env, &sshd, &["info", &remote], &[]),
        "info with a read-only key",
    );
}

#[test]
fn the_client_names_a_forced_command_of_another_version() {
    let (env, sshd) = ssh_env!();
    let b = backup_dir(&env);
    sshd.force_command(&format!(
        "env IMGSYNC_TEST_SERVE_VERSION=9.9.9 {BIN} serve --restrict {}",
        b.dir.display()
    ));
    let src = random_raw(&env, "src.raw", 256 * 1024, 7);
    let dst = at(&sshd, &b.dir.join("vm.raw").display().to_string());
    let out = forced(
        &env,
        &sshd,
        &["convert", &src.display().to_string(), &dst],
        &[],
    );
    ok(&out, "push to another version");
    let said = stderr(&out);
    assert_eq!(
        said.trim_end(),
        format!(
            "imgsync: 127.0.0.1:{}: sshd ran the key's forced command in place of imgsync's own (--remote-imgsync /nonexistent/imgsync has no effect there): the imgsync serving there is 9.9.9, this one is {}",
            sshd.port(),
            env!("CARGO_PKG_VERSION")
        )
    );
    // Same version: nothing said.
    sshd.force_command(&format!("{BIN} serve --restrict {}", b.dir.display()));
    let out = forced(
        &env,
        &sshd,
        &["convert", &src.display().to_string(), &dst],
        &[],
    );
    ok(&out, "push to the same version");
    assert_eq!(stderr(&out), "");
}

/// Runs `a` and returns how long it took.
fn timed(env: &Env, sshd: &Sshd, a: &[String], what: &str) -> Duration {
    let t = Instant::now();
    ok(&run(env, sshd, a, &[]), what);
    t.elapsed()
}

#[test]
fn bwlimit_bounds_every_transfer_both_ways() {
    let (env, sshd) = ssh_env!();
    // 4 MiB of random data at 2 MiB/s: at least 2 s on the wire, however
    // fast the link (the protocol's own bytes only add to it).
    let size = 4 * MIB;
    let rate = 2 * MIB;
    let least = Duration::from_secs_f64(size as f64 / rate as f64);
    let src = random_raw(&env, "src.raw", size as usize, 8);
    let s = src.display().to_string();
    let with = |cmd: &str, from: String, to: String| {
        let mut a = vec![cmd.to_string(), "-q".into()];
        a.extend(builtin(&sshd));
        a.extend(args(&["--bwlimit", "2M", &from, &to]));
        a
    };
    let pushed = env.path("pushed.raw");
    let took = timed(
        &env,
        &sshd,
        &with("convert", s.clone(), url(&sshd, &pushed)),
        "push",
    );
    assert!(took >= least, "push took {took:?}");
    same(&env, &src, &pushed);
    // A pull: the serving end writes, limited at the client's word.
    let pulled = env.path("pulled.raw");
    let took = timed(
        &env,
        &sshd,
        &with("convert", url(&sshd, &pushed), pulled.display().to_string()),
        "pull",
    );
    assert!(took >= least, "pull took {took:?}");
    same(&env, &src, &pulled);
    // sync push and pull of a new DST (all blocks cross).
    let synced = env.path("synced.raw");
    let took = timed(
        &env,
        &sshd,
        &with("sync", s.clone(), url(&sshd, &synced)),
        "sync push",
    );
    assert!(took >= least, "sync push took {took:?}");
    let back = env.path("synced-back.raw");
    let took = timed(
        &env,
        &sshd,
        &with("sync", url(&sshd, &synced), back.display().to_string()),
        "sync pull",
    );
    assert!(took >= least, "sync pull took {took:?}");
    same(&env, &src, &back);
}
