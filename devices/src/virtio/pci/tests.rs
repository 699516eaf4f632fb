use std::sync::Mutex;

use resources::gsi::KVM_MAX_IRQ_ROUTES;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::*;
use crate::interrupts::fake::FakeKvmIrqs;
use crate::interrupts::KvmIrqs;
use crate::pci::caps::{standard_capabilities, CapabilityId};
use crate::pci::msix::{MSIX_CONTROL_ENABLE, MSIX_CONTROL_FUNCTION_MASK};
use crate::virtio::{
    ActivateError, DeviceType, VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER,
};

const BAR_GPA: u64 = 0xe000_0000;
const RAM: u64 = 0x10_0000;

#[derive(Default)]
struct Log {
    activations: Vec<(u64, Vec<u16>)>,
    resets: usize,
    interrupt: Option<Arc<dyn VirtioInterrupt>>,
}

struct FakeDevice {
    log: Arc<Mutex<Log>>,
    counters: Arc<DeviceCounters>,
    config: [u8; 8],
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> DeviceType {
        DeviceType::Block
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[128, 64]
    }
    fn features(&self) -> u64 {
        1 << 9
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.len() == 1 {
            self.config[0] = data[0];
        }
    }
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let mut log = self.log.lock().unwrap();
        log.activations.push((
            activation.features,
            activation.queues.iter().map(|q| q.index).collect(),
        ));
        log.interrupt = Some(activation.interrupt);
        Ok(())
    }
    fn reset(&mut self) {
        self.log.lock().unwrap().resets += 1;
    }
    fn counters(&self) -> Arc<DeviceCounters> {
        Arc::clone(&self.counters)
    }
}

struct Rig {
    device: VirtioPciDevice,
    log: Arc<Mutex<Log>>,
    kvm: Arc<FakeKvmIrqs>,
}

fn rig() -> Rig {
    let log = Arc::new(Mutex::new(Log::default()));
    let kvm = Arc::new(FakeKvmIrqs::default());
    let irqs: Arc<dyn KvmIrqs> = kvm.clone();
    let router = Arc::new(InterruptRouter::new(irqs, KVM_MAX_IRQ_ROUTES).unwrap());
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let device = VirtioPciDevice::new(
        "virtio-test",
        Box::new(FakeDevice {
            log: Arc::clone(&log),
            counters: Arc::default(),
            config: [1, 2, 3, 4, 5, 6, 7, 8],
        }),
        BAR_GPA,
        memory,
        router,
        7,
    )
    .unwrap();
    Rig { device, log, kvm }
}

fn write(device: &mut VirtioPciDevice, offset: u64, value: u64, len: usize) {
    device.bar_write(offset, &value.to_le_bytes()[..len]);
}

fn read(device: &mut VirtioPciDevice, offset: u64, len: usize) -> u64 {
    let mut data = [0u8; 8];
    device.bar_read(offset, &mut data[..len]);
    u64::from_le_bytes(data)
}

fn config32(device: &mut VirtioPciDevice, offset: u16) -> u32 {
    let mut data = [0u8; 4];
    device.config_read(offset, &mut data);
    u32::from_le_bytes(data)
}

/// A driver's set-up of queue `index` with rings at `base`.
fn set_up_queue(device: &mut VirtioPciDevice, index: u16, base: u64, vector: u16) {
    write(device, common::QUEUE_SELECT, index.into(), 2);
    write(device, common::QUEUE_SIZE, 16, 2);
    write(device, common::QUEUE_DESC, base, 4);
    write(device, common::QUEUE_DESC + 4, 0, 4);
    write(device, common::QUEUE_DRIVER, base + 0x1000, 4);
    write(device, common::QUEUE_DEVICE, base + 0x2000, 4);
    write(device, common::QUEUE_MSIX_VECTOR, vector.into(), 2);
    write(device, common::QUEUE_ENABLE, 1, 2);
}

fn negotiate(device: &mut VirtioPciDevice, features: u64) -> u8 {
    let status = (VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER) as u64;
    write(device, common::DEVICE_STATUS, status, 1);
    write(device, common::DRIVER_FEATURE_SELECT, 0, 4);
    write(device, common::DRIVER_FEATURE, features & 0xffff_ffff, 4);
    write(device, common::DRIVER_FEATURE_SELECT, 1, 4);
    write(device, common::DRIVER_FEATURE, features >> 32, 4);
    write(
        device,
        common::DEVICE_STATUS,
        status | u64::from(VIRTIO_CONFIG_S_FEATURES_OK),
        1,
    );
    read(device, common::DEVICE_STATUS, 1) as u8
}

#[test]
fn config_space_is_a_modern_virtio_function_with_its_capabilities() {
    let mut rig = rig();
    assert_eq!(config32(&mut rig.device, 0), 0x1042_1af4);
    assert_eq!(config32(&mut rig.device, 8) >> 8, 0x01_80_00);
    assert_eq!(config32(&mut rig.device, 8) & 0xff, 1);
    let walk = standard_capabilities(rig.device.endpoint.config().as_bytes());
    let ids: Vec<_> = walk.capabilities.iter().map(|c| (c.id, c.offset)).collect();
    assert_eq!(
        ids,
        [
            (CapabilityId::Standard(0x11), 0x40),
            (CapabilityId::Standard(0x09), 0x50),
            (CapabilityId::Standard(0x09), 0x60),
            (CapabilityId::Standard(0x09), 0x70),
            (CapabilityId::Standard(0x09), 0x80),
        ]
    );
    // cfg_type, bar and offset of each vendor capability.
    for (at, cfg_type, offset) in [
        (0x50u16, CAP_COMMON, COMMON_OFFSET),
        (0x60, CAP_ISR, ISR_OFFSET),
        (0x70, CAP_DEVICE, DEVICE_CONFIG_OFFSET),
        (0x80, CAP_NOTIFY, NOTIFY_OFFSET),
    ] {
        let head = config32(&mut rig.device, at);
        assert_eq!((head >> 24) as u8, cfg_type, "cap at {at:#x}");
        assert_eq!(config32(&mut rig.device, at + 4) & 0xff, 0);
        assert_eq!(u64::from(config32(&mut rig.device, at + 8)), offset);
    }
    assert_eq!(config32(&mut rig.device, 0x80 + 16), NOTIFY_OFF_MULTIPLIER);
    // MSI-X: 3 vectors (2 queues + config), table and PBA in BAR 0.
    assert_eq!((config32(&mut rig.device, 0x40) >> 16) & 0x7ff, 2);
    assert_eq!(config32(&mut rig.device, 0x44), MSIX_TABLE_OFFSET as u32);
    assert_eq!(config32(&mut rig.device, 0x48), MSIX_PBA_OFFSET as u32);
    // BAR 0: 32-bit memory at its planned address.
    assert_eq!(u64::from(config32(&mut rig.device, 0x10)), BAR_GPA);
    assert_eq!(read(&mut rig.device, common::NUM_QUEUES, 2), 2);
}

#[test]
fn features_ok_needs_version_1_and_only_offered_features() {
    let mut rig = rig();
    write(&mut rig.device, common::DEVICE_FEATURE_SELECT, 1, 4);
    assert_eq!(
        read(&mut rig.device, common::DEVICE_FEATURE, 4) & 1,
        1,
        "VERSION_1 offered"
    );
    write(&mut rig.device, common::DEVICE_FEATURE_SELECT, 0, 4);
    assert_ne!(
        read(&mut rig.device, common::DEVICE_FEATURE, 4) & (1 << 9),
        0
    );
    // Without VERSION_1 (a legacy driver): refused.
    let status = negotiate(&mut rig.device, 1 << 9);
    assert_eq!(status & VIRTIO_CONFIG_S_FEATURES_OK as u8, 0);
    write(&mut rig.device, common::DEVICE_STATUS, 0, 1);
    // A feature never offered: refused.
    let status = negotiate(&mut rig.device, VIRTIO_F_VERSION_1 | 1 << 3);
    assert_eq!(status & VIRTIO_CONFIG_S_FEATURES_OK as u8, 0);
    write(&mut rig.device, common::DEVICE_STATUS, 0, 1);
    let status = negotiate(&mut rig.device, VIRTIO_F_VERSION_1 | 1 << 9);
    assert_ne!(status & VIRTIO_CONFIG_S_FEATURES_OK as u8, 0);
    assert_eq!(rig.device.acked_features(), VIRTIO_F_VERSION_1 | 1 << 9);
}

#[test]
fn driver_ok_activates_enabled_queues_and_reset_stops_the_device() {
    let mut rig = rig();
    negotiate(
        &mut rig.device,
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX,
    );
    set_up_queue(&mut rig.device, 1, 0x4000, 1);
    assert_eq!(read(&mut rig.device, common::QUEUE_NOTIFY_OFF, 2), 1);
    assert_eq!(read(&mut rig.device, common::QUEUE_DESC, 4), 0x4000);
    let status = read(&mut rig.device, common::DEVICE_STATUS, 1);
    write(
        &mut rig.device,
        common::DEVICE_STATUS,
        status | u64::from(VIRTIO_CONFIG_S_DRIVER_OK),
        1,
    );
    {
        let log = rig.log.lock().unwrap();
        assert_eq!(
            log.activations,
            [(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX, vec![1])]
        );
    }
    // Queue registers are frozen while the device runs.
    write(&mut rig.device, common::QUEUE_SIZE, 8, 2);
    assert_eq!(read(&mut rig.device, common::QUEUE_SIZE, 2), 16);
    write(&mut rig.device, common::DEVICE_STATUS, 0, 1);
    assert_eq!(rig.log.lock().unwrap().resets, 1);
    assert_eq!(read(&mut rig.device, common::DEVICE_STATUS, 1), 0);
    assert_eq!(read(&mut rig.device, common::QUEUE_ENABLE, 2), 0);
    assert_eq!(
        read(&mut rig.device, common::QUEUE_MSIX_VECTOR, 2),
        u64::from(VIRTIO_MSI_NO_VECTOR)
    );
}

/// Found by the `virtio_pci` fuzz target: status 0x0f, 0x0b, 0x0f
/// activated the device twice without a reset.
#[test]
fn clearing_driver_ok_or_features_ok_without_a_reset_is_ignored() {
    let mut rig = rig();
    negotiate(&mut rig.device, VIRTIO_F_VERSION_1);
    set_up_queue(&mut rig.device, 0, 0x4000, 0);
    let running = (VIRTIO_CONFIG_S_ACKNOWLEDGE
        | VIRTIO_CONFIG_S_DRIVER
        | VIRTIO_CONFIG_S_FEATURES_OK
        | VIRTIO_CONFIG_S_DRIVER_OK) as u64;
    write(&mut rig.device, common::DEVICE_STATUS, running, 1);
    assert_eq!(rig.log.lock().unwrap().activations.len(), 1);
    // DRIVER_OK and FEATURES_OK cleared: both stay set.
    let cleared = (VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER) as u64;
    write(&mut rig.device, common::DEVICE_STATUS, cleared, 1);
    assert_eq!(read(&mut rig.device, common::DEVICE_STATUS, 1), running);
    // So the features stay frozen and DRIVER_OK again is no activation.
    write(&mut rig.device, common::DRIVER_FEATURE_SELECT, 0, 4);
    write(&mut rig.device, common::DRIVER_FEATURE, 1 << 9, 4);
    assert_eq!(rig.device.acked_features(), VIRTIO_F_VERSION_1);
    write(&mut rig.device, common::DEVICE_STATUS, running, 1);
    assert_eq!(rig.log.lock().unwrap().activations.len(), 1);
    // After a reset the driver starts over and activates once more.
    write(&mut rig.device, common::DEVICE_STATUS, 0, 1);
    assert_eq!(rig.log.lock().unwrap().resets, 1);
    negotiate(&mut rig.device, VIRTIO_F_VERSION_1);
    set_up_queue(&mut rig.device, 0, 0x4000, 0);
    write(&mut rig.device, common::DEVICE_STATUS, running, 1);
    assert_eq!(rig.log.lock().unwrap().activations.len(), 2);
}

#[test]
fn rings_outside_guest_ram_need_a_reset_instead_of_activating() {
    let mut rig = rig();
    negotiate(&mut rig.device, VIRTIO_F_VERSION_1);
    set_up_queue(&mut rig.device, 0, RAM - 0x1000, 0);
    let status = read(&mut rig.device, common::DEVICE_STATUS, 1);
    write(
        &mut rig.device,
        common::DEVICE_STATUS,
        status | u64::from(VIRTIO_CONFIG_S_DRIVER_OK),
        1,
    );
    assert!(rig.log.lock().unwrap().activations.is_empty());
    let status = read(&mut rig.device, common::DEVICE_STATUS, 1) as u8;
    assert_ne!(status & VIRTIO_CONFIG_S_NEEDS_RESET as u8, 0);
}

#[test]
fn vectors_beyond_the_table_read_back_as_no_vector() {
    let mut rig = rig();
    write(&mut rig.device, common::MSIX_CONFIG, 2, 2);
    assert_eq!(read(&mut rig.device, common::MSIX_CONFIG, 2), 2);
    write(&mut rig.device, common::MSIX_CONFIG, 3, 2);
    assert_eq!(
        read(&mut rig.device, common::MSIX_CONFIG, 2),
        u64::from(VIRTIO_MSI_NO_VECTOR)
    );
}

#[test]
fn queue_interrupts_go_through_the_programmed_msix_vector() {
    let mut rig = rig();
    // MSI-X on, function masked while the table is written.
    let control = MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK;
    rig.device.config_write(0x42, &control.to_le_bytes());
    let entry = MSIX_TABLE_OFFSET + 16;
    write(&mut rig.device, entry, 0xfee0_0000, 4);
    write(&mut rig.device, entry + 4, 0, 4);
    write(&mut rig.device, entry + 8, 0x31, 4);
    write(&mut rig.device, entry + 12, 0, 4);
    rig.device
        .config_write(0x42, &MSIX_CONTROL_ENABLE.to_le_bytes());
    let gsis = rig.kvm.irqfd_gsis();
    assert_eq!(gsis.len(), 1, "{gsis:?}");
    negotiate(&mut rig.device, VIRTIO_F_VERSION_1);
    set_up_queue(&mut rig.device, 1, 0x4000, 1);
    let status = read(&mut rig.device, common::DEVICE_STATUS, 1);
    write(
        &mut rig.device,
        common::DEVICE_STATUS,
        status | u64::from(VIRTIO_CONFIG_S_DRIVER_OK),
        1,
    );
    let interrupt = rig.log.lock().unwrap().interrupt.clone().unwrap();
    interrupt.signal_queue(1);
    assert_eq!(rig.kvm.deliveries(), [gsis[0].0]);
    // Queue 0 has no vector: nothing is delivered.
    interrupt.signal_queue(0);
    assert!(rig.kvm.deliveries().is_empty());
    // Masked: the interrupt goes pending and comes at unmask.
    write(&mut rig.device, entry + 12, 1, 4);
    interrupt.signal_queue(1);
    assert!(rig.kvm.deliveries().is_empty());
    assert_eq!(read(&mut rig.device, MSIX_PBA_OFFSET, 8), 0b10);
    write(&mut rig.device, entry + 12, 0, 4);
    assert_eq!(rig.kvm.deliveries().len(), 1);
    // Dropping the device takes its irqfds and routes away.
    drop(rig.device);
    assert!(rig.kvm.irqfd_gsis().is_empty());
}

#[test]
fn a_notify_write_that_reaches_the_vmm_kicks_the_queue() {
    let mut rig = rig();
    let kicks = rig.device.kicks();
    assert_eq!(kicks[1].0, NOTIFY_OFFSET + 4);
    write(&mut rig.device, NOTIFY_OFFSET + 4, 1, 4);
    assert_eq!(kicks[1].1.read().unwrap(), 1);
}

#[test]
fn device_config_and_isr_are_served() {
    let mut rig = rig();
    assert_eq!(
        read(&mut rig.device, DEVICE_CONFIG_OFFSET + 4, 4),
        0x0807_0605
    );
    write(&mut rig.device, DEVICE_CONFIG_OFFSET, 9, 1);
    assert_eq!(read(&mut rig.device, DEVICE_CONFIG_OFFSET, 1), 9);
    assert_eq!(read(&mut rig.device, ISR_OFFSET, 1), 0);
}

#[test]
fn every_width_and_offset_of_the_bar_and_config_space_is_harmless() {
    let mut rig = rig();
    for len in [1usize, 2, 3, 4, 8] {
        for offset in (0..VIRTIO_BAR_SIZE + 8).step_by(1) {
            if offset % 7 != 0
                && offset > 0x40
                && !(MSIX_TABLE_OFFSET..MSIX_TABLE_OFFSET + 0x40).contains(&offset)
            {
                continue;
            }
            let mut data = vec![0u8; len];
            rig.device.bar_read(offset, &mut data);
            rig.device.bar_write(offset, &vec![0xff; len]);
        }
        for offset in 0..0x1002u16 {
            let mut data = vec![0u8; len];
            rig.device.config_read(offset, &mut data);
            rig.device.config_write(offset, &vec![0xff; len]);
        }
    }
}
