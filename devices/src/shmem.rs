//! An ivshmem-compatible shared memory device (QEMU's `ivshmem-plain`):
//! 1af4:1110, class 0x050000 (RAM memory controller), revision 1.
//!
//! - BAR0: 256 bytes of registers, 32-bit, not prefetchable. ivshmem's
//!   registers are the interrupt mask and status, the IV position and the
//!   doorbell; barge's device has no peers and no interrupts, so every
//!   register reads 0 and writes are ignored ([`ShmemRegisters`]). The BAR
//!   is smaller than a page, so it is trapped (served on the MMIO bus).
//! - BAR2: the shared memory, 64-bit, prefetchable, a power of two. The VMM
//!   maps the backing (a memfd, a file or hugetlbfs pages) there as one
//!   memslot; no access to it ever reaches this model.
//!
//! The model is the configuration space only: an [`EmulatedEndpoint`] whose
//! BARs hold the planned addresses (a guest cannot move them).

use crate::pci::bar::{BarError, BarKind, EmulatedBars, PlannedBar};
use crate::pci::config::{ConfigSpace, Type0Identity};
use crate::pci::endpoint::EmulatedEndpoint;
use crate::pci::{ConfigEvent, PciConfigAccess};

/// Red Hat / virtio vendor ID, as QEMU's ivshmem.
pub const SHMEM_VENDOR_ID: u16 = 0x1af4;
/// ivshmem's device ID.
pub const SHMEM_DEVICE_ID: u16 = 0x1110;
/// Class 05h (memory controller), subclass 00h (RAM).
pub const SHMEM_CLASS_CODE: u32 = 0x05_00_00;
/// ivshmem's revision.
pub const SHMEM_REVISION: u8 = 1;
/// QEMU's subsystem ID for ivshmem.
pub const SHMEM_SUBSYSTEM_ID: u16 = 0x1100;
/// The register BAR's index.
pub const REGISTERS_BAR: u8 = 0;
/// The register BAR's size.
pub const REGISTERS_SIZE: u64 = 256;
/// The shared memory BAR's index.
pub const MEMORY_BAR: u8 = 2;

/// The identity every shared memory device has.
pub const SHMEM_IDENTITY: Type0Identity = Type0Identity {
    vendor_id: SHMEM_VENDOR_ID,
    device_id: SHMEM_DEVICE_ID,
    class_code: SHMEM_CLASS_CODE,
    revision_id: SHMEM_REVISION,
    subsystem_vendor_id: SHMEM_VENDOR_ID,
    subsystem_id: SHMEM_SUBSYSTEM_ID,
};

/// The configuration space of a shared memory device.
#[derive(Debug, Clone)]
pub struct ShmemDevice {
    endpoint: EmulatedEndpoint,
}

impl ShmemDevice {
    /// A device whose BAR0 is planned at `registers_gpa` (below 4 GiB) and
    /// whose BAR2 of `memory_size` bytes at `memory_gpa`. Fails when the
    /// plan is not a valid BAR layout (misaligned, BAR0 above 4 GiB).
    pub fn new(registers_gpa: u64, memory_gpa: u64, memory_size: u64) -> Result<Self, BarError> {
        let bars = EmulatedBars::new(&[
            PlannedBar {
                index: REGISTERS_BAR,
                kind: BarKind::Memory32 {
                    prefetchable: false,
                },
                size: REGISTERS_SIZE,
                gpa: registers_gpa,
            },
            PlannedBar {
                index: MEMORY_BAR,
                kind: BarKind::Memory64 { prefetchable: true },
                size: memory_size,
                gpa: memory_gpa,
            },
        ])?;
        Ok(Self {
            endpoint: EmulatedEndpoint::new(ConfigSpace::type0(&SHMEM_IDENTITY), bars),
        })
    }

    /// The endpoint (config space and BARs).
    pub fn endpoint(&self) -> &EmulatedEndpoint {
        &self.endpoint
    }
}

impl PciConfigAccess for ShmemDevice {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.endpoint.config_read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<ConfigEvent> {
        self.endpoint.config_write(offset, data)
    }
}

/// BAR0's registers: all read 0, writes are ignored (no interrupts, no
/// peers). Accesses of any width or offset are harmless.
#[derive(Debug, Clone, Copy, Default)]
pub struct ShmemRegisters;

impl ShmemRegisters {
    /// A read of `data.len()` bytes at `offset` inside BAR0.
    pub fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    /// A write at `offset` inside BAR0: ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        log::debug!("shmem: ignored register write of {data:x?} at {offset:#x}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read32(device: &mut ShmemDevice, offset: u16) -> u32 {
        let mut data = [0; 4];
        device.config_read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn identity_is_ivshmem() {
        let mut device = ShmemDevice::new(0xc000_0000, 8 << 30, 8 << 30).unwrap();
        assert_eq!(read32(&mut device, 0x00), 0x1110_1af4);
        assert_eq!(read32(&mut device, 0x08), 0x0500_0001);
        assert_eq!(read32(&mut device, 0x2c), 0x1100_1af4);
    }

    #[test]
    fn bars_hold_the_plan_and_size_like_ivshmem() {
        let mut device = ShmemDevice::new(0xc000_1000, 0x2_0000_0000, 8 << 30).unwrap();
        assert_eq!(
            read32(&mut device, 0x10),
            0xc000_1000,
            "BAR0: 32-bit, not prefetchable"
        );
        assert_eq!(read32(&mut device, 0x14), 0, "BAR1 unimplemented");
        assert_eq!(
            read32(&mut device, 0x18),
            0x0000_000c,
            "BAR2: 64-bit prefetchable"
        );
        assert_eq!(read32(&mut device, 0x1c), 0x2);
        // Sizing BAR0: 256 bytes.
        device.config_write(0x10, &u32::MAX.to_le_bytes());
        assert_eq!(read32(&mut device, 0x10), 0xffff_ff00);
        device.config_write(0x10, &0xc000_1000u32.to_le_bytes());
        // Sizing BAR2: 8 GiB over both registers.
        device.config_write(0x18, &u32::MAX.to_le_bytes());
        device.config_write(0x1c, &u32::MAX.to_le_bytes());
        assert_eq!(read32(&mut device, 0x18), 0x0000_000c);
        assert_eq!(read32(&mut device, 0x1c), 0xffff_fffe);
        device.config_write(0x18, &0x0000_000cu32.to_le_bytes());
        let event = device.config_write(0x1c, &2u32.to_le_bytes());
        assert!(
            matches!(event, Some(ConfigEvent::Bar(w)) if w.matches_plan && w.index == 2),
            "{event:?}"
        );
        assert_eq!(
            device.endpoint().bars().guest_address(2),
            Some(0x2_0000_0000)
        );
    }

    #[test]
    fn bad_plans_are_errors() {
        assert!(matches!(
            ShmemDevice::new(0x1_0000_0000, 8 << 30, 8 << 30),
            Err(BarError::AddressTooHigh { .. })
        ));
        assert!(matches!(
            ShmemDevice::new(0xc000_0000, 1 << 30, 8 << 30),
            Err(BarError::Misaligned { .. })
        ));
    }

    #[test]
    fn registers_read_zero_and_ignore_writes() {
        let mut registers = ShmemRegisters;
        for len in [1usize, 2, 4, 8, 3, 0] {
            let mut data = vec![0xaa; len];
            registers.read(0xfc, &mut data);
            assert!(data.iter().all(|b| *b == 0));
            registers.write(0x0c, &data);
        }
    }
}
