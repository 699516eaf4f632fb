//! Huge pages that are not there: barge fails before mapping anything, with
//! one line that says how many pages are free and how to reserve more.

use std::process::Command;

use guest_programs::elf::idle_kernel;

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
    std::fs::write(&kernel, idle_kernel()).unwrap();
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
