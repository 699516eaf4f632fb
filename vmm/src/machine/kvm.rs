//! Thin wrappers around the few KVM operations that need `unsafe` or extra
//! error context, so the logic above them stays safe.
//!
//! Every KVM_SET_USER_MEMORY_REGION barge issues goes through
//! [`map_guest_memory`], which counts it in a [`MemslotLog`] by slot: the
//! report's `slot_updates` is that count, a fact about ioctls issued.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use kvm_bindings::{kvm_userspace_memory_region, KVM_INTERNAL_ERROR_EMULATION};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

/// Default KVM device path.
pub const KVM_DEVICE: &str = "/dev/kvm";
/// Environment variable overriding [`KVM_DEVICE`] (used by tests to check the
/// "missing /dev/kvm" error without touching the real device).
pub const KVM_DEVICE_ENV: &str = "BARGE_KVM_DEVICE";

/// Errors opening KVM or mapping memory into it.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// The device node does not exist.
    #[error(
        "{0} does not exist: KVM is not available on this host; load the kvm_intel or kvm_amd \
         module, or enable nested virtualization in the hypervisor running this machine"
    )]
    DeviceMissing(PathBuf),
    /// Opening the device node was refused.
    #[error(
        "{0}: permission denied; add your user to the group owning {0} (usually `kvm`) or run as root"
    )]
    PermissionDenied(PathBuf),
    /// Any other error opening the device node.
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("cannot map guest memory slot {slot} ({gpa:#x}+{size:#x}) into KVM: {source}")]
    MemorySlot {
        /// Slot number.
        slot: u32,
        /// Guest physical address.
        gpa: u64,
        /// Size.
        size: u64,
        source: io::Error,
    },
    /// Deleting a memslot failed.
    #[error("cannot remove guest memory slot {slot} from KVM: {source}")]
    RemoveSlot {
        /// Slot number.
        slot: u32,
        source: io::Error,
    },
}

/// The KVM device path in use (`$BARGE_KVM_DEVICE` or `/dev/kvm`).
pub fn kvm_device_path() -> PathBuf {
    std::env::var_os(KVM_DEVICE_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(KVM_DEVICE))
}

/// Opens KVM with an error that names the device and says what to do.
pub fn open_kvm() -> Result<Kvm, KvmError> {
    open_kvm_at(kvm_device_path())
}

/// Opens the KVM device node at `path` (`barge host-check` looks under its
/// own device root), with the same errors as [`open_kvm`].
pub fn open_kvm_at(path: impl Into<PathBuf>) -> Result<Kvm, KvmError> {
    let path: PathBuf = path.into();
    let c_path = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| KvmError::Open {
        path: path.clone(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"),
    })?;
    Kvm::new_with_path(&c_path).map_err(|e| {
        let source = io::Error::from_raw_os_error(e.errno());
        match source.kind() {
            io::ErrorKind::NotFound => KvmError::DeviceMissing(path),
            io::ErrorKind::PermissionDenied => KvmError::PermissionDenied(path),
            _ => KvmError::Open { path, source },
        }
    })
}

/// How many times barge issued KVM_SET_USER_MEMORY_REGION for each memslot:
/// sets, moves and deletes alike, whether KVM accepted them or not. Only
/// [`map_guest_memory`] and [`remove_guest_memory`] add to it, once per ioctl, so a slot that is torn
/// down and set again shows up here however the code above got there.
/// Clones share one log (the builder keeps one to read after the run).
#[derive(Debug, Clone, Default)]
pub struct MemslotLog {
    issued: Arc<Mutex<BTreeMap<u32, u32>>>,
}

impl MemslotLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of the counts as they are now, which later calls do not
    /// change (the run's report is taken before teardown deletes the BAR
    /// memslots).
    pub fn snapshot(&self) -> MemslotLog {
        MemslotLog {
            issued: Arc::new(Mutex::new(self.lock().clone())),
        }
    }

    /// KVM_SET_USER_MEMORY_REGION calls issued for `slot` so far.
    pub fn updates(&self, slot: u32) -> u32 {
        self.lock().get(&slot).copied().unwrap_or(0)
    }

    /// The calls issued for all of `slots` together (the slots of one BAR).
    pub fn updates_of(&self, slots: impl IntoIterator<Item = u32>) -> u32 {
        let issued = self.lock();
        slots
            .into_iter()
            .map(|slot| issued.get(&slot).copied().unwrap_or(0))
            .fold(0, u32::saturating_add)
    }

    fn record(&self, slot: u32) {
        let mut issued = self.lock();
        let count = issued.entry(slot).or_default();
        *count = count.saturating_add(1);
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u32, u32>> {
        // Plain counters: a panic elsewhere cannot leave them inconsistent.
        self.issued.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Sets memslot `slot` to map `size` bytes of host memory at `host_addr` at
/// guest physical address `gpa` (KVM_SET_USER_MEMORY_REGION; a `size` of 0
/// deletes the slot), and counts the call in `memslots`. Used for guest RAM
/// (`vm::map_ram`) and for BAR mappings (`bar_mapping::map_bar_areas`).
///
/// # Safety
///
/// Unless `size` is 0, `host_addr..host_addr + size` must be memory barge
/// mapped for this guest range (guest RAM, or a BAR's mapping of its device
/// or memfd), and the caller must keep it mapped, and must not unmap or
/// replace it, for as long as the slot exists and the VM can access it
/// (while a vCPU may run or KVM may touch guest memory on the VM's behalf,
/// e.g. KVM_PRE_FAULT_MEMORY). Otherwise the guest reads and writes
/// whatever the process maps at that address next.
pub unsafe fn map_guest_memory(
    vm: &VmFd,
    memslots: &MemslotLog,
    slot: u32,
    gpa: u64,
    size: u64,
    host_addr: u64,
) -> Result<(), KvmError> {
    let region = kvm_userspace_memory_region {
        slot,
        flags: 0,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: host_addr,
    };
    memslots.record(slot);
    // SAFETY: the caller guarantees (this function's contract) that
    // `host_addr..host_addr + size` stays mapped to this guest range for as
    // long as the slot exists and the VM can access it; a delete (`size`
    // 0) points KVM at no memory. KVM only accesses it on the guest's behalf.
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| KvmError::MemorySlot {
        slot,
        gpa,
        size,
        source: io::Error::from_raw_os_error(e.errno()),
    })
}

/// Deletes memslot `slot` (KVM_SET_USER_MEMORY_REGION with size 0): KVM
/// drops the slot and its mappings of the host range behind it, which may
/// then be unmapped (see `pci_devices::teardown`). Counted in `memslots`
/// like every other call.
pub fn remove_guest_memory(vm: &VmFd, memslots: &MemslotLog, slot: u32) -> Result<(), KvmError> {
    memslots.record(slot);
    let region = kvm_userspace_memory_region {
        slot,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: 0,
        userspace_addr: 0,
    };
    // SAFETY: a region of size 0 deletes the slot: KVM keeps no reference to
    // host memory for it afterwards, so the call asks nothing of any memory.
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| KvmError::RemoveSlot {
        slot,
        source: io::Error::from_raw_os_error(e.errno()),
    })
}

/// Details of the last KVM_EXIT_INTERNAL_ERROR on `vcpu`, for the log.
pub fn internal_error_details(vcpu: &mut VcpuFd) -> String {
    let run = vcpu.get_kvm_run();
    // SAFETY: called right after KVM_RUN returned KVM_EXIT_INTERNAL_ERROR,
    // so the kernel filled the `internal` member of the exit union; reading
    // plain integers from it is sound whatever their values.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let count = (internal.ndata as usize).min(internal.data.len());
    let kind = if internal.suberror == KVM_INTERNAL_ERROR_EMULATION {
        " (instruction emulation failed)"
    } else {
        ""
    };
    format!(
        "suberror {}{kind}, data {:x?}",
        internal.suberror,
        &internal.data[..count]
    )
}

/// The signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: delivering the signal makes KVM_RUN return EINTR.
}

/// Installs the no-op handler for [`kick_signal`] (once per process).
pub fn install_kick_handler() -> io::Result<()> {
    static INSTALLED: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    let result = *INSTALLED.get_or_init(|| {
        register_signal_handler(kick_signal(), kick_handler).map_err(|e| e.errno())
    });
    result.map_err(io::Error::from_raw_os_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryBackend};

    use crate::config::MemoryConfig;
    use crate::machine::memory;

    #[test]
    fn the_log_counts_calls_by_slot_and_clones_share_it() {
        let log = MemslotLog::new();
        let shared = log.clone();
        log.record(3);
        shared.record(3);
        shared.record(4);
        assert_eq!((log.updates(3), log.updates(4), log.updates(5)), (2, 1, 0));
        assert_eq!(log.updates_of([3, 4, 5]), 3);
        assert_eq!(shared.updates_of([]), 0);
    }

    /// Needs /dev/kvm: every KVM_SET_USER_MEMORY_REGION the wrapper issues
    /// is counted for its slot, a repeated set, a delete and a refused set
    /// alike.
    #[test]
    fn every_set_and_delete_of_a_slot_is_counted() {
        if !guest_programs::testing::kvm_or_skip("every_set_and_delete_of_a_slot_is_counted") {
            return;
        }
        // Declared before the VM, so the VM (and its slot) goes first.
        let ram = memory::create_guest_memory(&[(0, 2 << 20)], &MemoryConfig::default())
            .expect("anonymous guest memory");
        let vm = Kvm::new()
            .and_then(|kvm| kvm.create_vm())
            .expect("/dev/kvm (kvm_or_skip checked it)");
        let host = ram.memory.get_host_address(GuestAddress(0)).unwrap() as u64;
        let log = MemslotLog::new();
        let set = |gpa: u64, size: u64| {
            // SAFETY: `ram` maps `host..host + 2 MiB` for the whole test and
            // is dropped after `vm`; the VM has no vCPU, so nothing accesses
            // the slot anyway.
            unsafe { map_guest_memory(&vm, &log, 0, gpa, size, host) }
        };
        set(0, 2 << 20).expect("set slot 0");
        assert_eq!(log.updates(0), 1);
        set(0, 2 << 20).expect("set slot 0 again");
        set(0, 0).expect("delete slot 0");
        assert_eq!(log.updates(0), 3);
        // KVM refuses a GPA that is not page aligned: issued all the same.
        let err = set(0x123, 2 << 20).unwrap_err().to_string();
        assert!(err.contains("slot 0 (0x123+0x200000)"), "{err}");
        assert_eq!(log.updates(0), 4);
        assert_eq!(log.updates(1), 0);
    }
}
