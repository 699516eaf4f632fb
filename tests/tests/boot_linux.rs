//! barge boots Linux: inside the lab host, `barge run` boots the lab's guest
//! kernel and initramfs with 2 vCPUs and 512 MiB; the guest comes up, runs a
//! command given on its kernel command line and powers off.

use std::path::PathBuf;
use std::process::Output;

use barge_tests::harness::{lab_run, output_text as text, results_dir};

/// Runs `script` in the lab host with barge on its PATH.
fn in_lab(script: &str) -> (Output, PathBuf) {
    let output = lab_run(
        env!("CARGO_BIN_EXE_barge-lab"),
        &["--timeout", "600", "--", script],
    );
    let dir = results_dir(&output);
    (output, dir)
}

#[test]
fn barge_boots_the_lab_guest_with_two_vcpus() {
    let (output, dir) = in_lab(
        "barge run --kernel /lab/guest/bzImage --initramfs /lab/guest/initramfs \
         --cpus 2 --memory size=512M --serial file=/out/guest.log --report /out/report.json \
         --cmdline 'console=ttyS0 panic=-1 -- echo guest-says-hello' ; echo $? > status",
    );
    assert!(output.status.success(), "{}", text(&output));
    let guest = std::fs::read_to_string(dir.join("guest.log")).unwrap_or_default();
    let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
    assert_eq!(
        status.trim(),
        "0",
        "barge's status; guest console:\n{guest}"
    );
    let up = guest
        .lines()
        .find(|l| l.starts_with("GUEST-UP"))
        .unwrap_or_else(|| panic!("no GUEST-UP line:\n{guest}"));
    assert!(up.starts_with("GUEST-UP cpus=2 "), "{up}");
    let mem_kb: u64 = up
        .split("mem_kb=")
        .nth(1)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        (400_000..=524_288).contains(&mem_kb),
        "guest memory {mem_kb} kB for 512 MiB"
    );
    assert!(guest.contains("guest-says-hello"), "{guest}");
    assert!(guest.contains("GUEST-EXIT 0"), "{guest}");

    let report = std::fs::read_to_string(dir.join("report.json")).expect("report.json");
    let report: serde_json::Value = serde_json::from_str(&report).expect("JSON report");
    assert_eq!(report["exit"]["status"], 0, "{report}");
    assert!(report["wall_ms"].as_u64().is_some(), "{report}");
    assert!(
        report["start_to_first_run_ms"].as_u64().is_some(),
        "{report}"
    );
    let total: u64 = report["memory"]
        .as_array()
        .expect("memory regions")
        .iter()
        .map(|r| r["size"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 512 << 20, "{report}");
    let stats = &report["kvm_stats"];
    for counter in ["pages_4k", "pages_2m", "pages_1g"] {
        assert!(stats[counter].as_u64().is_some(), "{counter}: {report}");
    }
}

#[test]
fn guest_command_status_comes_back_through_the_console() {
    let (output, dir) = in_lab(
        "barge run --kernel /lab/guest/bzImage --initramfs /lab/guest/initramfs \
         --memory size=256M --serial file=/out/guest.log \
         --cmdline 'console=ttyS0 panic=-1 -- exit 3' ; echo $? > status",
    );
    assert!(output.status.success(), "{}", text(&output));
    let guest = std::fs::read_to_string(dir.join("guest.log")).unwrap_or_default();
    assert!(guest.contains("GUEST-UP cpus=1 "), "{guest}");
    assert!(guest.contains("GUEST-EXIT 3"), "{guest}");
    let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
    assert_eq!(status.trim(), "0", "poweroff is status 0; guest:\n{guest}");
}

/// A guest rebooting the way Linux does by default on barge's HW-reduced
/// ACPI machine without EFI (no `reboot=` on its command line: the "BIOS"
/// path, a jump to the reset vector in real mode) ends in a reset, not a
/// hang: status 3 with `--on-reboot stop`, report `exit.reason` "reboot".
#[test]
fn a_default_reboot_through_the_reset_vector_stops_the_vm() {
    let (output, dir) = in_lab(
        "timeout 200 barge run --kernel /lab/guest/bzImage --initramfs /lab/guest/initramfs \
         --memory size=256M --serial file=/out/guest.log --report /out/report.json \
         --on-reboot stop --cmdline 'console=ttyS0 panic=-1 -- reboot -f' ; echo $? > status",
    );
    assert!(output.status.success(), "{}", text(&output));
    let guest = std::fs::read_to_string(dir.join("guest.log")).unwrap_or_default();
    let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
    assert_eq!(status.trim(), "3", "guest:\n{guest}");
    assert!(guest.contains("reboot: machine restart"), "{guest}");
    let report = std::fs::read_to_string(dir.join("report.json")).expect("report.json");
    let report: serde_json::Value = serde_json::from_str(&report).expect("JSON report");
    assert_eq!(report["exit"]["reason"], "reboot", "{report}");
}
