//! PCI device models: configuration space, emulated BARs, capability
//! masking, a host bridge and the bus-0 segment that dispatches
//! configuration accesses (ports 0xCF8/0xCFC and ECAM) to them.
//!
//! Everything here is a pure state machine over configuration space bytes:
//! no KVM, no VFIO ioctls, no bus registration. A model implements
//! [`PciConfigAccess`]; a guest write may return a [`ConfigEvent`] telling
//! the caller that the guest toggled decode in the command register or
//! wrote a BAR. The events are information only: no model here maps or
//! unmaps anything, and the VMM keeps every BAR where the placement plan put
//! it (a guest cannot move a BAR; see [`bar`]). That is how the memslots of a
//! passed-through BAR are created once and never torn down by the guest's
//! BAR sizing or decode toggles during boot.
//!
//! # Access contract
//!
//! Callers pass configuration accesses the way PCI defines them: `data` is
//! 1, 2 or 4 bytes and the access stays inside one naturally aligned dword
//! (`offset % 4 + data.len() <= 4`), and `offset + data.len()` is at most
//! [`config::CONFIG_SPACE_SIZE`]. [`segment::PciSegment`] only passes such
//! accesses. Models must still never panic on anything else: reads outside
//! the contract return all-ones, writes outside it are ignored.

pub mod address;
pub mod bar;
pub mod caps;
pub mod config;
pub mod endpoint;
pub mod host_bridge;
pub mod segment;

pub use address::PciConfigAddress;
pub use bar::{BarKind, BarWrite, EmulatedBars, PlannedBar};
pub use config::ConfigSpace;
pub use endpoint::EmulatedEndpoint;
pub use host_bridge::HostBridge;
pub use segment::PciSegment;

/// Offset of the command register (16 bits).
pub const COMMAND_OFFSET: u16 = 0x04;
/// Command register: the device responds to I/O space accesses.
pub const COMMAND_IO_SPACE: u16 = 1 << 0;
/// Command register: the device responds to memory space accesses.
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
/// Command register: the device may master the bus (DMA, MSI).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: legacy INTx is disabled.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;

/// A guest's access to one device's configuration space, as a state
/// machine over its bytes. See the module docs for the access contract.
pub trait PciConfigAccess {
    /// Reads `data.len()` bytes at `offset` into `data`. Bytes the model
    /// does not implement read as zeros; accesses outside the contract read
    /// all-ones.
    fn config_read(&mut self, offset: u16, data: &mut [u8]);

    /// Writes `data` at `offset`. Returns what the write changed that the
    /// caller may want to know about; it is information, not a request to
    /// remap anything. Accesses outside the contract are ignored.
    fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<ConfigEvent>;
}

/// Something a guest's configuration write changed.
///
/// An access inside one dword touches either the command register or one
/// BAR register, never both, so one write yields at most one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigEvent {
    /// The command register changed value.
    Command(CommandChange),
    /// The guest wrote a BAR (or the ROM BAR). The VMM keeps the planned
    /// mapping whatever the guest wrote.
    Bar(BarWrite),
}

/// The command register before and after a guest write that changed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandChange {
    /// Value before the write.
    pub old: u16,
    /// Value after the write (after the write mask was applied).
    pub new: u16,
}

impl CommandChange {
    /// The change from `old` to `new`, or `None` when they are equal.
    pub fn between(old: u16, new: u16) -> Option<Self> {
        (old != new).then_some(Self { old, new })
    }

    /// `Some(enabled)` when memory decode was switched on or off.
    pub fn memory_toggled(&self) -> Option<bool> {
        self.toggled(COMMAND_MEMORY_SPACE)
    }

    /// `Some(enabled)` when I/O decode was switched on or off.
    pub fn io_toggled(&self) -> Option<bool> {
        self.toggled(COMMAND_IO_SPACE)
    }

    /// `Some(enabled)` when bus mastering was switched on or off.
    pub fn bus_master_toggled(&self) -> Option<bool> {
        self.toggled(COMMAND_BUS_MASTER)
    }

    fn toggled(&self, bit: u16) -> Option<bool> {
        ((self.old ^ self.new) & bit != 0).then_some(self.new & bit != 0)
    }
}

/// Whether an access of `len` bytes at `offset` follows the access contract
/// for a space of `space_size` bytes (see the module docs).
pub fn access_is_valid(offset: u16, len: usize, space_size: usize) -> bool {
    matches!(len, 1 | 2 | 4)
        && usize::from(offset % 4) + len <= 4
        && usize::from(offset) + len <= space_size
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_change_reports_only_toggled_bits() {
        assert_eq!(CommandChange::between(0x7, 0x7), None);
        let change = CommandChange::between(0x0, COMMAND_MEMORY_SPACE).unwrap();
        assert_eq!(change.memory_toggled(), Some(true));
        assert_eq!(change.io_toggled(), None);
        assert_eq!(change.bus_master_toggled(), None);
        let change = CommandChange::between(0x7, COMMAND_BUS_MASTER).unwrap();
        assert_eq!(change.memory_toggled(), Some(false));
        assert_eq!(change.io_toggled(), Some(false));
        assert_eq!(change.bus_master_toggled(), None);
    }

    #[test]
    fn access_contract_accepts_aligned_widths_inside_one_dword() {
        for offset in 0..8u16 {
            for len in 0..=8usize {
                let expected = matches!(len, 1 | 2 | 4) && (offset % 4) as usize + len <= 4;
                assert_eq!(
                    access_is_valid(offset, len, 4096),
                    expected,
                    "{offset} {len}"
                );
            }
        }
        assert!(access_is_valid(4092, 4, 4096));
        assert!(!access_is_valid(4096, 1, 4096));
        assert!(!access_is_valid(u16::MAX, 1, 4096));
        assert!(!access_is_valid(252, 4, 255));
    }
}
pub mod msi;
pub mod msix;
