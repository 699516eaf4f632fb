//! How a PCI device with BARs gets into the VM: the [`PciDeviceSetup`]
//! trait the builder drives for every entry of `VmConfig.devices`.
//!
//! # Plugging a device in (shared memory does it in `shmem.rs`; VFIO the same way)
//!
//! 1. **Open** (before planning, before any guest memory exists): the
//!    builder calls [`crate::pci_devices::open::open_devices`], which turns
//!    each `DeviceConfig` into a `Box<dyn PciDeviceSetup>`: shared memory
//!    with [`crate::pci_devices::shmem::open`], VFIO with
//!    [`crate::pci_devices::vfio::VfioSetup::open`]. Open the host side here
//!    (files, VFIO container/group/device) so that bad input fails before
//!    KVM memory is set up.
//! 2. **Plan**: [`PciDeviceSetup::plan_input`] gives the planner the
//!    device's BARs (name = [`PciDeviceSetup::name`]). The builder plans all
//!    devices together (`resources::placement::plan`) in the VM's windows.
//! 3. **Attach**: [`PciDeviceSetup::attach`] gets the device's
//!    `DevicePlan` and an [`AttachContext`] (the VM fd, guest RAM, the memslot
//!    allocator and log). For each memory-backed BAR it calls
//!    [`AttachContext::map_bar`] with the fd and offset of the BAR's data: that
//!    maps the plan's areas at the plan's HVA rule and registers one memslot
//!    per area, once (`bar_mapping`). Trapped BARs become
//!    [`MappedBar::trapped`] plus [`TrapRegion`]s (served on the MMIO bus at
//!    their planned GPA). It returns an [`AttachedDevice`]: the
//!    configuration space model for the PCI segment, the trap regions, and
//!    the device's [`DeviceResources`]: every memory BAR (for the report, in
//!    index order) with the device's host resources (files, VFIO device,
//!    IOMMU mappings), which it tears down in one order when dropped.
//! 4. **Prove and report**: the builder adds the config model to bus 0
//!    (lowest free device number from 1), the traps to the MMIO bus, and
//!    after the vCPUs exist pre-faults every mapped BAR (`BarProver`). Add
//!    likely causes of a shortfall to a `MappedBar` with
//!    [`MappedBar::add_cause`] during attach; `bar-align` is named for you.
//!
//! Drop order: the builder keeps each device's [`DeviceResources`] in the
//! `BuiltVm`, which drops them after the buses (the device models) and
//! before the VM fd and guest RAM; what happens then is in
//! [`crate::pci_devices::teardown`].

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use devices::pci::segment::BoxedPciDevice;
use devices::virtio::worker::ThreadInit;
use kvm_ioctls::VmFd;
use resources::placement::{BarPlacement, DeviceInput, DevicePlan};

use crate::buses::bus::SharedBusDevice;
use crate::machine::kvm::MemslotLog;
use crate::machine::memory::GuestRam;
use crate::pci_devices::bar_mapping::{map_bar_areas, BarMappingError, MappedBar, SlotAllocator};
use crate::pci_devices::teardown::DeviceResources;
use crate::progress::ProgressOutput;
use crate::report::DmaReport;

/// Any error a device's open or attach step returns; its message must be a
/// complete sentence that says what to do.
pub type DeviceSetupError = Box<dyn std::error::Error + Send + Sync>;

/// A PCI device the builder can plan, attach and report (see module docs).
pub trait PciDeviceSetup: Send {
    /// The device's name in the plan and the report's `bdf`: the host
    /// `DDDD:BB:DD.F` for VFIO, `shmemN` for shared memory. Unique.
    fn name(&self) -> &str;

    /// The report's `kind`: `vfio` or `shmem`.
    fn kind(&self) -> &'static str;

    /// The planner input: the device's memory BARs and mmap-able areas.
    fn plan_input(&self) -> DeviceInput;

    /// Maps the BARs where `plan` says and builds the device (see module docs).
    fn attach(
        self: Box<Self>,
        plan: &DevicePlan,
        ctx: &mut AttachContext<'_>,
    ) -> Result<AttachedDevice, DeviceSetupError>;
}

/// What [`PciDeviceSetup::attach`] may use.
pub struct AttachContext<'a> {
    /// The VM (memslots, KVM VFIO device), shared with whatever must reach
    /// it later (a device's [`DeviceResources`], its interrupts).
    pub vm: &'a Arc<VmFd>,
    /// Guest RAM (for DMA mappings).
    pub ram: &'a GuestRam,
    /// Memslot numbers after RAM's.
    pub slots: &'a mut SlotAllocator,
    /// Counts every KVM_SET_USER_MEMORY_REGION, for the report.
    pub memslots: &'a MemslotLog,
    /// Where the progress of long steps (the RAM DMA map) goes.
    pub progress: ProgressOutput,
    /// What a thread a device starts for its set-up (`p2p=background`)
    /// runs first: the seccomp filter of the VMM thread, when filters are
    /// on.
    pub thread_init: Option<ThreadInit>,
    /// The PCI requester ID the device gets (bus 0, its slot, function 0):
    /// its MSI routes carry it (aarch64's ITS needs it).
    pub requester_id: u32,
    /// Count the host's faults on VFIO BAR mappings (where KVM cannot
    /// pre-fault: see `bar_mapping`'s module docs).
    pub count_host_faults: bool,
}

impl AttachContext<'_> {
    /// Maps `placement`'s areas of `fd` (BAR data at `region_offset` in the
    /// fd) and registers one memslot per area, once. See
    /// [`crate::pci_devices::bar_mapping::map_bar_areas`].
    pub fn map_bar(
        &mut self,
        fd: BorrowedFd<'_>,
        region_offset: u64,
        device: &str,
        placement: &BarPlacement,
    ) -> Result<MappedBar, BarMappingError> {
        map_bar_areas(
            self.vm,
            self.memslots,
            fd,
            region_offset,
            device,
            placement,
            self.slots,
        )
    }
}

/// A trapped range on the MMIO bus.
pub struct TrapRegion {
    /// Guest physical address.
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
    /// Name in logs.
    pub name: &'static str,
    /// The handler (offsets are relative to `gpa`).
    pub device: SharedBusDevice,
}

/// A device ready to go on the buses.
///
/// Field order is drop order: the models (`config`, `traps`) hold handles
/// on the device, so they go before its `resources` (see
/// [`crate::pci_devices::teardown`]).
pub struct AttachedDevice {
    /// Its configuration space, for the PCI segment.
    pub config: BoxedPciDevice,
    /// Ranges served on the MMIO bus.
    pub traps: Vec<TrapRegion>,
    /// Set by the device that mapped guest RAM for DMA (the first VFIO one).
    pub dma: Option<DmaReport>,
    /// The VFIO backend a passed-through device was opened with (the
    /// report's `vfio_backend`); `None` for other devices.
    pub vfio_backend: Option<&'static str>,
    /// A virtio device's counters (the report's `virtio`); `None` for
    /// other devices.
    pub virtio: Option<Arc<devices::virtio::DeviceCounters>>,
    /// Its BARs and host resources, torn down in order when dropped.
    pub resources: DeviceResources,
}
