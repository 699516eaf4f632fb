//! The guest memory map (e820 / PVH memmap) derived from the RAM regions and the layout.
//!
//! RAM below `EBDA_START` and from `HIMEM_START` on is usable; `EBDA_START..HIMEM_START`
//! (EBDA, legacy VGA/BIOS hole, ACPI tables) is reserved. The PCIe ECAM area
//! (`PCIE_ECAM_START`, `PCIE_ECAM_SIZE`) is reserved too: Linux only trusts the MCFG
//! table's ECAM when the firmware reserved it (`pci_mmcfg_reserved` checks the e820 map).
//! The rest of the 32-bit MMIO hole is not in the map at all (it is not RAM).

use crate::x86_64::layout::{
    EBDA_START, HIMEM_START, MEM_32BIT_END, MMIO32_HOLE_START, PCIE_ECAM_SIZE, PCIE_ECAM_START,
};

/// e820 type: usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type: reserved.
pub const E820_RESERVED: u32 = 2;

/// What a map entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Kind {
    /// Usable RAM.
    Ram,
    /// Reserved (EBDA, BIOS area, ACPI tables).
    Reserved,
}

impl E820Kind {
    /// The e820 type number (the PVH memmap uses the same numbers).
    pub fn type_number(self) -> u32 {
        match self {
            E820Kind::Ram => E820_RAM,
            E820Kind::Reserved => E820_RESERVED,
        }
    }
}

/// One entry of the memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Guest physical start.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// RAM or reserved.
    pub kind: E820Kind,
}

/// RAM regions that cannot be described to the guest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum E820Error {
    /// No RAM at all.
    #[error("no RAM regions given: pass the regions from resources::ram_regions")]
    NoRam,
    /// Low memory missing: barge's boot structures live in the first MiB.
    #[error("the first RAM region must start at 0 and cover at least the first MiB (got {gpa:#x}+{size:#x}); use resources::ram_regions")]
    NoLowMemory {
        /// First region's start.
        gpa: u64,
        /// First region's size.
        size: u64,
    },
    /// Regions are not sorted or overlap.
    #[error("RAM region {gpa:#x}+{size:#x} overlaps or precedes the previous one; pass regions sorted by address and disjoint")]
    Unordered {
        /// Offending region start.
        gpa: u64,
        /// Offending region size.
        size: u64,
    },
    /// A region reaches into the 32-bit MMIO hole.
    #[error("RAM region {gpa:#x}+{size:#x} reaches into the MMIO hole {MMIO32_HOLE_START:#x}..{MEM_32BIT_END:#x}; split RAM with resources::ram_regions")]
    InMmioHole {
        /// Offending region start.
        gpa: u64,
        /// Offending region size.
        size: u64,
    },
}

/// Builds the memory map for the RAM regions `(gpa, size)`, sorted by address.
pub fn memory_map(ram: &[(u64, u64)]) -> Result<Vec<E820Entry>, E820Error> {
    let &(first_gpa, first_size) = ram.first().ok_or(E820Error::NoRam)?;
    if first_gpa != 0 || first_size < HIMEM_START {
        return Err(E820Error::NoLowMemory {
            gpa: first_gpa,
            size: first_size,
        });
    }
    let mut prev_end = 0u64;
    let mut map = Vec::with_capacity(ram.len() + 2);
    for (i, &(gpa, size)) in ram.iter().enumerate() {
        let end = gpa.checked_add(size);
        let Some(end) = end.filter(|_| size > 0 && (i == 0 || gpa >= prev_end)) else {
            return Err(E820Error::Unordered { gpa, size });
        };
        if gpa < MEM_32BIT_END && end > MMIO32_HOLE_START {
            return Err(E820Error::InMmioHole { gpa, size });
        }
        prev_end = end;
        if i == 0 {
            map.push(E820Entry {
                addr: 0,
                size: EBDA_START,
                kind: E820Kind::Ram,
            });
            map.push(E820Entry {
                addr: EBDA_START,
                size: HIMEM_START - EBDA_START,
                kind: E820Kind::Reserved,
            });
            if end > HIMEM_START {
                map.push(E820Entry {
                    addr: HIMEM_START,
                    size: end - HIMEM_START,
                    kind: E820Kind::Ram,
                });
            }
        } else {
            map.push(E820Entry {
                addr: gpa,
                size,
                kind: E820Kind::Ram,
            });
        }
    }
    // RAM below 4 GiB ends before the hole, RAM above starts at 4 GiB: the ECAM entry
    // goes right after the last region below 4 GiB to keep the map sorted.
    let at = map
        .iter()
        .position(|e| e.addr >= MEM_32BIT_END)
        .unwrap_or(map.len());
    map.insert(
        at,
        E820Entry {
            addr: PCIE_ECAM_START,
            size: PCIE_ECAM_SIZE,
            kind: E820Kind::Reserved,
        },
    );
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_ram_is_split_around_the_ebda_and_bios_area() {
        let map = memory_map(&[(0, 512 << 20)]).unwrap();
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820Kind::Ram
                },
                E820Entry {
                    addr: 0x9fc00,
                    size: 0x100000 - 0x9fc00,
                    kind: E820Kind::Reserved
                },
                E820Entry {
                    addr: 0x100000,
                    size: (512 << 20) - 0x100000,
                    kind: E820Kind::Ram
                },
                E820Entry {
                    addr: 0xe000_0000,
                    size: 0x1000_0000,
                    kind: E820Kind::Reserved
                },
            ]
        );
    }

    #[test]
    fn high_ram_is_a_separate_entry_and_the_hole_is_not_ram() {
        let map = memory_map(&[(0, 0xc000_0000), (1 << 32, 1 << 30)]).unwrap();
        assert_eq!(map.len(), 5);
        assert_eq!(
            map[3],
            E820Entry {
                addr: PCIE_ECAM_START,
                size: PCIE_ECAM_SIZE,
                kind: E820Kind::Reserved
            }
        );
        assert_eq!(
            map[4],
            E820Entry {
                addr: 1 << 32,
                size: 1 << 30,
                kind: E820Kind::Ram
            }
        );
        for e in map.iter().filter(|e| e.kind == E820Kind::Ram) {
            assert!(e.addr + e.size <= MMIO32_HOLE_START || e.addr >= MEM_32BIT_END);
        }
        for pair in map.windows(2) {
            assert!(
                pair[0].addr + pair[0].size <= pair[1].addr,
                "sorted, disjoint"
            );
        }
    }

    #[test]
    fn bad_regions_are_rejected() {
        assert_eq!(memory_map(&[]), Err(E820Error::NoRam));
        assert!(matches!(
            memory_map(&[(0x100000, 16 << 20)]),
            Err(E820Error::NoLowMemory { .. })
        ));
        assert!(matches!(
            memory_map(&[(0, 0xd000_0000)]),
            Err(E820Error::InMmioHole { .. })
        ));
        assert!(matches!(
            memory_map(&[(0, 16 << 20), (8 << 20, 16 << 20)]),
            Err(E820Error::Unordered { .. })
        ));
    }
}
