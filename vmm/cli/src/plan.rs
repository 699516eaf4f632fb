//! `barge plan`: the placement planner without KVM and without opening any
//! device. Inputs: host devices by PCI address (`--device vfio=BDF`, BARs
//! read from sysfs), shared memory devices (`--shmem`, the same syntax as
//! `barge run`) and a JSON spec (`--spec FILE.json`, see `resources::spec`),
//! planned together in the windows of a guest with `--memory size=..`
//! (default 512M) on a host with `--phys-bits N` (default: this host's, from
//! `/proc/cpuinfo`'s "address sizes"). Output: `resources::render_table`, or
//! the plan as JSON with `--json`.

use std::path::{Path, PathBuf};

use resources::placement::{DeviceInput, PlacementError, Plan, Windows};
use resources::spec::SpecError;
use resources::sysfs::SysfsError;

use vmm::config::{ShmemConfig, VfioConfig, DEFAULT_MEMORY_SIZE};
use vmm::platform::FALLBACK_PHYS_BITS;

/// A `barge plan` command line, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanRequest {
    /// Host devices, in order.
    pub vfio: Vec<VfioConfig>,
    /// Shared memory devices, in order (after the host devices).
    pub shmem: Vec<ShmemConfig>,
    /// A JSON spec whose devices come last.
    pub spec: Option<PathBuf>,
    /// Guest RAM size.
    pub memory_size: u64,
    /// Physical address bits; `None`: this host's.
    pub phys_bits: Option<u8>,
    /// Print JSON instead of the table.
    pub json: bool,
}

impl Default for PlanRequest {
    fn default() -> Self {
        Self {
            vfio: Vec::new(),
            shmem: Vec::new(),
            spec: None,
            memory_size: DEFAULT_MEMORY_SIZE,
            phys_bits: None,
            json: false,
        }
    }
}

/// Why `barge plan` cannot plan.
#[derive(Debug, thiserror::Error)]
pub enum PlanCommandError {
    /// Nothing to plan.
    #[error(
        "barge plan needs devices: give --device vfio=BDF, --shmem size=SIZE or --spec FILE.json"
    )]
    NoDevices,
    /// The spec file.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// A host device's sysfs entries.
    #[error(transparent)]
    Sysfs(#[from] SysfsError),
    /// The memory size.
    #[error(transparent)]
    Ram(#[from] resources::RamError),
    /// The windows or the placement.
    #[error(transparent)]
    Placement(#[from] PlacementError),
}

/// Physical address bits from `/proc/cpuinfo` text ("address sizes : 46
/// bits physical, 48 bits virtual").
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub fn parse_cpuinfo_phys_bits(cpuinfo: &str) -> Option<u8> {
    cpuinfo
        .lines()
        .find(|line| line.starts_with("address sizes"))
        .and_then(|line| line.split(':').nth(1))
        .and_then(|sizes| sizes.split_whitespace().next())
        .and_then(|bits| bits.parse().ok())
}

/// This host's IPA size as KVM reports it (aarch64 has no "address sizes" in
/// /proc/cpuinfo), or [`FALLBACK_PHYS_BITS`] without KVM.
#[cfg(target_arch = "aarch64")]
pub fn host_phys_bits() -> u8 {
    kvm_ioctls::Kvm::new()
        .ok()
        .and_then(|kvm| vmm::platform::guest_phys_bits(&kvm).ok())
        .unwrap_or(FALLBACK_PHYS_BITS)
}

/// This host's physical address bits, or [`FALLBACK_PHYS_BITS`].
#[cfg(target_arch = "x86_64")]
pub fn host_phys_bits() -> u8 {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .as_deref()
        .and_then(parse_cpuinfo_phys_bits)
        .unwrap_or(FALLBACK_PHYS_BITS)
}

/// The planner input for a host device. Today: the BARs sysfs reports
/// (`resource`, MSI-X from `config` where readable). The hook for VFIO
/// region info (sparse mmap areas, where vfio-pci is bound) is here.
pub fn vfio_plan_input(config: &VfioConfig, sysfs_root: &Path) -> Result<DeviceInput, SysfsError> {
    let device = resources::sysfs::read_device(&config.bdf, sysfs_root)?;
    Ok(device.device_input(config.bar_align.cap()))
}

/// Every device of `request`, in order: host devices, shared memory, spec.
pub fn plan_inputs(
    request: &PlanRequest,
    sysfs_root: &Path,
) -> Result<Vec<DeviceInput>, PlanCommandError> {
    let mut inputs = Vec::new();
    for vfio in &request.vfio {
        inputs.push(vfio_plan_input(vfio, sysfs_root)?);
    }
    for (index, shmem) in request.shmem.iter().enumerate() {
        inputs.push(vmm::pci_devices::shmem::plan_input(
            &format!("shmem{index}"),
            shmem,
        ));
    }
    if let Some(spec) = &request.spec {
        inputs.extend(resources::spec::read_spec(spec)?);
    }
    if inputs.is_empty() {
        return Err(PlanCommandError::NoDevices);
    }
    Ok(inputs)
}

/// Plans `request` (sysfs under `sysfs_root`).
pub fn plan(request: &PlanRequest, sysfs_root: &Path) -> Result<Plan, PlanCommandError> {
    let inputs = plan_inputs(request, sysfs_root)?;
    let ram = resources::ram_regions(request.memory_size)?;
    let phys_bits = request.phys_bits.unwrap_or_else(host_phys_bits);
    let windows = Windows::new(&ram, phys_bits)
        .map_err(|e| resources::placement::with_phys_bits_needed(e, &inputs, &ram))?;
    Ok(resources::plan_for_host(&inputs, &ram, &windows)?)
}

/// What `barge plan` prints: the table, or pretty JSON.
pub fn run(request: &PlanRequest, sysfs_root: &Path) -> Result<String, PlanCommandError> {
    let plan = plan(request, sysfs_root)?;
    Ok(if request.json {
        let mut json = serde_json::to_string_pretty(&plan).unwrap_or_else(|_| "{}".into());
        json.push('\n');
        json
    } else {
        resources::render_table(&plan)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const H100: &str = r#"{"devices":[{"name":"h100","bars":[
        {"index":0,"size":"16M","bits":64},
        {"index":1,"size":"128G","bits":64,"prefetchable":true},
        {"index":3,"size":"32M","bits":64,"prefetchable":true}]}]}"#;

    fn spec_file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("barge-plan-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("spec.json");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn cpuinfo_address_sizes_parse() {
        let text = "processor : 0\naddress sizes\t: 46 bits physical, 48 bits virtual\n";
        assert_eq!(parse_cpuinfo_phys_bits(text), Some(46));
        assert_eq!(parse_cpuinfo_phys_bits("flags : fpu\n"), None);
        assert!(host_phys_bits() >= 32);
    }

    #[test]
    fn h100_spec_plans_into_mmio64_as_json() {
        let request = PlanRequest {
            spec: Some(spec_file("h100", H100)),
            phys_bits: Some(46),
            json: true,
            ..Default::default()
        };
        let json: serde_json::Value =
            serde_json::from_str(&run(&request, Path::new("/nonexistent")).unwrap()).unwrap();
        let bars = &json["devices"][0]["bars"];
        assert_eq!(json["devices"][0]["name"], "h100");
        assert_eq!(bars[1]["index"], 1);
        assert_eq!(bars[1]["size"], 128u64 << 30);
        assert_eq!(bars[1]["gpa"].as_u64().unwrap() % (128u64 << 30), 0);
        assert_eq!(bars[1]["hva_align"], 1u64 << 30);
        assert_eq!(bars[1]["page_size"], 1u64 << 30);
        assert_eq!(bars[1]["areas"][0]["page_size"], 1u64 << 30);
        assert_eq!(bars[0]["page_size"], 2u64 << 20);
    }

    #[test]
    fn shmem_and_table_output() {
        let request = PlanRequest {
            shmem: vec!["size=8G,bar-align=4k".parse().unwrap()],
            phys_bits: Some(40),
            ..Default::default()
        };
        let table = run(&request, Path::new("/nonexistent")).unwrap();
        assert!(table.contains("shmem0  (bar-align 4k)"), "{table}");
        assert!(table.contains("8 GiB"), "{table}");
    }

    #[test]
    fn errors_are_clear() {
        let err = run(&PlanRequest::default(), Path::new("/")).unwrap_err();
        assert!(matches!(err, PlanCommandError::NoDevices));
        let request = PlanRequest {
            shmem: vec!["size=1T".parse().unwrap()],
            phys_bits: Some(36),
            ..Default::default()
        };
        let err = run(&request, Path::new("/")).unwrap_err().to_string();
        assert!(err.contains("does not fit in the MMIO64 window"), "{err}");
        let request = PlanRequest {
            vfio: vec!["vfio=0000:99:1f.7".parse().unwrap()],
            ..Default::default()
        };
        let err = run(&request, Path::new("/nonexistent-sysfs"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no PCI device 0000:99:1f.7"), "{err}");
    }
}
