//! `vfio-region-info BDF`: what the lab's tests assert about a vfio-pci
//! device, as one JSON object: the kernel release, whether /dev/kvm exists,
//! the device's IOMMU group and every VFIO region (size, offset, flags).

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use serde_json::json;
use vfio_bindings::bindings::vfio::{
    VFIO_PCI_NUM_REGIONS, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_ioctls::{VfioContainer, VfioDevice};

fn main() -> ExitCode {
    let Some(bdf) = std::env::args().nth(1) else {
        eprintln!("usage: vfio-region-info BDF   (e.g. 0000:00:10.0)");
        return ExitCode::from(2);
    };
    match region_info(&bdf) {
        Ok(value) => {
            println!("{value}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vfio-region-info: {bdf}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn region_info(bdf: &str) -> Result<serde_json::Value, String> {
    let sysfs = Path::new("/sys/bus/pci/devices").join(bdf);
    let group = std::fs::read_link(sysfs.join("iommu_group"))
        .map_err(|e| format!("no IOMMU group ({e}); is the IOMMU on?"))?;
    let group = group
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let driver = std::fs::read_link(sysfs.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let container =
        VfioContainer::new(None).map_err(|e| format!("cannot open the VFIO container: {e}"))?;
    let device = VfioDevice::new(&sysfs, Arc::new(container), false)
        .map_err(|e| format!("cannot open the VFIO device: {e}"))?;
    let regions: Vec<_> = (0..VFIO_PCI_NUM_REGIONS)
        .map(|index| {
            let flags = device.get_region_flags(index);
            json!({
                "index": index,
                "size": device.get_region_size(index),
                "offset": device.get_region_offset(index),
                "flags": flags,
                "read": flags & VFIO_REGION_INFO_FLAG_READ != 0,
                "write": flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
                "mmap": flags & VFIO_REGION_INFO_FLAG_MMAP != 0,
            })
        })
        .collect();
    Ok(json!({
        "bdf": bdf,
        "kernel": release,
        "dev_kvm": Path::new("/dev/kvm").exists(),
        "iommu_group": group,
        "driver": driver,
        "regions": regions,
    }))
}
