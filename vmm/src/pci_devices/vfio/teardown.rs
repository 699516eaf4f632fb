//! VFIO's part of a device's teardown: the [`HostResources`] steps that
//! `pci_devices::teardown::DeviceResources` runs in its order (stop DMA,
//! unmap from the IOMMU, then, after the BARs are gone, close the device
//! and release the VM's VFIO host).

use std::sync::Arc;

use devices::pci::{COMMAND_BUS_MASTER, COMMAND_OFFSET};
use devices::vfio::device::SharedInterrupts;
use devices::vfio::host::VfioHostAccess;
use devices::vfio::{VfioDeviceAccess, REQ_IRQ_INDEX};
use vmm_sys_util::eventfd::EventFd;

use crate::pci_devices::teardown::HostResources;
use crate::pci_devices::vfio::background::BackgroundP2p;
use crate::pci_devices::vfio::dma::{BarDma, RamDma};
use crate::pci_devices::vfio::shared_host::SharedVfioHost;

/// One passed-through device's host resources.
pub struct VfioTeardown<H: VfioHostAccess> {
    /// The device, for messages.
    pub bdf: String,
    /// The host device. Once the device's models are gone this is its last
    /// handle (besides `interrupts`' own).
    pub device: Arc<H::Device>,
    /// Its interrupts, when wired.
    pub interrupts: Option<SharedInterrupts<H::Device>>,
    /// The eventfd VFIO signals when the host wants the device back
    /// (enabled at [`REQ_IRQ_INDEX`]), when the device has that IRQ.
    pub release_request: Option<EventFd>,
    /// Guest RAM's IOMMU mapping, shared with the VM's other VFIO devices.
    pub ram_dma: Option<Arc<RamDma<H>>>,
    /// This device's BAR areas in the IOMMU (peer to peer).
    pub bar_dma: Vec<BarDma<H>>,
    /// With `p2p=background`: the thread mapping the BARs, and its maps.
    pub background_p2p: Option<BackgroundP2p<H>>,
    /// The VM's VFIO host (container or IOAS), shared with its other VFIO
    /// devices.
    pub host: Arc<SharedVfioHost<H>>,
}

impl<H: VfioHostAccess + 'static> HostResources for VfioTeardown<H> {
    /// Clears Bus Master Enable on the device (no more DMA, and so no more
    /// MSIs), then disables its interrupts: VFIO IRQs off, irqfds and
    /// routes gone; then the device request: VFIO's request IRQ off (the
    /// kernel lets go of the eventfd) and barge's eventfd closed.
    fn stop_dma(&mut self) {
        let mut command = [0xff; 2];
        self.device
            .config_read(u64::from(COMMAND_OFFSET), &mut command);
        let command = u16::from_le_bytes(command);
        if command == 0xffff {
            log::warn!(
                "vfio: {}: the command register does not answer; cannot clear Bus Master Enable",
                self.bdf
            );
        } else if command & COMMAND_BUS_MASTER != 0 {
            let stopped = command & !COMMAND_BUS_MASTER;
            self.device
                .config_write(u64::from(COMMAND_OFFSET), &stopped.to_le_bytes());
        }
        if let Some(interrupts) = &self.interrupts {
            interrupts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .shutdown();
        }
        if let Some(request) = self.release_request.take() {
            if let Err(error) = self.device.irq_disable(REQ_IRQ_INDEX) {
                log::warn!(
                    "vfio: {}: cannot disable the device request IRQ: {error}",
                    self.bdf
                );
            }
            drop(request);
        }
    }

    fn release_request(&self) -> Option<(&str, &EventFd)> {
        Some((&self.bdf, self.release_request.as_ref()?))
    }

    /// Unmaps the device's BAR areas and, when it is the last device
    /// holding it, guest RAM from the IOMMU domain.
    fn unmap_iommu(&mut self) {
        // The background thread first: it may be mapping a BAR still.
        self.background_p2p = None;
        self.bar_dma.clear();
        self.ram_dma = None;
    }

    /// Closes the device (reset by `HostVfioDevice` first), then lets go of
    /// the VM's VFIO host, which releases the container or IOAS with its
    /// last device.
    fn close(self: Box<Self>) {
        let VfioTeardown {
            device,
            interrupts,
            host,
            ..
        } = *self;
        drop(interrupts);
        drop(device);
        drop(host);
    }
}
