//! The command line as programs and admins meet it: `--progress=json`
//! streams of a real convert, push and sync, `--progress-fd`, SIGUSR1,
//! generated man pages and completions, one-line usage errors, option
//! checks (`--threads 0`, `-S 1.5M`, `-o`), `serve` on a terminal, the
//! status after SIGINT, and qemu's `offset`/`compressed` map keys.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{
    assert_one_line_error, assert_one_line_error_code, temp_env, Env, Op, Qcow2, Raw, MIB,
};
use crate::remote::{ssh_args, url, Via};
use crate::sshd::Sshd;

const BIN: &str = env!("CARGO_BIN_EXE_imgsync");

/// Every subcommand a user can run (`generate` is hidden, for packagers).
const SUBCOMMANDS: [&str; 7] = [
    "info", "map", "convert", "compare", "sync", "serve", "check",
];

/// A 64 MiB raw source with 24 MiB of data in three places.
fn source(env: &Env, name: &str) {
    env.create(name, Raw::new(64 * MIB)).write(&[
        Op::Data(0, 8 * MIB),
        Op::Data(20 * MIB, 8 * MIB),
        Op::Data(50 * MIB, 8 * MIB),
    ]);
}

/// The JSON lines of a progress stream, each checked to be an object with
/// the documented keys.
fn progress_lines(text: &str, what: &str) -> Vec<Value> {
    let lines: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str::<Value>(l)
                .unwrap_or_else(|e| panic!("{what}: not a JSON line ({e}): {l:?}\n{text}"))
        })
        .collect();
    assert!(!lines.is_empty(), "{what}: no progress lines");
    for v in &lines {
        for key in ["phase", "done", "total", "wire", "rate"] {
            assert!(v.get(key).is_some(), "{what}: no {key:?} in {v}");
        }
        assert!(v["eta"].is_null() || v["eta"].is_u64(), "{what}: eta {v}");
    }
    lines
}

/// What every stream must hold: `done` never goes back, the phases come in
/// their order (compare, send, write, verify, done), the last line is
/// `done` with `done == total`. Returns the phases seen, in order.
fn check_stream(lines: &[Value], what: &str) -> Vec<String> {
    let order = ["compare", "send", "write", "verify", "done"];
    let mut phases: Vec<String> = Vec::new();
    let mut last_done = 0;
    let mut last_rank = 0;
    for v in lines {
        let phase = v["phase"].as_str().unwrap().to_string();
        let rank = order
            .iter()
            .position(|p| *p == phase)
            .unwrap_or_else(|| panic!("{what}: unknown phase {phase}"));
        assert!(
            rank >= last_rank,
            "{what}: phase {phase} after {:?}",
            phases.last()
        );
        last_rank = rank;
        let done = v["done"].as_u64().unwrap();
        assert!(
            done >= last_done,
            "{what}: done went back to {done} from {last_done}"
        );
        last_done = done;
        assert!(
            done <= v["total"].as_u64().unwrap(),
            "{what}: done past total: {v}"
        );
        if phases.last() != Some(&phase) {
            phases.push(phase);
        }
    }
    let last = lines.last().unwrap();
    assert_eq!(last["phase"], "done", "{what}: last line {last}");
    assert_eq!(last["done"], last["total"], "{what}: last line {last}");
    assert!(last["done"].as_u64().unwrap() > 0, "{what}: {last}");
    phases
}

fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn progress_json_of_a_local_convert_and_sync() {
    let env = qemu_env!();
    source(&env, "src.raw");
    let out = env.imgsync(&[
        "convert",
        "--progress=json",
        "-O",
        "qcow2",
        "src.raw",
        "out.qcow2",
    ]);
    ok(&out, "convert");
    let lines = progress_lines(&String::from_utf8_lossy(&out.stderr), "convert");
    assert_eq!(check_stream(&lines, "convert"), ["write", "done"]);
    assert_eq!(lines.last().unwrap()["total"], 24 * MIB);

    // A first sync (DST absent) and one after a change.
    for (round, what) in ["first sync", "sync after a change"].iter().enumerate() {
        if round == 1 {
            env.qemu_io("raw", "src.raw", &[Op::Data(21 * MIB, MIB)]);
        }
        let out = env.imgsync(&["sync", "--progress=json", "src.raw", "dst.raw"]);
        ok(&out, what);
        let lines = progress_lines(&String::from_utf8_lossy(&out.stderr), what);
        if round == 0 {
            // Nothing to compare with: SRC's 24 MiB read once, as sent.
            assert_eq!(
                check_stream(&lines, what),
                ["send", "verify", "done"],
                "{what}"
            );
            assert_eq!(lines.last().unwrap()["total"], 24 * MIB, "{what}");
        } else {
            assert_eq!(
                check_stream(&lines, what),
                ["compare", "send", "verify", "done"],
                "{what}"
            );
            // Comparing reads SRC's 24 MiB; sending adds what differs.
            assert_eq!(lines.last().unwrap()["total"], 25 * MIB, "{what}");
        }
    }
}

#[test]
fn progress_json_of_a_push_and_a_sync_over_ssh() {
    let env = qemu_env!();
    let Some(sshd) = Sshd::start() else { return };
    source(&env, "src.raw");
    for (cmd, dst) in [("convert", "pushed.raw"), ("sync", "synced.raw")] {
        let mut args = vec![cmd.to_string(), "--progress=json".into()];
        args.extend(ssh_args(&sshd, Via::Builtin, BIN));
        args.push("src.raw".into());
        args.push(url(&sshd, &env.path(dst)));
        let out = crate::remote::run(&env, &sshd, &args, &[]);
        ok(&out, cmd);
        let lines = progress_lines(&String::from_utf8_lossy(&out.stderr), cmd);
        let phases = check_stream(&lines, cmd);
        // DST absent: the sync has nothing to compare, and sends as the
        // push does.
        assert_eq!(phases, ["send", "verify", "done"], "{cmd}");
        let last = lines.last().unwrap();
        // Random data crosses nearly whole, with frame headers.
        let wire = last["wire"].as_u64().unwrap();
        assert!(wire > 20 * MIB && wire < 26 * MIB, "{cmd}: wire {last}");
        crate::remote::same(&env, &env.path("src.raw"), &env.path(dst));
    }
}

/// The receiving end reports too: a pull sync (this end hashes DST,
/// then writes what arrives), into an absent DST and after a change.
#[test]
fn progress_json_of_a_sync_pull() {
    let env = qemu_env!();
    let Some(sshd) = Sshd::start() else { return };
    source(&env, "src.raw");
    for round in 0..3 {
        if round > 0 {
            env.qemu_io("raw", "src.raw", &[Op::Data(20 * MIB + round * MIB, MIB)]);
        }
        let mut args = vec!["sync".to_string(), "--progress=json".into()];
        if round == 2 {
            args.push("--checksum".into());
        }
        args.extend(ssh_args(&sshd, Via::Builtin, BIN));
        args.push(url(&sshd, &env.path("src.raw")));
        args.push("pulled.raw".into());
        let out = crate::remote::run(&env, &sshd, &args, &[]);
        let what = format!("pull {round}");
        ok(&out, &what);
        let lines = progress_lines(&String::from_utf8_lossy(&out.stderr), &what);
        let phases = check_stream(&lines, &what);
        let last = lines.last().unwrap();
        let wire = last["wire"].as_u64().unwrap();
        if round == 0 {
            assert_eq!(phases, ["write", "verify", "done"], "{what}");
            // SRC's 24 MiB written; random data crosses nearly whole.
            assert_eq!(last["total"], 24 * MIB, "{what}: {last}");
            assert!(wire > 20 * MIB && wire < 26 * MIB, "{what}: wire {last}");
        } else {
            assert_eq!(phases, ["compare", "write", "verify", "done"], "{what}");
            // The changed MiB written, after DST's hashes: from its hash
            // cache, or (--checksum) DST's 24 MiB read and hashed.
            let hashed = if round == 2 { 24 * MIB } else { 0 };
            assert_eq!(last["total"], hashed + MIB, "{what}: {last}");
            assert!(wire > MIB && wire < 3 * MIB, "{what}: wire {last}");
        }
        crate::remote::same(&env, &env.path("src.raw"), &env.path("pulled.raw"));
    }
}

#[test]
fn progress_json_goes_to_progress_fd() {
    let env = qemu_env!();
    source(&env, "src.raw");
    // Descriptor 3 is the captured stdout; imgsync's own stdout goes away.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "exec '{BIN}' convert --progress-fd 3 src.raw out.raw 3>&1 1>/dev/null"
        ))
        .current_dir(env.root())
        .output()
        .unwrap();
    ok(&out, "convert --progress-fd 3");
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = progress_lines(&String::from_utf8_lossy(&out.stdout), "--progress-fd");
    check_stream(&lines, "--progress-fd");
    // A descriptor that is not open is refused before any work.
    let out = env.imgsync(&["convert", "--progress-fd", "9", "src.raw", "out2.raw"]);
    let line = assert_one_line_error(&out, "--progress-fd 9");
    assert!(line.starts_with("imgsync: --progress-fd 9: "), "{line}");
    assert!(!env.path("out2.raw").exists());
}

/// `convert - DST` waits on a stdin that stays silent: a run that signals
/// can reach at a known point.
fn waiting_convert(env: &Env) -> std::process::Child {
    let mut child = Command::new(BIN)
        .args(["convert", "-", "out.raw"])
        .current_dir(env.root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(child.try_wait().unwrap().is_none(), "convert - ended early");
    child
}

#[test]
fn sigusr1_prints_one_progress_line() {
    let env = temp_env();
    let mut child = waiting_convert(&env);
    crate::trust::kill(child.id(), "USR1");
    std::thread::sleep(Duration::from_millis(500));
    assert!(child.try_wait().unwrap().is_none(), "SIGUSR1 ended imgsync");
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut lines = stderr.lines();
    let first = lines.next().unwrap_or_default();
    assert!(
        first.contains("0.00% 0 B of 0 B"),
        "SIGUSR1: no progress line first: {stderr:?}"
    );
    // Then the error of the stream that ended empty, and nothing else.
    assert_eq!(lines.count(), 1, "{stderr:?}");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn sigint_ends_with_status_130_after_its_line() {
    let env = qemu_env!();
    crate::convert::slow_source(&env);
    let child = crate::convert::slow_convert(&env, "out.qcow2");
    let pid = child.id().to_string();
    crate::remote::wait_until(|| crate::remote::rchar(&pid) > 16 * MIB, "convert reads");
    let t = Instant::now();
    crate::trust::kill(child.id(), "INT");
    let out = child.wait_with_output().unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let line = assert_one_line_error_code(&out, "SIGINT", 130);
    assert_eq!(line, "imgsync: out.qcow2: interrupted; nothing was written");
    assert!(!env.path("out.qcow2").exists());
}

#[test]
fn man_pages_for_every_subcommand() {
    let env = temp_env();
    let out = env.imgsync(&["generate", "man", "man"]);
    ok(&out, "generate man");
    let mut pages: Vec<String> = std::fs::read_dir(env.path("man"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    let mut expected: Vec<String> = SUBCOMMANDS
        .iter()
        .map(|s| format!("imgsync-{s}.1"))
        .chain(["imgsync.1".to_string()])
        .collect();
    expected.sort();
    assert_eq!(pages, expected);
    let main = std::fs::read_to_string(env.path("man/imgsync.1")).unwrap();
    assert!(main.starts_with(".ie"), "{}", &main[..main.len().min(200)]);
    assert!(main.contains(".TH imgsync 1"), "no title");
    let convert = std::fs::read_to_string(env.path("man/imgsync-convert.1")).unwrap();
    for opt in ["\\-\\-sparse\\-size", "\\-\\-progress\\-fd", "cluster_size"] {
        assert!(convert.contains(opt), "imgsync-convert.1 lacks {opt}");
    }
}

#[test]
fn bash_completion_names_every_subcommand() {
    let env = temp_env();
    let out = env.imgsync(&["generate", "completions", "bash"]);
    ok(&out, "generate completions bash");
    let script = String::from_utf8(out.stdout).unwrap();
    assert!(
        script.contains("complete -F _imgsync"),
        "not a bash completion"
    );
    // The words offered after `imgsync `.
    let top = script
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("imgsync)"))
        .find(|l| l.contains("opts=\""))
        .expect("the top-level opts line");
    for s in SUBCOMMANDS {
        assert!(
            top.split_whitespace().any(|w| w.trim_matches('"') == s),
            "bash completion does not offer {s}: {top}"
        );
    }
    for shell in ["zsh", "fish"] {
        let out = env.imgsync(&["generate", "completions", shell]);
        ok(&out, shell);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("convert") && text.contains("sync"), "{shell}");
    }
}

#[test]
fn version_names_the_protocol() {
    let env = temp_env();
    let out = env.imgsync(&["--version"]);
    ok(&out, "--version");
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(
        line.starts_with(&format!(
            "imgsync {} (protocol 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{line}"
    );
    assert_eq!(line.lines().count(), 1, "{line}");
}

#[test]
fn usage_errors_are_one_line() {
    let env = temp_env();
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["convert", "-S", "4x", "a", "b"],
            2,
            "imgsync: -S: invalid size '4x' (use bytes or k, M, G, T: 4k, 1.5M)",
        ),
        (
            &["convert", "--threads", "0", "a", "b"],
            2,
            "imgsync: --threads: ",
        ),
        (
            &["sync", "--threads", "0", "a", "b"],
            2,
            "imgsync: --threads: ",
        ),
        (
            &["convert", "--bogus", "a", "b"],
            2,
            "imgsync: unexpected argument '--bogus'",
        ),
        (
            &["convert", "-O", "vmdk", "a", "b"],
            2,
            "imgsync: -O: invalid value 'vmdk'",
        ),
        (&["convert", "a"], 2, "imgsync: "),
        (&["sync"], 2, "imgsync: "),
        (&[], 2, "imgsync: a command is needed"),
        (
            &["check", "--bogus", "x"],
            1,
            "imgsync: unexpected argument",
        ),
        (
            &["map", "--output", "yaml", "x"],
            2,
            "imgsync: --output: invalid value 'yaml'",
        ),
        (
            &["convert", "--timeout", "3", "a", "b"],
            2,
            "imgsync: --timeout: ",
        ),
        (
            &["convert", "-o", "preallocation=full", "a", "b"],
            2,
            "imgsync: -o preallocation: not an option imgsync takes",
        ),
        (
            &["convert", "-p", "--progress-fd", "1", "a", "b"],
            2,
            "imgsync: ",
        ),
    ];
    for (args, code, start) in cases {
        let out = env.imgsync(args);
        let line = assert_one_line_error_code(&out, &format!("{args:?}"), *code);
        assert!(line.starts_with(start), "{args:?}: {line}");
    }
    // An unknown command: the line and one hint.
    let out = env.imgsync(&["conver", "a", "b"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        stderr,
        "imgsync: 'conver' is not an imgsync command\n\
         imgsync: did you mean 'convert'? (imgsync --help lists the commands)\n"
    );
}

#[test]
fn help_reads_src_dst_and_describes_every_option() {
    let env = temp_env();
    let out = env.imgsync(&["sync", "--help"]);
    ok(&out, "sync --help");
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(help.contains("imgsync sync [OPTIONS] SRC DST"), "{help}");
    for sub in SUBCOMMANDS {
        let out = env.imgsync(&[sub, "--help"]);
        ok(&out, sub);
        let help = String::from_utf8(out.stdout).unwrap();
        // clap lists an option without a description alone on its line:
        // `  -x, --long <V>` with nothing after.
        for l in help.lines() {
            let t = l.trim();
            // (`- json: ...` lines are an option's values, described.)
            let is_option = t.starts_with('-') && !t.starts_with("- ") && l.starts_with("  ");
            if is_option {
                let parts: Vec<&str> = t.splitn(2, "  ").collect();
                let described = parts.len() == 2 && !parts[1].trim().is_empty();
                // A long description wraps onto the lines below instead.
                let wrapped = help
                    .lines()
                    .skip_while(|x| *x != l)
                    .nth(1)
                    .is_some_and(|n| n.starts_with("          ") && !n.trim().starts_with('-'));
                assert!(described || wrapped, "{sub}: {t:?} has no description");
            }
        }
    }
}

#[test]
fn sparse_size_takes_a_fraction_and_o_takes_qemu_names() {
    let env = qemu_env!();
    source(&env, "src.raw");
    let out = env.imgsync(&["convert", "-S", "1.5M", "-O", "raw", "src.raw", "s.raw"]);
    ok(&out, "-S 1.5M");
    crate::remote::same(&env, &env.path("src.raw"), &env.path("s.raw"));

    let out = env.imgsync(&[
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=2M,compression_type=zlib",
        "src.raw",
        "o.qcow2",
    ]);
    ok(&out, "-o");
    let info = env.qemu_json(&["info", "--output=json", "o.qcow2"]);
    assert_eq!(info["cluster-size"], 2 * MIB, "{info}");
    assert_eq!(
        info["format-specific"]["data"]["compression-type"], "zlib",
        "{info}"
    );
    crate::remote::same(&env, &env.path("src.raw"), &env.path("o.qcow2"));
    // Given twice: refused.
    let out = env.imgsync(&[
        "convert",
        "--cluster-size",
        "1M",
        "-o",
        "cluster_size=2M",
        "-O",
        "qcow2",
        "src.raw",
        "t.qcow2",
    ]);
    let line = assert_one_line_error(&out, "cluster size twice");
    assert!(line.contains("-o cluster_size"), "{line}");
}

#[test]
fn serve_on_a_terminal_says_a_client_starts_it() {
    let env = temp_env();
    // `script` gives serve a pty for stdin; -e passes its exit status on.
    let out = Command::new("script")
        .args(["-qec", &format!("{BIN} serve"), "/dev/null"])
        .current_dir(env.root())
        .stdin(Stdio::null())
        .output()
        .expect("script (bsdutils)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("imgsync: serve: is started by an imgsync client over SSH"),
        "{text}"
    );
    assert_eq!(text.trim_end().lines().count(), 1, "{text}");
}

#[test]
fn map_json_has_qemus_offset_and_compressed() {
    let env = qemu_env!();
    env.create("c.qcow2", Qcow2::new(4 * MIB)).write(&[
        Op::Data(0, 128 * 1024),
        Op::Compressed(MIB, 64 * 1024),
        Op::Zero(2 * MIB, 64 * 1024),
    ]);
    env.create("r.raw", Raw::new(4 * MIB))
        .write(&[Op::Data(MIB, MIB)]);
    for (fmt, img) in [("qcow2", "c.qcow2"), ("raw", "r.raw")] {
        let ours = env.imgsync_json(&["map", "-f", fmt, "--output", "json", img]);
        let qemu = env.qemu_json(&["map", "--output=json", "-f", fmt, img]);
        assert_eq!(ours, qemu, "{img}");
    }
    let map = env.imgsync_json(&["map", "--output", "json", "c.qcow2"]);
    let arr = map.as_array().unwrap();
    assert!(arr
        .iter()
        .any(|e| e["compressed"] == true && e.get("offset").is_none()));
    assert!(arr
        .iter()
        .any(|e| e["data"] == true && e["offset"].is_u64()));
}
