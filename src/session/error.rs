//! The errors of a session, each one line naming what it is about: the host
//! (what the peer said, its exit status or stderr, ssh's own failure), or
//! the file on this host (SRC, DST, a journal). The cli prints them after
//! `imgsync: `, joining the chain of causes with `: `.

use std::path::Path;

use crate::engine;

/// A failed request, attributed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A complete line that names its host or file: the peer's own words,
    /// a refusal, what a failed sync left DST as.
    #[error("{0}")]
    Said(String),
    /// Something at `name` (a file, a host, `stdout`, `-`) failed; the
    /// cause follows in the chain.
    #[error("{name}")]
    At {
        name: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An error that names its file itself (a source that changed, a
    /// journal, what a local query hook returned).
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync>),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// `name: cause`.
    pub fn at(
        name: impl std::fmt::Display,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Error {
        Error::At {
            name: name.to_string(),
            source: source.into(),
        }
    }

    pub fn said(s: impl Into<String>) -> Error {
        Error::Said(s.into())
    }

    pub fn other(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
        Error::Other(e.into())
    }

    /// The error and its causes on one line, `outer: inner: cause`, with
    /// repeated parts and newlines removed (as the cli prints errors).
    pub fn one_line(&self) -> String {
        one_line(self)
    }
}

/// `e` and its causes on one line, repeated parts dropped.
pub fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(e);
    while let Some(cause) = next {
        let s = cause.to_string().replace('\n', " ");
        if !s.is_empty() && !parts.last().is_some_and(|p| p.ends_with(&s)) {
            parts.push(s);
        }
        next = cause.source();
    }
    parts.join(": ")
}

/// Names the file an engine error belongs to: `src` for what was read,
/// `dst` for what was written, `other` (default `dst`) for compare's second
/// image.
pub fn named(e: engine::Error, src: &Path, dst: &Path, other: Option<&Path>) -> Error {
    let src = src.display();
    let dst = dst.display();
    match e {
        engine::Error::Source(e) => Error::at(src, e),
        engine::Error::Other(e) => Error::at(other.map_or(dst, |p| p.display()), e),
        engine::Error::Dest(e) => Error::at(dst, e),
        engine::Error::DestFormat(e) => Error::at(dst, e),
        e @ engine::Error::NoSpace { .. } => Error::said(format!(
            "{dst}: {e} (nothing was written; --no-space-check skips this check)"
        )),
        e @ engine::Error::DeviceTooSmall { .. } => Error::said(format!("{dst}: {e}")),
        engine::Error::Interrupted => {
            Error::said(format!("{dst}: interrupted; nothing was written"))
        }
        e @ engine::Error::Internal(_) => Error::said(format!("{src}: {e}")),
        // Names the file of the chain that changed.
        e @ engine::Error::SourceChanged(_) => Error::other(e),
        engine::Error::Protocol(e) => Error::other(e),
    }
}

/// An engine error and its causes on one line.
pub(crate) fn engine_line(e: &engine::Error) -> String {
    one_line(e)
}
