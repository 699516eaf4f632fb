//! The planner's value types: its input ([`DeviceInput`] and its [`BarInput`]s), the
//! guest's BAR [`Windows`], its output ([`Plan`], [`DevicePlan`], [`BarPlacement`],
//! [`AreaPlacement`], [`PageCounts`]), page sizes and widths, and [`PlacementError`].
//!
//! Data and small accessors only: the rules that turn inputs into a [`Plan`] are in
//! `planner.rs`, its text form in `render.rs`. A [`BarPlacement`] stores what the planner
//! decided (the GPA, the HVA alignment, the mmap-able areas, the MSI-X pages) and derives
//! the rest with methods; its JSON form, the one `barge plan --json` prints, includes the
//! derived values and the device's `bar-align` cap on every BAR.

use std::fmt;
use std::str::FromStr;

use arch::layout::{PCI_MMIO32_SIZE, PCI_MMIO32_START};
use serde::ser::SerializeStruct;
use serde::{Serialize, Serializer};

use crate::ram::{mmio64_window_start, RamRegion};
use crate::size::format_size;

/// Host base page size; mmap-able areas and trap rounding use it.
pub const HOST_PAGE_SIZE: u64 = 4096;
/// The largest page a BAR's host mapping (and so KVM's) can get on this architecture:
/// 1 GiB on x86_64 (PUD pfnmap), 2 MiB on aarch64, whose kernels have PMD pfnmap but no
/// PUD pfnmap. The plan's page counts never go above it; the HVA is still aligned to the
/// BAR's natural alignment (up to 1 GiB), which costs nothing.
pub const HOST_MAX_PFNMAP_PAGE: u64 = if cfg!(target_arch = "aarch64") {
    2 << 20
} else {
    1 << 30
};
/// Largest PCI BAR index (BARs 0..=5).
pub const MAX_BAR_INDEX: u8 = 5;
/// Smallest physical-address width [`Windows::new`] accepts.
pub const MIN_PHYS_BITS: u8 = 32;
/// Largest physical-address width on x86-64 (MAXPHYADDR ≤ 52).
pub const MAX_PHYS_BITS: u8 = 52;
/// Largest BAR size the planner accepts (2^63 bytes: its reservation must fit in a u64).
pub const MAX_BAR_SIZE: u64 = 1 << 63;

pub(super) const SIZE_2M: u64 = 2 << 20;
pub(super) const SIZE_1G: u64 = 1 << 30;

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
    /// The window a BAR of this width goes into: MMIO32 for 32-bit BARs, MMIO64 for
    /// 64-bit ones.
    pub const fn for_width(width: BarWidth) -> WindowKind {
        match width {
            BarWidth::Bits32 => WindowKind::Mmio32,
            BarWidth::Bits64 => WindowKind::Mmio64,
        }
    }

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

    /// The window a BAR of this width goes into ([`WindowKind::for_width`]).
    pub fn for_width(&self, width: BarWidth) -> &Window {
        match WindowKind::for_width(width) {
            WindowKind::Mmio32 => &self.mmio32,
            WindowKind::Mmio64 => &self.mmio64,
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
    pub(super) fn add(&mut self, page: PageSize, count: u64) {
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

/// Bytes a BAR of `size` bytes reserves in its window, also its GPA alignment:
/// `pow2ceil(max(size, 4 KiB))` (`size` at most [`MAX_BAR_SIZE`]).
pub(super) fn reservation(size: u64) -> u64 {
    size.max(HOST_PAGE_SIZE).next_power_of_two()
}

/// A BAR's natural HVA alignment, the largest page it can get without a
/// `bar-align` cap: `min(reserved, 1 GiB)`.
pub(super) fn natural_align(reserved: u64) -> u64 {
    reserved.min(SIZE_1G)
}

/// One mmap-able area of a BAR: one memslot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AreaPlacement {
    /// Offset inside the BAR (multiple of 4 KiB).
    pub offset: u64,
    /// Length (multiple of 4 KiB).
    pub size: u64,
    /// Guest physical address: the BAR's GPA + `offset`.
    pub gpa: u64,
    /// The largest page KVM can use for any part of the area (see the module docs).
    pub page_size: PageSize,
    /// The area tiled with the largest pages possible.
    pub pages: PageCounts,
}

impl AreaPlacement {
    /// Offset from the BAR's HVA base: always `offset`, because areas keep their place
    /// inside the BAR's host mapping as they do inside the BAR.
    pub const fn hva_offset(&self) -> u64 {
        self.offset
    }
}

/// Serialized with `hva_offset` after `gpa`.
impl Serialize for AreaPlacement {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut area = serializer.serialize_struct("AreaPlacement", 6)?;
        area.serialize_field("offset", &self.offset)?;
        area.serialize_field("size", &self.size)?;
        area.serialize_field("gpa", &self.gpa)?;
        area.serialize_field("hva_offset", &self.hva_offset())?;
        area.serialize_field("page_size", &self.page_size)?;
        area.serialize_field("pages", &self.pages)?;
        area.end()
    }
}

/// Where one BAR goes and what it can get.
///
/// The fields are what the planner was given (index, size, width, prefetchable) and what
/// it decided (GPA, HVA alignment, areas, MSI-X pages); everything that follows from them
/// is a method: the window ([`Self::window`]), the reservation ([`Self::reserved`]), the HVA
/// rule ([`Self::hva_modulus`], [`Self::hva_phase`], [`Self::effective_align_cap`]), the
/// largest page ([`Self::page_size`]), whether the BAR traps entirely ([`Self::trapped`])
/// and its trapped ranges ([`Self::traps`]). The device's `bar-align` cap itself is in
/// [`DevicePlan::align_cap`]; what it does to this BAR is in `hva_align`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BarPlacement {
    /// BAR index.
    pub index: u8,
    /// BAR size in bytes, as given.
    pub size: u64,
    /// 32 or 64 (`bits` in the JSON).
    pub width: BarWidth,
    /// Prefetchable.
    pub prefetchable: bool,
    /// Guest physical address, a multiple of [`Self::reserved`].
    pub gpa: u64,
    /// GPA ≡ HVA modulo this (a power of two, at least 4 KiB, at most 1 GiB): the natural
    /// `min(reserved, 1 GiB)`, or the device's `bar-align` cap where that is smaller.
    pub hva_align: u64,
    /// mmap-able areas, by offset.
    pub areas: Vec<AreaPlacement>,
    /// The 4 KiB pages holding the MSI-X table, if it is in this BAR.
    pub msix_table_pages: Option<BarRange>,
    /// The 4 KiB pages holding the MSI-X PBA, if it is in this BAR.
    pub msix_pba_pages: Option<BarRange>,
}

impl BarPlacement {
    /// The window it was allocated in (the one for its width).
    pub const fn window(&self) -> WindowKind {
        WindowKind::for_width(self.width)
    }

    /// Bytes reserved in the window: `pow2ceil(max(size, 4 KiB))`, also the GPA's alignment.
    pub fn reserved(&self) -> u64 {
        reservation(self.size)
    }

    /// Whether a `bar-align` cap limits this BAR: `hva_align` is below the natural
    /// `min(reserved, 1 GiB)`.
    fn capped(&self) -> bool {
        self.hva_align < self.natural_align()
    }

    /// The HVA alignment this BAR gets without a `bar-align` cap, and so the
    /// largest page it can get: `min(reserved, 1 GiB)`.
    pub fn natural_align(&self) -> u64 {
        natural_align(self.reserved())
    }

    /// The `bar-align` cap that limits this BAR, as a page size (equal to `hva_align`);
    /// `None` when the BAR keeps its natural alignment `min(reserved, 1 GiB)` (no cap, or a
    /// cap at least that large).
    pub fn effective_align_cap(&self) -> Option<PageSize> {
        if self.capped() {
            PageSize::from_bytes(self.hva_align)
        } else {
            None
        }
    }

    /// The HVA base must satisfy `hva_base % hva_modulus == hva_phase`: `hva_align`
    /// normally, `2 × hva_align` when a `bar-align` cap limits the BAR.
    pub fn hva_modulus(&self) -> u64 {
        if self.capped() {
            2 * self.hva_align
        } else {
            self.hva_align
        }
    }

    /// See [`Self::hva_modulus`]: 0 normally, `hva_align` when a `bar-align` cap limits the
    /// BAR, which puts the HVA off the larger boundary (see the module docs).
    pub fn hva_phase(&self) -> u64 {
        if self.capped() {
            self.hva_align
        } else {
            0
        }
    }

    /// Largest page of any area; `None` when the BAR is trapped.
    pub fn page_size(&self) -> Option<PageSize> {
        self.areas.iter().map(|area| area.page_size).max()
    }

    /// No memslot at all: every access is emulated through VFIO (sub-page BAR, or nothing
    /// mmap-able). True exactly when the BAR has no areas.
    pub fn trapped(&self) -> bool {
        self.areas.is_empty()
    }

    /// Ranges that must trap: everything of `[0, size)` not in `areas`, by offset, merged.
    pub fn traps(&self) -> Vec<BarRange> {
        let mut traps = Vec::new();
        let mut cursor = 0;
        for area in &self.areas {
            if area.offset > cursor {
                traps.push(BarRange::new(cursor, area.offset - cursor));
            }
            cursor = cursor.max(area.offset.saturating_add(area.size));
        }
        if cursor < self.size {
            traps.push(BarRange::new(cursor, self.size - cursor));
        }
        traps
    }

    /// Whether `hva_base` is a base address the mapper may use for this BAR.
    pub fn hva_base_fits(&self, hva_base: u64) -> bool {
        hva_base % self.hva_modulus() == self.hva_phase()
    }

    /// The lowest suitable HVA base at or above `hint` (None on overflow).
    pub fn hva_base_at_or_above(&self, hint: u64) -> Option<u64> {
        let modulus = self.hva_modulus();
        let base = hint.checked_next_multiple_of(modulus)?;
        let candidate = base.checked_add(self.hva_phase())?;
        match candidate.checked_sub(modulus) {
            Some(lower) if lower >= hint => Some(lower),
            _ => Some(candidate),
        }
    }
}

/// The JSON form of a [`BarPlacement`]: its fields and derived values, and the device's
/// `bar-align` cap (`align_cap`), in the order `barge plan --json` has always printed them.
#[derive(Serialize)]
struct BarPlacementJson<'a> {
    index: u8,
    size: u64,
    bits: BarWidth,
    prefetchable: bool,
    window: WindowKind,
    gpa: u64,
    reserved: u64,
    hva_align: u64,
    hva_modulus: u64,
    hva_phase: u64,
    align_cap: Option<PageSize>,
    /// `None` serialized as 0.
    #[serde(serialize_with = "serialize_optional_page_size")]
    page_size: Option<PageSize>,
    trap: bool,
    areas: &'a [AreaPlacement],
    traps: Vec<BarRange>,
    msix_table_pages: Option<BarRange>,
    msix_pba_pages: Option<BarRange>,
}

impl<'a> BarPlacementJson<'a> {
    fn new(bar: &'a BarPlacement, align_cap: Option<PageSize>) -> Self {
        BarPlacementJson {
            index: bar.index,
            size: bar.size,
            bits: bar.width,
            prefetchable: bar.prefetchable,
            window: bar.window(),
            gpa: bar.gpa,
            reserved: bar.reserved(),
            hva_align: bar.hva_align,
            hva_modulus: bar.hva_modulus(),
            hva_phase: bar.hva_phase(),
            align_cap,
            page_size: bar.page_size(),
            trap: bar.trapped(),
            areas: &bar.areas,
            traps: bar.traps(),
            msix_table_pages: bar.msix_table_pages,
            msix_pba_pages: bar.msix_pba_pages,
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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DevicePlan {
    pub name: String,
    /// Its `bar-align` cap (`None` = auto).
    pub align_cap: Option<PageSize>,
    /// Its BARs, by index.
    pub bars: Vec<BarPlacement>,
}

/// Serialized as `name`, `align_cap` and `bars`, each BAR in its JSON form with
/// `align_cap` repeated in it.
impl Serialize for DevicePlan {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let bars: Vec<BarPlacementJson<'_>> = self
            .bars
            .iter()
            .map(|bar| BarPlacementJson::new(bar, self.align_cap))
            .collect();
        let mut device = serializer.serialize_struct("DevicePlan", 3)?;
        device.serialize_field("name", &self.name)?;
        device.serialize_field("align_cap", &self.align_cap)?;
        device.serialize_field("bars", &bars)?;
        device.end()
    }
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
    PhysBitsOutOfRange { phys_bits: u8 },
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
    DuplicateDeviceName { name: String },
    /// BAR index above 5.
    #[error("BAR {index} of {device} does not exist: BAR indexes are 0 to 5")]
    BarIndexOutOfRange {
        /// Device name.
        device: String,
        index: u8,
    },
    /// The same BAR index twice.
    #[error("BAR {index} of {device} is listed twice: list each BAR once")]
    DuplicateBar {
        /// Device name.
        device: String,
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
        offset: u64,
        size: u64,
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
        window: WindowKind,
        /// Window start.
        window_start: u64,
        /// Window end (exclusive).
        window_end: u64,
        /// The physical address bits.
        phys_bits: u8,
    },
    /// The devices do not fit this host's 64-bit address space, and a host
    /// with `needed` physical address bits would fit them (see
    /// [`crate::placement::plan_for_host`]).
    #[error("{source} (a host with phys-bits {needed} or more would fit every BAR)")]
    NeedsPhysBits {
        /// The smallest phys-bits with room for every BAR.
        needed: u8,
        /// Why they do not fit now.
        source: Box<PlacementError>,
    },
    /// The devices do not fit even 52 physical address bits.
    #[error("{source} (not even a host with phys-bits 52 would fit them: pass fewer devices, give the VM less memory or use smaller BARs)")]
    BeyondEveryHost {
        /// Why they do not fit now.
        source: Box<PlacementError>,
    },
    /// vm-allocator refused the request for another reason (a bug in the planner).
    #[error("allocating BAR {index} of {device} failed inside vm-allocator: {source}; please report this as a barge bug")]
    Allocator {
        /// Device name.
        device: String,
        /// BAR index.
        index: u8,
        source: vm_allocator::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::fixtures::{ivshmem, windows, GIB};
    use crate::placement::planner::plan;
    use crate::ram::ram_regions;

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
    fn json_keeps_the_derived_values_and_the_cap_on_every_bar_in_order() {
        let mut shmem = ivshmem();
        shmem.align_cap = Some(PageSize::Size2M);
        let plan = plan(&[shmem], &windows(GIB, 40)).unwrap();
        let json = serde_json::to_string(&plan).unwrap();
        let (bar0, bar2) = (&plan.devices[0].bars[0], &plan.devices[0].bars[1]);
        let expected = [
            format!(
                r#"{{"name":"shmem0","align_cap":2097152,"bars":[{{"index":0,"size":256,"bits":32,"prefetchable":false,"window":"mmio32","gpa":{},"reserved":4096,"#,
                bar0.gpa
            ),
            r#""hva_align":4096,"hva_modulus":4096,"hva_phase":0,"align_cap":2097152,"page_size":0,"trap":true,"areas":[],"traps":[{"offset":0,"size":256}],"msix_table_pages":null,"msix_pba_pages":null}"#.to_string(),
            r#""hva_align":2097152,"hva_modulus":4194304,"hva_phase":2097152,"align_cap":2097152,"page_size":2097152,"trap":false,"#.to_string(),
            format!(
                r#""areas":[{{"offset":0,"size":8589934592,"gpa":{},"hva_offset":0,"page_size":2097152,"pages":{{"pages_4k":0,"pages_2m":4096,"pages_1g":0}}}}],"traps":[]"#,
                bar2.gpa
            ),
        ];
        for part in &expected {
            assert!(json.contains(part.as_str()), "{part} missing in {json}");
        }
    }

    #[test]
    fn page_sizes_parse_and_print() {
        assert_eq!("2M".parse::<PageSize>().unwrap(), PageSize::Size2M);
        assert_eq!("1gib".parse::<PageSize>().unwrap(), PageSize::Size1G);
        assert!("3m".parse::<PageSize>().is_err());
        assert_eq!(PageSize::from_bytes(4096), Some(PageSize::Size4K));
        assert_eq!(PageSize::Size1G.to_string(), "1G");
    }
}
