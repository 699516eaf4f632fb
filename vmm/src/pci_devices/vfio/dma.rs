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

use std::os::fd::AsFd;
use std::sync::Arc;

use devices::vfio::dma_method::{BarDmaMapping, DmaMethods};
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
    /// How the domains mapped them.
    methods: DmaMethods,
}

impl<H: VfioHostAccess> RamDma<H> {
    /// Maps every region of `ram` into `domain`. On an error the regions
    /// mapped so far are unmapped again.
    pub fn map(domain: &Arc<H>, ram: &GuestRam) -> Result<Self, DmaError> {
        let mut dma = Self {
            domain: Arc::clone(domain),
            _memory: ram.memory.clone(),
            mapped: Vec::new(),
            methods: DmaMethods::default(),
        };
        for region in ram.memory.iter() {
            let gpa = region.start_addr();
            let Ok(hva) = ram.memory.get_host_address(gpa) else {
                continue;
            };
            let methods = match region.file_offset() {
                // SAFETY: guest RAM is accessed only through vm-memory's
                // volatile accessors and by the guest, `dma._memory` holds
                // its regions until `drop` has unmapped them (module docs),
                // and the region maps its file from that offset at `hva`.
                Some(file) => unsafe {
                    domain.dma_map_file(
                        gpa.raw_value(),
                        region.len(),
                        hva,
                        file.file().as_fd(),
                        file.start(),
                    )
                },
                // SAFETY: as above, without a file.
                None => unsafe { domain.dma_map(gpa.raw_value(), region.len(), hva) },
            }?;
            dma.mapped.push((gpa.raw_value(), region.len()));
            dma.methods.merge(&methods);
        }
        Ok(dma)
    }

    /// How the domains mapped guest RAM (every region's methods).
    pub fn methods(&self) -> &DmaMethods {
        &self.methods
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
/// dropped (see module docs), the dma-buf it holds on the iommufd path
/// closed after that.
pub struct BarDma<H: VfioHostAccess> {
    domain: Arc<H>,
    iova: u64,
    size: u64,
    /// How it was mapped, and its dma-buf (dropped after the unmap).
    mapping: BarDmaMapping,
    /// Keeps the BAR mapped until after the unmap.
    _mapping: Arc<AlignedMapping>,
}

impl<H: VfioHostAccess> BarDma<H> {
    /// Maps `area` of BAR `bar` of `device`, which must lie inside
    /// `mapping`, into `domain`.
    pub fn map(
        domain: &Arc<H>,
        device: &H::Device,
        bar: u8,
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
        let dma_mapping = unsafe {
            domain.bar_dma_map(
                device,
                u32::from(bar),
                area.offset,
                area.gpa,
                area.size,
                area.hva as *mut u8,
            )
        }?;
        Ok(Self {
            domain: Arc::clone(domain),
            iova: area.gpa,
            size: area.size,
            mapping: dma_mapping,
            _mapping: Arc::clone(mapping),
        })
    }

    /// How the domains mapped it.
    pub fn methods(&self) -> &DmaMethods {
        &self.mapping.methods
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl<H: VfioHostAccess> Drop for BarDma<H> {
    fn drop(&mut self) {
        if let Err(error) = self.domain.dma_unmap(self.iova, self.size) {
            log::warn!("vfio: {error}");
        }
        // `mapping.dma_buf` closes after this, once the IOAS no longer
        // maps it.
    }
}
