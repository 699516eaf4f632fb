//! Passthrough bad input, in the lab: each case is one line naming the
//! problem and what to do, a non-zero status, no panic; and the device is
//! still usable afterwards (nothing was left open or mapped).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use barge_tests::harness::{lab_script, output_text as text};

/// Runs `script` in the lab with `args` (devices, topology).
fn in_lab(args: &[&str], script: &str) -> (Output, PathBuf) {
    let mut all = vec!["--timeout", "600"];
    all.extend_from_slice(args);
    lab_script(env!("CARGO_BIN_EXE_barge-lab"), &all, script)
}

const GUEST: &str = "--kernel /lab/guest/bzImage --initramfs /lab/guest/initramfs \
                     --memory size=256M";

/// `barge run` for case NAME: stderr to /out/NAME.err, status to /out/NAME.status.
fn case(name: &str, options: &str) -> String {
    format!(
        "barge run {GUEST} --serial none {options} 2> /out/{name}.err; \
         echo $? > /out/{name}.status\n"
    )
}

/// (status, stderr) of each case.
fn cases(dir: &Path) -> BTreeMap<String, (String, String)> {
    let mut all = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "status") {
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let status = std::fs::read_to_string(&path).unwrap().trim().to_string();
            let err = std::fs::read_to_string(dir.join(format!("{name}.err"))).unwrap_or_default();
            all.insert(name, (status, err));
        }
    }
    all
}

/// One error line, naming what the test expects, and no panic.
fn assert_error(cases: &BTreeMap<String, (String, String)>, name: &str, expected: &[&str]) {
    let (status, err) = cases
        .get(name)
        .unwrap_or_else(|| panic!("case {name} did not run: {cases:?}"));
    assert_ne!(status, "0", "{name}: {err}");
    assert!(!err.contains("panicked"), "{name}: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{name}: one line expected:\n{err}");
    assert!(lines[0].starts_with("barge: error: "), "{name}: {err}");
    for part in expected {
        assert!(
            lines[0].contains(part),
            "{name}: `{part}` missing from: {err}"
        );
    }
}

#[test]
fn missing_unbound_and_busy_devices_are_clear_errors_and_leave_the_device_usable() {
    let mut script = String::from("B=$LAB_IVSHMEM0\n");
    script += &case("nonexistent", "--device vfio=0000:00:1f.6");
    script += "echo $B > /sys/bus/pci/drivers/vfio-pci/unbind\n";
    script += &case("unbound", "--device vfio=$B");
    script += "echo $B > /sys/bus/pci/drivers_probe\n";
    // A first barge holds the device while a second one tries to open it.
    script += &format!(
        "barge run {GUEST} --serial file=/out/holder.log --device vfio=$B \
         --cmdline 'console=ttyS0 -- sleep 15' 2> /out/holder.err &\n\
         sleep 5\n"
    );
    script += &case("busy", "--device vfio=$B");
    script += "wait\n";
    // After all that the device still works, with the same mapping.
    script += &case("after", "--device vfio=$B --report /out/after.json");
    let (output, dir) = in_lab(&["--ivshmem", "1G"], &script);
    assert!(output.status.success(), "{}", text(&output));
    let cases = cases(&dir);
    assert_error(&cases, "nonexistent", &["0000:00:1f.6", "does not exist"]);
    assert_error(
        &cases,
        "unbound",
        &[
            "not bound",
            "echo vfio-pci > /sys/bus/pci/devices/0000:00:10.0/driver_override",
            "echo 0000:00:10.0 > /sys/bus/pci/drivers_probe",
        ],
    );
    assert_error(&cases, "busy", &["already in use", "/dev/vfio/"]);
    let (status, err) = &cases["after"];
    assert_eq!(status, "0", "{err}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("after.json")).unwrap()).unwrap();
    let bar2 = report["devices"][0]["bars"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["index"] == 2)
        .unwrap()
        .clone();
    assert_eq!(bar2["mapped"]["pages_1g"], 1, "{bar2}");
    assert_eq!(bar2["huge_ok"], true, "{bar2}");
}

#[test]
fn a_group_that_is_not_viable_names_the_other_devices() {
    let image = std::env::temp_dir().join(format!("barge-group-{}.img", std::process::id()));
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(16 << 20))
        .unwrap();
    // ivshmem and nvme share a group behind a PCI bridge; nvme keeps its
    // host driver.
    let (output, dir) = in_lab(
        &[
            "--bridge",
            "--ivshmem",
            "2M",
            "--nvme",
            image.to_str().unwrap(),
            "--host-driver",
            "nvme0",
        ],
        &case("not_viable", "--device vfio=$LAB_IVSHMEM0"),
    );
    let _ = std::fs::remove_file(&image);
    assert!(output.status.success(), "{}", text(&output));
    assert_error(
        &cases(&dir),
        "not_viable",
        &["is not viable", "0000:01:02.0 (bound to nvme)"],
    );
}

#[test]
fn a_host_without_an_iommu_is_named() {
    let (output, dir) = in_lab(
        &["--no-iommu", "--ivshmem", "2M"],
        &case("no_iommu", "--device vfio=$LAB_IVSHMEM0"),
    );
    assert!(output.status.success(), "{}", text(&output));
    assert_error(
        &cases(&dir),
        "no_iommu",
        &["no IOMMU group", "intel_iommu=on"],
    );
}
