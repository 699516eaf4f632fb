//! Thin wrappers around the few KVM operations that need `unsafe` or extra
//! error context, so the logic above them stays safe.

use std::ffi::CString;
use std::io;
use std::path::PathBuf;

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
    Open {
        /// The device node.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("cannot map guest memory slot {slot} ({gpa:#x}+{size:#x}) into KVM: {source}")]
    MemorySlot {
        /// Slot number.
        slot: u32,
        /// Guest physical address.
        gpa: u64,
        /// Size.
        size: u64,
        /// Why.
        source: io::Error,
    },
    /// Deleting a memslot failed.
    #[error("cannot remove guest memory slot {slot} from KVM: {source}")]
    RemoveSlot {
        /// Slot number.
        slot: u32,
        /// Why.
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
    let path = kvm_device_path();
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

/// Maps `size` bytes of host memory at `host_addr` as guest RAM at `gpa`.
///
/// The caller guarantees (and `vm.rs` upholds by keeping the guest memory
/// object alive as long as the `VmFd`, dropping the `VmFd` first) that the
/// host range stays mapped for as long as the VM can access it.
pub fn map_guest_memory(
    vm: &VmFd,
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
    // SAFETY: `host_addr..host_addr + size` is a live mapping owned by the
    // VM's guest memory object, which outlives every use of this slot (the
    // VmFd is dropped before the memory; see `vm.rs`). KVM only accesses it
    // on the guest's behalf.
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| KvmError::MemorySlot {
        slot,
        gpa,
        size,
        source: io::Error::from_raw_os_error(e.errno()),
    })
}

/// Deletes memslot `slot` (KVM_SET_USER_MEMORY_REGION with size 0): KVM
/// drops the slot and its mappings of the host range behind it, which may
/// then be unmapped (see `pci_devices::teardown`).
pub fn remove_guest_memory(vm: &VmFd, slot: u32) -> Result<(), KvmError> {
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
