//! `barge bench` end to end on this machine's /dev/kvm, at the smallest
//! size (a 2 MiB shared memory BAR, a 64 KiB window, 100 random reads):
//! every mode's two VMs run the generated guest, the table, the JSON and
//! the SVG come out. The numbers mean nothing here (slow KVM); the lab
//! test (tests/tests/bench_lab.rs) runs it on a VFIO BAR.
//!
//! Without /dev/kvm the test fails with a clear message unless
//! `BARGE_SKIP_KVM=1`.

use std::process::Command;

use guest_programs::testing::kvm_or_skip;

const TINY: [&str; 8] = [
    "--shmem",
    "size=2M",
    "--window",
    "64K",
    "--passes",
    "1",
    "--random-reads",
    "100",
];

#[test]
fn bench_on_shared_memory_prints_every_mode_json_and_svg() {
    if !kvm_or_skip("bench_on_shared_memory") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("barge-bench-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let svg = dir.join("bench.svg");

    let output = Command::new(env!("CARGO_BIN_EXE_barge"))
        .arg("bench")
        .args(TINY)
        .args(["--reps", "2", "--svg", svg.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let header = stdout
        .lines()
        .find(|l| l.starts_with("metric"))
        .unwrap_or_else(|| panic!("no table:\n{stdout}"));
    for mode in ["4k", "2m", "1g", "auto"] {
        assert!(header.split_whitespace().any(|w| w == mode), "{header}");
    }
    for needle in [
        "guest first touch",
        "warm random 8-byte read",
        "mode order: alternating",
        "ratios (4k / 1g, medians):",
        "first touch ",
    ] {
        assert!(stdout.contains(needle), "{needle} missing:\n{stdout}");
    }
    assert!(
        stderr.contains("rep 2/2 mode 4k: first-touch VM"),
        "{stderr}"
    );
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.starts_with("<svg") && chart.contains("guest first touch"));

    let output = Command::new(env!("CARGO_BIN_EXE_barge"))
        .arg("bench")
        .args(TINY)
        .args(["--reps", "1", "--modes", "4k,1g", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    let value: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(value["bar"], 2);
    assert_eq!(value["bar_size"], 2 << 20);
    assert_eq!(value["modes"].as_array().unwrap().len(), 2);
    let sample = &value["modes"][0]["samples"][0];
    assert_eq!(
        sample["bar_gpa"].as_u64().unwrap() % (2 << 20),
        0,
        "{sample}"
    );
    assert!(sample["first_touch_ms"].as_f64().unwrap() > 0.0, "{sample}");
    assert!(sample["random_read_ns"].as_f64().unwrap() > 0.0, "{sample}");
    assert!(value["ratios"]["first_touch_4k_over_1g"].as_f64().is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_refuses_a_bar_the_device_lacks() {
    let output = Command::new(env!("CARGO_BIN_EXE_barge"))
        .args(["bench", "--shmem", "size=2M", "--bar", "0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("barge: error: the shared memory device has no memory BAR 0"),
        "{stderr}"
    );
}
