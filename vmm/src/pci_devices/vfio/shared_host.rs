//! The VFIO host every passed-through device of one VM shares: one IOMMU
//! domain (container or IOAS) with guest RAM mapped into it once, and the
//! VM's GSI router for the devices' interrupts.

use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use devices::interrupts::{InterruptError, InterruptRouter};
use devices::pci::config::INTERRUPT_PIN_OFFSET;
use devices::vfio::device::SharedInterrupts;
use devices::vfio::host::{VfioHost, VfioHostAccess};
use devices::vfio::interrupts::VfioInterrupts;
use devices::vfio::preflight::HostPaths;
use kvm_bindings::{kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO};
use kvm_ioctls::VmFd;
use vfio_ioctls::VfioDeviceFd;

use crate::config::devices::VfioBackendKind;
use crate::machine::memory::GuestRam;
use crate::pci_devices::vfio::dma::{DmaError, RamDma};
use crate::pci_devices::vfio::intx_gsi;
use crate::progress::ProgressOutput;
use crate::report::DmaReport;

/// The VM's real VFIO host: one of `kind`, registered with KVM's VFIO
/// device when KVM has one, with interrupts through the VM's `router`.
pub fn shared_host(
    vm: &Arc<VmFd>,
    kind: VfioBackendKind,
    router: Option<Arc<InterruptRouter>>,
) -> Arc<SharedVfioHost<VfioHost>> {
    let domain = VfioHost::new(kind, HostPaths::default(), create_kvm_vfio_device(vm));
    SharedVfioHost::new(domain, router)
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

/// The VFIO host shared by every passed-through device of one VM (see the
/// module docs). Each device holds it; the domain is released with the
/// last one.
pub struct SharedVfioHost<H: VfioHostAccess = VfioHost> {
    domain: Arc<H>,
    /// Guest RAM's mapping in the domain, while a device holds it.
    ram_dma: Mutex<Weak<RamDma<H>>>,
    router: Option<Arc<InterruptRouter>>,
}

impl<H: VfioHostAccess> SharedVfioHost<H> {
    /// Devices of `domain`, with interrupts routed through the VM's
    /// `router`; without, the devices get no interrupts.
    pub fn new(domain: H, router: Option<Arc<InterruptRouter>>) -> Arc<Self> {
        Arc::new(Self {
            domain: Arc::new(domain),
            ram_dma: Mutex::new(Weak::new()),
            router,
        })
    }

    /// The VFIO host: opens devices, maps memory for their DMA.
    pub fn domain(&self) -> &Arc<H> {
        &self.domain
    }

    /// Guest RAM's mapping in the domain (IOVA = GPA): the first call maps
    /// it and logs what that cost, later calls share it. The report comes
    /// with the call that mapped it.
    pub fn map_ram(
        &self,
        ram: &GuestRam,
        progress: ProgressOutput,
    ) -> Result<(Arc<RamDma<H>>, Option<DmaReport>), DmaError> {
        let mut shared = self.ram_dma.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(dma) = shared.upgrade() {
            return Ok((dma, None));
        }
        let start = Instant::now();
        let dma = Arc::new(RamDma::map(&self.domain, ram, progress)?);
        let seconds = start.elapsed().as_secs_f64();
        let regions = dma.regions();
        let bytes: u64 = regions.iter().map(|(_, size)| size).sum();
        let gib_per_s = bytes as f64 / (1u64 << 30) as f64 / seconds.max(1e-9);
        log::info!(
            "vfio: dma: {} RAM regions, {bytes} bytes mapped for device DMA ({}) in {:.3} ms ({gib_per_s:.2} GiB/s)",
            regions.len(),
            dma.methods(),
            seconds * 1000.0,
        );
        let report = DmaReport {
            method: dma.methods().to_string(),
            regions: regions.len(),
            bytes,
            ms: seconds * 1000.0,
            gib_per_s,
        };
        *shared = Arc::downgrade(&dma);
        Ok((dma, Some(report)))
    }

    /// The interrupts of `device` (config space `config`), started: INTx
    /// enabled on the GSI of its pin. `None` when the VM has no router.
    pub fn interrupts(
        &self,
        bdf: &str,
        device: &Arc<H::Device>,
        config: &[u8],
        requester_id: u32,
    ) -> Result<Option<SharedInterrupts<H::Device>>, InterruptError> {
        let Some(router) = &self.router else {
            return Ok(None);
        };
        let id = router.new_device_id();
        router.set_requester_id(id, requester_id);
        let pin = config
            .get(usize::from(INTERRUPT_PIN_OFFSET))
            .copied()
            .unwrap_or(0);
        let mut interrupts = VfioInterrupts::new(
            Arc::clone(device),
            Arc::clone(router),
            id,
            config,
            intx_gsi(pin),
        )?;
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
        Ok(Some(Arc::new(Mutex::new(interrupts))))
    }
}
