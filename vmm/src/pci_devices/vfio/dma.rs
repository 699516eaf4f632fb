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
use crate::progress::{Progress, ProgressOutput};

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

/// Guest RAM is mapped in pieces of at most this many bytes, each ending on
/// a multiple of it: the progress of a large RAM shows between them, and a
/// piece still covers whole 1 GiB IOMMU pages.
pub const RAM_DMA_CHUNK: u64 = 1 << 30;

/// Guest RAM mapped into a VFIO host's IOMMU domain at IOVA = GPA, every
/// region; unmapped when dropped (see module docs).
pub struct RamDma<H: VfioHostAccess> {
    domain: Arc<H>,
    /// Keeps guest RAM mapped until after the unmap.
    _memory: GuestMemoryMmap,
    /// `(iova, size)` of each piece mapped ([`RAM_DMA_CHUNK`]), in address
    /// order.
    mapped: Vec<(u64, u64)>,
    /// `(iova, size)` of each RAM region mapped.
    regions: Vec<(u64, u64)>,
    /// How the domains mapped them.
    methods: DmaMethods,
}

/// `[start, start + size)` cut into pieces that end on multiples of
/// [`RAM_DMA_CHUNK`] (or at the end): `(offset from start, size)`.
fn chunks(start: u64, size: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = start.saturating_add(size);
    let mut at = start;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let next = (at / RAM_DMA_CHUNK + 1)
            .saturating_mul(RAM_DMA_CHUNK)
            .min(end);
        let piece = (at - start, next - at);
        at = next;
        Some(piece)
    })
}

impl<H: VfioHostAccess> RamDma<H> {
    /// Maps every region of `ram` into `domain`, in pieces of at most
    /// [`RAM_DMA_CHUNK`], showing the progress on `progress` when it takes
    /// long. On an error the pieces mapped so far are unmapped again.
    pub fn map(
        domain: &Arc<H>,
        ram: &GuestRam,
        progress: ProgressOutput,
    ) -> Result<Self, DmaError> {
        let mut dma = Self {
            domain: Arc::clone(domain),
            _memory: ram.memory.clone(),
            mapped: Vec::new(),
            regions: Vec::new(),
            methods: DmaMethods::default(),
        };
        let total: u64 = ram.memory.iter().map(|region| region.len()).sum();
        let mut shown = Progress::start("guest RAM DMA map", total, progress);
        let mut done = 0;
        for region in ram.memory.iter() {
            let gpa = region.start_addr().raw_value();
            let Ok(hva) = ram.memory.get_host_address(region.start_addr()) else {
                continue;
            };
            for (offset, size) in chunks(gpa, region.len()) {
                // The piece lies inside the region's mapping.
                let piece_hva = hva.wrapping_add(offset as usize);
                let methods = match region.file_offset() {
                    // SAFETY: guest RAM is accessed only through vm-memory's
                    // volatile accessors and by the guest, `dma._memory`
                    // holds its regions until `drop` has unmapped them
                    // (module docs), and the region maps its file from that
                    // offset at `hva`, so the piece's file offset is that
                    // plus the piece's offset in the region.
                    Some(file) => unsafe {
                        domain.dma_map_file(
                            gpa + offset,
                            size,
                            piece_hva,
                            file.file().as_fd(),
                            file.start() + offset,
                        )
                    },
                    // SAFETY: as above, without a file.
                    None => unsafe { domain.dma_map(gpa + offset, size, piece_hva) },
                }?;
                dma.mapped.push((gpa + offset, size));
                dma.methods.merge(&methods);
                done += size;
                shown.update(done);
            }
            dma.regions.push((gpa, region.len()));
        }
        shown.finish();
        Ok(dma)
    }

    /// How the domains mapped guest RAM (every region's methods).
    pub fn methods(&self) -> &DmaMethods {
        &self.methods
    }

    /// `(iova, size)` of every RAM region mapped, in address order.
    pub fn regions(&self) -> &[(u64, u64)] {
        &self.regions
    }

    /// `(iova, size)` of every piece mapped (the IOMMU maps and unmaps), in
    /// address order.
    pub fn pieces(&self) -> &[(u64, u64)] {
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

#[cfg(test)]
mod tests {
    use devices::vfio::fake::FakeVfioHost;

    use super::*;
    use crate::config::MemoryConfig;
    use crate::machine::memory::create_guest_memory;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn ram_is_cut_into_pieces_that_end_on_gib_boundaries() {
        let pieces: Vec<_> = chunks(0, 3 * GIB + 512 * MIB).collect();
        assert_eq!(
            pieces,
            [(0, GIB), (GIB, GIB), (2 * GIB, GIB), (3 * GIB, 512 * MIB)]
        );
        // A region that starts inside a GiB: its first piece ends on the next.
        let pieces: Vec<_> = chunks(4 * GIB + 512 * MIB, GIB).collect();
        assert_eq!(pieces, [(0, 512 * MIB), (512 * MIB, 512 * MIB)]);
        assert_eq!(chunks(GIB, 2 * MIB).collect::<Vec<_>>(), [(0, 2 * MIB)]);
        assert_eq!(chunks(GIB, 0).count(), 0);
    }

    #[test]
    fn every_piece_is_mapped_at_its_own_address_and_unmapped_on_drop() {
        // 2.5 GiB of address space, never touched.
        let ram = create_guest_memory(
            &[(0, 2 * GIB + 512 * MIB)],
            &MemoryConfig {
                size: 2 * GIB + 512 * MIB,
                ..Default::default()
            },
        )
        .unwrap();
        let base = ram
            .memory
            .get_host_address(vm_memory::GuestAddress(0))
            .unwrap() as u64;
        let host = Arc::new(FakeVfioHost::new());
        let dma = RamDma::map(&host, &ram, ProgressOutput::Off).unwrap();
        assert_eq!(
            host.dma_mappings(),
            [
                (0, GIB, base),
                (GIB, GIB, base + GIB),
                (2 * GIB, 512 * MIB, base + 2 * GIB)
            ]
        );
        assert_eq!(dma.regions(), [(0, 2 * GIB + 512 * MIB)]);
        assert_eq!(dma.pieces().len(), 3);
        drop(dma);
        assert!(host.dma_mappings().is_empty());
    }

    #[test]
    fn a_piece_the_host_refuses_unmaps_the_ones_before_it() {
        let ram = create_guest_memory(
            &[(0, 2 * GIB + 512 * MIB)],
            &MemoryConfig {
                size: 2 * GIB + 512 * MIB,
                ..Default::default()
            },
        )
        .unwrap();
        let host = Arc::new(FakeVfioHost::new().refusing_dma_from(2 * GIB));
        assert!(RamDma::map(&host, &ram, ProgressOutput::Off).is_err());
        assert!(host.dma_mappings().is_empty());
    }
}
