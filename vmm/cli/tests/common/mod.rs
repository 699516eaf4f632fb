//! What the vmm integration tests share.

// Each test binary compiles this module and uses only part of it.
#![allow(dead_code)]

/// Guest physical address the test kernels load and start at (1 MiB).
pub const LOAD_ADDR: u64 = 0x10_0000;

/// An x86_64 ELF executable with one PT_LOAD of `code` at [`LOAD_ADDR`]
/// taking `memsz` bytes of guest memory (at least `code.len()`), its entry
/// at the start of `code`, no PVH note: what barge's loader accepts as a
/// vmlinux.
pub fn elf64(code: &[u8], memsz: u64) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    const CODE_OFFSET: u64 = 0x1000;
    let memsz = memsz.max(code.len() as u64);
    let mut image = vec![0u8; CODE_OFFSET as usize];
    let e = &mut image[..EHDR];
    e[0..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // 64-bit
    e[5] = 1; // little endian
    e[6] = 1; // ELF version
    e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // x86_64
    e[20..24].copy_from_slice(&1u32.to_le_bytes());
    e[24..32].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // entry
    e[32..40].copy_from_slice(&(EHDR as u64).to_le_bytes()); // phoff
    e[52..54].copy_from_slice(&(EHDR as u16).to_le_bytes());
    e[54..56].copy_from_slice(&(PHDR as u16).to_le_bytes());
    e[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
    let p = &mut image[EHDR..EHDR + PHDR];
    p[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    p[4..8].copy_from_slice(&7u32.to_le_bytes()); // RWX
    p[8..16].copy_from_slice(&CODE_OFFSET.to_le_bytes());
    p[16..24].copy_from_slice(&LOAD_ADDR.to_le_bytes());
    p[24..32].copy_from_slice(&LOAD_ADDR.to_le_bytes());
    p[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    p[40..48].copy_from_slice(&memsz.to_le_bytes());
    p[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
    image.extend_from_slice(code);
    image
}

/// A kernel that is never run (the errors under test come first): 16
/// bytes of `hlt`.
pub fn idle_kernel() -> Vec<u8> {
    elf64(&[0xf4; 16], 16)
}

/// Whether /dev/kvm is usable for `test`. Without it the test fails with
/// instructions, unless `BARGE_SKIP_KVM=1` asks to skip it (then `false`).
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(_) if std::env::var("BARGE_SKIP_KVM").as_deref() == Ok("1") => {
            eprintln!("{test}: skipped: /dev/kvm is not usable and BARGE_SKIP_KVM=1");
            false
        }
        Err(e) => {
            panic!("{test} needs /dev/kvm ({e}); run on a host with KVM, or set BARGE_SKIP_KVM=1")
        }
    }
}
