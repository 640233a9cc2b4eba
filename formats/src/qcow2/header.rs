//! The QCOW2 header and its extensions (qemu `docs/interop/qcow2.rst`,
//! "Header" and "Header extensions"). Parsing takes the bytes of the first
//! cluster and returns a validated, logical [`Header`].

use crate::error::{Error, Result};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;

/// Size of the version 2 header, and of the fixed part of a version 3 header
/// before `compression_type`.
pub const V2_HEADER_LEN: u32 = 72;
pub const V3_MIN_HEADER_LEN: u32 = 104;

/// Cluster sizes the spec allows: 512 B (9) to 2 MiB (21).
pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;

/// qemu's QCOW_MAX_L1_SIZE: an L1 table of at most 32 MiB (4 Mi entries).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// qemu's QCOW_MAX_REFTABLE_SIZE: a refcount table of at most 8 MiB.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// qemu's QCOW_MAX_SNAPSHOTS.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// qemu refuses backing file names longer than 1023 bytes.
pub const MAX_BACKING_NAME: u32 = 1023;
/// External data file names: qemu keeps them under the same bound in practice.
pub const MAX_DATA_FILE_NAME: u32 = 4096;
/// qemu's BDRV_MAX_LENGTH is about 2^63; a virtual size must also fit an L1
/// table of MAX_L1_BYTES, checked separately.
pub const MAX_VIRTUAL_SIZE: u64 = i64::MAX as u64;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
pub const INCOMPAT_KNOWN: u64 = 0x1f;

/// Compatible feature bits.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Autoclear feature bits.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Header extension types.
pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub const EXT_CRYPTO: u32 = 0x0537_be77;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// The compression method for compressed clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (window 4 KiB), qemu's default.
    Zlib,
    Zstd,
}

impl CompressionType {
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// One entry of the feature name table extension.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub feature_type: u8,
    pub bit: u8,
    pub name: String,
}

/// The bitmaps extension: where the bitmap directory is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapsExtension {
    pub nb_bitmaps: u32,
    pub bitmap_directory_size: u64,
    pub bitmap_directory_offset: u64,
}

/// One header extension as found, for listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtensionInfo {
    pub ext_type: u32,
    /// Offset of the extension's data in the file.
    pub offset: u64,
    pub len: u32,
}

/// A validated QCOW2 header (logical view; field names follow the spec).
#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    /// Virtual size in bytes.
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: CompressionType,
    /// Where the extension area ends (offset of the end marker + 8, or where
    /// parsing stopped).
    pub extensions_end: u64,
    pub extensions: Vec<ExtensionInfo>,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub data_file: Option<String>,
    pub feature_names: Vec<FeatureName>,
    pub bitmaps: Option<BitmapsExtension>,
    /// Whether a full disk encryption extension is present.
    pub has_crypto_extension: bool,
}

/// Big-endian field readers over a slice that is known to be long enough
/// (callers check lengths first; out-of-range reads yield 0 and cannot panic).
pub(crate) fn be_u64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0)
}
pub(crate) fn be_u32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_be_bytes)
        .unwrap_or(0)
}
pub(crate) fn be_u16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .and_then(|s| s.try_into().ok())
        .map(u16::from_be_bytes)
        .unwrap_or(0)
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }
    pub fn dirty(&self) -> bool {
        self.incompatible_features & INCOMPAT_DIRTY != 0
    }
    pub fn corrupt(&self) -> bool {
        self.incompatible_features & INCOMPAT_CORRUPT != 0
    }
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & INCOMPAT_DATA_FILE != 0
    }
    pub fn data_file_raw(&self) -> bool {
        self.has_data_file() && self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW != 0
    }
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & COMPAT_LAZY_REFCOUNTS != 0
    }
    /// "0.10" for version 2, "1.1" for version 3, as qemu-img reports `compat`.
    pub fn compat(&self) -> &'static str {
        if self.version == 2 {
            "0.10"
        } else {
            "1.1"
        }
    }
    /// Bytes per L2 entry: 8, or 16 with extended L2.
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }
    /// Guest bytes one L2 table maps.
    pub fn l2_coverage(&self) -> u64 {
        (self.cluster_size() / self.l2_entry_size()) << self.cluster_bits
    }
    /// The smallest L1 table that maps the whole virtual size.
    pub fn l1_entries_needed(&self) -> u64 {
        self.size.div_ceil(self.l2_coverage())
    }

    /// How many header bytes to read to parse this image: the whole first
    /// cluster, given its first 24 bytes (through `cluster_bits`).
    pub fn first_cluster_len(prefix: &[u8]) -> Result<u64> {
        if prefix.len() < 24 {
            return Err(Error::invalid("file is too short for a qcow2 header"));
        }
        let bits = be_u32(prefix, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
            return Err(Error::invalid(format!(
                "cluster_bits {bits} is outside the valid range {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
            )));
        }
        Ok(1 << bits)
    }

    /// Parses and validates the header from the first cluster's bytes (fewer
    /// if the file is shorter than a cluster). `file_size` bounds the tables.
    pub fn parse(buf: &[u8], file_size: u64) -> Result<Header> {
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(Error::invalid(format!(
                "file is too short for a qcow2 header ({} bytes)",
                buf.len()
            )));
        }
        // Fixed fields, version 2 layout (offsets from the spec).
        let magic = be_u32(buf, 0);
        if magic != MAGIC {
            return Err(Error::invalid(format!("bad qcow2 magic {magic:#010x}")));
        }
        let version = be_u32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::unsupported(format!(
                "unsupported qcow2 version {version} (only 2 and 3 exist)"
            )));
        }
        let backing_file_offset = be_u64(buf, 8);
        let backing_file_size = be_u32(buf, 16);
        let cluster_bits = be_u32(buf, 20);
        let size = be_u64(buf, 24);
        let crypt_method = be_u32(buf, 32);
        let l1_size = be_u32(buf, 36);
        let l1_table_offset = be_u64(buf, 40);
        let refcount_table_offset = be_u64(buf, 48);
        let refcount_table_clusters = be_u32(buf, 56);
        let nb_snapshots = be_u32(buf, 60);
        let snapshots_offset = be_u64(buf, 64);

        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::invalid(format!(
                "cluster_bits {cluster_bits} is outside the valid range {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;

        // Version 3 fields; version 2 implies their defaults.
        let (
            incompatible_features,
            compatible_features,
            autoclear_features,
            refcount_order,
            header_length,
        ) = if version >= 3 {
            if buf.len() < V3_MIN_HEADER_LEN as usize {
                return Err(Error::invalid(
                    "file is too short for a qcow2 version 3 header",
                ));
            }
            (
                be_u64(buf, 72),
                be_u64(buf, 80),
                be_u64(buf, 88),
                be_u32(buf, 96),
                be_u32(buf, 100),
            )
        } else {
            (0, 0, 0, 4, V2_HEADER_LEN)
        };
        if version >= 3 {
            if header_length < V3_MIN_HEADER_LEN {
                return Err(Error::invalid(format!(
                    "header_length {header_length} is shorter than the version 3 minimum of {V3_MIN_HEADER_LEN}"
                )));
            }
            if u64::from(header_length) > cluster_size {
                return Err(Error::invalid(format!(
                    "header_length {header_length} is larger than the cluster size {cluster_size}"
                )));
            }
            if header_length as usize > buf.len() {
                return Err(Error::BeyondEof {
                    what: "header",
                    offset: 0,
                    len: u64::from(header_length),
                    file_size,
                });
            }
        }
        if refcount_order > 6 {
            return Err(Error::invalid(format!(
                "refcount_order {refcount_order} is larger than 6 (64-bit refcounts)"
            )));
        }

        if incompatible_features & INCOMPAT_CORRUPT != 0 {
            // Reported by the opener (check may still look at such an image).
        }
        let unknown = incompatible_features & !INCOMPAT_KNOWN;

        let compression_type = if header_length > V3_MIN_HEADER_LEN {
            match buf.get(104).copied().unwrap_or(0) {
                0 => CompressionType::Zlib,
                1 => CompressionType::Zstd,
                t => {
                    return Err(Error::unsupported(format!("unknown compression type {t}")));
                }
            }
        } else {
            CompressionType::Zlib
        };
        // qemu validate_compression_type: a non-zlib type needs the incompatible bit,
        // and the bit needs a non-zlib type.
        let bit = incompatible_features & INCOMPAT_COMPRESSION != 0;
        if bit != (compression_type != CompressionType::Zlib) {
            return Err(Error::invalid(format!(
                "compression type {} and incompatible feature bit 3 ({}) disagree",
                compression_type.name(),
                if bit { "set" } else { "clear" }
            )));
        }

        let mut header = Header {
            version,
            backing_file_offset,
            backing_file_size,
            cluster_bits,
            size,
            crypt_method,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset,
            incompatible_features,
            compatible_features,
            autoclear_features,
            refcount_order,
            header_length,
            compression_type,
            extensions_end: u64::from(header_length),
            extensions: Vec::new(),
            backing_file: None,
            backing_format: None,
            data_file: None,
            feature_names: Vec::new(),
            bitmaps: None,
            has_crypto_extension: false,
        };

        header.parse_extensions(buf)?;

        if unknown != 0 {
            return Err(Error::unsupported(format!(
                "unsupported incompatible features: {}",
                header.describe_features(0, unknown)
            )));
        }
        if crypt_method != 0 {
            return Err(Error::unsupported(format!(
                "encrypted images are not supported (crypt_method {crypt_method})"
            )));
        }
        if header.extended_l2() && cluster_bits < 14 {
            return Err(Error::invalid(format!(
                "extended L2 entries need clusters of at least 16 KiB, not {cluster_size} bytes"
            )));
        }
        if header.has_data_file() && header.data_file.is_none() {
            return Err(Error::invalid(
                "the image needs an external data file but does not name one",
            ));
        }
        if !header.has_data_file() && header.data_file.is_some() {
            return Err(Error::invalid(
                "the image names an external data file without the data-file feature bit",
            ));
        }

        header.validate_geometry(file_size)?;
        header.parse_backing_name(buf)?;
        Ok(header)
    }

    /// Names the bits of `mask` using the image's feature name table.
    pub fn describe_features(&self, feature_type: u8, mask: u64) -> String {
        let mut parts = Vec::new();
        for bit in 0..64u8 {
            if mask & (1u64 << bit) == 0 {
                continue;
            }
            match self
                .feature_names
                .iter()
                .find(|f| f.feature_type == feature_type && f.bit == bit)
            {
                Some(f) => parts.push(format!("{} (bit {bit})", f.name)),
                None => parts.push(format!("bit {bit}")),
            }
        }
        parts.join(", ")
    }

    fn parse_extensions(&mut self, buf: &[u8]) -> Result<()> {
        // Extensions follow the header and end at the end marker; they must
        // fit in the first cluster (qemu qcow2_read_extensions).
        let end = (self.cluster_size() as usize).min(buf.len());
        let cluster_end = self.cluster_size();
        let mut at = if self.version >= 3 {
            self.header_length as usize
        } else {
            V2_HEADER_LEN as usize
        };
        // The backing file name, when stored, ends the extension area.
        let limit = if self.backing_file_offset != 0 {
            (self.backing_file_offset.min(cluster_end)) as usize
        } else {
            cluster_end as usize
        };
        loop {
            if at.checked_add(8).map_or(true, |e| e > limit) {
                if at.checked_add(8).is_some_and(|e| e > end) && end < limit {
                    return Err(Error::BeyondEof {
                        what: "header extension",
                        offset: at as u64,
                        len: 8,
                        file_size: buf.len() as u64,
                    });
                }
                // No room for another extension header: the area ends here.
                break;
            }
            let ext_type = be_u32(buf, at);
            let len = be_u32(buf, at + 4);
            if ext_type == EXT_END {
                at += 8;
                break;
            }
            let data_start = at + 8;
            let data_end = data_start.checked_add(len as usize);
            let data = match data_end {
                Some(e) if e <= limit && e <= end => &buf[data_start..e],
                _ => {
                    return Err(Error::invalid(format!(
                        "header extension {ext_type:#010x} at offset {at:#x} (length {len:#x}) overruns the header cluster"
                    )));
                }
            };
            self.extensions.push(ExtensionInfo {
                ext_type,
                offset: data_start as u64,
                len,
            });
            match ext_type {
                EXT_BACKING_FORMAT => {
                    self.backing_format = Some(ext_string(data, "backing format")?);
                }
                EXT_DATA_FILE => {
                    if len > MAX_DATA_FILE_NAME {
                        return Err(Error::TooLarge {
                            what: "external data file name length",
                            value: len.into(),
                            limit: MAX_DATA_FILE_NAME.into(),
                        });
                    }
                    self.data_file = Some(ext_string(data, "external data file name")?);
                }
                EXT_FEATURE_TABLE => {
                    // 48-byte entries: type (1), bit (1), name (46, NUL padded).
                    for entry in data.chunks_exact(48) {
                        let name_bytes = &entry[2..];
                        let name_len = name_bytes.iter().position(|&c| c == 0).unwrap_or(46);
                        self.feature_names.push(FeatureName {
                            feature_type: entry[0],
                            bit: entry[1],
                            name: String::from_utf8_lossy(&name_bytes[..name_len]).into_owned(),
                        });
                    }
                }
                EXT_BITMAPS => {
                    // nb_bitmaps (4), reserved (4), directory size (8), directory offset (8).
                    if data.len() < 24 {
                        return Err(Error::invalid(format!(
                            "bitmaps header extension is {len} bytes, shorter than 24"
                        )));
                    }
                    self.bitmaps = Some(BitmapsExtension {
                        nb_bitmaps: be_u32(data, 0),
                        bitmap_directory_size: be_u64(data, 8),
                        bitmap_directory_offset: be_u64(data, 16),
                    });
                }
                EXT_CRYPTO => self.has_crypto_extension = true,
                _ => {} // unknown extensions are ignored, as the spec allows
            }
            // Data is padded to a multiple of 8.
            at = match data_start.checked_add((len as usize).next_multiple_of(8)) {
                Some(a) => a,
                None => break,
            };
        }
        self.extensions_end = at as u64;
        Ok(())
    }

    fn validate_geometry(&self, file_size: u64) -> Result<()> {
        let cs = self.cluster_size();
        if self.size > MAX_VIRTUAL_SIZE {
            return Err(Error::TooLarge {
                what: "virtual size",
                value: self.size,
                limit: MAX_VIRTUAL_SIZE,
            });
        }
        // L1 table: big enough for the virtual size, capped, aligned, inside the file.
        let needed = self.l1_entries_needed();
        if needed.saturating_mul(8) > MAX_L1_BYTES {
            return Err(Error::TooLarge {
                what: "virtual size needing L1 bytes",
                value: needed.saturating_mul(8),
                limit: MAX_L1_BYTES,
            });
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Error::TooLarge {
                what: "l1_size in bytes",
                value: l1_bytes,
                limit: MAX_L1_BYTES,
            });
        }
        if u64::from(self.l1_size) < needed {
            return Err(Error::invalid(format!(
                "L1 table of {} entries is too small for the virtual size {:#x} (needs {needed})",
                self.l1_size, self.size
            )));
        }
        if self.l1_size > 0 {
            check_table("L1 table", self.l1_table_offset, l1_bytes, cs, file_size)?;
        }
        // Refcount table.
        let rt_bytes = u64::from(self.refcount_table_clusters) << self.cluster_bits;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(Error::TooLarge {
                what: "refcount table bytes",
                value: rt_bytes,
                limit: MAX_REFTABLE_BYTES,
            });
        }
        if rt_bytes > 0 {
            check_table(
                "refcount table",
                self.refcount_table_offset,
                rt_bytes,
                cs,
                file_size,
            )?;
        } else {
            return Err(Error::invalid("the image has no refcount table"));
        }
        // Snapshot table: count capped; the table itself is variable length.
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(Error::TooLarge {
                what: "snapshot count",
                value: self.nb_snapshots.into(),
                limit: MAX_SNAPSHOTS.into(),
            });
        }
        if self.nb_snapshots > 0 {
            // Each entry is at least 40 bytes.
            check_table(
                "snapshot table",
                self.snapshots_offset,
                u64::from(self.nb_snapshots) * 40,
                cs,
                file_size,
            )?;
        }
        Ok(())
    }

    fn parse_backing_name(&mut self, buf: &[u8]) -> Result<()> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        let cs = self.cluster_size();
        if self.backing_file_size > MAX_BACKING_NAME {
            return Err(Error::TooLarge {
                what: "backing file name length",
                value: self.backing_file_size.into(),
                limit: MAX_BACKING_NAME.into(),
            });
        }
        let end = self
            .backing_file_offset
            .checked_add(self.backing_file_size.into())
            .filter(|&e| e <= cs);
        let Some(end) = end else {
            return Err(Error::invalid(format!(
                "backing file name at offset {:#x} (length {}) lies outside the header cluster",
                self.backing_file_offset, self.backing_file_size
            )));
        };
        let name = buf
            .get(self.backing_file_offset as usize..end as usize)
            .ok_or(Error::BeyondEof {
                what: "backing file name",
                offset: self.backing_file_offset,
                len: self.backing_file_size.into(),
                file_size: buf.len() as u64,
            })?;
        if name.is_empty() {
            return Ok(());
        }
        self.backing_file = Some(ext_string(name, "backing file name")?);
        Ok(())
    }
}

fn check_table(
    what: &'static str,
    offset: u64,
    len: u64,
    cluster_size: u64,
    file_size: u64,
) -> Result<()> {
    if offset % cluster_size != 0 {
        return Err(Error::Misaligned {
            what,
            offset,
            align: cluster_size,
        });
    }
    if offset == 0 {
        return Err(Error::invalid(format!(
            "{what} at offset 0x0 overlaps the header"
        )));
    }
    crate::error::check_in_file(what, offset, len, file_size)
}

fn ext_string(data: &[u8], what: &str) -> Result<String> {
    // Names are stored without a terminator; tolerate trailing NULs.
    let trimmed = match data.iter().position(|&c| c == 0) {
        Some(p) => &data[..p],
        None => data,
    };
    String::from_utf8(trimmed.to_vec())
        .map_err(|_| Error::invalid(format!("{what} is not valid UTF-8")))
}
