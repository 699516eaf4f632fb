//! The passthrough checks that matter most, on every cell of {host kernel
//! 6.12, 7.3} x {VFIO backend legacy, iommufd}: one lab boot per cell
//! (`barge-lab run --host-kernel K [--iommufd] --ivshmem 8G,file=F --nvme
//! IMAGE`), in which barge runs with `--vfio-backend` set to the cell's
//! backend:
//!
//! 1. the 8 GiB ivshmem BAR2: KVM `pages_1g` = 8, its memslot set once, one
//!    host fault of order 18 per GiB over the whole run (a kprobe on
//!    vfio-pci's huge fault handler), data both ways through the BAR file
//!    (the BAR's last word included);
//! 2. the NVMe controller with MSI-X and with INTx (`pci=nomsi`): the
//!    guest's sha256 of the first 4 MiB is the image's, its marker block
//!    lands in the image;
//! 3. bad input: the NVMe unbound from vfio-pci, and on the legacy cells
//!    (hosts booted without the iommufd modules) `--vfio-backend iommufd`:
//!    a non-zero exit, one `barge: error:` line naming the problem, no
//!    panic;
//! 4. the report says which backend opened each VFIO device
//!    (`vfio_backend`), how guest RAM went into the IOMMU (`dma.method`) and
//!    how BAR2 was mapped for peer-to-peer DMA (`p2p`; Linux 6.12's iommufd
//!    cannot, and BAR2's `warning` says 6.19 can).
//!
//! Each cell prints what it saw with the prefix `cell HOST/BACKEND:`. A
//! cell the lab cannot boot (the 7.3 host has no iommufd modules until
//! `barge-lab setup` builds them) fails naming the set-up step.

use std::path::{Path, PathBuf};
use std::time::Instant;

use barge_tests::bar_passthrough::{
    check_data_path, check_eight_gib_bar2, host_fault_orders, host_ready_seconds,
    ivshmem_run_with_memory, COUNT_HOST_FAULTS, FROM_OUTSIDE, GIB, SAVE_HOST_FAULTS,
};
use barge_tests::harness::{lab_script_outcome, output_text as text, sparse_file, write_at};
use barge_tests::lab::SETUP_COMMAND;
use barge_tests::nvme::{check_nvme_run, expected_sha256, fresh_image, nvme_run, INTX, MSIX};

const BAR_SIZE: u64 = 8 * GIB;
/// Where the guest writes [`barge_tests::bar_passthrough::FROM_GUEST`]
/// (besides the BAR's last word).
const GUEST_WRITES_AT: u64 = 0x2000;
/// The lab's devices, in the order given: ivshmem0 then nvme0.
const IVSHMEM_BDF: &str = "0000:00:10.0";
const NVME_BDF: &str = "0000:00:11.0";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Legacy,
    Iommufd,
}

impl Backend {
    /// As `--vfio-backend` and the report's `vfio_backend` spell it.
    fn name(self) -> &'static str {
        match self {
            Backend::Legacy => "legacy",
            Backend::Iommufd => "iommufd",
        }
    }

    /// As barge's log line `vfio: opened BDF (Legacy, IOMMU group N)` does.
    fn logged(self) -> &'static str {
        match self {
            Backend::Legacy => "Legacy",
            Backend::Iommufd => "Iommufd",
        }
    }
}

/// `barge run` with a device that is bad input, for case NAME: stderr to
/// /out/NAME.err, status to /out/NAME.status.
fn bad_case(name: &str, options: &str) -> String {
    format!(
        "barge run --kernel /lab/guest/bzImage --initramfs /lab/guest/initramfs \
         --memory size=256M --serial none {options} 2> /out/{name}.err; \
         echo $? > /out/{name}.status\n"
    )
}

/// The lab host's whole command for a cell: the BAR run with host faults
/// counted, the two NVMe runs, then the bad input.
fn cell_script(host: &str, backend: Backend) -> String {
    let b = Some(backend.name());
    let mut script = String::from(
        "uname -r > /out/host-kernel\n\
         ls /dev/iommu /dev/vfio/devices > /out/devices.txt 2>&1\n",
    );
    script += COUNT_HOST_FAULTS;
    // memfd guest RAM: iommufd maps it with IOMMU_IOAS_MAP_FILE where the
    // kernel has it (6.13+).
    script += &ivshmem_run_with_memory(
        "bar",
        "size=512M,shared=on",
        "",
        b,
        GUEST_WRITES_AT,
        BAR_SIZE,
    );
    script += SAVE_HOST_FAULTS;
    script += &nvme_run(&MSIX, b);
    script += &nvme_run(&INTX, b);
    // A device that exists but is not bound to vfio-pci (its
    // driver_override keeps the kernel from binding it again).
    script += "echo $LAB_NVME0 > /sys/bus/pci/drivers/vfio-pci/unbind\n";
    script += &bad_case(
        "bad-unbound",
        &format!("--device vfio=$LAB_NVME0 --vfio-backend {}", backend.name()),
    );
    if backend == Backend::Iommufd && host == "6.12" {
        // iommufd cannot map a BAR for peer to peer before 6.19.
        script += &bad_case(
            "bad-p2p-on",
            "--device vfio=$LAB_IVSHMEM0,p2p=on --vfio-backend iommufd",
        );
    }
    if backend == Backend::Legacy {
        // No /dev/iommu on a host booted with the stock vfio modules.
        script += &bad_case(
            "bad-no-iommufd",
            "--device vfio=$LAB_IVSHMEM0 --vfio-backend iommufd",
        );
    }
    script
}

/// The one `barge: error:` line of bad case `name`, after checking the
/// run failed, did not panic and said each of `expected`.
fn bad_case_error(dir: &Path, name: &str, expected: &[&str]) -> String {
    let read =
        |ext: &str| std::fs::read_to_string(dir.join(format!("{name}.{ext}"))).unwrap_or_default();
    let (status, err) = (read("status"), read("err"));
    assert!(!status.trim().is_empty(), "{name} did not run");
    assert_ne!(status.trim(), "0", "{name}: {err}");
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
    lines[0].to_string()
}

/// Every VFIO device of `report` says it was opened with `backend`, and
/// guest RAM went into the IOMMU by a method of that backend.
fn check_backend_fields(report: &serde_json::Value, backend: Backend, run: &str) {
    let devices = report["devices"].as_array().cloned().unwrap_or_default();
    let vfio: Vec<_> = devices.iter().filter(|d| d["kind"] == "vfio").collect();
    assert!(!vfio.is_empty(), "{run}: no VFIO device in {report}");
    for device in vfio {
        assert_eq!(
            device["vfio_backend"],
            backend.name(),
            "{run}: {}",
            device["bdf"]
        );
    }
    let method = report["dma"]["method"].as_str().unwrap_or_default();
    let allowed: &[&str] = match backend {
        Backend::Legacy => &["type1-vaddr"],
        Backend::Iommufd => &["iommufd-vaddr", "iommufd-memfd"],
    };
    assert!(
        allowed.contains(&method),
        "{run}: dma.method {method:?} is not one of {allowed:?}: {}",
        report["dma"]
    );
}

/// BAR2's peer-to-peer mapping: by the container's type1 vaddr map on the
/// legacy backend, by a dma-buf of the BAR on 7.3's iommufd; 6.12's iommufd
/// cannot map a BAR (it cannot pin PFNMAP memory) and BAR2 warns so.
fn check_p2p(bar2: &serde_json::Value, host: &str, backend: Backend) {
    let p2p = &bar2["p2p"];
    let method = match (host, backend) {
        (_, Backend::Legacy) => Some("type1-vaddr"),
        ("7.3", Backend::Iommufd) => Some("iommufd-dmabuf"),
        (_, Backend::Iommufd) => None,
    };
    match method {
        Some(method) => {
            assert_eq!(p2p["method"], method, "{bar2}");
            assert_eq!(p2p["bytes"], BAR_SIZE, "{bar2}");
            assert!(p2p["ms"].is_f64(), "{bar2}");
        }
        None => {
            assert!(p2p.is_null(), "{bar2}");
            let warning = bar2["warning"].as_str().unwrap_or_default();
            assert!(warning.contains("6.19"), "{bar2}");
        }
    }
}

/// Removes a cell's BAR file and disk image when the cell ends, failed
/// or not.
struct Scratch(Vec<PathBuf>);

impl Drop for Scratch {
    fn drop(&mut self) {
        for file in &self.0 {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// One cell: one lab boot on host kernel `host` running every check with
/// the `backend`.
fn cell(host: &str, backend: Backend) {
    let prefix = format!("cell {host}/{}:", backend.name());
    let tag = format!("{}-{}", host.replace('.', "_"), backend.name());
    let backing = sparse_file(&format!("matrix-{tag}.shm"), BAR_SIZE);
    write_at(&backing, 0x1000, &FROM_OUTSIDE.to_le_bytes());
    let image = fresh_image(&format!("matrix-{tag}"));
    let _scratch = Scratch(vec![backing.clone(), image.clone()]);
    let expected_sum = expected_sha256();
    let ivshmem = format!("8G,file={}", backing.display());
    let mut args = vec![
        "--timeout",
        "900",
        "--host-kernel",
        host,
        "--ivshmem",
        &ivshmem,
        "--nvme",
        image.to_str().unwrap(),
    ];
    if backend == Backend::Iommufd {
        args.push("--iommufd");
    }
    let started = Instant::now();
    let (output, dir) = lab_script_outcome(
        env!("CARGO_BIN_EXE_barge-lab"),
        &args,
        &cell_script(host, backend),
    );
    let run_s = started.elapsed().as_secs_f64();
    let lab = text(&output);
    let Some(dir) = dir else {
        let setup = if lab.contains("iommufd modules") {
            format!(
                "the set-up step that builds the iommufd modules for host kernel {host} \
                 (`{SETUP_COMMAND}`) has not given this lab any"
            )
        } else {
            format!("the lab failed before running the command (`{SETUP_COMMAND}`?)")
        };
        panic!("{prefix} cannot run: {setup}:\n{lab}");
    };
    println!(
        "{prefix} lab boot and command {run_s:.1} s (host ready after {})",
        host_ready_seconds(&output).map_or("?".to_string(), |s| format!("{s:.1} s"))
    );
    let host_kernel = std::fs::read_to_string(dir.join("host-kernel")).unwrap_or_default();
    println!("{prefix} host kernel {}", host_kernel.trim());
    assert!(host_kernel.starts_with(host), "{host_kernel}\n{lab}");
    let devices = std::fs::read_to_string(dir.join("devices.txt")).unwrap_or_default();
    if backend == Backend::Iommufd {
        // /dev/iommu, and a cdev for each device bound to vfio-pci.
        assert!(devices.contains("/dev/iommu\n"), "{devices}");
        assert!(
            devices.contains("vfio0") && devices.contains("vfio1"),
            "{devices}"
        );
    } else {
        assert!(!devices.contains("/dev/iommu\n"), "{devices}");
    }

    // 1. the 8 GiB BAR2, data both ways.
    let (log, report) = check_data_path(&output, &dir, "bar", &backing, GUEST_WRITES_AT, BAR_SIZE);
    let opened = format!(
        "vfio: opened {IVSHMEM_BDF} ({}, IOMMU group",
        backend.logged()
    );
    assert!(log.contains(&opened), "{log}");
    let faults = host_fault_orders(&dir);
    let bar2 = check_eight_gib_bar2(&report, &faults);
    println!("{prefix} backend {} ({opened} ...)", backend.name());
    println!("{prefix} BAR2 {bar2}");
    println!("{prefix} p2p {}", bar2["p2p"]);
    println!("{prefix} dma {}", report["dma"]);
    println!(
        "{prefix} host faults {} of orders {faults:?}; guest read {FROM_OUTSIDE:#x} at \
         BAR2+0x1000, wrote {:#x} at +{GUEST_WRITES_AT:#x} and +{:#x}",
        faults.len(),
        barge_tests::bar_passthrough::FROM_GUEST,
        BAR_SIZE - 4
    );

    // 2. NVMe with MSI-X and with INTx.
    let mut nvme_reports = Vec::new();
    for mode in [MSIX, INTX] {
        let run = check_nvme_run(&dir, &mode, &image, &expected_sum, &lab);
        let opened = format!("vfio: opened {NVME_BDF} ({}, IOMMU group", backend.logged());
        assert!(run.log.contains(&opened), "{}: {}", mode.name, run.log);
        println!(
            "{prefix} nvme {}: guest SUM={} (expected {expected_sum}), marker at block {}; {}",
            mode.name,
            run.sum,
            mode.marker_block,
            run.interrupts.join(" | ")
        );
        nvme_reports.push((mode.name, run.report));
    }

    // 3. bad input.
    let unbound = bad_case_error(
        &dir,
        "bad-unbound",
        &[
            NVME_BDF,
            "not bound to any driver",
            "driver_override",
            "drivers_probe",
        ],
    );
    println!("{prefix} unbound device: {unbound}");
    if backend == Backend::Legacy {
        let no_iommufd = bad_case_error(
            &dir,
            "bad-no-iommufd",
            &[
                "cannot use iommufd for",
                IVSHMEM_BDF,
                "/dev/iommu does not exist",
                "--vfio-backend legacy",
            ],
        );
        println!("{prefix} --vfio-backend iommufd without /dev/iommu: {no_iommufd}");
    }
    if backend == Backend::Iommufd && host == "6.12" {
        let p2p_on = bad_case_error(
            &dir,
            "bad-p2p-on",
            &[
                "cannot map BAR 2 of",
                "Linux 6.19 or newer",
                "this host runs 6.12",
                "--vfio-backend legacy",
            ],
        );
        println!("{prefix} p2p=on with iommufd on 6.12: {p2p_on}");
    }

    // 4. the report's backend, DMA and P2P fields (last: they are new).
    check_backend_fields(&report, backend, "bar");
    // The BAR run's guest RAM is a memfd: 7.3's iommufd maps the file,
    // 6.12's (no IOMMU_IOAS_MAP_FILE) its address range.
    let memfd_method = match (host, backend) {
        (_, Backend::Legacy) => "type1-vaddr",
        ("7.3", Backend::Iommufd) => "iommufd-memfd",
        (_, Backend::Iommufd) => "iommufd-vaddr",
    };
    assert_eq!(report["dma"]["method"], memfd_method, "{}", report["dma"]);
    for (name, report) in &nvme_reports {
        check_backend_fields(report, backend, name);
    }
    check_p2p(&bar2, host, backend);

    println!("{prefix} passed in {run_s:.1} s");
}

#[test]
fn cell_host_6_12_legacy() {
    cell("6.12", Backend::Legacy);
}

#[test]
fn cell_host_6_12_iommufd() {
    cell("6.12", Backend::Iommufd);
}

#[test]
fn cell_host_7_3_legacy() {
    cell("7.3", Backend::Legacy);
}

#[test]
fn cell_host_7_3_iommufd() {
    cell("7.3", Backend::Iommufd);
}
