//! sync's receiver for an existing qcow2 DST, updated in place. DST's guest
//! view (backing chain included) is hashed like any image; changed blocks
//! go to the format layer's updater (`formats::qcow2::update`), which
//! rewrites plain clusters in place, allocates new ones for compressed,
//! shared or unallocated clusters, and orders its metadata writes as qemu
//! does. It writes through a [`JournaledFile`]: every byte range of DST's
//! file below its old end goes to the undo journal (old content, DST's old
//! length) before it is overwritten or punched, so `--rollback` gives the
//! file back byte for byte; a barrier is a journal sync, the writes, then
//! an fdatasync.
//!
//! Resume of a qcow2 DST is a rollback and a fresh sync (the open step does
//! it): leaked clusters of an interrupted run never stay behind.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use imgsync_formats::qcow2::update::{UpdateFile, UpdateStats, Updater};
use imgsync_formats::Image;

use super::sync::{block_hash, SumDigest};
use super::{Error, Result};
use crate::io::journal::Journal;

/// Test-only: stop the process (as a crash would) right after this many
/// write barriers of a qcow2 DST's update.
const CRASH_HOOK: &str = "IMGSYNC_TEST_CRASH_AFTER_BARRIERS";

enum Pending {
    Write(u64, Vec<u8>),
    Punch(u64, u64),
}

/// DST's file as the updater sees it: writes held until the next barrier,
/// each range journaled first.
pub struct JournaledFile<'a> {
    file: &'a File,
    journal: Option<Journal>,
    /// The journal's block size.
    bs: u64,
    /// DST's file length before the sync: bytes past it need no journal
    /// (rollback cuts the file back to it).
    old_len: u64,
    pending: Vec<Pending>,
    barriers: u64,
    crash_after: Option<u64>,
}

impl<'a> JournaledFile<'a> {
    pub fn new(file: &'a File, journal: Option<Journal>, bs: u64) -> io::Result<Self> {
        let old_len = match &journal {
            Some(j) => j.header().old_size,
            None => file.metadata()?.len(),
        };
        Ok(JournaledFile {
            file,
            journal,
            bs,
            old_len,
            pending: Vec::new(),
            barriers: 0,
            crash_after: std::env::var(CRASH_HOOK).ok().and_then(|v| v.parse().ok()),
        })
    }

    /// Write barriers so far.
    pub fn barriers(&self) -> u64 {
        self.barriers
    }

    /// The journal, once everything is written and durable.
    pub fn take_journal(&mut self) -> Option<Journal> {
        self.journal.take()
    }

    pub fn journal_bytes(&self) -> u64 {
        self.journal.as_ref().map_or(0, Journal::bytes)
    }

    /// Records the old content of every journal block `[off, off + len)`
    /// touches below the old end (a block is recorded once, before its
    /// first change).
    fn journal_range(&mut self, off: u64, len: u64) -> io::Result<()> {
        let Some(j) = self.journal.as_mut() else {
            return Ok(());
        };
        if len == 0 || off >= self.old_len {
            return Ok(());
        }
        let end = off.saturating_add(len).min(self.old_len);
        let mut buf = vec![0u8; self.bs as usize];
        for b in off / self.bs..end.div_ceil(self.bs) {
            let from = b * self.bs;
            let n = self.old_len.saturating_sub(from).min(self.bs) as usize;
            let old = &mut buf[..n];
            old.fill(0);
            let file_len = self.file.metadata()?.len();
            let avail = file_len.saturating_sub(from).min(n as u64) as usize;
            if avail > 0 {
                self.file.read_exact_at(&mut old[..avail], from)?;
            }
            let entry = (!super::zero::is_zero(old)).then_some(&old[..]);
            j.record(b, entry).map_err(io::Error::other)?;
        }
        Ok(())
    }

    /// Journal durable, then the held writes.
    fn apply(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if let Some(j) = self.journal.as_mut() {
            j.sync().map_err(io::Error::other)?;
        }
        for p in std::mem::take(&mut self.pending) {
            match p {
                Pending::Write(off, data) => self.file.write_all_at(&data, off)?,
                Pending::Punch(off, len) => {
                    crate::io::zero::punch_range(self.file, false, off, len)?
                }
            }
        }
        Ok(())
    }
}

impl UpdateFile for JournaledFile<'_> {
    fn len(&self) -> io::Result<u64> {
        let mut len = self.file.metadata()?.len();
        for p in &self.pending {
            if let Pending::Write(off, data) = p {
                len = len.max(off + data.len() as u64);
            }
        }
        Ok(len)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        buf.fill(0);
        let file_len = self.file.metadata()?.len();
        let avail = file_len.saturating_sub(offset).min(buf.len() as u64) as usize;
        if avail > 0 {
            self.file.read_exact_at(&mut buf[..avail], offset)?;
        }
        // What is held for the next barrier reads back as written.
        let end = offset + buf.len() as u64;
        for p in &self.pending {
            let (at, len, data) = match p {
                Pending::Write(at, d) => (*at, d.len() as u64, Some(d)),
                Pending::Punch(at, len) => (*at, *len, None),
            };
            let (a, b) = (at.max(offset), (at + len).min(end));
            if a >= b {
                continue;
            }
            let dst = &mut buf[(a - offset) as usize..(b - offset) as usize];
            match data {
                Some(d) => dst.copy_from_slice(&d[(a - at) as usize..(b - at) as usize]),
                None => dst.fill(0),
            }
        }
        Ok(())
    }

    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.journal_range(offset, buf.len() as u64)?;
        self.pending.push(Pending::Write(offset, buf.to_vec()));
        Ok(())
    }

    fn punch(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.journal_range(offset, len)?;
        self.pending.push(Pending::Punch(offset, len));
        Ok(())
    }

    fn barrier(&mut self) -> io::Result<()> {
        self.apply()?;
        self.file.sync_data()?;
        self.barriers += 1;
        if self.crash_after == Some(self.barriers) {
            // As a crash right after this barrier: nothing more is written.
            std::process::exit(86);
        }
        Ok(())
    }
}

/// Applies a sync's changes to a qcow2 DST and keeps the content digest.
pub struct Qcow2Applier<'a> {
    pub updater: Updater,
    pub file: JournaledFile<'a>,
    /// DST's guest view before the sync (old content, for the digest).
    pub image: &'a Image,
    pub bs: u64,
    pub cluster: u64,
    pub src_size: u64,
    pub key: [u8; 32],
    pub digest: SumDigest,
    pub written: u64,
    pub punched: u64,
    staged: u64,
}

/// The updater flushes (its barriers) after this much staged data.
const APPLY_BATCH: u64 = 32 << 20;

impl<'a> Qcow2Applier<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        updater: Updater,
        file: JournaledFile<'a>,
        image: &'a Image,
        bs: u64,
        src_size: u64,
        key: [u8; 32],
        digest: SumDigest,
    ) -> Self {
        let cluster = updater.cluster_size();
        Qcow2Applier {
            updater,
            file,
            image,
            bs,
            cluster,
            src_size,
            key,
            digest,
            written: 0,
            punched: 0,
            staged: 0,
        }
    }

    fn dst_err(e: imgsync_formats::Error) -> Error {
        Error::DestFormat(e)
    }

    /// Block `b`'s content before the sync, over SRC's extent of it
    /// (zeros past DST's old size), out of the digest.
    fn retire(&mut self, b: u64) -> Result<()> {
        let from = b * self.bs;
        let len = self.src_size.saturating_sub(from).min(self.bs) as usize;
        let mut old = vec![0u8; len];
        let vsize = self.image.virtual_size();
        let avail = vsize.saturating_sub(from).min(len as u64) as usize;
        if avail > 0 {
            self.image
                .read_at(&mut old[..avail], from)
                .map_err(Self::dst_err)?;
        }
        if let Some(h) = block_hash(&self.key, b, &old) {
            self.digest.sub(&h);
        }
        Ok(())
    }

    /// New content for blocks `first..` (whole blocks, the last one cut at
    /// SRC's size).
    pub fn put_blocks(&mut self, first: u64, data: Vec<u8>) -> Result<()> {
        let n = (data.len() as u64).div_ceil(self.bs);
        for (i, block) in data.chunks(self.bs as usize).enumerate() {
            let b = first + i as u64;
            self.retire(b)?;
            if let Some(h) = block_hash(&self.key, b, block) {
                self.digest.add(&h);
            }
        }
        // Whole clusters for the updater: the tail past SRC's size reads
        // as zeros.
        let mut data = data;
        let padded = (data.len() as u64).next_multiple_of(self.cluster);
        data.resize(padded as usize, 0);
        self.updater
            .write(first * self.bs, &data)
            .map_err(Self::dst_err)?;
        self.written += n;
        self.staged += data.len() as u64;
        self.maybe_flush()
    }

    /// Blocks `first..first + count` read as zeros now.
    pub fn put_punch(&mut self, first: u64, count: u64) -> Result<()> {
        for b in first..first + count {
            self.retire(b)?;
        }
        let from = first * self.bs;
        let end = ((first + count) * self.bs).min(self.src_size.next_multiple_of(self.cluster));
        if end > from {
            self.updater.zero(from, end - from).map_err(Self::dst_err)?;
        }
        self.punched += count;
        self.staged += (count * self.bs).min(APPLY_BATCH);
        self.maybe_flush()
    }

    fn maybe_flush(&mut self) -> Result<()> {
        if self.staged >= APPLY_BATCH {
            self.flush()?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        self.staged = 0;
        self.updater.flush(&mut self.file).map_err(Self::dst_err)
    }

    /// Grows DST's virtual size to SRC's before blocks past its end are
    /// written.
    pub fn grow(&mut self) -> Result<()> {
        let want = self.src_size.next_multiple_of(512);
        if want > self.updater.header().size {
            self.updater
                .resize(&mut self.file, want)
                .map_err(Self::dst_err)?;
        }
        Ok(())
    }

    /// Everything staged applied, DST cut to SRC's size, and durable.
    pub fn finish(&mut self) -> Result<UpdateStats> {
        self.flush()?;
        let want = self.src_size.next_multiple_of(512);
        if want != self.updater.header().size {
            self.updater
                .resize(&mut self.file, want)
                .map_err(Self::dst_err)?;
        }
        self.file.barrier().map_err(Error::Dest)?;
        Ok(self.updater.stats())
    }
}
