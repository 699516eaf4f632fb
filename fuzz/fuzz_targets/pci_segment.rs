//! PCI configuration space as the guest reaches it: the 0xCF8..0xCFF port
//! pair and bus 0's ECAM window, over a segment with the host bridge, an
//! emulated endpoint with a 64-bit BAR, and the shared memory device.
//!
//! Selector bit 0: 0 = config ports, 1 = ECAM. Selector bit 3: offset taken
//! raw (out of range included) instead of reduced into the window.
#![no_main]

use barge_fuzz::accesses;
use devices::pci::bar::{BarKind, EmulatedBars, PlannedBar};
use devices::pci::config::{ConfigSpace, Type0Identity};
use devices::pci::segment::PciSegment;
use devices::pci::EmulatedEndpoint;
use devices::shmem::ShmemDevice;
use libfuzzer_sys::fuzz_target;

/// Bus 0's ECAM: 32 devices x 8 functions x 4 KiB.
const ECAM_SIZE: u64 = 1 << 20;

fn segment() -> PciSegment {
    let mut segment = PciSegment::with_host_bridge();
    let config = ConfigSpace::type0(&Type0Identity {
        vendor_id: 0x1af4,
        device_id: 0x1110,
        class_code: 0x05_00_00,
        revision_id: 1,
        subsystem_vendor_id: 0x1af4,
        subsystem_id: 0x1100,
    });
    let bars = EmulatedBars::new(&[
        PlannedBar {
            index: 0,
            kind: BarKind::Memory32 {
                prefetchable: false,
            },
            size: 4096,
            gpa: 0xc000_0000,
        },
        PlannedBar {
            index: 2,
            kind: BarKind::Memory64 { prefetchable: true },
            size: 1 << 30,
            gpa: 1 << 36,
        },
        PlannedBar {
            index: 4,
            kind: BarKind::Io,
            size: 0x20,
            gpa: 0xc000,
        },
    ])
    .expect("valid BAR layout");
    segment
        .add_device(Box::new(EmulatedEndpoint::new(config, bars)))
        .expect("room on bus 0");
    let shmem = ShmemDevice::new(0xc000_1000, 1 << 37, 1 << 30).expect("valid shmem plan");
    segment.add_device(Box::new(shmem)).expect("room on bus 0");
    segment
}

fuzz_target!(|input: &[u8]| {
    let mut segment = segment();
    for access in accesses(input) {
        let ecam = access.selector & 1 == 1;
        let raw = access.selector & 8 == 8;
        let offset = u64::from(access.offset);
        let offset = match (ecam, raw) {
            (_, true) => offset,
            (false, false) => offset % 8,
            (true, false) => offset % (ECAM_SIZE + 0x1000),
        };
        match (ecam, access.write) {
            (false, None) => segment.pio_read(offset, &mut vec![0; access.width]),
            (false, Some(data)) => {
                segment.pio_write(offset, &data);
            }
            (true, None) => segment.ecam_read(offset, &mut vec![0; access.width]),
            (true, Some(data)) => {
                segment.ecam_write(offset, &data);
            }
        }
    }
});
