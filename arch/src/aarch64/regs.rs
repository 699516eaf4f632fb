//! The boot vCPU's register state and the KVM `ONE_REG` ids to set it with, as plain data.
//!
//! The ids are computed here from the Linux UAPI's encoding (arch/arm64/include/uapi/asm/kvm.h)
//! rather than taken from kvm-bindings, whose arm64 types exist only in arm64 builds; the unit
//! tests pin them to the values the UAPI gives.
//!
//! The arm64 boot protocol (Documentation/arch/arm64/booting.rst) wants, on the boot CPU:
//! x0 = the FDT's physical address, x1..x3 = 0, the MMU and D-cache off, all of DAIF
//! masked, at EL1 (or EL2). KVM resets a vCPU created with `KVM_ARM_VCPU_INIT` to zeroed
//! general registers with the MMU off, so barge sets only x0, the PC and PSTATE. The other
//! vCPUs start powered off (`KVM_ARM_VCPU_POWER_OFF`) and are brought up by the guest with
//! PSCI `CPU_ON`, which KVM handles.

/// `KVM_REG_ARM64`: the architecture field of an arm64 register id.
pub const KVM_REG_ARM64: u64 = 0x6000_0000_0000_0000;
/// `KVM_REG_SIZE_U64`: the register is 64 bits wide.
pub const KVM_REG_SIZE_U64: u64 = 0x0030_0000_0000_0000;
/// `KVM_REG_ARM_CORE`: a register of `struct kvm_regs`, indexed by its offset in 32-bit words.
pub const KVM_REG_ARM_CORE: u64 = 0x0010 << 16;
/// `KVM_REG_ARM64_SYSREG`: a system register, indexed by its op0/op1/CRn/CRm/op2 encoding.
pub const KVM_REG_ARM64_SYSREG: u64 = 0x0013 << 16;

/// PSTATE mode field: EL1 using SP_EL1 (`PSR_MODE_EL1h`).
pub const PSR_MODE_EL1H: u64 = 0x5;
/// PSTATE.F: FIQs masked.
pub const PSR_F_BIT: u64 = 0x40;
/// PSTATE.I: IRQs masked.
pub const PSR_I_BIT: u64 = 0x80;
/// PSTATE.A: SErrors masked.
pub const PSR_A_BIT: u64 = 0x100;
/// PSTATE.D: debug exceptions masked.
pub const PSR_D_BIT: u64 = 0x200;
/// PSTATE the kernel is entered with: EL1h, D, A, I and F masked (0x3c5).
pub const BOOT_PSTATE: u64 = PSR_MODE_EL1H | PSR_D_BIT | PSR_A_BIT | PSR_I_BIT | PSR_F_BIT;

/// Byte offset of `regs.regs[0]` (x0) in `struct kvm_regs` (`struct user_pt_regs` first).
const X0_OFFSET: u64 = 0;
/// Byte offset of `regs.sp` in `struct kvm_regs`.
const SP_OFFSET: u64 = 31 * 8;
/// Byte offset of `regs.pc` in `struct kvm_regs`.
const PC_OFFSET: u64 = 32 * 8;
/// Byte offset of `regs.pstate` in `struct kvm_regs`.
const PSTATE_OFFSET: u64 = 33 * 8;

/// `ONE_REG` id of the 64-bit core register at byte offset `offset` of `struct kvm_regs`
/// (the UAPI's `KVM_REG_ARM_CORE_REG(name)`).
pub const fn core_reg_id(offset: u64) -> u64 {
    KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | (offset / 4)
}

/// `ONE_REG` id of the system register `S<op0>_<op1>_C<crn>_C<crm>_<op2>` (the UAPI's
/// `ARM64_SYS_REG`).
pub const fn sys_reg_id(op0: u64, op1: u64, crn: u64, crm: u64, op2: u64) -> u64 {
    KVM_REG_ARM64
        | KVM_REG_SIZE_U64
        | KVM_REG_ARM64_SYSREG
        | ((op0 & 0x3) << 14)
        | ((op1 & 0x7) << 11)
        | ((crn & 0xf) << 7)
        | ((crm & 0xf) << 3)
        | (op2 & 0x7)
}

/// `ONE_REG` id of x0.
pub const X0_REG_ID: u64 = core_reg_id(X0_OFFSET);
/// `ONE_REG` id of SP_EL0 (`regs.sp`).
pub const SP_REG_ID: u64 = core_reg_id(SP_OFFSET);
/// `ONE_REG` id of the PC.
pub const PC_REG_ID: u64 = core_reg_id(PC_OFFSET);
/// `ONE_REG` id of PSTATE.
pub const PSTATE_REG_ID: u64 = core_reg_id(PSTATE_OFFSET);
/// `ONE_REG` id of MPIDR_EL1 (op0 3, op1 0, CRn 0, CRm 0, op2 5). The vmm reads it from
/// each vCPU with `KVM_GET_ONE_REG` after `KVM_ARM_VCPU_INIT` and passes the values to
/// [`create_fdt`](super::create_fdt) as `FdtConfig::mpidrs`.
pub const MPIDR_EL1_REG_ID: u64 = sys_reg_id(3, 0, 0, 0, 5);

/// Register state of the boot vCPU (vCPU 0) at the kernel's entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootRegs {
    /// Program counter: the kernel `Image`'s load address (its first instruction).
    pub pc: u64,
    /// x0: the FDT's guest physical address.
    pub x0: u64,
    /// PSTATE: [`BOOT_PSTATE`].
    pub pstate: u64,
}

impl BootRegs {
    /// State that enters the kernel at `entry` with the FDT at `fdt_addr`, at EL1h with all
    /// exceptions masked.
    pub const fn new(entry: u64, fdt_addr: u64) -> BootRegs {
        BootRegs {
            pc: entry,
            x0: fdt_addr,
            pstate: BOOT_PSTATE,
        }
    }

    /// `(ONE_REG id, value)` pairs to set with `KVM_SET_ONE_REG` on the boot vCPU after
    /// `KVM_ARM_VCPU_INIT`: x0, the PC and PSTATE.
    pub const fn one_reg_entries(&self) -> [(u64, u64); 3] {
        [
            (X0_REG_ID, self.x0),
            (PC_REG_ID, self.pc),
            (PSTATE_REG_ID, self.pstate),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_register_ids_match_the_linux_uapi() {
        assert_eq!(X0_REG_ID, 0x6030_0000_0010_0000);
        assert_eq!(SP_REG_ID, 0x6030_0000_0010_003e);
        assert_eq!(PC_REG_ID, 0x6030_0000_0010_0040);
        assert_eq!(PSTATE_REG_ID, 0x6030_0000_0010_0042);
    }

    #[test]
    fn mpidr_el1_id_matches_the_linux_uapi() {
        assert_eq!(MPIDR_EL1_REG_ID, 0x6030_0000_0013_c005);
    }

    #[test]
    fn boot_pstate_is_el1h_with_daif_masked() {
        assert_eq!(BOOT_PSTATE, 0x3c5);
    }

    #[test]
    fn boot_regs_enter_the_kernel_with_x0_at_the_fdt() {
        let regs = BootRegs::new(0x4000_0000, 0x7fe0_0000);
        assert_eq!(
            regs.one_reg_entries(),
            [
                (0x6030_0000_0010_0000, 0x7fe0_0000),
                (0x6030_0000_0010_0040, 0x4000_0000),
                (0x6030_0000_0010_0042, 0x3c5),
            ]
        );
    }
}
