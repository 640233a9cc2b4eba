//! `imgsync compare A B`: exit 0 identical, 1 different (the first
//! differing offset is printed), 2 error. Output as `qemu-img compare`.

use std::ffi::OsString;
use std::path::Path;

use anyhow::{bail, Result};
use imgsync_formats::Format;

use super::location::Location;
use super::progress::{interrupt_flag, Reporting};
use super::ssh::SshArgs;
use super::{exit, OutputFormat};
use crate::engine::compare::{self, Outcome};
use crate::io::{open_source, OpenOptions};
use crate::session::{named, Client};

pub struct Args {
    pub a: OsString,
    pub b: OsString,
    pub format_a: Option<Format>,
    pub format_b: Option<Format>,
    pub reporting: Reporting,
    pub output: OutputFormat,
    pub force_share: bool,
    pub ssh: SshArgs,
}

pub fn run(args: Args) -> Result<u8> {
    let open = |path: &Path, format| -> Result<imgsync_formats::Image> {
        let source = open_source(
            path,
            OpenOptions {
                format,
                allow_corrupt: false,
                locking: super::locking(args.force_share),
            },
        )?;
        super::warn_in_use(&source.in_use, "the comparison");
        Ok(source.image)
    };
    let cancel = interrupt_flag();
    let reporter = args.reporting.reporter()?;
    let progress = &reporter;
    let (outcome, size_mismatch) = match (Location::parse(&args.a)?, Location::parse(&args.b)?) {
        (Location::Local(pa), Location::Local(pb)) => {
            let a = open(&pa, args.format_a)?;
            let b = open(&pb, args.format_b)?;
            let result = compare::compare(&a, &b, progress, &cancel);
            let (outcome, _stats) = result.map_err(|e| named(e, &pa, &pb, Some(&pb)))?;
            (outcome, a.virtual_size() != b.virtual_size())
        }
        // Contents are compared both ways alike: the remote side is pulled
        // as a stream, whichever argument it is.
        (Location::Local(pa), Location::Remote { host, path }) => {
            let a = open(&pa, args.format_a)?;
            let client = Client::connect(&host, &args.ssh.options_for(args.reporting.quiet))?;
            let r = client.compare(&a, &pa, &path, args.format_b, args.force_share, progress)?;
            (r.outcome, r.size_mismatch)
        }
        (Location::Remote { host, path }, Location::Local(pb)) => {
            let b = open(&pb, args.format_b)?;
            let client = Client::connect(&host, &args.ssh.options_for(args.reporting.quiet))?;
            let r = client.compare(&b, &pb, &path, args.format_a, args.force_share, progress)?;
            (r.outcome, r.size_mismatch)
        }
        (a, b) => bail!("{a} / {b}: compare needs at least one local image"),
    };
    reporter.done();
    drop(reporter);
    // A reader that went away (`compare a b | head -0`) does not change the
    // verdict: the exit status still says identical or different.
    match print(&args, outcome, size_mismatch) {
        Err(e) if super::output::is_stdout_closed(&e) => {}
        r => r?,
    }
    Ok(match outcome {
        Outcome::Identical => exit::OK,
        Outcome::Differs { .. } => exit::DIFFERS,
    })
}

fn print(args: &Args, outcome: Outcome, size_mismatch: bool) -> Result<()> {
    use std::io::Write;
    let mut out = super::output::stdout();
    match args.output {
        OutputFormat::Json => {
            let v = serde_json::json!({
                "identical": outcome == Outcome::Identical,
                "first-difference": match outcome {
                    Outcome::Differs { offset } => Some(offset),
                    Outcome::Identical => None,
                },
                "size-mismatch": size_mismatch,
            });
            writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        }
        OutputFormat::Human if !args.reporting.quiet => {
            if size_mismatch {
                writeln!(out, "Warning: Image size mismatch!")?;
            }
            match outcome {
                Outcome::Identical => writeln!(out, "Images are identical.")?,
                Outcome::Differs { offset } => {
                    writeln!(out, "Content mismatch at offset {offset}!")?
                }
            }
        }
        OutputFormat::Human => {}
    }
    out.flush()?;
    Ok(())
}
