//! Guest RAM: mapping the regions the layout gives with the backing the
//! configuration asks for.
//!
//! | `--memory` keys               | backing           | mapping                                         |
//! |-------------------------------|-------------------|-------------------------------------------------|
//! | (default)                     | `anonymous`       | private anonymous, `madvise(MADV_HUGEPAGE)`     |
//! | `hugepages=2M` / `1G`         | `hugetlbfs`       | private anonymous `MAP_HUGETLB` + `MAP_HUGE_*`  |
//! | `shared=on`                   | `memfd`           | one memfd, shared, `madvise(MADV_HUGEPAGE)`     |
//! | `shared=on,hugepages=2M`/`1G` | `memfd-hugetlbfs` | one `MFD_HUGETLB` memfd, shared                 |
//!
//! Huge page backings check the host's free huge pages in sysfs first, so a
//! shortage is a clear error (with the command that reserves more) rather
//! than a failed `mmap` or a SIGBUS later. Every region's address, size,
//! backing and page size is recorded for the report.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use vm_memory::mmap::{MmapRegionBuilder, MmapRegionError};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionCollectionError,
    GuestRegionMmap,
};

use crate::config::{format_option_size, HugePageSize, MemoryConfig, BASE_PAGE_SIZE};
use crate::report::MemoryRegionReport;

/// Where the host's huge page pools live in sysfs, relative to the sysfs root.
const HUGEPAGES_SYSFS_DIR: &str = "kernel/mm/hugepages";
/// The real sysfs root.
pub const SYSFS_ROOT: &str = "/sys";

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// No regions were given.
    #[error("no guest memory regions to map")]
    NoRegions,
    /// A region's address or size is not a multiple of its page size.
    #[error("guest memory region at {gpa:#x} of size {size:#x} is not aligned to the {} page size; use a memory size that is a multiple of {}", format_option_size(*page_size), format_option_size(*page_size))]
    RegionNotAligned {
        /// Guest physical address.
        gpa: u64,
        /// Size in bytes.
        size: u64,
        /// The page size in use.
        page_size: u64,
    },
    /// A region does not fit the host's address space or wraps around.
    #[error("guest memory region at {gpa:#x} of size {size:#x} is too large for this host")]
    RegionTooLarge {
        /// Guest physical address.
        gpa: u64,
        /// Size in bytes.
        size: u64,
    },
    /// Not enough free huge pages.
    #[error("memory {request} needs {needed} free {page} huge pages but only {free} are free; reserve more with: echo {reserve} > {nr_path}")]
    HugePagesShort {
        /// The `--memory` request, e.g. "size=1G,hugepages=2M".
        request: String,
        /// Pages needed.
        needed: u64,
        /// Pages free.
        free: u64,
        /// Page size in words, e.g. "2 MiB".
        page: &'static str,
        /// Value to write to `nr_hugepages` so that enough are free.
        reserve: u64,
        nr_path: PathBuf,
    },
    /// The host has no pool for this huge page size.
    #[error("memory {request}: this host has no {page} huge page pool ({path} is missing); use the other huge page size or boot the host with hugepagesz={size} hugepages=N")]
    NoHugePagePool {
        request: String,
        /// Page size in words.
        page: &'static str,
        /// Page size in kernel syntax ("2M", "1G").
        size: HugePageSize,
        path: PathBuf,
    },
    /// A sysfs huge page counter could not be read or parsed.
    #[error("cannot read the huge page count {path}: {reason}")]
    ReadHugePageCount { path: PathBuf, reason: String },
    /// memfd_create or sizing the memfd failed.
    #[error("cannot create the {size} memfd for shared guest memory: {source}")]
    Memfd {
        /// Total size asked for.
        size: String,
        source: io::Error,
    },
    /// Mapping a region failed.
    #[error("cannot map guest memory region at {gpa:#x} of size {} ({backing}): {source}", format_option_size(*size))]
    Map {
        /// Guest physical address.
        gpa: u64,
        /// Size in bytes.
        size: u64,
        backing: Backing,
        source: MmapRegionError,
    },
    /// MADV_DONTFORK on a region failed.
    #[error(
        "cannot mark guest memory at {gpa:#x} MADV_DONTFORK ({source}): a child process would \
         copy it; please report this as a barge bug"
    )]
    DontFork { gpa: u64, source: io::Error },
    /// The regions overlap or are out of order.
    #[error("invalid guest memory layout: {0}")]
    Layout(#[from] GuestRegionCollectionError),
    /// `prefault=on` could not populate a region.
    #[error(
        "cannot pre-fault guest memory at {gpa:#x} (prefault=on): {source}; it needs Linux 5.14 \
         or later (MADV_POPULATE_WRITE) and, with hugepages=, enough free huge pages; or leave \
         prefault off"
    )]
    Prefault { gpa: u64, source: io::Error },
}

/// How guest RAM is backed on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// Private anonymous memory with transparent huge pages advised.
    Anonymous,
    /// Private anonymous hugetlbfs memory.
    Hugetlbfs(HugePageSize),
    /// A memfd mapped shared, transparent huge pages advised.
    Memfd,
    /// A hugetlbfs memfd mapped shared.
    MemfdHugetlbfs(HugePageSize),
}

impl Backing {
    /// The backing a memory configuration asks for.
    pub fn from_config(config: &MemoryConfig) -> Self {
        match (config.shared, config.hugepages) {
            (false, None) => Backing::Anonymous,
            (false, Some(size)) => Backing::Hugetlbfs(size),
            (true, None) => Backing::Memfd,
            (true, Some(size)) => Backing::MemfdHugetlbfs(size),
        }
    }

    /// The name used in the report.
    pub fn name(&self) -> &'static str {
        match self {
            Backing::Anonymous => "anonymous",
            Backing::Hugetlbfs(_) => "hugetlbfs",
            Backing::Memfd => "memfd",
            Backing::MemfdHugetlbfs(_) => "memfd-hugetlbfs",
        }
    }

    /// The huge page size, for hugetlbfs backings.
    pub fn huge_page_size(&self) -> Option<HugePageSize> {
        match self {
            Backing::Hugetlbfs(size) | Backing::MemfdHugetlbfs(size) => Some(*size),
            Backing::Anonymous | Backing::Memfd => None,
        }
    }

    /// The page size the host maps with (ordinary backings: 4 KiB, even if
    /// transparent huge pages back parts of them).
    pub fn page_size(&self) -> u64 {
        self.huge_page_size()
            .map_or(BASE_PAGE_SIZE, HugePageSize::bytes)
    }
}

impl fmt::Display for Backing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())?;
        if let Some(size) = self.huge_page_size() {
            write!(f, " {size}")?;
        }
        Ok(())
    }
}

/// One mapped guest RAM region, as the report shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    /// Guest physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Host backing.
    pub backing: Backing,
    /// Page size of the host mapping in bytes.
    pub page_size: u64,
}

impl From<&RegionInfo> for MemoryRegionReport {
    fn from(info: &RegionInfo) -> Self {
        MemoryRegionReport {
            gpa: info.gpa,
            size: info.size,
            backing: info.backing.name().to_string(),
            page_size: info.page_size,
        }
    }
}

/// Guest RAM: the vm-memory collection plus what each region is.
#[derive(Debug)]
pub struct GuestRam {
    /// The mapped regions, ready for memslots and loaders.
    pub memory: GuestMemoryMmap,
    /// One entry per region, in address order.
    pub regions: Vec<RegionInfo>,
}

impl GuestRam {
    /// Populates every page of guest RAM now (`prefault=on`) rather than on
    /// the guest's or the DMA map's first touch, each region cut into
    /// `threads` slices (on page boundaries of its backing) populated side
    /// by side with MADV_POPULATE_WRITE. Returns the threads used.
    pub fn prefault(&self, threads: usize) -> Result<usize, MemoryError> {
        let threads = threads.max(1);
        let mut slices = Vec::new();
        for (region, info) in self.memory.iter().zip(&self.regions) {
            let pages = info.size / info.page_size;
            let per_slice = pages.div_ceil(threads as u64).max(1);
            let mut page = 0;
            while page < pages {
                let count = per_slice.min(pages - page);
                slices.push((
                    region,
                    info.gpa,
                    page * info.page_size,
                    count * info.page_size,
                ));
                page += count;
            }
        }
        let used = slices.len().min(threads);
        std::thread::scope(|scope| {
            let workers: Vec<_> = slices
                .into_iter()
                .map(|(region, gpa, offset, size)| {
                    scope.spawn(move || {
                        sys::populate_write(region, offset, size).map_err(|source| {
                            MemoryError::Prefault {
                                gpa: gpa + offset,
                                source,
                            }
                        })
                    })
                })
                .collect();
            workers.into_iter().try_for_each(|worker| {
                worker.join().unwrap_or_else(|_| {
                    Err(MemoryError::Prefault {
                        gpa: 0,
                        source: io::Error::other("a pre-fault thread panicked"),
                    })
                })
            })
        })?;
        Ok(used)
    }

    /// The regions in the report's form.
    pub fn region_reports(&self) -> Vec<MemoryRegionReport> {
        self.regions.iter().map(MemoryRegionReport::from).collect()
    }
}

/// A host huge page pool's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HugePagePool {
    /// `nr_hugepages`: pages in the pool.
    pub total: u64,
    /// `free_hugepages`: pages not in use.
    pub free: u64,
}

fn page_words(size: HugePageSize) -> &'static str {
    match size {
        HugePageSize::Size2M => "2 MiB",
        HugePageSize::Size1G => "1 GiB",
    }
}

fn pool_dir(sysfs_root: &Path, size: HugePageSize) -> PathBuf {
    sysfs_root
        .join(HUGEPAGES_SYSFS_DIR)
        .join(format!("hugepages-{}kB", size.kib()))
}

fn read_count(path: &Path) -> Result<u64, MemoryError> {
    let text = std::fs::read_to_string(path).map_err(|e| MemoryError::ReadHugePageCount {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    text.trim()
        .parse()
        .map_err(|_| MemoryError::ReadHugePageCount {
            path: path.to_path_buf(),
            reason: format!("{:?} is not a number", text.trim()),
        })
}

/// Reads the huge page pool of `size` under `sysfs_root` (normally
/// [`SYSFS_ROOT`]; tests pass a fake tree). `request` names the memory
/// configuration in the error when the pool does not exist.
pub fn read_huge_page_pool(
    sysfs_root: &Path,
    size: HugePageSize,
    request: &dyn fmt::Display,
) -> Result<HugePagePool, MemoryError> {
    let dir = pool_dir(sysfs_root, size);
    if !dir.is_dir() {
        return Err(MemoryError::NoHugePagePool {
            request: request.to_string(),
            page: page_words(size),
            size,
            path: dir,
        });
    }
    Ok(HugePagePool {
        total: read_count(&dir.join("nr_hugepages"))?,
        free: read_count(&dir.join("free_hugepages"))?,
    })
}

/// Fails unless `bytes` of huge pages of `size` are free under `sysfs_root`.
/// The error gives the count to write to `nr_hugepages` (the current pool
/// plus the shortfall) with the path on the real host.
pub fn check_free_huge_pages(
    sysfs_root: &Path,
    size: HugePageSize,
    bytes: u64,
    request: &dyn fmt::Display,
) -> Result<(), MemoryError> {
    let pool = read_huge_page_pool(sysfs_root, size, request)?;
    let needed = bytes.div_ceil(size.bytes());
    if pool.free >= needed {
        return Ok(());
    }
    Err(MemoryError::HugePagesShort {
        request: request.to_string(),
        needed,
        free: pool.free,
        page: page_words(size),
        reserve: pool.total.saturating_add(needed - pool.free),
        nr_path: pool_dir(Path::new(SYSFS_ROOT), size).join("nr_hugepages"),
    })
}

/// Maps guest RAM for `regions` (guest physical address, size in bytes;
/// sorted, not overlapping) with the backing `config` asks for. `config.size`
/// is only used in messages: the regions say how much to map.
pub fn create_guest_memory(
    regions: &[(u64, u64)],
    config: &MemoryConfig,
) -> Result<GuestRam, MemoryError> {
    create_guest_memory_with_sysfs(regions, config, Path::new(SYSFS_ROOT))
}

/// [`create_guest_memory`] reading huge page counts under `sysfs_root`.
pub fn create_guest_memory_with_sysfs(
    regions: &[(u64, u64)],
    config: &MemoryConfig,
    sysfs_root: &Path,
) -> Result<GuestRam, MemoryError> {
    if regions.is_empty() {
        return Err(MemoryError::NoRegions);
    }
    let backing = Backing::from_config(config);
    let page_size = backing.page_size();
    let mut total: u64 = 0;
    for &(gpa, size) in regions {
        if gpa % page_size != 0 || size % page_size != 0 || size == 0 {
            return Err(MemoryError::RegionNotAligned {
                gpa,
                size,
                page_size,
            });
        }
        if gpa.checked_add(size).is_none() || usize::try_from(size).is_err() {
            return Err(MemoryError::RegionTooLarge { gpa, size });
        }
        total = total
            .checked_add(size)
            .ok_or(MemoryError::RegionTooLarge { gpa, size })?;
    }
    if let Some(huge) = backing.huge_page_size() {
        check_free_huge_pages(sysfs_root, huge, total, config)?;
    }

    let memfd = match backing {
        Backing::Memfd | Backing::MemfdHugetlbfs(_) => Some(
            sys::create_memfd(backing.huge_page_size(), total).map_err(|source| {
                MemoryError::Memfd {
                    size: format_option_size(total),
                    source,
                }
            })?,
        ),
        Backing::Anonymous | Backing::Hugetlbfs(_) => None,
    };

    let mut mapped = Vec::with_capacity(regions.len());
    let mut infos = Vec::with_capacity(regions.len());
    let mut file_offset = 0u64;
    for &(gpa, size) in regions {
        let map_error = |source| MemoryError::Map {
            gpa,
            size,
            backing,
            source,
        };
        // Checked above: size fits usize.
        let len = size as usize;
        let mut builder = MmapRegionBuilder::new(len)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(sys::mmap_flags(backing))
            .with_hugetlbfs(backing.huge_page_size().is_some());
        if let Some(file) = &memfd {
            let file = file.try_clone().map_err(|source| MemoryError::Memfd {
                size: format_option_size(total),
                source,
            })?;
            builder = builder.with_file_offset(FileOffset::new(file, file_offset));
        }
        let region = builder.build().map_err(map_error)?;
        // As QEMU does: a child process (an embedding program's Command)
        // neither copies guest RAM nor shares it copy-on-write.
        sys::advise_dont_fork(&region).map_err(|source| MemoryError::DontFork { gpa, source })?;
        if backing.huge_page_size().is_none() {
            if let Err(e) = sys::advise_huge_pages(&region) {
                log::warn!(
                    "madvise(MADV_HUGEPAGE) on guest memory at {gpa:#x} failed ({e}); \
                     it stays on 4 KiB pages"
                );
            }
        }
        let region = GuestRegionMmap::new(region, GuestAddress(gpa))
            .ok_or(MemoryError::RegionTooLarge { gpa, size })?;
        mapped.push(region);
        infos.push(RegionInfo {
            gpa,
            size,
            backing,
            page_size,
        });
        file_offset += size;
    }
    let memory = GuestMemoryMmap::from_regions(mapped)?;
    Ok(GuestRam {
        memory,
        regions: infos,
    })
}

/// Creates a close-on-exec memfd of `size` bytes, from the hugetlbfs pool
/// of `huge` when given (shared memory devices use it too).
pub fn create_memfd(huge: Option<HugePageSize>, size: u64) -> io::Result<std::fs::File> {
    sys::create_memfd(huge, size)
}

/// The raw system calls: memfd_create, mmap flags and madvise.
mod sys {
    use std::ffi::CStr;
    use std::fs::File;
    use std::io;
    use std::os::fd::FromRawFd;

    use vm_memory::{GuestMemoryRegion, GuestRegionMmap, MmapRegion};

    use super::Backing;
    use crate::config::HugePageSize;

    const MEMFD_NAME: &CStr = c"barge-guest-ram";

    /// mmap flags for a backing (vm-memory's builder does the mmap).
    pub fn mmap_flags(backing: Backing) -> i32 {
        match backing {
            Backing::Anonymous => libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            Backing::Hugetlbfs(size) => {
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | map_huge_flag(size)
            }
            Backing::Memfd => libc::MAP_SHARED | libc::MAP_NORESERVE,
            // The memfd is hugetlbfs already; MAP_HUGETLB is for anonymous maps.
            Backing::MemfdHugetlbfs(_) => libc::MAP_SHARED,
        }
    }

    fn map_huge_flag(size: HugePageSize) -> i32 {
        match size {
            HugePageSize::Size2M => libc::MAP_HUGE_2MB,
            HugePageSize::Size1G => libc::MAP_HUGE_1GB,
        }
    }

    /// Creates a close-on-exec memfd of `size` bytes, from the hugetlbfs
    /// pool of `huge` when given.
    pub fn create_memfd(huge: Option<HugePageSize>, size: u64) -> io::Result<File> {
        let mut flags = libc::MFD_CLOEXEC;
        match huge {
            Some(HugePageSize::Size2M) => flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB,
            Some(HugePageSize::Size1G) => flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_1GB,
            None => {}
        }
        // SAFETY: MEMFD_NAME is a valid NUL-terminated string that outlives
        // the call; memfd_create reads only it and returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(MEMFD_NAME.as_ptr(), flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by memfd_create, is valid and owned
        // by nothing else; the File takes sole ownership and closes it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)?;
        Ok(file)
    }

    /// Keeps the whole of `region` out of child processes (MADV_DONTFORK).
    pub fn advise_dont_fork(region: &MmapRegion) -> io::Result<()> {
        // SAFETY: the range is exactly the live mapping `region` owns (its
        // pointer and size come from the mmap that created it), and
        // MADV_DONTFORK only keeps it out of children, changing nothing in
        // this process.
        let ret = unsafe {
            libc::madvise(
                region.as_ptr().cast::<libc::c_void>(),
                region.size(),
                libc::MADV_DONTFORK,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Populates `[offset, offset + size)` of `region` for writing
    /// (MADV_POPULATE_WRITE: every page allocated and mapped, as a write
    /// would, without writing).
    pub fn populate_write(region: &GuestRegionMmap, offset: u64, size: u64) -> io::Result<()> {
        let in_region = offset
            .checked_add(size)
            .is_some_and(|end| end <= region.len());
        if !in_region {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the range is outside the region",
            ));
        }
        // SAFETY: the range lies inside the live mapping `region` owns
        // (checked above; its pointer and length come from the mmap that
        // made it), and MADV_POPULATE_WRITE only faults its pages in: the
        // contents stay what they were (zero, or the file's).
        let ret = unsafe {
            libc::madvise(
                region.as_ptr().add(offset as usize).cast::<libc::c_void>(),
                size as usize,
                MADV_POPULATE_WRITE,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `MADV_POPULATE_WRITE` (Linux 5.14), not in every libc crate.
    const MADV_POPULATE_WRITE: libc::c_int = 23;

    /// Asks for transparent huge pages on the whole of `region`.
    pub fn advise_huge_pages(region: &MmapRegion) -> io::Result<()> {
        // SAFETY: the range is exactly the live mapping `region` owns (its
        // pointer and size come from the mmap that created it), and
        // MADV_HUGEPAGE only changes how the kernel backs it, not its
        // contents or validity.
        let ret = unsafe {
            libc::madvise(
                region.as_ptr().cast::<libc::c_void>(),
                region.size(),
                libc::MADV_HUGEPAGE,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    use super::*;

    const MIB: u64 = 1 << 20;

    fn fake_sysfs(name: &str, pools: &[(HugePageSize, u64, u64)]) -> PathBuf {
        let root =
            std::env::temp_dir().join(format!("barge-memory-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for &(size, total, free) in pools {
            let dir = pool_dir(&root, size);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("nr_hugepages"), format!("{total}\n")).unwrap();
            std::fs::write(dir.join("free_hugepages"), format!("{free}\n")).unwrap();
        }
        std::fs::create_dir_all(&root).unwrap();
        root
    }

    fn memory(text: &str) -> MemoryConfig {
        text.parse().unwrap()
    }

    fn write_and_read_back(ram: &GuestRam) {
        for (i, info) in ram.regions.iter().enumerate() {
            let value = 0x1122_3344_5566_7700u64 + i as u64;
            for gpa in [info.gpa, info.gpa + info.size - 8] {
                ram.memory.write_obj(value, GuestAddress(gpa)).unwrap();
                assert_eq!(
                    ram.memory.read_obj::<u64>(GuestAddress(gpa)).unwrap(),
                    value
                );
            }
        }
    }

    #[test]
    fn every_backing_keeps_guest_ram_out_of_child_processes() {
        for request in ["size=4M", "size=4M,shared=on"] {
            let ram =
                create_guest_memory(&[(0, 2 * MIB), (4 * MIB, 2 * MIB)], &memory(request)).unwrap();
            for gpa in [0, 4 * MIB + 4096] {
                let hva = ram.memory.get_host_address(GuestAddress(gpa)).unwrap() as u64;
                let flags = crate::machine::smaps_vm_flags(hva).expect("the region is in smaps");
                assert!(flags.contains(&"dc".to_string()), "{request}: {flags:?}");
            }
        }
    }

    #[test]
    fn anonymous_regions_write_and_read_back() {
        let regions = [(0, 4 * MIB), (16 * MIB, 2 * MIB)];
        let ram = create_guest_memory(&regions, &memory("size=6M")).unwrap();
        assert_eq!(ram.memory.num_regions(), 2);
        write_and_read_back(&ram);
        assert!(ram.memory.read_obj::<u64>(GuestAddress(8 * MIB)).is_err());
        assert_eq!(
            ram.regions,
            vec![
                RegionInfo {
                    gpa: 0,
                    size: 4 * MIB,
                    backing: Backing::Anonymous,
                    page_size: 4096
                },
                RegionInfo {
                    gpa: 16 * MIB,
                    size: 2 * MIB,
                    backing: Backing::Anonymous,
                    page_size: 4096
                },
            ]
        );
        let reports = ram.region_reports();
        assert_eq!(reports[1].backing, "anonymous");
        assert_eq!(reports[1].gpa, 16 * MIB);
    }

    #[test]
    fn shared_memfd_regions_write_and_read_back() {
        let regions = [(0, 2 * MIB), (4 * MIB, 2 * MIB)];
        let ram = create_guest_memory(&regions, &memory("size=4M,shared=on")).unwrap();
        write_and_read_back(&ram);
        assert!(ram.regions.iter().all(|r| r.backing == Backing::Memfd));
        assert_eq!(ram.region_reports()[0].backing, "memfd");
    }

    #[test]
    fn huge_page_shortage_fails_before_mapping_with_the_fix() {
        let root = fake_sysfs("short-2m", &[(HugePageSize::Size2M, 0, 0)]);
        let config = memory("size=1G,hugepages=2M");
        let err = create_guest_memory_with_sysfs(&[(0, 1 << 30)], &config, &root)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "memory size=1G,hugepages=2M needs 512 free 2 MiB huge pages but only 0 are free; \
             reserve more with: echo 512 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
        );
    }

    #[test]
    fn huge_page_shortage_counts_pages_already_in_use() {
        let root = fake_sysfs("short-1g", &[(HugePageSize::Size1G, 4, 1)]);
        let config = memory("size=2G,hugepages=1G,shared=on");
        let err = create_guest_memory_with_sysfs(&[(0, 2 << 30)], &config, &root)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "memory size=2G,hugepages=1G,shared=on needs 2 free 1 GiB huge pages but only 1 are \
             free; reserve more with: echo 5 > /sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages"
        );
    }

    #[test]
    fn enough_free_huge_pages_pass_the_check() {
        let root = fake_sysfs("enough", &[(HugePageSize::Size2M, 600, 512)]);
        check_free_huge_pages(&root, HugePageSize::Size2M, 1 << 30, &memory("size=1G")).unwrap();
        assert_eq!(
            read_huge_page_pool(&root, HugePageSize::Size2M, &memory("size=1G")).unwrap(),
            HugePagePool {
                total: 600,
                free: 512
            }
        );
    }

    #[test]
    fn missing_pool_says_so() {
        let root = fake_sysfs("no-1g", &[(HugePageSize::Size2M, 10, 10)]);
        let config = memory("size=1G,hugepages=1G");
        let err = create_guest_memory_with_sysfs(&[(0, 1 << 30)], &config, &root)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no 1 GiB huge page pool"), "{err}");
        assert!(err.contains("hugepagesz=1G"), "{err}");
    }

    #[test]
    fn garbage_pool_count_names_the_file() {
        let root = fake_sysfs("garbage", &[(HugePageSize::Size2M, 1, 1)]);
        std::fs::write(
            pool_dir(&root, HugePageSize::Size2M).join("free_hugepages"),
            "many",
        )
        .unwrap();
        let err = check_free_huge_pages(&root, HugePageSize::Size2M, 2 * MIB, &memory("size=2M"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("free_hugepages"), "{err}");
        assert!(err.contains("\"many\" is not a number"), "{err}");
    }

    #[test]
    fn misaligned_regions_are_refused() {
        let err = create_guest_memory(&[(0, 4 * MIB + 1)], &memory("size=4M")).unwrap_err();
        assert!(matches!(err, MemoryError::RegionNotAligned { .. }), "{err}");
        let root = fake_sysfs("misaligned", &[(HugePageSize::Size2M, 100, 100)]);
        let err = create_guest_memory_with_sysfs(
            &[(MIB, 2 * MIB)],
            &memory("size=2M,hugepages=2M"),
            &root,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("not aligned to the 2M page size"), "{err}");
    }

    #[test]
    fn empty_overlapping_and_unsorted_layouts_are_refused() {
        let config = memory("size=4M");
        assert!(matches!(
            create_guest_memory(&[], &config),
            Err(MemoryError::NoRegions)
        ));
        assert!(matches!(
            create_guest_memory(&[(0, 4 * MIB), (2 * MIB, 2 * MIB)], &config),
            Err(MemoryError::Layout(_))
        ));
        assert!(matches!(
            create_guest_memory(&[(8 * MIB, 2 * MIB), (0, 2 * MIB)], &config),
            Err(MemoryError::Layout(_))
        ));
        assert!(matches!(
            create_guest_memory(&[(u64::MAX - 4095, 8192)], &config),
            Err(MemoryError::RegionTooLarge { .. })
        ));
    }

    #[test]
    fn backing_names_and_page_sizes() {
        assert_eq!(Backing::from_config(&memory("size=1G")), Backing::Anonymous);
        let huge = Backing::from_config(&memory("size=1G,hugepages=1G"));
        assert_eq!(huge, Backing::Hugetlbfs(HugePageSize::Size1G));
        assert_eq!(huge.page_size(), 1 << 30);
        assert_eq!(huge.name(), "hugetlbfs");
        let shared_huge = Backing::from_config(&memory("size=1G,hugepages=2M,shared=on"));
        assert_eq!(shared_huge.name(), "memfd-hugetlbfs");
        assert_eq!(shared_huge.page_size(), 2 << 20);
        assert_eq!(Backing::Memfd.page_size(), 4096);
    }

    /// How many of the 4 KiB pages of `[start, start + size)` are present
    /// (bit 63 of each page's /proc/self/pagemap entry).
    fn present_pages(start: u64, size: u64) -> u64 {
        use std::io::{Read, Seek, SeekFrom};
        let mut pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
        pagemap.seek(SeekFrom::Start(start / 4096 * 8)).unwrap();
        let mut entries = vec![0u8; (size / 4096 * 8) as usize];
        pagemap.read_exact(&mut entries).unwrap();
        entries
            .chunks_exact(8)
            .filter(|e| u64::from_le_bytes((*e).try_into().unwrap()) >> 63 == 1)
            .count() as u64
    }

    #[test]
    fn prefault_populates_every_page_on_the_threads_asked_for() {
        let ram =
            create_guest_memory(&[(0, 6 * MIB), (8 * MIB, 2 * MIB)], &memory("size=8M")).unwrap();
        let regions: Vec<(u64, u64)> = ram
            .memory
            .iter()
            .map(|region| (region.as_ptr() as u64, region.len()))
            .collect();
        assert!(regions
            .iter()
            .all(|&(at, size)| present_pages(at, size) == 0));
        // Three slices of the first region and two of the second: 3 threads.
        assert_eq!(ram.prefault(3).unwrap(), 3);
        for &(at, size) in &regions {
            assert_eq!(present_pages(at, size), size / 4096);
        }
        // Untouched contents: still zero.
        let mut word = [0xffu8; 8];
        ram.memory
            .read_slice(&mut word, GuestAddress(5 * MIB))
            .unwrap();
        assert_eq!(word, [0; 8]);
        assert_eq!(ram.prefault(1).unwrap(), 1);
        let region = ram.memory.iter().next().unwrap();
        assert!(sys::populate_write(region, 4 * MIB, 4 * MIB).is_err());
        assert!(sys::populate_write(region, u64::MAX, 2).is_err());
    }
}
