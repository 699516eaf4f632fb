//! PVH boot: `hvm_start_info`, its module list (the initramfs) and memory map, for an ELF
//! vmlinux with a XEN_ELFNOTE_PHYS32_ENTRY note. The BSP enters in 32-bit protected mode
//! with paging off and EBX = `PVH_INFO_START` (see <https://xenbits.xen.org/docs/unstable/misc/pvh.html>).

use crate::x86_64::e820::E820Entry;
use crate::x86_64::layout::{
    CMDLINE_START, PVH_AREA_END, PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START,
};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

/// Size of `hvm_start_info` in guest memory.
const START_INFO_SIZE: usize = 56;
/// Size of one `hvm_modlist_entry`.
const MODLIST_ENTRY_SIZE: usize = 32;
/// Size of one `hvm_memmap_table_entry`.
const MEMMAP_ENTRY_SIZE: usize = 24;
/// Most memory map entries that fit before `PVH_AREA_END`.
pub const MAX_PVH_MEMMAP_ENTRIES: usize =
    (PVH_AREA_END - PVH_MEMMAP_START) as usize / MEMMAP_ENTRY_SIZE;

const _: () = {
    assert!(PVH_INFO_START + START_INFO_SIZE as u64 <= PVH_MODLIST_START);
    assert!(PVH_MODLIST_START + MODLIST_ENTRY_SIZE as u64 <= PVH_MEMMAP_START);
};

/// PVH start info failures.
#[derive(Debug, thiserror::Error)]
pub enum PvhError {
    /// More memory map entries than fit in the PVH area.
    #[error("{count} memory map entries do not fit in the PVH area (max {MAX_PVH_MEMMAP_ENTRIES}); use fewer RAM regions")]
    TooManyMemmapEntries {
        /// Entries asked for.
        count: usize,
    },
    /// Guest memory write failure.
    #[error("cannot write the PVH start info at {addr:#x}: {source}; give the VM RAM starting at address 0")]
    Write {
        /// Guest physical address.
        addr: u64,
        source: GuestMemoryError,
    },
}

fn start_info_bytes(s: &hvm_start_info) -> Vec<u8> {
    let mut b = Vec::with_capacity(START_INFO_SIZE);
    for v in [s.magic, s.version, s.flags, s.nr_modules] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    for v in [
        s.modlist_paddr,
        s.cmdline_paddr,
        s.rsdp_paddr,
        s.memmap_paddr,
    ] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(&s.memmap_entries.to_le_bytes());
    b.extend_from_slice(&s.reserved.to_le_bytes());
    b
}

fn modlist_bytes(m: &hvm_modlist_entry) -> Vec<u8> {
    let mut b = Vec::with_capacity(MODLIST_ENTRY_SIZE);
    for v in [m.paddr, m.size, m.cmdline_paddr, m.reserved] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b
}

fn memmap_bytes(e: &hvm_memmap_table_entry) -> Vec<u8> {
    let mut b = Vec::with_capacity(MEMMAP_ENTRY_SIZE);
    b.extend_from_slice(&e.addr.to_le_bytes());
    b.extend_from_slice(&e.size.to_le_bytes());
    b.extend_from_slice(&e.type_.to_le_bytes());
    b.extend_from_slice(&e.reserved.to_le_bytes());
    b
}

fn write(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) -> Result<(), PvhError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| PvhError::Write { addr, source })
}

/// Writes `hvm_start_info` at `PVH_INFO_START`, the initramfs module entry at
/// `PVH_MODLIST_START` and the memory map at `PVH_MEMMAP_START`.
pub fn write_start_info(
    mem: &GuestMemoryMmap,
    e820: &[E820Entry],
    initramfs: Option<(u64, u64)>,
    rsdp: u64,
) -> Result<(), PvhError> {
    if e820.len() > MAX_PVH_MEMMAP_ENTRIES {
        return Err(PvhError::TooManyMemmapEntries { count: e820.len() });
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    if let Some((paddr, size)) = initramfs {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        write(mem, PVH_MODLIST_START, &modlist_bytes(&module))?;
    }
    let mut map = Vec::with_capacity(e820.len() * MEMMAP_ENTRY_SIZE);
    for e in e820 {
        map.extend(memmap_bytes(&hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind.type_number(),
            reserved: 0,
        }));
    }
    write(mem, PVH_MEMMAP_START, &map)?;
    write(mem, PVH_INFO_START, &start_info_bytes(&info))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86_64::e820::memory_map;

    fn u32_at(mem: &GuestMemoryMmap, a: u64) -> u32 {
        mem.read_obj(GuestAddress(a)).unwrap()
    }
    fn u64_at(mem: &GuestMemoryMmap, a: u64) -> u64 {
        mem.read_obj(GuestAddress(a)).unwrap()
    }

    #[test]
    fn struct_sizes_match_the_pvh_abi() {
        assert_eq!(std::mem::size_of::<hvm_start_info>(), START_INFO_SIZE);
        assert_eq!(std::mem::size_of::<hvm_modlist_entry>(), MODLIST_ENTRY_SIZE);
        assert_eq!(
            std::mem::size_of::<hvm_memmap_table_entry>(),
            MEMMAP_ENTRY_SIZE
        );
    }

    #[test]
    fn start_info_module_and_memmap_read_back() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let e820 = memory_map(&[(0, 256 << 20)]).unwrap();
        write_start_info(&mem, &e820, Some((0x800_0000, 0x4000)), 0xe0000).unwrap();
        let s = PVH_INFO_START;
        assert_eq!(u32_at(&mem, s), XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(u32_at(&mem, s + 4), 1);
        assert_eq!(u32_at(&mem, s + 12), 1, "nr_modules");
        assert_eq!(u64_at(&mem, s + 16), PVH_MODLIST_START);
        assert_eq!(u64_at(&mem, s + 24), CMDLINE_START);
        assert_eq!(u64_at(&mem, s + 32), 0xe0000);
        assert_eq!(u64_at(&mem, s + 40), PVH_MEMMAP_START);
        assert_eq!(u32_at(&mem, s + 48), 4, "RAM, EBDA..1 MiB, RAM, ECAM");
        assert_eq!(u64_at(&mem, PVH_MODLIST_START), 0x800_0000);
        assert_eq!(u64_at(&mem, PVH_MODLIST_START + 8), 0x4000);
        for (i, e) in e820.iter().enumerate() {
            let a = PVH_MEMMAP_START + (i * MEMMAP_ENTRY_SIZE) as u64;
            assert_eq!(u64_at(&mem, a), e.addr);
            assert_eq!(u64_at(&mem, a + 8), e.size);
            assert_eq!(u32_at(&mem, a + 16), e.kind.type_number());
        }
    }

    #[test]
    fn no_initramfs_means_no_modules() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let e820 = memory_map(&[(0, 256 << 20)]).unwrap();
        write_start_info(&mem, &e820, None, 0xe0000).unwrap();
        assert_eq!(u32_at(&mem, PVH_INFO_START + 12), 0);
        assert_eq!(u64_at(&mem, PVH_INFO_START + 16), 0);
    }
}
