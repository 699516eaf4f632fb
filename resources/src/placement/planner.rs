//! The planner proper: [`plan`] checks every device's BARs, gives each a naturally aligned
//! range of its window (largest first, first fit), and works out its HVA alignment, its
//! mmap-able areas and trapped ranges, and the pages each area can get ([`area_pages`]).
//! The rules it follows are in the `placement` module docs.

use std::cmp::Reverse;
use std::collections::HashSet;

use vm_allocator::{AddressAllocator, AllocPolicy};

use super::types::{
    natural_align, reservation, AreaPlacement, BarInput, BarPlacement, BarRange, BarWidth,
    DeviceInput, DevicePlan, PageCounts, PageSize, PlacementError, Plan, Window, WindowKind,
    Windows, HOST_MAX_PFNMAP_PAGE, HOST_PAGE_SIZE, MAX_BAR_INDEX, MAX_BAR_SIZE, MAX_PHYS_BITS,
};
use crate::ram::RamRegion;

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

/// [`plan`] for a guest with RAM `ram` in `windows` (the windows of `ram`
/// on some host): when the devices do not fit for want of 64-bit address
/// space, the error names the smallest phys-bits that would fit them
/// ([`with_phys_bits_needed`]).
pub fn plan_for_host(
    devices: &[DeviceInput],
    ram: &[RamRegion],
    windows: &Windows,
) -> Result<Plan, PlacementError> {
    plan(devices, windows).map_err(|error| with_phys_bits_needed(error, devices, ram))
}

/// `error`, when it is a lack of 64-bit address space (no MMIO64 window
/// above `ram`, or a 64-bit BAR that found no room in it), as
/// [`PlacementError::NeedsPhysBits`] with the smallest phys-bits whose
/// windows fit every BAR of `devices` (found by planning again at each
/// larger value: pure and cheap), or [`PlacementError::BeyondEveryHost`].
/// Other errors are returned as they are.
pub fn with_phys_bits_needed(
    error: PlacementError,
    devices: &[DeviceInput],
    ram: &[RamRegion],
) -> PlacementError {
    let phys_bits = match &error {
        PlacementError::NoMmio64Window { phys_bits, .. }
        | PlacementError::WindowExhausted {
            window: WindowKind::Mmio64,
            phys_bits,
            ..
        } => *phys_bits,
        _ => return error,
    };
    let fits = |bits: u8| {
        Windows::new(ram, bits)
            .and_then(|windows| plan(devices, &windows))
            .is_ok()
    };
    match (phys_bits.saturating_add(1)..=MAX_PHYS_BITS).find(|bits| fits(*bits)) {
        Some(needed) => PlacementError::NeedsPhysBits {
            needed,
            source: Box::new(error),
        },
        None => PlacementError::BeyondEveryHost {
            source: Box::new(error),
        },
    }
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
        placed[p.device_index].push(place_bar(&p, gpa));
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
    let reserved = reservation(bar.size);
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

/// The BAR at `gpa`: its HVA alignment (the natural `min(reserved, 1 GiB)`, or the device's
/// `bar-align` cap where that is smaller) and the pages of each area under it. The
/// window, HVA modulus and phase, page size, trap flag and trapped ranges follow from these
/// (the `BarPlacement` methods).
fn place_bar(p: &PreparedBar<'_>, gpa: u64) -> BarPlacement {
    let natural = natural_align(p.reserved);
    let hva_align = p
        .device
        .align_cap
        .map_or(natural, |cap| natural.min(cap.bytes()));

    let areas: Vec<AreaPlacement> = p
        .areas
        .iter()
        .map(|area| {
            let area_gpa = gpa + area.offset;
            let (page_size, pages) =
                area_pages(area_gpa, area.size, hva_align.min(HOST_MAX_PFNMAP_PAGE));
            AreaPlacement {
                offset: area.offset,
                size: area.size,
                gpa: area_gpa,
                page_size,
                pages,
            }
        })
        .collect();
    BarPlacement {
        index: p.bar.index,
        size: p.bar.size,
        width: p.bar.width,
        prefetchable: p.bar.prefetchable,
        gpa,
        hva_align,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::fixtures::{device, h100, ivshmem, windows, GIB, KIB, MIB};
    use crate::placement::render::render_table;
    use crate::placement::types::WindowKind;
    use crate::ram::ram_regions;

    #[test]
    fn h100_gets_natural_alignment_and_1g_pages_for_bar1() {
        let w = windows(8 * GIB, 46);
        let plan = plan(&[h100("0000:41:00.0")], &w).unwrap();
        let bars = &plan.devices[0].bars;
        assert_eq!(bars.iter().map(|b| b.index).collect::<Vec<_>>(), [0, 1, 3]);
        for bar in bars {
            assert_eq!(bar.gpa % bar.size, 0, "BAR {}", bar.index);
            assert!(w.mmio64.contains(bar.gpa, bar.reserved()));
            assert_eq!(bar.areas.len(), 1);
            assert!(bar.traps().is_empty());
        }
        let bar1 = &bars[1];
        assert_eq!(bar1.gpa, 128 * GIB, "first 128 GiB boundary above RAM");
        assert_eq!(bar1.page_size(), Some(PageSize::Size1G));
        assert_eq!(bar1.hva_align, GIB);
        assert_eq!((bar1.hva_modulus(), bar1.hva_phase()), (GIB, 0));
        assert_eq!(bar1.areas[0].pages.pages_1g, 128);
        assert_eq!(bars[0].page_size(), Some(PageSize::Size2M));
        assert_eq!(bars[0].hva_align, 16 * MIB);
        assert_eq!(bars[2].page_size(), Some(PageSize::Size2M));
        // Smaller BARs fill the gap below the 128 GiB boundary, largest first.
        assert_eq!(bars[2].gpa, 9 * GIB);
        assert_eq!(bars[0].gpa, 9 * GIB + 32 * MIB);
    }

    #[test]
    fn ivshmem_bar0_is_trapped_on_its_own_page_and_bar2_gets_1g_pages() {
        let plan = plan(&[ivshmem()], &windows(GIB, 40)).unwrap();
        let bar0 = &plan.devices[0].bars[0];
        assert!(bar0.trapped());
        assert!(bar0.areas.is_empty());
        assert_eq!(bar0.page_size(), None);
        assert_eq!(bar0.reserved(), 4 * KIB);
        assert_eq!(bar0.gpa % (4 * KIB), 0);
        assert_eq!(bar0.window(), WindowKind::Mmio32);
        assert_eq!(bar0.traps(), vec![BarRange::new(0, 256)]);
        let bar2 = &plan.devices[0].bars[1];
        assert!(!bar2.trapped());
        assert_eq!(bar2.page_size(), Some(PageSize::Size1G));
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
        assert_eq!(bar.traps(), vec![BarRange::new(0, 4 * KIB)]);
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
        assert_eq!(bar.traps(), vec![BarRange::new(64 * KIB, GIB - 64 * KIB)]);
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
        assert_eq!((bar.hva_modulus(), bar.hva_phase()), (4 * MIB, 2 * MIB));
        assert_eq!(bar.page_size(), Some(PageSize::Size2M));
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
            (bar.hva_align, bar.hva_modulus(), bar.hva_phase()),
            (4 * KIB, 8 * KIB, 4 * KIB)
        );
        assert_eq!(bar.page_size(), Some(PageSize::Size4K));
        assert_eq!(bar.areas[0].pages.pages_4k, 2 * GIB / (4 * KIB));
    }

    #[test]
    fn bar_align_1g_changes_nothing_for_a_huge_bar_and_caps_above_the_bar_are_no_ops() {
        let mut dev = h100("gpu");
        dev.align_cap = Some(PageSize::Size1G);
        let capped = plan(&[dev], &windows(GIB, 46)).unwrap();
        let auto = plan(&[h100("gpu")], &windows(GIB, 46)).unwrap();
        for (c, a) in capped.devices[0].bars.iter().zip(&auto.devices[0].bars) {
            assert_eq!((c.gpa, c.hva_align, c.hva_phase()), (a.gpa, a.hva_align, 0));
            assert_eq!(c.page_size(), a.page_size());
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
        assert_eq!(bar.reserved(), 4 * GIB);
        assert_eq!(bar.gpa % (4 * GIB), 0);
        assert_eq!(bar.areas[0].size, 3 * GIB);
        assert_eq!(bar.traps(), vec![BarRange::new(3 * GIB, 100)]);
        let small = &plan.devices[0].bars[1];
        assert_eq!(small.reserved(), 8 * KIB);
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

    fn eight_h100s() -> Vec<DeviceInput> {
        (0..8).map(|i| h100(&format!("h100-{i}"))).collect()
    }

    #[test]
    fn a_plan_without_room_names_the_phys_bits_that_would_fit_it() {
        let devices = eight_h100s();
        let ram = ram_regions(512 * MIB).unwrap();
        // Eight 128 GiB BARs from 4 GiB up: 1 TiB of them, naturally aligned,
        // end at 1 TiB + 128 GiB: a 40-bit host has no room, a 41-bit one has.
        let err = plan_for_host(&devices, &ram, &windows(512 * MIB, 40)).unwrap_err();
        let PlacementError::NeedsPhysBits { needed, source } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(*needed, 41);
        assert!(matches!(
            **source,
            PlacementError::WindowExhausted {
                window: WindowKind::Mmio64,
                phys_bits: 40,
                ..
            }
        ));
        assert!(
            err.to_string()
                .ends_with("(a host with phys-bits 41 or more would fit every BAR)"),
            "{err}"
        );
        // What it says is true: 41 fits.
        assert!(plan_for_host(&devices, &ram, &windows(512 * MIB, 41)).is_ok());

        // RAM that leaves no MMIO64 window at all: the bits for RAM and BARs.
        let big = ram_regions(GIB << 10).unwrap();
        let no_window = Windows::new(&big, 40).unwrap_err();
        let err = with_phys_bits_needed(no_window, &devices, &big);
        assert!(
            matches!(err, PlacementError::NeedsPhysBits { needed: 42, .. }),
            "{err:?}"
        );
        let windows_42 = Windows::new(&big, 42).unwrap();
        assert!(plan(&devices, &windows_42).is_ok());
        assert!(plan(&devices, &Windows::new(&big, 41).unwrap()).is_err());
    }

    #[test]
    fn errors_phys_bits_cannot_fix_are_left_alone() {
        let ram = ram_regions(512 * MIB).unwrap();
        // Not even 52 bits: a BAR as large as the whole address space.
        let huge = device(
            "huge",
            vec![BarInput::new(0, 1 << 52, BarWidth::Bits64, true)],
        );
        let err = plan_for_host(&[huge], &ram, &windows(512 * MIB, 46)).unwrap_err();
        assert!(
            matches!(err, PlacementError::BeyondEveryHost { .. }),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains("not even a host with phys-bits 52"),
            "{err}"
        );
        // The MMIO32 window is the same on every host.
        let many_32 = (0..40)
            .map(|i| {
                device(
                    &format!("d{i}"),
                    vec![BarInput::new(0, 16 * MIB, BarWidth::Bits32, false)],
                )
            })
            .collect::<Vec<_>>();
        let err = plan_for_host(&many_32, &ram, &windows(512 * MIB, 46)).unwrap_err();
        assert!(
            matches!(
                err,
                PlacementError::WindowExhausted {
                    window: WindowKind::Mmio32,
                    ..
                }
            ),
            "{err:?}"
        );
        // A bad input is not about address space either.
        let twice = vec![h100("a"), h100("a")];
        assert!(matches!(
            plan_for_host(&twice, &ram, &windows(512 * MIB, 46)),
            Err(PlacementError::DuplicateDeviceName { .. })
        ));
    }
}
