//! Emulated Base Address Registers of a type 0 header (offsets 0x10..0x28)
//! and the expansion ROM BAR (0x30).
//!
//! Each BAR is a register whose address bits below the BAR's size are
//! hardwired to zero and whose low bits are read-only flags (I/O, 64-bit,
//! prefetchable). That is all sizing needs: a guest that writes all-ones
//! reads back the size mask with the flags, then writes the old value back.
//!
//! At reset every BAR holds the address the placement plan gave it, so a
//! guest that keeps firmware's assignment (Linux with `_DSM` function 5
//! absent and a host bridge `_CRS` that contains the BAR) sees the plan.
//!
//! **The guest may not move BARs.** A guest write of another address is
//! recorded, so reads return what the guest wrote (as Linux expects while
//! sizing), and reported as a [`BarWrite`] with `matches_plan: false`. The
//! VMM keeps the planned mapping whatever the guest wrote: it never tears
//! down or moves a memslot because of a BAR write, so the guest's BAR sizing
//! during boot costs no memslot update. A guest that really moves a BAR
//! then reaches nothing at its new address; barge's ACPI tables are built so
//! that Linux does not try.
//!
//! Sizes that are not a power of two are rounded up to one (the register
//! can only express powers of two), to at least 16 bytes for memory BARs
//! and 4 bytes for I/O BARs. Unimplemented BAR slots read 0 and ignore
//! writes, as on hardware. The ROM BAR reads 0 (no ROM) unless one is
//! given with [`EmulatedBars::with_rom`].

use super::access_is_valid;
use super::config::{BAR0_OFFSET, ROM_BAR_OFFSET};

/// Number of BAR registers in a type 0 header.
pub const BAR_COUNT: usize = 6;
/// Index that [`BarWrite`] uses for the expansion ROM BAR (as VFIO does).
pub const ROM_BAR_INDEX: u8 = 6;
/// BAR flag: the BAR decodes I/O space.
pub const BAR_IO_SPACE: u32 = 1 << 0;
/// BAR flag (memory BARs): 64-bit BAR, the next register holds bits 63:32.
pub const BAR_MEMORY_64BIT: u32 = 0b10 << 1;
/// BAR flag (memory BARs): prefetchable.
pub const BAR_PREFETCHABLE: u32 = 1 << 3;
/// ROM BAR bit 0: the ROM decode is enabled.
pub const ROM_ENABLE: u32 = 1;
/// Address bits of a memory BAR register.
pub const MEMORY_BAR_ADDRESS_BITS: u32 = !0xf;
/// Address bits of an I/O BAR register.
pub const IO_BAR_ADDRESS_BITS: u32 = !0x3;
/// Address bits of the ROM BAR register.
pub const ROM_BAR_ADDRESS_BITS: u32 = !0x7ff;
/// Smallest memory BAR the register format allows.
pub const MIN_MEMORY_BAR_SIZE: u64 = 16;
/// Smallest I/O BAR.
pub const MIN_IO_BAR_SIZE: u64 = 4;
/// Smallest ROM BAR (the address field starts at bit 11).
pub const MIN_ROM_SIZE: u64 = 2048;
/// Largest 32-bit memory BAR.
pub const MAX_MEMORY32_BAR_SIZE: u64 = 1 << 31;
/// Largest 64-bit memory BAR.
pub const MAX_MEMORY64_BAR_SIZE: u64 = 1 << 63;
/// Size of the x86 I/O port space, the limit of I/O BARs.
pub const IO_SPACE_SIZE: u64 = 1 << 16;

/// What a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// I/O ports.
    Io,
    /// Memory below 4 GiB, one register.
    Memory32 { prefetchable: bool },
    /// Memory anywhere, two registers (this index and the next).
    Memory64 { prefetchable: bool },
}

impl BarKind {
    /// The read-only flag bits of the BAR's (low) register.
    pub fn flags(self) -> u32 {
        match self {
            BarKind::Io => BAR_IO_SPACE,
            BarKind::Memory32 { prefetchable } => prefetch_flag(prefetchable),
            BarKind::Memory64 { prefetchable } => BAR_MEMORY_64BIT | prefetch_flag(prefetchable),
        }
    }
}

fn prefetch_flag(prefetchable: bool) -> u32 {
    if prefetchable {
        BAR_PREFETCHABLE
    } else {
        0
    }
}

/// One BAR as the config-space model sees it: its index, what it decodes
/// ([`BarKind`]), its size and its address (the guest physical address the
/// placement plan gave a memory BAR, or the port of an I/O BAR).
/// [`EmulatedBars`] resets its registers to these.
///
/// Not the plan's own record of the BAR: that is
/// [`resources::placement::BarPlacement`], the planner's output for a memory
/// BAR (reservation, HVA alignment, mmap-able areas, trapped ranges, page
/// sizes), of which only the index and GPA come here. The kind comes from the
/// device, and I/O BARs are not in the plan at all (their port is given
/// separately).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedBar {
    /// BAR index 0..=5 (a 64-bit BAR also takes `index + 1`).
    pub index: u8,
    /// What the BAR decodes.
    pub kind: BarKind,
    /// Size in bytes; rounded up to a power of two (see module docs).
    pub size: u64,
    /// The planned guest physical address (I/O BARs: port), aligned to the
    /// rounded size.
    pub gpa: u64,
}

/// A guest write to a BAR register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarWrite {
    /// BAR index (0..=5; the low register's index for both halves of a
    /// 64-bit BAR), or [`ROM_BAR_INDEX`].
    pub index: u8,
    /// The BAR's full address as the guest has now programmed it (both
    /// halves of a 64-bit BAR), with the bits below the size cleared.
    pub address: u64,
    /// Whether that address is the planned GPA. When false, the VMM keeps
    /// the planned mapping anyway (the guest may not move BARs).
    pub matches_plan: bool,
    /// Whether the write was a sizing probe: all address bits of the
    /// written register set (0xFFFF_FFFF, or 0xFFFF_F800 and up for the ROM
    /// BAR). Such writes are expected during boot and need no warning.
    pub sizing: bool,
}

/// Why a set of BARs cannot be emulated. These come from the VMM's own
/// plan, not from the guest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BarError {
    /// The index is not 0..=5.
    #[error("BAR index {index} is out of range: a type 0 header has BARs 0 to 5")]
    IndexOutOfRange { index: u8 },
    /// A 64-bit BAR at index 5 has no register for its high half.
    #[error("BAR {index} is 64-bit but has no next register for its high half; 64-bit BARs go at index 0 to 4")]
    NoHighRegister { index: u8 },
    /// Two BARs claim the same register.
    #[error("BAR {index} uses register {register}, which another BAR already uses (a 64-bit BAR takes two registers)")]
    RegisterInUse {
        index: u8,
        /// The register both claim.
        register: u8,
    },
    /// The BAR has size 0.
    #[error("BAR {index} has size 0; leave unimplemented BARs out of the list")]
    ZeroSize { index: u8 },
    /// The BAR is larger than its kind allows.
    #[error(
        "BAR {index} of {size:#x} bytes is larger than a {kind:?} BAR can be ({max:#x} bytes)"
    )]
    TooLarge {
        index: u8,
        size: u64,
        kind: BarKind,
        /// The largest size of that kind.
        max: u64,
    },
    /// The planned address is not aligned to the (rounded) size.
    #[error("BAR {index} is planned at {gpa:#x}, which is not aligned to its size {size:#x}; the plan must align BARs naturally")]
    Misaligned {
        /// The BAR index (or [`ROM_BAR_INDEX`]).
        index: u8,
        gpa: u64,
        size: u64,
    },
    /// The planned address does not fit the BAR's register (a 32-bit BAR
    /// above 4 GiB, an I/O BAR beyond port 0xFFFF).
    #[error("BAR {index} is planned at {gpa:#x}, beyond the {limit:#x} its kind can address; plan it lower or make it 64-bit")]
    AddressTooHigh {
        /// The BAR index (or [`ROM_BAR_INDEX`]).
        index: u8,
        gpa: u64,
        /// The end of the addressable range.
        limit: u64,
    },
}

/// What a BAR register slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Register {
    Unused,
    /// The register of a 32-bit or I/O BAR, or the low half of a 64-bit BAR;
    /// the value indexes `EmulatedBars::bars`.
    Low(usize),
    /// The high half of a 64-bit BAR.
    High(usize),
}

#[derive(Debug, Clone, Copy)]
struct Bar {
    spec: PlannedBar,
    /// Rounded size (power of two).
    size: u64,
    /// The address as the guest programmed it (bits below `size` clear).
    guest_address: u64,
}

impl Bar {
    /// The address bits the BAR's registers hold, over 64 bits.
    fn address_mask(&self) -> u64 {
        let mask = !(self.size - 1);
        match self.spec.kind {
            BarKind::Memory64 { .. } => mask,
            BarKind::Io | BarKind::Memory32 { .. } => mask & 0xffff_ffff,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Rom {
    size: u64,
    gpa: u64,
    guest_address: u64,
    enabled: bool,
}

/// The emulated BARs and ROM BAR of one device (see module docs).
#[derive(Debug, Clone)]
pub struct EmulatedBars {
    registers: [Register; BAR_COUNT],
    bars: Vec<Bar>,
    rom: Option<Rom>,
}

impl EmulatedBars {
    /// BARs at their planned addresses; slots no spec names are unimplemented.
    pub fn new(specs: &[PlannedBar]) -> Result<Self, BarError> {
        let mut registers = [Register::Unused; BAR_COUNT];
        let mut bars = Vec::with_capacity(specs.len());
        for spec in specs {
            let index = spec.index;
            if usize::from(index) >= BAR_COUNT {
                return Err(BarError::IndexOutOfRange { index });
            }
            let is_64bit = matches!(spec.kind, BarKind::Memory64 { .. });
            if is_64bit && usize::from(index) + 1 >= BAR_COUNT {
                return Err(BarError::NoHighRegister { index });
            }
            if spec.size == 0 {
                return Err(BarError::ZeroSize { index });
            }
            let (min, max, limit) = match spec.kind {
                BarKind::Io => (MIN_IO_BAR_SIZE, IO_SPACE_SIZE, IO_SPACE_SIZE),
                BarKind::Memory32 { .. } => (MIN_MEMORY_BAR_SIZE, MAX_MEMORY32_BAR_SIZE, 1 << 32),
                BarKind::Memory64 { .. } => (MIN_MEMORY_BAR_SIZE, MAX_MEMORY64_BAR_SIZE, u64::MAX),
            };
            if spec.size > max {
                return Err(BarError::TooLarge {
                    index,
                    size: spec.size,
                    kind: spec.kind,
                    max,
                });
            }
            let size = spec.size.next_power_of_two().max(min);
            if spec.gpa % size != 0 {
                return Err(BarError::Misaligned {
                    index,
                    gpa: spec.gpa,
                    size,
                });
            }
            if limit != u64::MAX && spec.gpa.saturating_add(size) > limit {
                return Err(BarError::AddressTooHigh {
                    index,
                    gpa: spec.gpa,
                    limit,
                });
            }
            let position = bars.len();
            let mut claim = |register: u8, value: Register| {
                let slot = &mut registers[usize::from(register)];
                if *slot != Register::Unused {
                    return Err(BarError::RegisterInUse { index, register });
                }
                *slot = value;
                Ok(())
            };
            claim(index, Register::Low(position))?;
            if is_64bit {
                claim(index + 1, Register::High(position))?;
            }
            bars.push(Bar {
                spec: *spec,
                size,
                guest_address: spec.gpa,
            });
        }
        Ok(Self {
            registers,
            bars,
            rom: None,
        })
    }

    /// Adds an expansion ROM of `size` bytes (rounded up to a power of two,
    /// at least 2 KiB) planned at `gpa` below 4 GiB. Its decode starts
    /// disabled, as after reset.
    pub fn with_rom(mut self, size: u64, gpa: u64) -> Result<Self, BarError> {
        let index = ROM_BAR_INDEX;
        if size == 0 {
            return Err(BarError::ZeroSize { index });
        }
        if size > MAX_MEMORY32_BAR_SIZE {
            return Err(BarError::TooLarge {
                index,
                size,
                kind: BarKind::Memory32 {
                    prefetchable: false,
                },
                max: MAX_MEMORY32_BAR_SIZE,
            });
        }
        let size = size.next_power_of_two().max(MIN_ROM_SIZE);
        if gpa % size != 0 {
            return Err(BarError::Misaligned { index, gpa, size });
        }
        if gpa.saturating_add(size) > 1 << 32 {
            return Err(BarError::AddressTooHigh {
                index,
                gpa,
                limit: 1 << 32,
            });
        }
        self.rom = Some(Rom {
            size,
            gpa,
            guest_address: gpa,
            enabled: false,
        });
        Ok(self)
    }

    /// Whether `offset` lies in a BAR register or the ROM BAR register;
    /// such accesses belong to [`Self::read`] and [`Self::write`].
    pub fn contains(offset: u16) -> bool {
        let bars_end = BAR0_OFFSET + 4 * BAR_COUNT as u16;
        (BAR0_OFFSET..bars_end).contains(&offset)
            || (ROM_BAR_OFFSET..ROM_BAR_OFFSET + 4).contains(&offset)
    }

    /// The planned BARs, in the order given.
    pub fn specs(&self) -> impl Iterator<Item = &PlannedBar> {
        self.bars.iter().map(|bar| &bar.spec)
    }

    /// The rounded size of BAR `index` (0..=5, or [`ROM_BAR_INDEX`]).
    pub fn size(&self, index: u8) -> Option<u64> {
        if index == ROM_BAR_INDEX {
            return self.rom.map(|rom| rom.size);
        }
        self.bar(index).map(|bar| bar.size)
    }

    /// The address the guest has programmed into BAR `index` (0..=5, or
    /// [`ROM_BAR_INDEX`]); the planned GPA until the guest writes another.
    pub fn guest_address(&self, index: u8) -> Option<u64> {
        if index == ROM_BAR_INDEX {
            return self.rom.map(|rom| rom.guest_address);
        }
        self.bar(index).map(|bar| bar.guest_address)
    }

    /// Whether the guest has enabled the ROM's decode.
    pub fn rom_enabled(&self) -> bool {
        self.rom.is_some_and(|rom| rom.enabled)
    }

    /// Reads BAR register bytes. Accesses outside the BAR registers or
    /// breaking the access contract read all-ones.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        if !Self::contains(offset) || !access_is_valid(offset, data.len(), usize::from(u16::MAX)) {
            data.fill(0xff);
            return;
        }
        let shift = usize::from(offset % 4);
        let value = self.register_value(offset - offset % 4).to_le_bytes();
        data.copy_from_slice(&value[shift..shift + data.len()]);
    }

    /// Writes BAR register bytes. A write of part of a register updates
    /// those bytes of the value the guest reads and applies the result.
    /// Returns the write for implemented BARs; writes to unimplemented
    /// slots, outside the BAR registers or breaking the access contract are
    /// ignored.
    pub fn write(&mut self, offset: u16, data: &[u8]) -> Option<BarWrite> {
        if !Self::contains(offset) || !access_is_valid(offset, data.len(), usize::from(u16::MAX)) {
            return None;
        }
        let register_offset = offset - offset % 4;
        let shift = usize::from(offset % 4);
        let mut bytes = self.register_value(register_offset).to_le_bytes();
        bytes[shift..shift + data.len()].copy_from_slice(data);
        let value = u32::from_le_bytes(bytes);
        if register_offset == ROM_BAR_OFFSET {
            return self.write_rom(value);
        }
        let slot = usize::from((register_offset - BAR0_OFFSET) / 4);
        let (position, high) = match self.registers[slot] {
            Register::Unused => return None,
            Register::Low(position) => (position, false),
            Register::High(position) => (position, true),
        };
        let bar = &mut self.bars[position];
        let address_bits = match (bar.spec.kind, high) {
            (_, true) => u32::MAX,
            (BarKind::Io, false) => IO_BAR_ADDRESS_BITS,
            (_, false) => MEMORY_BAR_ADDRESS_BITS,
        };
        let sizing = value & address_bits == address_bits;
        let written = if high {
            (bar.guest_address & 0xffff_ffff) | (u64::from(value) << 32)
        } else {
            (bar.guest_address & !0xffff_ffff) | u64::from(value & address_bits)
        };
        bar.guest_address = written & bar.address_mask();
        let write = BarWrite {
            index: bar.spec.index,
            address: bar.guest_address,
            matches_plan: bar.guest_address == bar.spec.gpa,
            sizing,
        };
        if !write.matches_plan && !write.sizing {
            log::debug!(
                "pci: guest wrote BAR {} = {:#x}, plan is {:#x}; keeping the planned mapping",
                write.index,
                write.address,
                bar.spec.gpa
            );
        }
        Some(write)
    }

    fn write_rom(&mut self, value: u32) -> Option<BarWrite> {
        let rom = self.rom.as_mut()?;
        rom.enabled = value & ROM_ENABLE != 0;
        rom.guest_address = u64::from(value & ROM_BAR_ADDRESS_BITS) & !(rom.size - 1);
        Some(BarWrite {
            index: ROM_BAR_INDEX,
            address: rom.guest_address,
            matches_plan: rom.guest_address == rom.gpa,
            sizing: value & ROM_BAR_ADDRESS_BITS == ROM_BAR_ADDRESS_BITS,
        })
    }

    /// The dword the guest reads at the dword-aligned `register_offset`.
    fn register_value(&self, register_offset: u16) -> u32 {
        if register_offset == ROM_BAR_OFFSET {
            return self.rom.map_or(0, |rom| {
                rom.guest_address as u32 | if rom.enabled { ROM_ENABLE } else { 0 }
            });
        }
        let Some(slot) = register_offset
            .checked_sub(BAR0_OFFSET)
            .map(|o| usize::from(o / 4))
        else {
            return 0;
        };
        match self.registers.get(slot) {
            Some(Register::Low(position)) => {
                let bar = &self.bars[*position];
                bar.guest_address as u32 | bar.spec.kind.flags()
            }
            Some(Register::High(position)) => (self.bars[*position].guest_address >> 32) as u32,
            Some(Register::Unused) | None => 0,
        }
    }

    fn bar(&self, index: u8) -> Option<&Bar> {
        self.bars.iter().find(|bar| bar.spec.index == index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn read32(bars: &EmulatedBars, offset: u16) -> u32 {
        let mut data = [0; 4];
        bars.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write32(bars: &mut EmulatedBars, offset: u16, value: u32) -> Option<BarWrite> {
        bars.write(offset, &value.to_le_bytes())
    }

    fn bar_offset(index: u8) -> u16 {
        BAR0_OFFSET + 4 * u16::from(index)
    }

    /// Linux's `__pci_read_base` on one register: read, write all-ones,
    /// read the size mask, restore.
    fn size_register(bars: &mut EmulatedBars, offset: u16) -> u32 {
        let original = read32(bars, offset);
        let probe = write32(bars, offset, u32::MAX);
        let mask = read32(bars, offset);
        let restore = write32(bars, offset, original);
        if let (Some(probe), Some(restore)) = (probe, restore) {
            assert!(probe.sizing);
            assert!(!restore.sizing);
        }
        mask
    }

    fn h100_like() -> EmulatedBars {
        EmulatedBars::new(&[
            PlannedBar {
                index: 0,
                kind: BarKind::Memory64 {
                    prefetchable: false,
                },
                size: 16 << 20,
                gpa: 0xe000_0000,
            },
            PlannedBar {
                index: 2,
                kind: BarKind::Memory64 { prefetchable: true },
                size: 128 * GIB,
                gpa: 128 * GIB * 3,
            },
            PlannedBar {
                index: 4,
                kind: BarKind::Memory64 { prefetchable: true },
                size: 32 << 20,
                gpa: 0x40_0200_0000,
            },
        ])
        .unwrap()
    }

    #[test]
    fn bars_read_their_planned_address_with_flags() {
        let bars = h100_like();
        assert_eq!(read32(&bars, bar_offset(0)), 0xe000_0004);
        assert_eq!(read32(&bars, bar_offset(1)), 0);
        assert_eq!(read32(&bars, bar_offset(2)), 0x0000_000c);
        assert_eq!(read32(&bars, bar_offset(3)), 0x60);
        assert_eq!(read32(&bars, bar_offset(4)), 0x0200_000c);
        assert_eq!(read32(&bars, bar_offset(5)), 0x40);
        assert_eq!(bars.guest_address(2), Some(384 * GIB));
        assert_eq!(bars.guest_address(1), None);
    }

    #[test]
    fn sizing_a_64bit_bar_reads_the_size_mask_and_restores_the_plan() {
        let mut bars = h100_like();
        assert_eq!(size_register(&mut bars, bar_offset(2)), 0x0000_000c);
        assert_eq!(size_register(&mut bars, bar_offset(3)), 0xffff_ffe0);
        // 128 GiB: bits 63:37 writable.
        let mask =
            (u64::from(0xffff_ffe0u32) << 32) | u64::from(0x0000_000cu32 & MEMORY_BAR_ADDRESS_BITS);
        assert_eq!(!mask + 1, 128 * GIB);
        assert_eq!(size_register(&mut bars, bar_offset(0)), 0xff00_0004);
        assert_eq!(size_register(&mut bars, bar_offset(1)), 0xffff_ffff);
        assert_eq!(bars.guest_address(0), Some(0xe000_0000));
        assert_eq!(bars.guest_address(2), Some(384 * GIB));
    }

    #[test]
    fn sizing_writes_report_probe_then_plan() {
        let mut bars = h100_like();
        let probe = write32(&mut bars, bar_offset(3), u32::MAX).unwrap();
        assert_eq!(probe.index, 2);
        assert!(probe.sizing);
        assert!(!probe.matches_plan);
        assert_eq!(probe.address, 0xffff_ffe0_0000_0000);
        let restore = write32(&mut bars, bar_offset(3), 0x60).unwrap();
        assert_eq!(
            restore,
            BarWrite {
                index: 2,
                address: 384 * GIB,
                matches_plan: true,
                sizing: false
            }
        );
    }

    #[test]
    fn a_guest_move_is_recorded_and_reported_as_not_the_plan() {
        let mut bars = h100_like();
        let write = write32(&mut bars, bar_offset(0), 0xd000_0000).unwrap();
        assert_eq!(
            write,
            BarWrite {
                index: 0,
                address: 0xd000_0000,
                matches_plan: false,
                sizing: false
            }
        );
        assert_eq!(read32(&bars, bar_offset(0)), 0xd000_0004);
        assert_eq!(bars.guest_address(0), Some(0xd000_0000));
        // Bits below the size are hardwired to zero.
        let write = write32(&mut bars, bar_offset(0), 0xe012_3456).unwrap();
        assert_eq!(write.address, 0xe000_0000);
        assert!(write.matches_plan);
    }

    #[test]
    fn bar_32bit_and_io_sizing() {
        let mut bars = EmulatedBars::new(&[
            PlannedBar {
                index: 0,
                kind: BarKind::Io,
                size: 0x20,
                gpa: 0xc000,
            },
            PlannedBar {
                index: 1,
                kind: BarKind::Memory32 { prefetchable: true },
                size: 256,
                gpa: 0xfebf_f000,
            },
            PlannedBar {
                index: 3,
                kind: BarKind::Memory32 {
                    prefetchable: false,
                },
                size: 4096,
                gpa: 0xfebf_e000,
            },
        ])
        .unwrap();
        assert_eq!(read32(&bars, bar_offset(0)), 0xc001);
        assert_eq!(read32(&bars, bar_offset(1)), 0xfebf_f008);
        assert_eq!(read32(&bars, bar_offset(3)), 0xfebf_e000);
        assert_eq!(size_register(&mut bars, bar_offset(0)), 0xffff_ffe1);
        assert_eq!(size_register(&mut bars, bar_offset(1)), 0xffff_ff08);
        assert_eq!(size_register(&mut bars, bar_offset(3)), 0xffff_f000);
        assert_eq!(read32(&bars, bar_offset(1)), 0xfebf_f008);
    }

    #[test]
    fn unimplemented_slots_read_zero_and_ignore_writes() {
        let mut empty = EmulatedBars::new(&[]).unwrap();
        for index in 0..6 {
            assert_eq!(size_register(&mut empty, bar_offset(index)), 0);
            assert_eq!(write32(&mut empty, bar_offset(index), 0x1234_5678), None);
        }
        assert_eq!(empty.guest_address(0), None);
    }

    #[test]
    fn sub_dword_writes_merge_into_the_register() {
        let mut bars = h100_like();
        // Byte 3 of BAR0: 0xe0 -> 0xd0.
        let write = bars.write(bar_offset(0) + 3, &[0xd0]).unwrap();
        assert_eq!(write.address, 0xd000_0000);
        assert_eq!(read32(&bars, bar_offset(0)), 0xd000_0004);
        // Word at 2 back to 0xe000.
        let write = bars.write(bar_offset(0) + 2, &[0x00, 0xe0]).unwrap();
        assert!(write.matches_plan);
        // A byte write of the flags byte changes nothing (flags are read-only).
        let write = bars.write(bar_offset(0), &[0xff]).unwrap();
        assert!(write.matches_plan);
        assert_eq!(read32(&bars, bar_offset(0)), 0xe000_0004);
    }

    #[test]
    fn reads_of_every_width_and_offset() {
        let bars = h100_like();
        let mut byte = [0; 1];
        for (offset, expected) in [(0x10u16, 0x04u8), (0x11, 0), (0x12, 0), (0x13, 0xe0)] {
            bars.read(offset, &mut byte);
            assert_eq!(byte[0], expected);
        }
        let mut word = [0; 2];
        bars.read(0x12, &mut word);
        assert_eq!(u16::from_le_bytes(word), 0xe000);
        bars.read(0x11, &mut word);
        assert_eq!(u16::from_le_bytes(word), 0x0000);
    }

    #[test]
    fn accesses_outside_bars_or_the_contract_are_ignored() {
        let mut bars = h100_like();
        for (offset, len) in [
            (0x0fu16, 1usize),
            (0x28, 4),
            (0x2c, 4),
            (0x34, 1),
            (0x13, 2),
            (0x11, 4),
            (0x10, 3),
            (0x10, 8),
            (0x10, 0),
            (u16::MAX, 1),
        ] {
            let mut data = vec![0; len];
            bars.read(offset, &mut data);
            assert!(data.iter().all(|b| *b == 0xff), "read {offset:#x} {len}");
            assert_eq!(
                bars.write(offset, &vec![0; len]),
                None,
                "write {offset:#x} {len}"
            );
        }
        assert_eq!(read32(&bars, bar_offset(0)), 0xe000_0004);
        assert!(
            EmulatedBars::contains(0x10)
                && EmulatedBars::contains(0x27)
                && EmulatedBars::contains(0x33)
        );
        assert!(
            !EmulatedBars::contains(0x28)
                && !EmulatedBars::contains(0x2f)
                && !EmulatedBars::contains(0x34)
        );
    }

    #[test]
    fn rom_bar_reads_zero_without_a_rom() {
        let mut bars = h100_like();
        assert_eq!(size_register(&mut bars, ROM_BAR_OFFSET), 0);
        assert_eq!(write32(&mut bars, ROM_BAR_OFFSET, 0xfeb0_0001), None);
        assert_eq!(bars.guest_address(ROM_BAR_INDEX), None);
        assert!(!bars.rom_enabled());
    }

    #[test]
    fn rom_bar_sizes_and_enables_when_given() {
        let mut bars = h100_like().with_rom(0x10000, 0xfeb0_0000).unwrap();
        assert_eq!(read32(&bars, ROM_BAR_OFFSET), 0xfeb0_0000);
        let probe = write32(&mut bars, ROM_BAR_OFFSET, ROM_BAR_ADDRESS_BITS).unwrap();
        assert!(probe.sizing);
        assert_eq!(read32(&bars, ROM_BAR_OFFSET), 0xffff_0000);
        let enable = write32(&mut bars, ROM_BAR_OFFSET, 0xfeb0_0001).unwrap();
        assert_eq!(
            enable,
            BarWrite {
                index: ROM_BAR_INDEX,
                address: 0xfeb0_0000,
                matches_plan: true,
                sizing: false
            }
        );
        assert!(bars.rom_enabled());
        assert_eq!(read32(&bars, ROM_BAR_OFFSET), 0xfeb0_0001);
        assert_eq!(bars.size(ROM_BAR_INDEX), Some(0x10000));
    }

    #[test]
    fn sizes_round_up_to_a_power_of_two_and_the_minimum() {
        let bars = EmulatedBars::new(&[
            PlannedBar {
                index: 0,
                kind: BarKind::Memory32 {
                    prefetchable: false,
                },
                size: 3000,
                gpa: 0x1000,
            },
            PlannedBar {
                index: 1,
                kind: BarKind::Memory32 {
                    prefetchable: false,
                },
                size: 1,
                gpa: 0x10,
            },
            PlannedBar {
                index: 2,
                kind: BarKind::Io,
                size: 1,
                gpa: 0x4,
            },
        ])
        .unwrap();
        assert_eq!(bars.size(0), Some(4096));
        assert_eq!(bars.size(1), Some(16));
        assert_eq!(bars.size(2), Some(4));
        assert_eq!(bars.specs().count(), 3);
    }

    #[test]
    fn bad_plans_are_rejected_with_the_bar_named() {
        let mem64 = BarKind::Memory64 { prefetchable: true };
        let mem32 = BarKind::Memory32 {
            prefetchable: false,
        };
        let spec = |index, kind, size, gpa| PlannedBar {
            index,
            kind,
            size,
            gpa,
        };
        assert_eq!(
            EmulatedBars::new(&[spec(6, mem32, 16, 0)]).unwrap_err(),
            BarError::IndexOutOfRange { index: 6 }
        );
        assert_eq!(
            EmulatedBars::new(&[spec(5, mem64, 16, 0)]).unwrap_err(),
            BarError::NoHighRegister { index: 5 }
        );
        assert_eq!(
            EmulatedBars::new(&[spec(0, mem64, 16, 0), spec(1, mem32, 16, 0)]).unwrap_err(),
            BarError::RegisterInUse {
                index: 1,
                register: 1
            }
        );
        assert_eq!(
            EmulatedBars::new(&[spec(1, mem32, 16, 0), spec(0, mem64, 16, 0)]).unwrap_err(),
            BarError::RegisterInUse {
                index: 0,
                register: 1
            }
        );
        assert_eq!(
            EmulatedBars::new(&[spec(0, mem32, 0, 0)]).unwrap_err(),
            BarError::ZeroSize { index: 0 }
        );
        assert!(matches!(
            EmulatedBars::new(&[spec(0, mem32, 4 * GIB, 0)]),
            Err(BarError::TooLarge { index: 0, .. })
        ));
        assert!(matches!(
            EmulatedBars::new(&[spec(0, BarKind::Io, 1 << 17, 0)]),
            Err(BarError::TooLarge { .. })
        ));
        assert!(matches!(
            EmulatedBars::new(&[spec(0, mem64, u64::MAX, 0)]),
            Err(BarError::TooLarge { .. })
        ));
        assert_eq!(
            EmulatedBars::new(&[spec(0, mem64, GIB, GIB / 2)]).unwrap_err(),
            BarError::Misaligned {
                index: 0,
                gpa: GIB / 2,
                size: GIB
            }
        );
        assert_eq!(
            EmulatedBars::new(&[spec(0, mem32, GIB, 4 * GIB)]).unwrap_err(),
            BarError::AddressTooHigh {
                index: 0,
                gpa: 4 * GIB,
                limit: 4 * GIB
            }
        );
        assert!(matches!(
            EmulatedBars::new(&[spec(0, BarKind::Io, 16, 0x1_0000)]),
            Err(BarError::AddressTooHigh { .. })
        ));
        assert!(EmulatedBars::new(&[spec(4, mem64, 1 << 63, 1 << 63)]).is_ok());
        assert!(EmulatedBars::new(&[spec(4, mem64, 16, !0xfu64)]).is_ok());
        assert!(matches!(
            EmulatedBars::new(&[spec(0, mem32, 16, !0xfu64)]),
            Err(BarError::AddressTooHigh { .. })
        ));
        assert!(matches!(
            EmulatedBars::new(&[]).unwrap().with_rom(2048, !0x7ffu64),
            Err(BarError::AddressTooHigh { .. })
        ));
        let bars = EmulatedBars::new(&[]).unwrap();
        assert!(matches!(
            bars.clone().with_rom(0, 0),
            Err(BarError::ZeroSize {
                index: ROM_BAR_INDEX
            })
        ));
        assert!(matches!(
            bars.clone().with_rom(4096, 2048),
            Err(BarError::Misaligned { .. })
        ));
        assert!(matches!(
            bars.clone().with_rom(4 * GIB, 0),
            Err(BarError::TooLarge { .. })
        ));
        assert!(matches!(
            bars.with_rom(4096, 4 * GIB),
            Err(BarError::AddressTooHigh { .. })
        ));
        let message = BarError::Misaligned {
            index: 1,
            gpa: 0x1000,
            size: 0x2000,
        }
        .to_string();
        assert!(
            message.contains("BAR 1") && message.contains("0x2000"),
            "{message}"
        );
    }

    #[test]
    fn every_dword_value_in_every_register_is_handled() {
        let mut bars = h100_like().with_rom(4096, 0xfeb0_0000).unwrap();
        for offset in (0x10u16..0x34).step_by(4) {
            for value in [
                0u32,
                1,
                0x7fff_ffff,
                0x8000_0000,
                0xffff_fffe,
                u32::MAX,
                0xdead_beef,
            ] {
                let _ = write32(&mut bars, offset, value);
                let _ = read32(&bars, offset);
            }
        }
    }
}
