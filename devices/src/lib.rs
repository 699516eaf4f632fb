//! barge devices crate: device models that know nothing about buses or KVM.
//!
//! Every model takes an access as an offset inside its own register block
//! plus a byte slice whose length is the access width. Accesses a model does
//! not understand (odd widths, unknown offsets) are ignored: they come from
//! the guest and must never panic. Writes that ask the machine to power off
//! or reset return a [`PowerEvent`] for the caller to act on.

pub mod acpi;
pub mod guest_log;
pub mod i8042;
pub mod interrupts;
pub mod pci;
pub mod shmem;
pub mod vfio;
pub mod virtio;

/// A request from the guest to end or restart the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerEvent {
    /// The guest asked to power off (ACPI S5).
    PowerOff,
    /// The guest asked to reset (ACPI reset register or i8042 pulse).
    Reset,
}
