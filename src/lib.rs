//! imgsync: move and sync sparse VM disk images (raw, QCOW2).
//!
//! Layers, one way: [`cli`] → [`session`] → [`engine`] → {[`protocol`],
//! [`io`], [`formats`]}, and [`session`] → [`transport`].
//!
//! The public API for programs that drive transfers (an orchestrator that
//! syncs many images to many hosts) is [`session`]:
//! - [`session::Client`]: a connection to `imgsync serve` on a host
//!   ([`session::Host`], [`session::ConnectOptions`]), with one method per
//!   request: `push`, `pull` ([`session::TransferOptions`] →
//!   [`session::TransferReport`]), `sync_push`, `sync_pull`
//!   ([`session::SyncOptions`] → [`engine::sync::SyncReport`]),
//!   `rollback`, `query`, `check` and `compare`;
//! - [`session::sync_local`]: a sync with both ends on this host;
//! - [`session::stream`]: one-way protocol streams (`convert SRC -`);
//! - [`session::Error`]: every failure, one line naming the host or file.
//!
//! Around it: [`io::open_source`] opens a local image (with its backing
//! chain and qemu's locks) and [`engine::Progress`] is the progress sink.
//! `examples/sync_to_host.rs` shows them together. [`cli`] is the command
//! line and not an API; the other modules are public for the tests,
//! benches and fuzzers and may change.

pub mod cli;
pub mod engine;
pub mod io;
pub mod protocol;
pub mod session;
pub mod transport;

pub use imgsync_formats as formats;
