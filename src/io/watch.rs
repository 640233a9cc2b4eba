//! Catching a source that changes while it is read: every file of an
//! image's chain is stamped when opened and compared after the data was
//! read. A copy of an image that changed meanwhile matches neither its old
//! nor its new content, so a difference is an error, never a success.
//!
//! What is compared, per file (`fstat` on the open descriptor, so a rename
//! or an unlink of the name does not hide anything):
//!
//! - files: size, mtime and ctime (nanoseconds; any write changes them);
//! - block devices (no meaningful times: writes through the device do not
//!   touch its node): size, and the device's count of sectors written from
//!   `/sys/dev/block/MAJ:MIN/stat` when sysfs has it (any write through
//!   the device, by anyone, moves it);
//! - qcow2 images, either kind: the first cluster (header, its extensions
//!   and, usually, the backing file name), which a writer that allocates or
//!   resizes rewrites.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use imgsync_formats::Storage;

use super::LocalFile;

/// Test-only hook: when set to a path, [`SourceWatch::check`] creates that
/// file and waits (up to a minute) until it is removed, so a test can
/// change the source at a known point after it was read.
const PAUSE_HOOK: &str = "IMGSYNC_TEST_PAUSE_BEFORE_SOURCE_CHECK";

/// The source changed, or could not be looked at again.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(
        "{}: changed while it was being read; the copy is not a consistent image: copy a snapshot or a stopped VM's image",
        path.display()
    )]
    Changed { path: PathBuf },
    #[error("{}: checking that it did not change while it was read", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp {
    size: u64,
    /// (mtime, ctime) as (seconds, nanoseconds); files only.
    times: Option<[(i64, i64); 2]>,
    /// Sectors written to the device since boot; block devices only.
    sectors_written: Option<u64>,
    /// The qcow2 header cluster.
    header: Vec<u8>,
}

struct Watched {
    path: PathBuf,
    file: Arc<LocalFile>,
    header_len: u64,
    before: Stamp,
}

/// The stamps of every file an image reads.
#[derive(Default)]
pub struct SourceWatch {
    files: Vec<Watched>,
}

impl SourceWatch {
    /// Stamps `file` now; `header_len` bytes from its start are compared
    /// too (0 for raw layers and data files).
    pub(crate) fn add(
        &mut self,
        path: &Path,
        file: Arc<LocalFile>,
        header_len: u64,
    ) -> io::Result<()> {
        let before = stamp(&file, header_len)?;
        self.files.push(Watched {
            path: path.to_path_buf(),
            file,
            header_len,
            before,
        });
        Ok(())
    }

    /// Every file watched (the image and its chain), as opened.
    pub fn files(&self) -> impl Iterator<Item = (&Path, &std::fs::File)> {
        self.files.iter().map(|w| (w.path.as_path(), w.file.file()))
    }

    /// Fails when any file differs from its stamp.
    pub fn check(&self) -> Result<(), WatchError> {
        test_pause();
        for w in &self.files {
            let now = stamp(&w.file, w.header_len).map_err(|source| WatchError::Io {
                path: w.path.clone(),
                source,
            })?;
            if now != w.before {
                return Err(WatchError::Changed {
                    path: w.path.clone(),
                });
            }
        }
        Ok(())
    }
}

fn stamp(file: &LocalFile, header_len: u64) -> io::Result<Stamp> {
    let meta = file.file().metadata()?;
    let is_device = meta.file_type().is_block_device();
    let size = if is_device {
        // A device's size is not in its node: ask the device again.
        rustix::fs::seek(file.file(), rustix::fs::SeekFrom::End(0))?
    } else {
        meta.len()
    };
    let times = (!is_device).then(|| {
        [
            (meta.mtime(), meta.mtime_nsec()),
            (meta.ctime(), meta.ctime_nsec()),
        ]
    });
    let sectors_written = if is_device {
        sectors_written(meta.rdev())
    } else {
        None
    };
    let n = header_len.min(size) as usize;
    let mut header = vec![0u8; n];
    file.read_exact_at(&mut header, 0)?;
    Ok(Stamp {
        size,
        times,
        sectors_written,
        header,
    })
}

/// Field 7 of `/sys/dev/block/MAJ:MIN/stat` (Documentation/block/stat.rst:
/// "write sectors"); None where sysfs does not say.
fn sectors_written(rdev: u64) -> Option<u64> {
    let major = rustix::fs::major(rdev);
    let minor = rustix::fs::minor(rdev);
    let s = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat")).ok()?;
    s.split_ascii_whitespace().nth(6)?.parse().ok()
}

fn test_pause() {
    let Some(p) = std::env::var_os(PAUSE_HOOK) else {
        return;
    };
    let p = PathBuf::from(p);
    if std::fs::write(&p, b"").is_err() {
        return;
    }
    let until = Instant::now() + Duration::from_secs(60);
    while p.exists() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn watched(header_len: u64) -> (tempfile::TempDir, PathBuf, SourceWatch) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![1u8; 1 << 16]).unwrap();
        let mut w = SourceWatch::default();
        w.add(&p, Arc::new(LocalFile::open(&p).unwrap()), header_len)
            .unwrap();
        (dir, p, w)
    }

    #[test]
    fn an_unchanged_file_passes() {
        let (_d, _p, w) = watched(512);
        w.check().unwrap();
    }

    #[test]
    fn a_write_of_the_same_bytes_is_still_a_change() {
        let (_d, p, w) = watched(0);
        std::thread::sleep(Duration::from_millis(20));
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[1u8; 4096], 8192).unwrap();
        let e = w.check().unwrap_err();
        assert!(matches!(e, WatchError::Changed { .. }), "{e}");
    }
}
