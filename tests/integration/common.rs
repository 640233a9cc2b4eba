//! Shared helpers for the integration tests: a temp dir to build images in
//! with qemu-img/qemu-io, the imgsync binary, and the three oracles every
//! image case is held to (info keys, map ranges, guest bytes).

#![allow(dead_code)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use imgsync::formats::Format;
use imgsync::io::{open_image, OpenOptions};
use serde_json::Value;
use tempfile::TempDir;

/// The test's temp dir, or return (after a visible SKIP) without qemu-img.
macro_rules! qemu_env {
    () => {
        match $crate::common::setup() {
            Some(env) => env,
            None => return,
        }
    };
}

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// A temp dir with qemu-img available. `None` (after a visible SKIP line) when
/// qemu-img is missing, unless `IMGSYNC_REQUIRE_QEMU=1` (CI), which panics.
pub fn setup() -> Option<Env> {
    // libtest names each test's thread after the test.
    let test = std::thread::current().name().unwrap_or("test").to_string();
    let ok = ["qemu-img", "qemu-io"].iter().all(|tool| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !ok {
        if std::env::var("IMGSYNC_REQUIRE_QEMU").as_deref() == Ok("1") {
            panic!("{test}: qemu-img/qemu-io not found and IMGSYNC_REQUIRE_QEMU=1");
        }
        eprintln!(
            "SKIP {test}: qemu-img/qemu-io not found (set IMGSYNC_REQUIRE_QEMU=1 to fail instead)"
        );
        return None;
    }
    Some(temp_env())
}

/// A temp dir for tests that need no qemu-img.
pub fn temp_env() -> Env {
    let dir = tempfile::Builder::new()
        .prefix("imgsync-formats-")
        .tempdir()
        .expect("temp dir");
    Env {
        dir,
        writes: 0.into(),
    }
}

/// One write or discard through qemu-io.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// Pseudo-random bytes, different for every write (so misplaced reads show).
    Data(u64, u64),
    /// `write -P byte`.
    Pattern(u8, u64, u64),
    /// `write -z` (zero clusters kept allocated where the format can).
    Zero(u64, u64),
    /// `write -z -u` (zeroes, unmapping allowed).
    ZeroUnmap(u64, u64),
    /// `discard`.
    Discard(u64, u64),
    /// `write -c` of pseudo-random-but-compressible bytes (whole clusters).
    Compressed(u64, u64),
}

/// An image kind [`Env::create`] turns into `qemu-img create` arguments.
pub trait ImageKind {
    /// What follows `-f`, and what qemu-io is told.
    fn format(&self) -> &'static str;
    /// The arguments after `-f FORMAT`: options, `name`, size.
    fn args(&self, name: &str) -> Vec<String>;
}

/// `-f raw NAME SIZE`: a raw file of `SIZE` bytes, all hole.
pub struct Raw(u64);

impl Raw {
    pub fn new(size: u64) -> Raw {
        Raw(size)
    }
}

impl ImageKind for Raw {
    fn format(&self) -> &'static str {
        "raw"
    }

    fn args(&self, name: &str) -> Vec<String> {
        vec![name.into(), self.0.to_string()]
    }
}

/// `-f qcow2 [-o OPTS] [-b BASE -F BASE_FMT] NAME [SIZE]`. The options go
/// into `-o` in the order they are given.
pub struct Qcow2 {
    size: Option<u64>,
    opts: Vec<String>,
    backing: Option<(String, String)>,
}

impl Qcow2 {
    pub fn new(size: u64) -> Qcow2 {
        Qcow2 {
            size: Some(size),
            opts: Vec::new(),
            backing: None,
        }
    }

    /// An overlay of `base` (format `base_fmt`) as large as it: no size is
    /// given, qemu-img takes the base's.
    pub fn overlay(base: &str, base_fmt: &str) -> Qcow2 {
        Qcow2 {
            size: None,
            opts: Vec::new(),
            backing: Some((base.into(), base_fmt.into())),
        }
    }

    /// `-b BASE -F BASE_FMT` (`base` relative to the new image's directory).
    pub fn backing(mut self, base: &str, base_fmt: &str) -> Qcow2 {
        self.backing = Some((base.into(), base_fmt.into()));
        self
    }

    /// `cluster_size=BYTES`.
    pub fn cluster(self, bytes: u64) -> Qcow2 {
        self.opts(&format!("cluster_size={bytes}"))
    }

    /// `compat=VERSION` (`0.10` is qcow2 version 2, `1.1` version 3).
    pub fn compat(self, version: &str) -> Qcow2 {
        self.opts(&format!("compat={version}"))
    }

    /// `extended_l2=on`: 32 subclusters per cluster.
    pub fn extended_l2(self) -> Qcow2 {
        self.opts("extended_l2=on")
    }

    /// `data_file=NAME`: guest data in an external file qemu-img creates.
    pub fn data_file(self, name: &str) -> Qcow2 {
        self.opts(&format!("data_file={name}"))
    }

    /// Any other `-o` options, `key=value[,…]` (`refcount_bits=1`,
    /// `preallocation=full`, `lazy_refcounts=on`, …).
    pub fn opts(mut self, opts: &str) -> Qcow2 {
        self.opts.push(opts.into());
        self
    }

    /// The virtual size, unless it is the backing file's.
    pub fn size(&self) -> Option<u64> {
        self.size
    }
}

impl ImageKind for Qcow2 {
    fn format(&self) -> &'static str {
        "qcow2"
    }

    fn args(&self, name: &str) -> Vec<String> {
        let mut v = Vec::new();
        if !self.opts.is_empty() {
            v.extend(["-o".into(), self.opts.join(",")]);
        }
        if let Some((base, base_fmt)) = &self.backing {
            v.extend(["-b".into(), base.clone(), "-F".into(), base_fmt.clone()]);
        }
        v.push(name.into());
        v.extend(self.size.map(|s| s.to_string()));
        v
    }
}

/// An image [`Env::create`] made.
#[derive(Clone, Copy)]
pub struct Created<'a> {
    env: &'a Env,
    name: &'a str,
    format: &'static str,
}

impl Created<'_> {
    /// Applies `ops` in one qemu-io run ([`Env::qemu_io`]).
    pub fn write(self, ops: &[Op]) -> Self {
        self.env.qemu_io(self.format, self.name, ops);
        self
    }
}

pub struct Env {
    pub dir: TempDir,
    writes: std::cell::Cell<u64>,
}

impl Drop for Env {
    /// `IMGSYNC_KEEP_TMP=1` keeps each test's images for a look afterwards.
    fn drop(&mut self) {
        if std::env::var("IMGSYNC_KEEP_TMP").as_deref() == Ok("1") {
            self.dir.disable_cleanup(true);
            eprintln!("kept {}", self.dir.path().display());
        }
    }
}

impl Env {
    /// Asserts that qemu-img's map of `img` has an extent matching `pred`:
    /// the case really holds the feature it is meant to test.
    pub fn assert_qemu_map_has(
        &self,
        fmt: &str,
        img: &str,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) {
        let map = self.qemu_json(&["map", "--output=json", "-f", fmt, img]);
        assert!(
            map.as_array().expect("map array").iter().any(pred),
            "{img}: the case is meant to have {what}, but qemu-img map shows none: {map}"
        );
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        Command::new(program)
            .args(args)
            .current_dir(self.root())
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"))
    }

    /// Runs `qemu-img ARGS` in the temp dir; panics unless it succeeds.
    pub fn qemu_img(&self, args: &[&str]) -> String {
        let out = self.run("qemu-img", args);
        assert!(
            out.status.success(),
            "qemu-img {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("qemu-img output is utf-8")
    }

    /// `qemu-img create -q -f FORMAT … NAME …` (see [`Raw`], [`Qcow2`]);
    /// panics unless it succeeds. The result writes into the image.
    pub fn create<'a>(&'a self, name: &'a str, kind: impl ImageKind) -> Created<'a> {
        let mut args = vec!["create".to_string(), "-q".into(), "-f".into()];
        args.push(kind.format().into());
        args.extend(kind.args(name));
        self.qemu_img(&args.iter().map(String::as_str).collect::<Vec<_>>());
        Created {
            env: self,
            name,
            format: kind.format(),
        }
    }

    /// Applies `ops` to `img` (format `fmt`) in one qemu-io run.
    pub fn qemu_io(&self, fmt: &str, img: &str, ops: &[Op]) {
        let mut cmds = Vec::new();
        for op in ops {
            cmds.push(match *op {
                Op::Data(off, len) => {
                    let src = self.random_file(len, false);
                    format!("write -q -s {src} {off} {len}")
                }
                Op::Compressed(off, len) => {
                    let src = self.random_file(len, true);
                    format!("write -q -c -s {src} {off} {len}")
                }
                Op::Pattern(b, off, len) => format!("write -q -P {b:#x} {off} {len}"),
                Op::Zero(off, len) => format!("write -q -z {off} {len}"),
                Op::ZeroUnmap(off, len) => format!("write -q -z -u {off} {len}"),
                Op::Discard(off, len) => format!("discard -q {off} {len}"),
            });
        }
        let mut args = vec!["-f", fmt];
        for c in &cmds {
            args.push("-c");
            args.push(c);
        }
        args.push(img);
        let out = self.run("qemu-io", &args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        // qemu-io exits 0 even when a command fails; it says so on stdout.
        assert!(
            out.status.success() && !stdout.contains("failed") && !stdout.contains("error"),
            "qemu-io {args:?} failed: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A fresh source file of `len` pseudo-random bytes for `write -s`;
    /// `compressible` keeps bytes in a small alphabet so deflate/zstd win.
    fn random_file(&self, len: u64, compressible: bool) -> String {
        let n = self.writes.get() + 1;
        self.writes.set(n);
        let name = format!("src-{n}.bin");
        std::fs::write(
            self.path(&name),
            random_bytes(len as usize, n, compressible),
        )
        .expect("write source file");
        name
    }

    /// Runs the imgsync binary in the temp dir.
    pub fn imgsync(&self, args: &[&str]) -> Output {
        self.imgsync_cmd(args).output().expect("run imgsync")
    }

    /// imgsync with `args` in the test's dir, to be given more (an
    /// environment variable) and run.
    pub fn imgsync_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_imgsync"));
        c.args(args).current_dir(self.root());
        c
    }

    /// Runs imgsync and returns its stdout as JSON; panics unless it succeeds.
    pub fn imgsync_json(&self, args: &[&str]) -> Value {
        self.imgsync_json_code(args, 0)
    }

    /// Runs imgsync and returns its stdout as JSON; panics unless it exits
    /// with `code` (`check` reports problems with 2 or 3).
    pub fn imgsync_json_code(&self, args: &[&str], code: i32) -> Value {
        let out = self.imgsync(args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "imgsync {args:?} ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "imgsync {args:?}: bad JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    pub fn qemu_json(&self, args: &[&str]) -> Value {
        let s = self.qemu_img(args);
        serde_json::from_str(&s)
            .unwrap_or_else(|e| panic!("qemu-img {args:?}: bad JSON ({e}): {s}"))
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), seeded.
pub fn random_bytes(len: usize, seed: u64, compressible: bool) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        for b in v {
            out.push(if compressible {
                b"ab"[(b & 1) as usize]
            } else {
                b
            });
        }
    }
    out.truncate(len);
    out
}

/// How an image case is opened: its real format, and whether imgsync is told
/// it (`-f`, `OpenOptions::format`) or probes it. qemu-img is always told.
#[derive(Clone, Copy, Debug)]
pub struct Subject<'a> {
    pub img: &'a str,
    pub format: Format,
    pub explicit: bool,
}

pub fn probed(img: &str, format: Format) -> Subject<'_> {
    Subject {
        img,
        format,
        explicit: false,
    }
}

/// For images naming a backing or data file: imgsync refuses to follow names
/// in a probed image, so the format is given.
pub fn explicit(img: &str, format: Format) -> Subject<'_> {
    Subject {
        img,
        format,
        explicit: true,
    }
}

impl Subject<'_> {
    fn imgsync_args<'a>(&'a self, cmd: &'a str) -> Vec<&'a str> {
        let mut v = vec![cmd];
        if self.explicit {
            v.push("-f");
            v.push(self.format.name());
        }
        v.extend(["--output", "json", self.img]);
        v
    }
}

/// Holds `s` to all four oracles: info keys, map ranges, guest bytes, and
/// the metadata check.
pub fn check_against_qemu(env: &Env, s: Subject<'_>) {
    let vsize = check_info(env, s);
    let map = check_map(env, s, vsize);
    check_guest_bytes(env, s, vsize);
    check_check(env, s, true);
    check_convert(env, s, &map);
}

/// The output formats every case is converted to: name, imgsync arguments,
/// output format.
const CONVERSIONS: &[(&str, &[&str], &str)] = &[
    ("raw", &["-O", "raw"], "raw"),
    ("qcow2", &["-O", "qcow2"], "qcow2"),
    ("qcow2-zstd", &["-O", "qcow2", "-c"], "qcow2"),
    (
        "qcow2-zlib",
        &["-O", "qcow2", "-c", "--compression-type", "zlib"],
        "qcow2",
    ),
];

/// Oracle (e): `imgsync convert` of the case to raw, qcow2 and compressed
/// qcow2 (zstd, zlib): `qemu-img compare` says identical, `qemu-img check`
/// finds nothing, and the output holds no more data than the source: a raw
/// output's SEEK_DATA regions fit in the source's data ranges rounded out to
/// 4 KiB file system blocks; a qcow2 output allocates no more clusters than
/// the source's data ranges touch.
pub fn check_convert(env: &Env, s: Subject<'_>, src_map: &MapRanges) {
    for (name, args, out_fmt) in CONVERSIONS {
        let out = format!("convert-{name}.out");
        let mut cmd = vec!["convert"];
        if s.explicit {
            cmd.extend(["-f", s.format.name()]);
        }
        cmd.extend_from_slice(args);
        cmd.extend(["--output", "json", s.img, out.as_str()]);
        let res = env.imgsync(&cmd);
        assert!(
            res.status.success() && res.stderr.is_empty(),
            "{}: imgsync {cmd:?} failed ({}): {}",
            s.img,
            res.status,
            String::from_utf8_lossy(&res.stderr)
        );
        // Exactly the data ranges are read: no hole, zero or unallocated
        // cluster.
        let report: Value = serde_json::from_slice(&res.stdout).expect("convert report");
        let data: u64 = src_map.data.iter().map(|(a, b)| b - a).sum();
        assert_eq!(
            report["bytes-read"].as_u64(),
            Some(data),
            "{}: bytes read by the {name} conversion",
            s.img
        );
        let cmp = env.run(
            "qemu-img",
            &["compare", "-f", s.format.name(), "-F", out_fmt, s.img, &out],
        );
        assert!(
            cmp.status.success(),
            "{}: qemu-img compare with the {name} conversion: {} {}",
            s.img,
            String::from_utf8_lossy(&cmp.stdout),
            String::from_utf8_lossy(&cmp.stderr)
        );
        if *out_fmt == "qcow2" {
            let chk = env.run("qemu-img", &["check", "--output=json", "-f", "qcow2", &out]);
            let v: Value = serde_json::from_slice(&chk.stdout).unwrap_or_default();
            assert!(
                chk.status.success()
                    && v["check-errors"] == 0
                    && v.get("corruptions").is_none()
                    && v.get("leaks").is_none(),
                "{}: qemu-img check of the {name} conversion: {v} {}",
                s.img,
                String::from_utf8_lossy(&chk.stderr)
            );
            let cs = env.qemu_json(&["info", "--output=json", "-f", "qcow2", &out])["cluster-size"]
                .as_u64()
                .expect("cluster-size");
            let allocated = v["allocated-clusters"]
                .as_u64()
                .expect("allocated-clusters");
            let bound = clusters_touched(&src_map.data, cs);
            assert!(
                allocated <= bound,
                "{}: the {name} conversion allocates {allocated} clusters, the source's data touches {bound}",
                s.img
            );
        } else {
            let written = data_regions(&env.path(&out));
            let bound: u64 = src_map
                .data
                .iter()
                .map(|&(a, b)| b.next_multiple_of(4096) - a / 4096 * 4096)
                .sum();
            assert!(
                written <= bound,
                "{}: the raw conversion holds {written} bytes of data regions, the source's data (in 4 KiB blocks) {bound}",
                s.img
            );
        }
        std::fs::remove_file(env.path(&out)).expect("remove conversion");
    }
}

/// Clusters of `cs` bytes that the (sorted, merged) ranges touch.
fn clusters_touched(ranges: &[(u64, u64)], cs: u64) -> u64 {
    let mut n = 0;
    let mut last: Option<u64> = None;
    for &(a, b) in ranges {
        let first = (a / cs).max(last.map_or(0, |l| l + 1));
        let end = (b - 1) / cs;
        if end >= first {
            n += end - first + 1;
        }
        last = Some(end.max(last.unwrap_or(0)));
    }
    n
}

/// Bytes in a file's SEEK_DATA regions.
pub fn data_regions(path: &Path) -> u64 {
    use imgsync::formats::Storage;
    let f = imgsync::io::LocalFile::open(path).expect("open output");
    let mut pos = 0;
    let mut total = 0;
    while let Some((a, b)) = f.next_data(pos).expect("SEEK_DATA") {
        total += b - a;
        pos = b;
    }
    total
}

/// Statistics `imgsync check --output json` shares with `qemu-img check
/// --output=json` for qcow2.
const CHECK_KEYS: &[&str] = &[
    "image-end-offset",
    "total-clusters",
    "allocated-clusters",
    "compressed-clusters",
    "fragmented-clusters",
];

/// Oracle (d): `imgsync check` exits 0 exactly when `qemu-img check` finds
/// nothing (3 when it finds corruptions or leaks), finds corruptions and
/// leaks where qemu does, and agrees on the cluster statistics. With
/// `exact`, the counts of corruptions and leaks must be equal too (on a
/// damaged image, qemu's counting of one fault as one or two errors is its
/// own). Raw images have no metadata: always clean.
pub fn check_check(env: &Env, s: Subject<'_>, exact: bool) {
    let out = env.imgsync(&s.imgsync_args("check"));
    let ours: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "imgsync check {}: bad JSON ({e}): {} {}",
            s.img,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    if s.format == Format::Raw {
        assert_eq!(
            out.status.code(),
            Some(0),
            "imgsync check {}: {ours}",
            s.img
        );
        return;
    }
    let q = env.run(
        "qemu-img",
        &["check", "--output=json", "-f", "qcow2", s.img],
    );
    let theirs: Value = serde_json::from_slice(&q.stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img check {}: bad JSON ({e}): {}",
            s.img,
            String::from_utf8_lossy(&q.stdout)
        )
    });
    // imgsync check exits as qemu-img check: 0 clean, 2 corruptions, 3
    // leaks only.
    let expected = match q.status.code() {
        Some(c @ (0 | 2 | 3)) => c,
        other => panic!("qemu-img check {}: exit {other:?}: {theirs}", s.img),
    };
    assert_eq!(
        out.status.code(),
        Some(expected),
        "imgsync check {}: {ours}\nqemu-img check: {theirs}",
        s.img
    );
    for key in ["corruptions", "leaks"] {
        let t = theirs.get(key).and_then(Value::as_u64).unwrap_or(0);
        let o = ours.get(key).and_then(Value::as_u64);
        let agree = if exact {
            o == Some(t)
        } else {
            o.map(|o| o > 0) == Some(t > 0)
        };
        assert!(
            agree,
            "imgsync check {}: {key} disagrees with qemu-img check\nours: {ours}\nqemu: {theirs}",
            s.img
        );
    }
    for key in CHECK_KEYS {
        let t = theirs.get(*key).cloned().unwrap_or(Value::from(0));
        assert_eq!(
            ours.get(*key),
            Some(&t),
            "imgsync check {}: {key} differs from qemu-img check\nours: {ours}\nqemu: {theirs}",
            s.img
        );
    }
}

/// Keys at the top of the info object that must agree (present in both with
/// equal values, or absent from both).
const INFO_KEYS: &[&str] = &[
    "format",
    "virtual-size",
    "cluster-size",
    "backing-filename",
    "backing-filename-format",
    "full-backing-filename",
    "dirty-flag",
];

/// Keys of `format-specific.data` that must agree wherever qemu prints them
/// (and imgsync must not invent them where qemu does not).
const FORMAT_DATA_KEYS: &[&str] = &[
    "compat",
    "compression-type",
    "lazy-refcounts",
    "refcount-bits",
    "corrupt",
    "extended-l2",
    "data-file",
    "data-file-raw",
];

/// Snapshot fields imgsync prints with qemu's names.
const SNAPSHOT_KEYS: &[&str] = &[
    "id",
    "name",
    "vm-state-size",
    "date-sec",
    "date-nsec",
    "vm-clock-sec",
    "vm-clock-nsec",
];

/// Oracle (a): `imgsync info --output json` against `qemu-img info`.
/// Returns the virtual size.
pub fn check_info(env: &Env, s: Subject<'_>) -> u64 {
    let q = env.qemu_json(&["info", "--output=json", "-f", s.format.name(), s.img]);
    let ours = env.imgsync_json(&s.imgsync_args("info"));
    let mut diffs = String::new();
    for k in INFO_KEYS {
        if q.get(k) != ours.get(k) {
            let _ = writeln!(
                diffs,
                "  {k}: qemu {:?}, imgsync {:?}",
                q.get(k),
                ours.get(k)
            );
        }
    }
    let qtype = q.pointer("/format-specific/type");
    if qtype.is_some() && qtype != ours.pointer("/format-specific/type") {
        let _ = writeln!(
            diffs,
            "  format-specific.type: qemu {qtype:?}, imgsync {:?}",
            ours.pointer("/format-specific/type")
        );
    }
    for k in FORMAT_DATA_KEYS {
        let p = format!("/format-specific/data/{k}");
        let (qv, ov) = (q.pointer(&p), ours.pointer(&p));
        if qv != ov {
            let _ = writeln!(
                diffs,
                "  format-specific.data.{k}: qemu {qv:?}, imgsync {ov:?}"
            );
        }
    }
    let snaps = |v: &Value| -> Vec<Vec<Option<Value>>> {
        v.get("snapshots")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|s| SNAPSHOT_KEYS.iter().map(|k| s.get(k).cloned()).collect())
                    .collect()
            })
            .unwrap_or_default()
    };
    if snaps(&q) != snaps(&ours) {
        let _ = writeln!(
            diffs,
            "  snapshots: qemu {:?}, imgsync {:?}",
            snaps(&q),
            snaps(&ours)
        );
    }
    assert!(
        diffs.is_empty(),
        "{}: info differs from qemu-img info:\n{diffs}qemu: {q:#}\nimgsync: {ours:#}",
        s.img
    );
    q["virtual-size"].as_u64().expect("qemu virtual-size")
}

/// Byte ranges `[start, end)`, sorted and merged.
pub type Ranges = Vec<(u64, u64)>;

fn merge(mut v: Ranges) -> Ranges {
    v.sort_unstable();
    let mut out: Ranges = Vec::new();
    for (s, e) in v {
        if s == e {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.1 >= s => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// The ranges of a `map --output=json` array that hold data, read as zeros
/// without data, and are present (allocated somewhere in the chain).
#[derive(Debug, PartialEq, Eq)]
pub struct MapRanges {
    pub data: Ranges,
    pub zero: Ranges,
    pub present: Ranges,
}

pub fn map_ranges(map: &Value) -> MapRanges {
    let (mut data, mut zero, mut present) = (Vec::new(), Vec::new(), Vec::new());
    for e in map.as_array().expect("map is a JSON array") {
        let start = e["start"].as_u64().expect("start");
        let end = start + e["length"].as_u64().expect("length");
        let flag = |k: &str| {
            e[k].as_bool()
                .unwrap_or_else(|| panic!("map extent without {k}: {e}"))
        };
        if flag("data") {
            data.push((start, end));
        } else if flag("zero") {
            zero.push((start, end));
        }
        if flag("present") {
            present.push((start, end));
        }
    }
    MapRanges {
        data: merge(data),
        zero: merge(zero),
        present: merge(present),
    }
}

/// Oracle (b): `imgsync map --output json` against `qemu-img map`, as sets
/// of byte ranges (offsets, depth and extent boundaries ignored).
pub fn check_map(env: &Env, s: Subject<'_>, vsize: u64) -> MapRanges {
    let q = env.qemu_json(&["map", "--output=json", "-f", s.format.name(), s.img]);
    let ours = env.imgsync_json(&s.imgsync_args("map"));

    // The contract: extents cover the virtual size, in order, without gaps.
    let mut pos = 0;
    for e in ours.as_array().expect("imgsync map is an array") {
        assert_eq!(
            e["start"].as_u64(),
            Some(pos),
            "{}: map extent out of order: {e}",
            s.img
        );
        let len = e["length"].as_u64().expect("length");
        assert!(len > 0, "{}: empty map extent {e}", s.img);
        assert_ne!(
            e["data"], e["zero"],
            "{}: extent both/neither data and zero: {e}",
            s.img
        );
        pos += len;
    }
    assert_eq!(
        pos, vsize,
        "{}: imgsync map does not cover the virtual size",
        s.img
    );

    let (qr, or) = (map_ranges(&q), map_ranges(&ours));
    assert_eq!(
        (&qr.data, &qr.zero),
        (&or.data, &or.zero),
        "{}: map (data, zero) ranges differ (left qemu-img, right imgsync)\nqemu: {q}\nimgsync: {ours}",
        s.img
    );
    assert_eq!(
        qr.present, or.present,
        "{}: map present ranges differ (left qemu-img, right imgsync)\nqemu: {q}\nimgsync: {ours}",
        s.img
    );
    or
}

/// Oracle (c): the guest view read through the library API, 1 MiB at a time,
/// against `qemu-img convert -O raw`. Also checks that every range the map
/// calls zero reads as zeros.
pub fn check_guest_bytes(env: &Env, s: Subject<'_>, vsize: u64) {
    let out = format!("{}.guest.raw", s.img.replace('/', "_"));
    env.qemu_img(&["convert", "-f", s.format.name(), "-O", "raw", s.img, &out]);
    let expected = std::fs::read(env.path(&out)).expect("read converted image");
    std::fs::remove_file(env.path(&out)).ok();
    assert_eq!(
        expected.len() as u64,
        vsize,
        "{}: qemu-img convert size",
        s.img
    );

    let image = open_image(
        &env.path(s.img),
        OpenOptions {
            format: s.explicit.then_some(s.format),
            allow_corrupt: false,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{}: open_image: {e:#}", s.img));
    assert_eq!(image.virtual_size(), vsize, "{}: API virtual size", s.img);
    assert_eq!(image.format(), s.format, "{}: API format", s.img);

    const CHUNK: u64 = MIB;
    let mut buf = vec![0u8; CHUNK as usize];
    let mut pos = 0u64;
    while pos < vsize {
        let n = CHUNK.min(vsize - pos) as usize;
        image
            .read_at(&mut buf[..n], pos)
            .unwrap_or_else(|e| panic!("{}: read_at({pos:#x}, {n:#x}): {e}", s.img));
        let want = &expected[pos as usize..pos as usize + n];
        if buf[..n] != *want {
            let i = buf[..n]
                .iter()
                .zip(want)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            panic!(
                "{}: guest bytes differ from qemu-img convert at offset {:#x}: imgsync {:#04x}, qemu {:#04x}",
                s.img,
                pos + i as u64,
                buf[i],
                want[i]
            );
        }
        pos += n as u64;
    }

    // Whatever the API's map calls zero must read as zeros.
    for e in image.all_extents() {
        let e = e.unwrap_or_else(|err| panic!("{}: all_extents: {err}", s.img));
        if e.is_zero() {
            let r = &expected[e.start as usize..e.end() as usize];
            if let Some(i) = r.iter().position(|&b| b != 0) {
                panic!(
                    "{}: extent {e:?} is mapped as zero but guest offset {:#x} is {:#04x}",
                    s.img,
                    e.start + i as u64,
                    r[i]
                );
            }
        }
    }
}

/// Asserts the process failed the way every imgsync error must: exit status
/// 2, nothing on stdout, exactly one line on stderr starting `imgsync: `.
/// Returns that line.
pub fn assert_one_line_error(out: &Output, what: &str) -> String {
    assert_one_line_error_code(out, what, 2)
}

/// [`assert_one_line_error`] with exit status `code` (`check`'s errors exit
/// 1, as qemu-img check's).
pub fn assert_one_line_error_code(out: &Output, what: &str, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: exit status (stderr: {stderr})"
    );
    assert!(
        out.stdout.is_empty(),
        "{what}: stdout not empty: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.ends_with('\n'),
        "{what}: stderr does not end with a newline: {stderr:?}"
    );
    let line = stderr.trim_end_matches('\n');
    assert!(
        !line.contains('\n'),
        "{what}: error is more than one line: {stderr:?}"
    );
    assert!(
        line.starts_with("imgsync: "),
        "{what}: error does not start with 'imgsync: ': {line:?}"
    );
    line.to_string()
}

// A small tmpfs (needs root; skipped visibly otherwise, required in CI)

pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: PathBuf, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(&dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            if std::env::var("IMGSYNC_REQUIRE_QEMU").as_deref() == Ok("1") {
                panic!("cannot mount a tmpfs (CI runs as root)");
            }
            eprintln!("SKIP: cannot mount a tmpfs (not root?)");
            return None;
        }
        Some(Tmpfs(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
