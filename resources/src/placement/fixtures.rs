//! Inputs the placement tests share: the KiB/MiB/GiB units, the [`Windows`] of a guest
//! with a given RAM size and phys-bits, and the devices they place (an H100-like GPU with a
//! 128 GiB BAR, an ivshmem device with a sub-page BAR0).

use super::types::{BarInput, BarWidth, DeviceInput, Windows};
use crate::ram::ram_regions;

pub(super) const KIB: u64 = 1 << 10;
pub(super) const MIB: u64 = 1 << 20;
pub(super) const GIB: u64 = 1 << 30;

pub(super) fn windows(ram: u64, phys_bits: u8) -> Windows {
    Windows::new(&ram_regions(ram).unwrap(), phys_bits).unwrap()
}

pub(super) fn device(name: &str, bars: Vec<BarInput>) -> DeviceInput {
    DeviceInput {
        name: name.to_string(),
        bars,
        align_cap: None,
    }
}

pub(super) fn h100(name: &str) -> DeviceInput {
    device(
        name,
        vec![
            BarInput::new(0, 16 * MIB, BarWidth::Bits64, false),
            BarInput::new(1, 128 * GIB, BarWidth::Bits64, true),
            BarInput::new(3, 32 * MIB, BarWidth::Bits64, true),
        ],
    )
}

pub(super) fn ivshmem() -> DeviceInput {
    device(
        "shmem0",
        vec![
            BarInput::new(0, 256, BarWidth::Bits32, false),
            BarInput::new(2, 8 * GIB, BarWidth::Bits64, true),
        ],
    )
}
