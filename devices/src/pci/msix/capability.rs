//! The MSI-X capability as a device reports it in configuration space
//! ([`MsixCapability`]): finding and parsing it, where its table and PBA lie
//! ([`BarRegion`]) and which pages must trap for them, its registers as the
//! guest sees them after a relocation, and the writable bits of Message
//! Control.

use super::{
    MsixError, MSIX_BIR_MASK, MSIX_CAPABILITY_SIZE, MSIX_CONTROL_ENABLE,
    MSIX_CONTROL_FUNCTION_MASK, MSIX_CONTROL_OFFSET, MSIX_CONTROL_TABLE_SIZE, MSIX_ENTRY_SIZE,
    MSIX_PAGE_SIZE, QWORD,
};
use crate::pci::caps::{standard_capabilities, CapabilityId, CAP_ID_MSIX};

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
    /// [`MsixTable::message_control`](super::MsixTable::message_control))
    /// and this capability's table and PBA registers (which differ from the
    /// device's after relocation). Bytes outside those registers are left
    /// alone.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::msix::fixtures::config_with_msix;

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
}
