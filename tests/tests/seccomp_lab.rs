//! seccomp in the lab, with a device passed through: a whole Linux boot
//! with 2 vCPUs (exits, MSI-X/INTx plumbing, DMA mapping, teardown, the
//! report) runs inside the default filters; a forbidden system call on a
//! vCPU thread or on the VMM thread (`BARGE_SECCOMP_PROBE` makes the thread
//! call `socket()` once its filter is in force) ends barge with status 159
//! and one line naming the thread and the call; the device is usable again
//! right after, and `--seccomp off` runs the same guest with the probe
//! asked for.

use std::collections::BTreeMap;

use barge_tests::harness::{lab_script, output_text as text};

const RUN: &str = "barge run --kernel /lab/guest/bzImage --initramfs /lab/guest/initramfs \
                   --memory size=256M --cpus 2 --device vfio=$LAB_IVSHMEM0";

const GUEST: &str = "--cmdline 'console=ttyS0 panic=-1 -- a=$(pcibar 1af4:1110 2);\
                     echo READ=$(devmem $((a+0x1000)) 32)'";

/// `NAME` runs `barge run` with `env` and `options`: status, stderr and
/// report in /out.
fn case(name: &str, env: &str, options: &str) -> String {
    format!(
        "{env} {RUN} {options} --serial file=/out/{name}.console --report /out/{name}.json \
         {GUEST} 2> /out/{name}.err; echo $? > /out/{name}.status\n"
    )
}

#[test]
fn filters_hold_a_passthrough_boot_and_a_forbidden_call_ends_barge() {
    let script = [
        case("default", "", ""),
        case("probe-vcpu", "BARGE_SECCOMP_PROBE=vcpu", ""),
        case("probe-vmm", "BARGE_SECCOMP_PROBE=vmm", ""),
        case("off", "BARGE_SECCOMP_PROBE=vcpu", "--seccomp off"),
    ]
    .concat();
    let (output, dir) = lab_script(
        env!("CARGO_BIN_EXE_barge-lab"),
        &["--timeout", "600", "--ivshmem", "1G"],
        &script,
    );
    assert!(output.status.success(), "{}", text(&output));
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let mut cases = BTreeMap::new();
    for name in ["default", "probe-vcpu", "probe-vmm", "off"] {
        let status = read(&format!("{name}.status")).trim().to_string();
        let err = read(&format!("{name}.err"));
        println!("{name}: status {status}; stderr: {}", err.trim());
        assert!(!err.contains("panicked"), "{name}: {err}");
        cases.insert(name, (status, err));
    }

    for name in ["default", "off"] {
        let (status, err) = &cases[name];
        assert_eq!(
            status,
            "0",
            "{name}: {err}\n{}",
            read(&format!("{name}.console"))
        );
        assert!(read(&format!("{name}.console")).contains("GUEST-EXIT 0"));
        let report: serde_json::Value =
            serde_json::from_str(&read(&format!("{name}.json"))).expect("report");
        let bar2 = report["devices"][0]["bars"]
            .as_array()
            .and_then(|bars| bars.iter().find(|b| b["index"] == 2))
            .cloned()
            .unwrap_or_default();
        assert_eq!(bar2["mapped"]["pages_1g"], 1, "{name}: {report}");
        assert_eq!(report["exit"]["reason"], "poweroff", "{name}: {report}");
    }
    // Either vCPU thread may be the first to make the call.
    for (name, threads, filter) in [
        ("probe-vcpu", &["vcpu0", "vcpu1"][..], "vcpu"),
        ("probe-vmm", &["vmm"][..], "vmm"),
    ] {
        let (status, err) = &cases[name];
        assert_eq!(status, "159", "{name}: {err}");
        assert!(
            threads.iter().any(|thread| err.contains(&format!(
                "barge: error: seccomp: the {thread} thread made the system call socket (41), \
                 which barge's {filter} filter forbids; barge stopped (status 159)."
            ))),
            "{name}: {err}"
        );
        assert!(
            read(&format!("{name}.json")).is_empty(),
            "{name}: no report"
        );
    }
}
