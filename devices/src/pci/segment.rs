//! PCI segment 0, bus 0: the table of devices and the dispatch of
//! configuration accesses to them, through the legacy ports 0xCF8/0xCFC and
//! through ECAM.
//!
//! Only bus 0 and function 0 of each device exist. Accesses to other buses,
//! other functions, absent devices, or that break the access contract read
//! all-ones (a master abort, which is how a guest learns nothing is there)
//! and their writes are ignored.
//!
//! The port block is 8 ports from [`PIO_BASE`] (0xCF8): CONFIG_ADDRESS is
//! the dword at 0xCF8 (byte and word accesses to 0xCF8..0xCFB are not
//! configuration accesses: reads return all-ones, writes are ignored; that
//! includes 0xCF9, the chipset reset register barge does not emulate), and
//! CONFIG_DATA is 0xCFC..0xCFF, where a byte, word or dword access at
//! 0xCFC + n reaches register `(CONFIG_ADDRESS & 0xFC) + n`.
//!
//! The ECAM window starts at bus 0; the caller places it (its size decides
//! how many buses the MCFG table declares) and passes offsets inside it.

use std::fmt;

use super::address::{
    decode_config_address, decode_ecam_offset, PciConfigAddress, CONFIG_ADDRESS_MASK,
    DEVICES_PER_BUS,
};
use super::config::CONFIG_SPACE_SIZE;
use super::host_bridge::HostBridge;
use super::{access_is_valid, ConfigEvent, PciConfigAccess};

/// First port of the configuration mechanism #1 block (CONFIG_ADDRESS).
pub const PIO_BASE: u16 = 0xcf8;
/// Number of ports in the block (0xCF8..=0xCFF).
pub const PIO_SIZE: u64 = 8;
/// Offset of CONFIG_ADDRESS inside the port block.
pub const CONFIG_ADDRESS_OFFSET: u64 = 0;
/// Offset of CONFIG_DATA (0xCFC) inside the port block.
pub const CONFIG_DATA_OFFSET: u64 = 4;
/// Device number of the host bridge.
pub const HOST_BRIDGE_DEVICE: u8 = 0;

/// A device that can sit in a segment slot.
pub type BoxedPciDevice = Box<dyn PciConfigAccess + Send>;

/// Why a device cannot be added. These come from the VMM's configuration,
/// not from the guest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SegmentError {
    /// The device number is not 0..=31.
    #[error("PCI device number {device} is out of range: bus 0 has devices 0 to 31")]
    DeviceOutOfRange {
        /// The number asked for.
        device: u8,
    },
    /// The slot already holds a device.
    #[error("PCI device number {device} is already in use on bus 0; pick another or let barge allocate one")]
    SlotInUse {
        /// The number asked for.
        device: u8,
    },
    /// All 31 device slots after the host bridge are taken.
    #[error("PCI bus 0 is full: all 31 device slots after the host bridge are in use; pass fewer devices")]
    BusFull,
}

/// A configuration write's event and the device it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentEvent {
    /// The device number on bus 0.
    pub device: u8,
    /// What the write changed.
    pub event: ConfigEvent,
}

/// Bus 0 of PCI segment 0 (see module docs).
pub struct PciSegment {
    devices: [Option<BoxedPciDevice>; DEVICES_PER_BUS as usize],
    /// The last CONFIG_ADDRESS written, masked to its defined bits.
    config_address: u32,
}

impl fmt::Debug for PciSegment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PciSegment")
            .field("devices", &self.device_numbers())
            .field(
                "config_address",
                &format_args!("{:#010x}", self.config_address),
            )
            .finish()
    }
}

impl Default for PciSegment {
    fn default() -> Self {
        Self::new()
    }
}

impl PciSegment {
    /// An empty bus, not even a host bridge.
    pub fn new() -> Self {
        Self {
            devices: std::array::from_fn(|_| None),
            config_address: 0,
        }
    }

    /// A bus with the [`HostBridge`] at device 0.
    pub fn with_host_bridge() -> Self {
        let mut segment = Self::new();
        segment.devices[usize::from(HOST_BRIDGE_DEVICE)] = Some(Box::new(HostBridge::new()));
        segment
    }

    /// Adds `device` at the lowest free device number from 1 (0 is the
    /// host bridge's) and returns that number.
    pub fn add_device(&mut self, device: BoxedPciDevice) -> Result<u8, SegmentError> {
        let number = (1..DEVICES_PER_BUS)
            .find(|number| self.devices[usize::from(*number)].is_none())
            .ok_or(SegmentError::BusFull)?;
        self.devices[usize::from(number)] = Some(device);
        Ok(number)
    }

    /// Adds `device` at device number `number`.
    pub fn add_device_at(
        &mut self,
        number: u8,
        device: BoxedPciDevice,
    ) -> Result<(), SegmentError> {
        let slot = self
            .devices
            .get_mut(usize::from(number))
            .ok_or(SegmentError::DeviceOutOfRange { device: number })?;
        if slot.is_some() {
            return Err(SegmentError::SlotInUse { device: number });
        }
        *slot = Some(device);
        Ok(())
    }

    /// The device numbers in use, ascending.
    pub fn device_numbers(&self) -> Vec<u8> {
        (0..DEVICES_PER_BUS)
            .filter(|number| self.devices[usize::from(*number)].is_some())
            .collect()
    }

    /// Reads configuration space at `address`; all-ones when nothing answers
    /// (see module docs).
    pub fn config_read(&mut self, address: PciConfigAddress, data: &mut [u8]) {
        match self.target(address, data.len()) {
            Some(device) => device.config_read(address.offset, data),
            None => data.fill(0xff),
        }
    }

    /// Writes configuration space at `address`; ignored when nothing
    /// answers. Returns the device's event, if any.
    pub fn config_write(&mut self, address: PciConfigAddress, data: &[u8]) -> Option<SegmentEvent> {
        let device = self.target(address, data.len())?;
        let event = device.config_write(address.offset, data)?;
        Some(SegmentEvent {
            device: address.device,
            event,
        })
    }

    /// A guest read of the port block at `offset` from [`PIO_BASE`].
    pub fn pio_read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == CONFIG_ADDRESS_OFFSET && data.len() == 4 {
            data.copy_from_slice(&self.config_address.to_le_bytes());
            return;
        }
        match self.data_port_address(offset, data.len()) {
            Some(address) => self.config_read(address, data),
            None => data.fill(0xff),
        }
    }

    /// A guest write of the port block at `offset` from [`PIO_BASE`].
    pub fn pio_write(&mut self, offset: u64, data: &[u8]) -> Option<SegmentEvent> {
        if offset == CONFIG_ADDRESS_OFFSET {
            if let Ok(bytes) = <[u8; 4]>::try_from(data) {
                self.config_address = u32::from_le_bytes(bytes) & CONFIG_ADDRESS_MASK;
            }
            return None;
        }
        let address = self.data_port_address(offset, data.len())?;
        self.config_write(address, data)
    }

    /// A guest read of the ECAM window at `offset`.
    pub fn ecam_read(&mut self, offset: u64, data: &mut [u8]) {
        match decode_ecam_offset(offset) {
            Some(address) => self.config_read(address, data),
            None => data.fill(0xff),
        }
    }

    /// A guest write of the ECAM window at `offset`.
    pub fn ecam_write(&mut self, offset: u64, data: &[u8]) -> Option<SegmentEvent> {
        let address = decode_ecam_offset(offset)?;
        self.config_write(address, data)
    }

    /// The configuration address a CONFIG_DATA access of `len` bytes at
    /// port block `offset` reaches, if it is one.
    fn data_port_address(&self, offset: u64, len: usize) -> Option<PciConfigAddress> {
        let byte = offset
            .checked_sub(CONFIG_DATA_OFFSET)
            .filter(|byte| *byte < 4)?;
        if usize::try_from(byte).ok()? + len > 4 {
            return None;
        }
        let mut address = decode_config_address(self.config_address)?;
        address.offset += byte as u16;
        Some(address)
    }

    /// The device that answers an access of `len` bytes at `address`.
    fn target(&mut self, address: PciConfigAddress, len: usize) -> Option<&mut BoxedPciDevice> {
        if address.bus != 0
            || address.function != 0
            || !access_is_valid(address.offset, len, CONFIG_SPACE_SIZE)
        {
            return None;
        }
        self.devices.get_mut(usize::from(address.device))?.as_mut()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::pci::address::{ecam_offset, encode_config_address};
    use crate::pci::bar::{BarKind, BarWrite, EmulatedBars, PlannedBar};
    use crate::pci::config::ConfigSpace;
    use crate::pci::endpoint::EmulatedEndpoint;
    use crate::pci::COMMAND_OFFSET;

    /// Accesses a [`Recorder`] got: `('r' or 'w', offset, length)`.
    type AccessLog = Arc<Mutex<Vec<(char, u16, usize)>>>;

    /// Records every access it gets; config space is a counter pattern.
    struct Recorder {
        accesses: AccessLog,
    }

    impl PciConfigAccess for Recorder {
        fn config_read(&mut self, offset: u16, data: &mut [u8]) {
            self.accesses
                .lock()
                .unwrap()
                .push(('r', offset, data.len()));
            for (i, byte) in data.iter_mut().enumerate() {
                *byte = (offset as usize + i) as u8;
            }
        }

        fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<ConfigEvent> {
            self.accesses
                .lock()
                .unwrap()
                .push(('w', offset, data.len()));
            None
        }
    }

    fn recorder() -> (BoxedPciDevice, AccessLog) {
        let accesses = Arc::new(Mutex::new(Vec::new()));
        (
            Box::new(Recorder {
                accesses: accesses.clone(),
            }),
            accesses,
        )
    }

    fn endpoint() -> BoxedPciDevice {
        let config = ConfigSpace::type0(&crate::shmem::SHMEM_IDENTITY);
        let bars = EmulatedBars::new(&[PlannedBar {
            index: 2,
            kind: BarKind::Memory64 { prefetchable: true },
            size: 1 << 30,
            gpa: 1 << 36,
        }])
        .unwrap();
        Box::new(EmulatedEndpoint::new(config, bars))
    }

    fn pio_read32(segment: &mut PciSegment, address: PciConfigAddress) -> u32 {
        segment.pio_write(
            CONFIG_ADDRESS_OFFSET,
            &encode_config_address(address).to_le_bytes(),
        );
        let mut data = [0; 4];
        segment.pio_read(CONFIG_DATA_OFFSET, &mut data);
        u32::from_le_bytes(data)
    }

    fn ecam_read32(segment: &mut PciSegment, address: PciConfigAddress) -> u32 {
        let mut data = [0; 4];
        segment.ecam_read(ecam_offset(address), &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn host_bridge_answers_at_device_0_by_ports_and_ecam() {
        let mut segment = PciSegment::with_host_bridge();
        assert_eq!(
            pio_read32(&mut segment, PciConfigAddress::bus0(0, 0)),
            0x0d57_8086
        );
        assert_eq!(
            ecam_read32(&mut segment, PciConfigAddress::bus0(0, 0)),
            0x0d57_8086
        );
        assert_eq!(segment.device_numbers(), [0]);
    }

    #[test]
    fn absent_devices_functions_and_buses_read_all_ones() {
        let mut segment = PciSegment::with_host_bridge();
        for address in [
            PciConfigAddress::bus0(1, 0),
            PciConfigAddress::bus0(31, 0),
            PciConfigAddress {
                bus: 0,
                device: 0,
                function: 1,
                offset: 0,
            },
            PciConfigAddress {
                bus: 1,
                device: 0,
                function: 0,
                offset: 0,
            },
            PciConfigAddress {
                bus: 255,
                device: 31,
                function: 7,
                offset: 0xfc,
            },
        ] {
            assert_eq!(pio_read32(&mut segment, address), u32::MAX, "{address}");
            assert_eq!(ecam_read32(&mut segment, address), u32::MAX, "{address}");
            assert_eq!(segment.pio_write(CONFIG_DATA_OFFSET, &[0; 4]), None);
            assert_eq!(segment.ecam_write(ecam_offset(address), &[0; 4]), None);
        }
        // Device numbers beyond 31 through the direct API.
        let mut data = [0; 4];
        segment.config_read(PciConfigAddress::bus0(32, 0), &mut data);
        assert_eq!(data, [0xff; 4]);
        assert_eq!(
            segment.config_write(PciConfigAddress::bus0(200, 0), &[0; 4]),
            None
        );
    }

    #[test]
    fn data_port_sub_dword_accesses_reach_the_right_register_bytes() {
        let mut segment = PciSegment::new();
        let (device, accesses) = recorder();
        segment.add_device_at(3, device).unwrap();
        let address = encode_config_address(PciConfigAddress::bus0(3, 0x40));
        segment.pio_write(CONFIG_ADDRESS_OFFSET, &address.to_le_bytes());
        for (port_offset, len, register) in [
            (4u64, 1usize, 0x40u16),
            (5, 1, 0x41),
            (6, 1, 0x42),
            (7, 1, 0x43),
            (4, 2, 0x40),
            (5, 2, 0x41),
            (6, 2, 0x42),
            (4, 4, 0x40),
        ] {
            let mut data = vec![0; len];
            segment.pio_read(port_offset, &mut data);
            let expected: Vec<u8> = (0..len).map(|i| register as u8 + i as u8).collect();
            assert_eq!(data, expected, "port {port_offset} len {len}");
            segment.pio_write(port_offset, &data);
        }
        let accesses = accesses.lock().unwrap();
        assert_eq!(accesses.len(), 16);
        assert_eq!(accesses[2], ('r', 0x41, 1));
        assert_eq!(accesses[15], ('w', 0x40, 4));
    }

    #[test]
    fn accesses_crossing_the_data_dword_or_odd_widths_are_ignored() {
        let mut segment = PciSegment::new();
        let (device, accesses) = recorder();
        segment.add_device_at(3, device).unwrap();
        segment.pio_write(
            CONFIG_ADDRESS_OFFSET,
            &encode_config_address(PciConfigAddress::bus0(3, 0)).to_le_bytes(),
        );
        for (port_offset, len) in [
            (5u64, 4usize),
            (6, 4),
            (7, 2),
            (4, 3),
            (4, 8),
            (8, 1),
            (u64::MAX, 4),
        ] {
            let mut data = vec![0; len];
            segment.pio_read(port_offset, &mut data);
            assert!(
                data.iter().all(|b| *b == 0xff),
                "port {port_offset} len {len}"
            );
            assert_eq!(segment.pio_write(port_offset, &data), None);
        }
        for (offset, len) in [
            (0x8002u64, 4usize),
            (0x8003, 2),
            (0x8000, 8),
            (0x8000, 3),
            (u64::MAX, 4),
            (256 << 20, 4),
        ] {
            let mut data = vec![0; len];
            segment.ecam_read(offset, &mut data);
            assert!(
                data.iter().all(|b| *b == 0xff),
                "ecam {offset:#x} len {len}"
            );
            assert_eq!(segment.ecam_write(offset, &data), None);
        }
        assert!(accesses.lock().unwrap().is_empty());
    }

    #[test]
    fn config_address_register_reads_back_and_disables() {
        let mut segment = PciSegment::with_host_bridge();
        // Linux's pci_check_type1.
        segment.pio_write(3, &[0x01]);
        segment.pio_write(CONFIG_ADDRESS_OFFSET, &0x8000_0000u32.to_le_bytes());
        let mut data = [0; 4];
        segment.pio_read(CONFIG_ADDRESS_OFFSET, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x8000_0000);
        // Reserved and low bits read back as 0.
        segment.pio_write(CONFIG_ADDRESS_OFFSET, &0xff12_3457u32.to_le_bytes());
        segment.pio_read(CONFIG_ADDRESS_OFFSET, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x8012_3454);
        // Byte and word accesses to 0xCF8..0xCFB are not CONFIG_ADDRESS.
        let mut byte = [0; 1];
        segment.pio_read(1, &mut byte);
        assert_eq!(byte, [0xff]);
        let mut word = [0; 2];
        segment.pio_read(0, &mut word);
        assert_eq!(word, [0xff; 2]);
        segment.pio_write(CONFIG_ADDRESS_OFFSET, &[0; 2]);
        segment.pio_read(CONFIG_ADDRESS_OFFSET, &mut data);
        assert_eq!(u32::from_le_bytes(data), 0x8012_3454);
        // Enable bit clear: CONFIG_DATA is not a config access.
        segment.pio_write(CONFIG_ADDRESS_OFFSET, &0x0000_0000u32.to_le_bytes());
        segment.pio_read(CONFIG_DATA_OFFSET, &mut data);
        assert_eq!(data, [0xff; 4]);
    }

    #[test]
    fn ecam_reaches_extended_config_space_and_ports_do_not() {
        let mut segment = PciSegment::new();
        let (device, accesses) = recorder();
        segment.add_device_at(1, device).unwrap();
        let mut data = [0; 2];
        segment.ecam_read(ecam_offset(PciConfigAddress::bus0(1, 0x102)), &mut data);
        assert_eq!(data, [0x02, 0x03]);
        assert_eq!(accesses.lock().unwrap()[0], ('r', 0x102, 2));
        // 0xCF8 cannot express offsets above 0xFF: bits 27:24 are ignored.
        segment.pio_write(CONFIG_ADDRESS_OFFSET, &0x8100_0800u32.to_le_bytes());
        let mut data = [0; 4];
        segment.pio_read(CONFIG_DATA_OFFSET, &mut data);
        assert_eq!(accesses.lock().unwrap()[1], ('r', 0x00, 4));
    }

    #[test]
    fn events_carry_the_device_number() {
        let mut segment = PciSegment::with_host_bridge();
        let number = segment.add_device(endpoint()).unwrap();
        assert_eq!(number, 1);
        let event = segment.ecam_write(
            ecam_offset(PciConfigAddress::bus0(1, COMMAND_OFFSET)),
            &[0x02, 0],
        );
        assert!(
            matches!(event, Some(SegmentEvent { device: 1, event: ConfigEvent::Command(c) }) if c.memory_toggled() == Some(true))
        );
        segment.pio_write(
            CONFIG_ADDRESS_OFFSET,
            &encode_config_address(PciConfigAddress::bus0(1, 0x18)).to_le_bytes(),
        );
        let event = segment.pio_write(CONFIG_DATA_OFFSET, &u32::MAX.to_le_bytes());
        assert!(matches!(
            event,
            Some(SegmentEvent {
                device: 1,
                event: ConfigEvent::Bar(BarWrite {
                    index: 2,
                    sizing: true,
                    matches_plan: false,
                    ..
                })
            })
        ));
        assert_eq!(
            pio_read32(&mut segment, PciConfigAddress::bus0(1, 0x18)),
            0xc000_000c
        );
    }

    #[test]
    fn device_numbers_allocate_from_1_and_report_conflicts() {
        let mut segment = PciSegment::with_host_bridge();
        assert_eq!(
            segment.add_device_at(0, endpoint()),
            Err(SegmentError::SlotInUse { device: 0 })
        );
        assert_eq!(
            segment.add_device_at(32, endpoint()),
            Err(SegmentError::DeviceOutOfRange { device: 32 })
        );
        segment.add_device_at(2, endpoint()).unwrap();
        assert_eq!(segment.add_device(endpoint()), Ok(1));
        assert_eq!(segment.add_device(endpoint()), Ok(3));
        for expected in 4..32 {
            assert_eq!(segment.add_device(endpoint()), Ok(expected));
        }
        assert_eq!(segment.add_device(endpoint()), Err(SegmentError::BusFull));
        assert_eq!(segment.device_numbers().len(), 32);
        // Without a host bridge, allocation still starts at 1.
        let mut segment = PciSegment::new();
        assert_eq!(segment.add_device(endpoint()), Ok(1));
        assert!(format!("{segment:?}").contains("[1]"));
        assert!(SegmentError::BusFull.to_string().contains("fewer"));
    }

    #[test]
    fn every_port_offset_and_width_is_handled() {
        let mut segment = PciSegment::with_host_bridge();
        segment.add_device(endpoint()).unwrap();
        for config_address in [0u32, 0x8000_0000, 0x8000_0810, 0x80ff_fffc, u32::MAX] {
            segment.pio_write(0, &config_address.to_le_bytes());
            for offset in 0..10u64 {
                for len in [0usize, 1, 2, 3, 4, 8] {
                    let mut data = vec![0; len];
                    segment.pio_read(offset, &mut data);
                    let _ = segment.pio_write(offset, &data);
                    segment.pio_write(0, &config_address.to_le_bytes());
                }
            }
        }
    }
}
