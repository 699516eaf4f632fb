//! Inputs the MSI-X tests share: a configuration space holding an MSI-X
//! capability whose Message Control, Table and PBA registers a test chooses.

use crate::pci::caps::CAP_ID_MSIX;

/// A config space with an MSI-X capability at 0x70.
pub(super) fn config_with_msix(control: u16, table: u32, pba: u32) -> Vec<u8> {
    let mut config = vec![0u8; 256];
    config[0x06] = 0x10;
    config[0x34] = 0x70;
    config[0x70] = CAP_ID_MSIX;
    config[0x72..0x74].copy_from_slice(&control.to_le_bytes());
    config[0x74..0x78].copy_from_slice(&table.to_le_bytes());
    config[0x78..0x7c].copy_from_slice(&pba.to_le_bytes());
    config
}
