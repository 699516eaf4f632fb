//! Host virtual address reservations at a chosen alignment, and shared
//! mappings placed inside them: the thin `mmap` layer under BAR mapping.
//!
//! A BAR only gets PMD or PUD entries in the host page table (and so in
//! KVM's EPT/NPT) when its host virtual address agrees with the device's
//! physical address modulo the page size. `mmap(NULL, ...)` gives no such
//! promise, so an [`AlignedMapping`] first reserves `len + align` bytes of
//! address space with `PROT_NONE`, picks the aligned start inside it, maps the
//! file over that start with `MAP_FIXED`, and gives back the unused head and
//! tail. The mapping is unmapped when dropped.

use std::os::fd::{AsRawFd, BorrowedFd};

/// Smallest alignment a mapping can have.
pub const HOST_PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    #[error(
        "mapping alignment {align:#x} with phase {phase:#x} is invalid: the alignment must be a \
         power of two of at least 4 KiB and the phase a page multiple below it"
    )]
    BadAlignment { align: u64, phase: u64 },
    #[error("cannot map {len:#x} bytes: the length must be a non-zero multiple of 4 KiB")]
    BadLength { len: u64 },
    #[error("area {offset:#x}+{len:#x} is not a non-empty, page-aligned part of the {total:#x}-byte mapping")]
    BadArea { offset: u64, len: u64, total: u64 },
    #[error("cannot reserve {len:#x} bytes of host address space: {source}")]
    Reserve { len: u64, source: std::io::Error },
    #[error("cannot map {len:#x} bytes at file offset {offset:#x} over the reservation: {source}")]
    Map {
        len: u64,
        offset: u64,
        source: std::io::Error,
    },
    #[error(
        "cannot mark the {len:#x}-byte mapping MADV_DONTFORK ({source}): a child process would \
         copy its page tables; please report this as a barge bug"
    )]
    DontFork { len: u64, source: std::io::Error },
}

/// A shared mapping of a file (a VFIO region, a memfd) at a host virtual
/// address congruent to `phase` modulo `align`.
#[derive(Debug)]
pub struct AlignedMapping {
    addr: u64,
    len: u64,
}

/// Where the aligned start falls inside a reservation that begins at `base`:
/// the lowest address `>= base` that is `≡ phase (mod align)`.
pub fn aligned_start(base: u64, align: u64, phase: u64) -> u64 {
    let candidate = (base & !(align - 1)) + phase;
    if candidate >= base {
        candidate
    } else {
        candidate + align
    }
}

impl AlignedMapping {
    /// Maps `len` bytes of `fd` from `offset`, shared and readable/writable,
    /// at an address `≡ phase (mod align)`.
    pub fn map_shared(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: u64,
        align: u64,
        phase: u64,
    ) -> Result<Self, MappingError> {
        Self::map_shared_areas(fd, offset, len, align, phase, &[(0, len)])
    }

    /// Reserves `len` bytes at an address `≡ phase (mod align)` and maps each
    /// area `(area_offset, area_len)` of it from `fd` at file offset
    /// `offset + area_offset`, shared and readable/writable, keeping its
    /// place: the area's address is the base plus `area_offset`. The rest
    /// stays reserved (`PROT_NONE`, a fault if touched). This is how a BAR
    /// with sparse mmap-able areas keeps the alignment of the whole BAR.
    /// Everything is unmapped on drop, or when an area fails to map.
    pub fn map_shared_areas(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: u64,
        align: u64,
        phase: u64,
        areas: &[(u64, u64)],
    ) -> Result<Self, MappingError> {
        if !align.is_power_of_two()
            || align < HOST_PAGE_SIZE
            || phase >= align
            || phase % HOST_PAGE_SIZE != 0
        {
            return Err(MappingError::BadAlignment { align, phase });
        }
        if len == 0 || len % HOST_PAGE_SIZE != 0 {
            return Err(MappingError::BadLength { len });
        }
        for &(area_offset, area_len) in areas {
            let inside = area_offset
                .checked_add(area_len)
                .is_some_and(|end| end <= len);
            if area_len == 0
                || area_len % HOST_PAGE_SIZE != 0
                || area_offset % HOST_PAGE_SIZE != 0
                || !inside
            {
                return Err(MappingError::BadArea {
                    offset: area_offset,
                    len: area_len,
                    total: len,
                });
            }
        }
        let reserve_len = len
            .checked_add(align)
            .ok_or(MappingError::BadLength { len })?;
        let base = sys::reserve(reserve_len).map_err(|source| MappingError::Reserve {
            len: reserve_len,
            source,
        })?;
        let start = aligned_start(base, align, phase);
        for &(area_offset, area_len) in areas {
            let file_offset = offset.saturating_add(area_offset);
            if let Err(source) =
                sys::map_fixed_shared(start + area_offset, area_len, fd.as_raw_fd(), file_offset)
            {
                sys::unmap(base, reserve_len);
                return Err(MappingError::Map {
                    len: area_len,
                    offset: file_offset,
                    source,
                });
            }
        }
        // Give back the unused head and tail of the reservation.
        if start > base {
            sys::unmap(base, start - base);
        }
        let end = start + len;
        let reserve_end = base + reserve_len;
        if reserve_end > end {
            sys::unmap(end, reserve_end - end);
        }
        // A child of the process (an embedding program's Command, a fork)
        // must not copy the mapping's page tables: for a BAR that means
        // huge pfnmap entries, and the guest's view stays the parent's.
        if let Err(source) = sys::advise_dont_fork(start, len) {
            sys::unmap(start, len);
            return Err(MappingError::DontFork { len, source });
        }
        Ok(AlignedMapping { addr: start, len })
    }

    /// Asks for transparent huge pages on the mapping (shmem THP in
    /// `advise` mode needs it). Best effort: the kernel may say no.
    pub fn advise_huge_pages(&self) -> std::io::Result<()> {
        sys::advise_huge_pages(self.addr, self.len)
    }

    /// The host virtual address of the mapping.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for AlignedMapping {
    fn drop(&mut self) {
        sys::unmap(self.addr, self.len);
    }
}

/// The `mmap`/`munmap` calls, and nothing else.
mod sys {
    use std::io;

    /// Reserves `len` bytes of address space that nothing can touch.
    pub fn reserve(len: u64) -> io::Result<u64> {
        // SAFETY: an anonymous PROT_NONE mapping at an address the kernel
        // chooses cannot alias any existing Rust object.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(addr as u64)
    }

    /// Maps `fd` over `[addr, addr + len)`, which must lie inside a
    /// reservation made by [`reserve`] and owned by the caller.
    pub fn map_fixed_shared(addr: u64, len: u64, fd: i32, offset: u64) -> io::Result<()> {
        // SAFETY: MAP_FIXED replaces only pages of the caller's own PROT_NONE
        // reservation (the caller guarantees the range lies inside it), so no
        // memory Rust code refers to is replaced.
        let mapped = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd,
                offset as libc::off_t,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// MADV_HUGEPAGE over a range this module mapped.
    pub fn advise_huge_pages(addr: u64, len: u64) -> io::Result<()> {
        // SAFETY: the range is a live mapping owned by the caller's
        // AlignedMapping; MADV_HUGEPAGE only changes how the kernel backs it.
        let ret =
            unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, libc::MADV_HUGEPAGE) };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// MADV_DONTFORK over a range this module mapped or reserved: a child
    /// process gets nothing of it.
    pub fn advise_dont_fork(addr: u64, len: u64) -> io::Result<()> {
        // SAFETY: the range is a live mapping or reservation owned by the
        // caller; MADV_DONTFORK only keeps it out of child processes, it
        // changes nothing in this one.
        let ret =
            unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, libc::MADV_DONTFORK) };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Unmaps a range this module mapped or reserved.
    pub fn unmap(addr: u64, len: u64) {
        // SAFETY: the range was mapped or reserved by this module and no
        // reference into it outlives the owner that calls this.
        unsafe {
            libc::munmap(addr as *mut libc::c_void, len as usize);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::AsFd;

    use super::*;

    const MIB: u64 = 1 << 20;

    fn memfd(len: u64) -> std::fs::File {
        // SAFETY: memfd_create with a valid NUL-terminated name returns a new
        // fd or -1; the fd is owned by the File from here on.
        let fd = unsafe { libc::memfd_create(c"barge-mapping-test".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh, owned file descriptor.
        let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(len).unwrap();
        file
    }

    fn is_mapped(addr: u64) -> bool {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        maps.lines().any(|line| {
            let range = line.split_whitespace().next().unwrap();
            let (start, end) = range.split_once('-').unwrap();
            let start = u64::from_str_radix(start, 16).unwrap();
            let end = u64::from_str_radix(end, 16).unwrap();
            (start..end).contains(&addr)
        })
    }

    #[test]
    fn start_is_the_first_congruent_address_in_the_reservation() {
        assert_eq!(aligned_start(0x1000, 0x20_0000, 0), 0x20_0000);
        assert_eq!(aligned_start(0x20_0000, 0x20_0000, 0), 0x20_0000);
        assert_eq!(aligned_start(0x1000, 0x20_0000, 0x1000), 0x1000);
        assert_eq!(aligned_start(0x2000, 0x20_0000, 0x1000), 0x20_1000);
    }

    #[test]
    fn mapping_is_aligned_shared_and_unmapped_on_drop() {
        let len = 4 << 20;
        let mut file = memfd(len);
        let mapping =
            AlignedMapping::map_shared(file.as_fd(), 0, len, 2 << 20, 0).expect("mapping");
        assert_eq!(mapping.addr() % (2 << 20), 0);
        assert_eq!(mapping.len(), len);
        // A write through the file shows in the mapping.
        file.seek(SeekFrom::Start(0x1234)).unwrap();
        file.write_all(b"barge").unwrap();
        // SAFETY: the mapping is live, readable and at least 0x1239 bytes long.
        let seen = unsafe { std::slice::from_raw_parts((mapping.addr() + 0x1234) as *const u8, 5) };
        assert_eq!(seen, b"barge");
        let addr = mapping.addr();
        assert!(is_mapped(addr));
        drop(mapping);
        assert!(!is_mapped(addr));
        let mut back = Vec::new();
        file.seek(SeekFrom::Start(0x1234)).unwrap();
        file.take(5).read_to_end(&mut back).unwrap();
        assert_eq!(back, b"barge");
    }

    #[test]
    fn mappings_and_their_reserved_holes_stay_out_of_child_processes() {
        let file = memfd(4 * MIB);
        let mapping = AlignedMapping::map_shared_areas(
            file.as_fd(),
            0,
            4 * MIB,
            2 * MIB,
            0,
            &[(0, MIB), (3 * MIB, MIB)],
        )
        .unwrap();
        // An area and the PROT_NONE hole between the areas.
        for offset in [0, 2 * MIB] {
            let flags = crate::machine::smaps_vm_flags(mapping.addr() + offset).unwrap();
            assert!(flags.contains(&"dc".to_string()), "+{offset:#x}: {flags:?}");
        }
    }

    #[test]
    fn phase_moves_the_mapping_off_the_larger_boundary() {
        let len = 4 << 20;
        let file = memfd(len);
        let mapping = AlignedMapping::map_shared(file.as_fd(), 0, len, 4 << 20, 2 << 20).unwrap();
        assert_eq!(mapping.addr() % (4 << 20), 2 << 20);
    }

    #[test]
    fn areas_keep_their_offsets_and_holes_stay_reserved() {
        let len = 4 << 20;
        let mut file = memfd(len);
        file.seek(SeekFrom::Start(0x30_0000)).unwrap();
        file.write_all(b"area").unwrap();
        let mapping = AlignedMapping::map_shared_areas(
            file.as_fd(),
            0,
            len,
            2 << 20,
            0,
            &[(0, 0x1000), (0x20_0000, 0x20_0000)],
        )
        .unwrap();
        assert_eq!(mapping.addr() % (2 << 20), 0);
        // SAFETY: the second area is mapped, readable, and covers 0x300000.
        let seen =
            unsafe { std::slice::from_raw_parts((mapping.addr() + 0x30_0000) as *const u8, 4) };
        assert_eq!(seen, b"area");
        // The hole is still ours (reserved), so nothing else lands there.
        assert!(is_mapped(mapping.addr() + 0x10_0000));
        mapping.advise_huge_pages().unwrap();
        let addr = mapping.addr();
        drop(mapping);
        assert!(!is_mapped(addr + 0x10_0000));
        for areas in [&[(0, 0)][..], &[(0x800, 0x1000)], &[(0, len + 0x1000)]] {
            let err =
                AlignedMapping::map_shared_areas(file.as_fd(), 0, len, 4096, 0, areas).unwrap_err();
            assert!(matches!(err, MappingError::BadArea { .. }), "{areas:?}");
        }
    }

    #[test]
    fn bad_arguments_are_refused_without_mapping() {
        let file = memfd(1 << 20);
        for (len, align, phase) in [
            (0, 4096, 0),
            (100, 4096, 0),
            (4096, 3000, 0),
            (4096, 8192, 8192),
            (4096, 8192, 100),
        ] {
            assert!(AlignedMapping::map_shared(file.as_fd(), 0, len, align, phase).is_err());
        }
        // Beyond the end of a memfd, mmap itself succeeds (SIGBUS on touch);
        // an fd that is not mappable fails and leaves no reservation behind.
        let dir = std::fs::File::open("/").unwrap();
        let err = AlignedMapping::map_shared(dir.as_fd(), 0, 4096, 4096, 0).unwrap_err();
        assert!(err.to_string().contains("cannot map"), "{err}");
    }
}
