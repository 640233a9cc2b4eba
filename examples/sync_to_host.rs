//! Syncs one image to a host through imgsync's library API: the same
//! exchange as `imgsync sync SRC host:PATH`, without the command line.
//!
//! ```text
//! cargo run --example sync_to_host -- SRC [user@]HOST[:PORT] PATH \
//!     [--identity FILE] [--known-hosts FILE] [--ssh-config FILE] [--remote-imgsync PATH]
//! ```
//!
//! The host needs `imgsync` on its PATH (or `--remote-imgsync`); the
//! built-in SSH client logs in with ssh-agent, `--identity` or the default
//! keys, and checks the host key against `--known-hosts` (default
//! `~/.ssh/known_hosts`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use imgsync::engine::NoProgress;
use imgsync::io::{open_source, Locking, OpenOptions};
use imgsync::session::{Client, ConnectOptions, Error, Host, SyncOptions};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sync_to_host: {}", e.one_line());
            ExitCode::from(2)
        }
    }
}

/// Runs the sync `args` describe; returns a one-line summary.
pub fn run(args: &[String]) -> Result<String, Error> {
    let usage = || Error::said("usage: sync_to_host SRC [user@]HOST[:PORT] PATH [options]");
    let [src, host, path, rest @ ..] = args else {
        return Err(usage());
    };
    let mut connect = ConnectOptions::default();
    let mut it = rest.iter();
    while let Some(opt) = it.next() {
        let value = it.next().ok_or_else(usage)?;
        match opt.as_str() {
            "--identity" => connect.identities.push(PathBuf::from(value)),
            "--known-hosts" => connect.known_hosts = Some(PathBuf::from(value)),
            "--ssh-config" => connect.config = Some(PathBuf::from(value)),
            "--remote-imgsync" => connect.remote_imgsync = value.clone(),
            _ => return Err(usage()),
        }
    }
    let host = parse_host(host).ok_or_else(usage)?;

    // SRC with its backing chain, locked as qemu-img locks what it reads.
    let src = Path::new(src);
    let source = open_source(
        src,
        OpenOptions {
            format: None,
            allow_corrupt: false,
            locking: Locking::Read,
        },
    )
    .map_err(Error::other)?;

    // One connection, one request: DST on the host becomes SRC's content,
    // only the blocks that differ crossing the wire, under an undo journal.
    let client = Client::connect(&host, &connect)?;
    // The defaults: an undo journal, the space check, blocks of DST's
    // cluster size for a qcow2 DST (64 KiB for a raw one).
    let opts = SyncOptions::default();
    let (report, wire) = client.sync_push(&source, src, path, &opts, &NoProgress)?;
    Ok(format!(
        "{}: {} of {} blocks sent, {} holes punched, {wire} bytes on the wire",
        host, report.blocks_sent, report.blocks_compared, report.blocks_punched
    ))
}

/// `[user@]host[:port]`.
fn parse_host(s: &str) -> Option<Host> {
    let (user, rest) = match s.rsplit_once('@') {
        Some((u, r)) => (Some(u.to_string()), r),
        None => (None, s),
    };
    let (name, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (h, Some(p.parse().ok()?)),
        None => (rest, None),
    };
    (!name.is_empty()).then(|| Host {
        user,
        host: name.to_string(),
        port,
    })
}
