//! virtio 1.x devices (no legacy interface): the PCI transport
//! ([`pci::VirtioPciDevice`]: common, notify, ISR and device configuration
//! in one memory BAR, MSI-X), the worker thread every device does its I/O
//! on ([`worker`]), and the devices (`blk`, `net`).
//!
//! # How the pieces meet
//!
//! A device is two halves:
//! - the **model** ([`VirtioDevice`]), which the transport drives from vCPU
//!   threads: its identity, the features it offers, its configuration
//!   space, and the two transitions the driver causes (DRIVER_OK activates,
//!   a status write of 0 resets);
//! - a [`worker::QueueHandler`] that processes its queues, on a thread of its
//!   own ([`worker::DeviceWorker`]), started when the device is created
//!   (before the guest runs, so that vCPU threads never create threads).
//!   Activation hands the worker the queues ([`Activation`]); a kick is an
//!   eventfd the VMM registers as a KVM ioeventfd on the queue's notify
//!   address, so a guest's notification wakes the worker without an exit to
//!   the VMM; a used buffer is signalled through [`VirtioInterrupt`], which
//!   the transport implements with one MSI-X irqfd per vector.
//!
//! Queues and descriptor chains are rust-vmm's `virtio-queue` over
//! vm-memory's `GuestMemoryMmap`; no ring code is written here.
//!
//! # Guest-controlled input
//!
//! Everything a driver writes (status, features, queue addresses and sizes,
//! descriptors) is checked before use and never panics: a queue whose rings
//! do not fit guest RAM is not activated (the device then sets
//! DEVICE_NEEDS_RESET), a malformed descriptor chain is completed with an
//! error status or dropped, and what is logged about it is rate-limited
//! ([`crate::guest_warn!`]).

pub mod blk;
pub mod net;
pub mod pci;
pub mod worker;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};

/// VIRTIO_F_VERSION_1: the only interface barge offers; a driver that does
/// not accept it is refused at FEATURES_OK.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// VIRTIO_RING_F_EVENT_IDX (used and avail event suppression), which
/// `virtio-queue` implements.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
/// VIRTIO_RING_F_INDIRECT_DESC, which `virtio-queue`'s chains follow.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 =
    1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// The transport features every barge device offers on top of its own.
pub const TRANSPORT_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC;

/// virtio device IDs barge implements (virtio 1.2 section 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceType {
    /// Network card (ID 1).
    Net,
    /// Block device (ID 2).
    Block,
}

impl DeviceType {
    /// The virtio device ID.
    pub fn id(self) -> u16 {
        match self {
            DeviceType::Net => 1,
            DeviceType::Block => 2,
        }
    }

    /// The PCI class code (class, subclass, programming interface) a
    /// virtio-pci function of this type reports.
    pub fn pci_class_code(self) -> u32 {
        match self {
            // Network controller, Ethernet.
            DeviceType::Net => 0x02_00_00,
            // Mass storage controller, other (as QEMU's virtio-blk-pci).
            DeviceType::Block => 0x01_80_00,
        }
    }

    /// The report's `kind`.
    pub fn kind(self) -> &'static str {
        match self {
            DeviceType::Net => "virtio-net",
            DeviceType::Block => "virtio-blk",
        }
    }
}

/// Raises the interrupt of a queue or of a configuration change. The
/// transport implements it (MSI-X irqfds); tests count calls.
pub trait VirtioInterrupt: Send + Sync {
    /// The device put buffers in the used ring of queue `queue` (and the
    /// ring's event suppression asks for an interrupt).
    fn signal_queue(&self, queue: u16);
    /// The device's configuration space changed.
    fn signal_config(&self);
}

/// One queue the driver enabled, handed to the worker at DRIVER_OK.
#[derive(Debug)]
pub struct ActivatedQueue {
    /// Its index in the device.
    pub index: u16,
    /// The queue, with the addresses, size and event-index setting the
    /// driver gave; checked with `is_valid` against guest RAM.
    pub queue: Queue,
    /// The eventfd a guest notification of this queue signals (a KVM
    /// ioeventfd on its notify address).
    pub kick: Arc<EventFd>,
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    /// Guest RAM (a cheap clone: regions are shared).
    pub memory: GuestMemoryMmap,
    /// The features the driver accepted (a subset of the offered ones,
    /// always with [`VIRTIO_F_VERSION_1`]).
    pub features: u64,
    /// The queues the driver enabled, in index order.
    pub queues: Vec<ActivatedQueue>,
    /// Interrupt delivery.
    pub interrupt: Arc<dyn VirtioInterrupt>,
}

impl Activation {
    /// `Ok` when the driver enabled every queue in `needed`; else the first
    /// missing one.
    pub fn require_queues(&self, needed: &[u16]) -> Result<(), ActivateError> {
        match needed
            .iter()
            .find(|index| !self.queues.iter().any(|queue| queue.index == **index))
        {
            Some(missing) => Err(ActivateError::QueueMissing(*missing)),
            None => Ok(()),
        }
    }
}

impl fmt::Debug for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Activation")
            .field("features", &format_args!("{:#x}", self.features))
            .field("queues", &self.queues)
            .finish_non_exhaustive()
    }
}

/// Why a device could not be activated (the transport sets
/// DEVICE_NEEDS_RESET and logs it).
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The device's worker thread is gone.
    #[error("the device's worker thread has exited; the device cannot run again")]
    WorkerGone,
    /// The driver enabled no queue the device needs.
    #[error("queue {0} was not enabled by the driver")]
    QueueMissing(u16),
}

/// The device side the transport drives (see the module docs).
pub trait VirtioDevice: Send {
    /// The virtio device type.
    fn device_type(&self) -> DeviceType;

    /// The maximum size of each queue (its length is the number of queues).
    fn queue_max_sizes(&self) -> &[u16];

    /// The device-specific features it offers (the transport adds
    /// [`TRANSPORT_FEATURES`]).
    fn features(&self) -> u64;

    /// A driver read of the device configuration at `offset`. Bytes beyond
    /// the configuration read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// A driver write of the device configuration at `offset`. Read-only
    /// fields ignore it.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }

    /// DRIVER_OK: start serving `activation`'s queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;

    /// The driver reset the device: stop using the queues and guest memory
    /// (waits for the worker to drop them) and return to the state before
    /// activation. The backend (image, tap) stays open.
    fn reset(&mut self);

    /// What the device has served, for the report.
    fn counters(&self) -> Arc<DeviceCounters>;
}

/// What a device served, updated by its worker and read for the report:
/// requests (block requests, network packets) and bytes each way.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    /// Requests completed (block: every request; net: packets).
    pub requests: AtomicU64,
    /// Requests completed with an error status (block) or dropped (net).
    pub errors: AtomicU64,
    /// Bytes moved from guest memory to the backend (block writes, net TX).
    pub bytes_from_guest: AtomicU64,
    /// Bytes moved from the backend into guest memory (block reads, net RX).
    pub bytes_to_guest: AtomicU64,
}

/// A snapshot of [`DeviceCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// See [`DeviceCounters::requests`].
    pub requests: u64,
    /// See [`DeviceCounters::errors`].
    pub errors: u64,
    /// See [`DeviceCounters::bytes_from_guest`].
    pub bytes_from_guest: u64,
    /// See [`DeviceCounters::bytes_to_guest`].
    pub bytes_to_guest: u64,
}

impl DeviceCounters {
    /// Counts one completed request that moved `from_guest` and `to_guest`
    /// bytes.
    pub fn record(&self, from_guest: u64, to_guest: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.bytes_from_guest
            .fetch_add(from_guest, Ordering::Relaxed);
        self.bytes_to_guest.fetch_add(to_guest, Ordering::Relaxed);
    }

    /// Counts one failed (or dropped) request.
    pub fn record_error(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    /// The current values.
    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            bytes_from_guest: self.bytes_from_guest.load(Ordering::Relaxed),
            bytes_to_guest: self.bytes_to_guest.load(Ordering::Relaxed),
        }
    }
}

/// Copies the bytes of `config` (a device's configuration structure) at
/// `offset` into `data`; bytes past its end read 0. For
/// [`VirtioDevice::read_config`].
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset)
            .ok()
            .and_then(|start| start.checked_add(i))
            .and_then(|at| config.get(at))
            .copied()
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_past_the_end_are_zero() {
        let config = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 4];
        read_config_bytes(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        read_config_bytes(&config, u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }

    #[test]
    fn counters_count_requests_errors_and_bytes() {
        let counters = DeviceCounters::default();
        counters.record(512, 0);
        counters.record(0, 4096);
        counters.record_error();
        assert_eq!(
            counters.snapshot(),
            CounterSnapshot {
                requests: 3,
                errors: 1,
                bytes_from_guest: 512,
                bytes_to_guest: 4096
            }
        );
    }

    #[test]
    fn device_types_have_their_virtio_ids() {
        assert_eq!(DeviceType::Net.id(), 1);
        assert_eq!(DeviceType::Block.id(), 2);
        assert_eq!(DeviceType::Block.kind(), "virtio-blk");
    }
}
