//! Serving virtio-blk requests (virtio 1.2 section 5.2.6): one descriptor
//! chain at a time ([`RequestServer::serve_chain`]) and a whole queue
//! ([`RequestServer::serve_queue`]), over any [`BlockBackend`].
//!
//! # A request
//!
//! A chain is device-readable bytes followed by device-writable bytes,
//! framed any way the driver likes (virtio 1.x has no fixed layout): the
//! first 16 readable bytes are the header (`virtio_blk_outhdr`: type,
//! priority, sector), the last writable byte is the status, and what lies
//! between is the data (readable for OUT, DISCARD and WRITE_ZEROES, writable
//! for IN and GET_ID). Data moves directly between the guest's buffers and
//! the backend (the backend gets the guest memory slices).
//!
//! # Malformed chains
//!
//! Nothing a driver puts in a chain panics or reaches the backend
//! unchecked:
//! - a chain cut short (a loop, a `next` past the table, a bad indirect
//!   table, a descriptor table entry outside guest RAM), a readable
//!   descriptor after a writable one, and a chain with no writable byte
//!   or whose status byte is outside guest RAM have no status byte to
//!   trust: they are completed with used length 0 and nothing written;
//! - otherwise the status byte gets VIRTIO_BLK_S_IOERR for a header shorter
//!   than 16 bytes, data outside guest RAM, a data length that is not whole
//!   sectors, a sector range past the end of the disk (overflow-checked), a
//!   write to a read-only disk, a bad discard/write-zeroes segment list and
//!   a host I/O error; VIRTIO_BLK_S_UNSUPP for a request type the device
//!   does not serve (or the driver did not negotiate) and, as the spec
//!   says, for unknown discard/write-zeroes flags and a discard with the
//!   unmap flag.
//!
//! Each failure is logged through a rate-limited [`crate::guest_warn!`]
//! (host I/O errors through their own, naming the image) and counted in
//! [`DeviceCounters::errors`].

use std::mem::{offset_of, size_of};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    virtio_blk_discard_write_zeroes, virtio_blk_outhdr, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions, VolatileSlice};

use super::backend::{BlockBackend, SECTOR_SIZE};
use crate::virtio::{DeviceCounters, VirtioInterrupt};

/// The length of the disk's ID (GET_ID), zero-padded.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
/// The most sectors one discard segment covers (config `max_discard_sectors`).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// The most segments one discard request has (config `max_discard_seg`).
pub const MAX_DISCARD_SEGMENTS: u32 = 32;
/// The most sectors one write-zeroes segment covers.
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 22;
/// The most segments one write-zeroes request has.
pub const MAX_WRITE_ZEROES_SEGMENTS: u32 = 32;

const HEADER_SIZE: u64 = size_of::<virtio_blk_outhdr>() as u64;
const SEGMENT_SIZE: usize = size_of::<virtio_blk_discard_write_zeroes>();

/// Why a request failed (logged, then reported in the status byte or by
/// an empty completion).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain has no descriptor (a head index past the table, or an
    /// unreadable first descriptor or indirect table).
    #[error("the descriptor chain is empty (head index past the table, or an unreadable descriptor or indirect table)")]
    EmptyChain,
    /// The chain ends with a descriptor that says more follow.
    #[error("the descriptor chain is cut short (a loop, a next index past the table, a bad indirect table or more than 4 GiB)")]
    Truncated,
    /// A device-readable descriptor follows a device-writable one.
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    /// No device-writable byte for the status.
    #[error("the chain has no device-writable byte for the status")]
    NoStatus,
    /// The status byte is outside guest RAM.
    #[error("the status byte at {0:#x} is outside guest RAM")]
    StatusOutsideMemory(u64),
    /// Fewer than 16 device-readable bytes.
    #[error("the request header is {0} device-readable bytes, not 16")]
    ShortHeader(u64),
    /// A buffer outside guest RAM.
    #[error("{len} bytes at {addr:#x} are not in guest RAM")]
    OutsideMemory {
        /// Guest physical address.
        addr: u64,
        /// Bytes.
        len: u64,
    },
    /// Data that is not whole sectors.
    #[error("the data is {0} bytes, not a multiple of 512")]
    UnalignedLength(u64),
    /// A sector range past the end of the disk.
    #[error(
        "{sectors} sectors at sector {sector} are past the end of the disk ({capacity} sectors)"
    )]
    PastEnd {
        sector: u64,
        sectors: u64,
        /// The disk's size in sectors.
        capacity: u64,
    },
    /// A write to a read-only disk.
    #[error("the disk is read-only")]
    ReadOnly,
    /// A request type the device does not serve (or the driver did not
    /// negotiate).
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    /// A discard or write-zeroes segment list that is empty, not whole
    /// segments, or longer than the limit.
    #[error("{bytes} bytes of discard/write-zeroes segments (16 bytes each, 1 to {max} of them)")]
    BadSegments {
        bytes: u64,
        /// The most segments.
        max: u32,
    },
    /// A segment longer than the limit.
    #[error("a segment of {sectors} sectors is larger than the {max} the device offers")]
    SegmentTooLarge { sectors: u32, max: u32 },
    /// Flags the device does not know, or unmap on a discard.
    #[error("segment flags {0:#x} are not supported")]
    UnsupportedFlags(u32),
    /// The backend failed.
    #[error("{operation} of {len} bytes at byte {offset} of the image failed: {source}")]
    Io {
        /// read, write, flush, discard or write zeroes.
        operation: &'static str,
        offset: u64,
        len: u64,
        source: std::io::Error,
    },
}

impl RequestError {
    /// The status byte the driver gets.
    fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) | RequestError::UnsupportedFlags(_) => {
                VIRTIO_BLK_S_UNSUPP as u8
            }
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// What the request path knows of a disk besides its bytes.
#[derive(Debug, Clone)]
pub struct RequestConfig {
    /// How log lines name the disk, e.g. `virtio-blk0 (/images/root.img)`.
    pub label: String,
    /// OUT, DISCARD and WRITE_ZEROES fail with IOERR.
    pub read_only: bool,
    /// What GET_ID returns (zero-padded).
    pub id: [u8; ID_BYTES],
}

/// The negotiated features that change how requests are served.
#[derive(Debug, Clone, Copy, Default)]
struct AcceptedFeatures {
    /// Without VIRTIO_BLK_F_FLUSH the device must write through: every
    /// write is flushed before it completes.
    flush: bool,
    discard: bool,
    write_zeroes: bool,
}

/// A run of guest memory one descriptor names.
#[derive(Debug, Clone, Copy)]
struct Segment {
    addr: GuestAddress,
    len: u32,
}

/// A chain's descriptors, readable ones first.
#[derive(Debug, Default)]
struct ChainLayout {
    readable: Vec<Segment>,
    writable: Vec<Segment>,
}

fn total(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}

impl ChainLayout {
    /// Walks `chain`, checking it ends properly and puts readable
    /// descriptors before writable ones.
    fn walk(chain: DescriptorChain<&GuestMemoryMmap>) -> Result<Self, RequestError> {
        let mut layout = ChainLayout::default();
        let mut more_follow = None;
        for descriptor in chain {
            more_follow = Some(descriptor.has_next());
            let segment = Segment {
                addr: descriptor.addr(),
                len: descriptor.len(),
            };
            if descriptor.is_write_only() {
                layout.writable.push(segment);
            } else if layout.writable.is_empty() {
                layout.readable.push(segment);
            } else {
                return Err(RequestError::ReadableAfterWritable);
            }
        }
        match more_follow {
            None => Err(RequestError::EmptyChain),
            Some(true) => Err(RequestError::Truncated),
            Some(false) => Ok(layout),
        }
    }

    /// The last writable byte.
    fn status_address(&self) -> Result<GuestAddress, RequestError> {
        let last = self
            .writable
            .iter()
            .rev()
            .find(|s| s.len > 0)
            .ok_or(RequestError::NoStatus)?;
        last.addr
            .0
            .checked_add(u64::from(last.len) - 1)
            .map(GuestAddress)
            .ok_or(RequestError::StatusOutsideMemory(u64::MAX))
    }
}

/// The slices of guest memory covering `take` bytes of `segments` after
/// the first `skip`.
fn guest_slices<'m>(
    memory: &'m GuestMemoryMmap,
    segments: &[Segment],
    mut skip: u64,
    mut take: u64,
    access: Permissions,
) -> Result<Vec<VolatileSlice<'m>>, RequestError> {
    let mut slices = Vec::with_capacity(segments.len());
    for segment in segments {
        if take == 0 {
            break;
        }
        let len = u64::from(segment.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let now = (len - skip).min(take);
        let outside = || RequestError::OutsideMemory {
            addr: segment.addr.0.wrapping_add(skip),
            len: now,
        };
        let addr = segment
            .addr
            .0
            .checked_add(skip)
            .map(GuestAddress)
            .ok_or_else(outside)?;
        // `now` fits usize: it is at most a descriptor's u32 length.
        let pieces = memory
            .get_slices(addr, now as usize, access)
            .map_err(|_| outside())?;
        for piece in pieces {
            slices.push(piece.map_err(|_| outside())?);
        }
        skip = 0;
        take -= now;
    }
    Ok(slices)
}

/// Copies the start of `slices` into `out` (as far as they reach).
fn copy_from_guest(slices: &[VolatileSlice<'_>], out: &mut [u8]) {
    let mut at = 0;
    for slice in slices {
        if at == out.len() {
            break;
        }
        at += slice.copy_to(&mut out[at..]);
    }
}

/// Copies `bytes` into the start of `slices` (as far as they reach).
fn copy_to_guest(slices: &[VolatileSlice<'_>], mut bytes: &[u8]) {
    for slice in slices {
        if bytes.is_empty() {
            break;
        }
        let now = slice.len().min(bytes.len());
        slice.copy_from(&bytes[..now]);
        bytes = &bytes[now..];
    }
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

/// Bytes a served request moved, for the counters and the used length.
#[derive(Debug, Clone, Copy, Default)]
struct Moved {
    from_guest: u64,
    to_guest: u64,
}

/// One discard or write-zeroes segment.
#[derive(Debug, Clone, Copy)]
struct ZeroSegment {
    offset: u64,
    len: u64,
    unmap: bool,
}

/// Serves the requests of one disk (see the module docs).
pub struct RequestServer<B> {
    backend: B,
    config: RequestConfig,
    accepted: AcceptedFeatures,
    counters: Arc<DeviceCounters>,
}

impl<B: BlockBackend> RequestServer<B> {
    /// A server of `backend`'s bytes, counting into `counters`, with no
    /// optional feature negotiated yet.
    pub fn new(backend: B, config: RequestConfig, counters: Arc<DeviceCounters>) -> Self {
        RequestServer {
            backend,
            config,
            accepted: AcceptedFeatures::default(),
            counters,
        }
    }

    /// The features the driver accepted (at activation).
    pub fn set_accepted_features(&mut self, features: u64) {
        let has = |bit: u32| features & (1 << bit) != 0;
        self.accepted = AcceptedFeatures {
            flush: has(VIRTIO_BLK_F_FLUSH),
            discard: has(VIRTIO_BLK_F_DISCARD),
            write_zeroes: has(VIRTIO_BLK_F_WRITE_ZEROES),
        };
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, e.g. to make it fail.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Serves every chain the driver made available on `queue` (number
    /// `index`), returns each to the used ring and raises the queue's
    /// interrupt whenever the ring's event suppression asks for it. With
    /// notifications disabled while it works, it re-enables them and looks
    /// once more before returning, so no buffer made available meanwhile
    /// waits for a kick that never comes.
    pub fn serve_queue(
        &mut self,
        memory: &GuestMemoryMmap,
        queue: &mut Queue,
        index: u16,
        interrupt: &dyn VirtioInterrupt,
    ) {
        loop {
            if let Err(e) = queue.disable_notification(memory) {
                crate::guest_warn!(
                    "{}: queue {index}: cannot disable notifications: {e}",
                    self.config.label
                );
                return;
            }
            let mut served = 0u32;
            loop {
                let chain = match queue.iter(memory) {
                    Ok(mut chains) => chains.next(),
                    Err(e) => {
                        crate::guest_warn!(
                            "{}: queue {index}: {e}; the queue is not served until the driver resets the device",
                            self.config.label
                        );
                        return;
                    }
                };
                let Some(chain) = chain else { break };
                served += 1;
                let head = chain.head_index();
                let used_len = self.serve_chain(memory, chain);
                if head >= queue.size() {
                    crate::guest_warn!(
                        "{}: queue {index}: head index {head} is past the queue's {} entries; it cannot be returned",
                        self.config.label,
                        queue.size()
                    );
                    continue;
                }
                if let Err(e) = queue.add_used(memory, head, used_len) {
                    crate::guest_warn!(
                        "{}: queue {index}: cannot return chain {head}: {e}",
                        self.config.label
                    );
                    return;
                }
                match queue.needs_notification(memory) {
                    Ok(false) => {}
                    Ok(true) | Err(_) => interrupt.signal_queue(index),
                }
            }
            match queue.enable_notification(memory) {
                Ok(true) if served > 0 => continue,
                // More is available but none of it could be taken (an
                // avail ring entry that cannot be read): stop, not spin.
                Ok(true) => {
                    crate::guest_warn!(
                        "{}: queue {index}: the available ring cannot be read",
                        self.config.label
                    );
                    return;
                }
                Ok(false) => return,
                Err(e) => {
                    crate::guest_warn!(
                        "{}: queue {index}: cannot enable notifications: {e}",
                        self.config.label
                    );
                    return;
                }
            }
        }
    }

    /// Serves one chain: the request's status is written to its status
    /// byte, and the used length (bytes written into the chain: data and
    /// status) returned; 0 when the chain has no status byte to trust.
    pub fn serve_chain(
        &mut self,
        memory: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        let head = chain.head_index();
        let status_address = ChainLayout::walk(chain).and_then(|layout| {
            let status = layout.status_address()?;
            if memory.check_range(status, 1, Permissions::Write) {
                Ok((layout, status))
            } else {
                Err(RequestError::StatusOutsideMemory(status.0))
            }
        });
        let (layout, status_address) = match status_address {
            Ok(found) => found,
            Err(e) => {
                crate::guest_warn!(
                    "{}: descriptor chain {head}: {e}; completed with nothing written",
                    self.config.label
                );
                self.counters.record_error();
                return 0;
            }
        };
        let (status, to_guest) = match self.execute(memory, &layout) {
            Ok(moved) => {
                self.counters.record(moved.from_guest, moved.to_guest);
                (VIRTIO_BLK_S_OK as u8, moved.to_guest)
            }
            Err(e) => {
                if matches!(e, RequestError::Io { .. }) {
                    crate::guest_warn!(
                        "{}: request {head}: {e}; the guest gets an I/O error",
                        self.config.label
                    );
                } else {
                    crate::guest_warn!(
                        "{}: request {head}: {e}; completed with status {}",
                        self.config.label,
                        e.status()
                    );
                }
                self.counters.record_error();
                (e.status(), 0)
            }
        };
        if memory.write_obj(status, status_address).is_err() {
            return 0;
        }
        u32::try_from(to_guest + 1).unwrap_or(u32::MAX)
    }

    fn execute(
        &mut self,
        memory: &GuestMemoryMmap,
        layout: &ChainLayout,
    ) -> Result<Moved, RequestError> {
        let readable = total(&layout.readable);
        if readable < HEADER_SIZE {
            return Err(RequestError::ShortHeader(readable));
        }
        let mut header = [0u8; HEADER_SIZE as usize];
        let slices = guest_slices(memory, &layout.readable, 0, HEADER_SIZE, Permissions::Read)?;
        copy_from_guest(&slices, &mut header);
        let request_type = le_u32(&header, offset_of!(virtio_blk_outhdr, type_));
        let sector = le_u64(&header, offset_of!(virtio_blk_outhdr, sector));
        // The status byte is not data.
        let writable_data = total(&layout.writable) - 1;
        let readable_data = readable - HEADER_SIZE;
        match request_type {
            VIRTIO_BLK_T_IN => {
                let offset = self.check_range(sector, writable_data)?;
                let slices = guest_slices(
                    memory,
                    &layout.writable,
                    0,
                    writable_data,
                    Permissions::Write,
                )?;
                self.backend
                    .read_at(offset, &slices)
                    .map_err(|source| RequestError::Io {
                        operation: "read",
                        offset,
                        len: writable_data,
                        source,
                    })?;
                Ok(Moved {
                    from_guest: 0,
                    to_guest: writable_data,
                })
            }
            VIRTIO_BLK_T_OUT => {
                if self.config.read_only {
                    return Err(RequestError::ReadOnly);
                }
                let offset = self.check_range(sector, readable_data)?;
                let slices = guest_slices(
                    memory,
                    &layout.readable,
                    HEADER_SIZE,
                    readable_data,
                    Permissions::Read,
                )?;
                self.backend
                    .write_at(offset, &slices)
                    .map_err(|source| RequestError::Io {
                        operation: "write",
                        offset,
                        len: readable_data,
                        source,
                    })?;
                if !self.accepted.flush {
                    self.flush()?;
                }
                Ok(Moved {
                    from_guest: readable_data,
                    to_guest: 0,
                })
            }
            VIRTIO_BLK_T_FLUSH => {
                if !self.config.read_only {
                    self.flush()?;
                }
                Ok(Moved::default())
            }
            VIRTIO_BLK_T_GET_ID => {
                let len = writable_data.min(ID_BYTES as u64);
                let slices = guest_slices(memory, &layout.writable, 0, len, Permissions::Write)?;
                copy_to_guest(&slices, &self.config.id[..len as usize]);
                Ok(Moved {
                    from_guest: 0,
                    to_guest: len,
                })
            }
            VIRTIO_BLK_T_DISCARD if self.accepted.discard => {
                self.zero_segments(memory, layout, readable_data, false)
            }
            VIRTIO_BLK_T_WRITE_ZEROES if self.accepted.write_zeroes => {
                self.zero_segments(memory, layout, readable_data, true)
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    /// The byte offset of `len` bytes at `sector`, if they are whole
    /// sectors inside the disk.
    fn check_range(&self, sector: u64, len: u64) -> Result<u64, RequestError> {
        if len % SECTOR_SIZE != 0 {
            return Err(RequestError::UnalignedLength(len));
        }
        let size = self.backend.size();
        let past_end = || RequestError::PastEnd {
            sector,
            sectors: len / SECTOR_SIZE,
            capacity: size / SECTOR_SIZE,
        };
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or_else(past_end)?;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(offset),
            _ => Err(past_end()),
        }
    }

    fn flush(&mut self) -> Result<(), RequestError> {
        self.backend.flush().map_err(|source| RequestError::Io {
            operation: "flush",
            offset: 0,
            len: 0,
            source,
        })
    }

    /// DISCARD (`write_zeroes` false) or WRITE_ZEROES: every segment is
    /// checked before any reaches the backend.
    fn zero_segments(
        &mut self,
        memory: &GuestMemoryMmap,
        layout: &ChainLayout,
        bytes: u64,
        write_zeroes: bool,
    ) -> Result<Moved, RequestError> {
        if self.config.read_only {
            return Err(RequestError::ReadOnly);
        }
        let (max_segments, max_sectors) = if write_zeroes {
            (MAX_WRITE_ZEROES_SEGMENTS, MAX_WRITE_ZEROES_SECTORS)
        } else {
            (MAX_DISCARD_SEGMENTS, MAX_DISCARD_SECTORS)
        };
        let count = bytes / SEGMENT_SIZE as u64;
        if bytes == 0 || bytes % SEGMENT_SIZE as u64 != 0 || count > u64::from(max_segments) {
            return Err(RequestError::BadSegments {
                bytes,
                max: max_segments,
            });
        }
        let slices = guest_slices(
            memory,
            &layout.readable,
            HEADER_SIZE,
            bytes,
            Permissions::Read,
        )?;
        let mut raw = vec![0u8; bytes as usize];
        copy_from_guest(&slices, &mut raw);
        let mut segments = Vec::with_capacity(count as usize);
        for entry in raw.chunks_exact(SEGMENT_SIZE) {
            let sector = le_u64(entry, offset_of!(virtio_blk_discard_write_zeroes, sector));
            let sectors = le_u32(
                entry,
                offset_of!(virtio_blk_discard_write_zeroes, num_sectors),
            );
            let flags = le_u32(entry, offset_of!(virtio_blk_discard_write_zeroes, flags));
            let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
            if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (unmap && !write_zeroes) {
                return Err(RequestError::UnsupportedFlags(flags));
            }
            if sectors > max_sectors {
                return Err(RequestError::SegmentTooLarge {
                    sectors,
                    max: max_sectors,
                });
            }
            let len = u64::from(sectors) * SECTOR_SIZE;
            let offset = self.check_range(sector, len)?;
            segments.push(ZeroSegment { offset, len, unmap });
        }
        for segment in segments {
            let ZeroSegment { offset, len, unmap } = segment;
            let result = if write_zeroes {
                self.backend.write_zeroes(offset, len, unmap)
            } else {
                self.backend.discard(offset, len)
            };
            result.map_err(|source| RequestError::Io {
                operation: if write_zeroes {
                    "write zeroes"
                } else {
                    "discard"
                },
                offset,
                len,
                source,
            })?;
        }
        if !self.accepted.flush {
            self.flush()?;
        }
        Ok(Moved::default())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Address;

    use super::*;
    use crate::virtio::blk::backend::MemoryBackend;
    use crate::virtio::CounterSnapshot;

    const QUEUE_SIZE: u16 = 16;
    const RAM: u64 = 0x10_0000;
    const HEADER: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;
    const R: u16 = 0;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    const SECTORS: u64 = 64;

    #[derive(Default)]
    struct CountingInterrupt(AtomicUsize);

    impl VirtioInterrupt for CountingInterrupt {
        fn signal_queue(&self, queue: u16) {
            assert_eq!(queue, 0);
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn signal_config(&self) {}
    }

    struct Disk {
        memory: GuestMemoryMmap,
        server: RequestServer<MemoryBackend>,
        counters: Arc<DeviceCounters>,
        interrupt: CountingInterrupt,
    }

    fn disk_with(read_only: bool, features: u64) -> Disk {
        let counters = Arc::new(DeviceCounters::default());
        let mut id = [0u8; ID_BYTES];
        id[..6].copy_from_slice(b"serial");
        let mut server = RequestServer::new(
            MemoryBackend::new(SECTORS),
            RequestConfig {
                label: "virtio-blk-test (memory)".into(),
                read_only,
                id,
            },
            Arc::clone(&counters),
        );
        server.set_accepted_features(features);
        Disk {
            memory: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap(),
            server,
            counters,
            interrupt: CountingInterrupt::default(),
        }
    }

    fn all_features() -> u64 {
        (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
    }

    fn disk() -> Disk {
        disk_with(false, all_features())
    }

    /// A chain of `(addr, len, flags)` at descriptor indices 0.., linked
    /// in order.
    fn linked(parts: &[(u64, u32, u16)]) -> Vec<RawDescriptor> {
        parts
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let last = i + 1 == parts.len();
                let next_flag = if last { 0 } else { VRING_DESC_F_NEXT as u16 };
                RawDescriptor::from(Descriptor::new(
                    addr,
                    len,
                    flags | next_flag,
                    if last { 0 } else { i as u16 + 1 },
                ))
            })
            .collect()
    }

    fn header(request_type: u32, sector: u64) -> [u8; 16] {
        let mut bytes = [0u8; 16];
        bytes[..4].copy_from_slice(&request_type.to_le_bytes());
        bytes[8..].copy_from_slice(&sector.to_le_bytes());
        bytes
    }

    impl Disk {
        fn write(&self, addr: u64, bytes: &[u8]) {
            self.memory.write_slice(bytes, GuestAddress(addr)).unwrap();
        }

        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut bytes = vec![0; len];
            self.memory
                .read_slice(&mut bytes, GuestAddress(addr))
                .unwrap();
            bytes
        }

        fn status(&self) -> u8 {
            self.read(STATUS, 1)[0]
        }

        /// Makes the chains of `descriptors` available, serves the queue
        /// and returns the used ring's (id, len) entries.
        fn serve(&mut self, descriptors: &[RawDescriptor]) -> Vec<(u32, u32)> {
            self.serve_with(descriptors, |_, _| {})
        }

        /// [`Disk::serve`] on fresh rings, after `prepare` set up the
        /// queue or the rings.
        fn serve_with(
            &mut self,
            descriptors: &[RawDescriptor],
            prepare: impl FnOnce(&GuestMemoryMmap, &mut Queue),
        ) -> Vec<(u32, u32)> {
            // Fresh rings (they live below HEADER), and a status byte that
            // no request leaves as it is.
            self.write(0, &[0; HEADER as usize]);
            self.write(STATUS, &[0xee]);
            let mock = MockSplitQueue::new(&self.memory, QUEUE_SIZE);
            mock.add_desc_chains(descriptors, 0).unwrap();
            let mut queue: Queue = mock.create_queue().unwrap();
            prepare(&self.memory, &mut queue);
            self.server
                .serve_queue(&self.memory, &mut queue, 0, &self.interrupt);
            let used = mock.used();
            (0..used.idx().load())
                .map(|i| {
                    let element = used.ring().ref_at(usize::from(i)).unwrap().load();
                    (element.id(), element.len())
                })
                .collect()
        }

        fn serve_request(&mut self, request_type: u32, sector: u64, data: (u32, u16)) -> u32 {
            self.write(HEADER, &header(request_type, sector));
            let used = self.serve(&linked(&[
                (HEADER, 16, R),
                (DATA, data.0, data.1),
                (STATUS, 1, W),
            ]));
            assert_eq!(used.len(), 1);
            used[0].1
        }

        fn snapshot(&self) -> CounterSnapshot {
            self.counters.snapshot()
        }
    }

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    #[test]
    fn a_write_then_a_read_round_trip_through_the_backend() {
        let mut disk = disk();
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
        disk.write(DATA, &pattern);
        assert_eq!(disk.serve_request(VIRTIO_BLK_T_OUT, 3, (1024, R)), 1);
        assert_eq!(disk.status(), OK);
        assert_eq!(
            &disk.server.backend().data()[3 * 512..5 * 512],
            &pattern[..]
        );
        disk.write(DATA, &[0; 1024]);
        assert_eq!(disk.serve_request(VIRTIO_BLK_T_IN, 3, (1024, W)), 1025);
        assert_eq!(disk.status(), OK);
        assert_eq!(disk.read(DATA, 1024), pattern);
        assert_eq!(
            disk.snapshot(),
            CounterSnapshot {
                requests: 2,
                errors: 0,
                bytes_from_guest: 1024,
                bytes_to_guest: 1024
            }
        );
        assert_eq!(disk.interrupt.0.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn any_framing_works_header_with_data_and_data_with_status() {
        let mut disk = disk();
        // OUT: header and data in one descriptor, then the data's tail in
        // another.
        let mut out = header(VIRTIO_BLK_T_OUT, 1).to_vec();
        out.extend(std::iter::repeat_n(0x5a, 700));
        disk.write(HEADER, &out);
        disk.write(DATA, &[0x5b; 324]);
        let used = disk.serve(&linked(&[(HEADER, 716, R), (DATA, 324, R), (STATUS, 1, W)]));
        assert_eq!(used, [(0, 1)]);
        assert_eq!(disk.status(), OK);
        let data = disk.server.backend().data();
        assert!(data[512..512 + 700].iter().all(|b| *b == 0x5a));
        assert!(data[512 + 700..1536].iter().all(|b| *b == 0x5b));
        // IN: data split over two descriptors, the last holding the status.
        disk.write(HEADER, &header(VIRTIO_BLK_T_IN, 1));
        let used = disk.serve(&linked(&[
            (HEADER, 16, R),
            (DATA, 100, W),
            (STATUS - 924, 925, W),
        ]));
        assert_eq!(used, [(0, 1025)]);
        assert_eq!(disk.status(), OK);
        assert_eq!(disk.read(DATA, 100), vec![0x5a; 100]);
        let mut tail = vec![0x5a; 600];
        tail.extend(vec![0x5b; 324]);
        assert_eq!(disk.read(STATUS - 924, 924), tail);
    }

    #[test]
    fn flush_reaches_the_backend_and_writes_through_without_the_feature() {
        let mut disk = disk();
        disk.write(HEADER, &header(VIRTIO_BLK_T_FLUSH, 0));
        let used = disk.serve(&linked(&[(HEADER, 16, R), (STATUS, 1, W)]));
        assert_eq!(used, [(0, 1)]);
        assert_eq!(disk.status(), OK);
        assert_eq!(disk.server.backend().flushes(), 1);
        // Writes are not flushed when the driver flushes itself...
        disk.serve_request(VIRTIO_BLK_T_OUT, 0, (512, R));
        assert_eq!(disk.server.backend().flushes(), 1);
        // ...and are when it did not negotiate VIRTIO_BLK_F_FLUSH.
        disk.server.set_accepted_features(0);
        disk.serve_request(VIRTIO_BLK_T_OUT, 0, (512, R));
        assert_eq!(disk.server.backend().flushes(), 2);
    }

    #[test]
    fn get_id_returns_the_serial_zero_padded() {
        let mut disk = disk();
        disk.write(DATA, &[0xff; 32]);
        assert_eq!(disk.serve_request(VIRTIO_BLK_T_GET_ID, 0, (20, W)), 21);
        assert_eq!(disk.status(), OK);
        let mut expected = b"serial".to_vec();
        expected.resize(20, 0);
        assert_eq!(disk.read(DATA, 20), expected);
        assert_eq!(disk.read(DATA + 20, 1), [0xff], "nothing past 20 bytes");
        // A shorter buffer gets what fits.
        assert_eq!(disk.serve_request(VIRTIO_BLK_T_GET_ID, 0, (4, W)), 5);
    }

    #[test]
    fn unknown_and_unnegotiated_request_types_are_unsupported() {
        let mut disk = disk_with(false, 0);
        for request_type in [2, 10, 99, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
            assert_eq!(disk.serve_request(request_type, 0, (16, R)), 1);
            assert_eq!(disk.status(), UNSUPP, "type {request_type}");
        }
        assert_eq!(disk.snapshot().errors, 5);
    }

    #[test]
    fn a_sector_range_past_the_end_or_overflowing_is_an_io_error() {
        let mut disk = disk();
        for (sector, len) in [
            (SECTORS, 512),
            (SECTORS - 1, 1024),
            (u64::MAX, 512),
            (u64::MAX / 512 + 1, 0),
            (u64::MAX / 512, 512),
        ] {
            assert_eq!(disk.serve_request(VIRTIO_BLK_T_IN, sector, (len, W)), 1);
            assert_eq!(disk.status(), IOERR, "IN sector {sector} len {len}");
            assert_eq!(disk.serve_request(VIRTIO_BLK_T_OUT, sector, (len, R)), 1);
            assert_eq!(disk.status(), IOERR, "OUT sector {sector} len {len}");
        }
        assert_eq!(
            disk.server.backend().calls(),
            0,
            "refused before the backend"
        );
        // The last sector itself is fine.
        assert_eq!(
            disk.serve_request(VIRTIO_BLK_T_IN, SECTORS - 1, (512, W)),
            513
        );
        assert_eq!(disk.status(), OK);
    }

    #[test]
    fn data_that_is_not_whole_sectors_is_an_io_error() {
        let mut disk = disk();
        for len in [1, 511, 513] {
            assert_eq!(disk.serve_request(VIRTIO_BLK_T_IN, 0, (len, W)), 1);
            assert_eq!(disk.status(), IOERR);
            assert_eq!(disk.serve_request(VIRTIO_BLK_T_OUT, 0, (len, R)), 1);
            assert_eq!(disk.status(), IOERR);
        }
        assert_eq!(
            disk.server.backend().calls(),
            0,
            "refused before the backend"
        );
    }

    #[test]
    fn a_read_only_disk_refuses_writes() {
        let mut disk = disk_with(true, all_features());
        disk.write(DATA, &[0xaa; 512]);
        assert_eq!(disk.serve_request(VIRTIO_BLK_T_OUT, 0, (512, R)), 1);
        assert_eq!(disk.status(), IOERR);
        assert_eq!(disk.serve_request(VIRTIO_BLK_T_WRITE_ZEROES, 0, (16, R)), 1);
        assert_eq!(disk.status(), IOERR);
        assert_eq!(
            disk.server.backend().calls(),
            0,
            "refused before the backend"
        );
        // Reads and flushes still work.
        assert_eq!(disk.serve_request(VIRTIO_BLK_T_IN, 0, (512, W)), 513);
        assert_eq!(disk.status(), OK);
        disk.write(HEADER, &header(VIRTIO_BLK_T_FLUSH, 0));
        disk.serve(&linked(&[(HEADER, 16, R), (STATUS, 1, W)]));
        assert_eq!(disk.status(), OK);
    }

    #[test]
    fn a_host_io_error_is_an_io_error_status() {
        let mut disk = disk();
        disk.server.backend_mut().set_failing(true);
        for request_type in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH] {
            disk.serve_request(
                request_type,
                0,
                (512, if request_type == 0 { W } else { R }),
            );
            assert_eq!(disk.status(), IOERR, "type {request_type}");
        }
        assert_eq!(disk.snapshot().errors, 3);
    }

    #[test]
    fn a_descriptor_loop_completes_with_nothing_written() {
        let mut disk = disk();
        disk.write(HEADER, &header(VIRTIO_BLK_T_IN, 0));
        // 0 -> 1 -> 2 -> 1 -> ...
        let mut chain = linked(&[(HEADER, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
        chain[2] = RawDescriptor::from(Descriptor::new(STATUS, 1, W | VRING_DESC_F_NEXT as u16, 1));
        assert_eq!(disk.serve(&chain), [(0, 0)]);
        assert_eq!(disk.status(), 0xee, "no status written");
        // A descriptor that points at itself.
        let own = [RawDescriptor::from(Descriptor::new(
            HEADER,
            16,
            VRING_DESC_F_NEXT as u16,
            0,
        ))];
        assert_eq!(disk.serve(&own), [(0, 0)]);
        assert_eq!(disk.snapshot().errors, 2);
    }

    #[test]
    fn a_next_index_past_the_table_completes_with_nothing_written() {
        let mut disk = disk();
        disk.write(HEADER, &header(VIRTIO_BLK_T_IN, 0));
        let mut chain = linked(&[(HEADER, 16, R), (STATUS, 1, W)]);
        chain[0] = RawDescriptor::from(Descriptor::new(HEADER, 16, VRING_DESC_F_NEXT as u16, 999));
        assert_eq!(disk.serve(&chain), [(0, 0)]);
        assert_eq!(disk.status(), 0xee);
    }

    #[test]
    fn addresses_outside_guest_ram_are_refused() {
        let mut disk = disk();
        disk.write(HEADER, &header(VIRTIO_BLK_T_IN, 0));
        // The data outside RAM: an I/O error in the status byte.
        for addr in [RAM, RAM - 256, u64::MAX - 100] {
            let used = disk.serve(&linked(&[(HEADER, 16, R), (addr, 512, W), (STATUS, 1, W)]));
            assert_eq!(used, [(0, 1)], "data at {addr:#x}");
            assert_eq!(disk.status(), IOERR);
        }
        // The header outside RAM.
        let used = disk.serve(&linked(&[(RAM + 4096, 16, R), (STATUS, 1, W)]));
        assert_eq!(used, [(0, 1)]);
        assert_eq!(disk.status(), IOERR);
        // The status outside RAM: nothing can be reported.
        for addr in [RAM, u64::MAX] {
            let used = disk.serve(&linked(&[(HEADER, 16, R), (DATA, 512, W), (addr, 1, W)]));
            assert_eq!(used, [(0, 0)], "status at {addr:#x}");
        }
        // OUT data outside RAM never reaches the disk.
        disk.write(HEADER, &header(VIRTIO_BLK_T_OUT, 0));
        let used = disk.serve(&linked(&[
            (HEADER, 16, R),
            (RAM - 16, 512, R),
            (STATUS, 1, W),
        ]));
        assert_eq!(used, [(0, 1)]);
        assert_eq!(disk.status(), IOERR);
        assert_eq!(disk.snapshot().errors, 7);
        assert_eq!(
            disk.server.backend().calls(),
            0,
            "refused before the backend"
        );
    }

    #[test]
    fn zero_length_descriptors_carry_nothing() {
        let mut disk = disk();
        disk.write(DATA, &[0x11; 512]);
        disk.write(HEADER, &header(VIRTIO_BLK_T_OUT, 2));
        // Zero-length descriptors around the data and after the status,
        // one of them outside RAM.
        let used = disk.serve(&linked(&[
            (HEADER, 16, R),
            (u64::MAX, 0, R),
            (DATA, 512, R),
            (DATA, 0, R),
            (STATUS, 1, W),
            (RAM * 2, 0, W),
        ]));
        assert_eq!(used, [(0, 1)]);
        assert_eq!(disk.status(), OK);
        assert_eq!(&disk.server.backend().data()[1024..1536], &[0x11; 512]);
        // Only zero-length descriptors: no status byte.
        let used = disk.serve(&linked(&[(HEADER, 0, R), (STATUS, 0, W)]));
        assert_eq!(used, [(0, 0)]);
        assert_eq!(disk.status(), 0xee);
    }

    #[test]
    fn wrong_directions_are_refused() {
        let mut disk = disk();
        disk.write(HEADER, &header(VIRTIO_BLK_T_IN, 0));
        // A writable header: no readable header, the status says so.
        let used = disk.serve(&linked(&[(HEADER, 16, W), (DATA, 512, W), (STATUS, 1, W)]));
        assert_eq!(used, [(0, 1)]);
        assert_eq!(disk.status(), IOERR);
        // A readable status after writable data.
        let used = disk.serve(&linked(&[(HEADER, 16, R), (DATA, 512, W), (STATUS, 1, R)]));
        assert_eq!(used, [(0, 0)]);
        assert_eq!(disk.status(), 0xee);
        // Everything readable: no status byte at all.
        disk.write(HEADER, &header(VIRTIO_BLK_T_OUT, 0));
        let used = disk.serve(&linked(&[(HEADER, 16, R), (DATA, 512, R), (STATUS, 1, R)]));
        assert_eq!(used, [(0, 0)]);
        assert_eq!(disk.status(), 0xee);
        assert_eq!(
            disk.server.backend().calls(),
            0,
            "refused before the backend"
        );
    }

    #[test]
    fn a_missing_status_or_header_is_refused() {
        let mut disk = disk();
        disk.write(HEADER, &header(VIRTIO_BLK_T_FLUSH, 0));
        assert_eq!(disk.serve(&linked(&[(HEADER, 16, R)])), [(0, 0)]);
        // A header of 8 bytes.
        assert_eq!(
            disk.serve(&linked(&[(HEADER, 8, R), (STATUS, 1, W)])),
            [(0, 1)]
        );
        assert_eq!(disk.status(), IOERR);
        // Only a status byte.
        assert_eq!(disk.serve(&linked(&[(STATUS, 1, W)])), [(0, 1)]);
        assert_eq!(disk.status(), IOERR);
        assert_eq!(disk.server.backend().flushes(), 0);
    }

    #[test]
    fn an_indirect_chain_is_served() {
        let mut disk = disk();
        let table = 0x4_0000;
        for (i, descriptor) in linked(&[(HEADER, 16, R), (DATA, 512, W), (STATUS, 1, W)])
            .iter()
            .enumerate()
        {
            disk.memory
                .write_obj(*descriptor, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        disk.server.backend_mut().data_mut()[..512].fill(0x77);
        disk.write(HEADER, &header(VIRTIO_BLK_T_IN, 0));
        let used = disk.serve(&[RawDescriptor::from(Descriptor::new(
            table,
            48,
            VRING_DESC_F_INDIRECT as u16,
            0,
        ))]);
        assert_eq!(used, [(0, 513)]);
        assert_eq!(disk.read(DATA, 512), vec![0x77; 512]);
        // An indirect table whose length is not whole descriptors.
        let used = disk.serve(&[RawDescriptor::from(Descriptor::new(
            table,
            47,
            VRING_DESC_F_INDIRECT as u16,
            0,
        ))]);
        assert_eq!(used, [(0, 0)]);
    }

    #[test]
    fn discard_and_write_zeroes_zero_the_segments() {
        let mut disk = disk();
        disk.server.backend_mut().data_mut().fill(0xaa);
        let segment = |sector: u64, sectors: u32, flags: u32| {
            let mut bytes = sector.to_le_bytes().to_vec();
            bytes.extend(sectors.to_le_bytes());
            bytes.extend(flags.to_le_bytes());
            bytes
        };
        let mut segments = segment(1, 2, 0);
        segments.extend(segment(10, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP));
        disk.write(DATA, &segments);
        assert_eq!(disk.serve_request(VIRTIO_BLK_T_WRITE_ZEROES, 0, (32, R)), 1);
        assert_eq!(disk.status(), OK);
        let data = disk.server.backend().data().to_vec();
        assert!(data[..512].iter().all(|b| *b == 0xaa));
        assert!(data[512..1536].iter().all(|b| *b == 0));
        assert!(data[1536..5120].iter().all(|b| *b == 0xaa));
        assert!(data[5120..5632].iter().all(|b| *b == 0));
        disk.write(DATA, &segment(20, 1, 0));
        assert_eq!(disk.serve_request(VIRTIO_BLK_T_DISCARD, 0, (16, R)), 1);
        assert_eq!(disk.status(), OK);
        // Unmap on a discard and unknown flags are unsupported.
        for (request_type, flags) in [
            (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
            (VIRTIO_BLK_T_WRITE_ZEROES, 2),
        ] {
            disk.write(DATA, &segment(30, 1, flags));
            disk.serve_request(request_type, 0, (16, R));
            assert_eq!(disk.status(), UNSUPP);
        }
        // A segment past the end, one too large, a bad segment list: no
        // segment of the request is applied.
        let calls = disk.server.backend().calls();
        let mut late = segment(40, 1, 0);
        late.extend(segment(SECTORS, 1, 0));
        for (bytes, len) in [
            (late, 32),
            (segment(0, MAX_WRITE_ZEROES_SECTORS + 1, 0), 16),
            (segment(u64::MAX, 1, 0), 16),
            (segment(40, 1, 0), 17),
            (vec![], 0),
            (
                vec![0; 16 * (MAX_WRITE_ZEROES_SEGMENTS as usize + 1)],
                16 * 33,
            ),
        ] {
            disk.write(DATA, &bytes);
            disk.serve_request(VIRTIO_BLK_T_WRITE_ZEROES, 0, (len, R));
            assert_eq!(disk.status(), IOERR, "{len} bytes");
        }
        assert_eq!(
            disk.server.backend().calls(),
            calls,
            "refused before the backend"
        );
        assert!(disk.server.backend().data()[40 * 512..41 * 512]
            .iter()
            .all(|b| *b == 0xaa));
    }

    #[test]
    fn a_head_index_past_the_queue_is_not_returned() {
        let mut disk = disk();
        let mock = MockSplitQueue::new(&disk.memory, QUEUE_SIZE);
        // avail ring entry 0 names descriptor 200.
        disk.memory
            .write_obj(200u16, mock.avail_addr().unchecked_add(4))
            .unwrap();
        disk.memory
            .write_obj(1u16, mock.avail_addr().unchecked_add(2))
            .unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        disk.server
            .serve_queue(&disk.memory, &mut queue, 0, &disk.interrupt);
        assert_eq!(mock.used().idx().load(), 0);
        assert_eq!(queue.next_avail(), 1, "the entry was consumed");
        assert_eq!(disk.snapshot().errors, 1);
    }

    #[test]
    fn an_avail_index_too_far_ahead_stops_the_queue_without_spinning() {
        let mut disk = disk();
        let mock = MockSplitQueue::new(&disk.memory, QUEUE_SIZE);
        disk.memory
            .write_obj(QUEUE_SIZE + 1, mock.avail_addr().unchecked_add(2))
            .unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        disk.server
            .serve_queue(&disk.memory, &mut queue, 0, &disk.interrupt);
        assert_eq!(mock.used().idx().load(), 0);
        assert_eq!(disk.interrupt.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn event_index_suppresses_interrupts_the_driver_does_not_want() {
        let mut disk = disk();
        disk.write(HEADER, &header(VIRTIO_BLK_T_FLUSH, 0));
        let flush = linked(&[(HEADER, 16, R), (STATUS, 1, W)]);
        let mut two = flush.clone();
        two.extend(flush.iter().map(|d| {
            let d = Descriptor::from(*d);
            let next = if d.has_next() { d.next() + 2 } else { 0 };
            RawDescriptor::from(Descriptor::new(d.addr().0, d.len(), d.flags(), next))
        }));
        // used_event = 1: the driver wants an interrupt once the second
        // buffer is used, not for the first.
        let used_event = MockSplitQueue::new(&disk.memory, QUEUE_SIZE)
            .avail_addr()
            .unchecked_add(4 + 2 * u64::from(QUEUE_SIZE));
        let used = disk.serve_with(&two, |memory, queue| {
            memory.write_obj(1u16, used_event).unwrap();
            queue.set_event_idx(true);
        });
        assert_eq!(used, [(0, 1), (2, 1)]);
        assert_eq!(disk.interrupt.0.load(Ordering::SeqCst), 1);
        // And the device asked to be kicked for the next buffer (avail_event
        // = next avail index).
        let mock = MockSplitQueue::new(&disk.memory, QUEUE_SIZE);
        let avail_event = mock
            .used_addr()
            .unchecked_add(4 + 8 * u64::from(QUEUE_SIZE));
        assert_eq!(disk.memory.read_obj::<u16>(avail_event).unwrap(), 2);
    }
}
