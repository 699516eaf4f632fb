//! Teardown, in the lab: 20 passthrough runs in a row in one process and
//! one lab boot (barge's embedding API, `barge-teardown`), each guest
//! reading what the previous one wrote into the BAR; after every run, and
//! after a timeout stop and bad configurations that fail with the device
//! already open and mapped, the process holds exactly the fds and
//! mappings it held before the first run. The device is then unbound from
//! vfio-pci (which waits until nobody holds it) and bound again, and runs
//! once more with the same result.

use barge_tests::harness::{lab_script, output_text as text};

#[test]
fn twenty_passthrough_runs_leave_nothing_behind_and_the_device_rebinds() {
    let (output, dir) = lab_script(
        env!("CARGO_BIN_EXE_barge-lab"),
        &["--timeout", "1500", "--ivshmem", "1G"],
        "barge-teardown --device $LAB_IVSHMEM0 --runs 20 > /out/teardown.txt 2>&1\n\
         echo $? > /out/status\n",
    );
    let report = std::fs::read_to_string(dir.join("teardown.txt")).unwrap_or_default();
    println!("{report}");
    assert!(output.status.success(), "{}\n{report}", text(&output));
    let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
    assert_eq!(status.trim(), "0", "{report}");
    assert!(!report.contains("panicked"), "{report}");

    let runs: Vec<&str> = report.lines().filter(|l| l.starts_with("run ")).collect();
    assert_eq!(runs.len(), 20, "{report}");
    for line in &runs {
        assert!(line.contains(": status 0 (poweroff)"), "{line}");
        assert!(line.contains("1Gx1, slot updates 1"), "{line}");
        assert!(line.ends_with("fds +0 maps +0 gone 0"), "{line}");
    }
    // Each guest read the number the previous run wrote.
    for (n, line) in runs.iter().enumerate().skip(1) {
        assert!(line.contains(&format!("guest read {n:#x},")), "{line}");
    }
    for prefix in ["timeout: status 5 (timeout)", "after rebind: status 0"] {
        let line = report
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line {prefix:?}:\n{report}"));
        assert!(line.ends_with("fds +0 maps +0 gone 0"), "{line}");
    }
    assert!(
        report.contains("after rebind: status 0 (poweroff), guest read 0x14,"),
        "{report}"
    );
    assert!(
        report.contains("unbound from vfio-pci and bound to vfio-pci again"),
        "{report}"
    );
    let bad: Vec<&str> = report.lines().filter(|l| l.starts_with("bad ")).collect();
    assert_eq!(bad.len(), 4, "{report}");
    for line in &bad {
        assert!(line.contains(": error: "), "{line}");
        assert!(line.ends_with("fds +0 maps +0 gone 0"), "{line}");
    }
    assert!(
        report.contains(
            "teardown: 20 runs and 1 after the rebind, 21 with the same report as run 1, \
             1 timeout stop, 1 rebind, 4 bad configurations, 0 failures"
        ),
        "{report}"
    );
}
