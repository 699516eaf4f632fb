//! Guest RAM regions, as each architecture's layout places them ([`RamLayout`]).
//!
//! - x86_64: RAM starts at guest physical address 0 and fills up to
//!   `arch::layout::MMIO32_HOLE_START` (3 GiB); whatever does not fit there continues at
//!   `arch::layout::RAM_64BIT_START` (4 GiB). The hole in between is for MMIO (PCI BARs,
//!   ECAM, IOAPIC, LAPIC) and is never RAM.
//! - aarch64: RAM is one region from `arch::aarch64::layout::RAM_START` (1 GiB); the GIC,
//!   the UART, the MMIO32 window and ECAM all lie below it.

/// Smallest RAM size barge accepts: 16 MiB. The first MiB holds barge's boot structures and
/// the legacy hole; a kernel and its initramfs need the rest (real Linux guests need far
/// more, which kernel loading reports on its own).
pub const MIN_RAM_SIZE: u64 = 16 << 20;
/// Largest RAM size barge accepts: 64 TiB (ends below 2^46, a common host MAXPHYADDR).
pub const MAX_RAM_SIZE: u64 = 64 << 40;
/// RAM sizes must be a multiple of this (4 KiB).
pub const RAM_ALIGNMENT: u64 = 0x1000;
/// The 64-bit MMIO window starts on this boundary (1 GiB), so huge BARs can be mapped with
/// 1 GiB pages.
pub const MMIO64_ALIGNMENT: u64 = 1 << 30;

/// Where an architecture puts guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamLayout {
    /// Guest physical address of the first byte of RAM.
    pub start: u64,
    /// The hole RAM goes around, as `(hole start, where RAM continues)`, or `None` when RAM
    /// is one contiguous region.
    pub hole: Option<(u64, u64)>,
}

impl RamLayout {
    /// x86_64: from 0 up to the 32-bit MMIO hole at 3 GiB, the rest from 4 GiB.
    pub const X86_64: RamLayout = RamLayout {
        start: 0,
        hole: Some((0xc000_0000, 0x1_0000_0000)),
    };
    /// aarch64: one region from `arch::aarch64::layout::RAM_START`.
    pub const AARCH64: RamLayout = RamLayout {
        start: arch::aarch64::layout::RAM_START,
        hole: None,
    };
    /// The layout of the architecture barge is built for.
    #[cfg(target_arch = "x86_64")]
    pub const HOST: RamLayout = RamLayout::X86_64;
    /// The layout of the architecture barge is built for.
    #[cfg(target_arch = "aarch64")]
    pub const HOST: RamLayout = RamLayout::AARCH64;
}

/// The 64-bit MMIO window never starts below this (4 GiB), on either architecture.
pub const MMIO64_MIN_START: u64 = 1 << 32;

/// One contiguous range of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest physical address of the first byte.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
}

impl RamRegion {
    /// Guest physical address one past the last byte.
    pub fn end(&self) -> u64 {
        self.gpa + self.size
    }

    /// The region as the `(gpa, size)` pair `arch::setup_boot` takes.
    pub fn as_pair(&self) -> (u64, u64) {
        (self.gpa, self.size)
    }
}

/// Why a RAM size cannot be laid out.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RamError {
    /// Below [`MIN_RAM_SIZE`].
    #[error("memory size {size} bytes is too small: give at least {min} bytes (16M)")]
    TooSmall {
        /// The size asked for.
        size: u64,
        /// [`MIN_RAM_SIZE`].
        min: u64,
    },
    /// Above [`MAX_RAM_SIZE`].
    #[error("memory size {size} bytes is too large: give at most {max} bytes (64T)")]
    TooLarge {
        /// The size asked for.
        size: u64,
        /// [`MAX_RAM_SIZE`].
        max: u64,
    },
    /// Not a multiple of 4 KiB.
    #[error(
        "memory size {size} bytes is not a multiple of 4 KiB: round it to whole pages (e.g. 512M)"
    )]
    Unaligned {
        /// The size asked for.
        size: u64,
    },
}

/// Splits `size` bytes of RAM into regions the way the guest architecture's layout
/// ([`RamLayout::HOST`]) places them.
pub fn ram_regions(size: u64) -> Result<Vec<RamRegion>, RamError> {
    ram_regions_in(&RamLayout::HOST, size)
}

/// Splits `size` bytes of RAM into regions of `layout`: one from `layout.start` up to at
/// most the hole, and, when more remains, one from where RAM continues after it.
pub fn ram_regions_in(layout: &RamLayout, size: u64) -> Result<Vec<RamRegion>, RamError> {
    if size < MIN_RAM_SIZE {
        return Err(RamError::TooSmall {
            size,
            min: MIN_RAM_SIZE,
        });
    }
    if size > MAX_RAM_SIZE {
        return Err(RamError::TooLarge {
            size,
            max: MAX_RAM_SIZE,
        });
    }
    if size % RAM_ALIGNMENT != 0 {
        return Err(RamError::Unaligned { size });
    }
    let Some((hole_start, high_start)) = layout.hole else {
        return Ok(vec![RamRegion {
            gpa: layout.start,
            size,
        }]);
    };
    let low = size.min(hole_start - layout.start);
    let mut regions = vec![RamRegion {
        gpa: layout.start,
        size: low,
    }];
    if size > low {
        regions.push(RamRegion {
            gpa: high_start,
            size: size - low,
        });
    }
    Ok(regions)
}

/// Where the 64-bit MMIO window (for large PCI BARs) starts: the end of RAM rounded up to
/// 1 GiB, and never below 4 GiB. An empty slice gives 4 GiB.
pub fn mmio64_window_start(regions: &[RamRegion]) -> u64 {
    let end = regions.iter().map(RamRegion::end).max().unwrap_or(0);
    end.div_ceil(MMIO64_ALIGNMENT)
        .saturating_mul(MMIO64_ALIGNMENT)
        .max(MMIO64_MIN_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MMIO32_HOLE_START: u64 = 0xc000_0000;
    const RAM_64BIT_START: u64 = 0x1_0000_0000;

    /// The x86_64 tests below run on the x86_64 layout on every host.
    fn ram_regions(size: u64) -> Result<Vec<RamRegion>, RamError> {
        ram_regions_in(&RamLayout::X86_64, size)
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_x86_64_layout_is_the_one_arch_gives() {
        assert_eq!(RamLayout::HOST, RamLayout::X86_64);
        assert_eq!(RamLayout::X86_64.start, arch::layout::RAM_START);
        assert_eq!(
            RamLayout::X86_64.hole,
            Some((
                arch::layout::MMIO32_HOLE_START,
                arch::layout::RAM_64BIT_START
            ))
        );
    }

    #[test]
    fn aarch64_ram_is_one_region_from_1g() {
        assert_eq!(
            ram_regions_in(&RamLayout::AARCH64, 8 * GIB).unwrap(),
            vec![RamRegion {
                gpa: GIB,
                size: 8 * GIB
            }]
        );
        let regions = ram_regions_in(&RamLayout::AARCH64, 512 * MIB).unwrap();
        assert_eq!(mmio64_window_start(&regions), 4 * GIB);
        let regions = ram_regions_in(&RamLayout::AARCH64, 8 * GIB).unwrap();
        assert_eq!(mmio64_window_start(&regions), 9 * GIB);
    }

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn small_ram_is_one_region_from_zero() {
        assert_eq!(
            ram_regions(512 * MIB).unwrap(),
            vec![RamRegion {
                gpa: 0,
                size: 512 * MIB
            }]
        );
    }

    #[test]
    fn ram_exactly_filling_below_the_hole_is_one_region() {
        assert_eq!(
            ram_regions(3 * GIB).unwrap(),
            vec![RamRegion {
                gpa: 0,
                size: 3 * GIB
            }]
        );
    }

    #[test]
    fn large_ram_is_split_around_the_hole() {
        let regions = ram_regions(8 * GIB).unwrap();
        assert_eq!(
            regions,
            vec![
                RamRegion {
                    gpa: 0,
                    size: 3 * GIB
                },
                RamRegion {
                    gpa: 4 * GIB,
                    size: 5 * GIB
                }
            ]
        );
        assert_eq!(regions.iter().map(|r| r.size).sum::<u64>(), 8 * GIB);
    }

    #[test]
    fn regions_never_touch_the_mmio_hole() {
        for size in [16 * MIB, GIB, 3 * GIB - 4096, 3 * GIB + 4096, 64 * GIB] {
            for r in ram_regions(size).unwrap() {
                assert!(r.end() <= MMIO32_HOLE_START || r.gpa >= RAM_64BIT_START);
            }
        }
    }

    #[test]
    fn too_small_zero_and_unaligned_sizes_are_rejected() {
        assert!(matches!(ram_regions(0), Err(RamError::TooSmall { .. })));
        assert!(matches!(
            ram_regions(MIN_RAM_SIZE - 4096),
            Err(RamError::TooSmall { .. })
        ));
        assert_eq!(
            ram_regions(MIN_RAM_SIZE + 1),
            Err(RamError::Unaligned {
                size: MIN_RAM_SIZE + 1
            })
        );
        assert!(matches!(
            ram_regions(MAX_RAM_SIZE + 4096),
            Err(RamError::TooLarge { .. })
        ));
        assert!(ram_regions(MIN_RAM_SIZE).is_ok());
    }

    #[test]
    fn error_messages_say_what_to_do() {
        let msg = ram_regions(1).unwrap_err().to_string();
        assert!(msg.contains("at least"), "{msg}");
        let msg = ram_regions(MIN_RAM_SIZE + 1).unwrap_err().to_string();
        assert!(msg.contains("multiple of 4 KiB"), "{msg}");
    }

    #[test]
    fn mmio64_window_starts_at_4g_or_after_ram_on_a_gib_boundary() {
        assert_eq!(
            mmio64_window_start(&ram_regions(512 * MIB).unwrap()),
            4 * GIB
        );
        assert_eq!(mmio64_window_start(&ram_regions(3 * GIB).unwrap()), 4 * GIB);
        assert_eq!(
            mmio64_window_start(&ram_regions(3 * GIB + 4096).unwrap()),
            5 * GIB
        );
        assert_eq!(mmio64_window_start(&ram_regions(8 * GIB).unwrap()), 9 * GIB);
        assert_eq!(
            mmio64_window_start(&ram_regions(7 * GIB + 2 * MIB).unwrap()),
            9 * GIB
        );
        assert_eq!(mmio64_window_start(&[]), 4 * GIB);
    }
}
