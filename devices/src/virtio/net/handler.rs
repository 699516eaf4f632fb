//! RX and TX of a virtio-net device, on its worker thread, over any
//! [`PacketBackend`] (the tap; a socket in tests).
//!
//! # TX (queue 1)
//!
//! Every available chain is gathered into a bounce buffer (its readable
//! descriptors: the 12-byte virtio-net header, then the frame), the frame
//! is written to the backend without the header (no offload is offered, so
//! the header carries nothing), and the chain is completed with length 0.
//! When the backend cannot take a frame now (`EAGAIN`), that one frame
//! stays in the bounce buffer, its chain unused, and the backend is
//! watched for `EPOLLOUT` until it can.
//!
//! # RX (queue 0)
//!
//! The backend is read only into a buffer the guest has made available:
//! the handler first takes one chain off the RX queue, then reads one frame
//! and writes the header and the frame into the chain. When the queue has
//! no chain, the backend is no longer watched for `EPOLLIN` until the guest
//! kicks the RX queue, so frames stay in the backend's own queue (bounded
//! and dropping, for a tap) and barge holds none but the one it is copying.
//! `VIRTIO_NET_F_MRG_RXBUF` is not offered (see the module docs of
//! [`super`]), so a frame goes into one chain; a frame longer than the
//! chain is dropped (counted) and the chain is kept for the next one:
//! holding the frame instead would stop RX for good when the driver's
//! buffers are all that small.
//!
//! Both queues re-enable notifications (`enable_notification`) before they
//! stop, and continue when buffers came in meanwhile, so no kick is lost.
//!
//! # Malformed chains
//!
//! A chain whose descriptors leave guest RAM, point the wrong way (a
//! writable descriptor on TX, a readable one on RX), loop, run past the
//! descriptor table, have more than [`MAX_CHAIN_DESCRIPTORS`] descriptors
//! or fewer bytes than the header (zero-length chains included), or a TX
//! chain longer than the largest frame, is completed with length 0,
//! counted as an error and logged (rate-limited); nothing of it reaches the
//! backend.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use virtio_bindings::virtio_net::virtio_net_hdr_v1;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::{RX_QUEUE, TX_QUEUE, VIRTIO_NET_HDR_LEN};
use crate::virtio::worker::{QueueHandler, Watch};
use crate::virtio::{Activation, DeviceCounters, VirtioInterrupt};

/// The largest Ethernet frame moved: a 65535-byte payload (the largest MTU
/// Linux gives a tap) behind an Ethernet header with one VLAN tag.
pub const MAX_FRAME_LEN: usize = 65_535 + 18;
/// The most descriptors one chain may have (the queue size: the spec
/// forbids longer chains, indirect ones included).
pub const MAX_CHAIN_DESCRIPTORS: usize = super::QUEUE_SIZE as usize;
/// The epoll token of the backend's descriptor.
const BACKEND_TOKEN: u64 = 1;

/// Where Ethernet frames go and come from. Both calls are non-blocking: an
/// error of kind `WouldBlock` means "not now".
pub trait PacketBackend: AsRawFd + Send + 'static {
    /// Reads one frame (without virtio-net header) into `frame` and returns
    /// its length; a frame longer than `frame` may be cut to its length.
    /// `InvalidData`: a frame was read and is dropped.
    fn read_frame(&mut self, frame: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame (without virtio-net header).
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()>;
}

/// A datagram socket as a backend: each datagram is a frame (tests and
/// fuzzing use one end of a `UnixDatagram::pair`, set non-blocking).
impl PacketBackend for UnixDatagram {
    fn read_frame(&mut self, frame: &mut [u8]) -> io::Result<usize> {
        self.recv(frame)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        self.send(frame).map(|_| ())
    }
}

/// What is wrong with a descriptor chain (logged, never fatal).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainProblem {
    /// No descriptor could be read: the head index is past the table, or
    /// the indirect table is bad.
    #[error(
        "the chain has no descriptor that can be read (head index or indirect table out of range)"
    )]
    NoDescriptor,
    /// The chain ends on a descriptor with NEXT set: a loop, a next index
    /// past the table, a bad indirect table or more than 4 GiB.
    #[error("the chain is broken: it loops, its next index is out of range, or an indirect table is bad")]
    Broken,
    /// More descriptors than [`MAX_CHAIN_DESCRIPTORS`].
    #[error("the chain has more than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    /// A descriptor the device would have to write on TX, or read on RX.
    #[error("descriptor {index} points the wrong way (a {queue} chain is device-{expected} only)")]
    WrongDirection {
        /// Its position in the chain.
        index: usize,
        /// "TX" or "RX".
        queue: &'static str,
        /// "readable" or "writable".
        expected: &'static str,
    },
    /// A descriptor outside guest RAM.
    #[error("descriptor {index} ({len} bytes at {addr:#x}) is outside guest RAM")]
    OutOfRange {
        /// Its position in the chain.
        index: usize,
        /// Its guest physical address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// Fewer bytes than the virtio-net header.
    #[error(
        "the chain has {len} bytes, less than the {VIRTIO_NET_HDR_LEN}-byte virtio-net header"
    )]
    TooShort {
        /// Its bytes.
        len: usize,
    },
    /// A TX chain longer than the header and the largest frame.
    #[error("the chain has more than {} bytes (the header and the largest frame)", VIRTIO_NET_HDR_LEN + MAX_FRAME_LEN)]
    TooLong,
}

/// Calls `visit` with each descriptor of `chain` and its position, and
/// checks the chain's structure (see [`ChainProblem`]).
fn walk_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mut visit: impl FnMut(usize, &Descriptor) -> Result<(), ChainProblem>,
) -> Result<(), ChainProblem> {
    let mut count = 0;
    let mut ends_with_next = false;
    for descriptor in chain {
        if count == MAX_CHAIN_DESCRIPTORS {
            return Err(ChainProblem::TooManyDescriptors);
        }
        visit(count, &descriptor)?;
        ends_with_next = descriptor.has_next();
        count += 1;
    }
    if count == 0 {
        return Err(ChainProblem::NoDescriptor);
    }
    if ends_with_next {
        return Err(ChainProblem::Broken);
    }
    Ok(())
}

/// Copies the readable bytes of TX `chain` into `buffer` and returns how
/// many (the header and the frame).
fn gather_tx(
    chain: DescriptorChain<&GuestMemoryMmap>,
    memory: &GuestMemoryMmap,
    buffer: &mut [u8],
) -> Result<usize, ChainProblem> {
    let mut len = 0usize;
    walk_chain(chain, |index, descriptor| {
        if descriptor.is_write_only() {
            return Err(ChainProblem::WrongDirection {
                index,
                queue: "TX",
                expected: "readable",
            });
        }
        let size = descriptor.len() as usize;
        if size == 0 {
            return Ok(());
        }
        let target = len
            .checked_add(size)
            .and_then(|end| buffer.get_mut(len..end))
            .ok_or(ChainProblem::TooLong)?;
        memory
            .read_slice(target, descriptor.addr())
            .map_err(|_| ChainProblem::OutOfRange {
                index,
                addr: descriptor.addr().0,
                len: descriptor.len(),
            })?;
        len += size;
        Ok(())
    })?;
    if len < VIRTIO_NET_HDR_LEN {
        return Err(ChainProblem::TooShort { len });
    }
    Ok(len)
}

/// One guest memory range of an RX buffer.
#[derive(Debug, Clone, Copy)]
struct Region {
    addr: GuestAddress,
    len: usize,
}

/// An RX chain taken off the queue, checked, not yet used (its ranges are
/// in [`NetQueues`]' `rx_regions`, allocated once).
#[derive(Debug)]
struct RxBuffer {
    head: u16,
    capacity: usize,
}

/// Checks RX `chain` (writable, in guest RAM, room for the header) and
/// lists its ranges in `regions`.
fn rx_buffer(
    chain: DescriptorChain<&GuestMemoryMmap>,
    memory: &GuestMemoryMmap,
    regions: &mut Vec<Region>,
) -> Result<RxBuffer, ChainProblem> {
    let head = chain.head_index();
    regions.clear();
    let mut capacity = 0usize;
    walk_chain(chain, |index, descriptor| {
        if !descriptor.is_write_only() {
            return Err(ChainProblem::WrongDirection {
                index,
                queue: "RX",
                expected: "writable",
            });
        }
        let len = descriptor.len() as usize;
        if len == 0 {
            return Ok(());
        }
        if !GuestMemoryBackend::check_range(memory, descriptor.addr(), len) {
            return Err(ChainProblem::OutOfRange {
                index,
                addr: descriptor.addr().0,
                len: descriptor.len(),
            });
        }
        regions.push(Region {
            addr: descriptor.addr(),
            len,
        });
        // At most MAX_CHAIN_DESCRIPTORS lengths below 4 GiB: no overflow.
        capacity += len;
        Ok(())
    })?;
    if capacity < VIRTIO_NET_HDR_LEN {
        return Err(ChainProblem::TooShort { len: capacity });
    }
    Ok(RxBuffer { head, capacity })
}

/// The header of a received frame: no offload, one buffer.
fn rx_header() -> [u8; VIRTIO_NET_HDR_LEN] {
    const NUM_BUFFERS: usize = std::mem::offset_of!(virtio_net_hdr_v1, num_buffers);
    let mut header = [0u8; VIRTIO_NET_HDR_LEN];
    header[NUM_BUFFERS..NUM_BUFFERS + 2].copy_from_slice(&1u16.to_le_bytes());
    header
}

/// Takes the next available chain off `queue`.
fn pop_chain<'m>(
    queue: &mut Queue,
    memory: &'m GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, virtio_queue::Error> {
    Ok(queue.iter(memory)?.next())
}

/// The queues and what comes with them, between activation and reset.
struct ActiveQueues {
    memory: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<dyn VirtioInterrupt>,
}

impl ActiveQueues {
    /// Completes chain `head` of queue `index` with `len` bytes written;
    /// false when the used ring cannot be written (logged).
    fn complete(&mut self, index: u16, head: u16, len: u32, name: &str) -> bool {
        let queue = if index == RX_QUEUE {
            &mut self.rx
        } else {
            &mut self.tx
        };
        match queue.add_used(&self.memory, head, len) {
            Ok(()) => true,
            Err(e) => {
                crate::guest_warn!("{name}: queue {index}: cannot complete chain {head}: {e}");
                false
            }
        }
    }

    /// Raises queue `index`'s interrupt if the driver's event suppression
    /// asks for it.
    fn signal(&mut self, index: u16, name: &str) {
        let queue = if index == RX_QUEUE {
            &mut self.rx
        } else {
            &mut self.tx
        };
        let needed = queue.needs_notification(&self.memory).unwrap_or_else(|e| {
            crate::guest_warn!("{name}: queue {index}: cannot read the used event: {e}");
            true
        });
        if needed {
            self.interrupt.signal_queue(index);
        }
    }
}

/// The RX and TX logic, without the epoll it is driven from (so that tests
/// call it directly); [`NetHandler`] adds that.
pub struct NetQueues<B> {
    name: String,
    backend: B,
    counters: Arc<DeviceCounters>,
    queues: Option<ActiveQueues>,
    /// `VIRTIO_NET_HDR_LEN` bytes for the header, then room for a frame
    /// and one byte more (to see a frame that is too long).
    rx_bounce: Vec<u8>,
    /// The RX chain the next frame goes into.
    rx_buffer: Option<RxBuffer>,
    /// Its guest memory ranges.
    rx_regions: Vec<Region>,
    /// RX wants the backend's frames: it has a chain and no frame.
    rx_wants_frames: bool,
    /// The header and frame of a TX chain.
    tx_bounce: Vec<u8>,
    /// A TX chain (head, bytes in `tx_bounce`) the backend refused with
    /// `EAGAIN`: retried when the backend is writable.
    tx_blocked: Option<(u16, usize)>,
    /// The backend failed for good (logged); it is no longer watched.
    backend_failed: bool,
}

impl<B: PacketBackend> NetQueues<B> {
    /// Serves nothing until [`NetQueues::activate`].
    pub fn new(name: &str, backend: B, counters: Arc<DeviceCounters>) -> Self {
        NetQueues {
            name: name.to_string(),
            backend,
            counters,
            queues: None,
            rx_bounce: vec![0; VIRTIO_NET_HDR_LEN + MAX_FRAME_LEN + 1],
            rx_buffer: None,
            rx_regions: Vec::with_capacity(MAX_CHAIN_DESCRIPTORS),
            rx_wants_frames: false,
            tx_bounce: vec![0; VIRTIO_NET_HDR_LEN + MAX_FRAME_LEN],
            tx_blocked: None,
            backend_failed: false,
        }
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Takes the queues of `activation` (RX and TX must be there; the
    /// device checked). Serves nothing yet: the worker kicks both queues.
    pub fn activate(&mut self, activation: Activation) {
        self.reset();
        let Activation {
            memory,
            queues,
            interrupt,
            ..
        } = activation;
        let mut rx = None;
        let mut tx = None;
        for queue in queues {
            match queue.index {
                RX_QUEUE => rx = Some(queue.queue),
                TX_QUEUE => tx = Some(queue.queue),
                _ => {}
            }
        }
        let (Some(rx), Some(tx)) = (rx, tx) else {
            log::error!("{}: activated without its RX and TX queues", self.name);
            return;
        };
        self.queues = Some(ActiveQueues {
            memory,
            rx,
            tx,
            interrupt,
        });
    }

    /// Drops the queues, guest memory and the frames in flight.
    pub fn reset(&mut self) {
        self.queues = None;
        self.rx_buffer = None;
        self.rx_wants_frames = false;
        self.tx_blocked = None;
    }

    /// The events the backend's descriptor should be watched for now.
    pub fn interest(&self) -> EventSet {
        let mut events = EventSet::empty();
        if self.backend_failed || self.queues.is_none() {
            return events;
        }
        if self.rx_wants_frames {
            events |= EventSet::IN;
        }
        if self.tx_blocked.is_some() {
            events |= EventSet::OUT;
        }
        events
    }

    /// Sends every available TX chain (see the module docs).
    pub fn process_tx(&mut self) {
        let Some(queues) = self.queues.as_mut() else {
            return;
        };
        let name = self.name.as_str();
        let mut used = false;
        if let Some((head, len)) = self.tx_blocked {
            match send(
                &mut self.backend,
                &self.tx_bounce[VIRTIO_NET_HDR_LEN..len],
                &self.counters,
                name,
            ) {
                Sent::Later => return,
                Sent::Done => {
                    self.tx_blocked = None;
                    used |= queues.complete(TX_QUEUE, head, 0, name);
                }
            }
        }
        'notify: loop {
            if let Err(e) = queues.tx.disable_notification(&queues.memory) {
                crate::guest_warn!("{name}: TX queue: {e}");
            }
            loop {
                let chain = match pop_chain(&mut queues.tx, &queues.memory) {
                    Ok(Some(chain)) => chain,
                    Ok(None) => break,
                    Err(e) => {
                        crate::guest_warn!("{name}: TX queue: {e}; TX waits for the next kick");
                        break 'notify;
                    }
                };
                let head = chain.head_index();
                let len = match gather_tx(chain, &queues.memory, &mut self.tx_bounce) {
                    Ok(len) => len,
                    Err(problem) => {
                        crate::guest_warn!("{name}: TX chain {head} dropped: {problem}");
                        self.counters.record_error();
                        used |= queues.complete(TX_QUEUE, head, 0, name);
                        continue;
                    }
                };
                match send(
                    &mut self.backend,
                    &self.tx_bounce[VIRTIO_NET_HDR_LEN..len],
                    &self.counters,
                    name,
                ) {
                    Sent::Done => used |= queues.complete(TX_QUEUE, head, 0, name),
                    Sent::Later => {
                        self.tx_blocked = Some((head, len));
                        break 'notify;
                    }
                }
            }
            match queues.tx.enable_notification(&queues.memory) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => {
                    crate::guest_warn!("{name}: TX queue: {e}");
                    break;
                }
            }
        }
        if used {
            queues.signal(TX_QUEUE, name);
        }
    }

    /// Moves frames from the backend into RX chains while both have some
    /// (see the module docs).
    pub fn process_rx(&mut self) {
        let Some(queues) = self.queues.as_mut() else {
            return;
        };
        let name = self.name.as_str();
        let mut used = false;
        self.rx_wants_frames = false;
        loop {
            if self.rx_buffer.is_none() {
                match take_rx_buffer(
                    queues,
                    &mut self.rx_regions,
                    &self.counters,
                    &mut used,
                    name,
                ) {
                    Some(buffer) => self.rx_buffer = Some(buffer),
                    // Not watching the backend until the guest kicks RX.
                    None => break,
                }
            }
            if self.backend_failed {
                break;
            }
            let frame_len = match self
                .backend
                .read_frame(&mut self.rx_bounce[VIRTIO_NET_HDR_LEN..])
            {
                Ok(len) if len > MAX_FRAME_LEN => {
                    crate::guest_warn!(
                        "{name}: dropped a received frame of more than {MAX_FRAME_LEN} bytes"
                    );
                    self.counters.record_error();
                    continue;
                }
                Ok(len) => len,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.rx_wants_frames = true;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    crate::guest_warn!("{name}: dropped a received frame: {e}");
                    self.counters.record_error();
                    continue;
                }
                Err(e) => {
                    log::error!(
                        "{name}: reading frames failed: {e}; the device receives nothing more"
                    );
                    self.backend_failed = true;
                    break;
                }
            };
            let Some(buffer) = self.rx_buffer.take() else {
                break;
            };
            let total = VIRTIO_NET_HDR_LEN + frame_len;
            if buffer.capacity < total {
                crate::guest_warn!(
                    "{name}: dropped a received frame of {frame_len} bytes: RX chain {} has room for {} (the driver should offer at least {} bytes per buffer)",
                    buffer.head,
                    buffer.capacity.saturating_sub(VIRTIO_NET_HDR_LEN),
                    VIRTIO_NET_HDR_LEN + 1518
                );
                self.counters.record_error();
                // The chain stays for the next frame.
                self.rx_buffer = Some(buffer);
                continue;
            }
            self.rx_bounce[..VIRTIO_NET_HDR_LEN].copy_from_slice(&rx_header());
            let written = write_regions(&queues.memory, &self.rx_regions, &self.rx_bounce[..total]);
            if written {
                self.counters.record(0, frame_len as u64);
            } else {
                crate::guest_warn!("{name}: RX chain {} could not be written", buffer.head);
                self.counters.record_error();
            }
            let len = if written { total as u32 } else { 0 };
            used |= queues.complete(RX_QUEUE, buffer.head, len, name);
        }
        if used {
            queues.signal(RX_QUEUE, name);
        }
    }
}

/// The outcome of handing a frame to the backend.
enum Sent {
    /// Sent, or dropped for good (counted).
    Done,
    /// The backend cannot take it now (`EAGAIN`).
    Later,
}

fn send<B: PacketBackend>(
    backend: &mut B,
    frame: &[u8],
    counters: &DeviceCounters,
    name: &str,
) -> Sent {
    loop {
        match backend.write_frame(frame) {
            Ok(()) => {
                counters.record(frame.len() as u64, 0);
                return Sent::Done;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Sent::Later,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                crate::guest_warn!("{name}: dropped a sent frame of {} bytes: {e}", frame.len());
                counters.record_error();
                return Sent::Done;
            }
        }
    }
}

/// Takes the next usable RX chain, completing malformed ones on the way;
/// `None` (notifications on) when the queue has none.
fn take_rx_buffer(
    queues: &mut ActiveQueues,
    regions: &mut Vec<Region>,
    counters: &DeviceCounters,
    used: &mut bool,
    name: &str,
) -> Option<RxBuffer> {
    loop {
        let chain = match pop_chain(&mut queues.rx, &queues.memory) {
            Ok(Some(chain)) => chain,
            Ok(None) => match queues.rx.enable_notification(&queues.memory) {
                // A buffer came in while notifications were off.
                Ok(true) => continue,
                Ok(false) => return None,
                Err(e) => {
                    crate::guest_warn!("{name}: RX queue: {e}");
                    return None;
                }
            },
            Err(e) => {
                crate::guest_warn!("{name}: RX queue: {e}; RX waits for the next kick");
                return None;
            }
        };
        let head = chain.head_index();
        match rx_buffer(chain, &queues.memory, regions) {
            Ok(buffer) => {
                if let Err(e) = queues.rx.disable_notification(&queues.memory) {
                    crate::guest_warn!("{name}: RX queue: {e}");
                }
                return Some(buffer);
            }
            Err(problem) => {
                crate::guest_warn!("{name}: RX chain {head} dropped: {problem}");
                counters.record_error();
                *used |= queues.complete(RX_QUEUE, head, 0, name);
            }
        }
    }
}

/// Writes `bytes` across `regions` (checked to be in guest RAM, together at
/// least as long); false if a write failed.
fn write_regions(memory: &GuestMemoryMmap, regions: &[Region], bytes: &[u8]) -> bool {
    let mut at = 0;
    for region in regions {
        if at == bytes.len() {
            break;
        }
        let len = region.len.min(bytes.len() - at);
        if memory
            .write_slice(&bytes[at..at + len], region.addr)
            .is_err()
        {
            return false;
        }
        at += len;
    }
    at == bytes.len()
}

/// [`NetQueues`] on a worker thread: keeps the backend's epoll
/// registration in step with [`NetQueues::interest`].
pub struct NetHandler<B> {
    queues: NetQueues<B>,
    /// The events the backend is registered for (`None`: not registered).
    watching: Option<EventSet>,
}

impl<B: PacketBackend> NetHandler<B> {
    /// A handler serving `backend` once activated.
    pub fn new(name: &str, backend: B, counters: Arc<DeviceCounters>) -> Self {
        NetHandler {
            queues: NetQueues::new(name, backend, counters),
            watching: None,
        }
    }

    fn update_watch(&mut self, watch: &mut Watch<'_>) {
        let wanted = self.queues.interest();
        let fd = self.queues.backend.as_raw_fd();
        let result = match self.watching {
            _ if wanted.is_empty() => match self.watching.take() {
                Some(_) => watch.remove(fd),
                None => Ok(()),
            },
            None => watch.add(fd, BACKEND_TOKEN, wanted),
            Some(current) if current != wanted => watch.modify(fd, BACKEND_TOKEN, wanted),
            Some(_) => Ok(()),
        };
        match result {
            Ok(()) if !wanted.is_empty() => self.watching = Some(wanted),
            Ok(()) => {}
            Err(e) => log::error!(
                "{}: cannot watch the backend for {wanted:?}: {e}",
                self.queues.name
            ),
        }
    }
}

impl<B: PacketBackend> QueueHandler for NetHandler<B> {
    fn activate(&mut self, activation: Activation, watch: &mut Watch<'_>) {
        self.queues.activate(activation);
        self.update_watch(watch);
    }

    fn queue_kicked(&mut self, index: u16, watch: &mut Watch<'_>) {
        match index {
            RX_QUEUE => self.queues.process_rx(),
            TX_QUEUE => self.queues.process_tx(),
            _ => {}
        }
        self.update_watch(watch);
    }

    fn fd_ready(&mut self, token: u64, events: EventSet, watch: &mut Watch<'_>) {
        if token == BACKEND_TOKEN {
            if events.contains(EventSet::OUT) {
                self.queues.process_tx();
            }
            if events.intersects(EventSet::IN | EventSet::ERROR | EventSet::HANG_UP) {
                self.queues.process_rx();
            }
        }
        self.update_watch(watch);
    }

    fn reset(&mut self, watch: &mut Watch<'_>) {
        self.queues.reset();
        self.update_watch(watch);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::virtio::{ActivatedQueue, CounterSnapshot, VIRTIO_F_VERSION_1};

    /// Guest RAM of the tests: rings low, buffers from 0x10000.
    pub(crate) const RAM_SIZE: usize = 0x100000;
    /// The RX ring's start; TX's is at 0x4000.
    pub(crate) const RX_RING: u64 = 0;
    pub(crate) const TX_RING: u64 = 0x4000;
    const QUEUE_LEN: u16 = 16;

    /// Counts interrupts per queue.
    #[derive(Default)]
    pub(crate) struct CountingInterrupt {
        pub(crate) queues: Mutex<Vec<u16>>,
        pub(crate) config: AtomicUsize,
    }

    impl VirtioInterrupt for CountingInterrupt {
        fn signal_queue(&self, queue: u16) {
            self.queues.lock().unwrap().push(queue);
        }
        fn signal_config(&self) {
            self.config.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_SIZE)]).unwrap()
    }

    pub(crate) fn socket_pair() -> (UnixDatagram, UnixDatagram) {
        let (device, peer) = UnixDatagram::pair().unwrap();
        device.set_nonblocking(true).unwrap();
        peer.set_nonblocking(true).unwrap();
        (device, peer)
    }

    pub(crate) fn descriptor(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags as u16, next))
    }

    /// Puts `descriptors` in the table from `table_index` on and makes
    /// the chain starting there available.
    pub(crate) fn offer(
        ring: &MockSplitQueue<GuestMemoryMmap>,
        table_index: u16,
        descriptors: &[RawDescriptor],
    ) {
        ring.add_desc_chains(descriptors, table_index).unwrap();
    }

    /// A frame of `len` bytes with a recognizable pattern.
    pub(crate) fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
    }

    /// A TX chain: header descriptor and frame descriptor at `addr`.
    pub(crate) fn write_tx_chain(
        memory: &GuestMemoryMmap,
        ring: &MockSplitQueue<GuestMemoryMmap>,
        table_index: u16,
        addr: u64,
        frame: &[u8],
    ) {
        memory
            .write_slice(&[0u8; VIRTIO_NET_HDR_LEN], GuestAddress(addr))
            .unwrap();
        let frame_addr = addr + 0x100;
        memory.write_slice(frame, GuestAddress(frame_addr)).unwrap();
        offer(
            ring,
            table_index,
            &[
                descriptor(
                    addr,
                    VIRTIO_NET_HDR_LEN as u32,
                    VRING_DESC_F_NEXT,
                    table_index + 1,
                ),
                descriptor(frame_addr, frame.len() as u32, 0, 0),
            ],
        );
    }

    pub(crate) fn used(ring: &MockSplitQueue<GuestMemoryMmap>) -> Vec<(u32, u32)> {
        let count = ring.used().idx().load();
        (0..count)
            .map(|i| {
                let element = ring.used().ring().ref_at(usize::from(i)).unwrap().load();
                (element.id(), element.len())
            })
            .collect()
    }

    pub(crate) struct Setup<'m> {
        pub(crate) memory: &'m GuestMemoryMmap,
        pub(crate) rx: MockSplitQueue<'m, GuestMemoryMmap>,
        pub(crate) tx: MockSplitQueue<'m, GuestMemoryMmap>,
        pub(crate) interrupt: Arc<CountingInterrupt>,
    }

    impl<'m> Setup<'m> {
        pub(crate) fn new(memory: &'m GuestMemoryMmap) -> Self {
            Setup {
                memory,
                rx: MockSplitQueue::create(memory, GuestAddress(RX_RING), QUEUE_LEN),
                tx: MockSplitQueue::create(memory, GuestAddress(TX_RING), QUEUE_LEN),
                interrupt: Arc::new(CountingInterrupt::default()),
            }
        }

        pub(crate) fn activation(&self) -> Activation {
            let kick = || Arc::new(EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap());
            Activation {
                memory: self.memory.clone(),
                features: VIRTIO_F_VERSION_1,
                queues: vec![
                    ActivatedQueue {
                        index: RX_QUEUE,
                        queue: self.rx.create_queue().unwrap(),
                        kick: kick(),
                    },
                    ActivatedQueue {
                        index: TX_QUEUE,
                        queue: self.tx.create_queue().unwrap(),
                        kick: kick(),
                    },
                ],
                interrupt: Arc::clone(&self.interrupt) as Arc<dyn VirtioInterrupt>,
            }
        }

        fn interrupts(&self) -> Vec<u16> {
            self.interrupt.queues.lock().unwrap().clone()
        }
    }

    fn active(setup: &Setup<'_>, backend: UnixDatagram) -> NetQueues<UnixDatagram> {
        let mut queues = NetQueues::new("virtio-net-test", backend, Arc::default());
        queues.activate(setup.activation());
        queues
    }

    fn recv_all(peer: &UnixDatagram) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        let mut buffer = vec![0u8; MAX_FRAME_LEN + 1];
        while let Ok(len) = peer.recv(&mut buffer) {
            frames.push(buffer[..len].to_vec());
        }
        frames
    }

    #[test]
    fn tx_frames_reach_the_peer_without_the_header() {
        let memory = memory();
        let setup = Setup::new(&memory);
        let (device, peer) = socket_pair();
        let first = frame(60, 1);
        let second = frame(1514, 2);
        write_tx_chain(&memory, &setup.tx, 0, 0x10000, &first);
        write_tx_chain(&memory, &setup.tx, 2, 0x20000, &second);
        let mut queues = active(&setup, device);
        queues.process_tx();
        assert_eq!(recv_all(&peer), [first, second]);
        assert_eq!(used(&setup.tx), [(0, 0), (2, 0)]);
        assert_eq!(setup.interrupts(), [TX_QUEUE]);
        assert_eq!(
            queues.counters.snapshot(),
            CounterSnapshot {
                requests: 2,
                errors: 0,
                bytes_from_guest: 60 + 1514,
                bytes_to_guest: 0
            }
        );
        assert_eq!(queues.interest(), EventSet::empty());
    }

    #[test]
    fn a_tx_chain_in_one_descriptor_and_an_indirect_one_are_sent() {
        let memory = memory();
        let setup = Setup::new(&memory);
        let (device, peer) = socket_pair();
        let data = frame(100, 3);
        let mut packet = vec![0u8; VIRTIO_NET_HDR_LEN];
        packet.extend_from_slice(&data);
        memory.write_slice(&packet, GuestAddress(0x10000)).unwrap();
        offer(
            &setup.tx,
            0,
            &[descriptor(0x10000, packet.len() as u32, 0, 0)],
        );
        // An indirect table at 0x30000 with header and frame descriptors.
        let table = [
            descriptor(0x10000, VIRTIO_NET_HDR_LEN as u32, VRING_DESC_F_NEXT, 1),
            descriptor(0x10000 + VIRTIO_NET_HDR_LEN as u64, data.len() as u32, 0, 0),
        ];
        for (i, entry) in table.iter().enumerate() {
            memory
                .write_obj(*entry, GuestAddress(0x30000 + 16 * i as u64))
                .unwrap();
        }
        offer(
            &setup.tx,
            1,
            &[descriptor(0x30000, 32, VRING_DESC_F_INDIRECT, 0)],
        );
        let mut queues = active(&setup, device);
        queues.process_tx();
        assert_eq!(recv_all(&peer), [data.clone(), data]);
        assert_eq!(used(&setup.tx), [(0, 0), (1, 0)]);
    }

    #[test]
    fn rx_frames_land_in_guest_buffers_behind_a_12_byte_header() {
        let memory = memory();
        let setup = Setup::new(&memory);
        let (device, peer) = socket_pair();
        // Two RX buffers: one descriptor, and header + payload split.
        offer(
            &setup.rx,
            0,
            &[descriptor(0x10000, 1530, VRING_DESC_F_WRITE, 0)],
        );
        offer(
            &setup.rx,
            1,
            &[
                descriptor(0x20000, 20, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2),
                descriptor(0x21000, 2000, VRING_DESC_F_WRITE, 0),
            ],
        );
        let first = frame(1514, 4);
        let second = frame(42, 5);
        peer.send(&first).unwrap();
        peer.send(&second).unwrap();
        let mut queues = active(&setup, device);
        queues.process_rx();
        assert_eq!(
            used(&setup.rx),
            [(0, 12 + 1514), (1, 12 + 42)],
            "used length is header and frame"
        );
        let mut header = [0u8; VIRTIO_NET_HDR_LEN];
        memory
            .read_slice(&mut header, GuestAddress(0x10000))
            .unwrap();
        assert_eq!(
            header,
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
            "num_buffers 1"
        );
        let mut got = vec![0u8; 1514];
        memory
            .read_slice(&mut got, GuestAddress(0x10000 + 12))
            .unwrap();
        assert_eq!(got, first);
        // The second frame straddles the chain's two descriptors.
        let mut got = vec![0u8; 42];
        memory
            .read_slice(&mut got[..8], GuestAddress(0x20000 + 12))
            .unwrap();
        memory
            .read_slice(&mut got[8..], GuestAddress(0x21000))
            .unwrap();
        assert_eq!(got, second);
        assert_eq!(setup.interrupts(), [RX_QUEUE]);
        assert_eq!(queues.counters.snapshot().bytes_to_guest, 1514 + 42);
        // Out of buffers: the backend is not watched any more.
        assert_eq!(queues.interest(), EventSet::empty());
    }

    #[test]
    fn without_rx_buffers_the_backend_is_not_read_until_a_kick() {
        let memory = memory();
        let setup = Setup::new(&memory);
        let (device, peer) = socket_pair();
        let mut queues = NetQueues::new(
            "virtio-net-test",
            CountingBackend {
                socket: device,
                reads: 0,
            },
            Arc::default(),
        );
        queues.activate(setup.activation());
        queues.process_rx();
        // No buffer: not watching, and nothing read.
        assert_eq!(queues.interest(), EventSet::empty());
        for seed in 0..3 {
            peer.send(&frame(64, seed)).unwrap();
        }
        queues.process_rx();
        assert_eq!(queues.interest(), EventSet::empty());
        assert_eq!(queues.backend().reads, 0, "the backend was not read");
        // The guest adds a buffer and kicks: one frame moves, the rest wait
        // in the socket.
        offer(
            &setup.rx,
            0,
            &[descriptor(0x10000, 1530, VRING_DESC_F_WRITE, 0)],
        );
        queues.process_rx();
        assert_eq!(used(&setup.rx), [(0, 12 + 64)]);
        assert_eq!(queues.interest(), EventSet::empty());
        assert_eq!(queues.backend().reads, 1);
        // Three buffers more: the other two frames, in order, then the
        // backend is watched again for the buffer left over.
        offer(
            &setup.rx,
            1,
            &[descriptor(0x20000, 1530, VRING_DESC_F_WRITE, 0)],
        );
        offer(
            &setup.rx,
            2,
            &[descriptor(0x30000, 1530, VRING_DESC_F_WRITE, 0)],
        );
        offer(
            &setup.rx,
            3,
            &[descriptor(0x40000, 1530, VRING_DESC_F_WRITE, 0)],
        );
        queues.process_rx();
        assert_eq!(used(&setup.rx), [(0, 76), (1, 76), (2, 76)]);
        for (seed, addr) in [(0, 0x10000), (1, 0x20000), (2, 0x30000)] {
            let mut got = vec![0u8; 64];
            memory
                .read_slice(&mut got, GuestAddress(addr + 12))
                .unwrap();
            assert_eq!(got, frame(64, seed), "frame {seed}");
        }
        assert_eq!(queues.interest(), EventSet::IN);
        assert_eq!(queues.counters.snapshot().requests, 3);
        assert_eq!(setup.interrupts(), [RX_QUEUE, RX_QUEUE]);
    }

    /// A socket backend that counts reads.
    struct CountingBackend {
        socket: UnixDatagram,
        reads: usize,
    }

    impl AsRawFd for CountingBackend {
        fn as_raw_fd(&self) -> std::os::fd::RawFd {
            self.socket.as_raw_fd()
        }
    }

    impl PacketBackend for CountingBackend {
        fn read_frame(&mut self, frame: &mut [u8]) -> io::Result<usize> {
            self.reads += 1;
            self.socket.read_frame(frame)
        }
        fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
            self.socket.write_frame(frame)
        }
    }

    #[test]
    fn a_frame_larger_than_the_rx_buffer_is_dropped_and_the_buffer_kept() {
        let memory = memory();
        let setup = Setup::new(&memory);
        let (device, peer) = socket_pair();
        offer(
            &setup.rx,
            0,
            &[descriptor(0x10000, 12 + 100, VRING_DESC_F_WRITE, 0)],
        );
        let mut queues = active(&setup, device);
        peer.send(&frame(101, 1)).unwrap();
        peer.send(&frame(100, 2)).unwrap();
        queues.process_rx();
        assert_eq!(used(&setup.rx), [(0, 112)]);
        let mut got = vec![0u8; 100];
        memory
            .read_slice(&mut got, GuestAddress(0x10000 + 12))
            .unwrap();
        assert_eq!(got, frame(100, 2));
        let counters = queues.counters.snapshot();
        assert_eq!((counters.requests, counters.errors), (2, 1));
    }

    /// Offers `chain` on `queue` of a fresh device and processes it; returns
    /// the used ring and the counters.
    fn process_malformed(
        rx: bool,
        chain: &[RawDescriptor],
        peer_frames: usize,
    ) -> (Vec<(u32, u32)>, CounterSnapshot, Vec<Vec<u8>>) {
        let memory = memory();
        let setup = Setup::new(&memory);
        let (device, peer) = socket_pair();
        let ring = if rx { &setup.rx } else { &setup.tx };
        // The malformed chain, then a good one after it.
        ring.add_desc_chains(chain, 0).unwrap();
        let good = if rx {
            vec![descriptor(0x80000, 1530, VRING_DESC_F_WRITE, 0)]
        } else {
            memory
                .write_slice(&[0u8; 12 + 60], GuestAddress(0x80000))
                .unwrap();
            vec![descriptor(0x80000, 12 + 60, 0, 0)]
        };
        ring.add_desc_chains(&good, 8).unwrap();
        for seed in 0..peer_frames {
            peer.send(&frame(60, seed as u8)).unwrap();
        }
        let mut queues = active(&setup, device);
        if rx {
            queues.process_rx();
        } else {
            queues.process_tx();
        }
        let snapshot = queues.counters.snapshot();
        (used(ring), snapshot, recv_all(&peer))
    }

    #[test]
    fn malformed_tx_chains_are_completed_empty_and_nothing_is_sent() {
        let outside = RAM_SIZE as u64;
        for (what, chain) in [
            ("out of range", vec![descriptor(outside - 8, 64, 0, 0)]),
            (
                "past the end of the address space",
                vec![descriptor(u64::MAX - 4, 64, 0, 0)],
            ),
            (
                "too short for the header",
                vec![descriptor(0x10000, 11, 0, 0)],
            ),
            ("zero length", vec![descriptor(0x10000, 0, 0, 0)]),
            (
                "wrong direction",
                vec![
                    descriptor(0x10000, 12, VRING_DESC_F_NEXT, 1),
                    descriptor(0x11000, 64, VRING_DESC_F_WRITE, 0),
                ],
            ),
            (
                "a loop",
                vec![
                    descriptor(0x10000, 12, VRING_DESC_F_NEXT, 1),
                    descriptor(0x11000, 64, VRING_DESC_F_NEXT, 0),
                ],
            ),
            (
                "next out of the table",
                vec![descriptor(0x10000, 64, VRING_DESC_F_NEXT, 200)],
            ),
            (
                "too long",
                vec![descriptor(0x10000, (12 + MAX_FRAME_LEN + 1) as u32, 0, 0)],
            ),
            (
                "a bad indirect table",
                vec![descriptor(0x10000, 17, VRING_DESC_F_INDIRECT, 0)],
            ),
        ] {
            let (used, counters, sent) = process_malformed(false, &chain, 0);
            assert_eq!(used, [(0, 0), (8, 0)], "{what}");
            assert_eq!(sent.len(), 1, "{what}: only the good chain is sent");
            assert_eq!((counters.requests, counters.errors), (2, 1), "{what}");
        }
    }

    #[test]
    fn malformed_rx_chains_are_completed_empty_and_frames_go_to_the_next() {
        let outside = RAM_SIZE as u64;
        for (what, chain) in [
            (
                "out of range",
                vec![descriptor(outside - 8, 1530, VRING_DESC_F_WRITE, 0)],
            ),
            ("readable", vec![descriptor(0x10000, 1530, 0, 0)]),
            (
                "too short for the header",
                vec![descriptor(0x10000, 11, VRING_DESC_F_WRITE, 0)],
            ),
            (
                "zero length",
                vec![descriptor(0x10000, 0, VRING_DESC_F_WRITE, 0)],
            ),
            (
                "a loop",
                vec![
                    descriptor(0x10000, 12, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
                    descriptor(0x11000, 64, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 0),
                ],
            ),
        ] {
            let (used, counters, _) = process_malformed(true, &chain, 1);
            assert_eq!(used, [(0, 0), (8, 12 + 60)], "{what}");
            assert_eq!((counters.requests, counters.errors), (2, 1), "{what}");
            assert_eq!(counters.bytes_to_guest, 60, "{what}");
        }
    }

    #[test]
    fn a_chain_of_more_descriptors_than_the_queue_size_is_malformed() {
        let memory = memory();
        // An indirect table of MAX_CHAIN_DESCRIPTORS + 1 one-byte entries.
        let count = MAX_CHAIN_DESCRIPTORS + 1;
        for i in 0..count {
            let entry = descriptor(0x10000 + i as u64, 1, VRING_DESC_F_NEXT, (i + 1) as u16);
            let entry = if i + 1 == count {
                descriptor(0x10000 + i as u64, 1, 0, 0)
            } else {
                entry
            };
            memory
                .write_obj(entry, GuestAddress(0x40000 + 16 * i as u64))
                .unwrap();
        }
        let setup = Setup::new(&memory);
        let (device, peer) = socket_pair();
        offer(
            &setup.tx,
            0,
            &[descriptor(
                0x40000,
                16 * count as u32,
                VRING_DESC_F_INDIRECT,
                0,
            )],
        );
        let mut queues = active(&setup, device);
        queues.process_tx();
        assert_eq!(used(&setup.tx), [(0, 0)]);
        assert!(recv_all(&peer).is_empty());
    }

    #[test]
    fn a_full_backend_keeps_one_tx_frame_and_waits_for_writable() {
        let memory = memory();
        let setup = Setup::new(&memory);
        let (device, peer) = socket_pair();
        // Fill the peer's receive queue.
        let filler = frame(1000, 9);
        let mut queued = 0;
        while device.send(&filler).is_ok() {
            queued += 1;
        }
        write_tx_chain(&memory, &setup.tx, 0, 0x10000, &frame(60, 1));
        write_tx_chain(&memory, &setup.tx, 2, 0x20000, &frame(60, 2));
        let mut queues = active(&setup, device);
        queues.process_tx();
        assert!(used(&setup.tx).is_empty(), "nothing completed");
        assert_eq!(queues.interest(), EventSet::OUT);
        assert_eq!(queues.tx_blocked, Some((0, 72)));
        // The peer reads; the backend is writable again.
        let drained = recv_all(&peer);
        assert_eq!(drained.len(), queued);
        queues.process_tx();
        assert_eq!(used(&setup.tx), [(0, 0), (2, 0)]);
        assert_eq!(recv_all(&peer), [frame(60, 1), frame(60, 2)]);
        assert_eq!(queues.interest(), EventSet::empty());
    }

    #[test]
    fn reset_drops_the_queues_and_a_held_frame() {
        let memory = memory();
        let setup = Setup::new(&memory);
        let (device, peer) = socket_pair();
        offer(
            &setup.rx,
            0,
            &[descriptor(0x10000, 1530, VRING_DESC_F_WRITE, 0)],
        );
        let mut queues = active(&setup, device);
        queues.process_rx();
        assert_eq!(queues.interest(), EventSet::IN);
        peer.send(&frame(60, 0)).unwrap();
        queues.reset();
        assert_eq!(queues.interest(), EventSet::empty());
        // Not active: nothing is served, nothing read.
        queues.process_rx();
        queues.process_tx();
        assert!(used(&setup.rx).is_empty());
        let mut buffer = [0u8; 100];
        assert_eq!(queues.backend().recv(&mut buffer).unwrap(), 60);
    }

    #[test]
    fn a_broken_avail_index_stops_the_queue_without_panicking() {
        let memory = memory();
        let setup = Setup::new(&memory);
        let (device, _peer) = socket_pair();
        // The driver claims more chains than the ring holds.
        setup.tx.avail().idx().store(QUEUE_LEN + 5);
        setup.rx.avail().idx().store(QUEUE_LEN + 5);
        let mut queues = active(&setup, device);
        queues.process_tx();
        queues.process_rx();
        assert!(used(&setup.tx).is_empty() && used(&setup.rx).is_empty());
        assert_eq!(queues.interest(), EventSet::empty());
    }
}
