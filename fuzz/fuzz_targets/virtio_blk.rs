//! The virtio-blk request path (`devices::virtio::blk::RequestServer`) over
//! an in-memory disk: the input is the guest's memory, holding a split
//! queue's descriptor table, available ring and buffers, and the device
//! serves whatever the available ring offers.
//!
//! Byte 0, the setup: bit 0 VIRTIO_RING_F_EVENT_IDX, bit 1 read-only disk,
//! bit 2 the driver accepted VIRTIO_BLK_F_FLUSH, bit 3 DISCARD, bit 4
//! WRITE_ZEROES, bit 5 every backend operation fails (host I/O errors),
//! bits 6-7 the queue size (2, 4, 8 or 16).
//!
//! The rest is guest memory from address 0: three regions, 0..0x1000 and
//! 0x1000..0x2000 (adjacent, so a buffer across 0x1000 is two slices) and
//! 0x3000..0x4000 after a hole (input past 0x2000 bytes lands there). The
//! queue: descriptor table at 0x0, available ring at 0x100 (its `idx` at
//! 0x102: how many chains are available), used ring at 0x200; buffers
//! anywhere (or nowhere). The disk is 16 sectors of 0xa5.
//!
//! Checked: no panic; every used entry is a served request; an available
//! index more than a queue ahead serves nothing; a read-only disk never
//! changes; a second pass over the same rings serves nothing new.
#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use devices::virtio::blk::{MemoryBackend, RequestConfig, RequestServer, ID_BYTES};
use devices::virtio::{DeviceCounters, VirtioInterrupt};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x100;
const USED_RING: u64 = 0x200;
const DISK_SECTORS: u64 = 16;
const DISK_FILL: u8 = 0xa5;

// The feature bits, as in virtio-bindings' virtio_blk (the fuzz crate has
// no direct dependency on it).
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;

#[derive(Default)]
struct CountingInterrupt(AtomicU64);

impl VirtioInterrupt for CountingInterrupt {
    fn signal_queue(&self, queue: u16) {
        assert_eq!(queue, 0);
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn signal_config(&self) {}
}

fn memory(image: &[u8]) -> GuestMemoryMmap {
    let memory = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x1000),
        (GuestAddress(0x1000), 0x1000),
        (GuestAddress(0x3000), 0x1000),
    ])
    .expect("three small regions");
    let (low, high) = image.split_at(image.len().min(0x2000));
    memory
        .write_slice(low, GuestAddress(0))
        .expect("fits 0..0x2000");
    memory
        .write_slice(&high[..high.len().min(0x1000)], GuestAddress(0x3000))
        .expect("fits 0x3000..0x4000");
    memory
}

fn queue(size: u16, event_idx: bool) -> Queue {
    let mut queue = Queue::new(16).expect("16 is a queue size");
    queue.set_size(size);
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    queue
}

fuzz_target!(|input: &[u8]| {
    let Some((&setup, image)) = input.split_first() else {
        return;
    };
    let read_only = setup & 2 != 0;
    let mut features = 0;
    for (bit, feature) in [
        (4, VIRTIO_BLK_F_FLUSH),
        (8, VIRTIO_BLK_F_DISCARD),
        (16, VIRTIO_BLK_F_WRITE_ZEROES),
    ] {
        if setup & bit != 0 {
            features |= feature;
        }
    }
    let size = 2u16 << (setup >> 6);

    let memory = memory(image);
    let mut backend = MemoryBackend::new(DISK_SECTORS);
    backend.data_mut().fill(DISK_FILL);
    backend.set_failing(setup & 32 != 0);
    let counters = Arc::new(DeviceCounters::default());
    let mut id = [0u8; ID_BYTES];
    id[..10].copy_from_slice(b"fuzz-disk0");
    let mut server = RequestServer::new(
        backend,
        RequestConfig {
            label: "virtio-blk-fuzz".into(),
            read_only,
            id,
        },
        Arc::clone(&counters),
    );
    server.set_accepted_features(features);
    let mut queue = queue(size, setup & 1 != 0);
    // The transport activates only queues whose rings fit guest RAM.
    if !queue.is_valid(&memory) {
        return;
    }
    let available = memory
        .read_obj::<u16>(GuestAddress(AVAIL_RING + 2))
        .expect("in RAM");
    let interrupt = CountingInterrupt::default();
    server.serve_queue(&memory, &mut queue, 0, &interrupt);

    let served = counters.snapshot();
    // The device's count of used entries (the ring's own idx is guest
    // memory: the input sets it, and a request may overwrite it).
    assert!(
        u64::from(queue.next_used()) <= served.requests || served.requests > 0xffff,
        "a used entry for each served request"
    );
    // (A request may read into the avail ring and make more available, so
    // `available` bounds nothing in general; too far ahead, it stops all.)
    if available > size {
        assert_eq!(
            served.requests, 0,
            "an avail index too far ahead is refused"
        );
    }
    assert!(served.errors <= served.requests);
    assert!(interrupt.0.load(Ordering::Relaxed) <= served.requests);
    if read_only {
        assert!(
            server.backend().data().iter().all(|b| *b == DISK_FILL),
            "a read-only disk changed"
        );
    }

    // Nothing new was made available: a second kick serves nothing.
    server.serve_queue(&memory, &mut queue, 0, &interrupt);
    assert_eq!(counters.snapshot().requests, served.requests);
});
