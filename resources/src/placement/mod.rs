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
//!   naturally aligned 4 KiB reservation, but no memslot: they are marked `trap` and emulated
//!   by reads/writes through VFIO. A memslot must be page-sized and page-aligned.
//! - **HVA alignment.** The mapper reserves the BAR's host virtual range at a base that
//!   satisfies `hva_base % hva_modulus == hva_phase`. Without a cap:
//!   `hva_align = min(reservation, 1 GiB)`, `hva_modulus = hva_align`, `hva_phase = 0`, so
//!   GPA ≡ HVA (mod hva_align) and 1 GiB pages are possible wherever the BAR has them.
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

use std::cmp::Reverse;
use std::collections::HashSet;
use std::fmt::{self, Write as _};
use std::str::FromStr;

use arch::layout::{PCI_MMIO32_SIZE, PCI_MMIO32_START};
use serde::{Serialize, Serializer};
use vm_allocator::{AddressAllocator, AllocPolicy};

use crate::ram::{mmio64_window_start, RamRegion};

/// Host base page size; mmap-able areas and trap rounding use it.
pub const HOST_PAGE_SIZE: u64 = 4096;
/// Largest PCI BAR index (BARs 0..=5).
pub const MAX_BAR_INDEX: u8 = 5;
/// Smallest physical-address width [`Windows::new`] accepts.
pub const MIN_PHYS_BITS: u8 = 32;
/// Largest physical-address width on x86-64 (MAXPHYADDR ≤ 52).
pub const MAX_PHYS_BITS: u8 = 52;
/// Largest BAR size the planner accepts (2^63 bytes: its reservation must fit in a u64).
pub const MAX_BAR_SIZE: u64 = 1 << 63;

const SIZE_2M: u64 = 2 << 20;
const SIZE_1G: u64 = 1 << 30;

// ---------------------------------------------------------------------------------------
// Small value types.
// ---------------------------------------------------------------------------------------

/// An x86-64 page size (a PTE, PMD or PUD mapping).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PageSize {
    /// 4 KiB (PTE).
    Size4K,
    /// 2 MiB (PMD).
    Size2M,
    /// 1 GiB (PUD).
    Size1G,
}

impl PageSize {
    /// All page sizes, smallest first.
    pub const ALL: [PageSize; 3] = [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G];

    /// The page size in bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => HOST_PAGE_SIZE,
            PageSize::Size2M => SIZE_2M,
            PageSize::Size1G => SIZE_1G,
        }
    }

    /// The page size of exactly `bytes` bytes, if there is one.
    pub fn from_bytes(bytes: u64) -> Option<PageSize> {
        PageSize::ALL.into_iter().find(|p| p.bytes() == bytes)
    }

    /// Short name: `4K`, `2M` or `1G`.
    pub const fn name(self) -> &'static str {
        match self {
            PageSize::Size4K => "4K",
            PageSize::Size2M => "2M",
            PageSize::Size1G => "1G",
        }
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A page size string that is not `4k`, `2m` or `1g`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid page size {0:?}: write 4k, 2m or 1g")]
pub struct ParsePageSizeError(pub String);

impl FromStr for PageSize {
    type Err = ParsePageSizeError;

    /// Parses `4k`, `2m`, `1g` (any case; `4KiB`, `2MiB`, `1GiB` too).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "4k" | "4kib" => Ok(PageSize::Size4K),
            "2m" | "2mib" => Ok(PageSize::Size2M),
            "1g" | "1gib" => Ok(PageSize::Size1G),
            _ => Err(ParsePageSizeError(s.to_string())),
        }
    }
}

/// Serialized as its size in bytes.
impl Serialize for PageSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(self.bytes())
    }
}

/// Whether a memory BAR decodes 32 or 64 address bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BarWidth {
    /// 32-bit BAR: must sit below 4 GiB (MMIO32 window).
    Bits32,
    /// 64-bit BAR: takes two BAR slots, goes into the MMIO64 window.
    Bits64,
}

impl BarWidth {
    /// 32 or 64.
    pub const fn bits(self) -> u8 {
        match self {
            BarWidth::Bits32 => 32,
            BarWidth::Bits64 => 64,
        }
    }
}

impl fmt::Display for BarWidth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-bit", self.bits())
    }
}

/// Serialized as 32 or 64.
impl Serialize for BarWidth {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u8(self.bits())
    }
}

/// A byte range inside a BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct BarRange {
    /// Offset from the start of the BAR.
    pub offset: u64,
    /// Length in bytes.
    pub size: u64,
}

impl BarRange {
    /// A range of `size` bytes at `offset`.
    pub const fn new(offset: u64, size: u64) -> Self {
        BarRange { offset, size }
    }

    /// Offset one past the last byte (saturating).
    pub const fn end(&self) -> u64 {
        self.offset.saturating_add(self.size)
    }
}

// ---------------------------------------------------------------------------------------
// Input.
// ---------------------------------------------------------------------------------------

/// One memory BAR of a device, as the planner needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BarInput {
    /// BAR index 0..=5 (a 64-bit BAR also occupies `index + 1`).
    pub index: u8,
    /// Size in bytes (real BARs are powers of two; spec input may not be).
    pub size: u64,
    /// 32- or 64-bit.
    pub width: BarWidth,
    /// Prefetchable (informational; both kinds are placed the same way).
    pub prefetchable: bool,
    /// The mmap-able areas VFIO's sparse-mmap capability reports, offsets and sizes in
    /// multiples of 4 KiB. `None`: the whole BAR (down to a 4 KiB multiple).
    pub areas: Option<Vec<BarRange>>,
    /// Where the MSI-X table lies inside this BAR, if it does.
    pub msix_table: Option<BarRange>,
    /// Where the MSI-X pending-bit array lies inside this BAR, if it does.
    pub msix_pba: Option<BarRange>,
}

impl BarInput {
    /// A BAR with no sparse areas and no MSI-X structures.
    pub fn new(index: u8, size: u64, width: BarWidth, prefetchable: bool) -> Self {
        BarInput {
            index,
            size,
            width,
            prefetchable,
            areas: None,
            msix_table: None,
            msix_pba: None,
        }
    }
}

/// A device to place: a name (a BDF such as `0000:41:00.0`, or `shmem0`) and its BARs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInput {
    /// Unique name used in the plan and in errors.
    pub name: String,
    /// Memory BARs, any order.
    pub bars: Vec<BarInput>,
    /// `bar-align=4k|2m|1g`: cap the mapping alignment to force smaller pages (the
    /// comparison mode). `None` = `auto`, the largest pages possible.
    pub align_cap: Option<PageSize>,
}

// ---------------------------------------------------------------------------------------
// Windows.
// ---------------------------------------------------------------------------------------

/// Which MMIO window a BAR lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WindowKind {
    /// Below 4 GiB, for 32-bit BARs.
    Mmio32,
    /// Above RAM, for 64-bit BARs.
    Mmio64,
}

impl WindowKind {
    /// What to do when a BAR does not fit.
    pub const fn exhausted_hint(self) -> &'static str {
        match self {
            WindowKind::Mmio32 => {
                "32-bit BARs must fit the 512 MiB MMIO32 window below 4 GiB: pass fewer \
                 devices with 32-bit BARs"
            }
            WindowKind::Mmio64 => {
                "use a host with more physical address bits, give the VM less memory (the \
                 window starts after RAM), pass fewer devices, or shrink a resizable BAR on \
                 the host"
            }
        }
    }
}

impl fmt::Display for WindowKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WindowKind::Mmio32 => "MMIO32",
            WindowKind::Mmio64 => "MMIO64",
        })
    }
}

/// A guest physical address range `[start, end)` for BARs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Window {
    /// Which window this is.
    pub kind: WindowKind,
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
}

impl Window {
    /// Bytes in the window.
    pub const fn size(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// Whether `[gpa, gpa + size)` lies inside the window.
    pub fn contains(&self, gpa: u64, size: u64) -> bool {
        gpa >= self.start && gpa.checked_add(size).is_some_and(|end| end <= self.end)
    }
}

/// The two BAR windows of a guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Windows {
    /// For 32-bit BARs.
    pub mmio32: Window,
    /// For 64-bit BARs.
    pub mmio64: Window,
    /// Physical address bits the MMIO64 window was sized from (for messages).
    pub phys_bits: u8,
}

impl Windows {
    /// The windows of a guest with RAM `ram` on a host (and guest CPUID) with `phys_bits`
    /// physical address bits: MMIO32 from `arch::layout`, MMIO64 from
    /// [`mmio64_window_start`] up to `1 << phys_bits` (see the module docs).
    pub fn new(ram: &[RamRegion], phys_bits: u8) -> Result<Windows, PlacementError> {
        if !(MIN_PHYS_BITS..=MAX_PHYS_BITS).contains(&phys_bits) {
            return Err(PlacementError::PhysBitsOutOfRange { phys_bits });
        }
        let start = mmio64_window_start(ram);
        let end = 1u64 << phys_bits;
        if end <= start {
            return Err(PlacementError::NoMmio64Window { start, phys_bits });
        }
        Ok(Windows {
            mmio32: Window {
                kind: WindowKind::Mmio32,
                start: PCI_MMIO32_START,
                end: PCI_MMIO32_START + PCI_MMIO32_SIZE,
            },
            mmio64: Window {
                kind: WindowKind::Mmio64,
                start,
                end,
            },
            phys_bits,
        })
    }

    /// The window a BAR of this width goes into.
    pub fn for_width(&self, width: BarWidth) -> &Window {
        match width {
            BarWidth::Bits32 => &self.mmio32,
            BarWidth::Bits64 => &self.mmio64,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Output.
// ---------------------------------------------------------------------------------------

/// How many pages of each size tile an area when every page is as large as possible.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PageCounts {
    /// 4 KiB pages.
    pub pages_4k: u64,
    /// 2 MiB pages.
    pub pages_2m: u64,
    /// 1 GiB pages.
    pub pages_1g: u64,
}

impl PageCounts {
    fn add(&mut self, page: PageSize, count: u64) {
        match page {
            PageSize::Size4K => self.pages_4k += count,
            PageSize::Size2M => self.pages_2m += count,
            PageSize::Size1G => self.pages_1g += count,
        }
    }

    /// Bytes covered by these pages.
    pub fn bytes(&self) -> u64 {
        self.pages_4k * HOST_PAGE_SIZE + self.pages_2m * SIZE_2M + self.pages_1g * SIZE_1G
    }
}

/// One mmap-able area of a BAR: one memslot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AreaPlacement {
    /// Offset inside the BAR (multiple of 4 KiB).
    pub offset: u64,
    /// Length (multiple of 4 KiB).
    pub size: u64,
    /// Guest physical address: the BAR's GPA + `offset`.
    pub gpa: u64,
    /// Offset from the BAR's HVA base (equals `offset`: areas keep their place).
    pub hva_offset: u64,
    /// The largest page KVM can use for any part of the area (see the module docs).
    pub page_size: PageSize,
    /// The area tiled with the largest pages possible.
    pub pages: PageCounts,
}

/// Where one BAR goes and what it can get.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BarPlacement {
    /// BAR index.
    pub index: u8,
    /// BAR size in bytes, as given.
    pub size: u64,
    /// 32 or 64 (serialized as `bits`).
    #[serde(rename = "bits")]
    pub width: BarWidth,
    /// Prefetchable.
    pub prefetchable: bool,
    /// The window it was allocated in.
    pub window: WindowKind,
    /// Guest physical address, a multiple of `reserved`.
    pub gpa: u64,
    /// Bytes reserved in the window: `pow2ceil(max(size, 4 KiB))`.
    pub reserved: u64,
    /// GPA ≡ HVA modulo this (a power of two, at least 4 KiB, at most 1 GiB).
    pub hva_align: u64,
    /// The HVA base must satisfy `hva_base % hva_modulus == hva_phase`.
    pub hva_modulus: u64,
    /// See `hva_modulus`: 0 normally, `hva_align` when `align_cap` pushes the HVA off the
    /// larger boundary.
    pub hva_phase: u64,
    /// The device's `bar-align` cap, if any.
    pub align_cap: Option<PageSize>,
    /// Largest page of any area; `None` (serialized as 0) when the BAR is trapped.
    #[serde(serialize_with = "serialize_optional_page_size")]
    pub page_size: Option<PageSize>,
    /// No memslot at all: every access is emulated through VFIO (sub-page BAR, or nothing
    /// mmap-able).
    pub trap: bool,
    /// mmap-able areas, by offset.
    pub areas: Vec<AreaPlacement>,
    /// Ranges that must trap (everything not in `areas`), by offset, merged.
    pub traps: Vec<BarRange>,
    /// The 4 KiB pages holding the MSI-X table, if it is in this BAR.
    pub msix_table_pages: Option<BarRange>,
    /// The 4 KiB pages holding the MSI-X PBA, if it is in this BAR.
    pub msix_pba_pages: Option<BarRange>,
}

impl BarPlacement {
    /// Whether `hva_base` is a base address the mapper may use for this BAR.
    pub fn hva_base_fits(&self, hva_base: u64) -> bool {
        hva_base % self.hva_modulus == self.hva_phase
    }

    /// The lowest suitable HVA base at or above `hint` (None on overflow).
    pub fn hva_base_at_or_above(&self, hint: u64) -> Option<u64> {
        let base = hint.checked_next_multiple_of(self.hva_modulus)?;
        let candidate = base.checked_add(self.hva_phase)?;
        match candidate.checked_sub(self.hva_modulus) {
            Some(lower) if lower >= hint => Some(lower),
            _ => Some(candidate),
        }
    }
}

fn serialize_optional_page_size<S: Serializer>(
    page: &Option<PageSize>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_u64(page.map_or(0, PageSize::bytes))
}

/// The BARs of one device, by index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DevicePlan {
    /// The device's name.
    pub name: String,
    /// Its `bar-align` cap (`None` = auto).
    pub align_cap: Option<PageSize>,
    /// Its BARs, by index.
    pub bars: Vec<BarPlacement>,
}

/// The placement of every device, in input order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Devices in the order given.
    pub devices: Vec<DevicePlan>,
}

// ---------------------------------------------------------------------------------------
// Errors.
// ---------------------------------------------------------------------------------------

/// Why devices cannot be placed.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    /// `phys_bits` outside [`MIN_PHYS_BITS`]..=[`MAX_PHYS_BITS`].
    #[error("phys-bits {phys_bits} is out of range: give a value from 32 to 52 (the host's, see /proc/cpuinfo \"address sizes\")")]
    PhysBitsOutOfRange {
        /// The value given.
        phys_bits: u8,
    },
    /// RAM ends at or above `1 << phys_bits`.
    #[error("no room for the MMIO64 window: RAM ends at {start:#x}, at or above the {}-bit limit {:#x} (phys-bits {phys_bits}): give the VM less memory", phys_bits, 1u128 << phys_bits)]
    NoMmio64Window {
        /// Where the window would start.
        start: u64,
        /// The physical address bits.
        phys_bits: u8,
    },
    /// Two devices with the same name.
    #[error("device name {name:?} is used twice: give every device a unique name")]
    DuplicateDeviceName {
        /// The name.
        name: String,
    },
    /// BAR index above 5.
    #[error("BAR {index} of {device} does not exist: BAR indexes are 0 to 5")]
    BarIndexOutOfRange {
        /// Device name.
        device: String,
        /// The index given.
        index: u8,
    },
    /// The same BAR index twice.
    #[error("BAR {index} of {device} is listed twice: list each BAR once")]
    DuplicateBar {
        /// Device name.
        device: String,
        /// The index.
        index: u8,
    },
    /// Size 0.
    #[error("BAR {index} of {device} has size 0: leave unimplemented BARs out")]
    ZeroSizeBar {
        /// Device name.
        device: String,
        /// BAR index.
        index: u8,
    },
    /// Larger than [`MAX_BAR_SIZE`].
    #[error(
        "BAR {index} of {device} is {size} bytes, larger than 2^63: that is not a real BAR size"
    )]
    BarTooLarge {
        /// Device name.
        device: String,
        /// BAR index.
        index: u8,
        /// Size given.
        size: u64,
    },
    /// An area whose offset or size is not a multiple of 4 KiB, or is empty.
    #[error("area {offset:#x}+{size:#x} of BAR {index} of {device} is not a non-empty multiple of 4 KiB at a 4 KiB-aligned offset: mmap works on whole pages")]
    AreaUnaligned {
        /// Device name.
        device: String,
        /// BAR index.
        index: u8,
        /// Area offset.
        offset: u64,
        /// Area size.
        size: u64,
    },
    /// An area or MSI-X structure that extends past the end of the BAR (or is empty).
    #[error("{what} {offset:#x}+{size:#x} of BAR {index} of {device} is empty or ends past the BAR's {bar_size:#x} bytes: check the offsets")]
    OutsideBar {
        /// Device name.
        device: String,
        /// BAR index.
        index: u8,
        /// `area`, `MSI-X table` or `MSI-X PBA`.
        what: &'static str,
        /// Its offset.
        offset: u64,
        /// Its size.
        size: u64,
        /// The BAR's size.
        bar_size: u64,
    },
    /// Two mmap-able areas overlap.
    #[error("areas {first_offset:#x}+{first_size:#x} and {second_offset:#x}+{second_size:#x} of BAR {index} of {device} overlap: list disjoint areas")]
    AreasOverlap {
        /// Device name.
        device: String,
        /// BAR index.
        index: u8,
        /// The lower area's offset.
        first_offset: u64,
        /// The lower area's size.
        first_size: u64,
        /// The other area's offset.
        second_offset: u64,
        /// The other area's size.
        second_size: u64,
    },
    /// No naturally aligned free range of the BAR's size is left in its window.
    #[error("BAR {index} of {device} ({}, {width}) does not fit in the {window} window {window_start:#x}..{window_end:#x} (phys-bits {phys_bits}): it needs {} naturally aligned and no such free range is left (the window is too small, or BARs at least as large took it); {}", format_size(*.size), format_size(*.reserved), .window.exhausted_hint())]
    WindowExhausted {
        /// Device name.
        device: String,
        /// BAR index.
        index: u8,
        /// BAR size.
        size: u64,
        /// Bytes it needs (power of two, also its alignment).
        reserved: u64,
        /// 32- or 64-bit.
        width: BarWidth,
        /// Which window.
        window: WindowKind,
        /// Window start.
        window_start: u64,
        /// Window end (exclusive).
        window_end: u64,
        /// The physical address bits.
        phys_bits: u8,
    },
    /// vm-allocator refused the request for another reason (a bug in the planner).
    #[error("allocating BAR {index} of {device} failed inside vm-allocator: {source}; please report this as a barge bug")]
    Allocator {
        /// Device name.
        device: String,
        /// BAR index.
        index: u8,
        /// The allocator's error.
        source: vm_allocator::Error,
    },
}

// ---------------------------------------------------------------------------------------
// Planning.
// ---------------------------------------------------------------------------------------

/// A validated BAR waiting for its address.
struct PreparedBar<'a> {
    device_index: usize,
    device: &'a DeviceInput,
    bar: &'a BarInput,
    reserved: u64,
    areas: Vec<BarRange>,
    msix_table_pages: Option<BarRange>,
    msix_pba_pages: Option<BarRange>,
}

/// Places every BAR of `devices` in `windows`. See the module docs for the rules.
pub fn plan(devices: &[DeviceInput], windows: &Windows) -> Result<Plan, PlacementError> {
    let mut names = HashSet::new();
    let mut prepared = Vec::new();
    for (device_index, device) in devices.iter().enumerate() {
        if !names.insert(device.name.as_str()) {
            return Err(PlacementError::DuplicateDeviceName {
                name: device.name.clone(),
            });
        }
        check_bar_slots(device)?;
        for bar in &device.bars {
            prepared.push(prepare_bar(device_index, device, bar)?);
        }
    }

    // Largest first; ties by device order and BAR index: deterministic and, with
    // power-of-two sizes and natural alignment, free of alignment waste.
    prepared.sort_by_key(|p| (Reverse(p.reserved), p.device_index, p.bar.index));

    let mut allocators = [
        WindowAllocator::new(windows.mmio32),
        WindowAllocator::new(windows.mmio64),
    ];
    let mut placed: Vec<Vec<BarPlacement>> = vec![Vec::new(); devices.len()];
    for p in prepared {
        let window = windows.for_width(p.bar.width);
        let allocator = match p.bar.width {
            BarWidth::Bits32 => &mut allocators[0],
            BarWidth::Bits64 => &mut allocators[1],
        };
        let gpa = allocator.allocate(p.reserved).map_err(|e| match e {
            vm_allocator::Error::ResourceNotAvailable => PlacementError::WindowExhausted {
                device: p.device.name.clone(),
                index: p.bar.index,
                size: p.bar.size,
                reserved: p.reserved,
                width: p.bar.width,
                window: window.kind,
                window_start: window.start,
                window_end: window.end,
                phys_bits: windows.phys_bits,
            },
            source => PlacementError::Allocator {
                device: p.device.name.clone(),
                index: p.bar.index,
                source,
            },
        })?;
        placed[p.device_index].push(place_bar(&p, window.kind, gpa));
    }

    let devices = devices
        .iter()
        .zip(placed)
        .map(|(device, mut bars)| {
            bars.sort_by_key(|b| b.index);
            DevicePlan {
                name: device.name.clone(),
                align_cap: device.align_cap,
                bars,
            }
        })
        .collect();
    Ok(Plan { devices })
}

/// vm-allocator over one window; an empty window refuses everything.
struct WindowAllocator(Option<AddressAllocator>);

impl WindowAllocator {
    fn new(window: Window) -> Self {
        WindowAllocator(AddressAllocator::new(window.start, window.size()).ok())
    }

    /// A naturally aligned range of `size` (a power of two) bytes.
    fn allocate(&mut self, size: u64) -> Result<u64, vm_allocator::Error> {
        let allocator = self
            .0
            .as_mut()
            .ok_or(vm_allocator::Error::ResourceNotAvailable)?;
        allocator
            .allocate(size, size, AllocPolicy::FirstMatch)
            .map(|range| range.start())
    }
}

/// Indexes in range and each given once.
///
/// The upper slot of a 64-bit BAR is not checked here: spec inputs describe hypothetical
/// devices (issue 4's H100 spec lists BAR0 as 64-bit next to BAR1) and placement does not
/// depend on slots. The PCI layer, which emulates the BAR registers, owns that rule.
fn check_bar_slots(device: &DeviceInput) -> Result<(), PlacementError> {
    let mut seen = [false; 6];
    for bar in &device.bars {
        if bar.index > MAX_BAR_INDEX {
            return Err(PlacementError::BarIndexOutOfRange {
                device: device.name.clone(),
                index: bar.index,
            });
        }
        if std::mem::replace(&mut seen[usize::from(bar.index)], true) {
            return Err(PlacementError::DuplicateBar {
                device: device.name.clone(),
                index: bar.index,
            });
        }
    }
    Ok(())
}

fn prepare_bar<'a>(
    device_index: usize,
    device: &'a DeviceInput,
    bar: &'a BarInput,
) -> Result<PreparedBar<'a>, PlacementError> {
    let name = || device.name.clone();
    if bar.size == 0 {
        return Err(PlacementError::ZeroSizeBar {
            device: name(),
            index: bar.index,
        });
    }
    if bar.size > MAX_BAR_SIZE {
        return Err(PlacementError::BarTooLarge {
            device: name(),
            index: bar.index,
            size: bar.size,
        });
    }
    let reserved = bar.size.max(HOST_PAGE_SIZE).next_power_of_two();
    let outside = |what: &'static str, range: &BarRange| PlacementError::OutsideBar {
        device: name(),
        index: bar.index,
        what,
        offset: range.offset,
        size: range.size,
        bar_size: bar.size,
    };

    // The mmap-able areas, validated and sorted.
    let mut areas = match &bar.areas {
        None => {
            let whole = align_down(bar.size, HOST_PAGE_SIZE);
            if whole == 0 {
                Vec::new()
            } else {
                vec![BarRange::new(0, whole)]
            }
        }
        Some(given) => {
            let mut areas = given.clone();
            for area in &areas {
                if area.size == 0 || area.end() > bar.size {
                    return Err(outside("area", area));
                }
                if area.offset % HOST_PAGE_SIZE != 0 || area.size % HOST_PAGE_SIZE != 0 {
                    return Err(PlacementError::AreaUnaligned {
                        device: name(),
                        index: bar.index,
                        offset: area.offset,
                        size: area.size,
                    });
                }
            }
            areas.sort();
            for pair in areas.windows(2) {
                if pair[0].end() > pair[1].offset {
                    return Err(PlacementError::AreasOverlap {
                        device: name(),
                        index: bar.index,
                        first_offset: pair[0].offset,
                        first_size: pair[0].size,
                        second_offset: pair[1].offset,
                        second_size: pair[1].size,
                    });
                }
            }
            areas
        }
    };

    // MSI-X table and PBA: whole 4 KiB pages trap.
    let mut msix_pages = [None, None];
    for (slot, (what, range)) in msix_pages
        .iter_mut()
        .zip([("MSI-X table", bar.msix_table), ("MSI-X PBA", bar.msix_pba)])
    {
        let Some(range) = range else { continue };
        if range.size == 0 || range.end() > bar.size {
            return Err(outside(what, &range));
        }
        let start = align_down(range.offset, HOST_PAGE_SIZE);
        let end = align_up(range.end(), HOST_PAGE_SIZE);
        let pages = BarRange::new(start, end - start);
        areas = subtract(&areas, pages);
        *slot = Some(pages);
    }

    Ok(PreparedBar {
        device_index,
        device,
        bar,
        reserved,
        areas,
        msix_table_pages: msix_pages[0],
        msix_pba_pages: msix_pages[1],
    })
}

/// `areas` (sorted, disjoint) without `hole`.
fn subtract(areas: &[BarRange], hole: BarRange) -> Vec<BarRange> {
    let mut out = Vec::with_capacity(areas.len() + 1);
    for area in areas {
        if hole.end() <= area.offset || area.end() <= hole.offset {
            out.push(*area);
            continue;
        }
        if area.offset < hole.offset {
            out.push(BarRange::new(area.offset, hole.offset - area.offset));
        }
        if hole.end() < area.end() {
            out.push(BarRange::new(hole.end(), area.end() - hole.end()));
        }
    }
    out
}

/// Everything in `[0, size)` not covered by `areas` (sorted, disjoint).
fn complement(areas: &[BarRange], size: u64) -> Vec<BarRange> {
    let mut traps = Vec::new();
    let mut cursor = 0;
    for area in areas {
        if area.offset > cursor {
            traps.push(BarRange::new(cursor, area.offset - cursor));
        }
        cursor = cursor.max(area.end());
    }
    if cursor < size {
        traps.push(BarRange::new(cursor, size - cursor));
    }
    traps
}

fn place_bar(p: &PreparedBar<'_>, window: WindowKind, gpa: u64) -> BarPlacement {
    let natural = p.reserved.min(SIZE_1G);
    let hva_align = p
        .device
        .align_cap
        .map_or(natural, |cap| natural.min(cap.bytes()));
    let capped = hva_align < natural;
    let (hva_modulus, hva_phase) = if capped {
        (2 * hva_align, hva_align)
    } else {
        (hva_align, 0)
    };

    let areas: Vec<AreaPlacement> = p
        .areas
        .iter()
        .map(|area| {
            let area_gpa = gpa + area.offset;
            let (page_size, pages) = area_pages(area_gpa, area.size, hva_align);
            AreaPlacement {
                offset: area.offset,
                size: area.size,
                gpa: area_gpa,
                hva_offset: area.offset,
                page_size,
                pages,
            }
        })
        .collect();
    let page_size = areas.iter().map(|a| a.page_size).max();
    BarPlacement {
        index: p.bar.index,
        size: p.bar.size,
        width: p.bar.width,
        prefetchable: p.bar.prefetchable,
        window,
        gpa,
        reserved: p.reserved,
        hva_align,
        hva_modulus,
        hva_phase,
        align_cap: p.device.align_cap,
        page_size,
        trap: areas.is_empty(),
        traps: complement(&p.areas, p.bar.size),
        areas,
        msix_table_pages: p.msix_table_pages,
        msix_pba_pages: p.msix_pba_pages,
    }
}

/// The largest page (at most `limit` bytes) of which a whole, naturally aligned one fits in
/// `[gpa, gpa + size)`, and the exact tiling of the area with the largest pages possible.
/// `gpa` and `size` are multiples of 4 KiB, `size > 0`.
pub fn area_pages(gpa: u64, size: u64, limit: u64) -> (PageSize, PageCounts) {
    let mut counts = PageCounts::default();
    let sizes: Vec<PageSize> = PageSize::ALL
        .into_iter()
        .rev()
        .filter(|p| p.bytes() <= limit.max(HOST_PAGE_SIZE))
        .collect();
    tile(gpa, gpa + size, &sizes, &mut counts);
    let largest = sizes
        .iter()
        .copied()
        .find(|p| match p {
            PageSize::Size4K => counts.pages_4k > 0,
            PageSize::Size2M => counts.pages_2m > 0,
            PageSize::Size1G => counts.pages_1g > 0,
        })
        .unwrap_or(PageSize::Size4K);
    (largest, counts)
}

/// Tiles `[start, end)` with pages from `sizes` (largest first): whole aligned pages of the
/// first size, the head and tail recursively with the rest.
fn tile(start: u64, end: u64, sizes: &[PageSize], counts: &mut PageCounts) {
    let Some((&page, smaller)) = sizes.split_first() else {
        return;
    };
    if start >= end {
        return;
    }
    let bytes = page.bytes();
    let first = align_up(start, bytes);
    let last = align_down(end, bytes);
    if first < last {
        counts.add(page, (last - first) / bytes);
        tile(start, first, smaller, counts);
        tile(last, end, smaller, counts);
    } else {
        tile(start, end, smaller, counts);
    }
}

fn align_down(value: u64, align: u64) -> u64 {
    value - value % align
}

fn align_up(value: u64, align: u64) -> u64 {
    value.div_ceil(align).saturating_mul(align)
}

// ---------------------------------------------------------------------------------------
// Rendering.
// ---------------------------------------------------------------------------------------

/// `bytes` with a binary unit: exact (`128 GiB`, `256 B`) when it divides, else two
/// decimals (`1.50 KiB`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes >> (10 * (unit + 1)) > 0 {
        unit += 1;
    }
    let scale = 1u64 << (10 * unit);
    if bytes % scale == 0 {
        format!("{} {}", bytes / scale, UNITS[unit])
    } else {
        format!("{:.2} {}", bytes as f64 / scale as f64, UNITS[unit])
    }
}

/// A human-readable table of the plan: per device, one line per BAR and one per area and
/// trapped range, sizes with units, addresses in hex.
pub fn render_table(plan: &Plan) -> String {
    let mut out = String::new();
    for device in &plan.devices {
        let cap = device
            .align_cap
            .map_or("auto".to_string(), |c| c.name().to_ascii_lowercase());
        let _ = writeln!(out, "{}  (bar-align {cap})", device.name);
        let _ = writeln!(
            out,
            "  {:<3} {:>9}  {:<11} {:<6}  {:<37}  {:>9}  page",
            "BAR", "size", "type", "window", "gpa", "hva-align"
        );
        for bar in &device.bars {
            let kind = format!(
                "{}{}",
                bar.width,
                if bar.prefetchable { " pref" } else { "" }
            );
            let range = format!("{:#018x}-{:#018x}", bar.gpa, bar.gpa + bar.reserved - 1);
            let page = bar.page_size.map_or("trap", PageSize::name);
            let mut align = format_size(bar.hva_align);
            if bar.hva_phase != 0 {
                align = format!("{align}+{}", format_size(bar.hva_phase));
            }
            let _ = writeln!(
                out,
                "  {:<3} {:>9}  {:<11} {:<6}  {:<37}  {:>9}  {}",
                bar.index,
                format_size(bar.size),
                kind,
                bar.window,
                range,
                align,
                page
            );
            for area in &bar.areas {
                let _ = writeln!(
                    out,
                    "        area {:#x}+{} at gpa {:#x}: page {} ({})",
                    area.offset,
                    format_size(area.size),
                    area.gpa,
                    area.page_size,
                    describe_pages(&area.pages)
                );
            }
            for trap in &bar.traps {
                let why = trap_reason(bar, trap);
                let _ = writeln!(
                    out,
                    "        trap {:#x}+{}{why}",
                    trap.offset,
                    format_size(trap.size)
                );
            }
        }
    }
    out
}

fn describe_pages(pages: &PageCounts) -> String {
    let parts: Vec<String> = [
        (pages.pages_1g, "1G"),
        (pages.pages_2m, "2M"),
        (pages.pages_4k, "4K"),
    ]
    .into_iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, name)| format!("{n} x {name}"))
    .collect();
    parts.join(" + ")
}

fn trap_reason(bar: &BarPlacement, trap: &BarRange) -> &'static str {
    let touches = |pages: Option<BarRange>| {
        pages.is_some_and(|p| p.offset < trap.end() && trap.offset < p.end())
    };
    if bar.size < HOST_PAGE_SIZE {
        " (sub-page BAR: emulated, no memslot)"
    } else if touches(bar.msix_table_pages) && touches(bar.msix_pba_pages) {
        " (MSI-X table and PBA)"
    } else if touches(bar.msix_table_pages) {
        " (MSI-X table)"
    } else if touches(bar.msix_pba_pages) {
        " (MSI-X PBA)"
    } else if trap.size < HOST_PAGE_SIZE && trap.end() == bar.size {
        " (sub-page tail)"
    } else {
        " (not mmap-able)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ram::ram_regions;

    const KIB: u64 = 1 << 10;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn windows(ram: u64, phys_bits: u8) -> Windows {
        Windows::new(&ram_regions(ram).unwrap(), phys_bits).unwrap()
    }

    fn device(name: &str, bars: Vec<BarInput>) -> DeviceInput {
        DeviceInput {
            name: name.to_string(),
            bars,
            align_cap: None,
        }
    }

    fn h100(name: &str) -> DeviceInput {
        device(
            name,
            vec![
                BarInput::new(0, 16 * MIB, BarWidth::Bits64, false),
                BarInput::new(1, 128 * GIB, BarWidth::Bits64, true),
                BarInput::new(3, 32 * MIB, BarWidth::Bits64, true),
            ],
        )
    }

    fn ivshmem() -> DeviceInput {
        device(
            "shmem0",
            vec![
                BarInput::new(0, 256, BarWidth::Bits32, false),
                BarInput::new(2, 8 * GIB, BarWidth::Bits64, true),
            ],
        )
    }

    #[test]
    fn h100_gets_natural_alignment_and_1g_pages_for_bar1() {
        let w = windows(8 * GIB, 46);
        let plan = plan(&[h100("0000:41:00.0")], &w).unwrap();
        let bars = &plan.devices[0].bars;
        assert_eq!(bars.iter().map(|b| b.index).collect::<Vec<_>>(), [0, 1, 3]);
        for bar in bars {
            assert_eq!(bar.gpa % bar.size, 0, "BAR {}", bar.index);
            assert!(w.mmio64.contains(bar.gpa, bar.reserved));
            assert_eq!(bar.areas.len(), 1);
            assert!(bar.traps.is_empty());
        }
        let bar1 = &bars[1];
        assert_eq!(bar1.gpa, 128 * GIB, "first 128 GiB boundary above RAM");
        assert_eq!(bar1.page_size, Some(PageSize::Size1G));
        assert_eq!(bar1.hva_align, GIB);
        assert_eq!((bar1.hva_modulus, bar1.hva_phase), (GIB, 0));
        assert_eq!(bar1.areas[0].pages.pages_1g, 128);
        assert_eq!(bars[0].page_size, Some(PageSize::Size2M));
        assert_eq!(bars[0].hva_align, 16 * MIB);
        assert_eq!(bars[2].page_size, Some(PageSize::Size2M));
        // Smaller BARs fill the gap below the 128 GiB boundary, largest first.
        assert_eq!(bars[2].gpa, 9 * GIB);
        assert_eq!(bars[0].gpa, 9 * GIB + 32 * MIB);
    }

    #[test]
    fn ivshmem_bar0_is_trapped_on_its_own_page_and_bar2_gets_1g_pages() {
        let plan = plan(&[ivshmem()], &windows(GIB, 40)).unwrap();
        let bar0 = &plan.devices[0].bars[0];
        assert!(bar0.trap);
        assert!(bar0.areas.is_empty());
        assert_eq!(bar0.page_size, None);
        assert_eq!(bar0.reserved, 4 * KIB);
        assert_eq!(bar0.gpa % (4 * KIB), 0);
        assert_eq!(bar0.window, WindowKind::Mmio32);
        assert_eq!(bar0.traps, vec![BarRange::new(0, 256)]);
        let bar2 = &plan.devices[0].bars[1];
        assert!(!bar2.trap);
        assert_eq!(bar2.page_size, Some(PageSize::Size1G));
        assert_eq!(bar2.areas[0].pages.pages_1g, 8);
        assert_eq!(bar2.gpa % (8 * GIB), 0);
    }

    #[test]
    fn msix_table_in_the_first_page_leaves_an_area_from_4k_with_1g_pages_after_2m_and_1g() {
        let mut bar = BarInput::new(0, 2 * GIB, BarWidth::Bits64, true);
        bar.msix_table = Some(BarRange::new(0, 0x800));
        bar.msix_pba = Some(BarRange::new(0x800, 0x10));
        let plan = plan(&[device("nic", vec![bar])], &windows(GIB, 40)).unwrap();
        let bar = &plan.devices[0].bars[0];
        assert_eq!(bar.msix_table_pages, Some(BarRange::new(0, 4 * KIB)));
        assert_eq!(bar.traps, vec![BarRange::new(0, 4 * KIB)]);
        assert_eq!(bar.areas.len(), 1);
        let area = &bar.areas[0];
        assert_eq!((area.offset, area.size), (4 * KIB, 2 * GIB - 4 * KIB));
        assert_eq!(area.gpa, bar.gpa + 4 * KIB);
        // 4K pages up to 2 MiB, 2M pages up to 1 GiB, then one 1G page.
        assert_eq!(area.page_size, PageSize::Size1G);
        assert_eq!(
            area.pages,
            PageCounts {
                pages_4k: 511,
                pages_2m: 511,
                pages_1g: 1
            }
        );
        assert_eq!(area.pages.bytes(), area.size);
    }

    #[test]
    fn sparse_areas_keep_their_offsets_so_huge_pages_survive_a_hole() {
        let mut bar = BarInput::new(1, 4 * GIB, BarWidth::Bits64, true);
        bar.areas = Some(vec![
            BarRange::new(GIB, 3 * GIB),
            BarRange::new(0, 64 * KIB),
        ]);
        let plan = plan(&[device("gpu", vec![bar])], &windows(GIB, 40)).unwrap();
        let bar = &plan.devices[0].bars[0];
        assert_eq!(bar.areas[0].offset, 0);
        assert_eq!(bar.areas[0].page_size, PageSize::Size4K);
        assert_eq!(bar.areas[1].gpa, bar.gpa + GIB);
        assert_eq!(bar.areas[1].page_size, PageSize::Size1G);
        assert_eq!(bar.areas[1].pages.pages_1g, 3);
        assert_eq!(bar.traps, vec![BarRange::new(64 * KIB, GIB - 64 * KIB)]);
        assert!(render_table(&plan).contains("not mmap-able"));
    }

    #[test]
    fn bar_align_2m_forces_2m_pages_with_the_hva_off_the_1g_boundary() {
        let mut dev = device(
            "shmem0",
            vec![BarInput::new(2, 2 * GIB, BarWidth::Bits64, true)],
        );
        dev.align_cap = Some(PageSize::Size2M);
        let plan = plan(&[dev], &windows(GIB, 40)).unwrap();
        let bar = &plan.devices[0].bars[0];
        assert_eq!(bar.gpa % (2 * GIB), 0, "the GPA stays naturally aligned");
        assert_eq!(bar.hva_align, 2 * MIB);
        assert_eq!((bar.hva_modulus, bar.hva_phase), (4 * MIB, 2 * MIB));
        assert_eq!(bar.page_size, Some(PageSize::Size2M));
        assert_eq!(bar.areas[0].pages.pages_2m, 1024);
        assert_eq!(bar.areas[0].pages.pages_1g, 0);
        let hva = bar.hva_base_at_or_above(0x7f00_0000_0000).unwrap();
        assert!(bar.hva_base_fits(hva));
        assert_eq!((hva - bar.gpa) % (2 * MIB), 0);
        assert_ne!((hva.wrapping_sub(bar.gpa)) % GIB, 0);
        assert_ne!((hva.wrapping_sub(bar.gpa)) % (4 * MIB), 0);
    }

    #[test]
    fn bar_align_4k_forces_4k_pages() {
        let mut dev = device(
            "shmem0",
            vec![BarInput::new(2, 2 * GIB, BarWidth::Bits64, true)],
        );
        dev.align_cap = Some(PageSize::Size4K);
        let plan = plan(&[dev], &windows(GIB, 40)).unwrap();
        let bar = &plan.devices[0].bars[0];
        assert_eq!(
            (bar.hva_align, bar.hva_modulus, bar.hva_phase),
            (4 * KIB, 8 * KIB, 4 * KIB)
        );
        assert_eq!(bar.page_size, Some(PageSize::Size4K));
        assert_eq!(bar.areas[0].pages.pages_4k, 2 * GIB / (4 * KIB));
    }

    #[test]
    fn bar_align_1g_changes_nothing_for_a_huge_bar_and_caps_above_the_bar_are_no_ops() {
        let mut dev = h100("gpu");
        dev.align_cap = Some(PageSize::Size1G);
        let capped = plan(&[dev], &windows(GIB, 46)).unwrap();
        let auto = plan(&[h100("gpu")], &windows(GIB, 46)).unwrap();
        for (c, a) in capped.devices[0].bars.iter().zip(&auto.devices[0].bars) {
            assert_eq!((c.gpa, c.hva_align, c.hva_phase), (a.gpa, a.hva_align, 0));
            assert_eq!(c.page_size, a.page_size);
        }
    }

    #[test]
    fn several_128g_bars_fit_with_46_phys_bits_and_are_packed_largest_first() {
        let devices: Vec<_> = (0..8)
            .map(|i| h100(&format!("0000:{i:02x}:00.0")))
            .collect();
        let w = windows(64 * GIB, 46);
        let plan = plan(&devices, &w).unwrap();
        let mut big: Vec<u64> = plan.devices.iter().map(|d| d.bars[1].gpa).collect();
        big.sort();
        let expected: Vec<u64> = (1..=8).map(|i| i * 128 * GIB).collect();
        assert_eq!(big, expected);
        // Deterministic.
        assert_eq!(plan, super::plan(&devices, &w).unwrap());
    }

    #[test]
    fn a_128g_bar_does_not_fit_with_39_phys_bits_and_the_error_says_so() {
        // 39 bits = 512 GiB; 4 × 128 GiB cannot fit above 4 GiB of RAM.
        let devices: Vec<_> = (0..4).map(|i| h100(&format!("0000:4{i}:00.0"))).collect();
        let err = plan(&devices, &windows(4 * GIB, 39)).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(
                err,
                PlacementError::WindowExhausted {
                    index: 1,
                    window: WindowKind::Mmio64,
                    ..
                }
            ),
            "{msg}"
        );
        assert!(
            msg.contains("BAR 1 of 0000:43:00.0 (128 GiB, 64-bit)"),
            "{msg}"
        );
        assert!(
            msg.contains("MMIO64 window 0x140000000..0x8000000000 (phys-bits 39)"),
            "{msg}"
        );
        assert!(msg.contains("more physical address bits"), "{msg}");
    }

    #[test]
    fn a_32bit_bar_larger_than_the_mmio32_window_is_refused() {
        let dev = device(
            "big32",
            vec![BarInput::new(0, GIB, BarWidth::Bits32, false)],
        );
        let err = plan(&[dev], &windows(GIB, 40)).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("MMIO32 window 0xc0000000..0xe0000000"),
            "{msg}"
        );
        assert!(msg.contains("512 MiB MMIO32 window"), "{msg}");
    }

    #[test]
    fn non_power_of_two_bars_reserve_the_next_power_of_two() {
        let mut bar = BarInput::new(0, 3 * GIB + 100, BarWidth::Bits64, false);
        bar.areas = None;
        let small = BarInput::new(2, 5000, BarWidth::Bits64, false);
        let plan = plan(&[device("odd", vec![bar, small])], &windows(GIB, 40)).unwrap();
        let bar = &plan.devices[0].bars[0];
        assert_eq!(bar.reserved, 4 * GIB);
        assert_eq!(bar.gpa % (4 * GIB), 0);
        assert_eq!(bar.areas[0].size, 3 * GIB);
        assert_eq!(bar.traps, vec![BarRange::new(3 * GIB, 100)]);
        let small = &plan.devices[0].bars[1];
        assert_eq!(small.reserved, 8 * KIB);
        assert_eq!(small.areas[0].size, 4 * KIB);
        assert!(render_table(&plan).contains("sub-page tail"));
    }

    #[test]
    fn input_errors_name_the_device_and_bar() {
        let w = windows(GIB, 40);
        let bar = |index, size, width| BarInput::new(index, size, width, false);
        let cases: Vec<(DeviceInput, &str)> = vec![
            (
                device("d", vec![bar(6, 4096, BarWidth::Bits32)]),
                "BAR 6 of d does not exist",
            ),
            (
                device(
                    "d",
                    vec![
                        bar(1, 4096, BarWidth::Bits64),
                        bar(1, 4096, BarWidth::Bits32),
                    ],
                ),
                "BAR 1 of d is listed twice",
            ),
            (device("d", vec![bar(0, 0, BarWidth::Bits32)]), "size 0"),
            (
                device("d", vec![bar(0, u64::MAX, BarWidth::Bits64)]),
                "larger than 2^63",
            ),
        ];
        for (dev, expected) in cases {
            let msg = plan(&[dev], &w).unwrap_err().to_string();
            assert!(msg.contains(expected), "{msg:?} lacks {expected:?}");
        }
        let dup = plan(&[device("x", vec![]), device("x", vec![])], &w).unwrap_err();
        assert!(matches!(dup, PlacementError::DuplicateDeviceName { .. }));
    }

    #[test]
    fn area_and_msix_errors() {
        let w = windows(GIB, 40);
        let with = |areas: Option<Vec<BarRange>>, table: Option<BarRange>| {
            let mut bar = BarInput::new(0, MIB, BarWidth::Bits64, false);
            bar.areas = areas;
            bar.msix_table = table;
            plan(&[device("d", vec![bar])], &w).unwrap_err()
        };
        assert!(matches!(
            with(Some(vec![BarRange::new(100, 4096)]), None),
            PlacementError::AreaUnaligned { .. }
        ));
        assert!(matches!(
            with(Some(vec![BarRange::new(0, 2 * MIB)]), None),
            PlacementError::OutsideBar { what: "area", .. }
        ));
        assert!(matches!(
            with(
                Some(vec![BarRange::new(0, 8192), BarRange::new(4096, 4096)]),
                None
            ),
            PlacementError::AreasOverlap { .. }
        ));
        let msg = with(None, Some(BarRange::new(MIB, 16))).to_string();
        assert!(
            msg.contains("MSI-X table 0x100000+0x10 of BAR 0 of d"),
            "{msg}"
        );
    }

    #[test]
    fn windows_errors() {
        assert!(matches!(
            Windows::new(&[], 20),
            Err(PlacementError::PhysBitsOutOfRange { phys_bits: 20 })
        ));
        let err = Windows::new(&ram_regions(64 * GIB).unwrap(), 36).unwrap_err();
        assert!(matches!(err, PlacementError::NoMmio64Window { .. }));
        assert!(err.to_string().contains("less memory"), "{err}");
        let w = windows(GIB, 52);
        assert_eq!(w.mmio64.end, 1 << 52);
        assert_eq!(w.mmio64.start, 4 * GIB);
        assert_eq!(w.mmio32.start, PCI_MMIO32_START);
    }

    #[test]
    fn json_has_the_documented_shape() {
        let plan = plan(&[ivshmem()], &windows(GIB, 40)).unwrap();
        let json: serde_json::Value = serde_json::to_value(&plan).unwrap();
        let bar = &json["devices"][0]["bars"][1];
        assert_eq!(json["devices"][0]["name"], "shmem0");
        for key in ["index", "size", "gpa", "hva_align", "page_size", "areas"] {
            assert!(bar.get(key).is_some(), "{key} missing in {bar}");
        }
        assert_eq!(bar["size"], 8 * GIB);
        assert_eq!(bar["page_size"], GIB);
        assert_eq!(bar["bits"], 64);
        for key in ["offset", "size", "gpa", "page_size"] {
            assert!(bar["areas"][0][key].is_u64(), "{key} in {bar}");
        }
        assert_eq!(json["devices"][0]["bars"][0]["page_size"], 0);
    }

    #[test]
    fn table_shows_units_and_hex() {
        let plan = plan(&[h100("0000:41:00.0")], &windows(8 * GIB, 46)).unwrap();
        let table = render_table(&plan);
        assert!(table.contains("0000:41:00.0  (bar-align auto)"), "{table}");
        assert!(table.contains("128 GiB"), "{table}");
        assert!(table.contains("0x0000002000000000"), "{table}");
        assert!(table.contains("128 x 1G"), "{table}");
    }

    #[test]
    fn format_size_is_exact_when_it_can_be() {
        assert_eq!(format_size(256), "256 B");
        assert_eq!(format_size(128 * GIB), "128 GiB");
        assert_eq!(format_size(1536), "1.50 KiB");
        assert_eq!(format_size(0), "0 B");
    }

    #[test]
    fn page_sizes_parse_and_print() {
        assert_eq!("2M".parse::<PageSize>().unwrap(), PageSize::Size2M);
        assert_eq!("1gib".parse::<PageSize>().unwrap(), PageSize::Size1G);
        assert!("3m".parse::<PageSize>().is_err());
        assert_eq!(PageSize::from_bytes(4096), Some(PageSize::Size4K));
        assert_eq!(PageSize::Size1G.to_string(), "1G");
    }

    #[test]
    fn area_pages_tiles_exactly() {
        let (page, counts) = area_pages(GIB - 4 * KIB, 2 * MIB + 8 * KIB, GIB);
        assert_eq!(page, PageSize::Size2M);
        assert_eq!(
            counts,
            PageCounts {
                pages_4k: 2,
                pages_2m: 1,
                pages_1g: 0
            }
        );
        let (page, _) = area_pages(0, 2 * GIB, 2 * MIB);
        assert_eq!(page, PageSize::Size2M);
    }
}
