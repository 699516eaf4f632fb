//! The KVM VM: RAM's memslots, the serial interrupt and one run. What
//! differs between architectures (the VM's creation, its interrupt
//! controller, the vCPUs' set-up) is in `crate::platform`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::buses::bus::Buses;
use crate::buses::power::PowerSignal;
use crate::buses::serial::SerialDevice;
use crate::event_loop::{EventLoop, EventLoopError};
use crate::machine::kvm::{self, KvmError, MemslotLog};
use crate::machine::memory::GuestRam;
use crate::machine::stage2::Stage2Dump;
use crate::machine::vcpu::{self, StopCause, VcpuContext, VmControl};
use crate::pci_devices::teardown::DeviceResources;
use crate::platform;
use crate::seccomp::VmFilters;

/// How long stopping the vCPUs may take before barge gives up on them.
pub const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors creating or configuring the KVM VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Opening KVM or a memslot failed.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// More vCPUs than KVM or the MADT allow.
    #[error(
        "--cpus {asked} is more than barge can run here: use at most {max} \
         (KVM allows {kvm_max} vCPUs per VM, barge's {layout_limit_by} {layout_max})"
    )]
    TooManyCpus {
        /// The count asked for.
        asked: u8,
        /// The limit: the lower of the two below.
        max: usize,
        /// KVM_CAP_MAX_VCPUS.
        kvm_max: usize,
        /// What in barge's guest layout limits the count (the ACPI MADT, the
        /// GICv3 redistributor region).
        layout_limit_by: &'static str,
        /// That limit.
        layout_max: usize,
    },
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Ioctl {
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// KVM accepted only some MSRs.
    #[cfg(target_arch = "x86_64")]
    #[error("vcpu{vcpu}: KVM accepted {set} of {total} boot MSRs")]
    Msrs {
        vcpu: u8,
        /// How many were set.
        set: usize,
        /// How many were given.
        total: usize,
    },
    /// The serial interrupt could not be wired.
    #[error("cannot wire the serial interrupt to GSI {gsi}: {0}", gsi = platform::SERIAL_GSI)]
    SerialIrq(kvm_ioctls::Error),
    /// Starting a vCPU thread failed.
    #[error("cannot start vcpu{vcpu}: {source}")]
    Thread { vcpu: u8, source: std::io::Error },
    /// The event loop could not be set up.
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
}

pub(crate) fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Ioctl { what, source }
}

/// Gives every RAM region its own memslot, in address order (slots 0 on),
/// counting each set in `memslots`. Keep `ram` alive until `vm` is dropped.
pub fn map_ram(vm: &VmFd, memslots: &MemslotLog, ram: &GuestRam) -> Result<(), VmError> {
    for (slot, region) in ram.memory.iter().enumerate() {
        let host_addr = ram
            .memory
            .get_host_address(region.start_addr())
            .map_err(|e| {
                VmError::Kvm(KvmError::MemorySlot {
                    slot: slot as u32,
                    gpa: region.start_addr().raw_value(),
                    size: region.len(),
                    source: std::io::Error::other(e.to_string()),
                })
            })?;
        // SAFETY: `host_addr..+region.len()` is the host mapping of this
        // RAM region, owned by `ram.memory`. The builder moves `ram` into
        // `BuiltVm`, whose `vm_fd` field is declared (and so dropped)
        // before `ram`, and nothing unmaps or remaps guest RAM while it
        // lives; on a failed build no vCPU has run and none will.
        unsafe {
            kvm::map_guest_memory(
                vm,
                memslots,
                slot as u32,
                region.start_addr().raw_value(),
                region.len(),
                host_addr as u64,
            )
        }?;
    }
    Ok(())
}

/// Routes the serial port's interrupt EventFd to its GSI
/// ([`platform::SERIAL_GSI`]).
pub fn wire_serial_irq(vm: &VmFd, irq: &vmm_sys_util::eventfd::EventFd) -> Result<(), VmError> {
    vm.register_irqfd(irq, platform::SERIAL_GSI)
        .map_err(VmError::SerialIrq)
}

/// Where the guest's serial input comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SerialInput {
    /// The process's stdin.
    Stdin,
    /// None.
    None,
}

/// A built VM, ready to run once.
///
/// # Teardown
///
/// Field order is drop order, and it is the VM's teardown (each device's
/// own steps are in `pci_devices::teardown`):
///
/// 0. `stage2`: the stage-2 dump, whose open file holds a reference to
///    the VM, is closed first so that `vm_fd` stays the last one.
/// 1. `vcpus`: none is left running ([`BuiltVm::run`] joined their threads,
///    or forgets the whole VM when it could not).
/// 2. `buses`: the device models go (PCI segment, MMIO traps, serial), so
///    each device's [`DeviceResources`] holds the last handles on its host
///    device.
/// 3. `devices`: each device is torn down: DMA stopped, IOMMU mappings
///    undone (guest RAM's with the last VFIO device), BAR memslots removed
///    and BARs unmapped, the device closed, the VFIO container or IOAS
///    released with the last one. That also releases every other reference
///    to the VM: the interrupt chip's VM fd, KVM's VFIO device, VFIO's.
/// 4. `vm_fd`: the last reference to the VM, so KVM destroys it here, and
///    with it RAM's memslots.
/// 5. `ram`: guest RAM is unmapped, after the VM that maps it (and after
///    the IOMMU, whose mapping of it held its own handle until undone).
#[derive(Debug)]
pub struct BuiltVm {
    stage2: Option<Stage2Dump>,
    vcpus: Vec<VcpuFd>,
    buses: Arc<Buses>,
    devices: Vec<DeviceResources>,
    vm_fd: Arc<VmFd>,
    ram: GuestRam,
    serial: Arc<Mutex<SerialDevice>>,
    serial_input: SerialInput,
    power: PowerSignal,
    seccomp: Option<VmFilters>,
    memslots: MemslotLog,
}

/// How one run ended.
#[derive(Debug)]
pub struct VmRun {
    pub cause: StopCause,
    /// When the first KVM_RUN was issued.
    pub first_run: Option<Instant>,
    /// KVM's statistics read just before the VM was torn down.
    pub kvm_stats: std::collections::BTreeMap<String, u64>,
    /// Whether every vCPU thread stopped. `false`: one may still run, so the
    /// VM, guest RAM, the BAR mappings and the devices' host resources were
    /// kept (leaked) until the process exits.
    pub vcpus_stopped: bool,
    /// The KVM_SET_USER_MEMORY_REGION calls issued per memslot while the
    /// VM lived, read once the vCPUs stopped and before teardown deletes
    /// the BAR memslots (see [`BuiltVm::with_memslots`]).
    pub memslot_updates: MemslotLog,
    /// KVM's stage-2 table as the kernel dumped it once the vCPUs stopped
    /// (see [`BuiltVm::with_stage2_dump`]); `None` without a dump.
    pub stage2: Option<String>,
}

/// What became of a VM's parts after its vCPUs were told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Teardown {
    /// Every vCPU stopped; the parts were dropped in their field order.
    Dropped,
    /// A vCPU may still run; the parts were leaked so that nothing it can
    /// reach is closed or unmapped under it.
    Leaked,
}

/// Drops `vm` when every vCPU thread stopped; otherwise leaks it on purpose,
/// with one error line saying so: a vCPU still inside KVM_RUN reads and
/// writes guest RAM and the BARs through the VM, and unmapping them under it
/// would let it fault on (or write into) whatever the host maps there next.
/// The process exit frees them.
fn tear_down_or_leak<T>(vm: T, vcpus_stopped: bool) -> Teardown {
    if vcpus_stopped {
        drop(vm);
        Teardown::Dropped
    } else {
        log::error!(
            "a vCPU did not stop: keeping the VM, guest RAM, the devices' BAR mappings and host \
             resources until barge exits instead of unmapping them under a vCPU that may still run"
        );
        std::mem::forget(vm);
        Teardown::Leaked
    }
}

impl BuiltVm {
    /// Assembles a VM from its built parts.
    pub fn new(
        vm_fd: Arc<VmFd>,
        ram: GuestRam,
        vcpus: Vec<VcpuFd>,
        buses: Buses,
        serial: Arc<Mutex<SerialDevice>>,
        serial_input: SerialInput,
        power: PowerSignal,
    ) -> Self {
        BuiltVm {
            vcpus,
            vm_fd,
            devices: Vec::new(),
            seccomp: None,
            memslots: MemslotLog::new(),
            stage2: None,
            ram,
            buses: Arc::new(buses),
            serial,
            serial_input,
            power,
        }
    }

    /// Keeps the PCI devices' BARs and host resources for the VM's lifetime
    /// (torn down in the order of the type's docs).
    pub fn with_devices(mut self, devices: Vec<DeviceResources>) -> Self {
        self.devices = devices;
        self
    }

    /// The log every memslot ioctl of this VM was counted in: the run's
    /// [`VmRun::memslot_updates`] is a copy of it taken before teardown.
    pub fn with_memslots(mut self, memslots: MemslotLog) -> Self {
        self.memslots = memslots;
        self
    }

    /// The VM's stage-2 dump (`machine::stage2`), opened before seccomp:
    /// read into [`VmRun::stage2`] once the vCPUs stopped, before teardown.
    pub fn with_stage2_dump(mut self, dump: Option<Stage2Dump>) -> Self {
        self.stage2 = dump;
        self
    }

    /// Confines the vCPU threads and the thread calling [`BuiltVm::run`]
    /// with `filters` (none: no seccomp).
    pub fn with_seccomp(mut self, filters: Option<VmFilters>) -> Self {
        self.seccomp = filters;
        self
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Runs the vCPUs until the guest powers off or resets, a vCPU fails, or
    /// `deadline` passes; then stops every vCPU and reads KVM's statistics.
    ///
    /// A vCPU thread that does not stop within [`VCPU_STOP_TIMEOUT`] keeps
    /// the whole VM alive: `self` (VM fd, guest RAM, BAR mappings, device
    /// fds, the buses) is leaked, also when a spawn error is returned, and
    /// the run says so in [`VmRun::vcpus_stopped`].
    pub fn run(mut self, deadline: Option<Instant>) -> Result<VmRun, VmError> {
        let control =
            Arc::new(VmControl::new().map_err(|source| VmError::Thread { vcpu: 0, source })?);
        let mut event_loop = EventLoop::new(control.clone(), self.power.clone())?;
        if self.serial_input == SerialInput::Stdin {
            event_loop.add_stdin(self.serial.clone())?;
        }
        for device in &self.devices {
            if let Some((bdf, request)) = device.release_request() {
                event_loop.watch_release_request(bdf, request)?;
            }
        }
        let ctx = VcpuContext {
            buses: self.buses.clone(),
            power: self.power.clone(),
            control: control.clone(),
            seccomp: self.seccomp.as_ref().map(|f| f.vcpu.clone()),
        };
        let mut threads = Vec::with_capacity(self.vcpus.len());
        let mut spawn_error = None;
        for (id, fd) in self.vcpus.drain(..).enumerate() {
            let id = id as u8;
            match vcpu::spawn_vcpu(id, fd, ctx.clone()) {
                Ok(thread) => threads.push(thread),
                Err(source) => {
                    spawn_error = Some(VmError::Thread { vcpu: id, source });
                    control.request_stop(StopCause::Error(format!("cannot start vcpu{id}")));
                    break;
                }
            }
        }
        // The vCPUs install their own filter; this thread, which runs the
        // event loop, teardown and the report, gets the VMM's.
        if let Some(filters) = &self.seccomp {
            if let Err(e) = filters.vmm.install("vmm") {
                control.request_stop(StopCause::Error(e.to_string()));
            }
        }
        let cause = event_loop.run_until_stopped(deadline);
        let vcpus_stopped = vcpu::stop_vcpus(threads, &control, VCPU_STOP_TIMEOUT);
        let result = match spawn_error {
            Some(e) => Err(e),
            None => Ok(VmRun {
                cause,
                first_run: control.first_run(),
                kvm_stats: self.read_kvm_stats(),
                vcpus_stopped,
                memslot_updates: self.memslots.snapshot(),
                stage2: self.stage2.as_mut().and_then(Stage2Dump::read),
            }),
        };
        // The vCPU threads that ended dropped their fds and context clones;
        // a stuck one keeps its own (and its Arc of the buses). The buses in
        // `self` go with the rest of it.
        drop(ctx);
        drop(event_loop);
        tear_down_or_leak(self, vcpus_stopped);
        result
    }

    fn read_kvm_stats(&self) -> std::collections::BTreeMap<String, u64> {
        crate::machine::kvm_stats::read_vm_stats(&self.vm_fd).unwrap_or_else(|e| {
            log::warn!("{e}; the report's kvm_stats stays empty");
            Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::machine::vcpu::stuck;

    /// Stands in for the VM's parts: records whether it was dropped.
    struct DropObserver(Arc<AtomicBool>);

    impl Drop for DropObserver {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    fn observed() -> (DropObserver, Arc<AtomicBool>) {
        let dropped = Arc::new(AtomicBool::new(false));
        (DropObserver(dropped.clone()), dropped)
    }

    #[test]
    fn stopped_vcpus_let_the_vm_be_torn_down() {
        let (vm, dropped) = observed();
        assert_eq!(tear_down_or_leak(vm, true), Teardown::Dropped);
        assert!(dropped.load(Ordering::SeqCst));
    }

    #[test]
    fn a_stuck_vcpu_keeps_the_vm_and_its_memory() {
        // The stop path of `BuiltVm::run`, without KVM: a vCPU thread that
        // ignores its kicks, then the teardown decision on the VM's parts.
        kvm::install_kick_handler().unwrap();
        let control = VmControl::new().unwrap();
        control.request_stop(StopCause::PowerOff);
        let (thread, _release) = stuck::thread(0);
        let vcpus_stopped = vcpu::stop_vcpus(vec![thread], &control, Duration::from_millis(50));
        let (vm, dropped) = observed();
        assert_eq!(tear_down_or_leak(vm, vcpus_stopped), Teardown::Leaked);
        assert!(
            !dropped.load(Ordering::SeqCst),
            "the VM was dropped under a running vCPU"
        );
    }
}
