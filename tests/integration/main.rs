//! The integration tests: one binary, with qemu-img as the oracle.
//!   formats: reading raw and qcow2 images (info, map, guest bytes, check),
//!            and converting every case (convert's oracle in `common`);
//!   convert: convert and compare on their own (zero detection, atomic
//!            output, free space, signals, block devices);
//!   remote:  convert over a real sshd, both transports;
//!   sync:    imgsync sync locally and over sshd (change patterns,
//!            interruptions, rollback, a small file system);
//!   lock:    qemu's image locks against a running qemu-io, and a source
//!            that changes while it is read (local, device, over sshd).
//!   perms:   new images keep the source's mode and owner, every path;
//!   sizes:   raw copies keep a raw file's exact size, every path;
//!   sync_format: sync -f/-O name DST's format (qcow2 files synced as bytes);
//!   sync_qcow2: sync into existing qcow2 DSTs, in place (kinds x patterns,
//!            crashes at every barrier, refusals, over sshd);
//!   sync_qcow2_faults: a qcow2 DST's faults: SIGKILL at ten points (local,
//!            remote receiver, remote sender), a dropped connection, a full
//!            file system, then rerun or --rollback; an encrypted DST, a
//!            backing-chain SRC, a serve without SYNC_CREATE;
//!   example: examples/sync_to_host.rs, the library API, against the sshd;
//!   admin:   ssh_config handed to OpenSSH (a jump host), a forced
//!            `serve --restrict DIR [--read-only]`, --bwlimit.
//!   cli:     --progress=json streams, SIGUSR1, man pages and completions,
//!            one-line usage errors, option checks, SIGINT's status.
//!
//! Without qemu-img every test prints SKIP and passes, unless
//! IMGSYNC_REQUIRE_QEMU=1.

#[macro_use]
mod common;
mod admin;
mod cli;
mod convert;
mod example;
mod formats;
mod lock;
mod perms;
mod remote;
mod sizes;
mod sshd;
mod sync;
mod sync_format;
mod sync_qcow2;
mod sync_qcow2_faults;
mod transport;
mod trust;
