//! vCPU exit dispatch as `barge run` sets it up: COM1, the ACPI sleep
//! register, the i8042 and the PCI segment (config ports and ECAM, host
//! bridge and an emulated endpoint) on the buses, driven through
//! `vmm::machine::exit::handle_exit` with port and MMIO exits of any length.
//!
//! Selector: 0-5 port I/O at one of the devices' bases + (offset & 0xf)
//! (base = PORTS[(offset >> 8) % len]), 6-7 port I/O at the raw 16-bit
//! port, 8-11 MMIO in the ECAM window, 12 MMIO at a raw 32-bit address,
//! 13 MMIO at the raw offset shifted to the top of the address space,
//! 14-15 other exits (HLT, shutdown, system events of kind `offset`).
#![no_main]

use std::io;
use std::sync::{Arc, Mutex};

use arch::layout::{
    ACPI_SLEEP_CONTROL_PORT, COM1_PORT, COM1_PORT_COUNT, I8042_DATA_PORT, PCIE_ECAM_START,
    PCI_CONFIG_PORT,
};
use barge_fuzz::accesses;
use devices::pci::bar::{BarKind, EmulatedBars, PlannedBar};
use devices::pci::config::ConfigSpace;
use devices::pci::segment::PciSegment;
use devices::pci::EmulatedEndpoint;
use libfuzzer_sys::fuzz_target;
use vmm::buses::bus::Buses;
use vmm::machine::exit::{handle_exit, VmExit};
use vmm::buses::pci::{attach_segment, ECAM_DECODED_SIZE};
use vmm::buses::power::{AcpiSleepBusDevice, I8042BusDevice, PowerSignal};
use vmm::buses::serial::{IrqFdTrigger, SerialDevice};

const PORTS: [u16; 6] = [
    COM1_PORT,
    ACPI_SLEEP_CONTROL_PORT,
    I8042_DATA_PORT,
    PCI_CONFIG_PORT,
    0x70,
    0x80,
];

fn buses(power: &PowerSignal) -> Buses {
    let mut buses = Buses::default();
    let serial = SerialDevice::new(IrqFdTrigger::new().expect("eventfd"), Box::new(io::sink()));
    buses
        .pio
        .insert(
            u64::from(COM1_PORT),
            u64::from(COM1_PORT_COUNT),
            "com1",
            Arc::new(Mutex::new(serial)),
        )
        .expect("com1");
    buses
        .pio
        .insert(
            u64::from(ACPI_SLEEP_CONTROL_PORT),
            devices::acpi::REGISTER_SIZE,
            "acpi-sleep",
            Arc::new(Mutex::new(AcpiSleepBusDevice::new(power.clone()))),
        )
        .expect("acpi");
    buses
        .pio
        .insert(
            u64::from(I8042_DATA_PORT),
            devices::i8042::REGISTER_SPAN,
            "i8042",
            Arc::new(Mutex::new(I8042BusDevice::new(power.clone()))),
        )
        .expect("i8042");
    let mut segment = PciSegment::with_host_bridge();
    let config = ConfigSpace::type0(&devices::shmem::SHMEM_IDENTITY);
    let bars = EmulatedBars::new(&[PlannedBar {
        index: 2,
        kind: BarKind::Memory64 { prefetchable: true },
        size: 1 << 30,
        gpa: 1 << 36,
    }])
    .expect("BAR layout");
    segment
        .add_device(Box::new(EmulatedEndpoint::new(config, bars)))
        .expect("endpoint");
    attach_segment(&mut buses, &Arc::new(Mutex::new(segment))).expect("segment");
    buses
}

fuzz_target!(|input: &[u8]| {
    let power = PowerSignal::new().expect("eventfd");
    let buses = buses(&power);
    for access in accesses(input) {
        let port = match access.selector {
            0..=5 => {
                let base = PORTS[(access.offset >> 8) as usize % PORTS.len()];
                Some(base.wrapping_add((access.offset & 0xf) as u16))
            }
            6 | 7 => Some(access.offset as u16),
            _ => None,
        };
        let addr = match access.selector {
            8..=11 => Some(PCIE_ECAM_START + u64::from(access.offset) % (ECAM_DECODED_SIZE + 0x1000)),
            12 => Some(u64::from(access.offset)),
            13 => Some(u64::MAX - u64::from(access.offset)),
            _ => None,
        };
        let exit = match (port, addr, &access.write) {
            (Some(port), _, None) => VmExit::IoIn {
                port,
                len: access.width,
            },
            (Some(port), _, Some(data)) => VmExit::IoOut { port, data },
            (None, Some(addr), None) => VmExit::MmioRead {
                addr,
                len: access.width,
            },
            (None, Some(addr), Some(data)) => VmExit::MmioWrite { addr, data },
            (None, None, _) => match access.offset % 4 {
                0 => VmExit::Hlt,
                1 => VmExit::Shutdown,
                2 => VmExit::InternalError,
                _ => VmExit::SystemEvent {
                    kind: access.offset >> 2,
                },
            },
        };
        let outcome = handle_exit(&exit, &buses, &power);
        if let VmExit::IoIn { len, .. } | VmExit::MmioRead { len, .. } = exit {
            assert_eq!(outcome.read_data.len(), len);
        }
    }
});
