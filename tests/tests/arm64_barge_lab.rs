//! barge on arm64, in the arm64 lab (`barge-lab run --arch arm64`: KVM with VHE under
//! TCG, SMMUv3, the Debian cloud-arm64 6.12 kernel as host and guest). One lab boot runs:
//!
//! - the arm64 guest with 2 vCPUs and 512 MiB: GUEST-UP shows both CPUs, the command's
//!   status comes back as GUEST-EXIT, PSCI SYSTEM_OFF gives barge status 0;
//! - a 1 GiB ivshmem BAR passed through (VFIO type1 on the SMMU) twice: planned at its
//!   natural alignment and with `bar-align=4k`. barge's report proves the host mapping
//!   (`proof: host_faults`: KVM has no pre-fault or page counters on arm64) and the test
//!   counts the same faults with its own kretprobe, independent of barge's: 512 order-9
//!   mappings for the aligned BAR, 262144 order-0 ones (each 2 MiB block's order-9 attempt
//!   falling back) with the cap. The guest reads what the test wrote into the BAR's
//!   backing file and writes back, at both ends of the BAR. Where the lab host's kernel
//!   dumps KVM's stage 2 (seen in /proc/kallsyms), the report's `stage2` must hold the
//!   entries the guest's touches made (2 MiB blocks aligned, 4 KiB pages capped); with the
//!   Debian kernel it must be null;
//! - bad input: a device that does not exist and one not bound to vfio-pci, each one
//!   error line and a non-zero status.
//!
//! A second boot passes NVMe through twice: the guest's nvme driver takes MSI-X through
//! the ITS (barge routes each vector with the device's requester ID), then INTx through a
//! GIC SPI (`pci=nomsi`), and reads the image with a matching checksum each time; a guest
//! `reboot -f` (PSCI SYSTEM_RESET) gives status 3 with `--on-reboot stop`. A third boot,
//! without the SMMU (`--no-iommu`), checks that error.

use std::collections::BTreeMap;
use std::path::Path;

use barge_tests::bar_passthrough::{FROM_GUEST, FROM_OUTSIDE, GIB};
use barge_tests::harness::{self, lab_script, output_text as text, read_at, write_at};
use barge_tests::nvme::{
    check_nvme_run, expected_sha256, fresh_image, nvme_run_booting, INTX_GIC, MSIX,
};

const BARGE_LAB: &str = env!("CARGO_BIN_EXE_barge-lab");
/// The function behind a VM's `stage2_page_tables`: in /proc/kallsyms only where the
/// kernel has the dump.
const PTDUMP_SHOW: &str = "kvm_ptdump_guest_show";
const GUEST: &str = "--kernel /lab/guest/Image --initramfs /lab/guest/initramfs \
                     --memory size=512M";

/// The test's own count of vfio-pci's faults: a kretprobe keyed on order and result
/// (256 = VM_FAULT_NOPAGE, mapped; 2048 = VM_FAULT_FALLBACK), cleared before each run.
const COUNT_FAULTS: &str = "T=/sys/kernel/tracing\n\
    echo 'r:lab/hf vfio_pci_mmap_huge_fault order=$arg2:u32 ret=$retval:u32' >> $T/kprobe_events\n\
    echo 'hist:keys=order,ret' > $T/events/lab/hf/trigger\n\
    echo 1 > $T/events/lab/hf/enable\n";

fn save_faults(name: &str) -> String {
    format!(
        "cat $T/events/lab/hf/hist > /out/{name}.faults\n\
         echo 'hist:keys=order,ret:clear' >> $T/events/lab/hf/trigger\n"
    )
}

/// `barge run` NAME with the ivshmem BAR: the guest prints BAR2's address, reads the word
/// at BAR2 + 0x1000 and writes FROM_GUEST at + `offset` and at the BAR's last word.
fn bar_run(name: &str, options: &str, offset: u64) -> String {
    let last = GIB - 4;
    format!(
        "barge run {GUEST} --cpus 2 --device vfio=$LAB_IVSHMEM0{options} \
         --serial file=/out/{name}.guest --report /out/{name}.json \
         --cmdline 'console=ttyS0 panic=-1 -- a=$(pcibar 1af4:1110 2);echo BAR2=$a;\
         echo READ=$(devmem $((a+0x1000)) 32);devmem $((a+{offset:#x})) 32 {FROM_GUEST:#x};\
         devmem $((a+{last})) 32 {FROM_GUEST:#x}' 2> /out/{name}.log; \
         echo $? > /out/{name}.status\n{}",
        save_faults(name)
    )
}

/// `barge run` NAME expected to fail: stderr and status.
fn bad_run(name: &str, options: &str) -> String {
    format!(
        "barge run {GUEST} --serial none {options} 2> /out/{name}.err; \
         echo $? > /out/{name}.status\n"
    )
}

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

/// `(order, result) -> calls` from a hist file.
fn hist(text: &str) -> BTreeMap<(u32, u32), u64> {
    vmm::machine::host_faults::parse_hist(text)
}

fn bar2(report: &serde_json::Value) -> serde_json::Value {
    report["devices"][0]["bars"]
        .as_array()
        .expect("the report lists the BARs")
        .iter()
        .find(|b| b["index"] == 2)
        .expect("BAR 2 is reported")
        .clone()
}

fn assert_error(dir: &Path, name: &str, expected: &[&str]) {
    let status = read(dir, &format!("{name}.status"));
    let err = read(dir, &format!("{name}.err"));
    assert_ne!(status.trim(), "0", "{name}: {err}");
    assert!(!err.contains("panicked"), "{name}: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{name}: one line expected:\n{err}");
    assert!(lines[0].starts_with("barge: error: "), "{name}: {err}");
    for part in expected {
        assert!(lines[0].contains(part), "{name}: `{part}` missing: {err}");
    }
}

#[test]
fn arm64_guest_boots_and_a_1g_bar_maps_with_2m_host_pages() {
    let file = harness::sparse_file("arm64-bar.shm", GIB);
    write_at(&file, 0x1000, &FROM_OUTSIDE.to_le_bytes());
    let mut script = String::from(COUNT_FAULTS);
    // Whether the lab host's kernel dumps KVM's stage 2 (CONFIG_PTDUMP_STAGE2_DEBUGFS),
    // seen from its symbols rather than from barge: then the report must give `stage2`.
    script += &format!("grep -c ' {PTDUMP_SHOW}$' /proc/kallsyms > /out/ptdump || true\n");
    script += &format!(
        "barge run {GUEST} --cpus 2 --serial file=/out/boot.guest --report /out/boot.json \
         --cmdline 'console=ttyS0 quiet panic=-1 -- echo CPUS=$(grep -c ^processor /proc/cpuinfo); \
         exit 3' \
         2> /out/boot.log; echo $? > /out/boot.status\n"
    );
    script += &bar_run("aligned", "", 0x2000);
    script += &bar_run("capped", ",bar-align=4k", 0x3000);
    script += &bad_run("nonexistent", "--device vfio=0000:00:1f.6");
    script += "B=$LAB_IVSHMEM0; echo $B > /sys/bus/pci/drivers/vfio-pci/unbind\n";
    script += &bad_run("unbound", "--device vfio=$B");
    script += "echo $B > /sys/bus/pci/drivers_probe\n";
    let shm = format!("1G,file={}", file.display());
    let (output, dir) = lab_script(
        BARGE_LAB,
        &["--arch", "arm64", "--timeout", "900", "--ivshmem", &shm],
        &script,
    );
    let tail = read_at(&file, GIB - 4, 4);
    let at_2000 = read_at(&file, 0x2000, 4);
    let at_3000 = read_at(&file, 0x3000, 4);
    let _ = std::fs::remove_file(&file);
    assert!(output.status.success(), "{}", text(&output));

    // The guest: both CPUs, the command's status, power-off.
    let guest = read(&dir, "boot.guest");
    let up = guest
        .lines()
        .find(|l| l.starts_with("GUEST-UP"))
        .unwrap_or_else(|| panic!("no GUEST-UP line:\n{guest}\n{}", read(&dir, "boot.log")));
    println!("arm64 guest: {up}");
    assert!(up.starts_with("GUEST-UP cpus=2 "), "{up}");
    // Markers, not whole lines: a kernel that prints its log from a thread (7.3) can
    // interleave it with what the guest's init writes.
    assert!(guest.contains("CPUS=2"), "{guest}");
    assert!(guest.contains("GUEST-EXIT 3"), "{guest}");
    assert_eq!(
        read(&dir, "boot.status").trim(),
        "0",
        "{}",
        read(&dir, "boot.log")
    );
    let boot: serde_json::Value = serde_json::from_str(&read(&dir, "boot.json")).unwrap();
    assert_eq!(boot["exit"]["reason"], "poweroff", "{boot}");

    // The BAR, aligned and capped: barge's proof, the test's own count, the data path;
    // where the kernel dumps stage 2, the entries the guest's three touches (+0x1000, the
    // write, the last word) made: two 2 MiB blocks aligned, three 4 KiB pages capped.
    let ptdump = read(&dir, "ptdump").trim() != "0";
    println!("arm64 lab host kernel dumps stage 2: {ptdump}");
    for (name, pages, order, count, stage2) in [
        ("aligned", "pages_2m", 9, 512u64, [0, 2, 0]),
        ("capped", "pages_4k", 0, 262_144, [3, 0, 0]),
    ] {
        let log = read(&dir, &format!("{name}.log"));
        let guest = read(&dir, &format!("{name}.guest"));
        assert_eq!(
            read(&dir, &format!("{name}.status")).trim(),
            "0",
            "{log}\n{guest}"
        );
        assert!(!log.contains("panicked"), "{log}");
        assert!(
            guest.contains(&format!("READ=0x{FROM_OUTSIDE:08X}")),
            "{name}: the guest did not read what the test wrote:\n{guest}"
        );
        let report: serde_json::Value =
            serde_json::from_str(&read(&dir, &format!("{name}.json"))).unwrap();
        let bar = bar2(&report);
        println!(
            "arm64 {name} BAR2: proof {} host_mapped {} stage2 {} huge_ok {}",
            bar["proof"], bar["host_mapped"], bar["stage2"], bar["huge_ok"]
        );
        assert_eq!(bar["proof"], "host_faults", "{bar}");
        assert_eq!(bar["mapped"], serde_json::Value::Null, "{bar}");
        assert_eq!(bar["host_mapped"]["pages"][pages], count, "{bar}");
        assert_eq!(
            bar["host_mapped"]["pages"]
                .as_object()
                .unwrap()
                .values()
                .filter_map(|v| v.as_u64())
                .sum::<u64>(),
            count,
            "{bar}"
        );
        // The lab's Debian kernel has no stage-2 dump: nothing is claimed there.
        if ptdump {
            let got = ["pages_4k", "pages_2m", "pages_1g"].map(|p| bar["stage2"][p].as_u64());
            assert_eq!(got, stage2.map(Some), "{name}: {bar}");
        } else {
            assert!(bar["stage2"].is_null(), "{bar}");
        }
        assert_eq!(bar["planned"][pages], count, "{bar}");
        assert_eq!(bar["huge_ok"], true, "{bar}");
        // The test's own count: every mapping at the expected order, as many as barge says.
        let faults = hist(&read(&dir, &format!("{name}.faults")));
        println!("arm64 {name} host faults (order, result) -> calls: {faults:?}");
        let mapped: BTreeMap<u32, u64> = faults
            .iter()
            .filter(|((_, ret), _)| *ret == 256)
            .map(|((order, _), n)| (*order, *n))
            .collect();
        assert_eq!(
            mapped,
            BTreeMap::from([(order, count)]),
            "{name}: {faults:?}"
        );
        assert_eq!(
            bar["host_mapped"]["fallbacks"].as_u64().unwrap(),
            faults
                .iter()
                .filter(|((_, ret), _)| *ret == 2048)
                .map(|(_, n)| n)
                .sum::<u64>(),
            "{bar}"
        );
    }
    assert_eq!(at_2000, FROM_GUEST.to_le_bytes(), "the aligned run's write");
    assert_eq!(at_3000, FROM_GUEST.to_le_bytes(), "the capped run's write");
    assert_eq!(tail, FROM_GUEST.to_le_bytes(), "the BAR's last word");

    assert_error(&dir, "nonexistent", &["0000:00:1f.6", "does not exist"]);
    assert_error(
        &dir,
        "unbound",
        &[
            "not bound",
            "echo vfio-pci > /sys/bus/pci/devices/0000:00:10.0/driver_override",
        ],
    );
}

#[test]
fn arm64_host_without_an_smmu_is_named() {
    let (output, dir) = lab_script(
        BARGE_LAB,
        &["--arch", "arm64", "--no-iommu", "--ivshmem", "2M"],
        &bad_run("no_iommu", "--device vfio=$LAB_IVSHMEM0"),
    );
    assert!(output.status.success(), "{}", text(&output));
    assert_error(&dir, "no_iommu", &["no IOMMU group", "SMMU"]);
}

#[test]
fn arm64_nvme_takes_msix_through_the_its_and_intx_through_the_gic() {
    let image = fresh_image("arm64-nvme");
    let mut script = nvme_run_booting(&MSIX, None, "/lab/guest/Image");
    script += &nvme_run_booting(&INTX_GIC, None, "/lab/guest/Image");
    script += &format!(
        "barge run {GUEST} --serial file=/out/reboot.guest --on-reboot stop \
         --cmdline 'console=ttyS0 panic=-1 -- reboot -f' 2> /out/reboot.log; \
         echo $? > /out/reboot.status\n"
    );
    let (output, dir) = lab_script(
        BARGE_LAB,
        &[
            "--arch",
            "arm64",
            "--timeout",
            "600",
            "--nvme",
            image.to_str().unwrap(),
        ],
        &script,
    );
    assert!(output.status.success(), "{}", text(&output));
    let expected = expected_sha256();
    for (mode, kind) in [(&MSIX, "ITS-PCI-MSIX"), (&INTX_GIC, "GICv3")] {
        let run = check_nvme_run(&dir, mode, &image, &expected, &text(&output));
        println!(
            "arm64 nvme {}: interrupts {:?}; sha256 {}",
            mode.name, run.interrupts, run.sum
        );
        assert!(
            run.interrupts.iter().all(|l| l.contains(kind)),
            "{:?}",
            run.interrupts
        );
        assert_eq!(run.report["exit"]["reason"], "poweroff", "{}", run.report);
    }
    let _ = std::fs::remove_file(&image);
    let reboot = read(&dir, "reboot.log");
    assert_eq!(read(&dir, "reboot.status").trim(), "3", "{reboot}");
    assert!(reboot.contains("the guest rebooted"), "{reboot}");
}
