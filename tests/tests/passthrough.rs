//! Passthrough with huge BAR mappings, in the lab: the ivshmem device's BAR2
//! (a file on the outer machine) is passed through by barge into a Linux
//! guest. barge plans GPA and HVA, maps the BAR once, pre-faults it and
//! reports the page sizes KVM used; the guest reads what the test wrote into
//! the file and writes a marker the test reads back after exit. Here the
//! page sizes `bar-align` forces and `barge plan` in the lab; the 8 GiB BAR
//! mapped with 1 GiB pages, on every host kernel and VFIO backend, is
//! `lab_matrix.rs`. The checks live in `barge_tests::bar_passthrough`.

use std::path::PathBuf;
use std::process::Output;

use barge_tests::bar_passthrough::{self, bar, barge_script, check_run, FROM_OUTSIDE, GIB};
use barge_tests::harness::{output_text as text, sparse_file, write_at};

/// Runs `script` in the lab host (its main kernel) with one ivshmem device.
fn in_lab(ivshmem: &str, script: &str) -> (Output, PathBuf) {
    bar_passthrough::in_lab(env!("CARGO_BIN_EXE_barge-lab"), None, ivshmem, script)
}

#[test]
fn bar_align_2m_forces_pmd_mappings() {
    let size = 2 * GIB;
    let backing = sparse_file("ivshmem-2m.shm", size);
    write_at(&backing, 0x1000, &FROM_OUTSIDE.to_le_bytes());
    let (output, dir) = in_lab(
        &format!("2G,file={}", backing.display()),
        &barge_script(",bar-align=2m", size),
    );
    let report = check_run(&output, &dir, &backing, size);
    let bar2 = bar(&report, 2);
    assert_eq!(bar2["planned_page_size"], 2 << 20, "{bar2}");
    assert_eq!(bar2["mapped"]["pages_2m"], 1024, "{bar2}");
    assert_eq!(bar2["mapped"]["pages_1g"], 0, "{bar2}");
    assert_eq!(bar2["hva"].as_u64().unwrap() % (4 << 20), 2 << 20, "{bar2}");
    let _ = std::fs::remove_file(&backing);
}

#[test]
fn bar_align_4k_forces_pte_mappings() {
    let size = 8 * GIB;
    let backing = sparse_file("ivshmem-4k.shm", size);
    write_at(&backing, 0x1000, &FROM_OUTSIDE.to_le_bytes());
    let (output, dir) = in_lab(
        &format!("8G,file={}", backing.display()),
        &barge_script(",bar-align=4k", size),
    );
    let report = check_run(&output, &dir, &backing, size);
    let bar2 = bar(&report, 2);
    // A BAR of 2 million 4 KiB pages pre-faults for seconds: its progress.
    let log = std::fs::read_to_string(dir.join("bar.log")).unwrap_or_default();
    let device = report["devices"][0]["bdf"].as_str().unwrap_or_default();
    bar_passthrough::check_prefault_progress(&log, &bar2, device);
    assert_eq!(bar2["planned_page_size"], 4096, "{bar2}");
    assert_eq!(bar2["mapped"]["pages_4k"], size / 4096, "{bar2}");
    assert_eq!(bar2["mapped"]["pages_2m"], 0, "{bar2}");
    assert_eq!(bar2["mapped"]["pages_1g"], 0, "{bar2}");
    // It got what was planned: 4K pages on purpose. The 1G pages the BAR
    // could have had are `best_possible`, and the note says bar-align
    // is why.
    assert_eq!(bar2["planned"]["pages_4k"], size / 4096, "{bar2}");
    assert_eq!(bar2["best_possible"]["pages_1g"], size / GIB, "{bar2}");
    assert_eq!(bar2["huge_ok"], true, "{bar2}");
    assert!(bar2.get("warning").is_none(), "{bar2}");
    let note = bar2["note"].as_str().unwrap_or_default();
    assert!(note.contains("bar-align"), "{bar2}");
    let _ = std::fs::remove_file(&backing);
}

#[test]
fn plan_reads_a_bound_device_and_shmem_gets_huge_pages_in_the_lab() {
    let (output, dir) = in_lab(
        "8G",
        "barge plan --device vfio=$LAB_IVSHMEM0 --json > /out/plan.json\n\
         echo 16 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages\n\
         barge run --kernel /lab/guest/bzImage --initramfs /lab/guest/initramfs \
         --memory size=256M --serial none --shmem size=16M,hugepages=2M \
         --report /out/report.json\n\
         echo $? > /out/status\n",
    );
    assert!(output.status.success(), "{}", text(&output));
    let plan: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("plan.json")).unwrap()).unwrap();
    let device = &plan["devices"][0];
    assert_eq!(device["name"], "0000:00:10.0", "{plan}");
    let bar2 = device["bars"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["index"] == 2)
        .unwrap();
    assert_eq!(bar2["size"], 8 * GIB, "{plan}");
    assert_eq!(bar2["page_size"], GIB, "{plan}");
    assert_eq!(bar2["gpa"].as_u64().unwrap() % (8 * GIB), 0, "{plan}");

    let status = std::fs::read_to_string(dir.join("status")).unwrap();
    assert_eq!(status.trim(), "0");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["devices"][0]["kind"], "shmem", "{report}");
    let shm = bar(&report, 2);
    assert_eq!(shm["mapped"]["pages_2m"], 8, "{shm}");
    assert_eq!(shm["slot_updates"], 1, "{shm}");
    assert_eq!(shm["huge_ok"], true, "{shm}");
}
