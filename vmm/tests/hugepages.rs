//! Huge pages that are not there: barge fails before mapping anything, with
//! one line that says how many pages are free and how to reserve more.

use std::process::Command;

fn free_pages(kib: u64) -> u64 {
    std::fs::read_to_string(format!(
        "/sys/kernel/mm/hugepages/hugepages-{kib}kB/free_hugepages"
    ))
    .ok()
    .and_then(|s| s.trim().parse().ok())
    .unwrap_or(0)
}

#[test]
fn short_huge_page_pool_is_a_one_line_error_with_the_fix() {
    // Ask for more 2 MiB pages than the pool has free, whatever this host has.
    let pages = (free_pages(2048) + 1).max(32);
    let kernel = std::env::temp_dir().join(format!("barge-hp-kernel-{}", std::process::id()));
    std::fs::write(&kernel, minimal_elf()).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_barge"))
        .args(["run", "--kernel"])
        .arg(&kernel)
        .arg("--memory")
        .arg(format!("size={}M,hugepages=2M", pages * 2))
        .env("BARGE_SKIP_KVM", "1")
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&kernel);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_ne!(output.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    let line = lines[0];
    assert!(line.starts_with("barge: error: "), "{line}");
    assert!(
        line.contains(&format!("needs {pages} free 2 MiB huge pages")),
        "{line}"
    );
    assert!(
        line.contains("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"),
        "{line}"
    );
}

/// An x86_64 ELF executable with one empty PT_LOAD at 1 MiB: enough to pass
/// the kernel format check, which comes before memory is mapped.
fn minimal_elf() -> Vec<u8> {
    let mut elf = vec![0u8; 64 + 56];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // 64-bit
    elf[5] = 1; // little endian
    elf[6] = 1; // version
    elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // x86_64
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // entry
    elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    elf[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
    elf[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
    elf[56..58].copy_from_slice(&1u16.to_le_bytes()); // phnum
    let ph = &mut elf[64..];
    ph[..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    ph[16..24].copy_from_slice(&0x10_0000u64.to_le_bytes()); // vaddr
    ph[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // paddr
    ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes()); // align
    elf
}
