//! The internal snapshot table (spec: "Snapshots"). Parsed for `info` and for
//! `check`, which must count the clusters snapshot L1 tables reference.

use super::header::{be_u16 as read_be_u16, be_u32 as read_be_u32, be_u64 as read_be_u64};
use super::Qcow2;
use crate::error::{read_exact_at, Error, Result};

/// Fixed part of a snapshot table entry.
const ENTRY_FIXED: usize = 40;
/// Bound on the extra data an entry may carry (qemu: QCOW_MAX_SNAPSHOT_EXTRA_DATA).
const MAX_EXTRA_DATA: usize = 1024;
/// Bound on the whole snapshot table (qemu: QCOW_MAX_SNAPSHOTS_SIZE, 64 MiB).
const MAX_TABLE_BYTES: u64 = 64 << 20;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    /// Guest size at snapshot time, when recorded in the extra data.
    pub disk_size: Option<u64>,
    /// Offset of this entry in the file, and its length.
    pub entry_offset: u64,
    pub entry_len: u64,
}

impl Qcow2 {
    /// Reads the snapshot table. Bounded by the file size and by
    /// MAX_TABLE_BYTES, not by the header's count alone.
    pub fn snapshots(&self) -> Result<Vec<Snapshot>> {
        let h = self.header();
        let n = h.nb_snapshots as usize;
        if n == 0 {
            return Ok(Vec::new());
        }
        let avail = self
            .file_size()
            .saturating_sub(h.snapshots_offset)
            .min(MAX_TABLE_BYTES);
        let mut buf = vec![0u8; avail as usize];
        read_exact_at(
            &**self.file(),
            &mut buf,
            h.snapshots_offset,
            "snapshot table",
        )?;
        let mut out = Vec::with_capacity(n.min(buf.len() / ENTRY_FIXED));
        let mut at = 0usize;
        for i in 0..n {
            let e = buf.get(at..).unwrap_or(&[]);
            if e.len() < ENTRY_FIXED {
                return Err(past_table(i, h.snapshots_offset + at as u64));
            }
            // l1_table_offset (8), l1_size (4), id_str_size (2), name_size (2),
            // date_sec (4), date_nsec (4), vm_clock_nsec (8), vm_state_size (4),
            // extra_data_size (4), then extra data, id, name, padding to 8.
            let id_len = read_be_u16(e, 12) as usize;
            let name_len = read_be_u16(e, 14) as usize;
            let extra_len = read_be_u32(e, 36) as usize;
            if extra_len > MAX_EXTRA_DATA {
                return Err(Error::TooLarge {
                    what: "snapshot extra data size",
                    value: extra_len as u64,
                    limit: MAX_EXTRA_DATA as u64,
                });
            }
            let len = ENTRY_FIXED + extra_len + id_len + name_len;
            let Some(e) = e.get(..len) else {
                return Err(past_table(i, h.snapshots_offset + at as u64));
            };
            let extra = &e[ENTRY_FIXED..ENTRY_FIXED + extra_len];
            let vm_state_size_large = (extra.len() >= 8).then(|| read_be_u64(extra, 0));
            let disk_size = (extra.len() >= 16).then(|| read_be_u64(extra, 8));
            let id = &e[ENTRY_FIXED + extra_len..ENTRY_FIXED + extra_len + id_len];
            let name = &e[ENTRY_FIXED + extra_len + id_len..len];
            let padded = len.next_multiple_of(8);
            out.push(Snapshot {
                l1_table_offset: read_be_u64(e, 0),
                l1_size: read_be_u32(e, 8),
                id: String::from_utf8_lossy(id).into_owned(),
                name: String::from_utf8_lossy(name).into_owned(),
                date_sec: read_be_u32(e, 16),
                date_nsec: read_be_u32(e, 20),
                vm_clock_nsec: read_be_u64(e, 24),
                vm_state_size: vm_state_size_large.unwrap_or(read_be_u32(e, 32).into()),
                disk_size,
                entry_offset: h.snapshots_offset + at as u64,
                entry_len: padded as u64,
            });
            at += padded;
        }
        Ok(out)
    }
}

fn past_table(index: usize, offset: u64) -> Error {
    Error::invalid(format!(
        "snapshot table entry {index} at offset {offset:#x} runs past the end of the file"
    ))
}
