//! SIGTERM and SIGINT stop a running guest; barge still writes the report,
//! reports the signal as `exit.reason` and exits 128 + the signal's number
//! (143, 130), as shells do. Needs /dev/kvm (skipped with
//! `BARGE_SKIP_KVM=1`).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use guest_programs::elf::elf64;
use guest_programs::testing::kvm_or_skip;

fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("barge-signals-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Polls `/proc/<pid>/task` until a thread named `vcpu0` has used at least
/// one clock tick of CPU time, or panics after `limit`.
fn wait_until_vcpu0_ran(pid: i32, limit: Duration) {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for task in tasks.flatten() {
                let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
                if comm.trim() != "vcpu0" {
                    continue;
                }
                let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
                // Fields after the ")" that ends the name: state is field 3,
                // utime 14 and stime 15 (1-based), so 11 and 12 here.
                let ticks: u64 = stat
                    .rsplit_once(')')
                    .map(|(_, rest)| {
                        rest.split_whitespace()
                            .skip(11)
                            .take(2)
                            .filter_map(|field| field.parse::<u64>().ok())
                            .sum()
                    })
                    .unwrap_or(0);
                if ticks > 0 {
                    return;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("barge's vcpu0 thread did not run within {limit:?}");
}

/// Starts `barge run` on a guest that spins forever (`jmp $`), sends
/// `signo` once it runs, and checks the status, the stderr line and the
/// report.
fn signal_stops_the_guest(test: &str, signo: libc::c_int, reason: &str, status: i32) {
    if !kvm_or_skip(test) {
        return;
    }
    let dir = scratch_dir(test);
    let kernel = dir.join("spin.elf");
    std::fs::write(&kernel, elf64(&[0xeb, 0xfe])).unwrap();
    let report = dir.join("report.json");
    let child = Command::new(env!("CARGO_BIN_EXE_barge"))
        .args(["run", "--kernel"])
        .arg(&kernel)
        .args([
            "--memory",
            "size=64M",
            "--serial",
            "none",
            "--verbose",
            "--report",
        ])
        .arg(&report)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("RUST_LOG")
        .spawn()
        .expect("barge starts");
    let pid = i32::try_from(child.id()).expect("pid fits in pid_t");
    // Wait until the guest runs: the vcpu0 thread has used CPU time (the
    // spinning guest counts as its user time). A fixed sleep was not enough
    // on a loaded machine.
    wait_until_vcpu0_ran(pid, Duration::from_secs(60));
    // SAFETY: `pid` is our own child, not yet reaped (it cannot exit on its
    // own: the guest spins), so the pid still names it.
    let rc = unsafe { libc::kill(pid, signo) };
    assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    let sent = Instant::now();
    let output = child.wait_with_output().expect("barge exits");
    let stopped_in = sent.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!(
        "{test}: status {:?} after {stopped_in:?}; stderr: {}",
        output.status.code(),
        stderr.trim()
    );
    assert_eq!(output.status.code(), Some(status), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stopped_in < Duration::from_secs(30),
        "stopping took {stopped_in:?}"
    );
    let json = std::fs::read_to_string(&report).expect("the report is written");
    let value: serde_json::Value = serde_json::from_str(&json).expect("the report is JSON");
    assert_eq!(value["exit"]["reason"], reason, "{json}");
    assert_eq!(value["exit"]["status"], status, "{json}");
    assert!(
        value["start_to_first_run_ms"].is_u64(),
        "the guest ran before the signal: {json}"
    );
    // --verbose: the boot phases on stderr, the report's numbers.
    let phases = &value["phases_ms"];
    let total: u64 = phases
        .as_object()
        .expect("phases_ms is an object once the guest ran")
        .values()
        .map(|ms| ms.as_u64().expect("whole milliseconds"))
        .sum();
    let first_run = value["start_to_first_run_ms"].as_u64().unwrap();
    assert_eq!(total, first_run, "{json}");
    let line = format!(
        "barge: boot phases (ms): startup {}, checks {}, ",
        phases["startup"], phases["checks"]
    );
    assert!(stderr.contains(&line), "{line:?} not in: {stderr}");
    assert!(
        stderr.contains(&format!("= {total} of {first_run} to the first KVM_RUN")),
        "{stderr}"
    );
    println!("{test}: report exit = {}", value["exit"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigterm_stops_the_guest_and_writes_the_report() {
    signal_stops_the_guest(
        "sigterm_stops_the_guest_and_writes_the_report",
        libc::SIGTERM,
        "sigterm",
        143,
    );
}

#[test]
fn sigint_stops_the_guest_and_writes_the_report() {
    signal_stops_the_guest(
        "sigint_stops_the_guest_and_writes_the_report",
        libc::SIGINT,
        "sigint",
        130,
    );
}
