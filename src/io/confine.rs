//! Paths confined to one directory (`imgsync serve --restrict DIR`), by
//! file descriptor rather than by string: a name is resolved from an
//! `O_PATH` descriptor of DIR with `openat2(RESOLVE_BENEATH)`, so `..`,
//! absolute symlinks and symlinks that lead out are refused by the kernel
//! while it walks the name; the result is the canonical path of what was
//! found (no symlink left in it). A file opened later by that path is
//! checked again through its own descriptor ([`Confined::holds`]:
//! `/proc/self/fd/N`, the kernel's name for the open file), so a symlink
//! swapped in between the check and the open is caught before a byte is
//! read or written.
//!
//! Without `openat2` (Linux before 5.6: ENOSYS), the name is resolved
//! with `realpath` and its result compared with DIR; the descriptor check
//! after opening is the same.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// A directory that every path must stay inside.
#[derive(Debug)]
pub struct Confined {
    /// DIR's canonical path.
    root: PathBuf,
    /// DIR as given (a client may name it so, through a symlink).
    given: PathBuf,
    dir: OwnedFd,
}

/// Why a path was not resolved inside DIR.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    /// It names (or leads through) something outside DIR.
    #[error("outside the directory")]
    Outside,
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl Confined {
    /// Opens `dir` (a directory) as the root.
    pub fn open(dir: &Path) -> io::Result<Confined> {
        let root = std::fs::canonicalize(dir)?;
        let fd = rustix::fs::open(
            &root,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Confined {
            root,
            given: std::path::absolute(dir)?,
            dir: fd,
        })
    }

    /// DIR's canonical path.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The canonical path inside DIR that `path` names: relative to DIR,
    /// or absolute under DIR. With `create`, a last component that does
    /// not exist yet is allowed (its directory must). A symlink is
    /// followed only while it stays inside.
    pub fn resolve(&self, path: &Path, create: bool) -> Result<PathBuf, ConfineError> {
        let rel = self.relative(path)?;
        if rel.as_os_str().is_empty() {
            return Ok(self.root.clone());
        }
        match self.beneath(&rel, OFlags::PATH) {
            Ok(fd) => self.canonical(fd.as_fd()),
            Err(ConfineError::Io(e)) if create && e.kind() == io::ErrorKind::NotFound => {
                let name = match rel.components().next_back() {
                    Some(Component::Normal(n)) => n.to_owned(),
                    _ => return Err(ConfineError::Outside),
                };
                let parent = rel.parent().unwrap_or(Path::new(""));
                let dir = if parent.as_os_str().is_empty() {
                    rustix::fs::openat(
                        &self.dir,
                        ".",
                        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(io::Error::from)?
                } else {
                    self.beneath(parent, OFlags::PATH | OFlags::DIRECTORY)?
                };
                // A dangling symlink in the last place: where it points
                // is nobody's business here.
                if rustix::fs::statat(&dir, &name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW).is_ok() {
                    return Err(ConfineError::Outside);
                }
                Ok(self.canonical(dir.as_fd())?.join(name))
            }
            Err(e) => Err(e),
        }
    }

    /// Whether the open file behind `fd` lies inside DIR (an unnamed
    /// `O_TMPFILE` counts by its directory).
    pub fn holds(&self, fd: BorrowedFd<'_>) -> io::Result<bool> {
        let real = proc_path(fd)?;
        let real = real
            .to_str()
            .and_then(|s| s.strip_suffix(" (deleted)"))
            .map(PathBuf::from)
            .unwrap_or(real);
        Ok(real.starts_with(&self.root))
    }

    /// `path` relative to DIR: absolute paths must start with DIR (its
    /// canonical or given name); `..` may not climb above DIR.
    fn relative(&self, path: &Path) -> Result<PathBuf, ConfineError> {
        let rel = if path.is_absolute() {
            path.strip_prefix(&self.root)
                .or_else(|_| path.strip_prefix(&self.given))
                .map_err(|_| ConfineError::Outside)?
        } else {
            path
        };
        let mut depth: usize = 0;
        for c in rel.components() {
            match c {
                Component::Normal(_) => depth += 1,
                Component::CurDir => {}
                Component::ParentDir => {
                    depth = depth.checked_sub(1).ok_or(ConfineError::Outside)?;
                }
                Component::RootDir | Component::Prefix(_) => return Err(ConfineError::Outside),
            }
        }
        Ok(rel.to_path_buf())
    }

    /// `openat2(DIR, rel, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)`.
    fn beneath(&self, rel: &Path, flags: OFlags) -> Result<OwnedFd, ConfineError> {
        match rustix::fs::openat2(
            &self.dir,
            rel,
            flags | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
        ) {
            Ok(fd) => Ok(fd),
            Err(Errno::XDEV) | Err(Errno::LOOP) => Err(ConfineError::Outside),
            Err(Errno::NOSYS) => {
                // No openat2: realpath, then the same comparison.
                let real = std::fs::canonicalize(self.root.join(rel))?;
                if !real.starts_with(&self.root) {
                    return Err(ConfineError::Outside);
                }
                Ok(
                    rustix::fs::open(&real, flags | OFlags::CLOEXEC, Mode::empty())
                        .map_err(io::Error::from)?,
                )
            }
            Err(e) => Err(ConfineError::Io(e.into())),
        }
    }

    /// The canonical path of `fd`, which must lie inside DIR.
    fn canonical(&self, fd: BorrowedFd<'_>) -> Result<PathBuf, ConfineError> {
        let real = proc_path(fd)?;
        if !real.starts_with(&self.root) {
            return Err(ConfineError::Outside);
        }
        Ok(real)
    }
}

/// The kernel's name for an open file.
fn proc_path(fd: BorrowedFd<'_>) -> io::Result<PathBuf> {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn setup() -> (tempfile::TempDir, Confined) {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/a.raw"), b"a").unwrap();
        std::fs::write(t.path().join("outside.raw"), b"o").unwrap();
        symlink("sub/a.raw", root.join("inside-link")).unwrap();
        symlink("../outside.raw", root.join("out-link")).unwrap();
        symlink(t.path().join("outside.raw"), root.join("abs-link")).unwrap();
        symlink("nowhere", root.join("dangling")).unwrap();
        let c = Confined::open(&root).unwrap();
        (t, c)
    }

    fn outside(r: Result<PathBuf, ConfineError>) -> bool {
        matches!(r, Err(ConfineError::Outside))
    }

    #[test]
    fn names_inside_resolve_to_canonical_paths() {
        let (_t, c) = setup();
        let root = c.root().to_path_buf();
        assert_eq!(
            c.resolve(Path::new("sub/a.raw"), false).unwrap(),
            root.join("sub/a.raw")
        );
        assert_eq!(
            c.resolve(Path::new("inside-link"), false).unwrap(),
            root.join("sub/a.raw")
        );
        assert_eq!(
            c.resolve(&root.join("sub/../sub/a.raw"), false).unwrap(),
            root.join("sub/a.raw")
        );
        assert_eq!(
            c.resolve(Path::new("sub/new.raw"), true).unwrap(),
            root.join("sub/new.raw")
        );
    }

    #[test]
    fn escapes_are_refused() {
        let (t, c) = setup();
        assert!(outside(c.resolve(Path::new("../outside.raw"), false)));
        assert!(outside(c.resolve(Path::new("sub/../../outside.raw"), true)));
        assert!(outside(c.resolve(&t.path().join("outside.raw"), false)));
        assert!(outside(c.resolve(Path::new("/etc/passwd"), false)));
        assert!(outside(c.resolve(Path::new("out-link"), false)));
        assert!(outside(c.resolve(Path::new("abs-link"), false)));
        assert!(outside(c.resolve(Path::new("dangling"), true)));
        assert!(outside(c.resolve(Path::new("out-link/x"), true)));
        assert!(matches!(
            c.resolve(Path::new("missing/x.raw"), true),
            Err(ConfineError::Io(_))
        ));
        assert!(matches!(
            c.resolve(Path::new("missing.raw"), false),
            Err(ConfineError::Io(_))
        ));
    }

    #[test]
    fn open_files_are_checked_by_descriptor() {
        let (t, c) = setup();
        let inside = std::fs::File::open(c.root().join("sub/a.raw")).unwrap();
        assert!(c.holds(inside.as_fd()).unwrap());
        let out = std::fs::File::open(t.path().join("outside.raw")).unwrap();
        assert!(!c.holds(out.as_fd()).unwrap());
        // Through a symlink inside: the file is outside all the same.
        let via = std::fs::File::open(c.root().join("out-link")).unwrap();
        assert!(!c.holds(via.as_fd()).unwrap());
    }
}
