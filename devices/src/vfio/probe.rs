//! What a VFIO device looks like before placement: its BARs (sizes from
//! region info, 32/64-bit and prefetchable from the device's own BAR
//! registers), the mmap-able areas, the MSI-X table and PBA, and the
//! capabilities barge hides. [`VfioProbe::device_input`] is the planner's
//! input for the device.

use resources::placement::{BarInput, BarRange, BarWidth, DeviceInput, PageSize};
use resources::sysfs::{parse_msix, MsixLocation};

use super::{RegionInfo, VfioDeviceAccess, CONFIG_REGION_INDEX};
use crate::pci::bar::{BarKind, BAR_COUNT, BAR_IO_SPACE, BAR_MEMORY_64BIT, BAR_PREFETCHABLE};
use crate::pci::caps::{CapabilityFilter, MaskPlan};
use crate::pci::config::{BAR0_OFFSET, CONFIG_SPACE_SIZE, HEADER_TYPE_OFFSET};

/// Smallest configuration region a PCI function has.
const MIN_CONFIG_SIZE: u64 = 64;

/// Why a device cannot be passed through as probed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProbeError {
    /// VFIO reports no (or too small a) configuration region.
    #[error("the VFIO device has no PCI configuration region (index 7) of at least 64 bytes; is it a PCI device bound to vfio-pci?")]
    NoConfigRegion,
    /// The vendor ID reads as 0xFFFF.
    #[error("the device does not answer configuration reads (vendor ID reads 0xffff); it may be in a low power state or gone: check `lspci -vv -s BDF`")]
    NotResponding,
    /// Not a type 0 header (bridges are not passed through).
    #[error("the device has header type {header_type:#x}; only type 0 endpoints can be passed through (not bridges)")]
    NotEndpoint {
        /// Header type (low 7 bits).
        header_type: u8,
    },
    /// A 64-bit BAR in the last register.
    #[error("BAR {index} claims to be 64-bit but is the last BAR register; the device's config space is inconsistent")]
    Bad64BitBar { index: u8 },
}

/// One implemented BAR of the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbedBar {
    /// BAR index 0..=5.
    pub index: u8,
    /// What it decodes, from the device's BAR register flags.
    pub kind: BarKind,
    /// VFIO's region info for it.
    pub region: RegionInfo,
}

impl ProbedBar {
    /// Size in bytes (the region's size).
    pub fn size(&self) -> u64 {
        self.region.size
    }
}

/// The device as read through its backend.
#[derive(Debug, Clone)]
pub struct VfioProbe {
    /// The configuration space as the device returned it (up to 4 KiB;
    /// shorter for a conventional PCI device), before masking.
    pub config: Vec<u8>,
    /// Size of the configuration region.
    pub config_size: u64,
    /// Implemented BARs (memory and I/O), by index.
    pub bars: Vec<ProbedBar>,
    /// The MSI-X capability's table and PBA, if the device has one.
    pub msix: Option<MsixLocation>,
    /// The capabilities hidden from the guest (resizable BAR, SR-IOV) and the
    /// patches that unlink them.
    pub mask: MaskPlan,
}

impl VfioProbe {
    /// Reads config space and region info from `backend`.
    pub fn read(backend: &impl VfioDeviceAccess) -> Result<Self, ProbeError> {
        let config_region = backend
            .region_info(CONFIG_REGION_INDEX)
            .filter(|info| info.size >= MIN_CONFIG_SIZE)
            .ok_or(ProbeError::NoConfigRegion)?;
        let config_size = config_region.size.min(CONFIG_SPACE_SIZE as u64);
        let mut config = vec![0xff; config_size as usize];
        for (index, chunk) in config.chunks_mut(4).enumerate() {
            backend.config_read(index as u64 * 4, chunk);
        }
        if config[0..2] == [0xff, 0xff] {
            return Err(ProbeError::NotResponding);
        }
        let header_type = config[usize::from(HEADER_TYPE_OFFSET)] & 0x7f;
        if header_type != 0 {
            return Err(ProbeError::NotEndpoint { header_type });
        }
        let mut bars = Vec::new();
        let mut index = 0u8;
        while usize::from(index) < BAR_COUNT {
            let register = usize::from(BAR0_OFFSET) + 4 * usize::from(index);
            let value = u32::from_le_bytes([
                config[register],
                config[register + 1],
                config[register + 2],
                config[register + 3],
            ]);
            let kind = bar_kind(value);
            let is_64bit = matches!(kind, BarKind::Memory64 { .. });
            let region = backend
                .region_info(u32::from(index))
                .filter(|info| info.size > 0);
            if let Some(region) = region {
                if is_64bit && usize::from(index) + 1 >= BAR_COUNT {
                    return Err(ProbeError::Bad64BitBar { index });
                }
                bars.push(ProbedBar {
                    index,
                    kind,
                    region,
                });
            }
            index += if is_64bit { 2 } else { 1 };
        }
        let msix = parse_msix(&config);
        let mask = CapabilityFilter::passthrough().plan(&config);
        Ok(Self {
            config,
            config_size,
            bars,
            msix,
            mask,
        })
    }

    /// The BAR at `index`, if implemented.
    pub fn bar(&self, index: u8) -> Option<&ProbedBar> {
        self.bars.iter().find(|bar| bar.index == index)
    }

    /// The planner's input: memory BARs with sizes, width, prefetchable,
    /// mmap-able areas (none when the region cannot be mmap'ed: all
    /// trapped) and the MSI-X table and PBA. I/O BARs are left out (the
    /// planner places memory only).
    pub fn device_input(&self, name: &str, align_cap: Option<PageSize>) -> DeviceInput {
        let bars = self
            .bars
            .iter()
            .filter_map(|bar| {
                let (width, prefetchable) = match bar.kind {
                    BarKind::Io => return None,
                    BarKind::Memory32 { prefetchable } => (BarWidth::Bits32, prefetchable),
                    BarKind::Memory64 { prefetchable } => (BarWidth::Bits64, prefetchable),
                };
                let mut input = BarInput::new(bar.index, bar.size(), width, prefetchable);
                input.areas = bar.region.mmap_areas();
                if let Some(msix) = &self.msix {
                    input.msix_table = in_bar(msix.table_bar, msix.table, bar);
                    input.msix_pba = in_bar(msix.pba_bar, msix.pba, bar);
                }
                Some(input)
            })
            .collect();
        DeviceInput {
            name: name.to_string(),
            bars,
            align_cap,
        }
    }
}

/// `range` if it belongs to `bar` and starts inside it.
fn in_bar(bar_index: u8, range: BarRange, bar: &ProbedBar) -> Option<BarRange> {
    (bar_index == bar.index && range.offset < bar.size()).then_some(range)
}

/// What a BAR register's flag bits say it decodes.
fn bar_kind(value: u32) -> BarKind {
    if value & BAR_IO_SPACE != 0 {
        return BarKind::Io;
    }
    let prefetchable = value & BAR_PREFETCHABLE != 0;
    // Memory type bits 2:1: 00 = 32-bit, 10 = 64-bit (01, below 1 MiB, is
    // treated as 32-bit).
    if value & 0b110 == BAR_MEMORY_64BIT {
        BarKind::Memory64 { prefetchable }
    } else {
        BarKind::Memory32 { prefetchable }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::caps::CapabilityId;
    use crate::vfio::fake::{FakeRegion, FakeVfioDevice};
    use crate::vfio::{REGION_FLAG_READ, REGION_FLAG_WRITE};

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn gpu_like_device_gives_planner_input_with_msix_and_widths() {
        let fake = FakeVfioDevice::gpu_like();
        let probe = VfioProbe::read(&fake).unwrap();
        assert_eq!(probe.config_size, 4096);
        assert_eq!(
            probe
                .bars
                .iter()
                .map(|bar| (bar.index, bar.kind, bar.size()))
                .collect::<Vec<_>>(),
            [
                (
                    0,
                    BarKind::Memory32 {
                        prefetchable: false
                    },
                    16 * MIB
                ),
                (1, BarKind::Memory64 { prefetchable: true }, 128 * GIB),
                (3, BarKind::Memory64 { prefetchable: true }, 32 * MIB),
                (5, BarKind::Io, 128),
            ]
        );
        let input = probe.device_input("0000:41:00.0", Some(PageSize::Size2M));
        assert_eq!(input.name, "0000:41:00.0");
        assert_eq!(input.align_cap, Some(PageSize::Size2M));
        assert_eq!(input.bars.len(), 3, "the I/O BAR is not planned");
        let bar0 = &input.bars[0];
        assert_eq!(bar0.width, BarWidth::Bits32);
        assert!(!bar0.prefetchable);
        assert_eq!(bar0.areas, None);
        assert_eq!(bar0.msix_table, Some(BarRange::new(0xb9_0000, 32 * 16)));
        assert_eq!(bar0.msix_pba, Some(BarRange::new(0xba_0000, 8)));
        let bar1 = &input.bars[1];
        assert_eq!(
            (bar1.index, bar1.size, bar1.width, bar1.prefetchable),
            (1, 128 * GIB, BarWidth::Bits64, true)
        );
        assert_eq!((bar1.msix_table, bar1.msix_pba), (None, None));
        assert_eq!(input.bars[2].index, 3);
        // ReBAR and SR-IOV are hidden, MSI and MSI-X stay.
        let masked: Vec<_> = probe.mask.masked.iter().map(|cap| cap.id).collect();
        assert_eq!(
            masked,
            [CapabilityId::Extended(0x15), CapabilityId::Extended(0x10)]
        );
    }

    #[test]
    fn sparse_and_non_mmap_regions_become_areas() {
        let fake = FakeVfioDevice::gpu_like()
            .with_region(
                0,
                FakeRegion::mmap(16 * MIB).sparse(vec![
                    BarRange::new(0, 0xb9_0000),
                    BarRange::new(0xbb_0000, 16 * MIB - 0xbb_0000),
                ]),
            )
            .with_region(
                3,
                FakeRegion {
                    flags: REGION_FLAG_READ | REGION_FLAG_WRITE,
                    ..FakeRegion::mmap(32 * MIB)
                },
            );
        let probe = VfioProbe::read(&fake).unwrap();
        let input = probe.device_input("dev", None);
        assert_eq!(
            input.bars[0].areas,
            Some(vec![
                BarRange::new(0, 0xb9_0000),
                BarRange::new(0xbb_0000, 16 * MIB - 0xbb_0000)
            ])
        );
        assert_eq!(input.bars[1].areas, None);
        assert_eq!(
            input.bars[2].areas,
            Some(vec![]),
            "not mmap-able: all trapped"
        );
    }

    #[test]
    fn the_input_plans_and_msix_pages_trap() {
        let fake = FakeVfioDevice::gpu_like();
        let input = VfioProbe::read(&fake).unwrap().device_input("gpu", None);
        let ram = resources::ram_regions(1 << 30).unwrap();
        let windows = resources::Windows::new(&ram, 46).unwrap();
        let plan = resources::plan(&[input], &windows).unwrap();
        let bar0 = &plan.devices[0].bars[0];
        assert!(bar0
            .traps()
            .iter()
            .any(|trap| trap.offset <= 0xb9_0000 && trap.end() >= 0xb9_1000));
        let bar1 = &plan.devices[0].bars[1];
        assert_eq!(bar1.gpa % (128 * GIB), 0);
        assert_eq!(bar1.page_size(), Some(PageSize::Size1G));
    }

    #[test]
    fn conventional_pci_config_region_of_256_bytes() {
        let fake = FakeVfioDevice::gpu_like().with_config_size(256);
        let probe = VfioProbe::read(&fake).unwrap();
        assert_eq!(probe.config.len(), 256);
        assert!(probe.mask.extended.capabilities.is_empty());
        assert!(probe.mask.masked.is_empty());
        assert!(probe.msix.is_some());
    }

    #[test]
    fn probe_errors() {
        let fake = FakeVfioDevice::gpu_like().with_config_size(0);
        assert_eq!(
            VfioProbe::read(&fake).unwrap_err(),
            ProbeError::NoConfigRegion
        );
        let fake = FakeVfioDevice::gpu_like();
        fake.set_config_bytes(0, &[0xff, 0xff]);
        assert_eq!(
            VfioProbe::read(&fake).unwrap_err(),
            ProbeError::NotResponding
        );
        let fake = FakeVfioDevice::gpu_like();
        fake.set_config_bytes(0x0e, &[0x81]);
        assert_eq!(
            VfioProbe::read(&fake).unwrap_err(),
            ProbeError::NotEndpoint { header_type: 1 }
        );
        let fake = FakeVfioDevice::gpu_like().with_region(5, FakeRegion::mmap(4096));
        fake.set_config_bytes(0x24, &0x0000_000cu32.to_le_bytes());
        assert_eq!(
            VfioProbe::read(&fake).unwrap_err(),
            ProbeError::Bad64BitBar { index: 5 }
        );
    }

    #[test]
    fn bar_kind_from_register_flags() {
        assert_eq!(bar_kind(0x1), BarKind::Io);
        assert_eq!(bar_kind(0xffff_fff1), BarKind::Io);
        assert_eq!(
            bar_kind(0x0),
            BarKind::Memory32 {
                prefetchable: false
            }
        );
        assert_eq!(bar_kind(0x8), BarKind::Memory32 { prefetchable: true });
        assert_eq!(
            bar_kind(0x4),
            BarKind::Memory64 {
                prefetchable: false
            }
        );
        assert_eq!(bar_kind(0xc), BarKind::Memory64 { prefetchable: true });
        assert_eq!(
            bar_kind(0x2),
            BarKind::Memory32 {
                prefetchable: false
            }
        );
    }
}
