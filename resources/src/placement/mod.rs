//! The BAR placement planner: where each PCI BAR goes in guest physical memory, how its
//! host mapping must be aligned, and which page size every part of it can get.
//!
//! Pure logic: no KVM, no devices, no mappings. Input is a list of [`DeviceInput`]s (names
//! and BARs, from a spec file, sysfs or VFIO) and the guest's MMIO [`Windows`]; output is a
//! [`Plan`] that the passthrough code follows and `barge plan` prints.
//!
//! # Rules
//!
//! - **Windows.** 32-bit BARs go into the MMIO32 window of `arch::layout`
//!   (`PCI_MMIO32_START`, 512 MiB below 4 GiB). 64-bit BARs (prefetchable or not) go into the
//!   MMIO64 window `[mmio64_window_start(ram), 1 << phys_bits)`: from the end of RAM rounded
//!   up to 1 GiB up to the first address the guest cannot use. KVM accepts a memslot whose
//!   last guest frame is at most `kvm_mmu_max_gfn() = (1 << phys_bits) / 4 KiB - 1`, and the
//!   guest sees the same phys-bits in CPUID 0x8000_0008, so the window may reach
//!   `1 << phys_bits` exactly (end exclusive). Nothing else lives above RAM in barge's map.
//! - **GPA.** Every BAR reserves `pow2ceil(max(size, 4 KiB))` bytes of its window at an
//!   address aligned to that reservation (natural alignment; PCI requires it, and it is
//!   what lets a 128 GiB BAR use 1 GiB pages). Sizes that are not a power of two round up.
//!   BARs are allocated largest first (ties: device order, then BAR index) with vm-allocator's
//!   first-fit, so power-of-two reservations pack without alignment waste and the result is
//!   deterministic.
//! - **Sub-page BARs** (smaller than 4 KiB, e.g. ivshmem's 256-byte BAR0) still get their own
//!   naturally aligned 4 KiB reservation, but no memslot: they have no areas, so they are
//!   trapped ([`BarPlacement::trapped`], `trap` in the JSON) and emulated by reads/writes
//!   through VFIO. A memslot must be page-sized and page-aligned.
//! - **HVA alignment.** The mapper reserves the BAR's host virtual range at a base that
//!   satisfies `hva_base % hva_modulus == hva_phase`. Without a cap:
//!   `hva_align = min(reservation, 1 GiB)`, `hva_modulus = hva_align`, `hva_phase = 0`, so
//!   GPA ≡ HVA (mod hva_align) and 1 GiB pages are possible wherever the BAR has them.
//!   The plan stores `hva_align`; [`BarPlacement::hva_modulus`] and
//!   [`BarPlacement::hva_phase`] follow from it and the reservation.
//! - **bar-align caps** (`align_cap = Some(c)`, c < the natural `hva_align`):
//!   `hva_align = c`, `hva_modulus = 2c`, `hva_phase = c`. The GPA stays naturally aligned
//!   (PCI demands it; it is a multiple of `2c`), so HVA − GPA ≡ c (mod 2c): GPA ≡ HVA modulo
//!   `c` still holds, but not modulo `2c` or any larger page size. KVM therefore disallows
//!   every level above `c` for the memslot (its `(base_gfn ^ userspace_addr) & (pages-1)`
//!   check), and the host can't map above `c` either (the HVA is off the PUD/PMD phase of the
//!   naturally aligned host BAR). With `c = 2M` a 2 GiB BAR gets only 2 MiB pages, with
//!   `c = 4k` only 4 KiB pages. The GPA is not moved: moving the HVA off the larger boundary
//!   moves the GPA↔HVA relation off it, which is what the page size depends on.
//!   (A hugetlbfs-backed shared-memory BAR must then use pages no larger than `c`.)
//! - **Areas.** The mmap-able areas (VFIO sparse mmap; default the whole BAR) minus the
//!   4 KiB pages holding the MSI-X table and PBA (rounded out: they must trap) are placed at
//!   their own offsets inside the aligned BAR: `gpa = bar.gpa + offset`,
//!   `hva = hva_base + offset`. Aligning the whole BAR first and then the areas keeps the
//!   huge pages after a hole (aligning each area on its own would not).
//! - **Page size of an area**: the largest of 4K/2M/1G, at most `hva_align`, such that the
//!   area contains at least one whole naturally aligned page of that size. Because GPA ≡ HVA
//!   modulo `hva_align`, KVM can map every such page whole; the parts before the first and
//!   after the last such page get the next smaller sizes ([`PageCounts`] tiles the area
//!   exactly). Example: a 2 GiB BAR whose first 4 KiB page traps for the MSI-X table has one
//!   area `[4 KiB, 2 GiB)` with page size 1G: 511 × 4K up to 2 MiB, 511 × 2M up to 1 GiB,
//!   then 1 × 1G.
//! - **Trap ranges**: everything of the BAR that is not in an area (MSI-X pages, holes
//!   between sparse areas, the sub-page tail of a BAR whose size is not a page multiple).
//!
//! # Files
//!
//! - `types.rs`: the inputs, windows, outputs and errors.
//! - `planner.rs`: [`plan`] and its helpers, and [`area_pages`].
//! - `render.rs`: [`render_table`].

mod planner;
mod render;
mod types;

#[cfg(test)]
mod fixtures;

pub use planner::{area_pages, plan, plan_for_host, with_phys_bits_needed};
pub use render::render_table;

pub use crate::size::format_size;
pub use types::{
    AreaPlacement, BarInput, BarPlacement, BarRange, BarWidth, DeviceInput, DevicePlan, PageCounts,
    PageSize, ParsePageSizeError, PlacementError, Plan, Window, WindowKind, Windows,
    HOST_MAX_PFNMAP_PAGE, HOST_PAGE_SIZE, MAX_BAR_INDEX, MAX_BAR_SIZE, MAX_PHYS_BITS,
    MIN_PHYS_BITS,
};
