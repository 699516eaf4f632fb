//! Checks before opening a host device through VFIO, over sysfs and /dev
//! (real roots, or fake trees in tests), so each common mistake gets an
//! error that says what to do: a BDF that does not exist, a device not
//! bound to vfio-pci, no IOMMU group, /dev/vfio missing, and (after the
//! kernel said so) a group that is not viable, with the other devices in it.

use std::io;
use std::path::{Path, PathBuf};

use resources::sysfs::{normalize_bdf, SysfsError};

/// Where sysfs and /dev are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPaths {
    /// sysfs mount point (`/sys`).
    pub sysfs: PathBuf,
    /// devtmpfs mount point (`/dev`).
    pub dev: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        Self {
            sysfs: PathBuf::from("/sys"),
            dev: PathBuf::from("/dev"),
        }
    }
}

impl HostPaths {
    /// `/dev/vfio`.
    pub fn vfio_dir(&self) -> PathBuf {
        self.dev.join("vfio")
    }

    /// `/dev/iommu`, the iommufd character device.
    pub fn iommufd(&self) -> PathBuf {
        self.dev.join("iommu")
    }

    /// `/sys/bus/pci/devices/<bdf>`.
    pub fn device_dir(&self, bdf: &str) -> PathBuf {
        self.sysfs.join("bus/pci/devices").join(bdf)
    }
}

/// What to do about a device without an IOMMU group, on this architecture.
const NO_IOMMU_FIX: &str = if cfg!(target_arch = "aarch64") {
    "boot with the SMMU on (CONFIG_ARM_SMMU_V3 and an SMMU the firmware or device tree \
     describes), then check `dmesg | grep -i smmu`"
} else {
    "enable VT-d/AMD-Vi in the firmware and boot with intel_iommu=on (Intel) or amd_iommu=on, \
     then check `dmesg | grep -i -e DMAR -e IOMMU`"
};

/// Why a host device cannot be opened through VFIO.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// Not a PCI address.
    #[error(transparent)]
    InvalidBdf(#[from] SysfsError),
    /// No such device in sysfs.
    #[error("no PCI device {bdf} ({} does not exist): list devices with `lspci -D`", path.display())]
    NoSuchDevice {
        bdf: String,
        /// The directory looked for.
        path: PathBuf,
    },
    /// Bound to another driver, or to none.
    #[error(
        "PCI device {bdf} is {}, not to vfio-pci; bind it: \
         echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override; \
         {}echo {bdf} > /sys/bus/pci/drivers_probe",
        match driver { Some(driver) => format!("bound to {driver}"), None => "not bound to any driver".to_string() },
        match driver { Some(_) => format!("echo {bdf} > /sys/bus/pci/devices/{bdf}/driver/unbind; "), None => String::new() }
    )]
    NotBoundToVfio { bdf: String, driver: Option<String> },
    /// No `iommu_group` link.
    #[error(
        "PCI device {bdf} has no IOMMU group: the host IOMMU is off or missing; {NO_IOMMU_FIX}"
    )]
    NoIommuGroup { bdf: String },
    /// /dev/vfio missing.
    #[error("{} does not exist: load the VFIO driver with `modprobe vfio-pci`", path.display())]
    NoVfioDir { path: PathBuf },
    /// The group is not viable.
    #[error(
        "IOMMU group {group} of {bdf} is not viable: every device in it must be bound to vfio-pci (or to no driver); the others are: {}; bind them to vfio-pci too",
        describe_members(others)
    )]
    GroupNotViable {
        bdf: String,
        group: u32,
        /// The other devices of the group and their drivers.
        others: Vec<GroupMember>,
    },
    /// A sysfs entry could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
}

/// A device of an IOMMU group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    pub bdf: String,
    /// Its driver, if bound.
    pub driver: Option<String>,
}

fn describe_members(members: &[GroupMember]) -> String {
    if members.is_empty() {
        return "none (check `dmesg` for why the kernel refuses the group)".to_string();
    }
    members
        .iter()
        .map(|member| match &member.driver {
            Some(driver) => format!("{} (bound to {driver})", member.bdf),
            None => format!("{} (no driver)", member.bdf),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A host device that passed the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceLocation {
    /// Normalized BDF.
    pub bdf: String,
    /// `/sys/bus/pci/devices/<bdf>`.
    pub sysfs_path: PathBuf,
    /// Its IOMMU group number.
    pub group: u32,
    /// Its driver (vfio-pci or a vfio-pci variant driver).
    pub driver: String,
    /// The VFIO cdev name (`vfioN`) when the kernel created one and
    /// `/dev/vfio/devices/vfioN` exists.
    pub cdev: Option<String>,
    /// Whether sysfs offers a reset for it (`reset` exists); VFIO then
    /// reports reset support too.
    pub reset_supported: bool,
}

/// Whether `driver` is vfio-pci or one of its variant drivers
/// (`mlx5_vfio_pci`, `nvgrace_gpu_vfio_pci`, ...).
pub fn is_vfio_driver(driver: &str) -> bool {
    let normalized = driver.replace('_', "-");
    normalized == "vfio-pci" || normalized.ends_with("-vfio-pci")
}

/// The name a sysfs symlink points at (its last component).
fn link_name(path: &Path) -> Option<String> {
    let target = std::fs::read_link(path).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// Checks `bdf` for passthrough (see module docs).
pub fn locate(bdf: &str, paths: &HostPaths) -> Result<DeviceLocation, PreflightError> {
    let bdf = normalize_bdf(bdf)?;
    let sysfs_path = paths.device_dir(&bdf);
    if !sysfs_path.is_dir() {
        return Err(PreflightError::NoSuchDevice {
            bdf,
            path: sysfs_path,
        });
    }
    // No IOMMU first: without one, binding to vfio-pci cannot help.
    let group = link_name(&sysfs_path.join("iommu_group"))
        .and_then(|name| name.parse::<u32>().ok())
        .ok_or_else(|| PreflightError::NoIommuGroup { bdf: bdf.clone() })?;
    let driver = link_name(&sysfs_path.join("driver"));
    let driver = match driver {
        Some(driver) if is_vfio_driver(&driver) => driver,
        driver => return Err(PreflightError::NotBoundToVfio { bdf, driver }),
    };
    let vfio_dir = paths.vfio_dir();
    if !vfio_dir.is_dir() {
        return Err(PreflightError::NoVfioDir { path: vfio_dir });
    }
    let cdev = std::fs::read_dir(sysfs_path.join("vfio-dev"))
        .ok()
        .and_then(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .find(|name| name.starts_with("vfio"))
        })
        .filter(|name| vfio_dir.join("devices").join(name).exists());
    let reset_supported = sysfs_path.join("reset").exists();
    Ok(DeviceLocation {
        bdf,
        sysfs_path,
        group,
        driver,
        cdev,
        reset_supported,
    })
}

/// The devices of IOMMU group `group` other than `bdf`, with their drivers.
pub fn group_members(
    bdf: &str,
    group: u32,
    paths: &HostPaths,
) -> Result<Vec<GroupMember>, PreflightError> {
    let dir = paths
        .sysfs
        .join("kernel/iommu_groups")
        .join(group.to_string())
        .join("devices");
    let entries = std::fs::read_dir(&dir).map_err(|source| PreflightError::Read {
        path: dir.clone(),
        source,
    })?;
    let mut members: Vec<GroupMember> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| name != bdf)
        .map(|name| GroupMember {
            driver: link_name(&paths.device_dir(&name).join("driver")),
            bdf: name,
        })
        .collect();
    members.sort_by(|a, b| a.bdf.cmp(&b.bdf));
    Ok(members)
}

/// The error for a group the kernel calls not viable, naming its members.
pub fn not_viable(location: &DeviceLocation, paths: &HostPaths) -> PreflightError {
    let others = group_members(&location.bdf, location.group, paths).unwrap_or_default();
    PreflightError::GroupNotViable {
        bdf: location.bdf.clone(),
        group: location.group,
        others,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A fake /sys and /dev under a fresh temporary directory.
    pub(crate) struct FakeHost {
        pub root: PathBuf,
        pub paths: HostPaths,
    }

    impl FakeHost {
        pub(crate) fn new() -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let root = std::env::temp_dir().join(format!(
                "barge-vfio-preflight-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&root);
            let paths = HostPaths {
                sysfs: root.join("sys"),
                dev: root.join("dev"),
            };
            std::fs::create_dir_all(paths.sysfs.join("bus/pci/devices")).unwrap();
            std::fs::create_dir_all(paths.sysfs.join("bus/pci/drivers")).unwrap();
            std::fs::create_dir_all(paths.dev.join("vfio/devices")).unwrap();
            Self { root, paths }
        }

        /// A device, bound to `driver` if given, in `group` if given.
        pub(crate) fn device(&self, bdf: &str, driver: Option<&str>, group: Option<u32>) {
            let dir = self.paths.device_dir(bdf);
            std::fs::create_dir_all(&dir).unwrap();
            if let Some(driver) = driver {
                let driver_dir = self.paths.sysfs.join("bus/pci/drivers").join(driver);
                std::fs::create_dir_all(&driver_dir).unwrap();
                symlink(&driver_dir, dir.join("driver")).unwrap();
            }
            if let Some(group) = group {
                let group_dir = self
                    .paths
                    .sysfs
                    .join("kernel/iommu_groups")
                    .join(group.to_string());
                std::fs::create_dir_all(group_dir.join("devices")).unwrap();
                symlink(&group_dir, dir.join("iommu_group")).unwrap();
                symlink(&dir, group_dir.join("devices").join(bdf)).unwrap();
            }
        }
    }

    impl Drop for FakeHost {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    #[test]
    fn a_bound_device_in_a_group_is_located() {
        let host = FakeHost::new();
        host.device("0000:41:00.0", Some("vfio-pci"), Some(17));
        let location = locate("41:00.0", &host.paths).unwrap();
        assert_eq!(location.bdf, "0000:41:00.0");
        assert_eq!(location.group, 17);
        assert_eq!(location.driver, "vfio-pci");
        assert_eq!(location.cdev, None);
        assert!(!location.reset_supported);
        // With a cdev and a reset file.
        let dir = host.paths.device_dir("0000:41:00.0");
        std::fs::create_dir_all(dir.join("vfio-dev/vfio3")).unwrap();
        std::fs::write(dir.join("reset"), "").unwrap();
        let location = locate("0000:41:00.0", &host.paths).unwrap();
        assert_eq!(location.cdev, None, "no /dev/vfio/devices/vfio3 yet");
        std::fs::write(host.paths.dev.join("vfio/devices/vfio3"), "").unwrap();
        let location = locate("0000:41:00.0", &host.paths).unwrap();
        assert_eq!(location.cdev.as_deref(), Some("vfio3"));
        assert!(location.reset_supported);
    }

    #[test]
    fn each_mistake_has_its_own_error() {
        let host = FakeHost::new();
        assert!(matches!(
            locate("not-a-bdf", &host.paths),
            Err(PreflightError::InvalidBdf(_))
        ));
        let error = locate("0000:99:00.0", &host.paths).unwrap_err();
        assert!(matches!(error, PreflightError::NoSuchDevice { .. }));
        assert!(error.to_string().contains("lspci -D"));

        host.device("0000:01:00.0", Some("nvme"), Some(3));
        let error = locate("0000:01:00.0", &host.paths).unwrap_err().to_string();
        assert!(error.contains("bound to nvme"), "{error}");
        assert!(error.contains("echo vfio-pci > /sys/bus/pci/devices/0000:01:00.0/driver_override"));
        assert!(error.contains("echo 0000:01:00.0 > /sys/bus/pci/drivers_probe"));
        assert!(
            error.contains("echo 0000:01:00.0 > /sys/bus/pci/devices/0000:01:00.0/driver/unbind")
        );

        host.device("0000:02:00.0", None, Some(4));
        let error = locate("0000:02:00.0", &host.paths).unwrap_err().to_string();
        assert!(error.contains("not bound to any driver"), "{error}");
        assert!(!error.contains("unbind"));

        host.device("0000:03:00.0", Some("vfio-pci"), None);
        let error = locate("0000:03:00.0", &host.paths).unwrap_err();
        assert!(matches!(error, PreflightError::NoIommuGroup { .. }));
        assert!(error.to_string().contains("intel_iommu=on"));

        host.device("0000:04:00.0", Some("vfio-pci"), Some(5));
        std::fs::remove_dir_all(host.paths.dev.join("vfio")).unwrap();
        let error = locate("0000:04:00.0", &host.paths).unwrap_err();
        assert!(error.to_string().contains("modprobe vfio-pci"), "{error}");
    }

    #[test]
    fn a_group_that_is_not_viable_names_the_other_devices() {
        let host = FakeHost::new();
        host.device("0000:05:00.0", Some("vfio-pci"), Some(9));
        host.device("0000:05:00.1", Some("snd_hda_intel"), Some(9));
        host.device("0000:05:00.2", None, Some(9));
        let location = locate("0000:05:00.0", &host.paths).unwrap();
        let error = not_viable(&location, &host.paths);
        let PreflightError::GroupNotViable { group, others, .. } = &error else {
            panic!("{error}");
        };
        assert_eq!(*group, 9);
        assert_eq!(
            others,
            &[
                GroupMember {
                    bdf: "0000:05:00.1".into(),
                    driver: Some("snd_hda_intel".into())
                },
                GroupMember {
                    bdf: "0000:05:00.2".into(),
                    driver: None
                }
            ]
        );
        let text = error.to_string();
        assert!(
            text.contains("0000:05:00.1 (bound to snd_hda_intel), 0000:05:00.2 (no driver)"),
            "{text}"
        );
    }

    #[test]
    fn vfio_variant_drivers_count_as_vfio() {
        assert!(is_vfio_driver("vfio-pci"));
        assert!(is_vfio_driver("mlx5_vfio_pci"));
        assert!(is_vfio_driver("nvgrace-gpu-vfio-pci"));
        assert!(!is_vfio_driver("nvidia"));
        assert!(!is_vfio_driver("pci-stub"));
    }
}
