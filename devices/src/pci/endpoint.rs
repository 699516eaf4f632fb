//! An emulated PCI endpoint: a [`ConfigSpace`] with [`EmulatedBars`] over
//! its BAR registers. The building block for emulated devices (the shared
//! memory device) whose config space barge owns completely.

use super::bar::EmulatedBars;
use super::config::{ConfigSpace, CONFIG_SPACE_SIZE};
use super::{access_is_valid, CommandChange, ConfigEvent, PciConfigAccess};

/// A type 0 endpoint whose config space and BARs are emulated.
///
/// BAR registers (0x10..0x28, 0x30) go to the [`EmulatedBars`]; the
/// bytes of `config` there are never read. Everything else goes to the
/// [`ConfigSpace`] through its write masks. A write that changes the command
/// register returns [`ConfigEvent::Command`]; a BAR write returns
/// [`ConfigEvent::Bar`].
#[derive(Debug, Clone)]
pub struct EmulatedEndpoint {
    config: ConfigSpace,
    bars: EmulatedBars,
}

impl EmulatedEndpoint {
    /// An endpoint with `config` (e.g. from [`ConfigSpace::type0`]) and `bars`.
    pub fn new(config: ConfigSpace, bars: EmulatedBars) -> Self {
        Self { config, bars }
    }

    /// The configuration space (BAR registers excluded).
    pub fn config(&self) -> &ConfigSpace {
        &self.config
    }

    /// The configuration space, for the model's own setup writes.
    pub fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    /// The BARs.
    pub fn bars(&self) -> &EmulatedBars {
        &self.bars
    }
}

impl PciConfigAccess for EmulatedEndpoint {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        if !access_is_valid(offset, data.len(), CONFIG_SPACE_SIZE) {
            data.fill(0xff);
        } else if EmulatedBars::contains(offset) {
            self.bars.read(offset, data);
        } else {
            self.config.read(offset, data);
        }
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<ConfigEvent> {
        if !access_is_valid(offset, data.len(), CONFIG_SPACE_SIZE) {
            return None;
        }
        if EmulatedBars::contains(offset) {
            return self.bars.write(offset, data).map(ConfigEvent::Bar);
        }
        let old = self.config.command();
        self.config.guest_write(offset, data);
        CommandChange::between(old, self.config.command()).map(ConfigEvent::Command)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::bar::{BarKind, BarWrite, PlannedBar};
    use crate::pci::{COMMAND_MEMORY_SPACE, COMMAND_OFFSET};

    fn ivshmem_like() -> EmulatedEndpoint {
        let config = ConfigSpace::type0(&crate::shmem::SHMEM_IDENTITY);
        let bars = EmulatedBars::new(&[PlannedBar {
            index: 2,
            kind: BarKind::Memory64 { prefetchable: true },
            size: 8 << 30,
            gpa: 64 << 30,
        }])
        .unwrap();
        EmulatedEndpoint::new(config, bars)
    }

    fn read32(device: &mut EmulatedEndpoint, offset: u16) -> u32 {
        let mut data = [0; 4];
        device.config_read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn reads_combine_header_and_bars() {
        let mut device = ivshmem_like();
        assert_eq!(read32(&mut device, 0), 0x1110_1af4);
        assert_eq!(read32(&mut device, 0x18), 0x0000_000c);
        assert_eq!(read32(&mut device, 0x1c), 0x10);
        assert_eq!(read32(&mut device, 0x10), 0);
        assert_eq!(read32(&mut device, 0x30), 0);
    }

    #[test]
    fn memory_decode_toggles_are_reported() {
        let mut device = ivshmem_like();
        let event = device.config_write(COMMAND_OFFSET, &COMMAND_MEMORY_SPACE.to_le_bytes());
        let Some(ConfigEvent::Command(change)) = event else {
            panic!("expected a command event, got {event:?}");
        };
        assert_eq!(change.memory_toggled(), Some(true));
        // Writing the same value again changes nothing.
        assert_eq!(
            device.config_write(COMMAND_OFFSET, &COMMAND_MEMORY_SPACE.to_le_bytes()),
            None
        );
        // A byte write of the low command byte that clears memory decode.
        let event = device.config_write(COMMAND_OFFSET, &[0]);
        assert!(
            matches!(event, Some(ConfigEvent::Command(c)) if c.memory_toggled() == Some(false))
        );
        // A status-only write is no command change.
        assert_eq!(device.config_write(COMMAND_OFFSET + 2, &[0xff, 0xff]), None);
    }

    #[test]
    fn bar_writes_are_reported_and_do_not_touch_the_header() {
        let mut device = ivshmem_like();
        let event = device.config_write(0x1c, &u32::MAX.to_le_bytes());
        assert!(matches!(
            event,
            Some(ConfigEvent::Bar(BarWrite {
                index: 2,
                sizing: true,
                ..
            }))
        ));
        assert_eq!(read32(&mut device, 0x1c), 0xffff_fffe);
        let event = device.config_write(0x1c, &0x10u32.to_le_bytes());
        assert!(matches!(
            event,
            Some(ConfigEvent::Bar(BarWrite {
                matches_plan: true,
                ..
            }))
        ));
        assert_eq!(device.config_write(0x10, &u32::MAX.to_le_bytes()), None);
    }

    #[test]
    fn accesses_outside_the_contract_are_ignored() {
        let mut device = ivshmem_like();
        for (offset, len) in [
            (0x03u16, 2usize),
            (0x1a, 4),
            (0, 3),
            (0, 8),
            (4096, 1),
            (u16::MAX, 4),
        ] {
            let mut data = vec![0; len];
            device.config_read(offset, &mut data);
            assert!(data.iter().all(|b| *b == 0xff));
            assert_eq!(device.config_write(offset, &vec![0xff; len]), None);
        }
        assert_eq!(device.config().command(), 0);
        assert_eq!(device.bars().guest_address(2), Some(64 << 30));
        let mut data = [0; 4];
        device.config_read(0xffc, &mut data);
        assert_eq!(data, [0; 4]);
        device.config_mut().set_u32(0xffc, 7);
        device.config_read(0xffc, &mut data);
        assert_eq!(data, [7, 0, 0, 0]);
    }
}
