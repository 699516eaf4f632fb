//! barge arch crate: the boot set-up of each architecture as plain data and guest-memory
//! writes, in its own module tree. No KVM ioctls here; everything is testable against a
//! `GuestMemoryMmap` (and, for aarch64, by reading the flattened device tree back).
//!
//! - [`x86_64`]: page tables, GDT, boot params / PVH, ACPI, CPUID and MSRs. Built on
//!   x86_64 hosts; its items are re-exported at the crate root there.
//! - [`aarch64`]: the guest physical map, the flattened device tree (CPUs, PSCI, timer,
//!   GICv3 + ITS, ns16550a UART, ECAM host bridge) and the boot vCPU's register state.
//!   Pure logic, so it is built (and unit-tested) on every host; the vmm uses it on
//!   aarch64 hosts, where its items are re-exported at the crate root.

pub mod aarch64;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

#[cfg(target_arch = "aarch64")]
pub use aarch64::*;
#[cfg(target_arch = "x86_64")]
pub use x86_64::*;
