//! The arm64 lab (`barge-lab run --arch arm64`): its host has KVM with VHE,
//! an SMMUv3 that puts the ivshmem device in an IOMMU group, the device
//! bound to vfio-pci with its BAR2, and the dynamic-debug line and tracefs
//! the fault-order proof needs; the guest files under /lab/guest boot. These
//! tests need `barge-lab setup` (or `setup --arch arm64`) to have run:
//! without it they fail and name the command (they are not skipped).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use barge_tests::harness::{self, output_text as text};
use barge_tests::lab::arm64::{self, arm64_paths, Arm64State, KVM_VHE_LINE};
use barge_tests::lab::{LabPaths, ARM64_SETUP_COMMAND};

const BARGE_LAB: &str = env!("CARGO_BIN_EXE_barge-lab");

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name))
        .unwrap_or_else(|e| panic!("{name} in {}: {e}", dir.display()))
}

const HOST_CHECKS: &str = r#"
d=/sys/bus/pci/devices/$LAB_IVSHMEM0
uname -m > arch.txt
if [ -c /dev/kvm ]; then echo yes; else echo no; fi > dev_kvm.txt
dmesg > dmesg.txt
basename "$(readlink $d/driver)" > driver.txt
basename "$(readlink $d/iommu_group)" > group.txt
ls /dev/vfio > dev_vfio.txt
sed -n 3p $d/resource > bar2.txt
grep 'vfio_pci_mmap_huge_fault' /sys/kernel/debug/dynamic_debug/control > dyndbg.txt
ls /sys/kernel/tracing/kprobe_events /sys/kernel/tracing/trace_pipe > tracefs.txt
ls /lab/guest > guest.txt
"#;

#[test]
fn arm64_lab_host_has_vhe_kvm_an_smmu_group_and_the_fault_knobs() {
    let started = Instant::now();
    let (output, dir) = harness::lab_script(
        BARGE_LAB,
        &["--arch", "arm64", "--ivshmem", "2G"],
        HOST_CHECKS,
    );
    let wall = started.elapsed();
    assert!(output.status.success(), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let boot = arm64::printed_boot_seconds(&stderr).expect("the boot time is printed");
    println!(
        "arm64 lab: host ready after {boot:.1} s; the whole run took {:.1} s",
        wall.as_secs_f64()
    );
    assert!(stderr.contains("ivshmem0 at 0000:00:10.0"), "{stderr}");
    assert_eq!(read(&dir, "arch.txt").trim(), "aarch64");
    assert_eq!(read(&dir, "dev_kvm.txt").trim(), "yes");
    let dmesg = read(&dir, "dmesg.txt");
    assert!(dmesg.contains(KVM_VHE_LINE), "{dmesg}");
    assert!(dmesg.contains("arm-smmu-v3"), "{dmesg}");
    assert_eq!(read(&dir, "driver.txt").trim(), "vfio-pci");
    let group = read(&dir, "group.txt").trim().to_string();
    assert!(group.parse::<u32>().is_ok(), "IOMMU group `{group}`");
    let vfio = read(&dir, "dev_vfio.txt");
    assert!(vfio.lines().any(|l| l == group), "{vfio}");
    assert!(vfio.lines().any(|l| l == "vfio"), "{vfio}");
    // resource: start end flags; BAR2 is the 2 GiB backing file.
    let bar2: Vec<u64> = read(&dir, "bar2.txt")
        .split_whitespace()
        .map(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16).unwrap())
        .collect();
    assert_eq!(bar2[1] - bar2[0] + 1, 2 << 30, "{bar2:x?}");
    // The host init turned the line on (`=p`).
    let dyndbg = read(&dir, "dyndbg.txt");
    assert!(dyndbg.contains("vfio_pci_mmap_huge_fault =p"), "{dyndbg}");
    let tracefs = read(&dir, "tracefs.txt");
    assert!(tracefs.contains("kprobe_events"), "{tracefs}");
    let guest = read(&dir, "guest.txt");
    assert!(
        guest.lines().any(|l| l == "Image") && guest.lines().any(|l| l == "initramfs"),
        "{guest}"
    );
}

#[test]
fn arm64_lab_binds_nvme_and_returns_the_status() {
    let image = harness::sparse_file("arm64-nvme.img", 16 << 20);
    let output = harness::lab_run(
        BARGE_LAB,
        &[
            "--arch",
            "arm64",
            "--nvme",
            image.to_str().unwrap(),
            "--",
            "basename $(readlink /sys/bus/pci/devices/$LAB_NVME0/driver) > driver.txt; exit 3",
        ],
    );
    let _ = std::fs::remove_file(&image);
    assert_eq!(output.status.code(), Some(3), "{}", text(&output));
    let dir = harness::results_dir(&output);
    assert_eq!(read(&dir, "driver.txt").trim(), "vfio-pci");
}

/// The guest files the arm64 lab host carries, booted straight under
/// qemu-system-aarch64 here (no lab host: no KVM needed), follow the x86
/// guest's convention: GUEST-UP, the command after `--`, GUEST-EXIT.
#[test]
fn arm64_guest_files_boot_and_run_their_command() {
    let paths = LabPaths::from_env();
    let state = match Arm64State::load(&arm64_paths(&paths)) {
        Ok(state) => state,
        Err(e) => {
            panic!("the arm64 lab is not set up on this machine: run `{ARM64_SETUP_COMMAND}`: {e}")
        }
    };
    let initrd =
        std::env::temp_dir().join(format!("barge-arm64-guest-{}.cpio", std::process::id()));
    std::fs::File::create(&initrd)
        .and_then(|mut f| {
            f.write_all(
                &barge_tests::lab::initramfs::arm64_guest_initramfs(&state.busybox).unwrap(),
            )
        })
        .expect("the guest initramfs is written");
    let log = initrd.with_extension("log");
    let console_file = std::fs::File::create(&log).expect("the console log is made");
    let started = Instant::now();
    let mut child = Command::new(&state.qemu)
        .args(["-M", "virt", "-accel", "tcg", "-cpu", "max,pauth-impdef=on"])
        .args(["-m", "512M", "-smp", "2", "-nodefaults", "-display", "none"])
        .args(["-no-reboot", "-serial", "stdio", "-kernel"])
        .arg(&state.image)
        .arg("-initrd")
        .arg(&initrd)
        .args([
            "-append",
            "console=ttyAMA0 panic=-1 loglevel=4 -- echo from-the-guest; uname -m",
        ])
        .stdin(Stdio::null())
        .stdout(console_file)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("qemu-system-aarch64 starts");
    let deadline = Instant::now() + Duration::from_secs(180);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.wait();
    let console = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .replace("\r\n", "\n");
    let _ = std::fs::remove_file(&initrd);
    let _ = std::fs::remove_file(&log);
    println!(
        "arm64 guest: booted and powered off in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let up = console
        .find("GUEST-UP cpus=2 mem_kb=")
        .unwrap_or_else(|| panic!("{console}"));
    let ran = console
        .find("from-the-guest\naarch64")
        .unwrap_or_else(|| panic!("{console}"));
    let exit = console
        .find("GUEST-EXIT 0")
        .unwrap_or_else(|| panic!("{console}"));
    assert!(up < ran && ran < exit, "{console}");
}

#[test]
fn arm64_lab_refuses_what_it_does_not_have() {
    for (args, named) in [
        (&["--arch", "arm64", "--e1000e"][..], "--e1000e"),
        (
            &["--arch", "arm64", "--iommufd", "--debian"][..],
            "--iommufd, --debian",
        ),
        (&["--arch", "arm64", "--bin", "/bin/sh"][..], "/bin/sh"),
        (&["--arch", "sparc"][..], "sparc"),
    ] {
        let output = Command::new(BARGE_LAB)
            .arg("run")
            .args(args)
            .args(["--", "true"])
            .output()
            .unwrap();
        assert!(!output.status.success(), "{}", text(&output));
        assert!(text(&output).contains(named), "{}", text(&output));
    }
    let output = Command::new(BARGE_LAB)
        .args(["setup", "--arch", "arm64", "--kernel", "/boot/vmlinuz"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(
        text(&output).contains("--kernel is the x86_64 lab's"),
        "{}",
        text(&output)
    );
}

#[test]
fn arm64_lab_without_setup_names_its_setup_command() {
    let empty = std::env::temp_dir().join(format!("barge-lab-empty-arm64-{}", std::process::id()));
    let output = Command::new(BARGE_LAB)
        .env("BARGE_LAB_DIR", &empty)
        .args(["run", "--arch", "arm64", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(125), "{}", text(&output));
    assert!(
        text(&output).contains(ARM64_SETUP_COMMAND),
        "{}",
        text(&output)
    );
    let _ = std::fs::remove_dir_all(&empty);
}
