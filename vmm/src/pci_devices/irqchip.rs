//! KVM's side of passed-through devices' interrupts: [`KvmIrqChip`]
//! implements the device model's [`KvmIrqs`] (GSI routes, irqfds) over the
//! VM fd barge shares, a thin layer over kvm-ioctls. Its tests read KVM's
//! routing entries, a C union, with `unsafe`.

use std::io;
use std::sync::Arc;

use devices::interrupts::{InterruptRouter, KvmIrqs};
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{Cap, VmFd};
use resources::gsi::{Route, RouteKind, IOAPIC_PINS, KVM_MAX_IRQ_ROUTES_OLD};
use vmm_sys_util::eventfd::EventFd;

/// KVM's side of device interrupts ([`KvmIrqs`]) over the VM fd. The device
/// models reach it from vCPU threads; holding the VM fd keeps the VM alive
/// until the last device's interrupts are gone (see
/// `pci_devices::teardown`).
#[derive(Debug)]
pub struct KvmIrqChip {
    vm: Arc<VmFd>,
}

impl KvmIrqChip {
    /// The irqchip of `vm`.
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self { vm }
    }

    /// How many GSIs KVM routes (KVM_CAP_IRQ_ROUTING), or the old kernels'
    /// limit when KVM does not say.
    pub fn gsi_limit(&self) -> u32 {
        u32::try_from(self.vm.check_extension_int(Cap::IrqRouting))
            .ok()
            .filter(|limit| *limit > IOAPIC_PINS)
            .unwrap_or(KVM_MAX_IRQ_ROUTES_OLD)
    }
}

/// The GSI router every interrupting device of `vm` shares (one routing
/// table per VM: KVM_SET_GSI_ROUTING replaces the whole table). `None`,
/// with a warning, when KVM's GSI limit is unusable.
pub fn vm_router(vm: &Arc<VmFd>) -> Option<Arc<InterruptRouter>> {
    let chip = KvmIrqChip::new(Arc::clone(vm));
    let gsi_limit = chip.gsi_limit();
    let kvm: Arc<dyn KvmIrqs> = Arc::new(chip);
    InterruptRouter::new(kvm, gsi_limit)
        .map_err(|error| log::warn!("interrupts: {error}; PCI devices get no MSI or MSI-X"))
        .ok()
        .map(Arc::new)
}

fn io_error(error: kvm_ioctls::Error) -> io::Error {
    io::Error::from_raw_os_error(error.errno())
}

/// `routes` as KVM's routing entries.
pub fn kvm_routing_entries(routes: &[Route]) -> Vec<kvm_irq_routing_entry> {
    routes
        .iter()
        .map(|route| {
            let mut entry = kvm_irq_routing_entry {
                gsi: route.gsi,
                ..Default::default()
            };
            match route.kind {
                RouteKind::Msi {
                    address,
                    data,
                    devid,
                } => {
                    entry.type_ = KVM_IRQ_ROUTING_MSI;
                    entry.u.msi.address_lo = address as u32;
                    entry.u.msi.address_hi = (address >> 32) as u32;
                    entry.u.msi.data = data;
                    // aarch64's ITS translates (device ID, event): KVM needs
                    // the requester ID. x86's MSIs carry no device.
                    if let (true, Some(devid)) = (cfg!(target_arch = "aarch64"), devid) {
                        entry.flags = kvm_bindings::KVM_MSI_VALID_DEVID;
                        entry.u.msi.__bindgen_anon_1.devid = devid;
                    }
                }
                RouteKind::Irqchip { chip, pin } => {
                    entry.type_ = KVM_IRQ_ROUTING_IRQCHIP;
                    entry.u.irqchip.irqchip = chip;
                    entry.u.irqchip.pin = pin;
                }
            }
            entry
        })
        .collect()
}

impl KvmIrqs for KvmIrqChip {
    fn set_gsi_routing(&self, routes: &[Route]) -> io::Result<()> {
        let routing = KvmIrqRouting::from_entries(&kvm_routing_entries(routes))
            .map_err(|e| io::Error::other(format!("{e:?}")))?;
        self.vm.set_gsi_routing(&routing).map_err(io_error)
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32, resample: Option<&EventFd>) -> io::Result<()> {
        match resample {
            Some(resample) => self.vm.register_irqfd_with_resample(fd, resample, gsi),
            None => self.vm.register_irqfd(fd, gsi),
        }
        .map_err(io_error)
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        self.vm.unregister_irqfd(fd, gsi).map_err(io_error)
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;
    use crate::machine::kvm;

    #[test]
    fn routes_convert_to_kvm_entries_with_the_legacy_pins_first() {
        let mut routes = resources::gsi::legacy_routes();
        routes.push(Route {
            gsi: 24,
            kind: RouteKind::Msi {
                address: 0x1_fee0_1000,
                data: 0x4041,
                devid: Some(0x18),
            },
        });
        let entries = kvm_routing_entries(&routes);
        assert_eq!(entries.len(), routes.len());
        // GSI 4 (COM1): master PIC pin 4 and IOAPIC pin 4.
        let com1: Vec<_> = entries.iter().filter(|e| e.gsi == 4).collect();
        assert_eq!(com1.len(), 2);
        for entry in &com1 {
            assert_eq!(entry.type_, KVM_IRQ_ROUTING_IRQCHIP);
            // SAFETY: irqchip entries carry the irqchip member.
            let irqchip = unsafe { entry.u.irqchip };
            assert_eq!(irqchip.pin, 4);
        }
        let msi = entries.last().unwrap();
        assert_eq!((msi.gsi, msi.type_), (24, KVM_IRQ_ROUTING_MSI));
        // SAFETY: MSI entries carry the msi member.
        let message = unsafe { msi.u.msi };
        assert_eq!(
            (message.address_lo, message.address_hi, message.data),
            (0xfee0_1000, 1, 0x4041)
        );
        assert!(KvmIrqRouting::from_entries(&entries).is_ok());
    }

    #[test]
    fn the_chip_routes_and_wires_irqfds_on_the_shared_vm() {
        if !guest_programs::testing::kvm_or_skip(
            "the_chip_routes_and_wires_irqfds_on_the_shared_vm",
        ) {
            return;
        }
        let vm = Arc::new(
            crate::platform::create_vm(&kvm::open_kvm().unwrap(), 40, 1)
                .unwrap()
                .0,
        );
        let chip = KvmIrqChip::new(Arc::clone(&vm));
        assert!(chip.gsi_limit() > IOAPIC_PINS);
        let mut routes = resources::gsi::legacy_routes();
        routes.push(Route {
            gsi: 24,
            kind: RouteKind::Msi {
                address: 0xfee0_0000,
                data: 0x41,
                // Carried on aarch64 only: x86's KVM takes the route without it.
                devid: Some(0x08),
            },
        });
        chip.set_gsi_routing(&routes).unwrap();
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        chip.register_irqfd(&fd, 24, None).unwrap();
        chip.unregister_irqfd(&fd, 24).unwrap();
        let (trigger, resample) = (
            EventFd::new(EFD_NONBLOCK).unwrap(),
            EventFd::new(EFD_NONBLOCK).unwrap(),
        );
        chip.register_irqfd(&trigger, 16, Some(&resample)).unwrap();
        chip.unregister_irqfd(&trigger, 16).unwrap();
        drop(chip);
        assert_eq!(Arc::strong_count(&vm), 1, "the chip let go of the VM");
    }
}
