//! The lab itself: the nested host boots, has KVM and an IOMMU, binds the
//! ivshmem device to vfio-pci and exposes its huge BAR2 as an mmap-able VFIO
//! region. These tests need `barge-lab setup` to have run: without it they
//! fail and name the command (they are not skipped).

use std::path::Path;
use std::process::{Command, Output};

use barge_tests::harness::{self, output_text as text, results_dir};
use barge_tests::lab::SETUP_COMMAND;

fn barge_lab() -> Command {
    Command::new(env!("CARGO_BIN_EXE_barge-lab"))
}

fn lab_run(args: &[&str]) -> Output {
    harness::lab_run(env!("CARGO_BIN_EXE_barge-lab"), args)
}

#[test]
fn lab_host_has_kvm_and_a_vfio_ivshmem_bar2() {
    let output = lab_run(&[
        "--ivshmem",
        "2G",
        "--",
        "vfio-region-info",
        "$LAB_IVSHMEM0",
        ">",
        "region.json",
    ]);
    assert!(output.status.success(), "{}", text(&output));
    let dir = results_dir(&output);
    let json = std::fs::read_to_string(dir.join("region.json")).expect("region.json");
    let info: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert!(
        info["kernel"].as_str().unwrap().starts_with("6.12."),
        "{info}"
    );
    assert_eq!(info["dev_kvm"], true, "{info}");
    assert_eq!(info["driver"], "vfio-pci", "{info}");
    assert!(!info["iommu_group"].as_str().unwrap().is_empty(), "{info}");
    let bar2 = &info["regions"][2];
    assert_eq!(bar2["size"], 2u64 << 30, "{info}");
    assert_eq!(bar2["offset"], 2u64 << 40, "{info}");
    assert_eq!(bar2["mmap"], true, "{info}");
    assert_eq!(bar2["read"], true, "{info}");
    assert_eq!(bar2["write"], true, "{info}");
    // The console log of the run is kept for post-mortem.
    let console = dir.parent().unwrap().join("console.log");
    let log = std::fs::read_to_string(console).expect("console log kept");
    assert!(log.contains("BARGE-LAB-READY"), "{log}");
}

#[test]
fn lab_returns_the_command_status_and_its_files() {
    let output = lab_run(&[
        "--",
        "mkdir -p sub && echo payload > sub/file.txt && exit 7",
    ]);
    assert_eq!(output.status.code(), Some(7), "{}", text(&output));
    let dir = results_dir(&output);
    assert_eq!(
        std::fs::read_to_string(dir.join("sub/file.txt")).unwrap(),
        "payload\n"
    );
}

#[test]
fn lab_command_deadline_fails_with_the_console_tail() {
    let output = lab_run(&["--timeout", "5", "--", "echo still-running; sleep 600"]);
    assert_eq!(output.status.code(), Some(124), "{}", text(&output));
    let out = text(&output);
    assert!(out.contains("timed out during the command"), "{out}");
    assert!(out.contains("still-running"), "{out}");
}

#[test]
fn lab_without_setup_names_the_setup_command() {
    let empty = std::env::temp_dir().join(format!("barge-lab-empty-{}", std::process::id()));
    let output = barge_lab()
        .env("BARGE_LAB_DIR", &empty)
        .args(["run", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(125), "{}", text(&output));
    assert!(text(&output).contains(SETUP_COMMAND), "{}", text(&output));
    let _ = std::fs::remove_dir_all(Path::new(&empty));
}

#[test]
fn lab_rejects_bad_device_options() {
    for bad in [["--ivshmem", "3G"], ["--ivshmem", "8G,size=1"]] {
        let output = barge_lab()
            .arg("run")
            .args(bad)
            .args(["--", "true"])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{}", text(&output));
        assert!(text(&output).contains("--ivshmem"), "{}", text(&output));
    }
}

#[test]
fn lab_binds_nvme_and_e1000e_to_vfio_pci() {
    let image = std::env::temp_dir().join(format!("barge-lab-nvme-{}.img", std::process::id()));
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(16 << 20))
        .expect("disk image");
    let output = lab_run(&[
        "--nvme",
        image.to_str().unwrap(),
        "--e1000e",
        "--",
        "vfio-region-info $LAB_NVME0 > nvme.json && vfio-region-info $LAB_E1000E0 > e1000e.json",
    ]);
    let _ = std::fs::remove_file(&image);
    assert!(output.status.success(), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("nvme0 at 0000:00:10.0"), "{stderr}");
    assert!(stderr.contains("e1000e0 at 0000:00:11.0"), "{stderr}");
    let dir = results_dir(&output);
    for name in ["nvme.json", "e1000e.json"] {
        let info: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(name)).unwrap()).unwrap();
        assert_eq!(info["driver"], "vfio-pci", "{info}");
        assert!(info["regions"][0]["size"].as_u64().unwrap() > 0, "{info}");
    }
}
