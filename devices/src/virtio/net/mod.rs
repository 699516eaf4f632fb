//! virtio-net over a tap interface (virtio 1.2 section 5.1).
//!
//! [`NetDevice`] is the model the transport drives: device type 1, two
//! queues of at most [`QUEUE_SIZE`] entries (RX [`RX_QUEUE`], TX
//! [`TX_QUEUE`]; no control queue, no multiqueue), and the configuration
//! space `virtio_net_config` up to `status` (the MAC and the link state,
//! always up). Its frames go through a [`tap::Tap`] on a worker thread
//! ([`handler`]), never on a vCPU thread.
//!
//! # Features
//!
//! Offered: `VIRTIO_NET_F_MAC` (the MAC given or generated, see
//! [`NetOptions::mac`]) and `VIRTIO_NET_F_STATUS`; the transport adds
//! VERSION_1, EVENT_IDX and INDIRECT_DESC. Every packet carries the 12-byte
//! `virtio_net_hdr_v1` (`num_buffers` always present in virtio 1.x).
//!
//! Not offered:
//! - checksum and segmentation offloads (`CSUM`, `GUEST_CSUM`, `*_TSO*`,
//!   `*_UFO`): the tap is told to hand over only complete frames
//!   (`TUNSETOFFLOAD` 0) and the guest computes its checksums, so no
//!   header field ever means anything and nothing has to be kept
//!   consistent between guest, device and tap;
//! - `MRG_RXBUF`: the buffers of one merged packet must become visible to
//!   the driver together (5.1.6.4.2), but `virtio-queue` 0.18 publishes the
//!   used index on every `add_used`, so a driver polling the used ring
//!   could see the first buffer of a packet without the rest. Without it a
//!   driver offers buffers of at least 1526 bytes (Linux: 1530), each RX
//!   frame goes into one buffer, and a longer frame is dropped and counted.
//!
//! # Bounded memory
//!
//! RX reads the tap only into a buffer the guest has made available
//! (see [`handler`]): a guest that stops reading its RX queue leaves the
//! frames in the tap's queue, which the kernel bounds and drops from;
//! barge holds one bounce buffer per direction and nothing else.

pub mod handler;
pub mod tap;

use std::fs::File;
use std::io::{self, Read};
use std::mem::offset_of;
use std::sync::Arc;

use virtio_bindings::virtio_net::{
    virtio_net_config, virtio_net_hdr_v1, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};

use self::handler::{NetHandler, PacketBackend};
use self::tap::{Tap, TapError};
use super::worker::{DeviceWorker, ThreadInit};
use super::{
    read_config_bytes, ActivateError, Activation, DeviceCounters, DeviceType, VirtioDevice,
};

/// The receive queue.
pub const RX_QUEUE: u16 = 0;
/// The transmit queue.
pub const TX_QUEUE: u16 = 1;
/// The largest size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The virtio-net header in front of every frame (`virtio_net_hdr_v1`).
pub const VIRTIO_NET_HDR_LEN: usize = 12;
const _: () = assert!(std::mem::size_of::<virtio_net_hdr_v1>() == VIRTIO_NET_HDR_LEN);

/// The device features offered (see the module docs).
pub const NET_FEATURES: u64 = (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS);

/// The configuration space exposed: `virtio_net_config` up to `status`.
const CONFIG_LEN: usize = offset_of!(virtio_net_config, status) + 2;

/// The name the device's worker thread and logs get by default.
pub const DEFAULT_NAME: &str = "virtio-net0";

/// What a virtio-net device is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetOptions {
    /// The tap interface, which must exist (at most 15 bytes).
    pub tap: String,
    /// The guest's MAC address; `None`: a random locally administered
    /// unicast one, new for every VM ([`generate_mac`]).
    pub mac: Option<[u8; 6]>,
    /// The device's name (worker thread, logs), e.g. [`DEFAULT_NAME`].
    pub name: String,
}

impl NetOptions {
    /// Options for tap `tap` with a generated MAC and the default name.
    pub fn new(tap: &str) -> Self {
        NetOptions {
            tap: tap.to_string(),
            mac: None,
            name: DEFAULT_NAME.to_string(),
        }
    }
}

/// Why a virtio-net device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap could not be attached.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// A multicast MAC address was given.
    #[error("MAC {} is a multicast address, which a network card cannot have; clear the lowest bit of the first byte (e.g. 02:00:00:00:00:01), or give none to have one generated", format_mac(.0))]
    MulticastMac([u8; 6]),
    /// No random bytes for the MAC.
    #[error("cannot read /dev/urandom to generate a MAC address ({0}); give one with mac=")]
    Random(#[source] io::Error),
    /// The worker thread could not be started.
    #[error("{name}: cannot start the worker thread: {source}")]
    Worker {
        /// The device name.
        name: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// Formats a MAC the usual way, `02:ab:cd:00:11:22`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Whether `mac` is a multicast (or broadcast) address.
pub fn is_multicast_mac(mac: &[u8; 6]) -> bool {
    mac[0] & 0x01 != 0
}

/// A locally administered unicast MAC made from `random`: the
/// locally-administered bit of the first byte set, the multicast bit clear.
pub fn local_mac_from(random: [u8; 6]) -> [u8; 6] {
    let mut mac = random;
    mac[0] = (mac[0] | 0x02) & !0x01;
    mac
}

/// A random locally administered unicast MAC (6 bytes of /dev/urandom).
pub fn generate_mac() -> Result<[u8; 6], NetError> {
    let mut random = [0u8; 6];
    File::open("/dev/urandom")
        .and_then(|mut urandom| urandom.read_exact(&mut random))
        .map_err(NetError::Random)?;
    Ok(local_mac_from(random))
}

/// The virtio-net device model (see the module docs).
#[derive(Debug)]
pub struct NetDevice {
    name: String,
    mac: [u8; 6],
    config: [u8; CONFIG_LEN],
    counters: Arc<DeviceCounters>,
    worker: DeviceWorker,
}

impl NetDevice {
    /// Attaches to the tap `options.tap` (which must exist) and starts the
    /// device's worker thread (running `thread_init` first).
    pub fn open(
        options: &NetOptions,
        thread_init: Option<ThreadInit>,
    ) -> Result<NetDevice, NetError> {
        let mac = match options.mac {
            Some(mac) if is_multicast_mac(&mac) => return Err(NetError::MulticastMac(mac)),
            Some(mac) => mac,
            None => generate_mac()?,
        };
        let tap = Tap::open(&options.tap)?;
        log::info!(
            "{}: tap {}, guest MAC {}",
            options.name,
            tap.name(),
            format_mac(&mac)
        );
        Self::with_backend(&options.name, mac, tap, thread_init)
    }

    /// A device over any frame backend (tests, fuzzing, embedders): `mac`
    /// as given, `thread_init` run first on the worker thread `name`.
    pub fn with_backend<B: PacketBackend>(
        name: &str,
        mac: [u8; 6],
        backend: B,
        thread_init: Option<ThreadInit>,
    ) -> Result<NetDevice, NetError> {
        let counters = Arc::new(DeviceCounters::default());
        let handler = NetHandler::new(name, backend, Arc::clone(&counters));
        let worker =
            DeviceWorker::spawn(name, handler, thread_init).map_err(|source| NetError::Worker {
                name: name.to_string(),
                source,
            })?;
        Ok(NetDevice {
            name: name.to_string(),
            mac,
            config: config_bytes(mac),
            counters,
            worker,
        })
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// `virtio_net_config` up to `status`: the MAC and link up.
fn config_bytes(mac: [u8; 6]) -> [u8; CONFIG_LEN] {
    let config = virtio_net_config {
        mac,
        status: VIRTIO_NET_S_LINK_UP as u16,
        ..Default::default()
    };
    let mut bytes = [0u8; CONFIG_LEN];
    let mac_at = offset_of!(virtio_net_config, mac);
    let status_at = offset_of!(virtio_net_config, status);
    bytes[mac_at..mac_at + 6].copy_from_slice(&config.mac);
    let status = config.status;
    bytes[status_at..status_at + 2].copy_from_slice(&status.to_le_bytes());
    bytes
}

const QUEUE_MAX_SIZES: [u16; 2] = [QUEUE_SIZE, QUEUE_SIZE];

impl VirtioDevice for NetDevice {
    fn device_type(&self) -> DeviceType {
        DeviceType::Net
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_MAX_SIZES
    }

    fn features(&self) -> u64 {
        NET_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        activation.require_queues(&[RX_QUEUE, TX_QUEUE])?;
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
    use std::time::{Duration, Instant};

    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::{Bytes, GuestAddress};

    use super::handler::tests::{
        descriptor, frame, memory, offer, socket_pair, used, write_tx_chain, Setup,
    };
    use super::*;

    #[test]
    fn generated_macs_are_local_unicast_and_differ() {
        for random in [[0xff; 6], [0; 6], [0x01, 2, 3, 4, 5, 6]] {
            let mac = local_mac_from(random);
            assert_eq!(mac[0] & 0x03, 0x02, "{}", format_mac(&mac));
            assert_eq!(mac[1..], random[1..]);
        }
        let first = generate_mac().unwrap();
        let second = generate_mac().unwrap();
        assert!(!is_multicast_mac(&first) && first[0] & 0x02 != 0);
        assert_ne!(first, second, "random per VM");
        assert_eq!(
            format_mac(&[0x02, 0xab, 0, 0x11, 0x22, 0xff]),
            "02:ab:00:11:22:ff"
        );
    }

    #[test]
    fn a_multicast_mac_is_refused() {
        let options = NetOptions {
            mac: Some([0x01, 0, 0x5e, 0, 0, 1]),
            ..NetOptions::new("tap0")
        };
        let err = NetDevice::open(&options, None).unwrap_err();
        assert!(matches!(err, NetError::MulticastMac(_)), "{err:?}");
        assert!(err.to_string().contains("01:00:5e:00:00:01"), "{err}");
    }

    #[test]
    fn open_reports_a_missing_tap_and_a_name_too_long() {
        let err = NetDevice::open(&NetOptions::new("brg-nx-4f2a9c1"), None).unwrap_err();
        assert!(
            err.to_string()
                .contains("create it with `ip tuntap add dev brg-nx-4f2a9c1 mode tap`"),
            "{err}"
        );
        let err = NetDevice::open(&NetOptions::new("sixteen-bytes-xx"), None).unwrap_err();
        assert!(err.to_string().contains("longer than 15 bytes"), "{err}");
    }

    #[test]
    fn the_model_offers_mac_and_status_and_reads_its_config() {
        let (device, _peer) = socket_pair();
        let mac = [0x02, 1, 2, 3, 4, 5];
        let net = NetDevice::with_backend("virtio-net-test", mac, device, None).unwrap();
        assert_eq!(net.device_type(), DeviceType::Net);
        assert_eq!(net.queue_max_sizes(), [256, 256]);
        assert_eq!(
            net.features(),
            (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS)
        );
        let mut config = [0xffu8; 10];
        net.read_config(0, &mut config);
        assert_eq!(
            config,
            [2, 1, 2, 3, 4, 5, 1, 0, 0, 0],
            "mac, link up, then 0"
        );
        let mut status = [0u8; 2];
        net.read_config(6, &mut status);
        assert_eq!(u16::from_le_bytes(status), VIRTIO_NET_S_LINK_UP as u16);
        assert_eq!(net.mac(), mac);
    }

    #[test]
    fn activation_without_the_tx_queue_is_refused() {
        let memory = memory();
        let setup = Setup::new(&memory);
        let (device, _peer) = socket_pair();
        let mut net =
            NetDevice::with_backend("virtio-net-test", [2, 0, 0, 0, 0, 1], device, None).unwrap();
        let mut activation = setup.activation();
        activation.queues.retain(|queue| queue.index == RX_QUEUE);
        assert!(matches!(
            net.activate(activation),
            Err(ActivateError::QueueMissing(TX_QUEUE))
        ));
    }

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn the_worker_moves_frames_both_ways_and_signals() {
        let memory = memory();
        let setup = Setup::new(&memory);
        let (device, peer) = socket_pair();
        let mut net =
            NetDevice::with_backend("virtio-net-test", [2, 0, 0, 0, 0, 1], device, None).unwrap();
        let activation = setup.activation();
        let rx_kick = Arc::clone(&activation.queues[0].kick);
        let tx_kick = Arc::clone(&activation.queues[1].kick);
        net.activate(activation).unwrap();

        // TX: a chain offered and kicked reaches the peer.
        let sent = frame(98, 7);
        write_tx_chain(&memory, &setup.tx, 0, 0x10000, &sent);
        tx_kick.write(1).unwrap();
        let mut buffer = [0u8; 2048];
        peer.set_nonblocking(false).unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let len = peer.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..len], sent);
        wait_until("the TX chain used", || used(&setup.tx) == [(0, 0)]);
        wait_until("the TX interrupt", || {
            setup.interrupt.queues.lock().unwrap().contains(&TX_QUEUE)
        });

        // RX: a frame sent before there is a buffer waits for the kick.
        let received = frame(60, 8);
        peer.send(&received).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(used(&setup.rx).is_empty());
        offer(
            &setup.rx,
            0,
            &[descriptor(0x20000, 1530, VRING_DESC_F_WRITE, 0)],
        );
        rx_kick.write(1).unwrap();
        wait_until("the RX chain used", || used(&setup.rx) == [(0, 72)]);
        let mut got = vec![0u8; 60];
        memory
            .read_slice(&mut got, GuestAddress(0x20000 + 12))
            .unwrap();
        assert_eq!(got, received);
        wait_until("the RX interrupt", || {
            setup.interrupt.queues.lock().unwrap().contains(&RX_QUEUE)
        });

        // With a buffer left, a frame arriving later is delivered on the
        // backend's readiness alone.
        offer(
            &setup.rx,
            1,
            &[descriptor(0x30000, 1530, VRING_DESC_F_WRITE, 0)],
        );
        rx_kick.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        peer.send(&frame(70, 9)).unwrap();
        wait_until("the second RX chain used", || used(&setup.rx).len() == 2);

        let counters = net.counters().snapshot();
        assert_eq!(counters.requests, 3);
        assert_eq!(counters.bytes_from_guest, 98);
        assert_eq!(counters.bytes_to_guest, 130);
        net.reset();
        // After the reset the socket is not read.
        peer.send(&frame(60, 10)).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(net.counters().snapshot().requests, 3);
    }

    /// An IPv4/UDP frame from `src_mac` 10.99.0.2:40000 to `dst_mac`
    /// 10.99.0.1:`port` (UDP checksum 0, allowed for IPv4).
    fn udp_frame(src_mac: [u8; 6], dst_mac: [u8; 6], port: u16, payload: &[u8]) -> Vec<u8> {
        let mut frame = Vec::new();
        frame.extend_from_slice(&dst_mac);
        frame.extend_from_slice(&src_mac);
        frame.extend_from_slice(&[0x08, 0x00]);
        let total = (20 + 8 + payload.len()) as u16;
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0, 10, 99, 0, 2, 10, 99, 0, 1,
        ];
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        let sum = ip
            .chunks(2)
            .map(|pair| u32::from(u16::from_be_bytes([pair[0], pair[1]])))
            .sum::<u32>();
        let sum = (sum & 0xffff) + (sum >> 16);
        let checksum = !((sum & 0xffff) + (sum >> 16)) as u16;
        ip[10..12].copy_from_slice(&checksum.to_be_bytes());
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&40000u16.to_be_bytes());
        frame.extend_from_slice(&port.to_be_bytes());
        frame.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
        frame.extend_from_slice(&[0, 0]);
        frame.extend_from_slice(payload);
        frame
    }

    /// Against a real tap: `ip tuntap add dev bargetest0 mode tap; ip addr
    /// add 10.99.0.1/24 dev bargetest0; ip link set bargetest0 up`, then
    /// `BARGE_TEST_TAP=bargetest0 cargo test -p devices --lib -- --ignored
    /// real_tap`. A UDP datagram the guest sends reaches a host socket, and
    /// the host's ARP request for the guest's address reaches an RX buffer.
    #[test]
    #[ignore = "needs root and a tap with 10.99.0.1/24: see the doc comment"]
    fn a_real_tap_moves_frames_both_ways() {
        let tap = std::env::var("BARGE_TEST_TAP").expect("BARGE_TEST_TAP names the tap");
        let tap_mac: Vec<u8> = std::fs::read_to_string(format!("/sys/class/net/{tap}/address"))
            .unwrap()
            .trim()
            .split(':')
            .map(|byte| u8::from_str_radix(byte, 16).unwrap())
            .collect();
        let tap_mac: [u8; 6] = tap_mac.try_into().unwrap();
        let host = std::net::UdpSocket::bind("10.99.0.1:0").unwrap();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let port = host.local_addr().unwrap().port();

        let guest_mac = [0x02, 0xba, 0x26, 0, 0, 2];
        let options = NetOptions {
            mac: Some(guest_mac),
            ..NetOptions::new(&tap)
        };
        let mut net = NetDevice::open(&options, None).unwrap();
        // A second user of the same tap is refused as busy.
        let err = NetDevice::open(&options, None).unwrap_err();
        assert!(err.to_string().contains("is busy"), "{err}");

        let memory = memory();
        let setup = Setup::new(&memory);
        let activation = setup.activation();
        let tx_kick = Arc::clone(&activation.queues[1].kick);
        let rx_kick = Arc::clone(&activation.queues[0].kick);
        net.activate(activation).unwrap();
        for i in 0..8 {
            offer(
                &setup.rx,
                i,
                &[descriptor(
                    0x80000 + 0x1000 * u64::from(i),
                    1530,
                    VRING_DESC_F_WRITE,
                    0,
                )],
            );
        }
        rx_kick.write(1).unwrap();

        let payload = b"hello from the guest";
        let sent = udp_frame(guest_mac, tap_mac, port, payload);
        write_tx_chain(&memory, &setup.tx, 0, 0x10000, &sent);
        tx_kick.write(1).unwrap();
        let mut buffer = [0u8; 128];
        let (len, from) = host.recv_from(&mut buffer).unwrap();
        assert_eq!(&buffer[..len], payload);
        assert_eq!(from.to_string(), "10.99.0.2:40000");

        // The host answers; first it asks who 10.99.0.2 is.
        host.send_to(b"hello from the host", from).unwrap();
        let mut arp = None;
        wait_until("the host's ARP request in an RX buffer", || {
            for (head, len) in used(&setup.rx) {
                let mut frame = vec![0u8; len as usize - VIRTIO_NET_HDR_LEN];
                memory
                    .read_slice(
                        &mut frame,
                        GuestAddress(0x80000 + 0x1000 * u64::from(head) + 12),
                    )
                    .unwrap();
                // ARP, request, target protocol address 10.99.0.2.
                if frame.len() >= 42
                    && frame[12..14] == [0x08, 0x06]
                    && frame[20..22] == [0, 1]
                    && frame[38..42] == [10, 99, 0, 2]
                {
                    arp = Some(frame);
                    return true;
                }
            }
            false
        });
        let arp = arp.unwrap();
        assert_eq!(arp[6..12], tap_mac, "from the tap");
        let counters = net.counters().snapshot();
        assert_eq!(counters.bytes_from_guest, sent.len() as u64);
        assert!(counters.bytes_to_guest >= 42);
        assert_eq!(counters.errors, 0);
    }
}
