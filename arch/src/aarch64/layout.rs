//! The aarch64 guest physical address map, in address order.

// Placeholder values until the full map lands (see the arm64-arch branch).
/// First byte of guest RAM (1 GiB); RAM is one contiguous region from here.
pub const RAM_START: u64 = 0x4000_0000;
/// The 32-bit PCI MMIO window.
pub const PCI_MMIO32_START: u64 = 0x1000_0000;
/// Size of the 32-bit PCI MMIO window (512 MiB).
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCIe ECAM.
pub const PCIE_ECAM_START: u64 = 0x3000_0000;
/// Size of PCIe ECAM (256 MiB).
pub const PCIE_ECAM_SIZE: u64 = 0x1000_0000;
/// Buses ECAM serves.
pub const PCIE_ECAM_BUSES: u8 = 1;
/// ECAM bytes per bus.
pub const PCIE_ECAM_BUS_SIZE: u64 = 1 << 20;
