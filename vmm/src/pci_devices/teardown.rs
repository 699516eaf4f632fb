//! What an attached PCI device leaves with the VM, and the one order it is
//! given back in.
//!
//! Every device's attach step returns a [`DeviceResources`]: its mapped
//! BARs (host mappings and the memslots over them), the VM those memslots
//! are in, and the device kind's own host resources behind the
//! [`HostResources`] trait (shared memory: its backing file; VFIO: the
//! device, its interrupts, its IOMMU mappings and a handle on the VM's
//! VFIO host). Dropping it tears the device down in this order, which is
//! the only place the order is written:
//!
//! 1. **Stop DMA** ([`HostResources::stop_dma`]): the device initiates no
//!    more DMA and raises no more interrupts. VFIO clears Bus Master Enable
//!    in the device's command register and disables its interrupts (VFIO
//!    IRQs off, irqfds deassigned, routes removed), then the device request
//!    (VFIO's request IRQ off, its eventfd closed). Shared memory has
//!    nothing to stop.
//! 2. **Unmap from the IOMMU** ([`HostResources::unmap_iommu`]): the
//!    device's own IOMMU mappings (its BARs, mapped for peer-to-peer DMA)
//!    go, and with the VM's last VFIO device guest RAM's. RAM must go while
//!    that device is still open: with the legacy backend the container
//!    loses its IOMMU, and every mapping, when its last group leaves.
//! 3. **Remove the memslots** of the BARs (KVM_SET_USER_MEMORY_REGION with
//!    size 0, `machine::kvm::remove_guest_memory`). Closing the VM fd would
//!    not do it: the VM outlives its fd for as long as VFIO holds it (the
//!    KVM VFIO device, each group's or cdev's KVM reference).
//! 4. **Unmap the BARs** from barge (munmap of each BAR's mapping).
//! 5. **Close the device** ([`HostResources::close`]): shared memory's
//!    file; the VFIO device (reset, then closed). This owner holds the last
//!    handle on the device once the device's models (its configuration
//!    space in the PCI segment, its traps on the MMIO bus) are gone, which
//!    is why `machine::vm::BuiltVm` drops its buses before its devices and
//!    [`crate::pci_devices::setup::AttachedDevice`] has this as its last
//!    field.
//! 6. **Release the group or IOAS**: the VM's shared VFIO host goes with its
//!    last device (also in [`HostResources::close`]).
//!
//! The VM fd and guest RAM come after every device: see
//! `machine::vm::BuiltVm`.

use std::sync::Arc;

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::machine::kvm::{self, MemslotLog};
use crate::pci_devices::bar_mapping::MappedBar;

/// The device kind's part of the teardown (see the module docs for when
/// each step runs). Every step is best effort: failures are logged.
pub trait HostResources: Send {
    /// Step 1: stop the device's DMA and interrupts.
    fn stop_dma(&mut self) {}

    /// Step 2: undo the device's IOMMU mappings.
    fn unmap_iommu(&mut self) {}

    /// The device's name and the EventFd the host signals when it wants the
    /// device back (VFIO's device request), if the device has one: the
    /// event loop watches it while the VM runs (see
    /// [`crate::event_loop::EventLoop::watch_release_request`]).
    fn release_request(&self) -> Option<(&str, &EventFd)> {
        None
    }

    /// Steps 5 and 6: close the device, then release what it shares with
    /// the VM's other devices.
    fn close(self: Box<Self>);
}

/// One attached device's host resources, torn down in the module docs'
/// order when dropped.
pub struct DeviceResources {
    /// Steps 1, 2, 5 and 6. `None` only once dropped.
    host: Option<Box<dyn HostResources>>,
    /// The VM the BARs' memslots are in (step 3).
    vm: Arc<VmFd>,
    /// Where step 3's memslot deletes are counted.
    memslots: MemslotLog,
    /// Every memory BAR, trapped ones included, by index: memslots (step 3)
    /// and host mappings (step 4).
    bars: Vec<MappedBar>,
}

impl std::fmt::Debug for DeviceResources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceResources")
            .field("bars", &self.bars)
            .finish_non_exhaustive()
    }
}

impl DeviceResources {
    /// The resources of a device whose BARs are `bars` (memslots in `vm`)
    /// and whose own host resources are `host`.
    pub fn new(
        vm: Arc<VmFd>,
        memslots: MemslotLog,
        bars: Vec<MappedBar>,
        host: Box<dyn HostResources>,
    ) -> Self {
        Self {
            host: Some(host),
            vm,
            memslots,
            bars,
        }
    }

    /// Every memory BAR, trapped ones included, by index (for the report).
    pub fn bars(&self) -> &[MappedBar] {
        &self.bars
    }

    /// See [`HostResources::release_request`].
    pub fn release_request(&self) -> Option<(&str, &EventFd)> {
        self.host.as_ref()?.release_request()
    }
}

impl Drop for DeviceResources {
    fn drop(&mut self) {
        let Some(mut host) = self.host.take() else {
            return;
        };
        host.stop_dma();
        host.unmap_iommu();
        for bar in &self.bars {
            for area in &bar.areas {
                if let Err(error) = kvm::remove_guest_memory(&self.vm, &self.memslots, area.slot) {
                    log::warn!("BAR {} of {}: {error}", bar.placement.index, bar.device);
                }
            }
        }
        // Munmaps each BAR: step 2 dropped the IOMMU mappings that shared
        // the host mappings.
        self.bars.clear();
        host.close();
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::sync::{Mutex, Weak};

    use devices::vfio::fake::is_mapped;
    use resources::placement::{BarInput, BarPlacement, BarWidth, DeviceInput, Windows};

    use super::*;
    use crate::machine::mapping::AlignedMapping;
    use crate::machine::memory;
    use crate::pci_devices::bar_mapping::{map_bar_areas, SlotAllocator};

    /// A 4 MiB BAR in the 64-bit window.
    fn placement() -> BarPlacement {
        let ram = resources::ram_regions(512 << 20).unwrap();
        let windows = Windows::new(&ram, 40).unwrap();
        let device = DeviceInput {
            name: "test0".into(),
            bars: vec![BarInput::new(2, 4 << 20, BarWidth::Bits64, true)],
            align_cap: None,
        };
        resources::plan(&[device], &windows).unwrap().devices[0].bars[0].clone()
    }

    fn vm() -> Arc<VmFd> {
        Arc::new(kvm::open_kvm().unwrap().create_vm().unwrap())
    }

    /// A step and whether the BAR's host mapping still existed when it ran.
    type Steps = Arc<Mutex<Vec<(&'static str, bool)>>>;

    /// Records the steps, looking at the BAR's mapping each time (it is
    /// unmapped exactly when the last `Arc` goes).
    struct Recording {
        steps: Steps,
        mapping: Weak<AlignedMapping>,
    }

    impl Recording {
        fn record(&self, step: &'static str) {
            let mapped = self.mapping.strong_count() > 0;
            self.steps.lock().unwrap().push((step, mapped));
        }
    }

    impl HostResources for Recording {
        fn stop_dma(&mut self) {
            self.record("stop_dma");
        }

        fn unmap_iommu(&mut self) {
            self.record("unmap_iommu");
        }

        fn close(self: Box<Self>) {
            self.record("close");
        }
    }

    #[test]
    fn teardown_stops_unmaps_from_the_iommu_then_frees_the_bar_then_closes() {
        if !guest_programs::testing::kvm_or_skip(
            "teardown_stops_unmaps_from_the_iommu_then_frees_the_bar_then_closes",
        ) {
            return;
        }
        let vm = vm();
        let placement = placement();
        let memfd = memory::create_memfd(None, placement.size).unwrap();
        let mut slots = SlotAllocator::new(3);
        let memslots = MemslotLog::new();
        let bar = map_bar_areas(
            &vm,
            &memslots,
            memfd.as_fd(),
            0,
            "test0",
            &placement,
            &mut slots,
        )
        .unwrap();
        let slot = bar.areas[0].slot;
        assert_eq!(memslots.updates(slot), 1);
        let before_teardown = memslots.snapshot();
        let (hva, len) = (bar.hva(), placement.size);
        assert!(is_mapped(hva, len));
        let steps = Steps::default();
        let host = Recording {
            steps: steps.clone(),
            mapping: Arc::downgrade(bar.mapping.as_ref().unwrap()),
        };
        let resources =
            DeviceResources::new(vm.clone(), memslots.clone(), vec![bar], Box::new(host));
        assert_eq!(resources.bars().len(), 1);
        drop(resources);
        assert_eq!(
            *steps.lock().unwrap(),
            [("stop_dma", true), ("unmap_iommu", true), ("close", false)]
        );
        // The delete went through the counting wrapper; a snapshot taken
        // before it (what the report reads) does not see it.
        assert_eq!(memslots.updates(slot), 2);
        assert_eq!(before_teardown.updates(slot), 1);
        // The memslot is gone: KVM takes a new one over the same addresses
        // (it refuses overlapping slots).
        let other = memory::create_memfd(None, placement.size).unwrap();
        let again = map_bar_areas(
            &vm,
            &MemslotLog::new(),
            other.as_fd(),
            0,
            "test0",
            &placement,
            &mut slots,
        );
        assert!(again.is_ok(), "{:?}", again.err());
    }

    #[test]
    fn a_live_memslot_blocks_its_addresses() {
        if !guest_programs::testing::kvm_or_skip("a_live_memslot_blocks_its_addresses") {
            return;
        }
        // The check above means something: while a BAR's memslot is there,
        // KVM refuses another over the same guest addresses.
        let vm = vm();
        let placement = placement();
        let memfd = memory::create_memfd(None, placement.size).unwrap();
        let mut slots = SlotAllocator::new(3);
        let _bar = map_bar_areas(
            &vm,
            &MemslotLog::new(),
            memfd.as_fd(),
            0,
            "test0",
            &placement,
            &mut slots,
        )
        .unwrap();
        let again = map_bar_areas(
            &vm,
            &MemslotLog::new(),
            memfd.as_fd(),
            0,
            "test0",
            &placement,
            &mut slots,
        );
        assert!(again.is_err());
    }
}
