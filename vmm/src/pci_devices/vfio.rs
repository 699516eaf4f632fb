//! VFIO passthrough in the VM: the glue between the config
//! (`device_config::VfioConfig`), the device model (`devices::vfio`), the
//! placement plan, KVM and the buses.
//!
//! # What the builder calls, in order
//!
//! 1. [`create_kvm_vfio_device`] once, after creating the VM (`None` on
//!    failure is fine; a warning says so).
//! 2. [`open_host_devices`] with the VM's `VfioConfig`s and backend: a
//!    [`VfioHost`] (the shared IOMMU domain) and one [`VfioPassthrough`] per
//!    device, each probed and reset. Errors say what to do (bind to
//!    vfio-pci, group not viable, no IOMMU, in use, ...).
//! 3. [`VfioPassthrough::device_input`] for each, next to the shmem
//!    devices' inputs, into `resources::plan` with the VM's `Windows`.
//! 4. [`VfioPassthrough::attach`] with the device's `DevicePlan`, the buses
//!    and the PCI segment: puts the trapped ranges of every BAR on the MMIO
//!    bus (forwarded to VFIO region reads/writes) and the device's config
//!    model in the segment. It returns an [`AttachedVfio`]; for each of its
//!    [`VfioBarRegion`]s the builder calls
//!    `bar_mapping::map_bar_areas(vm, attached.device_fd(), bar.region_offset,
//!    &attached.bdf, &bar.placement, &mut slots)` (the mmap-able areas over the
//!    VFIO device fd at the region's offset plus the area's offset, at the
//!    plan's HVA phase, one memslot each, once), adds
//!    [`AttachedVfio::shortfall_causes`] to each `MappedBar`, then pre-faults
//!    and reports per BAR like any other BAR.
//! 5. `unsafe` [`dma_map_ram`] once all devices are open: maps every guest
//!    RAM region into the IOMMU domain so the devices can DMA.
//!
//! Keep, for the VM's lifetime and dropped after the VM fd: the BAR
//! mappings, the [`AttachedVfio`]s, the segment (which owns the config
//! models), then the [`VfioHost`]. A mapping holds the device fd open, so
//! the device is released (and reset) only once they are all gone.
//!
//! Guest BAR writes and decode toggles never change a memslot: the PCI
//! segment only logs them (`pci::log_event`). I/O BARs are not exposed yet
//! (the host bridge declares no I/O window); they read as unimplemented.

use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use devices::pci::PciSegment;
use devices::vfio::host::{HostError, HostVfioDevice, VfioHost, VfioHostAccess};
use devices::vfio::interrupts::{InterruptRouter, KvmIrqs, VfioInterrupts};
use devices::vfio::preflight::HostPaths;
use devices::vfio::{
    ProbeError, VfioBackendKind, VfioBarAccess, VfioDeviceAccess, VfioDeviceError, VfioPciDevice,
    VfioProbe,
};
use kvm_bindings::{
    kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO, kvm_irq_routing_entry, KvmIrqRouting,
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{Cap, VmFd};
use resources::gsi::{Route, RouteKind, KVM_MAX_IRQ_ROUTES_OLD};
use resources::placement::{BarPlacement, DeviceInput, DevicePlan, PageSize};
use vfio_ioctls::VfioDeviceFd;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::buses::bus::{BusDevice, BusError, Buses, SharedBusDevice};
use crate::config::devices::{P2p, VfioConfig};
use crate::machine::memory::GuestRam;
use crate::pci_devices::bar_mapping::MappedBar;
use crate::pci_devices::setup::{
    AttachContext, AttachedDevice, DeviceSetupError, PciDeviceSetup, TrapRegion,
};
use crate::report::DmaReport;

/// Why a VFIO device cannot be put in the VM.
#[derive(Debug, thiserror::Error)]
pub enum PassthroughError {
    /// Opening the host device failed.
    #[error(transparent)]
    Host(#[from] HostError),
    /// The device's config space or regions are unusable.
    #[error("PCI device {bdf}: {source}")]
    Probe {
        /// The device.
        bdf: String,
        /// What is wrong.
        source: ProbeError,
    },
    /// The plan does not fit the device.
    #[error("PCI device {bdf}: {source}")]
    Plan {
        /// The device.
        bdf: String,
        /// What is wrong.
        source: VfioDeviceError,
    },
    /// A trapped range cannot go on the bus.
    #[error("PCI device {bdf}: cannot put BAR {bar}'s trapped range on the MMIO bus: {source}")]
    Bus {
        /// The device.
        bdf: String,
        /// The BAR.
        bar: u8,
        /// Why.
        source: BusError,
    },
    /// The PCI segment has no room.
    #[error("PCI device {bdf}: {source}")]
    Segment {
        /// The device.
        bdf: String,
        /// Why.
        source: devices::pci::segment::SegmentError,
    },
}

/// Creates KVM's VFIO pseudo-device (`KVM_DEV_TYPE_VFIO`), through which
/// vfio-ioctls tells KVM about each group or cdev (KVM then honours the
/// guest's cache attributes for non-coherent DMA). `None`, with a warning,
/// when KVM refuses.
pub fn create_kvm_vfio_device(vm: &VmFd) -> Option<Arc<VfioDeviceFd>> {
    let mut request = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
        fd: 0,
        flags: 0,
    };
    match vm.create_device(&mut request) {
        Ok(fd) => Some(Arc::new(VfioDeviceFd::new_from_kvm(fd))),
        Err(error) => {
            log::warn!(
                "vfio: KVM has no VFIO device ({error}); passthrough works, but KVM does not \
                 know a device is assigned (non-coherent DMA may see wrong cache attributes)"
            );
            None
        }
    }
}

/// A VFIO device opened and probed, before placement.
pub struct VfioPassthrough<B: VfioDeviceAccess> {
    bdf: String,
    backend: Arc<B>,
    probe: VfioProbe,
    align_cap: Option<PageSize>,
}

impl<B: VfioDeviceAccess> std::fmt::Debug for VfioPassthrough<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioPassthrough")
            .field("bdf", &self.bdf)
            .field("bars", &self.probe.bars)
            .field("align_cap", &self.align_cap)
            .finish()
    }
}

/// Opens every configured device through one [`VfioHost`] (see module docs).
pub fn open_host_devices(
    configs: &[VfioConfig],
    backend: VfioBackendKind,
    kvm_vfio_device: Option<Arc<VfioDeviceFd>>,
) -> Result<(VfioHost, Vec<VfioPassthrough<HostVfioDevice>>), PassthroughError> {
    let host = VfioHost::new(backend, HostPaths::default(), kvm_vfio_device);
    let mut devices = Vec::with_capacity(configs.len());
    for config in configs {
        let device = host.open(&config.bdf)?;
        log::info!(
            "vfio: opened {} ({:?}, IOMMU group {})",
            config.bdf,
            device.backend(),
            device.location().group
        );
        devices.push(VfioPassthrough::new(
            &config.bdf,
            Arc::new(device),
            config.bar_align.cap(),
        )?);
    }
    Ok((host, devices))
}

/// Maps every guest RAM region into `host`'s IOMMU domain (IOVA = GPA) so
/// the passed-through devices can DMA to guest memory. Call it after
/// [`open_host_devices`] (the domain exists once a device is open).
///
/// # Safety
///
/// `ram` must stay mapped until `host` and all its devices are dropped.
pub unsafe fn dma_map_ram(host: &VfioHost, ram: &GuestRam) -> Result<(), PassthroughError> {
    for region in ram.memory.iter() {
        let gpa = region.start_addr().raw_value();
        let Ok(hva) = ram.memory.get_host_address(region.start_addr()) else {
            continue;
        };
        // SAFETY: the caller keeps `ram` mapped for the domain's lifetime.
        unsafe { host.dma_map(gpa, region.len(), hva) }?;
    }
    Ok(())
}

impl<B: VfioDeviceAccess + 'static> VfioPassthrough<B> {
    /// Probes `backend` (config space, region info).
    pub fn new(
        bdf: &str,
        backend: Arc<B>,
        align_cap: Option<PageSize>,
    ) -> Result<Self, PassthroughError> {
        let probe = VfioProbe::read(&*backend).map_err(|source| PassthroughError::Probe {
            bdf: bdf.to_string(),
            source,
        })?;
        Ok(Self {
            bdf: bdf.to_string(),
            backend,
            probe,
            align_cap,
        })
    }

    /// The host PCI address.
    pub fn bdf(&self) -> &str {
        &self.bdf
    }

    /// What the probe found.
    pub fn probe(&self) -> &VfioProbe {
        &self.probe
    }

    /// The planner's input for this device, named by its BDF.
    pub fn device_input(&self) -> DeviceInput {
        self.probe.device_input(&self.bdf, self.align_cap)
    }

    /// Maps the BARs' mmap-able areas, puts the trapped ranges on the MMIO
    /// bus and the device on the segment (see module docs).
    pub fn attach(
        self,
        plan: &DevicePlan,
        buses: &mut Buses,
        segment: &Arc<Mutex<PciSegment>>,
    ) -> Result<AttachedVfio<B>, PassthroughError> {
        let bdf = self.bdf.clone();
        let device = VfioPciDevice::new(Arc::clone(&self.backend), &self.probe, plan, &[])
            .map_err(|source| PassthroughError::Plan {
                bdf: bdf.clone(),
                source,
            })?;
        let access = device.bar_access();
        let mut bars = Vec::new();
        let mut traps = Vec::new();
        for placement in &plan.bars {
            let Some(probed) = self.probe.bar(placement.index) else {
                continue;
            };
            for trap in &placement.traps {
                let gpa = placement.gpa + trap.offset;
                buses
                    .mmio
                    .insert(
                        gpa,
                        trap.size,
                        "vfio-bar",
                        Arc::new(Mutex::new(VfioBarTrap {
                            access: access.clone(),
                            bar: placement.index,
                            base_offset: trap.offset,
                        })),
                    )
                    .map_err(|source| PassthroughError::Bus {
                        bdf: bdf.clone(),
                        bar: placement.index,
                        source,
                    })?;
                traps.push(TrappedRange {
                    bar: placement.index,
                    gpa,
                    size: trap.size,
                });
            }
            bars.push(VfioBarRegion {
                placement: placement.clone(),
                region_offset: probed.region.offset,
                mmap: probed.region.mmap(),
            });
        }
        let device_number = segment
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add_device(Box::new(device))
            .map_err(|source| PassthroughError::Segment {
                bdf: bdf.clone(),
                source,
            })?;
        log::info!(
            "vfio: {bdf} is 00:{device_number:02x}.0 in the guest: {} BARs, {} trapped ranges",
            bars.len(),
            traps.len()
        );
        Ok(AttachedVfio {
            bars,
            bdf,
            device_number,
            traps,
            backend: self.backend,
        })
    }
}

/// A memory BAR of the device as the BAR mapping module needs it:
/// `bar_mapping::map_bar_areas(vm, attached.device_fd(), bar.region_offset,
/// &attached.bdf, &bar.placement, &mut slots)` maps its areas (nothing when
/// the placement has none: trapped) and makes their memslots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioBarRegion {
    /// Where the plan put the BAR (areas, traps, HVA phase).
    pub placement: BarPlacement,
    /// Offset of the BAR's VFIO region in the device fd.
    pub region_offset: u64,
    /// Whether VFIO lets the region be mmap'ed at all.
    pub mmap: bool,
}

/// A BAR range served by VFIO region reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrappedRange {
    /// BAR index.
    pub bar: u8,
    /// Guest physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
}

/// A device in the VM: its config model is in the segment, its trapped
/// ranges on the MMIO bus; its BARs wait for the BAR mapping module (see
/// [`VfioBarRegion`]). The device closes once this, the segment and every
/// mapping of its fd are dropped.
pub struct AttachedVfio<B: VfioDeviceAccess> {
    /// Memory BARs, by index.
    pub bars: Vec<VfioBarRegion>,
    /// The host PCI address.
    pub bdf: String,
    /// Its device number on the guest's bus 0.
    pub device_number: u8,
    /// The ranges on the MMIO bus.
    pub traps: Vec<TrappedRange>,
    backend: Arc<B>,
}

impl<B: VfioDeviceAccess> std::fmt::Debug for AttachedVfio<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttachedVfio")
            .field("bdf", &self.bdf)
            .field("device_number", &self.device_number)
            .field("bars", &self.bars)
            .field("traps", &self.traps)
            .finish()
    }
}

impl<B: VfioDeviceAccess> AttachedVfio<B> {
    /// The backend.
    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    /// The VFIO device fd, to mmap the BARs' areas from.
    pub fn device_fd(&self) -> BorrowedFd<'_> {
        self.backend.device_fd()
    }

    /// Likely causes, known from VFIO, of BAR `index` getting smaller pages
    /// than planned (for `MappedBar::add_cause`).
    pub fn shortfall_causes(&self, index: u8) -> Vec<String> {
        let Some(bar) = self.bars.iter().find(|bar| bar.placement.index == index) else {
            return Vec::new();
        };
        let mut causes = Vec::new();
        if !bar.mmap {
            causes.push("VFIO does not let this region be mmap'ed: every access traps".into());
        }
        causes.extend(host_bar_causes(
            &self.bdf,
            &bar.placement,
            Path::new("/sys"),
        ));
        causes.extend(kernel_causes(
            &std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default(),
        ));
        causes
    }
}

/// A host BAR not aligned to the planned page size cannot be mapped with
/// it (the host page tables need PA ≡ VA too). Empty when sysfs has no
/// address for it (not a host device, or unreadable).
pub fn host_bar_causes(bdf: &str, placement: &BarPlacement, sysfs: &Path) -> Vec<String> {
    let Ok(device) = resources::sysfs::read_device(bdf, sysfs) else {
        return Vec::new();
    };
    let Some(host) = device.bars.iter().find(|bar| bar.index == placement.index) else {
        return Vec::new();
    };
    let Some(planned) = placement.page_size else {
        return Vec::new();
    };
    match host.host_alignment() {
        Some(aligned) if aligned < planned => vec![format!(
            "the host resource of BAR {} is at {:#x}, aligned only to {aligned}: the host can map it with {aligned} pages at most",
            placement.index, host.host_start
        )],
        _ => Vec::new(),
    }
}

/// VFIO maps BARs with huge pages (huge pfnmap) from Linux 6.12 on; before
/// that every BAR page is 4 KiB on the host, so KVM maps 4 KiB too.
pub fn kernel_causes(osrelease: &str) -> Vec<String> {
    let mut numbers = osrelease
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|part| part.parse::<u32>().ok());
    match (numbers.next(), numbers.next()) {
        (Some(major), Some(minor)) if (major, minor) < (6, 12) => vec![format!(
            "host kernel {} predates VFIO huge pfnmap (Linux 6.12): VFIO BARs get 4K host pages",
            osrelease.trim()
        )],
        _ => Vec::new(),
    }
}

/// A trapped BAR range on the MMIO bus.
struct VfioBarTrap<B: VfioDeviceAccess> {
    access: VfioBarAccess<B>,
    bar: u8,
    /// Offset of the range's start inside the BAR.
    base_offset: u64,
}

impl<B: VfioDeviceAccess> BusDevice for VfioBarTrap<B> {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match self.base_offset.checked_add(offset) {
            Some(at) => self.access.bar_read(self.bar, at, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let Some(at) = self.base_offset.checked_add(offset) {
            self.access.bar_write(self.bar, at, data);
        }
    }
}

/// The VFIO host shared by every passed-through device of one VM: one
/// container (or IOAS), guest RAM mapped into it once, and the VM's GSI
/// router for the devices' interrupts.
pub struct SharedVfioHost {
    host: VfioHost,
    ram_mapped: Mutex<bool>,
    dma_regions: Mutex<Vec<(u64, u64)>>,
    kvm_irqs: Option<Arc<KvmIrqChip>>,
    router: Option<Arc<InterruptRouter>>,
    next_device: Mutex<u32>,
}

impl SharedVfioHost {
    /// One container for the VM, registered with KVM's VFIO device when
    /// KVM has one.
    pub fn new(vm: &VmFd, backend: VfioBackendKind) -> Arc<Self> {
        let kvm_device = create_kvm_vfio_device(vm);
        let kvm_irqs = match KvmIrqChip::new(vm) {
            Ok(chip) => Some(Arc::new(chip)),
            Err(error) => {
                log::warn!("vfio: cannot share the VM fd for interrupts ({error}); passed-through devices get no interrupts");
                None
            }
        };
        let router = kvm_irqs.as_ref().and_then(|chip| {
            let limit = u32::try_from(vm.check_extension_int(Cap::IrqRouting))
                .ok()
                .filter(|limit| *limit > resources::gsi::IOAPIC_PINS)
                .unwrap_or(KVM_MAX_IRQ_ROUTES_OLD);
            let kvm: Arc<dyn KvmIrqs> = chip.clone();
            InterruptRouter::new(kvm, limit)
                .map_err(|error| {
                    log::warn!("vfio: {error}; passed-through devices get no interrupts")
                })
                .ok()
                .map(Arc::new)
        });
        Arc::new(Self {
            host: VfioHost::new(backend, HostPaths::default(), kvm_device),
            ram_mapped: Mutex::new(false),
            dma_regions: Mutex::new(Vec::new()),
            kvm_irqs,
            router,
            next_device: Mutex::new(0),
        })
    }

    /// Maps guest RAM into the IOMMU domain, the first time only, and logs
    /// what the step cost (regions, bytes, time, GiB/s).
    /// The figures of the mapping when this call made it, `None` after.
    fn map_ram_once(&self, ram: &GuestRam) -> Result<Option<DmaReport>, PassthroughError> {
        let mut mapped = self.ram_mapped.lock().unwrap_or_else(|e| e.into_inner());
        if !*mapped {
            let start = std::time::Instant::now();
            // SAFETY: the builder keeps guest RAM mapped for the VM's
            // lifetime, and this host lives in the devices' keep-alive list,
            // which is dropped with the VM, before the RAM.
            unsafe { dma_map_ram(&self.host, ram) }?;
            *mapped = true;
            let seconds = start.elapsed().as_secs_f64();
            let regions: Vec<(u64, u64)> = ram
                .memory
                .iter()
                .map(|region| (region.start_addr().raw_value(), region.len()))
                .collect();
            let bytes: u64 = regions.iter().map(|(_, size)| size).sum();
            log::info!(
                "vfio: dma: {} RAM regions, {bytes} bytes mapped for device DMA in {:.3} ms ({:.2} GiB/s)",
                regions.len(),
                seconds * 1000.0,
                bytes as f64 / (1u64 << 30) as f64 / seconds.max(1e-9)
            );
            let report = DmaReport {
                regions: regions.len(),
                bytes,
                ms: seconds * 1000.0,
                gib_per_s: bytes as f64 / (1u64 << 30) as f64 / seconds.max(1e-9),
            };
            self.dma_regions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(regions);
            return Ok(Some(report));
        }
        Ok(None)
    }
}

impl SharedVfioHost {
    /// Maps `bars`' mmap-able areas into the IOMMU domain at IOVA = GPA, so
    /// other devices can DMA into them (peer to peer). With `P2p::Auto` a
    /// refusal (the kernel or IOMMU may not map MMIO) is a warning.
    fn map_bars_for_p2p(
        &self,
        bdf: &str,
        bars: &[MappedBar],
        p2p: P2p,
    ) -> Result<(), PassthroughError> {
        if p2p == P2p::Off {
            return Ok(());
        }
        for area in bars.iter().flat_map(|bar| &bar.areas) {
            // SAFETY: the area is a live mapping of the device's BAR that the
            // builder keeps for the VM's lifetime, and this host (which
            // unmaps it from the IOMMU on drop) is dropped with the devices.
            let mapped = unsafe { self.host.dma_map(area.gpa, area.size, area.hva as *mut u8) };
            match mapped {
                Ok(()) => self
                    .dma_regions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((area.gpa, area.size)),
                Err(error) if p2p == P2p::Auto => {
                    log::warn!(
                        "vfio: {bdf}: peer-to-peer mapping of {:#x}+{:#x} refused ({error}); \
                         other devices cannot DMA into this BAR (p2p=off silences this)",
                        area.gpa,
                        area.size
                    );
                    return Ok(());
                }
                Err(error) => return Err(error.into()),
            }
        }
        Ok(())
    }
}

impl Drop for SharedVfioHost {
    /// Unmaps guest RAM from the IOMMU domain and lets go of the VM fd
    /// duplicate (the devices' interrupts are torn down by then).
    fn drop(&mut self) {
        for (iova, size) in self
            .dma_regions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            if let Err(error) = self.host.dma_unmap(iova, size) {
                log::warn!("vfio: {error}");
            }
        }
        if let Some(chip) = &self.kvm_irqs {
            chip.close();
        }
    }
}

/// A VFIO device opened for `barge run`: the [`PciDeviceSetup`] the builder
/// plans, attaches and reports like any other PCI device.
pub struct VfioSetup {
    passthrough: VfioPassthrough<HostVfioDevice>,
    host: Arc<SharedVfioHost>,
    p2p: P2p,
}

impl VfioSetup {
    /// Opens, resets and probes the device named by `config`.
    pub fn open(config: &VfioConfig, host: &Arc<SharedVfioHost>) -> Result<Self, PassthroughError> {
        let device = host.host.open(&config.bdf)?;
        log::info!(
            "vfio: opened {} ({:?}, IOMMU group {})",
            config.bdf,
            device.backend(),
            device.location().group
        );
        let passthrough =
            VfioPassthrough::new(&config.bdf, Arc::new(device), config.bar_align.cap())?;
        Ok(Self {
            passthrough,
            host: Arc::clone(host),
            p2p: config.p2p,
        })
    }
}

impl PciDeviceSetup for VfioSetup {
    fn name(&self) -> &str {
        self.passthrough.bdf()
    }

    fn kind(&self) -> &'static str {
        "vfio"
    }

    fn plan_input(&self) -> DeviceInput {
        self.passthrough.device_input()
    }

    fn attach(
        self: Box<Self>,
        plan: &DevicePlan,
        ctx: &mut AttachContext<'_>,
    ) -> Result<AttachedDevice, DeviceSetupError> {
        let VfioPassthrough {
            bdf,
            backend,
            probe,
            ..
        } = self.passthrough;
        let mut device =
            VfioPciDevice::new(Arc::clone(&backend), &probe, plan, &[]).map_err(|source| {
                PassthroughError::Plan {
                    bdf: bdf.clone(),
                    source,
                }
            })?;
        let mut keep_alive: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
        if let Some(router) = &self.host.router {
            let id = {
                let mut next = self
                    .host
                    .next_device
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                *next += 1;
                *next
            };
            let pin = probe
                .config
                .get(usize::from(devices::pci::config::INTERRUPT_PIN_OFFSET))
                .copied()
                .unwrap_or(0);
            let intx_gsi = intx_gsi(pin);
            let mut interrupts = VfioInterrupts::new(
                Arc::clone(&backend),
                Arc::clone(router),
                id,
                &probe.config,
                intx_gsi,
            )
            .map_err(|e| -> DeviceSetupError { format!("PCI device {bdf}: {e}").into() })?;
            interrupts.start();
            log::info!(
                "vfio: {bdf}: interrupts: INTx {}, MSI {}, MSI-X {}",
                interrupts
                    .intx_gsi()
                    .map_or("none".to_string(), |gsi| format!("on GSI {gsi}")),
                if interrupts.msi().is_some() {
                    "offered"
                } else {
                    "none"
                },
                interrupts
                    .msix_table()
                    .map_or("none".to_string(), |table| format!(
                        "{} vectors (table and PBA trapped)",
                        table.vector_count()
                    )),
            );
            let interrupts = Arc::new(Mutex::new(interrupts));
            keep_alive.push(Box::new(InterruptTeardown(Arc::clone(&interrupts))));
            device = device.with_interrupts(interrupts);
        }
        let access = device.bar_access();
        let mut traps = Vec::new();
        let mut bars = Vec::new();
        let osrelease = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        for placement in &plan.bars {
            let Some(probed) = probe.bar(placement.index) else {
                continue;
            };
            for trap in &placement.traps {
                let handler: SharedBusDevice = Arc::new(Mutex::new(VfioBarTrap {
                    access: access.clone(),
                    bar: placement.index,
                    base_offset: trap.offset,
                }));
                traps.push(TrapRegion {
                    gpa: placement.gpa + trap.offset,
                    size: trap.size,
                    name: "vfio-bar",
                    device: handler,
                });
            }
            let mut bar = if placement.areas.is_empty() {
                MappedBar::trapped(&bdf, placement)
            } else {
                ctx.map_bar(backend.device_fd(), probed.region.offset, &bdf, placement)?
            };
            if !probed.region.mmap() {
                bar.add_cause("VFIO does not let this region be mmap'ed: every access traps");
            }
            for cause in host_bar_causes(&bdf, placement, Path::new("/sys"))
                .into_iter()
                .chain(kernel_causes(&osrelease))
            {
                bar.add_cause(cause);
            }
            bars.push(bar);
        }
        let dma = self.host.map_ram_once(ctx.ram)?;
        self.host.map_bars_for_p2p(&bdf, &bars, self.p2p)?;
        log::info!(
            "vfio: {bdf}: {} BARs, {} trapped ranges",
            bars.len(),
            traps.len()
        );
        Ok(AttachedDevice {
            config: Box::new(device),
            traps,
            bars,
            keep_alive: {
                keep_alive.push(Box::new(backend));
                keep_alive.push(Box::new(self.host));
                keep_alive
            },
            dma,
        })
    }
}

/// The IOAPIC pin (GSI) of a device's INTx `pin` (1 = INTA#): the DSDT's
/// `_PRT` routes INTA#..INTD# of every slot to GSIs 16..=19.
pub fn intx_gsi(pin: u8) -> u32 {
    arch::layout::PCI_INTX_GSI_BASE + u32::from(pin.saturating_sub(1)) % arch::layout::PCI_INTX_PINS
}

/// Tears a device's interrupts down (VFIO IRQs disabled, irqfds and routes
/// gone) when the VM's devices are dropped, before guest RAM goes.
struct InterruptTeardown(Arc<Mutex<VfioInterrupts<HostVfioDevice>>>);

impl Drop for InterruptTeardown {
    fn drop(&mut self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).shutdown();
    }
}

/// KVM's side of device interrupts ([`KvmIrqs`]) over a duplicate of the
/// VM fd (the device models reach KVM from vCPU threads, long after the
/// builder handed the VM fd to the run loop).
pub struct KvmIrqChip {
    vm: Mutex<Option<VmFd>>,
}

impl KvmIrqChip {
    /// Duplicates `vm`'s fd.
    pub fn new(vm: &VmFd) -> std::io::Result<Self> {
        use std::os::fd::{AsRawFd, IntoRawFd};
        // SAFETY: `vm` owns its open fd for the duration of this borrow.
        let borrowed = unsafe { BorrowedFd::borrow_raw(vm.as_raw_fd()) };
        let owned = borrowed.try_clone_to_owned()?;
        let kvm = crate::machine::kvm::open_kvm().map_err(std::io::Error::other)?;
        // SAFETY: `owned` is a fresh duplicate of a KVM VM fd that nothing
        // else owns; the new VmFd takes it over.
        let vm = unsafe { kvm.create_vmfd_from_rawfd(owned.into_raw_fd()) }
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        Ok(Self {
            vm: Mutex::new(Some(vm)),
        })
    }

    /// Closes the duplicate: later operations fail (logged by the callers).
    pub fn close(&self) {
        self.vm.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    fn with_vm(
        &self,
        op: impl FnOnce(&VmFd) -> Result<(), kvm_ioctls::Error>,
    ) -> std::io::Result<()> {
        let vm = self.vm.lock().unwrap_or_else(|e| e.into_inner());
        let vm = vm
            .as_ref()
            .ok_or_else(|| std::io::Error::other("the VM is gone"))?;
        op(vm).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// `routes` as KVM's routing entries.
pub fn kvm_routing_entries(routes: &[Route]) -> Vec<kvm_irq_routing_entry> {
    routes
        .iter()
        .map(|route| {
            let mut entry = kvm_irq_routing_entry {
                gsi: route.gsi,
                ..Default::default()
            };
            match route.kind {
                RouteKind::Msi { address, data } => {
                    entry.type_ = KVM_IRQ_ROUTING_MSI;
                    entry.u.msi.address_lo = address as u32;
                    entry.u.msi.address_hi = (address >> 32) as u32;
                    entry.u.msi.data = data;
                }
                RouteKind::Irqchip { chip, pin } => {
                    entry.type_ = KVM_IRQ_ROUTING_IRQCHIP;
                    entry.u.irqchip.irqchip = chip;
                    entry.u.irqchip.pin = pin;
                }
            }
            entry
        })
        .collect()
}

impl KvmIrqs for KvmIrqChip {
    fn set_gsi_routing(&self, routes: &[Route]) -> std::io::Result<()> {
        let routing = KvmIrqRouting::from_entries(&kvm_routing_entries(routes))
            .map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        self.with_vm(|vm| vm.set_gsi_routing(&routing))
    }

    fn register_irqfd(
        &self,
        fd: &EventFd,
        gsi: u32,
        resample: Option<&EventFd>,
    ) -> std::io::Result<()> {
        self.with_vm(|vm| match resample {
            Some(resample) => vm.register_irqfd_with_resample(fd, resample, gsi),
            None => vm.register_irqfd(fd, gsi),
        })
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> std::io::Result<()> {
        self.with_vm(|vm| vm.unregister_irqfd(fd, gsi))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::machine::mapping::AlignedMapping;
    use devices::pci::PciConfigAddress;
    use devices::vfio::fake::{pattern_byte, FakeRegion, FakeVfioDevice};
    use devices::vfio::BarRange;
    use std::fs::File;
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::FileExt;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    /// A memfd of `size` bytes standing in for the VFIO device fd (regions
    /// at `index << 40` need a file that large: sparse, costs nothing).
    fn memfd(size: u64) -> File {
        let name = std::ffi::CString::new("barge-vfio-test").unwrap();
        // SAFETY: memfd_create with a valid NUL-terminated name; the result
        // is checked before use.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just created and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).unwrap();
        file
    }

    /// A small device: BAR0 64 KiB 32-bit with MSI-X in its first page,
    /// BAR2 64 MiB 64-bit prefetchable, BAR4 256 bytes (sub-page, trapped).
    /// Its fd is a memfd with `marker` at BAR2's region offset + 1 MiB.
    fn small_device(marker: &[u8]) -> FakeVfioDevice {
        let mut c = vec![0u8; 4096];
        c[0..4].copy_from_slice(&0x1110_1af4u32.to_le_bytes());
        c[0x06] = 0x10;
        c[0x18] = 0x0c;
        c[0x34] = 0x40;
        c[0x40] = 0x11; // MSI-X, 4 entries, table BAR0 +0, PBA BAR0 +0x800
        c[0x42] = 3;
        c[0x48..0x4c].copy_from_slice(&0x800u32.to_le_bytes());
        let fd = memfd(5 << 40);
        fd.write_all_at(marker, (2 << 40) + MIB).unwrap();
        FakeVfioDevice::new(&c)
            .with_region(0, FakeRegion::mmap(64 << 10))
            .with_region(2, FakeRegion::mmap(64 * MIB))
            .with_region(4, FakeRegion::trapped(256))
            .with_fd(fd)
    }

    fn plan_for(input: DeviceInput) -> DevicePlan {
        let ram = resources::ram_regions(GIB).unwrap();
        let windows = resources::Windows::new(&ram, 40).unwrap();
        resources::plan(&[input], &windows).unwrap().devices[0].clone()
    }

    fn attach(
        fake: FakeVfioDevice,
        align_cap: Option<PageSize>,
    ) -> (
        Arc<FakeVfioDevice>,
        AttachedVfio<FakeVfioDevice>,
        Buses,
        Arc<Mutex<PciSegment>>,
    ) {
        let fake = Arc::new(fake);
        let passthrough = VfioPassthrough::new("0000:41:00.0", fake.clone(), align_cap).unwrap();
        let plan = plan_for(passthrough.device_input());
        let mut buses = Buses::default();
        let segment = Arc::new(Mutex::new(PciSegment::with_host_bridge()));
        let attached = passthrough.attach(&plan, &mut buses, &segment).unwrap();
        (fake, attached, buses, segment)
    }

    fn bar(attached: &AttachedVfio<FakeVfioDevice>, index: u8) -> &VfioBarRegion {
        attached
            .bars
            .iter()
            .find(|bar| bar.placement.index == index)
            .unwrap()
    }

    /// What `bar_mapping::map_bar_areas` does for one area, without KVM.
    fn map_area(
        attached: &AttachedVfio<FakeVfioDevice>,
        index: u8,
        area: usize,
    ) -> (AlignedMapping, u64) {
        let bar = bar(attached, index);
        let placement = &bar.placement;
        let area = &placement.areas[area];
        let phase = (placement.hva_phase + area.hva_offset) % placement.hva_modulus;
        let mapping = AlignedMapping::map_shared(
            attached.device_fd(),
            bar.region_offset + area.offset,
            area.size,
            placement.hva_modulus,
            phase,
        )
        .unwrap();
        (mapping, area.gpa)
    }

    #[test]
    fn routes_convert_to_kvm_entries_with_the_legacy_pins_first() {
        let mut routes = resources::gsi::legacy_routes();
        routes.push(Route {
            gsi: 24,
            kind: RouteKind::Msi {
                address: 0x1_fee0_1000,
                data: 0x4041,
            },
        });
        let entries = kvm_routing_entries(&routes);
        assert_eq!(entries.len(), routes.len());
        // GSI 4 (COM1): master PIC pin 4 and IOAPIC pin 4.
        let com1: Vec<_> = entries.iter().filter(|e| e.gsi == 4).collect();
        assert_eq!(com1.len(), 2);
        for entry in &com1 {
            assert_eq!(entry.type_, KVM_IRQ_ROUTING_IRQCHIP);
            // SAFETY: irqchip entries carry the irqchip member.
            let irqchip = unsafe { entry.u.irqchip };
            assert_eq!(irqchip.pin, 4);
        }
        let msi = entries.last().unwrap();
        assert_eq!((msi.gsi, msi.type_), (24, KVM_IRQ_ROUTING_MSI));
        // SAFETY: MSI entries carry the msi member.
        let message = unsafe { msi.u.msi };
        assert_eq!(
            (message.address_lo, message.address_hi, message.data),
            (0xfee0_1000, 1, 0x4041)
        );
        assert!(KvmIrqRouting::from_entries(&entries).is_ok());
    }

    #[test]
    fn intx_pins_map_to_gsis_16_to_19() {
        assert_eq!([1, 2, 3, 4].map(intx_gsi), [16, 17, 18, 19]);
        assert_eq!(intx_gsi(0), 16);
        assert_eq!(intx_gsi(200), 16 + 199 % 4);
    }

    #[test]
    fn attach_traps_the_rest_and_joins_the_segment() {
        let (fake, attached, buses, segment) = attach(small_device(b"BARGE"), None);
        assert_eq!(attached.device_number, 1);
        let bar0 = &bar(&attached, 0).placement;
        let bar2 = bar(&attached, 2);
        let bar4 = &bar(&attached, 4).placement;
        assert_eq!(bar2.region_offset, fake.region_info(2).unwrap().offset);
        assert!(bar2.mmap);
        // BAR0: its first page traps (MSI-X table and PBA), the rest is an area.
        assert_eq!(bar0.areas.len(), 1);
        assert_eq!(bar0.areas[0].offset, 4096);
        assert!(attached.traps.contains(&TrappedRange {
            bar: 0,
            gpa: bar0.gpa,
            size: 4096
        }));
        // BAR4 (256 bytes) is trapped entirely.
        assert!(bar4.trap && bar4.areas.is_empty());
        assert!(attached.traps.contains(&TrappedRange {
            bar: 4,
            gpa: bar4.gpa,
            size: 256
        }));
        // Trapped reads and writes reach the device's regions.
        let mut data = [0u8; 4];
        assert!(buses.mmio.read(bar4.gpa + 0x10, &mut data));
        assert_eq!(data, [0x10, 0x11, 0x12, 0x13].map(|o| pattern_byte(4, o)));
        assert!(buses.mmio.write(bar0.gpa + 0x800, &[1, 2, 3, 4]));
        let last = fake.writes().pop().unwrap();
        assert_eq!(
            (last.region, last.offset, last.data),
            (0, 0x800, vec![1, 2, 3, 4])
        );
        assert!(
            !buses.mmio.read(bar2.placement.gpa, &mut data),
            "mmap-able areas are not on the bus"
        );
        // The guest sees the planned GPAs in config space through the segment.
        let mut value = [0u8; 4];
        segment.lock().unwrap().config_read(
            PciConfigAddress::bus0(attached.device_number, 0x18),
            &mut value,
        );
        assert_eq!(u32::from_le_bytes(value), bar2.placement.gpa as u32 | 0xc);
    }

    #[test]
    fn an_area_mapped_at_its_region_offset_shows_the_region_at_the_planned_phase() {
        let (_fake, attached, _buses, _segment) = attach(small_device(b"BARGE"), None);
        let (mapping, gpa) = map_area(&attached, 2, 0);
        let align = bar(&attached, 2).placement.hva_align;
        assert_eq!(align, 64 * MIB);
        assert_eq!(mapping.addr() % align, gpa % align);
        let mut seen = [0u8; 5];
        // SAFETY: the mapping is live and 64 MiB long; 1 MiB + 5 is inside.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (mapping.addr() + MIB) as *const u8,
                seen.as_mut_ptr(),
                5,
            );
        }
        assert_eq!(&seen, b"BARGE");
    }

    #[test]
    fn bar_align_caps_move_the_hva_phase() {
        let (_fake, attached, _buses, _segment) = attach(small_device(b""), Some(PageSize::Size4K));
        let (mapping, gpa) = map_area(&attached, 2, 0);
        assert_eq!(
            bar(&attached, 2).placement.areas[0].page_size,
            PageSize::Size4K
        );
        assert_eq!(mapping.addr() % 4096, 0);
        assert_ne!(
            mapping.addr() % (2 * MIB),
            gpa % (2 * MIB),
            "off the 2 MiB phase"
        );
    }

    #[test]
    fn sparse_areas_map_separately_and_holes_trap() {
        let fake = small_device(b"").with_region(
            2,
            FakeRegion::mmap(64 * MIB).sparse(vec![
                BarRange::new(0, 16 * MIB),
                BarRange::new(32 * MIB, 32 * MIB),
            ]),
        );
        let (_fake, attached, _buses, _segment) = attach(fake, None);
        let placement = &bar(&attached, 2).placement;
        let areas: Vec<_> = placement.areas.iter().map(|a| (a.offset, a.size)).collect();
        assert_eq!(areas, [(0, 16 * MIB), (32 * MIB, 32 * MIB)]);
        assert!(attached.traps.contains(&TrappedRange {
            bar: 2,
            gpa: placement.gpa + 16 * MIB,
            size: 16 * MIB
        }));
        for index in 0..2 {
            let (mapping, gpa) = map_area(&attached, 2, index);
            assert_eq!(mapping.addr() % (2 * MIB), gpa % (2 * MIB));
        }
    }

    #[test]
    fn a_region_that_cannot_be_mmapped_is_all_trapped_and_says_so() {
        let fake = small_device(b"").with_region(2, FakeRegion::trapped(64 * MIB));
        let (_fake, attached, buses, _segment) = attach(fake, None);
        let region = bar(&attached, 2);
        assert!(!region.mmap);
        assert!(region.placement.areas.is_empty());
        let mut data = [0u8; 8];
        assert!(buses.mmio.read(region.placement.gpa + 32 * MIB, &mut data));
        let causes = attached.shortfall_causes(2);
        assert!(causes[0].contains("mmap"), "{causes:?}");
    }

    #[test]
    fn a_plan_for_another_device_is_refused_and_nothing_joins_the_segment() {
        let fake = Arc::new(small_device(b""));
        let passthrough = VfioPassthrough::new("0000:41:00.0", fake, None).unwrap();
        let mut plan = plan_for(passthrough.device_input());
        plan.bars[0].size *= 2;
        let mut buses = Buses::default();
        let segment = Arc::new(Mutex::new(PciSegment::with_host_bridge()));
        let error = passthrough
            .attach(&plan, &mut buses, &segment)
            .unwrap_err()
            .to_string();
        assert!(error.contains("0000:41:00.0"), "{error}");
        assert_eq!(segment.lock().unwrap().device_numbers(), [0]);
        assert!(buses.mmio.is_empty());
    }

    #[test]
    fn probe_errors_name_the_device() {
        let fake = Arc::new(FakeVfioDevice::new(&[0xff; 64]));
        let error = VfioPassthrough::new("0000:41:00.0", fake, None)
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("PCI device 0000:41:00.0:"), "{error}");
    }

    #[test]
    fn kernels_before_6_12_lack_huge_pfnmap() {
        assert_eq!(kernel_causes("6.12.0-1-amd64\n"), Vec::<String>::new());
        assert_eq!(kernel_causes("7.0.1"), Vec::<String>::new());
        assert!(kernel_causes("6.1.0-28-amd64")[0].contains("6.1.0-28-amd64"));
        assert!(kernel_causes("5.15.0")[0].contains("huge pfnmap"));
        assert_eq!(kernel_causes(""), Vec::<String>::new());
    }

    #[test]
    fn a_misaligned_host_resource_is_a_cause() {
        let root = std::env::temp_dir().join(format!("barge-vfio-glue-{}", std::process::id()));
        let dir = root.join("bus/pci/devices/0000:41:00.0");
        std::fs::create_dir_all(&dir).unwrap();
        // BAR2 at 0x3800_0020_0000: 2 MiB aligned only.
        let resource = "\
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000380000200000 0x00003800401fffff 0x000000000014220c
";
        std::fs::write(dir.join("resource"), resource).unwrap();
        let (_fake, attached, _buses, _segment) = attach(small_device(b""), None);
        let mut placement = bar(&attached, 2).placement.clone();
        placement.page_size = Some(PageSize::Size1G);
        let causes = host_bar_causes("0000:41:00.0", &placement, &root);
        assert_eq!(causes.len(), 1);
        assert!(causes[0].contains("0x380000200000"), "{causes:?}");
        placement.page_size = Some(PageSize::Size2M);
        assert!(host_bar_causes("0000:41:00.0", &placement, &root).is_empty());
        assert!(host_bar_causes("0000:42:00.0", &placement, &root).is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
