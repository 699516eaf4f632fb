//! barge resources crate: guest address-space planning as pure logic.
//!
//! - [`ram`]: split the configured RAM size into regions around the 32-bit MMIO hole
//!   described in `arch::layout`, and find where the 64-bit MMIO window can start.
//!
//! Nothing here touches KVM or guest memory; BAR allocation will live here later.

pub mod ram;

pub use ram::{mmio64_window_start, ram_regions, RamError, RamRegion, MIN_RAM_SIZE};

pub mod placement;
pub mod spec;
pub mod sysfs;

pub use placement::{
    plan, render_table, AreaPlacement, BarInput, BarPlacement, BarRange, BarWidth, DeviceInput,
    DevicePlan, PageCounts, PageSize, PlacementError, Plan, Window, WindowKind, Windows,
};
pub mod gsi;
