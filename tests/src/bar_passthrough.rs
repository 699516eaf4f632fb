//! The BAR passthrough check the lab tests share: an ivshmem device's BAR2
//! (a file on the outer machine) is passed through by `barge run` into a
//! Linux guest in the lab host. barge plans GPA and HVA, maps the BAR once,
//! pre-faults it and reports the page sizes KVM used; the guest reads what
//! the test wrote into the file and writes a marker the test reads back
//! after exit, and a kprobe counts the host's faults on the BAR.
//!
//! Each run is named: [`ivshmem_run`] leaves `/out/NAME.guest` (the guest's
//! console), `NAME.json` (the report), `NAME.log` (barge's stderr, with the
//! backend it opened the device with) and `NAME.status`, so one lab boot can
//! hold several runs; [`checked_run`] reads them back.

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::harness::{lab_script, output_text as text, read_at};

pub const GIB: u64 = 1 << 30;
/// What a test writes into the BAR file at BAR2 + 0x1000 for the guest to
/// read.
pub const FROM_OUTSIDE: u32 = 0xcafe_f00d;
/// What the guest writes into the BAR.
pub const FROM_GUEST: u32 = 0x600d_f00d;

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
/// the BAR, with its order (the dynamic-debug line is rate-limited). Put it
/// before the run whose faults count; [`SAVE_HOST_FAULTS`] after it.
pub const COUNT_HOST_FAULTS: &str = "cd /sys/kernel/tracing && \
    echo 'p:bargehf vfio_pci_mmap_huge_fault order=%si:u32' > kprobe_events && \
    echo 1 > events/kprobes/bargehf/enable && cd /out\n";

/// Saves the faults [`COUNT_HOST_FAULTS`] counted to /out/faults.txt and
/// stops counting (later runs of other devices would fault there too).
pub const SAVE_HOST_FAULTS: &str = "grep bargehf /sys/kernel/tracing/trace > /out/faults.txt\n\
    echo 0 > /sys/kernel/tracing/events/kprobes/bargehf/enable\n";

/// `barge run` NAME in the lab host, with `$LAB_IVSHMEM0` passed through
/// with `device_options` (`,bar-align=2m`) and `--vfio-backend backend`
/// when given: the guest prints BAR2's address, reads the word at
/// BAR2 + 0x1000 and writes [`FROM_GUEST`] at BAR2 + `offset` and at the
/// BAR's last word (`size` - 4).
pub fn ivshmem_run(
    name: &str,
    device_options: &str,
    backend: Option<&str>,
    offset: u64,
    size: u64,
) -> String {
    ivshmem_run_with_memory(name, "size=512M", device_options, backend, offset, size)
}

/// [`ivshmem_run`] with guest RAM as `--memory memory` says.
pub fn ivshmem_run_with_memory(
    name: &str,
    memory: &str,
    device_options: &str,
    backend: Option<&str>,
    offset: u64,
    size: u64,
) -> String {
    let last = size - 4;
    let backend = backend
        .map(|b| format!(" --vfio-backend {b}"))
        .unwrap_or_default();
    format!(
        "RUST_LOG=warn,vfio_ioctls=error,devices::vfio::host=info \
         barge run --kernel /lab/guest/bzImage --initramfs /lab/guest/initramfs \
         --memory {memory} --device vfio=$LAB_IVSHMEM0{device_options}{backend} \
         --serial file=/out/{name}.guest --report /out/{name}.json \
         --cmdline 'console=ttyS0 panic=-1 -- a=$(pcibar 1af4:1110 2);echo BAR2=$a;\
         echo READ=$(devmem $((a+0x1000)) 32);devmem $((a+{offset:#x})) 32 {FROM_GUEST:#x};\
         devmem $((a+{last})) 32 {FROM_GUEST:#x}' 2> /out/{name}.log\n\
         echo $? > /out/{name}.status\n"
    )
}

/// The whole script of a lab boot with one BAR run named `bar`: host
/// faults counted over it (to /out/faults.txt), the host's kernel release
/// in /out/host-kernel.
pub fn barge_script(device_options: &str, size: u64) -> String {
    format!(
        "{COUNT_HOST_FAULTS}uname -r > /out/host-kernel\n{}{SAVE_HOST_FAULTS}",
        ivshmem_run("bar", device_options, None, 0x2000, size)
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

/// What run `name` left in `dir`, after checking that it and the lab ran
/// to the end, the guest read [`FROM_OUTSIDE`] and nothing panicked:
/// (barge's log, the guest's console, the report).
pub fn checked_run(output: &Output, dir: &Path, name: &str) -> (String, String, serde_json::Value) {
    let read = |ext: &str| std::fs::read_to_string(dir.join(format!("{name}.{ext}")));
    let guest = read("guest").unwrap_or_default();
    let log = read("log").unwrap_or_default();
    assert!(output.status.success(), "{}\n{log}\n{guest}", text(output));
    let status = read("status").unwrap_or_default();
    assert_eq!(status.trim(), "0", "{name}: {log}\nguest:\n{guest}");
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        guest.contains(&format!("READ=0x{FROM_OUTSIDE:08X}")),
        "{name}: the guest did not read what the test wrote:\n{guest}"
    );
    assert!(guest.contains("GUEST-EXIT 0"), "{name}: {guest}");
    let report = read("json").unwrap_or_else(|e| panic!("{name}.json: {e}\n{log}"));
    let report: serde_json::Value = serde_json::from_str(&report).expect("the report is JSON");
    (log, guest, report)
}

/// Checks run `name` and the data path both ways (the guest wrote
/// [`FROM_GUEST`] at `offset` and at the last word of the `size`-byte
/// `backing`); the guest kept barge's BAR2 address, and guest RAM was
/// mapped for device DMA. Returns barge's log and the report.
pub fn check_data_path(
    output: &Output,
    dir: &Path,
    name: &str,
    backing: &Path,
    offset: u64,
    size: u64,
) -> (String, serde_json::Value) {
    let (log, guest, report) = checked_run(output, dir, name);
    assert_eq!(
        read_at(backing, offset, 4),
        FROM_GUEST.to_le_bytes(),
        "{name}"
    );
    assert_eq!(
        read_at(backing, size - 4, 4),
        FROM_GUEST.to_le_bytes(),
        "{name}: the BAR's last word"
    );
    let bar2_gpa = bar(&report, 2)["gpa"].as_u64().unwrap();
    let seen = guest
        .lines()
        .find_map(|l| l.strip_prefix("BAR2="))
        .map(|v| u64::from_str_radix(v.trim().trim_start_matches("0x"), 16).unwrap())
        .unwrap_or_else(|| panic!("{name}: no BAR2= line:\n{guest}"));
    assert_eq!(seen, bar2_gpa, "the guest kept barge's BAR address");
    // Guest RAM was mapped for device DMA before the guest ran.
    assert_eq!(report["dma"]["bytes"], 512u64 << 20, "{report}");
    assert!(
        report["dma"]["gib_per_s"].as_f64().unwrap_or(0.0) > 0.0,
        "{report}"
    );
    check_phases(&report);
    (log, report)
}

/// Checks the report's `phases_ms` of a run with a passed-through device:
/// the phases add up to `start_to_first_run_ms`, and the RAM DMA map's
/// phase is the DMA map's own time (`dma.ms`, within the millisecond the
/// rounding may move). Prints them.
pub fn check_phases(report: &serde_json::Value) {
    let phases: vmm::report::PhasesReport = serde_json::from_value(report["phases_ms"].clone())
        .unwrap_or_else(|e| panic!("phases_ms: {e}: {report}"));
    let first_run = report["start_to_first_run_ms"].as_u64().unwrap_or(0);
    assert_eq!(phases.total(), first_run, "{report}");
    let dma_ms = report["dma"]["ms"].as_f64().unwrap_or(-10.0);
    let phase = phases.ram_dma_map as f64;
    assert!(
        (phase - dma_ms).abs() < 1.0,
        "ram_dma_map {phase} vs dma.ms {dma_ms}: {report}"
    );
    println!("{}", phases.summary_line(first_run));
}

/// Checks the progress lines barge's `log` (its stderr, not a terminal)
/// holds for the pre-fault of `bar` (the report's entry for BAR `index` of
/// device `device`): none when the pre-fault took under 2 s, a line per
/// tenth at most and one closing line when it took over 3 s (by the
/// report's `prefault_ms`). Prints them.
pub fn check_prefault_progress(log: &str, bar: &serde_json::Value, device: &str) {
    let index = bar["index"].as_u64().unwrap_or(99);
    let prefix = format!("barge: pre-fault of BAR {index} of {device}: ");
    let lines: Vec<&str> = log.lines().filter(|l| l.starts_with(&prefix)).collect();
    for line in &lines {
        println!("{line}");
    }
    let ms = bar["prefault_ms"].as_f64().unwrap_or(0.0);
    if ms < 2000.0 {
        assert!(lines.is_empty(), "{ms} ms, yet progress: {lines:?}");
    } else if ms > 3000.0 {
        let tenths = lines.iter().filter(|l| l.contains("%), ")).count();
        assert!((1..=9).contains(&tenths), "{ms} ms: {lines:?}");
        // The lab's BARs are whole GiBs: "8 GiB".
        let size = format!("{} GiB", bar["size"].as_u64().unwrap_or(0) >> 30);
        let last = lines.last().copied().unwrap_or_default();
        assert!(
            last.starts_with(&format!("{prefix}{size} in ")) && last.ends_with(" GiB/s)"),
            "{last:?} after {ms} ms"
        );
        assert_eq!(lines.len(), tenths + 1, "{lines:?}");
        assert!(!log.contains('\r'), "not a terminal: no carriage returns");
    }
}

/// Checks the one-boot run of [`barge_script`]; returns the report.
pub fn check_run(output: &Output, dir: &Path, backing: &Path, size: u64) -> serde_json::Value {
    check_data_path(output, dir, "bar", backing, 0x2000, size).1
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

/// The most important passthrough check on an 8 GiB BAR2 of `report`:
/// planned and mapped at 1 GiB alignment, eight 1 GiB KVM pages, one
/// memslot set once; BAR0 (256 bytes of registers) trapped, never a
/// memslot; and, from `faults` (the kprobe's orders over the whole run),
/// one 1 GiB host fault per GiB: mapped once (QEMU 10 took 7 per GiB in
/// the same lab, Cloud Hypervisor 2). Returns BAR2's entry.
pub fn check_eight_gib_bar2(report: &serde_json::Value, faults: &[u32]) -> serde_json::Value {
    let size = 8 * GIB;
    let bar2 = bar(report, 2);
    assert_eq!(bar2["size"], size, "{bar2}");
    assert_eq!(bar2["gpa"].as_u64().unwrap() % GIB, 0, "{bar2}");
    assert_eq!(bar2["hva"].as_u64().unwrap() % GIB, 0, "{bar2}");
    assert_eq!(bar2["planned_page_size"], GIB, "{bar2}");
    assert_eq!(bar2["mapped"]["pages_1g"], 8, "{bar2}");
    assert_eq!(bar2["slot_updates"], 1, "{bar2}");
    assert_eq!(bar2["huge_ok"], true, "{bar2}");
    let bar0 = bar(report, 0);
    assert_eq!(bar0["slot_updates"], 0, "{bar0}");
    assert_eq!(faults, [18; 8], "host huge faults");
    bar2
}

/// `barge-lab: host ready after 8.2 s` from barge-lab's stderr.
pub fn host_ready_seconds(output: &Output) -> Option<f64> {
    String::from_utf8_lossy(&output.stderr)
        .lines()
        .find_map(|l| l.strip_prefix("barge-lab: host ready after "))
        .and_then(|rest| rest.trim_end_matches(" s").trim().parse().ok())
}
