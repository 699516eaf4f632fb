//! ACPI tables for a hardware-reduced x86 machine, written at `layout::RSDP_START`.
//!
//! Tables, in the order they are written: RSDP (at `RSDP_START`, where Linux also finds it
//! by scanning), DSDT, FADT, MADT, the caller's extra tables, XSDT (pointing at FADT, MADT
//! and the extras; the DSDT hangs off the FADT).
//!
//! - FADT: HW_REDUCED_ACPI; the sleep control/status registers and the reset register are
//!   the byte I/O port `layout::ACPI_SLEEP_CONTROL_PORT` (0x3c0). Linux `poweroff` writes
//!   `layout::ACPI_POWEROFF_VALUE` (SLP_TYP=5 | SLP_EN) there, `reboot` writes
//!   `layout::ACPI_RESET_VALUE`. IA-PC boot flags: no VGA, no CMOS RTC, and no i8042 (so
//!   Linux reboots through the ACPI reset register rather than the keyboard controller).
//! - MADT: one enabled local APIC per vCPU (APIC id = ACPI uid = vCPU index), the IOAPIC at
//!   `IOAPIC_START` with GSI base 0, ISA IRQ0 → GSI2, LINT1 = NMI on all processors, and
//!   PCAT_COMPAT (KVM's in-kernel PIC exists).
//! - DSDT: `\_S5_` = {5, 0, 0, 0} and a PNP0501 COM1 device (0x3f8, GSI 4).
//!
//! Extra content: [`AcpiExtras::dsdt_aml`] is AML appended to the DSDT body,
//! [`AcpiExtras::tables`] are complete tables written after the MADT and listed in the
//! XSDT. The PCI host bridge uses both: [`pci_host_bridge_aml`] is the `\_SB_.PCI0` device
//! and [`mcfg`] the MCFG table (see [`PciHostBridgeAcpi`]).
//!
//! # The PCI host bridge
//!
//! `\_SB_.PCI0` is a PNP0A08 (PCI Express root bridge, compatible PNP0A03) for segment 0,
//! bus 0 (`_SEG`, `_BBN`, `_UID` all 0). Its `_CRS` is what Linux uses as the root bus
//! windows: bus numbers 0..=0, the configuration ports 0xcf8..0xcff (consumed), the MMIO32
//! window (DWordMemory, not cacheable) and the MMIO64 window (QWordMemory, cacheable) up to
//! `1 << phys_bits`. Every BAR barge places lies in one of the two windows, so Linux claims
//! the addresses it finds in the BARs instead of reassigning them. There is no `_DSM` and no
//! `_OSC`: Linux logs that it keeps PCIe services (ASPM, hotplug) to itself, which is fine
//! for a VM with no hotplug. `_PRT` routes INTA#..INTD# of every bus-0 slot straight to
//! GSIs 16..=19 (`PCI_INTX_GSI_BASE`; level-triggered, shared). The MCFG names the ECAM for segment 0, buses 0..=0; the e820
//! map reserves it (see `e820`).

use crate::x86_64::layout::{
    ACPI_AREA_END, ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_SLEEP_CONTROL_PORT,
    ACPI_SLEEP_STATUS_PORT, ACPI_SLP_TYP_S5, COM1_GSI, COM1_PORT, COM1_PORT_COUNT, IOAPIC_START,
    LAPIC_START, PCI_CONFIG_PORT, PCI_CONFIG_PORT_COUNT, PCI_INTX_GSI_BASE, PCI_INTX_PINS, PIT_GSI,
    RSDP_START,
};
use acpi_tables::{
    aml,
    fadt::{FADTBuilder, Flags},
    gas::{AccessSize, AddressSpace, GAS},
    rsdp::Rsdp,
    sdt::Sdt,
    xsdt::XSDT,
    Aml,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

/// OEM id in every table header.
pub const OEM_ID: [u8; 6] = *b"BARGE ";
/// OEM table id in every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"BARGEVM ";
/// Most vCPUs the MADT can describe with xAPIC ids (255 is the broadcast id).
pub const MAX_ACPI_CPUS: u8 = 254;

/// IA-PC boot architecture flag: VGA not present.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
/// IA-PC boot architecture flag: CMOS RTC not present.
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
/// MADT flag: the machine also has dual 8259 PICs.
const MADT_PCAT_COMPAT: u32 = 1;

/// Extra content for later devices (PCI host bridge, MCFG). Empty by default.
#[derive(Clone, Copy, Debug, Default)]
pub struct AcpiExtras<'a> {
    /// AML appended to the DSDT body, e.g. a `\_SB_.PCI0` host bridge device.
    pub dsdt_aml: &'a [u8],
    /// Complete ACPI tables (header and checksum included), listed in the XSDT.
    pub tables: &'a [Vec<u8>],
}

/// What the guest is told about the PCI host bridge (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciHostBridgeAcpi {
    /// ECAM base (bus 0).
    pub ecam_base: u64,
    /// Last bus number the ECAM decodes (0: bus 0 only).
    pub end_bus: u8,
    /// MMIO32 window `[start, end)`, below 4 GiB.
    pub mmio32: (u64, u64),
    /// MMIO64 window `[start, end)`; empty (`start == end`) leaves it out.
    pub mmio64: (u64, u64),
}

/// The MCFG table for one ECAM region: segment 0, buses `0..=end_bus` at `ecam_base`.
pub fn mcfg(ecam_base: u64, end_bus: u8) -> Vec<u8> {
    let mut table = acpi_tables::mcfg::MCFG::new(OEM_ID, OEM_TABLE_ID, 1);
    table.add_ecam(ecam_base, 0, 0, end_bus);
    to_bytes(&table)
}

/// The `\_SB_.PCI0` host bridge device, AML to append to the DSDT (see the module docs).
pub fn pci_host_bridge_aml(bridge: &PciHostBridgeAcpi) -> Vec<u8> {
    use aml::{AddressSpace, AddressSpaceCacheable};
    let buses = AddressSpace::<u16>::new_bus_number(0, u16::from(bridge.end_bus));
    let config_ports = aml::IO::new(
        PCI_CONFIG_PORT,
        PCI_CONFIG_PORT,
        1,
        PCI_CONFIG_PORT_COUNT as u8,
    );
    // The MMIO32 window lies below 4 GiB by construction; clamp rather than panic.
    let mmio32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        u32::try_from(bridge.mmio32.0).unwrap_or(u32::MAX),
        u32::try_from(bridge.mmio32.1.saturating_sub(1)).unwrap_or(u32::MAX),
        None,
    );
    let mmio64 = AddressSpace::<u64>::new_memory(
        AddressSpaceCacheable::Cacheable,
        true,
        bridge.mmio64.0,
        bridge.mmio64.1.saturating_sub(1),
        None,
    );
    let mut resources: Vec<&dyn Aml> = vec![&buses, &config_ports, &mmio32];
    if bridge.mmio64.1 > bridge.mmio64.0 {
        resources.push(&mmio64);
    }
    let crs = aml::ResourceTemplate::new(resources);
    let hid = aml::EISAName::new("PNP0A08");
    let cid = aml::EISAName::new("PNP0A03");
    // _PRT: INTA#..INTD# of every slot on bus 0 to GSIs 16..=19, directly
    // (no link devices), so Linux routes a passed-through device's INTx.
    let prt_fields: Vec<(u32, u8, u32)> = (0..32u32)
        .flat_map(|slot| {
            (0..PCI_INTX_PINS)
                .map(move |pin| ((slot << 16) | 0xffff, pin as u8, PCI_INTX_GSI_BASE + pin))
        })
        .collect();
    let prt_entries: Vec<aml::Package> = prt_fields
        .iter()
        .map(|(address, pin, gsi)| {
            aml::Package::new(vec![address as &dyn Aml, pin, &aml::ZERO, gsi])
        })
        .collect();
    let prt = aml::Package::new(prt_entries.iter().map(|entry| entry as &dyn Aml).collect());
    let mut body = Vec::new();
    aml::Device::new(
        "_SB_.PCI0".into(),
        vec![
            &aml::Name::new("_HID".into(), &hid),
            &aml::Name::new("_CID".into(), &cid),
            &aml::Name::new("_ADR".into(), &aml::ZERO),
            &aml::Name::new("_SEG".into(), &aml::ZERO),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_BBN".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
            &aml::Name::new("_PRT".into(), &prt),
        ],
    )
    .to_aml_bytes(&mut body);
    body
}

/// ACPI table failures.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// Zero or too many vCPUs.
    #[error("cannot describe {cpus} vCPUs in the MADT: use 1 to {MAX_ACPI_CPUS} vCPUs")]
    CpuCount {
        /// The count asked for.
        cpus: u8,
    },
    /// The tables did not fit below 1 MiB.
    #[error("ACPI tables need {needed:#x} bytes from {RSDP_START:#x} but only {ACPI_AREA_END:#x} is available; drop extra tables or shrink the DSDT")]
    TooLarge {
        /// End address the tables would need.
        needed: u64,
    },
    /// Guest memory write failure.
    #[error("cannot write ACPI table {table} at {addr:#x}: {source}; give the VM RAM starting at address 0")]
    Write {
        /// Table signature.
        table: String,
        /// Guest physical address.
        addr: u64,
        source: GuestMemoryError,
    },
}

fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// The DSDT: `\_S5_`, COM1, then `extra_aml`.
pub fn dsdt(extra_aml: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&ACPI_SLP_TYP_S5, &0u8, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut body);
    let irq = aml::Interrupt::new(true, true, false, false, COM1_GSI);
    let io = aml::IO::new(COM1_PORT, COM1_PORT, 0, COM1_PORT_COUNT as u8);
    let crs = aml::ResourceTemplate::new(vec![&irq, &io]);
    let hid = aml::EISAName::new("PNP0501");
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &hid),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(&mut body);
    body.extend_from_slice(extra_aml);
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, 1);
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

/// The FADT pointing at the DSDT at `dsdt_addr`.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let io_byte = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            port.into(),
        )
    };
    let mut builder = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, 1)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .dsdt_64(dsdt_addr);
    builder.sleep_control_reg = io_byte(ACPI_SLEEP_CONTROL_PORT);
    builder.sleep_status_reg = io_byte(ACPI_SLEEP_STATUS_PORT);
    builder.reset_reg = io_byte(ACPI_RESET_PORT);
    builder.reset_value = ACPI_RESET_VALUE;
    builder.iapc_boot_arch = (IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT).into();
    to_bytes(&builder.finalize())
}

/// The MADT for `cpus` vCPUs.
pub fn madt(cpus: u8) -> Vec<u8> {
    let mut sdt = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, 1);
    sdt.write_u32(36, LAPIC_START as u32);
    sdt.write_u32(40, MADT_PCAT_COMPAT);
    for id in 0..cpus {
        // Processor local APIC: type 0, length 8, uid, APIC id, flags = enabled.
        let mut lapic = vec![0u8, 8, id, id];
        lapic.extend_from_slice(&1u32.to_le_bytes());
        sdt.append_slice(&lapic);
    }
    // IOAPIC: type 1, length 12, id 0, reserved, address, GSI base 0.
    let mut ioapic = vec![1u8, 12, 0, 0];
    ioapic.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    sdt.append_slice(&ioapic);
    // Interrupt source override: type 2, length 10, bus ISA, IRQ 0 -> GSI 2, flags conform.
    let mut iso = vec![2u8, 10, 0, 0];
    iso.extend_from_slice(&PIT_GSI.to_le_bytes());
    iso.extend_from_slice(&0u16.to_le_bytes());
    sdt.append_slice(&iso);
    // Local APIC NMI: type 4, length 6, all processors, flags conform, LINT1.
    sdt.append_slice(&[4u8, 6, 0xff, 0, 0, 1]);
    sdt.as_slice().to_vec()
}

fn align16(addr: u64) -> u64 {
    addr.div_ceil(16) * 16
}

fn write_table(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) -> Result<(), AcpiError> {
    let end = addr + bytes.len() as u64;
    if end > ACPI_AREA_END {
        return Err(AcpiError::TooLarge { needed: end });
    }
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| AcpiError::Write {
            table: String::from_utf8_lossy(&bytes[..4.min(bytes.len())]).into_owned(),
            addr,
            source,
        })
}

/// Writes all tables for `cpus` vCPUs and returns the RSDP address (`RSDP_START`).
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    cpus: u8,
    extras: &AcpiExtras,
) -> Result<u64, AcpiError> {
    if cpus == 0 || cpus > MAX_ACPI_CPUS {
        return Err(AcpiError::CpuCount { cpus });
    }
    let mut next = align16(RSDP_START + Rsdp::len() as u64);
    let mut place = |bytes: &[u8]| -> Result<u64, AcpiError> {
        let addr = next;
        write_table(mem, addr, bytes)?;
        next = align16(addr + bytes.len() as u64);
        Ok(addr)
    };
    let dsdt_addr = place(&dsdt(extras.dsdt_aml))?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, 1);
    xsdt.add_entry(place(&fadt(dsdt_addr))?);
    xsdt.add_entry(place(&madt(cpus))?);
    for table in extras.tables {
        xsdt.add_entry(place(table)?);
    }
    let xsdt_addr = place(&to_bytes(&xsdt))?;
    write_table(mem, RSDP_START, &to_bytes(&Rsdp::new(OEM_ID, xsdt_addr)))?;
    Ok(RSDP_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86_64::layout::ACPI_POWEROFF_VALUE;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    /// Reads a whole table (length from its header) and checks its checksum.
    fn table_at(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let header = read(mem, addr, 36);
        let table = read(mem, addr, u32_at(&header, 4) as usize);
        assert_eq!(
            sum(&table),
            0,
            "checksum of {}",
            String::from_utf8_lossy(&table[..4])
        );
        table
    }

    /// RSDP → XSDT → every table, checksums verified; returns (signature, bytes).
    fn all_tables(mem: &GuestMemoryMmap) -> Vec<([u8; 4], Vec<u8>)> {
        let rsdp = read(mem, RSDP_START, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP");
        let xsdt = table_at(mem, u64_at(&rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        let mut tables = vec![(*b"XSDT", xsdt.clone())];
        for i in (36..xsdt.len()).step_by(8) {
            let t = table_at(mem, u64_at(&xsdt, i));
            tables.push((t[..4].try_into().unwrap(), t));
        }
        let fadt = tables.iter().find(|t| &t.0 == b"FACP").unwrap().1.clone();
        let dsdt = table_at(mem, u64_at(&fadt, 140));
        tables.push((*b"DSDT", dsdt));
        tables
    }

    fn find(tables: &[([u8; 4], Vec<u8>)], sig: &[u8; 4]) -> Vec<u8> {
        tables.iter().find(|t| &t.0 == sig).unwrap().1.clone()
    }

    #[test]
    fn every_table_is_reachable_from_the_rsdp_with_a_valid_checksum() {
        let mem = mem();
        assert_eq!(
            create_acpi_tables(&mem, 2, &AcpiExtras::default()).unwrap(),
            RSDP_START
        );
        let tables = all_tables(&mem);
        let sigs: Vec<&[u8; 4]> = tables.iter().map(|t| &t.0).collect();
        assert_eq!(sigs, vec![b"XSDT", b"FACP", b"APIC", b"DSDT"]);
    }

    #[test]
    fn madt_lists_one_local_apic_per_cpu_and_the_ioapic() {
        for cpus in [1u8, 2, 8, 64] {
            let mem = mem();
            create_acpi_tables(&mem, cpus, &AcpiExtras::default()).unwrap();
            let madt = find(&all_tables(&mem), b"APIC");
            assert_eq!(u32_at(&madt, 36), 0xfee0_0000);
            assert_eq!(u32_at(&madt, 40) & 1, 1);
            let mut off = 44;
            let mut lapic_ids = Vec::new();
            let (mut ioapics, mut isos, mut nmis) = (0, 0, 0);
            while off < madt.len() {
                let (ty, len) = (madt[off], madt[off + 1] as usize);
                match ty {
                    0 => {
                        assert_eq!(madt[off + 2], madt[off + 3]);
                        assert_eq!(u32_at(&madt, off + 4), 1, "enabled");
                        lapic_ids.push(madt[off + 3]);
                    }
                    1 => {
                        assert_eq!(u32_at(&madt, off + 4), 0xfec0_0000);
                        assert_eq!(u32_at(&madt, off + 8), 0, "GSI base");
                        ioapics += 1;
                    }
                    2 => {
                        assert_eq!((madt[off + 2], madt[off + 3]), (0, 0));
                        assert_eq!(u32_at(&madt, off + 4), 2);
                        isos += 1;
                    }
                    4 => {
                        assert_eq!(madt[off + 5], 1, "LINT1");
                        nmis += 1;
                    }
                    other => panic!("unexpected MADT entry type {other}"),
                }
                off += len;
            }
            assert_eq!(off, madt.len());
            assert_eq!(lapic_ids, (0..cpus).collect::<Vec<_>>());
            assert_eq!((ioapics, isos, nmis), (1, 1, 1));
        }
    }

    #[test]
    fn fadt_is_hw_reduced_with_sleep_and_reset_on_barge_ports() {
        let mem = mem();
        create_acpi_tables(&mem, 1, &AcpiExtras::default()).unwrap();
        let fadt = find(&all_tables(&mem), b"FACP");
        assert_eq!(fadt.len(), 276);
        let flags = u32_at(&fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        // GAS: space id 1 (I/O), width 8, offset 0, byte access, address.
        let gas = |off: usize| {
            (
                fadt[off],
                fadt[off + 1],
                fadt[off + 3],
                u64_at(&fadt, off + 4),
            )
        };
        assert_eq!(gas(116), (1, 8, 1, 0x3c0), "reset register");
        assert_eq!(fadt[128], ACPI_RESET_VALUE);
        assert_eq!(gas(244), (1, 8, 1, 0x3c0), "sleep control");
        assert_eq!(gas(256), (1, 8, 1, 0x3c0), "sleep status");
        assert_eq!(ACPI_POWEROFF_VALUE, (5 << 2) | (1 << 5));
    }

    #[test]
    fn dsdt_has_s5_and_com1() {
        let mem = mem();
        create_acpi_tables(&mem, 1, &AcpiExtras::default()).unwrap();
        let dsdt = find(&all_tables(&mem), b"DSDT");
        let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        // NameOp "_S5_" PackageOp
        assert!(has(b"\x08_S5_\x12"));
        // After PackageOp and PkgLength: 4 elements, the first is BytePrefix 5.
        let at = dsdt.windows(5).position(|w| w == b"_S5_\x12").unwrap();
        assert_eq!(&dsdt[at + 6..at + 9], b"\x04\x0a\x05");
        assert!(has(b"COM1"));
    }

    #[test]
    fn extras_are_listed_in_the_xsdt_and_appended_to_the_dsdt() {
        let mem = mem();
        let mut mcfg = Sdt::new(*b"MCFG", 60, 1, OEM_ID, OEM_TABLE_ID, 1);
        mcfg.write_u64(44, 0xe000_0000);
        let tables = [mcfg.as_slice().to_vec()];
        let extra_aml = [0x08, b'X', b'T', b'R', b'A', 0x00];
        let extras = AcpiExtras {
            dsdt_aml: &extra_aml,
            tables: &tables,
        };
        create_acpi_tables(&mem, 1, &extras).unwrap();
        let all = all_tables(&mem);
        assert_eq!(u64_at(&find(&all, b"MCFG"), 44), 0xe000_0000);
        assert!(find(&all, b"DSDT").ends_with(&extra_aml));
    }

    fn bridge() -> PciHostBridgeAcpi {
        PciHostBridgeAcpi {
            ecam_base: 0xe000_0000,
            end_bus: 0,
            mmio32: (0xc000_0000, 0xe000_0000),
            mmio64: (1 << 32, 1 << 46),
        }
    }

    #[test]
    fn mcfg_names_bus_0_of_segment_0_with_a_valid_checksum() {
        let table = mcfg(0xe000_0000, 0);
        assert_eq!(&table[..4], b"MCFG");
        assert_eq!(u32_at(&table, 4) as usize, table.len());
        assert_eq!(
            table.len(),
            60,
            "header, 8 reserved bytes, one 16-byte entry"
        );
        assert_eq!(sum(&table), 0);
        assert_eq!(u64_at(&table, 44), 0xe000_0000);
        assert_eq!(&table[52..56], &[0, 0, 0, 0], "segment 0, buses 0..=0");
    }

    /// The first large resource descriptor with tag `tag` and body length `len` in `aml`:
    /// its body (the bytes after the tag and the 16-bit length).
    fn descriptor(aml: &[u8], tag: u8, len: usize) -> Vec<u8> {
        let at = aml
            .windows(3)
            .position(|w| w[0] == tag && usize::from(u16::from_le_bytes([w[1], w[2]])) == len)
            .unwrap_or_else(|| panic!("descriptor {tag:#x} of length {len}"));
        aml[at + 3..at + 3 + len].to_vec()
    }

    #[test]
    fn host_bridge_aml_declares_ids_and_windows() {
        let aml = pci_host_bridge_aml(&bridge());
        let has = |needle: &[u8]| aml.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"PCI0"));
        // _HID EISAID("PNP0A08") = 0x080ad041, _CID PNP0A03 = 0x030ad041 (DWordPrefix 0x0c).
        assert!(has(b"_HID\x0c\x41\xd0\x0a\x08"));
        assert!(has(b"_CID\x0c\x41\xd0\x0a\x03"));
        for name in [b"_SEG", b"_BBN", b"_UID", b"_ADR"] {
            let mut zero = name.to_vec();
            zero.push(0x00);
            assert!(has(&zero), "{} = Zero", String::from_utf8_lossy(name));
        }
        // WordBusNumber: type 2, granularity 0, min 0, max 0, translation 0, length 1.
        let bus = descriptor(&aml, 0x88, 13);
        assert_eq!(bus[0], 2);
        assert_eq!(&bus[3..13], &[0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
        // IO: decode16, 0xcf8..0xcf8, alignment 1, length 8.
        let io_at = aml
            .windows(8)
            .position(|w| w == [0x47, 1, 0xf8, 0x0c, 0xf8, 0x0c, 1, 8]);
        assert!(io_at.is_some(), "IO descriptor for 0xcf8");
        // DWordMemory: type 0, min 0xc0000000, max 0xdfffffff, length 0x20000000.
        let m32 = descriptor(&aml, 0x87, 23);
        assert_eq!(m32[0], 0, "memory");
        assert_eq!(u32_at(&m32, 7), 0xc000_0000);
        assert_eq!(u32_at(&m32, 11), 0xdfff_ffff);
        assert_eq!(u32_at(&m32, 19), 0x2000_0000);
        // QWordMemory: min 4 GiB, max 2^46 - 1, length 2^46 - 4 GiB.
        let m64 = descriptor(&aml, 0x8a, 43);
        assert_eq!(m64[0], 0, "memory");
        assert_eq!(u64_at(&m64, 11), 1 << 32);
        assert_eq!(u64_at(&m64, 19), (1 << 46) - 1);
        assert_eq!(u64_at(&m64, 35), (1 << 46) - (1 << 32));
    }

    #[test]
    fn host_bridge_prt_routes_every_slot_and_pin_to_gsis_16_to_19() {
        let aml = pci_host_bridge_aml(&bridge());
        let has = |needle: &[u8]| aml.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"_PRT"));
        // Package(4) { 0x3ffff, 2, Zero, 18 }: PackageOp, length, count 4,
        // DWord 0x0003ffff, Byte 2, Zero, Byte 18.
        assert!(has(&[
            0x12, 0x0c, 4, 0x0c, 0xff, 0xff, 0x03, 0x00, 0x0a, 2, 0x00, 0x0a, 18
        ]));
        // Slot 0, INTA#: the address is a Word (0xffff), pin Zero, GSI 16.
        assert!(has(&[
            0x12, 0x09, 4, 0x0b, 0xff, 0xff, 0x00, 0x00, 0x0a, 16
        ]));
        // Slot 31, INTD#: GSI 19.
        assert!(has(&[
            0x12, 0x0c, 4, 0x0c, 0xff, 0xff, 0x1f, 0x00, 0x0a, 3, 0x00, 0x0a, 19
        ]));
    }

    #[test]
    fn empty_mmio64_window_is_left_out() {
        let mut b = bridge();
        b.mmio64 = (1 << 32, 1 << 32);
        let aml = pci_host_bridge_aml(&b);
        assert!(!aml.windows(3).any(|w| w == [0x8a, 43, 0]));
    }

    #[test]
    fn host_bridge_and_mcfg_go_through_create_acpi_tables() {
        let mem = mem();
        let aml = pci_host_bridge_aml(&bridge());
        let tables = [mcfg(0xe000_0000, 0)];
        create_acpi_tables(
            &mem,
            2,
            &AcpiExtras {
                dsdt_aml: &aml,
                tables: &tables,
            },
        )
        .unwrap();
        let all = all_tables(&mem);
        assert_eq!(u64_at(&find(&all, b"MCFG"), 44), 0xe000_0000);
        assert!(find(&all, b"DSDT").ends_with(&aml));
    }

    #[test]
    fn bad_cpu_counts_and_oversized_extras_are_errors() {
        let mem = mem();
        let msg = create_acpi_tables(&mem, 0, &AcpiExtras::default())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("use 1 to 254"), "{msg}");
        assert!(create_acpi_tables(&mem, 255, &AcpiExtras::default()).is_err());
        let huge = [vec![0u8; 0x20000]];
        let extras = AcpiExtras {
            dsdt_aml: &[],
            tables: &huge,
        };
        assert!(matches!(
            create_acpi_tables(&mem, 1, &extras),
            Err(AcpiError::TooLarge { .. })
        ));
    }
}
