//! The stub at the x86 reset vector (`F000:FFF0`, [`RESET_VECTOR`]).
//!
//! barge has no firmware. A guest that reboots by jumping to the reset
//! vector in real mode (Linux's "BIOS" reboot, its default on a HW-reduced
//! ACPI machine without EFI runtime services) would run whatever bytes are
//! there, zeros, forever. The stub writes the ACPI reset value to barge's
//! reset register instead, so the VMM sees a reset, and halts should the
//! write ever return.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::x86_64::layout::{ACPI_RESET_PORT, ACPI_RESET_VALUE, RESET_VECTOR, RESET_VECTOR_SIZE};
use crate::x86_64::BootError;

/// The stub, 16-bit real-mode code:
/// `mov dx, ACPI_RESET_PORT; mov al, ACPI_RESET_VALUE; out dx, al; 1: hlt; jmp 1b`.
pub fn reset_stub() -> [u8; 9] {
    let [port_lo, port_hi] = ACPI_RESET_PORT.to_le_bytes();
    [
        0xba,
        port_lo,
        port_hi,
        0xb0,
        ACPI_RESET_VALUE,
        0xee,
        0xf4,
        0xeb,
        0xfd,
    ]
}

/// Writes the stub at the reset vector.
pub fn write_reset_stub(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let stub = reset_stub();
    debug_assert!(stub.len() as u64 <= RESET_VECTOR_SIZE);
    mem.write_slice(&stub, GuestAddress(RESET_VECTOR))
        .map_err(BootError::ResetVector)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stub_writes_the_reset_value_to_the_reset_port_then_halts() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_reset_stub(&mem).unwrap();
        let mut bytes = [0u8; 9];
        mem.read_slice(&mut bytes, GuestAddress(0xffff0)).unwrap();
        // mov dx, 0x3c0; mov al, 0x01; out dx, al; hlt; jmp -3 (to the hlt)
        assert_eq!(
            bytes,
            [0xba, 0xc0, 0x03, 0xb0, 0x01, 0xee, 0xf4, 0xeb, 0xfd]
        );
    }
}
