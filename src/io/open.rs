//! Opening an image by path: format probing (with probe safety), the backing
//! chain (names resolved against the overlay's directory, loops and deep
//! chains refused) and the external data file. Every file is locked as
//! qemu-img locks it ([`super::lock`]) and stamped so a change while it is
//! read is caught ([`super::watch`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use imgsync_formats::image::MAX_CHAIN_DEPTH;
use imgsync_formats::qcow2::{self, Qcow2};
use imgsync_formats::raw::Raw;
use imgsync_formats::{probe, Format, Image, Layer, Storage};

use super::lock::{self, Access, LockError};
use super::watch::SourceWatch;
use super::LocalFile;

/// How to open an image.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOptions {
    /// The format given with `-f`; `None` probes it.
    pub format: Option<Format>,
    /// Open a QCOW2 image even with the corrupt bit set (for `check`).
    pub allow_corrupt: bool,
    /// How the chain's files are locked against a running qemu.
    pub locking: Locking,
}

/// qemu's image locks on the files an image reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Locking {
    /// As qemu-img: refused while a qemu has any of them open for writing,
    /// and no qemu can open them for writing while they are open here.
    #[default]
    Read,
    /// `-U/--force-share`: read whatever others do.
    ForceShare,
    /// No locks: the caller already holds them on another descriptor of
    /// the same file (sync reading its own DST).
    None,
}

/// An opened source: the image, the files it reads, and what is needed
/// to check them afterwards.
pub struct Source {
    pub image: Image,
    /// Canonical paths of every image of the chain and of data files.
    pub files: Vec<PathBuf>,
    /// With [`Locking::ForceShare`]: the files another process has open
    /// for writing (the copy may be inconsistent).
    pub in_use: Vec<PathBuf>,
    /// Every file's size, times and header as opened.
    pub watch: SourceWatch,
}

/// An image that could not be opened; `path` is the file at fault (the
/// image itself or a member of its chain).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", path.display())]
    Format {
        path: PathBuf,
        #[source]
        source: imgsync_formats::Error,
    },
    #[error("{}: {reason}", path.display())]
    Refused { path: PathBuf, reason: String },
    #[error(
        "{}: is in use by another process (a running VM?); stop it, copy a snapshot, or pass -U/--force-share to read it anyway",
        path.display()
    )]
    InUse { path: PathBuf },
}

impl OpenError {
    pub fn path(&self) -> &Path {
        match self {
            OpenError::Io { path, .. }
            | OpenError::Format { path, .. }
            | OpenError::Refused { path, .. }
            | OpenError::InUse { path } => path,
        }
    }
}

/// Opens `path` with its whole backing chain.
pub fn open_image(path: &Path, opts: OpenOptions) -> Result<Image, OpenError> {
    open_source(path, opts).map(|s| s.image)
}

/// Opens `path` alone, locked and stamped as [`open_source`] does, for
/// commands that read its metadata and no guest data (`info`, `check`): a
/// backing file or external data file it names is never opened, so the
/// image has no backing and no data file attached. As nothing is followed,
/// a probed image naming other files is not refused (qemu-img info opens
/// with BDRV_O_NO_BACKING the same way).
pub fn open_metadata_source(path: &Path, opts: OpenOptions) -> Result<Source, OpenError> {
    open_top(path, opts, false)
}

/// Opens `path` with its whole backing chain, locked and stamped.
pub fn open_source(path: &Path, opts: OpenOptions) -> Result<Source, OpenError> {
    open_top(path, opts, true)
}

/// The image at `path` as a [`Source`]; with `follow`, its chain too.
fn open_top(path: &Path, opts: OpenOptions, follow: bool) -> Result<Source, OpenError> {
    let mut cx = Chain::default();
    let image = open_layer(path, opts, &mut cx, 0, follow)?;
    Ok(Source {
        image,
        files: cx.seen.into_iter().collect(),
        in_use: cx.in_use,
        watch: cx.watch,
    })
}

#[derive(Default)]
struct Chain {
    seen: HashSet<PathBuf>,
    in_use: Vec<PathBuf>,
    watch: SourceWatch,
}

/// Opens one file of the chain read-only and locks it.
fn open_file(path: &Path, locking: Locking, cx: &mut Chain) -> Result<Arc<LocalFile>, OpenError> {
    let io_err = |source| OpenError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = LocalFile::open(path).map_err(io_err)?;
    let access = match locking {
        Locking::Read => Access::Read,
        Locking::ForceShare => Access::ReadForceShare,
        Locking::None => return Ok(Arc::new(file)),
    };
    match lock::lock(file.file(), access) {
        Ok(l) if l.in_use => cx.in_use.push(path.to_path_buf()),
        Ok(_) => {}
        Err(LockError::InUse) => {
            return Err(OpenError::InUse {
                path: path.to_path_buf(),
            })
        }
        Err(LockError::Io(e)) => return Err(io_err(e)),
    }
    Ok(Arc::new(file))
}

/// Opens the image at `path`; with `follow`, also the files it names (its
/// data file and backing chain), else only its own metadata.
fn open_layer(
    path: &Path,
    opts: OpenOptions,
    cx: &mut Chain,
    depth: usize,
    follow: bool,
) -> Result<Image, OpenError> {
    let io_err = |source| OpenError::Io {
        path: path.to_path_buf(),
        source,
    };
    let fmt_err = |source| OpenError::Format {
        path: path.to_path_buf(),
        source,
    };
    let refused = |reason: String| OpenError::Refused {
        path: path.to_path_buf(),
        reason,
    };
    if depth > MAX_CHAIN_DEPTH {
        return Err(refused(format!(
            "backing chain is deeper than {MAX_CHAIN_DEPTH} images"
        )));
    }
    let canonical = std::fs::canonicalize(path).map_err(io_err)?;
    if !cx.seen.insert(canonical.clone()) {
        return Err(refused(
            "backing chain loop: this file is already in the chain".to_string(),
        ));
    }
    let local = open_file(path, opts.locking, cx)?;
    let file: Arc<dyn Storage> = local.clone();

    let format = match opts.format {
        Some(f) => f,
        None => {
            let mut magic = [0u8; 4];
            let n = magic.len().min(file.size().map_err(io_err)? as usize);
            file.read_exact_at(&mut magic[..n], 0).map_err(io_err)?;
            probe(&magic[..n])
        }
    };

    match format {
        Format::Raw => {
            cx.watch.add(path, local, 0).map_err(io_err)?;
            Ok(Image::new(Layer::Raw(Raw::open(file).map_err(fmt_err)?)))
        }
        Format::Qcow2 => {
            let mut q = Qcow2::open_with(
                file,
                qcow2::OpenOptions {
                    allow_corrupt: opts.allow_corrupt,
                },
            )
            .map_err(fmt_err)?;
            if !follow {
                return Ok(Image::new(Layer::Qcow2(q)));
            }
            let header = q.header().clone();
            // The header cluster: what a writer rewrites when it allocates,
            // resizes or marks the image dirty.
            cx.watch
                .add(path, local, 1u64 << header.cluster_bits)
                .map_err(io_err)?;
            // Probe safety: a guest can write a qcow2 header naming any host
            // file into its raw disk; only follow names when told it is qcow2.
            if opts.format.is_none() {
                if let Some(name) = header
                    .backing_file
                    .as_deref()
                    .or(header.data_file.as_deref())
                {
                    return Err(refused(format!(
                        "image was probed as qcow2 and names the file '{name}'; pass -f qcow2 if it is trusted"
                    )));
                }
            }
            let dir = path.parent().unwrap_or(Path::new("."));
            if let Some(name) = header.data_file.as_deref() {
                let data_path = resolve_name(dir, name).map_err(&refused)?;
                let data = open_file(&data_path, opts.locking, cx)?;
                cx.watch
                    .add(&data_path, data.clone(), 0)
                    .map_err(|source| OpenError::Io {
                        path: data_path.clone(),
                        source,
                    })?;
                q.set_data_file(data);
                if let Ok(p) = std::fs::canonicalize(&data_path) {
                    cx.seen.insert(p);
                }
            }
            let layer = Layer::Qcow2(q);
            let Some(name) = header.backing_file.as_deref() else {
                return Ok(Image::new(layer));
            };
            let backing_path = resolve_name(dir, name).map_err(&refused)?;
            let backing_format = match header.backing_format.as_deref() {
                None => None,
                Some(f) => Some(Format::from_name(f).ok_or_else(|| {
                    refused(format!("backing file format '{f}' is not supported"))
                })?),
            };
            let backing = open_layer(
                &backing_path,
                OpenOptions {
                    format: backing_format,
                    allow_corrupt: false,
                    locking: opts.locking,
                },
                cx,
                depth + 1,
                true,
            )?;
            Image::with_backing(layer, backing).map_err(fmt_err)
        }
    }
}

/// Resolves a backing or data file name stored in an image: plain paths only
/// (never `json:` or protocol strings), relative names against the
/// directory of the image that names them.
pub fn resolve_name(dir: &Path, name: &str) -> Result<PathBuf, String> {
    if name.is_empty() {
        return Err("the image names an empty backing file".to_string());
    }
    if name.starts_with("json:") {
        return Err(format!(
            "backing file name '{name}' is a json: specification, not a plain path"
        ));
    }
    if let Some((proto, _)) = name.split_once(':') {
        // qemu would read 'proto:...' as a protocol; a plain path component
        // with a colon before any '/' is refused rather than guessed at.
        if !proto.contains('/') && !proto.is_empty() {
            return Err(format!(
                "backing file name '{name}' looks like a protocol ('{proto}:'), not a plain path"
            ));
        }
    }
    let p = Path::new(name);
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    })
}
