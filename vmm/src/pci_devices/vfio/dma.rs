//! The one place barge hands memory to the IOMMU for device DMA, and so
//! the only `unsafe` code of VFIO passthrough.
//!
//! # The contract, kept once here
//!
//! [`VfioHostAccess::dma_map`] asks two things of a range for as long as it
//! is mapped for DMA:
//!
//! - **No Rust references into it**: the devices read and write it at any
//!   time. Both kinds of memory mapped here keep that crate-wide: guest RAM,
//!   which barge reads and writes only through vm-memory's volatile
//!   accessors (loader, boot structures), and BAR mappings, which barge
//!   never reads or writes at all (the guest does, through KVM).
//! - **It stays mapped until it is unmapped from the IOMMU**: each mapping
//!   here owns a handle on its memory (a clone of guest RAM's reference
//!   counted regions, the BAR's `Arc<AlignedMapping>`) and lets go of it
//!   only after it has unmapped the range, when dropped. Whatever order the
//!   rest of barge drops things in, memory cannot leave the process while a
//!   device can still reach it through the IOMMU.
//!
//! A failed unmap is logged; the memory handle goes anyway (the kernel
//! keeps the pages pinned until the domain is released, and the range's
//! contract ends with its munmap).

use std::sync::Arc;

use devices::vfio::host::{HostError, VfioHostAccess};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::machine::mapping::AlignedMapping;
use crate::machine::memory::GuestRam;
use crate::pci_devices::bar_mapping::MappedArea;

/// Why memory cannot be mapped for DMA.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// The VFIO host refused.
    #[error(transparent)]
    Host(#[from] HostError),
    /// A BAR area that is not inside its BAR's mapping.
    #[error(
        "cannot map BAR area {gpa:#x}+{size:#x} for DMA: it is not inside its BAR's host \
         mapping; please report this as a barge bug"
    )]
    OutsideMapping {
        /// The area's guest physical address.
        gpa: u64,
        size: u64,
    },
}

/// Guest RAM mapped into a VFIO host's IOMMU domain at IOVA = GPA, every
/// region; unmapped when dropped (see module docs).
pub struct RamDma<H: VfioHostAccess> {
    domain: Arc<H>,
    /// Keeps guest RAM mapped until after the unmap.
    _memory: GuestMemoryMmap,
    /// `(iova, size)` of each region mapped.
    mapped: Vec<(u64, u64)>,
}

impl<H: VfioHostAccess> RamDma<H> {
    /// Maps every region of `ram` into `domain`. On an error the regions
    /// mapped so far are unmapped again.
    pub fn map(domain: &Arc<H>, ram: &GuestRam) -> Result<Self, DmaError> {
        let mut dma = Self {
            domain: Arc::clone(domain),
            _memory: ram.memory.clone(),
            mapped: Vec::new(),
        };
        for region in ram.memory.iter() {
            let gpa = region.start_addr();
            let Ok(hva) = ram.memory.get_host_address(gpa) else {
                continue;
            };
            // SAFETY: guest RAM is accessed only through vm-memory's
            // volatile accessors and by the guest, and `dma._memory` holds
            // its regions until `drop` has unmapped them (module docs).
            unsafe { domain.dma_map(gpa.raw_value(), region.len(), hva) }?;
            dma.mapped.push((gpa.raw_value(), region.len()));
        }
        Ok(dma)
    }

    /// `(iova, size)` of every region mapped, in address order.
    pub fn regions(&self) -> &[(u64, u64)] {
        &self.mapped
    }
}

impl<H: VfioHostAccess> Drop for RamDma<H> {
    fn drop(&mut self) {
        for (iova, size) in self.mapped.drain(..) {
            if let Err(error) = self.domain.dma_unmap(iova, size) {
                log::warn!("vfio: {error}");
            }
        }
    }
}

/// One area of a BAR mapped into a VFIO host's IOMMU domain at IOVA = GPA,
/// so that other devices can DMA into it (peer to peer); unmapped when
/// dropped (see module docs).
pub struct BarDma<H: VfioHostAccess> {
    domain: Arc<H>,
    /// Keeps the BAR mapped until after the unmap.
    _mapping: Arc<AlignedMapping>,
    iova: u64,
    size: u64,
}

impl<H: VfioHostAccess> BarDma<H> {
    /// Maps `area`, which must lie inside `mapping`, into `domain`.
    pub fn map(
        domain: &Arc<H>,
        mapping: &Arc<AlignedMapping>,
        area: &MappedArea,
    ) -> Result<Self, DmaError> {
        let inside = area
            .hva
            .checked_sub(mapping.addr())
            .and_then(|offset| offset.checked_add(area.size))
            .is_some_and(|end| end <= mapping.len());
        if !inside {
            return Err(DmaError::OutsideMapping {
                gpa: area.gpa,
                size: area.size,
            });
        }
        // SAFETY: the area is part of a BAR mapping, which barge never
        // reads or writes, and `_mapping` keeps it mapped until `drop` has
        // unmapped it (module docs).
        unsafe { domain.dma_map(area.gpa, area.size, area.hva as *mut u8) }?;
        Ok(Self {
            domain: Arc::clone(domain),
            _mapping: Arc::clone(mapping),
            iova: area.gpa,
            size: area.size,
        })
    }
}

impl<H: VfioHostAccess> Drop for BarDma<H> {
    fn drop(&mut self) {
        if let Err(error) = self.domain.dma_unmap(self.iova, self.size) {
            log::warn!("vfio: {error}");
        }
    }
}
