//! The guest physical address map and interrupt numbers of a barge aarch64 VM, in address
//! order.
//!
//! Everything barge places in the guest physical address space is listed here, so a reader
//! can see the whole machine on one page. The low 1 GiB holds the devices, RAM starts at
//! 1 GiB (as on QEMU's `virt` machine, so the same kernels and habits work). The unit tests
//! at the bottom check that the areas are ordered and do not overlap.
//!
//! ```text
//! 0x0000_0000 ─ unused (no boot ROM, no flash)
//! 0x0800_0000 ─ GICv3 distributor (GICD), 64 KiB
//! 0x0808_0000 ─ GICv3 ITS, 128 KiB (MSIs of PCI devices)
//! 0x080a_0000 ─ GICv3 redistributors (GICR), 128 KiB per vCPU, up to 0x0900_0000
//!               (123 vCPUs, MAX_VCPUS)
//! 0x0900_0000 ─ ns16550a UART, 4 KiB, SPI 1
//! 0x1000_0000 ─ PCI MMIO32 window (512 MiB) for 32-bit BARs
//! 0x3000_0000 ─ PCIe ECAM (256 MiB reserved; bus 0's 1 MiB decoded)
//! 0x4000_0000 ─ RAM_START: RAM, one contiguous region:
//!   RAM_START     the kernel Image (KERNEL_LOAD_BASE, plus its text_offset)
//!   ...           free RAM
//!   below FDT     the initramfs (initramfs_addr), page aligned
//!   end - 2 MiB   the flattened device tree (fdt_addr), at most 2 MiB
//! RAM end ─ (rounded up to 1 GiB) the PCI MMIO64 window, up to 1 << IPA bits
//! ```
//!
//! The 64-bit MMIO window is not a constant: it starts above RAM on a 1 GiB boundary and
//! ends at `1 << ipa_bits`, where `ipa_bits` is the VM's IPA size (the vmm reads
//! `KVM_CAP_ARM_VM_IPA_SIZE` and creates the VM with it). The `resources` crate sizes it.
//!
//! Interrupt numbers: the GIC numbers interrupts by INTID; SGIs are 0..=15, PPIs (per-CPU)
//! 16..=31, SPIs (shared) 32 and up. The device tree and KVM's GSIs count PPIs and SPIs
//! from 0 within their kind, which is how the constants below are given: PPI `n` is INTID
//! `n + 16` ([`GIC_PPI_INTID_BASE`]), SPI `n` is INTID `n + 32` ([`GIC_SPI_INTID_BASE`]) and
//! KVM GSI `n` (irqfd, `KVM_IRQ_LINE` with the in-kernel GIC).

// ---------------------------------------------------------------------------------------
// Guest physical memory, low to high.
// ---------------------------------------------------------------------------------------

/// GICv3 distributor (GICD) base.
pub const GIC_DIST_START: u64 = 0x0800_0000;
/// Size of the GICv3 distributor's register frame (64 KiB).
pub const GIC_DIST_SIZE: u64 = 0x1_0000;

/// GICv3 Interrupt Translation Service (ITS) base: PCI MSIs are writes to its
/// `GITS_TRANSLATER`.
pub const GIC_ITS_START: u64 = 0x0808_0000;
/// Size of the ITS register frames (control + translation, 128 KiB).
pub const GIC_ITS_SIZE: u64 = 0x2_0000;
/// The ITS's `GITS_TRANSLATER` register (in its second 64 KiB frame): the one address a
/// PCI device's MSI writes go to on this machine.
pub const GIC_ITS_TRANSLATER: u64 = GIC_ITS_START + 0x1_0040;

/// First GICv3 redistributor (GICR); one follows another, [`GIC_REDIST_SIZE_PER_CPU`] each.
pub const GIC_REDIST_START: u64 = 0x080a_0000;
/// Size of one vCPU's redistributor (RD + SGI frames, 128 KiB).
pub const GIC_REDIST_SIZE_PER_CPU: u64 = 0x2_0000;
/// End (exclusive) of the room for redistributors: the UART follows.
pub const GIC_REDIST_END: u64 = 0x0900_0000;

/// Most vCPUs a barge aarch64 VM can have: as many redistributors as fit between
/// [`GIC_REDIST_START`] and [`GIC_REDIST_END`] (123).
pub const MAX_VCPUS: usize =
    ((GIC_REDIST_END - GIC_REDIST_START) / GIC_REDIST_SIZE_PER_CPU) as usize;

/// Bytes of redistributor region for `cpus` vCPUs, starting at [`GIC_REDIST_START`].
/// Callers keep `cpus` at most [`MAX_VCPUS`] (`create_fdt` checks).
pub const fn gic_redist_size(cpus: usize) -> u64 {
    cpus as u64 * GIC_REDIST_SIZE_PER_CPU
}

/// ns16550a UART base (byte-wide registers, `reg-shift` 0).
pub const SERIAL_START: u64 = 0x0900_0000;
/// Size of the UART's MMIO window (4 KiB; the 8 registers sit at its start).
pub const SERIAL_SIZE: u64 = 0x1000;

/// PCI 32-bit MMIO window for BARs (non-prefetchable in the device tree).
pub const PCI_MMIO32_START: u64 = 0x1000_0000;
/// Size of the PCI 32-bit MMIO window (512 MiB).
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;

/// PCIe enhanced configuration space (ECAM), room for 256 buses × 1 MiB. barge decodes
/// bus 0 only ([`PCIE_ECAM_BUSES`]); the device tree's `bus-range` says so.
pub const PCIE_ECAM_START: u64 = 0x3000_0000;
/// Size of the ECAM area (256 MiB).
pub const PCIE_ECAM_SIZE: u64 = 0x1000_0000;
/// Buses the ECAM decodes (and the device tree declares): bus 0 only.
pub const PCIE_ECAM_BUSES: u8 = 1;
/// Bytes of ECAM per bus (32 devices × 8 functions × 4 KiB).
pub const PCIE_ECAM_BUS_SIZE: u64 = 1 << 20;

/// Start of guest RAM: one contiguous region from here.
pub const RAM_START: u64 = 0x4000_0000;

/// Where the kernel `Image` is loaded: the 2 MiB aligned base of the arm64 boot protocol
/// (the kernel runs at this base plus the `text_offset` of its header, 0 since Linux 5.8).
pub const KERNEL_LOAD_BASE: u64 = RAM_START;

/// Largest flattened device tree: 2 MiB, the limit of the arm64 boot protocol
/// (Documentation/arch/arm64/booting.rst). The FDT's slot at the end of RAM is this big.
pub const FDT_MAX_SIZE: u64 = 0x20_0000;

/// Alignment of an initramfs start (a page).
pub const INITRAMFS_ALIGNMENT: u64 = 0x1000;

/// Where the FDT goes in RAM that ends (exclusive) at `ram_end`: the last 2 MiB aligned
/// slot of [`FDT_MAX_SIZE`] bytes (the boot protocol wants 8-byte alignment and no other
/// mapping in the FDT's 2 MiB block). `None` when RAM from [`RAM_START`] to `ram_end`
/// has no such slot.
pub const fn fdt_addr(ram_end: u64) -> Option<u64> {
    match ram_end.checked_sub(FDT_MAX_SIZE) {
        Some(top) if top & !(FDT_MAX_SIZE - 1) >= RAM_START => Some(top & !(FDT_MAX_SIZE - 1)),
        _ => None,
    }
}

/// Where to load an initramfs of `initrd_len` bytes: the highest page-aligned address at
/// which it ends at or below `fdt_addr` (and `ram_end`) and starts at or above
/// `kernel_end` (the end of the memory the kernel image needs, rounded up to a page).
/// `None` when it does not fit between the two.
pub const fn initramfs_addr(
    ram_end: u64,
    fdt_addr: u64,
    initrd_len: u64,
    kernel_end: u64,
) -> Option<u64> {
    let limit = if fdt_addr < ram_end {
        fdt_addr
    } else {
        ram_end
    };
    let floor = match kernel_end.checked_next_multiple_of(INITRAMFS_ALIGNMENT) {
        Some(f) if f > RAM_START => f,
        Some(_) => RAM_START,
        None => return None,
    };
    match limit.checked_sub(initrd_len) {
        Some(end) if end & !(INITRAMFS_ALIGNMENT - 1) >= floor => {
            Some(end & !(INITRAMFS_ALIGNMENT - 1))
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// Interrupts.
// ---------------------------------------------------------------------------------------

/// GIC INTID of PPI 0 (PPIs are INTIDs 16..=31).
pub const GIC_PPI_INTID_BASE: u32 = 16;
/// GIC INTID of SPI 0 (SPIs are INTIDs 32 and up).
pub const GIC_SPI_INTID_BASE: u32 = 32;

/// GIC virtual maintenance interrupt (PPI 9, INTID 25), for nested virtualization.
pub const GIC_MAINTENANCE_PPI: u32 = 9;
/// EL2 (hypervisor) physical timer (PPI 10, INTID 26).
pub const TIMER_HYP_PPI: u32 = 10;
/// EL1 virtual timer (PPI 11, INTID 27); KVM's `KVM_ARM_VCPU_TIMER_IRQ_VTIMER` default.
pub const TIMER_VIRT_PPI: u32 = 11;
/// Secure EL1 physical timer (PPI 13, INTID 29).
pub const TIMER_SECURE_PHYS_PPI: u32 = 13;
/// Non-secure EL1 physical timer (PPI 14, INTID 30); KVM's `KVM_ARM_VCPU_TIMER_IRQ_PTIMER`
/// default.
pub const TIMER_PHYS_PPI: u32 = 14;

/// SPI of the UART (KVM GSI 1, GIC INTID 33); level-triggered.
pub const SERIAL_SPI: u32 = 1;
/// SPI of PCI INTA#; INTB#..INTD# follow (SPIs 4..=7), for every slot alike (see
/// [`pci_intx_spi`]). Level-triggered and shared.
pub const PCI_INTX_SPI_BASE: u32 = 4;
/// PCI interrupt pins (INTA#..INTD#).
pub const PCI_INTX_PINS: u32 = 4;

/// SPI (= KVM GSI) that INTx pin `pin` (1 = INTA# .. 4 = INTD#, as in the Interrupt Pin
/// register) of bus-0 device `slot` raises: `PCI_INTX_SPI_BASE + pin - 1`, the same for
/// every slot, as x86_64's `_PRT` routes every slot's INTA#..INTD# to GSIs 16..=19 (the
/// vmm wires a device's INTx before it has a slot; devices share the four lines either
/// way). The device tree's `interrupt-map` is built from this function. `None` for pin 0
/// (no interrupt) or a pin above 4.
pub const fn pci_intx_spi(_slot: u8, pin: u8) -> Option<u32> {
    if pin == 0 || pin as u32 > PCI_INTX_PINS {
        return None;
    }
    Some(PCI_INTX_SPI_BASE + pin as u32 - 1)
}

// Build-time invariants the boot code relies on.
const _: () = {
    assert!(GIC_DIST_START + GIC_DIST_SIZE <= GIC_ITS_START);
    assert!(GIC_ITS_START + GIC_ITS_SIZE <= GIC_REDIST_START);
    assert!(GIC_REDIST_START + gic_redist_size(MAX_VCPUS) <= GIC_REDIST_END);
    assert!(GIC_REDIST_END <= SERIAL_START);
    assert!(SERIAL_START + SERIAL_SIZE <= PCI_MMIO32_START);
    assert!(PCI_MMIO32_START + PCI_MMIO32_SIZE <= PCIE_ECAM_START);
    assert!(PCIE_ECAM_START + PCIE_ECAM_SIZE <= RAM_START);
    assert!(PCIE_ECAM_BUSES as u64 * PCIE_ECAM_BUS_SIZE <= PCIE_ECAM_SIZE);
    assert!(KERNEL_LOAD_BASE % 0x20_0000 == 0);
    assert!(SERIAL_SPI < PCI_INTX_SPI_BASE);
};

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// (name, start, end exclusive) of every fixed area, in address order.
    fn memory_areas() -> Vec<(&'static str, u64, u64)> {
        vec![
            ("gicd", GIC_DIST_START, GIC_DIST_START + GIC_DIST_SIZE),
            ("its", GIC_ITS_START, GIC_ITS_START + GIC_ITS_SIZE),
            ("gicr", GIC_REDIST_START, GIC_REDIST_END),
            ("uart", SERIAL_START, SERIAL_START + SERIAL_SIZE),
            (
                "pci mmio32",
                PCI_MMIO32_START,
                PCI_MMIO32_START + PCI_MMIO32_SIZE,
            ),
            ("ecam", PCIE_ECAM_START, PCIE_ECAM_START + PCIE_ECAM_SIZE),
            ("ram", RAM_START, u64::MAX),
        ]
    }

    #[test]
    fn memory_areas_are_ordered_and_do_not_overlap() {
        let areas = memory_areas();
        for (name, start, end) in &areas {
            assert!(start < end, "{name} is empty");
            assert_eq!(start % 0x1000, 0, "{name} is not page aligned");
        }
        for pair in areas.windows(2) {
            let (a, _, a_end) = pair[0];
            let (b, b_start, _) = pair[1];
            assert!(a_end <= b_start, "{a} overlaps {b}");
        }
    }

    #[test]
    fn redistributors_fill_their_room_for_max_vcpus() {
        assert_eq!(MAX_VCPUS, 123);
        assert_eq!(gic_redist_size(1), 0x2_0000);
        assert!(GIC_REDIST_START + gic_redist_size(MAX_VCPUS) <= GIC_REDIST_END);
        assert!(GIC_REDIST_START + gic_redist_size(MAX_VCPUS + 1) > GIC_REDIST_END);
    }

    #[test]
    fn fdt_takes_the_last_2mib_aligned_slot_of_ram() {
        let end = RAM_START + 256 * MIB;
        assert_eq!(fdt_addr(end), Some(end - 2 * MIB));
        // RAM ending off a 2 MiB boundary: the slot still ends inside RAM.
        let odd = end + 0x1000;
        assert_eq!(fdt_addr(odd), Some(end - 2 * MIB));
        let addr = fdt_addr(odd).unwrap();
        assert!(addr + FDT_MAX_SIZE <= odd);
        assert_eq!(addr % (2 * MIB), 0);
        assert_eq!(fdt_addr(RAM_START + 2 * MIB), Some(RAM_START));
        assert_eq!(fdt_addr(RAM_START + MIB), None);
        assert_eq!(fdt_addr(0), None);
    }

    #[test]
    fn initramfs_goes_page_aligned_just_below_the_fdt() {
        let end = RAM_START + 256 * MIB;
        let fdt = fdt_addr(end).unwrap();
        let kernel_end = RAM_START + 30 * MIB;
        let addr = initramfs_addr(end, fdt, 10 * MIB + 123, kernel_end).unwrap();
        assert_eq!(addr % 0x1000, 0);
        assert!(addr + 10 * MIB + 123 <= fdt);
        assert!(fdt - (addr + 10 * MIB + 123) < 0x1000);
        // Exactly fills the gap between the kernel and the FDT.
        assert_eq!(
            initramfs_addr(end, fdt, fdt - kernel_end, kernel_end),
            Some(kernel_end)
        );
        assert_eq!(
            initramfs_addr(end, fdt, fdt - kernel_end + 1, kernel_end),
            None
        );
        // The kernel's end is rounded up to a page.
        assert_eq!(
            initramfs_addr(end, fdt, fdt - kernel_end, kernel_end + 1),
            None
        );
        assert_eq!(initramfs_addr(end, fdt, u64::MAX, kernel_end), None);
        // An FDT address above RAM's end does not let the initramfs leave RAM.
        assert_eq!(initramfs_addr(end, u64::MAX, 0x1000, 0), Some(end - 0x1000));
        // Never below RAM.
        assert_eq!(initramfs_addr(end, fdt, fdt - RAM_START + 1, 0), None);
    }

    #[test]
    fn pci_intx_pins_go_to_four_spis_for_every_slot() {
        assert_eq!(pci_intx_spi(0, 1), Some(4));
        assert_eq!(pci_intx_spi(0, 4), Some(7));
        assert_eq!(pci_intx_spi(1, 1), Some(4));
        assert_eq!(pci_intx_spi(1, 4), Some(7));
        assert_eq!(pci_intx_spi(3, 2), Some(5));
        assert_eq!(pci_intx_spi(31, 1), Some(4));
        assert_eq!(pci_intx_spi(2, 0), None);
        assert_eq!(pci_intx_spi(2, 5), None);
    }

    #[test]
    fn interrupt_numbers_are_the_architected_ones() {
        assert_eq!(TIMER_VIRT_PPI + GIC_PPI_INTID_BASE, 27);
        assert_eq!(TIMER_PHYS_PPI + GIC_PPI_INTID_BASE, 30);
        assert_eq!(GIC_MAINTENANCE_PPI + GIC_PPI_INTID_BASE, 25);
        assert_eq!(SERIAL_SPI + GIC_SPI_INTID_BASE, 33);
    }
}
