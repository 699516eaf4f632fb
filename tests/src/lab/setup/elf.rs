//! The ELF section reader: the bytes of one named section of a 64-bit
//! little-endian ELF file, found through its section headers and
//! section-name table; enough to get at a kernel module's `.modinfo`.
//! Anything that is not such a file, or is cut short, gives `None`.

/// The contents of the named section of a 64-bit little-endian ELF file.
pub(super) fn elf_section<'a>(elf: &'a [u8], wanted: &str) -> Option<&'a [u8]> {
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let bytes = |offset: usize, len: usize| elf.get(offset..offset.checked_add(len)?);
    let u16_at =
        |offset: usize| bytes(offset, 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |offset: usize| {
        bytes(offset, 4).map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()) as usize)
    };
    let u64_at = |offset: usize| {
        bytes(offset, 8).and_then(|b| {
            usize::try_from(u64::from_le_bytes(b.try_into().unwrap_or_default())).ok()
        })
    };
    let section_offset = u64_at(0x28)?;
    let entry_size = u16_at(0x3a)?;
    let count = u16_at(0x3c)?;
    let names_index = u16_at(0x3e)?;
    // (name offset, file offset, size) of section `index`.
    let header = |index: usize| {
        let base = section_offset.checked_add(index.checked_mul(entry_size)?)?;
        Some((
            u32_at(base)?,
            u64_at(base.checked_add(0x18)?)?,
            u64_at(base.checked_add(0x20)?)?,
        ))
    };
    let (_, names_offset, names_size) = header(names_index)?;
    let names = bytes(names_offset, names_size)?;
    (0..count).find_map(|index| {
        let (name, offset, size) = header(index)?;
        let name = names.get(name..)?;
        let name = &name[..name.iter().position(|&b| b == 0)?];
        if name == wanted.as_bytes() {
            bytes(offset, size)
        } else {
            None
        }
    })
}
