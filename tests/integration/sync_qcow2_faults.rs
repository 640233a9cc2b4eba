//! Faults and refusals of a qcow2 DST updated in place (issue 13's tests
//! beyond kinds x patterns): SIGKILL during a ~100 MiB change in three
//! places (the local sync at ten points; the remote receiver of a push and
//! the remote sender of a pull at four each, both transports), each
//! followed by a rerun that converges or by
//! `--rollback`, which gives DST's file back byte for byte; the connection
//! dropped mid-push; the file system filling mid-update; an encrypted DST
//! refused untouched; SRC an overlay of a backing chain; and a push that
//! would create a qcow2 DST against a serve without SYNC_CREATE. qemu-img
//! judges every image (`check` clean, `compare SRC DST` equal), sha256sum
//! every file that must be as it was.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

use crate::common::{assert_one_line_error, random_bytes, Env, Qcow2, Tmpfs, KIB, MIB};
use crate::remote::{
    entries, ok, pid_script, run, spawn, ssh_args, url, wait_for_pid, wait_until, wchar, Via, BOTH,
};
use crate::sshd::Sshd;

const BIN: &str = env!("CARGO_BIN_EXE_imgsync");

/// The SIGKILL matrix's images: 256 MiB virtual, 64 KiB clusters.
const VSIZE: u64 = 256 * MIB;

/// DST's guest content (`old`) holds incompressible data in [0, 64) and
/// [128, 160) MiB. SRC (`new`) rewrites [0, 64) (DST's clusters rewritten
/// in place, their old content journaled first), keeps [128, 144) and
/// [152, 160), has a hole over [144, 152) (DST's clusters freed) and new
/// data in [192, 228) (clusters allocated): 108 MiB changed, 100 MiB of it
/// sent.
fn big_change(env: &Env) -> String {
    let (old, new) = (env.path("old.raw"), env.path("src.raw"));
    let f = File::create(&old).unwrap();
    urandom_at(&f, 0, 64 * MIB);
    urandom_at(&f, 128 * MIB, 32 * MIB);
    f.set_len(VSIZE).unwrap();
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(&old)
        .arg(&new)
        .status()
        .unwrap();
    assert!(st.success(), "cp");
    let f = File::options().write(true).open(&new).unwrap();
    urandom_at(&f, 0, 64 * MIB);
    rustix::fs::fallocate(
        &f,
        rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
        144 * MIB,
        8 * MIB,
    )
    .unwrap();
    urandom_at(&f, 192 * MIB, 36 * MIB);
    env.qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=65536",
        "old.raw",
        "before.qcow2",
    ]);
    fs::remove_file(&old).unwrap();
    sha256(&env.path("before.qcow2"))
}

/// Writes `len` bytes of /dev/urandom at `off` of `f` (the kernel's
/// generator is far faster than a debug build's).
fn urandom_at(f: &File, off: u64, len: u64) {
    let mut r = File::open("/dev/urandom").unwrap();
    let mut buf = vec![0u8; 4 * MIB as usize];
    let mut pos = 0;
    while pos < len {
        let n = (buf.len() as u64).min(len - pos) as usize;
        r.read_exact(&mut buf[..n]).unwrap();
        f.write_all_at(&buf[..n], off + pos).unwrap();
        pos += n as u64;
    }
}

fn sha256(p: &Path) -> String {
    let out = Command::new("sha256sum").arg(p).output().unwrap();
    assert!(out.status.success(), "sha256sum {}", p.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// `qemu-img check` exits 0: no corruption, no leak.
fn check_clean(env: &Env, dst: &str, what: &str) {
    let out = env.run("qemu-img", &["check", "-f", "qcow2", dst]);
    assert!(
        out.status.success(),
        "{what}: qemu-img check {dst}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img check` finds no corruption (3: leaked clusters at most).
fn check_no_corruption(env: &Env, dst: &str, what: &str) {
    let out = env.run("qemu-img", &["check", "-f", "qcow2", dst]);
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "{what}: qemu-img check {dst} ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img compare` of SRC (format `src_fmt`) and the qcow2 DST exits 0.
fn compare(env: &Env, src_fmt: &str, src: &str, dst: &str, what: &str) {
    let out = env.run(
        "qemu-img",
        &["compare", "-f", src_fmt, "-F", "qcow2", src, dst],
    );
    assert!(
        out.status.success(),
        "{what}: qemu-img compare {src} {dst}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn report(out: &Output, what: &str) -> Value {
    let text = ok(out, what);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{what}: {e}: {text}"))
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

fn kill9(pid: &str) {
    let st = Command::new("kill").args(["-KILL", pid]).status().unwrap();
    assert!(st.success(), "kill -KILL {pid}");
}

fn alive(pid: &str) -> bool {
    // A zombie no one reaps yet is dead for our purpose (its locks and
    // files are gone).
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|t| !t.trim_start().starts_with('Z'))
    })
}

fn parent_of(pid: &str) -> String {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // pid (comm) state ppid ...
    stat.rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string()
}

fn comm(pid: &str) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The pids whose parent is `pid`.
fn children_of(pid: &str) -> Vec<String> {
    fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        .filter(|p| {
            fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|s| {
                s.rsplit(')')
                    .next()
                    .and_then(|t| t.split_whitespace().nth(1))
                    == Some(pid)
            })
        })
        .collect()
}

/// The journal of `dst.qcow2` in the test's dir.
const JOURNAL: &str = ".dst.qcow2.imgsync-journal";

// The SIGKILL matrix

/// Who is killed.
#[derive(Clone, Copy, Debug)]
enum Place {
    /// The local `imgsync sync SRC DST`.
    Local,
    /// The remote receiver of a push (`imgsync serve` on the sshd side).
    PushReceiver(Via),
    /// The remote sender of a pull.
    PullSender(Via),
}

/// `sync -q --compress-level 0 [ssh args] SRC DST` for `place`, with the
/// remote imgsync `remote`.
fn sync_args(env: &Env, sshd: Option<&Sshd>, place: Place, remote: &str) -> Vec<String> {
    let mut a: Vec<String> = ["sync", "-q", "--compress-level", "0"]
        .map(String::from)
        .to_vec();
    match place {
        Place::Local => a.extend(["src.raw".into(), "dst.qcow2".into()]),
        Place::PushReceiver(via) => {
            let sshd = sshd.unwrap();
            a.extend(ssh_args(sshd, via, remote));
            a.extend(["src.raw".into(), url(sshd, &env.path("dst.qcow2"))]);
        }
        Place::PullSender(via) => {
            let sshd = sshd.unwrap();
            a.extend(ssh_args(sshd, via, remote));
            a.extend([url(sshd, &env.path("src.raw")), "dst.qcow2".into()]);
        }
    }
    a
}

fn start(env: &Env, sshd: Option<&Sshd>, args: &[String]) -> Child {
    match sshd {
        Some(sshd) => spawn(env, sshd, args),
        None => Command::new(BIN)
            .args(args)
            .current_dir(env.root())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    }
}

/// A sync of the big change started for `place`: the client, the process
/// whose writes measure progress, and the one a kill aims at.
struct Started {
    child: Child,
    /// Whose writes (/proc/PID/io wchar) measure progress: the receiver's
    /// (the local sync, a push's serve: journal and DST) or a pull's
    /// sender's (the frames it sends). Not a pull's receiver: it writes in
    /// bursts, one per write barrier, while its sender runs tens of MiB
    /// ahead, so a kill at a point of the receiver's writes can find the
    /// sender done (DST then complete, only SRC's last word missing).
    progress: String,
    /// Who is killed: the local sync, or the serve.
    victim: String,
    /// The serve, when there is one.
    remote: Option<String>,
}

fn launch(env: &Env, sshd: Option<&Sshd>, place: Place, extra: &[&str]) -> Started {
    fs::copy(env.path("before.qcow2"), env.path("dst.qcow2")).unwrap();
    let (script, pidfile) = match sshd {
        Some(sshd) => {
            let (s, p) = pid_script(sshd, "serve-pid", "");
            let _ = fs::remove_file(&p);
            (s.display().to_string(), Some(p))
        }
        None => (BIN.to_string(), None),
    };
    let mut args = sync_args(env, sshd, place, &script);
    args.extend(extra.iter().map(|s| s.to_string()));
    let child = start(env, sshd, &args);
    let local = child.id().to_string();
    let remote = pidfile.map(|p| wait_for_pid(&p));
    let (progress, victim) = match place {
        Place::Local => (local.clone(), local),
        Place::PushReceiver(_) | Place::PullSender(_) => {
            (remote.clone().unwrap(), remote.clone().unwrap())
        }
    };
    Started {
        child,
        progress,
        victim,
        remote,
    }
}

/// Bytes [`Started::progress`] of a whole, uninterrupted sync of the big
/// change for `place` writes (a receiver: journal and DST; a pull's
/// sender: the frames it sends), read from /proc/PID/io until it ends:
/// the kill points are fractions of it. The run is held to the oracles,
/// and its report to the change.
fn measure_writes(env: &Env, sshd: Option<&Sshd>, place: Place) -> u64 {
    let what = format!("{place:?} uninterrupted");
    let mut s = launch(env, sshd, place, &["--output", "json"]);
    let mut most = 0;
    while s.child.try_wait().unwrap().is_none() {
        most = most.max(wchar(&s.progress));
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let out = s.child.wait_with_output().unwrap();
    let r = report(&out, &what);
    check_clean(env, "dst.qcow2", &what);
    compare(env, "raw", "src.raw", "dst.qcow2", &what);
    // 100 MiB of new data crosses (64 rewritten, 36 new); 8 MiB freed.
    assert_eq!(n(&r, "blocks-sent"), 100 * MIB / (64 * KIB), "{what}: {r}");
    assert!(
        n(&r, "clusters-allocated") >= 36 * MIB / (64 * KIB),
        "{what}: {r}"
    );
    assert!(
        n(&r, "clusters-freed") >= 8 * MIB / (64 * KIB),
        "{what}: {r}"
    );
    assert!(!env.path(JOURNAL).exists(), "{what}: journal left: {r}");
    // A receiver journals the in-place rewrites' old content first; a
    // sender sends the new data stored (--compress-level 0).
    let least = match place {
        Place::PullSender(_) => 100 * MIB,
        _ => 164 * MIB,
    };
    assert!(most > least, "{what}: only {most} bytes written");
    most
}

/// Kills `place` once [`Started::progress`] has written `at` bytes, then
/// checks what the client said and that DST is left mid-sync (journal
/// beside it, no corruption).
fn kill_at(env: &Env, sshd: Option<&Sshd>, place: Place, at: u64, what: &str) {
    let Started {
        mut child,
        progress,
        victim,
        remote,
    } = launch(env, sshd, place, &[]);
    let mut ended = false;
    wait_until(
        || {
            ended = child.try_wait().unwrap().is_some();
            ended || wchar(&progress) > at
        },
        what,
    );
    assert!(!ended, "{what}: the sync ended before the kill");
    kill9(&victim);
    let out = child.wait_with_output().unwrap();
    match place {
        Place::Local => assert_eq!(out.status.signal(), Some(9), "{what}: {out:?}"),
        _ => {
            // The client outlives the remote end: one line naming the host,
            // and DST's state.
            let line = assert_one_line_error(&out, what);
            assert!(line.contains("127.0.0.1"), "{what}: {line}");
            assert!(
                line.contains("dst.qcow2 is mid-sync: rerun the same sync to resume it")
                    && line.contains("--rollback"),
                "{what}: {line}"
            );
        }
    }
    if let Some(pid) = &remote {
        wait_until(|| !alive(pid), "the remote imgsync ends");
    }
    assert!(env.path(JOURNAL).exists(), "{what}: no journal");
    check_no_corruption(env, "dst.qcow2", what);
}

/// A rerun of the same sync: it converges.
fn rerun(env: &Env, sshd: Option<&Sshd>, place: Place, what: &str) {
    let mut a = sync_args(env, sshd, place, BIN);
    a.extend(["--output".into(), "json".into()]);
    let out = match sshd {
        Some(sshd) => run(env, sshd, &a, &[]),
        None => env.imgsync(&a.iter().map(String::as_str).collect::<Vec<_>>()),
    };
    let r = report(&out, what);
    assert_eq!(r["resumed"], true, "{what}: {r}");
    check_clean(env, "dst.qcow2", what);
    compare(env, "raw", "src.raw", "dst.qcow2", what);
    assert!(!env.path(JOURNAL).exists(), "{what}: journal left");
}

/// `--rollback DST`, where DST lives (a push's DST through serve, in the
/// `host:path` form): the file is as before the first sync, byte for byte.
fn rollback(env: &Env, sshd: Option<&Sshd>, place: Place, before: &str, what: &str) {
    let out = match (place, sshd) {
        (Place::PushReceiver(via), Some(sshd)) => {
            run(env, sshd, &host_path_rollback(env, sshd, via), &[])
        }
        _ => env.imgsync(&["sync", "-q", "--rollback", "dst.qcow2"]),
    };
    ok(&out, what);
    assert_eq!(sha256(&env.path("dst.qcow2")), before, "{what}: sha256");
    assert!(!env.path(JOURNAL).exists(), "{what}: journal left");
    check_clean(env, "dst.qcow2", what);
}

/// `sync --rollback 127.0.0.1:/…/dst.qcow2`: the port comes from an ssh
/// config file (built-in client) or from `-e ssh -p PORT`.
fn host_path_rollback(env: &Env, sshd: &Sshd, via: Via) -> Vec<String> {
    let mut a: Vec<String> = vec!["sync".into(), "-q".into(), "--rollback".into()];
    a.extend(["--remote-imgsync".into(), BIN.into()]);
    match via {
        Via::Builtin => {
            let cfg = sshd.path("port_config");
            fs::write(&cfg, format!("Host 127.0.0.1\n  Port {}\n", sshd.port())).unwrap();
            a.extend([
                "--known-hosts".into(),
                sshd.known_hosts().display().to_string(),
                "-i".into(),
                sshd.client_key().display().to_string(),
                "--ssh-config".into(),
                cfg.display().to_string(),
            ]);
        }
        Via::External => {
            a.push("-e".into());
            a.push(format!("{} -p {}", sshd.ssh_command(), sshd.port()));
        }
    }
    a.push(format!("127.0.0.1:{}", env.path("dst.qcow2").display()));
    a
}

/// `points` kill points spread over [`Started::progress`]'s writes in an
/// uninterrupted run (`total`): the k-th at k/(points+1) of it.
fn points(total: u64, points: u64) -> Vec<u64> {
    (1..=points).map(|k| total * k / (points + 1)).collect()
}

/// Kills at each point, then reruns (even points) or rolls back (odd).
fn matrix(env: &Env, sshd: Option<&Sshd>, places: &[Place], at: &[u64], before: &str) {
    for (i, &at) in at.iter().enumerate() {
        // Each place in turn for two points: one rerun, one rollback.
        let place = places[i / 2 % places.len()];
        let then_rollback = i % 2 == 1;
        let what = format!(
            "{place:?} killed at {} MiB written, then {}",
            at / MIB,
            if then_rollback { "rollback" } else { "rerun" }
        );
        kill_at(env, sshd, place, at, &what);
        if then_rollback {
            rollback(env, sshd, place, before, &what);
        } else {
            rerun(env, sshd, place, &what);
        }
    }
}

/// A local sync of a ~100 MiB change into a qcow2 DST, SIGKILLed at ten
/// points spread over what it writes.
#[test]
fn killed_local_qcow2_sync_reruns_or_rolls_back() {
    let env = qemu_env!();
    let before = big_change(&env);
    let total = measure_writes(&env, None, Place::Local);
    matrix(&env, None, &[Place::Local], &points(total, 10), &before);
}

/// The remote receiver of a push (serve) SIGKILLed mid-update, both
/// transports in turn.
#[test]
fn killed_remote_receiver_of_a_qcow2_push_reruns_or_rolls_back() {
    remote_matrix([
        Place::PushReceiver(Via::Builtin),
        Place::PushReceiver(Via::External),
    ]);
}

/// The remote sender of a pull (serve) SIGKILLed while the local receiver
/// updates its qcow2 DST: the receiver names the host and says DST is
/// mid-sync.
#[test]
fn killed_remote_sender_of_a_qcow2_pull_reruns_or_rolls_back() {
    remote_matrix([
        Place::PullSender(Via::External),
        Place::PullSender(Via::Builtin),
    ]);
}

/// The matrix over sshd at [`REMOTE_POINTS`] kill points, measured on the
/// first place.
fn remote_matrix(places: [Place; 2]) {
    let env = qemu_env!();
    let Some(sshd) = Sshd::start() else { return };
    let before = big_change(&env);
    let total = measure_writes(&env, Some(&sshd), places[0]);
    matrix(
        &env,
        Some(&sshd),
        &places,
        &points(total, REMOTE_POINTS),
        &before,
    );
}

/// Kill points per remote place (the local sync gets ten): two per
/// transport, one rerun and one rollback each. Ten would take this slow
/// machine 1-2 minutes more per place (a built-in client's pull of the
/// change takes 12 s here).
const REMOTE_POINTS: u64 = 4;

// The connection dropped mid-push

/// A push updating a qcow2 DST loses its connection: the built-in client's
/// (its sshd session process is killed), then a rerun converges; `-e
/// ssh`'s (its ssh is killed), then a rollback gives the file back. Each
/// time the client says so in one line naming the host and DST's state,
/// and the serve stops, leaving DST mid-sync.
#[test]
fn a_dropped_connection_mid_qcow2_push_reruns_or_rolls_back() {
    let env = qemu_env!();
    let Some(sshd) = Sshd::start() else { return };
    let before = big_change(&env);
    for (via, at, then_rollback) in [
        (Via::Builtin, 40 * MIB, false),
        (Via::External, 100 * MIB, true),
    ] {
        let what = format!(
            "{via:?}: connection dropped after {} MiB written, then {}",
            at / MIB,
            if then_rollback { "rollback" } else { "rerun" }
        );
        let place = Place::PushReceiver(via);
        let Started {
            mut child,
            progress: serve,
            ..
        } = launch(&env, Some(&sshd), place, &[]);
        // The connection's process on either side of it.
        let victim = match via {
            Via::Builtin => parent_of(&serve),
            Via::External => {
                let kids = children_of(&child.id().to_string());
                assert_eq!(kids.len(), 1, "{what}: children {kids:?}");
                kids[0].clone()
            }
        };
        let name = comm(&victim);
        assert!(name.starts_with("ssh"), "{what}: {victim} is {name}");
        let mut ended = false;
        wait_until(
            || {
                ended = child.try_wait().unwrap().is_some();
                ended || wchar(&serve) > at
            },
            &what,
        );
        assert!(!ended, "{what}: the sync ended before the kill");
        kill9(&victim);
        let out = child.wait_with_output().unwrap();
        let line = assert_one_line_error(&out, &what);
        assert!(
            line.contains("127.0.0.1")
                && line.contains("dst.qcow2 is mid-sync: rerun the same sync to resume it")
                && line.contains("--rollback"),
            "{what}: {line}"
        );
        wait_until(|| !alive(&serve), "the serve ends");
        assert!(env.path(JOURNAL).exists(), "{what}: no journal");
        check_no_corruption(&env, "dst.qcow2", &what);
        if then_rollback {
            rollback(&env, Some(&sshd), place, &before, &what);
        } else {
            rerun(&env, Some(&sshd), place, &what);
        }
    }
}

// Disk full mid-update

/// A qcow2 DST on a 48 MiB tmpfs, a change that does not fit, and
/// `--no-space-check`: the update's own writes meet ENOSPC. One line
/// naming DST; then, with room again, `--rollback` gives the file back, or
/// a rerun converges.
#[test]
fn a_full_file_system_mid_qcow2_update_rolls_back_or_reruns() {
    let env = qemu_env!();
    let Some(_fs) = Tmpfs::mount(env.path("small"), "48M") else {
        return;
    };
    let dst = "small/dst.qcow2";
    // 8 MiB of data in DST; SRC rewrites it (8 MiB of journal) and adds 20
    // MiB (new clusters): about 28 MiB needed, 10 MiB free while the
    // filler is there.
    let f = File::create(env.path("old.raw")).unwrap();
    urandom_at(&f, 0, 8 * MIB);
    f.set_len(VSIZE).unwrap();
    env.qemu_img(&["convert", "-O", "qcow2", "old.raw", dst]);
    let f = File::create(env.path("src.raw")).unwrap();
    urandom_at(&f, 0, 8 * MIB);
    urandom_at(&f, 100 * MIB, 20 * MIB);
    f.set_len(VSIZE).unwrap();
    let before = sha256(&env.path(dst));
    let filler = env.path("small/filler");
    for then_rollback in [true, false] {
        let what = if then_rollback { "rollback" } else { "rerun" };
        fs::write(&filler, vec![0x55u8; 30 * MIB as usize]).unwrap();
        let out = env.imgsync(&["sync", "--no-space-check", "src.raw", dst]);
        let line = assert_one_line_error(&out, what);
        assert!(
            line.contains("dst.qcow2") && line.contains("No space left on device"),
            "{what}: {line}"
        );
        assert!(
            env.path("small/.dst.qcow2.imgsync-journal").exists(),
            "{what}: no journal"
        );
        assert!(line.contains("is mid-sync"), "{what}: {line}");
        // The update had begun: the write itself failed, not a check.
        assert_ne!(sha256(&env.path(dst)), before, "{what}: DST unchanged");
        check_no_corruption(&env, dst, what);
        fs::remove_file(&filler).unwrap();
        if then_rollback {
            ok(&env.imgsync(&["sync", "-q", "--rollback", dst]), what);
            assert_eq!(sha256(&env.path(dst)), before, "{what}: sha256");
        } else {
            let r = report(
                &env.imgsync(&["sync", "-q", "--output", "json", "src.raw", dst]),
                what,
            );
            assert_eq!(r["resumed"], true, "{what}: {r}");
            compare(&env, "raw", "src.raw", dst, what);
        }
        check_clean(&env, dst, what);
        // No journal left; a completed sync leaves DST's hash cache.
        let mut want = vec!["dst.qcow2".to_string()];
        if !then_rollback {
            want.insert(0, ".dst.qcow2.imgsync-hashes".to_string());
        }
        assert_eq!(entries(&env.path("small")), want, "{what}");
    }
}

// Refusals

/// A LUKS-encrypted qcow2 DST: refused in one line naming it and saying
/// why, locally and as a push's DST; its file unchanged.
#[test]
fn an_encrypted_qcow2_dst_is_refused_untouched() {
    let env = qemu_env!();
    env.qemu_img(&[
        "create",
        "-q",
        "--object",
        "secret,id=sec0,data=x",
        "-f",
        "qcow2",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0",
        "enc.qcow2",
        "64M",
    ]);
    let f = File::create(env.path("src.raw")).unwrap();
    f.write_all_at(&random_bytes(MIB as usize, 1, false), 0)
        .unwrap();
    f.set_len(64 * MIB).unwrap();
    let before = sha256(&env.path("enc.qcow2"));
    let out = env.imgsync(&["sync", "src.raw", "enc.qcow2"]);
    let line = assert_one_line_error(&out, "local");
    assert!(
        line.contains("enc.qcow2") && line.contains("encrypted"),
        "local: {line}"
    );
    assert_eq!(sha256(&env.path("enc.qcow2")), before, "local: DST changed");
    let Some(sshd) = Sshd::start() else { return };
    for via in BOTH {
        let mut a: Vec<String> = vec!["sync".into()];
        a.extend(ssh_args(&sshd, via, BIN));
        a.extend(["src.raw".into(), url(&sshd, &env.path("enc.qcow2"))]);
        let line = assert_one_line_error(&run(&env, &sshd, &a, &[]), "push");
        assert!(
            line.contains("127.0.0.1") && line.contains("enc.qcow2") && line.contains("encrypted"),
            "{via:?} push: {line}"
        );
        assert_eq!(
            sha256(&env.path("enc.qcow2")),
            before,
            "{via:?}: DST changed"
        );
    }
    assert_eq!(
        entries(env.root()),
        vec!["enc.qcow2".to_string(), "src.raw".to_string()],
        "something left beside DST"
    );
}

/// SRC is the top of a backing chain (raw or qcow2 base ← qcow2 overlay):
/// its guest view, base included, reaches an existing qcow2 DST; a second
/// sync sends nothing and leaves DST's file as it was.
#[test]
fn a_backing_chain_src_into_a_qcow2_dst() {
    let env = qemu_env!();
    use crate::common::Op;
    for base_fmt in ["raw", "qcow2"] {
        let what = format!("{base_fmt} base");
        let base = format!("base.{base_fmt}");
        let top = format!("top-{base_fmt}.qcow2");
        let dst = format!("dst-{base_fmt}.qcow2");
        match base_fmt {
            "raw" => env.create(&base, crate::common::Raw::new(64 * MIB)),
            _ => env.create(&base, Qcow2::new(64 * MIB)),
        }
        .write(&[
            Op::Data(0, 4 * MIB),
            Op::Pattern(0x33, 16 * MIB, 2 * MIB),
            Op::Data(40 * MIB, MIB),
        ]);
        // The overlay hides part of the base with data, zeros and a
        // discard (reads as zeros over base data in a v3 image).
        env.create(&top, Qcow2::overlay(&base, base_fmt)).write(&[
            Op::Data(MIB, 512 * KIB),
            Op::Zero(16 * MIB, 64 * KIB),
            Op::Data(30 * MIB, 2 * MIB),
            Op::ZeroUnmap(40 * MIB, 256 * KIB),
        ]);
        // DST: an older copy of the base alone, plus data of its own.
        env.qemu_img(&["convert", "-O", "qcow2", "-f", base_fmt, &base, &dst]);
        env.qemu_io("qcow2", &dst, &[Op::Data(50 * MIB, MIB)]);
        let r = report(
            &env.imgsync(&["sync", "-q", "--output", "json", "-f", "qcow2", &top, &dst]),
            &what,
        );
        assert_eq!(r["destination-existed"], true, "{what}: {r}");
        assert!(n(&r, "blocks-sent") > 0, "{what}: {r}");
        check_clean(&env, &dst, &what);
        compare(&env, "qcow2", &top, &dst, &what);
        // DST stands alone: no backing file of its own.
        let info = env.qemu_json(&["info", "--output=json", &dst]);
        assert!(info.get("backing-filename").is_none(), "{what}: {info}");
        let after = sha256(&env.path(&dst));
        let r = report(
            &env.imgsync(&["sync", "-q", "--output", "json", "-f", "qcow2", &top, &dst]),
            &format!("{what}, again"),
        );
        for key in [
            "blocks-sent",
            "data-sent",
            "clusters-allocated",
            "clusters-freed",
            "metadata-bytes-written",
        ] {
            assert_eq!(n(&r, key), 0, "{what}, again: {key}: {r}");
        }
        assert_eq!(sha256(&env.path(&dst)), after, "{what}, again: DST changed");
    }
}

/// A sync push that would make a qcow2 DST, against a serve that does not
/// offer SYNC_CREATE (as an older imgsync): one line, and no file at all
/// there (never a raw file by the qcow2 name). The same serve still makes
/// a raw DST when asked for one, and a serve offering everything makes
/// the qcow2.
#[test]
fn a_push_that_would_create_a_qcow2_dst_needs_sync_create() {
    let env = qemu_env!();
    let Some(sshd) = Sshd::start() else { return };
    env.create("src.qcow2", Qcow2::new(64 * MIB))
        .write(&[crate::common::Op::Data(0, 2 * MIB)]);
    let remote = env.path("remote");
    fs::create_dir(&remote).unwrap();
    let (old, _) = pid_script(&sshd, "old-serve", "IMGSYNC_TEST_SERVE_CAPS_MASK=32");
    let old = old.display().to_string();
    for via in BOTH {
        let push = |remote_imgsync: &str, extra: &[&str], dst: &str| {
            let mut a: Vec<String> = vec!["sync".into(), "-q".into()];
            a.extend(ssh_args(&sshd, via, remote_imgsync));
            a.extend(extra.iter().map(|s| s.to_string()));
            a.extend(["src.qcow2".into(), url(&sshd, &remote.join(dst))]);
            run(&env, &sshd, &a, &[])
        };
        // SRC's format: the client stops once the serve says DST is absent
        // (its line names DST there). -O qcow2: the serve,
        // told DST's format but not how to make it, refuses first (its
        // words blame the client: the masked serve cannot tell which end
        // lacks the capability).
        for (extra, want) in [
            (
                &[][..],
                "new.qcow2: the imgsync there is too old to create a qcow2 DST",
            ),
            (
                &["-O", "qcow2"][..],
                "new.qcow2: a new qcow2 DST needs an imgsync client that can ask for one",
            ),
        ] {
            let what = format!("{via:?} {extra:?}");
            let line = assert_one_line_error(&push(&old, extra, "new.qcow2"), &what);
            assert!(
                line.contains("127.0.0.1") && line.contains(want),
                "{what}: {line}"
            );
            assert!(
                entries(&remote).is_empty(),
                "{what}: {:?}",
                entries(&remote)
            );
        }
        // The mask reached the serve, and only SYNC_CREATE is missing: a
        // raw DST is still made.
        ok(&push(&old, &["-O", "raw"], "new.raw"), "raw DST");
        compare(
            &env,
            "raw",
            &remote.join("new.raw").display().to_string(),
            "src.qcow2",
            "raw DST",
        );
        // A serve offering everything makes the qcow2.
        ok(&push(BIN, &[], "new.qcow2"), "qcow2 DST");
        let info = env.qemu_json(&[
            "info",
            "--output=json",
            &remote.join("new.qcow2").display().to_string(),
        ]);
        assert_eq!(info["format"], "qcow2", "{via:?}: {info}");
        compare(
            &env,
            "qcow2",
            "src.qcow2",
            &remote.join("new.qcow2").display().to_string(),
            "qcow2 DST",
        );
        for e in entries(&remote) {
            fs::remove_file(remote.join(e)).unwrap();
        }
    }
}

/// DST that cannot be read while it is hashed (a qcow2 whose last data
/// cluster lies past its file's end): a pull names DST here, not the
/// remote SRC it was reading from; a push names DST there.
#[test]
fn an_unreadable_qcow2_dst_is_named_as_dst() {
    let env = qemu_env!();
    let Some(sshd) = Sshd::start() else { return };
    env.create("d.qcow2", Qcow2::new(16 * MIB)).write(&[
        crate::common::Op::Data(0, MIB),
        crate::common::Op::Data(15 * MIB, MIB),
    ]);
    let f = fs::OpenOptions::new()
        .write(true)
        .open(env.path("d.qcow2"))
        .unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - 64 * KIB).unwrap();
    drop(f);
    fs::write(env.path("s.raw"), random_bytes(16 * MIB as usize, 4, false)).unwrap();
    let before = sha256(&env.path("d.qcow2"));
    for via in BOTH {
        for pull in [true, false] {
            let what = format!("{via:?} pull {pull}");
            let mut a: Vec<String> = vec!["sync".into(), "-q".into()];
            a.extend(ssh_args(&sshd, via, BIN));
            let (src, dst) = if pull {
                (url(&sshd, &env.path("s.raw")), "d.qcow2".to_string())
            } else {
                ("s.raw".to_string(), url(&sshd, &env.path("d.qcow2")))
            };
            a.extend([src, dst]);
            let line = assert_one_line_error(&run(&env, &sshd, &a, &[]), &what);
            assert!(
                line.contains("d.qcow2: data cluster") && line.contains("beyond the end"),
                "{what}: {line}"
            );
            assert!(!line.contains("s.raw"), "{what}: SRC blamed: {line}");
            assert_eq!(sha256(&env.path("d.qcow2")), before, "{what}: DST changed");
        }
    }
}
