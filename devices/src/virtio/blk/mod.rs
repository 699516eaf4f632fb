//! virtio-blk (virtio 1.2 section 5.2): a raw disk image as a guest block
//! device, e.g. `/dev/vda`.
//!
//! - [`BlockDevice`] is the model the transport drives ([`VirtioDevice`]):
//!   device type 2, one request queue of up to [`QUEUE_MAX_SIZE`] entries,
//!   the features of [`block_features`] and the `virtio_blk_config`
//!   configuration (capacity in 512-byte sectors, `seg_max`, `blk_size`,
//!   the discard and write-zeroes limits). [`BlockDevice::open`] opens and
//!   locks the image ([`backend::FileBackend`]) and starts the device's
//!   worker thread, so the thread exists before the guest runs.
//! - The worker serves the queue on each kick ([`request::RequestServer`]:
//!   IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES), with I/O straight
//!   between guest memory and the image, off the vCPU threads.
//! - [`sys`] holds the few system calls std lacks (`flock`, `preadv`,
//!   `pwritev`).
//!
//! The worker thread (after the VMM's [`ThreadInit`]) makes these system
//! calls: `epoll_wait`, `read`/`write` on eventfds (kicks, the control
//! eventfd, MSI-X irqfds through the transport's interrupt), `preadv`,
//! `pwritev`, `fdatasync`, `fallocate` (discard and write zeroes),
//! `pwrite64` (write zeroes where `fallocate` cannot zero), `futex`
//! (channels, logging) and what logging writes to stderr. `flock`,
//! `openat`, `statx`/`fstat` and `lseek` happen in [`BlockDevice::open`],
//! on the caller's thread.

pub mod backend;
pub mod request;
pub mod sys;

use std::mem::{offset_of, size_of};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

#[cfg(any(test, feature = "fake"))]
pub use self::backend::MemoryBackend;
pub use self::backend::{BlockBackend, FileBackend, ImageKind, SECTOR_SIZE};
pub use self::request::{RequestConfig, RequestServer, ID_BYTES};
use self::request::{
    MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEGMENTS,
};
use super::worker::{DeviceWorker, QueueHandler, ThreadInit, Watch};
use super::{
    read_config_bytes, ActivateError, Activation, DeviceCounters, DeviceType, VirtioDevice,
    VirtioInterrupt, VIRTIO_RING_F_EVENT_IDX,
};

/// The request queue's maximum size.
pub const QUEUE_MAX_SIZE: u16 = 256;
/// `seg_max`: the most data segments of one request; with the header and
/// the status a request fills a queue (or an indirect table) of
/// [`QUEUE_MAX_SIZE`].
pub const SEG_MAX: u32 = QUEUE_MAX_SIZE as u32 - 2;
/// `blk_size`: the logical block size the guest uses.
pub const BLOCK_SIZE: u32 = SECTOR_SIZE as u32;
/// `discard_sector_alignment`: 4 KiB, the page and file system block size
/// (holes are punched at any offset; this only steers the guest).
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;
/// The size of the configuration space (`virtio_blk_config`).
pub const CONFIG_SIZE: usize = size_of::<virtio_blk_config>();

/// Why a disk could not be set up. Each names the image and says what to
/// do.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The path does not exist.
    #[error("disk image {} does not exist; give the path of a raw disk image (an empty one is made with `truncate -s 8G {}`)", path.display(), path.display())]
    NotFound { path: PathBuf },
    /// The path is a directory.
    #[error("disk image {} is a directory; give the path of a raw disk image file or a block device", path.display())]
    Directory { path: PathBuf },
    /// The path is neither a regular file nor a block device.
    #[error("disk image {} is a {kind}, not a regular file or block device; give a raw disk image file or a block device", path.display())]
    NotAnImage {
        path: PathBuf,
        /// What it is (character device, FIFO, socket).
        kind: &'static str,
    },
    /// Opening (or examining) the image failed.
    #[error("cannot open disk image {}: {source}; {hint}", path.display())]
    Open {
        path: PathBuf,
        /// What to do about it.
        hint: &'static str,
        source: std::io::Error,
    },
    /// Another process holds a conflicting lock on the image.
    #[error("{}", locked_message(path, *read_only))]
    Locked {
        path: PathBuf,
        /// This disk was to be read-only (it wanted a shared lock).
        read_only: bool,
    },
    /// `flock` failed for another reason.
    #[error("cannot lock disk image {}: {source}; barge locks images so that two VMs cannot write one (a file system without flock support cannot hold a read-write disk)", path.display())]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The block device's size could not be read.
    #[error("cannot read the size of disk image {}: {source}", path.display())]
    Size {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The image has no bytes.
    #[error("disk image {} is empty (0 bytes); give it a size first, e.g. `truncate -s 8G {}`, and a file system or partition table", path.display(), path.display())]
    Empty { path: PathBuf },
    /// The image's size is not whole sectors (barge refuses rather than
    /// hide the tail).
    #[error("disk image {} is {size} bytes, not a whole number of 512-byte sectors; extend it with `truncate -s {rounded_up} {}` (barge does not round the size down: the tail would be lost)", path.display(), path.display())]
    UnalignedSize {
        path: PathBuf,
        size: u64,
        /// The next whole number of sectors, in bytes.
        rounded_up: u64,
    },
    /// A serial number that does not fit virtio's GET_ID.
    #[error("disk serial {serial:?} {reason}; a serial is at most 20 bytes of printable ASCII")]
    InvalidSerial {
        serial: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The worker thread could not start.
    #[error("cannot start the I/O thread of {name}: {source}")]
    Worker {
        name: String,
        source: std::io::Error,
    },
}

fn locked_message(path: &Path, read_only: bool) -> String {
    if read_only {
        format!(
            "disk image {} is open read-write in another process (another barge?); a read-only \
             disk shares its image only with other read-only users: stop the writer, or give \
             this VM a copy of the image",
            path.display()
        )
    } else {
        format!(
            "disk image {} is in use by another process (another barge?), which holds a lock \
             on it; stop that process, or give this VM its own copy of the image (or share it \
             read-only everywhere with readonly=on)",
            path.display()
        )
    }
}

/// Checks that `serial` fits GET_ID: at most [`ID_BYTES`] bytes of
/// printable ASCII (space to `~`).
pub fn validate_serial(serial: &str) -> Result<(), BlockError> {
    let invalid = |reason| BlockError::InvalidSerial {
        serial: serial.to_string(),
        reason,
    };
    if serial.len() > ID_BYTES {
        return Err(invalid("is longer than 20 bytes"));
    }
    if !serial.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return Err(invalid("has a character that is not printable ASCII"));
    }
    Ok(())
}

/// How to set up one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockOptions {
    /// The raw image: a regular file or a block device.
    pub path: PathBuf,
    /// The guest cannot write (VIRTIO_BLK_F_RO; the image is opened
    /// read-only and locked shared).
    pub read_only: bool,
    /// What GET_ID returns (at most 20 bytes of printable ASCII, the guest's
    /// `/sys/block/vda/serial` and `/dev/disk/by-id/virtio-<serial>`);
    /// `None`: [`FileBackend::default_serial`] (device and inode numbers).
    pub serial: Option<String>,
    /// The worker thread's name and the log prefix, e.g. `virtio-blk0`.
    pub name: String,
}

/// The device-specific features a disk offers: FLUSH, SEG_MAX, BLK_SIZE,
/// and RO when read-only, or DISCARD and WRITE_ZEROES when writable.
pub fn block_features(read_only: bool) -> u64 {
    let bit = |b: u32| 1u64 << b;
    let common = bit(VIRTIO_BLK_F_FLUSH) | bit(VIRTIO_BLK_F_SEG_MAX) | bit(VIRTIO_BLK_F_BLK_SIZE);
    if read_only {
        common | bit(VIRTIO_BLK_F_RO)
    } else {
        common | bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES)
    }
}

/// The configuration space of a disk of `capacity` sectors
/// (`virtio_blk_config`, little endian); the discard and write-zeroes
/// limits only when `discard` (their features are offered).
pub fn config_space(capacity: u64, discard: bool) -> [u8; CONFIG_SIZE] {
    let mut bytes = [0u8; CONFIG_SIZE];
    let mut put = |offset: usize, value: &[u8]| {
        bytes[offset..offset + value.len()].copy_from_slice(value);
    };
    put(
        offset_of!(virtio_blk_config, capacity),
        &capacity.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, seg_max),
        &SEG_MAX.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, blk_size),
        &BLOCK_SIZE.to_le_bytes(),
    );
    if discard {
        for (offset, value) in [
            (
                offset_of!(virtio_blk_config, max_discard_sectors),
                MAX_DISCARD_SECTORS,
            ),
            (
                offset_of!(virtio_blk_config, max_discard_seg),
                MAX_DISCARD_SEGMENTS,
            ),
            (
                offset_of!(virtio_blk_config, discard_sector_alignment),
                DISCARD_SECTOR_ALIGNMENT,
            ),
            (
                offset_of!(virtio_blk_config, max_write_zeroes_sectors),
                MAX_WRITE_ZEROES_SECTORS,
            ),
            (
                offset_of!(virtio_blk_config, max_write_zeroes_seg),
                MAX_WRITE_ZEROES_SEGMENTS,
            ),
        ] {
            put(offset, &value.to_le_bytes());
        }
        // Write zeroes with the unmap flag punches holes.
        put(offset_of!(virtio_blk_config, write_zeroes_may_unmap), &[1]);
    }
    bytes
}

/// The queue the worker serves while the device is active.
struct ActiveQueue {
    memory: GuestMemoryMmap,
    queue: Queue,
    index: u16,
    interrupt: Arc<dyn VirtioInterrupt>,
}

/// The worker half of a disk.
struct BlockQueueHandler<B> {
    server: RequestServer<B>,
    active: Option<ActiveQueue>,
    name: String,
}

impl<B: BlockBackend> QueueHandler for BlockQueueHandler<B> {
    fn activate(&mut self, activation: Activation, _watch: &mut Watch<'_>) {
        let Activation {
            memory,
            features,
            queues,
            interrupt,
        } = activation;
        self.server.set_accepted_features(features);
        let Some(activated) = queues.into_iter().find(|q| q.index == 0) else {
            log::warn!("{}: activated without its request queue", self.name);
            return;
        };
        let mut queue = activated.queue;
        queue.set_event_idx(features & VIRTIO_RING_F_EVENT_IDX != 0);
        self.active = Some(ActiveQueue {
            memory,
            queue,
            index: activated.index,
            interrupt,
        });
    }

    fn queue_kicked(&mut self, index: u16, _watch: &mut Watch<'_>) {
        if let Some(active) = self.active.as_mut().filter(|a| a.index == index) {
            self.server.serve_queue(
                &active.memory,
                &mut active.queue,
                active.index,
                active.interrupt.as_ref(),
            );
        }
    }

    fn reset(&mut self, _watch: &mut Watch<'_>) {
        self.active = None;
    }
}

/// A virtio-blk device (see the module docs).
#[derive(Debug)]
pub struct BlockDevice {
    worker: DeviceWorker,
    features: u64,
    config: [u8; CONFIG_SIZE],
    counters: Arc<DeviceCounters>,
    path: PathBuf,
    read_only: bool,
    serial: String,
    capacity: u64,
}

impl BlockDevice {
    /// Opens and locks the image of `options` and starts the worker thread
    /// (named `options.name`, running `thread_init` first). Every refusal
    /// is a [`BlockError`] naming the image.
    pub fn open(
        options: &BlockOptions,
        thread_init: Option<ThreadInit>,
    ) -> Result<BlockDevice, BlockError> {
        if let Some(serial) = &options.serial {
            validate_serial(serial)?;
        }
        let backend = FileBackend::open(&options.path, options.read_only)?;
        let serial = options
            .serial
            .clone()
            .unwrap_or_else(|| backend.default_serial());
        let label = format!("{} ({})", options.name, options.path.display());
        Self::with_backend(
            backend,
            &options.name,
            label,
            options.path.clone(),
            options.read_only,
            serial,
            thread_init,
        )
    }

    fn with_backend<B: BlockBackend>(
        backend: B,
        name: &str,
        label: String,
        path: PathBuf,
        read_only: bool,
        serial: String,
        thread_init: Option<ThreadInit>,
    ) -> Result<BlockDevice, BlockError> {
        let mut id = [0u8; ID_BYTES];
        let len = serial.len().min(ID_BYTES);
        id[..len].copy_from_slice(&serial.as_bytes()[..len]);
        let capacity = backend.size() / SECTOR_SIZE;
        let counters = Arc::new(DeviceCounters::default());
        let server = RequestServer::new(
            backend,
            RequestConfig {
                label,
                read_only,
                id,
            },
            Arc::clone(&counters),
        );
        let handler = BlockQueueHandler {
            server,
            active: None,
            name: name.to_string(),
        };
        let worker = DeviceWorker::spawn(name, handler, thread_init).map_err(|source| {
            BlockError::Worker {
                name: name.to_string(),
                source,
            }
        })?;
        Ok(BlockDevice {
            worker,
            features: block_features(read_only),
            config: config_space(capacity, !read_only),
            counters,
            path,
            read_only,
            serial,
            capacity,
        })
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the guest may not write.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// What GET_ID returns (before zero padding).
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// The disk's size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity
    }
}

impl VirtioDevice for BlockDevice {
    fn device_type(&self) -> DeviceType {
        DeviceType::Block
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_MAX_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        activation.require_queues(&[0])?;
        self.worker.activate(activation)
    }

    fn reset(&mut self) {
        self.worker.reset();
    }

    fn counters(&self) -> Arc<DeviceCounters> {
        Arc::clone(&self.counters)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileExt, MetadataExt};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    use vmm_sys_util::tempfile::TempFile;

    use super::*;
    use crate::virtio::{ActivatedQueue, CounterSnapshot, VIRTIO_F_VERSION_1};

    #[derive(Default)]
    struct CountingInterrupt(AtomicUsize);

    impl VirtioInterrupt for CountingInterrupt {
        fn signal_queue(&self, _queue: u16) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn signal_config(&self) {}
    }

    fn image(size: u64) -> TempFile {
        let file = TempFile::new_with_prefix("/tmp/barge-blk-device").unwrap();
        file.as_file().set_len(size).unwrap();
        file
    }

    fn options(image: &TempFile, read_only: bool, serial: Option<&str>) -> BlockOptions {
        BlockOptions {
            path: image.as_path().to_path_buf(),
            read_only,
            serial: serial.map(str::to_string),
            name: "virtio-blk-test".into(),
        }
    }

    fn read_u32(device: &BlockDevice, offset: u64) -> u32 {
        let mut data = [0; 4];
        device.read_config(offset, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn config_space_and_features_describe_the_disk() {
        let file = image(8 << 20);
        let device = BlockDevice::open(&options(&file, false, None), None).unwrap();
        assert_eq!(device.device_type(), DeviceType::Block);
        assert_eq!(device.queue_max_sizes(), [256]);
        let mut capacity = [0; 8];
        device.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), 16384);
        assert_eq!(device.capacity_sectors(), 16384);
        assert_eq!(read_u32(&device, 12), 254, "seg_max");
        assert_eq!(read_u32(&device, 20), 512, "blk_size");
        assert_eq!(read_u32(&device, 36), MAX_DISCARD_SECTORS);
        assert_eq!(read_u32(&device, 40), MAX_DISCARD_SEGMENTS);
        assert_eq!(read_u32(&device, 44), 8, "discard_sector_alignment");
        assert_eq!(read_u32(&device, 48), MAX_WRITE_ZEROES_SECTORS);
        assert_eq!(read_u32(&device, 52), MAX_WRITE_ZEROES_SEGMENTS);
        assert_eq!(read_u32(&device, 56) & 0xff, 1, "write_zeroes_may_unmap");
        assert_eq!(read_u32(&device, CONFIG_SIZE as u64), 0, "past the end");
        let features = device.features();
        for bit in [
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ] {
            assert_ne!(features & (1 << bit), 0, "feature bit {bit}");
        }
        assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);
        drop(device);

        let device = BlockDevice::open(&options(&file, true, None), None).unwrap();
        assert_ne!(device.features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(device.features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(device.features() & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert_eq!(read_u32(&device, 36), 0, "no discard limits");
        assert!(device.read_only());
    }

    #[test]
    fn serials_are_checked_and_default_to_device_and_inode() {
        let file = image(4096);
        for (serial, reason) in [
            ("123456789012345678901", "longer than 20 bytes"),
            ("tab\there", "not printable ASCII"),
            ("disk-é", "not printable ASCII"),
        ] {
            let err = BlockDevice::open(&options(&file, true, Some(serial)), None).unwrap_err();
            assert!(matches!(err, BlockError::InvalidSerial { .. }), "{err:?}");
            assert!(err.to_string().contains(reason), "{err}");
        }
        let device =
            BlockDevice::open(&options(&file, true, Some("12345678901234567890")), None).unwrap();
        assert_eq!(device.serial(), "12345678901234567890");
        drop(device);
        let device = BlockDevice::open(&options(&file, true, None), None).unwrap();
        let metadata = std::fs::metadata(file.as_path()).unwrap();
        let expected = format!("{:x}-{:x}", metadata.dev(), metadata.ino());
        assert!(expected.ends_with(device.serial()), "{}", device.serial());
    }

    #[test]
    fn open_errors_name_the_image() {
        let missing = BlockOptions {
            path: "/nonexistent/barge/disk.img".into(),
            read_only: false,
            serial: None,
            name: "virtio-blk0".into(),
        };
        let err = BlockDevice::open(&missing, None).unwrap_err();
        assert!(matches!(err, BlockError::NotFound { .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/barge/disk.img"));
        let dir = BlockOptions {
            path: "/tmp".into(),
            ..missing
        };
        let err = BlockDevice::open(&dir, None).unwrap_err();
        assert!(matches!(err, BlockError::Directory { .. }), "{err:?}");
        let file = image(4096);
        let _first = BlockDevice::open(&options(&file, false, None), None).unwrap();
        let err = BlockDevice::open(&options(&file, false, None), None).unwrap_err();
        assert!(matches!(err, BlockError::Locked { .. }), "{err:?}");
    }

    #[test]
    fn activation_needs_the_request_queue() {
        let file = image(4096);
        let mut device = BlockDevice::open(&options(&file, false, None), None).unwrap();
        let activation = Activation {
            memory: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap(),
            features: VIRTIO_F_VERSION_1,
            queues: vec![],
            interrupt: Arc::new(CountingInterrupt::default()),
        };
        assert!(matches!(
            device.activate(activation),
            Err(ActivateError::QueueMissing(0))
        ));
    }

    fn wait_for_used(memory: &GuestMemoryMmap, used_idx: GuestAddress, count: u16) {
        let start = Instant::now();
        while memory.read_obj::<u16>(used_idx).unwrap() != count {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the worker never completed request {count}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn the_worker_serves_kicks_and_signals_the_queue() {
        const HEADER: u64 = 0x1_0000;
        const DATA: u64 = 0x2_0000;
        const STATUS: u64 = 0x3_0000;
        let file = image(64 << 10);
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i % 251) as u8).collect();
        file.as_file().write_all_at(&pattern, 4096).unwrap();
        let inits = Arc::new(AtomicUsize::new(0));
        let init_count = Arc::clone(&inits);
        let init: ThreadInit = Arc::new(move |name: &str| {
            assert_eq!(name, "virtio-blk-test");
            init_count.fetch_add(1, Ordering::SeqCst);
        });
        let mut device =
            BlockDevice::open(&options(&file, false, Some("e2e")), Some(init)).unwrap();

        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mock = MockSplitQueue::new(&memory, 16);
        let kick = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
        let interrupt = Arc::new(CountingInterrupt::default());
        device
            .activate(Activation {
                memory: memory.clone(),
                features: VIRTIO_F_VERSION_1 | (1 << VIRTIO_BLK_F_FLUSH) | VIRTIO_RING_F_EVENT_IDX,
                queues: vec![ActivatedQueue {
                    index: 0,
                    queue: mock.create_queue().unwrap(),
                    kick: Arc::clone(&kick),
                }],
                interrupt: interrupt.clone(),
            })
            .unwrap();
        let used_idx = mock.used_addr().unchecked_add(2);

        let request =
            |descriptors: &[RawDescriptor], offset: u16, request_type: u32, sector: u64| {
                let mut header = [0u8; 16];
                header[..4].copy_from_slice(&request_type.to_le_bytes());
                header[8..].copy_from_slice(&sector.to_le_bytes());
                memory.write_slice(&header, GuestAddress(HEADER)).unwrap();
                mock.add_desc_chains(descriptors, offset).unwrap();
                kick.write(1).unwrap();
            };
        let next = VRING_DESC_F_NEXT as u16;
        let write = VRING_DESC_F_WRITE as u16;
        // IN of sectors 8 and 9.
        request(
            &[
                RawDescriptor::from(Descriptor::new(HEADER, 16, next, 1)),
                RawDescriptor::from(Descriptor::new(DATA, 1024, write | next, 2)),
                RawDescriptor::from(Descriptor::new(STATUS, 1, write, 0)),
            ],
            0,
            VIRTIO_BLK_T_IN,
            8,
        );
        wait_for_used(&memory, used_idx, 1);
        let mut data = vec![0u8; 1024];
        memory.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        assert_eq!(data, pattern);
        assert_eq!(memory.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0);
        assert_eq!(
            mock.used().ring().ref_at(0).unwrap().load().len(),
            1025,
            "data and status"
        );
        assert_eq!(interrupt.0.load(Ordering::SeqCst), 1);

        // OUT of the same bytes to sector 0, after the driver asked for an
        // interrupt at the next used buffer.
        memory
            .write_obj(1u16, mock.avail_addr().unchecked_add(4 + 2 * 16))
            .unwrap();
        request(
            &[
                RawDescriptor::from(Descriptor::new(HEADER, 16, next, 4)),
                RawDescriptor::from(Descriptor::new(DATA, 1024, next, 5)),
                RawDescriptor::from(Descriptor::new(STATUS, 1, write, 0)),
            ],
            3,
            VIRTIO_BLK_T_OUT,
            0,
        );
        wait_for_used(&memory, used_idx, 2);
        let mut on_disk = vec![0u8; 1024];
        file.as_file().read_exact_at(&mut on_disk, 0).unwrap();
        assert_eq!(on_disk, pattern);
        assert_eq!(interrupt.0.load(Ordering::SeqCst), 2);
        assert_eq!(
            device.counters().snapshot(),
            CounterSnapshot {
                requests: 2,
                errors: 0,
                bytes_from_guest: 1024,
                bytes_to_guest: 1024,
            }
        );
        assert_eq!(inits.load(Ordering::SeqCst), 1);

        // After a reset, kicks are not served.
        device.reset();
        request(
            &[
                RawDescriptor::from(Descriptor::new(HEADER, 16, next, 7)),
                RawDescriptor::from(Descriptor::new(STATUS, 1, write, 0)),
            ],
            6,
            VIRTIO_BLK_T_IN,
            0,
        );
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(memory.read_obj::<u16>(used_idx).unwrap(), 2);
    }
}
