//! The boot sequence, in one straight-line function: [`boot_and_run`].

pub mod phases;

use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::pci::PciSegment;
use resources::placement::{DeviceInput, PlacementError, Windows};

use crate::builder::phases::{BootPhase, PhaseClock};
use crate::buses::bus::BusError;
use crate::buses::console::ConsoleError;
use crate::buses::pci;
use crate::buses::power::PowerSignal;
use crate::buses::serial::{IrqFdTrigger, SerialDevice, SerialOutput};
use crate::config::{ConfigError, VmConfig};
use crate::loader::{self, LoadError};
use crate::machine::kvm::{self, KvmError, MemslotLog};
use crate::machine::kvm_stats::KvmStatsFd;
use crate::machine::memory::{self, MemoryError};
use crate::machine::stage2::{self, Stage2Dump};
use crate::machine::vm::{self, BuiltVm, SerialInput, VmError, VmRun};
use crate::pci_devices::bar_mapping::{BarProver, P2pSlot, PrefaultSupport, SlotAllocator};
use crate::pci_devices::setup::{AttachContext, DeviceSetupError};
use crate::pci_devices::vfio::background;
use crate::pci_devices::{open, virtio};
use crate::platform::{self, BootInputs};
use crate::progress::ProgressOutput;
use crate::report::{self, DeviceReport, DmaReport, MemoryRegionReport, ReportError};
use crate::seccomp::{SeccompError, VmFilters};

/// Anything that stops a VM from being built or run. Each variant's message
/// is already a complete sentence naming the problem.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The report path is not writable.
    #[error(transparent)]
    Report(#[from] ReportError),
    /// KVM cannot be opened.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Creating or configuring the KVM VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The RAM size cannot be laid out.
    #[error(transparent)]
    Ram(#[from] resources::RamError),
    /// The MMIO windows or the BARs cannot be placed.
    #[error(transparent)]
    Placement(#[from] PlacementError),
    /// Guest memory cannot be mapped.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel, initramfs or command line.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// Kernel loading and boot structures (the architecture's).
    #[error(transparent)]
    Boot(#[from] platform::BootError),
    /// A device could not be opened or attached (its message says why).
    #[error("{0}")]
    Device(DeviceSetupError),
    /// Two devices claim the same addresses.
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    /// The console cannot be set up.
    #[error(transparent)]
    Console(#[from] ConsoleError),
    /// The seccomp filters cannot be built.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// An EventFd or similar host resource could not be created.
    #[error("cannot create {what}: {source}")]
    Host {
        /// What was being created.
        what: &'static str,
        source: io::Error,
    },
}

/// What one boot produced.
#[derive(Debug)]
pub struct BootOutcome {
    /// How the run ended.
    pub run: VmRun,
    /// The guest RAM regions and their backing.
    pub memory: Vec<MemoryRegionReport>,
    /// The PCI devices and how their BARs got mapped.
    pub devices: Vec<DeviceReport>,
    /// Guest RAM mapped for device DMA, when a device needed it.
    pub dma: Option<DmaReport>,
    /// The boot's phases up to the vCPU threads' start (the caller ends
    /// [`BootPhase::VcpuStart`] at the first KVM_RUN).
    pub phases: PhaseClock,
}

/// Builds the VM described by `config` and runs it until it stops or
/// `deadline` passes. Guest serial output goes to `console`; input comes
/// from `input`.
pub fn boot_and_run(
    config: &VmConfig,
    console: SerialOutput,
    input: SerialInput,
    deadline: Option<Instant>,
) -> Result<BootOutcome, BuildError> {
    let mut clock = PhaseClock::starting_now();
    // Everything that can be checked without KVM first.
    config.validate()?;
    loader::inspect_kernel(&config.kernel)?;
    if let Some(path) = &config.report {
        report::check_writable(path)?;
    }
    let seccomp = VmFilters::compile(config.seccomp)?;
    clock.end(BootPhase::Checks);

    let kvm = kvm::open_kvm()?;
    platform::check_cpu_count(&kvm, config.cpus)?;

    // The VM, then devices and their placement, before any guest memory exists.
    let ram_regions = resources::ram_regions(config.memory.size)?;
    let ram_layout: Vec<(u64, u64)> = ram_regions.iter().map(|r| r.as_pair()).collect();
    let phys_bits = platform::guest_phys_bits(&kvm)?;
    let windows = Windows::new(&ram_regions, phys_bits)?;
    let (vm_fd, mut irqchip) = platform::create_vm(&kvm, phys_bits, config.cpus)?;
    let vm_fd = Arc::new(vm_fd);
    // KVM's stage-2 dump of this VM, where the kernel has one: opened here,
    // by the thread that created the VM, read after the run.
    let stage2_dump = Stage2Dump::open(vm_fd.as_ref());
    clock.end(BootPhase::CreateVm);
    let worker_init = seccomp.as_ref().map(VmFilters::virtio_worker_init);
    let thread_init = seccomp.as_ref().map(VmFilters::vmm_thread_init);
    let setups = open::open_devices(config, &vm_fd, Path::new(memory::SYSFS_ROOT), worker_init)
        .map_err(BuildError::Device)?;
    clock.end(BootPhase::OpenDevices);
    let inputs: Vec<DeviceInput> = setups.iter().map(|s| s.plan_input()).collect();
    let plan = resources::plan_for_host(&inputs, &ram_regions, &windows)?;
    clock.end(BootPhase::Plan);

    let ram = memory::create_guest_memory(&ram_layout, &config.memory)?;
    // Every memslot set goes through this log; the report reads it.
    let memslots = MemslotLog::new();
    vm::map_ram(&vm_fd, &memslots, &ram)?;
    if config.memory.prefault {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let start = Instant::now();
        let used = ram.prefault(threads)?;
        log::info!(
            "guest RAM pre-faulted (prefault=on): {} on {used} threads in {:.1} ms",
            config.memory,
            start.elapsed().as_secs_f64() * 1000.0
        );
    }
    clock.end(BootPhase::RamAllocation);
    let progress = ProgressOutput::for_stderr(config.progress);
    let prefault_support = PrefaultSupport::of(&vm_fd);
    let mut slots = SlotAllocator::new(ram.regions.len() as u32);
    let mut attached = Vec::with_capacity(setups.len());
    // Each device's slot on bus 0 is fixed here, in order after the host
    // bridge at 00:00.0: its MSI routes carry the requester ID from the start.
    for ((setup, device_plan), slot) in setups.into_iter().zip(&plan.devices).zip(1u8..) {
        let name = setup.name().to_string();
        let kind = setup.kind();
        let mut ctx = AttachContext {
            vm: &vm_fd,
            ram: &ram,
            slots: &mut slots,
            memslots: &memslots,
            progress,
            thread_init: thread_init.clone(),
            count_host_faults: config.prefault_bars && prefault_support == PrefaultSupport::Missing,
            requester_id: u32::from(slot) << 3,
        };
        let device = setup
            .attach(device_plan, &mut ctx)
            .map_err(BuildError::Device)?;
        attached.push((name, kind, slot, device));
    }
    clock.end(BootPhase::BarMapping);
    // The RAM DMA map ran inside the attachment of the device that needed
    // it first; its own measurement moves that part to its phase.
    let ram_dma_ms: f64 = attached
        .iter()
        .filter_map(|(_, _, _, device)| device.dma.as_ref().map(|dma| dma.ms))
        .sum();
    clock.carve(
        BootPhase::BarMapping,
        BootPhase::RamDmaMap,
        Duration::from_secs_f64(ram_dma_ms.max(0.0) / 1000.0),
    );

    let boot_state = platform::load_boot(&BootInputs {
        memory: &ram.memory,
        ram: &ram_layout,
        config,
        windows: &windows,
    })?;
    clock.end(BootPhase::KernelLoad);

    let power = PowerSignal::new().map_err(|source| BuildError::Host {
        what: "the power-event EventFd",
        source,
    })?;
    let serial_irq = IrqFdTrigger::new().map_err(|source| BuildError::Host {
        what: "the serial interrupt EventFd",
        source,
    })?;
    vm::wire_serial_irq(&vm_fd, serial_irq.event_fd())?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, console)));
    // Declared before the buses so that on an error below the buses (the
    // device models) go first, as in `BuiltVm`.
    let mut live = Vec::with_capacity(attached.len());
    let mut buses = platform::devices_on_buses(serial.clone(), &power)?;
    let mut segment = PciSegment::with_host_bridge();
    let mut device_reports = Vec::with_capacity(attached.len());
    let mut virtio_counters = Vec::with_capacity(attached.len());
    let dma = attached
        .iter()
        .find_map(|(_, _, _, device)| device.dma.clone());
    for (name, kind, number, device) in attached {
        segment
            .add_device_at(number, device.config)
            .map_err(|e| BuildError::Device(e.into()))?;
        for trap in device.traps {
            buses
                .mmio
                .insert(trap.gpa, trap.size, trap.name, trap.device)?;
        }
        device_reports.push(DeviceReport {
            bdf: name,
            kind: kind.to_string(),
            guest_bdf: format!("0000:00:{number:02x}.0"),
            vfio_backend: device.vfio_backend.map(str::to_string),
            bars: Vec::new(),
            virtio: None,
        });
        virtio_counters.push(device.virtio);
        live.push(device.resources);
    }
    pci::attach_segment(&mut buses, &Arc::new(Mutex::new(segment)))?;

    let vcpus = platform::create_vcpus(
        &kvm,
        &vm_fd,
        &ram.memory,
        config.cpus,
        &boot_state,
        &mut irqchip,
    )?;
    clock.end(BootPhase::VcpuCreate);

    // Proof: pre-fault every BAR before the guest runs, count what KVM mapped.
    if let Some(vcpu) = vcpus.first() {
        let support = prefault_support;
        let stats = KvmStatsFd::open(&vm_fd)
            .map_err(|e| log::warn!("{e}; BAR mappings are not measured"))
            .ok();
        let mut prover = BarProver::new(vcpu, &memslots, stats, support)
            .prefault(config.prefault_bars)
            .progress(progress);
        for (report, device) in device_reports.iter_mut().zip(&live) {
            report.bars = device.bars().iter().map(|bar| prover.prove(bar)).collect();
        }
    }

    clock.end(BootPhase::Prefault);

    let memory = ram.region_reports();
    // What the report learns of each BAR after the run: its memslots'
    // updates, and with p2p=background its P2P map's outcome.
    let after_run: Vec<Vec<(Vec<u32>, Option<P2pSlot>)>> = live
        .iter()
        .map(|device| {
            device
                .bars()
                .iter()
                .map(|bar| (bar.slots(), bar.p2p_pending.clone()))
                .collect()
        })
        .collect();
    let built = BuiltVm::new(vm_fd, ram, vcpus, buses, serial, input, power)
        .with_devices(live)
        .with_memslots(memslots)
        .with_stage2_dump(stage2_dump)
        .with_seccomp(seccomp);
    let run = built.run(deadline)?;
    // `slot_updates` covers the whole run, up to the vCPUs' stop (teardown's
    // memslot deletes come after and are not the guest's).
    for (report, bars) in device_reports.iter_mut().zip(&after_run) {
        let bdf = report.bdf.clone();
        for (bar, (slots, p2p)) in report.bars.iter_mut().zip(bars) {
            bar.slot_updates = run.memslot_updates.updates_of(slots.iter().copied());
            if let Some(p2p) = p2p {
                background::report_outcome(bar, &bdf, p2p, run.first_run);
            }
        }
    }
    if let Some(dump) = &run.stage2 {
        stage2::report_bars(dump, &mut device_reports);
    }
    for (report, counters) in device_reports.iter_mut().zip(&virtio_counters) {
        report.virtio = counters.as_deref().map(virtio::counters_report);
    }
    Ok(BootOutcome {
        run,
        memory,
        devices: device_reports,
        dma,
        phases: clock,
    })
}
