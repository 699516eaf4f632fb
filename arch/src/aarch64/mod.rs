//! aarch64 boot set-up as plain data: the guest physical map ([`layout`]), the flattened
//! device tree ([`fdt`]) and the boot vCPU's register state ([`regs`]). No KVM ioctls and
//! no arm64-only kvm-bindings types here, so all of it builds and is unit-tested on every
//! host.
//!
//! # How the vmm uses it
//!
//! ```text
//! // VM with the IPA size from KVM_CAP_ARM_VM_IPA_SIZE; RAM (one region) at layout::RAM_START.
//! let ram_end = layout::RAM_START + size;
//! // load the Image with linux-loader's PE loader at layout::KERNEL_LOAD_BASE
//! //   (it adds text_offset); entry = its kernel_load.
//! let fdt_addr = layout::fdt_addr(ram_end)?;
//! let initrd_addr = layout::initramfs_addr(ram_end, fdt_addr, initrd_len, kernel_end)?;
//! // copy the initramfs to initrd_addr.
//! // every vCPU: KVM_ARM_PREFERRED_TARGET, KVM_ARM_VCPU_INIT (features: PSCI_0_2, and
//! //   POWER_OFF for all but vCPU 0), then
//! //   mpidrs[i] = vcpu.get_one_reg(regs::MPIDR_EL1_REG_ID)
//! // GICv3: KVM_CREATE_DEVICE(ARM_VGIC_V3) with layout::GIC_DIST_START and
//! //   GIC_REDIST_START (+ the ITS at GIC_ITS_START), then KVM_DEV_ARM_VGIC_CTRL_INIT.
//! let fdt = arch::create_fdt(&arch::FdtConfig {
//!     mpidrs: &mpidrs, ram: (layout::RAM_START, size), cmdline,
//!     initramfs: Some((initrd_addr, initrd_len)),
//!     gic: arch::GicRegions::for_cpus(cpus, true),
//!     serial: arch::SerialFdt::BARGE,
//!     pci: Some(arch::PciHostBridgeFdt::with_mmio64(mmio64_window)),
//! })?;
//! arch::write_fdt(&mem, fdt_addr, &fdt)?;
//! // vCPU 0 only:
//! for (id, value) in arch::BootRegs::new(entry, fdt_addr).one_reg_entries() {
//!     vcpu.set_one_reg(id, &value.to_le_bytes())?;
//! }
//! ```
//!
//! The other vCPUs stay powered off until the guest starts them with PSCI `CPU_ON`, which
//! KVM handles. PSCI `SYSTEM_OFF` / `SYSTEM_RESET` reach the vmm as a `KVM_EXIT_SYSTEM_EVENT`.
//! The UART raises [`layout::SERIAL_SPI`] and a PCI device's INTx pin raises
//! [`layout::pci_intx_spi`] of its slot and pin, both as KVM GSIs (= SPI numbers).

pub mod fdt;
pub mod layout;
pub mod regs;

pub use fdt::{
    create_fdt, write_fdt, FdtConfig, FdtError, GicRegions, PciHostBridgeFdt, SerialFdt,
    GIC_PHANDLE, ITS_PHANDLE,
};
pub use regs::{BootRegs, MPIDR_EL1_REG_ID};
