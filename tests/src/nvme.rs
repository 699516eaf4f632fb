//! DMA and interrupts of a passed-through NVMe controller, as the lab tests
//! check them: QEMU's NVMe controller over an image file the test writes,
//! passed through by `barge run` into a Linux guest whose nvme driver
//! probes, reads the first 4 MiB (their sha256 must match the image's) and
//! writes a marker block the test finds in the image after exit; with
//! MSI-X ([`MSIX`]) or with `pci=nomsi` ([`INTX`]: INTx through the
//! IOAPIC, resampled at EOI). Both write their marker past the checked
//! 4 MiB, so both can run on one image in one lab boot.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::harness::read_at;

pub const MIB: usize = 1 << 20;
/// The image's size.
pub const IMAGE_SIZE: usize = 16 * MIB;
/// The part of the image the guest checksums.
pub const CHECKED: usize = 4 * MIB;

/// A file of this process's scratch folder.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("barge-nvme-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("the scratch folder is made");
    dir.join(name)
}

/// The image: a deterministic pattern that differs in every 512-byte block.
pub fn image_bytes() -> Vec<u8> {
    (0..IMAGE_SIZE)
        .map(|i| (i.wrapping_mul(7) + (i >> 9)) as u8)
        .collect()
}

/// A fresh image `NAME.img` in the scratch folder.
pub fn fresh_image(name: &str) -> PathBuf {
    let image = scratch(&format!("{name}.img"));
    std::fs::write(&image, image_bytes()).expect("the image is written");
    image
}

/// sha256 of the image's first [`CHECKED`] bytes as `sha256sum` prints it
/// (the host's coreutils).
pub fn expected_sha256() -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum runs");
    child
        .stdin
        .take()
        .expect("sha256sum's stdin")
        .write_all(&image_bytes()[..CHECKED])
        .expect("sha256sum reads the data");
    let output = child.wait_with_output().expect("sha256sum finishes");
    assert!(output.status.success(), "sha256sum failed");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// How the guest's nvme driver gets its interrupts in one run.
#[derive(Debug, Clone, Copy)]
pub struct NvmeMode {
    /// The run's name (its files under /out).
    pub name: &'static str,
    /// Added to the guest's kernel command line.
    pub guest_options: &'static str,
    /// What the nvme lines of the guest's /proc/interrupts must contain.
    pub interrupt_kind: &'static str,
    /// The 512-byte block the guest writes its marker to (past [`CHECKED`]).
    pub marker_block: u64,
}

impl NvmeMode {
    /// What the guest writes into [`NvmeMode::marker_block`].
    pub fn marker(&self) -> String {
        format!("barge-wrote-{}\n", self.name)
    }
}

pub const MSIX: NvmeMode = NvmeMode {
    name: "msix",
    guest_options: "",
    interrupt_kind: "PCI-MSIX",
    marker_block: (CHECKED / 512) as u64 + 100,
};

pub const INTX: NvmeMode = NvmeMode {
    name: "intx",
    guest_options: "pci=nomsi",
    interrupt_kind: "IO-APIC",
    marker_block: (CHECKED / 512) as u64 + 200,
};

/// INTx on aarch64: the GICv3's SPI (the device tree's `interrupt-map`).
pub const INTX_GIC: NvmeMode = NvmeMode {
    name: "intx",
    guest_options: "pci=nomsi",
    interrupt_kind: "GICv3",
    marker_block: (CHECKED / 512) as u64 + 200,
};

/// `barge run` `mode.name` in the lab host with `$LAB_NVME0` passed
/// through (`--vfio-backend backend` when given): /out/NAME.guest,
/// NAME.json, NAME.log (barge's stderr), NAME.status.
pub fn nvme_run(mode: &NvmeMode, backend: Option<&str>) -> String {
    nvme_run_booting(mode, backend, "/lab/guest/bzImage")
}

/// [`nvme_run`] booting `kernel` (the arm64 lab's `/lab/guest/Image`).
pub fn nvme_run_booting(mode: &NvmeMode, backend: Option<&str>, kernel: &str) -> String {
    let backend = backend
        .map(|b| format!(" --vfio-backend {b}"))
        .unwrap_or_default();
    format!(
        "RUST_LOG=warn,vfio_ioctls=error,devices::vfio::host=info \
         barge run --kernel {kernel} --initramfs /lab/guest/initramfs \
         --memory size=512M --device vfio=$LAB_NVME0{backend} \
         --serial file=/out/{name}.guest --report /out/{name}.json \
         --cmdline 'console=ttyS0 panic=-1 {options} -- \
         grep nvme0q /proc/interrupts; \
         echo SUM=$(dd if=/dev/nvme0n1 bs=1M count=4 2>/dev/null | sha256sum); \
         echo {marker} | dd of=/dev/nvme0n1 bs=512 seek={block} conv=fsync 2>/dev/null; \
         echo WROTE=$?' 2> /out/{name}.log\n\
         echo $? > /out/{name}.status\n",
        name = mode.name,
        options = mode.guest_options,
        marker = mode.marker().trim_end(),
        block = mode.marker_block,
    )
}

/// What [`check_nvme_run`] saw.
#[derive(Debug)]
pub struct NvmeRun {
    /// barge's stderr.
    pub log: String,
    /// The nvme lines of the guest's /proc/interrupts.
    pub interrupts: Vec<String>,
    /// The guest's `sha256sum` of the first 4 MiB.
    pub sum: String,
    pub report: serde_json::Value,
}

/// Checks run `mode.name` in `dir`: the driver probed, took interrupts of
/// the mode's kind, read the image's first 4 MiB right (`expected`, from
/// [`expected_sha256`]) and wrote its marker into `image`. `context` (the
/// lab's output) goes into failure messages.
pub fn check_nvme_run(
    dir: &Path,
    mode: &NvmeMode,
    image: &Path,
    expected: &str,
    context: &str,
) -> NvmeRun {
    let read = |ext: &str| {
        std::fs::read_to_string(dir.join(format!("{}.{ext}", mode.name))).unwrap_or_default()
    };
    let guest = read("guest");
    let log = read("log");
    let name = mode.name;
    let context = format!("{name}: guest log:\n{guest}\nbarge:\n{log}\nlab:\n{context}");
    assert_eq!(read("status").trim(), "0", "{context}");
    assert!(!log.contains("panicked"), "{context}");
    assert!(
        guest.contains("nvme nvme0: pci function"),
        "nvme did not probe\n{context}"
    );
    let interrupts: Vec<String> = guest
        .lines()
        .filter(|l| l.contains("nvme0q") && !l.contains("ommand line"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    assert!(
        interrupts.iter().any(|l| l.contains(mode.interrupt_kind)),
        "no {} interrupt for nvme\n{context}",
        mode.interrupt_kind
    );
    let sum = guest
        .lines()
        .find_map(|l| l.trim().strip_prefix("SUM="))
        .unwrap_or_else(|| panic!("no checksum line\n{context}"))
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    assert_eq!(sum, expected, "{context}");
    assert!(guest.contains("WROTE=0"), "{context}");
    let marker = mode.marker();
    assert_eq!(
        read_at(image, mode.marker_block * 512, marker.len()),
        marker.as_bytes(),
        "{context}"
    );
    let report = serde_json::from_str(&read("json"))
        .unwrap_or_else(|e| panic!("{name}.json: {e}\n{context}"));
    NvmeRun {
        log,
        interrupts,
        sum,
        report,
    }
}
