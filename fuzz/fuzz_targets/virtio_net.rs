//! virtio-net RX and TX: `devices::virtio::net::handler::NetQueues` over a
//! `UnixDatagram` pair, with guest RAM, descriptor tables and rings the
//! input writes.
//!
//! Input: byte 0 picks the queue size (`1 << (bits 0..=2 % 5)`, 1 to 16)
//! and EVENT_IDX (bit 3); the next [`RING_BYTES`] bytes are copied to guest
//! address 0 (both rings: descriptor tables, available rings, and the
//! start of the buffer area). The rest are operations, one byte each
//! (low 3 bits), some with arguments:
//! 0 RX kick, 1 TX kick, 2 the peer sends a frame (2 length bytes), 3 the
//! peer drains its socket, 4 eight bytes written to guest RAM (2 offset
//! bytes, 8 data bytes: a driver adding chains or changing the rings), 5
//! reset (activated again at every second reset), 6-7 the backend ready
//! both ways.
//!
//! Checks: nothing panics; a frame reaching the peer is never longer than
//! the largest frame; the device never takes more bytes from the peer
//! than it sent; the backend is never watched while the device is reset.
#![no_main]

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use devices::virtio::net::handler::{NetQueues, MAX_FRAME_LEN};
use devices::virtio::net::{RX_QUEUE, TX_QUEUE};
use devices::virtio::{
    ActivatedQueue, Activation, DeviceCounters, VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest RAM: 64 KiB, so that most fuzzed addresses are outside.
const RAM_SIZE: usize = 0x10000;
/// Input bytes copied to guest address 0.
const RING_BYTES: usize = 0x800;
/// Where each queue's rings are (RX, TX): descriptor table, avail, used.
const RINGS: [(u64, u64, u64); 2] = [(0x000, 0x100, 0x200), (0x400, 0x500, 0x600)];

struct NoInterrupt;

impl VirtioInterrupt for NoInterrupt {
    fn signal_queue(&self, _queue: u16) {}
    fn signal_config(&self) {}
}

fn queue(size: u16, event_idx: bool, (desc, avail, used): (u64, u64, u64)) -> Queue {
    let mut queue = Queue::new(16).unwrap();
    queue.set_size(size);
    queue.set_desc_table_address(Some(desc as u32), Some(0));
    queue.set_avail_ring_address(Some(avail as u32), Some(0));
    queue.set_used_ring_address(Some(used as u32), Some(0));
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    queue
}

fn activation(
    memory: &GuestMemoryMmap,
    size: u16,
    event_idx: bool,
    kick: &Arc<EventFd>,
) -> Activation {
    Activation {
        memory: memory.clone(),
        features: VIRTIO_F_VERSION_1,
        queues: [RX_QUEUE, TX_QUEUE]
            .into_iter()
            .map(|index| ActivatedQueue {
                index,
                queue: queue(size, event_idx, RINGS[usize::from(index)]),
                kick: Arc::clone(kick),
            })
            .collect(),
        interrupt: Arc::new(NoInterrupt),
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&setup, input)) = input.split_first() else {
        return;
    };
    let size = 1u16 << ((setup & 7) % 5);
    let event_idx = setup & 8 != 0;
    let (rings, mut ops) = input.split_at(input.len().min(RING_BYTES));
    let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM_SIZE)]).unwrap();
    memory.write_slice(rings, GuestAddress(0)).unwrap();
    let (device, peer) = UnixDatagram::pair().unwrap();
    device.set_nonblocking(true).unwrap();
    peer.set_nonblocking(true).unwrap();
    let kick = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let counters = Arc::new(DeviceCounters::default());
    let mut net = NetQueues::new("virtio-net-fuzz", device, Arc::clone(&counters));
    net.activate(activation(&memory, size, event_idx, &kick));
    let mut resets = 0u32;
    let mut peer_sent = 0u64;
    let mut buffer = vec![0u8; MAX_FRAME_LEN + 64];
    while let Some((&op, rest)) = ops.split_first() {
        ops = rest;
        match op & 7 {
            0 => net.process_rx(),
            1 => net.process_tx(),
            2 => {
                let Some((len, rest)) = ops.split_first_chunk::<2>() else {
                    break;
                };
                ops = rest;
                let len = usize::from(u16::from_le_bytes(*len)) % 2048;
                let frame: Vec<u8> = (0..len).map(|i| i as u8 ^ op).collect();
                if peer.send(&frame).is_ok() {
                    peer_sent += len as u64;
                }
            }
            3 => {
                while let Ok(len) = peer.recv(&mut buffer) {
                    assert!(len <= MAX_FRAME_LEN, "a {len}-byte frame reached the peer");
                }
            }
            4 => {
                let Some((offset, rest)) = ops.split_first_chunk::<2>() else {
                    break;
                };
                let Some((data, rest)) = rest.split_first_chunk::<8>() else {
                    break;
                };
                ops = rest;
                let offset = u64::from(u16::from_le_bytes(*offset)) % (RAM_SIZE as u64 - 8);
                memory.write_slice(data, GuestAddress(offset)).unwrap();
            }
            5 => {
                net.reset();
                resets += 1;
                if resets % 2 == 0 {
                    net.activate(activation(&memory, size, event_idx, &kick));
                }
            }
            _ => {
                net.process_tx();
                net.process_rx();
            }
        }
        if resets % 2 == 1 {
            assert_eq!(net.interest(), EventSet::empty(), "watching while reset");
        }
        let served = counters.snapshot();
        assert!(
            served.bytes_to_guest <= peer_sent,
            "more received than sent"
        );
        assert!(served.errors <= served.requests);
    }
});
