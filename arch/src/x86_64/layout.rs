//! The guest physical address map and I/O port map of a barge VM, in address order.
//!
//! Everything barge places in guest memory or decodes on the buses is listed here, so a
//! reader can see the whole machine on one page. The unit tests at the bottom check that
//! the memory areas are ordered and do not overlap.
//!
//! ```text
//! 0x0000_0000 ─ RAM (low), first 1 MiB partly used by barge's boot structures:
//!   0x0000_0500   GDT (4 entries + spare)
//!   0x0000_0520   IDT (empty, limit 7)
//!   0x0000_6000   PVH hvm_start_info, then its module list and memory map
//!   0x0000_7000   Linux boot_params ("zero page")
//!   0x0000_8ff0   initial boot stack pointer (grows down)
//!   0x0000_9000   PML4, 0xa000 PDPT, 0xb000..0xf000 four page directories (2 MiB pages)
//!   0x0002_0000   kernel command line (up to 64 KiB)
//!   0x0009_fc00 ─ EBDA .. 0x000a_0000 (reserved in e820)
//!   0x000a_0000 ─ legacy VGA/BIOS hole (reserved in e820)
//!   0x000e_0000   ACPI tables: RSDP first, then DSDT, FADT, MADT, extras, XSDT
//!   0x000f_fff0   reset vector (F000:FFF0): a stub that writes the ACPI reset register
//! 0x0010_0000 ─ HIMEM_START: kernel, then RAM up to at most 0xc000_0000
//! 0xc000_0000 ─ 32-bit MMIO hole (never RAM) .. 0x1_0000_0000
//!   0xc000_0000   PCI MMIO32 window (512 MiB)
//!   0xe000_0000   PCIe ECAM (256 MiB reserved in e820; bus 0's 1 MiB decoded, MCFG)
//!   0xfec0_0000   IOAPIC
//!   0xfee0_0000   local APIC
//! 0x1_0000_0000 ─ RAM above 4 GiB (the rest of the memory), then the MMIO64 window
//! ```

// ---------------------------------------------------------------------------------------
// Guest physical memory, low to high.
// ---------------------------------------------------------------------------------------

/// Start of guest RAM.
pub const RAM_START: u64 = 0;

/// Global descriptor table: null, code, data, TSS (8 bytes each).
pub const GDT_START: u64 = 0x500;
/// Bytes reserved for the GDT (room for 4 entries).
pub const GDT_MAX_SIZE: u64 = 0x20;
/// Interrupt descriptor table (empty: one zero entry, limit 7).
pub const IDT_START: u64 = 0x520;
/// Bytes reserved for the IDT.
pub const IDT_MAX_SIZE: u64 = 0x8;

/// PVH `hvm_start_info` structure (passed in EBX to a PVH entry point).
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (one `hvm_modlist_entry` for the initramfs).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map (`hvm_memmap_table_entry` array), up to the zero page.
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// End (exclusive) of the PVH area.
pub const PVH_AREA_END: u64 = 0x7000;

/// Linux `boot_params` ("zero page"), passed in RSI to the 64-bit entry point.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Size of the zero page.
pub const ZERO_PAGE_SIZE: u64 = 0x1000;

/// Lowest address of the boot stack page.
pub const BOOT_STACK_START: u64 = 0x8000;
/// Initial RSP/RBP for the bootstrap processor.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;

/// Page-map level 4 table.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table (one, covers 512 GiB; barge fills 4 entries).
pub const PDPTE_START: u64 = 0xa000;
/// First page directory; `PDE_COUNT` of them follow at 4 KiB steps.
pub const PDE_START: u64 = 0xb000;
/// Number of page directories: each maps 1 GiB with 2 MiB pages, 4 = the first 4 GiB.
pub const PDE_COUNT: u64 = 4;
/// End (exclusive) of the page tables.
pub const PAGE_TABLES_END: u64 = PDE_START + PDE_COUNT * 0x1000;
/// Bytes identity-mapped by the boot page tables.
pub const IDENTITY_MAP_SIZE: u64 = PDE_COUNT << 30;

/// Kernel command line (NUL-terminated).
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line including its NUL terminator.
pub const CMDLINE_MAX_SIZE: u64 = 0x10000;

/// Extended BIOS data area: reserved in the e820 map, RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// Legacy VGA / option ROM / BIOS area start (reserved up to `HIMEM_START`).
pub const LEGACY_HOLE_START: u64 = 0xa0000;

/// ACPI tables: the RSDP sits here (Linux also scans 0xe0000..0x100000 for it), the other
/// tables follow.
pub const RSDP_START: u64 = 0xe0000;
/// End (exclusive) of the ACPI table area: the reset vector's 16 bytes follow.
pub const ACPI_AREA_END: u64 = RESET_VECTOR;

/// The x86 reset vector, `F000:FFF0`, where firmware would start. Linux jumps
/// here in real mode to reboot "through the BIOS", which it does by default
/// on a HW-reduced ACPI machine without EFI (reboot type EFI falls back to
/// BIOS); barge puts a stub here that writes the ACPI reset register, so such
/// a reboot ends in a reset instead of running zeros forever.
pub const RESET_VECTOR: u64 = 0xffff0;
/// Bytes at the reset vector (up to the end of the first MiB).
pub const RESET_VECTOR_SIZE: u64 = 0x10;

/// First byte of "high" memory: kernels load here or above.
pub const HIMEM_START: u64 = 0x100000;

/// Start of the 32-bit MMIO hole: RAM below 4 GiB ends here at the latest.
pub const MMIO32_HOLE_START: u64 = 0xc000_0000;
/// Size of the 32-bit MMIO hole (up to 4 GiB).
pub const MMIO32_HOLE_SIZE: u64 = MEM_32BIT_END - MMIO32_HOLE_START;

/// PCI 32-bit MMIO window for BARs (inside the hole).
pub const PCI_MMIO32_START: u64 = 0xc000_0000;
/// Size of the PCI 32-bit MMIO window (512 MiB).
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;

/// PCIe enhanced configuration space (ECAM), room for 256 buses × 1 MiB, reserved in
/// the e820 map. barge decodes bus 0 only (`PCIE_ECAM_BUSES`); the MCFG table says so.
pub const PCIE_ECAM_START: u64 = 0xe000_0000;
/// Size of the ECAM area (256 MiB).
pub const PCIE_ECAM_SIZE: u64 = 0x1000_0000;
/// Buses the ECAM decodes (and the MCFG declares): bus 0 only.
pub const PCIE_ECAM_BUSES: u8 = 1;
/// Bytes of ECAM per bus (32 devices × 8 functions × 4 KiB).
pub const PCIE_ECAM_BUS_SIZE: u64 = 1 << 20;

/// IOAPIC MMIO base (KVM's in-kernel IOAPIC; GSI base 0).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// IOAPIC register window size.
pub const IOAPIC_SIZE: u64 = 0x1000;

/// Local APIC MMIO base (KVM's in-kernel LAPIC).
pub const LAPIC_START: u64 = 0xfee0_0000;
/// Local APIC register window size.
pub const LAPIC_SIZE: u64 = 0x1000;

/// End of the 32-bit address space; RAM beyond the hole continues here.
pub const MEM_32BIT_END: u64 = 0x1_0000_0000;
/// Start of RAM above 4 GiB.
pub const RAM_64BIT_START: u64 = 0x1_0000_0000;

// ---------------------------------------------------------------------------------------
// Boot protocol limits.
// ---------------------------------------------------------------------------------------

/// initrd_addr_max assumed when the kernel gave no setup header (boot protocol default for
/// 64-bit kernels is 0x7fffffff; older ones used 0x37ffffff).
pub const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;

// ---------------------------------------------------------------------------------------
// I/O ports.
// ---------------------------------------------------------------------------------------

/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 command/status port. Writing 0xfe here pulses the reset line.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// i8042 command that resets the CPU.
pub const I8042_RESET_COMMAND: u8 = 0xfe;

/// ACPI hardware-reduced sleep control register (FADT SLEEP_CONTROL_REG), one byte.
/// Writing `SLP_EN | SLP_TYP(5)` = 0x34 powers the VM off. As in Cloud Hypervisor.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x3c0;
/// ACPI sleep status register (FADT SLEEP_STATUS_REG). Same byte as the control register:
/// Linux writes WAK_STS (0x80) to it before sleeping, which the device must ignore.
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x3c0;
/// ACPI reset register (FADT RESET_REG), the same byte port. Writing `ACPI_RESET_VALUE`
/// resets (reboots) the VM.
pub const ACPI_RESET_PORT: u16 = 0x3c0;
/// Value Linux writes to `ACPI_RESET_PORT` to reboot (bit 0: reserved in the sleep control
/// register, so it never collides with a sleep request).
pub const ACPI_RESET_VALUE: u8 = 0x01;
/// SLP_TYP for S5 (soft off); the DSDT's `_S5_` package says the same.
pub const ACPI_SLP_TYP_S5: u8 = 5;
/// Bit position of SLP_TYP in the sleep control register (bits 2..=4).
pub const ACPI_SLP_TYP_SHIFT: u8 = 2;
/// SLP_EN bit of the sleep control register.
pub const ACPI_SLP_EN: u8 = 1 << 5;
/// The byte Linux writes to `ACPI_SLEEP_CONTROL_PORT` on poweroff.
pub const ACPI_POWEROFF_VALUE: u8 = (ACPI_SLP_TYP_S5 << ACPI_SLP_TYP_SHIFT) | ACPI_SLP_EN;

/// First COM1 (8250 UART) port; 8 ports.
pub const COM1_PORT: u16 = 0x3f8;
/// Number of COM1 ports.
pub const COM1_PORT_COUNT: u16 = 8;
/// COM1 ISA IRQ == GSI on the IOAPIC.
pub const COM1_GSI: u32 = 4;

/// PCI configuration mechanism #1 (0xcf8 address, 0xcfc..0xcff data).
pub const PCI_CONFIG_PORT: u16 = 0xcf8;
/// Number of PCI configuration ports.
pub const PCI_CONFIG_PORT_COUNT: u16 = 8;

// ---------------------------------------------------------------------------------------
// Interrupts.
// ---------------------------------------------------------------------------------------

/// Number of IOAPIC pins (KVM's in-kernel IOAPIC).
pub const IOAPIC_PINS: u32 = 24;
/// GSI the PIT (ISA IRQ 0) is routed to (MADT interrupt source override).
pub const PIT_GSI: u32 = 2;
/// GSI of PCI INTA# on every bus-0 slot; INTB#..INTD# follow (16..=19). The
/// DSDT's `\_SB_.PCI0._PRT` says so; the pins are level-triggered and shared.
pub const PCI_INTX_GSI_BASE: u32 = 16;
/// PCI interrupt pins (INTA#..INTD#).
pub const PCI_INTX_PINS: u32 = 4;

// Build-time invariants the boot code relies on.
const _: () = {
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE <= EBDA_START);
    assert!(PAGE_TABLES_END <= CMDLINE_START);
    assert!(IDENTITY_MAP_SIZE >= MEM_32BIT_END);
    assert!(PCI_MMIO32_START + PCI_MMIO32_SIZE <= PCIE_ECAM_START);
    assert!(PCIE_ECAM_START + PCIE_ECAM_SIZE <= IOAPIC_START);
    assert!(GDT_START + GDT_MAX_SIZE <= IDT_START);
};

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, start, end exclusive) of every fixed memory area, in address order.
    fn memory_areas() -> Vec<(&'static str, u64, u64)> {
        vec![
            ("gdt", GDT_START, GDT_START + GDT_MAX_SIZE),
            ("idt", IDT_START, IDT_START + IDT_MAX_SIZE),
            ("pvh start_info", PVH_INFO_START, PVH_MODLIST_START),
            ("pvh modlist", PVH_MODLIST_START, PVH_MEMMAP_START),
            ("pvh memmap", PVH_MEMMAP_START, PVH_AREA_END),
            (
                "zero page",
                ZERO_PAGE_START,
                ZERO_PAGE_START + ZERO_PAGE_SIZE,
            ),
            ("boot stack", BOOT_STACK_START, BOOT_STACK_POINTER + 0x10),
            ("pml4", PML4_START, PML4_START + 0x1000),
            ("pdpt", PDPTE_START, PDPTE_START + 0x1000),
            ("pd", PDE_START, PAGE_TABLES_END),
            ("cmdline", CMDLINE_START, CMDLINE_START + CMDLINE_MAX_SIZE),
            ("ebda", EBDA_START, LEGACY_HOLE_START),
            ("legacy hole", LEGACY_HOLE_START, RSDP_START),
            ("acpi", RSDP_START, ACPI_AREA_END),
            (
                "reset vector",
                RESET_VECTOR,
                RESET_VECTOR + RESET_VECTOR_SIZE,
            ),
            ("low ram for the kernel", HIMEM_START, MMIO32_HOLE_START),
            (
                "pci mmio32",
                PCI_MMIO32_START,
                PCI_MMIO32_START + PCI_MMIO32_SIZE,
            ),
            ("ecam", PCIE_ECAM_START, PCIE_ECAM_START + PCIE_ECAM_SIZE),
            ("ioapic", IOAPIC_START, IOAPIC_START + IOAPIC_SIZE),
            ("lapic", LAPIC_START, LAPIC_START + LAPIC_SIZE),
        ]
    }

    #[test]
    fn memory_areas_are_ordered_and_do_not_overlap() {
        let areas = memory_areas();
        for (name, start, end) in &areas {
            assert!(start < end, "{name} is empty");
        }
        for pair in areas.windows(2) {
            let (a, _, a_end) = pair[0];
            let (b, b_start, _) = pair[1];
            assert!(a_end <= b_start, "{a} overlaps {b}");
        }
    }

    #[test]
    fn mmio_areas_are_inside_the_32bit_hole() {
        for (name, start, end) in memory_areas() {
            if start >= MMIO32_HOLE_START {
                assert!(end <= MEM_32BIT_END, "{name} crosses 4 GiB");
            }
        }
        assert_eq!(MMIO32_HOLE_START + MMIO32_HOLE_SIZE, MEM_32BIT_END);
    }

    #[test]
    fn boot_structures_sit_below_the_ebda_and_are_identity_mapped() {
        // Also checked at compile time below the constants.
        let (cmdline_end, ebda) = (CMDLINE_START + CMDLINE_MAX_SIZE, EBDA_START);
        assert!(cmdline_end <= ebda);
        let identity = IDENTITY_MAP_SIZE;
        assert!(identity >= MEM_32BIT_END);
        assert_eq!(RAM_64BIT_START, MEM_32BIT_END);
        assert_eq!(BOOT_STACK_POINTER % 16, 0);
    }

    #[test]
    fn page_aligned_areas_are_page_aligned() {
        for a in [
            PVH_INFO_START,
            ZERO_PAGE_START,
            PML4_START,
            PDPTE_START,
            PDE_START,
            CMDLINE_START,
            HIMEM_START,
            MMIO32_HOLE_START,
            PCIE_ECAM_START,
            IOAPIC_START,
            LAPIC_START,
        ] {
            assert_eq!(a % 0x1000, 0, "{a:#x}");
        }
    }

    #[test]
    fn poweroff_value_is_slp_en_with_s5() {
        assert_eq!(ACPI_POWEROFF_VALUE, 0x34);
        assert_eq!(ACPI_POWEROFF_VALUE & ACPI_RESET_VALUE, 0);
    }
}
