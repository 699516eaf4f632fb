//! Where a boot's time goes before the guest runs: [`PhaseClock`] times the
//! boot sequence's steps back to back, so that they cover the time from
//! the process start to the first KVM_RUN without gaps or overlaps and
//! their sum never exceeds `start_to_first_run_ms`.

use std::time::{Duration, Instant};

use crate::report::PhasesReport;

/// A step of the boot sequence, in the order [`super::boot_and_run`] takes
/// them (the report's `phases_ms` keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootPhase {
    /// Process start to the boot sequence (command line, configuration
    /// file, console set-up).
    Startup,
    /// The configuration, the kernel's format, the report path, the seccomp
    /// filters.
    Checks,
    /// /dev/kvm, the CPU count and CPUID, KVM_CREATE_VM.
    CreateVm,
    /// Opening the devices (VFIO groups or cdevs, images, taps, shared
    /// memory).
    OpenDevices,
    /// Placing the MMIO windows and the BARs.
    Plan,
    /// Guest RAM: allocation and its memslots.
    RamAllocation,
    /// Guest RAM mapped into the IOMMU for device DMA.
    RamDmaMap,
    /// The devices' attachment apart from the RAM DMA map: BAR mmaps and
    /// memslots, P2P DMA maps of BARs (not with `p2p=background`), interrupts.
    BarMapping,
    /// Kernel, initramfs, command line, ACPI tables and boot structures.
    KernelLoad,
    /// Buses, the PCI segment and the vCPUs.
    VcpuCreate,
    /// Pre-faulting the BARs and reading what KVM mapped.
    Prefault,
    /// The vCPU threads' start, to the first KVM_RUN.
    VcpuStart,
}

impl BootPhase {
    /// Every phase, in boot order.
    pub const ALL: [BootPhase; 12] = [
        BootPhase::Startup,
        BootPhase::Checks,
        BootPhase::CreateVm,
        BootPhase::OpenDevices,
        BootPhase::Plan,
        BootPhase::RamAllocation,
        BootPhase::RamDmaMap,
        BootPhase::BarMapping,
        BootPhase::KernelLoad,
        BootPhase::VcpuCreate,
        BootPhase::Prefault,
        BootPhase::VcpuStart,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// Times the boot's phases back to back: each [`PhaseClock::end`] gives the
/// phase the time since the previous one ended.
#[derive(Debug, Clone)]
pub struct PhaseClock {
    started: Instant,
    last: Instant,
    spent: [Duration; BootPhase::ALL.len()],
}

impl PhaseClock {
    /// A clock whose first phase starts now.
    pub fn starting_now() -> Self {
        Self::starting_at(Instant::now())
    }

    /// A clock whose first phase starts at `start`.
    pub fn starting_at(start: Instant) -> Self {
        PhaseClock {
            started: start,
            last: start,
            spent: [Duration::ZERO; BootPhase::ALL.len()],
        }
    }

    /// When the first phase started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// When the running phase started (the last phase's end).
    pub fn last_mark(&self) -> Instant {
        self.last
    }

    /// Ends the running phase as `phase` (added to what `phase` had).
    pub fn end(&mut self, phase: BootPhase) {
        self.end_at(phase, Instant::now());
    }

    /// Ends the running phase at `at` (not before the last mark).
    pub fn end_at(&mut self, phase: BootPhase, at: Instant) {
        let at = at.max(self.last);
        self.spent[phase.index()] += at - self.last;
        self.last = at;
    }

    /// Gives `to` up to `part` of what `from` has (a step measured inside
    /// another, as the RAM DMA map inside the devices' attachment).
    pub fn carve(&mut self, from: BootPhase, to: BootPhase, part: Duration) {
        let part = part.min(self.spent[from.index()]);
        self.spent[from.index()] -= part;
        self.spent[to.index()] += part;
    }

    /// Adds `earlier` (the time before this clock started, as the process's
    /// start-up) to `phase`.
    pub fn add(&mut self, phase: BootPhase, earlier: Duration) {
        self.spent[phase.index()] += earlier;
    }

    /// What `phase` has so far.
    pub fn spent(&self, phase: BootPhase) -> Duration {
        self.spent[phase.index()]
    }

    /// The phases in whole milliseconds, each the difference of the
    /// rounded-down running totals: so each is within a millisecond of its
    /// time and they add up to the whole, rounded down (for a boot's
    /// clock: `start_to_first_run_ms` exactly).
    pub fn report(&self) -> PhasesReport {
        let mut ms = [0u64; BootPhase::ALL.len()];
        let mut running = Duration::ZERO;
        let mut reported = 0u64;
        for phase in BootPhase::ALL {
            running += self.spent(phase);
            let whole = u64::try_from(running.as_millis()).unwrap_or(u64::MAX);
            ms[phase.index()] = whole - reported;
            reported = whole;
        }
        let at = |phase: BootPhase| ms[phase.index()];
        PhasesReport {
            startup: at(BootPhase::Startup),
            checks: at(BootPhase::Checks),
            create_vm: at(BootPhase::CreateVm),
            open_devices: at(BootPhase::OpenDevices),
            plan: at(BootPhase::Plan),
            ram_allocation: at(BootPhase::RamAllocation),
            ram_dma_map: at(BootPhase::RamDmaMap),
            bar_mapping: at(BootPhase::BarMapping),
            kernel_load: at(BootPhase::KernelLoad),
            vcpu_create: at(BootPhase::VcpuCreate),
            prefault: at(BootPhase::Prefault),
            vcpu_start: at(BootPhase::VcpuStart),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_back_to_back_and_carving_moves_time() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut clock = PhaseClock::starting_at(t0);
        clock.end_at(BootPhase::Checks, at(3));
        clock.end_at(BootPhase::BarMapping, at(10));
        // A mark before the last one adds nothing and moves nothing back.
        clock.end_at(BootPhase::Plan, at(5));
        clock.end_at(BootPhase::BarMapping, at(12));
        clock.carve(
            BootPhase::BarMapping,
            BootPhase::RamDmaMap,
            Duration::from_millis(4),
        );
        // More than there is: only what BarMapping had.
        clock.carve(
            BootPhase::Prefault,
            BootPhase::KernelLoad,
            Duration::from_millis(9),
        );
        clock.add(BootPhase::Startup, Duration::from_micros(1500));
        let report = clock.report();
        assert_eq!(report.checks, 3);
        assert_eq!(report.plan, 0);
        assert_eq!(report.bar_mapping, 5);
        assert_eq!(report.ram_dma_map, 4);
        assert_eq!(report.kernel_load, 0);
        assert_eq!(report.prefault, 0);
        assert_eq!(report.startup, 1);
        assert_eq!(report.total(), 13);
        assert_eq!(clock.last_mark(), at(12));
        assert_eq!(clock.started(), t0);
    }

    #[test]
    fn rounding_keeps_the_sum_whole() {
        let t0 = Instant::now();
        let mut clock = PhaseClock::starting_at(t0);
        // Twelve phases of 0.9 ms: 10.8 ms in all.
        for (i, phase) in BootPhase::ALL.into_iter().enumerate() {
            clock.end_at(phase, t0 + Duration::from_micros(900 * (i as u64 + 1)));
        }
        let report = clock.report();
        assert_eq!(report.total(), 10);
        assert!(report.fields().iter().all(|(_, ms)| *ms <= 1), "{report:?}");
        assert_eq!(report.startup, 0);
        assert_eq!(report.checks, 1);
    }

    #[test]
    fn every_phase_has_its_own_report_field() {
        let t0 = Instant::now();
        let mut clock = PhaseClock::starting_at(t0);
        for (i, phase) in BootPhase::ALL.into_iter().enumerate() {
            assert_eq!(phase.index(), i);
            clock.end_at(phase, t0 + Duration::from_millis(1 << i));
        }
        let report = clock.report();
        let fields: Vec<u64> = report.fields().iter().map(|(_, ms)| *ms).collect();
        // 1, 1, 2, 4, ...: each phase got the time since the one before.
        let expected: Vec<u64> = (0..12)
            .map(|i| if i == 0 { 1 } else { 1 << (i - 1) })
            .collect();
        assert_eq!(fields, expected);
        assert_eq!(report.total(), 1 << 11);
    }
}
