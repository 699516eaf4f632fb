//! Property tests of the BAR placement planner: no overlaps, natural alignment, windows
//! respected, every area congruent (GPA ≡ HVA modulo its page size), optimality of
//! largest-first allocation, and every error path reachable.

use proptest::prelude::*;
use resources::placement::{area_pages, MAX_BAR_SIZE};
use resources::spec::{parse_size, parse_spec};
use resources::sysfs::parse_resource;
use resources::{
    plan, ram_regions, render_table, BarInput, BarPlacement, BarRange, BarWidth, DeviceInput,
    PageSize, PlacementError, Plan, WindowKind, Windows,
};

const PAGE: u64 = 4096;
const GIB: u64 = 1 << 30;

// ---------------------------------------------------------------------------------------
// Strategies.
// ---------------------------------------------------------------------------------------

/// Mostly powers of two from 16 bytes to 16 GiB, sometimes up to 512 GiB, sometimes any
/// size.
fn bar_size() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => (4u32..=34).prop_map(|s| 1u64 << s),
        1 => (35u32..=39).prop_map(|s| 1u64 << s),
        2 => 1u64..(1 << 34),
    ]
}

/// Sparse areas as alternating segments between sorted page boundaries (or the default).
fn areas(size: u64) -> BoxedStrategy<Option<Vec<BarRange>>> {
    let pages = size / PAGE;
    if pages == 0 {
        return Just(None).boxed();
    }
    prop_oneof![
        Just(None),
        prop::collection::vec(0..=pages, 1..6).prop_map(move |mut cuts| {
            cuts.sort();
            cuts.dedup();
            let areas: Vec<BarRange> = cuts
                .chunks(2)
                .filter(|pair| pair.len() == 2)
                .map(|pair| BarRange::new(pair[0] * PAGE, (pair[1] - pair[0]) * PAGE))
                .collect();
            Some(areas)
        }),
    ]
    .boxed()
}

/// A range of 1..=4096 bytes somewhere inside a BAR.
fn inside(size: u64) -> BoxedStrategy<Option<BarRange>> {
    prop_oneof![
        Just(None),
        (0..size, 1u64..=4096)
            .prop_map(move |(offset, len)| { Some(BarRange::new(offset, len.min(size - offset))) }),
    ]
    .boxed()
}

fn bar(index: u8) -> impl Strategy<Value = BarInput> {
    (bar_size(), any::<bool>(), any::<bool>()).prop_flat_map(move |(size, wide, pf)| {
        let width = if wide || size > GIB {
            BarWidth::Bits64
        } else {
            BarWidth::Bits32
        };
        (areas(size), inside(size), inside(size)).prop_map(move |(areas, table, pba)| BarInput {
            index,
            size,
            width,
            prefetchable: pf,
            areas,
            msix_table: table,
            msix_pba: pba,
        })
    })
}

fn align_cap() -> impl Strategy<Value = Option<PageSize>> {
    prop_oneof![
        2 => Just(None),
        1 => prop::sample::select(PageSize::ALL.to_vec()).prop_map(Some),
    ]
}

fn device(number: usize) -> impl Strategy<Value = DeviceInput> {
    (
        prop::sample::subsequence(vec![0u8, 1, 2, 3, 4, 5], 0..=4),
        align_cap(),
    )
        .prop_flat_map(move |(indexes, cap)| {
            let bars: Vec<_> = indexes.into_iter().map(bar).collect();
            (bars, Just(cap)).prop_map(move |(bars, align_cap)| DeviceInput {
                name: format!("0000:{number:02x}:00.0"),
                bars,
                align_cap,
            })
        })
}

fn devices() -> impl Strategy<Value = Vec<DeviceInput>> {
    (1usize..=5).prop_flat_map(|n| (0..n).map(device).collect::<Vec<_>>())
}

fn windows() -> impl Strategy<Value = Windows> {
    (4u64..=256, 36u8..=46).prop_map(|(ram_128m, phys_bits)| {
        let ram = ram_regions(ram_128m << 27).unwrap();
        Windows::new(&ram, phys_bits).unwrap()
    })
}

// ---------------------------------------------------------------------------------------
// Checks.
// ---------------------------------------------------------------------------------------

fn all_bars(plan: &Plan) -> Vec<&BarPlacement> {
    plan.devices.iter().flat_map(|d| &d.bars).collect()
}

fn page_rounded(range: BarRange) -> BarRange {
    let start = range.offset / PAGE * PAGE;
    let end = range.end().div_ceil(PAGE) * PAGE;
    BarRange::new(start, end - start)
}

fn overlaps(a: BarRange, b: BarRange) -> bool {
    a.offset < b.end() && b.offset < a.end()
}

/// Everything a successful plan promises, for one BAR and the HVA base `hva_base`.
fn check_bar(
    input: &BarInput,
    cap: Option<PageSize>,
    bar: &BarPlacement,
    windows: &Windows,
    hint: u64,
) {
    let min_reserve = input.size.max(PAGE);
    assert_eq!(
        (bar.index, bar.size, bar.width),
        (input.index, input.size, input.width)
    );
    assert!(bar.reserved().is_power_of_two());
    assert!(bar.reserved() >= min_reserve && bar.reserved() / 2 < min_reserve);
    assert_eq!(bar.gpa % bar.reserved(), 0, "natural alignment");
    let window = windows.for_width(bar.width);
    assert_eq!(bar.window(), window.kind);
    assert!(
        window.contains(bar.gpa, bar.reserved()),
        "inside its window"
    );

    // HVA rule.
    let natural = bar.reserved().min(GIB);
    let expected_align = cap.map_or(natural, |c| natural.min(c.bytes()));
    assert_eq!(bar.hva_align, expected_align);
    assert!(bar.hva_align >= PAGE && bar.hva_align <= GIB);
    let hva_base = bar.hva_base_at_or_above(hint).unwrap();
    assert!(hva_base >= hint && hva_base - hint < bar.hva_modulus());
    assert!(bar.hva_base_fits(hva_base));
    let delta = |gpa: u64, hva: u64| (i128::from(gpa) - i128::from(hva)).rem_euclid(1 << 62) as u64;
    assert_eq!(
        delta(bar.gpa, hva_base) % bar.hva_align,
        0,
        "GPA ≡ HVA mod hva_align"
    );
    if bar.hva_phase() != 0 {
        assert_eq!(bar.hva_modulus(), 2 * bar.hva_align);
        assert_ne!(
            delta(bar.gpa, hva_base) % (2 * bar.hva_align),
            0,
            "capped: off the larger boundary"
        );
    }

    // Areas: inside the BAR, page-aligned, congruent, exact tiling, no MSI-X pages.
    let trap_pages: Vec<BarRange> = [input.msix_table, input.msix_pba]
        .into_iter()
        .flatten()
        .map(page_rounded)
        .collect();
    for area in &bar.areas {
        assert!(area.size > 0 && area.offset % PAGE == 0 && area.size % PAGE == 0);
        assert!(area.offset + area.size <= bar.size);
        assert_eq!(area.gpa, bar.gpa + area.offset);
        assert_eq!(area.hva_offset(), area.offset);
        let page = area.page_size.bytes();
        assert!(page <= bar.hva_align);
        let hva = hva_base + area.hva_offset();
        assert_eq!(
            delta(area.gpa, hva) % page,
            0,
            "area congruent modulo its page size"
        );
        let first = area.gpa.div_ceil(page) * page;
        assert!(
            first + page <= area.gpa + area.size,
            "a whole page of that size fits"
        );
        // No larger page size would fit a whole page and be congruent.
        for larger in PageSize::ALL.into_iter().filter(|p| *p > area.page_size) {
            let l = larger.bytes();
            let fits = area.gpa.div_ceil(l) * l + l <= area.gpa + area.size;
            assert!(
                !(fits && delta(area.gpa, hva) % l == 0),
                "{larger} would have fit"
            );
        }
        assert_eq!(area.pages.bytes(), area.size);
        for trap in &trap_pages {
            assert!(!overlaps(BarRange::new(area.offset, area.size), *trap));
        }
        if let Some(given) = &input.areas {
            assert!(given
                .iter()
                .any(|g| g.offset <= area.offset && area.offset + area.size <= g.end()));
        }
    }
    // Areas and traps partition the BAR.
    let mut pieces: Vec<BarRange> = bar
        .areas
        .iter()
        .map(|a| BarRange::new(a.offset, a.size))
        .chain(bar.traps().iter().copied())
        .collect();
    pieces.sort();
    let mut cursor = 0;
    for piece in &pieces {
        assert_eq!(
            piece.offset, cursor,
            "areas and traps tile the BAR: {pieces:?}"
        );
        cursor = piece.end();
    }
    assert_eq!(cursor, bar.size);
    assert_eq!(bar.trapped(), bar.areas.is_empty());
    assert_eq!(bar.page_size(), bar.areas.iter().map(|a| a.page_size).max());
    if bar.size < PAGE {
        assert!(bar.trapped());
    }
}

/// Number of naturally aligned `r`-byte blocks inside `[start, end)`.
fn aligned_blocks(start: u64, end: u64, r: u64) -> u64 {
    (end / r).saturating_sub(start.div_ceil(r))
}

// ---------------------------------------------------------------------------------------
// Properties.
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn plans_are_aligned_disjoint_inside_windows_and_congruent(
        devices in devices(),
        windows in windows(),
        hint in 0u64..(1 << 46),
    ) {
        match plan(&devices, &windows) {
            Ok(result) => {
                prop_assert_eq!(result.devices.len(), devices.len());
                for (input, placed) in devices.iter().zip(&result.devices) {
                    prop_assert_eq!(&input.name, &placed.name);
                    prop_assert_eq!(input.bars.len(), placed.bars.len());
                    for bar in &placed.bars {
                        let given = input.bars.iter().find(|b| b.index == bar.index).unwrap();
                        check_bar(given, input.align_cap, bar, &windows, hint);
                    }
                    prop_assert!(placed.bars.windows(2).all(|w| w[0].index < w[1].index));
                }
                let bars = all_bars(&result);
                for (i, a) in bars.iter().enumerate() {
                    for b in &bars[i + 1..] {
                        prop_assert!(
                            a.gpa + a.reserved() <= b.gpa || b.gpa + b.reserved() <= a.gpa,
                            "overlap {:#x}+{:#x} and {:#x}+{:#x}", a.gpa, a.reserved(), b.gpa, b.reserved()
                        );
                    }
                }
                prop_assert_eq!(&result, &plan(&devices, &windows).unwrap(), "deterministic");
                let json = serde_json::to_value(&result).unwrap();
                prop_assert!(json["devices"].is_array());
                prop_assert!(!render_table(&result).is_empty());
            }
            Err(PlacementError::WindowExhausted { device, index, size, reserved, window, .. }) => {
                // Largest-first packing fails only when no naturally aligned placement
                // exists: the BARs at least as large as this one need more aligned blocks
                // of its size than the window has.
                let bar = devices.iter().find(|d| d.name == device)
                    .and_then(|d| d.bars.iter().find(|b| b.index == index)).unwrap();
                prop_assert_eq!(bar.size, size);
                let win = match window { WindowKind::Mmio32 => windows.mmio32, WindowKind::Mmio64 => windows.mmio64 };
                let demand: u64 = devices.iter().flat_map(|d| &d.bars)
                    .filter(|b| windows.for_width(b.width).kind == window)
                    .map(|b| b.size.max(PAGE).next_power_of_two())
                    .filter(|r| *r >= reserved)
                    .sum();
                let capacity = aligned_blocks(win.start, win.end, reserved) * reserved;
                prop_assert!(demand > capacity, "demand {demand:#x} fits capacity {capacity:#x}");
            }
            Err(other) => prop_assert!(false, "valid input refused: {other}"),
        }
    }

    #[test]
    fn area_pages_are_the_largest_congruent_whole_pages(
        start_page in 0u64..(1 << 22),
        pages in 1u64..(1 << 20),
        limit in prop::sample::select(vec![PAGE, 2 << 20, 1 << 30]),
    ) {
        let (gpa, size) = (start_page * PAGE, pages * PAGE);
        let (page, counts) = area_pages(gpa, size, limit);
        prop_assert_eq!(counts.bytes(), size);
        prop_assert!(page.bytes() <= limit);
        let p = page.bytes();
        prop_assert!(gpa.div_ceil(p) * p + p <= gpa + size);
    }

    #[test]
    fn sizes_with_units_parse(n in 0u64..(1 << 20), unit in prop::sample::select(vec![("", 0), ("K", 10), ("M", 20), ("G", 30), ("T", 40), ("GiB", 30)])) {
        prop_assert_eq!(parse_size(&format!("{n}{}", unit.0)).unwrap(), n << unit.1);
        prop_assert_eq!(parse_size(&format!("{:#x}", n << unit.1)).unwrap(), n << unit.1);
    }

    #[test]
    fn sysfs_resource_lines_round_trip(start in 0u64..(1 << 46), exp in 12u32..=37, flags in prop::sample::select(vec![0x40200u64, 0x14220c, 0x140204])) {
        let size = 1u64 << exp;
        let text = format!("0x{start:016x} 0x{:016x} 0x{flags:016x}\n", start + size - 1);
        let bars = parse_resource(&text).unwrap();
        prop_assert_eq!(bars.len(), 1);
        prop_assert_eq!((bars[0].host_start, bars[0].size, bars[0].flags), (start, size, flags));
        let input = bars[0].to_bar_input(None).unwrap();
        prop_assert_eq!(input.width == BarWidth::Bits64, flags & 0x0010_0000 != 0);
        prop_assert_eq!(input.prefetchable, flags & 0x2000 != 0);
    }

    // ----- Each error path is reachable. -----

    #[test]
    fn index_above_5_is_refused(index in 6u8..=255) {
        let d = one_bar_device(BarInput::new(index, PAGE, BarWidth::Bits64, false));
        prop_assert!(matches!(plan(&[d], &small_windows()), Err(PlacementError::BarIndexOutOfRange { .. })), "unexpected result");
    }

    #[test]
    fn duplicate_index_is_refused(index in 0u8..=5, a in bar_size(), b in bar_size()) {
        let mut d = one_bar_device(BarInput::new(index, a, BarWidth::Bits64, false));
        d.bars.push(BarInput::new(index, b, BarWidth::Bits32, false));
        prop_assert!(matches!(plan(&[d], &small_windows()), Err(PlacementError::DuplicateBar { .. })), "unexpected result");
    }

    #[test]
    fn duplicate_device_name_is_refused(name in "[a-z0-9:.]{1,12}") {
        let d = DeviceInput { name, bars: vec![], align_cap: None };
        let result = plan(&[d.clone(), d], &small_windows());
        prop_assert!(matches!(result, Err(PlacementError::DuplicateDeviceName { .. })), "unexpected result");
    }

    #[test]
    fn zero_and_absurd_sizes_are_refused(big in (MAX_BAR_SIZE + 1)..=u64::MAX) {
        let zero = one_bar_device(BarInput::new(0, 0, BarWidth::Bits64, false));
        prop_assert!(matches!(plan(&[zero], &small_windows()), Err(PlacementError::ZeroSizeBar { .. })), "unexpected result");
        let huge = one_bar_device(BarInput::new(0, big, BarWidth::Bits64, false));
        prop_assert!(matches!(plan(&[huge], &small_windows()), Err(PlacementError::BarTooLarge { .. })), "unexpected result");
    }

    #[test]
    fn unaligned_areas_are_refused(exp in 14u32..=34, offset in 0u64..4096, len in 1u64..8192) {
        prop_assume!(offset % PAGE != 0 || len % PAGE != 0);
        let mut bar = BarInput::new(0, 1 << exp, BarWidth::Bits64, false);
        bar.areas = Some(vec![BarRange::new(offset, len)]);
        prop_assert!(matches!(plan(&[one_bar_device(bar)], &small_windows()), Err(PlacementError::AreaUnaligned { .. })), "unexpected result");
    }

    #[test]
    fn areas_and_msix_outside_the_bar_are_refused(exp in 12u32..=34, extra in 1u64..=(1 << 20), which in 0usize..3) {
        let size = 1u64 << exp;
        let outside = BarRange::new(size - PAGE, PAGE + extra.div_ceil(PAGE) * PAGE);
        let mut bar = BarInput::new(0, size, BarWidth::Bits64, false);
        match which {
            0 => bar.areas = Some(vec![outside]),
            1 => bar.msix_table = Some(BarRange::new(size - 1, 1 + extra)),
            _ => bar.msix_pba = Some(BarRange::new(size, extra)),
        }
        prop_assert!(matches!(plan(&[one_bar_device(bar)], &small_windows()), Err(PlacementError::OutsideBar { .. })), "unexpected result");
    }

    #[test]
    fn overlapping_areas_are_refused(first in 0u64..16, len in 2u64..16, into in 1u64..16) {
        prop_assume!(into < len);
        let mut bar = BarInput::new(0, 1 << 20, BarWidth::Bits64, false);
        bar.areas = Some(vec![
            BarRange::new((first + into) * PAGE, PAGE),
            BarRange::new(first * PAGE, len * PAGE),
        ]);
        prop_assert!(matches!(plan(&[one_bar_device(bar)], &small_windows()), Err(PlacementError::AreasOverlap { .. })), "unexpected result");
    }

    #[test]
    fn bars_beyond_the_windows_are_refused(phys_bits in 36u8..=46, wide in any::<bool>()) {
        let w = Windows::new(&ram_regions(GIB).unwrap(), phys_bits).unwrap();
        let (width, size) = if wide { (BarWidth::Bits64, 1u64 << phys_bits) } else { (BarWidth::Bits32, GIB) };
        let result = plan(&[one_bar_device(BarInput::new(0, size, width, true))], &w);
        prop_assert!(matches!(result, Err(PlacementError::WindowExhausted { .. })), "unexpected result");
    }

    #[test]
    fn bad_phys_bits_and_full_address_spaces_are_refused(low in 0u8..32, high in 53u8..=255, gib in 64u64..=256) {
        prop_assert!(matches!(Windows::new(&[], low), Err(PlacementError::PhysBitsOutOfRange { .. })), "unexpected result");
        prop_assert!(matches!(Windows::new(&[], high), Err(PlacementError::PhysBitsOutOfRange { .. })), "unexpected result");
        let ram = ram_regions(gib * GIB).unwrap();
        prop_assert!(matches!(Windows::new(&ram, 36), Err(PlacementError::NoMmio64Window { .. })), "unexpected result");
    }
}

fn one_bar_device(bar: BarInput) -> DeviceInput {
    DeviceInput {
        name: "dev".to_string(),
        bars: vec![bar],
        align_cap: None,
    }
}

fn small_windows() -> Windows {
    Windows::new(&ram_regions(GIB).unwrap(), 40).unwrap()
}

/// The issue's H100 spec, planned end to end (printed for the record).
#[test]
fn h100_spec_plans_with_1g_pages_for_bar1() {
    let devices = parse_spec(
        r#"{"devices":[{"name":"0000:41:00.0","bars":[
            {"index":0,"size":"16M","bits":64},
            {"index":1,"size":"128G","bits":64,"prefetchable":true},
            {"index":3,"size":"32M","bits":64,"prefetchable":true}]}]}"#,
    )
    .unwrap();
    let windows = Windows::new(&ram_regions(4 * GIB).unwrap(), 46).unwrap();
    let result = plan(&devices, &windows).unwrap();
    let table = render_table(&result);
    println!("{table}");
    println!("{}", serde_json::to_string(&result).unwrap());
    let bar1 = &result.devices[0].bars[1];
    assert_eq!(bar1.gpa % (128 * GIB), 0);
    assert_eq!(bar1.page_size(), Some(PageSize::Size1G));
    assert_eq!(bar1.areas[0].pages.pages_1g, 128);
}
