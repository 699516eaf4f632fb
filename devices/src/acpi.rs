//! HW-reduced ACPI sleep control/status and reset register.
//!
//! A HW-reduced ACPI platform (FADT flag `HW_REDUCED_ACPI`) has no PM1
//! blocks; the FADT instead points `SLEEP_CONTROL_REG`, `SLEEP_STATUS_REG`
//! and `RESET_REG` at registers of the platform's choice. barge puts all
//! three at one 8-bit I/O port (the address lives in `arch`'s layout):
//!
//! - a write with `SLP_EN` (bit 5) set and `SLP_TYP` (bits 2..=4) equal to
//!   [`S5_SLEEP_TYPE`] powers the machine off; this is what Linux's
//!   `poweroff` does after evaluating the DSDT's `_S5` package;
//! - a write of [`RESET_VALUE`] resets the machine (the FADT's
//!   `RESET_VALUE`; it has `SLP_EN` clear, so it cannot be mistaken for a
//!   sleep request);
//! - reads return the sleep status register, always 0 (no wake event);
//!   Linux writes `WAK_STS` (0x80) to clear it before sleeping, which is
//!   ignored like every other write.
//!
//! The register block is one byte wide: accesses at other offsets or with
//! other widths are ignored, reads of them return zeros.

use crate::PowerEvent;

/// Width in bytes of the register block (one 8-bit register).
pub const REGISTER_SIZE: u64 = 1;
/// Bit position of `SLP_EN` in the sleep control register.
pub const SLP_EN_BIT: u8 = 5;
/// Shift of the 3-bit `SLP_TYP` field in the sleep control register.
pub const SLP_TYP_SHIFT: u8 = 2;
/// Mask of `SLP_TYP` after shifting.
pub const SLP_TYP_MASK: u8 = 0b111;
/// `SLP_TYP` value for S5 (soft off); the DSDT's `_S5` package must carry it.
pub const S5_SLEEP_TYPE: u8 = 5;
/// Value the guest writes to the reset register to reset the machine (the
/// FADT's `RESET_VALUE`). Bit 0 is reserved in the sleep control register,
/// so a reset never looks like a sleep request. Must equal
/// `arch::layout::ACPI_RESET_VALUE`.
pub const RESET_VALUE: u8 = 0x01;

/// The sleep control value a guest writes to enter S5.
pub const fn s5_write_value() -> u8 {
    (S5_SLEEP_TYPE << SLP_TYP_SHIFT) | (1 << SLP_EN_BIT)
}

/// HW-reduced ACPI sleep control/status and reset register (see module docs).
#[derive(Debug, Default)]
pub struct AcpiSleepControl {
    /// Last value written that was neither a power-off nor a reset.
    last_write: u8,
}

impl AcpiSleepControl {
    /// A register block in its reset state.
    pub fn new() -> Self {
        Self::default()
    }

    /// Handles a guest write at `offset` inside the register block.
    ///
    /// Returns the power event the write asks for, if any. Writes that are
    /// not exactly one byte at offset 0, sleep requests for states other
    /// than S5 and writes without `SLP_EN` are ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<PowerEvent> {
        let [value] = data else {
            return None;
        };
        if offset != 0 {
            return None;
        }
        let value = *value;
        if value == RESET_VALUE {
            return Some(PowerEvent::Reset);
        }
        let sleep_enable = value & (1 << SLP_EN_BIT) != 0;
        let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
        if sleep_enable && sleep_type == S5_SLEEP_TYPE {
            return Some(PowerEvent::PowerOff);
        }
        self.last_write = value;
        None
    }

    /// Handles a guest read at `offset`: the sleep status register reads 0
    /// (no wake status); every other access reads zeros too.
    pub fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_with_sleep_enable_powers_off() {
        let mut reg = AcpiSleepControl::new();
        assert_eq!(
            reg.write(0, &[s5_write_value()]),
            Some(PowerEvent::PowerOff)
        );
        assert_eq!(s5_write_value(), 0x34);
    }

    #[test]
    fn s5_with_other_bits_set_still_powers_off() {
        let mut reg = AcpiSleepControl::new();
        assert_eq!(
            reg.write(0, &[s5_write_value() | 0b1100_0011]),
            Some(PowerEvent::PowerOff)
        );
    }

    #[test]
    fn reset_value_resets() {
        let mut reg = AcpiSleepControl::new();
        assert_eq!(reg.write(0, &[RESET_VALUE]), Some(PowerEvent::Reset));
    }

    #[test]
    fn s5_type_without_sleep_enable_is_ignored() {
        let mut reg = AcpiSleepControl::new();
        assert_eq!(reg.write(0, &[S5_SLEEP_TYPE << SLP_TYP_SHIFT]), None);
    }

    #[test]
    fn wake_status_clear_is_ignored() {
        let mut reg = AcpiSleepControl::new();
        assert_eq!(reg.write(0, &[0x80]), None);
    }

    #[test]
    fn other_sleep_states_are_ignored() {
        let mut reg = AcpiSleepControl::new();
        for sleep_type in 0..=7u8 {
            if sleep_type == S5_SLEEP_TYPE {
                continue;
            }
            let value = (sleep_type << SLP_TYP_SHIFT) | (1 << SLP_EN_BIT);
            assert_eq!(reg.write(0, &[value]), None, "SLP_TYP {sleep_type}");
        }
    }

    #[test]
    fn every_byte_value_is_handled_without_panic() {
        let mut reg = AcpiSleepControl::new();
        let events: Vec<_> = (0..=255u8).filter_map(|v| reg.write(0, &[v])).collect();
        // 0x01 resets; SLP_EN + SLP_TYP=5 with any of bits 0,1,6,7 (16 values) power off.
        assert_eq!(
            events.iter().filter(|e| **e == PowerEvent::Reset).count(),
            1
        );
        assert_eq!(
            events
                .iter()
                .filter(|e| **e == PowerEvent::PowerOff)
                .count(),
            16
        );
    }

    #[test]
    fn wider_and_empty_writes_are_ignored() {
        let mut reg = AcpiSleepControl::new();
        let s5 = s5_write_value();
        assert_eq!(reg.write(0, &[]), None);
        assert_eq!(reg.write(0, &[s5, 0]), None);
        assert_eq!(reg.write(0, &[s5, 0, 0, 0]), None);
        assert_eq!(reg.write(0, &[s5, 0, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(reg.write(0, &[RESET_VALUE, 0, 0, 0]), None);
    }

    #[test]
    fn writes_at_other_offsets_are_ignored() {
        let mut reg = AcpiSleepControl::new();
        for offset in [1, 2, 3, 7, u64::MAX] {
            assert_eq!(reg.write(offset, &[s5_write_value()]), None);
            assert_eq!(reg.write(offset, &[RESET_VALUE]), None);
        }
    }

    #[test]
    fn reads_of_every_width_and_offset_return_zeros() {
        let mut reg = AcpiSleepControl::new();
        reg.write(0, &[0x12]);
        for width in [0usize, 1, 2, 3, 4, 8] {
            for offset in [0, 1, 5, u64::MAX] {
                let mut data = vec![0xaa; width];
                reg.read(offset, &mut data);
                assert!(
                    data.iter().all(|b| *b == 0),
                    "width {width} offset {offset}"
                );
            }
        }
    }
}
