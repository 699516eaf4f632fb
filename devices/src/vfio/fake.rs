//! A fake VFIO device for tests: regions with sparse storage, a config
//! space with capabilities, and a log of what the model forwarded; and a
//! fake VFIO host ([`FakeVfioHost`]) that opens such devices by BDF and
//! records DMA mappings. The host and the devices it opened write what
//! they were asked to do, in order, to one [`FakeJournal`], so tests can
//! check the order of a teardown.
//!
//! Compiled for this crate's tests and, with the `fake` feature, for other
//! crates' tests. It never touches /dev/vfio.

#![cfg(any(test, feature = "fake"))]

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

use super::dma_method::{BarDmaMapping, DmaMethod, DmaMethods};
use super::host::{HostError, OpenedBackend, VfioHostAccess};
use super::preflight::PreflightError;
use super::{
    BarRange, RegionInfo, VfioDeviceAccess, CONFIG_REGION_INDEX, INTX_IRQ_INDEX, MSI_IRQ_INDEX,
    REGION_FLAG_MMAP, REGION_FLAG_READ, REGION_FLAG_WRITE, REQ_IRQ_INDEX,
};
use crate::pci::caps::{
    CAP_ID_MSI, CAP_ID_MSIX, CAP_ID_PCI_EXPRESS, CAP_ID_POWER_MANAGEMENT, EXT_CAP_ID_AER,
    EXT_CAP_ID_RESIZABLE_BAR, EXT_CAP_ID_SRIOV,
};
use crate::pci::config::CONFIG_SPACE_SIZE;

/// One fake region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeRegion {
    /// Size in bytes.
    pub size: u64,
    /// `REGION_FLAG_*` bits.
    pub flags: u32,
    /// Sparse-mmap areas, if the region reports the capability.
    pub sparse: Option<Vec<BarRange>>,
    /// Whether the region reports MSI-X mappable.
    pub msix_mappable: bool,
}

impl FakeRegion {
    /// A readable, writable, mmap-able region of `size` bytes.
    pub fn mmap(size: u64) -> Self {
        Self {
            size,
            flags: REGION_FLAG_READ | REGION_FLAG_WRITE | REGION_FLAG_MMAP,
            sparse: None,
            msix_mappable: false,
        }
    }

    /// A readable, writable region that cannot be mmap'ed.
    pub fn trapped(size: u64) -> Self {
        Self {
            flags: REGION_FLAG_READ | REGION_FLAG_WRITE,
            ..Self::mmap(size)
        }
    }

    /// With a sparse-mmap capability listing `areas`.
    pub fn sparse(mut self, areas: Vec<BarRange>) -> Self {
        self.sparse = Some(areas);
        self
    }
}

/// A write the model forwarded to the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeWrite {
    /// Region index.
    pub region: u32,
    /// Offset inside the region.
    pub offset: u64,
    pub data: Vec<u8>,
}

#[derive(Debug)]
struct State {
    config: Vec<u8>,
    config_size: u64,
    regions: HashMap<u32, FakeRegion>,
    /// Bytes written to BAR regions; others read as [`pattern_byte`].
    memory: BTreeMap<(u32, u64), u8>,
    writes: Vec<FakeWrite>,
    resets: u32,
    can_reset: bool,
    /// Interrupt counts per VFIO IRQ index.
    irq_counts: HashMap<u32, u32>,
    /// The eventfds each enabled IRQ index signals.
    irq_fds: HashMap<u32, Vec<EventFd>>,
    /// The INTx unmask (resample) eventfd.
    intx_unmask: Option<EventFd>,
    irq_calls: Vec<FakeIrqCall>,
}

/// An IRQ operation the model asked of the fake device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeIrqCall {
    /// `irq_enable(index, fds)` with `count` fds.
    Enable { index: u32, count: usize },
    /// `irq_disable(index)`.
    Disable { index: u32 },
    /// `intx_unmask_on(fd)`.
    IntxUnmaskOn,
}

/// What a [`FakeVfioHost`] and the devices it opened were asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeEvent {
    /// A configuration space write reached device `bdf`.
    ConfigWrite {
        bdf: String,
        /// Offset in configuration space.
        offset: u64,
        data: Vec<u8>,
    },
    /// VFIO IRQ `index` of device `bdf` was disabled.
    IrqDisable { bdf: String, index: u32 },
    /// Device `bdf` was closed (its last handle dropped).
    Closed { bdf: String },
    /// `[hva, hva + size)` was mapped for DMA at `iova`.
    DmaMap {
        /// IO virtual address.
        iova: u64,
        /// Size in bytes.
        size: u64,
        /// Host virtual address.
        hva: u64,
    },
    /// The DMA mapping at `iova` was undone; `still_mapped` says whether its
    /// host range was still mapped in the process at that moment.
    DmaUnmap {
        /// IO virtual address.
        iova: u64,
        /// Size in bytes.
        size: u64,
        /// Whether the host range was still mapped.
        still_mapped: bool,
    },
    /// The host was dropped: a real one releases its container or IOAS.
    Released,
}

/// The shared, ordered record of [`FakeEvent`]s. Cheap to clone; a test
/// keeps a clone to read it after the host and devices are gone.
#[derive(Debug, Clone, Default)]
pub struct FakeJournal(Arc<Mutex<Vec<FakeEvent>>>);

impl FakeJournal {
    fn push(&self, event: FakeEvent) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(event);
    }

    /// Everything recorded so far, oldest first.
    pub fn events(&self) -> Vec<FakeEvent> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Forgets what was recorded so far.
    pub fn clear(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// The fake device (see module docs).
#[derive(Debug)]
pub struct FakeVfioDevice {
    state: Mutex<State>,
    fd: File,
    /// Where to record, and the name to record under.
    journal: Option<(FakeJournal, String)>,
}

/// What an unwritten byte of a BAR region reads as.
pub fn pattern_byte(region: u32, offset: u64) -> u8 {
    (offset as u8) ^ (region as u8).wrapping_mul(0x11)
}

impl FakeVfioDevice {
    /// A device with `config` (padded with zeros to 4 KiB), a 4 KiB config
    /// region, no BAR regions and reset support.
    pub fn new(config: &[u8]) -> Self {
        let mut bytes = vec![0; CONFIG_SPACE_SIZE];
        let len = config.len().min(CONFIG_SPACE_SIZE);
        bytes[..len].copy_from_slice(&config[..len]);
        Self {
            state: Mutex::new(State {
                config: bytes,
                config_size: CONFIG_SPACE_SIZE as u64,
                regions: HashMap::new(),
                memory: BTreeMap::new(),
                writes: Vec::new(),
                resets: 0,
                can_reset: true,
                irq_counts: HashMap::from([(INTX_IRQ_INDEX, 1), (MSI_IRQ_INDEX, 1)]),
                irq_fds: HashMap::new(),
                intx_unmask: None,
                irq_calls: Vec::new(),
            }),
            fd: File::open("/dev/null").expect("the fake VFIO device opens /dev/null as its fd"),
            journal: None,
        }
    }

    /// Shaped like a data-center GPU: BAR0 16 MiB 32-bit with the MSI-X
    /// table (32 entries) at 0xb90000 and PBA at 0xba0000, BAR1 128 GiB
    /// 64-bit prefetchable, BAR3 32 MiB 64-bit prefetchable, BAR5 128 I/O
    /// ports (trapped); capabilities PM 0x60, MSI 0x68, PCIe 0x78, MSI-X 0xb4;
    /// extended AER 0x100, resizable BAR 0x250, 0x258 (id 0x1e), SR-IOV
    /// 0xbb0, 0xc1c (id 0x0b).
    pub fn gpu_like() -> Self {
        let mut c = vec![0u8; CONFIG_SPACE_SIZE];
        c[0..2].copy_from_slice(&0x10deu16.to_le_bytes());
        c[2..4].copy_from_slice(&0x2330u16.to_le_bytes());
        c[0x06] = 0x10; // capability list
        c[0x08] = 0xa1; // revision
        c[0x09..0x0c].copy_from_slice(&[0x00, 0x02, 0x03]); // 3D controller
        c[0x10..0x14].copy_from_slice(&0xa200_0000u32.to_le_bytes());
        c[0x14..0x18].copy_from_slice(&0x0000_000cu32.to_le_bytes());
        c[0x18..0x1c].copy_from_slice(&0x0000_3800u32.to_le_bytes());
        c[0x1c..0x20].copy_from_slice(&0x0000_000cu32.to_le_bytes());
        c[0x20..0x24].copy_from_slice(&0x0000_3820u32.to_le_bytes());
        c[0x24..0x28].copy_from_slice(&0x0000_e001u32.to_le_bytes());
        c[0x2c..0x30].copy_from_slice(&0x1111_10deu32.to_le_bytes());
        c[0x34] = 0x60;
        c[0x3d] = 1; // INTA
        let mut standard = |offset: usize, id: u8, next: u8| {
            c[offset] = id;
            c[offset + 1] = next;
        };
        standard(0x60, CAP_ID_POWER_MANAGEMENT, 0x68);
        standard(0x68, CAP_ID_MSI, 0x78);
        standard(0x78, CAP_ID_PCI_EXPRESS, 0xb4);
        standard(0xb4, CAP_ID_MSIX, 0);
        c[0xb6..0xb8].copy_from_slice(&31u16.to_le_bytes());
        c[0xb8..0xbc].copy_from_slice(&0x00b9_0000u32.to_le_bytes());
        c[0xbc..0xc0].copy_from_slice(&0x00ba_0000u32.to_le_bytes());
        let extended = [
            (0x100usize, EXT_CAP_ID_AER, 2u32, 0x250u32),
            (0x250, EXT_CAP_ID_RESIZABLE_BAR, 1, 0x258),
            (0x258, 0x1e, 1, 0xbb0),
            (0xbb0, EXT_CAP_ID_SRIOV, 1, 0xc1c),
            (0xc1c, 0x0b, 1, 0),
        ];
        for (offset, id, version, next) in extended {
            let header = u32::from(id) | (version << 16) | (next << 20);
            c[offset..offset + 4].copy_from_slice(&header.to_le_bytes());
        }
        // Something recognizable inside the hidden capabilities' bodies.
        c[0x254..0x258].copy_from_slice(&0x0001_fff0u32.to_le_bytes());
        c[0xbb4..0xbb8].copy_from_slice(&0x0000_0002u32.to_le_bytes());
        Self::new(&c)
            .with_region(0, FakeRegion::mmap(16 << 20))
            .with_region(1, FakeRegion::mmap(128 << 30))
            .with_region(3, FakeRegion::mmap(32 << 20))
            .with_region(5, FakeRegion::trapped(128))
    }

    /// With `count` interrupts at VFIO IRQ `index` (default: one INTx,
    /// one MSI, no MSI-X).
    pub fn with_irqs(self, index: u32, count: u32) -> Self {
        self.lock().irq_counts.insert(index, count);
        self
    }

    /// The IRQ operations so far.
    pub fn irq_calls(&self) -> Vec<FakeIrqCall> {
        self.lock().irq_calls.clone()
    }

    /// Forgets the IRQ operations so far.
    pub fn clear_irq_calls(&self) {
        self.lock().irq_calls.clear();
    }

    /// The device raises interrupt `vector` of IRQ `index`: signals the
    /// eventfd VFIO was given for it. Returns whether one was enabled.
    pub fn fire(&self, index: u32, vector: usize) -> bool {
        let state = self.lock();
        let Some(fd) = state.irq_fds.get(&index).and_then(|fds| fds.get(vector)) else {
            return false;
        };
        fd.write(1).is_ok()
    }

    /// The host asks for the device back, as vfio-pci does when the device
    /// is unbound from it: signals the eventfd enabled at
    /// [`REQ_IRQ_INDEX`] (give the fake one with
    /// `with_irqs(REQ_IRQ_INDEX, 1)`). Returns whether one was enabled.
    pub fn request_release(&self) -> bool {
        self.fire(REQ_IRQ_INDEX, 0)
    }

    /// Whether the INTx unmask eventfd was signalled (consumes it).
    pub fn take_intx_unmask(&self) -> bool {
        let state = self.lock();
        state
            .intx_unmask
            .as_ref()
            .is_some_and(|fd| fd.read().is_ok_and(|count| count > 0))
    }

    /// Sets region `index` (a BAR: 0..=5).
    pub fn with_region(self, index: u32, region: FakeRegion) -> Self {
        self.lock().regions.insert(index, region);
        self
    }

    /// Removes region `index`.
    pub fn without_region(self, index: u32) -> Self {
        self.lock().regions.remove(&index);
        self
    }

    /// Sets the config region's size (256 for conventional PCI; 0 for none).
    pub fn with_config_size(self, size: u64) -> Self {
        self.lock().config_size = size;
        self
    }

    /// Whether the device supports reset.
    pub fn with_reset(self, can_reset: bool) -> Self {
        self.lock().can_reset = can_reset;
        self
    }

    /// Uses `fd` as the device fd (e.g. a memfd a test can really mmap).
    pub fn with_fd(mut self, fd: File) -> Self {
        self.fd = fd;
        self
    }

    /// Overwrites config bytes behind the model's back (as the device would).
    pub fn set_config_bytes(&self, offset: usize, data: &[u8]) {
        let mut state = self.lock();
        if let Some(target) = state.config.get_mut(offset..offset + data.len()) {
            target.copy_from_slice(data);
        }
    }

    /// A copy of the device's config space.
    pub fn config_bytes(&self) -> Vec<u8> {
        self.lock().config.clone()
    }

    /// Writes forwarded so far, oldest first.
    pub fn writes(&self) -> Vec<FakeWrite> {
        self.lock().writes.clone()
    }

    /// Forgets the write log.
    pub fn clear_writes(&self) {
        self.lock().writes.clear();
    }

    /// How many times the device was reset.
    pub fn resets(&self) -> u32 {
        self.lock().resets
    }

    /// Records what it is asked to do (configuration writes, IRQ disables,
    /// its close) in `journal` as device `bdf`.
    pub fn with_journal(mut self, journal: FakeJournal, bdf: &str) -> Self {
        self.journal = Some((journal, bdf.to_string()));
        self
    }

    fn record(&self, event: impl FnOnce(String) -> FakeEvent) {
        if let Some((journal, bdf)) = &self.journal {
            journal.push(event(bdf.clone()));
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock only happens in a failing test.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for FakeVfioDevice {
    fn drop(&mut self) {
        self.record(|bdf| FakeEvent::Closed { bdf });
    }
}

impl State {
    fn size(&self, index: u32) -> Option<u64> {
        if index == CONFIG_REGION_INDEX {
            return (self.config_size > 0).then_some(self.config_size);
        }
        self.regions.get(&index).map(|region| region.size)
    }

    fn in_range(&self, index: u32, offset: u64, len: usize) -> bool {
        self.size(index).is_some_and(|size| {
            offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= size)
        })
    }
}

impl VfioDeviceAccess for FakeVfioDevice {
    fn irq_count(&self, index: u32) -> u32 {
        self.lock().irq_counts.get(&index).copied().unwrap_or(0)
    }

    fn irq_enable(&self, index: u32, fds: &[&EventFd]) -> io::Result<()> {
        let mut state = self.lock();
        let count = state.irq_counts.get(&index).copied().unwrap_or(0);
        if count == 0 || fds.len() > count as usize {
            return Err(io::Error::from_raw_os_error(
                22, /* EINVAL, as VFIO answers */
            ));
        }
        let clones = fds
            .iter()
            .map(|fd| fd.try_clone())
            .collect::<io::Result<Vec<_>>>()?;
        state.irq_fds.insert(index, clones);
        state.irq_calls.push(FakeIrqCall::Enable {
            index,
            count: fds.len(),
        });
        Ok(())
    }

    fn irq_disable(&self, index: u32) -> io::Result<()> {
        let mut state = self.lock();
        state.irq_fds.remove(&index);
        state.irq_calls.push(FakeIrqCall::Disable { index });
        self.record(|bdf| FakeEvent::IrqDisable { bdf, index });
        Ok(())
    }

    fn intx_unmask_on(&self, fd: &EventFd) -> io::Result<()> {
        let mut state = self.lock();
        state.intx_unmask = Some(fd.try_clone()?);
        state.irq_calls.push(FakeIrqCall::IntxUnmaskOn);
        Ok(())
    }

    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        let state = self.lock();
        // Region offsets as vfio-pci lays them out: index << 40.
        let offset = u64::from(index) << 40;
        if index == CONFIG_REGION_INDEX {
            return (state.config_size > 0).then(|| RegionInfo {
                size: state.config_size,
                offset,
                flags: REGION_FLAG_READ | REGION_FLAG_WRITE,
                sparse_areas: None,
                msix_mappable: false,
            });
        }
        let region = state.regions.get(&index)?;
        Some(RegionInfo {
            size: region.size,
            offset,
            flags: region.flags,
            sparse_areas: region.sparse.clone(),
            msix_mappable: region.msix_mappable,
        })
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) {
        let state = self.lock();
        if !state.in_range(index, offset, data.len()) {
            return;
        }
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            *byte = if index == CONFIG_REGION_INDEX {
                state.config[at as usize]
            } else {
                state
                    .memory
                    .get(&(index, at))
                    .copied()
                    .unwrap_or_else(|| pattern_byte(index, at))
            };
        }
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) {
        let mut state = self.lock();
        if !state.in_range(index, offset, data.len()) {
            return;
        }
        state.writes.push(FakeWrite {
            region: index,
            offset,
            data: data.to_vec(),
        });
        if index == CONFIG_REGION_INDEX {
            self.record(|bdf| FakeEvent::ConfigWrite {
                bdf,
                offset,
                data: data.to_vec(),
            });
        }
        for (i, byte) in data.iter().enumerate() {
            let at = offset + i as u64;
            if index == CONFIG_REGION_INDEX {
                // vfio-pci virtualizes the BAR registers: the device keeps its
                // host addresses.
                let bar_register = (0x10..0x28).contains(&at) || (0x30..0x34).contains(&at);
                if !bar_register {
                    state.config[at as usize] = *byte;
                }
            } else {
                state.memory.insert((index, at), *byte);
            }
        }
    }

    fn reset(&self) -> bool {
        let mut state = self.lock();
        if state.can_reset {
            state.resets += 1;
        }
        state.can_reset
    }

    fn device_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// A fake VFIO host: hands out the [`FakeVfioDevice`]s it was given, by
/// BDF, each once; records DMA mappings; and writes every step to its
/// [`FakeJournal`] (see module docs).
#[derive(Debug, Default)]
pub struct FakeVfioHost {
    devices: Mutex<HashMap<String, FakeVfioDevice>>,
    journal: FakeJournal,
    /// iova -> (size, hva) of the live DMA mappings.
    dma: Mutex<BTreeMap<u64, (u64, u64)>>,
    /// DMA maps at or above this IO virtual address fail.
    refuse_from: Option<u64>,
    /// The backend its devices are opened with (legacy unless set).
    backend: Option<OpenedBackend>,
    /// With iommufd: whether the kernel has IOMMU_IOAS_MAP_FILE of memfds
    /// (6.13+) and of dma-bufs (6.19+); both unless set.
    old_iommufd: bool,
    /// How long each BAR map takes (type1 on 6.12 takes seconds).
    bar_map_delay: std::time::Duration,
}

impl FakeVfioHost {
    /// A host with no devices.
    pub fn new() -> Self {
        Self::default()
    }

    /// Offers `device` at `bdf`: [`VfioHostAccess::open`] hands it out
    /// (once), recording to this host's journal.
    pub fn with_device(self, bdf: &str, device: FakeVfioDevice) -> Self {
        let device = device.with_journal(self.journal.clone(), bdf);
        self.devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(bdf.to_string(), device);
        self
    }

    /// Makes DMA maps at IO virtual addresses from `iova` on fail, as an
    /// IOMMU or kernel refusing to map MMIO (peer to peer) would.
    pub fn refusing_dma_from(mut self, iova: u64) -> Self {
        self.refuse_from = Some(iova);
        self
    }

    /// Opens its devices with `backend`: the DMA methods are that backend's.
    pub fn with_backend(mut self, backend: OpenedBackend) -> Self {
        self.backend = Some(backend);
        self
    }

    /// With iommufd, a kernel before 6.13: no IOMMU_IOAS_MAP_FILE, so RAM
    /// is mapped by address and BARs cannot be mapped for peer to peer.
    pub fn with_old_iommufd(mut self) -> Self {
        self.old_iommufd = true;
        self
    }

    /// Makes each BAR map (peer to peer) take `delay`, as a slow kernel's.
    pub fn with_bar_map_delay(mut self, delay: std::time::Duration) -> Self {
        self.bar_map_delay = delay;
        self
    }

    fn opened_backend(&self) -> OpenedBackend {
        self.backend.unwrap_or(OpenedBackend::Legacy)
    }

    fn refuse(&self, iova: u64, size: u64) -> Result<(), HostError> {
        if self.refuse_from.is_some_and(|from| iova >= from) {
            return Err(HostError::Dma {
                what: "map",
                iova,
                size,
                source: vfio_ioctls::VfioError::IommuDmaMap(vmm_sys_util::errno::Error::new(
                    22, /* EINVAL, as type1 answers for MMIO it cannot pin */
                )),
            });
        }
        Ok(())
    }

    fn record_map(&self, iova: u64, size: u64, hva: *mut u8) {
        let hva = hva as u64;
        self.dma
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(iova, (size, hva));
        self.journal.push(FakeEvent::DmaMap { iova, size, hva });
    }

    /// The journal (a clone: it outlives the host).
    pub fn journal(&self) -> FakeJournal {
        self.journal.clone()
    }

    /// The live DMA mappings as `(iova, size, hva)`, by IO virtual address.
    pub fn dma_mappings(&self) -> Vec<(u64, u64, u64)> {
        self.dma
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(iova, (size, hva))| (*iova, *size, *hva))
            .collect()
    }
}

impl VfioHostAccess for FakeVfioHost {
    type Device = FakeVfioDevice;

    fn open(&self, bdf: &str) -> Result<FakeVfioDevice, HostError> {
        self.devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(bdf)
            .ok_or_else(|| {
                HostError::Preflight(PreflightError::NoSuchDevice {
                    bdf: bdf.to_string(),
                    path: PathBuf::from("/sys/bus/pci/devices").join(bdf),
                })
            })
    }

    unsafe fn dma_map(&self, iova: u64, size: u64, hva: *mut u8) -> Result<DmaMethods, HostError> {
        self.refuse(iova, size)?;
        self.record_map(iova, size, hva);
        Ok(DmaMethods(vec![match self.opened_backend() {
            OpenedBackend::Legacy => DmaMethod::Type1Vaddr,
            OpenedBackend::Iommufd => DmaMethod::IommufdVaddr,
        }]))
    }

    unsafe fn dma_map_file(
        &self,
        iova: u64,
        size: u64,
        hva: *mut u8,
        _file: BorrowedFd<'_>,
        _offset: u64,
    ) -> Result<DmaMethods, HostError> {
        self.refuse(iova, size)?;
        self.record_map(iova, size, hva);
        Ok(DmaMethods(vec![match self.opened_backend() {
            OpenedBackend::Legacy => DmaMethod::Type1Vaddr,
            OpenedBackend::Iommufd if self.old_iommufd => DmaMethod::IommufdVaddr,
            OpenedBackend::Iommufd => DmaMethod::IommufdMemfd,
        }]))
    }

    unsafe fn bar_dma_map(
        &self,
        device: &FakeVfioDevice,
        bar: u32,
        _offset: u64,
        iova: u64,
        size: u64,
        hva: *mut u8,
    ) -> Result<BarDmaMapping, HostError> {
        let method = match self.opened_backend() {
            OpenedBackend::Legacy => DmaMethod::Type1Vaddr,
            OpenedBackend::Iommufd if self.old_iommufd => {
                return Err(HostError::P2pUnsupported {
                    bdf: device
                        .journal
                        .as_ref()
                        .map_or_else(String::new, |(_, bdf)| bdf.clone()),
                    bar,
                    kernel: "6.12.0-fake".to_string(),
                })
            }
            OpenedBackend::Iommufd => DmaMethod::IommufdDmabuf,
        };
        std::thread::sleep(self.bar_map_delay);
        self.refuse(iova, size)?;
        self.record_map(iova, size, hva);
        Ok(BarDmaMapping {
            methods: DmaMethods(vec![method]),
            dma_buf: None,
        })
    }

    fn backend_of(&self, _device: &FakeVfioDevice) -> OpenedBackend {
        self.opened_backend()
    }

    fn dma_unmap(&self, iova: u64, size: u64) -> Result<(), HostError> {
        let hva = self
            .dma
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&iova)
            .map(|(_, hva)| hva);
        let still_mapped = hva.is_some_and(|hva| is_mapped(hva, size));
        self.journal.push(FakeEvent::DmaUnmap {
            iova,
            size,
            still_mapped,
        });
        Ok(())
    }
}

impl Drop for FakeVfioHost {
    fn drop(&mut self) {
        self.journal.push(FakeEvent::Released);
    }
}

/// Whether `[addr, addr + len)` is mapped in this process, by
/// `/proc/self/maps`.
pub fn is_mapped(addr: u64, len: u64) -> bool {
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return false;
    };
    let mut ranges: Vec<(u64, u64)> = maps
        .lines()
        .filter_map(|line| {
            let (start, end) = line.split_whitespace().next()?.split_once('-')?;
            Some((
                u64::from_str_radix(start, 16).ok()?,
                u64::from_str_radix(end, 16).ok()?,
            ))
        })
        .collect();
    ranges.sort_unstable();
    let end = addr.saturating_add(len);
    let mut covered = addr;
    for (start, stop) in ranges {
        if start <= covered && covered < stop {
            covered = stop;
        }
        if covered >= end {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_regions_read_pattern_and_keep_writes_in_bounds() {
        let fake = FakeVfioDevice::gpu_like();
        let mut data = [0u8; 4];
        fake.region_read(0, 0x100, &mut data);
        assert_eq!(data, [0, 1, 2, 3].map(|i| pattern_byte(0, 0x100 + i)));
        fake.region_write(0, 0x100, &[9, 9]);
        fake.region_read(0, 0x100, &mut data);
        assert_eq!(data[..2], [9, 9]);
        let mut data = [0xaa; 4];
        fake.region_read(0, (16 << 20) - 2, &mut data);
        assert_eq!(data, [0xaa; 4], "out of range reads leave data alone");
        fake.region_write(2, 0, &[1]);
        fake.region_write(0, u64::MAX, &[1]);
        assert_eq!(fake.writes().len(), 1);
        assert!(fake.region_info(2).is_none());
        assert_eq!(fake.region_info(7).unwrap().size, 4096);
        assert!(fake.reset());
        assert_eq!(fake.resets(), 1);
        assert!(!FakeVfioDevice::gpu_like().with_reset(false).reset());
    }
}
