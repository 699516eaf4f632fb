//! The boot GDT and IDT, and the `kvm_segment` values matching the GDT entries.
//!
//! Layout of the GDT at `layout::GDT_START` (selector = index × 8):
//! 0 null, 1 (0x08) code, 2 (0x10) data, 3 (0x18) TSS. The code segment is 64-bit for the
//! Linux 64-bit entry and 32-bit for the PVH entry. The IDT is one zero entry: the kernel
//! installs its own before enabling interrupts.

use crate::x86_64::layout::{GDT_START, IDT_START};
use kvm_bindings::kvm_segment;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

/// Selector of the code segment.
pub const CODE_SELECTOR: u16 = 0x08;
/// Selector of the data segment (DS, ES, FS, GS, SS).
pub const DATA_SELECTOR: u16 = 0x10;
/// Selector of the task state segment.
pub const TSS_SELECTOR: u16 = 0x18;

/// Access/flags word of a 64-bit code segment: G, L, present, DPL 0, execute/read accessed.
pub const CODE64_FLAGS: u16 = 0xa09b;
/// Access/flags word of a flat 32-bit code segment: G, D/B, present, execute/read accessed.
pub const CODE32_FLAGS: u16 = 0xc09b;
/// Access/flags word of a flat data segment: G, D/B, present, read/write accessed.
pub const DATA_FLAGS: u16 = 0xc093;
/// Access/flags word of the (busy 32/64-bit) TSS.
pub const TSS_FLAGS: u16 = 0x808b;

/// Which CPU mode the GDT's code segment is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeMode {
    /// 64-bit long mode (Linux 64-bit boot protocol).
    Long64,
    /// 32-bit protected mode, paging off (PVH entry).
    Protected32,
}

/// GDT/IDT set-up failures.
#[derive(Debug, thiserror::Error)]
pub enum GdtError {
    /// The GDT or IDT did not fit in guest memory.
    #[error("cannot write the boot {what} at {addr:#x}: {source}; give the VM RAM starting at address 0")]
    Write {
        /// "GDT" or "IDT".
        what: &'static str,
        /// Guest physical address.
        addr: u64,
        source: GuestMemoryError,
    },
}

/// Encodes one GDT descriptor from its flags/access word, base and 20-bit limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    let flags = u64::from(flags);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The four GDT entries for `mode`.
pub fn gdt_entries(mode: CodeMode) -> [u64; 4] {
    let code = match mode {
        CodeMode::Long64 => CODE64_FLAGS,
        CodeMode::Protected32 => CODE32_FLAGS,
    };
    [
        0,
        gdt_entry(code, 0, 0xfffff),
        gdt_entry(DATA_FLAGS, 0, 0xfffff),
        gdt_entry(TSS_FLAGS, 0, 0xfffff),
    ]
}

/// Decodes a GDT descriptor into the `kvm_segment` KVM wants for the hidden part of the
/// segment register loaded with `selector`.
pub fn segment_from_entry(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit: limit as u32,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Writes the GDT for `mode` at `GDT_START` and an empty IDT at `IDT_START`.
/// Returns the GDT entries written.
pub fn write_gdt_and_idt(mem: &GuestMemoryMmap, mode: CodeMode) -> Result<[u64; 4], GdtError> {
    let entries = gdt_entries(mode);
    for (i, e) in entries.iter().enumerate() {
        let addr = GDT_START + i as u64 * 8;
        mem.write_obj(*e, GuestAddress(addr))
            .map_err(|source| GdtError::Write {
                what: "GDT",
                addr,
                source,
            })?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))
        .map_err(|source| GdtError::Write {
            what: "IDT",
            addr: IDT_START,
            source,
        })?;
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entry_encodes_the_well_known_flat_descriptors() {
        assert_eq!(gdt_entry(CODE64_FLAGS, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(DATA_FLAGS, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(CODE32_FLAGS, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
        assert_eq!(
            gdt_entry(0x8093, 0x1234_5678, 0xabcde),
            0x128a_9334_5678_bcde
        );
    }

    #[test]
    fn segments_decode_from_their_descriptors() {
        let code = segment_from_entry(gdt_entry(CODE64_FLAGS, 0, 0xfffff), CODE_SELECTOR);
        assert_eq!(
            (code.l, code.db, code.g, code.s, code.type_, code.present),
            (1, 0, 1, 1, 0xb, 1)
        );
        assert_eq!(code.limit, 0xffff_ffff);
        assert_eq!(code.selector, 0x8);
        let data = segment_from_entry(gdt_entry(DATA_FLAGS, 0, 0xfffff), DATA_SELECTOR);
        assert_eq!((data.l, data.db, data.type_, data.unusable), (0, 1, 3, 0));
        let tss = segment_from_entry(gdt_entry(TSS_FLAGS, 0, 0xfffff), TSS_SELECTOR);
        assert_eq!((tss.s, tss.type_, tss.present), (0, 0xb, 1));
        let null = segment_from_entry(0, 0);
        assert_eq!(null.unusable, 1);
        let based = segment_from_entry(gdt_entry(0x0093, 0x1234_5678, 0x10), 0);
        assert_eq!((based.base, based.limit, based.g), (0x1234_5678, 0x10, 0));
    }

    #[test]
    fn gdt_and_idt_read_back_from_guest_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        mem.write_obj(0xffff_ffff_ffff_ffffu64, GuestAddress(IDT_START))
            .unwrap();
        write_gdt_and_idt(&mem, CodeMode::Long64).unwrap();
        let read = |i: u64| {
            mem.read_obj::<u64>(GuestAddress(GDT_START + i * 8))
                .unwrap()
        };
        assert_eq!(read(0), 0);
        assert_eq!(read(1), 0x00af_9b00_0000_ffff);
        assert_eq!(read(2), 0x00cf_9300_0000_ffff);
        assert_eq!(read(3), 0x008f_8b00_0000_ffff);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(IDT_START)).unwrap(), 0);
        write_gdt_and_idt(&mem, CodeMode::Protected32).unwrap();
        assert_eq!(read(1), 0x00cf_9b00_0000_ffff);
    }
}
