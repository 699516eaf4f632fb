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

use std::fmt;

use super::caps::{standard_capabilities, CapabilityId, CAP_ID_MSIX};

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
        /// The BAR indicator.
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
        /// The BAR.
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

/// An MSI message: what a device writes where to raise an interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct MsiMessage {
    /// The 64-bit message address.
    pub address: u64,
    /// The message data (MSI-X: 32 bits; MSI: 16 or 32 bits).
    pub data: u32,
}

/// Start of the x86 MSI address window (the local APICs' interrupt range).
pub const X86_MSI_ADDRESS_START: u64 = 0xfee0_0000;
/// End (exclusive) of the x86 MSI address window.
pub const X86_MSI_ADDRESS_END: u64 = 0xfef0_0000;
/// Address bit 4: the message uses the interrupt-remapping format.
pub const X86_MSI_ADDRESS_REMAPPABLE: u64 = 1 << 4;

impl MsiMessage {
    /// Whether an x86 CPU can receive this message without an IOMMU: the
    /// address lies in `0xFEE0_0000..0xFEF0_0000` and its high dword is 0.
    ///
    /// barge exposes no virtual IOMMU, so messages in remappable format
    /// (address bit 4 set, see [`Self::is_remappable_format`]) are not
    /// remapped by anyone; they still pass this check when their address is
    /// in the window (KVM then reads them as compatibility format). The VMM
    /// rejects or logs what fails this check instead of routing it.
    pub fn is_valid_x86(&self) -> bool {
        (X86_MSI_ADDRESS_START..X86_MSI_ADDRESS_END).contains(&self.address)
    }

    /// Whether the address selects the interrupt-remapping format.
    pub fn is_remappable_format(&self) -> bool {
        self.address & X86_MSI_ADDRESS_REMAPPABLE != 0
    }
}

impl fmt::Display for MsiMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "address {:#x} data {:#x}", self.address, self.data)
    }
}

/// One MSI-X table entry as the guest programmed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MsixEntry {
    /// Message address and data.
    pub message: MsiMessage,
    /// The entry's mask bit (vector control bit 0).
    pub masked: bool,
}

impl Default for MsixEntry {
    /// The reset state: address and data 0, masked (the spec requires every
    /// mask bit set at reset).
    fn default() -> Self {
        Self {
            message: MsiMessage::default(),
            masked: true,
        }
    }
}

impl MsixEntry {
    fn dword(&self, index: u64) -> u32 {
        match index {
            0 => self.message.address as u32,
            1 => (self.message.address >> 32) as u32,
            2 => self.message.data,
            _ => u32::from(self.masked),
        }
    }

    fn set_dword(&mut self, index: u64, value: u32) {
        match index {
            0 => {
                self.message.address =
                    (self.message.address & !0xffff_ffff) | u64::from(value & !0x3)
            }
            1 => {
                self.message.address =
                    (self.message.address & 0xffff_ffff) | (u64::from(value) << 32)
            }
            2 => self.message.data = value,
            // Only the mask bit is implemented; the other bits are
            // reserved (or optional steering tags) and read 0.
            _ => self.masked = value & MSIX_VECTOR_CONTROL_MASK != 0,
        }
    }
}

/// What a guest table write changed, for the VMM to update a route or
/// switch an irqfd. Mask events report the entry's own mask bit; the
/// effective state also depends on enable and function mask
/// ([`MsixTable::is_vector_masked`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsixEvent {
    /// Address or data changed; the mask bit did not.
    VectorChanged {
        /// The vector.
        vector: u16,
        /// The entry now.
        entry: MsixEntry,
    },
    /// The entry's mask bit was set (address or data may have changed in
    /// the same qword write; `entry` has them).
    VectorMasked {
        /// The vector.
        vector: u16,
        /// The entry now.
        entry: MsixEntry,
    },
    /// The entry's mask bit was cleared.
    VectorUnmasked {
        /// The vector.
        vector: u16,
        /// The entry now.
        entry: MsixEntry,
        /// The message to deliver once now: the vector had its pending bit
        /// set and is effectively unmasked; the bit has been cleared.
        deliver: Option<MsiMessage>,
    },
}

/// What a Message Control write changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MsixControlChange {
    /// `Some(new)` when MSI-X enable changed.
    pub enabled: Option<bool>,
    /// `Some(new)` when the function mask changed.
    pub function_masked: Option<bool>,
    /// Vectors that became effectively unmasked with their pending bit set,
    /// in vector order, with the message to deliver once each; their
    /// pending bits have been cleared.
    pub deliver: Vec<(u16, MsiMessage)>,
}

/// What to do with a device interrupt on one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TriggerAction {
    /// The vector is unmasked: deliver this message.
    Deliver(MsiMessage),
    /// The vector is masked: its pending bit is now set.
    Pending,
    /// MSI-X is disabled or the vector does not exist: nothing to do.
    Dropped,
}

/// The emulated MSI-X table and PBA of one function, with the Message
/// Control enable and function-mask bits. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MsixTable {
    entries: Vec<MsixEntry>,
    pending: Vec<u64>,
    enabled: bool,
    function_masked: bool,
}

impl MsixTable {
    /// A table of `vectors` entries (1..=2048) in reset state: every entry
    /// masked with address and data 0, nothing pending, MSI-X disabled,
    /// function not masked.
    pub fn new(vectors: u16) -> Result<Self, MsixError> {
        if !(1..=MSIX_MAX_VECTORS).contains(&vectors) {
            return Err(MsixError::VectorCount(u32::from(vectors)));
        }
        Ok(Self {
            entries: vec![MsixEntry::default(); usize::from(vectors)],
            pending: vec![0; usize::from(vectors).div_ceil(64)],
            enabled: false,
            function_masked: false,
        })
    }

    /// Back to the reset state (device reset, guest reboot).
    pub fn reset(&mut self) {
        self.entries.fill(MsixEntry::default());
        self.pending.fill(0);
        self.enabled = false;
        self.function_masked = false;
    }

    /// Number of vectors.
    pub fn vector_count(&self) -> u16 {
        self.entries.len() as u16
    }

    /// Size of the table in bytes.
    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * MSIX_ENTRY_SIZE
    }

    /// Size of the PBA in bytes (whole qwords).
    pub fn pba_size(&self) -> u64 {
        self.pending.len() as u64 * QWORD as u64
    }

    /// The entry of `vector`.
    pub fn entry(&self, vector: u16) -> Option<MsixEntry> {
        self.entries.get(usize::from(vector)).copied()
    }

    /// All entries in vector order.
    pub fn entries(&self) -> &[MsixEntry] {
        &self.entries
    }

    /// MSI-X enable.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// The function mask.
    pub fn is_function_masked(&self) -> bool {
        self.function_masked
    }

    /// Whether `vector` is effectively masked (disabled, function masked or
    /// entry masked). Vectors that do not exist are masked.
    pub fn is_vector_masked(&self, vector: u16) -> bool {
        self.entry(vector)
            .is_none_or(|entry| !self.enabled || self.function_masked || entry.masked)
    }

    /// Whether `vector`'s pending bit is set.
    pub fn is_pending(&self, vector: u16) -> bool {
        let vector = usize::from(vector);
        self.pending
            .get(vector / 64)
            .is_some_and(|qword| qword & (1 << (vector % 64)) != 0)
    }

    /// The Message Control value this table implies: table size, function
    /// mask and enable.
    pub fn message_control(&self) -> u16 {
        let mut control = self.vector_count() - 1;
        if self.function_masked {
            control |= MSIX_CONTROL_FUNCTION_MASK;
        }
        if self.enabled {
            control |= MSIX_CONTROL_ENABLE;
        }
        control
    }

    /// A device interrupt on `vector`: deliver it, or set its pending bit
    /// while it is masked. See the module docs.
    pub fn trigger(&mut self, vector: u16) -> TriggerAction {
        let Some(entry) = self.entry(vector) else {
            log::debug!("msix: trigger of vector {vector} beyond the table dropped");
            return TriggerAction::Dropped;
        };
        if !self.enabled {
            return TriggerAction::Dropped;
        }
        if self.is_vector_masked(vector) {
            self.set_pending(vector, true);
            TriggerAction::Pending
        } else {
            TriggerAction::Deliver(entry.message)
        }
    }

    /// A guest read of the table at `offset` from its start. Only aligned
    /// dword and qword reads inside the table are answered; others read
    /// all-ones.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        if !self.access_ok("table read", offset, data.len(), self.table_size()) {
            data.fill(0xff);
            return;
        }
        for (i, chunk) in data.chunks_exact_mut(DWORD).enumerate() {
            let at = offset + (i * DWORD) as u64;
            let entry = &self.entries[(at / MSIX_ENTRY_SIZE) as usize];
            let dword = entry.dword((at % MSIX_ENTRY_SIZE) / DWORD as u64);
            chunk.copy_from_slice(&dword.to_le_bytes());
        }
    }

    /// A guest write of the table at `offset` from its start. Only aligned
    /// dword and qword writes inside the table are applied; others are
    /// ignored. Returns what changed (`None` when nothing did).
    pub fn table_write(&mut self, offset: u64, data: &[u8]) -> Option<MsixEvent> {
        if !self.access_ok("table write", offset, data.len(), self.table_size()) {
            return None;
        }
        // An aligned qword never crosses an entry.
        let vector = (offset / MSIX_ENTRY_SIZE) as u16;
        let index = usize::from(vector);
        let old = self.entries[index];
        let mut new = old;
        for (i, chunk) in data.chunks_exact(DWORD).enumerate() {
            let at = offset + (i * DWORD) as u64;
            let value = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            new.set_dword((at % MSIX_ENTRY_SIZE) / DWORD as u64, value);
        }
        self.entries[index] = new;
        match (old.masked, new.masked) {
            (false, true) => Some(MsixEvent::VectorMasked { vector, entry: new }),
            (true, false) => Some(MsixEvent::VectorUnmasked {
                vector,
                entry: new,
                deliver: self.take_pending_if_unmasked(vector),
            }),
            _ if old != new => Some(MsixEvent::VectorChanged { vector, entry: new }),
            _ => None,
        }
    }

    /// A guest read of the PBA at `offset` from its start. Only aligned
    /// dword and qword reads inside the PBA are answered; others read
    /// all-ones. Bits beyond the last vector read 0.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        if !self.access_ok("PBA read", offset, data.len(), self.pba_size()) {
            data.fill(0xff);
            return;
        }
        for (i, chunk) in data.chunks_exact_mut(DWORD).enumerate() {
            let at = offset + (i * DWORD) as u64;
            let qword = self.pending[(at / QWORD as u64) as usize];
            let dword = (qword >> ((at % QWORD as u64) * 8)) as u32;
            chunk.copy_from_slice(&dword.to_le_bytes());
        }
    }

    /// A guest write of the PBA: the PBA is read-only, the write is ignored.
    pub fn pba_write(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "msix: ignored {}-byte write to the read-only PBA at {offset:#x}",
            data.len()
        );
    }

    /// A Message Control write with the new value (see
    /// [`MsixCapability::message_control_write`]); only the enable and
    /// function-mask bits are taken, the table size is read-only. Returns
    /// what changed, with the pending vectors to deliver now.
    pub fn control_write(&mut self, control: u16) -> Option<MsixControlChange> {
        let enabled = control & MSIX_CONTROL_ENABLE != 0;
        let function_masked = control & MSIX_CONTROL_FUNCTION_MASK != 0;
        if enabled == self.enabled && function_masked == self.function_masked {
            return None;
        }
        let change = MsixControlChange {
            enabled: (enabled != self.enabled).then_some(enabled),
            function_masked: (function_masked != self.function_masked).then_some(function_masked),
            deliver: Vec::new(),
        };
        self.enabled = enabled;
        self.function_masked = function_masked;
        let mut change = change;
        if enabled && !function_masked {
            for vector in 0..self.vector_count() {
                if let Some(message) = self.take_pending_if_unmasked(vector) {
                    change.deliver.push((vector, message));
                }
            }
        }
        Some(change)
    }

    fn take_pending_if_unmasked(&mut self, vector: u16) -> Option<MsiMessage> {
        if self.is_pending(vector) && !self.is_vector_masked(vector) {
            self.set_pending(vector, false);
            self.entry(vector).map(|entry| entry.message)
        } else {
            None
        }
    }

    fn set_pending(&mut self, vector: u16, pending: bool) {
        let vector = usize::from(vector);
        if let Some(qword) = self.pending.get_mut(vector / 64) {
            if pending {
                *qword |= 1 << (vector % 64);
            } else {
                *qword &= !(1 << (vector % 64));
            }
        }
    }

    fn access_ok(&self, what: &str, offset: u64, len: usize, size: u64) -> bool {
        let ok = matches!(len, DWORD | QWORD)
            && offset % len as u64 == 0
            && offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= size);
        if !ok {
            log::debug!(
                "msix: ignored {len}-byte {what} at {offset:#x} (structure is {size} bytes)"
            );
        }
        ok
    }
}

/// A byte range inside one BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BarRegion {
    /// BAR index 0..=5.
    pub bar: u8,
    /// Offset from the start of the BAR.
    pub offset: u64,
    /// Length in bytes.
    pub size: u64,
}

impl BarRegion {
    /// Offset one past the last byte (saturating).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.size)
    }

    /// The same region rounded out to whole 4 KiB pages.
    pub fn page_aligned(&self) -> Self {
        let start = self.offset & !(MSIX_PAGE_SIZE - 1);
        let end = self
            .end()
            .checked_next_multiple_of(MSIX_PAGE_SIZE)
            .unwrap_or(!(MSIX_PAGE_SIZE - 1));
        Self {
            bar: self.bar,
            offset: start,
            size: end - start,
        }
    }

    fn overlaps(&self, other: &Self) -> bool {
        self.bar == other.bar && self.offset < other.end() && other.offset < self.end()
    }
}

/// The MSI-X capability of a device, as read from its configuration space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixCapability {
    /// Offset of the capability in configuration space.
    pub offset: u16,
    /// Number of vectors (table size field + 1).
    pub vectors: u16,
    /// Where the table is.
    pub table: BarRegion,
    /// Where the PBA is.
    pub pba: BarRegion,
}

impl MsixCapability {
    /// Finds the MSI-X capability in the standard list of `config` (a
    /// configuration space from offset 0) and reads it. `Ok(None)` when the
    /// device has none.
    pub fn find(config: &[u8]) -> Result<Option<Self>, MsixError> {
        standard_capabilities(config)
            .capabilities
            .iter()
            .find(|cap| cap.id == CapabilityId::Standard(CAP_ID_MSIX))
            .map(|cap| Self::parse(config, cap.offset))
            .transpose()
    }

    /// Reads the MSI-X capability at `offset` of `config`.
    pub fn parse(config: &[u8], offset: u16) -> Result<Self, MsixError> {
        let start = usize::from(offset);
        let bytes = config
            .get(start..start + usize::from(MSIX_CAPABILITY_SIZE))
            .ok_or(MsixError::CapabilityOutside {
                offset,
                len: config.len(),
            })?;
        if bytes[0] != CAP_ID_MSIX {
            return Err(MsixError::NotMsix {
                offset,
                id: bytes[0],
            });
        }
        let control = u16::from_le_bytes([bytes[2], bytes[3]]);
        let vectors = (control & MSIX_CONTROL_TABLE_SIZE) + 1;
        let region = |what, register: &[u8], size| {
            let value = u32::from_le_bytes([register[0], register[1], register[2], register[3]]);
            let bir = (value & MSIX_BIR_MASK) as u8;
            if bir > 5 {
                return Err(MsixError::ReservedBir { what, bir });
            }
            Ok(BarRegion {
                bar: bir,
                offset: u64::from(value & !MSIX_BIR_MASK),
                size,
            })
        };
        let table = region("table", &bytes[4..8], u64::from(vectors) * MSIX_ENTRY_SIZE)?;
        let pba = region(
            "PBA",
            &bytes[8..12],
            u64::from(vectors).div_ceil(64) * QWORD as u64,
        )?;
        if table.overlaps(&pba) {
            return Err(MsixError::TableOverlapsPba { bar: table.bar });
        }
        Ok(Self {
            offset,
            vectors,
            table,
            pba,
        })
    }

    /// The Table Offset/BIR register value for this capability's table.
    pub fn table_register(&self) -> u32 {
        (self.table.offset as u32 & !MSIX_BIR_MASK) | u32::from(self.table.bar)
    }

    /// The PBA Offset/BIR register value for this capability's PBA.
    pub fn pba_register(&self) -> u32 {
        (self.pba.offset as u32 & !MSIX_BIR_MASK) | u32::from(self.pba.bar)
    }

    /// The 4 KiB pages that must trap for the table and PBA, merged where
    /// they share or touch pages of the same BAR, sorted by BAR and offset.
    pub fn trapped_pages(&self) -> Vec<BarRegion> {
        let mut pages = vec![self.table.page_aligned(), self.pba.page_aligned()];
        pages.sort();
        let (first, second) = (pages[0], pages[1]);
        if first.bar == second.bar && second.offset <= first.end() {
            let end = first.end().max(second.end());
            vec![BarRegion {
                bar: first.bar,
                offset: first.offset,
                size: end - first.offset,
            }]
        } else {
            pages
        }
    }

    /// The capability as the guest sees it after the table and PBA moved
    /// to `relocated` (see [`MsixPlacement::Relocate`]).
    pub fn relocated(&self, relocated: &MsixPlacement) -> Self {
        match relocated {
            MsixPlacement::TrapPages { .. } => *self,
            MsixPlacement::Relocate {
                new_bar_index,
                pba_offset,
                ..
            } => Self {
                table: BarRegion {
                    bar: *new_bar_index,
                    offset: 0,
                    size: self.table.size,
                },
                pba: BarRegion {
                    bar: *new_bar_index,
                    offset: *pba_offset,
                    size: self.pba.size,
                },
                ..*self
            },
        }
    }

    /// The new Message Control value after a guest configuration write of
    /// `data` at `offset` (absolute configuration-space offset, any width
    /// and alignment), or `None` when the write does not touch Message
    /// Control. Only the enable and function-mask bits are writable;
    /// `current` supplies the rest.
    pub fn message_control_write(&self, offset: u16, data: &[u8], current: u16) -> Option<u16> {
        let control = self.offset.checked_add(MSIX_CONTROL_OFFSET)?;
        let mut bytes = current.to_le_bytes();
        let mut touched = false;
        for (i, value) in data.iter().enumerate() {
            let Some(at) = usize::from(offset).checked_add(i) else {
                break;
            };
            if let Some(index) = at
                .checked_sub(usize::from(control))
                .filter(|index| *index < 2)
            {
                bytes[index] = *value;
                touched = true;
            }
        }
        let writable = MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK;
        touched.then(|| (current & !writable) | (u16::from_le_bytes(bytes) & writable))
    }

    /// Patches `data`, the bytes a guest configuration read at `offset`
    /// returned from the device, with `control` (from
    /// [`MsixTable::message_control`]) and this capability's table and PBA
    /// registers (which differ from the device's after relocation). Bytes
    /// outside those registers are left alone.
    pub fn overlay(&self, offset: u16, data: &mut [u8], control: u16) {
        let mut registers = [0u8; 10];
        registers[..2].copy_from_slice(&control.to_le_bytes());
        registers[2..6].copy_from_slice(&self.table_register().to_le_bytes());
        registers[6..].copy_from_slice(&self.pba_register().to_le_bytes());
        let base = usize::from(self.offset) + usize::from(MSIX_CONTROL_OFFSET);
        for (i, byte) in data.iter_mut().enumerate() {
            let at = usize::from(offset) + i;
            if let Some(value) = at.checked_sub(base).and_then(|index| registers.get(index)) {
                *byte = *value;
            }
        }
    }
}

/// One BAR of the device, as the relocation decision needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarInfo {
    /// BAR index 0..=5.
    pub index: u8,
    /// Size in bytes (0: not implemented).
    pub size: u64,
    /// A 64-bit BAR also takes index + 1.
    pub is_64bit: bool,
    /// An I/O BAR (never mapped; its size does not matter).
    pub is_io: bool,
    /// Whether the host can mmap (parts of) the BAR, so the guest reaches
    /// it without exits. A BAR that is trapped anyway costs nothing more.
    pub mmappable: bool,
    /// Whether the host would also let the VMM mmap the pages holding the
    /// device's MSI-X table and PBA (VFIO reports
    /// `VFIO_REGION_INFO_CAP_MSIX_MAPPABLE`). Without it those pages trap
    /// whatever barge does, and relocating the table gains nothing.
    pub msix_pages_mappable: bool,
}

/// Whether to relocate the MSI-X table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RelocationPolicy {
    /// Relocate when the rule of [`relocation`] says so.
    #[default]
    Auto,
    /// Never relocate: trap pages.
    Off,
    /// Always relocate, to this BAR index.
    Bar(u8),
}

/// Where the MSI-X table and PBA are emulated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MsixPlacement {
    /// Leave them where the device has them and trap these pages (the rest
    /// of each BAR stays directly mapped).
    TrapPages {
        /// Trapped pages, from [`MsixCapability::trapped_pages`].
        ranges: Vec<BarRegion>,
    },
    /// Move both to a new 32-bit non-prefetchable memory BAR that is
    /// entirely emulated: the table at offset 0, the PBA after it on its
    /// own page. The device's own table and PBA pages become ordinary BAR
    /// space, mapped through like the rest of the BAR (the guest no longer
    /// knows they are MSI-X structures; the host kernel still owns the real
    /// table).
    Relocate {
        /// The free BAR index used.
        new_bar_index: u8,
        /// Size of the new BAR: a power of two, at least 4 KiB.
        size: u64,
        /// Offset of the PBA in the new BAR (page aligned).
        pba_offset: u64,
    },
}

/// Decides whether to relocate the MSI-X table, like QEMU's
/// `x-msix-relocation`.
///
/// Rule for [`RelocationPolicy::Auto`]: relocate when the table or the PBA
/// lies in a memory BAR of at least [`MSIX_RELOCATION_THRESHOLD`] (2 MiB)
/// that is mmap-able including its MSI-X pages — a BAR that could get huge
/// pages, where the trapped 4 KiB page would split the huge page around it
/// — and a BAR index is free (the lowest free one is used; a 64-bit BAR
/// takes two indices). Otherwise trap pages: the BAR is small, trapped
/// anyway, or the host would not map the MSI-X pages even after
/// relocation. [`RelocationPolicy::Off`] always traps;
/// [`RelocationPolicy::Bar`] relocates to the given index, which must be
/// free. BARs the table or PBA name must exist and contain them.
pub fn relocation(
    cap: &MsixCapability,
    bars: &[BarInfo],
    policy: RelocationPolicy,
) -> Result<MsixPlacement, MsixError> {
    for (what, region) in [("table", cap.table), ("PBA", cap.pba)] {
        let bar_size = bars
            .iter()
            .find(|bar| bar.index == region.bar && !bar.is_io)
            .map_or(0, |bar| bar.size);
        if region.end() > bar_size || region.offset.checked_add(region.size).is_none() {
            return Err(MsixError::OutsideBar {
                what,
                bar: region.bar,
                offset: region.offset,
                size: region.size,
                bar_size,
            });
        }
    }
    let mut used = [false; 6];
    for bar in bars.iter().filter(|bar| bar.size > 0) {
        for index in [Some(bar.index), bar.is_64bit.then_some(bar.index + 1)]
            .into_iter()
            .flatten()
        {
            if let Some(slot) = used.get_mut(usize::from(index)) {
                *slot = true;
            }
        }
    }
    let free = |index: u8| used.get(usize::from(index)) == Some(&false);
    let relocate_to = |index: u8| {
        let pba_offset = cap.table.size.next_multiple_of(MSIX_PAGE_SIZE);
        let size = (pba_offset + cap.pba.size.next_multiple_of(MSIX_PAGE_SIZE)).next_power_of_two();
        MsixPlacement::Relocate {
            new_bar_index: index,
            size,
            pba_offset,
        }
    };
    let trap = || MsixPlacement::TrapPages {
        ranges: cap.trapped_pages(),
    };
    match policy {
        RelocationPolicy::Off => Ok(trap()),
        RelocationPolicy::Bar(index) if free(index) => Ok(relocate_to(index)),
        RelocationPolicy::Bar(index) => Err(MsixError::RelocationBarTaken(index)),
        RelocationPolicy::Auto => {
            let costly = [cap.table.bar, cap.pba.bar].iter().any(|index| {
                bars.iter().any(|bar| {
                    bar.index == *index
                        && !bar.is_io
                        && bar.mmappable
                        && bar.msix_pages_mappable
                        && bar.size >= MSIX_RELOCATION_THRESHOLD
                })
            });
            match (costly, (0..6).find(|index| free(*index))) {
                (true, Some(index)) => Ok(relocate_to(index)),
                _ => Ok(trap()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(vectors: u16) -> MsixTable {
        MsixTable::new(vectors).unwrap()
    }

    fn enabled_table(vectors: u16) -> MsixTable {
        let mut table = table(vectors);
        table.control_write(MSIX_CONTROL_ENABLE);
        table
    }

    fn read(table: &MsixTable, offset: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        table.table_read(offset, &mut data);
        data
    }

    fn read_u32(table: &MsixTable, offset: u64) -> u32 {
        u32::from_le_bytes(read(table, offset, 4).try_into().unwrap())
    }

    fn read_pba(table: &MsixTable, offset: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        table.pba_read(offset, &mut data);
        data
    }

    fn write_u32(table: &mut MsixTable, offset: u64, value: u32) -> Option<MsixEvent> {
        table.table_write(offset, &value.to_le_bytes())
    }

    fn write_u64(table: &mut MsixTable, offset: u64, value: u64) -> Option<MsixEvent> {
        table.table_write(offset, &value.to_le_bytes())
    }

    /// Programs vector `v` with dword writes (as Linux does) and unmasks it.
    fn program(table: &mut MsixTable, v: u16, message: MsiMessage) {
        let base = u64::from(v) * 16;
        write_u32(table, base, message.address as u32);
        write_u32(table, base + 4, (message.address >> 32) as u32);
        write_u32(table, base + 8, message.data);
        write_u32(table, base + 12, 0);
    }

    const MSG: MsiMessage = MsiMessage {
        address: 0xfee0_1000,
        data: 0x4041,
    };

    #[test]
    fn vector_counts_outside_1_to_2048_are_rejected() {
        assert_eq!(MsixTable::new(0), Err(MsixError::VectorCount(0)));
        assert_eq!(MsixTable::new(2049), Err(MsixError::VectorCount(2049)));
        let big = table(2048);
        assert_eq!(big.table_size(), 2048 * 16);
        assert_eq!(big.pba_size(), 256);
        assert_eq!(table(1).pba_size(), 8);
        assert_eq!(table(65).pba_size(), 16);
        assert_eq!(big.message_control(), 0x7ff);
    }

    #[test]
    fn reset_state_has_every_vector_masked_and_nothing_pending() {
        let t = table(5);
        for v in 0..5 {
            assert_eq!(read_u32(&t, u64::from(v) * 16 + 12), 1);
            assert!(t.is_vector_masked(v));
            assert!(!t.is_pending(v));
        }
        assert!(!t.is_enabled());
        assert_eq!(read_pba(&t, 0, 8), [0; 8]);
    }

    #[test]
    fn every_dword_of_every_entry_reads_back_what_was_written() {
        let mut t = table(4);
        for offset in (0..64u64).step_by(4) {
            let value = 0x1234_5678u32.wrapping_mul(offset as u32 + 1) | 0x10;
            write_u32(&mut t, offset, value);
            let expected = match offset % 16 {
                0 => value & !3,
                12 => value & 1,
                _ => value,
            };
            assert_eq!(read_u32(&t, offset), expected, "offset {offset}");
        }
    }

    #[test]
    fn qword_accesses_cover_address_and_data_plus_control() {
        let mut t = table(2);
        assert_eq!(
            write_u64(&mut t, 16, 0x0000_0001_fee0_2000),
            Some(MsixEvent::VectorChanged {
                vector: 1,
                entry: MsixEntry {
                    message: MsiMessage {
                        address: 0x1_fee0_2000,
                        data: 0
                    },
                    masked: true
                }
            })
        );
        let mut data = [0u8; 8];
        t.table_read(16, &mut data);
        assert_eq!(u64::from_le_bytes(data), 0x0000_0001_fee0_2000);
        // Data and control in one qword: data changes and the vector unmasks.
        let event = write_u64(&mut t, 24, 0x0000_0000_0000_0055);
        assert_eq!(
            event,
            Some(MsixEvent::VectorUnmasked {
                vector: 1,
                entry: MsixEntry {
                    message: MsiMessage {
                        address: 0x1_fee0_2000,
                        data: 0x55
                    },
                    masked: false
                },
                deliver: None
            })
        );
        t.table_read(24, &mut data);
        assert_eq!(u64::from_le_bytes(data), 0x55);
        // Masking with a qword that also changes data.
        assert!(matches!(
            write_u64(&mut t, 24, 0x0000_0001_0000_0066),
            Some(MsixEvent::VectorMasked { vector: 1, entry }) if entry.message.data == 0x66
        ));
    }

    #[test]
    fn every_aligned_qword_reads_back_and_matches_its_two_dwords() {
        let mut t = table(3);
        for offset in (0..48u64).step_by(8) {
            let value = 0x0123_4567_89ab_cdefu64.rotate_left(offset as u32) & !0x3;
            write_u64(&mut t, offset, value);
            let mut qword = [0u8; 8];
            t.table_read(offset, &mut qword);
            let low = read_u32(&t, offset);
            let high = read_u32(&t, offset + 4);
            assert_eq!(
                u64::from_le_bytes(qword),
                u64::from(low) | (u64::from(high) << 32),
                "offset {offset}"
            );
            let expected = if offset % 16 == 8 {
                // Data, then vector control with only the mask bit kept.
                (value & 0xffff_ffff) | ((value >> 32) & 1) << 32
            } else {
                value
            };
            assert_eq!(u64::from_le_bytes(qword), expected, "offset {offset}");
        }
    }

    #[test]
    fn writes_that_change_nothing_return_no_event() {
        let mut t = table(1);
        assert_eq!(write_u32(&mut t, 0, 0), None);
        assert_eq!(write_u32(&mut t, 12, 1), None);
        // Reserved vector-control bits are dropped.
        assert_eq!(write_u32(&mut t, 12, 0xffff_fffe | 1), None);
        assert_eq!(read_u32(&t, 12), 1);
    }

    #[test]
    fn misaligned_odd_sized_and_out_of_range_accesses_are_ignored() {
        let mut t = table(2);
        program(&mut t, 0, MSG);
        let before = t.clone();
        for len in [0usize, 1, 2, 3, 5, 6, 7, 16] {
            for offset in 0..40u64 {
                assert_eq!(t.table_write(offset, &vec![0xaa; len]), None);
            }
        }
        for (offset, len) in [(1u64, 4usize), (2, 4), (3, 4), (4, 8), (12, 8), (2, 8)] {
            assert_eq!(t.table_write(offset, &vec![0xaa; len]), None);
            assert_eq!(read(&t, offset, len), vec![0xff; len]);
        }
        // Past the table: 2 vectors are 32 bytes.
        assert_eq!(write_u32(&mut t, 32, 0), None);
        assert_eq!(write_u64(&mut t, 32, 0), None);
        assert_eq!(write_u32(&mut t, u64::MAX - 3, 0), None);
        assert_eq!(write_u64(&mut t, u64::MAX - 7, 0), None);
        assert_eq!(read(&t, 32, 4), [0xff; 4]);
        assert_eq!(read(&t, u64::MAX - 7, 8), [0xff; 8]);
        assert_eq!(read(&t, 0, 2), [0xff; 2]);
        assert_eq!(read(&t, 0, 1), [0xff; 1]);
        assert_eq!(t, before);
        // The last dword and qword in range work.
        assert_eq!(read(&t, 28, 4), [1, 0, 0, 0]);
        assert_eq!(read(&t, 24, 8), [0, 0, 0, 0, 1, 0, 0, 0]);
    }

    #[test]
    fn pba_reads_reflect_pending_vectors_and_writes_are_ignored() {
        let mut t = enabled_table(100);
        for v in [0u16, 3, 31, 32, 63, 64, 99] {
            assert_eq!(t.trigger(v), TriggerAction::Pending);
        }
        let low = (1u64 << 0) | (1 << 3) | (1 << 31) | (1 << 32) | (1 << 63);
        assert_eq!(read_pba(&t, 0, 8), low.to_le_bytes());
        assert_eq!(read_pba(&t, 0, 4), (low as u32).to_le_bytes());
        assert_eq!(read_pba(&t, 4, 4), ((low >> 32) as u32).to_le_bytes());
        let high = 1u64 | (1 << 35);
        assert_eq!(read_pba(&t, 8, 8), high.to_le_bytes());
        assert_eq!(read_pba(&t, 12, 4), 8u32.to_le_bytes());
        // Outside, misaligned, bad widths.
        assert_eq!(read_pba(&t, 16, 4), [0xff; 4]);
        assert_eq!(read_pba(&t, 4, 8), [0xff; 8]);
        assert_eq!(read_pba(&t, 1, 4), [0xff; 4]);
        assert_eq!(read_pba(&t, 0, 2), [0xff; 2]);
        t.pba_write(0, &[0; 8]);
        t.pba_write(0, &[0; 4]);
        assert_eq!(read_pba(&t, 0, 8), low.to_le_bytes());
    }

    #[test]
    fn trigger_delivers_when_unmasked_and_sets_pending_when_masked() {
        let mut t = table(4);
        program(&mut t, 2, MSG);
        // Disabled: dropped, not pending.
        assert_eq!(t.trigger(2), TriggerAction::Dropped);
        assert!(!t.is_pending(2));
        t.control_write(MSIX_CONTROL_ENABLE);
        assert_eq!(t.trigger(2), TriggerAction::Deliver(MSG));
        assert!(!t.is_pending(2));
        // Entry-masked vector 1 goes pending.
        assert_eq!(t.trigger(1), TriggerAction::Pending);
        assert!(t.is_pending(1));
        // Beyond the table.
        assert_eq!(t.trigger(4), TriggerAction::Dropped);
        assert_eq!(t.trigger(u16::MAX), TriggerAction::Dropped);
    }

    #[test]
    fn unmasking_a_pending_vector_delivers_it_once_and_clears_the_bit() {
        let mut t = enabled_table(2);
        program(&mut t, 0, MSG);
        assert_eq!(
            write_u32(&mut t, 12, 1),
            Some(MsixEvent::VectorMasked {
                vector: 0,
                entry: MsixEntry {
                    message: MSG,
                    masked: true
                }
            })
        );
        assert_eq!(t.trigger(0), TriggerAction::Pending);
        assert_eq!(t.trigger(0), TriggerAction::Pending);
        // The guest reprograms while masked; the pending message uses the new data.
        let new = MsiMessage { data: 0x99, ..MSG };
        assert!(matches!(
            write_u32(&mut t, 8, 0x99),
            Some(MsixEvent::VectorChanged { vector: 0, .. })
        ));
        assert_eq!(read_pba(&t, 0, 4), [1, 0, 0, 0]);
        assert_eq!(
            write_u32(&mut t, 12, 0),
            Some(MsixEvent::VectorUnmasked {
                vector: 0,
                entry: MsixEntry {
                    message: new,
                    masked: false
                },
                deliver: Some(new)
            })
        );
        assert!(!t.is_pending(0));
        assert_eq!(read_pba(&t, 0, 4), [0; 4]);
    }

    #[test]
    fn function_mask_holds_interrupts_pending_until_cleared() {
        let mut t = enabled_table(3);
        program(&mut t, 0, MSG);
        program(&mut t, 2, MsiMessage { data: 2, ..MSG });
        let change = t
            .control_write(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK)
            .unwrap();
        assert_eq!(change.function_masked, Some(true));
        assert_eq!(change.enabled, None);
        assert!(t.is_vector_masked(0));
        assert_eq!(t.trigger(0), TriggerAction::Pending);
        assert_eq!(t.trigger(1), TriggerAction::Pending);
        assert_eq!(t.trigger(2), TriggerAction::Pending);
        // Entry unmask under function mask: no delivery yet.
        write_u32(&mut t, 12 + 16, 1);
        assert!(matches!(
            write_u32(&mut t, 16 + 12, 0),
            Some(MsixEvent::VectorUnmasked { deliver: None, .. })
        ));
        write_u32(&mut t, 16 + 12, 1);
        let change = t.control_write(MSIX_CONTROL_ENABLE).unwrap();
        assert_eq!(change.function_masked, Some(false));
        assert_eq!(
            change.deliver,
            vec![(0, MSG), (2, MsiMessage { data: 2, ..MSG })]
        );
        // Vector 1 is still entry-masked and stays pending.
        assert!(t.is_pending(1) && !t.is_pending(0) && !t.is_pending(2));
        assert_eq!(t.control_write(MSIX_CONTROL_ENABLE), None);
    }

    #[test]
    fn control_write_ignores_the_read_only_table_size() {
        let mut t = table(8);
        let change = t.control_write(0x07ff | MSIX_CONTROL_ENABLE).unwrap();
        assert_eq!(change.enabled, Some(true));
        assert_eq!(t.message_control(), 7 | MSIX_CONTROL_ENABLE);
        let change = t.control_write(0).unwrap();
        assert_eq!(change.enabled, Some(false));
        assert!(t.is_vector_masked(0));
    }

    #[test]
    fn disabling_keeps_pending_bits_for_delivery_after_reenable() {
        let mut t = enabled_table(1);
        program(&mut t, 0, MSG);
        write_u32(&mut t, 12, 1);
        assert_eq!(t.trigger(0), TriggerAction::Pending);
        write_u32(&mut t, 12, 0);
        // Delivered at unmask; now pend again via function mask, then disable.
        t.control_write(MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK);
        assert_eq!(t.trigger(0), TriggerAction::Pending);
        t.control_write(0);
        assert!(t.is_pending(0));
        let change = t.control_write(MSIX_CONTROL_ENABLE).unwrap();
        assert_eq!(change.deliver, vec![(0, MSG)]);
        t.reset();
        assert_eq!(t, table(1));
    }

    #[test]
    fn absurd_messages_are_stored_and_flagged_invalid() {
        let mut t = enabled_table(1);
        let absurd = MsiMessage {
            address: 0xdead_beef_0000_0000,
            data: u32::MAX,
        };
        program(&mut t, 0, absurd);
        assert_eq!(t.trigger(0), TriggerAction::Deliver(absurd));
        assert!(!absurd.is_valid_x86());
        assert!(MSG.is_valid_x86());
        assert!(MsiMessage {
            address: 0xfeef_fffc,
            data: 0
        }
        .is_valid_x86());
        assert!(!MsiMessage {
            address: 0xfef0_0000,
            data: 0
        }
        .is_valid_x86());
        assert!(!MsiMessage {
            address: 0xfedf_fffc,
            data: 0
        }
        .is_valid_x86());
        assert!(!MsiMessage {
            address: 0x1_fee0_0000,
            data: 0
        }
        .is_valid_x86());
        let remappable = MsiMessage {
            address: 0xfee0_0010,
            data: 0,
        };
        assert!(remappable.is_remappable_format() && remappable.is_valid_x86());
        assert!(!MSG.is_remappable_format());
        assert_eq!(MSG.to_string(), "address 0xfee01000 data 0x4041");
    }

    #[test]
    fn random_guest_accesses_never_panic() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut t = table(17);
        for _ in 0..20_000 {
            let r = next();
            let len = [0usize, 1, 2, 3, 4, 4, 8, 8, 9][(r % 9) as usize];
            let offset = match (r >> 8) % 3 {
                0 => (r >> 16) % 400,
                1 => r >> 16,
                _ => u64::MAX - (r >> 16) % 16,
            };
            let mut data = vec![(r >> 24) as u8; len];
            match (r >> 4) % 6 {
                0 => t.table_read(offset, &mut data),
                1 => {
                    t.table_write(offset, &data);
                }
                2 => t.pba_read(offset, &mut data),
                3 => t.pba_write(offset, &data),
                4 => {
                    t.control_write((r >> 32) as u16);
                }
                _ => {
                    t.trigger((r >> 40) as u16 % 20);
                }
            }
        }
    }

    /// A config space with an MSI-X capability at 0x70.
    fn config_with_msix(control: u16, table: u32, pba: u32) -> Vec<u8> {
        let mut config = vec![0u8; 256];
        config[0x06] = 0x10;
        config[0x34] = 0x70;
        config[0x70] = CAP_ID_MSIX;
        config[0x72..0x74].copy_from_slice(&control.to_le_bytes());
        config[0x74..0x78].copy_from_slice(&table.to_le_bytes());
        config[0x78..0x7c].copy_from_slice(&pba.to_le_bytes());
        config
    }

    #[test]
    fn capability_is_read_from_config_space() {
        let config = config_with_msix(0x003f, 0x0000_2000, 0x0000_3004);
        let cap = MsixCapability::find(&config).unwrap().unwrap();
        assert_eq!(
            cap,
            MsixCapability {
                offset: 0x70,
                vectors: 64,
                table: BarRegion {
                    bar: 0,
                    offset: 0x2000,
                    size: 1024
                },
                pba: BarRegion {
                    bar: 4,
                    offset: 0x3000,
                    size: 8
                },
            }
        );
        assert_eq!(cap.table_register(), 0x2000);
        assert_eq!(cap.pba_register(), 0x3004);
        assert_eq!(MsixCapability::find(&[0u8; 256]), Ok(None));
    }

    #[test]
    fn broken_capabilities_are_errors() {
        let config = config_with_msix(0, 0x6, 0);
        assert_eq!(
            MsixCapability::find(&config),
            Err(MsixError::ReservedBir {
                what: "table",
                bir: 6
            })
        );
        let config = config_with_msix(0, 0, 0x7);
        assert!(matches!(
            MsixCapability::parse(&config, 0x70),
            Err(MsixError::ReservedBir { bir: 7, .. })
        ));
        let config = config_with_msix(1, 0x1000, 0x1010);
        assert_eq!(
            MsixCapability::parse(&config, 0x70),
            Err(MsixError::TableOverlapsPba { bar: 0 })
        );
        assert!(matches!(
            MsixCapability::parse(&config, 0x40),
            Err(MsixError::NotMsix { id: 0, .. })
        ));
        assert!(matches!(
            MsixCapability::parse(&config, 0xf8),
            Err(MsixError::CapabilityOutside { .. })
        ));
        assert!(MsixCapability::parse(&config, u16::MAX).is_err());
    }

    #[test]
    fn trapped_pages_are_rounded_and_merged_per_bar() {
        let config = config_with_msix(0x003f, 0x0000_2000, 0x0000_3000);
        let cap = MsixCapability::find(&config).unwrap().unwrap();
        assert_eq!(
            cap.trapped_pages(),
            [BarRegion {
                bar: 0,
                offset: 0x2000,
                size: 0x2000
            }]
        );
        // Same page.
        let cap = MsixCapability::parse(&config_with_msix(0x3, 0x800, 0xc00), 0x70).unwrap();
        assert_eq!(
            cap.trapped_pages(),
            [BarRegion {
                bar: 0,
                offset: 0,
                size: 0x1000
            }]
        );
        // 2048 vectors cross pages; PBA in another BAR.
        let cap = MsixCapability::parse(&config_with_msix(0x7ff, 0x1800, 0x2), 0x70).unwrap();
        assert_eq!(
            cap.trapped_pages(),
            [
                BarRegion {
                    bar: 0,
                    offset: 0x1000,
                    size: 0x9000
                },
                BarRegion {
                    bar: 2,
                    offset: 0,
                    size: 0x1000
                }
            ]
        );
        // Same BAR, far apart pages.
        let cap = MsixCapability::parse(&config_with_msix(0, 0, 0x10_0000), 0x70).unwrap();
        assert_eq!(cap.trapped_pages().len(), 2);
    }

    #[test]
    fn message_control_writes_of_every_width_and_offset() {
        let cap = MsixCapability::parse(&config_with_msix(0x7, 0, 0x1000), 0x70).unwrap();
        let current = 0x0007;
        // Dword at the capability start: ID, next, control.
        assert_eq!(
            cap.message_control_write(0x70, &[0xff, 0xff, 0xff, 0xff], current),
            Some(0xc007)
        );
        assert_eq!(
            cap.message_control_write(0x72, &0x8000u16.to_le_bytes(), current),
            Some(0x8007)
        );
        assert_eq!(
            cap.message_control_write(0x73, &[0x40], current),
            Some(0x4007)
        );
        assert_eq!(
            cap.message_control_write(0x72, &[0xff], current),
            Some(0x0007)
        );
        assert_eq!(
            cap.message_control_write(0x70, &[0xff, 0xff], current),
            None
        );
        assert_eq!(cap.message_control_write(0x74, &[0xff; 4], current), None);
        assert_eq!(cap.message_control_write(0x6c, &[0xff; 4], current), None);
        assert_eq!(
            cap.message_control_write(u16::MAX, &[0xff; 4], current),
            None
        );
        // Clearing keeps the size.
        assert_eq!(
            cap.message_control_write(0x73, &[0x00], 0xc007),
            Some(0x0007)
        );
    }

    #[test]
    fn overlay_shows_control_and_relocated_registers() {
        let cap = MsixCapability::parse(&config_with_msix(0x7, 0x2000, 0x3000), 0x70).unwrap();
        let placement = MsixPlacement::Relocate {
            new_bar_index: 3,
            size: 0x2000,
            pba_offset: 0x1000,
        };
        let moved = cap.relocated(&placement);
        assert_eq!(moved.table_register(), 3);
        assert_eq!(moved.pba_register(), 0x1003);
        assert_eq!(
            cap.relocated(&MsixPlacement::TrapPages { ranges: vec![] }),
            cap
        );
        let config = config_with_msix(0x7, 0x2000, 0x3000);
        let mut expected = config.clone();
        expected[0x72..0x74].copy_from_slice(&0x8007u16.to_le_bytes());
        expected[0x74..0x78].copy_from_slice(&3u32.to_le_bytes());
        expected[0x78..0x7c].copy_from_slice(&0x1003u32.to_le_bytes());
        for offset in 0x68u16..0x80 {
            for len in [1usize, 2, 4] {
                let start = usize::from(offset);
                let mut data = config[start..start + len].to_vec();
                moved.overlay(offset, &mut data, 0x8007);
                assert_eq!(data, &expected[start..start + len], "{offset:#x} {len}");
            }
        }
    }

    fn bar(index: u8, size: u64, is_64bit: bool) -> BarInfo {
        BarInfo {
            index,
            size,
            is_64bit,
            is_io: false,
            mmappable: true,
            msix_pages_mappable: true,
        }
    }

    #[test]
    fn a_table_in_a_large_mappable_bar_is_relocated_to_the_first_free_index() {
        // GPU-like: BAR0 16 MiB (table+PBA), BAR1/2 256 MiB 64-bit, BAR3/4 32 MiB 64-bit.
        let cap =
            MsixCapability::parse(&config_with_msix(0x7ff, 0xb_0000, 0xc_0000), 0x70).unwrap();
        let bars = [
            bar(0, 16 << 20, false),
            bar(1, 256 << 20, true),
            bar(3, 32 << 20, true),
        ];
        assert_eq!(
            relocation(&cap, &bars, RelocationPolicy::Auto),
            Ok(MsixPlacement::Relocate {
                new_bar_index: 5,
                size: 0x10000,
                pba_offset: 0x8000
            })
        );
        let moved = cap.relocated(&relocation(&cap, &bars, RelocationPolicy::Auto).unwrap());
        assert_eq!((moved.table.bar, moved.table.offset), (5, 0));
        assert_eq!((moved.pba.bar, moved.pba.offset), (5, 0x8000));
        // Off: trap.
        assert_eq!(
            relocation(&cap, &bars, RelocationPolicy::Off),
            Ok(MsixPlacement::TrapPages {
                ranges: cap.trapped_pages()
            })
        );
        // All indices taken: trap.
        let full = [
            bar(0, 16 << 20, false),
            bar(1, 256 << 20, true),
            bar(3, 32 << 20, true),
            bar(5, 4096, false),
        ];
        assert!(matches!(
            relocation(&cap, &full, RelocationPolicy::Auto),
            Ok(MsixPlacement::TrapPages { .. })
        ));
        assert_eq!(
            relocation(&cap, &full, RelocationPolicy::Bar(5)),
            Err(MsixError::RelocationBarTaken(5))
        );
        assert_eq!(
            relocation(&cap, &full, RelocationPolicy::Bar(2)),
            Err(MsixError::RelocationBarTaken(2))
        );
        assert_eq!(
            relocation(&cap, &full, RelocationPolicy::Bar(6)),
            Err(MsixError::RelocationBarTaken(6))
        );
    }

    #[test]
    fn a_table_in_a_small_or_trapped_bar_stays_trapped() {
        // NVMe-like: BAR0 16 KiB with table at 0x2000, PBA at 0x3000.
        let cap = MsixCapability::parse(&config_with_msix(0x1f, 0x2000, 0x3000), 0x70).unwrap();
        let bars = [bar(0, 16 << 10, true)];
        assert_eq!(
            relocation(&cap, &bars, RelocationPolicy::Auto),
            Ok(MsixPlacement::TrapPages {
                ranges: vec![BarRegion {
                    bar: 0,
                    offset: 0x2000,
                    size: 0x2000
                }]
            })
        );
        // Big but not mmap-able: trapping costs nothing more.
        let bars = [BarInfo {
            mmappable: false,
            ..bar(0, 1 << 30, true)
        }];
        assert!(matches!(
            relocation(&cap, &bars, RelocationPolicy::Auto),
            Ok(MsixPlacement::TrapPages { .. })
        ));
        // Big and mmap-able, but the host keeps the MSI-X pages unmapped:
        // relocating would not bring the huge page back.
        let host_traps_msix = [BarInfo {
            msix_pages_mappable: false,
            ..bar(0, 1 << 30, true)
        }];
        assert!(matches!(
            relocation(&cap, &host_traps_msix, RelocationPolicy::Auto),
            Ok(MsixPlacement::TrapPages { .. })
        ));
        // Explicit relocation to a free index works for small BARs too.
        assert_eq!(
            relocation(&cap, &bars, RelocationPolicy::Bar(2)),
            Ok(MsixPlacement::Relocate {
                new_bar_index: 2,
                size: 0x2000,
                pba_offset: 0x1000
            })
        );
        // Exactly at the threshold relocates.
        let bars = [bar(0, MSIX_RELOCATION_THRESHOLD, false)];
        assert!(matches!(
            relocation(&cap, &bars, RelocationPolicy::Auto),
            Ok(MsixPlacement::Relocate {
                new_bar_index: 1,
                ..
            })
        ));
    }

    #[test]
    fn structures_outside_their_bar_are_errors() {
        let cap = MsixCapability::parse(&config_with_msix(0x1f, 0x2000, 0x3000), 0x70).unwrap();
        assert_eq!(
            relocation(&cap, &[bar(0, 0x2000, false)], RelocationPolicy::Auto),
            Err(MsixError::OutsideBar {
                what: "table",
                bar: 0,
                offset: 0x2000,
                size: 512,
                bar_size: 0x2000
            })
        );
        assert!(matches!(
            relocation(&cap, &[], RelocationPolicy::Off),
            Err(MsixError::OutsideBar { bar_size: 0, .. })
        ));
        let io = BarInfo {
            is_io: true,
            ..bar(0, 1 << 16, false)
        };
        assert!(relocation(&cap, &[io], RelocationPolicy::Off).is_err());
    }
}
