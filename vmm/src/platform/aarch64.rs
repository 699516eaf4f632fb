//! The aarch64 machine: KVM's in-kernel GICv3 with an ITS, vCPUs initialised for PSCI 0.2
//! (KVM answers PSCI in the kernel: CPU_ON starts the secondaries, SYSTEM_OFF and
//! SYSTEM_RESET come back as system events), the arm64 Image booted with x0 = the device
//! tree, and a 16550 UART on the MMIO bus. There is no port I/O: PCI configuration space
//! is ECAM only.
//!
//! KVM accepts irqfds and GSI routes only once the GIC is initialised, and the GIC only
//! once every vCPU exists: so [`create_vm`] creates the vCPUs too (their KVM_CREATE_VCPU
//! and KVM_ARM_VCPU_INIT), and [`create_vcpus`] later gives vCPU 0 its boot registers
//! and writes the device tree, which names every vCPU by the MPIDR KVM gave it.

use std::sync::{Arc, Mutex};

use arch::aarch64::fdt::{self, FdtConfig, GicRegions, PciHostBridgeFdt, SerialFdt};
use arch::aarch64::regs::{BootRegs, MPIDR_EL1_REG_ID};
use arch::layout::{
    GIC_DIST_START, GIC_ITS_START, GIC_REDIST_START, MAX_VCPUS, PCI_INTX_SPI_BASE, SERIAL_SPI,
    SERIAL_START,
};
use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_ITS,
    kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3, kvm_vcpu_init, KVM_ARM_VCPU_POWER_OFF,
    KVM_ARM_VCPU_PSCI_0_2, KVM_DEV_ARM_VGIC_CTRL_INIT, KVM_DEV_ARM_VGIC_GRP_ADDR,
    KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_GRP_NR_IRQS, KVM_VGIC_ITS_ADDR_TYPE,
    KVM_VGIC_V3_ADDR_TYPE_DIST, KVM_VGIC_V3_ADDR_TYPE_REDIST,
};
use kvm_ioctls::{DeviceFd, Kvm, VcpuFd, VmFd};
use resources::placement::{MAX_PHYS_BITS, MIN_PHYS_BITS};
use vm_memory::GuestMemoryMmap;

use super::BootInputs;
use crate::buses::bus::{BusError, Buses};
use crate::buses::power::PowerSignal;
use crate::buses::serial::SerialDevice;
use crate::loader::{self, LoadError};
use crate::machine::vm::{ioctl, VmError};

/// The UART's GSI: KVM routes GSI n to SPI n (GIC INTID 32 + n).
pub const SERIAL_GSI: u32 = SERIAL_SPI;
/// The first GSI of PCI INTx: INTA#..INTD# of every slot go to SPIs
/// `PCI_INTX_GSI_BASE..+PCI_INTX_PINS`, as the device tree's `interrupt-map` says.
pub const PCI_INTX_GSI_BASE: u32 = PCI_INTX_SPI_BASE;
/// INTx pins routed (INTA#..INTD#).
pub const PCI_INTX_PINS: u32 = arch::layout::PCI_INTX_PINS;
/// Interrupt IDs the GIC handles: 32 private (SGIs, PPIs) plus 224 SPIs (a multiple of
/// 32, as KVM wants).
const GIC_NR_IRQS: u32 = 256;
/// The IPA size KVM gives a VM created with type 0.
const KVM_DEFAULT_IPA_BITS: u8 = 40;
/// Physical (IPA) address bits assumed when the host does not say: KVM's default.
pub const FALLBACK_PHYS_BITS: u8 = KVM_DEFAULT_IPA_BITS;
/// The registers of a 16550 (offsets 0..8); the rest of its 4 KiB page reads as unclaimed.
const UART_REGISTERS: u64 = 8;

/// The in-kernel GICv3 and its ITS, with the vCPUs until [`create_vcpus`] hands them out.
#[derive(Debug)]
pub struct InterruptController {
    /// The GIC's KVM device (distributor and redistributors).
    _gic: DeviceFd,
    /// The ITS's KVM device (MSIs).
    _its: DeviceFd,
    vcpus: Vec<VcpuFd>,
}

/// What [`create_vcpus`] needs to start the kernel and describe the machine.
#[derive(Debug, Clone)]
pub struct BootState {
    /// The Image's entry.
    pub entry: u64,
    /// Where the device tree goes.
    pub fdt_addr: u64,
    /// RAM as `(gpa, size)`.
    pub ram: (u64, u64),
    /// The initramfs as `(gpa, size)`.
    pub initramfs: Option<(u64, u64)>,
    /// The kernel command line.
    pub cmdline: String,
    /// The MMIO32 window as `(gpa, size)`.
    pub mmio32: (u64, u64),
    /// The MMIO64 window as `(gpa, size)`.
    pub mmio64: (u64, u64),
}

/// Why the kernel or the boot structures could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Kernel, initramfs or command line.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The device tree.
    #[error(transparent)]
    Fdt(#[from] fdt::FdtError),
    /// RAM has no room for the device tree.
    #[error(
        "guest RAM of {size:#x} bytes at {start:#x} has no room for the device tree (2 MiB at \
         its end): give the VM more memory (--memory size=...)"
    )]
    NoRoomForFdt {
        /// RAM's first byte.
        start: u64,
        /// RAM's size.
        size: u64,
    },
    /// A vCPU could not be set up.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Reading a vCPU's MPIDR for the device tree failed.
    #[error("cannot read vcpu{vcpu}'s MPIDR_EL1 for the device tree: {source}")]
    Mpidr {
        vcpu: u8,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
}

/// The guest's physical address bits: the host's IPA limit
/// (KVM_CAP_ARM_VM_IPA_SIZE), or KVM's default 40 when KVM does not say; clamped to what
/// the planner takes.
pub fn guest_phys_bits(kvm: &Kvm) -> Result<u8, VmError> {
    let limit = kvm.get_host_ipa_limit();
    let bits = u8::try_from(limit)
        .ok()
        .filter(|bits| *bits > 0)
        .unwrap_or(KVM_DEFAULT_IPA_BITS);
    Ok(bits.clamp(MIN_PHYS_BITS, MAX_PHYS_BITS))
}

/// Checks `cpus` against what KVM and the GICv3 redistributor region allow.
pub fn check_cpu_count(kvm: &Kvm, cpus: u8) -> Result<(), VmError> {
    let kvm_max = kvm.get_max_vcpus();
    let layout_max = MAX_VCPUS;
    let max = kvm_max.min(layout_max);
    if usize::from(cpus) > max {
        return Err(VmError::TooManyCpus {
            asked: cpus,
            max,
            kvm_max,
            layout_limit_by: "GICv3 redistributor region",
            layout_max,
        });
    }
    Ok(())
}

fn set_attr(
    device: &DeviceFd,
    group: u32,
    attr: u32,
    addr: u64,
    what: &'static str,
) -> Result<(), VmError> {
    let attr = kvm_device_attr {
        flags: 0,
        group,
        attr: u64::from(attr),
        addr,
    };
    device.set_device_attr(&attr).map_err(ioctl(what))
}

fn create_device(vm: &VmFd, type_: u32, what: &'static str) -> Result<DeviceFd, VmError> {
    let mut device = kvm_create_device {
        type_,
        fd: 0,
        flags: 0,
    };
    vm.create_device(&mut device).map_err(ioctl(what))
}

/// Creates the VM with `phys_bits` of IPA space, its `cpus` vCPUs (initialised for PSCI
/// 0.2; all but vCPU 0 powered off until the guest's CPU_ON), then the GICv3 and its ITS
/// at the layout's addresses, initialised.
pub fn create_vm(
    kvm: &Kvm,
    phys_bits: u8,
    cpus: u8,
) -> Result<(VmFd, InterruptController), VmError> {
    let vm = if kvm.get_host_ipa_limit() > 0 {
        kvm.create_vm_with_ipa_size(u32::from(phys_bits))
            .map_err(ioctl("KVM_CREATE_VM (IPA size)"))?
    } else {
        kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?
    };
    let mut init = kvm_vcpu_init::default();
    vm.get_preferred_target(&mut init)
        .map_err(ioctl("KVM_ARM_PREFERRED_TARGET"))?;
    init.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
    let mut vcpus = Vec::with_capacity(usize::from(cpus));
    for id in 0..cpus {
        let vcpu = vm
            .create_vcpu(u64::from(id))
            .map_err(ioctl("KVM_CREATE_VCPU"))?;
        let mut this = init;
        if id > 0 {
            this.features[0] |= 1 << KVM_ARM_VCPU_POWER_OFF;
        }
        vcpu.vcpu_init(&this).map_err(ioctl("KVM_ARM_VCPU_INIT"))?;
        vcpus.push(vcpu);
    }

    let gic = create_device(
        &vm,
        kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
        "KVM_CREATE_DEVICE (GICv3)",
    )?;
    let dist = GIC_DIST_START;
    let redist = GIC_REDIST_START;
    let nr_irqs = GIC_NR_IRQS;
    set_attr(
        &gic,
        KVM_DEV_ARM_VGIC_GRP_ADDR,
        KVM_VGIC_V3_ADDR_TYPE_DIST,
        &dist as *const u64 as u64,
        "KVM_SET_DEVICE_ATTR (GIC distributor address)",
    )?;
    set_attr(
        &gic,
        KVM_DEV_ARM_VGIC_GRP_ADDR,
        KVM_VGIC_V3_ADDR_TYPE_REDIST,
        &redist as *const u64 as u64,
        "KVM_SET_DEVICE_ATTR (GIC redistributor address)",
    )?;
    let its = create_device(
        &vm,
        kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_ITS,
        "KVM_CREATE_DEVICE (GIC ITS)",
    )?;
    let its_base = GIC_ITS_START;
    set_attr(
        &its,
        KVM_DEV_ARM_VGIC_GRP_ADDR,
        KVM_VGIC_ITS_ADDR_TYPE,
        &its_base as *const u64 as u64,
        "KVM_SET_DEVICE_ATTR (ITS address)",
    )?;
    set_attr(
        &gic,
        KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
        0,
        &nr_irqs as *const u32 as u64,
        "KVM_SET_DEVICE_ATTR (GIC interrupt count)",
    )?;
    set_attr(
        &gic,
        KVM_DEV_ARM_VGIC_GRP_CTRL,
        KVM_DEV_ARM_VGIC_CTRL_INIT,
        0,
        "KVM_SET_DEVICE_ATTR (GIC init)",
    )?;
    set_attr(
        &its,
        KVM_DEV_ARM_VGIC_GRP_CTRL,
        KVM_DEV_ARM_VGIC_CTRL_INIT,
        0,
        "KVM_SET_DEVICE_ATTR (ITS init)",
    )?;
    Ok((
        vm,
        InterruptController {
            _gic: gic,
            _its: its,
            vcpus,
        },
    ))
}

/// Loads the arm64 Image, the initramfs below the device tree's place at the end of RAM,
/// and checks the command line (it goes into the device tree).
pub fn load_boot(inputs: &BootInputs) -> Result<BootState, BootError> {
    let BootInputs {
        memory,
        ram,
        config,
        windows,
    } = *inputs;
    let (start, size) = ram.first().copied().unwrap_or_default();
    let ram_end = start + size;
    let fdt_addr =
        arch::layout::fdt_addr(ram_end).ok_or(BootError::NoRoomForFdt { start, size })?;
    let kernel = loader::load_kernel(memory, &config.kernel)?;
    let initramfs = match &config.initramfs {
        Some(path) => Some(loader::load_initramfs(memory, path, |len| {
            arch::layout::initramfs_addr(ram_end, fdt_addr, len, kernel.end_addr).ok_or_else(|| {
                format!(
                    "{len} bytes do not fit between the kernel's end at {:#x} and the device \
                         tree at {fdt_addr:#x}; give the VM more memory",
                    kernel.end_addr
                )
            })
        })?),
        None => None,
    };
    loader::check_cmdline(&config.cmdline)?;
    Ok(BootState {
        entry: kernel.entry.addr(),
        fdt_addr,
        ram: (start, size),
        initramfs: initramfs.map(|i| (i.addr, i.size)),
        cmdline: config.cmdline.clone(),
        mmio32: (
            windows.mmio32.start,
            windows.mmio32.end - windows.mmio32.start,
        ),
        mmio64: (
            windows.mmio64.start,
            windows.mmio64.end - windows.mmio64.start,
        ),
    })
}

/// Hands out the vCPUs [`create_vm`] made: vCPU 0 gets the boot registers (PC = the
/// Image's entry, x0 = the device tree, EL1h with interrupts masked); then the device tree
/// is written with every vCPU's MPIDR.
pub fn create_vcpus(
    _kvm: &Kvm,
    _vm: &VmFd,
    memory: &GuestMemoryMmap,
    cpus: u8,
    boot: &BootState,
    irqchip: &mut InterruptController,
) -> Result<Vec<VcpuFd>, BootError> {
    let vcpus = std::mem::take(&mut irqchip.vcpus);
    debug_assert_eq!(vcpus.len(), usize::from(cpus));
    let regs = BootRegs::new(boot.entry, boot.fdt_addr);
    if let Some(bsp) = vcpus.first() {
        for (id, value) in regs.one_reg_entries() {
            bsp.set_one_reg(id, &value.to_le_bytes())
                .map_err(ioctl("KVM_SET_ONE_REG (boot registers)"))?;
        }
    }
    let mut mpidrs = Vec::with_capacity(vcpus.len());
    for (id, vcpu) in vcpus.iter().enumerate() {
        let mut value = [0u8; 8];
        vcpu.get_one_reg(MPIDR_EL1_REG_ID, &mut value)
            .map_err(|source| BootError::Mpidr {
                vcpu: id as u8,
                source,
            })?;
        mpidrs.push(u64::from_le_bytes(value));
    }
    let tree = fdt::create_fdt(&FdtConfig {
        mpidrs: &mpidrs,
        ram: boot.ram,
        cmdline: &boot.cmdline,
        initramfs: boot.initramfs,
        gic: GicRegions::for_cpus(vcpus.len(), true),
        serial: SerialFdt::BARGE,
        pci: Some(PciHostBridgeFdt {
            mmio32: boot.mmio32,
            ..PciHostBridgeFdt::with_mmio64(boot.mmio64)
        }),
    })?;
    fdt::write_fdt(memory, boot.fdt_addr, &tree)?;
    Ok(vcpus)
}

/// The UART on the MMIO bus (its 8 byte registers; there is no port bus on aarch64). PCI
/// comes next (`pci::attach_segment`); power-off and reset are PSCI calls KVM turns into
/// system events.
pub fn devices_on_buses(
    serial: Arc<Mutex<SerialDevice>>,
    _power: &PowerSignal,
) -> Result<Buses, BusError> {
    let mut buses = Buses::default();
    buses
        .mmio
        .insert(SERIAL_START, UART_REGISTERS, "uart", serial)?;
    Ok(buses)
}
