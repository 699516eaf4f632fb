//! The extra PCI devices of a VM: VFIO passthrough and ivshmem-compatible
//! shared memory, as `barge run` options and as the config file's `devices`.
//!
//! ```text
//! --device vfio=0000:41:00.0[,bar-align=auto|4k|2m|1g]      (repeatable)
//! --shmem size=8G[,path=FILE][,hugepages=2M|1G][,bar-align=auto|4k|2m|1g]  (repeatable)
//! --vfio-backend legacy|iommufd|auto                          (once, for every VFIO device)
//! ```
//!
//! In JSON (`VmConfig.devices`, externally tagged):
//!
//! ```json
//! "devices": [
//!   {"vfio": {"bdf": "0000:41:00.0", "bar_align": "2m"}},
//!   {"shmem": {"size": "8G", "path": "/dev/shm/ivshmem", "hugepages": "1G"}}
//! ],
//! "vfio_backend": "legacy"
//! ```
//!
//! `bar-align` caps the alignment of a device's BARs (GPA and HVA moved off
//! the larger boundary together) so that they get at most that page size:
//! the comparison mode. `auto` (the default) aligns for the largest pages.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use devices::vfio::InvalidVfioBackend;
pub use devices::vfio::VfioBackendKind;
use resources::placement::PageSize;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::config::disk::{validate_disks, DiskConfig, DiskConfigError};
use crate::config::net::{NetConfig, NetConfigError};
use crate::config::options::{
    format_option_size, parse_key_values, parse_size, HugePageSize, OptionError,
};

/// Smallest shared memory size: one page (a memslot is page-sized).
pub const MIN_SHMEM_SIZE: u64 = 4096;

/// Errors in `--device`, `--shmem` and `--vfio-backend` values (and their
/// JSON forms).
#[derive(Debug, thiserror::Error)]
pub enum DeviceConfigError {
    /// The value's syntax: a key, a size or a huge page size.
    #[error(transparent)]
    Option(#[from] OptionError),
    /// `bar-align` with an unknown value.
    #[error("invalid bar-align {0:?}: use auto, 4k, 2m or 1g")]
    InvalidBarAlign(String),
    /// `--vfio-backend` with an unknown value.
    #[error(transparent)]
    InvalidBackend(#[from] InvalidVfioBackend),
    /// `p2p` with an unknown value.
    #[error("invalid p2p {0:?}: use on, off, auto or background")]
    InvalidP2p(String),
    /// A `--device` kind barge does not have.
    #[error("--device: unknown device {0:?}; barge passes through PCI devices with vfio=DDDD:BB:DD.F (shared memory is --shmem)")]
    UnknownDevice(String),
    /// A PCI address that does not parse.
    #[error("--device vfio={0:?}: not a PCI address; write it as DDDD:BB:DD.F (e.g. 0000:41:00.0), as `lspci -D` prints it")]
    InvalidBdf(String),
    /// The same host device twice.
    #[error("PCI device {0} is passed through twice; give each --device once")]
    DuplicateVfio(String),
    /// Shared memory that is not a power of two.
    #[error("--shmem size={}: ivshmem's BAR2 is the shared memory and a BAR's size must be a power of two; use {} or {}", format_option_size(*size), format_option_size(prev_power_of_two(*size)), format_option_size(size.next_power_of_two()))]
    ShmemNotPowerOfTwo { size: u64 },
    /// Shared memory below one page.
    #[error("--shmem size={}: shared memory needs at least 4K (one page)", format_option_size(*size))]
    ShmemTooSmall { size: u64 },
    /// Shared memory smaller than one huge page.
    #[error("--shmem size={},hugepages={hugepages}: the size must be at least one {hugepages} huge page", format_option_size(*size))]
    ShmemBelowHugePage {
        size: u64,
        /// The huge page size.
        hugepages: HugePageSize,
    },
    /// A bar-align cap below the huge page size of a hugetlbfs backing.
    #[error("--shmem hugepages={hugepages},bar-align={bar_align}: a hugetlbfs mapping must start on a {hugepages} boundary, so it cannot be moved off it; drop hugepages= or use bar-align={} or larger", hugepages.to_string().to_lowercase())]
    ShmemAlignBelowHugePage {
        /// The huge page size.
        hugepages: HugePageSize,
        bar_align: BarAlign,
    },
    /// A `--disk` value.
    #[error(transparent)]
    Disk(#[from] DiskConfigError),
    /// A `--net` value.
    #[error(transparent)]
    Net(#[from] NetConfigError),
    /// The same tap twice.
    #[error("--net tap={0}: the tap is given twice; a tap carries one virtio-net card, so give each --net its own tap")]
    DuplicateTap(String),
}

fn prev_power_of_two(size: u64) -> u64 {
    if size == 0 {
        0
    } else {
        1 << (63 - size.leading_zeros())
    }
}

/// The `bar-align` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BarAlign {
    /// Align for the largest pages.
    #[default]
    Auto,
    /// At most 4 KiB pages.
    Size4K,
    /// At most 2 MiB pages.
    Size2M,
    /// At most 1 GiB pages (the same as auto: 1 GiB is the largest).
    Size1G,
}

impl BarAlign {
    /// The planner's cap (`DeviceInput::align_cap`).
    pub fn cap(self) -> Option<PageSize> {
        match self {
            BarAlign::Auto => None,
            BarAlign::Size4K => Some(PageSize::Size4K),
            BarAlign::Size2M => Some(PageSize::Size2M),
            BarAlign::Size1G => Some(PageSize::Size1G),
        }
    }
}

impl fmt::Display for BarAlign {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BarAlign::Auto => "auto",
            BarAlign::Size4K => "4k",
            BarAlign::Size2M => "2m",
            BarAlign::Size1G => "1g",
        })
    }
}

impl FromStr for BarAlign {
    type Err = DeviceConfigError;

    fn from_str(text: &str) -> Result<Self, DeviceConfigError> {
        match text.to_ascii_lowercase().as_str() {
            "auto" => Ok(BarAlign::Auto),
            "4k" => Ok(BarAlign::Size4K),
            "2m" => Ok(BarAlign::Size2M),
            "1g" => Ok(BarAlign::Size1G),
            _ => Err(DeviceConfigError::InvalidBarAlign(text.to_string())),
        }
    }
}

/// Whether a passed-through device's BARs are mapped into the IOMMU domain
/// too (IOVA = GPA), so that devices can DMA into each other's BARs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum P2p {
    /// Map them where the kernel accepts it; a refusal is a warning.
    #[default]
    Auto,
    /// Map them; a refusal is an error.
    On,
    /// Do not map them.
    Off,
    /// Map them on a thread of their own while the guest boots, so that a
    /// slow map (type1 on kernels before 6.15: seconds per 8 GiB) is not on
    /// the way to the first KVM_RUN; a refusal is a warning. Until the map
    /// is done a device's DMA into the BAR faults in the IOMMU; the report
    /// says when it was done (`p2p.ready_after_first_run_ms`).
    Background,
}

impl P2p {
    /// The default, left out of a serialized configuration.
    pub fn is_auto(&self) -> bool {
        *self == P2p::Auto
    }
}

impl fmt::Display for P2p {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            P2p::Auto => "auto",
            P2p::On => "on",
            P2p::Off => "off",
            P2p::Background => "background",
        })
    }
}

impl FromStr for P2p {
    type Err = DeviceConfigError;

    fn from_str(text: &str) -> Result<Self, DeviceConfigError> {
        match text {
            "auto" => Ok(P2p::Auto),
            "on" => Ok(P2p::On),
            "off" => Ok(P2p::Off),
            "background" => Ok(P2p::Background),
            _ => Err(DeviceConfigError::InvalidP2p(text.to_string())),
        }
    }
}

macro_rules! serde_via_str {
    ($type:ty) => {
        impl Serialize for $type {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $type {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

serde_via_str!(BarAlign);
serde_via_str!(P2p);

/// `VmConfig.vfio_backend` in JSON: the [`VfioBackendKind`]'s text
/// (`"legacy"`, `"iommufd"`, `"auto"`), as on the command line. A module for
/// `#[serde(with)]` because the kind is the devices crate's type.
pub(crate) mod vfio_backend_text {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::VfioBackendKind;

    pub fn serialize<S: Serializer>(
        kind: &VfioBackendKind,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_str(kind)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<VfioBackendKind, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A host PCI device passed through with VFIO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VfioConfig {
    /// Host PCI address, `DDDD:BB:DD.F` (normalized: lower case, domain given).
    pub bdf: String,
    /// BAR alignment cap.
    #[serde(default)]
    pub bar_align: BarAlign,
    /// Peer-to-peer: the BARs in the IOMMU domain too.
    #[serde(default, skip_serializing_if = "P2p::is_auto")]
    pub p2p: P2p,
}

/// An ivshmem-compatible shared memory device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShmemConfig {
    /// Bytes of shared memory (BAR2): a power of two, at least 4 KiB.
    #[serde(deserialize_with = "crate::config::options::deserialize_size")]
    pub size: u64,
    /// A file to share (created or extended to `size`); `None`: a memfd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// hugetlbfs pages: a `MFD_HUGETLB` memfd, or `path` on a hugetlbfs mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepages: Option<HugePageSize>,
    /// BAR alignment cap.
    #[serde(default)]
    pub bar_align: BarAlign,
}

/// An extra PCI device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceConfig {
    /// VFIO passthrough.
    Vfio(VfioConfig),
    /// Shared memory (ivshmem).
    Shmem(ShmemConfig),
    /// A virtio-blk disk (`--disk`).
    Disk(DiskConfig),
    /// A virtio-net card on a tap (`--net`).
    Net(NetConfig),
}

const DEVICE_OPTION: &str = "--device";
const DEVICE_EXAMPLE: &str = "vfio=0000:41:00.0,bar-align=2m,p2p=off";
const SHMEM_OPTION: &str = "--shmem";
const SHMEM_EXAMPLE: &str = "size=8G,hugepages=1G";

/// Normalizes `text` as a PCI address `DDDD:BB:DD.F`.
pub fn parse_bdf(text: &str) -> Result<String, DeviceConfigError> {
    resources::sysfs::normalize_bdf(text)
        .map_err(|_| DeviceConfigError::InvalidBdf(text.to_string()))
}

impl FromStr for VfioConfig {
    type Err = DeviceConfigError;

    /// Parses `vfio=DDDD:BB:DD.F[,bar-align=auto|4k|2m|1g][,p2p=on|off|auto|background]`
    /// (the `--device` value).
    fn from_str(text: &str) -> Result<Self, DeviceConfigError> {
        if let Some((kind, _)) = text.split_once('=') {
            if kind != "vfio" && kind != "bar-align" && kind != "p2p" {
                return Err(DeviceConfigError::UnknownDevice(kind.to_string()));
            }
        }
        let pairs = parse_key_values(
            DEVICE_OPTION,
            DEVICE_EXAMPLE,
            &["vfio", "bar-align", "p2p"],
            text,
        )?;
        let mut bdf = None;
        let mut bar_align = BarAlign::Auto;
        let mut p2p = P2p::Auto;
        for (key, value) in pairs {
            match key {
                "vfio" => bdf = Some(parse_bdf(value)?),
                "bar-align" => bar_align = value.parse()?,
                "p2p" => p2p = value.parse()?,
                _ => {}
            }
        }
        let bdf = bdf.ok_or(OptionError::MissingKey {
            option: DEVICE_OPTION,
            key: "vfio",
            example: DEVICE_EXAMPLE,
        })?;
        Ok(VfioConfig {
            bdf,
            bar_align,
            p2p,
        })
    }
}

impl fmt::Display for VfioConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vfio={}", self.bdf)?;
        if self.bar_align != BarAlign::Auto {
            write!(f, ",bar-align={}", self.bar_align)?;
        }
        if self.p2p != P2p::Auto {
            write!(f, ",p2p={}", self.p2p)?;
        }
        Ok(())
    }
}

impl FromStr for ShmemConfig {
    type Err = DeviceConfigError;

    /// Parses `size=8G[,path=FILE][,hugepages=2M|1G][,bar-align=..]` and
    /// validates it ([`ShmemConfig::validate`]).
    fn from_str(text: &str) -> Result<Self, DeviceConfigError> {
        let pairs = parse_key_values(
            SHMEM_OPTION,
            SHMEM_EXAMPLE,
            &["size", "path", "hugepages", "bar-align"],
            text,
        )?;
        let mut size = None;
        let mut config = ShmemConfig {
            size: 0,
            path: None,
            hugepages: None,
            bar_align: BarAlign::Auto,
        };
        for (key, value) in pairs {
            match key {
                "size" => size = Some(parse_size(value)?),
                "path" if value.is_empty() => {
                    return Err(OptionError::MissingKey {
                        option: SHMEM_OPTION,
                        key: "path",
                        example: "size=8G,path=/dev/shm/ivshmem",
                    }
                    .into())
                }
                "path" => config.path = Some(PathBuf::from(value)),
                "hugepages" => {
                    config.hugepages = match value {
                        "none" | "off" => None,
                        _ => Some(value.parse()?),
                    }
                }
                "bar-align" => config.bar_align = value.parse()?,
                _ => {}
            }
        }
        config.size = size.ok_or(OptionError::MissingKey {
            option: SHMEM_OPTION,
            key: "size",
            example: SHMEM_EXAMPLE,
        })?;
        config.validate()?;
        Ok(config)
    }
}

impl fmt::Display for ShmemConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "size={}", format_option_size(self.size))?;
        if let Some(path) = &self.path {
            write!(f, ",path={}", path.display())?;
        }
        if let Some(hugepages) = self.hugepages {
            write!(f, ",hugepages={hugepages}")?;
        }
        if self.bar_align != BarAlign::Auto {
            write!(f, ",bar-align={}", self.bar_align)?;
        }
        Ok(())
    }
}

impl ShmemConfig {
    /// Checks the size (a power of two, at least 4 KiB, at least one huge
    /// page) and that `bar-align` does not cap below the huge page size.
    pub fn validate(&self) -> Result<(), DeviceConfigError> {
        let size = self.size;
        if size < MIN_SHMEM_SIZE {
            return Err(DeviceConfigError::ShmemTooSmall { size });
        }
        if !size.is_power_of_two() {
            return Err(DeviceConfigError::ShmemNotPowerOfTwo { size });
        }
        if let Some(hugepages) = self.hugepages {
            if size < hugepages.bytes() {
                return Err(DeviceConfigError::ShmemBelowHugePage { size, hugepages });
            }
            if let Some(cap) = self.bar_align.cap() {
                if cap < PageSize::from(hugepages) {
                    return Err(DeviceConfigError::ShmemAlignBelowHugePage {
                        hugepages,
                        bar_align: self.bar_align,
                    });
                }
            }
        }
        Ok(())
    }
}

/// Checks every device and that no host device is passed through twice.
pub fn validate_devices(devices: &[DeviceConfig]) -> Result<(), DeviceConfigError> {
    let mut seen = std::collections::BTreeSet::new();
    let disks: Vec<DiskConfig> = devices
        .iter()
        .filter_map(|device| match device {
            DeviceConfig::Disk(disk) => Some(disk.clone()),
            _ => None,
        })
        .collect();
    validate_disks(&disks)?;
    for device in devices {
        match device {
            DeviceConfig::Disk(_) => {}
            DeviceConfig::Net(net) => {
                net.validate()?;
                if !seen.insert(format!("tap {}", net.tap)) {
                    return Err(DeviceConfigError::DuplicateTap(net.tap.clone()));
                }
            }
            DeviceConfig::Shmem(shmem) => shmem.validate()?,
            DeviceConfig::Vfio(vfio) => {
                let bdf = parse_bdf(&vfio.bdf)?;
                if !seen.insert(bdf.clone()) {
                    return Err(DeviceConfigError::DuplicateVfio(bdf));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_option_parses_bdf_and_bar_align() {
        let vfio: VfioConfig = "vfio=0000:41:00.0".parse().unwrap();
        assert_eq!(vfio.bdf, "0000:41:00.0");
        assert_eq!(vfio.bar_align, BarAlign::Auto);
        let vfio: VfioConfig = "vfio=41:00.0,bar-align=2M".parse().unwrap();
        assert_eq!(vfio.bdf, "0000:41:00.0", "domain added");
        assert_eq!(vfio.bar_align, BarAlign::Size2M);
        assert_eq!(vfio.to_string(), "vfio=0000:41:00.0,bar-align=2m");
        assert_eq!(BarAlign::Size4K.cap(), Some(PageSize::Size4K));
        assert_eq!(BarAlign::Auto.cap(), None);
    }

    #[test]
    fn device_option_errors_name_the_problem() {
        for (input, expected) in [
            ("vfio=41:00", "not a PCI address"),
            ("vfio=0000:41:00.0,bar-align=3m", "use auto, 4k, 2m or 1g"),
            ("virtio=blk", "unknown device \"virtio\""),
            ("bar-align=2m", "missing vfio="),
            ("vfio=0000:41:00.0,colour=red", "unknown key \"colour\""),
            (
                "vfio=0000:41:00.0,p2p=maybe",
                "use on, off, auto or background",
            ),
            ("0000:41:00.0", "expected key=value"),
        ] {
            let err = input.parse::<VfioConfig>().unwrap_err().to_string();
            assert!(err.contains(expected), "{input:?}: {err}");
        }
    }

    #[test]
    fn p2p_parses_and_round_trips() {
        let config: VfioConfig = "vfio=0000:41:00.0,p2p=off".parse().unwrap();
        assert_eq!(config.p2p, P2p::Off);
        assert_eq!(config.to_string(), "vfio=0000:41:00.0,p2p=off");
        let background: VfioConfig = "vfio=0000:41:00.0,p2p=background".parse().unwrap();
        assert_eq!(background.p2p, P2p::Background);
        assert_eq!(background.to_string(), "vfio=0000:41:00.0,p2p=background");
        let default: VfioConfig = "vfio=0000:41:00.0".parse().unwrap();
        assert_eq!(default.p2p, P2p::Auto);
        let json: VfioConfig =
            serde_json::from_str(r#"{"bdf": "0000:41:00.0", "p2p": "on"}"#).unwrap();
        assert_eq!(json.p2p, P2p::On);
    }

    #[test]
    fn shmem_option_parses_every_key() {
        let shmem: ShmemConfig = "size=8G,path=/dev/shm/x,hugepages=1G,bar-align=1g"
            .parse()
            .unwrap();
        assert_eq!(shmem.size, 8 << 30);
        assert_eq!(shmem.path, Some(PathBuf::from("/dev/shm/x")));
        assert_eq!(shmem.hugepages, Some(HugePageSize::Size1G));
        assert_eq!(shmem.bar_align, BarAlign::Size1G);
        assert_eq!(
            shmem.to_string(),
            "size=8G,path=/dev/shm/x,hugepages=1G,bar-align=1g"
        );
        let shmem: ShmemConfig = "size=4M".parse().unwrap();
        assert_eq!(shmem.to_string(), "size=4M");
    }

    #[test]
    fn shmem_option_errors_name_the_problem() {
        for (input, expected) in [
            ("size=3G", "must be a power of two; use 2G or 4G"),
            ("size=1K", "needs at least 4K"),
            ("size=1M,hugepages=2M", "at least one 2M huge page"),
            (
                "size=2G,hugepages=2M,bar-align=4k",
                "cannot be moved off it",
            ),
            ("size=2G,hugepages=3M", "use hugepages=2M or hugepages=1G"),
            ("path=/x", "missing size="),
            ("size=1G,path=", "missing path="),
            ("size=1G,bar-align=8k", "use auto, 4k, 2m or 1g"),
            ("size=lots", "invalid size"),
            ("size=1G,size=2G", "given twice"),
        ] {
            let err = input.parse::<ShmemConfig>().unwrap_err().to_string();
            assert!(err.contains(expected), "{input:?}: {err}");
        }
    }

    #[test]
    fn bar_align_may_cap_at_the_huge_page_size_but_not_below() {
        for ok in [
            "size=2G,hugepages=2M,bar-align=2m",
            "size=2G,hugepages=2M,bar-align=1g",
            "size=2G,hugepages=1G,bar-align=1g",
        ] {
            ok.parse::<ShmemConfig>().unwrap();
        }
        for below in [
            "size=2G,hugepages=2M,bar-align=4k",
            "size=2G,hugepages=1G,bar-align=2m",
        ] {
            assert!(
                matches!(
                    below.parse::<ShmemConfig>(),
                    Err(DeviceConfigError::ShmemAlignBelowHugePage { .. })
                ),
                "{below}"
            );
        }
    }

    #[test]
    fn backend_parses() {
        assert_eq!(
            "legacy".parse::<VfioBackendKind>().unwrap(),
            VfioBackendKind::Legacy
        );
        assert_eq!(
            "iommufd".parse::<VfioBackendKind>().unwrap(),
            VfioBackendKind::Iommufd
        );
        assert_eq!(
            "auto".parse::<VfioBackendKind>().unwrap(),
            VfioBackendKind::Auto
        );
        let err = "cdev".parse::<VfioBackendKind>().unwrap_err().to_string();
        assert!(err.contains("use legacy, iommufd or auto"), "{err}");
    }

    #[test]
    fn devices_round_trip_through_json() {
        let devices = vec![
            DeviceConfig::Vfio("vfio=0000:41:00.0,bar-align=4k".parse().unwrap()),
            DeviceConfig::Shmem("size=8G,hugepages=1G".parse().unwrap()),
        ];
        let json = serde_json::to_string(&devices).unwrap();
        assert!(json.contains(r#"{"vfio":{"bdf":"0000:41:00.0","bar_align":"4k"}}"#));
        let back: Vec<DeviceConfig> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, devices);
        let parsed: Vec<DeviceConfig> =
            serde_json::from_str(r#"[{"shmem": {"size": "2M"}}, {"shmem": {"size": 4096}}]"#)
                .unwrap();
        assert_eq!(parsed.len(), 2);
    }

    #[test]
    fn validation_catches_duplicates_and_bad_sizes_from_json() {
        let twice = vec![
            DeviceConfig::Vfio("vfio=0000:41:00.0".parse().unwrap()),
            DeviceConfig::Vfio(VfioConfig {
                bdf: "41:00.0".into(),
                bar_align: BarAlign::Auto,
                p2p: P2p::Auto,
            }),
        ];
        let err = validate_devices(&twice).unwrap_err().to_string();
        assert!(err.contains("passed through twice"), "{err}");
        let bad: Vec<DeviceConfig> =
            serde_json::from_str(r#"[{"shmem": {"size": "3M"}}]"#).unwrap();
        assert!(matches!(
            validate_devices(&bad),
            Err(DeviceConfigError::ShmemNotPowerOfTwo { .. })
        ));
    }
}
