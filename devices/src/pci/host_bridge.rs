//! The host bridge at 00:00.0.
//!
//! Its identity is 8086:0d57, class 0x060000 (host bridge): the ID Cloud
//! Hypervisor gives its virtual PCIe host bridge. We know of no Linux driver
//! or quirk keyed on it, so the guest treats it as a plain host bridge; its
//! class is what Linux's type 1 probe (`pci_sanity_check`) looks for on
//! bus 0. Note that EDK2/OVMF recognises this ID as Cloud Hypervisor's
//! (`CH_VIRT_HOST_DEVICE_ID`): irrelevant with barge's direct kernel boot,
//! but a firmware boot would take OVMF's Cloud Hypervisor path. The
//! bridge has no BARs, no capabilities and no interrupt; its config space is
//! read-only (writes, including to the command register, are ignored).

use super::config::{ConfigSpace, Type0Identity, CONFIG_SPACE_SIZE};
use super::{ConfigEvent, PciConfigAccess};

/// The host bridge's identity.
pub const HOST_BRIDGE_IDENTITY: Type0Identity = Type0Identity {
    vendor_id: 0x8086,
    device_id: 0x0d57,
    class_code: 0x06_00_00,
    revision_id: 0,
    subsystem_vendor_id: 0,
    subsystem_id: 0,
};

/// The 00:00.0 host bridge (see module docs).
#[derive(Debug, Clone)]
pub struct HostBridge {
    config: ConfigSpace,
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl HostBridge {
    /// A host bridge with [`HOST_BRIDGE_IDENTITY`].
    pub fn new() -> Self {
        let mut config = ConfigSpace::type0(&HOST_BRIDGE_IDENTITY);
        // Read-only: drop the writable and RW1C bits type0 sets up.
        config.set_write_mask(0, &[0; CONFIG_SPACE_SIZE]);
        config.set_rw1c_mask(0, &[0; CONFIG_SPACE_SIZE]);
        Self { config }
    }
}

impl PciConfigAccess for HostBridge {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config.guest_read(offset, data);
    }

    fn config_write(&mut self, _offset: u16, _data: &[u8]) -> Option<ConfigEvent> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read32(bridge: &mut HostBridge, offset: u16) -> u32 {
        let mut data = [0; 4];
        bridge.config_read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn identity_and_class() {
        let mut bridge = HostBridge::new();
        assert_eq!(read32(&mut bridge, 0x00), 0x0d57_8086);
        assert_eq!(read32(&mut bridge, 0x08), 0x0600_0000);
        assert_eq!(read32(&mut bridge, 0x0c), 0);
        let mut class = [0; 2];
        bridge.config_read(0x0a, &mut class);
        assert_eq!(u16::from_le_bytes(class), 0x0600);
    }

    #[test]
    fn no_bars_no_capabilities_no_interrupt() {
        let mut bridge = HostBridge::default();
        for offset in (0x10..0x40).step_by(4) {
            assert_eq!(read32(&mut bridge, offset), 0, "offset {offset:#x}");
        }
    }

    #[test]
    fn every_write_is_ignored() {
        let mut bridge = HostBridge::new();
        for offset in (0..4096u16).step_by(4) {
            assert_eq!(bridge.config_write(offset, &[0xff; 4]), None);
            assert_eq!(bridge.config_write(offset + 1, &[0xff]), None);
            assert_eq!(bridge.config_write(offset + 2, &[0xff; 2]), None);
        }
        assert_eq!(bridge.config_write(u16::MAX, &[0xff; 8]), None);
        assert_eq!(
            HostBridge::new().config.as_bytes()[..],
            bridge.config.as_bytes()[..]
        );
    }

    #[test]
    fn reads_outside_the_contract_are_all_ones() {
        let mut bridge = HostBridge::new();
        let mut data = [0; 4];
        bridge.config_read(0x02, &mut data);
        assert_eq!(data, [0xff; 4]);
        let mut data = [0; 1];
        bridge.config_read(4096, &mut data);
        assert_eq!(data, [0xff]);
    }
}
