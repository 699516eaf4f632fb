//! BAR memory in KVM: map a BAR's mmap-able areas at the HVA the plan asks
//! for, give each area one memslot, once, and prove what KVM mapped.
//!
//! Used by every memory-backed BAR: the shared memory device's BAR2 and
//! VFIO regions alike.
//!
//! 1. [`map_bar_areas`] reserves the BAR's host address range at
//!    `hva_base % hva_modulus == hva_phase` (the placement's rule), maps each
//!    area of `fd` at `region_offset + area.offset` at `hva_base +
//!    area.offset`, and registers one memslot per area (`slot` numbers from a
//!    [`SlotAllocator`] that starts after RAM's). That is the only place BAR
//!    memslots are set, and nothing ever deletes or moves them while the VM
//!    lives: guest BAR sizing and decode toggles are only logged
//!    (`pci::log_event`). [`MappedBar::slot_updates`] counts the set
//!    operations so the report shows it.
//! 2. [`BarProver::prove`] (after the vCPUs exist, before the guest runs)
//!    reads KVM's stats, KVM_PRE_FAULT_MEMORY's every area, reads the stats
//!    again: the change of `pages_4k`/`pages_2m`/`pages_1g` is what KVM
//!    mapped the BAR with. Without the ioctl (Linux < 6.10, no TDP) it says
//!    so once and reports `mapped: null`.
//! 3. When the BAR got less than its best, [`BarProver::prove`] puts the
//!    likely causes in the report's `warning` and prints it on stderr:
//!    `bar-align` (on purpose), then the device's own causes
//!    ([`MappedBar::add_cause`]: 4 KiB host pages behind a memfd, a
//!    misaligned host resource, ...), else a generic list.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::time::Instant;

use kvm_ioctls::VmFd;
use resources::placement::{area_pages, BarPlacement, PageCounts, PageSize};

use crate::machine::kvm::{self, KvmError};
use crate::machine::kvm_stats::KvmStatsFd;
use crate::machine::mapping::{AlignedMapping, MappingError};
use crate::machine::prefault::{self, PreFaultError};
use crate::report::{BarReport, PageCountsReport};

/// Largest page KVM maps on x86.
const LARGEST_PAGE: u64 = 1 << 30;

/// Errors mapping a BAR.
#[derive(Debug, thiserror::Error)]
pub enum BarMappingError {
    /// The host mapping failed.
    #[error("cannot map BAR {index} of {device} ({size:#x} bytes) into barge: {source}")]
    Map {
        /// Device name.
        device: String,
        /// BAR index.
        index: u8,
        /// BAR size.
        size: u64,
        /// Why.
        source: MappingError,
    },
    /// KVM refused a memslot.
    #[error("BAR {index} of {device}: {source}")]
    Slot {
        /// Device name.
        device: String,
        /// BAR index.
        index: u8,
        /// Why.
        source: KvmError,
    },
}

/// Hands out memslot numbers, from the first one after RAM's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotAllocator {
    next: u32,
}

impl SlotAllocator {
    /// Slots from `first` on.
    pub fn new(first: u32) -> Self {
        Self { next: first }
    }

    /// The next free slot.
    pub fn allocate(&mut self) -> u32 {
        let slot = self.next;
        self.next += 1;
        slot
    }
}

/// One memslot of a BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappedArea {
    /// KVM memslot number.
    pub slot: u32,
    /// Offset inside the BAR.
    pub offset: u64,
    /// Guest physical address.
    pub gpa: u64,
    /// Size in bytes.
    pub size: u64,
    /// Host virtual address.
    pub hva: u64,
}

/// A BAR whose areas are mapped and registered with KVM. It owns the host
/// mapping the memslots point into; the device's
/// [`crate::pci_devices::teardown::DeviceResources`] removes the memslots
/// before it drops the BAR.
#[derive(Debug)]
pub struct MappedBar {
    /// The device's name in the plan.
    pub device: String,
    /// Where the plan put it.
    pub placement: BarPlacement,
    /// The host mapping; `None` for a trapped BAR. Shared with the BAR's
    /// IOMMU mappings (peer to peer), which keep it mapped until they are
    /// undone.
    pub mapping: Option<Arc<AlignedMapping>>,
    /// Its memslots, by offset.
    pub areas: Vec<MappedArea>,
    /// KVM_SET_USER_MEMORY_REGION calls made for this BAR.
    pub slot_updates: u32,
    /// Device-specific likely causes of a shortfall (see the module docs).
    pub causes: Vec<String>,
}

impl MappedBar {
    /// A BAR with no memslot (trapped), for the report.
    pub fn trapped(device: &str, placement: &BarPlacement) -> Self {
        Self {
            device: device.to_string(),
            placement: placement.clone(),
            mapping: None,
            areas: Vec::new(),
            slot_updates: 0,
            causes: Vec::new(),
        }
    }

    /// The host address of the BAR's start (0 when trapped).
    pub fn hva(&self) -> u64 {
        self.mapping.as_ref().map_or(0, |mapping| mapping.addr())
    }

    /// Adds a likely cause for getting smaller pages than expected, shown
    /// only when that happens.
    pub fn add_cause(&mut self, cause: impl Into<String>) {
        self.causes.push(cause.into());
    }
}

/// Maps `placement`'s areas of `fd` (the BAR's data starts at
/// `region_offset` in `fd`: 0 for a memfd, the VFIO region's offset for a
/// VFIO device) and registers one memslot per area. A BAR without areas
/// (trapped) maps nothing. On error the host mapping is unmapped; memslots
/// of earlier areas stay registered until the VM fd closes (the build fails
/// and the guest never runs; KVM follows the unmap through its MMU
/// notifier).
pub fn map_bar_areas(
    vm: &VmFd,
    fd: BorrowedFd<'_>,
    region_offset: u64,
    device: &str,
    placement: &BarPlacement,
    slots: &mut SlotAllocator,
) -> Result<MappedBar, BarMappingError> {
    if placement.areas.is_empty() {
        return Ok(MappedBar::trapped(device, placement));
    }
    let len = placement
        .areas
        .iter()
        .map(|a| a.offset + a.size)
        .max()
        .unwrap_or(0);
    let areas: Vec<(u64, u64)> = placement.areas.iter().map(|a| (a.offset, a.size)).collect();
    let mapping = AlignedMapping::map_shared_areas(
        fd,
        region_offset,
        len,
        placement.hva_modulus,
        placement.hva_phase,
        &areas,
    )
    .map_err(|source| BarMappingError::Map {
        device: device.to_string(),
        index: placement.index,
        size: placement.size,
        source,
    })?;
    let mut bar = MappedBar {
        device: device.to_string(),
        placement: placement.clone(),
        mapping: None,
        areas: Vec::new(),
        slot_updates: 0,
        causes: Vec::new(),
    };
    for area in &placement.areas {
        let mapped = MappedArea {
            slot: slots.allocate(),
            offset: area.offset,
            gpa: area.gpa,
            size: area.size,
            hva: mapping.addr() + area.hva_offset,
        };
        bar.slot_updates += 1;
        kvm::map_guest_memory(vm, mapped.slot, mapped.gpa, mapped.size, mapped.hva).map_err(
            |source| BarMappingError::Slot {
                device: device.to_string(),
                index: placement.index,
                source,
            },
        )?;
        bar.areas.push(mapped);
    }
    bar.mapping = Some(Arc::new(mapping));
    Ok(bar)
}

/// The best page counts of a placement without any `bar-align` cap: every
/// area tiled with pages up to `min(reservation, 1 GiB)`.
pub fn uncapped_counts(placement: &BarPlacement) -> PageCounts {
    let limit = placement.reserved.min(LARGEST_PAGE);
    let mut total = PageCounts::default();
    for area in &placement.areas {
        let (_, counts) = area_pages(area.gpa, area.size, limit);
        total.pages_4k += counts.pages_4k;
        total.pages_2m += counts.pages_2m;
        total.pages_1g += counts.pages_1g;
    }
    total
}

/// The plan's page counts (with its cap).
pub fn planned_counts(placement: &BarPlacement) -> PageCounts {
    let mut total = PageCounts::default();
    for area in &placement.areas {
        total.pages_4k += area.pages.pages_4k;
        total.pages_2m += area.pages.pages_2m;
        total.pages_1g += area.pages.pages_1g;
    }
    total
}

/// Whether KVM_PRE_FAULT_MEMORY can be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefaultSupport {
    /// KVM_CAP_PRE_FAULT_MEMORY is present.
    Available,
    /// It is not: `mapped` stays unknown.
    Missing,
}

impl PrefaultSupport {
    /// Asks KVM.
    pub fn of(vm: &VmFd) -> Self {
        if vm.check_extension_raw(libc::c_ulong::from(prefault::KVM_CAP_PRE_FAULT_MEMORY)) > 0 {
            PrefaultSupport::Available
        } else {
            PrefaultSupport::Missing
        }
    }
}

/// Proves BARs through one vCPU and the VM's stats fd.
pub struct BarProver<'a, V: AsRawFd> {
    vcpu: &'a V,
    stats: Option<KvmStatsFd>,
    support: PrefaultSupport,
    said_unsupported: bool,
    prefault: bool,
}

/// The change of KVM's page counters between two reads.
pub fn page_delta(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> PageCountsReport {
    let delta = |name: &str| {
        after
            .get(name)
            .copied()
            .unwrap_or(0)
            .saturating_sub(before.get(name).copied().unwrap_or(0))
    };
    PageCountsReport {
        pages_4k: delta("pages_4k"),
        pages_2m: delta("pages_2m"),
        pages_1g: delta("pages_1g"),
    }
}

impl<'a, V: AsRawFd> BarProver<'a, V> {
    /// A prover using `vcpu` (any vCPU of the VM, created and configured)
    /// and the VM's statistics (`None` when they cannot be opened).
    pub fn new(vcpu: &'a V, stats: Option<KvmStatsFd>, support: PrefaultSupport) -> Self {
        Self {
            vcpu,
            stats,
            support,
            said_unsupported: false,
            prefault: true,
        }
    }

    /// Whether [`Self::prove`] pre-faults (the default); without it BARs
    /// fault in on the guest's first touch and `mapped` stays null.
    pub fn prefault(mut self, prefault: bool) -> Self {
        self.prefault = prefault;
        self
    }

    /// Pre-faults `bar` and reports it (see the module docs).
    pub fn prove(&mut self, bar: &MappedBar) -> BarReport {
        let placement = &bar.placement;
        let expected: PageCountsReport = uncapped_counts(placement).into();
        let mut report = BarReport {
            index: placement.index,
            size: placement.size,
            gpa: placement.gpa,
            hva: bar.hva(),
            trapped: bar.areas.is_empty(),
            planned_page_size: placement.page_size.map_or(0, PageSize::bytes),
            planned: planned_counts(placement).into(),
            expected,
            mapped: None,
            slots: bar.areas.len() as u32,
            slot_updates: bar.slot_updates,
            huge_ok: false,
            prefault_ms: None,
            warning: None,
        };
        if report.trapped {
            report.mapped = Some(PageCountsReport::default());
            report.huge_ok = true;
            return report;
        }
        report.mapped = self.measure(bar, &mut report.prefault_ms);
        report.huge_ok = report.mapped == Some(expected);
        if let Some(mapped) = report.mapped.filter(|_| !report.huge_ok) {
            let warning = shortfall_warning(bar, &mapped, &expected);
            eprintln!("barge: warning: {warning}");
            report.warning = Some(warning);
        }
        report
    }

    fn measure(
        &mut self,
        bar: &MappedBar,
        elapsed_ms: &mut Option<f64>,
    ) -> Option<PageCountsReport> {
        if !self.prefault {
            return None;
        }
        if self.support == PrefaultSupport::Missing {
            if !self.said_unsupported {
                eprintln!(
                    "barge: warning: {}; BAR mappings are not measured (the report's `mapped` is null)",
                    PreFaultError::Unsupported
                );
                self.said_unsupported = true;
            }
            return None;
        }
        let stats = self.stats.as_ref()?;
        let before = stats
            .read()
            .map_err(|e| log::warn!("{e}; BAR mappings are not measured"))
            .ok()?;
        let start = Instant::now();
        for area in &bar.areas {
            if let Err(e) = prefault::pre_fault(self.vcpu, area.gpa, area.size) {
                eprintln!(
                    "barge: warning: BAR {} of {}: {e}",
                    bar.placement.index, bar.device
                );
                if matches!(e, PreFaultError::Unsupported) {
                    self.support = PrefaultSupport::Missing;
                    self.said_unsupported = true;
                }
                return None;
            }
        }
        *elapsed_ms = Some(start.elapsed().as_secs_f64() * 1000.0);
        let after = stats
            .read()
            .map_err(|e| log::warn!("{e}; BAR mappings are not measured"))
            .ok()?;
        Some(page_delta(&before, &after))
    }
}

fn describe(counts: &PageCountsReport) -> String {
    format!(
        "{} x 4K, {} x 2M, {} x 1G",
        counts.pages_4k, counts.pages_2m, counts.pages_1g
    )
}

/// The warning for a BAR that got other pages than expected, with the
/// likely causes (see the module docs).
pub fn shortfall_warning(
    bar: &MappedBar,
    mapped: &PageCountsReport,
    expected: &PageCountsReport,
) -> String {
    let placement = &bar.placement;
    let mut causes = Vec::new();
    if let Some(cap) = placement.align_cap {
        if cap.bytes() < placement.reserved.min(LARGEST_PAGE) {
            causes.push(format!(
                "bar-align={} caps this BAR at {} pages on purpose (comparison mode)",
                cap.name().to_lowercase(),
                cap.name()
            ));
        }
    }
    causes.extend(bar.causes.iter().cloned());
    if causes.is_empty() {
        causes.push(
            "the host kernel cannot map this memory with huge pages (VFIO needs huge pfnmap \
             support, Linux 6.12+), the host resource is not aligned to the page size, or part \
             of the region is not mmap-able"
                .to_string(),
        );
    }
    let accounted = if mapped.bytes() < bar.areas.iter().map(|a| a.size).sum::<u64>() {
        " (not every page was mapped)"
    } else {
        ""
    };
    format!(
        "BAR {} of {} got {}{accounted} where {} was possible; likely cause: {}",
        placement.index,
        bar.device,
        describe(mapped),
        describe(expected),
        causes.join("; or ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use resources::placement::{plan, BarInput, BarWidth, DeviceInput, Windows};

    fn placement(size: u64, cap: Option<PageSize>) -> BarPlacement {
        let ram = resources::ram_regions(512 << 20).unwrap();
        let windows = Windows::new(&ram, 46).unwrap();
        let device = DeviceInput {
            name: "shmem0".into(),
            bars: vec![BarInput::new(2, size, BarWidth::Bits64, true)],
            align_cap: cap,
        };
        plan(&[device], &windows).unwrap().devices[0].bars[0].clone()
    }

    #[test]
    fn slots_are_handed_out_in_order() {
        let mut slots = SlotAllocator::new(2);
        assert_eq!(slots.allocate(), 2);
        assert_eq!(slots.allocate(), 3);
    }

    #[test]
    fn uncapped_counts_ignore_bar_align_and_planned_counts_keep_it() {
        let aligned = placement(8 << 30, None);
        assert_eq!(uncapped_counts(&aligned).pages_1g, 8);
        assert_eq!(planned_counts(&aligned).pages_1g, 8);
        let capped = placement(8 << 30, Some(PageSize::Size4K));
        assert_eq!(uncapped_counts(&capped).pages_1g, 8);
        assert_eq!(planned_counts(&capped).pages_4k, 2 << 20);
        let small = placement(4 << 20, None);
        assert_eq!(uncapped_counts(&small).pages_2m, 2);
    }

    #[test]
    fn page_delta_subtracts_and_never_underflows() {
        let before = BTreeMap::from([
            ("pages_4k".to_string(), 100),
            ("pages_2m".to_string(), 5),
            ("pages_1g".to_string(), 2),
        ]);
        let after = BTreeMap::from([
            ("pages_4k".to_string(), 90),
            ("pages_2m".to_string(), 5),
            ("pages_1g".to_string(), 10),
        ]);
        assert_eq!(
            page_delta(&before, &after),
            PageCountsReport {
                pages_4k: 0,
                pages_2m: 0,
                pages_1g: 8
            }
        );
        assert_eq!(
            page_delta(&BTreeMap::new(), &BTreeMap::new()),
            PageCountsReport::default()
        );
    }

    fn mapped_bar(placement: BarPlacement) -> MappedBar {
        let areas = placement
            .areas
            .iter()
            .map(|a| MappedArea {
                slot: 2,
                offset: a.offset,
                gpa: a.gpa,
                size: a.size,
                hva: 0,
            })
            .collect();
        MappedBar {
            areas,
            slot_updates: 1,
            ..MappedBar::trapped("shmem0", &placement)
        }
    }

    #[test]
    fn warnings_name_bar_align_then_device_causes_then_the_generic_list() {
        let capped = mapped_bar(placement(8 << 30, Some(PageSize::Size4K)));
        let mapped = PageCountsReport {
            pages_4k: 2 << 20,
            ..Default::default()
        };
        let expected = uncapped_counts(&capped.placement).into();
        let warning = shortfall_warning(&capped, &mapped, &expected);
        assert!(
            warning.contains("BAR 2 of shmem0 got 2097152 x 4K"),
            "{warning}"
        );
        assert!(
            warning.contains("0 x 4K, 0 x 2M, 8 x 1G was possible"),
            "{warning}"
        );
        assert!(warning.contains("bar-align=4k caps this BAR"), "{warning}");

        let mut memfd = mapped_bar(placement(4 << 20, None));
        memfd.add_cause("shmem is backed by 4 KiB pages");
        let expected = uncapped_counts(&memfd.placement).into();
        let mapped = PageCountsReport {
            pages_4k: 1024,
            ..Default::default()
        };
        let warning = shortfall_warning(&memfd, &mapped, &expected);
        assert!(
            warning.contains("likely cause: shmem is backed by 4 KiB pages"),
            "{warning}"
        );
        assert!(!warning.contains("not every page"), "{warning}");

        let vfio = mapped_bar(placement(4 << 20, None));
        let partial = PageCountsReport {
            pages_4k: 3,
            ..Default::default()
        };
        let warning = shortfall_warning(&vfio, &partial, &expected);
        assert!(warning.contains("huge pfnmap"), "{warning}");
        assert!(warning.contains("not every page was mapped"), "{warning}");
    }

    #[test]
    fn without_prefault_a_mapped_bar_is_reported_unmeasured() {
        struct NoFd;
        impl AsRawFd for NoFd {
            fn as_raw_fd(&self) -> std::os::fd::RawFd {
                -1
            }
        }
        let bar = mapped_bar(placement(4 << 20, None));
        let mut prover = BarProver::new(&NoFd, None, PrefaultSupport::Available).prefault(false);
        let report = prover.prove(&bar);
        assert!(!report.trapped);
        assert_eq!((report.mapped, report.prefault_ms), (None, None));
        assert!(report.warning.is_none());
    }

    #[test]
    fn trapped_bars_report_nothing_to_map_and_are_ok() {
        struct NoFd;
        impl AsRawFd for NoFd {
            fn as_raw_fd(&self) -> std::os::fd::RawFd {
                -1
            }
        }
        let ram = resources::ram_regions(512 << 20).unwrap();
        let windows = Windows::new(&ram, 46).unwrap();
        let device = DeviceInput {
            name: "shmem0".into(),
            bars: vec![BarInput::new(0, 256, BarWidth::Bits32, false)],
            align_cap: None,
        };
        let placement = plan(&[device], &windows).unwrap().devices[0].bars[0].clone();
        assert!(placement.trap);
        let bar = MappedBar::trapped("shmem0", &placement);
        let mut prover = BarProver::new(&NoFd, None, PrefaultSupport::Missing);
        let report = prover.prove(&bar);
        assert!(report.trapped);
        assert!(report.huge_ok);
        assert_eq!(report.mapped, Some(PageCountsReport::default()));
        assert_eq!((report.slots, report.slot_updates, report.hva), (0, 0, 0));
        assert_eq!(report.gpa, placement.gpa);
    }
}
