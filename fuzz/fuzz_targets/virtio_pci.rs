//! The virtio-pci modern transport (`devices::virtio::pci::VirtioPciDevice`)
//! over a fake two-queue virtio device that records its activations and
//! resets, with MSI-X through an `InterruptRouter` over a fake KVM and
//! queues checked against a small guest RAM (64 KiB at 0 and 64 KiB at
//! 0x20000, a hole between).
//!
//! First byte bit 0: the fake device refuses activation (its worker is
//! gone), so DRIVER_OK ends in DEVICE_NEEDS_RESET. Then accesses
//! (`barge_fuzz::accesses`), by selector: 0-7 BAR 0 at `offset % 0x8000`
//! (common configuration, ISR, device configuration, notify, MSI-X table
//! and PBA), 8-10 configuration space at `offset % 4096`, 11 configuration
//! space at the raw 16-bit offset, 12 the device signals queue
//! `offset % 4` (2 and 3 do not exist) through the interrupt it got at
//! activation, 13 the device signals a configuration change, 14 the VMM
//! resets the function (a PCI-level reset), 15 BAR 0 at the raw offset
//! (past its end). After each interrupt the fake KVM drains deliveries.
//!
//! Checked whatever the guest does: no panic; while FEATURES_OK is set the
//! accepted features include VIRTIO_F_VERSION_1 and are offered ones; an
//! activation gets such features and only enabled queues that fit guest
//! RAM, and comes at most once between two resets; a status write of 0
//! reads back 0 and leaves the device stopped; dropping the function takes
//! every irqfd away.
#![no_main]

use std::sync::{Arc, Mutex, MutexGuard};

use barge_fuzz::accesses;
use devices::interrupts::fake::FakeKvmIrqs;
use devices::interrupts::InterruptRouter;
use devices::pci::PciConfigAccess;
use devices::virtio::pci::{VirtioPciDevice, VIRTIO_BAR_SIZE};
use devices::virtio::{
    read_config_bytes, ActivateError, Activation, DeviceCounters, DeviceType, VirtioDevice,
    VirtioInterrupt, TRANSPORT_FEATURES, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use libfuzzer_sys::fuzz_target;
use resources::gsi::KVM_MAX_IRQ_ROUTES;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// The fake device's own feature (VIRTIO_BLK_F_BLK_SIZE, say).
const DEVICE_FEATURES: u64 = 1 << 6;
const OFFERED: u64 = DEVICE_FEATURES | TRANSPORT_FEATURES;
const QUEUE_MAX_SIZES: [u16; 2] = [128, 16];
/// `device_status` in the common configuration.
const DEVICE_STATUS: u64 = 0x14;
const BAR_GPA: u64 = 0xe000_0000;

/// What the fake device saw.
#[derive(Default)]
struct Log {
    /// Activated and not reset since.
    active: bool,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
}

struct FakeDevice {
    log: Arc<Mutex<Log>>,
    counters: Arc<DeviceCounters>,
    config: [u8; 8],
    refuse_activation: bool,
}

fn lock(log: &Mutex<Log>) -> MutexGuard<'_, Log> {
    log.lock().unwrap_or_else(|e| e.into_inner())
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> DeviceType {
        DeviceType::Block
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_MAX_SIZES
    }

    fn features(&self) -> u64 {
        DEVICE_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if offset < self.config.len() as u64 && data.len() == 1 {
            self.config[offset as usize] = data[0];
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let mut log = lock(&self.log);
        assert!(!log.active, "activated twice without a reset in between");
        let features = activation.features;
        assert_ne!(
            features & VIRTIO_F_VERSION_1,
            0,
            "activated without VERSION_1: {features:#x}"
        );
        assert_eq!(
            features & !OFFERED,
            0,
            "activated with features never offered: {features:#x}"
        );
        let mut last = None;
        for queue in &activation.queues {
            assert!(usize::from(queue.index) < QUEUE_MAX_SIZES.len());
            assert!(last < Some(queue.index), "queues out of order");
            last = Some(queue.index);
            assert!(queue.queue.ready(), "queue {} not enabled", queue.index);
            assert!(
                queue.queue.is_valid(&activation.memory),
                "queue {} does not fit guest RAM",
                queue.index
            );
        }
        if self.refuse_activation {
            return Err(ActivateError::WorkerGone);
        }
        log.active = true;
        log.interrupt = Some(activation.interrupt);
        Ok(())
    }

    fn reset(&mut self) {
        let mut log = lock(&self.log);
        log.active = false;
        // A stopped device raises no more interrupts.
        log.interrupt = None;
    }

    fn counters(&self) -> Arc<DeviceCounters> {
        Arc::clone(&self.counters)
    }
}

fn check_features(device: &VirtioPciDevice) {
    if device.status() & VIRTIO_CONFIG_S_FEATURES_OK as u8 != 0 {
        let acked = device.acked_features();
        assert_ne!(
            acked & VIRTIO_F_VERSION_1,
            0,
            "FEATURES_OK without VERSION_1: {acked:#x}"
        );
        assert_eq!(
            acked & !OFFERED,
            0,
            "FEATURES_OK with features never offered: {acked:#x}"
        );
    }
}

fn bar_access(
    device: &mut VirtioPciDevice,
    log: &Mutex<Log>,
    offset: u64,
    access: &barge_fuzz::Access,
) {
    match &access.write {
        None => device.bar_read(offset, &mut vec![0; access.width]),
        Some(data) => {
            device.bar_write(offset, data);
            if offset == DEVICE_STATUS && data.as_slice() == [0] {
                let mut status = [0xffu8];
                device.bar_read(DEVICE_STATUS, &mut status);
                assert_eq!(status, [0], "status reads {:#x} after a reset", status[0]);
                assert_eq!(device.status(), 0);
                assert!(!lock(log).active, "device still running after a reset");
            }
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&flags, input)) = input.split_first() else {
        return;
    };
    let log = Arc::new(Mutex::new(Log::default()));
    let kvm = Arc::new(FakeKvmIrqs::default());
    let router = Arc::new(InterruptRouter::new(kvm.clone(), KVM_MAX_IRQ_ROUTES).expect("router"));
    let memory = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x1_0000),
        (GuestAddress(0x2_0000), 0x1_0000),
    ])
    .expect("guest memory");
    let mut device = VirtioPciDevice::new(
        "virtio-fuzz",
        Box::new(FakeDevice {
            log: Arc::clone(&log),
            counters: Arc::default(),
            config: [1, 2, 3, 4, 5, 6, 7, 8],
            refuse_activation: flags & 1 == 1,
        }),
        BAR_GPA,
        memory,
        router,
        3,
    )
    .expect("virtio-pci function");
    for access in accesses(input) {
        match access.selector {
            0..=7 => {
                let offset = u64::from(access.offset) % VIRTIO_BAR_SIZE;
                bar_access(&mut device, &log, offset, &access);
            }
            15 => bar_access(&mut device, &log, u64::from(access.offset), &access),
            8..=11 => {
                let offset = if access.selector == 11 {
                    access.offset as u16
                } else {
                    (access.offset % 4096) as u16
                };
                match access.write {
                    None => device.config_read(offset, &mut vec![0; access.width]),
                    Some(data) => {
                        device.config_write(offset, &data);
                    }
                }
            }
            12 | 13 => {
                let interrupt = lock(&log).interrupt.clone();
                if let Some(interrupt) = interrupt {
                    if access.selector == 12 {
                        interrupt.signal_queue((access.offset % 4) as u16);
                    } else {
                        interrupt.signal_config();
                    }
                }
                let _ = kvm.deliveries();
            }
            _ => {
                device.reset();
                assert_eq!(device.status(), 0);
                assert!(!lock(&log).active, "device still running after a reset");
            }
        }
        check_features(&device);
    }
    drop(device);
    assert!(
        !lock(&log).active,
        "device still running after the function went away"
    );
    assert!(
        kvm.irqfd_gsis().is_empty(),
        "irqfds left after the function went away: {:?}",
        kvm.irqfd_gsis()
    );
});
