//! The MSRs barge sets on every vCPU before the first KVM_RUN.

use kvm_bindings::kvm_msr_entry;

/// IA32_TIME_STAMP_COUNTER.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_SYSENTER_CS.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// IA32_SYSENTER_ESP.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// IA32_SYSENTER_EIP.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// IA32_MISC_ENABLE.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// IA32_MISC_ENABLE bit 0: fast string operations.
pub const MSR_IA32_MISC_ENABLE_FAST_STRING: u64 = 1;
/// IA32_MTRR_DEF_TYPE.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRR_DEF_TYPE: MTRRs enabled (bit 11), default memory type write-back (6). Without it
/// the guest's MTRRs say "all uncached", which KVM honours when a passed-through device
/// does non-coherent DMA.
pub const MTRR_DEF_TYPE_ENABLED_WB: u64 = (1 << 11) | 6;
/// STAR (SYSCALL segment selectors).
pub const MSR_STAR: u32 = 0xc000_0081;
/// LSTAR (64-bit SYSCALL target).
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// CSTAR (compatibility-mode SYSCALL target).
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// SYSCALL flag mask.
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// KERNEL_GS_BASE (SWAPGS).
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

fn msr(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}

/// The boot MSR values: SYSENTER/SYSCALL state, KERNEL_GS_BASE and TSC zeroed, fast
/// strings enabled, MTRRs enabled with write-back as the default type. The vmm passes them to KVM_SET_MSRS (as `kvm_bindings::Msrs`).
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    vec![
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, MSR_IA32_MISC_ENABLE_FAST_STRING),
        msr(MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_ENABLED_WB),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_msrs_zero_syscall_state_enable_fast_strings_and_wb_mtrrs() {
        let msrs = boot_msrs();
        assert_eq!(msrs.len(), 11);
        for m in &msrs {
            let expected = match m.index {
                MSR_IA32_MISC_ENABLE => 1,
                MSR_MTRR_DEF_TYPE => 0x806,
                _ => 0,
            };
            assert_eq!(m.data, expected, "msr {:#x}", m.index);
        }
        let mut indices: Vec<u32> = msrs.iter().map(|m| m.index).collect();
        indices.sort_unstable();
        indices.dedup();
        assert_eq!(indices.len(), msrs.len(), "no duplicates");
        assert!(kvm_bindings::Msrs::from_entries(&msrs).is_ok());
    }
}
