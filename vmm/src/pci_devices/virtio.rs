//! virtio devices (`--disk`, `--net`) in the VM: a [`VirtioSetup`] plans
//! the transport's one 32 KiB BAR, builds the
//! [`devices::virtio::pci::VirtioPciDevice`] over guest RAM at attach, and
//! registers one KVM ioeventfd per queue on the queue's notify address, so
//! that a guest's kick reaches the device's worker thread without an exit
//! to barge. The rest of the BAR (common and device configuration, ISR,
//! MSI-X table and PBA) is trapped on the MMIO bus.
//!
//! The device model's worker thread was started when the device was opened
//! (before the guest runs); it goes when the model does, with the buses.
//! The ioeventfds go in teardown's close step.

use std::sync::{Arc, Mutex, MutexGuard};

use devices::interrupts::InterruptRouter;
use devices::pci::{ConfigEvent, PciConfigAccess};
use devices::virtio::pci::{VirtioPciDevice, VIRTIO_BAR, VIRTIO_BAR_SIZE};
use devices::virtio::{DeviceCounters, VirtioDevice};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use resources::placement::{BarInput, BarWidth, DeviceInput, DevicePlan};
use vmm_sys_util::eventfd::EventFd;

use crate::buses::bus::BusDevice;
use crate::pci_devices::bar_mapping::MappedBar;
use crate::pci_devices::setup::{
    AttachContext, AttachedDevice, DeviceSetupError, PciDeviceSetup, TrapRegion,
};
use crate::pci_devices::teardown::{DeviceResources, HostResources};

/// Why a virtio device cannot be attached.
#[derive(Debug, thiserror::Error)]
pub enum VirtioSetupError {
    /// The VM has no interrupt router (KVM's GSI limit was unusable).
    #[error(
        "{0}: virtio devices need MSI-X, and this VM has no GSI router (see the warning above)"
    )]
    NoRouter(String),
    /// The plan lacks the BAR (a barge bug).
    #[error("{0}: the plan has no BAR 0; please report this as a barge bug")]
    NotPlanned(String),
    /// The transport could not be built.
    #[error("{name}: {source}")]
    Transport {
        name: String,
        source: devices::virtio::pci::VirtioPciError,
    },
    /// KVM refused an ioeventfd.
    #[error("{name}: KVM_IOEVENTFD for queue {queue} at {address:#x} failed: {source}")]
    IoEventFd {
        name: String,
        queue: usize,
        address: u64,
        source: kvm_ioctls::Error,
    },
}

/// A virtio device opened on the host (its image or tap, its worker
/// thread), waiting for its plan.
pub struct VirtioSetup {
    name: String,
    device: Box<dyn VirtioDevice>,
    router: Option<Arc<InterruptRouter>>,
}

impl VirtioSetup {
    /// `device`, named `name` (`virtio-blk0`, ...), with interrupts through
    /// the VM's `router`.
    pub fn new(
        name: String,
        device: Box<dyn VirtioDevice>,
        router: Option<Arc<InterruptRouter>>,
    ) -> Self {
        Self {
            name,
            device,
            router,
        }
    }
}

/// The planner input of a virtio device: BAR 0, 32-bit, trapped.
pub fn plan_input(name: &str) -> DeviceInput {
    DeviceInput {
        name: name.to_string(),
        bars: vec![BarInput::new(
            VIRTIO_BAR,
            VIRTIO_BAR_SIZE,
            BarWidth::Bits32,
            false,
        )],
        align_cap: None,
    }
}

/// The transport, shared by its configuration space (on the PCI segment)
/// and its BAR (on the MMIO bus).
#[derive(Clone)]
struct SharedTransport(Arc<Mutex<VirtioPciDevice>>);

impl SharedTransport {
    fn lock(&self) -> MutexGuard<'_, VirtioPciDevice> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl PciConfigAccess for SharedTransport {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.lock().config_read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<ConfigEvent> {
        self.lock().config_write(offset, data)
    }
}

impl BusDevice for SharedTransport {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        self.lock().bar_read(offset, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        self.lock().bar_write(offset, data);
    }
}

impl PciDeviceSetup for VirtioSetup {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &'static str {
        self.device.device_type().kind()
    }

    fn plan_input(&self) -> DeviceInput {
        plan_input(&self.name)
    }

    fn attach(
        self: Box<Self>,
        plan: &DevicePlan,
        ctx: &mut AttachContext<'_>,
    ) -> Result<AttachedDevice, DeviceSetupError> {
        let VirtioSetup {
            name,
            device,
            router,
        } = *self;
        let placement = plan
            .bars
            .iter()
            .find(|b| b.index == VIRTIO_BAR)
            .ok_or_else(|| VirtioSetupError::NotPlanned(name.clone()))?;
        let router = router.ok_or_else(|| VirtioSetupError::NoRouter(name.clone()))?;
        let router_id = router.new_device_id();
        router.set_requester_id(router_id, ctx.requester_id);
        let counters = device.counters();
        let transport = VirtioPciDevice::new(
            &name,
            device,
            placement.gpa,
            ctx.ram.memory.clone(),
            router,
            router_id,
        )
        .map_err(|source| VirtioSetupError::Transport {
            name: name.clone(),
            source,
        })?;
        let mut ioevents = IoEvents {
            vm: Arc::clone(ctx.vm),
            registered: Vec::new(),
        };
        for (queue, (offset, kick)) in transport.kicks().into_iter().enumerate() {
            let address = placement.gpa + offset;
            ctx.vm
                .register_ioevent(&kick, &IoEventAddress::Mmio(address), NoDatamatch)
                .map_err(|source| VirtioSetupError::IoEventFd {
                    name: name.clone(),
                    queue,
                    address,
                    source,
                })?;
            ioevents.registered.push((address, kick));
        }
        log::info!(
            "{name}: BAR 0 at {:#x}, {} queue notifications on ioeventfds",
            placement.gpa,
            ioevents.registered.len()
        );
        let shared = SharedTransport(Arc::new(Mutex::new(transport)));
        Ok(AttachedDevice {
            config: Box::new(shared.clone()),
            traps: vec![TrapRegion {
                gpa: placement.gpa,
                size: VIRTIO_BAR_SIZE,
                name: "virtio",
                device: Arc::new(Mutex::new(shared)),
            }],
            dma: None,
            vfio_backend: None,
            virtio: Some(counters),
            resources: DeviceResources::new(
                Arc::clone(ctx.vm),
                ctx.memslots.clone(),
                vec![MappedBar::trapped(&name, placement)],
                Box::new(ioevents),
            ),
        })
    }
}

/// The ioeventfds of a device's queues, deassigned at close.
struct IoEvents {
    vm: Arc<VmFd>,
    registered: Vec<(u64, Arc<EventFd>)>,
}

impl HostResources for IoEvents {
    fn close(self: Box<Self>) {
        for (address, kick) in &self.registered {
            if let Err(error) =
                self.vm
                    .unregister_ioevent(kick, &IoEventAddress::Mmio(*address), NoDatamatch)
            {
                log::warn!("virtio: KVM_IOEVENTFD deassign at {address:#x}: {error}");
            }
        }
    }
}

/// The report's numbers for one device.
pub fn counters_report(counters: &DeviceCounters) -> crate::report::VirtioReport {
    let snapshot = counters.snapshot();
    crate::report::VirtioReport {
        requests: snapshot.requests,
        errors: snapshot.errors,
        bytes_from_guest: snapshot.bytes_from_guest,
        bytes_to_guest: snapshot.bytes_to_guest,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_input_is_one_trapped_32bit_bar() {
        let input = plan_input("virtio-blk0");
        assert_eq!(input.name, "virtio-blk0");
        assert_eq!(input.bars.len(), 1);
        assert_eq!((input.bars[0].index, input.bars[0].size), (0, 0x8000));
        assert_eq!(input.bars[0].width, BarWidth::Bits32);
        assert!(!input.bars[0].prefetchable);
    }
}
