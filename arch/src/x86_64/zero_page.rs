//! Linux `boot_params` (the "zero page") for the 64-bit boot protocol.
//!
//! When the kernel image had a setup header (bzImage), it is kept and barge fills in the
//! loader's fields; otherwise (ELF vmlinux entered at its 64-bit entry) a minimal header is
//! made up. See Documentation/arch/x86/boot.rst.

use crate::x86_64::e820::E820Entry;
use crate::x86_64::layout::{CMDLINE_START, ZERO_PAGE_START};
use linux_loader::loader::bootparam::{
    boot_e820_entry, boot_params, setup_header, E820_MAX_ENTRIES_ZEROPAGE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

/// `boot_flag` magic.
pub const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header` magic "HdrS".
pub const HDRS_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader`: undefined/other loader.
pub const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Kernel alignment assumed when there is no setup header (16 MiB).
pub const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x100_0000;

/// What goes into the zero page besides the setup header.
#[derive(Clone, Copy, Debug)]
pub struct ZeroPageInfo<'a> {
    /// The kernel's own setup header (bzImage), or `None`.
    pub setup_header: Option<setup_header>,
    /// Memory map.
    pub e820: &'a [E820Entry],
    /// Initramfs (gpa, size), if any.
    pub initramfs: Option<(u64, u64)>,
    /// RSDP address.
    pub rsdp: u64,
}

/// Zero page failures.
#[derive(Debug, thiserror::Error)]
pub enum ZeroPageError {
    /// More e820 entries than boot_params holds.
    #[error("{count} memory map entries do not fit in boot_params (max {E820_MAX_ENTRIES_ZEROPAGE}); use fewer RAM regions")]
    TooManyE820Entries {
        /// Entries asked for.
        count: usize,
    },
    /// Guest memory write failure.
    #[error("cannot write boot_params at {ZERO_PAGE_START:#x}: {0}; give the VM RAM starting at address 0")]
    Write(#[source] GuestMemoryError),
}

/// Builds the zero page (pure).
pub fn boot_params_for(info: &ZeroPageInfo) -> Result<boot_params, ZeroPageError> {
    if info.e820.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(ZeroPageError::TooManyE820Entries {
            count: info.e820.len(),
        });
    }
    let mut params = boot_params::default();
    match info.setup_header {
        Some(hdr) => params.hdr = hdr,
        None => {
            params.hdr.boot_flag = BOOT_FLAG_MAGIC;
            params.hdr.header = HDRS_MAGIC;
            params.hdr.kernel_alignment = DEFAULT_KERNEL_ALIGNMENT;
        }
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.ext_cmd_line_ptr = (CMDLINE_START >> 32) as u32;
    if let Some((addr, size)) = info.initramfs {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    params.acpi_rsdp_addr = info.rsdp;
    params.e820_entries = info.e820.len() as u8;
    for (slot, e) in params.e820_table.iter_mut().zip(info.e820) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind.type_number(),
        };
    }
    Ok(params)
}

/// Writes the zero page at `ZERO_PAGE_START`.
pub fn write_boot_params(mem: &GuestMemoryMmap, info: &ZeroPageInfo) -> Result<(), ZeroPageError> {
    let params = boot_params_for(info)?;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(ZeroPageError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86_64::e820::{memory_map, E820_RAM, E820_RESERVED};

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn zero_page_reads_back_with_e820_cmdline_initramfs_and_rsdp() {
        let mem = mem();
        let e820 = memory_map(&[(0, 0xc000_0000), (1 << 32, 1 << 30)]).unwrap();
        let info = ZeroPageInfo {
            setup_header: None,
            e820: &e820,
            initramfs: Some((0x7000_0000, 0x12_3000)),
            rsdp: 0xe0000,
        };
        write_boot_params(&mem, &info).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, HDRS_MAGIC);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ hdr.ramdisk_image }, 0x7000_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x12_3000);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(p.e820_entries, 5);
        let table = p.e820_table;
        let got: Vec<(u64, u64, u32)> = table[..5]
            .iter()
            .map(|e| (e.addr, e.size, e.r#type))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x100000 - 0x9fc00, E820_RESERVED),
                (0x100000, 0xc000_0000 - 0x100000, E820_RAM),
                (0xe000_0000, 0x1000_0000, E820_RESERVED),
                (1 << 32, 1 << 30, E820_RAM),
            ]
        );
    }

    #[test]
    fn kernel_setup_header_is_kept() {
        let kernel_hdr = setup_header {
            boot_flag: 0xaa55,
            header: HDRS_MAGIC,
            version: 0x20f,
            loadflags: 1,
            kernel_alignment: 0x20_0000,
            initrd_addr_max: 0x7fff_ffff,
            type_of_loader: 0,
            ..Default::default()
        };
        let e820 = memory_map(&[(0, 64 << 20)]).unwrap();
        let p = boot_params_for(&ZeroPageInfo {
            setup_header: Some(kernel_hdr),
            e820: &e820,
            initramfs: None,
            rsdp: 0xe0000,
        })
        .unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.version }, 0x20f);
        assert_eq!({ hdr.kernel_alignment }, 0x20_0000);
        assert_eq!(hdr.loadflags, 1);
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!({ hdr.ramdisk_size }, 0);
    }

    #[test]
    fn too_many_e820_entries_is_an_error() {
        let e820 = vec![memory_map(&[(0, 64 << 20)]).unwrap()[0]; 129];
        let err = boot_params_for(&ZeroPageInfo {
            setup_header: None,
            e820: &e820,
            initramfs: None,
            rsdp: 0,
        })
        .unwrap_err();
        assert!(err.to_string().contains("129"));
    }
}
