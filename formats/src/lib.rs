//! imgsync-formats: the on-disk formats imgsync reads (raw, QCOW2).
//!
//! This crate owns headers, table decoding, validation, allocation maps and guest
//! reads. It does no networking and sees no paths: everything is read through the
//! small positioned-read trait [`Storage`], so tests and fuzzers pass a `Vec<u8>`
//! and the `imgsync` crate passes real files (with SEEK_DATA/SEEK_HOLE allocation).
#![forbid(unsafe_code)]

pub mod error;
pub mod image;
pub mod probe;
pub mod qcow2;
pub mod raw;
pub mod storage;

pub use error::{Error, ErrorKind, Result};
pub use image::{Extent, ExtentKind, Extents, HostRun, Image, Layer};
pub use probe::{probe, Format};
pub use storage::{Storage, WriteStorage};
