//! barge's iommufd backend, in the lab: `barge-lab run --iommufd` boots the
//! host with the vfio modules `setup` rebuilt with CONFIG_IOMMUFD and the
//! device cdev, so /dev/iommu and /dev/vfio/devices/vfio0 exist. barge opens
//! the ivshmem device through its cdev, binds it to an iommufd and attaches
//! it to one IOAS, maps guest RAM there for DMA and passes BAR2 (a file on
//! the outer machine) through to a Linux guest with 1 GiB pages; the guest
//! reads what the test wrote into the file and writes a marker the test
//! reads back. `--vfio-backend auto` picks iommufd there, the legacy
//! container still opens the same device on the rebuilt modules, and a
//! device another barge holds is "already in use" on either path.
//!
//! The 8 GiB check runs once per host kernel: on the main one (6.12) and on
//! trixie-backports' 7.3, whose rebuilt vfio-pci-core must also keep its
//! dma-buf export (CONFIG_VFIO_PCI_DMABUF, which iommufd reaches with
//! `symbol_get`).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Instant;

use barge_tests::bar_passthrough::{bar, host_fault_orders};
use barge_tests::harness::{lab_script, output_text as text, read_at, sparse_file, write_at};

const GIB: u64 = 1 << 30;
/// What the test writes into the BAR file for the guest to read.
const FROM_OUTSIDE: u32 = 0xcafe_f00d;
/// What the guest writes into the BAR.
const FROM_GUEST: u32 = 0x600d_f00d;

/// Runs `script` in the lab host (`host_kernel`, else the main one) booted
/// with the iommufd modules and one ivshmem device over `backing`.
fn in_iommufd_lab(
    host_kernel: Option<&str>,
    size: &str,
    backing: &Path,
    script: &str,
) -> (Output, PathBuf) {
    let started = Instant::now();
    let ivshmem = format!("{size},file={}", backing.display());
    let mut args = vec!["--timeout", "600", "--iommufd", "--ivshmem", &ivshmem];
    if let Some(kernel) = host_kernel {
        args.extend(["--host-kernel", kernel]);
    }
    let result = lab_script(env!("CARGO_BIN_EXE_barge-lab"), &args, script);
    println!(
        "lab boot and command: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    result
}

/// A kprobe on vfio-pci's huge fault handler counts every host fault on
/// the BAR, with its order.
const COUNT_HOST_FAULTS: &str = "cd /sys/kernel/tracing && \
    echo 'p:bargehf vfio_pci_mmap_huge_fault order=%si:u32' > kprobe_events && \
    echo 1 > events/kprobes/bargehf/enable && cd /out\n";

/// `barge run` with `--vfio-backend backend`: the guest reads the word at
/// BAR2 + 0x1000 and writes [`FROM_GUEST`] at BAR2 + `offset` and at the
/// BAR's last word. Its log (vfio at info: the backend it opened with) goes
/// to /out/NAME.log, its report to /out/NAME.json, the guest console to
/// /out/NAME.guest, its status to /out/NAME.status.
fn barge_run(name: &str, backend: &str, offset: u64, size: u64) -> String {
    let last = size - 4;
    format!(
        "RUST_LOG=warn,vfio_ioctls=error,devices::vfio::host=info \
         barge run --kernel /lab/guest/bzImage --initramfs /lab/guest/initramfs \
         --memory size=512M --device vfio=$LAB_IVSHMEM0 --vfio-backend {backend} \
         --serial file=/out/{name}.guest --report /out/{name}.json \
         --cmdline 'console=ttyS0 panic=-1 -- a=$(pcibar 1af4:1110 2);echo BAR2=$a;\
         echo READ=$(devmem $((a+0x1000)) 32);devmem $((a+{offset:#x})) 32 {FROM_GUEST:#x};\
         devmem $((a+{last})) 32 {FROM_GUEST:#x}' 2> /out/{name}.log\n\
         echo $? > /out/{name}.status\n"
    )
}

/// What one `barge_run` left in `dir`: its log and its report, after
/// checking it ran to the end and the guest read the word from outside.
fn checked_run(output: &Output, dir: &Path, name: &str) -> (String, serde_json::Value) {
    let read = |ext: &str| std::fs::read_to_string(dir.join(format!("{name}.{ext}")));
    let guest = read("guest").unwrap_or_default();
    let log = read("log").unwrap_or_default();
    println!("--- {name}: barge's log\n{log}--- {name}: guest console (tail)");
    let lines: Vec<&str> = guest.lines().collect();
    println!("{}", lines[lines.len().saturating_sub(4)..].join("\n"));
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
    (log, report)
}

#[test]
fn iommufd_backend_passes_an_8g_bar_through_with_1g_pages_and_the_data_path_works() {
    passes_an_8g_bar_through(None, "ivshmem-iommufd.shm");
}

#[test]
fn iommufd_backend_does_the_same_on_the_7_3_host_with_vfio_pci_dma_buf_export() {
    let dir = passes_an_8g_bar_through(Some("7.3"), "ivshmem-iommufd-7.3.shm");
    let uname = std::fs::read_to_string(dir.join("uname.txt")).unwrap_or_default();
    assert!(uname.starts_with("7.3."), "{uname}");
    // The rebuilt vfio-pci-core exports its BARs as dma-bufs
    // (VFIO_DEVICE_FEATURE_DMA_BUF) and hands iommufd their physical ranges;
    // iommufd maps such a dma-buf (IOMMU_IOAS_MAP_FILE).
    let dma_buf = std::fs::read_to_string(dir.join("dma-buf.txt")).unwrap_or_default();
    println!("--- dma-buf symbols in the 7.3 host\n{dma_buf}");
    for symbol in [
        "vfio_pci_core_feature_dma_buf\t[vfio_pci_core]",
        "vfio_pci_dma_buf_iommufd_map\t[vfio_pci_core]",
        "iopt_alloc_dmabuf_pages\t[iommufd]",
    ] {
        assert!(dma_buf.contains(symbol), "{symbol}:\n{dma_buf}");
    }
}

/// The 8 GiB BAR through the cdev and one IOAS on `host_kernel` (else the
/// main one); the run's folder.
fn passes_an_8g_bar_through(host_kernel: Option<&str>, backing_name: &str) -> PathBuf {
    let size = 8 * GIB;
    let backing = sparse_file(backing_name, size);
    write_at(&backing, 0x1000, &FROM_OUTSIDE.to_le_bytes());
    let script = format!(
        "ls /dev/iommu /dev/vfio/devices > /out/devices.txt\n\
         uname -r > /out/uname.txt\n\
         lsmod > /out/lsmod.txt\n\
         grep -E 'dma_?buf' /proc/kallsyms | grep -E '\\[(vfio_pci_core|iommufd)\\]$' \
         > /out/dma-buf.txt\n\
         {COUNT_HOST_FAULTS}{}\
         grep bargehf /sys/kernel/tracing/trace > /out/faults.txt\n",
        barge_run("iommufd", "iommufd", 0x2000, size)
    );
    let (output, dir) = in_iommufd_lab(host_kernel, "8G", &backing, &script);
    let devices = std::fs::read_to_string(dir.join("devices.txt")).unwrap_or_default();
    println!("--- /dev/iommu and /dev/vfio/devices in the lab host\n{devices}");
    let lsmod = std::fs::read_to_string(dir.join("lsmod.txt")).unwrap_or_default();
    println!("--- lsmod\n{lsmod}");
    assert!(
        devices.contains("/dev/iommu"),
        "{devices}\n{}",
        text(&output)
    );
    assert!(devices.contains("vfio0"), "{devices}");

    let (log, report) = checked_run(&output, &dir, "iommufd");
    assert!(
        log.contains("vfio: opened 0000:00:10.0 (Iommufd, IOMMU group"),
        "{log}"
    );
    assert_eq!(read_at(&backing, 0x2000, 4), FROM_GUEST.to_le_bytes());
    assert_eq!(read_at(&backing, size - 4, 4), FROM_GUEST.to_le_bytes());
    let bar2 = bar(&report, 2);
    println!("--- BAR2 in the report\n{bar2}\n--- DMA\n{}", report["dma"]);
    assert_eq!(bar2["size"], size, "{bar2}");
    assert_eq!(bar2["planned_page_size"], GIB, "{bar2}");
    assert_eq!(bar2["mapped"]["pages_1g"], 8, "{bar2}");
    assert_eq!(bar2["slot_updates"], 1, "{bar2}");
    assert_eq!(bar2["huge_ok"], true, "{bar2}");
    // Guest RAM went into the IOAS (IOMMU_IOAS_MAP) before the guest ran.
    assert_eq!(report["dma"]["bytes"], 512u64 << 20, "{report}");
    // The BAR was faulted in once, a 1 GiB page per GiB.
    assert_eq!(host_fault_orders(&dir), vec![18; 8], "host huge faults");
    let _ = std::fs::remove_file(&backing);
    dir
}

const SMALL_GUEST: &str = "--kernel /lab/guest/bzImage --initramfs /lab/guest/initramfs \
                           --memory size=256M";

#[test]
fn auto_picks_iommufd_legacy_still_opens_and_a_held_device_is_in_use_either_way() {
    let size = 2 * GIB;
    let backing = sparse_file("ivshmem-iommufd-auto.shm", size);
    write_at(&backing, 0x1000, &FROM_OUTSIDE.to_le_bytes());
    // A first barge holds the device through its cdev while a second one
    // tries the cdev and a third the group; SIGTERM then stops the first
    // (barge stops its VM and closes the device), and auto and legacy runs
    // follow.
    let script = format!(
        "barge run {SMALL_GUEST} --serial file=/out/holder.guest --vfio-backend iommufd \
         --device vfio=$LAB_IVSHMEM0 --cmdline 'console=ttyS0 -- sleep 600' \
         2> /out/holder.log &\n\
         holder=$!\n\
         sleep 5\n\
         for backend in iommufd legacy; do \
         barge run {SMALL_GUEST} --serial none --vfio-backend $backend \
         --device vfio=$LAB_IVSHMEM0 2> /out/busy-$backend.err; \
         echo $? > /out/busy-$backend.status; done\n\
         kill $holder; wait\n\
         {}{}",
        barge_run("auto", "auto", 0x3000, size),
        barge_run("legacy", "legacy", 0x4000, size)
    );
    let (output, dir) = in_iommufd_lab(None, "2G", &backing, &script);
    for backend in ["iommufd", "legacy"] {
        let read = |ext: &str| {
            std::fs::read_to_string(dir.join(format!("busy-{backend}.{ext}"))).unwrap_or_default()
        };
        let err = read("err");
        println!("--- a second barge with --vfio-backend {backend}\n{err}");
        assert_ne!(read("status").trim(), "0", "{err}\n{}", text(&output));
        assert!(!err.contains("panicked"), "{err}");
        assert!(
            err.contains("barge: error: PCI device 0000:00:10.0 is already in use"),
            "{err}"
        );
    }
    let held = std::fs::read_to_string(dir.join("busy-iommufd.err")).unwrap_or_default();
    assert!(held.contains("fuser -v /dev/vfio/devices/vfio0"), "{held}");
    for (name, backend, offset) in [("auto", "Iommufd", 0x3000), ("legacy", "Legacy", 0x4000)] {
        let (log, report) = checked_run(&output, &dir, name);
        assert!(
            log.contains(&format!(
                "vfio: opened 0000:00:10.0 ({backend}, IOMMU group"
            )),
            "{name}: {log}"
        );
        assert_eq!(
            read_at(&backing, offset, 4),
            FROM_GUEST.to_le_bytes(),
            "{name}"
        );
        let bar2 = bar(&report, 2);
        assert_eq!(bar2["mapped"]["pages_1g"], 2, "{name}: {bar2}");
        assert_eq!(report["dma"]["bytes"], 512u64 << 20, "{name}: {report}");
    }
    let _ = std::fs::remove_file(&backing);
}
