//! vCPU register state at boot, as plain data the vmm hands to KVM.
//!
//! Only the bootstrap processor (vCPU 0) gets an entry state. Application processors need
//! none: KVM's in-kernel local APIC holds them in wait-for-SIPI until the guest kernel
//! starts them with INIT/SIPI; the vmm only gives them CPUID, MSRs, FPU and LAPIC LINTs.

use crate::x86_64::gdt::{
    segment_from_entry, CodeMode, CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR,
};
use crate::x86_64::layout::{GDT_START, IDT_START};
use kvm_bindings::{
    kvm_dtable, kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs,
};

/// CR0.PE: protected mode.
pub const X86_CR0_PE: u64 = 1 << 0;
/// CR0.ET: extension type (always 1 on modern CPUs).
pub const X86_CR0_ET: u64 = 1 << 4;
/// CR0.PG: paging.
pub const X86_CR0_PG: u64 = 1 << 31;
/// CR4.PAE: physical address extension (required for long mode).
pub const X86_CR4_PAE: u64 = 1 << 5;
/// EFER.LME: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA: long mode active.
pub const EFER_LMA: u64 = 1 << 10;

/// Local APIC LVT LINT0 register offset.
pub const APIC_LVT_LINT0: usize = 0x350;
/// Local APIC LVT LINT1 register offset.
pub const APIC_LVT_LINT1: usize = 0x360;
/// LVT delivery mode: NMI.
pub const APIC_MODE_NMI: u32 = 0x4;
/// LVT delivery mode: ExtINT.
pub const APIC_MODE_EXTINT: u32 = 0x7;

/// x87 control word after FNINIT.
pub const FPU_FCW: u16 = 0x37f;
/// MXCSR after reset.
pub const FPU_MXCSR: u32 = 0x1f80;

/// Everything the BSP needs before its first KVM_RUN, as plain data.
#[derive(Clone, Debug)]
pub struct VcpuBootState {
    /// General registers (RIP = entry, RSI = zero page or RBX = start_info, RSP, RFLAGS).
    pub regs: kvm_regs,
    /// CS.
    pub cs: kvm_segment,
    /// DS, ES, FS, GS, SS (all the flat data segment).
    pub data: kvm_segment,
    /// Task register.
    pub tr: kvm_segment,
    /// GDTR.
    pub gdt: kvm_dtable,
    /// IDTR.
    pub idt: kvm_dtable,
    /// CR0.
    pub cr0: u64,
    /// CR3 (PML4 address in long mode, 0 for PVH).
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
    /// FPU state (FCW 0x37f, MXCSR 0x1f80).
    pub fpu: kvm_fpu,
    /// Boot MSRs (see [`crate::x86_64::msr::boot_msrs`]).
    pub msrs: Vec<kvm_msr_entry>,
}

/// The FPU state every vCPU starts with.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: FPU_FCW,
        mxcsr: FPU_MXCSR,
        ..Default::default()
    }
}

impl VcpuBootState {
    /// The state for `mode`, with `gdt` the entries written by
    /// [`crate::x86_64::gdt::write_gdt_and_idt`], entering at `rip` with `regs` already filled
    /// (RSI/RBX etc.); `cr3` is used in long mode only.
    pub(crate) fn new(mode: CodeMode, gdt: &[u64; 4], mut regs: kvm_regs, cr3: u64) -> Self {
        regs.rflags = 0x2;
        let (cr0, cr3, cr4, efer) = match mode {
            CodeMode::Long64 => (
                X86_CR0_PE | X86_CR0_ET | X86_CR0_PG,
                cr3,
                X86_CR4_PAE,
                EFER_LME | EFER_LMA,
            ),
            CodeMode::Protected32 => (X86_CR0_PE | X86_CR0_ET, 0, 0, 0),
        };
        VcpuBootState {
            regs,
            cs: segment_from_entry(gdt[1], CODE_SELECTOR),
            data: segment_from_entry(gdt[2], DATA_SELECTOR),
            tr: segment_from_entry(gdt[3], TSS_SELECTOR),
            gdt: kvm_dtable {
                base: GDT_START,
                limit: (gdt.len() * 8 - 1) as u16,
                ..Default::default()
            },
            idt: kvm_dtable {
                base: IDT_START,
                limit: 7,
                ..Default::default()
            },
            cr0,
            cr3,
            cr4,
            efer,
            fpu: boot_fpu(),
            msrs: crate::x86_64::msr::boot_msrs(),
        }
    }

    /// Patches the special registers KVM_GET_SREGS returned with the boot segments,
    /// descriptor tables, control registers and EFER; everything else (APIC base, LDT,
    /// interrupt bitmap, CR2, CR8) is kept.
    pub fn apply_sregs(&self, sregs: &mut kvm_sregs) {
        sregs.cs = self.cs;
        sregs.ds = self.data;
        sregs.es = self.data;
        sregs.fs = self.data;
        sregs.gs = self.data;
        sregs.ss = self.data;
        sregs.tr = self.tr;
        sregs.gdt = self.gdt;
        sregs.idt = self.idt;
        sregs.cr0 = self.cr0;
        sregs.cr3 = self.cr3;
        sregs.cr4 = self.cr4;
        sregs.efer = self.efer;
    }
}

fn lapic_reg(klapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = |i: usize| klapic.regs[offset + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(klapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
        klapic.regs[offset + i] = byte as _;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Sets LAPIC LVT LINT0 to ExtINT (the PIC) and LINT1 to NMI, keeping the other bits, in
/// the state from KVM_GET_LAPIC (write it back with KVM_SET_LAPIC). Do it on every vCPU.
pub fn set_lint(klapic: &mut kvm_lapic_state) {
    let lint0 = lapic_reg(klapic, APIC_LVT_LINT0);
    set_lapic_reg(
        klapic,
        APIC_LVT_LINT0,
        with_delivery_mode(lint0, APIC_MODE_EXTINT),
    );
    let lint1 = lapic_reg(klapic, APIC_LVT_LINT1);
    set_lapic_reg(
        klapic,
        APIC_LVT_LINT1,
        with_delivery_mode(lint1, APIC_MODE_NMI),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86_64::gdt::gdt_entries;

    #[test]
    fn set_lint_sets_extint_and_nmi_delivery_modes() {
        let mut klapic = kvm_lapic_state::default();
        // Reset value: masked (bit 16), fixed mode; plus a vector to keep.
        set_lapic_reg(&mut klapic, APIC_LVT_LINT0, 0x0001_0000);
        set_lapic_reg(&mut klapic, APIC_LVT_LINT1, 0x0001_00ab);
        set_lint(&mut klapic);
        assert_eq!(lapic_reg(&klapic, APIC_LVT_LINT0), 0x0001_0700);
        assert_eq!(lapic_reg(&klapic, APIC_LVT_LINT1), 0x0001_04ab);
        assert_eq!(klapic.regs[0x358], 0, "neighbouring bytes untouched");
    }

    #[test]
    fn long_mode_state_patches_sregs() {
        let regs = kvm_regs {
            rip: 0x100_0200,
            ..Default::default()
        };
        let state = VcpuBootState::new(
            CodeMode::Long64,
            &gdt_entries(CodeMode::Long64),
            regs,
            0x9000,
        );
        let mut sregs = kvm_sregs {
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        state.apply_sregs(&mut sregs);
        assert_eq!(sregs.apic_base, 0xfee0_0900, "kept");
        assert_eq!(sregs.cr3, 0x9000);
        assert_eq!(
            sregs.cr0 & (X86_CR0_PE | X86_CR0_PG),
            X86_CR0_PE | X86_CR0_PG
        );
        assert_eq!(sregs.cr4 & X86_CR4_PAE, X86_CR4_PAE);
        assert_eq!(sregs.efer, EFER_LME | EFER_LMA);
        assert_eq!((sregs.cs.l, sregs.cs.selector), (1, 0x8));
        assert_eq!((sregs.ss.selector, sregs.ds.db), (0x10, 1));
        assert_eq!((sregs.gdt.base, sregs.gdt.limit), (0x500, 31));
        assert_eq!((sregs.idt.base, sregs.idt.limit), (0x520, 7));
        assert_eq!(state.regs.rflags, 2);
        assert_eq!((state.fpu.fcw, state.fpu.mxcsr), (0x37f, 0x1f80));
    }

    #[test]
    fn protected_mode_state_has_paging_off() {
        let state = VcpuBootState::new(
            CodeMode::Protected32,
            &gdt_entries(CodeMode::Protected32),
            kvm_regs::default(),
            0x9000,
        );
        let mut sregs = kvm_sregs::default();
        state.apply_sregs(&mut sregs);
        assert_eq!(sregs.cr0 & X86_CR0_PG, 0);
        assert_eq!(sregs.cr0 & X86_CR0_PE, X86_CR0_PE);
        assert_eq!((sregs.cr3, sregs.cr4, sregs.efer), (0, 0, 0));
        assert_eq!(
            (sregs.cs.l, sregs.cs.db, sregs.cs.limit),
            (0, 1, 0xffff_ffff)
        );
    }
}
