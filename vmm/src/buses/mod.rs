//! What sits on the VM's port I/O and MMIO buses: the bus itself, the PCI
//! segment's config-space access (CF8/CFC, ECAM) and its ACPI description,
//! the COM1 serial port and where its output goes, and the ACPI
//! sleep/reset and i8042 registers.

pub mod bus;
pub mod console;
pub mod pci;
pub mod power;
pub mod serial;
