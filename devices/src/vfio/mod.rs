//! VFIO passthrough as a device model: a host PCI function behind a
//! [`VfioDeviceAccess`], seen by the guest through [`VfioPciDevice`].
//!
//! The pieces, in the order the VMM uses them:
//!
//! 1. The VFIO host ([`host::VfioHostAccess`]) opens the host device:
//!    [`host::VfioHost`] gives a [`host::HostVfioDevice`] over vfio-ioctls
//!    (legacy container/group, or cdev + iommufd, as the
//!    [`VfioBackendKind`] says); in tests `fake::FakeVfioHost` gives a
//!    `fake::FakeVfioDevice`.
//! 2. [`VfioProbe::read`] reads the device's region info and config space:
//!    BAR sizes and flags, sparse-mmap areas, the MSI-X table and PBA, and
//!    which capabilities to mask. [`VfioProbe::device_input`] turns that into
//!    the placement planner's [`resources::placement::DeviceInput`].
//! 3. After planning, [`VfioPciDevice::new`] puts the BARs at the planned
//!    GPAs. It implements [`crate::pci::PciConfigAccess`] for the PCI
//!    segment; its [`VfioBarAccess`] serves the trapped parts of the BARs
//!    on the MMIO bus.
//!
//! Nothing here maps memory or talks to KVM: mapping the mmap-able areas
//! (over [`VfioDeviceAccess::device_fd`] at [`RegionInfo::offset`] + area offset)
//! and registering memslots is the VMM's job.

pub mod device;
pub mod dma_method;
pub mod fake;
pub mod host;
pub mod interrupts;
pub mod preflight;
pub mod probe;

use std::io;
use std::os::fd::BorrowedFd;

use vmm_sys_util::eventfd::EventFd;

pub use device::{VfioBarAccess, VfioDeviceError, VfioPciDevice};
pub use host::{InvalidVfioBackend, VfioBackendKind};
pub use probe::{ProbeError, ProbedBar, VfioProbe};
pub use resources::placement::BarRange;

/// VFIO region index of BAR 0 (BARs 0..=5 are regions 0..=5).
pub const BAR0_REGION_INDEX: u32 = 0;
/// VFIO region index of the expansion ROM.
pub const ROM_REGION_INDEX: u32 = 6;
/// VFIO region index of the configuration space.
pub const CONFIG_REGION_INDEX: u32 = 7;
/// VFIO IRQ index of INTx (`VFIO_PCI_INTX_IRQ_INDEX`).
pub const INTX_IRQ_INDEX: u32 = 0;
/// VFIO IRQ index of MSI (`VFIO_PCI_MSI_IRQ_INDEX`).
pub const MSI_IRQ_INDEX: u32 = 1;
/// VFIO IRQ index of MSI-X (`VFIO_PCI_MSIX_IRQ_INDEX`).
pub const MSIX_IRQ_INDEX: u32 = 2;
/// VFIO IRQ index of the device request (`VFIO_PCI_REQ_IRQ_INDEX`): not a
/// device interrupt but vfio-pci asking the user to release the device,
/// signalled when the host unbinds it (and again every 10 seconds until
/// the device is closed).
pub const REQ_IRQ_INDEX: u32 = 4;
/// Region flag: the region can be read (`VFIO_REGION_INFO_FLAG_READ`).
pub const REGION_FLAG_READ: u32 = 1 << 0;
/// Region flag: the region can be written (`VFIO_REGION_INFO_FLAG_WRITE`).
pub const REGION_FLAG_WRITE: u32 = 1 << 1;
/// Region flag: the region (or its sparse areas) can be mmap'ed
/// (`VFIO_REGION_INFO_FLAG_MMAP`).
pub const REGION_FLAG_MMAP: u32 = 1 << 2;

/// What VFIO says about one region (`VFIO_DEVICE_GET_REGION_INFO`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RegionInfo {
    /// Size in bytes; 0 for an unimplemented BAR.
    pub size: u64,
    /// Offset of the region in the device fd, for `pread`/`pwrite`/`mmap`.
    pub offset: u64,
    /// `REGION_FLAG_*` bits.
    pub flags: u32,
    /// The areas the sparse-mmap capability (`VFIO_REGION_INFO_CAP_SPARSE_MMAP`)
    /// lists, offsets inside the region. `None`: no such capability, so the
    /// whole region is mmap-able when [`REGION_FLAG_MMAP`] is set.
    pub sparse_areas: Option<Vec<BarRange>>,
    /// The kernel reported `VFIO_REGION_INFO_CAP_MSIX_MAPPABLE`: the MSI-X
    /// table may be mmap'ed (barge traps it anyway).
    pub msix_mappable: bool,
}

impl RegionInfo {
    /// Whether [`REGION_FLAG_MMAP`] is set.
    pub fn mmap(&self) -> bool {
        self.flags & REGION_FLAG_MMAP != 0
    }

    /// The mmap-able areas as the planner wants them: `Some(empty)` when
    /// nothing can be mmap'ed, `None` for the whole region, else the sparse
    /// areas clipped to the region.
    pub fn mmap_areas(&self) -> Option<Vec<BarRange>> {
        if !self.mmap() {
            return Some(Vec::new());
        }
        let areas = self.sparse_areas.as_ref()?;
        Some(
            areas
                .iter()
                .filter(|area| area.size > 0 && area.offset < self.size)
                .map(|area| BarRange::new(area.offset, area.size.min(self.size - area.offset)))
                .collect(),
        )
    }
}

/// The VFIO device operations the passthrough model needs. Implemented by
/// [`host::HostVfioDevice`] and, in tests, `fake::FakeVfioDevice` (the `fake` feature).
///
/// Reads that fail leave `data` as it was: callers fill it with all-ones
/// first, so a failed read looks like a device that did not answer.
pub trait VfioDeviceAccess: Send + Sync {
    /// Information about region `index`, `None` if the device has no such
    /// region (or it has size 0).
    fn region_info(&self, index: u32) -> Option<RegionInfo>;

    /// Reads `data.len()` bytes at `offset` of region `index`.
    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]);

    /// Writes `data` at `offset` of region `index`.
    fn region_write(&self, index: u32, offset: u64, data: &[u8]);

    /// Resets the device if it supports a reset; returns whether it does.
    fn reset(&self) -> bool;

    /// The device fd, for `mmap` of the mmap-able areas at
    /// [`RegionInfo::offset`] plus the area's offset.
    fn device_fd(&self) -> BorrowedFd<'_>;

    /// Reads configuration space (region [`CONFIG_REGION_INDEX`]).
    fn config_read(&self, offset: u64, data: &mut [u8]) {
        self.region_read(CONFIG_REGION_INDEX, offset, data);
    }

    /// Writes configuration space (region [`CONFIG_REGION_INDEX`]).
    fn config_write(&self, offset: u64, data: &[u8]) {
        self.region_write(CONFIG_REGION_INDEX, offset, data);
    }

    /// How many interrupts VFIO offers at IRQ `index` ([`INTX_IRQ_INDEX`],
    /// [`MSI_IRQ_INDEX`], [`MSIX_IRQ_INDEX`], [`REQ_IRQ_INDEX`]); 0 when
    /// none.
    fn irq_count(&self, _index: u32) -> u32 {
        0
    }

    /// Has VFIO signal `fds[i]` when the device raises interrupt `i` of
    /// IRQ `index` (`VFIO_IRQ_SET_ACTION_TRIGGER`); enables MSI or MSI-X on
    /// the host with `fds.len()` vectors.
    fn irq_enable(&self, index: u32, _fds: &[&EventFd]) -> io::Result<()> {
        Err(io::Error::other(format!("no VFIO IRQ index {index}")))
    }

    /// Disables IRQ `index` on the host.
    fn irq_disable(&self, index: u32) -> io::Result<()> {
        Err(io::Error::other(format!("no VFIO IRQ index {index}")))
    }

    /// Has VFIO unmask INTx whenever `fd` is signalled
    /// (`VFIO_IRQ_SET_ACTION_UNMASK` with an eventfd: KVM's resample fd).
    fn intx_unmask_on(&self, _fd: &EventFd) -> io::Result<()> {
        Err(io::Error::other("no VFIO INTx"))
    }
}

impl<T: VfioDeviceAccess + ?Sized> VfioDeviceAccess for std::sync::Arc<T> {
    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        (**self).region_info(index)
    }
    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) {
        (**self).region_read(index, offset, data);
    }
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) {
        (**self).region_write(index, offset, data);
    }
    fn reset(&self) -> bool {
        (**self).reset()
    }
    fn device_fd(&self) -> BorrowedFd<'_> {
        (**self).device_fd()
    }
    fn config_read(&self, offset: u64, data: &mut [u8]) {
        (**self).config_read(offset, data);
    }
    fn config_write(&self, offset: u64, data: &[u8]) {
        (**self).config_write(offset, data);
    }
    fn irq_count(&self, index: u32) -> u32 {
        (**self).irq_count(index)
    }
    fn irq_enable(&self, index: u32, fds: &[&EventFd]) -> io::Result<()> {
        (**self).irq_enable(index, fds)
    }
    fn irq_disable(&self, index: u32) -> io::Result<()> {
        (**self).irq_disable(index)
    }
    fn intx_unmask_on(&self, fd: &EventFd) -> io::Result<()> {
        (**self).intx_unmask_on(fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmap_areas_follow_flags_and_sparse_cap() {
        let mut info = RegionInfo {
            size: 0x10000,
            flags: REGION_FLAG_READ | REGION_FLAG_WRITE,
            ..RegionInfo::default()
        };
        assert_eq!(info.mmap_areas(), Some(vec![]));
        info.flags |= REGION_FLAG_MMAP;
        assert_eq!(info.mmap_areas(), None);
        info.sparse_areas = Some(vec![
            BarRange::new(0, 0x1000),
            BarRange::new(0x2000, 0),
            BarRange::new(0x8000, 0x10000),
            BarRange::new(0x20000, 0x1000),
        ]);
        assert_eq!(
            info.mmap_areas(),
            Some(vec![
                BarRange::new(0, 0x1000),
                BarRange::new(0x8000, 0x8000)
            ])
        );
    }
}
