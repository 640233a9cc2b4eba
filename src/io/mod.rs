//! Local I/O: files and block devices as [`formats::Storage`], allocation from
//! SEEK_DATA/SEEK_HOLE, making ranges read as zeros ([`zero`]), and opening
//! images with their backing chains.

pub mod confine;
pub mod cpu;
pub mod file;
pub mod hashcache;
pub mod journal;
pub mod lock;
pub mod open;
pub mod output;
pub mod owned;
pub mod watch;
pub mod zero;

pub use file::LocalFile;
pub use open::{
    open_image, open_metadata_source, open_source, Locking, OpenError, OpenOptions, Source,
};
pub use output::{FileMeta, Output};
