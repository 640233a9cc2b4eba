//! imgsync: move and sync sparse VM disk images (raw, QCOW2).
//!
//! Layers (see the workspace README): `imgsync_formats` (on-disk formats),
//! [`io`] (files, block devices, SEEK_DATA/SEEK_HOLE, opening images with
//! their backing chains) and [`cli`] (the command line).

pub mod cli;
pub mod engine;
pub mod io;
pub mod protocol;
pub mod session;
pub mod transport;

pub use imgsync_formats as formats;
