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
    /// The blocks changed (runs), and the sum of their new hashes: after
    /// the update DST is read back through a fresh reader and must give
    /// the same sum (`verify`).
    changed: Vec<(u64, u64)>,
    changed_sum: SumDigest,
    /// For the new hash cache (`io::hashcache`): each block written, its
    /// new hash (none when zero), and the runs made zero.
    pub changed_spool: Option<crate::io::hashcache::Spool>,
    pub punched_runs: Vec<(u64, u64)>,
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
            changed: Vec::new(),
            changed_sum: SumDigest::default(),
            changed_spool: None,
            punched_runs: Vec::new(),
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
            let h = block_hash(&self.key, b, block);
            if let Some(h) = &h {
                self.digest.add(h);
                self.changed_sum.add(h);
            }
            if let Some(s) = &mut self.changed_spool {
                s.push(b, h.as_ref());
            }
        }
        self.note_changed(first, n);
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
        self.note_changed(first, count);
        if self.changed_spool.is_some() {
            match self.punched_runs.last_mut() {
                Some((f, c)) if *f + *c == first => *c += count,
                _ => self.punched_runs.push((first, count)),
            }
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

    fn note_changed(&mut self, first: u64, count: u64) {
        match self.changed.last_mut() {
            Some((f, c)) if *f + *c == first => *c += count,
            _ => self.changed.push((first, count)),
        }
    }

    /// Reads every changed block back through a fresh reader of DST's
    /// file (its header, L1 and L2 tables as now on disk) and checks the
    /// sum of their hashes against what was meant: the metadata really
    /// maps the new content (an update's own bookkeeping is not taken for
    /// it). A written block never leaves a cluster unallocated where a
    /// backing file could show through, so the top layer alone is read.
    pub fn verify(&self, file: &File) -> Result<()> {
        use imgsync_formats::qcow2::Qcow2;
        let local = crate::io::LocalFile::from_file(file.try_clone().map_err(Error::Dest)?)
            .map_err(Error::Dest)?;
        let q = Qcow2::open(std::sync::Arc::new(local)).map_err(Self::dst_err)?;
        let backed = q.header().backing_file.is_some();
        let mut sum = SumDigest::default();
        let mut buf = Vec::new();
        for &(first, count) in &self.changed {
            for b in first..first + count {
                let from = b * self.bs;
                let len = self.src_size.saturating_sub(from).min(self.bs) as usize;
                buf.clear();
                buf.resize(len, 0);
                q.read_at(&mut buf, from, &mut |out: &mut [u8], pos: u64| {
                    if backed {
                        return Err(imgsync_formats::Error::Invalid(format!(
                            "guest offset {pos:#x} was written but is not allocated"
                        )));
                    }
                    out.fill(0);
                    Ok(())
                })
                .map_err(Self::dst_err)?;
                if let Some(h) = block_hash(&self.key, b, &buf) {
                    sum.add(&h);
                }
            }
        }
        if sum.bytes() != self.changed_sum.bytes() {
            return Err(Error::Dest(io::Error::other(
                "the updated qcow2 does not read back as written (the journal is kept: roll it back with `imgsync sync --rollback`)",
            )));
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use imgsync_formats::qcow2::{ClusterKind, Qcow2};

    fn qemu_img(args: &[&str]) -> bool {
        let ok = std::process::Command::new("qemu-img")
            .args(args)
            .status()
            .is_ok_and(|s| s.success());
        if !ok && std::env::var("IMGSYNC_REQUIRE_QEMU").as_deref() == Ok("1") {
            panic!("qemu-img {args:?} failed and IMGSYNC_REQUIRE_QEMU=1");
        }
        ok
    }

    /// The read-back check is the image's own word, not the update's
    /// bookkeeping: content changed under the metadata after an update is
    /// caught.
    #[test]
    fn verify_reads_the_update_back_through_a_fresh_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.qcow2");
        if !qemu_img(&["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "1M"]) {
            eprintln!("SKIP: no qemu-img");
            return;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let image = crate::io::open_image(
            &path,
            crate::io::OpenOptions {
                format: Some(imgsync_formats::Format::Qcow2),
                allow_corrupt: false,
                locking: crate::io::Locking::None,
            },
        )
        .unwrap();
        let jf = JournaledFile::new(&file, None, 65536).unwrap();
        let updater = Updater::open(&jf).unwrap();
        let mut a = Qcow2Applier::new(
            updater,
            jf,
            &image,
            65536,
            1 << 20,
            [3; 32],
            SumDigest::default(),
        );
        a.put_blocks(1, vec![7u8; 65536]).unwrap();
        a.finish().unwrap();
        a.verify(&file).expect("what was written reads back");
        // The data cluster's bytes changed behind the metadata's back.
        let q = Qcow2::open(std::sync::Arc::new(
            crate::io::LocalFile::from_file(file.try_clone().unwrap()).unwrap(),
        ))
        .unwrap();
        let ClusterKind::Data { host_offset } = q.lookup(65536, 65536).unwrap().kind else {
            panic!("block 1 is not a data cluster");
        };
        file.write_all_at(&[0xee; 512], host_offset + 512).unwrap();
        let e = a.verify(&file).expect_err("a changed cluster is caught");
        assert!(e.to_string().contains("does not read back"), "{e}");
    }
}
