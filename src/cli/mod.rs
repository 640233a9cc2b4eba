//! The command line: clap → typed options, locations parsed into local or
//! remote, reports printed (human and JSON), progress bars, exit codes.
//! Errors are printed here, once, as `imgsync: <file>: <what>: <cause>`.
//!
//! Everything said to another host goes through [`crate::session`]: a
//! command with a remote end connects a `session::Client` and makes one
//! call; `imgsync serve` is `session::serve_stdio` with this module's
//! listings ([`Listings`]) for a remote info, map or check. No command
//! module uses another's: what they share is here, in `output`,
//! `progress`, `location`, `size` and `ssh`.
#![forbid(unsafe_code)]

mod check;
mod compare;
mod convert;
mod info;
mod location;
mod map;
mod output;
mod progress;
mod size;
mod ssh;
mod sync;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use imgsync_formats::Format;

use crate::session::{self, Query};

/// Exit statuses (the contract in CLI.md): 0 success, 1 differs (compare),
/// 2 error; `check` has qemu-img check's own codes.
pub mod exit {
    pub const OK: u8 = 0;
    pub const DIFFERS: u8 = 1;
    pub const ERROR: u8 = 2;
    /// check: the check could not be completed (the image cannot be opened
    /// or read), as qemu-img check's 1. Every error of `check` exits so: a
    /// 2 there would read as "corruption found".
    pub const CHECK_INCOMPLETE: u8 = 1;
    /// check: corruption found (qemu-img check's 2).
    pub const CHECK_CORRUPT: u8 = 2;
    /// check: only leaked clusters found (qemu-img check's 3).
    pub const CHECK_LEAKS: u8 = 3;
}

#[derive(Parser, Debug)]
#[command(
    name = "imgsync",
    version,
    about = "Move and sync sparse VM disk images (raw, QCOW2)"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Human,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CompressionArg {
    Zstd,
    Zlib,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    Raw,
    Qcow2,
}

impl From<CompressionArg> for imgsync_formats::qcow2::CompressionType {
    fn from(c: CompressionArg) -> Self {
        match c {
            CompressionArg::Zstd => Self::Zstd,
            CompressionArg::Zlib => Self::Zlib,
        }
    }
}

impl From<FormatArg> for Format {
    fn from(f: FormatArg) -> Format {
        match f {
            FormatArg::Raw => Format::Raw,
            FormatArg::Qcow2 => Format::Qcow2,
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show an image's format, sizes, backing file and format details
    ///
    /// Only the image's own metadata is read: a backing file or external
    /// data file it names is shown, never opened (so no -f is needed).
    Info {
        /// Image format (probed from the magic when absent)
        #[arg(short = 'f', long = "format", value_enum)]
        format: Option<FormatArg>,
        /// human, or json: one object with qemu-img's key names
        #[arg(long, value_enum, default_value = "human")]
        output: OutputFormat,
        /// Read the image even while a running qemu has it open for
        /// writing (as qemu-img -U); what is read may then be
        /// inconsistent, and a change while it is read is still an error
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        #[command(flatten)]
        ssh: ssh::SshArgs,
        /// The image: a path, [user@]host:PATH or ssh://...
        image: OsString,
    },
    /// List which ranges of the guest hold data, zeros or nothing (no data is read)
    Map {
        /// Image format (probed from the magic when absent; give it to
        /// read through the files a qcow2 image names)
        #[arg(short = 'f', long = "format", value_enum)]
        format: Option<FormatArg>,
        /// human, or json: an array of extents as qemu-img map
        /// --output=json prints them
        #[arg(long, value_enum, default_value = "human")]
        output: OutputFormat,
        /// Read the image even while a running qemu has it open for
        /// writing (as qemu-img -U); what is read may then be
        /// inconsistent, and a change while it is read is still an error
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        #[command(flatten)]
        ssh: ssh::SshArgs,
        /// The image: a path, [user@]host:PATH or ssh://...
        image: OsString,
    },
    /// Copy an image into a new sparse raw or compact QCOW2 image, locally or
    /// over SSH
    ///
    /// SRC is read as the guest sees it (its backing chain flattened). Only
    /// allocated, non-zero data is read and written. DST appears only when
    /// complete: a failed or interrupted convert leaves nothing under its
    /// name, and an existing DST is replaced only on success. A block device
    /// DST is written in place (ranges without data are zeroed).
    ///
    /// Either SRC or DST may be remote: [user@]host:PATH or
    /// ssh://[user@]host[:port]/PATH. imgsync then runs `imgsync serve` on
    /// the host over SSH and only the data crosses the wire, zstd-compressed
    /// and checksummed. `-` as SRC or DST reads or writes an imgsync stream
    /// on stdin/stdout (`imgsync convert a.qcow2 - | ssh h imgsync convert - b.raw`).
    Convert {
        /// Source format (probed from the magic when absent)
        #[arg(short = 'f', long = "format", value_enum)]
        format: Option<FormatArg>,
        /// Output format (default: the source's format)
        #[arg(short = 'O', long = "output-format", value_enum)]
        output_format: Option<FormatArg>,
        /// Compress QCOW2 clusters (a cluster is stored compressed only when
        /// that makes it smaller)
        #[arg(short = 'c', long = "compress")]
        compress: bool,
        /// Compression method for -c: zstd (the default), or zlib for old
        /// readers
        #[arg(long, value_enum)]
        compression_type: Option<CompressionArg>,
        /// Zero runs of at least SIZE bytes become holes; 0 keeps every
        /// allocated byte
        #[arg(short = 'S', long = "sparse-size", value_name = "SIZE", default_value = "4k", value_parser = size::parse_size)]
        sparse_size: u64,
        /// QCOW2 output cluster size (default 64k)
        #[arg(long, value_name = "SIZE", value_parser = size::parse_size)]
        cluster_size: Option<u64>,
        /// Output options by qemu-img's names, comma-separated:
        /// cluster_size=SIZE, compression_type=zstd|zlib
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// A block device target already reads zeros: do not zero ranges
        /// without data
        #[arg(long)]
        target_is_zero: bool,
        /// Write even when the destination filesystem seems too small for the
        /// source's data
        #[arg(long)]
        no_space_check: bool,
        /// Worker threads (default: one per core, at most 8)
        #[arg(long, value_name = "N", value_parser = parse_threads)]
        threads: Option<usize>,
        /// zstd level of the data sent over the wire (1-19; 0 sends it
        /// uncompressed). Default: start at 1 and adapt while sending, up
        /// while the link is the bottleneck, down while the CPU is
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(0..=19))]
        compress_level: Option<i32>,
        /// Print a transfer report (data read, bytes on the wire, ratio,
        /// time, rate)
        #[arg(long)]
        stats: bool,
        /// Read the image even while a running qemu has it open for
        /// writing (as qemu-img -U); what is read may then be
        /// inconsistent, and a change while it is read is still an error
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        #[command(flatten)]
        ssh: ssh::SshArgs,
        #[command(flatten)]
        reporting: progress::Reporting,
        /// human: print nothing on success; json: a final report
        #[arg(long, value_enum, default_value = "human")]
        output: OutputFormat,
        /// The source image: a path, [user@]host:PATH, ssh://... or -
        src: OsString,
        /// The new image (a file, or a block device written in place): a
        /// path, [user@]host:PATH, ssh://... or -
        dst: OsString,
    },
    /// Compare the guest contents of two images
    ///
    /// Exit 0 identical, 1 different (the first differing byte offset is
    /// printed), 2 error. Ranges that read as zeros in both are not read; a
    /// larger image's extra part must read as zeros (as qemu-img compare).
    Compare {
        /// Format of A
        #[arg(short = 'f', long = "format", value_enum)]
        format: Option<FormatArg>,
        /// Format of B
        #[arg(short = 'F', long = "format-b", value_enum)]
        format_b: Option<FormatArg>,
        #[command(flatten)]
        reporting: progress::Reporting,
        /// human (qemu-img compare's words), or json: identical,
        /// first-difference, size-mismatch
        #[arg(long, value_enum, default_value = "human")]
        output: OutputFormat,
        /// Read the image even while a running qemu has it open for
        /// writing (as qemu-img -U); what is read may then be
        /// inconsistent, and a change while it is read is still an error
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        #[command(flatten)]
        ssh: ssh::SshArgs,
        /// Image A: a path, [user@]host:PATH or ssh://...
        a: OsString,
        /// Image B: a path, [user@]host:PATH or ssh://...
        b: OsString,
    },
    /// Make DST identical to SRC in place, sending only the blocks that differ
    ///
    /// DST is a raw file or block device, local or remote ([user@]host:PATH,
    /// ssh://...); SRC is raw or qcow2 (a backing chain is seen flattened).
    /// Both sides hash their non-zero blocks (keyed BLAKE3) as they stream;
    /// holes on both sides are never read. A block's old content goes to an
    /// undo journal beside DST (block devices: /var/lib/imgsync/journals;
    /// fsynced) before the block is overwritten: an
    /// interrupted sync resumes when rerun, or `--rollback DST` restores the
    /// previous image. DST absent: a full copy in -O's format, else SRC's
    /// (as convert), appearing only when complete.
    #[command(
        override_usage = "imgsync sync [OPTIONS] SRC DST\n       imgsync sync --rollback [OPTIONS] DST"
    )]
    Sync {
        /// Source format (probed when absent); an existing DST's too unless -O
        #[arg(short = 'f', long = "format", value_enum)]
        format: Option<FormatArg>,
        /// DST's format: a new DST is made in it (default: SRC's); an
        /// existing DST named raw is updated as a file of bytes even when it
        /// probes as qcow2 (existing qcow2 DSTs are not updated yet)
        #[arg(short = 'O', long = "output-format", value_enum)]
        output_format: Option<FormatArg>,
        /// A new qcow2 DST's clusters compressed (as convert -c)
        #[arg(short = 'c', long = "compress")]
        compress: bool,
        /// Compression method for -c: zstd, or zlib for old readers
        #[arg(long, value_enum, default_value = "zstd")]
        compression_type: CompressionArg,
        /// A new qcow2 DST's cluster size
        #[arg(long, value_name = "SIZE", default_value = "64k", value_parser = size::parse_size)]
        cluster_size: u64,
        /// Comparison block size (default: a qcow2 DST's cluster size, at
        /// least 4k; else 64k)
        #[arg(long, value_name = "SIZE", value_parser = size::parse_size)]
        block_size: Option<u64>,
        /// Do not keep an undo journal: faster and needs no room for the
        /// changed blocks' old content, but an interrupted sync leaves DST
        /// partly updated with no way back (rerunning still completes it)
        #[arg(long)]
        no_journal: bool,
        /// Read and hash all of DST instead of trusting the hashes kept
        /// from the last sync (.NAME.imgsync-hashes beside DST, used only
        /// while DST's size, inode and change time are as that sync left
        /// them)
        #[arg(long)]
        checksum: bool,
        /// Restore DST as it was before an interrupted sync (from its
        /// journal); takes only DST
        #[arg(long)]
        rollback: bool,
        /// Do not check that the destination has room for the journal and
        /// the new data
        #[arg(long)]
        no_space_check: bool,
        /// zstd level of the blocks sent (default: adaptive from 1)
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(0..=19))]
        compress_level: Option<i32>,
        /// Worker threads (default: one per core, at most 8)
        #[arg(long, value_name = "N", value_parser = parse_threads)]
        threads: Option<usize>,
        /// Print a report (blocks compared, sent, holes punched, bytes on
        /// the wire, time)
        #[arg(long)]
        stats: bool,
        /// Read the image even while a running qemu has it open for
        /// writing (as qemu-img -U); what is read may then be
        /// inconsistent, and a change while it is read is still an error
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        #[command(flatten)]
        ssh: ssh::SshArgs,
        #[command(flatten)]
        reporting: progress::Reporting,
        /// human: print nothing on success; json: a final report
        #[arg(long, value_enum, default_value = "human")]
        output: OutputFormat,
        /// The source image: a path, [user@]host:PATH or ssh://... (with
        /// --rollback: the destination to restore)
        #[arg(value_name = "SRC")]
        src: OsString,
        /// The image made identical to SRC (a raw file or block device): a
        /// path, [user@]host:PATH or ssh://...
        #[arg(value_name = "DST")]
        dst: Option<OsString>,
    },
    /// The far end of a remote transfer, speaking the imgsync protocol on
    /// stdin/stdout (started over SSH by imgsync, not by hand)
    ///
    /// As the forced command of a backup host's key (authorized_keys:
    /// `command="imgsync serve --restrict /srv/backup",restrict ssh-ed25519
    /// AAAA...`), --restrict confines every path the client names to DIR
    /// and --read-only refuses every write.
    Serve {
        /// Give up when the client sends nothing for this many seconds (0:
        /// never); the client passes its own --timeout
        #[arg(long, value_name = "SECONDS", default_value_t = 60, value_parser = ssh::parse_timeout)]
        timeout: u64,
        /// Only paths inside DIR (relative paths are taken from DIR;
        /// symlinks are followed only while they stay inside; checked
        /// again on every file opened); anything else is refused
        #[arg(long, value_name = "DIR")]
        restrict: Option<std::path::PathBuf>,
        /// Refuse every request that writes (push, sync to here,
        /// --rollback): the key can only read
        #[arg(long)]
        read_only: bool,
        /// Limit what this end writes to RATE per second (rsync's form);
        /// the client's --bwlimit applies too, the smaller wins
        #[arg(long, value_name = "RATE", value_parser = size::parse_rate)]
        bwlimit: Option<u64>,
    },
    /// Man pages and shell completions from these definitions (for
    /// packagers)
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        what: Generate,
    },
    /// Validate an image's metadata, with qemu-img check's exit status
    ///
    /// Exit 0 clean, 2 corruption found, 3 only leaked clusters (wasted
    /// space, no harm to data), 1 the check could not be completed (the
    /// image cannot be opened or read). With 2 or 3 one stderr line names
    /// the image and the counts. Only the image's own tables are read: a
    /// backing file or data file it names is shown by `info`, never opened.
    Check {
        /// Image format (probed from the magic when absent)
        #[arg(short = 'f', long = "format", value_enum)]
        format: Option<FormatArg>,
        /// human, or json: qemu-img check's counts and key names
        #[arg(long, value_enum, default_value = "human")]
        output: OutputFormat,
        /// Read the image even while a running qemu has it open for
        /// writing (as qemu-img -U); what is read may then be
        /// inconsistent, and a change while it is read is still an error
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
        #[command(flatten)]
        ssh: ssh::SshArgs,
        /// The image: a path, [user@]host:PATH or ssh://...
        image: OsString,
    },
}

#[derive(Subcommand, Debug)]
enum Generate {
    /// Write a man page for imgsync and one per subcommand into DIR
    Man {
        /// The directory to write imgsync.1, imgsync-convert.1, ... into
        dir: std::path::PathBuf,
    },
    /// Print the completion script for SHELL on stdout
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
}

/// `--threads N`: at least one.
fn parse_threads(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("0 threads cannot do the work: give at least 1 (the default is one per core, at most 8)".into()),
        Ok(n) if n > 256 => Err(format!("{n} threads is more than the 256 imgsync runs")),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{s}' is not a number of threads")),
    }
}

/// `imgsync --version`: the version, the protocol version (what a peer
/// must speak) and the git commit when built from a checkout.
fn version_line() -> &'static str {
    static LINE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    LINE.get_or_init(|| {
        let commit = env!("IMGSYNC_GIT_COMMIT");
        let commit = if commit.is_empty() {
            String::new()
        } else {
            format!(", commit {commit}")
        };
        format!(
            "{} (protocol {}{commit})",
            env!("CARGO_PKG_VERSION"),
            session::PROTOCOL_VERSION
        )
    })
}

/// The clap definitions, with the version line.
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    Cli::command().version(version_line())
}

/// `imgsync generate man DIR | completions SHELL`.
fn generate(what: Generate) -> anyhow::Result<u8> {
    use anyhow::Context;
    let cmd = command();
    match what {
        Generate::Man { dir } => {
            std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
            clap_mangen::generate_to(cmd, &dir).with_context(|| dir.display().to_string())?;
        }
        Generate::Completions { shell } => {
            let mut cmd = cmd;
            let mut out = output::stdout();
            clap_complete::generate(shell, &mut cmd, "imgsync", &mut out);
            std::io::Write::flush(&mut out)?;
        }
    }
    Ok(exit::OK)
}

/// info, map or check of a local or remote image.
fn query(
    command: Query,
    image: &OsString,
    format: Option<FormatArg>,
    output: OutputFormat,
    force_share: bool,
    ssh: &ssh::SshArgs,
) -> anyhow::Result<u8> {
    let format = format.map(Into::into);
    let locking = locking(force_share);
    match location::Location::parse(image)? {
        location::Location::Local(p) => match command {
            Query::Info => info::run(&p, format, locking, output),
            Query::Map => map::run(&p, format, locking, output),
            Query::Check => check::run(&p, format, locking, output),
        },
        location::Location::Remote { host, path } => {
            let client = session::Client::connect(&host, &ssh.options())?;
            if command == Query::Check {
                // Asked for as JSON whatever `output` is, and printed here
                // from that report: the exit status and stderr line then
                // come from the counts, as for a local check.
                let report = client.check(&path, format, force_share)?;
                check::print_stdout(&report, output)?;
                return check::finish(&session::location_name(&host, &path), &report);
            }
            let json = output == OutputFormat::Json;
            let mut out = output::stdout();
            Ok(client.query(&path, command, format, json, force_share, &mut out)?)
        }
        location::Location::Stdio => anyhow::bail!("-: not an image (use a file or host:PATH)"),
    }
}

/// What `imgsync serve` prints for a remote info, map or check: the same
/// listings as for a local image.
struct Listings;

impl session::Hooks for Listings {
    fn query(
        &self,
        query: Query,
        path: &std::path::Path,
        format: Option<Format>,
        locking: crate::io::Locking,
        json: bool,
        out: &mut dyn std::io::Write,
    ) -> session::Result<u8> {
        let output = if json {
            OutputFormat::Json
        } else {
            OutputFormat::Human
        };
        let r = match query {
            Query::Info => info::run_to(out, path, format, locking, output),
            Query::Map => map::run_to(out, path, format, locking, output),
            Query::Check => check::run_to(out, path, format, locking, output),
        };
        r.map_err(session::Error::other)
    }

    fn warn_in_use(&self, in_use: &[std::path::PathBuf], what: &str) {
        warn_in_use(in_use, what)
    }

    fn warn(&self, line: &str) {
        output::eprint_line(&format!("imgsync: {line}"))
    }
}

/// `imgsync serve`: one request on stdin/stdout.
fn serve(
    timeout: u64,
    restrict: Option<std::path::PathBuf>,
    read_only: bool,
    bwlimit: Option<u64>,
) -> anyhow::Result<u8> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        anyhow::bail!(
            "serve: is started by an imgsync client over SSH (imgsync convert|sync ... HOST:PATH), not by hand: it speaks the imgsync protocol on stdin and stdout"
        );
    }
    let opts = session::ServeOptions {
        timeout: (timeout > 0).then(|| std::time::Duration::from_secs(timeout)),
        cancel: progress::interrupt_flag(),
        restrict,
        read_only,
        bwlimit: bwlimit.filter(|&r| r > 0),
        ..Default::default()
    };
    session::serve_stdio(&opts, &Listings)?;
    Ok(exit::OK)
}

/// qemu's locks on what a command reads: qemu-img's, or none in the way
/// with `-U`.
pub fn locking(force_share: bool) -> crate::io::Locking {
    if force_share {
        crate::io::Locking::ForceShare
    } else {
        crate::io::Locking::Read
    }
}

/// With `-U`: one warning line per file a writer holds, as the error lines
/// are written. `what`: what may be inconsistent.
pub fn warn_in_use(in_use: &[std::path::PathBuf], what: &str) {
    for p in in_use {
        eprintln!(
            "imgsync: {}: warning: in use by another process (a running VM?) and read anyway (-U): {what} may be inconsistent",
            p.display()
        );
    }
}

/// A clap error as imgsync's errors are: one line, `imgsync: <what>:
/// <problem>`, and a hint line only for an unknown command.
fn clap_error_lines(e: &clap::Error) -> Vec<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let context = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        Some(ContextValue::Strings(v)) => Some(v.join(", ")),
        _ => None,
    };
    match e.kind() {
        ErrorKind::InvalidSubcommand => {
            let name = context(ContextKind::InvalidSubcommand).unwrap_or_default();
            let hint = match context(ContextKind::SuggestedSubcommand) {
                Some(s) => {
                    format!("imgsync: did you mean '{s}'? (imgsync --help lists the commands)")
                }
                None => "imgsync: imgsync --help lists the commands".to_string(),
            };
            vec![format!("imgsync: '{name}' is not an imgsync command"), hint]
        }
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand | ErrorKind::MissingSubcommand => {
            vec!["imgsync: a command is needed: info, map, convert, compare, sync or check (imgsync --help says more)".into()]
        }
        ErrorKind::ValueValidation | ErrorKind::InvalidValue => {
            let arg = context(ContextKind::InvalidArg).map(|a| arg_name(&a));
            let value = context(ContextKind::InvalidValue).unwrap_or_default();
            let why = match (e.kind(), std::error::Error::source(e)) {
                (ErrorKind::ValueValidation, Some(s)) => s.to_string(),
                _ => match context(ContextKind::ValidValue) {
                    Some(valid) => format!("invalid value '{value}' (one of: {valid})"),
                    None => format!("invalid value '{value}'"),
                },
            };
            match arg {
                Some(a) => vec![format!("imgsync: {a}: {why}")],
                None => vec![format!("imgsync: {why}")],
            }
        }
        _ => {
            // clap's own text on one line: its usage and tips dropped.
            let text = e.render().to_string();
            let parts: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:"))
                .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
                .collect();
            let line = parts.join(" ");
            let line = line.strip_prefix("error: ").unwrap_or(&line);
            vec![format!("imgsync: {line}")]
        }
    }
}

/// An argument as clap names it in an error (`--sparse-size <SIZE>`,
/// `<SRC>`) as the user would type it: its short form when it has one
/// (`-S`), else its long one; a positional by its name.
fn arg_name(clap_name: &str) -> String {
    let first = clap_name.split([' ', '=']).next().unwrap_or(clap_name);
    if let Some(long) = first.strip_prefix("--") {
        let cmd = command();
        let sub = std::env::args().nth(1);
        let short = sub
            .and_then(|s| cmd.find_subcommand(&s).cloned())
            .into_iter()
            .chain(std::iter::once(cmd.clone()))
            .find_map(|c| {
                c.get_arguments()
                    .find(|a| a.get_long() == Some(long))
                    .and_then(|a| a.get_short())
            });
        if let Some(s) = short {
            return format!("-{s}");
        }
        return first.to_string();
    }
    first
        .trim_start_matches('<')
        .trim_end_matches('>')
        .trim_end_matches("...")
        .to_string()
}

pub fn main() -> ExitCode {
    use clap::FromArgMatches;
    let parsed = command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m));
    let cli = match parsed {
        Ok(c) => c,
        Err(e) => {
            // `check` has no usage-error status of its own: like qemu-img
            // check, it says "not completed" (its 2 means corruption).
            let is_check = std::env::args_os().nth(1).is_some_and(|a| a == "check");
            let code = if !e.use_stderr() {
                exit::OK
            } else if is_check {
                exit::CHECK_INCOMPLETE
            } else {
                exit::ERROR
            };
            // clap prints with print!/eprint!, which panic on a closed
            // stream: render it and write it ourselves.
            if e.use_stderr() {
                for line in clap_error_lines(&e) {
                    output::eprint_line(&line);
                }
            } else {
                use std::io::Write;
                let text = e.render().ansi().to_string();
                let _ = std::io::stdout().write_all(text.as_bytes());
            }
            return ExitCode::from(code);
        }
    };
    // Only a command that prints a listing may end quietly when the reader
    // of its stdout goes away (`imgsync map img | head`); convert, sync
    // and serve never do: their output is the point.
    let listing = matches!(
        cli.command,
        Command::Info { .. }
            | Command::Map { .. }
            | Command::Check { .. }
            | Command::Compare { .. }
    );
    let error_code = match cli.command {
        Command::Check { .. } => exit::CHECK_INCOMPLETE,
        _ => exit::ERROR,
    };
    let result = match cli.command {
        Command::Info {
            format,
            output,
            force_share,
            ssh,
            image,
        } => query(Query::Info, &image, format, output, force_share, &ssh),
        Command::Map {
            format,
            output,
            force_share,
            ssh,
            image,
        } => query(Query::Map, &image, format, output, force_share, &ssh),
        Command::Check {
            format,
            output,
            force_share,
            ssh,
            image,
        } => query(Query::Check, &image, format, output, force_share, &ssh),
        Command::Convert {
            format,
            output_format,
            compress,
            compression_type,
            sparse_size,
            cluster_size,
            options,
            target_is_zero,
            no_space_check,
            threads,
            compress_level,
            stats,
            force_share,
            ssh,
            reporting,
            output,
            src,
            dst,
        } => convert::run(convert::Args {
            src,
            dst,
            format: format.map(Into::into),
            output_format: output_format.map(Into::into),
            compress,
            compression_type: compression_type.map(|c| match c {
                CompressionArg::Zstd => imgsync_formats::qcow2::CompressionType::Zstd,
                CompressionArg::Zlib => imgsync_formats::qcow2::CompressionType::Zlib,
            }),
            min_sparse: sparse_size,
            cluster_size,
            options,
            target_is_zero,
            no_space_check,
            threads,
            compress_level,
            stats,
            force_share,
            ssh,
            reporting,
            output,
        }),
        Command::Serve {
            timeout,
            restrict,
            read_only,
            bwlimit,
        } => serve(timeout, restrict, read_only, bwlimit),
        Command::Generate { what } => generate(what),
        Command::Sync {
            format,
            output_format,
            compress,
            compression_type,
            cluster_size,
            block_size,
            no_journal,
            checksum,
            rollback,
            no_space_check,
            compress_level,
            threads,
            stats,
            force_share,
            ssh,
            reporting,
            output,
            src,
            dst,
        } => sync::run(sync::Args {
            paths: std::iter::once(src).chain(dst).collect(),
            format: format.map(Into::into),
            output_format: output_format.map(Into::into),
            compress,
            compression_type: compression_type.into(),
            cluster_size,
            block_size,
            no_journal,
            checksum,
            rollback,
            no_space_check,
            compress_level,
            threads,
            stats,
            force_share,
            ssh,
            reporting,
            output,
        }),
        Command::Compare {
            format,
            format_b,
            reporting,
            output,
            force_share,
            ssh,
            a,
            b,
        } => compare::run(compare::Args {
            a,
            b,
            format_a: format.map(Into::into),
            format_b: format_b.map(Into::into),
            reporting,
            output,
            force_share,
            ssh,
        }),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            if listing && output::is_stdout_closed(&e) {
                return ExitCode::from(exit::OK);
            }
            output::eprint_line(&format!("imgsync: {}", output::one_line(&e)));
            // Stopped by a signal: the shell's status for it (130 for
            // Ctrl-C), after the line saying what the stop left.
            ExitCode::from(progress::interrupted_status().unwrap_or(error_code))
        }
    }
}
