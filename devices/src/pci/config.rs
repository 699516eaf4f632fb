//! A PCI Express configuration space: 4 KiB of bytes with a per-byte write
//! mask and per-byte write-1-to-clear (RW1C) mask, plus type 0 header
//! helpers.
//!
//! Two kinds of writes exist. Setup writes (`set_*`, [`ConfigSpace::bytes_mut`])
//! are the model's own and store values as given. Guest writes
//! ([`ConfigSpace::guest_write`]) go through the masks: for each byte,
//! bits in the write mask take the written value, bits in the RW1C mask are
//! cleared where the guest writes 1, every other bit keeps its value.
//! A fresh space is all zeros and read-only.

use super::{access_is_valid, COMMAND_OFFSET};

/// Size of a PCI Express configuration space (with extended space).
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Size of the conventional PCI configuration space (the header and the
/// standard capabilities).
pub const LEGACY_CONFIG_SPACE_SIZE: usize = 256;

/// Offset of the vendor ID (16 bits).
pub const VENDOR_ID_OFFSET: u16 = 0x00;
/// Offset of the device ID (16 bits).
pub const DEVICE_ID_OFFSET: u16 = 0x02;
/// Offset of the status register (16 bits).
pub const STATUS_OFFSET: u16 = 0x06;
/// Offset of the revision ID (8 bits).
pub const REVISION_ID_OFFSET: u16 = 0x08;
/// Offset of the 24-bit class code (programming interface, subclass, base class).
pub const CLASS_CODE_OFFSET: u16 = 0x09;
/// Offset of the cache line size register (8 bits).
pub const CACHE_LINE_SIZE_OFFSET: u16 = 0x0c;
/// Offset of the latency timer (8 bits).
pub const LATENCY_TIMER_OFFSET: u16 = 0x0d;
/// Offset of the header type (8 bits).
pub const HEADER_TYPE_OFFSET: u16 = 0x0e;
/// Offset of BAR 0 in a type 0 header.
pub const BAR0_OFFSET: u16 = 0x10;
/// Offset of the subsystem vendor ID (16 bits).
pub const SUBSYSTEM_VENDOR_ID_OFFSET: u16 = 0x2c;
/// Offset of the subsystem ID (16 bits).
pub const SUBSYSTEM_ID_OFFSET: u16 = 0x2e;
/// Offset of the expansion ROM BAR in a type 0 header.
pub const ROM_BAR_OFFSET: u16 = 0x30;
/// Offset of the capabilities pointer (8 bits).
pub const CAPABILITIES_POINTER_OFFSET: u16 = 0x34;
/// Offset of the interrupt line (8 bits; firmware's note, no hardware effect).
pub const INTERRUPT_LINE_OFFSET: u16 = 0x3c;
/// Offset of the interrupt pin (8 bits; 0 none, 1..=4 INTA..INTD).
pub const INTERRUPT_PIN_OFFSET: u16 = 0x3d;

/// Status register: the capabilities pointer is valid.
pub const STATUS_CAPABILITIES_LIST: u16 = 1 << 4;
/// Status register bits that are RW1C error flags: master data parity
/// error, signaled/received target abort, received master abort, signaled
/// system error, detected parity error.
pub const STATUS_RW1C_BITS: u16 = (1 << 8) | (0b11111 << 11);
/// Command register bits a guest may write in an emulated device: I/O,
/// memory, bus master, parity error response, SERR#, INTx disable.
pub const COMMAND_WRITABLE_BITS: u16 = 0x0001 | 0x0002 | 0x0004 | 0x0040 | 0x0100 | 0x0400;
/// Header type 0: a normal device (endpoint).
pub const HEADER_TYPE_NORMAL: u8 = 0;

/// Identity of a type 0 device: what `lspci -nn` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Type0Identity {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Class code as `0xBBSSPP`: base class, subclass, programming interface.
    pub class_code: u32,
    /// Revision ID.
    pub revision_id: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
}

/// A 4 KiB configuration space with write and RW1C masks (see module docs).
#[derive(Clone)]
pub struct ConfigSpace {
    bytes: Box<[u8; CONFIG_SPACE_SIZE]>,
    write_mask: Box<[u8; CONFIG_SPACE_SIZE]>,
    rw1c_mask: Box<[u8; CONFIG_SPACE_SIZE]>,
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSpace")
            .field(
                "vendor_id",
                &format_args!("{:#06x}", self.read_u16(VENDOR_ID_OFFSET)),
            )
            .field(
                "device_id",
                &format_args!("{:#06x}", self.read_u16(DEVICE_ID_OFFSET)),
            )
            .finish_non_exhaustive()
    }
}

impl Default for ConfigSpace {
    fn default() -> Self {
        Self::new()
    }
}

impl ConfigSpace {
    /// An all-zero, read-only configuration space.
    pub fn new() -> Self {
        Self {
            bytes: Box::new([0; CONFIG_SPACE_SIZE]),
            write_mask: Box::new([0; CONFIG_SPACE_SIZE]),
            rw1c_mask: Box::new([0; CONFIG_SPACE_SIZE]),
        }
    }

    /// A read-only space holding a copy of `bytes` (e.g. read from a real
    /// device); bytes beyond `bytes.len()` are zero, bytes beyond 4 KiB
    /// are dropped.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let mut space = Self::new();
        let len = bytes.len().min(CONFIG_SPACE_SIZE);
        space.bytes[..len].copy_from_slice(&bytes[..len]);
        space
    }

    /// A type 0 header with `identity`, everything else zero: no BARs, no
    /// capabilities, no interrupt pin. The command register's
    /// [`COMMAND_WRITABLE_BITS`], the cache line size, the latency timer
    /// and the interrupt line are writable; the status error bits are RW1C.
    pub fn type0(identity: &Type0Identity) -> Self {
        let mut space = Self::new();
        space.set_u16(VENDOR_ID_OFFSET, identity.vendor_id);
        space.set_u16(DEVICE_ID_OFFSET, identity.device_id);
        space.set_u8(REVISION_ID_OFFSET, identity.revision_id);
        let class = identity.class_code.to_le_bytes();
        space
            .bytes_mut(CLASS_CODE_OFFSET, 3)
            .copy_from_slice(&class[..3]);
        space.set_u8(HEADER_TYPE_OFFSET, HEADER_TYPE_NORMAL);
        space.set_u16(SUBSYSTEM_VENDOR_ID_OFFSET, identity.subsystem_vendor_id);
        space.set_u16(SUBSYSTEM_ID_OFFSET, identity.subsystem_id);
        space.set_write_mask(COMMAND_OFFSET, &COMMAND_WRITABLE_BITS.to_le_bytes());
        space.set_rw1c_mask(STATUS_OFFSET, &STATUS_RW1C_BITS.to_le_bytes());
        space.set_write_mask(CACHE_LINE_SIZE_OFFSET, &[0xff, 0xff]);
        space.set_write_mask(INTERRUPT_LINE_OFFSET, &[0xff]);
        space
    }

    /// All 4 KiB as the guest would read them.
    pub fn as_bytes(&self) -> &[u8; CONFIG_SPACE_SIZE] {
        &self.bytes
    }

    /// Mutable access to `len` bytes at `offset` for setup writes; the
    /// range is clipped to the space, so it may be shorter than `len`.
    pub fn bytes_mut(&mut self, offset: u16, len: usize) -> &mut [u8] {
        let (start, end) = clip(offset, len);
        &mut self.bytes[start..end]
    }

    /// Reads `data.len()` bytes at `offset`. Bytes beyond the space read
    /// all-ones. Any width and alignment is allowed; see
    /// [`Self::guest_read`] for the checked guest path.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::from(offset)
                .checked_add(i)
                .and_then(|index| self.bytes.get(index))
                .copied()
                .unwrap_or(0xff);
        }
    }

    /// A guest read: `data` is filled from the space when the access
    /// follows the PCI access contract, with all-ones otherwise.
    pub fn guest_read(&self, offset: u16, data: &mut [u8]) {
        if access_is_valid(offset, data.len(), CONFIG_SPACE_SIZE) {
            self.read(offset, data);
        } else {
            log::debug!(
                "pci: ignored config read of {} bytes at {offset:#x}",
                data.len()
            );
            data.fill(0xff);
        }
    }

    /// A guest write through the write and RW1C masks. Accesses that break
    /// the PCI access contract are ignored.
    pub fn guest_write(&mut self, offset: u16, data: &[u8]) {
        if !access_is_valid(offset, data.len(), CONFIG_SPACE_SIZE) {
            log::debug!(
                "pci: ignored config write of {} bytes at {offset:#x}",
                data.len()
            );
            return;
        }
        for (i, value) in data.iter().enumerate() {
            let index = usize::from(offset) + i;
            let writable = self.write_mask[index];
            let rw1c = self.rw1c_mask[index];
            let old = self.bytes[index];
            let merged = (old & !writable) | (value & writable);
            self.bytes[index] = merged & !(value & rw1c);
        }
    }

    /// Makes the bits set in `mask` (bytes from `offset`) guest-writable;
    /// other bits of those bytes become read-only.
    pub fn set_write_mask(&mut self, offset: u16, mask: &[u8]) {
        let (start, end) = clip(offset, mask.len());
        self.write_mask[start..end].copy_from_slice(&mask[..end - start]);
    }

    /// Makes the bits set in `mask` (bytes from `offset`) write-1-to-clear.
    /// Bits should not be both writable and RW1C; if they are, a guest
    /// write of 1 stores 1 and then clears it.
    pub fn set_rw1c_mask(&mut self, offset: u16, mask: &[u8]) {
        let (start, end) = clip(offset, mask.len());
        self.rw1c_mask[start..end].copy_from_slice(&mask[..end - start]);
    }

    /// The byte at `offset` (0xff beyond the space).
    pub fn read_u8(&self, offset: u16) -> u8 {
        let mut data = [0; 1];
        self.read(offset, &mut data);
        data[0]
    }

    /// The little-endian word at `offset` (all-ones beyond the space).
    pub fn read_u16(&self, offset: u16) -> u16 {
        let mut data = [0; 2];
        self.read(offset, &mut data);
        u16::from_le_bytes(data)
    }

    /// The little-endian dword at `offset` (all-ones beyond the space).
    pub fn read_u32(&self, offset: u16) -> u32 {
        let mut data = [0; 4];
        self.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    /// Setup write of one byte (no masks); ignored beyond the space.
    pub fn set_u8(&mut self, offset: u16, value: u8) {
        self.set_bytes(offset, &[value]);
    }

    /// Setup write of a little-endian word (no masks); clipped to the space.
    pub fn set_u16(&mut self, offset: u16, value: u16) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    /// Setup write of a little-endian dword (no masks); clipped to the space.
    pub fn set_u32(&mut self, offset: u16, value: u32) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    /// Setup write of `data` at `offset` (no masks); clipped to the space.
    pub fn set_bytes(&mut self, offset: u16, data: &[u8]) {
        let target = self.bytes_mut(offset, data.len());
        let len = target.len();
        target.copy_from_slice(&data[..len]);
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.read_u16(COMMAND_OFFSET)
    }

    /// The status register.
    pub fn status(&self) -> u16 {
        self.read_u16(STATUS_OFFSET)
    }

    /// Sets the interrupt line (firmware's note) and pin (0 none, 1..=4
    /// INTA..INTD).
    pub fn set_interrupt(&mut self, line: u8, pin: u8) {
        self.set_u8(INTERRUPT_LINE_OFFSET, line);
        self.set_u8(INTERRUPT_PIN_OFFSET, pin);
    }

    /// The capabilities pointer (low two bits masked off as the spec says).
    pub fn capabilities_pointer(&self) -> u8 {
        self.read_u8(CAPABILITIES_POINTER_OFFSET) & 0xfc
    }

    /// Sets the capabilities pointer and the status register's
    /// capabilities-list bit (cleared when `pointer` is 0).
    pub fn set_capabilities_pointer(&mut self, pointer: u8) {
        self.set_u8(CAPABILITIES_POINTER_OFFSET, pointer);
        let status = self.status();
        let status = if pointer == 0 {
            status & !STATUS_CAPABILITIES_LIST
        } else {
            status | STATUS_CAPABILITIES_LIST
        };
        self.set_u16(STATUS_OFFSET, status);
    }
}

/// `offset..offset + len` clipped to the configuration space.
fn clip(offset: u16, len: usize) -> (usize, usize) {
    let start = usize::from(offset).min(CONFIG_SPACE_SIZE);
    let end = start.saturating_add(len).min(CONFIG_SPACE_SIZE);
    (start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> Type0Identity {
        Type0Identity {
            vendor_id: 0x1af4,
            device_id: 0x1110,
            class_code: 0x05_00_00,
            revision_id: 1,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x1100,
        }
    }

    #[test]
    fn type0_header_holds_identity() {
        let space = ConfigSpace::type0(&identity());
        assert_eq!(space.read_u32(0), 0x1110_1af4);
        assert_eq!(space.read_u32(0x08), 0x0500_0001);
        assert_eq!(space.read_u8(HEADER_TYPE_OFFSET), 0);
        assert_eq!(space.read_u32(0x2c), 0x1100_1af4);
        assert_eq!(space.command(), 0);
        assert_eq!(space.status(), 0);
        assert_eq!(space.capabilities_pointer(), 0);
    }

    #[test]
    fn reads_of_every_width_and_alignment_are_little_endian() {
        let mut space = ConfigSpace::new();
        space.set_u32(0x40, 0x4433_2211);
        for (offset, len, expected) in [
            (0x40u16, 1usize, vec![0x11]),
            (0x41, 1, vec![0x22]),
            (0x43, 1, vec![0x44]),
            (0x40, 2, vec![0x11, 0x22]),
            (0x41, 2, vec![0x22, 0x33]),
            (0x42, 2, vec![0x33, 0x44]),
            (0x40, 4, vec![0x11, 0x22, 0x33, 0x44]),
        ] {
            let mut data = vec![0; len];
            space.guest_read(offset, &mut data);
            assert_eq!(data, expected, "offset {offset:#x} len {len}");
        }
    }

    #[test]
    fn guest_reads_breaking_the_contract_return_all_ones() {
        let mut space = ConfigSpace::new();
        space.set_u32(0x40, 0x4433_2211);
        for (offset, len) in [
            (0x43u16, 2usize),
            (0x41, 4),
            (0x40, 3),
            (0x40, 8),
            (0x40, 0),
            (4095, 2),
            (4096, 1),
            (u16::MAX, 4),
        ] {
            let mut data = vec![0; len];
            space.guest_read(offset, &mut data);
            assert!(
                data.iter().all(|b| *b == 0xff),
                "offset {offset:#x} len {len}"
            );
        }
        let mut last = [0; 1];
        space.guest_read(4095, &mut last);
        assert_eq!(last, [0]);
    }

    #[test]
    fn unchecked_read_beyond_the_space_is_all_ones() {
        let space = ConfigSpace::new();
        assert_eq!(space.read_u32(4094), 0xffff_0000);
        assert_eq!(space.read_u32(u16::MAX), 0xffff_ffff);
    }

    #[test]
    fn guest_write_respects_write_mask() {
        let mut space = ConfigSpace::new();
        space.set_u32(0x40, 0xaaaa_aaaa);
        space.set_write_mask(0x40, &[0x0f, 0xff, 0x00, 0xf0]);
        space.guest_write(0x40, &[0x55, 0x55, 0x55, 0x55]);
        assert_eq!(space.read_u32(0x40), 0x5aaa_55a5);
    }

    #[test]
    fn guest_write_of_each_width_touches_only_its_bytes() {
        for (offset, data) in [
            (0x41u16, vec![0x11u8]),
            (0x42, vec![0x11, 0x22]),
            (0x40, vec![1, 2, 3, 4]),
        ] {
            let mut space = ConfigSpace::new();
            space.set_write_mask(0x3c, &[0xff; 12]);
            space.guest_write(offset, &data);
            let mut expected = [0u8; 12];
            let start = usize::from(offset - 0x3c);
            expected[start..start + data.len()].copy_from_slice(&data);
            let mut got = [0u8; 12];
            space.read(0x3c, &mut got);
            assert_eq!(got, expected, "offset {offset:#x}");
        }
    }

    #[test]
    fn guest_writes_breaking_the_contract_are_ignored() {
        let mut space = ConfigSpace::new();
        space.set_write_mask(0, &[0xff; CONFIG_SPACE_SIZE]);
        for (offset, len) in [
            (0x43u16, 2usize),
            (0x41, 4),
            (0x40, 3),
            (0x40, 8),
            (0x40, 0),
            (4095, 2),
            (4096, 1),
            (u16::MAX, 4),
        ] {
            space.guest_write(offset, &vec![0x5a; len]);
        }
        assert!(space.as_bytes().iter().all(|b| *b == 0));
        space.guest_write(4092, &[1, 2, 3, 4]);
        assert_eq!(space.read_u32(4092), 0x0403_0201);
    }

    #[test]
    fn rw1c_bits_clear_only_where_one_is_written() {
        let mut space = ConfigSpace::type0(&identity());
        space.set_u16(STATUS_OFFSET, STATUS_RW1C_BITS | STATUS_CAPABILITIES_LIST);
        space.guest_write(STATUS_OFFSET, &(1u16 << 13).to_le_bytes());
        assert_eq!(
            space.status(),
            (STATUS_RW1C_BITS & !(1 << 13)) | STATUS_CAPABILITIES_LIST
        );
        // Writing ones to read-only bits changes nothing; zeros clear nothing.
        space.guest_write(STATUS_OFFSET, &[0, 0]);
        space.guest_write(STATUS_OFFSET, &STATUS_CAPABILITIES_LIST.to_le_bytes());
        assert_eq!(
            space.status(),
            (STATUS_RW1C_BITS & !(1 << 13)) | STATUS_CAPABILITIES_LIST
        );
        space.guest_write(STATUS_OFFSET, &[0xff, 0xff]);
        assert_eq!(space.status(), STATUS_CAPABILITIES_LIST);
    }

    #[test]
    fn command_takes_only_writable_bits() {
        let mut space = ConfigSpace::type0(&identity());
        space.guest_write(COMMAND_OFFSET, &[0xff, 0xff]);
        assert_eq!(space.command(), COMMAND_WRITABLE_BITS);
        // A dword write at 0x04 sets command and clears status RW1C bits at once.
        space.set_u16(STATUS_OFFSET, 1 << 15);
        space.guest_write(COMMAND_OFFSET, &[0x02, 0x00, 0x00, 0x80]);
        assert_eq!(space.command(), 0x0002);
        assert_eq!(space.status(), 0);
    }

    #[test]
    fn identity_registers_are_read_only_to_the_guest() {
        let mut space = ConfigSpace::type0(&identity());
        let before = *space.as_bytes();
        for offset in (0..0x40u16).step_by(4) {
            if offset == COMMAND_OFFSET
                || offset == CACHE_LINE_SIZE_OFFSET
                || offset == INTERRUPT_LINE_OFFSET
            {
                continue;
            }
            space.guest_write(offset, &[0xff; 4]);
        }
        assert_eq!(space.as_bytes()[..], before[..]);
    }

    #[test]
    fn interrupt_line_is_writable_and_pin_is_not() {
        let mut space = ConfigSpace::type0(&identity());
        space.set_interrupt(0, 1);
        space.guest_write(INTERRUPT_LINE_OFFSET, &[0x0b, 0x04]);
        assert_eq!(space.read_u8(INTERRUPT_LINE_OFFSET), 0x0b);
        assert_eq!(space.read_u8(INTERRUPT_PIN_OFFSET), 1);
    }

    #[test]
    fn capabilities_pointer_sets_and_clears_status_bit() {
        let mut space = ConfigSpace::type0(&identity());
        space.set_capabilities_pointer(0x43);
        assert_eq!(space.capabilities_pointer(), 0x40);
        assert_eq!(
            space.status() & STATUS_CAPABILITIES_LIST,
            STATUS_CAPABILITIES_LIST
        );
        space.set_capabilities_pointer(0);
        assert_eq!(space.status() & STATUS_CAPABILITIES_LIST, 0);
    }

    #[test]
    fn setup_writes_clip_at_the_end_of_the_space() {
        let mut space = ConfigSpace::new();
        space.set_u32(4094, 0x4433_2211);
        assert_eq!(space.read_u16(4094), 0x2211);
        space.set_u32(u16::MAX, 1);
        space.set_write_mask(4095, &[0xff, 0xff]);
        space.set_rw1c_mask(u16::MAX, &[0xff]);
        assert_eq!(space.bytes_mut(4095, 10).len(), 1);
        assert_eq!(space.bytes_mut(u16::MAX, 10).len(), 0);
    }

    #[test]
    fn from_bytes_copies_and_pads() {
        let space = ConfigSpace::from_bytes(&[1, 2, 3]);
        assert_eq!(space.read_u32(0), 0x0003_0201);
        let space = ConfigSpace::from_bytes(&vec![0x11; 5000]);
        assert_eq!(space.read_u8(4095), 0x11);
    }
}
