//! The ACPI sleep/reset register and the i8042 reset line.
//!
//! Selector bit 0: 0 = ACPI sleep control, 1 = i8042. Selector bit 3:
//! offset raw instead of reduced to the block (8 bytes). Checks that only
//! the documented writes ask for a power event.
#![no_main]

use barge_fuzz::accesses;
use devices::acpi::{s5_write_value, AcpiSleepControl};
use devices::i8042::{I8042, CMD_PULSE_RESET, COMMAND_OFFSET};
use devices::PowerEvent;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let mut acpi = AcpiSleepControl::new();
    let mut i8042 = I8042::new();
    for access in accesses(input) {
        let offset = if access.selector & 8 == 8 {
            u64::from(access.offset)
        } else {
            u64::from(access.offset % 8)
        };
        match (access.selector & 1, access.write) {
            (0, None) => acpi.read(offset, &mut vec![0; access.width]),
            (0, Some(data)) => {
                if let Some(event) = acpi.write(offset, &data) {
                    assert_eq!(offset, 0, "power event from a write at {offset:#x}");
                    assert_eq!(data.len(), 1, "power event from a {}-byte write", data.len());
                    if event == PowerEvent::PowerOff {
                        assert_eq!(data[0] & s5_write_value(), s5_write_value());
                    }
                }
            }
            (_, None) => i8042.read(offset, &mut vec![0; access.width]),
            (_, Some(data)) => {
                if let Some(event) = i8042.write(offset, &data) {
                    assert_eq!(event, PowerEvent::Reset);
                    assert_eq!((offset, data.as_slice()), (COMMAND_OFFSET, &[CMD_PULSE_RESET][..]));
                }
            }
        }
    }
});
