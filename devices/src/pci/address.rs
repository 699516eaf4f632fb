//! Decoding of PCI configuration addresses: the legacy CONFIG_ADDRESS
//! register at port 0xCF8 and offsets inside an ECAM window.
//!
//! CONFIG_ADDRESS (configuration mechanism #1):
//!
//! | bits  | field                                   |
//! |-------|-----------------------------------------|
//! | 31    | enable: the next 0xCFC access is config |
//! | 30:24 | reserved (AMD uses 27:24 for extended registers; not supported, ignored) |
//! | 23:16 | bus                                     |
//! | 15:11 | device                                  |
//! | 10:8  | function                                |
//! | 7:2   | dword register number                   |
//! | 1:0   | always 0                                |
//!
//! ECAM (PCI Express enhanced configuration access): each function has
//! 4 KiB at `bus << 20 | device << 15 | function << 12`, so the register
//! offset is the low 12 bits and a window for 256 buses is 256 MiB.

use std::fmt;

/// CONFIG_ADDRESS enable bit.
pub const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
/// Bits of CONFIG_ADDRESS that hold state: enable, bus, device, function,
/// register. Reserved bits and bits 1:0 read back as 0.
pub const CONFIG_ADDRESS_MASK: u32 = CONFIG_ADDRESS_ENABLE | 0x00ff_fffc;
/// Size of the ECAM window for all 256 buses.
pub const ECAM_SIZE_ALL_BUSES: u64 = 256 << 20;
/// Size of the ECAM area of one bus (32 devices x 8 functions x 4 KiB).
pub const ECAM_BUS_SIZE: u64 = 1 << 20;
/// Number of devices on a bus.
pub const DEVICES_PER_BUS: u8 = 32;
/// Number of functions of a device.
pub const FUNCTIONS_PER_DEVICE: u8 = 8;

/// One register of one function's configuration space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciConfigAddress {
    /// Bus number.
    pub bus: u8,
    /// Device number, 0..=31.
    pub device: u8,
    /// Function number, 0..=7.
    pub function: u8,
    /// Byte offset inside the function's configuration space: 0..=0xFC
    /// (dword aligned) through CONFIG_ADDRESS, 0..=0xFFF through ECAM.
    pub offset: u16,
}

impl PciConfigAddress {
    /// The address of `offset` in bus 0, `device`, function 0.
    pub fn bus0(device: u8, offset: u16) -> Self {
        Self {
            bus: 0,
            device,
            function: 0,
            offset,
        }
    }
}

impl fmt::Display for PciConfigAddress {
    /// `BB:DD.F+0xOFF`, the BDF as lspci prints it plus the register.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02x}:{:02x}.{:x}+{:#05x}",
            self.bus, self.device, self.function, self.offset
        )
    }
}

/// Decodes a CONFIG_ADDRESS value. `None` when the enable bit is clear
/// (accesses to 0xCFC are then not configuration accesses). Reserved bits
/// 30:24 and bits 1:0 are ignored.
pub fn decode_config_address(value: u32) -> Option<PciConfigAddress> {
    if value & CONFIG_ADDRESS_ENABLE == 0 {
        return None;
    }
    Some(PciConfigAddress {
        bus: ((value >> 16) & 0xff) as u8,
        device: ((value >> 11) & 0x1f) as u8,
        function: ((value >> 8) & 0x7) as u8,
        offset: (value & 0xfc) as u16,
    })
}

/// The CONFIG_ADDRESS value (enable bit set) that selects `address`'s dword.
/// Device, function and offset bits beyond their fields are dropped.
pub fn encode_config_address(address: PciConfigAddress) -> u32 {
    CONFIG_ADDRESS_ENABLE
        | (u32::from(address.bus) << 16)
        | (u32::from(address.device & 0x1f) << 11)
        | (u32::from(address.function & 0x7) << 8)
        | (u32::from(address.offset) & 0xfc)
}

/// Decodes an offset inside an ECAM window that starts at bus 0. `None`
/// when the offset lies beyond the 256 MiB of 256 buses.
pub fn decode_ecam_offset(offset: u64) -> Option<PciConfigAddress> {
    if offset >= ECAM_SIZE_ALL_BUSES {
        return None;
    }
    Some(PciConfigAddress {
        bus: ((offset >> 20) & 0xff) as u8,
        device: ((offset >> 15) & 0x1f) as u8,
        function: ((offset >> 12) & 0x7) as u8,
        offset: (offset & 0xfff) as u16,
    })
}

/// The ECAM offset of `address`. Device, function and offset bits beyond
/// their fields are dropped.
pub fn ecam_offset(address: PciConfigAddress) -> u64 {
    (u64::from(address.bus) << 20)
        | (u64::from(address.device & 0x1f) << 15)
        | (u64::from(address.function & 0x7) << 12)
        | (u64::from(address.offset) & 0xfff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_address_without_enable_bit_is_not_a_config_access() {
        assert_eq!(decode_config_address(0), None);
        assert_eq!(decode_config_address(0x7fff_ffff), None);
    }

    #[test]
    fn config_address_fields_decode() {
        let address = decode_config_address(0x8012_3a44).unwrap();
        assert_eq!(
            address,
            PciConfigAddress {
                bus: 0x12,
                device: 7,
                function: 2,
                offset: 0x44
            }
        );
        assert_eq!(address.to_string(), "12:07.2+0x044");
    }

    #[test]
    fn config_address_ignores_reserved_and_low_bits() {
        let address = decode_config_address(0xff00_08ff).unwrap();
        assert_eq!(
            address,
            PciConfigAddress {
                bus: 0,
                device: 1,
                function: 0,
                offset: 0xfc
            }
        );
    }

    #[test]
    fn config_address_round_trips_for_every_device_and_function() {
        for device in 0..DEVICES_PER_BUS {
            for function in 0..FUNCTIONS_PER_DEVICE {
                for offset in (0..256u16).step_by(4) {
                    let address = PciConfigAddress {
                        bus: 0xab,
                        device,
                        function,
                        offset,
                    };
                    let value = encode_config_address(address);
                    assert_eq!(decode_config_address(value), Some(address));
                }
            }
        }
    }

    #[test]
    fn ecam_offset_fields_decode() {
        let address = decode_ecam_offset((3 << 20) | (31 << 15) | (7 << 12) | 0x1ff).unwrap();
        assert_eq!(
            address,
            PciConfigAddress {
                bus: 3,
                device: 31,
                function: 7,
                offset: 0x1ff
            }
        );
        assert_eq!(
            decode_ecam_offset(0x8004),
            Some(PciConfigAddress::bus0(1, 4))
        );
    }

    #[test]
    fn ecam_offset_beyond_256_buses_is_rejected() {
        assert!(decode_ecam_offset(ECAM_SIZE_ALL_BUSES - 1).is_some());
        assert_eq!(decode_ecam_offset(ECAM_SIZE_ALL_BUSES), None);
        assert_eq!(decode_ecam_offset(u64::MAX), None);
    }

    #[test]
    fn ecam_offset_round_trips() {
        for offset in [
            0u64, 0xfff, 0x1000, 0x8000, 0xf_ffff, 0x10_0000, 0xfff_ffff, 0x123_4567,
        ] {
            let address = decode_ecam_offset(offset).unwrap();
            assert_eq!(ecam_offset(address), offset);
        }
    }
}
