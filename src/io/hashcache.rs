//! The hash cache of a sync destination: `.NAME.imgsync-hashes` beside a
//! raw file or qcow2 DST, written after a successful sync. It holds the
//! keyed hash of every non-zero block of DST's content as the sync left it,
//! with the key, the block size, the content's size (a qcow2's guest view is
//! not its file's length) and DST's file identity (device, inode, size,
//! mtime, ctime). The
//! next sync into DST uses it instead of reading DST when the identity is
//! unchanged (any write to the file changes its ctime, which no user can
//! set), so a sync that finds little changed reads only SRC. `--checksum`
//! skips it; block devices never have one (writes to a device do not
//! change its node's times).
//!
//! Layout (big-endian): a 136-byte header (magic, version, block size,
//! key, file size, identity, entry count, content size, crc32 of the
//! header), `count` entries
//! of 40 bytes (block index, 32-byte hash) in increasing index order, and
//! a crc32 of the entries. The file is written unnamed, fsynced and linked
//! into place (`io::Output`); a file that fails any check is not used (DST
//! is read instead).
//!
//! A cache is used only when it is ours ([`super::owned`]): a symlink at
//! its name, another user's file or one others can write is refused by
//! name ([`check_owned`]), neither read nor removed.
//!
//! Racy writes: the identity is taken after DST is fsynced, the writer then
//! waits until the clock has moved past DST's ctime and takes it again
//! (unchanged, or no cache). A later write to DST then gets a later ctime.
//! On use, a cache whose own mtime is not after the recorded ctime is not
//! trusted (git's "racily clean" rule).

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

const MAGIC: [u8; 16] = *b"imgsync-hashes\0\0";
/// 2: the content size apart from the file's (version 1 caches, of raw
/// files only, are not used: the next sync reads DST and writes anew).
const VERSION: u32 = 2;
const HEADER_LEN: usize = 136;
/// Index (8) + hash (32).
pub const ENTRY_LEN: usize = 40;

/// What identifies one state of DST's content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
}

impl Identity {
    pub fn of(file: &File) -> io::Result<Identity> {
        let m = file.metadata()?;
        Ok(Identity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

/// The cache file of `dst`: `.NAME.imgsync-hashes` in its directory.
pub fn path_for(dst: &Path) -> PathBuf {
    let mut name = std::ffi::OsString::from(".");
    name.push(dst.file_name().unwrap_or_default());
    name.push(".imgsync-hashes");
    dst.with_file_name(name)
}

/// Refuses the cache at `path` unless it is ours: a symlink, not a
/// regular file, another user's, or writable by others. `Ok` when there is
/// none. The caller then neither reads nor removes it.
pub fn check_owned(path: &Path) -> Result<(), super::owned::Untrusted> {
    let untrusted = |why: String| super::owned::Untrusted {
        path: path.to_path_buf(),
        why,
    };
    match path.symlink_metadata() {
        Ok(m) => match super::owned::file_problem(&m) {
            None => Ok(()),
            Some(why) => Err(untrusted(why)),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(untrusted(e.to_string())),
    }
}

struct Header {
    block_size: u32,
    key: [u8; 32],
    id: Identity,
    count: u64,
    /// The size of the content hashed (blocks are cut at it).
    content: u64,
}

fn encode_header(h: &Header) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0..16].copy_from_slice(&MAGIC);
    b[16..20].copy_from_slice(&VERSION.to_be_bytes());
    b[20..24].copy_from_slice(&h.block_size.to_be_bytes());
    b[24..56].copy_from_slice(&h.key);
    let mut at = 56;
    for v in [
        h.id.size,
        h.id.dev,
        h.id.ino,
        h.id.mtime.0 as u64,
        h.id.mtime.1 as u64,
        h.id.ctime.0 as u64,
        h.id.ctime.1 as u64,
        h.count,
        h.content,
    ] {
        b[at..at + 8].copy_from_slice(&v.to_be_bytes());
        at += 8;
    }
    let crc = crc32fast::hash(&b[..at]);
    b[at..at + 4].copy_from_slice(&crc.to_be_bytes());
    b
}

fn decode_header(b: &[u8; HEADER_LEN]) -> Option<Header> {
    let at = 56 + 9 * 8;
    if b[0..16] != MAGIC || b[16..20] != VERSION.to_be_bytes() || b[at + 4..] != [0; 4] {
        return None;
    }
    let crc = u32::from_be_bytes(b[at..at + 4].try_into().ok()?);
    if crc != crc32fast::hash(&b[..at]) {
        return None;
    }
    let u = |i: usize| u64::from_be_bytes(b[56 + 8 * i..64 + 8 * i].try_into().unwrap());
    Some(Header {
        block_size: u32::from_be_bytes(b[20..24].try_into().ok()?),
        key: b[24..56].try_into().ok()?,
        id: Identity {
            size: u(0),
            dev: u(1),
            ino: u(2),
            mtime: (u(3) as i64, u(4) as i64),
            ctime: (u(5) as i64, u(6) as i64),
        },
        count: u(7),
        content: u(8),
    })
}

/// A valid cache, positioned at its first entry.
pub struct Cache {
    reader: BufReader<File>,
    key: [u8; 32],
    left: u64,
}

impl Cache {
    /// The cache at `path` if it describes `dst` as it is now, for this
    /// block size and content size (a raw file's length, a qcow2's
    /// virtual size); `None` if it is missing, damaged or stale.
    pub fn open(path: &Path, dst: &File, block_size: u32, size: u64) -> Option<Cache> {
        Self::load(path, Some(dst), block_size, size)
    }

    /// Every check of [`Cache::open`] but DST's identity (for the fuzz
    /// target).
    #[doc(hidden)]
    pub fn open_unverified(path: &Path, block_size: u32, size: u64) -> Option<Cache> {
        Self::load(path, None, block_size, size)
    }

    fn load(path: &Path, dst: Option<&File>, block_size: u32, size: u64) -> Option<Cache> {
        use rustix::fs::OFlags;
        use std::os::unix::fs::OpenOptionsExt;
        // Never through a symlink, never blocked on a FIFO, and only ours.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags((OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC).bits() as i32)
            .open(path)
            .ok()?;
        let meta = file.metadata().ok()?;
        if super::owned::file_problem(&meta).is_some() {
            return None;
        }
        let mut b = [0u8; HEADER_LEN];
        let mut reader = BufReader::with_capacity(1 << 20, file);
        reader.read_exact(&mut b).ok()?;
        let h = decode_header(&b)?;
        if h.block_size != block_size || h.content != size || block_size == 0 {
            return None;
        }
        if let Some(dst) = dst {
            if h.id != Identity::of(dst).ok()? {
                return None;
            }
            // Racily clean: written in the same clock tick as DST's last
            // change.
            if (meta.mtime(), meta.mtime_nsec()) <= h.id.ctime {
                return None;
            }
        }
        let blocks = size.div_ceil(u64::from(block_size));
        let want = (HEADER_LEN as u64)
            .checked_add(h.count.checked_mul(ENTRY_LEN as u64)?)?
            .checked_add(4)?;
        if h.count > blocks || meta.len() != want {
            return None;
        }
        // Every entry checked before any is used.
        let mut crc = crc32fast::Hasher::new();
        let mut last = None;
        let mut e = [0u8; ENTRY_LEN];
        for _ in 0..h.count {
            reader.read_exact(&mut e).ok()?;
            crc.update(&e);
            let i = u64::from_be_bytes(e[..8].try_into().unwrap());
            if i >= blocks || last.is_some_and(|l| i <= l) {
                return None;
            }
            last = Some(i);
        }
        let mut t = [0u8; 4];
        reader.read_exact(&mut t).ok()?;
        if u32::from_be_bytes(t) != crc.finalize() {
            return None;
        }
        reader.seek(SeekFrom::Start(HEADER_LEN as u64)).ok()?;
        Some(Cache {
            reader,
            key: h.key,
            left: h.count,
        })
    }

    pub fn key(&self) -> [u8; 32] {
        self.key
    }

    /// Up to `max` entries into `out` (cleared first); empty at the end.
    pub fn read_batch(&mut self, out: &mut Vec<(u64, [u8; 32])>, max: usize) -> io::Result<()> {
        out.clear();
        let mut e = [0u8; ENTRY_LEN];
        while self.left > 0 && out.len() < max {
            self.reader.read_exact(&mut e)?;
            self.left -= 1;
            out.push(split(&e));
        }
        Ok(())
    }
}

fn split(e: &[u8; ENTRY_LEN]) -> (u64, [u8; 32]) {
    (
        u64::from_be_bytes(e[..8].try_into().unwrap()),
        e[8..].try_into().unwrap(),
    )
}

/// An unnamed scratch file in `dir` (O_TMPFILE, or a name unlinked at
/// once): written in order, then read back from the start. A failed write
/// is remembered (the spool is then incomplete and [`write`] refuses it)
/// rather than failing the sync it serves.
pub struct Spool {
    w: Option<BufWriter<File>>,
    r: Option<BufReader<File>>,
    failed: bool,
}

/// Spool records: index, present flag, hash.
const SPOOL_LEN: usize = 41;

impl Spool {
    pub fn new_in(dir: &Path) -> io::Result<Spool> {
        use rustix::fs::{Mode, OFlags};
        let file = match rustix::fs::open(
            dir,
            OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        ) {
            Ok(fd) => File::from(fd),
            Err(_) => {
                let p = dir.join(format!(".imgsync-spool-{}", std::process::id()));
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&p)?;
                std::fs::remove_file(&p)?;
                f
            }
        };
        Ok(Spool {
            w: Some(BufWriter::with_capacity(256 << 10, file)),
            r: None,
            failed: false,
        })
    }

    pub fn push(&mut self, index: u64, hash: Option<&[u8; 32]>) {
        let Some(w) = self.w.as_mut().filter(|_| !self.failed) else {
            self.failed = true;
            return;
        };
        let mut e = [0u8; SPOOL_LEN];
        e[..8].copy_from_slice(&index.to_be_bytes());
        if let Some(h) = hash {
            e[8] = 1;
            e[9..].copy_from_slice(h);
        }
        if w.write_all(&e).is_err() {
            self.failed = true;
        }
    }

    /// The next record (after the first call, no more pushes).
    pub fn read_next(&mut self) -> io::Result<Option<(u64, Option<[u8; 32]>)>> {
        if let Some(w) = self.w.take() {
            let mut f = w.into_inner().map_err(|e| e.into_error())?;
            f.seek(SeekFrom::Start(0))?;
            self.r = Some(BufReader::with_capacity(256 << 10, f));
        }
        let r = self.r.as_mut().expect("reader");
        let mut e = [0u8; SPOOL_LEN];
        match r.read_exact(&mut e) {
            Ok(()) => {}
            Err(x) if x.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(x) => return Err(x),
        }
        let index = u64::from_be_bytes(e[..8].try_into().unwrap());
        let hash = (e[8] == 1).then(|| e[9..].try_into().unwrap());
        Ok(Some((index, hash)))
    }
}

/// Writes the cache of `dst` (whose content is fsynced): the merge of
/// `old` (DST's hashes before the sync, in order), `changed` (the blocks
/// written, in order: their new hash, or none when zero) and `punched`
/// (runs of blocks made holes, in order), for the blocks of `content`
/// bytes (the size the hashes were cut at).
#[allow(clippy::too_many_arguments)]
pub fn write(
    path: &Path,
    dst: &File,
    block_size: u32,
    key: [u8; 32],
    content: u64,
    old: &mut Spool,
    changed: &mut Spool,
    punched: &[(u64, u64)],
) -> io::Result<()> {
    if old.failed || changed.failed {
        return Err(io::Error::other("a hash spool could not be written"));
    }
    if block_size == 0 {
        return Err(io::Error::other("block size 0"));
    }
    let blocks = content.div_ceil(u64::from(block_size));
    let before = Identity::of(dst)?;
    // Let the clock move past DST's ctime (see the module comment).
    std::thread::sleep(std::time::Duration::from_millis(20));
    let id = Identity::of(dst)?;
    if id != before {
        return Err(io::Error::other("the destination changed after the sync"));
    }
    // Written unnamed and linked into place whole (`io::Output`): an
    // error leaves the old cache or none.
    let out = super::Output::create(path)?;
    {
        // 0600: the file holds the hash key.
        use std::os::unix::fs::PermissionsExt;
        out.file()
            .set_permissions(std::fs::Permissions::from_mode(0o600))?;
        let mut w = BufWriter::with_capacity(1 << 20, out.file());
        w.write_all(&[0u8; HEADER_LEN])?;
        let mut crc = crc32fast::Hasher::new();
        let mut count = 0u64;
        let mut last: Option<u64> = None;
        let mut emit = |i: u64, h: &[u8; 32], w: &mut BufWriter<&File>| -> io::Result<()> {
            if last.is_some_and(|l| i <= l) {
                return Err(io::Error::other("hashes out of order"));
            }
            last = Some(i);
            let mut e = [0u8; ENTRY_LEN];
            e[..8].copy_from_slice(&i.to_be_bytes());
            e[8..].copy_from_slice(h);
            crc.update(&e);
            count += 1;
            w.write_all(&e)
        };
        let mut punch = punched.iter().copied().peekable();
        let punched_at = |i: u64, punch: &mut std::iter::Peekable<_>| {
            while let Some(&(f, n)) = punch.peek() {
                let (f, n): (u64, u64) = (f, n);
                if f.saturating_add(n) <= i {
                    punch.next();
                } else {
                    return f <= i;
                }
            }
            false
        };
        let mut o = old.read_next()?;
        let mut c = changed.read_next()?;
        loop {
            let take_old = match (&o, &c) {
                (None, None) => break,
                (Some((oi, _)), Some((ci, _))) => oi < ci,
                (Some(_), None) => true,
                (None, Some(_)) => false,
            };
            if take_old {
                let (i, h) = o.take().unwrap();
                if i < blocks && !punched_at(i, &mut punch) {
                    if let Some(h) = h {
                        emit(i, &h, &mut w)?;
                    }
                }
                o = old.read_next()?;
            } else {
                let (i, h) = c.take().unwrap();
                // The old hash of a changed block is replaced.
                if o.as_ref().is_some_and(|(oi, _)| *oi == i) {
                    o = old.read_next()?;
                }
                if i < blocks {
                    if let Some(h) = h {
                        emit(i, &h, &mut w)?;
                    }
                }
                c = changed.read_next()?;
            }
        }
        w.write_all(&crc.finalize().to_be_bytes())?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        use std::os::unix::fs::FileExt;
        file.write_all_at(
            &encode_header(&Header {
                block_size,
                key,
                id,
                count,
                content,
            }),
            0,
        )?;
    }
    out.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(x: u8) -> [u8; 32] {
        [x; 32]
    }

    #[test]
    fn merge_round_trip_and_staleness() {
        let dir = tempfile::tempdir().unwrap();
        let dst_path = dir.path().join("d.raw");
        std::fs::write(&dst_path, vec![1u8; 10 * 4096]).unwrap();
        let dst = File::open(&dst_path).unwrap();
        let cache = path_for(&dst_path);
        assert_eq!(cache.file_name().unwrap(), ".d.raw.imgsync-hashes");
        let mut old = Spool::new_in(dir.path()).unwrap();
        for i in [0, 2, 3, 5, 7, 9] {
            old.push(i, Some(&h(i as u8)));
        }
        let mut changed = Spool::new_in(dir.path()).unwrap();
        changed.push(1, Some(&h(101))); // new block
        changed.push(3, Some(&h(103))); // rewritten
        changed.push(5, None); // now zeros
        changed.push(8, Some(&h(108)));
        // Block 7 punched; block 9 is past the new end (9 blocks: the
        // content is shorter than the file, as a qcow2's guest view is
        // not its file's length).
        write(
            &cache,
            &dst,
            4096,
            [9; 32],
            9 * 4096,
            &mut old,
            &mut changed,
            &[(6, 2)],
        )
        .unwrap();
        // The content size must match, whatever the file's.
        assert!(Cache::open(&cache, &dst, 4096, 10 * 4096).is_none());
        let mut c = Cache::open(&cache, &dst, 4096, 9 * 4096).expect("valid cache");
        assert_eq!(c.key(), [9; 32]);
        let mut v = Vec::new();
        c.read_batch(&mut v, 100).unwrap();
        let got: Vec<(u64, u8)> = v.iter().map(|(i, x)| (*i, x[0])).collect();
        assert_eq!(got, vec![(0, 0), (1, 101), (2, 2), (3, 103), (8, 108)]);
        // Another block size: not used.
        assert!(Cache::open(&cache, &dst, 8192, 9 * 4096).is_none());
        // A damaged entry: not used.
        let mut bytes = std::fs::read(&cache).unwrap();
        bytes[HEADER_LEN + 20] ^= 1;
        let damaged = dir.path().join("damaged");
        std::fs::write(&damaged, &bytes).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(Cache::open(&damaged, &dst, 4096, 9 * 4096).is_none());
        // DST written after the cache: its ctime moves, the cache is stale.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&dst_path)
            .unwrap()
            .write_all(b"x")
            .unwrap();
        assert!(Cache::open(&cache, &dst, 4096, 9 * 4096).is_none());
    }

    #[test]
    fn damaged_headers_are_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let dst_path = dir.path().join("d.raw");
        std::fs::write(&dst_path, vec![1u8; 4096]).unwrap();
        let dst = File::open(&dst_path).unwrap();
        let cache = path_for(&dst_path);
        let mut old = Spool::new_in(dir.path()).unwrap();
        old.push(0, Some(&h(1)));
        let mut changed = Spool::new_in(dir.path()).unwrap();
        write(
            &cache,
            &dst,
            4096,
            [1; 32],
            4096,
            &mut old,
            &mut changed,
            &[],
        )
        .unwrap();
        assert!(Cache::open(&cache, &dst, 4096, 4096).is_some());
        let good = std::fs::read(&cache).unwrap();
        for at in [0, 17, 30, 60, 120, 124, 128, 132, good.len() - 1] {
            let mut b = good.clone();
            b[at] ^= 0x40;
            std::fs::write(&cache, &b).unwrap();
            assert!(Cache::open(&cache, &dst, 4096, 4096).is_none(), "byte {at}");
        }
        // An incomplete spool (a write failed): no cache at all.
        std::fs::remove_file(&cache).unwrap();
        let mut old = Spool::new_in(dir.path()).unwrap();
        old.push(0, Some(&h(1)));
        old.read_next().unwrap();
        old.push(1, Some(&h(2)));
        let mut changed = Spool::new_in(dir.path()).unwrap();
        assert!(write(
            &cache,
            &dst,
            4096,
            [1; 32],
            4096,
            &mut old,
            &mut changed,
            &[]
        )
        .is_err());
        assert!(!cache.exists());
        // Truncated, or with an entry count that overflows.
        std::fs::write(&cache, &good[..good.len() - 2]).unwrap();
        assert!(Cache::open(&cache, &dst, 4096, 4096).is_none());
        std::fs::write(&cache, &good[..10]).unwrap();
        assert!(Cache::open(&cache, &dst, 4096, 4096).is_none());
    }
}
