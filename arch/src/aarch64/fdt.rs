//! The flattened device tree (FDT) an arm64 Linux kernel boots from: CPUs, memory,
//! `/chosen`, PSCI, the architected timer, the GICv3 (and its ITS), the ns16550a UART and
//! the generic ECAM PCIe host bridge.
//!
//! The tree follows QEMU's `virt` machine where the two overlap, so Linux's generic drivers
//! bind without barge-specific code:
//!
//! ```text
//! / { compatible = "linux,dummy-virt"; #address-cells = 2; #size-cells = 2;
//!     interrupt-parent = <&gic>;
//!   cpus { #address-cells = 2; #size-cells = 0;
//!     cpu@N { device_type = "cpu"; compatible = "arm,arm-v8"; enable-method = "psci";
//!             reg = <MPIDR affinity>; } ... }
//!   memory@40000000 { device_type = "memory"; reg = <RAM>; }
//!   chosen { bootargs; stdout-path = "/uart@9000000"; linux,initrd-start/-end; }
//!   psci { compatible = "arm,psci-1.0", "arm,psci-0.2"; method = "hvc"; }
//!   timer { compatible = "arm,armv8-timer"; always-on; interrupts = <4 PPIs>; }
//!   intc@8000000 (gic) { compatible = "arm,gic-v3"; reg = <GICD>, <GICR>;
//!     its@8080000 { compatible = "arm,gic-v3-its"; msi-controller; } }
//!   uart@9000000 { compatible = "ns16550a"; interrupts = <SPI 1, level>; }
//!   pcie@30000000 { compatible = "pci-host-ecam-generic"; ranges = <MMIO32>, <MMIO64>;
//!     msi-map = <0 &its 0 0x10000>; interrupt-map = <every slot's INTA#..INTD# -> SPIs 4..7>; }
//! }
//! ```
//!
//! There is no I/O port space on arm64 (no I/O range), no `/aliases`, no RNG seed and no
//! firmware tables (ACPI, UEFI).

use vm_fdt::FdtWriter;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::layout::{
    gic_redist_size, pci_intx_spi, FDT_MAX_SIZE, GIC_DIST_SIZE, GIC_DIST_START, GIC_ITS_SIZE,
    GIC_ITS_START, GIC_MAINTENANCE_PPI, GIC_REDIST_START, MAX_VCPUS, PCIE_ECAM_BUSES,
    PCIE_ECAM_BUS_SIZE, PCIE_ECAM_START, PCI_INTX_PINS, PCI_INTX_SPI_BASE, PCI_MMIO32_SIZE,
    PCI_MMIO32_START, SERIAL_SIZE, SERIAL_SPI, SERIAL_START, TIMER_HYP_PPI, TIMER_PHYS_PPI,
    TIMER_SECURE_PHYS_PPI, TIMER_VIRT_PPI,
};

/// Phandle of the GIC (`/intc@...`), every node's interrupt parent.
pub const GIC_PHANDLE: u32 = 1;
/// Phandle of the GIC ITS, the PCIe host bridge's MSI controller.
pub const ITS_PHANDLE: u32 = 2;

/// Longest command line arm64 Linux takes, including its NUL (`COMMAND_LINE_SIZE`); the
/// kernel would cut a longer one short without a word.
pub const CMDLINE_MAX_SIZE: usize = 2048;

/// The bits of MPIDR_EL1 that make a CPU node's `reg`: Aff3 (39:32) and Aff2..Aff0 (23:0).
pub const MPIDR_AFFINITY_MASK: u64 = 0xff_00ff_ffff;

/// Interrupt specifier type cell of an SPI (GIC binding).
const GIC_FDT_IRQ_TYPE_SPI: u32 = 0;
/// Interrupt specifier type cell of a PPI (GIC binding).
const GIC_FDT_IRQ_TYPE_PPI: u32 = 1;
/// Interrupt specifier flags cell: level-triggered, active high (`IRQ_TYPE_LEVEL_HIGH`).
/// GICv3 has no PPI CPU mask bits, so PPIs carry no more.
const IRQ_TYPE_LEVEL_HIGH: u32 = 4;
/// Interrupt specifier flags cell: rising edge (`IRQ_TYPE_EDGE_RISING`). The UART's: the
/// vmm raises it through an irqfd, a pulse that nothing lowers later, as on x86_64's
/// IOAPIC (level-triggered, the 8250 driver saw it as an interrupt nobody claimed).
const IRQ_TYPE_EDGE_RISING: u32 = 1;

/// Clock of the 16550 (1.8432 MHz, the classic PC UART clock: divisor 1 = 115200 baud).
const SERIAL_CLOCK_HZ: u32 = 1_843_200;

/// PCI address space code (phys.hi bits 25:24) of 32-bit memory space.
const PCI_RANGE_MMIO32: u32 = 0x0200_0000;
/// PCI address space code of 64-bit memory space.
const PCI_RANGE_MMIO64: u32 = 0x0300_0000;
/// Device slots on a PCI bus.
const PCI_SLOTS: u8 = 32;
/// Requester IDs the ITS translates (16-bit RID space), identity-mapped to device IDs.
const MSI_MAP_RIDS: u32 = 0x1_0000;

/// The GICv3's register regions, each `(gpa, size)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GicRegions {
    /// Distributor (GICD).
    pub dist: (u64, u64),
    /// Redistributors (GICR), one per vCPU, contiguous.
    pub redist: (u64, u64),
    /// ITS, when the VM has one (needed for PCI MSIs).
    pub its: Option<(u64, u64)>,
}

impl GicRegions {
    /// The regions of [`layout`](super::layout) for `cpus` vCPUs, with or without the ITS.
    pub const fn for_cpus(cpus: usize, its: bool) -> GicRegions {
        GicRegions {
            dist: (GIC_DIST_START, GIC_DIST_SIZE),
            redist: (GIC_REDIST_START, gic_redist_size(cpus)),
            its: if its {
                Some((GIC_ITS_START, GIC_ITS_SIZE))
            } else {
                None
            },
        }
    }
}

/// The ns16550a UART.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SerialFdt {
    /// MMIO base.
    pub base: u64,
    /// MMIO window size.
    pub size: u64,
    /// SPI number (not INTID) of its interrupt, level-triggered.
    pub spi: u32,
}

impl SerialFdt {
    /// The UART of [`layout`](super::layout).
    pub const BARGE: SerialFdt = SerialFdt {
        base: SERIAL_START,
        size: SERIAL_SIZE,
        spi: SERIAL_SPI,
    };
}

/// The generic ECAM PCIe host bridge (`pci-host-ecam-generic`). PCI addresses equal CPU
/// addresses in both MMIO windows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciHostBridgeFdt {
    /// ECAM `(gpa, size)`; must cover buses `0..=bus_end` (1 MiB each).
    pub ecam: (u64, u64),
    /// Last bus number (`bus-range = <0 bus_end>`).
    pub bus_end: u8,
    /// 32-bit non-prefetchable MMIO window `(gpa, size)`.
    pub mmio32: (u64, u64),
    /// 64-bit MMIO window `(gpa, size)`, above RAM; size 0 leaves it out.
    pub mmio64: (u64, u64),
    /// SPI of INTA#; the `interrupt-map` sends every slot's INTA#..INTD# to the 4 SPIs
    /// from here.
    pub intx_spi_base: u32,
}

impl PciHostBridgeFdt {
    /// The host bridge of [`layout`](super::layout) (ECAM for `PCIE_ECAM_BUSES` buses, the
    /// MMIO32 window, INTx on SPIs 4..=7) with the 64-bit window `mmio64` the vmm sized.
    pub const fn with_mmio64(mmio64: (u64, u64)) -> PciHostBridgeFdt {
        PciHostBridgeFdt {
            ecam: (PCIE_ECAM_START, PCIE_ECAM_BUSES as u64 * PCIE_ECAM_BUS_SIZE),
            bus_end: PCIE_ECAM_BUSES - 1,
            mmio32: (PCI_MMIO32_START, PCI_MMIO32_SIZE),
            mmio64,
            intx_spi_base: PCI_INTX_SPI_BASE,
        }
    }
}

/// Everything [`create_fdt`] describes.
#[derive(Clone, Copy, Debug)]
pub struct FdtConfig<'a> {
    /// MPIDR_EL1 of each vCPU as KVM reports it (`KVM_GET_ONE_REG` of
    /// [`MPIDR_EL1_REG_ID`](super::regs::MPIDR_EL1_REG_ID)), vCPU 0 first. A CPU node's
    /// `reg` is `mpidr & MPIDR_AFFINITY_MASK`.
    pub mpidrs: &'a [u64],
    /// RAM `(gpa, size)`: one contiguous region.
    pub ram: (u64, u64),
    /// Kernel command line, without NUL.
    pub cmdline: &'a str,
    /// Initramfs already in guest memory: `(gpa, size)`.
    pub initramfs: Option<(u64, u64)>,
    /// GICv3 regions.
    pub gic: GicRegions,
    /// The UART; it is also the console (`stdout-path`).
    pub serial: SerialFdt,
    /// The PCIe host bridge, when the VM has one.
    pub pci: Option<PciHostBridgeFdt>,
}

/// Device tree failures.
#[derive(Debug, thiserror::Error)]
pub enum FdtError {
    /// No vCPU given.
    #[error("cannot describe a VM without vCPUs: give at least 1 vCPU")]
    NoVcpus,
    /// More vCPUs than redistributors fit.
    #[error("cannot boot {cpus} vCPUs on aarch64: use 1 to {MAX_VCPUS} vCPUs")]
    TooManyVcpus {
        /// The count asked for.
        cpus: usize,
    },
    /// Two vCPUs with the same affinity.
    #[error("vCPUs {first} and {second} have the same MPIDR affinity {affinity:#x}; read each vCPU's MPIDR_EL1 after KVM_ARM_VCPU_INIT")]
    DuplicateMpidr {
        /// Index of the first vCPU.
        first: usize,
        /// Index of the second vCPU.
        second: usize,
        /// Their `mpidr & MPIDR_AFFINITY_MASK`.
        affinity: u64,
    },
    /// The redistributor region is too small for the vCPUs.
    #[error("GIC redistributor region of {size:#x} bytes is too small for {cpus} vCPUs: give it {:#x} bytes (layout::gic_redist_size)", gic_redist_size(*cpus))]
    RedistTooSmall {
        /// Bytes given.
        size: u64,
        /// vCPU count.
        cpus: usize,
    },
    /// NUL inside the command line.
    #[error("kernel command line contains a NUL byte at offset {offset}; remove it")]
    CmdlineHasNul {
        /// Byte offset of the NUL.
        offset: usize,
    },
    /// Command line longer than arm64 Linux takes.
    #[error(
        "kernel command line is {len} bytes but arm64 Linux takes at most {max}; shorten --cmdline"
    )]
    CmdlineTooLong {
        /// Bytes given.
        len: usize,
        /// Longest accepted.
        max: usize,
    },
    /// The ECAM does not cover the bus range.
    #[error("PCIe ECAM of {size:#x} bytes cannot hold buses 0..={bus_end} (1 MiB each): give it {:#x} bytes", (u64::from(*bus_end) + 1) * PCIE_ECAM_BUS_SIZE)]
    EcamTooSmall {
        /// Bytes given.
        size: u64,
        /// Last bus.
        bus_end: u8,
    },
    /// The FDT writer refused a node or property.
    #[error(
        "cannot build the device tree: {0}; this is a bug in barge's FDT code, please report it"
    )]
    Writer(#[from] vm_fdt::Error),
    /// The FDT is larger than the boot protocol allows.
    #[error("the device tree is {size} bytes but arm64 Linux takes at most {FDT_MAX_SIZE}; use fewer vCPUs or devices")]
    TooLarge {
        /// Bytes of the FDT.
        size: usize,
    },
    /// The FDT address is not 8-byte aligned.
    #[error("device tree address {addr:#x} is not 8-byte aligned; place it with layout::fdt_addr")]
    Misaligned {
        /// The address given.
        addr: u64,
    },
    /// Guest memory write failure.
    #[error("cannot write the device tree at {addr:#x}: {source}; place it inside RAM with layout::fdt_addr")]
    Write {
        /// The address given.
        addr: u64,
        /// The guest memory error.
        #[source]
        source: GuestMemoryError,
    },
}

/// The three cells of a GIC interrupt specifier: `<type number flags>`.
const fn gic_irq(kind: u32, number: u32, flags: u32) -> [u32; 3] {
    [kind, number, flags]
}

/// A 64-bit value as two FDT cells, high first.
const fn cells64(v: u64) -> [u32; 2] {
    [(v >> 32) as u32, v as u32]
}

fn check(cfg: &FdtConfig) -> Result<(), FdtError> {
    let cpus = cfg.mpidrs.len();
    if cpus == 0 {
        return Err(FdtError::NoVcpus);
    }
    if cpus > MAX_VCPUS {
        return Err(FdtError::TooManyVcpus { cpus });
    }
    for (second, mpidr) in cfg.mpidrs.iter().enumerate() {
        let affinity = mpidr & MPIDR_AFFINITY_MASK;
        if let Some(first) = cfg.mpidrs[..second]
            .iter()
            .position(|m| m & MPIDR_AFFINITY_MASK == affinity)
        {
            return Err(FdtError::DuplicateMpidr {
                first,
                second,
                affinity,
            });
        }
    }
    if cfg.gic.redist.1 < gic_redist_size(cpus) {
        return Err(FdtError::RedistTooSmall {
            size: cfg.gic.redist.1,
            cpus,
        });
    }
    if let Some(offset) = cfg.cmdline.bytes().position(|b| b == 0) {
        return Err(FdtError::CmdlineHasNul { offset });
    }
    if cfg.cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(FdtError::CmdlineTooLong {
            len: cfg.cmdline.len(),
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    if let Some(pci) = &cfg.pci {
        if pci.ecam.1 < (u64::from(pci.bus_end) + 1) * PCIE_ECAM_BUS_SIZE {
            return Err(FdtError::EcamTooSmall {
                size: pci.ecam.1,
                bus_end: pci.bus_end,
            });
        }
    }
    Ok(())
}

/// Builds the device tree blob for `cfg`. At most [`FDT_MAX_SIZE`] bytes.
pub fn create_fdt(cfg: &FdtConfig) -> Result<Vec<u8>, FdtError> {
    check(cfg)?;
    let mut fdt = FdtWriter::new()?;
    let root = fdt.begin_node("")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_string("compatible", "linux,dummy-virt")?;
    fdt.property_u32("interrupt-parent", GIC_PHANDLE)?;

    write_cpus(&mut fdt, cfg.mpidrs)?;

    let (ram_start, ram_size) = cfg.ram;
    let memory = fdt.begin_node(&format!("memory@{ram_start:x}"))?;
    fdt.property_string("device_type", "memory")?;
    fdt.property_array_u64("reg", &[ram_start, ram_size])?;
    fdt.end_node(memory)?;

    let serial_path = format!("/uart@{:x}", cfg.serial.base);
    let chosen = fdt.begin_node("chosen")?;
    fdt.property_string("bootargs", cfg.cmdline)?;
    fdt.property_string("stdout-path", &serial_path)?;
    if let Some((start, size)) = cfg.initramfs {
        fdt.property_u64("linux,initrd-start", start)?;
        fdt.property_u64("linux,initrd-end", start + size)?;
    }
    fdt.end_node(chosen)?;

    let psci = fdt.begin_node("psci")?;
    fdt.property_string_list(
        "compatible",
        vec!["arm,psci-1.0".into(), "arm,psci-0.2".into()],
    )?;
    fdt.property_string("method", "hvc")?;
    fdt.end_node(psci)?;

    let timer = fdt.begin_node("timer")?;
    fdt.property_string("compatible", "arm,armv8-timer")?;
    fdt.property_null("always-on")?;
    let timer_irqs: Vec<u32> = [
        TIMER_SECURE_PHYS_PPI,
        TIMER_PHYS_PPI,
        TIMER_VIRT_PPI,
        TIMER_HYP_PPI,
    ]
    .iter()
    .flat_map(|&ppi| gic_irq(GIC_FDT_IRQ_TYPE_PPI, ppi, IRQ_TYPE_LEVEL_HIGH))
    .collect();
    fdt.property_array_u32("interrupts", &timer_irqs)?;
    fdt.end_node(timer)?;

    write_gic(&mut fdt, &cfg.gic)?;

    let serial = fdt.begin_node(&serial_path[1..])?;
    fdt.property_string("compatible", "ns16550a")?;
    fdt.property_array_u64("reg", &[cfg.serial.base, cfg.serial.size])?;
    fdt.property_u32("clock-frequency", SERIAL_CLOCK_HZ)?;
    fdt.property_array_u32(
        "interrupts",
        &gic_irq(GIC_FDT_IRQ_TYPE_SPI, cfg.serial.spi, IRQ_TYPE_EDGE_RISING),
    )?;
    fdt.end_node(serial)?;

    if let Some(pci) = &cfg.pci {
        write_pci(&mut fdt, pci, cfg.gic.its.is_some())?;
    }

    fdt.end_node(root)?;
    let blob = fdt.finish()?;
    if blob.len() as u64 > FDT_MAX_SIZE {
        return Err(FdtError::TooLarge { size: blob.len() });
    }
    Ok(blob)
}

fn write_cpus(fdt: &mut FdtWriter, mpidrs: &[u64]) -> Result<(), FdtError> {
    let cpus = fdt.begin_node("cpus")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 0)?;
    for mpidr in mpidrs {
        let reg = mpidr & MPIDR_AFFINITY_MASK;
        let cpu = fdt.begin_node(&format!("cpu@{reg:x}"))?;
        fdt.property_string("device_type", "cpu")?;
        fdt.property_string("compatible", "arm,arm-v8")?;
        fdt.property_string("enable-method", "psci")?;
        fdt.property_u64("reg", reg)?;
        fdt.end_node(cpu)?;
    }
    fdt.end_node(cpus)?;
    Ok(())
}

fn write_gic(fdt: &mut FdtWriter, gic: &GicRegions) -> Result<(), FdtError> {
    let intc = fdt.begin_node(&format!("intc@{:x}", gic.dist.0))?;
    fdt.property_string("compatible", "arm,gic-v3")?;
    fdt.property_u32("#interrupt-cells", 3)?;
    fdt.property_null("interrupt-controller")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_null("ranges")?;
    fdt.property_array_u64("reg", &[gic.dist.0, gic.dist.1, gic.redist.0, gic.redist.1])?;
    fdt.property_array_u32(
        "interrupts",
        &gic_irq(
            GIC_FDT_IRQ_TYPE_PPI,
            GIC_MAINTENANCE_PPI,
            IRQ_TYPE_LEVEL_HIGH,
        ),
    )?;
    fdt.property_phandle(GIC_PHANDLE)?;
    if let Some((base, size)) = gic.its {
        let its = fdt.begin_node(&format!("its@{base:x}"))?;
        fdt.property_string("compatible", "arm,gic-v3-its")?;
        fdt.property_null("msi-controller")?;
        fdt.property_u32("#msi-cells", 1)?;
        fdt.property_array_u64("reg", &[base, size])?;
        fdt.property_phandle(ITS_PHANDLE)?;
        fdt.end_node(its)?;
    }
    fdt.end_node(intc)?;
    Ok(())
}

/// `interrupt-map` of a host bridge whose INTx SPIs start at `spi_base`: for every slot of
/// bus 0 and pin INTA#..INTD#, `<slot << 11, 0, 0> <pin> <&gic> <0 0> <SPI spi level>`.
fn pci_interrupt_map(spi_base: u32) -> Vec<u32> {
    let mut map = Vec::with_capacity(usize::from(PCI_SLOTS) * PCI_INTX_PINS as usize * 10);
    for slot in 0..PCI_SLOTS {
        for pin in 1..=PCI_INTX_PINS as u8 {
            let Some(spi) = pci_intx_spi(slot, pin) else {
                continue;
            };
            let spi = spi - PCI_INTX_SPI_BASE + spi_base;
            map.extend_from_slice(&[u32::from(slot) << 11, 0, 0, u32::from(pin), GIC_PHANDLE]);
            map.extend_from_slice(&[0, 0]);
            map.extend_from_slice(&gic_irq(GIC_FDT_IRQ_TYPE_SPI, spi, IRQ_TYPE_LEVEL_HIGH));
        }
    }
    map
}

fn write_pci(fdt: &mut FdtWriter, pci: &PciHostBridgeFdt, its: bool) -> Result<(), FdtError> {
    let (ecam_base, ecam_size) = pci.ecam;
    let node = fdt.begin_node(&format!("pcie@{ecam_base:x}"))?;
    fdt.property_string("compatible", "pci-host-ecam-generic")?;
    fdt.property_string("device_type", "pci")?;
    fdt.property_u32("#address-cells", 3)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_u32("#interrupt-cells", 1)?;
    fdt.property_u32("linux,pci-domain", 0)?;
    fdt.property_array_u32("bus-range", &[0, u32::from(pci.bus_end)])?;
    fdt.property_array_u64("reg", &[ecam_base, ecam_size])?;
    fdt.property_null("dma-coherent")?;

    let mut ranges = Vec::with_capacity(14);
    for (space, (base, size)) in [
        (PCI_RANGE_MMIO32, pci.mmio32),
        (PCI_RANGE_MMIO64, pci.mmio64),
    ] {
        if size == 0 {
            continue;
        }
        // <phys.hi phys.mid phys.lo> <cpu address (2 cells)> <size (2 cells)>, identity.
        ranges.push(space);
        ranges.extend_from_slice(&cells64(base));
        ranges.extend_from_slice(&cells64(base));
        ranges.extend_from_slice(&cells64(size));
    }
    fdt.property_array_u32("ranges", &ranges)?;

    if its {
        fdt.property_array_u32("msi-map", &[0, ITS_PHANDLE, 0, MSI_MAP_RIDS])?;
    }
    fdt.property_array_u32("interrupt-map-mask", &[0xf800, 0, 0, 7])?;
    fdt.property_array_u32("interrupt-map", &pci_interrupt_map(pci.intx_spi_base))?;
    fdt.end_node(node)?;
    Ok(())
}

/// Copies the device tree blob `fdt` to guest physical address `addr` (see
/// [`layout::fdt_addr`](super::layout::fdt_addr)).
pub fn write_fdt(mem: &GuestMemoryMmap, addr: u64, fdt: &[u8]) -> Result<(), FdtError> {
    if fdt.len() as u64 > FDT_MAX_SIZE {
        return Err(FdtError::TooLarge { size: fdt.len() });
    }
    if addr % 8 != 0 {
        return Err(FdtError::Misaligned { addr });
    }
    mem.write_slice(fdt, GuestAddress(addr))
        .map_err(|source| FdtError::Write { addr, source })
}

#[cfg(test)]
mod tests {
    use ::fdt::node::FdtNode;
    use ::fdt::Fdt;

    use super::*;
    use crate::aarch64::layout::RAM_START;

    const MIB: u64 = 1 << 20;
    const MMIO64: (u64, u64) = (0x80_0000_0000, 0x80_0000_0000);

    fn cfg(mpidrs: &[u64]) -> FdtConfig<'_> {
        FdtConfig {
            mpidrs,
            ram: (RAM_START, 512 * MIB),
            cmdline: "console=ttyS0 earlycon panic=-1",
            initramfs: Some((0x5000_0000, 0x12_3456)),
            gic: GicRegions::for_cpus(mpidrs.len(), true),
            serial: SerialFdt::BARGE,
            pci: Some(PciHostBridgeFdt::with_mmio64(MMIO64)),
        }
    }

    /// A property's value as big-endian 32-bit cells.
    fn cells(node: FdtNode, name: &str) -> Vec<u32> {
        let prop = node
            .property(name)
            .unwrap_or_else(|| panic!("{} has no {name}", node.name));
        assert_eq!(prop.value.len() % 4, 0, "{name} is not whole cells");
        prop.value
            .chunks(4)
            .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
            .collect()
    }

    /// A property's value as big-endian 64-bit numbers (pairs of cells).
    fn u64s(node: FdtNode, name: &str) -> Vec<u64> {
        cells(node, name)
            .chunks(2)
            .map(|c| (u64::from(c[0]) << 32) | u64::from(c[1]))
            .collect()
    }

    fn string(node: FdtNode, name: &str) -> String {
        node.property(name).unwrap().as_str().unwrap().to_string()
    }

    #[test]
    fn root_cpus_and_memory_are_described() {
        let mpidrs = [0x8000_0000, 0x8000_0001, 0x8000_0100, 0x01_8000_0000];
        let blob = create_fdt(&cfg(&mpidrs)).unwrap();
        let fdt = Fdt::new(&blob).unwrap();
        let root = fdt.find_node("/").unwrap();
        assert_eq!(cells(root, "#address-cells"), [2]);
        assert_eq!(cells(root, "#size-cells"), [2]);
        assert_eq!(string(root, "compatible"), "linux,dummy-virt");
        assert_eq!(cells(root, "interrupt-parent"), [GIC_PHANDLE]);

        let cpus = fdt.find_node("/cpus").unwrap();
        assert_eq!(cells(cpus, "#address-cells"), [2]);
        assert_eq!(cells(cpus, "#size-cells"), [0]);
        let nodes: Vec<FdtNode> = cpus.children().collect();
        assert_eq!(nodes.len(), 4);
        let regs: Vec<u64> = nodes.iter().map(|n| u64s(*n, "reg")[0]).collect();
        assert_eq!(
            regs,
            [0, 1, 0x100, 0x1_0000_0000],
            "the U and MT bits are masked"
        );
        let names: Vec<&str> = nodes.iter().map(|n| n.name).collect();
        assert_eq!(names, ["cpu@0", "cpu@1", "cpu@100", "cpu@100000000"]);
        for n in &nodes {
            assert_eq!(string(*n, "device_type"), "cpu");
            assert_eq!(string(*n, "compatible"), "arm,arm-v8");
            assert_eq!(string(*n, "enable-method"), "psci");
        }

        let memory = fdt.find_node("/memory@40000000").unwrap();
        assert_eq!(string(memory, "device_type"), "memory");
        assert_eq!(u64s(memory, "reg"), [RAM_START, 512 * MIB]);
        let region = fdt.memory().regions().next().unwrap();
        assert_eq!(region.starting_address as u64, RAM_START);
        assert_eq!(region.size, Some(512 * MIB as usize));
    }

    #[test]
    fn chosen_has_bootargs_console_and_initramfs() {
        let blob = create_fdt(&cfg(&[0])).unwrap();
        let fdt = Fdt::new(&blob).unwrap();
        assert_eq!(
            fdt.chosen().bootargs(),
            Some("console=ttyS0 earlycon panic=-1")
        );
        assert_eq!(fdt.chosen().stdout().unwrap().name, "uart@9000000");
        let chosen = fdt.find_node("/chosen").unwrap();
        assert_eq!(u64s(chosen, "linux,initrd-start"), [0x5000_0000]);
        assert_eq!(u64s(chosen, "linux,initrd-end"), [0x5012_3456]);
    }

    #[test]
    fn psci_and_timer_are_described() {
        let blob = create_fdt(&cfg(&[0, 1])).unwrap();
        let fdt = Fdt::new(&blob).unwrap();
        let psci = fdt.find_node("/psci").unwrap();
        let compatible: Vec<&str> = psci.compatible().unwrap().all().collect();
        assert_eq!(compatible, ["arm,psci-1.0", "arm,psci-0.2"]);
        assert_eq!(string(psci, "method"), "hvc");

        let timer = fdt.find_node("/timer").unwrap();
        assert_eq!(string(timer, "compatible"), "arm,armv8-timer");
        assert!(timer.property("always-on").is_some());
        assert_eq!(
            cells(timer, "interrupts"),
            [1, 13, 4, 1, 14, 4, 1, 11, 4, 1, 10, 4]
        );
    }

    #[test]
    fn gic_and_its_regions_and_phandles() {
        let blob = create_fdt(&cfg(&[0, 1, 2])).unwrap();
        let fdt = Fdt::new(&blob).unwrap();
        let gic = fdt.find_node("/intc@8000000").unwrap();
        assert_eq!(string(gic, "compatible"), "arm,gic-v3");
        assert!(gic.property("interrupt-controller").is_some());
        assert!(gic.property("ranges").is_some());
        assert_eq!(cells(gic, "#interrupt-cells"), [3]);
        assert_eq!(cells(gic, "#address-cells"), [2]);
        assert_eq!(cells(gic, "#size-cells"), [2]);
        assert_eq!(
            u64s(gic, "reg"),
            [0x0800_0000, 0x1_0000, 0x080a_0000, 3 * 0x2_0000]
        );
        assert_eq!(cells(gic, "interrupts"), [1, 9, 4]);
        assert_eq!(fdt.find_phandle(GIC_PHANDLE).unwrap().name, "intc@8000000");
        // The root's interrupt-parent, which every device node inherits, is the GIC.
        let root = fdt.find_node("/").unwrap();
        assert_eq!(root.interrupt_parent().unwrap().name, "intc@8000000");
        let uart = fdt.find_node("/uart@9000000").unwrap();
        assert!(uart.property("interrupt-parent").is_none());

        let its = fdt.find_node("/intc@8000000/its@8080000").unwrap();
        assert_eq!(string(its, "compatible"), "arm,gic-v3-its");
        assert!(its.property("msi-controller").is_some());
        assert_eq!(cells(its, "#msi-cells"), [1]);
        assert_eq!(u64s(its, "reg"), [0x0808_0000, 0x2_0000]);
        assert_eq!(fdt.find_phandle(ITS_PHANDLE).unwrap().name, "its@8080000");
    }

    #[test]
    fn uart_is_a_byte_wide_ns16550a_on_spi_1() {
        let blob = create_fdt(&cfg(&[0])).unwrap();
        let fdt = Fdt::new(&blob).unwrap();
        let uart = fdt.find_node("/uart@9000000").unwrap();
        assert_eq!(string(uart, "compatible"), "ns16550a");
        assert_eq!(u64s(uart, "reg"), [0x0900_0000, 0x1000]);
        assert_eq!(cells(uart, "clock-frequency"), [1_843_200]);
        // SPI 1, rising edge: the irqfd pulses it.
        assert_eq!(cells(uart, "interrupts"), [0, 1, 1]);
        assert!(uart.property("reg-shift").is_none());
        assert!(uart.property("reg-io-width").is_none());
    }

    #[test]
    fn pcie_host_bridge_windows_msi_map_and_ecam() {
        let blob = create_fdt(&cfg(&[0])).unwrap();
        let fdt = Fdt::new(&blob).unwrap();
        let pci = fdt.find_node("/pcie@30000000").unwrap();
        assert_eq!(string(pci, "compatible"), "pci-host-ecam-generic");
        assert_eq!(string(pci, "device_type"), "pci");
        assert_eq!(cells(pci, "#address-cells"), [3]);
        assert_eq!(cells(pci, "#size-cells"), [2]);
        assert_eq!(cells(pci, "#interrupt-cells"), [1]);
        assert_eq!(cells(pci, "bus-range"), [0, 0]);
        assert_eq!(u64s(pci, "reg"), [0x3000_0000, MIB]);
        assert!(pci.property("dma-coherent").is_some());
        #[rustfmt::skip]
        let ranges = [
            0x0200_0000, 0, 0x1000_0000, 0, 0x1000_0000, 0, 0x2000_0000,
            0x0300_0000, 0x80, 0, 0x80, 0, 0x80, 0,
        ];
        assert_eq!(cells(pci, "ranges"), ranges);
        let msi_map = cells(pci, "msi-map");
        assert_eq!(msi_map, [0, ITS_PHANDLE, 0, 0x1_0000]);
        assert_eq!(fdt.find_phandle(msi_map[1]).unwrap().name, "its@8080000");
    }

    #[test]
    fn pcie_interrupt_map_sends_every_slot_to_spis_4_to_7() {
        let blob = create_fdt(&cfg(&[0])).unwrap();
        let fdt = Fdt::new(&blob).unwrap();
        let pci = fdt.find_node("/pcie@30000000").unwrap();
        assert_eq!(cells(pci, "interrupt-map-mask"), [0xf800, 0, 0, 7]);
        let map = cells(pci, "interrupt-map");
        let entries: Vec<&[u32]> = map.chunks(10).collect();
        assert_eq!(entries.len(), 32 * 4);
        assert!(entries.iter().all(|e| e.len() == 10));
        let find = |slot: u32, pin: u32| {
            entries
                .iter()
                .find(|e| e[0] == slot << 11 && e[3] == pin)
                .copied()
                .unwrap()
        };
        // Slot 0: INTA#..INTD# -> SPIs 4..7.
        assert_eq!(find(0, 1), [0, 0, 0, 1, GIC_PHANDLE, 0, 0, 0, 4, 4]);
        assert_eq!(find(0, 4), [0, 0, 0, 4, GIC_PHANDLE, 0, 0, 0, 7, 4]);
        // Slot 3: the same lines (no swizzle: the vmm wires INTx by pin alone).
        assert_eq!(find(3, 1), [3 << 11, 0, 0, 1, GIC_PHANDLE, 0, 0, 0, 4, 4]);
        assert_eq!(find(3, 2), [3 << 11, 0, 0, 2, GIC_PHANDLE, 0, 0, 0, 5, 4]);
        // The map agrees with layout::pci_intx_spi for every slot and pin.
        for e in &entries {
            let spi = pci_intx_spi((e[0] >> 11) as u8, e[3] as u8).unwrap();
            assert_eq!(e[8], spi);
            assert_eq!(e[1..3], [0, 0]);
            assert_eq!(e[5..8], [0, 0, 0]);
        }
    }

    #[test]
    fn without_pci_its_or_initramfs_the_nodes_and_properties_are_left_out() {
        let mut c = cfg(&[0]);
        c.pci = None;
        c.gic.its = None;
        c.initramfs = None;
        let blob = create_fdt(&c).unwrap();
        let fdt = Fdt::new(&blob).unwrap();
        assert!(fdt.find_node("/pcie@30000000").is_none());
        assert!(fdt.find_node("/intc@8000000/its@8080000").is_none());
        assert!(fdt.find_phandle(ITS_PHANDLE).is_none());
        let chosen = fdt.find_node("/chosen").unwrap();
        assert!(chosen.property("linux,initrd-start").is_none());
        assert!(chosen.property("linux,initrd-end").is_none());
        assert!(fdt.find_node("/intc@8000000").is_some());

        // PCI without an ITS: no msi-map, INTx only; no MMIO64 window of size 0.
        let mut c = cfg(&[0]);
        c.gic.its = None;
        c.pci = Some(PciHostBridgeFdt::with_mmio64((0, 0)));
        let blob = create_fdt(&c).unwrap();
        let fdt = Fdt::new(&blob).unwrap();
        let pci = fdt.find_node("/pcie@30000000").unwrap();
        assert!(pci.property("msi-map").is_none());
        assert!(pci.property("interrupt-map").is_some());
        assert_eq!(
            cells(pci, "ranges"),
            [0x0200_0000, 0, 0x1000_0000, 0, 0x1000_0000, 0, 0x2000_0000]
        );
    }

    #[test]
    fn bad_configurations_are_errors_that_say_what_to_do() {
        let err = create_fdt(&cfg(&[])).unwrap_err();
        assert!(matches!(err, FdtError::NoVcpus));
        let many: Vec<u64> = (0..124).collect();
        let err = create_fdt(&cfg(&many)).unwrap_err();
        assert!(matches!(err, FdtError::TooManyVcpus { cpus: 124 }));
        assert!(err.to_string().contains("use 1 to 123 vCPUs"), "{err}");
        let most: Vec<u64> = (0..123).collect();
        assert!(create_fdt(&cfg(&most)).is_ok());

        let err = create_fdt(&cfg(&[0, 0x8000_0000])).unwrap_err();
        assert!(matches!(
            err,
            FdtError::DuplicateMpidr {
                first: 0,
                second: 1,
                affinity: 0
            }
        ));

        let mpidrs = [0, 1];
        let mut c = cfg(&mpidrs);
        c.gic = GicRegions::for_cpus(1, true);
        assert!(matches!(
            create_fdt(&c),
            Err(FdtError::RedistTooSmall { cpus: 2, .. })
        ));

        let mut c = cfg(&[0]);
        c.cmdline = "a\0b";
        assert!(matches!(
            create_fdt(&c),
            Err(FdtError::CmdlineHasNul { offset: 1 })
        ));
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        c.cmdline = &long;
        assert!(matches!(
            create_fdt(&c),
            Err(FdtError::CmdlineTooLong {
                len: 2048,
                max: 2047
            })
        ));
        c.cmdline = &long[1..];
        assert!(create_fdt(&c).is_ok());

        let mut c = cfg(&[0]);
        let mut pci = PciHostBridgeFdt::with_mmio64(MMIO64);
        pci.bus_end = 1;
        c.pci = Some(pci);
        let err = create_fdt(&c).unwrap_err();
        assert!(matches!(err, FdtError::EcamTooSmall { bus_end: 1, .. }));
        assert!(err.to_string().contains("give it 0x200000 bytes"), "{err}");
    }

    #[test]
    fn fdt_for_max_vcpus_fits_the_boot_protocol_limit() {
        let mpidrs: Vec<u64> = (0..MAX_VCPUS as u64)
            .map(|i| ((i / 16) << 8) | (i % 16))
            .collect();
        let blob = create_fdt(&cfg(&mpidrs)).unwrap();
        assert!(blob.len() as u64 <= FDT_MAX_SIZE);
        let fdt = Fdt::new(&blob).unwrap();
        assert_eq!(fdt.cpus().count(), MAX_VCPUS);
        assert_eq!(fdt.total_size(), blob.len());
    }

    #[test]
    fn write_fdt_copies_the_blob_into_guest_memory() {
        let ram_end = RAM_START + 64 * MIB;
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(RAM_START), 64 * MIB as usize)]).unwrap();
        let blob = create_fdt(&cfg(&[0])).unwrap();
        let addr = crate::aarch64::layout::fdt_addr(ram_end).unwrap();
        write_fdt(&mem, addr, &blob).unwrap();
        let mut back = vec![0u8; blob.len()];
        mem.read_slice(&mut back, GuestAddress(addr)).unwrap();
        assert_eq!(back, blob);
        assert_eq!(&back[..4], &[0xd0, 0x0d, 0xfe, 0xed], "FDT magic");

        assert!(matches!(
            write_fdt(&mem, addr + 4, &blob),
            Err(FdtError::Misaligned { .. })
        ));
        assert!(matches!(
            write_fdt(&mem, ram_end - 8, &blob),
            Err(FdtError::Write { .. })
        ));
        let huge = vec![0u8; FDT_MAX_SIZE as usize + 1];
        assert!(matches!(
            write_fdt(&mem, addr, &huge),
            Err(FdtError::TooLarge { .. })
        ));
    }
}
