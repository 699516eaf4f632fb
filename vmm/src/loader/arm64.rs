//! arm64 Image loading (aarch64 hosts): linux-loader's PE loader puts the Image at
//! `arch::layout::KERNEL_LOAD_BASE` plus its header's text offset. A gzip-compressed Image
//! (Debian's arm64 vmlinuz) is decompressed in memory first, as QEMU and U-Boot do.

use std::fs::File;
use std::io::{self, Cursor, Read, Seek, SeekFrom};
use std::path::Path;

use arch::layout::KERNEL_LOAD_BASE;
use linux_loader::loader::pe::PE;
use linux_loader::loader::KernelLoader;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{is_ram, KernelEntry, KernelFormat, LoadError, LoadedKernel, Result};

/// The largest decompressed Image barge takes (256 MiB; a distribution kernel is 30-60 MiB).
const MAX_IMAGE_SIZE: u64 = 256 << 20;
/// Where the header's `image_size` is (bytes the kernel occupies from its load address,
/// BSS included).
const IMAGE_SIZE_OFFSET: usize = 16;

/// Loads a plain arm64 Image from `file`.
pub fn load_image(mem: &GuestMemoryMmap, path: &Path, file: &mut File) -> Result<LoadedKernel> {
    let unreadable = |source| LoadError::KernelUnreadable {
        path: path.to_owned(),
        source,
    };
    let mut header = [0u8; 64];
    file.seek(SeekFrom::Start(0)).map_err(unreadable)?;
    file.read_exact(&mut header).map_err(unreadable)?;
    let file_len = file.seek(SeekFrom::End(0)).map_err(unreadable)?;
    load(mem, path, &header, file_len, file)
}

/// Decompresses a gzip'd arm64 Image from `file` and loads it.
pub fn load_gzip_image(
    mem: &GuestMemoryMmap,
    path: &Path,
    file: &mut File,
) -> Result<LoadedKernel> {
    let unreadable = |source| LoadError::KernelUnreadable {
        path: path.to_owned(),
        source,
    };
    file.seek(SeekFrom::Start(0)).map_err(unreadable)?;
    let mut image = Vec::new();
    flate2::read::GzDecoder::new(&mut *file)
        .take(MAX_IMAGE_SIZE + 1)
        .read_to_end(&mut image)
        .map_err(|e| {
            unreadable(io::Error::new(
                e.kind(),
                format!("cannot decompress it: {e}"),
            ))
        })?;
    if image.len() as u64 > MAX_IMAGE_SIZE {
        return Err(unreadable(io::Error::other(format!(
            "it decompresses to more than {} MiB, which is no arm64 kernel",
            MAX_IMAGE_SIZE >> 20
        ))));
    }
    if image.len() < 64 || &image[super::ARM64_MAGIC_OFFSET as usize..][..4] != super::ARM64_MAGIC {
        return Err(LoadError::KernelGarbage(path.to_owned()));
    }
    let mut header = [0u8; 64];
    header.copy_from_slice(&image[..64]);
    let len = image.len() as u64;
    load(mem, path, &header, len, &mut Cursor::new(image))
}

fn load<F>(
    mem: &GuestMemoryMmap,
    path: &Path,
    header: &[u8; 64],
    file_len: u64,
    image: &mut F,
) -> Result<LoadedKernel>
where
    F: vm_memory::ReadVolatile + Read + Seek,
{
    let u64_at = |offset: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&header[offset..offset + 8]);
        u64::from_le_bytes(bytes)
    };
    let image_size = u64_at(IMAGE_SIZE_OFFSET);
    let text_offset = if image_size == 0 { 0x8_0000 } else { u64_at(8) };
    let at = KERNEL_LOAD_BASE + text_offset;
    // The kernel needs `image_size` bytes (BSS included), at least the file.
    let needs = image_size.max(file_len);
    if !is_ram(mem, at, needs) {
        return Err(LoadError::KernelTooBig {
            path: path.to_owned(),
            needs,
            at,
        });
    }
    let result =
        PE::load(mem, Some(GuestAddress(KERNEL_LOAD_BASE)), image, None).map_err(|source| {
            match source {
                linux_loader::loader::Error::Pe(
                    linux_loader::loader::pe::Error::InvalidImageMagicNumber,
                ) => LoadError::KernelGarbage(path.to_owned()),
                source => LoadError::KernelLoad {
                    path: path.to_owned(),
                    source,
                },
            }
        })?;
    let load_addr = result.kernel_load.0;
    Ok(LoadedKernel {
        format: KernelFormat::Arm64Image,
        entry: KernelEntry::Arm64 { addr: load_addr },
        load_addr,
        end_addr: load_addr + needs,
    })
}
