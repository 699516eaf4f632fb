//! The real VFIO host ([`VfioHostAccess`]) and device ([`VfioDeviceAccess`]):
//! a host PCI function opened through vfio-ioctls, with the legacy
//! container/group or with the device cdev and iommufd.
//!
//! [`VfioHost`] owns the IOMMU domain every device of one VM shares (one
//! container, or one iommufd with one IOAS) and the optional KVM VFIO
//! pseudo-device handle (`KVM_DEV_TYPE_VFIO`, which the VMM creates and
//! wraps with `VfioDeviceFd::new_from_kvm`) so KVM knows about each group or
//! cdev. Its [`VfioHostAccess::open`] runs the [`super::preflight`] checks, picks the
//! backend ([`VfioBackendKind::Auto`]: iommufd when `/dev/iommu` and the
//! device's `/dev/vfio/devices/vfioN` exist, else legacy), opens the device
//! and resets it. A [`HostVfioDevice`] resets the device again when dropped
//! and then closes it; the group leaves the container (or the cdev its
//! IOAS) when its last device goes, the container or iommufd when the
//! [`VfioHost`] and its last device are gone.
//!
//! Not verified on real hardware here (the build machine has no VFIO): the
//! legacy path is exercised in the lab, and the iommufd path in the lab
//! booted with `barge-lab run --iommufd` (Debian's 6.12 with its vfio
//! modules rebuilt with CONFIG_IOMMUFD; no Debian kernel enables it).
//!
//! The kernel refuses a second user of a device differently on each path:
//! the cdev's VFIO_DEVICE_BIND_IOMMUFD fails with EBUSY when the group is
//! open (a legacy user) and with EINVAL when the device is already open
//! through a cdev (`vfio_df_open`: one cdev open per device); both are
//! [`HostError::InUse`], naming the file the other user holds. iommufd's
//! own errors come wrapped in vfio-ioctls' "failed iommufd ioctl", whose
//! message drops the cause: barge's messages name it.

use std::fmt;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use iommufd_ioctls::{IommuFd, IommufdError};
use vfio_ioctls::{
    VfioContainer, VfioDevice, VfioDeviceFd, VfioError, VfioIommufd, VfioOps, VfioRegionDmaRange,
    VfioRegionInfoCap,
};
use vmm_sys_util::eventfd::EventFd;

use super::dma_method::{BarDmaMapping, DmaMethod, DmaMethods};
use super::preflight::{locate, not_viable, DeviceLocation, HostPaths, PreflightError};
use super::{BarRange, RegionInfo, VfioDeviceAccess, CONFIG_REGION_INDEX};

/// Which VFIO interface to open devices with: the user's choice
/// (`--vfio-backend`, the config file's `vfio_backend`), the one name for it
/// in barge (the VMM's config re-exports it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VfioBackendKind {
    /// The container/group interface (`/dev/vfio/vfio`, `/dev/vfio/N`).
    Legacy,
    /// The device cdev with iommufd (`/dev/vfio/devices/vfioN`, `/dev/iommu`).
    Iommufd,
    /// iommufd where the kernel offers it for the device, else legacy.
    #[default]
    Auto,
}

/// A [`VfioBackendKind`] that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid VFIO backend {0:?}: use legacy, iommufd or auto")]
pub struct InvalidVfioBackend(pub String);

impl FromStr for VfioBackendKind {
    type Err = InvalidVfioBackend;

    fn from_str(text: &str) -> Result<Self, InvalidVfioBackend> {
        match text {
            "legacy" => Ok(Self::Legacy),
            "iommufd" => Ok(Self::Iommufd),
            "auto" => Ok(Self::Auto),
            other => Err(InvalidVfioBackend(other.to_string())),
        }
    }
}

impl fmt::Display for VfioBackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Legacy => "legacy",
            Self::Iommufd => "iommufd",
            Self::Auto => "auto",
        })
    }
}

/// The interface a device was actually opened with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenedBackend {
    /// Container and group.
    Legacy,
    /// cdev and iommufd.
    Iommufd,
}

impl OpenedBackend {
    /// The report's name for it (the `--vfio-backend` value that asks for it).
    pub fn name(self) -> &'static str {
        match self {
            Self::Legacy => "legacy",
            Self::Iommufd => "iommufd",
        }
    }
}

/// The Linux release that added vfio-pci's dma-buf export and iommufd's
/// IOMMU_IOAS_MAP_FILE of a dma-buf: peer-to-peer DMA with iommufd.
pub const DMABUF_P2P_LINUX: &str = "6.19";

/// Where the host kernel's release is read from, for messages.
const OSRELEASE_PATH: &str = "/proc/sys/kernel/osrelease";

/// The host kernel's release, or "an unknown kernel".
fn host_kernel_release() -> String {
    std::fs::read_to_string(OSRELEASE_PATH)
        .map(|release| release.trim().to_string())
        .unwrap_or_else(|_| "an unknown kernel".to_string())
}

/// Why a host device cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A check before opening failed.
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    /// `--vfio-backend iommufd` but the kernel does not offer it.
    #[error("cannot use iommufd for {bdf}: {reason}; use --vfio-backend legacy (or auto)")]
    IommufdUnavailable { bdf: String, reason: String },
    /// Another process holds the group or device.
    #[error("PCI device {bdf} is already in use: {} is held by another process (another VM?); find it with `fuser -v {}`", path.display(), path.display())]
    InUse {
        bdf: String,
        /// The group or cdev file.
        path: PathBuf,
    },
    /// No permission on a VFIO file.
    #[error("no permission to open {}: run barge as root, or give your user access to it (chown)", path.display())]
    Permission { path: PathBuf },
    /// A VFIO file is missing.
    #[error("{} does not exist: load the VFIO driver with `modprobe vfio-pci` (and `modprobe iommufd` for the iommufd backend)", path.display())]
    Missing { path: PathBuf },
    /// Another VFIO failure.
    #[error("VFIO {what} failed for {bdf}: {}", vfio_cause(.source))]
    Vfio {
        bdf: String,
        /// What was being done.
        what: &'static str,
        /// vfio-ioctls' error.
        source: VfioError,
    },
    /// An iommufd failure.
    #[error("iommufd {what} failed: {source}")]
    Iommufd {
        /// What was being done.
        what: &'static str,
        /// iommufd-ioctls' error.
        source: iommufd_ioctls::IommufdError,
    },
    /// iommufd cannot map a BAR for peer-to-peer DMA on this kernel.
    #[error(
        "cannot map BAR {bar} of {bdf} for peer-to-peer DMA with iommufd: that needs vfio-pci's \
         dma-buf export and IOMMU_IOAS_MAP_FILE of a dma-buf (Linux {DMABUF_P2P_LINUX} or newer), \
         and this host runs {kernel}; use --vfio-backend legacy for peer-to-peer DMA, or \
         p2p=off to do without it"
    )]
    P2pUnsupported {
        bdf: String,
        bar: u32,
        /// The host kernel's release.
        kernel: String,
    },
    /// vfio-pci refused to export a BAR range as a dma-buf.
    #[error(
        "vfio-pci refused to export BAR {bar} range {offset:#x}+{size:#x} of {bdf} as a dma-buf \
         for peer-to-peer DMA: {}; p2p=off does without it", vfio_cause(.source)
    )]
    DmaBufExport {
        bdf: String,
        bar: u32,
        offset: u64,
        size: u64,
        source: VfioError,
    },
    /// A DMA map or unmap of guest memory failed.
    #[error("cannot {what} guest memory {iova:#x}+{size:#x} for device DMA: {}", vfio_cause(.source))]
    Dma {
        /// map or unmap.
        what: &'static str,
        /// The IO virtual (guest physical) address.
        iova: u64,
        size: u64,
        source: VfioError,
    },
}

/// What a vfio-ioctls error says, with the iommufd error inside it when it
/// wraps one (its own message, "failed iommufd ioctl", drops the errno).
fn vfio_cause(error: &VfioError) -> String {
    match error {
        VfioError::IommufdIoctlError(inner) | VfioError::NewVfioIommufd(inner) => {
            format!("{error}: {inner}")
        }
        other => other.to_string(),
    }
}

/// What the VMM needs of the VFIO host: open devices into the one IOMMU
/// domain all devices of a VM share, and map memory into that domain for
/// their DMA (IO virtual address = guest physical address). [`VfioHost`] is
/// the real one; `fake::FakeVfioHost` (feature `fake`) records what tests
/// ask of it.
pub trait VfioHostAccess: Send + Sync {
    /// The devices it opens.
    type Device: VfioDeviceAccess + 'static;

    /// Opens and resets the device at `bdf`.
    fn open(&self, bdf: &str) -> Result<Self::Device, HostError>;

    /// Maps `[hva, hva + size)` at IO virtual address `iova` for DMA by the
    /// devices opened so far (call it after opening them).
    ///
    /// # Safety
    ///
    /// From this call until [`Self::dma_unmap`] of the same range succeeds
    /// (or the range is unmapped from the process), the devices read and
    /// write the range at any time: Rust code may touch it only through raw
    /// pointers (volatile or atomic accesses) and system calls, never
    /// through references (vfio-ioctls' `vfio_dma_map` contract). The range
    /// must stay mapped until then, or the devices' DMA no longer reaches the
    /// memory the process sees.
    unsafe fn dma_map(&self, iova: u64, size: u64, hva: *mut u8) -> Result<DmaMethods, HostError>;

    /// As [`Self::dma_map`], for a range that is also `size` bytes of
    /// `file` (a memfd) from `offset`: iommufd maps the file itself where the
    /// kernel can (IOMMU_IOAS_MAP_FILE, Linux 6.13+), the others `hva`.
    ///
    /// # Safety
    ///
    /// As [`Self::dma_map`]; `hva` must map those bytes of `file`.
    unsafe fn dma_map_file(
        &self,
        iova: u64,
        size: u64,
        hva: *mut u8,
        file: BorrowedFd<'_>,
        offset: u64,
    ) -> Result<DmaMethods, HostError> {
        let _ = (file, offset);
        // SAFETY: the caller keeps this method's contract, which is
        // `dma_map`'s.
        unsafe { self.dma_map(iova, size, hva) }
    }

    /// Maps `size` bytes of BAR `bar` of `device` from `offset`, which the
    /// process maps at `hva`, at IO virtual address `iova`, so that the
    /// domain's devices can DMA into it (peer to peer): the container maps
    /// `hva`; an IOAS maps a dma-buf vfio-pci exports for the range, which
    /// the answer holds until [`Self::dma_unmap`].
    ///
    /// # Safety
    ///
    /// As [`Self::dma_map`], for `[hva, hva + size)`.
    unsafe fn bar_dma_map(
        &self,
        device: &Self::Device,
        bar: u32,
        offset: u64,
        iova: u64,
        size: u64,
        hva: *mut u8,
    ) -> Result<BarDmaMapping, HostError>;

    /// Undoes [`Self::dma_map`] (or the other maps) of the same range.
    fn dma_unmap(&self, iova: u64, size: u64) -> Result<(), HostError>;

    /// The backend `device` was opened with.
    fn backend_of(&self, device: &Self::Device) -> OpenedBackend;
}

/// The VM's VFIO state: the shared IOMMU domain (see module docs).
pub struct VfioHost {
    kind: VfioBackendKind,
    paths: HostPaths,
    kvm_device: Option<Arc<VfioDeviceFd>>,
    container: Mutex<Option<Arc<VfioContainer>>>,
    iommufd: Mutex<Option<Arc<VfioIommufd>>>,
    /// Set once the kernel refused IOMMU_IOAS_MAP_FILE of a memfd as an
    /// unknown request (before 6.13): later RAM maps go by address at once.
    map_file_refused: AtomicBool,
}

impl fmt::Debug for VfioHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VfioHost")
            .field("kind", &self.kind)
            .field("paths", &self.paths)
            .field("kvm_device", &self.kvm_device.is_some())
            .finish()
    }
}

impl VfioHost {
    /// A host using `kind`, the real `/sys` and `/dev` in `paths`, and the KVM
    /// VFIO device if the VMM has one (without it, KVM does not know the
    /// device is assigned: non-coherent DMA devices then get wrong cache
    /// attributes).
    pub fn new(
        kind: VfioBackendKind,
        paths: HostPaths,
        kvm_device: Option<Arc<VfioDeviceFd>>,
    ) -> Self {
        Self {
            kind,
            paths,
            kvm_device,
            container: Mutex::new(None),
            iommufd: Mutex::new(None),
            map_file_refused: AtomicBool::new(false),
        }
    }

    fn container(&self) -> Option<Arc<VfioContainer>> {
        self.container
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn iommufd(&self) -> Option<Arc<VfioIommufd>> {
        self.iommufd
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Which backend `location` gets under this host's [`VfioBackendKind`].
    pub fn choose(&self, location: &DeviceLocation) -> Result<OpenedBackend, HostError> {
        choose_backend(self.kind, location, &self.paths)
    }

    fn open_legacy(&self, location: &DeviceLocation) -> Result<VfioDevice, HostError> {
        let container = {
            let mut slot = self.container.lock().unwrap_or_else(|e| e.into_inner());
            match &*slot {
                Some(container) => Arc::clone(container),
                None => {
                    let container = VfioContainer::new(self.kvm_device.clone())
                        .map_err(|error| self.legacy_error(location, "container open", error))?;
                    let container = Arc::new(container);
                    *slot = Some(Arc::clone(&container));
                    container
                }
            }
        };
        let ops: Arc<dyn VfioOps> = container;
        VfioDevice::new(&location.sysfs_path, ops, false)
            .map_err(|error| self.legacy_error(location, "device open", error))
    }

    fn open_iommufd(&self, location: &DeviceLocation) -> Result<VfioDevice, HostError> {
        let iommufd = {
            let mut slot = self.iommufd.lock().unwrap_or_else(|e| e.into_inner());
            match &*slot {
                Some(iommufd) => Arc::clone(iommufd),
                None => {
                    let path = self.paths.iommufd();
                    let file = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&path)
                        .map_err(|error| io_error(location, path, error))?;
                    let fd = Arc::new(IommuFd::new_from_fd(file));
                    let vfio =
                        VfioIommufd::new(fd, None, self.kvm_device.clone()).map_err(|source| {
                            HostError::Vfio {
                                bdf: location.bdf.clone(),
                                what: "IOAS allocation",
                                source,
                            }
                        })?;
                    let vfio = Arc::new(vfio);
                    *slot = Some(Arc::clone(&vfio));
                    vfio
                }
            }
        };
        let ops: Arc<dyn VfioOps> = iommufd;
        VfioDevice::new(&location.sysfs_path, ops, true)
            .map_err(|error| self.iommufd_error(location, error))
    }

    /// The error for failing to open and bind the device's cdev (see the
    /// module docs for what the kernel's EBUSY and EINVAL mean there).
    fn iommufd_error(&self, location: &DeviceLocation, error: VfioError) -> HostError {
        let cdev_path = self
            .paths
            .vfio_dir()
            .join("devices")
            .join(location.cdev.clone().unwrap_or_default());
        match error {
            VfioError::OpenDeviceCdev(source) => io_error(location, cdev_path, source),
            VfioError::VfioDeviceBindIommufd(errno) => {
                match io::Error::from_raw_os_error(errno.errno()).kind() {
                    io::ErrorKind::ResourceBusy => HostError::InUse {
                        bdf: location.bdf.clone(),
                        path: self.paths.vfio_dir().join(location.group.to_string()),
                    },
                    io::ErrorKind::InvalidInput => HostError::InUse {
                        bdf: location.bdf.clone(),
                        path: cdev_path,
                    },
                    _ => HostError::Vfio {
                        bdf: location.bdf.clone(),
                        what: "cdev open and iommufd bind",
                        source: VfioError::VfioDeviceBindIommufd(errno),
                    },
                }
            }
            source => HostError::Vfio {
                bdf: location.bdf.clone(),
                what: "cdev open and iommufd bind",
                source,
            },
        }
    }

    fn legacy_error(
        &self,
        location: &DeviceLocation,
        what: &'static str,
        error: VfioError,
    ) -> HostError {
        let group_path = self.paths.vfio_dir().join(location.group.to_string());
        match error {
            VfioError::OpenContainer(source) => {
                io_error(location, self.paths.vfio_dir().join("vfio"), source)
            }
            VfioError::OpenGroup(source, _) => io_error(location, group_path, source),
            VfioError::GroupViable => HostError::Preflight(not_viable(location, &self.paths)),
            VfioError::GroupGetDeviceFD(errno) if errno.errno() == libc_ebusy() => {
                HostError::InUse {
                    bdf: location.bdf.clone(),
                    path: group_path,
                }
            }
            source => HostError::Vfio {
                bdf: location.bdf.clone(),
                what,
                source,
            },
        }
    }
}

impl VfioHostAccess for VfioHost {
    type Device = HostVfioDevice;

    fn open(&self, bdf: &str) -> Result<HostVfioDevice, HostError> {
        let location = locate(bdf, &self.paths)?;
        let backend = self.choose(&location)?;
        let device = match backend {
            OpenedBackend::Legacy => self.open_legacy(&location)?,
            OpenedBackend::Iommufd => self.open_iommufd(&location)?,
        };
        let device = HostVfioDevice {
            device,
            location,
            backend,
        };
        log::info!(
            "vfio: opened {} ({:?}, IOMMU group {})",
            device.location.bdf,
            device.backend,
            device.location.group
        );
        if device.reset() {
            log::info!("vfio: {} reset", device.location.bdf);
        }
        Ok(device)
    }

    /// Maps the range in the container and the IOAS, whichever devices were
    /// opened into so far.
    unsafe fn dma_map(&self, iova: u64, size: u64, hva: *mut u8) -> Result<DmaMethods, HostError> {
        let mut methods = DmaMethods::default();
        // SAFETY: the caller keeps this method's contract, which is theirs.
        unsafe {
            self.map_in_container(iova, size, hva, &mut methods)?;
            self.map_in_ioas_by_address(iova, size, hva, &mut methods)?;
        }
        Ok(methods)
    }

    /// The container maps `hva`; the IOAS maps the memfd range with
    /// IOMMU_IOAS_MAP_FILE, or `hva` on a kernel that does not know that
    /// request (ENOTTY, before 6.13).
    unsafe fn dma_map_file(
        &self,
        iova: u64,
        size: u64,
        hva: *mut u8,
        file: BorrowedFd<'_>,
        offset: u64,
    ) -> Result<DmaMethods, HostError> {
        let dma_error = |source| HostError::Dma {
            what: "map",
            iova,
            size,
            source,
        };
        let mut methods = DmaMethods::default();
        // SAFETY: the caller keeps this method's contract, which is
        // `map_in_container`'s.
        unsafe { self.map_in_container(iova, size, hva, &mut methods) }?;
        if let Some(iommufd) = self.iommufd() {
            let by_file = if self.map_file_refused.load(Ordering::Relaxed) {
                None
            } else {
                match iommufd
                    .ioas()
                    .map_file(file.as_raw_fd(), offset, size, iova, true)
                {
                    Ok(()) => Some(DmaMethod::IommufdMemfd),
                    Err(IommufdError::IommuIoasMapFile(errno)) if errno.errno() == libc::ENOTTY => {
                        log::info!(
                            "vfio: the kernel has no IOMMU_IOAS_MAP_FILE (Linux 6.13+); guest \
                             RAM is mapped by address"
                        );
                        self.map_file_refused.store(true, Ordering::Relaxed);
                        None
                    }
                    Err(error) => return Err(dma_error(VfioError::IommufdIoctlError(error))),
                }
            };
            match by_file {
                Some(method) => methods.0.push(method),
                // SAFETY: as above.
                None => unsafe { self.map_in_ioas_by_address(iova, size, hva, &mut methods) }?,
            }
        }
        Ok(methods)
    }

    /// The container maps the BAR's mmap (type1 handles PFNMAP ranges);
    /// the IOAS maps a dma-buf of the range: iommufd cannot pin PFNMAP
    /// memory, so IOMMU_IOAS_MAP of the mmap fails with EFAULT on every
    /// kernel.
    unsafe fn bar_dma_map(
        &self,
        device: &HostVfioDevice,
        bar: u32,
        offset: u64,
        iova: u64,
        size: u64,
        hva: *mut u8,
    ) -> Result<BarDmaMapping, HostError> {
        let dma_error = |source| HostError::Dma {
            what: "map",
            iova,
            size,
            source,
        };
        let bdf = &device.location.bdf;
        let mut mapping = BarDmaMapping::default();
        // SAFETY: the caller keeps this method's contract, which is
        // `map_in_container`'s.
        unsafe { self.map_in_container(iova, size, hva, &mut mapping.methods) }?;
        if let Some(iommufd) = self.iommufd() {
            let range = VfioRegionDmaRange {
                offset,
                length: size,
            };
            let exported = device
                .device
                .export_dma_buf(bar, &[range], DMA_BUF_OPEN_FLAGS)
                .map_err(|source| HostError::DmaBufExport {
                    bdf: bdf.clone(),
                    bar,
                    offset,
                    size,
                    source,
                });
            let dma_buf = match exported {
                Ok(Some(dma_buf)) => dma_buf,
                Ok(None) => {
                    self.undo_container_map(&mapping, iova, size);
                    return Err(HostError::P2pUnsupported {
                        bdf: bdf.clone(),
                        bar,
                        kernel: host_kernel_release(),
                    });
                }
                Err(error) => {
                    self.undo_container_map(&mapping, iova, size);
                    return Err(error);
                }
            };
            if let Err(error) = iommufd
                .ioas()
                .map_file(dma_buf.as_raw_fd(), 0, size, iova, true)
            {
                self.undo_container_map(&mapping, iova, size);
                return Err(match error {
                    IommufdError::IommuIoasMapFile(errno) if errno.errno() == libc::ENOTTY => {
                        HostError::P2pUnsupported {
                            bdf: bdf.clone(),
                            bar,
                            kernel: host_kernel_release(),
                        }
                    }
                    error => dma_error(VfioError::IommufdIoctlError(error)),
                });
            }
            mapping.methods.0.push(DmaMethod::IommufdDmabuf);
            mapping.dma_buf = Some(dma_buf);
        }
        Ok(mapping)
    }

    fn dma_unmap(&self, iova: u64, size: u64) -> Result<(), HostError> {
        let dma_error = |source| HostError::Dma {
            what: "unmap",
            iova,
            size,
            source,
        };
        let len = usize::try_from(size).unwrap_or(usize::MAX);
        if let Some(container) = self.container() {
            container.vfio_dma_unmap(iova, len).map_err(dma_error)?;
        }
        if let Some(iommufd) = self.iommufd() {
            iommufd.vfio_dma_unmap(iova, len).map_err(dma_error)?;
        }
        Ok(())
    }

    fn backend_of(&self, device: &HostVfioDevice) -> OpenedBackend {
        device.backend
    }
}

impl VfioHost {
    /// Maps `[hva, hva + size)` at `iova` in the container, when there is
    /// one, adding its method to `methods`.
    ///
    /// # Safety
    ///
    /// As [`VfioHostAccess::dma_map`].
    unsafe fn map_in_container(
        &self,
        iova: u64,
        size: u64,
        hva: *mut u8,
        methods: &mut DmaMethods,
    ) -> Result<(), HostError> {
        let Some(container) = self.container() else {
            return Ok(());
        };
        let len = usize::try_from(size).unwrap_or(usize::MAX);
        // SAFETY: vfio-ioctls' contract is this method's, which the caller
        // keeps.
        unsafe { container.vfio_dma_map(iova, len, hva) }.map_err(|source| HostError::Dma {
            what: "map",
            iova,
            size,
            source,
        })?;
        methods.0.push(DmaMethod::Type1Vaddr);
        Ok(())
    }

    /// Maps `[hva, hva + size)` at `iova` in the IOAS by address
    /// (IOMMU_IOAS_MAP), when there is one, adding its method to `methods`.
    ///
    /// # Safety
    ///
    /// As [`VfioHostAccess::dma_map`].
    unsafe fn map_in_ioas_by_address(
        &self,
        iova: u64,
        size: u64,
        hva: *mut u8,
        methods: &mut DmaMethods,
    ) -> Result<(), HostError> {
        let Some(iommufd) = self.iommufd() else {
            return Ok(());
        };
        let len = usize::try_from(size).unwrap_or(usize::MAX);
        // SAFETY: vfio-ioctls' contract is this method's, which the caller
        // keeps.
        unsafe { iommufd.vfio_dma_map(iova, len, hva) }.map_err(|source| HostError::Dma {
            what: "map",
            iova,
            size,
            source,
        })?;
        methods.0.push(DmaMethod::IommufdVaddr);
        Ok(())
    }

    /// Undoes the container's half of a BAR map whose IOAS half failed.
    fn undo_container_map(&self, mapping: &BarDmaMapping, iova: u64, size: u64) {
        if !mapping.methods.0.contains(&DmaMethod::Type1Vaddr) {
            return;
        }
        if let Some(container) = self.container() {
            let len = usize::try_from(size).unwrap_or(usize::MAX);
            if let Err(error) = container.vfio_dma_unmap(iova, len) {
                log::warn!("vfio: cannot unmap {iova:#x}+{size:#x} from the container: {error}");
            }
        }
    }
}

/// How barge opens the dma-buf of a BAR: read-write, closed on exec.
const DMA_BUF_OPEN_FLAGS: u32 = (libc::O_RDWR | libc::O_CLOEXEC) as u32;

fn libc_ebusy() -> i32 {
    io::Error::from(io::ErrorKind::ResourceBusy)
        .raw_os_error()
        .unwrap_or(16)
}

/// The error for failing to open `path`.
fn io_error(location: &DeviceLocation, path: PathBuf, error: io::Error) -> HostError {
    match error.kind() {
        io::ErrorKind::NotFound => HostError::Missing { path },
        io::ErrorKind::PermissionDenied => HostError::Permission { path },
        io::ErrorKind::ResourceBusy => HostError::InUse {
            bdf: location.bdf.clone(),
            path,
        },
        _ => HostError::Vfio {
            bdf: location.bdf.clone(),
            what: "open",
            source: VfioError::OpenGroup(error, path.display().to_string()),
        },
    }
}

/// The backend `kind` resolves to for `location` (see module docs).
pub fn choose_backend(
    kind: VfioBackendKind,
    location: &DeviceLocation,
    paths: &HostPaths,
) -> Result<OpenedBackend, HostError> {
    let iommufd_reason = if !paths.iommufd().exists() {
        Some(format!(
            "{} does not exist (kernel without CONFIG_IOMMUFD, or `modprobe iommufd` needed)",
            paths.iommufd().display()
        ))
    } else if location.cdev.is_none() {
        Some(format!(
            "{} has no VFIO device cdev under /dev/vfio/devices (kernel without CONFIG_VFIO_DEVICE_CDEV)",
            location.bdf
        ))
    } else {
        None
    };
    match (kind, iommufd_reason) {
        (VfioBackendKind::Legacy, _) => Ok(OpenedBackend::Legacy),
        (VfioBackendKind::Iommufd | VfioBackendKind::Auto, None) => Ok(OpenedBackend::Iommufd),
        (VfioBackendKind::Auto, Some(_)) => Ok(OpenedBackend::Legacy),
        (VfioBackendKind::Iommufd, Some(reason)) => Err(HostError::IommufdUnavailable {
            bdf: location.bdf.clone(),
            reason,
        }),
    }
}

/// An opened host device (see module docs).
pub struct HostVfioDevice {
    device: VfioDevice,
    location: DeviceLocation,
    backend: OpenedBackend,
}

impl fmt::Debug for HostVfioDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostVfioDevice")
            .field("location", &self.location)
            .field("backend", &self.backend)
            .finish()
    }
}

impl HostVfioDevice {
    /// Where the device is (BDF, group, cdev).
    pub fn location(&self) -> &DeviceLocation {
        &self.location
    }

    /// The interface it was opened with.
    pub fn backend(&self) -> OpenedBackend {
        self.backend
    }
}

impl VfioDeviceAccess for HostVfioDevice {
    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        if index > CONFIG_REGION_INDEX {
            return None;
        }
        let size = self.device.get_region_size(index);
        if size == 0 {
            return None;
        }
        let mut info = RegionInfo {
            size,
            offset: self.device.get_region_offset(index),
            flags: self.device.get_region_flags(index),
            sparse_areas: None,
            msix_mappable: false,
        };
        for cap in self.device.get_region_caps(index) {
            match cap {
                VfioRegionInfoCap::SparseMmap(sparse) => {
                    info.sparse_areas = Some(
                        sparse
                            .areas
                            .iter()
                            .map(|area| BarRange::new(area.offset, area.size))
                            .collect(),
                    );
                }
                VfioRegionInfoCap::MsixMappable => info.msix_mappable = true,
                _ => {}
            }
        }
        Some(info)
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) {
        self.device.region_read(index, data, offset);
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) {
        self.device.region_write(index, data, offset);
    }

    fn reset(&self) -> bool {
        // VFIO offers a reset exactly when the kernel found a reset method,
        // which is when sysfs has the `reset` file.
        if self.location.reset_supported {
            self.device.reset();
        }
        self.location.reset_supported
    }

    fn irq_count(&self, index: u32) -> u32 {
        self.device.get_irq_info(index).map_or(0, |irq| irq.count)
    }

    fn irq_enable(&self, index: u32, fds: &[&EventFd]) -> io::Result<()> {
        self.device
            .enable_irq(index, fds.to_vec())
            .map_err(io::Error::other)
    }

    fn irq_disable(&self, index: u32) -> io::Result<()> {
        self.device.disable_irq(index).map_err(io::Error::other)
    }

    fn intx_unmask_on(&self, fd: &EventFd) -> io::Result<()> {
        self.device
            .set_irq_resample_fd(super::INTX_IRQ_INDEX, vec![fd])
            .map_err(io::Error::other)
    }

    fn device_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the fd belongs to `self.device`, which keeps it open for
        // as long as `self` (and so the returned borrow) lives.
        unsafe { BorrowedFd::borrow_raw(self.device.as_raw_fd()) }
    }
}

impl Drop for HostVfioDevice {
    fn drop(&mut self) {
        // Leave the device quiet for its next user; `device` then closes its
        // fd and releases the group or cdev.
        self.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfio::preflight::tests::FakeHost;

    #[test]
    fn backend_kind_parses_and_prints() {
        for kind in [
            VfioBackendKind::Legacy,
            VfioBackendKind::Iommufd,
            VfioBackendKind::Auto,
        ] {
            assert_eq!(kind.to_string().parse::<VfioBackendKind>(), Ok(kind));
        }
        let error = "vfio".parse::<VfioBackendKind>().unwrap_err().to_string();
        assert!(error.contains("legacy, iommufd or auto"), "{error}");
        assert_eq!(VfioBackendKind::default(), VfioBackendKind::Auto);
    }

    #[test]
    fn auto_picks_iommufd_only_with_dev_iommu_and_a_cdev() {
        let host = FakeHost::new();
        host.device("0000:41:00.0", Some("vfio-pci"), Some(7));
        let legacy_only = locate("0000:41:00.0", &host.paths).unwrap();
        assert_eq!(
            choose_backend(VfioBackendKind::Auto, &legacy_only, &host.paths).unwrap(),
            OpenedBackend::Legacy
        );
        let error = choose_backend(VfioBackendKind::Iommufd, &legacy_only, &host.paths)
            .unwrap_err()
            .to_string();
        assert!(error.contains("CONFIG_IOMMUFD"), "{error}");
        assert!(error.contains("--vfio-backend legacy"), "{error}");
        std::fs::write(host.paths.iommufd(), "").unwrap();
        let error = choose_backend(VfioBackendKind::Iommufd, &legacy_only, &host.paths)
            .unwrap_err()
            .to_string();
        assert!(error.contains("CONFIG_VFIO_DEVICE_CDEV"), "{error}");
        let dir = host.paths.device_dir("0000:41:00.0");
        std::fs::create_dir_all(dir.join("vfio-dev/vfio0")).unwrap();
        std::fs::write(host.paths.dev.join("vfio/devices/vfio0"), "").unwrap();
        let with_cdev = locate("0000:41:00.0", &host.paths).unwrap();
        for kind in [VfioBackendKind::Auto, VfioBackendKind::Iommufd] {
            assert_eq!(
                choose_backend(kind, &with_cdev, &host.paths).unwrap(),
                OpenedBackend::Iommufd
            );
        }
        assert_eq!(
            choose_backend(VfioBackendKind::Legacy, &with_cdev, &host.paths).unwrap(),
            OpenedBackend::Legacy
        );
    }

    #[test]
    fn open_reports_preflight_errors_before_touching_vfio() {
        let host = FakeHost::new();
        host.device("0000:01:00.0", Some("e1000e"), Some(3));
        let vfio = VfioHost::new(VfioBackendKind::Auto, host.paths.clone(), None);
        let error = vfio.open("0000:01:00.0").unwrap_err().to_string();
        assert!(error.contains("driver_override"), "{error}");
        let error = vfio.open("0000:77:00.0").unwrap_err().to_string();
        assert!(error.contains("no PCI device 0000:77:00.0"), "{error}");
    }

    #[test]
    fn open_errors_map_to_what_to_do() {
        let host = FakeHost::new();
        host.device("0000:01:00.0", Some("vfio-pci"), Some(3));
        let location = locate("0000:01:00.0", &host.paths).unwrap();
        let busy = io_error(
            &location,
            PathBuf::from("/dev/vfio/3"),
            io::Error::from(io::ErrorKind::ResourceBusy),
        )
        .to_string();
        assert!(busy.contains("already in use"), "{busy}");
        assert!(busy.contains("fuser -v /dev/vfio/3"), "{busy}");
        let denied = io_error(
            &location,
            PathBuf::from("/dev/vfio/3"),
            io::Error::from(io::ErrorKind::PermissionDenied),
        )
        .to_string();
        assert!(denied.contains("run barge as root"), "{denied}");
        let missing = io_error(
            &location,
            PathBuf::from("/dev/vfio/vfio"),
            io::Error::from(io::ErrorKind::NotFound),
        )
        .to_string();
        assert!(missing.contains("modprobe vfio-pci"), "{missing}");
        // The kernel's "not viable" names the group's other devices.
        host.device("0000:01:00.1", Some("snd_hda_intel"), Some(3));
        let vfio = VfioHost::new(VfioBackendKind::Legacy, host.paths.clone(), None);
        let error = vfio
            .legacy_error(&location, "device open", VfioError::GroupViable)
            .to_string();
        assert!(
            error.contains("0000:01:00.1 (bound to snd_hda_intel)"),
            "{error}"
        );
    }

    #[test]
    fn a_device_another_process_holds_is_in_use_on_the_iommufd_path_too() {
        let host = FakeHost::new();
        host.device("0000:01:00.0", Some("vfio-pci"), Some(3));
        let dir = host.paths.device_dir("0000:01:00.0");
        std::fs::create_dir_all(dir.join("vfio-dev/vfio0")).unwrap();
        std::fs::write(host.paths.dev.join("vfio/devices/vfio0"), "").unwrap();
        let location = locate("0000:01:00.0", &host.paths).unwrap();
        let vfio = VfioHost::new(VfioBackendKind::Iommufd, host.paths.clone(), None);
        let bind_error = |errno| {
            vfio.iommufd_error(
                &location,
                VfioError::VfioDeviceBindIommufd(vmm_sys_util::errno::Error::new(errno)),
            )
            .to_string()
        };
        // A legacy user holds the group: the bind is refused with EBUSY (16).
        let group_held = bind_error(16);
        assert!(group_held.contains("already in use"), "{group_held}");
        let group = host.paths.vfio_dir().join("3");
        assert!(
            group_held.contains(&format!("fuser -v {}", group.display())),
            "{group_held}"
        );
        // Another cdev user holds the device: EINVAL (22).
        let cdev_held = bind_error(22);
        assert!(cdev_held.contains("already in use"), "{cdev_held}");
        let cdev = host.paths.vfio_dir().join("devices/vfio0");
        assert!(
            cdev_held.contains(&format!("fuser -v {}", cdev.display())),
            "{cdev_held}"
        );
        // Anything else stays the bind failure, with its errno.
        let other = bind_error(1);
        assert!(
            other.contains("cdev open and iommufd bind failed"),
            "{other}"
        );
        assert!(other.contains("os error 1"), "{other}");
    }

    #[test]
    fn iommufd_errors_name_their_cause() {
        let efault =
            iommufd_ioctls::IommufdError::IommuIoasMap(vmm_sys_util::errno::Error::new(14));
        let error = HostError::Dma {
            what: "map",
            iova: 0x2_0000_0000,
            size: 0x2_0000_0000,
            source: VfioError::IommufdIoctlError(efault),
        }
        .to_string();
        assert!(
            error.contains("failed to map an IOVA range to the IOAS: Bad address (os error 14)"),
            "{error}"
        );
        let ioas =
            iommufd_ioctls::IommufdError::IommuIoasAlloc(vmm_sys_util::errno::Error::new(12));
        let error = HostError::Vfio {
            bdf: "0000:01:00.0".into(),
            what: "IOAS allocation",
            source: VfioError::NewVfioIommufd(ioas),
        }
        .to_string();
        assert!(error.contains("failed to allocate IOAS: "), "{error}");
        assert!(error.contains("os error 12"), "{error}");
        // The legacy path's errors read as vfio-ioctls words them.
        let legacy = VfioError::IommuDmaMap(vmm_sys_util::errno::Error::new(14));
        let text = legacy.to_string();
        let error = HostError::Dma {
            what: "map",
            iova: 0,
            size: 4096,
            source: legacy,
        }
        .to_string();
        assert!(
            error.ends_with(&format!("for device DMA: {text}")),
            "{error}"
        );
    }

    #[test]
    fn opening_the_legacy_container_without_dev_vfio_is_a_clear_error() {
        // The real /dev/vfio/vfio is absent on the build machine; when it is
        // present this test says nothing.
        if std::path::Path::new("/dev/vfio/vfio").exists() {
            return;
        }
        let host = FakeHost::new();
        host.device("0000:01:00.0", Some("vfio-pci"), Some(3));
        let vfio = VfioHost::new(VfioBackendKind::Legacy, host.paths.clone(), None);
        let error = vfio.open("0000:01:00.0").unwrap_err();
        assert!(
            matches!(error, HostError::Missing { ref path } if path.ends_with("vfio/vfio")),
            "{error}"
        );
    }
}
