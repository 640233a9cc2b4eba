//! DST of a sync on this host: opening it as the receiver sees it, what a
//! failed sync left it as, its journal, and `--rollback`.

use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use imgsync_formats::{Format, Storage};

use super::{Error, Result};
use crate::engine::sync::{SendState, Target};
use crate::io::{journal, lock, open_image, open_source, LocalFile, Locking, OpenOptions, Output};

/// DST as the receiver sees it: an existing raw file or block device, or
/// a new output when absent. `format` is an existing DST's format as the
/// user named it (`None`: probed); a DST that probes as qcow2 is refused
/// unless the user named it raw (then it is a file of bytes, as rsync sees
/// it). A new output's format is the caller's business.
pub fn open_target(dst: &Path, format: Option<Format>) -> Result<Target> {
    let name = || dst.display().to_string();
    let meta = match std::fs::metadata(dst) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Target::New(
                Output::create(dst).map_err(|e| Error::at(name(), e))?,
            ));
        }
        Err(e) => return Err(Error::at(name(), e)),
    };
    let is_device = meta.file_type().is_block_device();
    if !is_device && !meta.is_file() {
        return Err(Error::said(format!(
            "{}: not a regular file or block device",
            dst.display()
        )));
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true).write(true);
    if is_device {
        // O_EXCL on a block device: refused while it is mounted or held
        // by another exclusive user (as convert does).
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_EXCL);
    }
    let file = open_writable(&opts, dst, &meta).map_err(|e| {
        if is_device && e.raw_os_error() == Some(libc::EBUSY) {
            Error::said(format!(
                "{}: the device is in use (mounted?); refusing to write to it",
                dst.display()
            ))
        } else {
            Error::at(name(), e)
        }
    })?;
    // qemu's write locks, held while `file` is open: a running qemu's
    // image is refused, and no VM can start on DST mid-sync.
    lock::lock_for_writing(&file).map_err(|e| Error::at(name(), e))?;
    let mut magic = [0u8; 4];
    // A file shorter than the magic is no qcow2 (the zeros stay).
    let _ = std::os::unix::fs::FileExt::read_exact_at(&file, &mut magic, 0);
    let probed_qcow2 = format.is_none() && magic == *b"QFI\xfb";
    if format == Some(Format::Qcow2) && magic != *b"QFI\xfb" {
        return Err(Error::said(format!(
            "{}: -O qcow2 (or -f qcow2) names DST a qcow2 image, but it is not one: pass -O raw to sync onto it as a raw image, or remove it to have it made a qcow2",
            dst.display()
        )));
    }
    if probed_qcow2 || format == Some(Format::Qcow2) {
        if is_device {
            return Err(Error::said(format!(
                "{}: a qcow2 image on a block device is not updated in place (sync onto its bytes with -O raw)",
                dst.display()
            )));
        }
        return open_qcow2(dst, file, &meta);
    }
    let size = LocalFile::open(dst)
        .and_then(|f| f.size())
        .map_err(|e| Error::at(name(), e))?;
    // Read through a second descriptor, unlocked: `file`'s locks cover it
    // (and its own read locks would conflict with them).
    let image = open_image(
        dst,
        OpenOptions {
            format: Some(Format::Raw),
            allow_corrupt: false,
            locking: Locking::None,
        },
    )
    .map_err(Error::other)?;
    // The identity of the file opened, not of whatever the name means by
    // the time the journal is checked.
    let id = journal::DstId::of(&file).map_err(|e| Error::at(name(), e))?;
    if is_device {
        journal::prepare_device_dir().map_err(Error::other)?;
    }
    Ok(Target::Existing {
        file,
        image,
        is_device,
        size,
        id,
        journal_path: journal::path_of(dst, &meta),
    })
}

/// An existing qcow2 DST, updated in place. An interrupted sync's journal
/// is rolled back first: the sync then starts afresh from the image before
/// it (so no cluster the interrupted run allocated stays behind).
fn open_qcow2(dst: &Path, file: std::fs::File, meta: &std::fs::Metadata) -> Result<Target> {
    let name = || dst.display().to_string();
    refuse_unclean(dst, &file)?;
    let id = journal::DstId::of(&file).map_err(|e| Error::at(name(), e))?;
    let journal_path = journal::path_of(dst, meta);
    let rolled_back = match journal::state(&journal_path, &id) {
        journal::JournalState::InProgress => {
            journal::rollback(dst, &journal_path).map_err(|e| Error::at(name(), e))?;
            true
        }
        // Another destination's journal, or one that is not ours: never
        // applied, and never overwritten.
        journal::JournalState::Refused(e) => return Err(Error::at(name(), e)),
        journal::JournalState::None => false,
    };
    // DST's guest view, its backing chain included (read-only, through a
    // second descriptor: `file`'s locks cover it).
    let view = open_source(
        dst,
        OpenOptions {
            format: Some(Format::Qcow2),
            allow_corrupt: false,
            locking: Locking::None,
        },
    )
    .map_err(Error::other)?;
    Ok(Target::Qcow2 {
        size: view.image.virtual_size(),
        file,
        image: view.image,
        id,
        journal_path,
        rolled_back,
        chain: view.watch,
    })
}

/// A qcow2 DST whose dirty or corrupt bit is set is refused before
/// anything else: its refcounts cannot be trusted for allocating.
fn refuse_unclean(dst: &Path, file: &std::fs::File) -> Result<()> {
    use imgsync_formats::qcow2::Header;
    use std::os::unix::fs::FileExt;
    let len = file
        .metadata()
        .map_err(|e| Error::at(dst.display(), e))?
        .len();
    let mut prefix = [0u8; 24];
    if file.read_exact_at(&mut prefix, 0).is_err() {
        return Ok(()); // too short: the format layer says what is wrong
    }
    let Ok(first) = Header::first_cluster_len(&prefix) else {
        return Ok(());
    };
    let mut buf = vec![0u8; first.min(len) as usize];
    if file.read_exact_at(&mut buf, 0).is_err() {
        return Ok(());
    }
    let Ok(h) = Header::parse(&buf, len) else {
        return Ok(());
    };
    let why = if h.corrupt() {
        "is marked corrupt (qcow2 corrupt bit)"
    } else if h.dirty() {
        "was not closed cleanly (qcow2 dirty bit: its refcounts may be stale)"
    } else {
        return Ok(());
    };
    Err(Error::said(format!(
        "{}: {why}; run qemu-img check -r all first (nothing was changed)",
        dst.display()
    )))
}

/// Opens DST read-write. A file of ours without its owner-write bit (a
/// copy of a read-only source keeps 0444, as `rsync -a` makes it) is opened
/// as rsync --inplace does: write permission added for the open, the mode
/// put back at once (the descriptor stays writable).
fn open_writable(
    opts: &std::fs::OpenOptions,
    dst: &Path,
    meta: &std::fs::Metadata,
) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    match opts.open(dst) {
        Err(e)
            if e.kind() == std::io::ErrorKind::PermissionDenied
                && meta.is_file()
                && meta.mode() & 0o200 == 0
                && meta.uid() == rustix::process::geteuid().as_raw() =>
        {
            let mode = meta.mode() & 0o7777;
            std::fs::set_permissions(dst, std::fs::Permissions::from_mode(mode | 0o200))?;
            let opened = opts.open(dst);
            std::fs::set_permissions(dst, std::fs::Permissions::from_mode(mode))?;
            opened
        }
        r => r,
    }
}

/// What a failed or interrupted sync left DST as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DstState {
    /// DST did not exist and was not created.
    Absent,
    /// Nothing of DST changed.
    Untouched,
    /// DST is mid-sync, with its journal: resume or roll back.
    MidSync,
    /// DST may be partly updated and has no journal (--no-journal).
    Partly,
}

/// DST on this host: its journal says whether it is mid-sync; without a
/// journal, whether the receiver here had begun to change it. `existed`:
/// whether DST existed when it was opened (`None`: it was not opened).
pub(super) fn local_state(
    dst: &Path,
    existed: Option<bool>,
    journal: bool,
    changing: &AtomicBool,
) -> DstState {
    match existed {
        None => DstState::Untouched,
        Some(false) => DstState::Absent,
        Some(true) if journal::in_progress(dst).is_some() => DstState::MidSync,
        Some(true) if !journal && changing.load(Ordering::Relaxed) => DstState::Partly,
        Some(true) => DstState::Untouched,
    }
}

/// DST on the other end (push): what the receiver said before it failed.
pub(super) fn remote_state(sent: &SendState, journal: bool) -> DstState {
    use std::sync::atomic::Ordering::Relaxed;
    if !sent.informed.load(Relaxed) {
        return DstState::Untouched;
    }
    if !sent.exists.load(Relaxed) {
        return DstState::Absent;
    }
    if sent.resumed.load(Relaxed) || (journal && sent.ready.load(Relaxed)) {
        return DstState::MidSync;
    }
    if sent.ready.load(Relaxed) {
        return DstState::Partly;
    }
    DstState::Untouched
}

/// The one line of a failed sync: what went wrong, then what DST is now
/// and how to go on. An interruption says only that.
pub(super) fn with_state(e: Error, dst: &str, state: DstState, cancel: &AtomicBool) -> Error {
    let words = match state {
        DstState::Absent => format!("{dst} was not created (nothing was written)"),
        DstState::Untouched => format!("{dst} is untouched"),
        DstState::MidSync => format!(
            "{dst} is mid-sync: rerun the same sync to resume it, or undo it with `imgsync sync --rollback {dst}`"
        ),
        DstState::Partly => format!(
            "{dst} is partly updated and has no journal (--no-journal): rerun the same sync to complete it"
        ),
    };
    if cancel.load(Ordering::Relaxed) {
        return Error::said(format!("{dst}: interrupted; {words}"));
    }
    match state {
        DstState::MidSync | DstState::Partly => Error::said(format!("{}; {words}", e.one_line())),
        DstState::Absent | DstState::Untouched => e,
    }
}

/// `sync --rollback` of DST on this host; says what it did on `out`.
pub fn rollback_to(out: &mut dyn Write, dst: &Path) -> Result<u8> {
    let meta = std::fs::metadata(dst).map_err(|e| Error::at(dst.display(), e))?;
    if meta.file_type().is_block_device() {
        journal::prepare_device_dir().map_err(Error::other)?;
    }
    let jpath = journal::path_of(dst, &meta);
    if jpath.symlink_metadata().is_err() {
        return Err(Error::said(format!(
            "{}: no interrupted sync to roll back ({} not found)",
            dst.display(),
            jpath.display()
        )));
    }
    let r = journal::rollback(dst, &jpath).map_err(|e| Error::at(dst.display(), e))?;
    writeln!(
        out,
        "{}: rolled back to the image before the sync ({} blocks restored)",
        dst.display(),
        r.entries
    )
    .map_err(Error::other)?;
    Ok(0)
}
