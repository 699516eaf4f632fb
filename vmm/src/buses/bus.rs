//! Port I/O and MMIO buses in the rust-vmm `vm-device` manner.
//!
//! A [`Bus`] maps non-overlapping address ranges to devices implementing
//! [`BusDevice`]. The vCPU exit handler looks the accessed address up and
//! forwards the access with the range's base and the offset inside it.
//! barge has one bus for port I/O ([`Buses::pio`]) and one for MMIO
//! ([`Buses::mmio`]).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};

/// A device reachable through a bus.
///
/// `base` is the start of the range the device was inserted at and `offset`
/// the accessed address minus `base`. `data` is the access (1, 2, 4 or 8
/// bytes in practice). Implementations must tolerate any guest-controlled
/// `offset` and `data` length without panicking.
pub trait BusDevice: Send {
    /// Handles a read; fill `data` with what the guest reads.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// Handles a write of `data`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// A device shared between the bus and whoever else needs it (event loop).
pub type SharedBusDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors from building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// A range of size zero was inserted.
    #[error("bus range at {base:#x} has size 0; give the device a non-empty range")]
    EmptyRange {
        /// Range start.
        base: u64,
    },
    /// The range wraps past the end of the address space.
    #[error("bus range at {base:#x} of size {size:#x} wraps past the end of the address space")]
    Overflow {
        /// Range start.
        base: u64,
        /// Range size.
        size: u64,
    },
    /// The range overlaps a range already on the bus.
    #[error(
        "bus range {base:#x}+{size:#x} overlaps {other_base:#x}+{other_size:#x} already on the bus; \
         move one of the devices"
    )]
    Overlap {
        /// New range start.
        base: u64,
        /// New range size.
        size: u64,
        /// Existing range start.
        other_base: u64,
        /// Existing range size.
        other_size: u64,
    },
}

/// An address range on a bus: `[base, base + size)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusRange {
    /// First address.
    pub base: u64,
    /// Number of addresses.
    pub size: u64,
}

impl BusRange {
    /// The last address in the range (inclusive).
    pub fn last(&self) -> u64 {
        self.base + (self.size - 1)
    }

    /// Whether `addr` falls inside the range.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr - self.base < self.size
    }
}

struct BusEntry {
    size: u64,
    name: &'static str,
    device: SharedBusDevice,
}

/// A set of non-overlapping ranges, each routed to one device.
#[derive(Default)]
pub struct Bus {
    // Keyed by range base; ranges never overlap, so the entry with the
    // greatest base <= addr is the only candidate for `addr`.
    entries: BTreeMap<u64, BusEntry>,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for (base, entry) in &self.entries {
            list.entry(&format_args!(
                "{}@{:#x}+{:#x}",
                entry.name, base, entry.size
            ));
        }
        list.finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Routes `[base, base + size)` to `device`. `name` appears in logs.
    pub fn insert(
        &mut self,
        base: u64,
        size: u64,
        name: &'static str,
        device: SharedBusDevice,
    ) -> Result<(), BusError> {
        if size == 0 {
            return Err(BusError::EmptyRange { base });
        }
        let new = BusRange { base, size };
        let new_last = base
            .checked_add(size - 1)
            .ok_or(BusError::Overflow { base, size })?;
        // The closest range starting at or below our last address is the only
        // one that can overlap (ranges on the bus are disjoint and sorted).
        if let Some((&other_base, other)) = self.entries.range(..=new_last).next_back() {
            let other_range = BusRange {
                base: other_base,
                size: other.size,
            };
            if other_range.last() >= new.base {
                return Err(BusError::Overlap {
                    base,
                    size,
                    other_base,
                    other_size: other.size,
                });
            }
        }
        self.entries.insert(base, BusEntry { size, name, device });
        Ok(())
    }

    /// The device whose range contains `addr`, with the range.
    pub fn lookup(&self, addr: u64) -> Option<(BusRange, &'static str, &SharedBusDevice)> {
        let (&base, entry) = self.entries.range(..=addr).next_back()?;
        let range = BusRange {
            base,
            size: entry.size,
        };
        range
            .contains(addr)
            .then_some((range, entry.name, &entry.device))
    }

    /// Reads `data.len()` bytes at `addr`. Returns false when no device is
    /// there (then `data` is left untouched).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.lookup(addr) {
            Some((range, _, device)) => {
                lock_device(device).read(range.base, addr - range.base, data);
                true
            }
            None => false,
        }
    }

    /// Writes `data` at `addr`. Returns false when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.lookup(addr) {
            Some((range, _, device)) => {
                lock_device(device).write(range.base, addr - range.base, data);
                true
            }
            None => false,
        }
    }

    /// Number of ranges on the bus.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the bus has no ranges.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Locks a device, recovering from a poisoned lock: a panic on another vCPU
/// thread must not take the device away from this one.
fn lock_device(device: &SharedBusDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The two buses a vCPU dispatches to.
#[derive(Debug, Default)]
pub struct Buses {
    /// x86 port I/O space (addresses are 16-bit ports).
    pub pio: Bus,
    /// Memory-mapped I/O space (guest physical addresses not backed by RAM).
    pub mmio: Bus,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records accesses; reads return the offset in every byte.
    #[derive(Default)]
    struct RecordingDevice {
        writes: Vec<(u64, u64, Vec<u8>)>,
    }

    impl BusDevice for RecordingDevice {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.writes.push((base, offset, data.to_vec()));
        }
    }

    fn device() -> Arc<Mutex<RecordingDevice>> {
        Arc::new(Mutex::new(RecordingDevice::default()))
    }

    #[test]
    fn lookup_finds_device_by_any_address_in_range() {
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, "com1", device()).unwrap();
        assert!(bus.lookup(0x3f7).is_none());
        let (range, name, _) = bus.lookup(0x3f8).unwrap();
        assert_eq!(
            range,
            BusRange {
                base: 0x3f8,
                size: 8
            }
        );
        assert_eq!(name, "com1");
        assert!(bus.lookup(0x3ff).is_some());
        assert!(bus.lookup(0x400).is_none());
    }

    #[test]
    fn read_and_write_pass_base_and_offset() {
        let mut bus = Bus::new();
        let dev = device();
        bus.insert(0x600, 4, "pm", dev.clone()).unwrap();
        let mut data = [0u8; 2];
        assert!(bus.read(0x602, &mut data));
        assert_eq!(data, [2, 2]);
        assert!(bus.write(0x601, &[0xab]));
        assert_eq!(dev.lock().unwrap().writes, vec![(0x600, 1, vec![0xab])]);
    }

    #[test]
    fn unclaimed_access_reports_false_and_leaves_data() {
        let bus = Bus::new();
        let mut data = [0x55u8; 4];
        assert!(!bus.read(0x80, &mut data));
        assert_eq!(data, [0x55; 4]);
        assert!(!bus.write(0x80, &[1]));
    }

    #[test]
    fn overlapping_insert_is_rejected() {
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, "a", device()).unwrap();
        // Overlaps the end.
        assert!(matches!(
            bus.insert(0x10f, 4, "b", device()),
            Err(BusError::Overlap {
                other_base: 0x100,
                ..
            })
        ));
        // Overlaps the start.
        assert!(matches!(
            bus.insert(0xf8, 0x9, "c", device()),
            Err(BusError::Overlap { .. })
        ));
        // Encloses it.
        assert!(matches!(
            bus.insert(0x0, 0x1000, "d", device()),
            Err(BusError::Overlap { .. })
        ));
        // Adjacent on both sides is fine.
        bus.insert(0xf0, 0x10, "e", device()).unwrap();
        bus.insert(0x110, 0x10, "f", device()).unwrap();
        assert_eq!(bus.len(), 3);
    }

    #[test]
    fn empty_and_wrapping_ranges_are_rejected() {
        let mut bus = Bus::new();
        assert_eq!(
            bus.insert(0x10, 0, "a", device()),
            Err(BusError::EmptyRange { base: 0x10 })
        );
        assert!(matches!(
            bus.insert(u64::MAX, 2, "b", device()),
            Err(BusError::Overflow { .. })
        ));
        bus.insert(u64::MAX, 1, "top", device()).unwrap();
        assert!(bus.lookup(u64::MAX).is_some());
        assert!(!bus.is_empty());
    }

    #[test]
    fn lookup_picks_the_right_one_of_many() {
        let mut bus = Bus::new();
        for i in 0..16u64 {
            bus.insert(i * 0x100, 0x10, "dev", device()).unwrap();
        }
        for i in 0..16u64 {
            let (range, _, _) = bus.lookup(i * 0x100 + 0xf).unwrap();
            assert_eq!(range.base, i * 0x100);
            assert!(bus.lookup(i * 0x100 + 0x10).is_none());
        }
    }
}
