//! MSI-X: the vector table and pending-bit array (PBA) as a state machine,
//! the MSI-X capability's registers, the pages that must trap, and the
//! decision whether to relocate the table to a BAR of its own.
//!
//! Pure logic: no KVM, no VFIO, no bus. The VMM forwards guest MMIO
//! accesses inside the table or PBA to [`MsixTable`] (offsets relative to
//! the start of the table or PBA), forwards Message Control writes through
//! [`MsixCapability::message_control_write`] and [`MsixTable::control_write`],
//! and turns the returned [`MsixEvent`]s into KVM GSI route updates and
//! irqfd switches.
//!
//! # Guest accesses
//!
//! The PCI spec lets software access the table and PBA with aligned dword
//! (4-byte) and aligned qword (8-byte) accesses only. Anything else is
//! logged and ignored:
//!
//! - writes of another width, misaligned writes and writes outside the
//!   table are dropped (no state change, no event); every PBA write is
//!   dropped (the PBA is read-only);
//! - reads of another width, misaligned reads and reads outside the table
//!   or PBA return **all-ones**, as the configuration-space model does for
//!   accesses outside its contract (and as a PCIe read that completes with
//!   an unsupported request does).
//!
//! # Masking and pending bits
//!
//! A vector is *effectively masked* when MSI-X is disabled, the function
//! mask is set, or its entry's mask bit is set ([`MsixTable::is_vector_masked`]).
//! A device interrupt the VMM sees while the vector is effectively masked
//! (the VMM switched the irqfd off and polls the eventfd) goes through
//! [`MsixTable::trigger`], which sets the vector's pending bit instead of
//! delivering. When the vector becomes effectively unmasked (entry unmask,
//! function unmask, enable) with its pending bit set, the bit is cleared and
//! the message is returned for the VMM to deliver once. While MSI-X is
//! disabled the function may not signal at all: triggers are dropped and
//! pending bits set earlier stay until the vector is unmasked.
//!
//! Addresses and data are accepted as the guest writes them, however
//! absurd; [`MsiMessage::is_valid_x86`] is for the VMM to check before it
//! routes a message.
//!
//! # Files
//!
//! - `table.rs`: [`MsixTable`], the table and PBA state machine, and
//!   [`MsiMessage`].
//! - `capability.rs`: [`MsixCapability`] and [`BarRegion`], read from
//!   configuration space.
//! - `relocation.rs`: [`relocation()`], the decision to trap pages or to
//!   relocate the table.
//!
//! The register layout constants and [`MsixError`] are here.

mod capability;
mod relocation;
mod table;

#[cfg(test)]
mod fixtures;

pub use capability::{BarRegion, MsixCapability};
pub use relocation::{relocation, BarInfo, MsixPlacement, RelocationPolicy};
pub use table::{
    MsiMessage, MsixControlChange, MsixEntry, MsixEvent, MsixTable, TriggerAction,
    X86_MSI_ADDRESS_END, X86_MSI_ADDRESS_REMAPPABLE, X86_MSI_ADDRESS_START,
};

/// Largest number of MSI-X vectors (table size field is 11 bits, N - 1).
pub const MSIX_MAX_VECTORS: u16 = 2048;
/// Size of one table entry in bytes.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Offset of Message Control inside the capability.
pub const MSIX_CONTROL_OFFSET: u16 = 2;
/// Offset of the Table Offset/BIR register inside the capability.
pub const MSIX_TABLE_OFFSET_REGISTER: u16 = 4;
/// Offset of the PBA Offset/BIR register inside the capability.
pub const MSIX_PBA_OFFSET_REGISTER: u16 = 8;
/// Size of the MSI-X capability in configuration space.
pub const MSIX_CAPABILITY_SIZE: u16 = 12;
/// Message Control: table size field (N - 1), read-only.
pub const MSIX_CONTROL_TABLE_SIZE: u16 = 0x07ff;
/// Message Control: function mask (RW).
pub const MSIX_CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Message Control: MSI-X enable (RW).
pub const MSIX_CONTROL_ENABLE: u16 = 1 << 15;
/// Vector control: the entry's mask bit.
pub const MSIX_VECTOR_CONTROL_MASK: u32 = 1;
/// The BAR indicator field of the Table and PBA registers.
pub const MSIX_BIR_MASK: u32 = 0x7;
/// Page size used to round trapped ranges.
pub const MSIX_PAGE_SIZE: u64 = 4096;
/// A BAR at least this large could get 2 MiB pages: trapping a page in it
/// costs a huge mapping (see [`relocation`]).
pub const MSIX_RELOCATION_THRESHOLD: u64 = 2 << 20;

const DWORD: usize = 4;
const QWORD: usize = 8;

/// Errors from reading an MSI-X capability a device reports, or from the
/// relocation decision. None of them is caused by the guest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MsixError {
    /// A vector count outside 1..=2048.
    #[error("MSI-X vector count {0} is outside 1..=2048; use the table size the device reports")]
    VectorCount(u32),
    /// The capability lies (partly) outside the configuration space given.
    #[error("MSI-X capability at {offset:#x} does not fit in a {len}-byte configuration space; read the full configuration space")]
    CapabilityOutside {
        /// Offset of the capability.
        offset: u16,
        /// Length of the configuration space buffer.
        len: usize,
    },
    /// The capability at the offset is not an MSI-X capability.
    #[error("capability at {offset:#x} has ID {id:#04x}, not MSI-X (0x11); pass the MSI-X capability's offset")]
    NotMsix {
        /// Offset of the capability.
        offset: u16,
        /// The ID found there.
        id: u8,
    },
    /// A BAR indicator of 6 or 7 (reserved).
    #[error("MSI-X {what} uses reserved BAR indicator {bir}; the device's capability is broken, disable MSI-X for it")]
    ReservedBir {
        /// `table` or `PBA`.
        what: &'static str,
        bir: u8,
    },
    /// Table and PBA overlap in the same BAR.
    #[error("MSI-X table and PBA overlap in BAR {bar}; the device's capability is broken, disable MSI-X for it")]
    TableOverlapsPba {
        /// The BAR both live in.
        bar: u8,
    },
    /// A structure reaches past its BAR.
    #[error("MSI-X {what} at {offset:#x} ({size} bytes) reaches past the end of BAR {bar} ({bar_size} bytes); the device's capability is broken, disable MSI-X for it")]
    OutsideBar {
        /// `table` or `PBA`.
        what: &'static str,
        bar: u8,
        /// Offset of the structure in the BAR.
        offset: u64,
        /// Size of the structure.
        size: u64,
        /// Size of the BAR (0 when the BAR is not implemented).
        bar_size: u64,
    },
    /// Relocation to a BAR index that is taken or not 0..=5.
    #[error("cannot relocate the MSI-X table to BAR {0}: it is in use or not 0..=5; pick a free BAR index or let barge choose")]
    RelocationBarTaken(u8),
    /// Relocation asked for but no BAR index is free.
    #[error(
        "cannot relocate the MSI-X table: all six BAR indices are in use; trap its pages instead"
    )]
    NoFreeBar,
}
