//! PCI in the VM: bus 0 of segment 0 (the host bridge at 00:00.0 plus the
//! devices the configuration asks for) on the port bus (0xCF8..0xCFF) and the
//! MMIO bus (ECAM, bus 0's 1 MiB at `arch::layout::PCIE_ECAM_START`), the
//! host's physical address bits that size the MMIO64 window, and the ACPI
//! description of the host bridge (MCFG + `\_SB_.PCI0`).
//!
//! Configuration writes that move a BAR or toggle decode are only logged:
//! the memslots of every BAR were created once, at the planned addresses,
//! and nothing here touches them (see `devices::pci` and `bar_mapping`).

use std::sync::{Arc, Mutex};

use arch::layout::{PCIE_ECAM_BUSES, PCIE_ECAM_BUS_SIZE, PCIE_ECAM_START};
#[cfg(target_arch = "x86_64")]
use arch::layout::{PCI_CONFIG_PORT, PCI_CONFIG_PORT_COUNT};
use devices::pci::segment::SegmentEvent;
use devices::pci::{ConfigEvent, PciSegment};
#[cfg(target_arch = "x86_64")]
use kvm_bindings::kvm_cpuid_entry2;
#[cfg(target_arch = "x86_64")]
use resources::placement::{Windows, MAX_PHYS_BITS};

use crate::buses::bus::{BusDevice, BusError, Buses};

#[cfg(target_arch = "x86_64")]
/// Physical address bits assumed when KVM's CPUID has no leaf 0x8000_0008:
/// 36, what every x86-64 CPU supports (PAE's limit).
pub const FALLBACK_PHYS_BITS: u8 = 36;
#[cfg(target_arch = "x86_64")]
/// Fewest physical address bits barge believes: anything lower is a broken
/// CPUID (x86-64 has at least 36).
pub const MIN_BELIEVED_PHYS_BITS: u8 = 36;
#[cfg(target_arch = "x86_64")]
/// The CPUID leaf with the address sizes.
const CPUID_ADDRESS_SIZES: u32 = 0x8000_0008;

#[cfg(target_arch = "x86_64")]
/// The guest's physical address bits: CPUID 0x8000_0008 EAX bits 7:0 as KVM
/// reports it in KVM_GET_SUPPORTED_CPUID (the guest gets that CPUID
/// unchanged, so guest and barge agree on where the MMIO64 window ends).
/// Clamped to [`MIN_BELIEVED_PHYS_BITS`]..=`MAX_PHYS_BITS` (52); without the
/// leaf, [`FALLBACK_PHYS_BITS`].
pub fn phys_bits_from_cpuid(entries: &[kvm_cpuid_entry2]) -> u8 {
    entries
        .iter()
        .find(|e| e.function == CPUID_ADDRESS_SIZES && e.index == 0)
        .map(|e| (e.eax & 0xff) as u8)
        .filter(|bits| *bits != 0)
        .map_or(FALLBACK_PHYS_BITS, |bits| {
            bits.clamp(MIN_BELIEVED_PHYS_BITS, MAX_PHYS_BITS)
        })
}

/// Bytes of ECAM barge decodes: bus 0 only.
pub const ECAM_DECODED_SIZE: u64 = PCIE_ECAM_BUSES as u64 * PCIE_ECAM_BUS_SIZE;

#[cfg(target_arch = "x86_64")]
/// The ACPI view of the host bridge for `windows`.
pub fn host_bridge_acpi(windows: &Windows) -> arch::PciHostBridgeAcpi {
    arch::PciHostBridgeAcpi {
        ecam_base: PCIE_ECAM_START,
        end_bus: PCIE_ECAM_BUSES - 1,
        mmio32: (windows.mmio32.start, windows.mmio32.end),
        mmio64: (windows.mmio64.start, windows.mmio64.end),
    }
}

#[cfg(target_arch = "x86_64")]
/// The host bridge's DSDT AML and the MCFG table, ready for `arch::AcpiExtras`.
pub fn acpi_content(windows: &Windows) -> (Vec<u8>, Vec<Vec<u8>>) {
    let bridge = host_bridge_acpi(windows);
    (
        arch::pci_host_bridge_aml(&bridge),
        vec![arch::mcfg(bridge.ecam_base, bridge.end_bus)],
    )
}

/// A segment shared by its two bus adapters.
pub type SharedSegment = Arc<Mutex<PciSegment>>;

fn lock(segment: &SharedSegment) -> std::sync::MutexGuard<'_, PciSegment> {
    segment.lock().unwrap_or_else(|p| p.into_inner())
}

/// Logs what a guest configuration write changed. Nothing is remapped.
pub fn log_event(event: SegmentEvent) {
    let device = event.device;
    match event.event {
        ConfigEvent::Bar(write) if write.sizing || write.matches_plan => log::debug!(
            "00:{device:02x}.0: BAR {} write {:#x} (sizing: {})",
            write.index,
            write.address,
            write.sizing
        ),
        ConfigEvent::Bar(write) => devices::guest_warn!(
            "00:{device:02x}.0: the guest moved BAR {} to {:#x}, away from where barge placed it; \
             barge keeps the BAR's memory at the planned address, so the guest reaches nothing at \
             the new one",
            write.index,
            write.address
        ),
        ConfigEvent::Command(change) => log::debug!(
            "00:{device:02x}.0: command {:#06x} -> {:#06x} (memory decode {:?}); memslots unchanged",
            change.old,
            change.new,
            change.memory_toggled()
        ),
    }
}

#[cfg(target_arch = "x86_64")]
/// The configuration ports 0xCF8..0xCFF on the port bus.
pub struct PciConfigPorts(pub SharedSegment);

#[cfg(target_arch = "x86_64")]
impl BusDevice for PciConfigPorts {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        lock(&self.0).pio_read(offset, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let Some(event) = lock(&self.0).pio_write(offset, data) {
            log_event(event);
        }
    }
}

/// The ECAM window on the MMIO bus.
pub struct PciEcam(pub SharedSegment);

impl BusDevice for PciEcam {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        lock(&self.0).ecam_read(offset, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let Some(event) = lock(&self.0).ecam_write(offset, data) {
            log_event(event);
        }
    }
}

/// Puts `segment` on the buses: its configuration ports on the port bus
/// (x86_64 only: aarch64 has no port I/O), bus 0's ECAM on the MMIO bus.
pub fn attach_segment(buses: &mut Buses, segment: &SharedSegment) -> Result<(), BusError> {
    #[cfg(target_arch = "x86_64")]
    buses.pio.insert(
        u64::from(PCI_CONFIG_PORT),
        u64::from(PCI_CONFIG_PORT_COUNT),
        "pci-config",
        Arc::new(Mutex::new(PciConfigPorts(segment.clone()))),
    )?;
    buses.mmio.insert(
        PCIE_ECAM_START,
        ECAM_DECODED_SIZE,
        "pci-ecam",
        Arc::new(Mutex::new(PciEcam(segment.clone()))),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buses::power::PowerSignal;
    use crate::machine::exit::{handle_exit, VmExit};

    fn cpuid_entry(function: u32, eax: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            eax,
            ..Default::default()
        }
    }

    #[test]
    fn phys_bits_come_from_leaf_0x80000008_clamped() {
        let leaf = |eax| [cpuid_entry(0, 0xd), cpuid_entry(0x8000_0008, eax)];
        assert_eq!(phys_bits_from_cpuid(&leaf(0x3030)), 48);
        assert_eq!(phys_bits_from_cpuid(&leaf(0x302e)), 46);
        assert_eq!(
            phys_bits_from_cpuid(&leaf(0x3020)),
            36,
            "32 is not believed"
        );
        assert_eq!(phys_bits_from_cpuid(&leaf(0x3040)), 52, "64 is clamped");
        assert_eq!(phys_bits_from_cpuid(&leaf(0)), FALLBACK_PHYS_BITS);
        assert_eq!(
            phys_bits_from_cpuid(&[cpuid_entry(0, 0xd)]),
            FALLBACK_PHYS_BITS
        );
    }

    fn buses() -> Buses {
        let mut buses = Buses::default();
        let segment = Arc::new(Mutex::new(PciSegment::with_host_bridge()));
        attach_segment(&mut buses, &segment).unwrap();
        buses
    }

    fn port_in(buses: &Buses, port: u16, len: usize) -> Vec<u8> {
        handle_exit(
            &VmExit::IoIn { port, len },
            buses,
            &PowerSignal::new().unwrap(),
        )
        .read_data
    }

    fn port_out(buses: &Buses, port: u16, data: &[u8]) {
        handle_exit(
            &VmExit::IoOut { port, data },
            buses,
            &PowerSignal::new().unwrap(),
        );
    }

    #[test]
    fn host_bridge_answers_through_cf8_and_cfc_via_the_exit_handler() {
        let buses = buses();
        // CONFIG_ADDRESS = enable | bus 0 | device 0 | function 0 | register 0.
        port_out(&buses, 0xcf8, &0x8000_0000u32.to_le_bytes());
        assert_eq!(port_in(&buses, 0xcf8, 4), 0x8000_0000u32.to_le_bytes());
        let id = port_in(&buses, 0xcfc, 4);
        assert_eq!(u32::from_le_bytes(id.try_into().unwrap()), 0x0d57_8086);
        // Class code via a word read at 0xcfe of register 8.
        port_out(&buses, 0xcf8, &0x8000_0008u32.to_le_bytes());
        assert_eq!(port_in(&buses, 0xcfe, 2), 0x0600u16.to_le_bytes());
        // Device 1 is absent: all-ones.
        port_out(&buses, 0xcf8, &0x8000_0800u32.to_le_bytes());
        assert_eq!(port_in(&buses, 0xcfc, 4), [0xff; 4]);
    }

    #[test]
    fn host_bridge_answers_through_ecam_via_the_exit_handler() {
        let buses = buses();
        let read = |addr: u64, len: usize| {
            handle_exit(
                &VmExit::MmioRead { addr, len },
                &buses,
                &PowerSignal::new().unwrap(),
            )
            .read_data
        };
        assert_eq!(
            u32::from_le_bytes(read(PCIE_ECAM_START, 4).try_into().unwrap()),
            0x0d57_8086
        );
        // Device 1 function 0 (offset 1 << 15): nothing there.
        assert_eq!(read(PCIE_ECAM_START + (1 << 15), 4), [0xff; 4]);
        // Beyond bus 0 nothing is decoded: unclaimed, all-ones.
        assert_eq!(read(PCIE_ECAM_START + ECAM_DECODED_SIZE, 4), [0xff; 4]);
        handle_exit(
            &VmExit::MmioWrite {
                addr: PCIE_ECAM_START + 4,
                data: &[0xff, 0xff],
            },
            &buses,
            &PowerSignal::new().unwrap(),
        );
        assert_eq!(read(PCIE_ECAM_START + 4, 2), [0, 0], "read-only bridge");
    }

    #[test]
    fn acpi_content_covers_both_windows() {
        let ram = resources::ram_regions(512 << 20).unwrap();
        let windows = Windows::new(&ram, 40).unwrap();
        let bridge = host_bridge_acpi(&windows);
        assert_eq!(bridge.mmio64, (1 << 32, 1 << 40));
        assert_eq!(bridge.mmio32, (0xc000_0000, 0xe000_0000));
        let (aml, tables) = acpi_content(&windows);
        assert!(aml.windows(4).any(|w| w == b"PCI0"));
        assert_eq!(&tables[0][..4], b"MCFG");
    }
}
