//! Kernel, initramfs and command line loading with linux-loader.
//!
//! - bzImage: the protected-mode kernel goes to `HIMEM_START` (1 MiB), the
//!   setup header is kept for the zero page; the 64-bit entry point is the
//!   load address + 0x200.
//! - ELF vmlinux: segments go to their physical addresses; the entry is the
//!   PVH entry when the kernel has the Xen PVH note, else the ELF entry
//!   (64-bit boot protocol).
//! - arm64 Image (aarch64 hosts), plain or gzip-compressed as Debian ships it:
//!   at `arch::layout::KERNEL_LOAD_BASE` plus the Image header's text offset
//!   (linux-loader's PE loader); the entry is its first byte.
//! - initramfs: at the address arch's placement helper chooses.
//! - command line: at `arch::layout::CMDLINE_START` (x86_64); on aarch64 it
//!   goes into the device tree's `/chosen`, so it is only checked here.
//!
//! Every format is recognised on every host, so a kernel of the other
//! architecture gets an error that says so.
//!
//! Every error names the file and the problem.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

#[cfg(target_arch = "x86_64")]
use arch::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START};
#[cfg(target_arch = "x86_64")]
use linux_loader::loader::bootparam::setup_header;
#[cfg(target_arch = "x86_64")]
use linux_loader::loader::KernelLoader;
use linux_loader::loader::{self, Cmdline};
#[cfg(target_arch = "x86_64")]
use linux_loader::loader::{BzImage, Elf, PvhBootCapability};
#[cfg(target_arch = "x86_64")]
use vm_memory::Address;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// The longest command line the guest kernel takes, NUL included (x86_64:
/// the boot protocol's area; arm64: COMMAND_LINE_SIZE).
#[cfg(target_arch = "x86_64")]
pub const CMDLINE_CAPACITY: usize = CMDLINE_MAX_SIZE as usize;
/// The longest command line the guest kernel takes, NUL included (x86_64:
/// the boot protocol's area; arm64: COMMAND_LINE_SIZE).
#[cfg(target_arch = "aarch64")]
pub const CMDLINE_CAPACITY: usize = 2048;
/// Where an arm64 Image header has its magic ("ARM\x64").
const ARM64_MAGIC_OFFSET: u64 = 0x38;
const ARM64_MAGIC: &[u8; 4] = b"ARM\x64";
const GZIP_MAGIC: &[u8; 2] = b"\x1f\x8b";

/// Offset of the 64-bit entry point from a bzImage's protected-mode load
/// address (boot protocol 2.12+, "64-bit BOOT PROTOCOL").
pub const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Offset of the setup header in a bzImage.
#[cfg(target_arch = "x86_64")]
const SETUP_HEADER_OFFSET: u64 = 0x1f1;
/// Offset of the "HdrS" magic in a bzImage.
const HDRS_OFFSET: u64 = 0x202;
const HDRS_MAGIC: &[u8; 4] = b"HdrS";
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";

/// Errors from loading the kernel, initramfs or command line.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The kernel path does not exist.
    #[error("kernel {0}: no such file; pass a bzImage or ELF vmlinux with --kernel")]
    KernelMissing(PathBuf),
    /// The kernel cannot be opened or read.
    #[error("kernel {path}: cannot read it: {source}")]
    KernelUnreadable { path: PathBuf, source: io::Error },
    /// The kernel is in no format barge knows.
    #[error("kernel {0}: not a bzImage, ELF vmlinux or arm64 Image")]
    KernelGarbage(PathBuf),
    /// The kernel is for the other architecture.
    #[error(
        "kernel {path} is {format}, but this barge runs {host} guests: pass {expected} \
         with --kernel"
    )]
    KernelWrongArch {
        path: PathBuf,
        /// What the file is.
        format: &'static str,
        /// The architecture barge was built for.
        host: &'static str,
        /// The formats that architecture boots.
        expected: &'static str,
    },
    /// The kernel does not fit in guest memory.
    #[error(
        "kernel {path} does not fit in guest memory: it needs {needs:#x} bytes at {at:#x}, \
         which is not all RAM; give the VM more memory (--memory size=...)"
    )]
    KernelTooBig {
        path: PathBuf,
        /// Bytes needed.
        needs: u64,
        at: u64,
    },
    /// linux-loader rejected the kernel.
    #[error("kernel {path}: {source}")]
    KernelLoad {
        path: PathBuf,
        /// linux-loader's complaint.
        source: loader::Error,
    },
    /// The initramfs path does not exist.
    #[error("initramfs {0}: no such file")]
    InitramfsMissing(PathBuf),
    /// The initramfs cannot be opened or read.
    #[error("initramfs {path}: cannot read it: {source}")]
    InitramfsUnreadable { path: PathBuf, source: io::Error },
    /// The initramfs does not fit in the RAM left for it.
    #[error("initramfs {path} is larger than the guest memory available for it: {reason}")]
    InitramfsTooBig {
        path: PathBuf,
        /// arch's placement error, or where the range fell outside RAM.
        reason: String,
    },
    /// The command line is too long or has characters the kernel cannot take.
    #[error(
        "kernel command line: {0}; keep it printable ASCII and under {CMDLINE_CAPACITY} bytes"
    )]
    Cmdline(String),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, LoadError>;

/// The kernel image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// A bzImage (Linux boot protocol).
    BzImage,
    /// An ELF vmlinux.
    Elf,
    /// An arm64 Image (Documentation/arch/arm64/booting.rst).
    Arm64Image,
    /// A gzip-compressed file: an arm64 Image once decompressed (Debian's
    /// arm64 vmlinuz).
    Gzip,
}

impl KernelFormat {
    /// The format as a message names it.
    pub fn description(self) -> &'static str {
        match self {
            KernelFormat::BzImage => "an x86 bzImage",
            KernelFormat::Elf => "an ELF vmlinux",
            KernelFormat::Arm64Image => "an arm64 Image",
            KernelFormat::Gzip => "a gzip-compressed kernel",
        }
    }

    /// Whether barge boots this format on the architecture it was built for.
    pub fn boots_here(self) -> bool {
        if cfg!(target_arch = "aarch64") {
            matches!(self, KernelFormat::Arm64Image | KernelFormat::Gzip)
        } else {
            matches!(self, KernelFormat::BzImage | KernelFormat::Elf)
        }
    }
}

/// The architecture barge was built for, as messages name it.
pub const HOST_ARCH: &str = if cfg!(target_arch = "aarch64") {
    "aarch64"
} else {
    "x86_64"
};
/// The kernel formats barge boots here, as messages name them.
const FORMATS_HERE: &str = if cfg!(target_arch = "aarch64") {
    "an arm64 Image (plain or gzip-compressed)"
} else {
    "a bzImage or ELF vmlinux"
};

/// How the BSP enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelEntry {
    #[cfg(target_arch = "x86_64")]
    /// 64-bit boot protocol: long mode, paging on, RSI = zero page.
    Linux64 {
        /// Entry address.
        addr: u64,
    },
    #[cfg(target_arch = "x86_64")]
    /// PVH: 32-bit protected mode, paging off, EBX = hvm_start_info.
    Pvh {
        /// Entry address.
        addr: u64,
    },
    #[cfg(target_arch = "aarch64")]
    /// arm64 Image: EL1h, MMU off, x0 = the device tree's address.
    Arm64 {
        /// Entry address (the Image's first byte).
        addr: u64,
    },
}

impl KernelEntry {
    /// The entry address.
    pub fn addr(&self) -> u64 {
        match self {
            #[cfg(target_arch = "x86_64")]
            KernelEntry::Linux64 { addr } | KernelEntry::Pvh { addr } => *addr,
            #[cfg(target_arch = "aarch64")]
            KernelEntry::Arm64 { addr } => *addr,
        }
    }
}

/// What was loaded for the kernel.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// bzImage or ELF.
    pub format: KernelFormat,
    /// Where and how to enter it.
    pub entry: KernelEntry,
    /// First byte loaded.
    pub load_addr: u64,
    /// One past the last byte the kernel occupies (memsz for ELF).
    pub end_addr: u64,
    /// The bzImage setup header, for the zero page.
    #[cfg(target_arch = "x86_64")]
    pub setup_header: Option<setup_header>,
}

/// Where the initramfs went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedInitramfs {
    /// Guest physical address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

fn open_kernel(path: &Path) -> Result<File> {
    let file = File::open(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => LoadError::KernelMissing(path.to_owned()),
        _ => LoadError::KernelUnreadable {
            path: path.to_owned(),
            source,
        },
    })?;
    ensure_regular_file(&file).map_err(|source| LoadError::KernelUnreadable {
        path: path.to_owned(),
        source,
    })?;
    Ok(file)
}

fn ensure_regular_file(file: &File) -> io::Result<()> {
    let meta = file.metadata()?;
    if meta.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "it is a directory",
        ));
    }
    Ok(())
}

/// Reads `buf.len()` bytes at `offset`; short files give `Ok(false)`.
fn read_at(file: &mut File, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
    file.seek(SeekFrom::Start(offset))?;
    match file.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// Tells the kernel formats apart by their magic numbers.
pub fn detect_format(file: &mut File) -> io::Result<Option<KernelFormat>> {
    let mut magic = [0u8; 4];
    if read_at(file, 0, &mut magic)? && &magic == ELF_MAGIC {
        return Ok(Some(KernelFormat::Elf));
    }
    if read_at(file, 0, &mut magic[..2])? && &magic[..2] == GZIP_MAGIC {
        return Ok(Some(KernelFormat::Gzip));
    }
    if read_at(file, HDRS_OFFSET, &mut magic)? && &magic == HDRS_MAGIC {
        return Ok(Some(KernelFormat::BzImage));
    }
    if read_at(file, ARM64_MAGIC_OFFSET, &mut magic)? && &magic == ARM64_MAGIC {
        return Ok(Some(KernelFormat::Arm64Image));
    }
    Ok(None)
}

/// Whether `[addr, addr + len)` is all guest RAM.
fn is_ram(mem: &GuestMemoryMmap, addr: u64, len: u64) -> bool {
    if len == 0 {
        return true;
    }
    match usize::try_from(len) {
        Ok(len) => mem.check_range(GuestAddress(addr), len),
        Err(_) => false,
    }
}

/// Checks that `path` is a readable kernel of a format barge boots here
/// without loading it (so a wrong file is reported before KVM is opened).
pub fn inspect_kernel(path: &Path) -> Result<KernelFormat> {
    let mut file = open_kernel(path)?;
    let format = detect_format(&mut file)
        .map_err(|source| LoadError::KernelUnreadable {
            path: path.to_owned(),
            source,
        })?
        .ok_or_else(|| LoadError::KernelGarbage(path.to_owned()))?;
    if !format.boots_here() {
        return Err(LoadError::KernelWrongArch {
            path: path.to_owned(),
            format: format.description(),
            host: HOST_ARCH,
            expected: FORMATS_HERE,
        });
    }
    Ok(format)
}

/// Loads the kernel at `path` into `mem`.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel> {
    let mut file = open_kernel(path)?;
    let unreadable = |source| LoadError::KernelUnreadable {
        path: path.to_owned(),
        source,
    };
    match detect_format(&mut file).map_err(unreadable)? {
        #[cfg(target_arch = "x86_64")]
        Some(KernelFormat::BzImage) => load_bzimage(mem, path, &mut file),
        #[cfg(target_arch = "x86_64")]
        Some(KernelFormat::Elf) => load_elf(mem, path, &mut file),
        #[cfg(target_arch = "aarch64")]
        Some(KernelFormat::Arm64Image) => arm64::load_image(mem, path, &mut file),
        #[cfg(target_arch = "aarch64")]
        Some(KernelFormat::Gzip) => arm64::load_gzip_image(mem, path, &mut file),
        Some(format) => Err(LoadError::KernelWrongArch {
            path: path.to_owned(),
            format: format.description(),
            host: HOST_ARCH,
            expected: FORMATS_HERE,
        }),
        None => Err(LoadError::KernelGarbage(path.to_owned())),
    }
}

#[cfg(target_arch = "x86_64")]
fn load_bzimage(mem: &GuestMemoryMmap, path: &Path, file: &mut File) -> Result<LoadedKernel> {
    let unreadable = |source| LoadError::KernelUnreadable {
        path: path.to_owned(),
        source,
    };
    // Check the fit before linux-loader's generic "unable to read" error:
    // the kernel needs `init_size` bytes at its load address while it
    // decompresses itself, at least the protected-mode part's size.
    let file_len = file.seek(SeekFrom::End(0)).map_err(unreadable)?;
    let mut header = setup_header::default();
    let header_bytes = vm_memory::ByteValued::as_mut_slice(&mut header);
    if !read_at(file, SETUP_HEADER_OFFSET, header_bytes).map_err(unreadable)? {
        return Err(LoadError::KernelGarbage(path.to_owned()));
    }
    let setup_sects = match header.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    let protected_size = file_len.saturating_sub((setup_sects + 1) * 512);
    let needs = protected_size.max(u64::from(header.init_size));
    if !is_ram(mem, HIMEM_START, needs) {
        return Err(LoadError::KernelTooBig {
            path: path.to_owned(),
            needs,
            at: HIMEM_START,
        });
    }

    let result = BzImage::load(
        mem,
        Some(GuestAddress(HIMEM_START)),
        file,
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(|source| kernel_load_error(path, source))?;
    let load_addr = result.kernel_load.raw_value();
    Ok(LoadedKernel {
        format: KernelFormat::BzImage,
        entry: KernelEntry::Linux64 {
            addr: load_addr + BZIMAGE_64BIT_ENTRY_OFFSET,
        },
        load_addr,
        end_addr: result.kernel_end.max(load_addr + needs),
        setup_header: result.setup_header,
    })
}

#[cfg(target_arch = "x86_64")]
fn kernel_load_error(path: &Path, source: loader::Error) -> LoadError {
    match source {
        loader::Error::Bzimage(loader::bzimage::Error::InvalidBzImage)
        | loader::Error::Elf(loader::elf::Error::InvalidElfMagicNumber) => {
            LoadError::KernelGarbage(path.to_owned())
        }
        source => LoadError::KernelLoad {
            path: path.to_owned(),
            source,
        },
    }
}

#[cfg(target_arch = "x86_64")]
/// The PT_LOAD segments of an ELF64 as (paddr, memsz); `None` if the headers
/// cannot be read (linux-loader then reports the problem).
fn elf_load_segments(file: &mut File) -> io::Result<Option<Vec<(u64, u64)>>> {
    const PT_LOAD: u32 = 1;
    let mut ehdr = [0u8; 64];
    if !read_at(file, 0, &mut ehdr)? {
        return Ok(None);
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u64_at = |b: &[u8], o: usize| {
        let mut v = [0u8; 8];
        v.copy_from_slice(&b[o..o + 8]);
        u64::from_le_bytes(v)
    };
    let phoff = u64_at(&ehdr, 0x20);
    let phentsize = u64::from(u16_at(&ehdr, 0x36));
    let phnum = u64::from(u16_at(&ehdr, 0x38));
    if phentsize < 56 {
        return Ok(None);
    }
    let mut segments = Vec::new();
    for i in 0..phnum {
        let mut phdr = [0u8; 56];
        let Some(offset) = phoff.checked_add(i * phentsize) else {
            return Ok(None);
        };
        if !read_at(file, offset, &mut phdr)? {
            return Ok(None);
        }
        let p_type = u32::from_le_bytes([phdr[0], phdr[1], phdr[2], phdr[3]]);
        if p_type == PT_LOAD {
            segments.push((u64_at(&phdr, 0x18), u64_at(&phdr, 0x28)));
        }
    }
    Ok(Some(segments))
}

#[cfg(target_arch = "x86_64")]
fn load_elf(mem: &GuestMemoryMmap, path: &Path, file: &mut File) -> Result<LoadedKernel> {
    let unreadable = |source| LoadError::KernelUnreadable {
        path: path.to_owned(),
        source,
    };
    if let Some(segments) = elf_load_segments(file).map_err(unreadable)? {
        for (paddr, memsz) in segments {
            if !is_ram(mem, paddr, memsz) {
                return Err(LoadError::KernelTooBig {
                    path: path.to_owned(),
                    needs: memsz,
                    at: paddr,
                });
            }
        }
    }
    let result = Elf::load(mem, None, file, Some(GuestAddress(HIMEM_START)))
        .map_err(|source| kernel_load_error(path, source))?;
    let entry = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => KernelEntry::Pvh {
            addr: addr.raw_value(),
        },
        _ => KernelEntry::Linux64 {
            addr: result.kernel_load.raw_value(),
        },
    };
    Ok(LoadedKernel {
        format: KernelFormat::Elf,
        entry,
        load_addr: result.kernel_load.raw_value(),
        end_addr: result.kernel_end,
        setup_header: None,
    })
}

/// Loads the initramfs at `path`. `place(size)` returns the guest address
/// to load it at (arch's placement rule: above the kernel, below the
/// kernel's `initrd_addr_max` and the end of low RAM) or why it cannot fit.
pub fn load_initramfs<E: std::fmt::Display>(
    mem: &GuestMemoryMmap,
    path: &Path,
    place: impl FnOnce(u64) -> std::result::Result<u64, E>,
) -> Result<LoadedInitramfs> {
    let unreadable = |source| LoadError::InitramfsUnreadable {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => LoadError::InitramfsMissing(path.to_owned()),
        _ => unreadable(source),
    })?;
    ensure_regular_file(&file).map_err(unreadable)?;
    let size = file.seek(SeekFrom::End(0)).map_err(unreadable)?;
    file.rewind().map_err(unreadable)?;
    let too_big = |reason: String| LoadError::InitramfsTooBig {
        path: path.to_owned(),
        reason,
    };
    let addr = place(size).map_err(|e| too_big(e.to_string()))?;
    let len = usize::try_from(size).map_err(|_| too_big(format!("{size} bytes")))?;
    if !is_ram(mem, addr, size) {
        return Err(too_big(format!(
            "{size} bytes at {addr:#x} run past the end of RAM"
        )));
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
        .map_err(|e| unreadable(io::Error::other(e.to_string())))?;
    Ok(LoadedInitramfs { addr, size })
}

#[cfg(target_arch = "x86_64")]
/// Writes `cmdline` NUL-terminated at `CMDLINE_START`. Returns its length
/// without the NUL.
pub fn load_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<usize> {
    let capacity = CMDLINE_MAX_SIZE as usize;
    let parsed =
        Cmdline::try_from(cmdline, capacity).map_err(|e| LoadError::Cmdline(e.to_string()))?;
    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), &parsed)
        .map_err(|e| LoadError::Cmdline(e.to_string()))?;
    let written = parsed
        .as_cstring()
        .map_err(|e| LoadError::Cmdline(e.to_string()))?;
    Ok(written.as_bytes().len())
}

#[cfg(target_arch = "x86_64")]
/// Reads a NUL-terminated string back from guest memory (for tests and logs).
pub fn read_cmdline(mem: &GuestMemoryMmap) -> Option<String> {
    let mut buf = vec![0u8; CMDLINE_MAX_SIZE as usize];
    mem.read_slice(&mut buf, GuestAddress(CMDLINE_START)).ok()?;
    let end = buf.iter().position(|b| *b == 0)?;
    String::from_utf8(buf[..end].to_vec()).ok()
}

/// Checks `cmdline` the way the kernel will take it (printable ASCII, under
/// [`CMDLINE_CAPACITY`]), without writing it anywhere.
pub fn check_cmdline(cmdline: &str) -> Result<()> {
    Cmdline::try_from(cmdline, CMDLINE_CAPACITY)
        .map(drop)
        .map_err(|e| LoadError::Cmdline(e.to_string()))
}

#[cfg(target_arch = "aarch64")]
mod arm64;

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use std::io::Write;

    use guest_programs::elf::Vmlinux;

    use super::*;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("barge-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let mut f = File::create(&path).unwrap();
        f.write_all(bytes).unwrap();
        path
    }

    /// A fake bzImage: boot sector + setup sectors, then a payload.
    fn bzimage(payload_len: usize, init_size: u32) -> Vec<u8> {
        let setup_sects = 4u8;
        let mut img = vec![0u8; (setup_sects as usize + 1) * 512 + payload_len];
        img[0x1f1] = setup_sects;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // version
        img[0x211] = 1; // loadflags: LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x100000u32.to_le_bytes()); // code32_start
        img[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
        img
    }

    #[test]
    fn elf_without_pvh_note_enters_64bit_at_e_entry() {
        let m = mem(16 << 20);
        let path = temp_file("elf64", &Vmlinux::new(&[0xf4, 0x90]).memsz(2).to_bytes());
        let k = load_kernel(&m, &path).unwrap();
        assert_eq!(k.format, KernelFormat::Elf);
        assert_eq!(k.entry, KernelEntry::Linux64 { addr: 0x100000 });
        assert_eq!(k.end_addr, 0x100002);
        let mut code = [0u8; 2];
        m.read_slice(&mut code, GuestAddress(0x100000)).unwrap();
        assert_eq!(code, [0xf4, 0x90]);
    }

    #[test]
    fn elf_segment_beyond_memory_is_too_big() {
        let m = mem(16 << 20);
        let path = temp_file("elf-big", &Vmlinux::new(&[0x90]).memsz(32 << 20).to_bytes());
        let err = load_kernel(&m, &path).unwrap_err();
        assert!(matches!(err, LoadError::KernelTooBig { .. }), "{err}");
        assert!(err.to_string().contains("does not fit"));
    }

    #[test]
    fn bzimage_loads_at_himem_and_keeps_setup_header() {
        let m = mem(16 << 20);
        let path = temp_file("bz", &bzimage(0x1000, 0x2000));
        assert_eq!(inspect_kernel(&path).unwrap(), KernelFormat::BzImage);
        let k = load_kernel(&m, &path).unwrap();
        assert_eq!(k.format, KernelFormat::BzImage);
        assert_eq!(k.load_addr, HIMEM_START);
        assert_eq!(k.entry, KernelEntry::Linux64 { addr: 0x100200 });
        assert_eq!(k.end_addr, HIMEM_START + 0x2000);
        let header = k.setup_header.unwrap();
        assert_eq!({ header.header }, 0x5372_6448);
    }

    #[test]
    fn bzimage_needing_more_than_memory_is_too_big() {
        let m = mem(16 << 20);
        let path = temp_file("bz-big", &bzimage(0x1000, 64 << 20));
        let err = load_kernel(&m, &path).unwrap_err();
        assert!(matches!(err, LoadError::KernelTooBig { .. }), "{err}");
    }

    #[test]
    fn an_arm64_kernel_on_x86_64_is_named_as_such() {
        let mut image = vec![0u8; 4096];
        image[ARM64_MAGIC_OFFSET as usize..][..4].copy_from_slice(ARM64_MAGIC);
        let path = temp_file("arm64-image", &image);
        let err = inspect_kernel(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "kernel {} is an arm64 Image, but this barge runs x86_64 guests: pass a bzImage \
                 or ELF vmlinux with --kernel",
                path.display()
            )
        );
        assert!(matches!(
            load_kernel(&mem(16 << 20), &path).unwrap_err(),
            LoadError::KernelWrongArch { .. }
        ));
        let gzip = temp_file("vmlinuz-arm64", &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0]);
        assert!(inspect_kernel(&gzip)
            .unwrap_err()
            .to_string()
            .contains("is a gzip-compressed kernel, but this barge runs x86_64 guests"));
    }

    #[test]
    fn garbage_missing_and_directory_kernels_are_named() {
        let m = mem(16 << 20);
        let path = temp_file("garbage", &[0x42; 4096]);
        let err = load_kernel(&m, &path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "kernel {}: not a bzImage, ELF vmlinux or arm64 Image",
                path.display()
            )
        );
        assert!(matches!(
            inspect_kernel(&path),
            Err(LoadError::KernelGarbage(_))
        ));
        let empty = temp_file("empty", &[]);
        assert!(matches!(
            load_kernel(&m, &empty),
            Err(LoadError::KernelGarbage(_))
        ));
        let missing = Path::new("/nonexistent/barge/vmlinux");
        let err = load_kernel(&m, missing).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/barge/vmlinux"));
        assert!(matches!(err, LoadError::KernelMissing(_)));
        let dir = std::env::temp_dir();
        assert!(matches!(
            load_kernel(&m, &dir),
            Err(LoadError::KernelUnreadable { .. })
        ));
    }

    #[test]
    fn initramfs_goes_where_placement_says_and_too_big_is_an_error() {
        let m = mem(16 << 20);
        let ram = [(0u64, 16u64 << 20)];
        let path = temp_file("initrd", &[7u8; 5000]);
        let loaded = load_initramfs(&m, &path, |size| {
            arch::initramfs_load_addr(&ram, size, 0x200000, None)
        })
        .unwrap();
        assert_eq!(loaded.size, 5000);
        assert_eq!(loaded.addr, ((16 << 20) - 5000) & !0xfff);
        let mut back = [0u8; 4];
        m.read_slice(&mut back, GuestAddress(loaded.addr)).unwrap();
        assert_eq!(back, [7; 4]);

        let big = temp_file("initrd-big", &vec![0u8; 15 << 20]);
        let err = load_initramfs(&m, &big, |size| {
            arch::initramfs_load_addr(&ram, size, 0x200000, None)
        })
        .unwrap_err();
        assert!(matches!(err, LoadError::InitramfsTooBig { .. }));
        let msg = err.to_string();
        assert!(
            msg.contains("initrd-big is larger than the guest memory"),
            "{msg}"
        );
        // A placement outside RAM is refused too.
        let err = load_initramfs(&m, &path, |_| Ok::<u64, String>((16 << 20) - 100)).unwrap_err();
        assert!(matches!(err, LoadError::InitramfsTooBig { .. }));
        let err = load_initramfs(&m, Path::new("/nonexistent/initrd"), |_| {
            Ok::<u64, String>(0)
        })
        .unwrap_err();
        assert!(matches!(err, LoadError::InitramfsMissing(_)));
    }

    #[test]
    fn cmdline_is_written_nul_terminated() {
        let m = mem(16 << 20);
        let len = load_cmdline(&m, "console=ttyS0 panic=-1").unwrap();
        assert_eq!(len, "console=ttyS0 panic=-1".len());
        assert_eq!(read_cmdline(&m).unwrap(), "console=ttyS0 panic=-1");
        // Init arguments after "--" survive as they are.
        let with_init = "console=ttyS0 panic=-1 -- echo guest-says-hello";
        load_cmdline(&m, with_init).unwrap();
        assert_eq!(read_cmdline(&m).unwrap(), with_init);
        let too_long = "a".repeat(CMDLINE_MAX_SIZE as usize + 1);
        assert!(matches!(
            load_cmdline(&m, &too_long),
            Err(LoadError::Cmdline(_))
        ));
    }
}
