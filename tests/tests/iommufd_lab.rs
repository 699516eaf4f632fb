//! barge's iommufd backend, in the lab: `barge-lab run --iommufd` boots the
//! host with the vfio modules `setup` rebuilt with CONFIG_IOMMUFD and the
//! device cdev, so /dev/iommu and /dev/vfio/devices/vfio0 exist. The
//! passthrough checks on it (the 8 GiB BAR2 with 1 GiB pages through the
//! cdev and one IOAS, NVMe DMA and interrupts, bad input) are
//! `lab_matrix.rs`'s iommufd cells; here `--vfio-backend auto` picks
//! iommufd, the legacy container still opens the same device on the
//! rebuilt modules, and a device another barge holds is "already in use"
//! on either path.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Instant;

use barge_tests::bar_passthrough::{bar, checked_run, ivshmem_run, FROM_GUEST, FROM_OUTSIDE, GIB};
use barge_tests::harness::{lab_script, output_text as text, read_at, sparse_file, write_at};

/// Runs `script` in the lab host booted with the iommufd modules and one
/// ivshmem device over `backing`.
fn in_iommufd_lab(size: &str, backing: &Path, script: &str) -> (Output, PathBuf) {
    let started = Instant::now();
    let ivshmem = format!("{size},file={}", backing.display());
    let result = lab_script(
        env!("CARGO_BIN_EXE_barge-lab"),
        &["--timeout", "600", "--iommufd", "--ivshmem", &ivshmem],
        script,
    );
    println!(
        "lab boot and command: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    result
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
        ivshmem_run("auto", "", Some("auto"), 0x3000, size),
        ivshmem_run("legacy", "", Some("legacy"), 0x4000, size)
    );
    let (output, dir) = in_iommufd_lab("2G", &backing, &script);
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
        let (log, _, report) = checked_run(&output, &dir, name);
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
