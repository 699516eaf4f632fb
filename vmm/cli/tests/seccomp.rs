//! seccomp on this machine's KVM, with a tiny guest that powers off at once
//! through the ACPI sleep register: the filters are on by default and a
//! whole run (vCPU exits, teardown, the report) stays inside them; a
//! forbidden system call (`BARGE_SECCOMP_PROBE` makes a thread call
//! `socket()` right after its filter is in force) ends barge with status
//! 159 and one line naming the thread and the call; `--seccomp off` and
//! `--seccomp log` let the same run finish. Needs /dev/kvm (skipped with
//! `BARGE_SKIP_KVM=1`).

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use guest_programs::elf::elf64;
use guest_programs::testing::kvm_or_skip;

/// `mov dx, 0x3c0; mov al, SLP_EN | SLP_TYP(S5); out dx, al; jmp $`.
fn poweroff_kernel() -> Vec<u8> {
    let s5 = devices::acpi::s5_write_value();
    elf64(&[0x66, 0xba, 0xc0, 0x03, 0xb0, s5, 0xee, 0xeb, 0xfe])
}

struct Run {
    output: Output,
    report: PathBuf,
    dir: PathBuf,
}

impl Run {
    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    fn status(&self) -> Option<i32> {
        self.output.status.code()
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `barge run` on the power-off guest with `args`, `BARGE_SECCOMP_PROBE`
/// set to `probe` when given.
fn run(test: &str, args: &[&str], probe: Option<&str>) -> Run {
    let dir = std::env::temp_dir().join(format!("barge-seccomp-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let kernel = dir.join("poweroff.elf");
    std::fs::write(&kernel, poweroff_kernel()).unwrap();
    let report = dir.join("report.json");
    let mut command = Command::new(env!("CARGO_BIN_EXE_barge"));
    command
        .args(["run", "--kernel"])
        .arg(&kernel)
        .args(["--memory", "size=64M", "--report"])
        .arg(&report)
        .args(args)
        .stdin(Stdio::null())
        .env_remove("RUST_LOG")
        .env_remove("BARGE_SECCOMP_PROBE");
    if !args.contains(&"--serial") {
        command.args(["--serial", "none"]);
    }
    if let Some(kind) = probe {
        command.env("BARGE_SECCOMP_PROBE", kind);
    }
    let output = command.output().expect("barge runs");
    let run = Run {
        output,
        report,
        dir,
    };
    println!(
        "{test}: status {:?}; stderr: {}",
        run.status(),
        run.stderr().trim()
    );
    assert!(!run.stderr().contains("panicked"), "{}", run.stderr());
    run
}

fn report_exit(run: &Run) -> serde_json::Value {
    let json = std::fs::read_to_string(&run.report).expect("the report is written");
    let value: serde_json::Value = serde_json::from_str(&json).expect("the report is JSON");
    value["exit"].clone()
}

#[test]
fn a_whole_run_stays_inside_the_default_filters() {
    if !kvm_or_skip("a_whole_run_stays_inside_the_default_filters") {
        return;
    }
    let default = run("default", &[], None);
    assert_eq!(default.status(), Some(0), "{}", default.stderr());
    assert_eq!(report_exit(&default)["reason"], "poweroff");
    // The console on stdout with stdin read by the event loop.
    let stdio = run("stdio", &["--serial", "stdio"], None);
    assert_eq!(stdio.status(), Some(0), "{}", stdio.stderr());
    assert_eq!(report_exit(&stdio)["reason"], "poweroff");
}

#[test]
fn a_forbidden_call_on_a_vcpu_thread_ends_barge_with_159() {
    if !kvm_or_skip("a_forbidden_call_on_a_vcpu_thread_ends_barge_with_159") {
        return;
    }
    let run = run("probe-vcpu", &[], Some("vcpu"));
    assert_eq!(run.status(), Some(vmm::status::SECCOMP), "{}", run.stderr());
    let line = "barge: error: seccomp: the vcpu0 thread made the system call socket (41), \
                which barge's vcpu filter forbids; barge stopped (status 159).";
    assert!(run.stderr().contains(line), "{}", run.stderr());
    assert!(run.stderr().contains("--seccomp off"), "{}", run.stderr());
    assert!(!run.report.exists(), "no report after a seccomp kill");
}

#[test]
fn a_forbidden_call_on_the_vmm_thread_ends_barge_with_159() {
    if !kvm_or_skip("a_forbidden_call_on_the_vmm_thread_ends_barge_with_159") {
        return;
    }
    let run = run("probe-vmm", &[], Some("vmm"));
    assert_eq!(run.status(), Some(vmm::status::SECCOMP), "{}", run.stderr());
    assert!(
        run.stderr().contains(
            "the vmm thread made the system call socket (41), which barge's vmm filter forbids"
        ),
        "{}",
        run.stderr()
    );
}

#[test]
fn seccomp_off_and_log_let_the_probe_through() {
    if !kvm_or_skip("seccomp_off_and_log_let_the_probe_through") {
        return;
    }
    // Off: no filter, so no probe either.
    let off = run("off", &["--seccomp", "off"], Some("vcpu"));
    assert_eq!(off.status(), Some(0), "{}", off.stderr());
    assert_eq!(report_exit(&off)["reason"], "poweroff");
    // Log: the filter is installed, the kernel logs the call and allows it.
    let log = run("log", &["--seccomp", "log"], Some("vcpu"));
    assert_eq!(log.status(), Some(0), "{}", log.stderr());
    assert!(
        log.stderr().contains("socket() was allowed"),
        "{}",
        log.stderr()
    );
}

#[test]
fn a_bad_seccomp_value_is_a_usage_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_barge"))
        .args(["run", "--kernel", "/nonexistent", "--seccomp", "strict"])
        .stdin(Stdio::null())
        .output()
        .expect("barge runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(vmm::status::USAGE), "{stderr}");
    assert!(
        stderr.contains("invalid seccomp mode \"strict\": use on, off or log"),
        "{stderr}"
    );
}
