//! The virtio-pci modern transport (virtio 1.2 section 4.1), without the
//! legacy interface: a PCI function 1af4:(1040 + device ID), revision 1,
//! whose configuration space carries an MSI-X capability and the virtio
//! vendor capabilities, all pointing into one 32 KiB memory BAR:
//!
//! | BAR 0 offset | structure                   | served by                        |
//! |--------------|-----------------------------|----------------------------------|
//! | 0x0000       | common configuration (0x38) | [`VirtioPciDevice::bar_write`]   |
//! | 0x1000       | ISR status (1 byte)         | read clears                      |
//! | 0x2000       | device configuration        | the [`VirtioDevice`]             |
//! | 0x3000       | notify: queue N at N * 4    | KVM ioeventfds ([`Self::kicks`]) |
//! | 0x4000       | MSI-X table                 | [`MsixTable`]                    |
//! | 0x5000       | MSI-X PBA                   | [`MsixTable`]                    |
//!
//! The BAR's address is planned and fixed (a guest cannot move it), so the
//! VMM registers one ioeventfd per queue at `BAR + 0x3000 + N * 4` once; a
//! driver's notification then signals the queue's kick eventfd inside KVM
//! and never reaches the VMM (a notify write that does reach
//! [`Self::bar_write`], e.g. of another width, is taken as a kick too).
//!
//! Interrupts are MSI-X only (no INTx pin: every virtio 1.x driver uses
//! MSI-X when it is there), one vector per queue plus one for configuration
//! changes, each an irqfd through the VM's [`InterruptRouter`] as for
//! passed-through devices ([`crate::interrupts`]).
//!
//! # The driver's state machine, checked
//!
//! - FEATURES_OK is kept only when the accepted features are a subset of
//!   the offered ones and include VIRTIO_F_VERSION_1 (else the bit reads
//!   back clear and the driver gives up, as the spec says).
//! - DRIVER_OK activates the device with every enabled queue, after
//!   checking each queue's size and rings against guest RAM; a queue that
//!   fails sets DEVICE_NEEDS_RESET instead.
//! - Queue registers change only before DRIVER_OK; a status write of 0
//!   resets the device (the worker drops the queues first).
//! - FEATURES_OK and DRIVER_OK, once set, stay set until that reset: a
//!   write that would clear them keeps them (the device is activated at
//!   most once between resets).
//! - Accesses of odd widths or offsets read 0 and are ignored.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    ActivatedQueue, Activation, DeviceCounters, VirtioDevice, VirtioInterrupt, TRANSPORT_FEATURES,
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::interrupts::{signal, sync_vector, InterruptError, InterruptRouter, IrqfdVector};
use crate::pci::bar::{BarError, BarKind, EmulatedBars, PlannedBar};
use crate::pci::config::{ConfigSpace, Type0Identity, STATUS_CAPABILITIES_LIST, STATUS_OFFSET};
use crate::pci::endpoint::EmulatedEndpoint;
use crate::pci::msix::{MsixCapability, MsixTable, MSIX_CAPABILITY_SIZE};
use crate::pci::{access_is_valid, ConfigEvent, PciConfigAccess};

/// The virtio vendor ID.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern device IDs are this plus the virtio device ID.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// The BAR every structure lives in.
pub const VIRTIO_BAR: u8 = 0;
/// Its size.
pub const VIRTIO_BAR_SIZE: u64 = 0x8000;
/// Common configuration offset in the BAR.
pub const COMMON_OFFSET: u64 = 0x0000;
/// Common configuration length (virtio 1.2 without the optional
/// `queue_notify_data` and `queue_reset`).
pub const COMMON_LENGTH: u64 = 0x38;
/// ISR status offset.
pub const ISR_OFFSET: u64 = 0x1000;
/// Device configuration offset.
pub const DEVICE_CONFIG_OFFSET: u64 = 0x2000;
/// Device configuration window length.
pub const DEVICE_CONFIG_LENGTH: u64 = 0x1000;
/// Notify area offset.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notify addresses.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Notify area length (up to 1024 queues).
pub const NOTIFY_LENGTH: u64 = 0x1000;
/// MSI-X table offset.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// MSI-X PBA offset.
pub const MSIX_PBA_OFFSET: u64 = 0x5000;
/// "No vector" in `msix_config` and `queue_msix_vector`.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// Capability `cfg_type`s (virtio 1.2 4.1.4).
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
/// PCI capability ID of vendor-specific capabilities.
const CAP_ID_VENDOR: u8 = 0x09;
/// PCI capability ID of MSI-X.
const CAP_ID_MSIX: u8 = 0x11;
/// Where the capability list starts.
const MSIX_CAP_OFFSET: u16 = 0x40;
const COMMON_CAP_OFFSET: u16 = 0x50;
const ISR_CAP_OFFSET: u16 = 0x60;
const DEVICE_CAP_OFFSET: u16 = 0x70;
const NOTIFY_CAP_OFFSET: u16 = 0x80;

/// ISR bit for a used-buffer interrupt (unused with MSI-X, kept for reads).
const ISR_QUEUE: u8 = 1;
/// ISR bit for a configuration change.
const ISR_CONFIG: u8 = 2;

/// Common configuration register offsets.
mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const MSIX_CONFIG: u64 = 0x10;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
}

/// Why a virtio-pci function cannot be built (host side; guests cause none).
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    /// The planned BAR is not a valid BAR.
    #[error("virtio BAR: {0}")]
    Bar(#[from] BarError),
    /// An eventfd could not be created.
    #[error("cannot create a virtio eventfd: {0}; raise the open file limit (ulimit -n)")]
    EventFd(std::io::Error),
    /// Interrupt set-up failed.
    #[error(transparent)]
    Interrupt(#[from] InterruptError),
    /// The device has more queues than the notify area holds.
    #[error("a virtio device with {0} queues is more than the transport's 1024")]
    TooManyQueues(usize),
}

/// One queue's transport state.
struct QueueSlot {
    queue: Queue,
    vector: u16,
    kick: Arc<EventFd>,
}

/// MSI-X state: the emulated table and one irqfd vector per entry.
struct Msix {
    capability: MsixCapability,
    table: MsixTable,
    vectors: Vec<IrqfdVector>,
    /// The same eventfds as `vectors` (duplicated descriptors), for the
    /// worker to signal.
    signals: Arc<Vec<EventFd>>,
    router: Arc<InterruptRouter>,
    router_id: u32,
}

impl Msix {
    fn sync(&mut self, vector: u16) {
        let want = (self.table.is_enabled() && !self.table.is_vector_masked(vector))
            .then(|| self.table.entry(vector).map(|entry| entry.message))
            .flatten();
        if let Some(v) = self.vectors.get_mut(usize::from(vector)) {
            sync_vector(&self.router, self.router_id, vector, v, want);
        }
    }

    fn sync_all(&mut self) {
        for vector in 0..self.table.vector_count() {
            self.sync(vector);
        }
    }

    /// Moves what masked vectors received into the PBA.
    fn drain_masked(&mut self) {
        for (i, v) in self.vectors.iter().enumerate() {
            if v.irqfd.is_none() && v.fd.read().is_ok_and(|count| count > 0) {
                self.table.trigger(i as u16);
            }
        }
    }

    fn deliver(&self, vector: u16) {
        if let Some(fd) = self.signals.get(usize::from(vector)) {
            signal(fd);
        }
    }

    fn shutdown(&mut self) {
        for (i, v) in self.vectors.iter_mut().enumerate() {
            sync_vector(&self.router, self.router_id, i as u16, v, None);
            if v.routed.take().is_some() {
                self.router.remove(self.router_id, i as u16);
            }
        }
    }
}

/// The interrupt side handed to a device at activation: which eventfd each
/// queue and the configuration signal (fixed while the device runs).
struct QueueVectors {
    signals: Arc<Vec<EventFd>>,
    queue_vectors: Vec<u16>,
    config_vector: u16,
    isr: Arc<std::sync::atomic::AtomicU8>,
}

impl QueueVectors {
    fn raise(&self, vector: u16, isr: u8) {
        self.isr.fetch_or(isr, std::sync::atomic::Ordering::SeqCst);
        if let Some(fd) = self.signals.get(usize::from(vector)) {
            signal(fd);
        }
    }
}

impl VirtioInterrupt for QueueVectors {
    fn signal_queue(&self, queue: u16) {
        if let Some(&vector) = self.queue_vectors.get(usize::from(queue)) {
            self.raise(vector, ISR_QUEUE);
        }
    }

    fn signal_config(&self) {
        self.raise(self.config_vector, ISR_CONFIG);
    }
}

/// A virtio device on PCI (see the module docs).
pub struct VirtioPciDevice {
    name: String,
    endpoint: EmulatedEndpoint,
    device: Box<dyn VirtioDevice>,
    memory: GuestMemoryMmap,
    msix: Msix,
    queues: Vec<QueueSlot>,
    offered: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    acked: u64,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    config_vector: u16,
    isr: Arc<std::sync::atomic::AtomicU8>,
    activated: bool,
}

impl std::fmt::Debug for VirtioPciDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciDevice")
            .field("name", &self.name)
            .field("status", &self.status)
            .field("activated", &self.activated)
            .finish_non_exhaustive()
    }
}

fn eventfd() -> Result<EventFd, VirtioPciError> {
    EventFd::new(EFD_NONBLOCK).map_err(VirtioPciError::EventFd)
}

/// Writes a vendor capability (`cfg_type`, in BAR 0 at `offset` for
/// `length` bytes) at `at`, linked to `next`.
fn vendor_cap(
    config: &mut ConfigSpace,
    at: u16,
    next: u16,
    cfg_type: u8,
    offset: u64,
    length: u64,
) {
    let len: u8 = if cfg_type == CAP_NOTIFY { 20 } else { 16 };
    config.set_bytes(
        at,
        &[
            CAP_ID_VENDOR,
            next as u8,
            len,
            cfg_type,
            VIRTIO_BAR,
            0,
            0,
            0,
        ],
    );
    config.set_u32(at + 8, offset as u32);
    config.set_u32(at + 12, length as u32);
    if cfg_type == CAP_NOTIFY {
        config.set_u32(at + 16, NOTIFY_OFF_MULTIPLIER);
    }
}

impl VirtioPciDevice {
    /// The function for `device`, BAR 0 planned at `bar_gpa` (32-bit
    /// memory), interrupts through `router` as device `router_id`, queues
    /// over `memory`.
    pub fn new(
        name: &str,
        device: Box<dyn VirtioDevice>,
        bar_gpa: u64,
        memory: GuestMemoryMmap,
        router: Arc<InterruptRouter>,
        router_id: u32,
    ) -> Result<Self, VirtioPciError> {
        let max_sizes = device.queue_max_sizes().to_vec();
        if max_sizes.len() > (NOTIFY_LENGTH / u64::from(NOTIFY_OFF_MULTIPLIER)) as usize {
            return Err(VirtioPciError::TooManyQueues(max_sizes.len()));
        }
        let kind = device.device_type();
        let identity = Type0Identity {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE + kind.id(),
            class_code: kind.pci_class_code(),
            revision_id: 1,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: 0x1100,
        };
        let mut config = ConfigSpace::type0(&identity);
        let vector_count = max_sizes.len() as u16 + 1;
        // MSI-X capability: table and PBA in BAR 0.
        config.set_bytes(MSIX_CAP_OFFSET, &[CAP_ID_MSIX, COMMON_CAP_OFFSET as u8]);
        config.set_u16(MSIX_CAP_OFFSET + 2, vector_count - 1);
        config.set_u32(
            MSIX_CAP_OFFSET + 4,
            MSIX_TABLE_OFFSET as u32 | u32::from(VIRTIO_BAR),
        );
        config.set_u32(
            MSIX_CAP_OFFSET + 8,
            MSIX_PBA_OFFSET as u32 | u32::from(VIRTIO_BAR),
        );
        vendor_cap(
            &mut config,
            COMMON_CAP_OFFSET,
            ISR_CAP_OFFSET,
            CAP_COMMON,
            COMMON_OFFSET,
            COMMON_LENGTH,
        );
        vendor_cap(
            &mut config,
            ISR_CAP_OFFSET,
            DEVICE_CAP_OFFSET,
            CAP_ISR,
            ISR_OFFSET,
            1,
        );
        vendor_cap(
            &mut config,
            DEVICE_CAP_OFFSET,
            NOTIFY_CAP_OFFSET,
            CAP_DEVICE,
            DEVICE_CONFIG_OFFSET,
            DEVICE_CONFIG_LENGTH,
        );
        vendor_cap(
            &mut config,
            NOTIFY_CAP_OFFSET,
            0,
            CAP_NOTIFY,
            NOTIFY_OFFSET,
            u64::from(NOTIFY_OFF_MULTIPLIER) * max_sizes.len().max(1) as u64,
        );
        config.set_capabilities_pointer(MSIX_CAP_OFFSET as u8);
        config.set_u16(STATUS_OFFSET, STATUS_CAPABILITIES_LIST);
        let capability = MsixCapability::parse(config.as_bytes(), MSIX_CAP_OFFSET)
            .expect("the MSI-X capability barge writes is valid");
        let table = MsixTable::new(vector_count).expect("vector count is at most 1025");
        let mut vectors = Vec::new();
        let mut signals = Vec::new();
        for _ in 0..vector_count {
            let fd = eventfd()?;
            signals.push(fd.try_clone().map_err(VirtioPciError::EventFd)?);
            vectors.push(IrqfdVector {
                fd,
                routed: None,
                irqfd: None,
            });
        }
        let bars = EmulatedBars::new(&[PlannedBar {
            index: VIRTIO_BAR,
            kind: BarKind::Memory32 {
                prefetchable: false,
            },
            size: VIRTIO_BAR_SIZE,
            gpa: bar_gpa,
        }])?;
        let mut queues = Vec::new();
        for max in max_sizes {
            queues.push(QueueSlot {
                queue: Queue::new(max)
                    .unwrap_or_else(|_| Queue::new(256).expect("256 is a valid queue size")),
                vector: VIRTIO_MSI_NO_VECTOR,
                kick: Arc::new(eventfd()?),
            });
        }
        let offered = device.features() | TRANSPORT_FEATURES;
        Ok(Self {
            name: name.to_string(),
            endpoint: EmulatedEndpoint::new(config, bars),
            device,
            memory,
            msix: Msix {
                capability,
                table,
                vectors,
                signals: Arc::new(signals),
                router,
                router_id,
            },
            queues,
            offered,
            device_feature_select: 0,
            driver_feature_select: 0,
            acked: 0,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            config_vector: VIRTIO_MSI_NO_VECTOR,
            isr: Arc::new(std::sync::atomic::AtomicU8::new(0)),
            activated: false,
        })
    }

    /// Each queue's kick eventfd with its notify offset in the BAR, for the
    /// VMM's ioeventfds.
    pub fn kicks(&self) -> Vec<(u64, Arc<EventFd>)> {
        self.queues
            .iter()
            .enumerate()
            .map(|(i, slot)| {
                (
                    NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_OFF_MULTIPLIER),
                    Arc::clone(&slot.kick),
                )
            })
            .collect()
    }

    /// The device's counters.
    pub fn counters(&self) -> Arc<DeviceCounters> {
        self.device.counters()
    }

    /// The device status the driver set.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// The emulated MSI-X table.
    pub fn msix_table(&self) -> &MsixTable {
        &self.msix.table
    }

    /// A guest read inside BAR 0.
    pub fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match offset {
            o if o < COMMON_OFFSET + COMMON_LENGTH => self.common_read(o, data),
            ISR_OFFSET if !data.is_empty() => {
                data[0] = self.isr.swap(0, std::sync::atomic::Ordering::SeqCst);
            }
            o if (DEVICE_CONFIG_OFFSET..DEVICE_CONFIG_OFFSET + DEVICE_CONFIG_LENGTH)
                .contains(&o) =>
            {
                self.device.read_config(o - DEVICE_CONFIG_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix.table.table_read(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..VIRTIO_BAR_SIZE).contains(&o) => {
                self.msix.drain_masked();
                self.msix.table.pba_read(o - MSIX_PBA_OFFSET, data)
            }
            _ => {}
        }
    }

    /// A guest write inside BAR 0.
    pub fn bar_write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_LENGTH => self.common_write(o, data),
            o if (DEVICE_CONFIG_OFFSET..DEVICE_CONFIG_OFFSET + DEVICE_CONFIG_LENGTH)
                .contains(&o) =>
            {
                self.device.write_config(o - DEVICE_CONFIG_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_LENGTH).contains(&o) => {
                // A notification that did not match the ioeventfd (another
                // width): kick the queue by hand.
                let index = (o - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER);
                if let Some(slot) = self.queues.get(index as usize) {
                    signal(&slot.kick);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix_table_write(o - MSIX_TABLE_OFFSET, data)
            }
            _ => {}
        }
    }

    fn msix_table_write(&mut self, offset: u64, data: &[u8]) {
        use crate::pci::msix::MsixEvent;
        let Some(event) = self.msix.table.table_write(offset, data) else {
            return;
        };
        let (vector, deliver) = match event {
            MsixEvent::VectorChanged { vector, .. } | MsixEvent::VectorMasked { vector, .. } => {
                (vector, None)
            }
            MsixEvent::VectorUnmasked {
                vector, deliver, ..
            } => (vector, deliver),
        };
        self.msix.sync(vector);
        if deliver.is_some() {
            self.msix.deliver(vector);
        }
    }

    fn queue(&self) -> Option<&QueueSlot> {
        self.queues.get(usize::from(self.queue_select))
    }

    fn common_read(&mut self, offset: u64, data: &mut [u8]) {
        use common::*;
        let value: u64 = match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => u64::from(self.device_feature_select),
            (DEVICE_FEATURE, 4) => match self.device_feature_select {
                0 => self.offered & 0xffff_ffff,
                1 => self.offered >> 32,
                _ => 0,
            },
            (DRIVER_FEATURE_SELECT, 4) => u64::from(self.driver_feature_select),
            (DRIVER_FEATURE, 4) => match self.driver_feature_select {
                0 => self.acked & 0xffff_ffff,
                1 => self.acked >> 32,
                _ => 0,
            },
            (MSIX_CONFIG, 2) => u64::from(self.config_vector),
            (NUM_QUEUES, 2) => self.queues.len() as u64,
            (DEVICE_STATUS, 1) => u64::from(self.status),
            (CONFIG_GENERATION, 1) => u64::from(self.config_generation),
            (QUEUE_SELECT, 2) => u64::from(self.queue_select),
            (QUEUE_SIZE, 2) => self.queue().map_or(0, |q| u64::from(q.queue.size())),
            (QUEUE_MSIX_VECTOR, 2) => self
                .queue()
                .map_or(u64::from(VIRTIO_MSI_NO_VECTOR), |q| u64::from(q.vector)),
            (QUEUE_ENABLE, 2) => self.queue().map_or(0, |q| u64::from(q.queue.ready())),
            (QUEUE_NOTIFY_OFF, 2) if self.queue().is_some() => u64::from(self.queue_select),
            (o @ (QUEUE_DESC | QUEUE_DRIVER | QUEUE_DEVICE), 4 | 8)
            | (o @ 0x24 | o @ 0x2c | o @ 0x34, 4) => {
                let base = o & !7;
                let address = self.queue().map_or(0, |q| match base {
                    QUEUE_DESC => q.queue.desc_table(),
                    QUEUE_DRIVER => q.queue.avail_ring(),
                    _ => q.queue.used_ring(),
                });
                if o == base {
                    address
                } else {
                    address >> 32
                }
            }
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let len = data.len().min(8);
        data[..len].copy_from_slice(&bytes[..len]);
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        use common::*;
        let mut bytes = [0u8; 8];
        let len = data.len().min(8);
        bytes[..len].copy_from_slice(&data[..len]);
        let value = u64::from_le_bytes(bytes);
        let live = self.status & VIRTIO_CONFIG_S_DRIVER_OK as u8 != 0;
        match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = value as u32,
            (DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = value as u32,
            (DRIVER_FEATURE, 4) if self.status & VIRTIO_CONFIG_S_FEATURES_OK as u8 == 0 => {
                match self.driver_feature_select {
                    0 => self.acked = (self.acked & !0xffff_ffff) | value,
                    1 => self.acked = (self.acked & 0xffff_ffff) | (value << 32),
                    _ => {}
                }
            }
            (MSIX_CONFIG, 2) => self.config_vector = self.checked_vector(value as u16),
            (DEVICE_STATUS, 1) => self.status_write(value as u8),
            (QUEUE_SELECT, 2) => self.queue_select = value as u16,
            _ if live => {
                crate::guest_warn!(
                    "{}: queue register write at {offset:#x} after DRIVER_OK ignored",
                    self.name
                );
            }
            (QUEUE_SIZE, 2) => {
                if let Some(slot) = self.queues.get_mut(usize::from(self.queue_select)) {
                    if slot.queue.try_set_size(value as u16).is_err() {
                        crate::guest_warn!(
                            "{}: queue size {value} is not a power of two up to {}; ignored",
                            self.name,
                            slot.queue.max_size()
                        );
                    }
                }
            }
            (QUEUE_MSIX_VECTOR, 2) => {
                let vector = self.checked_vector(value as u16);
                if let Some(slot) = self.queues.get_mut(usize::from(self.queue_select)) {
                    slot.vector = vector;
                }
            }
            (QUEUE_ENABLE, 2) => {
                if let Some(slot) = self.queues.get_mut(usize::from(self.queue_select)) {
                    // Writing 0 is not allowed by the spec; only 1 enables.
                    if value == 1 {
                        slot.queue.set_ready(true);
                    }
                }
            }
            (o @ (QUEUE_DESC | QUEUE_DRIVER | QUEUE_DEVICE), 4 | 8)
            | (o @ 0x24 | o @ 0x2c | o @ 0x34, 4) => {
                let Some(slot) = self.queues.get_mut(usize::from(self.queue_select)) else {
                    return;
                };
                let (low, high) = if data.len() == 8 {
                    (Some(value as u32), Some((value >> 32) as u32))
                } else if o & 7 == 0 {
                    (Some(value as u32), None)
                } else {
                    (None, Some(value as u32))
                };
                match o & !7 {
                    QUEUE_DESC => slot.queue.set_desc_table_address(low, high),
                    QUEUE_DRIVER => slot.queue.set_avail_ring_address(low, high),
                    _ => slot.queue.set_used_ring_address(low, high),
                }
            }
            _ => {}
        }
    }

    /// `vector` when the table has it, else NO_VECTOR (which the driver
    /// reads back as "could not allocate").
    fn checked_vector(&self, vector: u16) -> u16 {
        if vector < self.msix.table.vector_count() {
            vector
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    fn status_write(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // A driver must not clear status bits (virtio 1.2 2.1.2); only a
        // reset does. FEATURES_OK and DRIVER_OK stay set, so the accepted
        // features and the queues cannot change under a running device and
        // a second DRIVER_OK cannot activate it twice.
        let sticky = (VIRTIO_CONFIG_S_NEEDS_RESET
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK) as u8;
        if old & sticky & !value & !(VIRTIO_CONFIG_S_NEEDS_RESET as u8) != 0 {
            crate::guest_warn!(
                "{}: status write {value:#x} clears bits of {old:#x} without a reset; kept",
                self.name
            );
        }
        let mut new = value | (old & sticky);
        let features_ok = VIRTIO_CONFIG_S_FEATURES_OK as u8;
        if new & features_ok != 0 && old & features_ok == 0 {
            let unoffered = self.acked & !self.offered;
            if unoffered != 0 || self.acked & VIRTIO_F_VERSION_1 == 0 {
                crate::guest_warn!(
                    "{}: the driver accepted features {:#x} (offered {:#x}, VERSION_1 required); \
                     FEATURES_OK refused",
                    self.name,
                    self.acked,
                    self.offered
                );
                new &= !features_ok;
            }
        }
        let driver_ok = VIRTIO_CONFIG_S_DRIVER_OK as u8;
        self.status = new;
        if new & driver_ok != 0
            && old & driver_ok == 0
            && new & features_ok != 0
            && new & VIRTIO_CONFIG_S_FAILED as u8 == 0
        {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let mut queues = Vec::new();
        for (index, slot) in self.queues.iter().enumerate() {
            if !slot.queue.ready() {
                continue;
            }
            if !slot.queue.is_valid(&self.memory) {
                crate::guest_warn!(
                    "{}: queue {index} (size {}, rings at {:#x} {:#x} {:#x}) does not fit guest \
                     RAM; the device needs a reset",
                    self.name,
                    slot.queue.size(),
                    slot.queue.desc_table(),
                    slot.queue.avail_ring(),
                    slot.queue.used_ring()
                );
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET as u8;
                return;
            }
            let Ok(mut queue) = Queue::try_from(slot.queue.state()) else {
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET as u8;
                return;
            };
            queue.set_event_idx(self.acked & VIRTIO_RING_F_EVENT_IDX != 0);
            queues.push(ActivatedQueue {
                index: index as u16,
                queue,
                kick: Arc::clone(&slot.kick),
            });
        }
        let interrupt = Arc::new(QueueVectors {
            signals: Arc::clone(&self.msix.signals),
            queue_vectors: self.queues.iter().map(|q| q.vector).collect(),
            config_vector: self.config_vector,
            isr: Arc::clone(&self.isr),
        });
        let activation = Activation {
            memory: self.memory.clone(),
            features: self.acked,
            queues,
            interrupt,
        };
        match self.device.activate(activation) {
            Ok(()) => {
                self.activated = true;
                log::info!(
                    "{}: activated (features {:#x}, {} queues)",
                    self.name,
                    self.acked,
                    self.queues.iter().filter(|q| q.queue.ready()).count()
                );
            }
            Err(error) => {
                log::warn!("{}: cannot activate: {error}", self.name);
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET as u8;
            }
        }
    }

    /// Device reset (status 0, or a PCI-level reset by the VMM).
    pub fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        for slot in &mut self.queues {
            slot.queue.reset();
            slot.vector = VIRTIO_MSI_NO_VECTOR;
        }
        self.status = 0;
        self.acked = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        self.config_vector = VIRTIO_MSI_NO_VECTOR;
        self.isr.store(0, std::sync::atomic::Ordering::SeqCst);
    }

    fn msix_control(&self) -> u16 {
        self.msix.table.message_control()
    }
}

impl PciConfigAccess for VirtioPciDevice {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.endpoint.config_read(offset, data);
        if access_is_valid(offset, data.len(), crate::pci::config::CONFIG_SPACE_SIZE) {
            let control = self.msix_control();
            self.msix.capability.overlay(offset, data, control);
        }
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<ConfigEvent> {
        if !access_is_valid(offset, data.len(), crate::pci::config::CONFIG_SPACE_SIZE) {
            return None;
        }
        let cap_end = MSIX_CAP_OFFSET + MSIX_CAPABILITY_SIZE;
        if offset < cap_end && offset + data.len() as u16 > MSIX_CAP_OFFSET {
            let current = self.msix_control();
            if let Some(control) = self
                .msix
                .capability
                .message_control_write(offset, data, current)
            {
                if let Some(change) = self.msix.table.control_write(control) {
                    self.msix.sync_all();
                    for (vector, _) in change.deliver {
                        self.msix.deliver(vector);
                    }
                }
            }
            // The rest of the capability is read-only.
            return None;
        }
        self.endpoint.config_write(offset, data)
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.msix.shutdown();
    }
}

#[cfg(test)]
mod tests;
