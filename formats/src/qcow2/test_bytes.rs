//! Big-endian field access for tests that build or damage images in memory,
//! and the header's field offsets (spec, "Header").

pub(crate) const H_MAGIC: u64 = 0;
pub(crate) const H_VERSION: u64 = 4;
pub(crate) const H_BACKING_FILE_OFFSET: u64 = 8;
pub(crate) const H_BACKING_FILE_SIZE: u64 = 16;
pub(crate) const H_CLUSTER_BITS: u64 = 20;
pub(crate) const H_SIZE: u64 = 24;
pub(crate) const H_CRYPT_METHOD: u64 = 32;
pub(crate) const H_L1_SIZE: u64 = 36;
pub(crate) const H_L1_TABLE_OFFSET: u64 = 40;
pub(crate) const H_REFCOUNT_TABLE_OFFSET: u64 = 48;
pub(crate) const H_REFCOUNT_TABLE_CLUSTERS: u64 = 56;
pub(crate) const H_NB_SNAPSHOTS: u64 = 60;
pub(crate) const H_SNAPSHOTS_OFFSET: u64 = 64;
pub(crate) const H_INCOMPATIBLE_FEATURES: u64 = 72;
pub(crate) const H_COMPATIBLE_FEATURES: u64 = 80;
pub(crate) const H_AUTOCLEAR_FEATURES: u64 = 88;
pub(crate) const H_REFCOUNT_ORDER: u64 = 96;
pub(crate) const H_HEADER_LENGTH: u64 = 100;
pub(crate) const H_COMPRESSION_TYPE: u64 = 104;

pub(crate) fn get64(b: &[u8], at: u64) -> u64 {
    super::header::be_u64(b, at as usize)
}
pub(crate) fn put16(b: &mut [u8], at: u64, v: u16) {
    b[at as usize..at as usize + 2].copy_from_slice(&v.to_be_bytes());
}
pub(crate) fn put32(b: &mut [u8], at: u64, v: u32) {
    b[at as usize..at as usize + 4].copy_from_slice(&v.to_be_bytes());
}
pub(crate) fn put64(b: &mut [u8], at: u64, v: u64) {
    b[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes());
}
