//! VFIO passthrough in the VM: the [`PciDeviceSetup`] of `--device
//! vfio=...`, glue between the config ([`VfioConfig`]), the device model
//! (`devices::vfio`), the placement plan, KVM and the buses.
//!
//! # How a device gets into the VM
//!
//! 1. **Open** (`open::open_devices`, before any guest memory exists). The
//!    first VFIO device creates the VM's [`SharedVfioHost`] with
//!    [`shared_host()`]: KVM's VFIO pseudo-device (`KVM_DEV_TYPE_VFIO`, so
//!    KVM knows devices are assigned), the VFIO host of the configured
//!    [`VfioBackendKind`] (one container, or one iommufd IOAS, for every
//!    device of the VM) and the GSI router over the shared VM fd
//!    ([`crate::pci_devices::irqchip::KvmIrqChip`]). [`VfioSetup::open`] opens and resets each device
//!    through it and probes it (region info, config space). Errors say what
//!    to do (bind to vfio-pci, group not viable, no IOMMU, in use, ...).
//! 2. **Plan**: the plan input is the probe's BARs with their mmap-able
//!    areas; the MSI-X table and PBA pages, sub-page BARs and the holes
//!    between sparse areas trap.
//! 3. **Attach** ([`PciDeviceSetup::attach`]):
//!    - the configuration space model (`VfioPciDevice`) with the BARs at
//!      their planned GPAs, and its interrupts when the VM has a router:
//!      INTx on GSI [`intx_gsi`] of its pin from the start, MSI and MSI-X
//!      routed as the guest enables them;
//!    - an eventfd at VFIO's device request ([`REQ_IRQ_INDEX`]) when the
//!      device has one: the event loop stops the VM when the host asks for
//!      the device back (an unbind from vfio-pci), and the teardown's first
//!      step disables it and closes the eventfd;
//!    - a [`TrapRegion`] for each trapped range of each BAR, served by VFIO
//!      region reads and writes (the MSI-X table and PBA by the interrupt
//!      model);
//!    - each mmap-able area mapped over the device fd at its region's
//!      offset and given one memslot ([`AttachContext::map_bar`]), with the
//!      likely causes of a shortfall known from VFIO and the host (region
//!      not mmap-able, host resource misaligned, kernel without huge
//!      pfnmap) added to the BAR;
//!    - guest RAM mapped into the shared IOMMU domain at IOVA = GPA by the
//!      first device attached (its figures are the report's `dma`);
//!    - with `p2p` on or auto, the device's BAR areas mapped into the
//!      domain at IOVA = GPA, so that other devices can DMA into them: the
//!      container maps the BAR's mmap, an IOAS a dma-buf vfio-pci exports
//!      for each area (Linux 6.19+; iommufd cannot pin PFNMAP memory). A BAR
//!      is mapped whole or not at all; with auto a refusal is a warning on
//!      the BAR (the report's `warning`, `p2p` null), with on an error.
//!
//!    All of it ends up in the device's [`DeviceResources`]; dropping them
//!    tears the device down in the order `pci_devices::teardown` gives
//!    (VFIO's part is [`teardown`]).
//!
//! Guest BAR writes and decode toggles never change a memslot: the PCI
//! segment only logs them (`pci::log_event`). I/O BARs are not exposed yet
//! (the host bridge declares no I/O window); they read as unimplemented.
//!
//! The host side is behind [`VfioHostAccess`] (`devices::vfio::host::VfioHost`;
//! `FakeVfioHost` in tests) and KVM's interrupt side behind `KvmIrqs`, so
//! the whole path runs in unit tests. Only [`dma`], the thin module that
//! hands memory to the IOMMU, has `unsafe` code (besides the [`crate::pci_devices::irqchip`]'s
//! tests, which read KVM's routing union).

pub mod background;
pub mod dma;
pub mod shared_host;
pub mod teardown;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::interrupts::InterruptError;
use devices::vfio::dma_method::DmaMethods;
use devices::vfio::host::{HostError, VfioHost, VfioHostAccess};
use devices::vfio::{
    ProbeError, ProbedBar, VfioBarAccess, VfioDeviceAccess, VfioDeviceError, VfioPciDevice,
    VfioProbe, REQ_IRQ_INDEX,
};
use resources::placement::{BarPlacement, DeviceInput, DevicePlan, PageSize};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::buses::bus::{BusDevice, SharedBusDevice};
#[cfg(doc)]
use crate::config::devices::VfioBackendKind;
use crate::config::devices::{P2p, VfioConfig};
use crate::machine::mapping::AlignedMapping;
use crate::pci_devices::bar_mapping::{MappedArea, MappedBar, P2pSlot};
use crate::pci_devices::setup::{
    AttachContext, AttachedDevice, DeviceSetupError, PciDeviceSetup, TrapRegion,
};
use crate::pci_devices::teardown::DeviceResources;
use crate::report::{DmaReport, P2pReport};

use background::{BackgroundP2p, P2pJob};
pub use dma::{BarDma, DmaError, RamDma};
pub use shared_host::{create_kvm_vfio_device, shared_host, SharedVfioHost};
use teardown::VfioTeardown;

/// Where the host kernel's release is read from.
const OSRELEASE_PATH: &str = "/proc/sys/kernel/osrelease";

/// Why a VFIO device cannot be put in the VM.
#[derive(Debug, thiserror::Error)]
pub enum PassthroughError {
    /// Opening the host device failed.
    #[error(transparent)]
    Host(#[from] HostError),
    /// The device's config space or regions are unusable.
    #[error("PCI device {bdf}: {source}")]
    Probe { bdf: String, source: ProbeError },
    /// The plan does not fit the device.
    #[error("PCI device {bdf}: {source}")]
    Plan {
        bdf: String,
        source: VfioDeviceError,
    },
    /// The device's interrupts cannot be set up.
    #[error("PCI device {bdf}: {source}")]
    Interrupts { bdf: String, source: InterruptError },
    /// Memory cannot be mapped for the devices' DMA.
    #[error(transparent)]
    Dma(#[from] DmaError),
    /// The thread for `p2p=background` cannot be started.
    #[error(
        "PCI device {bdf}: cannot start the thread that maps its BARs for peer-to-peer DMA \
         (p2p=background): {source}; use p2p=auto to map them before the guest runs"
    )]
    P2pThread { bdf: String, source: std::io::Error },
}

/// What the host says about a device's BARs beyond VFIO: the sysfs tree
/// with the host resources, and the kernel release.
#[derive(Debug, Clone)]
struct HostFacts {
    sysfs_root: PathBuf,
    kernel_release: String,
}

impl HostFacts {
    /// Likely causes, known from VFIO and the host, of `placement` getting
    /// smaller pages than planned (for [`MappedBar::add_cause`]).
    fn shortfall_causes(
        &self,
        bdf: &str,
        placement: &BarPlacement,
        probed: &ProbedBar,
    ) -> Vec<String> {
        let mut causes = Vec::new();
        if !probed.region.mmap() {
            causes.push("VFIO does not let this region be mmap'ed: every access traps".to_string());
        }
        causes.extend(host_bar_causes(bdf, placement, &self.sysfs_root));
        causes.extend(kernel_causes(&self.kernel_release));
        causes
    }
}

/// A VFIO device opened for `barge run`: the [`PciDeviceSetup`] the builder
/// plans, attaches and reports like any other PCI device. `H` is the VFIO
/// host (the real one, or a fake in tests).
pub struct VfioSetup<H: VfioHostAccess = VfioHost> {
    bdf: String,
    device: Arc<H::Device>,
    probe: VfioProbe,
    align_cap: Option<PageSize>,
    p2p: P2p,
    host: Arc<SharedVfioHost<H>>,
    facts: HostFacts,
}

impl<H: VfioHostAccess> VfioSetup<H> {
    /// Opens, resets and probes the device named by `config` through `host`;
    /// `sysfs_root` (`/sys`) has the host's view of its BARs.
    pub fn open(
        config: &VfioConfig,
        host: &Arc<SharedVfioHost<H>>,
        sysfs_root: &Path,
    ) -> Result<Self, PassthroughError> {
        let device = host.domain().open(&config.bdf)?;
        let probe = VfioProbe::read(&device).map_err(|source| PassthroughError::Probe {
            bdf: config.bdf.clone(),
            source,
        })?;
        Ok(Self {
            bdf: config.bdf.clone(),
            device: Arc::new(device),
            probe,
            align_cap: config.bar_align.cap(),
            p2p: config.p2p,
            host: Arc::clone(host),
            facts: HostFacts {
                sysfs_root: sysfs_root.to_path_buf(),
                kernel_release: std::fs::read_to_string(OSRELEASE_PATH).unwrap_or_default(),
            },
        })
    }

    /// Takes `release` as the host kernel's release (`/proc/sys/kernel/osrelease`
    /// otherwise), for the shortfall causes.
    pub fn with_kernel_release(mut self, release: &str) -> Self {
        self.facts.kernel_release = release.to_string();
        self
    }

    /// The opened host device.
    pub fn device(&self) -> &Arc<H::Device> {
        &self.device
    }
}

impl<H: VfioHostAccess + 'static> PciDeviceSetup for VfioSetup<H> {
    fn name(&self) -> &str {
        &self.bdf
    }

    fn kind(&self) -> &'static str {
        "vfio"
    }

    fn plan_input(&self) -> DeviceInput {
        self.probe.device_input(&self.bdf, self.align_cap)
    }

    fn attach(
        self: Box<Self>,
        plan: &DevicePlan,
        ctx: &mut AttachContext<'_>,
    ) -> Result<AttachedDevice, DeviceSetupError> {
        let VfioSetup {
            bdf,
            device,
            probe,
            p2p,
            host,
            facts,
            ..
        } = *self;
        let mut model =
            VfioPciDevice::new(Arc::clone(&device), &probe, plan, &[]).map_err(|source| {
                PassthroughError::Plan {
                    bdf: bdf.clone(),
                    source,
                }
            })?;
        let interrupts = host
            .interrupts(&bdf, &device, &probe.config, ctx.requester_id)
            .map_err(|source| PassthroughError::Interrupts {
                bdf: bdf.clone(),
                source,
            })?;
        if let Some(interrupts) = &interrupts {
            model = model.with_interrupts(Arc::clone(interrupts));
        }
        let traps = trap_regions(&model.bar_access(), plan);
        let release_request = listen_for_release_request(&bdf, &*device);
        let mut parts = VfioTeardown {
            bdf: bdf.clone(),
            device,
            interrupts,
            release_request,
            ram_dma: None,
            bar_dma: Vec::new(),
            background_p2p: None,
            host,
        };
        let mut bars = Vec::new();
        let mapped = map_bars_and_dma(&mut parts, &mut bars, &probe, plan, ctx, p2p, &facts);
        let trap_count = traps.len();
        let backend = parts.host.domain().backend_of(&parts.device).name();
        let mut attached = AttachedDevice {
            config: Box::new(model),
            traps,
            dma: None,
            vfio_backend: Some(backend),
            virtio: None,
            resources: DeviceResources::new(
                Arc::clone(ctx.vm),
                ctx.memslots.clone(),
                bars,
                Box::new(parts),
            ),
        };
        // On an error `attached` goes, models first, then the resources in
        // their teardown order.
        attached.dma = mapped?;
        log::info!(
            "vfio: {bdf}: {} BARs, {trap_count} trapped ranges",
            attached.resources.bars().len(),
        );
        Ok(attached)
    }
}

/// Has VFIO signal a new eventfd when the host asks for `device` back
/// (VFIO's device request, [`REQ_IRQ_INDEX`]: vfio-pci raises it when the
/// device is unbound and waits for barge to close it). `None`, with the
/// reason logged, when the device has no such IRQ or it cannot be enabled:
/// the VM runs, and an unbind then waits until barge exits.
fn listen_for_release_request<D: VfioDeviceAccess>(bdf: &str, device: &D) -> Option<EventFd> {
    if device.irq_count(REQ_IRQ_INDEX) == 0 {
        log::info!(
            "vfio: {bdf}: no device request IRQ (VFIO IRQ index {REQ_IRQ_INDEX}): barge will not \
             hear the host ask for the device back; an unbind waits until barge exits"
        );
        return None;
    }
    let enabled = EventFd::new(EFD_NONBLOCK).and_then(|request| {
        device.irq_enable(REQ_IRQ_INDEX, &[&request])?;
        Ok(request)
    });
    match enabled {
        Ok(request) => {
            log::debug!("vfio: {bdf}: listening for the host's device request");
            Some(request)
        }
        Err(error) => {
            log::warn!(
                "vfio: {bdf}: cannot listen for the host's device request (VFIO IRQ index \
                 {REQ_IRQ_INDEX}): {error}; an unbind of the device waits until barge exits"
            );
            None
        }
    }
}

/// A [`TrapRegion`] for every trapped range of every BAR in `plan`, served
/// through `access`.
fn trap_regions<D: VfioDeviceAccess + 'static>(
    access: &VfioBarAccess<D>,
    plan: &DevicePlan,
) -> Vec<TrapRegion> {
    let mut traps = Vec::new();
    for placement in &plan.bars {
        for trap in &placement.traps() {
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
    }
    traps
}

/// Maps every BAR of `plan` (into `bars`), guest RAM and, with `p2p`, the
/// BARs into the IOMMU domain (into `parts`); the report of the RAM mapping
/// when this device made it. Whatever it did before an error stays in
/// `parts` and `bars` for the teardown.
fn map_bars_and_dma<H: VfioHostAccess + 'static>(
    parts: &mut VfioTeardown<H>,
    bars: &mut Vec<MappedBar>,
    probe: &VfioProbe,
    plan: &DevicePlan,
    ctx: &mut AttachContext<'_>,
    p2p: P2p,
    facts: &HostFacts,
) -> Result<Option<DmaReport>, DeviceSetupError> {
    let bdf = parts.bdf.clone();
    for placement in &plan.bars {
        let Some(probed) = probe.bar(placement.index) else {
            continue;
        };
        let mut bar = if placement.areas.is_empty() {
            MappedBar::trapped(&bdf, placement)
        } else {
            let mut bar = ctx.map_bar(
                parts.device.device_fd(),
                probed.region.offset,
                &bdf,
                placement,
            )?;
            if ctx.count_host_faults {
                bar.watch_host_faults();
            }
            bar
        };
        for cause in facts.shortfall_causes(&bdf, placement, probed) {
            bar.add_cause(cause);
        }
        bars.push(bar);
    }
    let (ram_dma, report) = parts.host.map_ram(ctx.ram, ctx.progress)?;
    parts.ram_dma = Some(ram_dma);
    if p2p == P2p::Off {
        return Ok(report);
    }
    let domain = Arc::clone(parts.host.domain());
    if p2p == P2p::Background {
        let mut jobs = Vec::new();
        for bar in bars.iter_mut() {
            let Some(mapping) = bar.mapping.clone().filter(|_| !bar.areas.is_empty()) else {
                continue;
            };
            let slot = P2pSlot::default();
            bar.p2p_pending = Some(Arc::clone(&slot));
            jobs.push(P2pJob {
                bar: bar.placement.index,
                mapping,
                areas: bar.areas.clone(),
                slot,
            });
        }
        if !jobs.is_empty() {
            let background = BackgroundP2p::spawn(
                &bdf,
                domain,
                Arc::clone(&parts.device),
                jobs,
                ctx.thread_init.clone(),
            )
            .map_err(|source| PassthroughError::P2pThread {
                bdf: bdf.clone(),
                source,
            })?;
            parts.background_p2p = Some(background);
        }
        return Ok(report);
    }
    for bar in bars.iter_mut() {
        let Some(mapping) = bar.mapping.clone().filter(|_| !bar.areas.is_empty()) else {
            continue;
        };
        match map_bar_for_p2p(
            &domain,
            &parts.device,
            bar.placement.index,
            &mapping,
            &bar.areas,
        ) {
            Ok((mapped, p2p_report)) => {
                log::info!(
                    "vfio: {bdf}: BAR {} mapped for peer-to-peer DMA ({}): {} bytes in {:.3} ms",
                    bar.placement.index,
                    p2p_report.method,
                    p2p_report.bytes,
                    p2p_report.ms
                );
                bar.p2p = Some(p2p_report);
                parts.bar_dma.extend(mapped);
            }
            Err(error) if p2p == P2p::Auto => {
                let hint = match &error {
                    DmaError::Host(HostError::P2pUnsupported { .. }) => "",
                    _ => " (p2p=off silences this)",
                };
                let warning = format!(
                    "{}{hint}",
                    p2p_refused_warning(&bdf, bar.placement.index, &error)
                );
                eprintln!("barge: warning: {warning}");
                bar.p2p_warning = Some(warning);
            }
            Err(error) => return Err(PassthroughError::from(error).into()),
        }
    }
    Ok(report)
}

/// The warning for BAR `bar` of device `bdf` that the host would not map
/// for peer-to-peer DMA (`error`).
pub(crate) fn p2p_refused_warning(bdf: &str, bar: u8, error: &DmaError) -> String {
    format!(
        "BAR {bar} of {bdf} is not mapped for peer-to-peer DMA, other devices cannot DMA into \
         it: {error}"
    )
}

/// Maps every area of BAR `bar` of `device` (inside `mapping`) into
/// `domain` for peer-to-peer DMA: the maps and their report. A BAR is
/// mapped whole or not at all: on an error the areas mapped so far are
/// unmapped again.
pub(crate) fn map_bar_for_p2p<H: VfioHostAccess>(
    domain: &Arc<H>,
    device: &H::Device,
    bar: u8,
    mapping: &Arc<AlignedMapping>,
    areas: &[MappedArea],
) -> Result<(Vec<BarDma<H>>, P2pReport), DmaError> {
    let start = Instant::now();
    let mut mapped = Vec::with_capacity(areas.len());
    for area in areas {
        mapped.push(BarDma::map(domain, device, bar, mapping, area)?);
    }
    let mut method = DmaMethods::default();
    for dma in &mapped {
        method.merge(dma.methods());
    }
    let report = P2pReport {
        method: method.to_string(),
        bytes: mapped.iter().map(BarDma::size).sum(),
        ms: start.elapsed().as_secs_f64() * 1000.0,
        ready_after_first_run_ms: None,
    };
    Ok((mapped, report))
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
    let Some(planned) = placement.page_size() else {
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

/// The IOAPIC pin (GSI) of a device's INTx `pin` (1 = INTA#): the DSDT's
/// `_PRT` routes INTA#..INTD# of every slot to GSIs 16..=19.
pub fn intx_gsi(pin: u8) -> u32 {
    crate::platform::PCI_INTX_GSI_BASE
        + u32::from(pin.saturating_sub(1)) % crate::platform::PCI_INTX_PINS
}

/// A trapped BAR range on the MMIO bus.
struct VfioBarTrap<D: VfioDeviceAccess> {
    access: VfioBarAccess<D>,
    bar: u8,
    /// Offset of the range's start inside the BAR.
    base_offset: u64,
}

impl<D: VfioDeviceAccess> BusDevice for VfioBarTrap<D> {
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
