//! MSI: the MSI capability's registers as a state machine.
//!
//! Pure logic: no KVM, no VFIO. The model is built from the Message
//! Control value the device reports (multiple message capable, 64-bit
//! address, per-vector masking, extended message data) and holds what the
//! guest programs. The VMM overlays guest configuration reads with
//! [`MsiCapability::read`], passes guest configuration writes to
//! [`MsiCapability::write`] and turns the returned [`MsiEvent`]s into KVM
//! GSI routes and irqfds.
//!
//! # Layout (offsets from the capability)
//!
//! | format            | address | upper address | data | mask | pending | size |
//! |-------------------|---------|---------------|------|------|---------|------|
//! | 32-bit            | 0x04    | -             | 0x08 | -    | -       | 0x0C |
//! | 64-bit            | 0x04    | 0x08          | 0x0C | -    | -       | 0x10 |
//! | 32-bit + masking  | 0x04    | -             | 0x08 | 0x0C | 0x10    | 0x14 |
//! | 64-bit + masking  | 0x04    | 0x08          | 0x0C | 0x10 | 0x14    | 0x18 |
//!
//! The data register is 16 bits, followed by the 16-bit extended message
//! data register (writable only when the device is extended-data capable;
//! it counts only while extended data is enabled). Without masking the
//! spec's sizes are 0x0A/0x0E; the model claims the whole last dword, which
//! no other capability can share (capabilities start dword aligned).
//!
//! # Guest accesses
//!
//! Reads and writes take absolute configuration-space offsets and any
//! width or alignment; only the bytes inside the capability from Message
//! Control on are handled (ID and next pointer are the caller's). Writable
//! bits: enable, multiple message enable (a value above what the device
//! advertises, or a reserved value, is clamped to the advertised count),
//! extended data enable (when capable), address (bits 1:0 are zero),
//! upper address (64-bit only), data, extended data (when capable), and
//! the mask bits of implemented vectors. Pending bits and everything else
//! are read-only. Nothing a guest writes can panic; absurd addresses and
//! data are stored as written (see [`MsiMessage::is_valid_x86`]).

use super::caps::{standard_capabilities, CapabilityId, CAP_ID_MSI};
pub use super::msix::{MsiMessage, TriggerAction};

/// Offset of Message Control inside the capability.
pub const MSI_CONTROL_OFFSET: u16 = 2;
/// Offset of Message Address (low dword) inside the capability.
pub const MSI_ADDRESS_OFFSET: u16 = 4;
/// Message Control: MSI enable (RW).
pub const MSI_CONTROL_ENABLE: u16 = 1 << 0;
/// Message Control: multiple message capable, log2 of the vectors (RO).
pub const MSI_CONTROL_MMC_MASK: u16 = 0b111 << 1;
/// Message Control: multiple message enable, log2 of the vectors (RW).
pub const MSI_CONTROL_MME_MASK: u16 = 0b111 << 4;
/// Message Control: 64-bit address capable (RO).
pub const MSI_CONTROL_64BIT: u16 = 1 << 7;
/// Message Control: per-vector masking capable (RO).
pub const MSI_CONTROL_PER_VECTOR_MASK: u16 = 1 << 8;
/// Message Control: extended message data capable (RO).
pub const MSI_CONTROL_EXT_DATA_CAPABLE: u16 = 1 << 9;
/// Message Control: extended message data enable (RW when capable).
pub const MSI_CONTROL_EXT_DATA_ENABLE: u16 = 1 << 10;
/// Largest number of MSI vectors.
pub const MSI_MAX_VECTORS: u8 = 32;
/// Largest size of the capability.
pub const MSI_MAX_CAPABILITY_SIZE: u16 = 0x18;

const MAX_LOG2_VECTORS: u16 = 5;

/// Errors from reading the MSI capability a device reports (never caused
/// by the guest).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MsiError {
    /// The capability lies (partly) outside the configuration space given.
    #[error("MSI capability at {offset:#x} does not fit in a {len}-byte configuration space; read the full configuration space")]
    CapabilityOutside {
        /// Offset of the capability.
        offset: u16,
        /// Length of the configuration space buffer.
        len: usize,
    },
    /// The capability at the offset is not an MSI capability.
    #[error("capability at {offset:#x} has ID {id:#04x}, not MSI (0x05); pass the MSI capability's offset")]
    NotMsi {
        /// Offset of the capability.
        offset: u16,
        /// The ID found there.
        id: u8,
    },
}

/// Something a guest write to the MSI capability changed. One write may
/// yield several, in this order: message, vectors, mask, then enable or
/// disable. [`MsiEvent::Enabled`] carries the full state, so a VMM that
/// sets everything up at enable may ignore the others of the same write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MsiEvent {
    /// MSI was enabled.
    Enabled {
        /// The base message (vector 0).
        message: MsiMessage,
        /// Vectors enabled (1, 2, 4, 8, 16 or 32).
        vectors: u8,
        /// Mask bits (0 without per-vector masking).
        mask: u32,
    },
    /// MSI was disabled.
    Disabled,
    /// Multiple message enable changed.
    VectorsChanged {
        /// Vectors enabled now.
        vectors: u8,
    },
    /// Address, upper address, data, extended data or extended data enable
    /// changed.
    MessageChanged {
        /// The base message (vector 0) now.
        message: MsiMessage,
    },
    /// The mask bits changed (per-vector masking only).
    MaskChanged {
        /// Mask bits before.
        old: u32,
        /// Mask bits now.
        new: u32,
        /// Vectors that were unmasked with their pending bit set while MSI
        /// is enabled, with the message to deliver once each; their pending
        /// bits have been cleared.
        deliver: Vec<(u8, MsiMessage)>,
    },
}

/// The emulated MSI capability of one function. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MsiCapability {
    offset: u16,
    /// Registers from the capability start, as the guest reads them.
    bytes: [u8; MSI_MAX_CAPABILITY_SIZE as usize],
    /// Per-byte guest write masks.
    write_mask: [u8; MSI_MAX_CAPABILITY_SIZE as usize],
}

impl MsiCapability {
    /// An MSI capability at `offset` with the read-only features of
    /// `control` (multiple message capable clamped to 32 vectors, 64-bit,
    /// per-vector masking, extended data capable), in reset state:
    /// disabled, one vector, address, data, mask and pending bits 0.
    pub fn new(offset: u16, control: u16) -> Self {
        let mmc = ((control & MSI_CONTROL_MMC_MASK) >> 1).min(MAX_LOG2_VECTORS);
        let features =
            MSI_CONTROL_64BIT | MSI_CONTROL_PER_VECTOR_MASK | MSI_CONTROL_EXT_DATA_CAPABLE;
        let control = (control & features) | (mmc << 1);
        let mut cap = Self {
            offset,
            bytes: [0; MSI_MAX_CAPABILITY_SIZE as usize],
            write_mask: [0; MSI_MAX_CAPABILITY_SIZE as usize],
        };
        cap.bytes[2..4].copy_from_slice(&control.to_le_bytes());
        let mut control_mask = MSI_CONTROL_ENABLE | MSI_CONTROL_MME_MASK;
        if cap.ext_data_capable() {
            control_mask |= MSI_CONTROL_EXT_DATA_ENABLE;
        }
        cap.write_mask[2..4].copy_from_slice(&control_mask.to_le_bytes());
        cap.write_mask[4..8].copy_from_slice(&0xffff_fffcu32.to_le_bytes());
        if cap.is_64bit() {
            cap.write_mask[8..12].fill(0xff);
        }
        let data = usize::from(cap.data_offset());
        let data_mask: u32 = if cap.ext_data_capable() {
            u32::MAX
        } else {
            0xffff
        };
        cap.write_mask[data..data + 4].copy_from_slice(&data_mask.to_le_bytes());
        if let Some(mask) = cap.mask_offset() {
            let mask = usize::from(mask);
            let implemented = cap.implemented_vectors();
            cap.write_mask[mask..mask + 4].copy_from_slice(&implemented.to_le_bytes());
        }
        cap
    }

    /// Finds the MSI capability in the standard list of `config` (a
    /// configuration space from offset 0) and builds the model from its
    /// Message Control. `Ok(None)` when the device has none.
    pub fn find(config: &[u8]) -> Result<Option<Self>, MsiError> {
        standard_capabilities(config)
            .capabilities
            .iter()
            .find(|cap| cap.id == CapabilityId::Standard(CAP_ID_MSI))
            .map(|cap| Self::parse(config, cap.offset))
            .transpose()
    }

    /// Builds the model from the MSI capability at `offset` of `config`.
    pub fn parse(config: &[u8], offset: u16) -> Result<Self, MsiError> {
        let start = usize::from(offset);
        let bytes = config
            .get(start..start + 4)
            .ok_or(MsiError::CapabilityOutside {
                offset,
                len: config.len(),
            })?;
        if bytes[0] != CAP_ID_MSI {
            return Err(MsiError::NotMsi {
                offset,
                id: bytes[0],
            });
        }
        let cap = Self::new(offset, u16::from_le_bytes([bytes[2], bytes[3]]));
        if config.len() < start + usize::from(cap.size()) {
            return Err(MsiError::CapabilityOutside {
                offset,
                len: config.len(),
            });
        }
        Ok(cap)
    }

    /// Back to the reset state (device reset, guest reboot).
    pub fn reset(&mut self) {
        *self = Self::new(self.offset, self.control());
    }

    /// Offset of the capability in configuration space.
    pub fn offset(&self) -> u16 {
        self.offset
    }

    /// Size of the capability in bytes (see the module docs' table).
    pub fn size(&self) -> u16 {
        match self.mask_offset() {
            Some(mask) => mask + 8,
            None => self.data_offset() + 4,
        }
    }

    /// Message Control as the guest reads it.
    pub fn control(&self) -> u16 {
        u16::from_le_bytes([self.bytes[2], self.bytes[3]])
    }

    /// Whether the address is 64-bit.
    pub fn is_64bit(&self) -> bool {
        self.control() & MSI_CONTROL_64BIT != 0
    }

    /// Whether the device has per-vector masking.
    pub fn has_per_vector_mask(&self) -> bool {
        self.control() & MSI_CONTROL_PER_VECTOR_MASK != 0
    }

    fn ext_data_capable(&self) -> bool {
        self.control() & MSI_CONTROL_EXT_DATA_CAPABLE != 0
    }

    /// MSI enable.
    pub fn is_enabled(&self) -> bool {
        self.control() & MSI_CONTROL_ENABLE != 0
    }

    /// Vectors the device advertises (1..=32).
    pub fn vectors_capable(&self) -> u8 {
        1 << ((self.control() & MSI_CONTROL_MMC_MASK) >> 1)
    }

    /// Vectors the guest enabled (1..=32, at most [`Self::vectors_capable`]).
    pub fn vectors_enabled(&self) -> u8 {
        1 << ((self.control() & MSI_CONTROL_MME_MASK) >> 4)
    }

    /// The mask bits (0 without per-vector masking).
    pub fn mask_bits(&self) -> u32 {
        self.mask_offset().map_or(0, |offset| self.dword(offset))
    }

    /// The pending bits (0 without per-vector masking).
    pub fn pending_bits(&self) -> u32 {
        self.mask_offset()
            .map_or(0, |offset| self.dword(offset + 4))
    }

    /// The base message (vector 0) as programmed.
    pub fn base_message(&self) -> MsiMessage {
        let mut address = u64::from(self.dword(MSI_ADDRESS_OFFSET));
        if self.is_64bit() {
            address |= u64::from(self.dword(8)) << 32;
        }
        let data = self.dword(self.data_offset());
        let data = if self.control() & MSI_CONTROL_EXT_DATA_ENABLE != 0 {
            data
        } else {
            data & 0xffff
        };
        MsiMessage { address, data }
    }

    /// The message of `vector` (the base data with its low log2(vectors
    /// enabled) bits replaced by the vector number), or `None` when the
    /// vector is not enabled.
    pub fn message(&self, vector: u8) -> Option<MsiMessage> {
        let vectors = self.vectors_enabled();
        (vector < vectors).then(|| {
            let base = self.base_message();
            let low = u32::from(vectors) - 1;
            MsiMessage {
                data: (base.data & !low) | u32::from(vector),
                ..base
            }
        })
    }

    /// Whether `vector` is masked (by its mask bit; vectors not enabled
    /// count as masked).
    pub fn is_vector_masked(&self, vector: u8) -> bool {
        vector >= self.vectors_enabled() || self.mask_bits() & (1 << vector) != 0
    }

    /// A device interrupt on `vector`: deliver it, set its pending bit
    /// while it is masked, or drop it while MSI is disabled or the vector
    /// is not enabled.
    pub fn trigger(&mut self, vector: u8) -> TriggerAction {
        if !self.is_enabled() || vector >= self.vectors_enabled() {
            return TriggerAction::Dropped;
        }
        if self.is_vector_masked(vector) {
            let pending = self.pending_bits() | (1 << vector);
            self.set_pending(pending);
            return TriggerAction::Pending;
        }
        self.message(vector)
            .map_or(TriggerAction::Dropped, TriggerAction::Deliver)
    }

    /// Patches `data`, read at absolute configuration offset `offset`, with
    /// the capability's registers from Message Control to its end; other
    /// bytes (ID, next pointer, outside the capability) are left alone.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            if let Some(index) = self.index(usize::from(offset) + i) {
                *byte = self.bytes[index];
            }
        }
    }

    /// A guest write of `data` at absolute configuration offset `offset`
    /// (any width and alignment); bytes outside the capability's registers
    /// are ignored. Returns what changed (empty when nothing did).
    pub fn write(&mut self, offset: u16, data: &[u8]) -> Vec<MsiEvent> {
        let old = self.clone();
        for (i, value) in data.iter().enumerate() {
            if let Some(index) = self.index(usize::from(offset) + i) {
                let mask = self.write_mask[index];
                self.bytes[index] = (self.bytes[index] & !mask) | (value & mask);
            }
        }
        // Clamp multiple message enable to what is advertised.
        let control = self.control();
        let mmc = (control & MSI_CONTROL_MMC_MASK) >> 1;
        let mme = (control & MSI_CONTROL_MME_MASK) >> 4;
        if mme > mmc {
            log::debug!("msi: multiple message enable {mme} above capable {mmc}, clamped");
            let control = (control & !MSI_CONTROL_MME_MASK) | (mmc << 4);
            self.bytes[2..4].copy_from_slice(&control.to_le_bytes());
        }
        self.events(&old)
    }

    fn events(&mut self, old: &Self) -> Vec<MsiEvent> {
        let mut events = Vec::new();
        if self.base_message() != old.base_message() {
            events.push(MsiEvent::MessageChanged {
                message: self.base_message(),
            });
        }
        if self.vectors_enabled() != old.vectors_enabled() {
            events.push(MsiEvent::VectorsChanged {
                vectors: self.vectors_enabled(),
            });
        }
        if self.mask_bits() != old.mask_bits() {
            let mut deliver = Vec::new();
            if self.is_enabled() {
                let unmasked = old.mask_bits() & !self.mask_bits() & self.pending_bits();
                for vector in 0..self.vectors_enabled() {
                    if unmasked & (1 << vector) != 0 {
                        if let Some(message) = self.message(vector) {
                            deliver.push((vector, message));
                        }
                        self.set_pending(self.pending_bits() & !(1 << vector));
                    }
                }
            }
            events.push(MsiEvent::MaskChanged {
                old: old.mask_bits(),
                new: self.mask_bits(),
                deliver,
            });
        }
        match (old.is_enabled(), self.is_enabled()) {
            (false, true) => events.push(MsiEvent::Enabled {
                message: self.base_message(),
                vectors: self.vectors_enabled(),
                mask: self.mask_bits(),
            }),
            (true, false) => events.push(MsiEvent::Disabled),
            _ => {}
        }
        events
    }

    /// Index into `bytes` of absolute configuration offset `at`, for the
    /// registers from Message Control to the capability's end.
    fn index(&self, at: usize) -> Option<usize> {
        let index = at.checked_sub(usize::from(self.offset))?;
        (usize::from(MSI_CONTROL_OFFSET)..usize::from(self.size()))
            .contains(&index)
            .then_some(index)
    }

    fn data_offset(&self) -> u16 {
        if self.is_64bit() {
            0x0c
        } else {
            0x08
        }
    }

    fn mask_offset(&self) -> Option<u16> {
        self.has_per_vector_mask().then(|| self.data_offset() + 4)
    }

    fn implemented_vectors(&self) -> u32 {
        u32::MAX >> (32 - u32::from(self.vectors_capable()))
    }

    fn set_pending(&mut self, pending: u32) {
        if let Some(mask) = self.mask_offset() {
            let at = usize::from(mask) + 4;
            let pending = pending & self.implemented_vectors();
            self.bytes[at..at + 4].copy_from_slice(&pending.to_le_bytes());
        }
    }

    fn dword(&self, offset: u16) -> u32 {
        let at = usize::from(offset);
        self.bytes
            .get(at..at + 4)
            .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: u16 = 0x50;

    fn cap(control: u16) -> MsiCapability {
        MsiCapability::new(CAP, control)
    }

    /// 64-bit, per-vector masking, 8 vectors capable.
    fn full() -> MsiCapability {
        cap(MSI_CONTROL_64BIT | MSI_CONTROL_PER_VECTOR_MASK | (3 << 1))
    }

    fn read(c: &MsiCapability, offset: u16, len: usize) -> Vec<u8> {
        let mut data = vec![0xee; len];
        c.read(CAP + offset, &mut data);
        data
    }

    fn read_u32(c: &MsiCapability, offset: u16) -> u32 {
        u32::from_le_bytes(read(c, offset, 4).try_into().unwrap())
    }

    fn write_u32(c: &mut MsiCapability, offset: u16, value: u32) -> Vec<MsiEvent> {
        c.write(CAP + offset, &value.to_le_bytes())
    }

    fn write_u16(c: &mut MsiCapability, offset: u16, value: u16) -> Vec<MsiEvent> {
        c.write(CAP + offset, &value.to_le_bytes())
    }

    #[test]
    fn layouts_and_sizes_follow_the_capability_bits() {
        assert_eq!(cap(0).size(), 0x0c);
        assert_eq!(cap(MSI_CONTROL_64BIT).size(), 0x10);
        assert_eq!(cap(MSI_CONTROL_PER_VECTOR_MASK).size(), 0x14);
        assert_eq!(full().size(), 0x18);
        assert_eq!(cap(0).vectors_capable(), 1);
        assert_eq!(full().vectors_capable(), 8);
        assert_eq!(cap(7 << 1).vectors_capable(), 32);
        assert_eq!(cap(7 << 1).control() & MSI_CONTROL_MMC_MASK, 5 << 1);
        // The guest cannot see bits the device did not set, nor written RW state.
        let c = cap(0xffff);
        assert_eq!(c.control(), 0x038a);
        assert!(!c.is_enabled());
    }

    #[test]
    fn reads_overlay_only_the_registers_after_the_header() {
        let c = full();
        // ID and next are the caller's.
        assert_eq!(read(&c, 0, 2), [0xee, 0xee]);
        assert_eq!(read(&c, 0, 4), [0xee, 0xee, 0x86, 0x01]);
        assert_eq!(read(&c, 0x18, 4), [0xee; 4]);
        let mut data = [0xee; 4];
        c.read(CAP - 4, &mut data);
        assert_eq!(data, [0xee; 4]);
        c.read(u16::MAX, &mut data);
        assert_eq!(data, [0xee; 4]);
        assert_eq!(read(&c, 0x14, 4), [0; 4]);
    }

    #[test]
    fn programming_a_64bit_capability_with_linux_style_writes() {
        let mut c = full();
        assert_eq!(
            write_u32(&mut c, 4, 0xfee0_100f),
            vec![MsiEvent::MessageChanged {
                message: MsiMessage {
                    address: 0xfee0_100c,
                    data: 0
                }
            }]
        );
        assert_eq!(read_u32(&c, 4), 0xfee0_100c);
        write_u32(&mut c, 8, 0);
        assert!(write_u32(&mut c, 8, 0).is_empty());
        write_u16(&mut c, 0x0c, 0x4020);
        // Extended data is not capable: its bytes are read-only.
        write_u16(&mut c, 0x0e, 0xffff);
        assert_eq!(read_u32(&c, 0x0c), 0x4020);
        let events = write_u16(&mut c, 2, MSI_CONTROL_ENABLE | (2 << 4));
        let message = MsiMessage {
            address: 0xfee0_100c,
            data: 0x4020,
        };
        assert_eq!(
            events,
            vec![
                MsiEvent::VectorsChanged { vectors: 4 },
                MsiEvent::Enabled {
                    message,
                    vectors: 4,
                    mask: 0
                }
            ]
        );
        assert_eq!(c.message(3).unwrap().data, 0x4023);
        assert_eq!(c.message(4), None);
        assert_eq!(write_u16(&mut c, 2, 2 << 4), vec![MsiEvent::Disabled]);
    }

    #[test]
    fn a_32bit_capability_has_data_at_8_and_no_upper_address() {
        let mut c = cap(MSI_CONTROL_PER_VECTOR_MASK);
        write_u32(&mut c, 4, 0xfee0_0000);
        write_u32(&mut c, 8, 0xffff_0041);
        assert_eq!(
            c.base_message(),
            MsiMessage {
                address: 0xfee0_0000,
                data: 0x41
            }
        );
        assert_eq!(read_u32(&c, 8), 0x41);
        // Only one vector: only mask bit 0 is writable.
        write_u32(&mut c, 0x0c, u32::MAX);
        assert_eq!(c.mask_bits(), 1);
        // Pending is read-only.
        write_u32(&mut c, 0x10, u32::MAX);
        assert_eq!(c.pending_bits(), 0);
    }

    #[test]
    fn extended_message_data_counts_only_when_enabled() {
        let mut c = cap(MSI_CONTROL_EXT_DATA_CAPABLE);
        write_u32(&mut c, 8, 0x1234_5678);
        assert_eq!(c.base_message().data, 0x5678);
        let events = write_u16(&mut c, 2, MSI_CONTROL_EXT_DATA_ENABLE);
        assert_eq!(
            events,
            vec![MsiEvent::MessageChanged {
                message: MsiMessage {
                    address: 0,
                    data: 0x1234_5678
                }
            }]
        );
    }

    #[test]
    fn multiple_message_enable_is_clamped_to_what_is_advertised() {
        let mut c = full();
        for (written, expected) in [(0u16, 1u8), (1, 2), (3, 8), (4, 8), (5, 8), (6, 8), (7, 8)] {
            write_u16(&mut c, 2, written << 4);
            assert_eq!(c.vectors_enabled(), expected, "mme {written}");
            assert_eq!(
                (c.control() & MSI_CONTROL_MME_MASK) >> 4,
                u16::from(expected.trailing_zeros() as u8)
            );
        }
        let mut single = cap(0);
        assert!(write_u16(&mut single, 2, 7 << 4).is_empty());
        assert_eq!(single.vectors_enabled(), 1);
    }

    #[test]
    fn every_width_and_odd_offset_writes_only_its_bytes() {
        let mut reference = full();
        for offset in 0..0x1cu16 {
            for len in [1usize, 2, 4] {
                let mut c = full();
                let data = vec![0xa5u8; len];
                c.write(CAP + offset, &data);
                // Byte by byte gives the same state (clamping aside, MME 0b010 fits).
                let mut bytewise = full();
                for (i, byte) in data.iter().enumerate() {
                    bytewise.write(CAP + offset + i as u16, &[*byte]);
                }
                assert_eq!(c.bytes, bytewise.bytes, "{offset:#x} {len}");
                reference.write(CAP + offset, &data);
            }
        }
        // Writable bits of 0xa5 everywhere: MME 0b010, enable 1.
        assert_eq!(reference.control(), 0x0186 | 0x21);
        assert_eq!(read_u32(&reference, 4), 0xa5a5_a5a4);
        assert_eq!(read_u32(&reference, 8), 0xa5a5_a5a5);
        assert_eq!(read_u32(&reference, 0x0c), 0x0000_a5a5);
        assert_eq!(reference.mask_bits(), 0xa5);
        assert_eq!(reference.pending_bits(), 0);
    }

    #[test]
    fn masked_vectors_go_pending_and_deliver_when_unmasked() {
        let mut c = full();
        write_u32(&mut c, 4, 0xfee0_0000);
        write_u16(&mut c, 0x0c, 0x30);
        write_u32(&mut c, 0x10, 0b0110);
        assert_eq!(c.trigger(1), TriggerAction::Dropped);
        write_u16(&mut c, 2, MSI_CONTROL_ENABLE | (2 << 4));
        assert_eq!(
            c.trigger(0),
            TriggerAction::Deliver(MsiMessage {
                address: 0xfee0_0000,
                data: 0x30
            })
        );
        assert_eq!(c.trigger(1), TriggerAction::Pending);
        assert_eq!(c.trigger(2), TriggerAction::Pending);
        assert_eq!(c.trigger(4), TriggerAction::Dropped);
        assert_eq!(read_u32(&c, 0x14), 0b0110);
        let events = write_u32(&mut c, 0x10, 0b0100);
        assert_eq!(
            events,
            vec![MsiEvent::MaskChanged {
                old: 0b0110,
                new: 0b0100,
                deliver: vec![(
                    1,
                    MsiMessage {
                        address: 0xfee0_0000,
                        data: 0x31
                    }
                )]
            }]
        );
        assert_eq!(c.pending_bits(), 0b0100);
        // Byte-wide mask write.
        let events = c.write(CAP + 0x10, &[0]);
        assert!(
            matches!(&events[..], [MsiEvent::MaskChanged { deliver, .. }] if deliver.len() == 1)
        );
        assert_eq!(c.pending_bits(), 0);
    }

    #[test]
    fn without_per_vector_masking_nothing_is_masked_or_pending() {
        let mut c = cap(MSI_CONTROL_64BIT);
        write_u16(&mut c, 2, MSI_CONTROL_ENABLE);
        assert!(!c.is_vector_masked(0));
        assert!(matches!(c.trigger(0), TriggerAction::Deliver(_)));
        assert_eq!(c.mask_bits(), 0);
        // Offsets beyond the 0x10-byte capability are ignored.
        assert!(write_u32(&mut c, 0x10, u32::MAX).is_empty());
        assert_eq!(read(&c, 0x10, 4), [0xee; 4]);
    }

    #[test]
    fn reset_returns_to_the_initial_state() {
        let mut c = full();
        write_u32(&mut c, 4, 0xfee0_0000);
        write_u16(&mut c, 2, MSI_CONTROL_ENABLE | (3 << 4));
        write_u32(&mut c, 0x10, 1);
        c.trigger(0);
        c.reset();
        assert_eq!(c, full());
    }

    #[test]
    fn capability_is_found_in_config_space() {
        let mut config = vec![0u8; 256];
        config[0x06] = 0x10;
        config[0x34] = 0x50;
        config[0x50] = CAP_ID_MSI;
        config[0x52..0x54].copy_from_slice(&(MSI_CONTROL_64BIT | (1 << 1)).to_le_bytes());
        let c = MsiCapability::find(&config).unwrap().unwrap();
        assert_eq!(c.offset(), 0x50);
        assert!(c.is_64bit() && !c.has_per_vector_mask());
        assert_eq!(c.vectors_capable(), 2);
        assert_eq!(MsiCapability::find(&[0u8; 256]), Ok(None));
        assert_eq!(
            MsiCapability::parse(&config, 0x40),
            Err(MsiError::NotMsi {
                offset: 0x40,
                id: 0
            })
        );
        assert!(matches!(
            MsiCapability::parse(&config[..0x58], 0x50),
            Err(MsiError::CapabilityOutside { .. })
        ));
        assert!(MsiCapability::parse(&config, u16::MAX).is_err());
    }

    #[test]
    fn random_guest_writes_never_panic_and_keep_invariants() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for control in [0u16, 0xffff, 0x0186, 0x008e, 0x0300] {
            let mut c = cap(control);
            for _ in 0..5000 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let len = (state % 6) as usize;
                let offset = ((state >> 8) % 0x30) as u16 + CAP - 4;
                let data = (state >> 16).to_le_bytes();
                c.write(offset, &data[..len]);
                c.trigger((state >> 40) as u8 % 40);
                assert!(c.vectors_enabled() <= c.vectors_capable());
                assert_eq!(c.pending_bits() & !c.implemented_vectors(), 0);
                assert_eq!(c.mask_bits() & !c.implemented_vectors(), 0);
            }
            c.write(u16::MAX, &[1, 2, 3, 4]);
        }
    }
}
