//! `imgsync compare A B`: exit 0 identical, 1 different (the first
//! differing offset is printed), 2 error. Output as `qemu-img compare`.

use std::path::PathBuf;

use anyhow::Result;
use imgsync_formats::Format;

use super::convert::engine_error;
use super::progress::{interrupt_flag, progress_of, Reporting};
use super::{exit, OutputFormat};
use crate::engine::compare::{self, Outcome};
use crate::io::{open_image, OpenOptions};

pub struct Args {
    pub a: PathBuf,
    pub b: PathBuf,
    pub format_a: Option<Format>,
    pub format_b: Option<Format>,
    pub reporting: Reporting,
    pub output: OutputFormat,
}

pub fn run(args: Args) -> Result<u8> {
    let open = |path: &PathBuf, format| {
        open_image(
            path,
            OpenOptions {
                format,
                allow_corrupt: false,
            },
        )
    };
    let a = open(&args.a, args.format_a)?;
    let b = open(&args.b, args.format_b)?;
    let cancel = interrupt_flag();
    let bar = args.reporting.bar();
    let progress = progress_of(&bar);
    let result = compare::compare(&a, &b, progress, &cancel);
    drop(bar);
    let (outcome, _stats) = result.map_err(|e| engine_error(e, &args.a, &args.b, Some(&args.b)))?;
    let size_mismatch = a.virtual_size() != b.virtual_size();
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
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        OutputFormat::Human if !args.reporting.quiet => {
            if size_mismatch {
                println!("Warning: Image size mismatch!");
            }
            match outcome {
                Outcome::Identical => println!("Images are identical."),
                Outcome::Differs { offset } => println!("Content mismatch at offset {offset}!"),
            }
        }
        OutputFormat::Human => {}
    }
    Ok(match outcome {
        Outcome::Identical => exit::OK,
        Outcome::Differs { .. } => exit::DIFFERS,
    })
}
