//! The shared memory device (`--shmem`) in the VM: its backing on the host
//! and its [`PciDeviceSetup`].
//!
//! | `--shmem`                      | backing                                   | host pages     |
//! |--------------------------------|-------------------------------------------|----------------|
//! | `size=S`                       | memfd, `MADV_HUGEPAGE` on the mapping      | 4K (THP if shmem_enabled allows) |
//! | `size=S,hugepages=2M\|1G`      | `MFD_HUGETLB` memfd from the host's pool  | 2M / 1G        |
//! | `size=S,path=FILE`             | FILE, created or extended to S            | the file system's |
//! | `size=S,path=FILE,hugepages=..`| FILE on a hugetlbfs mount (checked)       | 2M / 1G        |
//!
//! BAR0 (256 bytes of registers) is trapped; BAR2 is the memory, one memslot.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use devices::shmem::{ShmemDevice, ShmemRegisters, MEMORY_BAR, REGISTERS_BAR, REGISTERS_SIZE};
use resources::placement::{BarInput, BarWidth, DeviceInput, DevicePlan};

use crate::buses::bus::BusDevice;
use crate::config::{format_option_size, HugePageSize, ShmemConfig};
use crate::machine::memory::{self, MemoryError};
use crate::pci_devices::bar_mapping::MappedBar;
use crate::pci_devices::setup::{
    AttachContext, AttachedDevice, DeviceSetupError, PciDeviceSetup, TrapRegion,
};
use crate::pci_devices::teardown::{DeviceResources, HostResources};

/// `HUGETLBFS_MAGIC` from `linux/magic.h` (statfs f_type).
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
/// Where the kernel says whether shmem gets transparent huge pages.
pub const SHMEM_THP_PATH: &str = "kernel/mm/transparent_hugepage/shmem_enabled";

/// Errors setting up the shared memory backing.
#[derive(Debug, thiserror::Error)]
pub enum ShmemError {
    /// Not enough huge pages, or no pool.
    #[error(transparent)]
    HugePages(#[from] MemoryError),
    /// The memfd could not be created.
    #[error("{request}: cannot create the {} memfd: {source}", format_option_size(*size))]
    Memfd {
        request: String,
        size: u64,
        source: std::io::Error,
    },
    /// The file could not be opened, created or sized.
    #[error("{request}: cannot use {}: {source}", path.display())]
    File {
        request: String,
        path: PathBuf,
        source: std::io::Error,
    },
    /// `hugepages=` with a file that is not on hugetlbfs.
    #[error("{request}: {} is not on a hugetlbfs mount, so hugepages={hugepages} cannot apply; put it under a hugetlbfs mount (e.g. mount -t hugetlbfs -o pagesize={hugepages} none /dev/hugepages) or drop path=", path.display())]
    NotHugetlbfs {
        request: String,
        path: PathBuf,
        /// The page size asked for.
        hugepages: HugePageSize,
    },
    /// The plan lacks a BAR this device has (a barge bug).
    #[error("{name}: the plan has no BAR {index}; please report this as a barge bug")]
    NotPlanned {
        /// Device name.
        name: String,
        /// BAR index.
        index: u8,
    },
}

/// The `--shmem` value, for messages.
struct Request<'a>(&'a ShmemConfig);

impl fmt::Display for Request<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "--shmem {}", self.0)
    }
}

/// What backs the memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShmemBacking {
    /// A memfd with ordinary (or transparent huge) pages.
    Memfd,
    /// A hugetlbfs memfd.
    MemfdHugetlbfs(HugePageSize),
    /// A file on an ordinary file system.
    File(PathBuf),
    /// A file on hugetlbfs.
    HugetlbfsFile(PathBuf, HugePageSize),
}

/// An opened shared memory device, waiting for its plan.
#[derive(Debug)]
pub struct ShmemSetup {
    name: String,
    config: ShmemConfig,
    file: File,
    backing: ShmemBacking,
    sysfs_root: PathBuf,
}

/// Opens (creates) the backing of shared memory device number `index`.
pub fn open(
    index: usize,
    config: &ShmemConfig,
    sysfs_root: &Path,
) -> Result<ShmemSetup, ShmemError> {
    let request = Request(config).to_string();
    let (file, backing) = match (&config.path, config.hugepages) {
        (None, None) => {
            let file =
                memory::create_memfd(None, config.size).map_err(|source| ShmemError::Memfd {
                    request: request.clone(),
                    size: config.size,
                    source,
                })?;
            (file, ShmemBacking::Memfd)
        }
        (None, Some(huge)) => {
            memory::check_free_huge_pages(sysfs_root, huge, config.size, &Request(config))?;
            let file = memory::create_memfd(Some(huge), config.size).map_err(|source| {
                ShmemError::Memfd {
                    request: request.clone(),
                    size: config.size,
                    source,
                }
            })?;
            (file, ShmemBacking::MemfdHugetlbfs(huge))
        }
        (Some(path), huge) => {
            let file_error = |source| ShmemError::File {
                request: request.clone(),
                path: path.clone(),
                source,
            };
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(file_error)?;
            let backing = match huge {
                Some(hugepages) => {
                    if sys::fs_magic(&file).map_err(file_error)? != HUGETLBFS_MAGIC {
                        return Err(ShmemError::NotHugetlbfs {
                            request,
                            path: path.clone(),
                            hugepages,
                        });
                    }
                    ShmemBacking::HugetlbfsFile(path.clone(), hugepages)
                }
                None => ShmemBacking::File(path.clone()),
            };
            if file.metadata().map_err(file_error)?.len() < config.size {
                file.set_len(config.size).map_err(file_error)?;
            }
            (file, backing)
        }
    };
    Ok(ShmemSetup {
        name: format!("shmem{index}"),
        config: config.clone(),
        file,
        backing,
        sysfs_root: sysfs_root.to_path_buf(),
    })
}

/// The planner input of a shared memory device named `name`.
pub fn plan_input(name: &str, config: &ShmemConfig) -> DeviceInput {
    DeviceInput {
        name: name.to_string(),
        bars: vec![
            BarInput::new(REGISTERS_BAR, REGISTERS_SIZE, BarWidth::Bits32, false),
            BarInput::new(MEMORY_BAR, config.size, BarWidth::Bits64, true),
        ],
        align_cap: config.bar_align.cap(),
    }
}

impl ShmemSetup {
    /// What backs the memory.
    pub fn backing(&self) -> &ShmemBacking {
        &self.backing
    }

    /// Why BAR2 may get smaller pages than planned, from the backing.
    fn causes(&self) -> Vec<String> {
        let thp = std::fs::read_to_string(self.sysfs_root.join(SHMEM_THP_PATH))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".to_string());
        match &self.backing {
            ShmemBacking::Memfd => vec![format!(
                "{} is a memfd without hugepages=, which the host backs with 4 KiB pages unless \
                 THP for shmem allows more (/sys/{SHMEM_THP_PATH}: {thp}), and KVM maps no larger \
                 than the host does; use --shmem {},hugepages=2M or 1G (or echo advise > \
                 /sys/{SHMEM_THP_PATH}) to get huge mappings",
                self.name, self.config
            )],
            ShmemBacking::File(path) => vec![format!(
                "{} is backed by {}, whose file system gives it 4 KiB pages; put it on a \
                 hugetlbfs mount with hugepages=2M|1G, or use a memfd with hugepages=",
                self.name,
                path.display()
            )],
            ShmemBacking::MemfdHugetlbfs(HugePageSize::Size2M)
            | ShmemBacking::HugetlbfsFile(_, HugePageSize::Size2M) => vec![format!(
                "{} is backed by 2 MiB huge pages, so KVM maps at most 2 MiB; use hugepages=1G \
                 for 1 GiB mappings",
                self.name
            )],
            ShmemBacking::MemfdHugetlbfs(_) | ShmemBacking::HugetlbfsFile(..) => Vec::new(),
        }
    }
}

/// BAR0's registers on the MMIO bus.
struct RegistersOnBus(ShmemRegisters);

impl BusDevice for RegistersOnBus {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        self.0.read(offset, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        self.0.write(offset, data);
    }
}

impl PciDeviceSetup for ShmemSetup {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        "shmem"
    }

    fn plan_input(&self) -> DeviceInput {
        plan_input(&self.name, &self.config)
    }

    fn attach(
        self: Box<Self>,
        plan: &DevicePlan,
        ctx: &mut AttachContext<'_>,
    ) -> Result<AttachedDevice, DeviceSetupError> {
        let placed = |index: u8| {
            plan.bars
                .iter()
                .find(|b| b.index == index)
                .ok_or_else(|| ShmemError::NotPlanned {
                    name: self.name.clone(),
                    index,
                })
        };
        let registers = placed(REGISTERS_BAR)?;
        let memory = placed(MEMORY_BAR)?;
        let config = ShmemDevice::new(registers.gpa, memory.gpa, self.config.size)?;
        let mut memory_bar = ctx.map_bar(self.file.as_fd(), 0, &self.name, memory)?;
        if self.backing == ShmemBacking::Memfd {
            if let Some(mapping) = &memory_bar.mapping {
                if let Err(e) = mapping.advise_huge_pages() {
                    log::debug!("{}: MADV_HUGEPAGE refused: {e}", self.name);
                }
            }
        }
        for cause in self.causes() {
            memory_bar.add_cause(cause);
        }
        let traps = vec![TrapRegion {
            gpa: registers.gpa,
            size: REGISTERS_SIZE,
            name: "shmem-registers",
            device: Arc::new(Mutex::new(RegistersOnBus(ShmemRegisters))),
        }];
        let bars = vec![MappedBar::trapped(&self.name, registers), memory_bar];
        Ok(AttachedDevice {
            vfio_backend: None,
            virtio: None,
            config: Box::new(config),
            traps,
            dma: None,
            resources: DeviceResources::new(
                Arc::clone(ctx.vm),
                ctx.memslots.clone(),
                bars,
                Box::new(ShmemResources { file: self.file }),
            ),
        })
    }
}

/// Shared memory's part of its teardown (`pci_devices::teardown`): no DMA,
/// no IOMMU; closing is closing the backing file, after BAR2's memslot and
/// mapping are gone.
struct ShmemResources {
    file: File,
}

impl HostResources for ShmemResources {
    fn close(self: Box<Self>) {
        let ShmemResources { file } = *self;
        drop(file);
    }
}

/// statfs.
mod sys {
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;

    /// The file system magic number of `file`'s mount.
    pub fn fs_magic(file: &File) -> io::Result<i64> {
        // SAFETY: an all-zero statfs is a valid value of this plain C struct.
        let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: the fd is open for the call's duration and `buf` is a
        // writable statfs the kernel fills in.
        let ret = unsafe { libc::fstatfs(file.as_raw_fd(), &mut buf) };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        #[allow(clippy::unnecessary_cast)]
        Ok(buf.f_type as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("barge-shmem-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn fake_sysfs(name: &str, pools: &[(u64, u64, u64)]) -> PathBuf {
        let root = temp_dir(name);
        for (kib, total, free) in pools {
            let dir = root.join(format!("kernel/mm/hugepages/hugepages-{kib}kB"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("nr_hugepages"), format!("{total}\n")).unwrap();
            std::fs::write(dir.join("free_hugepages"), format!("{free}\n")).unwrap();
        }
        std::fs::create_dir_all(root.join("kernel/mm/transparent_hugepage")).unwrap();
        std::fs::write(
            root.join(SHMEM_THP_PATH),
            "always within_size advise [never] deny force\n",
        )
        .unwrap();
        root
    }

    #[test]
    fn plan_input_has_a_trapped_register_bar_and_a_64bit_memory_bar() {
        let config: ShmemConfig = "size=8G,bar-align=4k".parse().unwrap();
        let input = plan_input("shmem0", &config);
        assert_eq!(input.bars.len(), 2);
        assert_eq!((input.bars[0].index, input.bars[0].size), (0, 256));
        assert_eq!(input.bars[0].width, BarWidth::Bits32);
        assert_eq!((input.bars[1].index, input.bars[1].size), (2, 8 << 30));
        assert_eq!(input.bars[1].width, BarWidth::Bits64);
        assert!(input.bars[1].prefetchable);
        assert_eq!(
            input.align_cap,
            Some(resources::placement::PageSize::Size4K)
        );
    }

    #[test]
    fn memfd_backing_is_sized_and_explains_4k_pages() {
        let sysfs = fake_sysfs("memfd", &[]);
        let setup = open(0, &"size=4M".parse().unwrap(), &sysfs).unwrap();
        assert_eq!(setup.backing(), &ShmemBacking::Memfd);
        assert_eq!(setup.file.metadata().unwrap().len(), 4 << 20);
        let causes = setup.causes().join(" ");
        assert!(causes.contains("hugepages=2M or 1G"), "{causes}");
        assert!(causes.contains("[never]"), "{causes}");
    }

    #[test]
    fn file_backing_is_created_or_extended_and_kept() {
        let dir = temp_dir("file");
        let path = dir.join("shared");
        std::fs::write(&path, b"keep").unwrap();
        let config: ShmemConfig = format!("size=2M,path={}", path.display()).parse().unwrap();
        let setup = open(1, &config, &fake_sysfs("file-sysfs", &[])).unwrap();
        assert_eq!(setup.name(), "shmem1");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 << 20);
        assert_eq!(&std::fs::read(&path).unwrap()[..4], b"keep");
        assert!(matches!(setup.backing(), ShmemBacking::File(_)));
    }

    #[test]
    fn hugepages_without_a_pool_or_free_pages_are_clear_errors() {
        let config: ShmemConfig = "size=4M,hugepages=2M".parse().unwrap();
        let empty_pool = fake_sysfs("short", &[(2048, 0, 0)]);
        let err = open(0, &config, &empty_pool).unwrap_err().to_string();
        assert!(
            err.contains(
                "--shmem size=4M,hugepages=2M needs 2 free 2 MiB huge pages but only 0 are free"
            ),
            "{err}"
        );
        assert!(
            err.contains("echo 2 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"),
            "{err}"
        );
        let no_pool = fake_sysfs("none", &[]);
        let config: ShmemConfig = "size=1G,hugepages=1G".parse().unwrap();
        let err = open(0, &config, &no_pool).unwrap_err().to_string();
        assert!(err.contains("no 1 GiB huge page pool"), "{err}");
    }

    #[test]
    fn hugepages_with_a_file_off_hugetlbfs_is_refused() {
        let dir = temp_dir("not-hugetlbfs");
        let config: ShmemConfig = format!("size=2M,hugepages=2M,path={}", dir.join("f").display())
            .parse()
            .unwrap();
        let err = open(0, &config, &fake_sysfs("nh-sysfs", &[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not on a hugetlbfs mount"), "{err}");
    }

    #[test]
    fn unwritable_path_names_the_file() {
        let config: ShmemConfig = "size=2M,path=/no/such/dir/shm".parse().unwrap();
        let err = open(0, &config, &fake_sysfs("nopath", &[]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot use /no/such/dir/shm"), "{err}");
    }
}
