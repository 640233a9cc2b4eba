//! Making a range of an existing file or block device read as zeros, and
//! releasing its space where the store can: the one home of BLKZEROOUT,
//! the fallocate modes and the zeros fallback, for every caller in `io`
//! (sync's punches through [`punch_range`], a new device image's zero runs
//! through [`super::Output::zero_range`], a rollback's holes through
//! [`super::journal::rollback()`]).
//!
//! Fallback order:
//!
//! - Files ([`punch_range`]): `fallocate(PUNCH_HOLE | KEEP_SIZE)`; on
//!   EOPNOTSUPP, EINVAL or ENOSYS (a filesystem without holes), zeros
//!   written over the part of the range inside the file's current size.
//!   Past the end the file reads as zeros already, and writing there would
//!   grow it, which the punch never does.
//! - Block devices ([`zero_device_range`]): BLKZEROOUT (may unmap on thin
//!   devices); on ENOTTY, EOPNOTSUPP or EINVAL, `fallocate(ZERO_RANGE |
//!   KEEP_SIZE)`; on EOPNOTSUPP, EINVAL or ENOSYS, zeros written.
//!
//! Any other error is returned: the range may not read as zeros.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use rustix::fs::FallocateFlags;
use rustix::io::Errno;

/// Largest write of the zeros fallback (and its buffer).
const ZEROS_CHUNK: u64 = 1 << 20;

/// Makes `[offset, offset + len)` of an existing file or block device
/// (`is_device`) read as zeros, releasing the space where it can, in the
/// fallback order of the module docs. A file keeps its size.
pub fn punch_range(file: &File, is_device: bool, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    if is_device {
        return zero_device_range(file, offset, len);
    }
    match rustix::fs::fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    ) {
        Ok(()) => Ok(()),
        Err(Errno::OPNOTSUPP) | Err(Errno::INVAL) | Err(Errno::NOSYS) => {
            zero_file_range(file, offset, len)
        }
        Err(e) => Err(e.into()),
    }
}

/// Makes `[offset, offset + len)` of a block device read as zeros:
/// BLKZEROOUT, then `fallocate(ZERO_RANGE | KEEP_SIZE)`, then zeros.
pub fn zero_device_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    match blkzeroout(file, offset, len) {
        Ok(()) => return Ok(()),
        Err(Errno::NOTTY) | Err(Errno::OPNOTSUPP) | Err(Errno::INVAL) => {}
        Err(e) => return Err(e.into()),
    }
    match rustix::fs::fallocate(
        file,
        FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    ) {
        Ok(()) => return Ok(()),
        Err(Errno::OPNOTSUPP) | Err(Errno::INVAL) | Err(Errno::NOSYS) => {}
        Err(e) => return Err(e.into()),
    }
    write_zeros(file, offset, len)
}

/// The files' fallback: zeros over the part of the range inside the file
/// (past its end it reads as zeros already, and writing there would grow
/// a file that shrank during a sync).
fn zero_file_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let size = file.metadata()?.len();
    let end = offset.saturating_add(len).min(size);
    if end > offset {
        write_zeros(file, offset, end - offset)?;
    }
    Ok(())
}

/// BLKZEROOUT from linux/fs.h: `_IO(0x12, 127)`, argument `uint64_t[2]`
/// (start, length), both multiples of the logical block size.
fn blkzeroout(file: &File, offset: u64, len: u64) -> Result<(), Errno> {
    const BLKZEROOUT: rustix::ioctl::Opcode = rustix::ioctl::opcode::none(0x12, 127);
    // SAFETY: BLKZEROOUT reads a `uint64_t[2]` through the pointer the Setter
    // passes; `[u64; 2]` has that layout, and the kernel does not keep it.
    unsafe {
        let arg = rustix::ioctl::Setter::<BLKZEROOUT, [u64; 2]>::new([offset, len]);
        rustix::ioctl::ioctl(file, arg)
    }
}

/// The last fallback: write zeros, 1 MiB at a time.
fn write_zeros(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let zeros = vec![0u8; len.min(ZEROS_CHUNK) as usize];
    let mut pos = offset;
    let end = offset.saturating_add(len);
    while pos < end {
        let n = (end - pos).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: u64 = 64 << 10;

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    /// The zeros fallback for filesystems without PUNCH_HOLE, and the
    /// device order's last resort.
    #[test]
    fn zero_fallbacks_write_zeros_within_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, pattern(3, 3 * B as usize)).unwrap();
        let f = File::options().read(true).write(true).open(&p).unwrap();
        zero_file_range(&f, B, 4 * B).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 3 * B);
        write_zeros(&f, 0, 100).unwrap();
        let got = std::fs::read(&p).unwrap();
        assert!(got[..100].iter().all(|&x| x == 0));
        assert_eq!(
            &got[100..B as usize],
            &pattern(3, 3 * B as usize)[100..B as usize]
        );
        assert!(got[B as usize..].iter().all(|&x| x == 0));
        // A regular file is not a block device: BLKZEROOUT says so, and the
        // device order goes on to ZERO_RANGE or zeros.
        std::fs::write(&p, pattern(3, 3 * B as usize)).unwrap();
        assert!(blkzeroout(&f, 0, B).is_err());
        zero_device_range(&f, B, B).unwrap();
        let got = std::fs::read(&p).unwrap();
        assert!(got[B as usize..2 * B as usize].iter().all(|&x| x == 0));
        assert_eq!(
            &got[..B as usize],
            &pattern(3, 3 * B as usize)[..B as usize]
        );
    }

    /// A punch reaching past the end of a file keeps the file's size,
    /// whether it makes a hole or falls back to zeros.
    #[test]
    fn punching_a_file_past_its_end_keeps_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let old = pattern(5, 3 * B as usize);
        std::fs::write(&p, &old).unwrap();
        let f = File::options().read(true).write(true).open(&p).unwrap();
        punch_range(&f, false, 2 * B, 4 * B).unwrap();
        punch_range(&f, false, 5 * B, B).unwrap();
        punch_range(&f, false, 0, 0).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 3 * B);
        let got = std::fs::read(&p).unwrap();
        assert_eq!(&got[..2 * B as usize], &old[..2 * B as usize]);
        assert!(got[2 * B as usize..].iter().all(|&x| x == 0));
    }
}
