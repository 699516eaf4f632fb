//! What the boot sequence does differently on each architecture, behind one set of names
//! the builder calls in order:
//!
//! - [`guest_phys_bits`]: the guest's physical address bits, which end the MMIO64 window
//!   (x86_64: KVM's CPUID; aarch64: the host's IPA limit).
//! - [`check_cpu_count`], [`create_vm`]: the VM and its interrupt controller
//!   ([`InterruptController`]: x86_64's in-kernel PIC/IOAPIC/LAPICs and PIT; aarch64's
//!   GICv3 with an ITS).
//! - [`load_boot`]: kernel, initramfs, command line and the firmware tables (x86_64: boot
//!   params or PVH start info, ACPI; aarch64: the arm64 Image, the device tree comes with
//!   the vCPUs).
//! - [`create_vcpus`]: the vCPUs and their boot register state (aarch64: then the GIC's
//!   initialisation and the device tree, which names every vCPU's MPIDR).
//! - [`devices_on_buses`]: the platform devices (the UART, x86_64's ACPI sleep register and
//!   i8042); PCI goes on the buses after them (`buses::pci`).
//!
//! The architecture-specific data (`arch::x86_64`, `arch::aarch64`) and the KVM ioctls on
//! it stay in these modules; everything the builder does with their results is shared.

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "x86_64")]
mod x86_64;

#[cfg(target_arch = "aarch64")]
pub use aarch64::*;
#[cfg(target_arch = "x86_64")]
pub use x86_64::*;

use resources::placement::Windows;
use vm_memory::GuestMemoryMmap;

use crate::config::VmConfig;

/// What [`load_boot`] loads and describes.
pub struct BootInputs<'a> {
    /// Guest RAM.
    pub memory: &'a GuestMemoryMmap,
    /// The RAM regions as `(gpa, size)`.
    pub ram: &'a [(u64, u64)],
    /// Kernel, initramfs, command line and vCPU count.
    pub config: &'a VmConfig,
    /// The PCI host bridge's MMIO windows.
    pub windows: &'a Windows,
}
