//! `barge host-check` in the lab. One boot with a 1 GiB ivshmem device
//! bound to vfio-pci and huge page pools reserved:
//!
//! - the 1 GiB pool WARNs in every run: the lab cannot reserve a 1 GiB page
//!   at run time (`echo 1 > .../nr_hugepages` leaves 0, even after
//!   compaction and with 4 GiB of host memory) and its kernel command line
//!   has no `hugepagesz=1G hugepages=N`; the fix says to reserve them at boot;
//! - as the lab host boots it has no kernel config file (its initramfs has
//!   no /boot): the two kernel config checks WARN that they cannot tell;
//! - with Debian's own config of the lab kernel copied to /boot (taken from
//!   the cached linux-image package), everything else PASSes, `--exercise`
//!   included: KVM maps the BAR with one 1 GiB page;
//! - with the device unbound from vfio-pci, its driver check FAILs (status
//!   1) with the bind commands, and running them binds it again (PASS).
//!
//! A second boot without an IOMMU (`--no-iommu`): the IOMMU groups and the
//! device's driver and group FAIL, each with what to do.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use barge_tests::harness::{lab_script, output_text as text};
use barge_tests::lab::{LabPaths, SETUP_COMMAND};
use serde_json::Value;

/// Runs `script` in the lab with `args`.
fn in_lab(args: &[&str], script: &str) -> (Output, PathBuf) {
    let mut all = vec!["--timeout", "600"];
    all.extend_from_slice(args);
    lab_script(env!("CARGO_BIN_EXE_barge-lab"), &all, script)
}

/// Debian's config of the lab's host kernel, from the cached package
/// `barge-lab setup` downloaded, written to a scratch folder as
/// `config-<version>` (the lab puts it on the host's PATH with `--bin`).
fn lab_kernel_config() -> PathBuf {
    let paths = LabPaths::from_env();
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(paths.state_file())
            .unwrap_or_else(|e| panic!("the lab is not set up ({e}): run `{SETUP_COMMAND}`")),
    )
    .expect("lab.json is JSON");
    let version = state["kernel_version"].as_str().expect("kernel_version");
    let package = format!(
        "{}_",
        state["kernel_package"].as_str().expect("kernel_package")
    );
    let downloads = paths.root.join("downloads");
    let deb = std::fs::read_dir(&downloads)
        .expect("the lab's downloads folder")
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&package))
        })
        .unwrap_or_else(|| {
            panic!(
                "no {package}*.deb in {}: run barge-lab setup",
                downloads.display()
            )
        });
    let dir = std::env::temp_dir().join(format!("barge-host-check-lab-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join(format!("config-{version}"));
    let output = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "dpkg-deb --fsys-tarfile '{}' | tar -xO ./boot/config-{version} > '{}'",
            deb.display(),
            config.display()
        ))
        .output()
        .expect("sh runs");
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        std::fs::metadata(&config).unwrap().len() > 1000,
        "an empty config"
    );
    config
}

/// host-check's JSON from /out/NAME.json and its status from /out/NAME.status.
fn results(dir: &Path, name: &str) -> (Vec<Value>, String) {
    let json = std::fs::read_to_string(dir.join(format!("{name}.json")))
        .unwrap_or_else(|e| panic!("{name}.json: {e}"));
    let status = std::fs::read_to_string(dir.join(format!("{name}.status"))).unwrap_or_default();
    let checks: Value =
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{name}: {e}: {json}"));
    (
        checks.as_array().expect("an array").clone(),
        status.trim().to_string(),
    )
}

fn not_pass(checks: &[Value]) -> Vec<(String, String)> {
    checks
        .iter()
        .filter(|c| c["status"] != "PASS")
        .map(|c| {
            (
                c["check"].as_str().unwrap().to_string(),
                c["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn find<'a>(checks: &'a [Value], name: &str) -> &'a Value {
    checks
        .iter()
        .find(|c| c["check"] == name)
        .unwrap_or_else(|| panic!("no {name} check in {checks:#?}"))
}

/// The one WARN every lab run has (see the top of the file).
fn pool_1g() -> (String, String) {
    ("hugepages 1G".to_string(), "WARN".to_string())
}

/// Every check a run with `--device` has: the host's and the device's.
fn assert_has_every_check(checks: &[Value], bdf: &str) {
    for name in [
        "kvm".to_string(),
        "kvm pre-fault".into(),
        "kvm stats fd".into(),
        "kernel version".into(),
        "kernel config pfnmap".into(),
        "kernel config vfio-pci".into(),
        "vfio-pci huge fault".into(),
        "iommu groups".into(),
        "interrupt remapping".into(),
        "vfio interface".into(),
        "hugepages 2M".into(),
        "hugepages 1G".into(),
        "transparent hugepages".into(),
        format!("{bdf} driver"),
        format!("{bdf} iommu group"),
        format!("{bdf} BAR0"),
        format!("{bdf} BAR2"),
        format!("{bdf} resizable BAR"),
        format!("{bdf} memory decode"),
    ] {
        find(checks, &name);
    }
}

const SCRIPT: &str = "\
echo 16 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages
echo 1 > /sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages
echo $LAB_IVSHMEM0 > /out/bdf
barge host-check --device vfio=$LAB_IVSHMEM0 --json > /out/noconfig.json; echo $? > /out/noconfig.status
mkdir -p /boot && cp /usr/local/bin/config-$(uname -r) /boot/
barge host-check --device vfio=$LAB_IVSHMEM0 --exercise > /out/pass.txt; echo $? > /out/pass.txt.status
barge host-check --device vfio=$LAB_IVSHMEM0 --exercise --json > /out/pass.json; echo $? > /out/pass.status
echo $LAB_IVSHMEM0 > /sys/bus/pci/drivers/vfio-pci/unbind
barge host-check --device vfio=$LAB_IVSHMEM0 > /out/unbound.txt
barge host-check --device vfio=$LAB_IVSHMEM0 --json > /out/unbound.json; echo $? > /out/unbound.status
sed -n \"s/^FAIL  $LAB_IVSHMEM0 driver .* -- fix: //p\" /out/unbound.txt > /out/fix.sh
sh -x /out/fix.sh 2> /out/fix.log
barge host-check --device vfio=$LAB_IVSHMEM0 --json > /out/rebound.json; echo $? > /out/rebound.status
";

#[test]
fn host_check_in_the_lab() {
    let config = lab_kernel_config();
    let bin = config.to_string_lossy().into_owned();
    let (output, dir) = in_lab(&["--ivshmem", "1G", "--bin", &bin], SCRIPT);
    let _ = std::fs::remove_dir_all(config.parent().unwrap());
    assert!(output.status.success(), "{}", text(&output));
    let bdf = std::fs::read_to_string(dir.join("bdf"))
        .unwrap()
        .trim()
        .to_string();
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();

    // As the lab boots: no config file, two WARNs that say so, status 0.
    let (checks, status) = results(&dir, "noconfig");
    assert_has_every_check(&checks, &bdf);
    assert_eq!(
        not_pass(&checks),
        [
            ("kernel config pfnmap".to_string(), "WARN".to_string()),
            ("kernel config vfio-pci".to_string(), "WARN".to_string()),
            pool_1g()
        ],
        "{checks:#?}"
    );
    assert!(find(&checks, "kernel config pfnmap")["detail"]
        .as_str()
        .unwrap()
        .contains("no kernel config found"));
    assert_eq!(status, "0");

    // With Debian's config in /boot: all PASS but the 1 GiB pool, the
    // exercise got 1 GiB pages.
    println!(
        "--- barge host-check --device vfio={bdf} --exercise\n{}",
        read("pass.txt")
    );
    println!("--- the same with --json\n{}", read("pass.json"));
    assert_eq!(read("pass.txt.status").trim(), "0");
    let (checks, status) = results(&dir, "pass");
    assert_has_every_check(&checks, &bdf);
    assert_eq!(not_pass(&checks), [pool_1g()], "{checks:#?}");
    assert_eq!(status, "0");
    let config = find(&checks, "kernel config pfnmap")["detail"]
        .as_str()
        .unwrap();
    assert!(config.starts_with("/boot/config-6.12"), "{config}");
    let bar2 = find(&checks, &format!("{bdf} BAR2"))["detail"]
        .as_str()
        .unwrap();
    assert!(
        bar2.ends_with("host address 1G-aligned: largest page 1G"),
        "{bar2}"
    );
    let exercise = find(&checks, &format!("{bdf} BAR2 exercise"))["detail"]
        .as_str()
        .unwrap();
    assert!(
        exercise.contains("KVM mapped 1 x 1G as planned"),
        "{exercise}"
    );
    let pools = find(&checks, "hugepages 1G")["detail"].as_str().unwrap();
    assert!(pools.starts_with("0 pages reserved"), "{pools}");
    let pools = find(&checks, "hugepages 2M")["detail"].as_str().unwrap();
    assert!(pools.starts_with("16 of 16 free"), "{pools}");

    // Unbound from vfio-pci: the driver FAILs with the bind commands.
    println!(
        "--- after unbinding it from vfio-pci\n{}",
        read("unbound.txt")
    );
    let (checks, status) = results(&dir, "unbound");
    assert_eq!(status, "1");
    let failed: Vec<(String, String)> = not_pass(&checks);
    assert_eq!(
        failed,
        [pool_1g(), (format!("{bdf} driver"), "FAIL".to_string())],
        "{checks:#?}"
    );
    let driver = find(&checks, &format!("{bdf} driver"));
    assert_eq!(driver["detail"], "bound to no driver");
    assert_eq!(
        driver["fix"].as_str().unwrap(),
        format!(
            "echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override; \
             echo {bdf} > /sys/bus/pci/drivers_probe"
        )
    );
    // The fix, run as printed, binds it again.
    println!("--- the fix, run\n{}", read("fix.log"));
    let (checks, status) = results(&dir, "rebound");
    assert_eq!(find(&checks, &format!("{bdf} driver"))["status"], "PASS");
    assert_eq!(status, "0", "{checks:#?}");
}

#[test]
fn host_check_without_an_iommu() {
    let (output, dir) = in_lab(
        &["--ivshmem", "1G", "--no-iommu"],
        "barge host-check --device vfio=$LAB_IVSHMEM0 > /out/noiommu.txt\n\
         barge host-check --device vfio=$LAB_IVSHMEM0 --json > /out/noiommu.json; \
         echo $? > /out/noiommu.status\necho $LAB_IVSHMEM0 > /out/bdf\n",
    );
    assert!(output.status.success(), "{}", text(&output));
    let bdf = std::fs::read_to_string(dir.join("bdf"))
        .unwrap()
        .trim()
        .to_string();
    println!(
        "--- without an IOMMU\n{}",
        std::fs::read_to_string(dir.join("noiommu.txt")).unwrap_or_default()
    );
    let (checks, status) = results(&dir, "noiommu");
    assert_eq!(status, "1");
    let groups = find(&checks, "iommu groups");
    assert_eq!(groups["status"], "FAIL");
    assert!(
        groups["fix"].as_str().unwrap().contains("intel_iommu=on"),
        "{groups}"
    );
    let group = find(&checks, &format!("{bdf} iommu group"));
    assert_eq!(group["status"], "FAIL");
    assert_eq!(
        group["detail"],
        "in no IOMMU group: no IOMMU translates for it"
    );
    let driver = find(&checks, &format!("{bdf} driver"));
    assert_eq!(driver["status"], "FAIL");
    assert!(
        driver["fix"].as_str().unwrap().contains("driver_override"),
        "{driver}"
    );
}
