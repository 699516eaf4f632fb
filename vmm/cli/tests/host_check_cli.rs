//! `barge host-check` from the command line on this machine (it has
//! /dev/kvm, no VFIO): the JSON is an array of `{"check", "status",
//! "detail", "fix"}` with `fix` null exactly on PASS, the text has one line
//! per check and a summary, and the exit status is 1 exactly when a check
//! FAILs. The KVM check needs /dev/kvm (`BARGE_SKIP_KVM=1` skips that part).

use std::process::{Command, Output, Stdio};

use guest_programs::testing::kvm_or_skip;
use serde_json::Value;

fn barge(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_barge"));
    command
        .arg("host-check")
        .args(args)
        .stdin(Stdio::null())
        .env_remove("RUST_LOG")
        .env_remove("BARGE_KVM_DEVICE");
    for (key, value) in envs {
        command.env(key, value);
    }
    command.output().expect("barge starts")
}

/// The JSON array, checked for its shape, and the exit status it implies.
fn checks(output: &Output) -> Vec<Value> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let json: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    let array = json.as_array().expect("an array").clone();
    for check in &array {
        let object = check.as_object().expect("objects");
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["check", "detail", "fix", "status"], "{check}");
        let status = check["status"].as_str().unwrap();
        assert!(["PASS", "WARN", "FAIL"].contains(&status), "{check}");
        assert_eq!(check["fix"].is_null(), status == "PASS", "{check}");
        assert!(!check["detail"].as_str().unwrap().is_empty(), "{check}");
    }
    let fails = array.iter().any(|c| c["status"] == "FAIL");
    assert_eq!(output.status.code(), Some(i32::from(fails)), "{stdout}");
    array
}

fn find<'a>(checks: &'a [Value], name: &str) -> &'a Value {
    checks
        .iter()
        .find(|c| c["check"] == name)
        .unwrap_or_else(|| panic!("no {name} check in {checks:?}"))
}

#[test]
fn json_shape_and_exit_status_on_this_machine() {
    let output = barge(&["--json"], &[]);
    let results = checks(&output);
    let names: Vec<&str> = results
        .iter()
        .map(|c| c["check"].as_str().unwrap())
        .collect();
    for name in [
        "kvm",
        "kvm pre-fault",
        "kvm stats fd",
        "kernel version",
        "kernel config pfnmap",
        "kernel config vfio-pci",
        "vfio-pci huge fault",
        "iommu groups",
        "interrupt remapping",
        "vfio interface",
        "hugepages 2M",
        "hugepages 1G",
        "transparent hugepages",
    ] {
        assert!(names.contains(&name), "{name} missing: {names:?}");
    }
    // No VFIO here: nothing to open devices with, so a FAIL and status 1.
    if !std::path::Path::new("/dev/vfio/vfio").exists()
        && !std::path::Path::new("/dev/iommu").exists()
    {
        assert_eq!(find(&results, "vfio interface")["status"], "FAIL");
        assert_eq!(output.status.code(), Some(1));
    }
    if kvm_or_skip("json_shape_and_exit_status_on_this_machine") {
        assert_eq!(find(&results, "kvm")["status"], "PASS", "{results:?}");
        assert_eq!(
            find(&results, "kvm stats fd")["status"],
            "PASS",
            "{results:?}"
        );
    }
    // The text: one line per check, then the summary.
    let text = barge(&[], &[]);
    assert_eq!(text.status.code(), output.status.code());
    let stdout = String::from_utf8_lossy(&text.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), results.len() + 1, "{stdout}");
    for (line, check) in lines.iter().zip(&results) {
        let status = check["status"].as_str().unwrap();
        assert!(
            line.starts_with(&format!("{status}  {}", check["check"].as_str().unwrap())),
            "{line}"
        );
        assert_eq!(line.contains(" -- fix: "), status != "PASS", "{line}");
    }
    assert!(lines.last().unwrap().ends_with(" FAIL"), "{stdout}");
}

#[test]
fn no_kvm_and_a_missing_device_fail_with_what_to_do() {
    let output = barge(
        &["--json", "--device", "vfio=0000:7f:1f.7"],
        &[("BARGE_KVM_DEVICE", "/nonexistent/kvm")],
    );
    let results = checks(&output);
    assert_eq!(output.status.code(), Some(1));
    let kvm = find(&results, "kvm");
    assert_eq!(kvm["status"], "FAIL");
    assert!(
        kvm["fix"]
            .as_str()
            .unwrap()
            .contains("kvm_intel or kvm_amd"),
        "{kvm}"
    );
    let device = find(&results, "0000:7f:1f.7 device");
    assert_eq!(device["status"], "FAIL");
    assert!(
        device["fix"].as_str().unwrap().contains("lspci -D"),
        "{device}"
    );
}

#[test]
fn a_malformed_device_is_a_usage_error() {
    let output = barge(&["--device", "vfio=nonsense"], &[]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.starts_with("barge: error: "), "{stderr}");
}
