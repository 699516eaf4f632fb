//! The instruction sequences barge's tiny guests have in common, emitted
//! into an iced-x86 [`CodeAssembler`], and helpers that assemble a program
//! linked at [`LOAD_ADDR`].
//!
//! The guests run on barge's devices at the ports `arch::layout` names:
//! the 16550 UART at `COM1_PORT` and the ACPI sleep registers of the
//! HW-reduced FADT. None of the sequences references data, so they work
//! wherever the code is loaded.

use arch::layout::{
    ACPI_POWEROFF_VALUE, ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT, COM1_PORT,
};
use iced_x86::code_asm::{al, dx, eax, r9d, CodeAssembler, IcedError};

use crate::elf::LOAD_ADDR;

/// The UART's line status register, as an offset from `COM1_PORT`.
const LSR_OFFSET: u16 = 5;
/// Line status register: transmitter holding register empty.
const LSR_THRE: u32 = 0x20;
/// Linux's ACPI_BITMASK_WAKE_STATUS, written to the sleep status register
/// before the sleep control write in acpi_hw_extended_sleep().
const WAK_STS: u32 = 0x80;

/// Writes `text` to COM1, polling LSR.THRE before each byte like an
/// early-console driver. Unrolled, so the same code works in 64-bit and
/// 32-bit mode. Clobbers AL and DX.
///
/// It ends with a `nop`, so a label set right after it has an instruction
/// of its own.
pub fn print(a: &mut CodeAssembler, text: &str) -> Result<(), IcedError> {
    for byte in text.bytes() {
        let mut wait = a.create_label();
        a.mov(dx, u32::from(COM1_PORT + LSR_OFFSET))?;
        a.set_label(&mut wait)?;
        a.in_(al, dx)?;
        a.test(al, LSR_THRE)?;
        a.jz(wait)?;
        a.mov(dx, u32::from(COM1_PORT))?;
        a.mov(al, u32::from(byte))?;
        a.out(dx, al)?;
    }
    a.nop()?;
    Ok(())
}

/// Writes AL to COM1 once the transmitter holding register is empty, for
/// code that computes the character (the bench's hex printer). 64-bit mode
/// only: EAX is kept in R9D while the line status is read, so EAX comes
/// back unchanged but the upper half of RAX is zeroed. Clobbers DX and R9.
pub fn put_al(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut wait = a.create_label();
    a.mov(r9d, eax)?;
    a.mov(dx, u32::from(COM1_PORT + LSR_OFFSET))?;
    a.set_label(&mut wait)?;
    a.in_(al, dx)?;
    a.test(al, LSR_THRE)?;
    a.jz(wait)?;
    a.mov(eax, r9d)?;
    a.mov(dx, u32::from(COM1_PORT))?;
    a.out(dx, al)?;
    Ok(())
}

/// Writes `text` to COM1 through [`put_al`], one `mov eax, byte` and one
/// [`put_al`] per byte (unrolled; 64-bit mode only). Clobbers RAX, RDX and
/// R9. Longer than [`print()`]; it is the form the bench payload is made of.
pub fn put_str(a: &mut CodeAssembler, text: &str) -> Result<(), IcedError> {
    for byte in text.bytes() {
        a.mov(eax, u32::from(byte))?;
        put_al(a)?;
    }
    Ok(())
}

/// Powers off: writes SLP_TYP(S5) | SLP_EN to the ACPI sleep control
/// register. Clobbers AL and DX; barge stops the VM on the write.
pub fn acpi_poweroff(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(dx, u32::from(ACPI_SLEEP_CONTROL_PORT))?;
    a.mov(al, u32::from(ACPI_POWEROFF_VALUE))?;
    a.out(dx, al)?;
    Ok(())
}

/// Powers off as Linux does on a HW-reduced ACPI machine: clears WAK_STS in
/// the sleep status register, then writes SLP_TYP(S5) | SLP_EN to the
/// sleep control register (barge has both at one port). Clobbers AL and DX.
pub fn acpi_poweroff_as_linux(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(dx, u32::from(ACPI_SLEEP_STATUS_PORT))?;
    a.mov(al, WAK_STS)?;
    a.out(dx, al)?;
    if ACPI_SLEEP_CONTROL_PORT != ACPI_SLEEP_STATUS_PORT {
        a.mov(dx, u32::from(ACPI_SLEEP_CONTROL_PORT))?;
    }
    a.mov(al, u32::from(ACPI_POWEROFF_VALUE))?;
    a.out(dx, al)?;
    Ok(())
}

/// Halts forever with interrupts off: `cli; hlt` in a loop, so only barge
/// (a poweroff before it, a timeout, a signal) ends the run.
pub fn hang(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut again = a.create_label();
    a.set_label(&mut again)?;
    a.cli()?;
    a.hlt()?;
    a.jmp(again)?;
    Ok(())
}

/// The 64-bit machine code `body` emits, linked at [`LOAD_ADDR`].
///
/// # Panics
///
/// When `body` or the assembler fails: the program is wrong, which is a bug
/// in the test that wrote it.
pub fn assemble(body: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    assemble_bits(64, body)
}

/// Like [`assemble`] for `bitness` 16, 32 or 64 (32 for a PVH entry).
///
/// # Panics
///
/// When `bitness` is not one of those, or `body` or the assembler fails.
pub fn assemble_bits(
    bitness: u32,
    body: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Vec<u8> {
    let mut a = CodeAssembler::new(bitness).expect("assembler");
    body(&mut a).expect("payload assembles");
    a.assemble(LOAD_ADDR).expect("payload assembles")
}

#[cfg(test)]
mod tests {
    use iced_x86::code_asm::{dword_ptr, ebx};

    use super::*;
    use crate::elf::{elf64, Vmlinux};
    use crate::tests::fnv1a;

    // The expected bytes of print, acpi_poweroff_as_linux, hang and the
    // boot_payload images were recorded from the copies this module replaced
    // (tests/tests/boot_payload.rs); put_al, put_str and acpi_poweroff are
    // checked against the bench payload's recorded bytes in barge.

    #[test]
    fn print_polls_thre_then_writes_each_byte() {
        // mov dx,0x3fd; in al,dx; test al,0x20; jz -5; mov dx,0x3f8;
        // mov al,'A'; out dx,al; nop
        let expected = [
            0x66, 0xba, 0xfd, 0x03, 0xec, 0xa8, 0x20, 0x74, 0xfb, 0x66, 0xba, 0xf8, 0x03, 0xb0,
            0x41, 0xee, 0x90,
        ];
        assert_eq!(assemble(|a| print(a, "A")), expected);
        assert_eq!(assemble_bits(32, |a| print(a, "A")), expected);
    }

    #[test]
    fn put_str_goes_through_put_al() {
        // mov eax,'A'; mov r9d,eax; mov dx,0x3fd; in al,dx; test al,0x20;
        // jz -5; mov eax,r9d; mov dx,0x3f8; out dx,al
        let expected = [
            0xb8, 0x41, 0x00, 0x00, 0x00, 0x41, 0x89, 0xc1, 0x66, 0xba, 0xfd, 0x03, 0xec, 0xa8,
            0x20, 0x74, 0xfb, 0x44, 0x89, 0xc8, 0x66, 0xba, 0xf8, 0x03, 0xee,
        ];
        assert_eq!(assemble(|a| put_str(a, "A")), expected);
    }

    #[test]
    fn poweroff_and_hang_bytes() {
        // mov dx,0x3c0; mov al,0x34; out dx,al
        assert_eq!(
            assemble(acpi_poweroff),
            [0x66, 0xba, 0xc0, 0x03, 0xb0, 0x34, 0xee]
        );
        // mov dx,0x3c0; mov al,0x80; out dx,al; mov al,0x34; out dx,al
        assert_eq!(
            assemble(acpi_poweroff_as_linux),
            [0x66, 0xba, 0xc0, 0x03, 0xb0, 0x80, 0xee, 0xb0, 0x34, 0xee]
        );
        // cli; hlt; jmp -4
        assert_eq!(assemble(hang), [0xfa, 0xf4, 0xeb, 0xfc]);
    }

    #[test]
    fn boot_payload_programs_are_unchanged() {
        let poweroff = assemble(|a| {
            print(a, "hello from barge\n")?;
            acpi_poweroff_as_linux(a)?;
            hang(a)
        });
        let image = elf64(&poweroff);
        assert_eq!((image.len(), fnv1a(&image)), (4383, 0x053a_1534_bce3_4066));

        let pvh = assemble_bits(32, |a| {
            let mut bad = a.create_label();
            let mut end = a.create_label();
            a.cmp(dword_ptr(ebx), 0x336e_c578u32)?;
            a.jne(bad)?;
            print(a, "pvh start_info ok\n")?;
            a.jmp(end)?;
            a.set_label(&mut bad)?;
            print(a, "pvh start_info missing\n")?;
            a.set_label(&mut end)?;
            acpi_poweroff_as_linux(a)?;
            hang(a)
        });
        let image = Vmlinux::new(&pvh).pvh_entry(LOAD_ADDR as u32).to_bytes();
        assert_eq!((image.len(), fnv1a(&image)), (4785, 0x2785_6a1b_68e9_c689));
    }
}
