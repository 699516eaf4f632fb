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
//!    (`pci::log_event`). Each set goes through `kvm::map_guest_memory`,
//!    which counts the ioctl for its slot in the VM's [`MemslotLog`]; the
//!    report's `slot_updates` is that count over the BAR's slots
//!    ([`slot_updates`]), so a slot torn down and set again shows.
//! 2. [`BarProver::prove`] (after the vCPUs exist, before the guest runs)
//!    reads KVM's stats, KVM_PRE_FAULT_MEMORY's every area, reads the stats
//!    again: the change of `pages_4k`/`pages_2m`/`pages_1g` is what KVM
//!    mapped the BAR with. Without the ioctl (Linux < 6.10, no TDP) it says
//!    so once and reports `mapped: null`.
//!    Where KVM cannot pre-fault (aarch64), a VFIO BAR's host mapping is
//!    watched instead from the moment it is mapped ([`MappedBar::host_faults`],
//!    `machine::host_faults`): the P2P DMA map faults the whole BAR in, and
//!    the pages vfio-pci's fault handler mapped, by size, are the report's
//!    `host_mapped` (`proof: host_faults`). KVM's stage 2 on arm64 picks
//!    its block size from the alignment of the mapping and memslot, not
//!    from the host's level; where the kernel dumps it, the report's
//!    `stage2` has it after the run (`machine::stage2`), else nothing is
//!    claimed.
//! 3. The report's `huge_ok` says KVM mapped what was `planned`
//!    ([`compare_with_plan`]). When it mapped other pages,
//!    [`BarProver::prove`] puts the likely causes in the report's `warning`
//!    and prints it on stderr: the device's own causes
//!    ([`MappedBar::add_cause`]: 4 KiB host pages behind a memfd, a
//!    misaligned host resource, ...), else a generic list. A BAR that
//!    `bar-align` caps on purpose plans smaller pages than its
//!    `best_possible`; when it gets its plan it is `huge_ok`, and `warning`
//!    only notes, as information (logged, not printed as a warning), what
//!    the cap costs.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use kvm_ioctls::VmFd;
use resources::placement::{area_pages, BarPlacement, PageCounts, PageSize};

use crate::machine::host_faults::{self, HostFaultCounter};
use crate::machine::kvm::{self, KvmError, MemslotLog};
use crate::machine::kvm_stats::KvmStatsFd;
use crate::machine::mapping::{AlignedMapping, MappingError};
use crate::machine::prefault::{self, PreFaultError};
use crate::progress::{Progress, ProgressOutput};
use crate::report::{BarReport, HostMappedReport, P2pReport, PageCountsReport};

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
        source: MappingError,
    },
    /// KVM refused a memslot.
    #[error("BAR {index} of {device}: {source}")]
    Slot {
        /// Device name.
        device: String,
        /// BAR index.
        index: u8,
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

/// What became of one BAR's peer-to-peer map made in the background
/// (`p2p=background`, see [`crate::pci_devices::vfio::background`]).
#[derive(Debug, Clone)]
pub enum P2pOutcome {
    /// Mapped; `report.ms` is the map's own time, `done` when it ended.
    Mapped {
        /// The mapping, as the report shows it.
        report: P2pReport,
        /// When the map was done.
        done: Instant,
    },
    /// The host refused it: the warning, already printed.
    Refused {
        /// The warning line.
        warning: String,
    },
}

/// Where a BAR's [`P2pOutcome`] is left; empty while the map is pending
/// (or was never made: the VM stopped first).
pub type P2pSlot = Arc<OnceLock<P2pOutcome>>;

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
    /// Device-specific likely causes of a shortfall (see the module docs).
    pub causes: Vec<String>,
    /// Its peer-to-peer DMA mapping, when it has one.
    pub p2p: Option<P2pReport>,
    /// Why it has none although `p2p=auto` asked for one.
    pub p2p_warning: Option<String>,
    /// With `p2p=background`: where the background map leaves its outcome.
    pub p2p_pending: Option<P2pSlot>,
    /// Counts the host's faults on the mapping where KVM cannot pre-fault
    /// (see the module docs); `None` when not counted.
    pub host_faults: Option<HostFaultCounter>,
}

impl MappedBar {
    /// A BAR with no memslot (trapped), for the report.
    pub fn trapped(device: &str, placement: &BarPlacement) -> Self {
        Self {
            device: device.to_string(),
            placement: placement.clone(),
            mapping: None,
            areas: Vec::new(),
            causes: Vec::new(),
            p2p: None,
            p2p_warning: None,
            p2p_pending: None,
            host_faults: None,
        }
    }

    /// Starts counting the host's faults on the BAR's mapping (a VFIO BAR
    /// where KVM cannot pre-fault). When tracefs cannot count them, says why
    /// on stderr (once per process) and the BAR stays unmeasured.
    pub fn watch_host_faults(&mut self) {
        static SAID: OnceLock<()> = OnceLock::new();
        let Some(mapping) = &self.mapping else {
            return;
        };
        match HostFaultCounter::watch(mapping.addr(), mapping.len()) {
            Ok(counter) => self.host_faults = Some(counter),
            Err(e) => {
                if SAID.set(()).is_ok() {
                    eprintln!("barge: warning: {e}; BAR mappings are not measured");
                }
            }
        }
    }

    /// The host address of the BAR's start (0 when trapped).
    pub fn hva(&self) -> u64 {
        self.mapping.as_ref().map_or(0, |mapping| mapping.addr())
    }

    /// The memslot numbers of its areas.
    pub fn slots(&self) -> Vec<u32> {
        self.areas.iter().map(|area| area.slot).collect()
    }

    /// Adds a likely cause for getting other pages than planned, shown
    /// only when that happens.
    pub fn add_cause(&mut self, cause: impl Into<String>) {
        self.causes.push(cause.into());
    }
}

/// Maps `placement`'s areas of `fd` (the BAR's data starts at
/// `region_offset` in `fd`: 0 for a memfd, the VFIO region's offset for a
/// VFIO device) and registers one memslot per area, counting each set in
/// `memslots`. A BAR without areas (trapped) maps nothing. On error the
/// host mapping is unmapped; memslots of earlier areas stay registered until
/// the VM fd closes (the build fails and the guest never runs; KVM follows
/// the unmap through its MMU notifier).
pub fn map_bar_areas(
    vm: &VmFd,
    memslots: &MemslotLog,
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
        placement.hva_modulus(),
        placement.hva_phase(),
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
        causes: Vec::new(),
        p2p: None,
        p2p_warning: None,
        p2p_pending: None,
        host_faults: None,
    };
    for area in &placement.areas {
        let mapped = MappedArea {
            slot: slots.allocate(),
            offset: area.offset,
            gpa: area.gpa,
            size: area.size,
            hva: mapping.addr() + area.hva_offset(),
        };
        // SAFETY: `mapped.hva..+mapped.size` lies inside `mapping`, the
        // shared mapping of this area of `fd` made above. `mapping` moves
        // into the returned `MappedBar`, which the builder keeps (in the
        // `BuiltVm`'s devices, dropped after its VM fd) and which never
        // unmaps or remaps it while alive. If a later area fails, `mapping`
        // is unmapped while this slot is still registered, but then the
        // build fails before any vCPU runs and the VM fd closes.
        unsafe {
            kvm::map_guest_memory(
                vm,
                memslots,
                mapped.slot,
                mapped.gpa,
                mapped.size,
                mapped.hva,
            )
        }
        .map_err(|source| BarMappingError::Slot {
            device: device.to_string(),
            index: placement.index,
            source,
        })?;
        bar.areas.push(mapped);
    }
    bar.mapping = Some(Arc::new(mapping));
    Ok(bar)
}

/// KVM_SET_USER_MEMORY_REGION calls `memslots` saw for `bar`'s slots: one
/// per area when each slot was set once and never torn down (0 when
/// trapped).
pub fn slot_updates(bar: &MappedBar, memslots: &MemslotLog) -> u32 {
    memslots.updates_of(bar.slots())
}

/// The best page counts of a placement without any `bar-align` cap (the
/// report's `best_possible`): every area tiled with pages up to
/// `min(reservation, 1 GiB)`.
pub fn uncapped_counts(placement: &BarPlacement) -> PageCounts {
    let limit = placement
        .natural_align()
        .min(resources::placement::HOST_MAX_PFNMAP_PAGE);
    let mut total = PageCounts::default();
    for area in &placement.areas {
        let (_, counts) = area_pages(area.gpa, area.size, limit);
        total.pages_4k += counts.pages_4k;
        total.pages_2m += counts.pages_2m;
        total.pages_1g += counts.pages_1g;
    }
    total
}

/// The plan's page counts, with its cap (the report's `planned`).
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

/// Proves BARs through one vCPU and the VM's stats fd, and reads their
/// memslot updates from the VM's [`MemslotLog`].
pub struct BarProver<'a, V: AsRawFd> {
    vcpu: &'a V,
    memslots: &'a MemslotLog,
    stats: Option<KvmStatsFd>,
    support: PrefaultSupport,
    said_unsupported: bool,
    prefault: bool,
    progress: ProgressOutput,
}

/// BARs are pre-faulted in pieces of this many bytes, so that the progress
/// of a large BAR at small pages shows between them.
const PREFAULT_PIECE: u64 = 1 << 30;

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
    /// A prover using `vcpu` (any vCPU of the VM, created and configured),
    /// the VM's memslot log and its statistics (`None` when they cannot be
    /// opened).
    pub fn new(
        vcpu: &'a V,
        memslots: &'a MemslotLog,
        stats: Option<KvmStatsFd>,
        support: PrefaultSupport,
    ) -> Self {
        Self {
            vcpu,
            memslots,
            stats,
            support,
            said_unsupported: false,
            prefault: true,
            progress: ProgressOutput::Off,
        }
    }

    /// Where the progress of a long pre-fault goes ([`ProgressOutput::Off`]
    /// unless told).
    pub fn progress(mut self, progress: ProgressOutput) -> Self {
        self.progress = progress;
        self
    }

    /// Whether [`Self::prove`] pre-faults (the default); without it BARs
    /// fault in on the guest's first touch and `mapped` stays null.
    pub fn prefault(mut self, prefault: bool) -> Self {
        self.prefault = prefault;
        self
    }

    /// Pre-faults `bar` and reports it (see the module docs).
    pub fn prove(&mut self, bar: &MappedBar) -> BarReport {
        let mut prefault_ms = None;
        let mapped = if bar.areas.is_empty() {
            None
        } else {
            self.measure(bar, &mut prefault_ms)
        };
        let mut report = bar_report(bar, slot_updates(bar, self.memslots), mapped, prefault_ms);
        if report.proof == PROOF_NONE && self.prefault {
            if let Some(counter) = &bar.host_faults {
                apply_host_proof(&mut report, bar, counter);
            }
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
                    "barge: warning: {}; KVM's BAR mappings are not counted (the report's `mapped` is null); a VFIO BAR is measured on the host side instead where tracefs can count its faults (`host_mapped`)",
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
        let total: u64 = bar.areas.iter().map(|area| area.size).sum();
        let mut shown = Progress::start(
            &format!("pre-fault of BAR {} of {}", bar.placement.index, bar.device),
            total,
            self.progress,
        );
        let mut before_area = 0;
        for area in &bar.areas {
            let result = prefault::pre_fault_in_pieces(
                self.vcpu,
                area.gpa,
                area.size,
                PREFAULT_PIECE,
                |done| shown.update(before_area + done),
            );
            before_area += area.size;
            if let Err(e) = result {
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
        shown.finish();
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

/// The report of `bar`, whose slots saw `slot_updates` sets, once KVM
/// mapped `mapped` for it (`None`: not measured) in `prefault_ms`:
/// `huge_ok` when it got what was planned, and the `warning` (printed on
/// stderr) or bar-align note ([`compare_with_plan`]). A trapped BAR maps
/// nothing and is `huge_ok`.
pub fn bar_report(
    bar: &MappedBar,
    slot_updates: u32,
    mapped: Option<PageCountsReport>,
    prefault_ms: Option<f64>,
) -> BarReport {
    let placement = &bar.placement;
    let planned: PageCountsReport = planned_counts(placement).into();
    let best_possible: PageCountsReport = uncapped_counts(placement).into();
    let mut report = BarReport {
        index: placement.index,
        size: placement.size,
        gpa: placement.gpa,
        hva: bar.hva(),
        trapped: bar.areas.is_empty(),
        planned_page_size: placement.page_size().map_or(0, PageSize::bytes),
        planned,
        best_possible,
        mapped,
        proof: PROOF_NONE.to_string(),
        host_mapped: None,
        stage2: None,
        slots: bar.areas.len() as u32,
        slot_updates,
        huge_ok: false,
        prefault_ms,
        p2p: bar.p2p.clone(),
        warning: bar.p2p_warning.clone(),
        note: None,
    };
    if report.trapped {
        report.mapped = Some(PageCountsReport::default());
        report.huge_ok = true;
        report.proof = PROOF_TRAPPED.to_string();
        return report;
    }
    let Some(mapped) = mapped else {
        return report;
    };
    report.proof = PROOF_KVM.to_string();
    judge(&mut report, bar, &mapped);
    report
}

/// The report's `proof` when KVM pre-faulted and counted.
pub const PROOF_KVM: &str = "kvm_prefault";
/// The report's `proof` when the host's faults were counted.
pub const PROOF_HOST_FAULTS: &str = "host_faults";
/// The report's `proof` of a trapped BAR.
pub const PROOF_TRAPPED: &str = "trapped";
/// The report's `proof` when nothing was measured.
pub const PROOF_NONE: &str = "none";

/// The host's pages for `bar` from its fault counter: the report's
/// `host_mapped`, `proof: host_faults`, and `huge_ok` from them.
fn apply_host_proof(report: &mut BarReport, bar: &MappedBar, counter: &HostFaultCounter) {
    let calls = counter.calls();
    if calls.is_empty() {
        // Nothing faulted it in before the guest: with p2p=off the guest's
        // first touch does. Nothing is claimed.
        log::info!(
            "BAR {} of {}: no host fault before the guest ran (p2p=off maps it on the guest's \
             first touch); the report's `host_mapped` is null",
            bar.placement.index,
            bar.device
        );
        return;
    }
    let mapped = host_faults::mapped_by_order(&calls);
    let pages = PageCountsReport {
        pages_4k: mapped.get(&0).copied().unwrap_or(0),
        pages_2m: mapped.get(&9).copied().unwrap_or(0),
        pages_1g: mapped.get(&18).copied().unwrap_or(0),
    };
    report.host_mapped = Some(HostMappedReport {
        method: counter.method().to_string(),
        pages,
        fallbacks: host_faults::fallbacks_by_order(&calls).values().sum(),
    });
    report.proof = PROOF_HOST_FAULTS.to_string();
    judge(report, bar, &pages);
}

/// Sets `huge_ok`, `note` and `warning` of `report` from the pages
/// `mapped` (KVM's or the host's) against the plan.
fn judge(report: &mut BarReport, bar: &MappedBar, mapped: &PageCountsReport) {
    let (planned, best_possible) = (report.planned, report.best_possible);
    match compare_with_plan(bar, mapped, &planned, &best_possible) {
        PlanComparison::AsPlanned => report.huge_ok = true,
        PlanComparison::AsPlannedBelowBest { note } => {
            log::info!("{note}");
            report.huge_ok = true;
            report.note = Some(note);
        }
        PlanComparison::OtherThanPlanned { warning } => {
            eprintln!("barge: warning: {warning}");
            report.warning = Some(match report.warning.take() {
                Some(p2p) => format!("{warning}; {p2p}"),
                None => warning,
            });
        }
    }
}

/// How the pages KVM mapped for a BAR compare with its plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanComparison {
    /// KVM mapped what was planned, and the plan is the best possible.
    AsPlanned,
    /// KVM mapped what was planned, which is less than `best_possible`
    /// because `bar-align` caps the BAR on purpose.
    AsPlannedBelowBest {
        /// What the cap costs, as information ([`bar_align_note`]).
        note: String,
    },
    /// KVM mapped other pages than planned.
    OtherThanPlanned {
        /// The likely causes ([`shortfall_warning`]).
        warning: String,
    },
}

/// Compares `mapped` with the BAR's `planned` pages (see the module docs).
pub fn compare_with_plan(
    bar: &MappedBar,
    mapped: &PageCountsReport,
    planned: &PageCountsReport,
    best_possible: &PageCountsReport,
) -> PlanComparison {
    if mapped != planned {
        return PlanComparison::OtherThanPlanned {
            warning: shortfall_warning(bar, mapped, planned, best_possible),
        };
    }
    match bar_align_note(bar, planned, best_possible) {
        Some(note) => PlanComparison::AsPlannedBelowBest { note },
        None => PlanComparison::AsPlanned,
    }
}

/// What `bar-align` costs a BAR that got its plan: the cap and the
/// `best_possible` pages without it. `None` when the plan is the best.
pub fn bar_align_note(
    bar: &MappedBar,
    planned: &PageCountsReport,
    best_possible: &PageCountsReport,
) -> Option<String> {
    let cap = bar_align_cap(bar, planned, best_possible)?;
    Some(format!(
        "BAR {} of {} got {} as planned: {cap}; {} was possible without it",
        bar.placement.index,
        bar.device,
        describe(planned),
        describe(best_possible),
    ))
}

/// The `bar-align` cap, described, when it makes `planned` less than
/// `best_possible`.
fn bar_align_cap(
    bar: &MappedBar,
    planned: &PageCountsReport,
    best_possible: &PageCountsReport,
) -> Option<String> {
    let cap = bar
        .placement
        .effective_align_cap()
        .filter(|_| planned != best_possible)?;
    Some(format!(
        "bar-align={} caps this BAR at {} pages on purpose (comparison mode)",
        cap.name().to_lowercase(),
        cap.name()
    ))
}

/// The warning for a BAR that got other pages than `planned`, with the
/// likely causes (see the module docs), and what `bar-align` costs when it
/// caps the plan.
pub fn shortfall_warning(
    bar: &MappedBar,
    mapped: &PageCountsReport,
    planned: &PageCountsReport,
    best_possible: &PageCountsReport,
) -> String {
    let placement = &bar.placement;
    let mut causes = bar.causes.clone();
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
    let capped = bar_align_cap(bar, planned, best_possible)
        .map(|cap| {
            format!(
                ". Also, {cap}; {} was possible without it",
                describe(best_possible)
            )
        })
        .unwrap_or_default();
    format!(
        "BAR {} of {} got {}{accounted} where {} was planned; likely cause: {}{capped}",
        placement.index,
        bar.device,
        describe(mapped),
        describe(planned),
        causes.join("; or ")
    )
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, FromRawFd};

    use resources::placement::{plan, BarInput, BarRange, BarWidth, DeviceInput, Windows};

    use super::*;

    /// A vCPU stand-in for proving without pre-faulting.
    struct NoFd;

    impl AsRawFd for NoFd {
        fn as_raw_fd(&self) -> std::os::fd::RawFd {
            -1
        }
    }

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
            ..MappedBar::trapped("shmem0", &placement)
        }
    }

    fn counts(placement: &BarPlacement) -> (PageCountsReport, PageCountsReport) {
        (
            planned_counts(placement).into(),
            uncapped_counts(placement).into(),
        )
    }

    #[test]
    fn a_bar_that_got_its_plan_is_as_planned_and_a_bar_align_cap_only_noted() {
        let whole = mapped_bar(placement(8 << 30, None));
        let (planned, best_possible) = counts(&whole.placement);
        assert_eq!(planned, best_possible);
        assert_eq!(
            compare_with_plan(&whole, &planned, &planned, &best_possible),
            PlanComparison::AsPlanned
        );

        let capped = mapped_bar(placement(8 << 30, Some(PageSize::Size4K)));
        let (planned, best_possible) = counts(&capped.placement);
        let mapped = PageCountsReport {
            pages_4k: 2 << 20,
            ..Default::default()
        };
        assert_eq!(mapped, planned);
        let PlanComparison::AsPlannedBelowBest { note } =
            compare_with_plan(&capped, &mapped, &planned, &best_possible)
        else {
            panic!("a capped BAR that got its plan is as planned, with a note");
        };
        assert!(note.contains("BAR 2 of shmem0 got 2097152 x 4K"), "{note}");
        assert!(
            note.contains("0 x 4K, 0 x 2M, 8 x 1G was possible"),
            "{note}"
        );
        assert!(note.contains("bar-align=4k caps this BAR"), "{note}");
    }

    #[test]
    fn huge_ok_means_got_what_was_planned_and_keeps_the_bar_align_note() {
        // bar-align=4k on an 8 GiB BAR, mapped with the planned 4K pages.
        let capped = mapped_bar(placement(8 << 30, Some(PageSize::Size4K)));
        let planned: PageCountsReport = planned_counts(&capped.placement).into();
        let report = bar_report(&capped, 1, Some(planned), Some(1.0));
        assert!(report.huge_ok, "{report:?}");
        assert_eq!(report.planned.pages_4k, 2 << 20);
        assert_eq!(report.best_possible.pages_1g, 8);
        assert!(report.warning.is_none(), "{report:?}");
        let note = report.note.unwrap_or_default();
        assert!(
            note.contains("as planned: bar-align=4k caps this BAR"),
            "{note}"
        );

        // The same BAR short of its plan.
        let fewer = PageCountsReport {
            pages_4k: 3,
            ..Default::default()
        };
        let report = bar_report(&capped, 1, Some(fewer), Some(1.0));
        assert!(!report.huge_ok, "{report:?}");
        let warning = report.warning.unwrap_or_default();
        assert!(warning.contains("not every page was mapped"), "{warning}");

        // No cap: the plan is the best; 2M pages as planned, no note.
        let whole = mapped_bar(placement(4 << 20, None));
        let planned: PageCountsReport = planned_counts(&whole.placement).into();
        let report = bar_report(&whole, 1, Some(planned), Some(1.0));
        assert!(
            report.huge_ok && report.warning.is_none() && report.note.is_none(),
            "{report:?}"
        );
        assert_eq!(report.planned, report.best_possible);
        // Not measured: not known to be ok.
        let report = bar_report(&whole, 1, None, None);
        assert!(!report.huge_ok && report.warning.is_none(), "{report:?}");
    }

    #[test]
    fn warnings_name_device_causes_then_the_generic_list_and_any_bar_align_cap() {
        let mut memfd = mapped_bar(placement(4 << 20, None));
        memfd.add_cause("shmem is backed by 4 KiB pages");
        let (planned, best_possible) = counts(&memfd.placement);
        let mapped = PageCountsReport {
            pages_4k: 1024,
            ..Default::default()
        };
        let PlanComparison::OtherThanPlanned { warning } =
            compare_with_plan(&memfd, &mapped, &planned, &best_possible)
        else {
            panic!("4K pages where 2M were planned is a shortfall");
        };
        assert!(
            warning
                .contains("got 1024 x 4K, 0 x 2M, 0 x 1G where 0 x 4K, 2 x 2M, 0 x 1G was planned"),
            "{warning}"
        );
        assert!(
            warning.contains("likely cause: shmem is backed by 4 KiB pages"),
            "{warning}"
        );
        assert!(!warning.contains("not every page"), "{warning}");
        assert!(!warning.contains("bar-align"), "{warning}");

        let vfio = mapped_bar(placement(4 << 20, None));
        let partial = PageCountsReport {
            pages_4k: 3,
            ..Default::default()
        };
        let warning = shortfall_warning(&vfio, &partial, &planned, &best_possible);
        assert!(warning.contains("huge pfnmap"), "{warning}");
        assert!(warning.contains("not every page was mapped"), "{warning}");

        // Capped at 2M but mapped with 4K: short of the plan, and the
        // warning still says what the cap costs.
        let capped = mapped_bar(placement(8 << 30, Some(PageSize::Size2M)));
        let (planned, best_possible) = counts(&capped.placement);
        let mapped = PageCountsReport {
            pages_4k: 2 << 20,
            ..Default::default()
        };
        let warning = shortfall_warning(&capped, &mapped, &planned, &best_possible);
        assert!(
            warning.contains("where 0 x 4K, 4096 x 2M, 0 x 1G was planned"),
            "{warning}"
        );
        assert!(warning.contains("huge pfnmap"), "{warning}");
        assert!(
            warning.contains(
                "bar-align=2m caps this BAR at 2M pages on purpose (comparison mode); \
                 0 x 4K, 0 x 2M, 8 x 1G was possible without it"
            ),
            "{warning}"
        );
    }

    #[test]
    fn without_prefault_a_mapped_bar_is_reported_unmeasured() {
        let bar = mapped_bar(placement(4 << 20, None));
        let memslots = MemslotLog::new();
        let mut prover =
            BarProver::new(&NoFd, &memslots, None, PrefaultSupport::Available).prefault(false);
        let report = prover.prove(&bar);
        assert!(!report.trapped);
        assert_eq!((report.mapped, report.prefault_ms), (None, None));
        assert!(report.warning.is_none());
    }

    #[test]
    fn trapped_bars_report_nothing_to_map_and_are_ok() {
        let ram = resources::ram_regions(512 << 20).unwrap();
        let windows = Windows::new(&ram, 46).unwrap();
        let device = DeviceInput {
            name: "shmem0".into(),
            bars: vec![BarInput::new(0, 256, BarWidth::Bits32, false)],
            align_cap: None,
        };
        let placement = plan(&[device], &windows).unwrap().devices[0].bars[0].clone();
        assert!(placement.trapped());
        let bar = MappedBar::trapped("shmem0", &placement);
        let memslots = MemslotLog::new();
        let mut prover = BarProver::new(&NoFd, &memslots, None, PrefaultSupport::Missing);
        let report = prover.prove(&bar);
        assert!(report.trapped);
        assert!(report.huge_ok);
        assert_eq!(report.mapped, Some(PageCountsReport::default()));
        assert_eq!((report.slots, report.slot_updates, report.hva), (0, 0, 0));
        assert_eq!(report.gpa, placement.gpa);
    }

    fn memfd(len: u64) -> std::fs::File {
        // SAFETY: memfd_create with a valid NUL-terminated name; the result
        // is checked before use.
        let fd =
            unsafe { libc::memfd_create(c"barge-bar-mapping-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just created and nothing else owns it.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(len).unwrap();
        file
    }

    /// Needs /dev/kvm: `map_bar_areas` sets each area's slot exactly once,
    /// and any later set or delete of one of the BAR's slots through
    /// `kvm::map_guest_memory` shows in the BAR's `slot_updates`.
    #[test]
    fn slot_updates_count_every_set_of_the_bars_slots() {
        if !guest_programs::testing::kvm_or_skip("slot_updates_count_every_set_of_the_bars_slots") {
            return;
        }
        let vm = kvm_ioctls::Kvm::new()
            .and_then(|kvm| kvm.create_vm())
            .expect("/dev/kvm (kvm_or_skip checked it)");
        // A 4 MiB BAR with two mmap-able areas: [0, 1 MiB) and [2, 4 MiB).
        let ram = resources::ram_regions(512 << 20).unwrap();
        let windows = Windows::new(&ram, 46).unwrap();
        let bar_input = BarInput {
            areas: Some(vec![
                BarRange::new(0, 1 << 20),
                BarRange::new(2 << 20, 2 << 20),
            ]),
            ..BarInput::new(2, 4 << 20, BarWidth::Bits64, true)
        };
        let device = DeviceInput {
            name: "shmem0".into(),
            bars: vec![bar_input],
            align_cap: None,
        };
        let placement = plan(&[device], &windows).unwrap().devices[0].bars[0].clone();
        assert_eq!(placement.areas.len(), 2);
        let file = memfd(4 << 20);
        let memslots = MemslotLog::new();
        let mut slots = SlotAllocator::new(1);
        let bar = map_bar_areas(
            &vm,
            &memslots,
            file.as_fd(),
            0,
            "shmem0",
            &placement,
            &mut slots,
        )
        .expect("map the BAR");
        let prove = |bar: &MappedBar| {
            BarProver::new(&NoFd, &memslots, None, PrefaultSupport::Available)
                .prefault(false)
                .prove(bar)
        };
        assert_eq!(bar.slots(), vec![1, 2]);
        let report = prove(&bar);
        assert_eq!(
            (report.slots, report.slot_updates),
            (2, 2),
            "one set per area"
        );

        // Tear the first area's slot down and set it again (what a VMM that
        // follows the guest's BAR decode toggles does): both calls count.
        let area = bar.areas[0];
        // SAFETY: a delete (size 0) points KVM at no memory.
        unsafe { kvm::map_guest_memory(&vm, &memslots, area.slot, area.gpa, 0, area.hva) }
            .expect("delete the slot");
        assert_eq!(prove(&bar).slot_updates, 3);
        // SAFETY: `area.hva..+area.size` is inside `bar`'s mapping, which
        // stays mapped until after `vm` is dropped below; the VM has no
        // vCPU, so nothing accesses the slot anyway.
        unsafe { kvm::map_guest_memory(&vm, &memslots, area.slot, area.gpa, area.size, area.hva) }
            .expect("set the slot again");
        assert_eq!(prove(&bar).slot_updates, 4);
        assert_eq!((memslots.updates(1), memslots.updates(2)), (3, 1));
        drop(vm);
    }

    /// A counter over a fake tracefs whose hist says `lines`.
    fn counter_with_hist(name: &str, lines: &str) -> HostFaultCounter {
        let root = std::env::temp_dir().join(format!("barge-proof-{}-{name}", std::process::id()));
        let dir = root.join("events/barge/test");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hist"), lines).unwrap();
        HostFaultCounter::reading(&root, "test")
    }

    #[test]
    fn the_host_proof_reports_the_mapped_pages_and_judges_them_against_the_plan() {
        let placement = placement(64 << 20, None);
        let bar = mapped_bar(placement.clone());
        assert_eq!(planned_counts(&placement).pages_2m, 32);
        // 32 PMD mappings: as planned.
        let counter = counter_with_hist(
            "ok",
            "{ order:          9, ret:        256 } hitcount:         32\n",
        );
        let mut report = bar_report(&bar, 1, None, None);
        assert_eq!(report.proof, PROOF_NONE);
        apply_host_proof(&mut report, &bar, &counter);
        assert_eq!(report.proof, PROOF_HOST_FAULTS);
        let host = report.host_mapped.clone().unwrap();
        assert_eq!(host.pages.pages_2m, 32);
        assert_eq!(host.fallbacks, 0);
        assert!(report.huge_ok, "{report:?}");
        assert_eq!(report.mapped, None, "KVM's counts stay unknown");
        // Every PMD attempt fell back to 4 KiB pages: not as planned.
        let counter = counter_with_hist(
            "fallback",
            "{ order:          9, ret:       2048 } hitcount:         32\n\
             { order:          0, ret:        256 } hitcount:      16384\n",
        );
        let mut report = bar_report(&bar, 1, None, None);
        apply_host_proof(&mut report, &bar, &counter);
        let host = report.host_mapped.clone().unwrap();
        assert_eq!((host.pages.pages_4k, host.fallbacks), (16_384, 32));
        assert!(!report.huge_ok);
        assert!(
            report
                .warning
                .as_deref()
                .unwrap()
                .contains("got 16384 x 4K"),
            "{report:?}"
        );
        // Nothing faulted before the guest (p2p=off): nothing is claimed.
        let counter = counter_with_hist("none", "");
        let mut report = bar_report(&bar, 1, None, None);
        apply_host_proof(&mut report, &bar, &counter);
        assert_eq!(report.proof, PROOF_NONE);
        assert_eq!(report.host_mapped, None);
        assert!(!report.huge_ok);
    }
}
