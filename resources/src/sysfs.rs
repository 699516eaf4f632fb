//! A host PCI device's BARs from sysfs, for `barge plan BDF`.
//!
//! `/sys/bus/pci/devices/<BDF>/resource` has one line per resource,
//! `0x%016llx 0x%016llx 0x%016llx` = start, end (inclusive), flags; lines 0..=5 are the
//! BARs (6 is the expansion ROM, then bridge windows or SR-IOV BARs). Flags are Linux's
//! `IORESOURCE_*` bits (include/linux/ioport.h). The MSI-X table and PBA location comes from
//! the capability list in `config`, which only root can read past the first 64 bytes; without
//! it the MSI-X location stays unknown.
//!
//! [`parse_resource`] and [`parse_msix`] are pure functions over the file contents;
//! [`read_device`] reads them under a sysfs root (`/sys`, or a fake tree in tests).

use std::path::{Path, PathBuf};

use crate::placement::{BarInput, BarRange, BarWidth, DeviceInput, PageSize, MAX_BAR_INDEX};

/// The real sysfs mount point.
pub const SYSFS_ROOT: &str = "/sys";
/// `IORESOURCE_IO`: an I/O port BAR.
pub const IORESOURCE_IO: u64 = 0x0000_0100;
/// `IORESOURCE_MEM`: a memory BAR.
pub const IORESOURCE_MEM: u64 = 0x0000_0200;
/// `IORESOURCE_PREFETCH`: prefetchable memory.
pub const IORESOURCE_PREFETCH: u64 = 0x0000_2000;
/// `IORESOURCE_MEM_64`: a 64-bit memory BAR.
pub const IORESOURCE_MEM_64: u64 = 0x0010_0000;

/// PCI capability ID of MSI-X.
const PCI_CAP_ID_MSIX: u8 = 0x11;
/// Config-space offset of the capability list pointer.
const PCI_CAPABILITY_LIST: usize = 0x34;
/// Status register bit: the capability list exists.
const PCI_STATUS_CAP_LIST: u16 = 0x10;

/// Why a device's BARs cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum SysfsError {
    /// Not `DDDD:BB:DD.F` or `BB:DD.F`.
    #[error("invalid PCI address {0:?}: write it as DDDD:BB:DD.F (e.g. 0000:41:00.0), as `lspci -D` prints it")]
    InvalidBdf(String),
    /// No such directory under sysfs.
    #[error("no PCI device {bdf} ({} does not exist): list devices with `lspci -D`", path.display())]
    NoSuchDevice {
        bdf: String,
        /// The directory looked for.
        path: PathBuf,
    },
    /// A sysfs file cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A line of `resource` that is not three hex numbers.
    #[error(
        "line {line_number} of a sysfs resource file is not \"start end flags\" in hex: {line:?}"
    )]
    BadResourceLine {
        /// 1-based line number.
        line_number: usize,
        line: String,
    },
}

/// One BAR as sysfs reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SysfsBar {
    /// BAR index 0..=5.
    pub index: u8,
    /// Host physical start address (0 when unassigned).
    pub host_start: u64,
    /// Size in bytes (end − start + 1).
    pub size: u64,
    /// `IORESOURCE_*` flags.
    pub flags: u64,
}

impl SysfsBar {
    /// An I/O port BAR (not placed in MMIO windows).
    pub fn is_io(&self) -> bool {
        self.flags & IORESOURCE_IO != 0 && self.flags & IORESOURCE_MEM == 0
    }

    /// A memory BAR.
    pub fn is_mem(&self) -> bool {
        self.flags & IORESOURCE_MEM != 0
    }

    /// The BAR as planner input, with MSI-X structures from `msix` if they are in it;
    /// `None` for I/O BARs.
    pub fn to_bar_input(&self, msix: Option<&MsixLocation>) -> Option<BarInput> {
        if !self.is_mem() {
            return None;
        }
        let width = if self.flags & IORESOURCE_MEM_64 != 0 {
            BarWidth::Bits64
        } else {
            BarWidth::Bits32
        };
        let mut bar = BarInput::new(
            self.index,
            self.size,
            width,
            self.flags & IORESOURCE_PREFETCH != 0,
        );
        if let Some(msix) = msix {
            bar.msix_table = (msix.table_bar == self.index).then_some(msix.table);
            bar.msix_pba = (msix.pba_bar == self.index).then_some(msix.pba);
        }
        Some(bar)
    }

    /// The largest page size the host address is aligned to (the host side of a huge
    /// mapping needs it); `None` when unassigned.
    pub fn host_alignment(&self) -> Option<PageSize> {
        if self.host_start == 0 {
            return None;
        }
        PageSize::ALL
            .into_iter()
            .rev()
            .find(|p| self.host_start % p.bytes() == 0)
    }
}

/// Where MSI-X puts its table and pending-bit array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixLocation {
    /// Number of table entries.
    pub entries: u16,
    /// BAR holding the table.
    pub table_bar: u8,
    /// Table range inside that BAR (16 bytes per entry).
    pub table: BarRange,
    /// BAR holding the PBA.
    pub pba_bar: u8,
    /// PBA range inside that BAR (one bit per entry, in 64-bit words).
    pub pba: BarRange,
}

/// A device read from sysfs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SysfsDevice {
    /// Normalized `DDDD:BB:DD.F`.
    pub bdf: String,
    /// Non-empty BARs (memory and I/O), by index.
    pub bars: Vec<SysfsBar>,
    /// MSI-X location, when `config` was readable far enough.
    pub msix: Option<MsixLocation>,
}

impl SysfsDevice {
    /// Planner input: the memory BARs, named by the BDF. I/O BARs are left out.
    pub fn device_input(&self, align_cap: Option<PageSize>) -> DeviceInput {
        DeviceInput {
            name: self.bdf.clone(),
            bars: self
                .bars
                .iter()
                .filter_map(|b| b.to_bar_input(self.msix.as_ref()))
                .collect(),
            align_cap,
        }
    }
}

/// `DDDD:BB:DD.F` from `DDDD:BB:DD.F` or `BB:DD.F` (domain 0), lower-case.
pub fn normalize_bdf(text: &str) -> Result<String, SysfsError> {
    let invalid = || SysfsError::InvalidBdf(text.to_string());
    let lower = text.trim().to_ascii_lowercase();
    let full = if lower.matches(':').count() == 1 {
        format!("0000:{lower}")
    } else {
        lower
    };
    let (domain, rest) = full.split_once(':').ok_or_else(invalid)?;
    let (bus, rest) = rest.split_once(':').ok_or_else(invalid)?;
    let (device, function) = rest.split_once('.').ok_or_else(invalid)?;
    let hex = |s: &str, len: usize| s.len() == len && s.chars().all(|c| c.is_ascii_hexdigit());
    let device_ok = hex(device, 2) && u8::from_str_radix(device, 16).is_ok_and(|d| d < 32);
    let function_ok = function.len() == 1 && matches!(function.as_bytes()[0], b'0'..=b'7');
    if hex(domain, 4) && hex(bus, 2) && device_ok && function_ok {
        Ok(full)
    } else {
        Err(invalid())
    }
}

/// The BARs (lines 0..=5) in a sysfs `resource` file; empty ones are left out.
pub fn parse_resource(text: &str) -> Result<Vec<SysfsBar>, SysfsError> {
    let mut bars = Vec::new();
    for (number, line) in text.lines().enumerate() {
        if number > usize::from(MAX_BAR_INDEX) {
            break;
        }
        let bad = || SysfsError::BadResourceLine {
            line_number: number + 1,
            line: line.to_string(),
        };
        let fields: Vec<u64> = line
            .split_whitespace()
            .map(|f| {
                f.strip_prefix("0x")
                    .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            })
            .collect::<Option<_>>()
            .ok_or_else(bad)?;
        let [start, end, flags] = fields[..] else {
            return Err(bad());
        };
        if flags == 0 && start == 0 && end == 0 {
            continue; // Unimplemented BAR, or the upper half of a 64-bit one.
        }
        if end < start {
            return Err(bad());
        }
        let size = (end - start).checked_add(1).ok_or_else(bad)?;
        bars.push(SysfsBar {
            index: u8::try_from(number).map_err(|_| bad())?,
            host_start: start,
            size,
            flags,
        });
    }
    Ok(bars)
}

/// The MSI-X capability in a config-space dump, if the dump reaches it.
pub fn parse_msix(config: &[u8]) -> Option<MsixLocation> {
    let u16_at = |o: usize| Some(u16::from_le_bytes([*config.get(o)?, *config.get(o + 1)?]));
    let u32_at = |o: usize| {
        Some(u32::from_le_bytes([
            *config.get(o)?,
            *config.get(o + 1)?,
            *config.get(o + 2)?,
            *config.get(o + 3)?,
        ]))
    };
    let status = u16_at(0x06)?;
    if status & PCI_STATUS_CAP_LIST == 0 {
        return None;
    }
    let mut pointer = usize::from(*config.get(PCI_CAPABILITY_LIST)? & 0xfc);
    // At most 48 capabilities fit in the 192 bytes after the header: stop loops.
    for _ in 0..48 {
        if pointer < 0x40 {
            return None;
        }
        let id = *config.get(pointer)?;
        if id == PCI_CAP_ID_MSIX {
            let control = u16_at(pointer + 2)?;
            let table = u32_at(pointer + 4)?;
            let pba = u32_at(pointer + 8)?;
            let entries = (control & 0x7ff) + 1;
            let table_bar = (table & 7) as u8;
            let pba_bar = (pba & 7) as u8;
            if table_bar > MAX_BAR_INDEX || pba_bar > MAX_BAR_INDEX {
                return None;
            }
            return Some(MsixLocation {
                entries,
                table_bar,
                table: BarRange::new(u64::from(table & !7), u64::from(entries) * 16),
                pba_bar,
                pba: BarRange::new(u64::from(pba & !7), u64::from(entries).div_ceil(64) * 8),
            });
        }
        pointer = usize::from(*config.get(pointer + 1)? & 0xfc);
    }
    None
}

/// Reads `<sysfs_root>/bus/pci/devices/<bdf>/resource` (and `config` where readable).
pub fn read_device(bdf: &str, sysfs_root: &Path) -> Result<SysfsDevice, SysfsError> {
    let bdf = normalize_bdf(bdf)?;
    let dir = sysfs_root.join("bus/pci/devices").join(&bdf);
    if !dir.is_dir() {
        return Err(SysfsError::NoSuchDevice { bdf, path: dir });
    }
    let resource = dir.join("resource");
    let text = std::fs::read_to_string(&resource).map_err(|source| SysfsError::Read {
        path: resource.clone(),
        source,
    })?;
    let bars = parse_resource(&text)?;
    // Unprivileged readers get only the 64-byte header: no capabilities, no MSI-X info.
    let msix = std::fs::read(dir.join("config"))
        .ok()
        .and_then(|config| parse_msix(&config));
    Ok(SysfsDevice { bdf, bars, msix })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    /// `resource` of an H100 as Linux prints it (BAR0 32-bit, BAR1/3 64-bit prefetchable,
    /// empty upper halves, ROM line, SR-IOV lines).
    const H100_RESOURCE: &str = "\
0x00000000a2000000 0x00000000a2ffffff 0x0000000000040200
0x0000380000000000 0x0000381fffffffff 0x000000000014220c
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000382000000000 0x0000382001ffffff 0x000000000014220c
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x0000000000000000 0x0000000000000000 0x0000000000000000
0x00000000a3000000 0x00000000a307ffff 0x0000000000046200
0x0000000000000000 0x0000000000000000 0x0000000000000000
";

    /// Config space with a PM capability at 0x40 pointing to MSI-X at 0x50:
    /// 32 entries, table in BAR 0 at 0xb90000, PBA in BAR 0 at 0xba0000.
    fn config_with_msix() -> Vec<u8> {
        let mut c = vec![0u8; 256];
        c[0x06] = PCI_STATUS_CAP_LIST as u8;
        c[PCI_CAPABILITY_LIST] = 0x40;
        c[0x40] = 0x01; // PM
        c[0x41] = 0x50;
        c[0x50] = PCI_CAP_ID_MSIX;
        c[0x51] = 0x00;
        c[0x52..0x54].copy_from_slice(&31u16.to_le_bytes());
        c[0x54..0x58].copy_from_slice(&0x00b9_0000u32.to_le_bytes());
        c[0x58..0x5c].copy_from_slice(&0x00ba_0000u32.to_le_bytes());
        c
    }

    #[test]
    fn h100_resource_file_gives_three_memory_bars() {
        let bars = parse_resource(H100_RESOURCE).unwrap();
        assert_eq!(bars.iter().map(|b| b.index).collect::<Vec<_>>(), [0, 1, 3]);
        let inputs: Vec<BarInput> = bars.iter().filter_map(|b| b.to_bar_input(None)).collect();
        assert_eq!(
            inputs[0],
            BarInput::new(0, 16 * MIB, BarWidth::Bits32, false)
        );
        assert_eq!(
            inputs[1],
            BarInput::new(1, 128 * GIB, BarWidth::Bits64, true)
        );
        assert_eq!(
            inputs[2],
            BarInput::new(3, 32 * MIB, BarWidth::Bits64, true)
        );
        assert_eq!(bars[1].host_alignment(), Some(PageSize::Size1G));
        assert_eq!(bars[0].host_alignment(), Some(PageSize::Size2M));
    }

    #[test]
    fn io_bars_are_kept_but_not_planned() {
        let text = "0x000000000000e000 0x000000000000e01f 0x0000000000040101\n\
                    0x00000000fe000000 0x00000000fe000fff 0x0000000000040200\n";
        let bars = parse_resource(text).unwrap();
        assert!(bars[0].is_io());
        assert!(bars[0].to_bar_input(None).is_none());
        assert!(bars[1].is_mem());
        assert_eq!(bars[1].to_bar_input(None).unwrap().size, 4096);
    }

    #[test]
    fn bad_resource_lines_are_errors_with_the_line_number() {
        for text in [
            "0x0 0x1\n",
            "garbage\n",
            "0x10 0x0f 0x200\n",
            "0x0 0xffffffffffffffff 0x200\n",
            "0x0 0x1 0x200 0x4\n",
        ] {
            let err = parse_resource(text).unwrap_err();
            assert!(err.to_string().contains("line 1"), "{err}");
        }
        let err = parse_resource("0x0 0x0 0x0\n12\n").unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    #[test]
    fn msix_capability_is_found_through_the_list() {
        let msix = parse_msix(&config_with_msix()).unwrap();
        assert_eq!(msix.entries, 32);
        assert_eq!(
            (msix.table_bar, msix.table),
            (0, BarRange::new(0xb9_0000, 512))
        );
        assert_eq!((msix.pba_bar, msix.pba), (0, BarRange::new(0xba_0000, 8)));
        // Only the 64-byte header (unprivileged read): unknown.
        assert_eq!(parse_msix(&config_with_msix()[..64]), None);
        // A capability list that loops ends.
        let mut looping = config_with_msix();
        looping[0x50] = 0x05;
        looping[0x51] = 0x40;
        assert_eq!(parse_msix(&looping), None);
        assert_eq!(parse_msix(&[]), None);
    }

    #[test]
    fn bdfs_are_normalized_or_rejected() {
        assert_eq!(normalize_bdf("41:00.0").unwrap(), "0000:41:00.0");
        assert_eq!(normalize_bdf("0000:C1:00.1").unwrap(), "0000:c1:00.1");
        for bad in [
            "",
            "41:00",
            "0000:41:00.8",
            "0000:41:20.0",
            "x:41:00.0",
            "1:2:3.4",
        ] {
            assert!(
                matches!(normalize_bdf(bad), Err(SysfsError::InvalidBdf(_))),
                "{bad:?}"
            );
        }
    }

    fn fake_sysfs(name: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("barge-sysfs-{name}-{}", std::process::id()));
        let dir = root.join("bus/pci/devices/0000:41:00.0");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("resource"), H100_RESOURCE).unwrap();
        root
    }

    #[test]
    fn read_device_from_a_fake_sysfs_root() {
        let root = fake_sysfs("read");
        let dir = root.join("bus/pci/devices/0000:41:00.0");
        std::fs::write(dir.join("config"), config_with_msix()).unwrap();
        let device = read_device("41:00.0", &root).unwrap();
        assert_eq!(device.bdf, "0000:41:00.0");
        assert_eq!(device.bars.len(), 3);
        let input = device.device_input(Some(PageSize::Size2M));
        assert_eq!(input.name, "0000:41:00.0");
        assert_eq!(input.align_cap, Some(PageSize::Size2M));
        assert_eq!(
            input.bars[0].msix_table,
            Some(BarRange::new(0xb9_0000, 512))
        );
        assert_eq!(input.bars[1].msix_table, None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn read_device_errors() {
        let root = fake_sysfs("errors");
        let err = read_device("0000:42:00.0", &root).unwrap_err();
        assert!(matches!(err, SysfsError::NoSuchDevice { .. }));
        assert!(err.to_string().contains("lspci -D"), "{err}");
        assert!(matches!(
            read_device("nonsense", &root),
            Err(SysfsError::InvalidBdf(_))
        ));
        let dir = root.join("bus/pci/devices/0000:43:00.0");
        std::fs::create_dir_all(&dir).unwrap();
        let err = read_device("0000:43:00.0", &root).unwrap_err();
        assert!(matches!(err, SysfsError::Read { .. }), "{err}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
