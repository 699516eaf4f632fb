//! Long-mode identity page tables: PML4 → one PDPT → `PDE_COUNT` page directories of
//! 2 MiB pages, mapping guest physical `0..IDENTITY_MAP_SIZE` (4 GiB) 1:1.

use crate::x86_64::layout::{PDE_COUNT, PDE_START, PDPTE_START, PML4_START};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

/// Present + writable.
const PTE_PRESENT_RW: u64 = 0x3;
/// Present + writable + page size (2 MiB leaf in a page directory).
const PDE_2M_LEAF: u64 = 0x83;

/// Page-table set-up failures.
#[derive(Debug, thiserror::Error)]
pub enum PagingError {
    /// A table did not fit in guest memory.
    #[error("cannot write the boot page tables at {addr:#x}: {source}; give the VM at least 16 MiB of RAM starting at 0")]
    Write {
        /// Guest physical address of the table.
        addr: u64,
        source: GuestMemoryError,
    },
}

fn write_u64(mem: &GuestMemoryMmap, addr: u64, val: u64) -> Result<(), PagingError> {
    mem.write_obj(val, GuestAddress(addr))
        .map_err(|source| PagingError::Write { addr, source })
}

/// Writes the identity-mapping page tables and returns the CR3 value (the PML4 address).
pub fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<u64, PagingError> {
    write_u64(mem, PML4_START, PDPTE_START | PTE_PRESENT_RW)?;
    for pd in 0..PDE_COUNT {
        let pd_addr = PDE_START + pd * 0x1000;
        write_u64(mem, PDPTE_START + pd * 8, pd_addr | PTE_PRESENT_RW)?;
        for entry in 0..512u64 {
            let phys = ((pd << 9) + entry) << 21;
            write_u64(mem, pd_addr + entry * 8, phys | PDE_2M_LEAF)?;
        }
    }
    Ok(PML4_START)
}

/// Walks the boot page tables in guest memory like the MMU would (4-level, 2 MiB leaves)
/// and returns the physical address `virt` maps to, or `None` when unmapped.
pub fn translate(mem: &GuestMemoryMmap, cr3: u64, virt: u64) -> Option<u64> {
    const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
    let read = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).ok();
    let pml4e = read((cr3 & ADDR_MASK) + ((virt >> 39) & 0x1ff) * 8)?;
    if pml4e & 1 == 0 {
        return None;
    }
    let pdpte = read((pml4e & ADDR_MASK) + ((virt >> 30) & 0x1ff) * 8)?;
    if pdpte & 1 == 0 {
        return None;
    }
    let pde = read((pdpte & ADDR_MASK) + ((virt >> 21) & 0x1ff) * 8)?;
    if pde & 1 == 0 || pde & 0x80 == 0 {
        return None;
    }
    Some((pde & 0x000f_ffff_ffe0_0000) + (virt & 0x1f_ffff))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86_64::layout::IDENTITY_MAP_SIZE;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    #[test]
    fn page_tables_identity_map_the_first_4_gib() {
        let mem = mem();
        let cr3 = write_identity_page_tables(&mem).unwrap();
        assert_eq!(cr3, PML4_START);
        for virt in [
            0u64,
            0x7000,
            0x1234_5678,
            0x20_0000,
            0xbfff_ffff,
            0xfee0_0000,
            IDENTITY_MAP_SIZE - 1,
        ] {
            assert_eq!(translate(&mem, cr3, virt), Some(virt), "{virt:#x}");
        }
        assert_eq!(translate(&mem, cr3, IDENTITY_MAP_SIZE), None);
    }

    #[test]
    fn pml4_entry_points_at_the_pdpt_present_and_writable() {
        let mem = mem();
        write_identity_page_tables(&mem).unwrap();
        let pml4e: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4e, PDPTE_START | 3);
        let pde: u64 = mem.read_obj(GuestAddress(PDE_START + 8)).unwrap();
        assert_eq!(pde, 0x20_0000 | 0x83);
    }

    #[test]
    fn page_tables_outside_guest_memory_are_an_error() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0x10_0000), 0x10_0000)]).unwrap();
        let err = write_identity_page_tables(&mem).unwrap_err();
        assert!(err.to_string().contains("page tables"));
    }
}
