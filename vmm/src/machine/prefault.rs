//! KVM_PRE_FAULT_MEMORY: populate KVM's stage-2 page tables (EPT/NPT) for a
//! guest physical range before the guest touches it, so that the page sizes
//! KVM chose can be read from its counters right away and attributed to the
//! range. Linux 6.10 added the ioctl; kvm-bindings has no x86 definition of
//! it yet, so the structure and the request number live here.

use std::os::fd::AsRawFd;

use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_iowr_nr;

/// `KVM_CAP_PRE_FAULT_MEMORY`.
pub const KVM_CAP_PRE_FAULT_MEMORY: u32 = 236;

/// `struct kvm_pre_fault_memory` from the kernel's uapi headers.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct KvmPreFaultMemory {
    pub gpa: u64,
    pub size: u64,
    pub flags: u64,
    pub padding: [u64; 5],
}

const KVMIO: u32 = 0xAE;
ioctl_iowr_nr!(KVM_PRE_FAULT_MEMORY, KVMIO, 0xd5, KvmPreFaultMemory);

#[derive(Debug, thiserror::Error)]
pub enum PreFaultError {
    #[error(
        "KVM_PRE_FAULT_MEMORY is not available ({}): KVM's mapping level is only known \
         after the guest touches the memory",
        if cfg!(target_arch = "x86_64") {
            "kernel before 6.10 or no two-dimensional paging"
        } else {
            "KVM has it on x86 only"
        }
    )]
    Unsupported,
    #[error("KVM_PRE_FAULT_MEMORY of {size:#x} bytes at GPA {gpa:#x} failed at {at:#x}: {source}")]
    Failed {
        gpa: u64,
        size: u64,
        at: u64,
        source: std::io::Error,
    },
}

/// [`pre_fault`] in pieces that end on multiples of `piece` bytes (a power
/// of two; KVM maps each page as the host mapping allows, whatever the
/// range), calling `done` with the bytes done after each: one ioctl runs
/// to the end of its range, and a large range at small pages takes long.
pub fn pre_fault_in_pieces(
    vcpu: &impl AsRawFd,
    gpa: u64,
    size: u64,
    piece: u64,
    mut done: impl FnMut(u64),
) -> Result<(), PreFaultError> {
    let end = gpa.saturating_add(size);
    let mut at = gpa;
    while at < end {
        let next = (at / piece.max(1) + 1)
            .saturating_mul(piece.max(1))
            .min(end);
        pre_fault(vcpu, at, next - at).map_err(|e| match e {
            PreFaultError::Failed {
                at: failed_at,
                source,
                ..
            } => PreFaultError::Failed {
                gpa,
                size,
                at: failed_at,
                source,
            },
            other => other,
        })?;
        at = next;
        done(at - gpa);
    }
    Ok(())
}

/// Pre-faults `[gpa, gpa + size)` through `vcpu` (any vCPU of the VM),
/// resuming where the kernel stopped when it returns early.
pub fn pre_fault(vcpu: &impl AsRawFd, gpa: u64, size: u64) -> Result<(), PreFaultError> {
    let mut range = KvmPreFaultMemory {
        gpa,
        size,
        ..Default::default()
    };
    while range.size > 0 {
        // SAFETY: the request matches the structure's layout (64 bytes, as
        // the kernel's), the fd is a vCPU fd that outlives the call, and the
        // kernel only reads and updates the structure we own.
        let ret = unsafe { ioctl_with_mut_ref(vcpu, KVM_PRE_FAULT_MEMORY(), &mut range) };
        if ret == 0 {
            continue;
        }
        let error = std::io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
            Some(libc::ENOTTY) | Some(libc::EOPNOTSUPP) => return Err(PreFaultError::Unsupported),
            _ => {
                return Err(PreFaultError::Failed {
                    gpa,
                    size,
                    at: range.gpa,
                    source: error,
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structure_matches_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<KvmPreFaultMemory>(), 64);
        // _IOWR(0xAE, 0xd5, 64 bytes)
        assert_eq!(KVM_PRE_FAULT_MEMORY(), 0xc040_aed5);
    }
}
