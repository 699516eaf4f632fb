//! Teardown, in the lab: 20 passthrough runs in a row in one process and
//! one lab boot (barge's embedding API, `barge-teardown`), each guest
//! reading what the previous one wrote into the BAR; after every run, and
//! after a timeout stop and bad configurations that fail with the device
//! already open and mapped, the process holds exactly the fds and
//! mappings it held before the first run. The device is then unbound from
//! vfio-pci (which waits until nobody holds it) and bound again, and runs
//! once more with the same result. Once with the legacy container, once
//! with iommufd on the 7.3 host (`barge-lab run --host-kernel 7.3
//! --iommufd`: BAR2 is mapped for peer to peer through a dma-buf), where
//! after every run no iommufd, VFIO device cdev or dma-buf fd may stay
//! open: closing the iommufd is what destroys the IOAS.

use std::time::Instant;

use barge_tests::harness::{lab_script, output_text as text};

/// Serializes the two tests of this file (see [`twenty_runs`]).
static ONE_LAB_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs barge-teardown's 20 runs in one lab boot (`lab_args` and the
/// 1 GiB ivshmem device) with `--vfio-backend backend` and checks its
/// report; `held` is what each run must hold while its guest runs (iommufd,
/// cdev and dma-buf fds, as barge-teardown prints them). Returns the report.
fn twenty_runs(lab_args: &[&str], backend: &str, held: &str) -> String {
    // One lab host at a time: two TCG hosts of 2 vCPUs each on a 2-core
    // machine starved one of them into RCU stalls (its timers stopped
    // firing) during a CI run; the test takes longer this way, not forever.
    let _one_at_a_time = ONE_LAB_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut args = vec!["--timeout", "1500", "--ivshmem", "1G"];
    args.extend_from_slice(lab_args);
    let started = Instant::now();
    let (output, dir) = lab_script(
        env!("CARGO_BIN_EXE_barge-lab"),
        &args,
        &format!(
            "barge-teardown --device $LAB_IVSHMEM0 --runs 20 --vfio-backend {backend} \
             > /out/teardown.txt 2>&1\n\
             echo $? > /out/status\n"
        ),
    );
    let report = std::fs::read_to_string(dir.join("teardown.txt")).unwrap_or_default();
    println!("{report}");
    println!(
        "teardown {backend}: lab boot and 20 runs took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(output.status.success(), "{}\n{report}", text(&output));
    let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
    assert_eq!(status.trim(), "0", "{report}");
    assert!(!report.contains("panicked"), "{report}");
    assert!(
        report.contains(&format!("passed through ({backend} backend)")),
        "{report}"
    );

    let runs: Vec<&str> = report.lines().filter(|l| l.starts_with("run ")).collect();
    assert_eq!(runs.len(), 20, "{report}");
    for line in &runs {
        assert!(line.contains(": status 0 (poweroff)"), "{line}");
        assert!(line.contains("1Gx1, slot updates 1"), "{line}");
        assert!(
            line.contains(&format!("held while running: {held};")),
            "{line}"
        );
    }
    // Each guest read the number the previous run wrote.
    for (n, line) in runs.iter().enumerate().skip(1) {
        assert!(line.contains(&format!("guest read {n:#x},")), "{line}");
    }
    for prefix in ["timeout: status 5 (timeout)", "after rebind: status 0"] {
        assert!(
            report.lines().any(|l| l.starts_with(prefix)),
            "no line {prefix:?}:\n{report}"
        );
    }
    // Nothing stays behind after any run, bad ones included; in particular
    // no iommufd (the IOAS goes with it), cdev or dma-buf fd.
    let checked: Vec<&str> = report
        .lines()
        .filter(|l| {
            ["run ", "timeout: ", "after rebind: ", "bad "]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .collect();
    assert_eq!(checked.len(), 26, "{report}");
    for line in &checked {
        assert!(
            line.ends_with("open after: iommufd 0 cdev 0 dma-buf 0; fds +0 maps +0 gone 0"),
            "{line}"
        );
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
    }
    assert!(
        report.contains(
            "teardown: 20 runs and 1 after the rebind, 21 with the same report as run 1, \
             1 timeout stop, 1 rebind, 4 bad configurations, 0 failures"
        ),
        "{report}"
    );
    report
}

#[test]
fn twenty_passthrough_runs_leave_nothing_behind_and_the_device_rebinds() {
    twenty_runs(&[], "legacy", "iommufd 0 cdev 0 dma-buf 0");
}

#[test]
fn twenty_iommufd_runs_close_every_iommufd_cdev_and_dmabuf_fd_and_the_device_rebinds() {
    // On the 7.3 host each run holds one iommufd, the device's cdev and the
    // dma-buf of BAR2 that peer-to-peer DMA maps (p2p=auto) while its guest
    // runs; 6.12's iommufd could not map the BAR, so it runs on 7.3.
    twenty_runs(
        &["--host-kernel", "7.3", "--iommufd"],
        "iommufd",
        "iommufd 1 cdev 1 dma-buf 1",
    );
}
