//! The system calls of the block device that std does not wrap: `flock`
//! on the image, and `preadv`/`pwritev` straight between the image and
//! guest memory. Every function is safe to call: the guest memory side is
//! a [`VolatileSlice`], which vouches for its pointer and length.
//! (`fallocate` comes from vmm-sys-util's safe wrapper, `fdatasync` from
//! std's `File::sync_data`.)

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use vm_memory::volatile_memory::{PtrGuard, PtrGuardMut};
use vm_memory::VolatileSlice;

/// The most iovecs one `preadv`/`pwritev` takes (Linux's `UIO_MAXIOV`);
/// callers pass longer lists in pieces.
pub const MAX_IOVECS: usize = 1024;

/// Which `flock` lock to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// `LOCK_SH`: other shared holders are fine (read-only disks).
    Shared,
    /// `LOCK_EX`: the only holder (read-write disks).
    Exclusive,
}

/// Takes a `flock` lock on `file` without waiting (`LOCK_NB`). An image
/// someone else holds fails with `ErrorKind::WouldBlock`. The lock lasts
/// as long as the open file description (it goes with the last close).
pub fn try_lock(file: &File, kind: LockKind) -> io::Result<()> {
    let operation = match kind {
        LockKind::Shared => libc::LOCK_SH,
        LockKind::Exclusive => libc::LOCK_EX,
    } | libc::LOCK_NB;
    // SAFETY: flock takes a descriptor the `File` owns and plain flags; it
    // touches no memory of ours. The result is checked.
    let ret = unsafe { libc::flock(file.as_raw_fd(), operation) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The iovecs of `guards` (pointer and length of each).
fn iovecs<'a>(guards: impl Iterator<Item = (*mut u8, usize)> + 'a) -> Vec<libc::iovec> {
    guards
        .map(|(base, len)| libc::iovec {
            iov_base: base.cast(),
            iov_len: len,
        })
        .collect()
}

fn file_offset(offset: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(offset).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("offset {offset} is past the largest file offset"),
        )
    })
}

/// One `preadv` from `file` at `offset` into (the first [`MAX_IOVECS`]
/// of) `bufs`: the bytes read, which may be fewer than asked for.
pub fn preadv(file: &File, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<usize> {
    let offset = file_offset(offset)?;
    // The guards keep each slice's pointer valid until they drop (for
    // mmap-backed memory they are the pointer itself).
    let guards: Vec<PtrGuardMut> = bufs
        .iter()
        .take(MAX_IOVECS)
        .map(|s| s.ptr_guard_mut())
        .collect();
    let iovecs = iovecs(guards.iter().map(|g| (g.as_ptr(), g.len())));
    // SAFETY: each iovec is a VolatileSlice's pointer and length, which
    // vm-memory guarantees to be mapped, writable memory for the slice's
    // lifetime, and the guards outlive the call. Guest memory is only ever
    // accessed volatilely, so the kernel writing it races with no Rust
    // reference. The count fits c_int (at most MAX_IOVECS). The result is
    // checked.
    let ret = unsafe {
        libc::preadv(
            file.as_raw_fd(),
            iovecs.as_ptr(),
            iovecs.len() as libc::c_int,
            offset,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret as usize)
}

/// One `pwritev` of (the first [`MAX_IOVECS`] of) `bufs` to `file` at
/// `offset`: the bytes written, which may be fewer than given.
pub fn pwritev(file: &File, bufs: &[VolatileSlice<'_>], offset: u64) -> io::Result<usize> {
    let offset = file_offset(offset)?;
    let guards: Vec<PtrGuard> = bufs
        .iter()
        .take(MAX_IOVECS)
        .map(|s| s.ptr_guard())
        .collect();
    let iovecs = iovecs(guards.iter().map(|g| (g.as_ptr().cast_mut(), g.len())));
    // SAFETY: as in `preadv`, every iovec is a live VolatileSlice; the
    // kernel only reads them here. The result is checked.
    let ret = unsafe {
        libc::pwritev(
            file.as_raw_fd(),
            iovecs.as_ptr(),
            iovecs.len() as libc::c_int,
            offset,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret as usize)
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;

    use vmm_sys_util::tempfile::TempFile;

    use super::*;

    fn open(file: &TempFile) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(file.as_path())
            .unwrap()
    }

    #[test]
    fn flock_conflicts_between_open_file_descriptions() {
        let image = TempFile::new().unwrap();
        let (first, second) = (open(&image), open(&image));
        try_lock(&first, LockKind::Shared).unwrap();
        try_lock(&second, LockKind::Shared).unwrap();
        drop(second);
        let third = open(&image);
        let err = try_lock(&third, LockKind::Exclusive).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        drop(first);
        try_lock(&third, LockKind::Exclusive).unwrap();
        let err = try_lock(&open(&image), LockKind::Shared).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn vectored_io_moves_bytes_between_slices_and_the_file() {
        let image = TempFile::new().unwrap();
        let file = open(&image);
        let mut source = [1u8, 2, 3, 4, 5, 6];
        let (a, b) = source.split_at_mut(2);
        let written =
            pwritev(&file, &[VolatileSlice::from(a), VolatileSlice::from(b)], 10).unwrap();
        assert_eq!(written, 6);
        let mut back = [0u8; 8];
        let (c, d) = back.split_at_mut(5);
        let read = preadv(&file, &[VolatileSlice::from(c), VolatileSlice::from(d)], 9).unwrap();
        assert_eq!(read, 7, "the file ends at 16");
        assert_eq!(back, [0, 1, 2, 3, 4, 5, 6, 0]);
        let err = preadv(&file, &[VolatileSlice::from(&mut back[..])], u64::MAX).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
