//! Step 1 of plugging devices in (see [`crate::pci_devices::setup`]): every
//! entry of `VmConfig.devices` opened on the host, in order, before any
//! guest memory exists, so that bad input fails early.

use std::path::Path;
use std::sync::Arc;

use devices::virtio::blk::{BlockDevice, BlockOptions};
use devices::virtio::net::NetDevice;
use devices::virtio::worker::ThreadInit;
use kvm_ioctls::VmFd;

use crate::config::{DeviceConfig, VmConfig};
use crate::pci_devices::setup::{DeviceSetupError, PciDeviceSetup};
use crate::pci_devices::vfio::{self, VfioSetup};
use crate::pci_devices::virtio::VirtioSetup;
use crate::pci_devices::{irqchip, shmem};

/// Opens every device of `config` (step 1 of the module docs), in order.
/// `sysfs_root` is `/sys` (tests pass a fake tree for huge page pools and
/// host BARs). VFIO devices share one container (or IOAS), registered with
/// `vm`'s KVM VFIO device, and route their interrupts through `vm`.
/// virtio devices start their worker threads here, each running
/// `worker_init` first (the seccomp filter).
pub fn open_devices(
    config: &VmConfig,
    vm: &Arc<VmFd>,
    sysfs_root: &Path,
    worker_init: Option<ThreadInit>,
) -> Result<Vec<Box<dyn PciDeviceSetup>>, DeviceSetupError> {
    let mut setups: Vec<Box<dyn PciDeviceSetup>> = Vec::new();
    let mut shmem_index = 0;
    let mut disk_index = 0;
    let mut net_index = 0;
    let mut vfio_host = None;
    let router = irqchip::vm_router(vm);
    for device in &config.devices {
        match device {
            DeviceConfig::Shmem(shmem) => {
                setups.push(Box::new(shmem::open(shmem_index, shmem, sysfs_root)?));
                shmem_index += 1;
            }
            DeviceConfig::Disk(disk) => {
                let name = format!("virtio-blk{disk_index}");
                disk_index += 1;
                let options = BlockOptions {
                    path: disk.path.clone(),
                    read_only: disk.readonly,
                    serial: disk.serial.clone(),
                    name: name.clone(),
                };
                let device = BlockDevice::open(&options, worker_init.clone())
                    .map_err(|e| format!("--disk {disk}: {e}"))?;
                setups.push(Box::new(VirtioSetup::new(
                    name,
                    Box::new(device),
                    router.clone(),
                )));
            }
            DeviceConfig::Net(net) => {
                let name = format!("virtio-net{net_index}");
                net_index += 1;
                let device = NetDevice::open(&net.options(&name), worker_init.clone())
                    .map_err(|e| format!("--net {net}: {e}"))?;
                log::info!(
                    "{name}: tap {}, MAC {}",
                    net.tap,
                    devices::virtio::net::format_mac(&device.mac())
                );
                setups.push(Box::new(VirtioSetup::new(
                    name,
                    Box::new(device),
                    router.clone(),
                )));
            }
            DeviceConfig::Vfio(vfio) => {
                let host = vfio_host.get_or_insert_with(|| {
                    vfio::shared_host(vm, config.vfio_backend, router.clone())
                });
                setups.push(Box::new(VfioSetup::open(vfio, host, sysfs_root)?));
            }
        }
    }
    Ok(setups)
}
