//! `barge plan` from the command line, and `barge run` refusing shared
//! memory it cannot set up. Every error is one line `barge: error: ...` and a
//! non-zero status.
//!
//! The `barge run` cases open /dev/kvm (the plan needs KVM's phys-bits) and
//! are skipped with `BARGE_SKIP_KVM=1`.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use guest_programs::elf::idle_kernel;
use guest_programs::testing::kvm_or_skip;

const H100: &str = r#"{"devices":[{"name":"h100","bars":[
    {"index":0,"size":"16M","bits":64},
    {"index":1,"size":"128G","bits":64,"prefetchable":true},
    {"index":3,"size":"32M","bits":64,"prefetchable":true}]}]}"#;

fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("barge-plan-cli-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn barge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_barge"))
        .args(args)
        .stdin(Stdio::null())
        .env_remove("RUST_LOG")
        .output()
        .expect("barge starts")
}

fn error_line(output: &Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "should fail; stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {stderr}");
    assert!(lines[0].starts_with("barge: error: "), "{stderr}");
    for needle in needles {
        assert!(lines[0].contains(needle), "{needle:?} missing: {stderr}");
    }
    lines[0].to_string()
}

#[test]
fn plan_spec_prints_a_table_for_an_h100() {
    let dir = scratch_dir("h100-table");
    let spec = dir.join("h100.json");
    std::fs::write(&spec, H100).unwrap();
    let output = barge(&[
        "plan",
        "--spec",
        spec.to_str().unwrap(),
        "--phys-bits",
        "46",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.starts_with("h100  (bar-align auto)"), "{stdout}");
    assert!(stdout.contains("128 GiB"), "{stdout}");
    assert!(stdout.contains("1G"), "{stdout}");
}

/// `examples/NAME` of the repository.
fn example(name: &str) -> String {
    format!("{}/../../examples/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// `barge plan --json` of `spec` for a guest of `memory` on a host with
/// `phys_bits`: the plan, or the error line.
fn plan_json(spec: &str, memory: &str, phys_bits: u8) -> Result<serde_json::Value, String> {
    let output = barge(&[
        "plan",
        "--spec",
        spec,
        "--memory",
        &format!("size={memory}"),
        "--phys-bits",
        &phys_bits.to_string(),
        "--json",
    ]);
    if output.status.success() {
        Ok(serde_json::from_slice(&output.stdout).expect("the plan is JSON"))
    } else {
        Err(error_line(&output, &[]))
    }
}

/// The BAR `index` of every device in `plan`.
fn bars_of(plan: &serde_json::Value, index: u64) -> Vec<serde_json::Value> {
    plan["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|device| {
            device["bars"]
                .as_array()
                .unwrap()
                .iter()
                .find(|bar| bar["index"] == index)
                .cloned()
                .unwrap_or_else(|| panic!("no BAR {index} in {device}"))
        })
        .collect()
}

#[test]
fn eight_h100s_and_a_gb200_tray_plan_on_46_and_52_bit_hosts() {
    for phys_bits in [46, 52] {
        // Eight 128 GiB BARs, each of 128 1 GiB pages, with 1 TiB of RAM.
        let plan = plan_json(&example("8xh100.json"), "1T", phys_bits).unwrap();
        let bars = bars_of(&plan, 1);
        assert_eq!(bars.len(), 8);
        let mut gpas: Vec<u64> = bars.iter().map(|b| b["gpa"].as_u64().unwrap()).collect();
        for bar in &bars {
            assert_eq!(bar["page_size"], 1u64 << 30, "{bar}");
            assert_eq!(bar["areas"][0]["pages"]["pages_1g"], 128, "{bar}");
            let gpa = bar["gpa"].as_u64().unwrap();
            assert_eq!(gpa % (128u64 << 30), 0, "{bar}");
            assert!(gpa >= 1 << 40, "above the 1 TiB of RAM: {bar}");
            assert!(gpa + (128u64 << 30) <= 1u64 << phys_bits, "{bar}");
        }
        gpas.dedup();
        assert_eq!(gpas.len(), 8, "eight different places");

        // Device memory that is not a power of two: 0x2F00F00000 bytes
        // (188 GiB and 15 MiB) reserve 256 GiB; 1 GiB pages for all but the
        // last 15 MiB, 2 MiB pages then 4 KiB for the last MiB.
        let plan = plan_json(&example("gb200.json"), "480G", phys_bits).unwrap();
        let bars = bars_of(&plan, 2);
        assert_eq!(bars.len(), 4);
        for bar in &bars {
            assert_eq!(bar["size"], 0x2F00F00000u64, "{bar}");
            assert_eq!(bar["reserved"], 256u64 << 30, "{bar}");
            assert_eq!(bar["page_size"], 1u64 << 30, "{bar}");
            let area = &bar["areas"][0];
            assert_eq!(area["size"], 0x2F00F00000u64, "{bar}");
            assert_eq!(area["pages"]["pages_1g"], 188, "{bar}");
            assert_eq!(area["pages"]["pages_2m"], 7, "{bar}");
            assert_eq!(area["pages"]["pages_4k"], 256, "{bar}");
        }
    }
}

#[test]
fn a_plan_too_big_for_the_host_names_the_phys_bits_it_needs() {
    // Four 256 GiB reservations above 480 GiB of RAM: no room below 1 TiB.
    let error = plan_json(&example("gb200.json"), "480G", 40).unwrap_err();
    assert!(
        error.contains("does not fit in the MMIO64 window")
            && error.ends_with("(a host with phys-bits 41 or more would fit every BAR)"),
        "{error}"
    );
    assert!(plan_json(&example("gb200.json"), "480G", 41).is_ok());
    // RAM past the limit: the bits for RAM and the BARs together.
    let error = plan_json(&example("8xh100.json"), "2T", 41).unwrap_err();
    assert!(
        error.contains("no room for the MMIO64 window")
            && error.ends_with("(a host with phys-bits 42 or more would fit every BAR)"),
        "{error}"
    );
    assert!(plan_json(&example("8xh100.json"), "2T", 42).is_ok());
}

#[test]
fn plan_spec_json_has_the_documented_shape() {
    let dir = scratch_dir("h100-json");
    let spec = dir.join("h100.json");
    std::fs::write(&spec, H100).unwrap();
    let output = barge(&[
        "plan",
        "--spec",
        spec.to_str().unwrap(),
        "--phys-bits",
        "46",
        "--memory",
        "size=4G",
        "--json",
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let bars = json["devices"][0]["bars"].as_array().unwrap();
    assert_eq!(bars.len(), 3);
    for bar in bars {
        for key in ["index", "size", "gpa", "hva_align", "page_size", "areas"] {
            assert!(bar.get(key).is_some(), "{key} missing in {bar}");
        }
        let gpa = bar["gpa"].as_u64().unwrap();
        let size = bar["size"].as_u64().unwrap();
        assert_eq!(gpa % size, 0, "naturally aligned: {bar}");
        assert!(gpa >= 5 << 30, "above 4 GiB of RAM + the hole: {bar}");
        for area in bar["areas"].as_array().unwrap() {
            for key in ["offset", "size", "gpa", "page_size"] {
                assert!(area.get(key).is_some(), "{key} missing in {area}");
            }
        }
    }
    assert_eq!(bars[1]["page_size"], 1u64 << 30);
}

#[test]
fn plan_bad_input_is_one_clear_line() {
    let dir = scratch_dir("bad");
    let garbage = dir.join("garbage.json");
    std::fs::write(&garbage, "{devices").unwrap();
    let too_big = dir.join("big.json");
    std::fs::write(
        &too_big,
        r#"{"devices":[{"name":"huge","bars":[{"index":0,"size":"1T","bits":64}]}]}"#,
    )
    .unwrap();
    for (args, needles) in [
        (vec!["plan"], vec!["barge plan needs devices"]),
        (
            vec!["plan", "--spec", garbage.to_str().unwrap()],
            vec!["invalid plan spec", "garbage.json"],
        ),
        (
            vec!["plan", "--spec", "/no/such/spec.json"],
            vec!["cannot read the plan spec /no/such/spec.json"],
        ),
        (
            vec![
                "plan",
                "--spec",
                too_big.to_str().unwrap(),
                "--phys-bits",
                "39",
            ],
            vec!["BAR 0 of huge", "does not fit"],
        ),
        (
            vec!["plan", "--shmem", "size=3G"],
            vec!["--shmem", "power of two"],
        ),
        (
            vec!["plan", "--device", "vfio=xyz"],
            vec!["not a PCI address"],
        ),
        (
            vec!["plan", "--device", "vfio=0000:ff:1f.7"],
            vec!["no PCI device 0000:ff:1f.7"],
        ),
        (
            vec!["plan", "--shmem", "size=1G", "--phys-bits", "60"],
            vec!["phys-bits 60 is out of range"],
        ),
    ] {
        error_line(&barge(&args), &needles);
    }
}

/// A file the kernel check accepts (never run: the errors come first).
fn fake_kernel(dir: &std::path::Path) -> PathBuf {
    let path = dir.join("kernel.elf");
    std::fs::write(&path, idle_kernel()).unwrap();
    path
}

#[test]
fn run_refuses_shmem_too_big_for_the_window_and_missing_huge_pages() {
    if !kvm_or_skip("run_refuses_shmem_too_big_for_the_window_and_missing_huge_pages") {
        return;
    }
    let dir = scratch_dir("run-shmem");
    let kernel = fake_kernel(&dir);
    let kernel = kernel.to_str().unwrap();
    // 2^52 bytes cannot fit below 2^52 with RAM at the bottom.
    let line = error_line(
        &barge(&[
            "run",
            "--kernel",
            kernel,
            "--serial",
            "none",
            "--shmem",
            "size=4096T",
        ]),
        &["BAR 2 of shmem0", "does not fit in the"],
    );
    assert!(line.contains("window"), "{line}");
    // Huge pages: this error needs a host whose 1 GiB pool has none free
    // (the build machine has an empty pool); a host with free 1 GiB pages
    // gets past it.
    let free_1g =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-1048576kB/free_hugepages")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
    if free_1g == 0 {
        error_line(
            &barge(&[
                "run",
                "--kernel",
                kernel,
                "--serial",
                "none",
                "--shmem",
                "size=1G,hugepages=1G",
            ]),
            &["--shmem size=1G,hugepages=1G", "1 GiB huge page"],
        );
    }
    // A file path that cannot be created.
    error_line(
        &barge(&[
            "run",
            "--kernel",
            kernel,
            "--serial",
            "none",
            "--shmem",
            "size=2M,path=/no/such/dir/shm",
        ]),
        &["cannot use /no/such/dir/shm"],
    );
}
