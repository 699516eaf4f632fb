//! The relocation policy: whether the MSI-X table and PBA stay where the
//! device has them, with their pages trapped, or move to a BAR of their own
//! that is emulated entirely ([`relocation`], [`RelocationPolicy`],
//! [`MsixPlacement`]), so that a trapped 4 KiB page does not cost a large BAR
//! its huge pages.

use super::capability::{BarRegion, MsixCapability};
use super::{MsixError, MSIX_PAGE_SIZE, MSIX_RELOCATION_THRESHOLD};

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

impl MsixCapability {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::msix::fixtures::config_with_msix;

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
}
