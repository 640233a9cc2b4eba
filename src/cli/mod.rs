//! The command line: clap → typed options, human/json output, exit codes.
//! Errors are printed here, once, as `imgsync: <file>: <what>: <cause>`.

mod check;
mod info;
mod map;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use imgsync_formats::Format;

/// Exit statuses (the contract in CLI.md): 0 success, 1 differs (compare),
/// 2 error, 3 corruption found (check).
pub mod exit {
    pub const OK: u8 = 0;
    pub const DIFFERS: u8 = 1;
    pub const ERROR: u8 = 2;
    pub const CORRUPT: u8 = 3;
}

#[derive(Parser, Debug)]
#[command(
    name = "imgsync",
    version,
    about = "Move and sync sparse VM disk images (raw, QCOW2)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Human,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    Raw,
    Qcow2,
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
    Info {
        /// Image format (probed from the magic when absent)
        #[arg(short = 'f', long = "format", value_enum)]
        format: Option<FormatArg>,
        #[arg(long, value_enum, default_value = "human")]
        output: OutputFormat,
        image: PathBuf,
    },
    /// List which ranges of the guest hold data, zeros or nothing (no data is read)
    Map {
        #[arg(short = 'f', long = "format", value_enum)]
        format: Option<FormatArg>,
        #[arg(long, value_enum, default_value = "human")]
        output: OutputFormat,
        image: PathBuf,
    },
    /// Validate an image's metadata: exit 0 clean, 3 corruption found, 2 error
    Check {
        #[arg(short = 'f', long = "format", value_enum)]
        format: Option<FormatArg>,
        #[arg(long, value_enum, default_value = "human")]
        output: OutputFormat,
        image: PathBuf,
    },
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::ERROR
            } else {
                exit::OK
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let result = match cli.command {
        Command::Info {
            format,
            output,
            image,
        } => info::run(&image, format.map(Into::into), output),
        Command::Map {
            format,
            output,
            image,
        } => map::run(&image, format.map(Into::into), output),
        Command::Check {
            format,
            output,
            image,
        } => check::run(&image, format.map(Into::into), output),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            if output::is_broken_pipe(&e) {
                return ExitCode::from(exit::OK);
            }
            eprintln!("imgsync: {}", output::one_line(&e));
            ExitCode::from(exit::ERROR)
        }
    }
}
