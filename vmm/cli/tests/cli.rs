//! `barge` with bad input: each case is one line `barge: error: ...` on
//! stderr naming the problem, a non-zero status, and no panic.
//!
//! The first group needs no KVM (the checks run before /dev/kvm is opened,
//! or /dev/kvm is redirected to a missing path). The last group gets past
//! KVM to kernel loading; it needs /dev/kvm and is skipped with
//! `BARGE_SKIP_KVM=1`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use guest_programs::elf::{idle_kernel, Vmlinux};
use guest_programs::testing::kvm_or_skip;

fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("barge-cli-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn barge(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_barge"));
    command
        .args(args)
        .stdin(Stdio::null())
        .env_remove("RUST_LOG");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("barge starts")
}

/// Asserts a failed run with exactly one stderr line `barge: error: ...`
/// that contains every one of `needles`; returns the line.
fn assert_one_line_error(output: &Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "barge succeeded: {stderr}");
    assert_ne!(output.status.code(), Some(101), "barge panicked: {stderr}");
    assert!(
        output.status.code().is_some(),
        "killed by a signal: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "want one line, got:\n{stderr}");
    let line = lines[0];
    assert!(line.starts_with("barge: error: "), "{line}");
    for needle in needles {
        assert!(
            line.contains(needle),
            "{line:?} does not mention {needle:?}"
        );
    }
    line.to_string()
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 temp path")
}

#[test]
fn missing_kernel_names_the_file() {
    let output = barge(&["run", "--kernel", "/nonexistent/barge/bzImage"], &[]);
    assert_one_line_error(&output, &["/nonexistent/barge/bzImage", "No such file"]);
    assert_eq!(output.status.code(), Some(1));
}

#[test]
fn kernel_that_is_a_directory_is_refused() {
    let dir = scratch_dir("kernel-dir");
    let output = barge(&["run", "--kernel", path_str(&dir)], &[]);
    assert_one_line_error(&output, &[path_str(&dir), "not a regular file"]);
}

#[test]
fn garbage_kernel_is_not_a_bzimage_or_elf() {
    let dir = scratch_dir("garbage");
    let kernel = dir.join("garbage.bin");
    std::fs::write(&kernel, vec![0x5au8; 64 << 10]).unwrap();
    let output = barge(&["run", "--kernel", path_str(&kernel)], &[]);
    assert_one_line_error(
        &output,
        &[
            path_str(&kernel),
            "not a bzImage, ELF vmlinux or arm64 Image",
        ],
    );
}

#[test]
fn zero_cpus_is_a_usage_error() {
    let output = barge(&["run", "--kernel", "/dev/null", "--cpus", "0"], &[]);
    assert_one_line_error(&output, &["--cpus", "at least 1"]);
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn malformed_memory_option_is_a_usage_error() {
    let output = barge(
        &[
            "run",
            "--kernel",
            "/dev/null",
            "--memory",
            "size=512M,hugepages",
        ],
        &[],
    );
    assert_one_line_error(&output, &["--memory", "hugepages"]);
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn unwritable_report_path_is_refused_before_booting() {
    let dir = scratch_dir("report");
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, idle_kernel()).unwrap();
    let report = dir.join("no-such-dir/report.json");
    let output = barge(
        &[
            "run",
            "--kernel",
            path_str(&kernel),
            "--report",
            path_str(&report),
        ],
        // Even without KVM the report path is checked first.
        &[("BARGE_KVM_DEVICE", "/nonexistent/kvm")],
    );
    assert_one_line_error(&output, &["cannot write the report", path_str(&report)]);
}

#[test]
fn missing_kvm_device_is_named() {
    let dir = scratch_dir("no-kvm");
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, idle_kernel()).unwrap();
    let output = barge(
        &["run", "--kernel", path_str(&kernel)],
        &[("BARGE_KVM_DEVICE", "/nonexistent/kvm")],
    );
    assert_one_line_error(&output, &["/nonexistent/kvm does not exist"]);
}

#[test]
fn help_is_printed_with_status_zero() {
    let output = barge(&["run", "--help"], &[]);
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("--kernel"), "{stdout}");
}

#[test]
fn kernel_larger_than_memory_does_not_fit() {
    if !kvm_or_skip("kernel_larger_than_memory_does_not_fit") {
        return;
    }
    let dir = scratch_dir("kernel-too-big");
    let kernel = dir.join("vmlinux");
    // 64 MiB of memsz in a 32 MiB guest.
    let image = Vmlinux::new(&[0xf4; 16]).memsz(64 << 20).to_bytes();
    std::fs::write(&kernel, image).unwrap();
    let output = barge(
        &["run", "--kernel", path_str(&kernel), "--memory", "size=32M"],
        &[],
    );
    assert_one_line_error(
        &output,
        &[path_str(&kernel), "does not fit in guest memory"],
    );
}

#[test]
fn initramfs_larger_than_memory_is_refused() {
    if !kvm_or_skip("initramfs_larger_than_memory_is_refused") {
        return;
    }
    let dir = scratch_dir("initramfs-too-big");
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, idle_kernel()).unwrap();
    let initramfs = dir.join("initramfs.cpio");
    let file = std::fs::File::create(&initramfs).unwrap();
    file.set_len(48 << 20).unwrap(); // sparse, larger than the 32 MiB guest
    let output = barge(
        &[
            "run",
            "--kernel",
            path_str(&kernel),
            "--initramfs",
            path_str(&initramfs),
            "--memory",
            "size=32M",
        ],
        &[],
    );
    assert_one_line_error(
        &output,
        &[path_str(&initramfs), "larger than the guest memory"],
    );
}

#[test]
fn more_cpus_than_kvm_allows_is_refused() {
    if !kvm_or_skip("more_cpus_than_kvm_allows_is_refused") {
        return;
    }
    let dir = scratch_dir("too-many-cpus");
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, idle_kernel()).unwrap();
    let output = barge(
        &["run", "--kernel", path_str(&kernel), "--cpus", "255"],
        &[],
    );
    assert_one_line_error(&output, &["--cpus 255", "at most"]);
}
