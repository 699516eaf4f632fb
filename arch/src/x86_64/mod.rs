//! x86_64 boot set-up as plain data and guest-memory writes. No KVM
//! ioctls here; everything is testable against a `GuestMemoryMmap`.
//!
//! # How the vmm uses it
//!
//! ```text
//! let ram = resources::ram_regions(size)?;                      // (gpa, size) regions
//! // create GuestMemoryMmap for the regions, load the kernel with linux-loader:
//! //   bzImage: Linux64 { entry_addr: kernel_load + 0x200, setup_header: result.setup_header }
//! //   ELF with PVH note: Pvh { entry_addr: pvh entry from the note }
//! //   ELF without:       Linux64 { entry_addr: ELF entry, setup_header: None }
//! let initrd_addr = arch::initramfs_load_addr(&pairs, initrd_len, result.kernel_end,
//!                                             result.setup_header.as_ref())?;
//! // copy the initramfs to initrd_addr, then:
//! let bsp = arch::setup_boot(&mem, &arch::BootConfig {
//!     cpus, ram: &pairs, entry, cmdline, initramfs: Some((initrd_addr, initrd_len)),
//!     acpi: arch::AcpiExtras::default(),
//! })?;
//! // every vCPU i:  let mut c = kvm.get_supported_cpuid(..)?; arch::patch_cpuid(&mut c, i, cpus);
//! //                vcpu.set_cpuid2(&c); vcpu.set_msrs(&Msrs::from_entries(&bsp.msrs));
//! //                vcpu.set_fpu(&bsp.fpu); let mut l = vcpu.get_lapic()?;
//! //                arch::set_lint(&mut l); vcpu.set_lapic(&l);
//! // vCPU 0 only:   vcpu.set_regs(&bsp.regs); let mut s = vcpu.get_sregs()?;
//! //                bsp.apply_sregs(&mut s); vcpu.set_sregs(&s);
//! ```
//!
//! Application processors get no register state: KVM's in-kernel LAPIC keeps them waiting
//! for INIT/SIPI, which the guest kernel sends (it finds them in the ACPI MADT).
//!
//! The guest physical map is in [`layout`]; poweroff/reboot go through the ACPI register
//! at `layout::ACPI_SLEEP_CONTROL_PORT` (see [`acpi`]).

pub mod acpi;
pub mod cpuid;
pub mod e820;
pub mod gdt;
pub mod layout;
pub mod msr;
pub mod paging;
pub mod pvh;
pub mod regs;
pub mod reset_vector;
pub mod zero_page;

pub use acpi::{
    create_acpi_tables, mcfg, pci_host_bridge_aml, AcpiError, AcpiExtras, PciHostBridgeAcpi,
};
pub use cpuid::patch_cpuid;
pub use e820::{memory_map, E820Entry, E820Error, E820Kind};
pub use linux_loader::loader::bootparam::setup_header;
pub use msr::boot_msrs;
pub use regs::{set_lint, VcpuBootState};

use gdt::{write_gdt_and_idt, CodeMode, GdtError};
use kvm_bindings::kvm_regs;
use layout::{
    BOOT_STACK_POINTER, CMDLINE_MAX_SIZE, CMDLINE_START, DEFAULT_INITRD_ADDR_MAX, HIMEM_START,
    MMIO32_HOLE_START, PVH_INFO_START, RESET_VECTOR, ZERO_PAGE_START,
};
use paging::PagingError;
use pvh::PvhError;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};
use zero_page::{ZeroPageError, ZeroPageInfo};

/// Boot protocol version from which `initrd_addr_max` is valid.
const BOOT_PROTOCOL_INITRD_ADDR_MAX: u16 = 0x203;
/// Boot protocol version from which `cmdline_size` is valid.
const BOOT_PROTOCOL_CMDLINE_SIZE: u16 = 0x206;
/// Boot protocol version from which `pref_address` and `init_size` are valid.
const BOOT_PROTOCOL_PREF_ADDRESS: u16 = 0x20a;
/// initrd_addr_max for protocols older than 2.03.
const OLD_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const PAGE_SIZE: u64 = 0x1000;

/// How the kernel is entered.
#[derive(Clone, Copy, Debug)]
pub enum KernelEntry {
    /// Linux 64-bit boot protocol: long mode, RSI = zero page.
    Linux64 {
        /// 64-bit entry point (bzImage: load address + 0x200; ELF: its entry).
        entry_addr: u64,
        /// The setup header linux-loader read from a bzImage; `None` for ELF.
        setup_header: Option<setup_header>,
    },
    /// PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh {
        /// Entry point from the ELF note XEN_ELFNOTE_PHYS32_ENTRY.
        entry_addr: u64,
    },
}

/// Everything [`setup_boot`] writes into guest memory.
#[derive(Clone, Copy, Debug)]
pub struct BootConfig<'a> {
    /// Number of vCPUs (1..=254).
    pub cpus: u8,
    /// RAM regions `(gpa, size)`, sorted, as from `resources::ram_regions`.
    pub ram: &'a [(u64, u64)],
    /// Entry protocol and address.
    pub entry: KernelEntry,
    /// Kernel command line, without NUL.
    pub cmdline: &'a str,
    /// Initramfs already copied into guest memory: `(gpa, size)`.
    pub initramfs: Option<(u64, u64)>,
    /// Extra ACPI content (PCI host bridge, MCFG, later); `AcpiExtras::default()` for none.
    pub acpi: AcpiExtras<'a>,
}

/// Boot set-up failures.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Bad vCPU count.
    #[error("cannot boot {cpus} vCPUs: use 1 to {} vCPUs", acpi::MAX_ACPI_CPUS)]
    CpuCount {
        /// The count asked for.
        cpus: u8,
    },
    /// Command line longer than barge's area or the kernel's limit.
    #[error("kernel command line is {len} bytes but at most {max} fit; shorten --cmdline")]
    CmdlineTooLong {
        /// Bytes given.
        len: usize,
        /// Longest accepted.
        max: usize,
    },
    /// NUL inside the command line.
    #[error("kernel command line contains a NUL byte at offset {offset}; remove it")]
    CmdlineHasNul { offset: usize },
    /// Command line write failure.
    #[error("cannot write the kernel command line at {CMDLINE_START:#x}: {0}; give the VM RAM starting at address 0")]
    CmdlineWrite(#[source] GuestMemoryError),
    /// The initramfs does not fit.
    #[error("initramfs of {size} bytes does not fit in guest memory below {limit:#x} (above the kernel, which needs memory up to {kernel_end:#x}); give the VM more memory (--memory) or use a smaller initramfs")]
    InitramfsTooLarge {
        /// Initramfs size.
        size: u64,
        /// Highest address it could end at.
        limit: u64,
        /// End of the memory the kernel needs (image, or its decompression area).
        kernel_end: u64,
    },
    /// The configured initramfs range is not in low RAM.
    #[error("initramfs at {addr:#x}+{size:#x} is not inside RAM below {MMIO32_HOLE_START:#x}; place it with arch::initramfs_load_addr")]
    InitramfsOutsideRam {
        /// Start.
        addr: u64,
        /// Size.
        size: u64,
    },
    /// Reset vector stub write failure.
    #[error("cannot write the reset vector stub at {RESET_VECTOR:#x}: {0}; give the VM RAM starting at address 0")]
    ResetVector(#[source] GuestMemoryError),
    /// Memory map.
    #[error(transparent)]
    E820(#[from] E820Error),
    /// Page tables.
    #[error(transparent)]
    Paging(#[from] PagingError),
    /// GDT/IDT.
    #[error(transparent)]
    Gdt(#[from] GdtError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// Zero page.
    #[error(transparent)]
    ZeroPage(#[from] ZeroPageError),
    /// PVH start info.
    #[error(transparent)]
    Pvh(#[from] PvhError),
}

/// End of the RAM region that starts at 0, capped at the MMIO hole.
fn low_ram_end(ram: &[(u64, u64)]) -> u64 {
    ram.iter()
        .find(|(gpa, _)| *gpa == 0)
        .map_or(0, |(_, size)| (*size).min(MMIO32_HOLE_START))
}

/// Where to load an initramfs of `size` bytes: the highest page-aligned address below
/// the MMIO hole, the end of low RAM and the kernel's `initrd_addr_max` (from its setup
/// header; 0x7fffffff without one), and above `kernel_end` (and `HIMEM_START`). With a
/// setup header of protocol 2.10+ it also stays above `pref_address + init_size`, where a
/// bzImage decompresses itself.
pub fn initramfs_load_addr(
    ram: &[(u64, u64)],
    size: u64,
    kernel_end: u64,
    setup_header: Option<&setup_header>,
) -> Result<u64, BootError> {
    let addr_max = match setup_header {
        Some(h) if { h.version } >= BOOT_PROTOCOL_INITRD_ADDR_MAX => u64::from(h.initrd_addr_max),
        Some(_) => OLD_INITRD_ADDR_MAX,
        None => DEFAULT_INITRD_ADDR_MAX,
    };
    let limit = low_ram_end(ram).min(addr_max.saturating_add(1));
    let decompressed_end = match setup_header {
        Some(h) if { h.version } >= BOOT_PROTOCOL_PREF_ADDRESS => {
            ({ h.pref_address }).saturating_add(u64::from(h.init_size))
        }
        _ => 0,
    };
    let floor = kernel_end
        .max(decompressed_end)
        .max(HIMEM_START)
        .div_ceil(PAGE_SIZE)
        * PAGE_SIZE;
    let too_large = BootError::InitramfsTooLarge {
        size,
        limit,
        kernel_end: floor,
    };
    match limit.checked_sub(size).map(|s| s & !(PAGE_SIZE - 1)) {
        Some(start) if start >= floor => Ok(start),
        _ => Err(too_large),
    }
}

fn write_cmdline(
    mem: &GuestMemoryMmap,
    cmdline: &str,
    setup_header: Option<&setup_header>,
) -> Result<(), BootError> {
    if let Some(offset) = cmdline.bytes().position(|b| b == 0) {
        return Err(BootError::CmdlineHasNul { offset });
    }
    let mut max = CMDLINE_MAX_SIZE as usize - 1;
    if let Some(h) = setup_header {
        if { h.version } >= BOOT_PROTOCOL_CMDLINE_SIZE && h.cmdline_size > 0 {
            max = max.min(h.cmdline_size as usize);
        }
    }
    if cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(BootError::CmdlineWrite)
}

/// Writes everything the kernel needs to boot — command line, ACPI tables, page tables
/// (long mode), GDT/IDT, zero page or PVH start info — and returns the BSP's state.
/// The kernel and initramfs must already be in guest memory.
pub fn setup_boot(mem: &GuestMemoryMmap, cfg: &BootConfig) -> Result<VcpuBootState, BootError> {
    if cfg.cpus == 0 || cfg.cpus > acpi::MAX_ACPI_CPUS {
        return Err(BootError::CpuCount { cpus: cfg.cpus });
    }
    let e820 = memory_map(cfg.ram)?;
    if let Some((addr, size)) = cfg.initramfs {
        let inside = addr >= HIMEM_START
            && addr
                .checked_add(size)
                .is_some_and(|end| end <= low_ram_end(cfg.ram));
        if !inside {
            return Err(BootError::InitramfsOutsideRam { addr, size });
        }
    }
    let header = match &cfg.entry {
        KernelEntry::Linux64 { setup_header, .. } => setup_header.as_ref(),
        KernelEntry::Pvh { .. } => None,
    };
    write_cmdline(mem, cfg.cmdline, header)?;
    let rsdp = create_acpi_tables(mem, cfg.cpus, &cfg.acpi)?;
    reset_vector::write_reset_stub(mem)?;
    match cfg.entry {
        KernelEntry::Linux64 {
            entry_addr,
            setup_header,
        } => {
            let cr3 = paging::write_identity_page_tables(mem)?;
            let gdt = write_gdt_and_idt(mem, CodeMode::Long64)?;
            zero_page::write_boot_params(
                mem,
                &ZeroPageInfo {
                    setup_header,
                    e820: &e820,
                    initramfs: cfg.initramfs,
                    rsdp,
                },
            )?;
            let regs = kvm_regs {
                rip: entry_addr,
                rsp: BOOT_STACK_POINTER,
                rbp: BOOT_STACK_POINTER,
                rsi: ZERO_PAGE_START,
                ..Default::default()
            };
            Ok(VcpuBootState::new(CodeMode::Long64, &gdt, regs, cr3))
        }
        KernelEntry::Pvh { entry_addr } => {
            let gdt = write_gdt_and_idt(mem, CodeMode::Protected32)?;
            pvh::write_start_info(mem, &e820, cfg.initramfs, rsdp)?;
            let regs = kvm_regs {
                rip: entry_addr,
                rbx: PVH_INFO_START,
                ..Default::default()
            };
            Ok(VcpuBootState::new(CodeMode::Protected32, &gdt, regs, 0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_sregs;
    use linux_loader::loader::bootparam::boot_params;

    const MIB: u64 = 1 << 20;

    fn guest(size: u64) -> (GuestMemoryMmap, Vec<(u64, u64)>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap();
        (mem, vec![(0, size)])
    }

    fn linux_cfg<'a>(ram: &'a [(u64, u64)], cmdline: &'a str) -> BootConfig<'a> {
        BootConfig {
            cpus: 2,
            ram,
            entry: KernelEntry::Linux64 {
                entry_addr: 0x100_0200,
                setup_header: None,
            },
            cmdline,
            initramfs: Some((0x200_0000, 0x1000)),
            acpi: AcpiExtras::default(),
        }
    }

    #[test]
    fn linux64_boot_writes_everything_and_returns_long_mode_state() {
        let (mem, ram) = guest(64 * MIB);
        let state = setup_boot(&mem, &linux_cfg(&ram, "console=ttyS0 panic=-1")).unwrap();
        assert_eq!(state.regs.rip, 0x100_0200);
        assert_eq!(state.regs.rsi, ZERO_PAGE_START);
        assert_eq!(state.regs.rsp, BOOT_STACK_POINTER);
        let mut sregs = kvm_sregs::default();
        state.apply_sregs(&mut sregs);
        assert_eq!(sregs.cr3, layout::PML4_START);
        assert_eq!(
            paging::translate(&mem, sregs.cr3, 0x100_0200),
            Some(0x100_0200)
        );

        let mut cmdline = vec![0u8; 23];
        mem.read_slice(&mut cmdline, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&cmdline, b"console=ttyS0 panic=-1\0");

        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.ramdisk_image }, 0x200_0000);
        assert_eq!({ p.acpi_rsdp_addr }, layout::RSDP_START);
        assert_eq!(p.e820_entries, 4, "RAM, EBDA..1 MiB, RAM, ECAM");

        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, GuestAddress(layout::RSDP_START))
            .unwrap();
        assert_eq!(&sig, b"RSD PTR ");
    }

    #[test]
    fn ram_split_around_the_hole_gives_an_e820_without_the_hole() {
        const GIB: u64 = 1 << 30;
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 3 * GIB as usize),
            (GuestAddress(4 * GIB), GIB as usize),
        ])
        .unwrap();
        let ram = [(0, 3 * GIB), (4 * GIB, GIB)];
        let mut cfg = linux_cfg(&ram, "");
        cfg.cpus = 4;
        setup_boot(&mem, &cfg).unwrap();
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!(p.e820_entries, 5);
        let table = p.e820_table;
        let ram_entries: Vec<(u64, u64)> = table[..5]
            .iter()
            .filter(|e| e.r#type == e820::E820_RAM)
            .map(|e| (e.addr, e.addr + e.size))
            .collect();
        assert_eq!(
            ram_entries,
            vec![
                (0, layout::EBDA_START),
                (HIMEM_START, MMIO32_HOLE_START),
                (4 * GIB, 5 * GIB)
            ]
        );
    }

    #[test]
    fn pvh_boot_enters_protected_mode_with_ebx_at_start_info() {
        let (mem, ram) = guest(64 * MIB);
        let mut cfg = linux_cfg(&ram, "console=ttyS0");
        cfg.entry = KernelEntry::Pvh {
            entry_addr: 0x100_0000,
        };
        let state = setup_boot(&mem, &cfg).unwrap();
        assert_eq!(state.regs.rip, 0x100_0000);
        assert_eq!(state.regs.rbx, PVH_INFO_START);
        assert_eq!(state.efer, 0);
        assert_eq!(state.cs.db, 1);
        let magic: u32 = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(magic, 0x336e_c578);
    }

    #[test]
    fn bad_cmdline_cpus_and_initramfs_are_errors() {
        let (mem, ram) = guest(64 * MIB);
        let mut cfg = linux_cfg(&ram, "a\0b");
        assert!(matches!(
            setup_boot(&mem, &cfg),
            Err(BootError::CmdlineHasNul { offset: 1 })
        ));
        let long = "x".repeat(CMDLINE_MAX_SIZE as usize);
        cfg.cmdline = &long;
        assert!(matches!(
            setup_boot(&mem, &cfg),
            Err(BootError::CmdlineTooLong { .. })
        ));
        cfg.cmdline = "";
        cfg.cpus = 0;
        assert!(matches!(
            setup_boot(&mem, &cfg),
            Err(BootError::CpuCount { .. })
        ));
        cfg.cpus = 1;
        cfg.initramfs = Some((63 * MIB, 2 * MIB));
        assert!(matches!(
            setup_boot(&mem, &cfg),
            Err(BootError::InitramfsOutsideRam { .. })
        ));
    }

    #[test]
    fn kernel_cmdline_size_limit_is_respected() {
        let (mem, ram) = guest(64 * MIB);
        let hdr = setup_header {
            version: 0x20f,
            cmdline_size: 8,
            ..Default::default()
        };
        let mut cfg = linux_cfg(&ram, "123456789");
        cfg.entry = KernelEntry::Linux64 {
            entry_addr: 0x100_0200,
            setup_header: Some(hdr),
        };
        let err = setup_boot(&mem, &cfg).unwrap_err();
        assert!(matches!(err, BootError::CmdlineTooLong { len: 9, max: 8 }));
    }

    #[test]
    fn initramfs_goes_high_in_low_ram_page_aligned() {
        let ram = [(0, 512 * MIB)];
        let addr = initramfs_load_addr(&ram, 10 * MIB + 123, 20 * MIB, None).unwrap();
        assert_eq!(addr % PAGE_SIZE, 0);
        assert!(addr + 10 * MIB + 123 <= 512 * MIB);
        assert!(addr > 512 * MIB - 11 * MIB);
    }

    #[test]
    fn initramfs_respects_initrd_addr_max_and_the_hole() {
        let big = [(0, 0xc000_0000), (1 << 32, 1 << 30)];
        let hdr = setup_header {
            version: 0x20f,
            initrd_addr_max: 0x37ff_ffff,
            ..Default::default()
        };
        let addr = initramfs_load_addr(&big, MIB, 20 * MIB, Some(&hdr)).unwrap();
        assert_eq!(addr, 0x3800_0000 - MIB);
        let addr = initramfs_load_addr(&big, MIB, 20 * MIB, None).unwrap();
        assert_eq!(addr, 0x8000_0000 - MIB);
        let hdr = setup_header {
            version: 0x20f,
            initrd_addr_max: 0xffff_ffff,
            ..Default::default()
        };
        let addr = initramfs_load_addr(&big, MIB, 20 * MIB, Some(&hdr)).unwrap();
        assert_eq!(addr, 0xc000_0000 - MIB);
    }

    #[test]
    fn initramfs_stays_above_the_bzimage_decompression_area() {
        let ram = [(0, 64 * MIB)];
        let hdr = setup_header {
            version: 0x20f,
            initrd_addr_max: 0x7fff_ffff,
            pref_address: 16 * MIB,
            init_size: 40 * MIB as u32,
            ..Default::default()
        };
        // Kernel image ends at 10 MiB but decompresses up to 56 MiB.
        assert!(initramfs_load_addr(&ram, 8 * MIB, 10 * MIB, Some(&hdr)).is_ok());
        let err = initramfs_load_addr(&ram, 9 * MIB, 10 * MIB, Some(&hdr)).unwrap_err();
        assert!(err.to_string().contains("up to 0x3800000"), "{err}");
    }

    #[test]
    fn initramfs_larger_than_memory_is_a_clear_error() {
        let ram = [(0, 64 * MIB)];
        let err = initramfs_load_addr(&ram, 100 * MIB, 20 * MIB, None).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("initramfs of 104857600 bytes does not fit in guest memory below"),
            "{msg}"
        );
        assert!(initramfs_load_addr(&ram, 50 * MIB, 20 * MIB, None).is_err());
        assert!(initramfs_load_addr(&ram, 40 * MIB, 20 * MIB, None).is_ok());
    }
}
