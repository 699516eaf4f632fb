//! The MSI-X table and PBA of one function as a state machine
//! ([`MsixTable`]): guest reads and writes of entries and pending bits, the
//! Message Control enable and function mask, and device interrupts, each
//! returning what changed ([`MsixEvent`], [`MsixControlChange`],
//! [`TriggerAction`]). Also the message a vector carries ([`MsiMessage`]),
//! with its x86 address check.
//!
//! The access and masking rules it implements are in the `msix` module docs.

use std::fmt;

use super::{
    MsixError, DWORD, MSIX_CONTROL_ENABLE, MSIX_CONTROL_FUNCTION_MASK, MSIX_ENTRY_SIZE,
    MSIX_MAX_VECTORS, MSIX_VECTOR_CONTROL_MASK, QWORD,
};

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
/// The MSI address of aarch64 guests: barge's ITS's `GITS_TRANSLATER`.
pub const AARCH64_MSI_ADDRESS: u64 = arch::aarch64::layout::GIC_ITS_TRANSLATER;
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

    /// Whether the guest's interrupt controller receives this message: on
    /// x86_64 [`Self::is_valid_x86`]; on aarch64 a write to the GICv3 ITS's
    /// `GITS_TRANSLATER` ([`AARCH64_MSI_ADDRESS`]), which the device tree's
    /// `msi-map` gives the guest.
    pub fn is_deliverable(&self) -> bool {
        if cfg!(target_arch = "aarch64") {
            self.address == AARCH64_MSI_ADDRESS
        } else {
            self.is_valid_x86()
        }
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
    VectorChanged { vector: u16, entry: MsixEntry },
    /// The entry's mask bit was set (address or data may have changed in
    /// the same qword write; `entry` has them).
    VectorMasked { vector: u16, entry: MsixEntry },
    /// The entry's mask bit was cleared.
    VectorUnmasked {
        vector: u16,
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
    /// [`MsixCapability::message_control_write`](super::MsixCapability::message_control_write));
    /// only the enable and function-mask bits are taken, the table size is
    /// read-only. Returns what changed, with the pending vectors to deliver
    /// now.
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
}
