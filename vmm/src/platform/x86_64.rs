//! The x86_64 machine: KVM's in-kernel PIC, IOAPIC and LAPICs with the PIT, CPUID and
//! MSRs on every vCPU, boot params or PVH start info with ACPI tables, COM1, the ACPI
//! sleep register and the i8042 on the port bus.

use std::sync::{Arc, Mutex};

use arch::layout::{ACPI_SLEEP_CONTROL_PORT, COM1_PORT, COM1_PORT_COUNT, I8042_DATA_PORT};
use arch::VcpuBootState;
use kvm_bindings::{kvm_pit_config, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::GuestMemoryMmap;

use super::BootInputs;
use crate::buses::bus::{BusError, Buses};
use crate::buses::pci;
use crate::buses::power::{AcpiSleepBusDevice, I8042BusDevice, PowerSignal};
use crate::buses::serial::SerialDevice;
use crate::loader::{self, LoadError};
use crate::machine::vm::{ioctl, VmError};

/// KVM's real-mode TSS (3 pages) for Intel VMX, at the top of the 32-bit
/// hole above the LAPIC, where no RAM and no device is.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity-map page for Intel VMX real mode, just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// The serial port's GSI (COM1's IRQ 4 on the IOAPIC).
pub const SERIAL_GSI: u32 = arch::layout::COM1_GSI;
/// The first GSI of PCI INTx: the DSDT's `_PRT` routes INTA#..INTD# of every slot to
/// `PCI_INTX_GSI_BASE..+PCI_INTX_PINS`.
pub const PCI_INTX_GSI_BASE: u32 = arch::layout::PCI_INTX_GSI_BASE;
/// INTx pins routed (INTA#..INTD#).
pub const PCI_INTX_PINS: u32 = arch::layout::PCI_INTX_PINS;
/// Physical address bits assumed when the host does not say (see
/// [`pci::FALLBACK_PHYS_BITS`]).
pub const FALLBACK_PHYS_BITS: u8 = pci::FALLBACK_PHYS_BITS;
/// The vCPU boot state [`create_vcpus`] applies.
pub type BootState = VcpuBootState;

/// The in-kernel PIC, IOAPIC and LAPICs: KVM keeps them inside the VM, with no fd of
/// their own.
#[derive(Debug)]
pub struct InterruptController;

/// Why the kernel or the boot structures could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Kernel, initramfs or command line.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// Boot params, PVH start info, page tables or ACPI tables.
    #[error(transparent)]
    Arch(#[from] arch::BootError),
    /// A vCPU could not be set up.
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// The guest's physical address bits, from KVM's CPUID (see
/// [`pci::phys_bits_from_cpuid`]).
pub fn guest_phys_bits(kvm: &Kvm) -> Result<u8, VmError> {
    Ok(pci::phys_bits_from_cpuid(supported_cpuid(kvm)?.as_slice()))
}

/// Checks `cpus` against what KVM and the ACPI MADT allow.
pub fn check_cpu_count(kvm: &Kvm, cpus: u8) -> Result<(), VmError> {
    let kvm_max = kvm.get_max_vcpus();
    let layout_max = usize::from(arch::acpi::MAX_ACPI_CPUS);
    let max = kvm_max.min(layout_max);
    if usize::from(cpus) > max {
        return Err(VmError::TooManyCpus {
            asked: cpus,
            max,
            kvm_max,
            layout_limit_by: "ACPI MADT",
            layout_max,
        });
    }
    Ok(())
}

/// Creates the VM with the in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT. The guest's
/// physical address bits come from CPUID, not from the VM type.
pub fn create_vm(
    kvm: &Kvm,
    _phys_bits: u8,
    _cpus: u8,
) -> Result<(VmFd, InterruptController), VmError> {
    let vm = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(ioctl("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.set_tss_address(KVM_TSS_ADDRESS as usize)
        .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))?;
    Ok((vm, InterruptController))
}

/// KVM_GET_SUPPORTED_CPUID: what the guest's CPUID starts from.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, VmError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))
}

/// Loads the kernel (bzImage or ELF, PVH when it has the note), the initramfs and the
/// command line, and writes the boot structures with the ACPI tables (the PCI host
/// bridge's among them).
pub fn load_boot(inputs: &BootInputs) -> Result<BootState, BootError> {
    let BootInputs {
        memory,
        ram,
        config,
        windows,
    } = *inputs;
    let kernel = loader::load_kernel(memory, &config.kernel)?;
    let initramfs = match &config.initramfs {
        Some(path) => Some(loader::load_initramfs(memory, path, |size| {
            arch::initramfs_load_addr(ram, size, kernel.end_addr, kernel.setup_header.as_ref())
        })?),
        None => None,
    };
    loader::load_cmdline(memory, &config.cmdline)?;
    let (pci_aml, pci_tables) = pci::acpi_content(windows);
    Ok(arch::setup_boot(
        memory,
        &arch::BootConfig {
            cpus: config.cpus,
            ram,
            entry: arch_entry(&kernel),
            cmdline: &config.cmdline,
            initramfs: initramfs.map(|i| (i.addr, i.size)),
            acpi: arch::AcpiExtras {
                dsdt_aml: &pci_aml,
                tables: &pci_tables,
            },
        },
    )?)
}

/// The kernel entry in arch's terms.
fn arch_entry(kernel: &loader::LoadedKernel) -> arch::KernelEntry {
    match kernel.entry {
        loader::KernelEntry::Linux64 { addr } => arch::KernelEntry::Linux64 {
            entry_addr: addr,
            setup_header: kernel.setup_header,
        },
        loader::KernelEntry::Pvh { addr } => arch::KernelEntry::Pvh { entry_addr: addr },
    }
}

/// Creates and configures `cpus` vCPUs: CPUID with the topology, MSRs, FPU
/// and LAPIC LINT0/1 on all; registers from `boot` on vCPU 0 only (the
/// others wait for INIT/SIPI in the in-kernel LAPIC).
pub fn create_vcpus(
    kvm: &Kvm,
    vm: &VmFd,
    _memory: &GuestMemoryMmap,
    cpus: u8,
    boot: &BootState,
    _irqchip: &mut InterruptController,
) -> Result<Vec<VcpuFd>, BootError> {
    let supported = supported_cpuid(kvm)?;
    let mut vcpus = Vec::with_capacity(usize::from(cpus));
    for id in 0..cpus {
        let vcpu = vm
            .create_vcpu(u64::from(id))
            .map_err(ioctl("KVM_CREATE_VCPU"))?;
        configure_vcpu(&vcpu, id, cpus, &supported, boot)?;
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

fn configure_vcpu(
    vcpu: &VcpuFd,
    id: u8,
    cpus: u8,
    supported: &CpuId,
    boot: &VcpuBootState,
) -> Result<(), VmError> {
    let mut cpuid = supported.clone();
    arch::patch_cpuid(&mut cpuid, id, cpus);
    vcpu.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;

    let msrs = Msrs::from_entries(&boot.msrs).map_err(|_| VmError::Msrs {
        vcpu: id,
        set: 0,
        total: boot.msrs.len(),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
    if set != boot.msrs.len() {
        return Err(VmError::Msrs {
            vcpu: id,
            set,
            total: boot.msrs.len(),
        });
    }
    vcpu.set_fpu(&boot.fpu).map_err(ioctl("KVM_SET_FPU"))?;
    let mut lapic = vcpu.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
    arch::set_lint(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(ioctl("KVM_SET_LAPIC"))?;

    if id == 0 {
        vcpu.set_regs(&boot.regs).map_err(ioctl("KVM_SET_REGS"))?;
        let mut sregs = vcpu.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        boot.apply_sregs(&mut sregs);
        vcpu.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
    }
    Ok(())
}

/// COM1, the ACPI sleep/reset register and the i8042 on the port I/O bus.
/// The MMIO bus is empty: the IOAPIC and LAPICs are in KVM; PCI comes next
/// (`pci::attach_segment`).
pub fn devices_on_buses(
    serial: Arc<Mutex<SerialDevice>>,
    power: &PowerSignal,
) -> Result<Buses, BusError> {
    let mut buses = Buses::default();
    buses.pio.insert(
        u64::from(COM1_PORT),
        u64::from(COM1_PORT_COUNT),
        "com1",
        serial,
    )?;
    buses.pio.insert(
        u64::from(ACPI_SLEEP_CONTROL_PORT),
        devices::acpi::REGISTER_SIZE,
        "acpi-sleep",
        Arc::new(Mutex::new(AcpiSleepBusDevice::new(power.clone()))),
    )?;
    buses.pio.insert(
        u64::from(I8042_DATA_PORT),
        devices::i8042::REGISTER_SPAN,
        "i8042",
        Arc::new(Mutex::new(I8042BusDevice::new(power.clone()))),
    )?;
    Ok(buses)
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;
    use crate::buses::serial::IrqFdTrigger;

    #[test]
    fn default_devices_fit_on_the_port_bus() {
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            IrqFdTrigger::new().unwrap(),
            Box::new(io::sink()),
        )));
        let buses = devices_on_buses(serial, &PowerSignal::new().unwrap()).unwrap();
        assert_eq!(buses.pio.len(), 3);
        assert_eq!(buses.pio.lookup(0x3f8).unwrap().1, "com1");
        assert_eq!(buses.pio.lookup(0x3ff).unwrap().1, "com1");
        assert_eq!(buses.pio.lookup(0x3c0).unwrap().1, "acpi-sleep");
        assert_eq!(buses.pio.lookup(0x64).unwrap().1, "i8042");
        assert!(buses.mmio.is_empty());
    }
}
