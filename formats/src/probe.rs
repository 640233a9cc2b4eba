//! Format probing from an image's first bytes.

use std::fmt;

/// Image formats imgsync reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    /// The name qemu-img uses (`raw`, `qcow2`).
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }

    /// Parses a format name as given to `-f`/`-O`.
    pub fn from_name(name: &str) -> Option<Format> {
        match name {
            "raw" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            _ => None,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Guesses the format from the first bytes of an image: QCOW2 by its magic
/// (`QFI\xfb`), anything else is raw.
pub fn probe(first_bytes: &[u8]) -> Format {
    if first_bytes.starts_with(&crate::qcow2::header::MAGIC.to_be_bytes()) {
        Format::Qcow2
    } else {
        Format::Raw
    }
}
