//! Kernel module files: finding a module in an unpacked modules folder
//! (`-` and `_` alike; `.ko`, `.ko.xz` or `.ko.zst`), reading it
//! decompressed, and the module order: the modules asked for after the
//! dependencies their `.modinfo` names, each once.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::elf::elf_section;
use crate::lab::LabError;

/// The file of module `name` (`-` and `_` are the same in module names).
pub(super) fn find_module<'a>(found: &'a [PathBuf], name: &str) -> Option<&'a PathBuf> {
    let wanted = name.replace('-', "_");
    [".ko", ".ko.xz", ".ko.zst"].iter().find_map(|ext| {
        found.iter().find(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().replace('-', "_"))
                .is_some_and(|n| n.strip_suffix(ext) == Some(wanted.as_str()))
        })
    })
}

/// A module's bytes, decompressed.
pub(super) fn read_module(source: &Path) -> Result<Vec<u8>, LabError> {
    let source_text = source.to_string_lossy();
    match source.extension().and_then(|e| e.to_str()) {
        Some("xz") => decompress("xz", &source_text),
        Some("zst") => decompress("zstd", &source_text),
        _ => std::fs::read(source).map_err(|e| LabError::io("cannot read", source, e)),
    }
}

pub(super) type ModuleReader<'a> = dyn FnMut(&str) -> Result<Vec<u8>, LabError> + 'a;

/// The modules `roots` and what they depend on, dependencies first, each
/// once, with their bytes.
pub(super) fn load_order(
    roots: &[&str],
    read: &mut ModuleReader,
) -> Result<Vec<(String, Vec<u8>)>, LabError> {
    fn visit(
        name: &str,
        read: &mut ModuleReader,
        seen: &mut Vec<String>,
        order: &mut Vec<(String, Vec<u8>)>,
    ) -> Result<(), LabError> {
        let key = name.replace('-', "_");
        if seen.contains(&key) {
            return Ok(());
        }
        seen.push(key);
        let bytes = read(name)?;
        let depends = modinfo_field(&bytes, "depends").ok_or_else(|| {
            LabError::Setup(format!(
                "module {name} has no `depends=` in a .modinfo section: is it a 64-bit kernel \
                 module?"
            ))
        })?;
        for dependency in depends.split(',').filter(|d| !d.is_empty()) {
            visit(dependency, read, seen, order)?;
        }
        order.push((name.to_string(), bytes));
        Ok(())
    }
    let mut seen = Vec::new();
    let mut order = Vec::new();
    for root in roots {
        visit(root, read, &mut seen, &mut order)?;
    }
    Ok(order)
}

/// `key=value` from a kernel module's .modinfo section.
pub(super) fn modinfo_field(elf: &[u8], key: &str) -> Option<String> {
    elf_section(elf, ".modinfo")?
        .split(|&b| b == 0)
        .find_map(|entry| {
            let entry = std::str::from_utf8(entry).ok()?;
            entry
                .strip_prefix(key)?
                .strip_prefix('=')
                .map(str::to_string)
        })
}

fn decompress(tool: &str, path: &str) -> Result<Vec<u8>, LabError> {
    let output = Command::new(tool)
        .args(["-dc", path])
        .output()
        .map_err(|e| LabError::Command {
            command: format!("{tool} -dc {path}"),
            detail: format!("{e} (install {tool})"),
        })?;
    if !output.status.success() {
        return Err(LabError::Command {
            command: format!("{tool} -dc {path}"),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(output.stdout)
}

pub(super) fn list_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 64-bit little-endian ELF file with `.shstrtab` and `.modinfo`.
    fn module_elf(modinfo: &str) -> Vec<u8> {
        let names = b"\0.shstrtab\0.modinfo\0";
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let names_offset = elf.len();
        elf.extend_from_slice(names);
        let modinfo_offset = elf.len();
        elf.extend_from_slice(modinfo.as_bytes());
        let headers = elf.len();
        elf[0x28..0x30].copy_from_slice(&(headers as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        let sections = [
            (0u32, 0usize, 0usize),
            (1, names_offset, names.len()),
            (11, modinfo_offset, modinfo.len()),
        ];
        for (name, offset, size) in sections {
            let mut header = [0u8; 64];
            header[..4].copy_from_slice(&name.to_le_bytes());
            header[0x18..0x20].copy_from_slice(&(offset as u64).to_le_bytes());
            header[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&header);
        }
        elf
    }

    #[test]
    fn modinfo_fields_are_read_from_the_section() {
        let elf = module_elf("license=GPL\0depends=ptp,pps_core\0name=e1000e\0");
        assert_eq!(
            modinfo_field(&elf, "depends").as_deref(),
            Some("ptp,pps_core")
        );
        assert_eq!(modinfo_field(&elf, "name").as_deref(), Some("e1000e"));
        assert_eq!(modinfo_field(&elf, "vermagic"), None);
        assert_eq!(modinfo_field(b"\x7fELF\x02\x01 truncated", "depends"), None);
        assert_eq!(modinfo_field(b"not an elf file at all", "depends"), None);
    }

    #[test]
    fn modules_load_after_their_dependencies_once() {
        let modules = [
            ("e1000e", module_elf("depends=ptp,pps_core\0")),
            ("ptp", module_elf("depends=pps_core\0")),
            ("pps_core", module_elf("depends=\0")),
        ];
        let mut read = |name: &str| {
            modules
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, elf)| elf.clone())
                .ok_or_else(|| LabError::Setup(format!("no {name}")))
        };
        let order: Vec<String> = load_order(&["e1000e"], &mut read)
            .unwrap()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(order, ["pps_core", "ptp", "e1000e"]);
        assert!(load_order(&["missing"], &mut read).is_err());
    }

    #[test]
    fn module_files_match_with_dashes_or_underscores() {
        let found = vec![
            PathBuf::from("/m/kernel/drivers/vfio/pci/vfio-pci.ko.xz"),
            PathBuf::from("/m/kernel/drivers/net/e1000e.ko.zst"),
        ];
        assert_eq!(find_module(&found, "vfio_pci"), Some(&found[0]));
        assert_eq!(find_module(&found, "e1000e"), Some(&found[1]));
        assert_eq!(find_module(&found, "e1000"), None);
    }
}
