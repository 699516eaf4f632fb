//! PCI devices with BARs, from configuration to the buses: the
//! [`setup::PciDeviceSetup`] trait the builder drives, opening every
//! configured device ([`open`]), mapping BAR memory into KVM
//! ([`bar_mapping`]), tearing a device down in one order ([`teardown`]),
//! and the kinds of device barge has: the shared-memory device
//! ([`shmem`]), VFIO passthrough ([`vfio`]) and virtio ([`virtio`]).

pub mod bar_mapping;
pub mod irqchip;
pub mod open;
pub mod setup;
pub mod shmem;
pub mod teardown;
pub mod vfio;
pub mod virtio;
