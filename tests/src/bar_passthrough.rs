//! The BAR passthrough check the lab tests share: an ivshmem device's BAR2
//! (a file on the outer machine) is passed through by `barge run` into a
//! Linux guest in the lab host. barge plans GPA and HVA, maps the BAR once,
//! pre-faults it and reports the page sizes KVM used; the guest reads what
//! the test wrote into the file and writes a marker the test reads back
//! after exit, and a kprobe counts the host's faults on the BAR.
//! [`eight_gib_bar_maps_once_with_1g_pages`] is the whole check, run on each
//! host kernel the lab has.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Instant;

use crate::harness::{lab_script, output_text as text, read_at, sparse_file, write_at};

pub const GIB: u64 = 1 << 30;

/// Runs `script` in the lab host (the one `host_kernel` names, or the main
/// one) with one ivshmem device.
pub fn in_lab(
    barge_lab: &str,
    host_kernel: Option<&str>,
    ivshmem: &str,
    script: &str,
) -> (Output, PathBuf) {
    let mut args = vec!["--timeout", "600", "--ivshmem", ivshmem];
    if let Some(kernel) = host_kernel {
        args.extend(["--host-kernel", kernel]);
    }
    lab_script(barge_lab, &args, script)
}

/// A kprobe on vfio-pci's huge fault handler counts every host fault on
/// the BAR, with its order (the dynamic-debug line is rate-limited).
const COUNT_HOST_FAULTS: &str = "cd /sys/kernel/tracing && \
    echo 'p:bargehf vfio_pci_mmap_huge_fault order=%si:u32' > kprobe_events && \
    echo 1 > events/kprobes/bargehf/enable && cd /out\n";

/// barge's command in the lab host: boot the guest with the device passed
/// through; the guest reads a word the test wrote at BAR2 + 0x1000 and
/// writes 0x600df00d at BAR2 + 0x2000 and at the BAR's last word. The host
/// faults on the BAR over the whole run go to /out/faults.txt, the host's
/// kernel release to /out/host-kernel.
pub fn barge_script(device_options: &str, size: u64) -> String {
    let last = size - 4;
    format!(
        "{COUNT_HOST_FAULTS}\
         uname -r > /out/host-kernel\n\
         barge run --kernel /lab/guest/bzImage --initramfs /lab/guest/initramfs \
         --memory size=512M --device vfio=$LAB_IVSHMEM0{device_options} \
         --serial file=/out/guest.log --report /out/report.json \
         --cmdline 'console=ttyS0 panic=-1 -- a=$(pcibar 1af4:1110 2);echo BAR2=$a;\
         echo READ=$(devmem $((a+0x1000)) 32);devmem $((a+0x2000)) 32 0x600df00d;\
         devmem $((a+{last})) 32 0x600df00d'\n\
         echo $? > /out/status\n\
         grep bargehf /sys/kernel/tracing/trace > /out/faults.txt\n"
    )
}

/// The orders of the host's huge faults on the BAR during the run.
pub fn host_fault_orders(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("faults.txt"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split("order=").nth(1))
        .filter_map(|o| o.trim().parse().ok())
        .collect()
}

/// Checks barge's run and the data path both ways; returns the report.
pub fn check_run(output: &Output, dir: &Path, backing: &Path, size: u64) -> serde_json::Value {
    let guest = std::fs::read_to_string(dir.join("guest.log")).unwrap_or_default();
    assert!(output.status.success(), "{}\nguest:\n{guest}", text(output));
    let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
    assert_eq!(status.trim(), "0", "guest:\n{guest}\n{}", text(output));
    assert!(guest.contains("READ=0xCAFEF00D"), "guest:\n{guest}");
    assert!(guest.contains("GUEST-EXIT 0"), "guest:\n{guest}");
    assert_eq!(read_at(backing, 0x2000, 4), 0x600d_f00du32.to_le_bytes());
    assert_eq!(read_at(backing, size - 4, 4), 0x600d_f00du32.to_le_bytes());
    let report = std::fs::read_to_string(dir.join("report.json")).expect("report.json");
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    let bar2_gpa = report["devices"][0]["bars"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["index"] == 2)
        .map(|b| b["gpa"].as_u64().unwrap())
        .unwrap();
    let seen = guest
        .lines()
        .find_map(|l| l.strip_prefix("BAR2="))
        .map(|v| u64::from_str_radix(v.trim().trim_start_matches("0x"), 16).unwrap())
        .unwrap();
    assert_eq!(seen, bar2_gpa, "the guest kept barge's BAR address");
    // Guest RAM was mapped for device DMA before the guest ran.
    assert_eq!(report["dma"]["bytes"], 512u64 << 20, "{report}");
    assert!(
        report["dma"]["gib_per_s"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    report
}

/// BAR `index` of the report's first device.
pub fn bar(report: &serde_json::Value, index: u64) -> serde_json::Value {
    report["devices"][0]["bars"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["index"] == index)
        .cloned()
        .unwrap_or_else(|| panic!("no BAR {index} in {report}"))
}

/// What [`eight_gib_bar_maps_once_with_1g_pages`] saw.
#[derive(Debug)]
pub struct HugeBarRun {
    /// `uname -r` in the lab host.
    pub host_kernel: String,
    /// From the lab's start to its ready line, as `barge-lab` printed it.
    pub host_ready_s: Option<f64>,
    /// The whole `barge-lab run`, boot to power-off.
    pub run_s: f64,
}

/// The most important passthrough check, on the host kernel `host_kernel`
/// names (the main one when `None`): an 8 GiB ivshmem BAR2 passed through
/// by `barge run` is planned and mapped at 1 GiB alignment, KVM maps it
/// with eight 1 GiB pages, the host takes one 1 GiB fault per GiB over the
/// whole run (mapped once), and data goes both ways through the BAR file.
pub fn eight_gib_bar_maps_once_with_1g_pages(
    barge_lab: &str,
    host_kernel: Option<&str>,
) -> HugeBarRun {
    let size = 8 * GIB;
    let backing = sparse_file(
        &format!("ivshmem-auto-{}.shm", host_kernel.unwrap_or("main")),
        size,
    );
    write_at(&backing, 0x1000, &0xcafe_f00du32.to_le_bytes());
    let started = Instant::now();
    let (output, dir) = in_lab(
        barge_lab,
        host_kernel,
        &format!("8G,file={}", backing.display()),
        &barge_script("", size),
    );
    let run_s = started.elapsed().as_secs_f64();
    let report = check_run(&output, &dir, &backing, size);
    let bar2 = bar(&report, 2);
    assert_eq!(bar2["size"], size, "{bar2}");
    assert_eq!(bar2["gpa"].as_u64().unwrap() % GIB, 0, "{bar2}");
    assert_eq!(bar2["hva"].as_u64().unwrap() % GIB, 0, "{bar2}");
    assert_eq!(bar2["planned_page_size"], GIB, "{bar2}");
    assert_eq!(bar2["mapped"]["pages_1g"], 8, "{bar2}");
    assert_eq!(bar2["slot_updates"], 1, "{bar2}");
    assert_eq!(bar2["huge_ok"], true, "{bar2}");
    // BAR0 (256 bytes of registers) is trapped, never a memslot.
    let bar0 = bar(&report, 0);
    assert_eq!(bar0["slot_updates"], 0, "{bar0}");
    // Mapped once: one 1 GiB host fault per GiB over the whole guest boot
    // (QEMU 10 took 7 per GiB in the same lab, Cloud Hypervisor 2).
    let faults = host_fault_orders(&dir);
    assert_eq!(faults, vec![18; 8], "host huge faults");
    let _ = std::fs::remove_file(&backing);
    let run = HugeBarRun {
        host_kernel: std::fs::read_to_string(dir.join("host-kernel"))
            .unwrap_or_default()
            .trim()
            .to_string(),
        host_ready_s: host_ready_seconds(&output),
        run_s,
    };
    println!(
        "host kernel {}: ready after {}, run {:.1} s; BAR2 {} GiB at GPA {:#x} HVA {:#x}, \
         KVM pages_1g {}, slot_updates {}; host faults {} of order {}; guest read \
         0xCAFEF00D at BAR2+0x1000, wrote 0x600df00d at +0x2000 and +{:#x}",
        run.host_kernel,
        run.host_ready_s
            .map_or("?".to_string(), |s| format!("{s:.1} s")),
        run.run_s,
        size / GIB,
        bar2["gpa"].as_u64().unwrap_or(0),
        bar2["hva"].as_u64().unwrap_or(0),
        bar2["mapped"]["pages_1g"],
        bar2["slot_updates"],
        faults.len(),
        faults.first().copied().unwrap_or(0),
        size - 4
    );
    run
}

/// `barge-lab: host ready after 8.2 s` from barge-lab's stderr.
fn host_ready_seconds(output: &Output) -> Option<f64> {
    String::from_utf8_lossy(&output.stderr)
        .lines()
        .find_map(|l| l.strip_prefix("barge-lab: host ready after "))
        .and_then(|rest| rest.trim_end_matches(" s").trim().parse().ok())
}
