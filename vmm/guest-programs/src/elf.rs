//! The smallest ELF64 executable barge's loader takes as a vmlinux: one
//! PT_LOAD segment holding the code at [`LOAD_ADDR`], the entry point at its
//! first byte, and optionally the Xen PVH note that makes barge enter the
//! code in 32-bit protected mode instead of long mode.
//!
//! The image is laid out as: ELF header at 0, program headers right after
//! it, the PVH note (when there is one) at 0x800, the code at 0x1000.

use arch::layout::HIMEM_START;

/// Guest physical address the code is loaded at and entered at (1 MiB).
pub const LOAD_ADDR: u64 = HIMEM_START;

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const NOTE_OFFSET: usize = 0x800;
const CODE_OFFSET: u64 = 0x1000;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// The Xen note type carrying the 32-bit PVH entry point, as in Linux's
/// vmlinux built with CONFIG_PVH.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// An ELF64 vmlinux around `code`: what the bench and the tests write as the
/// kernel barge boots.
///
/// Without further settings the segment takes exactly the code's bytes of
/// guest memory and there is no PVH note (barge uses the 64-bit entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vmlinux<'a> {
    code: &'a [u8],
    memsz: u64,
    pvh_entry: Option<u32>,
}

impl<'a> Vmlinux<'a> {
    /// `code`, linked at [`LOAD_ADDR`], loaded there and entered at its
    /// first byte.
    pub fn new(code: &'a [u8]) -> Self {
        Self {
            code,
            memsz: code.len() as u64,
            pvh_entry: None,
        }
    }

    /// The guest memory the segment takes (`p_memsz`); values below the
    /// code's length are raised to it.
    pub fn memsz(self, memsz: u64) -> Self {
        Self {
            memsz: memsz.max(self.code.len() as u64),
            ..self
        }
    }

    /// Adds a PT_NOTE with the XEN_ELFNOTE_PHYS32_ENTRY note (name "Xen")
    /// giving `entry`, so barge starts the guest through PVH: 32-bit
    /// protected mode, paging off, EBX pointing at the hvm_start_info.
    pub fn pvh_entry(self, entry: u32) -> Self {
        Self {
            pvh_entry: Some(entry),
            ..self
        }
    }

    /// The executable's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let phnum: u16 = if self.pvh_entry.is_some() { 2 } else { 1 };
        let mut image = vec![0u8; CODE_OFFSET as usize];
        let ehdr = &mut image[..EHDR_SIZE];
        ehdr[0..4].copy_from_slice(b"\x7fELF");
        ehdr[4] = 2; // ELFCLASS64
        ehdr[5] = 1; // ELFDATA2LSB
        ehdr[6] = 1; // EV_CURRENT
        ehdr[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        ehdr[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
        ehdr[20..24].copy_from_slice(&1u32.to_le_bytes()); // e_version
        ehdr[24..32].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
        ehdr[32..40].copy_from_slice(&(EHDR_SIZE as u64).to_le_bytes()); // e_phoff
        ehdr[52..54].copy_from_slice(&(EHDR_SIZE as u16).to_le_bytes()); // e_ehsize
        ehdr[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes()); // e_phentsize
        ehdr[56..58].copy_from_slice(&phnum.to_le_bytes()); // e_phnum
        let phdr = &mut image[EHDR_SIZE..EHDR_SIZE + PHDR_SIZE];
        phdr[0..4].copy_from_slice(&PT_LOAD.to_le_bytes());
        phdr[4..8].copy_from_slice(&7u32.to_le_bytes()); // RWX
        phdr[8..16].copy_from_slice(&CODE_OFFSET.to_le_bytes()); // p_offset
        phdr[16..24].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // p_vaddr
        phdr[24..32].copy_from_slice(&LOAD_ADDR.to_le_bytes()); // p_paddr
        phdr[32..40].copy_from_slice(&(self.code.len() as u64).to_le_bytes()); // p_filesz
        phdr[40..48].copy_from_slice(&self.memsz.to_le_bytes()); // p_memsz
        phdr[48..56].copy_from_slice(&0x1000u64.to_le_bytes()); // p_align
        if let Some(entry) = self.pvh_entry {
            let mut note = Vec::new();
            note.extend_from_slice(&4u32.to_le_bytes()); // n_namesz
            note.extend_from_slice(&4u32.to_le_bytes()); // n_descsz
            note.extend_from_slice(&XEN_ELFNOTE_PHYS32_ENTRY.to_le_bytes()); // n_type
            note.extend_from_slice(b"Xen\0");
            note.extend_from_slice(&entry.to_le_bytes());
            image[NOTE_OFFSET..NOTE_OFFSET + note.len()].copy_from_slice(&note);
            let phdr = &mut image[EHDR_SIZE + PHDR_SIZE..EHDR_SIZE + 2 * PHDR_SIZE];
            phdr[0..4].copy_from_slice(&PT_NOTE.to_le_bytes());
            phdr[4..8].copy_from_slice(&4u32.to_le_bytes()); // R
            phdr[8..16].copy_from_slice(&(NOTE_OFFSET as u64).to_le_bytes()); // p_offset
            phdr[32..40].copy_from_slice(&(note.len() as u64).to_le_bytes()); // p_filesz
            phdr[40..48].copy_from_slice(&(note.len() as u64).to_le_bytes()); // p_memsz
            phdr[48..56].copy_from_slice(&4u64.to_le_bytes()); // p_align
        }
        image.extend_from_slice(self.code);
        image
    }
}

/// [`Vmlinux::new`]`(code)` as bytes: the segment takes the code's length,
/// no PVH note.
pub fn elf64(code: &[u8]) -> Vec<u8> {
    Vmlinux::new(code).to_bytes()
}

/// A kernel for runs that never get to execute it (the errors under test
/// come first) or that only need a guest that stops: 16 bytes of `hlt`.
pub fn idle_kernel() -> Vec<u8> {
    elf64(&[0xf4; 16])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::fnv1a;

    fn u16_at(image: &[u8], offset: usize) -> u16 {
        u16::from_le_bytes(image[offset..offset + 2].try_into().unwrap())
    }

    fn u32_at(image: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(image[offset..offset + 4].try_into().unwrap())
    }

    fn u64_at(image: &[u8], offset: usize) -> u64 {
        u64::from_le_bytes(image[offset..offset + 8].try_into().unwrap())
    }

    #[test]
    fn one_load_segment_at_1_mib_entered_at_its_start() {
        let code = [0xeb, 0xfe];
        let image = elf64(&code);
        assert_eq!(&image[..7], b"\x7fELF\x02\x01\x01");
        assert_eq!(u16_at(&image, 16), 2, "ET_EXEC");
        assert_eq!(u16_at(&image, 18), 0x3e, "EM_X86_64");
        assert_eq!(u64_at(&image, 24), 0x10_0000, "e_entry");
        assert_eq!(u64_at(&image, 32), 64, "e_phoff");
        assert_eq!(u16_at(&image, 56), 1, "e_phnum");
        let phdr = 64;
        assert_eq!(u32_at(&image, phdr), PT_LOAD);
        assert_eq!(u64_at(&image, phdr + 8), 0x1000, "p_offset");
        assert_eq!(u64_at(&image, phdr + 16), 0x10_0000, "p_vaddr");
        assert_eq!(u64_at(&image, phdr + 24), 0x10_0000, "p_paddr");
        assert_eq!(u64_at(&image, phdr + 32), 2, "p_filesz");
        assert_eq!(u64_at(&image, phdr + 40), 2, "p_memsz");
        assert_eq!(image.len(), 0x1002);
        assert_eq!(&image[0x1000..], &code);
    }

    #[test]
    fn memsz_is_at_least_the_code() {
        let code = [0xf4; 16];
        let big = Vmlinux::new(&code).memsz(64 << 20).to_bytes();
        assert_eq!(u64_at(&big, 64 + 32), 16, "p_filesz");
        assert_eq!(u64_at(&big, 64 + 40), 64 << 20, "p_memsz");
        let small = Vmlinux::new(&code).memsz(4).to_bytes();
        assert_eq!(small, elf64(&code));
    }

    #[test]
    fn pvh_entry_adds_the_xen_phys32_note() {
        let image = Vmlinux::new(&[0xf4]).pvh_entry(0x10_0000).to_bytes();
        assert_eq!(u16_at(&image, 56), 2, "e_phnum");
        let note_phdr = 64 + 56;
        assert_eq!(u32_at(&image, note_phdr), PT_NOTE);
        assert_eq!(u64_at(&image, note_phdr + 8), 0x800, "p_offset");
        assert_eq!(u64_at(&image, note_phdr + 32), 20, "p_filesz");
        assert_eq!(u32_at(&image, 0x800), 4, "n_namesz");
        assert_eq!(u32_at(&image, 0x804), 4, "n_descsz");
        assert_eq!(u32_at(&image, 0x808), 18, "XEN_ELFNOTE_PHYS32_ENTRY");
        assert_eq!(&image[0x80c..0x810], b"Xen\0");
        assert_eq!(u32_at(&image, 0x810), 0x10_0000);
        assert_eq!(&image[0x1000..], &[0xf4]);
    }

    #[test]
    fn images_match_the_ones_the_old_copies_wrote() {
        // Recorded from vmm/tests/common (idle_kernel, elf64(code, memsz))
        // before those copies were merged here.
        assert_eq!(fnv1a(&idle_kernel()), 0x1127_1aff_792e_950d);
        let big = Vmlinux::new(&[0xf4; 16]).memsz(64 << 20).to_bytes();
        assert_eq!(fnv1a(&big), 0x0191_3355_f554_ce91);
        assert_eq!(fnv1a(&elf64(&[0xeb, 0xfe])), 0x90b6_db12_f9c1_5384);
    }
}
