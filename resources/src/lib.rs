//! barge resources crate: guest address-space planning as pure logic.
//!
//! - [`ram`]: split the configured RAM size into regions around the 32-bit MMIO hole
//!   described in `arch::layout`, and find where the 64-bit MMIO window can start.
//! - [`placement`]: the BAR placement plan: naturally aligned guest addresses in the
//!   MMIO windows, the host virtual address rule each BAR's mapping must follow, the
//!   mmap-able areas and trapped ranges, and the largest page each area can get.
//! - [`spec`] and [`sysfs`]: the planner's input from a JSON spec file or from host
//!   devices' sysfs entries.
//! - [`gsi`]: the GSI allocator and routing table for devices' MSI and MSI-X vectors.
//!
//! Nothing here touches KVM or guest memory.

pub mod gsi;
pub mod placement;
pub mod ram;
pub mod size;
pub mod spec;
pub mod sysfs;

pub use ram::{mmio64_window_start, ram_regions, RamError, RamRegion, MIN_RAM_SIZE};

pub use placement::{
    plan, plan_for_host, render_table, AreaPlacement, BarInput, BarPlacement, BarRange, BarWidth,
    DeviceInput, DevicePlan, PageCounts, PageSize, PlacementError, Plan, Window, WindowKind,
    Windows,
};
