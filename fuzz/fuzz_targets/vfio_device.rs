//! The passthrough device's emulated view over the fake VFIO backend
//! (shaped like a data-center GPU): config space (BARs, command register,
//! capabilities, hidden capabilities) and trapped BAR accesses (MSI-X table
//! and PBA in BAR0, the I/O BAR), with interrupts wired as `barge run` wires
//! them (MSI, MSI-X, INTx over a fake KVM).
//!
//! First byte bit 0: 1 = interrupts wired (the VMM's case), 0 = the
//! device's own capabilities. Selector: 0-3 config (offset in 0..0x1008),
//! 4-11 BAR `selector - 4` (6 and 7 do not exist), 12 the device fires
//! MSI-X vector `offset % 40` and the fake KVM drains deliveries, 13 the
//! device fires MSI / INTx, 14 interrupt reset (guest reboot), 15 config
//! with the raw 16-bit offset.
#![no_main]

use std::sync::{Arc, Mutex};

use barge_fuzz::accesses;
use devices::interrupts::fake::FakeKvmIrqs;
use devices::interrupts::InterruptRouter;
use devices::pci::PciConfigAccess;
use devices::vfio::fake::FakeVfioDevice;
use devices::vfio::interrupts::VfioInterrupts;
use devices::vfio::{VfioPciDevice, VfioProbe, INTX_IRQ_INDEX, MSIX_IRQ_INDEX, MSI_IRQ_INDEX};
use libfuzzer_sys::fuzz_target;
use resources::gsi::KVM_MAX_IRQ_ROUTES;

const GIB: u64 = 1 << 30;
/// BAR0 is 16 MiB; offsets wrap at twice that to try past its end.
const BAR0_WRAP: u64 = 32 << 20;

struct Rig {
    fake: Arc<FakeVfioDevice>,
    kvm: Arc<FakeKvmIrqs>,
    device: VfioPciDevice<FakeVfioDevice>,
}

fn rig(wired: bool) -> Rig {
    let fake = Arc::new(FakeVfioDevice::gpu_like().with_irqs(MSIX_IRQ_INDEX, 32));
    let probe = VfioProbe::read(&*fake).expect("gpu_like probes");
    let input = probe.device_input("gpu", None);
    let ram = resources::ram_regions(2 * GIB).expect("2 GiB of RAM");
    let windows = resources::Windows::new(&ram, 46).expect("46-bit windows");
    let plan = resources::plan(&[input], &windows).expect("gpu_like fits");
    let plan = plan.devices[0].clone();
    let mut device =
        VfioPciDevice::new(Arc::clone(&fake), &probe, &plan, &[(5, 0xc000)]).expect("device");
    let kvm = Arc::new(FakeKvmIrqs::default());
    if wired {
        let router = Arc::new(
            InterruptRouter::new(kvm.clone(), KVM_MAX_IRQ_ROUTES).expect("router"),
        );
        let mut irqs = VfioInterrupts::new(fake.clone(), router, 0x0800, &probe.config, 16)
            .expect("interrupts");
        irqs.start();
        device = device.with_interrupts(Arc::new(Mutex::new(irqs)));
    }
    Rig { fake, kvm, device }
}

fuzz_target!(|input: &[u8]| {
    let Some((&flags, input)) = input.split_first() else {
        return;
    };
    let Rig {
        fake,
        kvm,
        mut device,
    } = rig(flags & 1 == 1);
    let bars = device.bar_access();
    for access in accesses(input) {
        match access.selector {
            0..=3 | 15 => {
                let offset = if access.selector == 15 {
                    access.offset as u16
                } else {
                    (access.offset % 0x1008) as u16
                };
                match access.write {
                    None => device.config_read(offset, &mut vec![0; access.width]),
                    Some(data) => {
                        device.config_write(offset, &data);
                    }
                }
            }
            4..=11 => {
                let index = access.selector - 4;
                let offset = if index == 0 {
                    u64::from(access.offset) % BAR0_WRAP
                } else {
                    u64::from(access.offset)
                };
                match access.write {
                    None => bars.bar_read(index, offset, &mut vec![0; access.width]),
                    Some(data) => bars.bar_write(index, offset, &data),
                }
            }
            12 => {
                fake.fire(MSIX_IRQ_INDEX, (access.offset % 40) as usize);
                let _ = kvm.deliveries();
            }
            13 => {
                fake.fire(MSI_IRQ_INDEX, (access.offset % 40) as usize);
                fake.fire(INTX_IRQ_INDEX, 0);
                let _ = kvm.deliveries();
            }
            _ => {
                if let Some(irqs) = device.interrupts() {
                    irqs.lock().unwrap_or_else(|e| e.into_inner()).reset();
                }
            }
        }
    }
    // barge keeps the device's memory decode on whatever the guest writes
    // (vfio-pci would zap the BAR mmaps otherwise).
    let command = fake.config_bytes()[4];
    assert_ne!(command & 2, 0, "device memory decode turned off");
});
