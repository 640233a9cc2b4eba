//! The state imgsync keeps for itself (undo journals, hash caches, the
//! directory of block devices' journals) is trusted only when it is the
//! running user's and nobody else can write it: otherwise anyone able to
//! write into a shared directory could plant a journal that a sync run by
//! root would apply to a destination. Such a file is refused by name; it
//! is never read, applied or removed.

use std::fs::Metadata;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Why a state file or directory is not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {why}", path.display())]
pub struct Untrusted {
    pub path: PathBuf,
    pub why: String,
}

/// The effective uid: who the files must belong to.
pub fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// Why the state file described by `meta` (from `fstat` of a descriptor
/// opened with `O_NOFOLLOW`, or from `lstat`) may not be used; `None` when
/// it is ours.
pub fn file_problem(meta: &Metadata) -> Option<String> {
    if meta.file_type().is_symlink() {
        return Some("is a symbolic link".into());
    }
    if !meta.is_file() {
        return Some("is not a regular file".into());
    }
    owner_problem(meta, false)
}

fn owner_problem(meta: &Metadata, root_too: bool) -> Option<String> {
    let me = euid();
    let uid = meta.uid();
    if uid != me && !(root_too && uid == 0) {
        return Some(format!(
            "owned by uid {uid}, not by uid {me} running imgsync; not used (check where it came from, and remove it)"
        ));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Some(format!(
            "writable by group or others (mode {mode:04o}); not used (check where it came from, and remove it)"
        ));
    }
    None
}

/// Makes `dir` (mode 0700, parents too) if it is missing, then checks that
/// it is ours and that it and every directory above it belong to us or to
/// root and are writable by nobody else (OpenSSH's rule for its key files).
pub fn private_dir(dir: &Path) -> Result<(), Untrusted> {
    let untrusted = |path: &Path, why: String| Untrusted {
        path: path.to_path_buf(),
        why,
    };
    if let Err(e) = std::fs::symlink_metadata(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            return Err(untrusted(dir, e.to_string()));
        }
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| untrusted(dir, format!("creating the directory: {e}")))?;
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| untrusted(dir, e.to_string()))?;
    if !meta.is_dir() {
        return Err(untrusted(dir, "is not a directory".into()));
    }
    if let Some(why) = owner_problem(&meta, false) {
        return Err(untrusted(dir, why));
    }
    for up in dir.ancestors().skip(1) {
        if up.as_os_str().is_empty() {
            continue;
        }
        let meta = std::fs::metadata(up).map_err(|e| untrusted(up, e.to_string()))?;
        if let Some(why) = owner_problem(&meta, true) {
            return Err(untrusted(up, why));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_others_can_write_is_refused_and_ours_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(file_problem(&std::fs::symlink_metadata(&p).unwrap()), None);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        let why = file_problem(&std::fs::symlink_metadata(&p).unwrap()).unwrap();
        assert!(
            why.starts_with("writable by group or others (mode 0666)"),
            "{why}"
        );
        let l = dir.path().join("l");
        std::os::unix::fs::symlink(&p, &l).unwrap();
        let why = file_problem(&std::fs::symlink_metadata(&l).unwrap()).unwrap();
        assert_eq!(why, "is a symbolic link");
    }

    #[test]
    fn private_dir_is_made_0700_and_a_writable_one_is_refused() {
        let top = tempfile::tempdir().unwrap();
        std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let d = top.path().join("a/journals");
        // The temporary directory's own parents (/tmp is 1777) are not
        // ours to judge here: only what private_dir makes is checked.
        let made = private_dir(&d);
        let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        if let Err(e) = made {
            assert!(!e.path.starts_with(top.path()), "{e}");
        }
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = private_dir(&d).unwrap_err();
        assert_eq!(e.path, d);
        assert!(e.why.contains("mode 0777"), "{e}");
    }
}
