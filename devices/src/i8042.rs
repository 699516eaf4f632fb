//! A minimal i8042 keyboard controller: just enough for Linux's
//! keyboard-controller reboot (`reboot=k`).
//!
//! The register block spans the controller's two ports, data at 0x60 and
//! status/command at 0x64: a caller places it at base 0x60 with size
//! [`REGISTER_SPAN`] and passes offsets relative to the base, so the data
//! port is offset [`DATA_OFFSET`] and the status/command port is offset
//! [`COMMAND_OFFSET`]. Offsets 1..=3 (ports 0x61..0x63) are not the
//! controller's; reads there return zeros and writes are ignored.
//!
//! There is no keyboard: the output buffer is always empty and the input
//! buffer is always ready, so a guest polling before a command never waits.
//! Writing [`CMD_PULSE_RESET`] to the command port asks for a reset.

use crate::PowerEvent;

/// Base I/O port of the controller (the data port).
pub const BASE_PORT: u16 = 0x60;
/// Size of the register block starting at [`BASE_PORT`] (0x60..=0x64).
pub const REGISTER_SPAN: u64 = 5;
/// Offset of the data port (0x60) inside the block.
pub const DATA_OFFSET: u64 = 0;
/// Offset of the status (read) / command (write) port (0x64) inside the block.
pub const COMMAND_OFFSET: u64 = 4;
/// Command that pulses the CPU reset line.
pub const CMD_PULSE_RESET: u8 = 0xfe;
/// Status bit: the controller passed its self-test (system flag).
pub const STATUS_SYSTEM_FLAG: u8 = 1 << 2;

/// Minimal i8042 controller (see module docs).
#[derive(Debug, Default)]
pub struct I8042 {
    /// Last command byte written, kept for debugging.
    last_command: Option<u8>,
}

impl I8042 {
    /// A controller with empty buffers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Handles a guest read at `offset`. The status port reports "output
    /// buffer empty, input buffer empty, self-test passed"; the data port
    /// reads 0 (no data). Accesses that are not one byte wide, or at other
    /// offsets, read zeros.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let [byte] = data {
            if offset == COMMAND_OFFSET {
                *byte = STATUS_SYSTEM_FLAG;
            }
        }
    }

    /// Handles a guest write at `offset`. Returns [`PowerEvent::Reset`] for
    /// a one-byte write of [`CMD_PULSE_RESET`] to the command port; every
    /// other write is ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Option<PowerEvent> {
        let [value] = data else {
            return None;
        };
        if offset != COMMAND_OFFSET {
            return None;
        }
        self.last_command = Some(*value);
        (*value == CMD_PULSE_RESET).then_some(PowerEvent::Reset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pulse_reset_command_resets() {
        let mut kbd = I8042::new();
        assert_eq!(
            kbd.write(COMMAND_OFFSET, &[CMD_PULSE_RESET]),
            Some(PowerEvent::Reset)
        );
    }

    #[test]
    fn other_commands_are_ignored() {
        let mut kbd = I8042::new();
        for cmd in (0..=255u8).filter(|c| *c != CMD_PULSE_RESET) {
            assert_eq!(kbd.write(COMMAND_OFFSET, &[cmd]), None, "command {cmd:#x}");
        }
    }

    #[test]
    fn reset_byte_on_data_port_or_other_offsets_is_ignored() {
        let mut kbd = I8042::new();
        for offset in [DATA_OFFSET, 1, 2, 3, 5, u64::MAX] {
            assert_eq!(
                kbd.write(offset, &[CMD_PULSE_RESET]),
                None,
                "offset {offset}"
            );
        }
    }

    #[test]
    fn wide_and_empty_writes_are_ignored() {
        let mut kbd = I8042::new();
        assert_eq!(kbd.write(COMMAND_OFFSET, &[]), None);
        assert_eq!(kbd.write(COMMAND_OFFSET, &[CMD_PULSE_RESET, 0]), None);
        assert_eq!(kbd.write(COMMAND_OFFSET, &[CMD_PULSE_RESET; 4]), None);
        assert_eq!(kbd.write(COMMAND_OFFSET, &[CMD_PULSE_RESET; 8]), None);
    }

    #[test]
    fn status_reads_ready_with_no_data() {
        let mut kbd = I8042::new();
        let mut status = [0xff];
        kbd.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status[0] & 0b11, 0, "output and input buffers empty");
        assert_eq!(status[0], STATUS_SYSTEM_FLAG);
        let mut data = [0xff];
        kbd.read(DATA_OFFSET, &mut data);
        assert_eq!(data, [0]);
    }

    #[test]
    fn reads_of_other_widths_and_offsets_return_zeros() {
        let mut kbd = I8042::new();
        for width in [0usize, 2, 3, 4, 8] {
            for offset in [DATA_OFFSET, COMMAND_OFFSET, 1, u64::MAX] {
                let mut data = vec![0xaa; width];
                kbd.read(offset, &mut data);
                assert!(
                    data.iter().all(|b| *b == 0),
                    "width {width} offset {offset}"
                );
            }
        }
        let mut byte = [0xaa];
        kbd.read(2, &mut byte);
        assert_eq!(byte, [0]);
    }
}
