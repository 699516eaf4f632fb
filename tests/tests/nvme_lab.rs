//! DMA and interrupts of a passed-through device, in the lab: an NVMe
//! controller (QEMU's, backed by an image file the test writes) passed
//! through by barge into a Linux guest. The guest's nvme driver probes,
//! reads the first 4 MiB (their sha256 must match the image's) and writes a
//! marker block the test finds in the image after exit. Once with MSI-X,
//! once with `pci=nomsi` (INTx through the IOAPIC, resampled at EOI).

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::process::{Command, Output};

use barge_tests::harness::{lab_script, output_text as text};
use base64::Engine;

const MIB: usize = 1 << 20;
const IMAGE_SIZE: usize = 16 * MIB;
const CHECKED: usize = 4 * MIB;
const MARKER_BLOCK: u64 = 100;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("barge-nvme-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// The image: a deterministic pattern that differs in every 512-byte block.
fn image_bytes() -> Vec<u8> {
    (0..IMAGE_SIZE)
        .map(|i| (i.wrapping_mul(7) + (i >> 9)) as u8)
        .collect()
}

/// sha256 of `data` as `sha256sum` prints it (the host's coreutils).
fn sha256_hex(data: &[u8], name: &str) -> String {
    let path = scratch(name);
    std::fs::write(&path, data).unwrap();
    let output = Command::new("sha256sum").arg(&path).output().unwrap();
    assert!(output.status.success(), "sha256sum failed");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Runs `script` in the lab with an NVMe controller over a fresh copy of
/// the image (`NAME.img`); returns the lab's output, the results folder and
/// the image.
fn run_script(name: &str, script: &str) -> (Output, PathBuf, PathBuf) {
    let image = scratch(&format!("{name}.img"));
    std::fs::write(&image, image_bytes()).unwrap();
    let (output, dir) = lab_script(
        env!("CARGO_BIN_EXE_barge-lab"),
        &["--timeout", "300", "--nvme", image.to_str().unwrap()],
        script,
    );
    (output, dir, image)
}

/// Boots the guest with the NVMe controller passed through; returns the
/// guest's console log, barge's and the lab's output, and the image.
fn run(mode: &str, guest_options: &str) -> (String, String, PathBuf) {
    let (output, dir, image) = run_script(
        mode,
        &format!(
            "barge run --kernel /lab/guest/bzImage --initramfs /lab/guest/initramfs \
             --memory size=512M --device vfio=$LAB_NVME0 \
             --serial file=/out/guest.log --report /out/report.json \
             --cmdline 'console=ttyS0 panic=-1 {guest_options} -- \
             grep nvme0q /proc/interrupts; \
             echo SUM=$(dd if=/dev/nvme0n1 bs=1M count=4 2>/dev/null | sha256sum); \
             echo barge-wrote | dd of=/dev/nvme0n1 bs=512 seek={MARKER_BLOCK} conv=fsync 2>/dev/null; \
             echo WROTE=$?' 2>&1 | tail -5\n"
        ),
    );
    let guest = std::fs::read_to_string(dir.join("guest.log")).unwrap_or_default();
    (guest, text(&output), image)
}

fn check(mode: &str, guest_options: &str, interrupt_kind: &str) {
    let expected = sha256_hex(&image_bytes()[..CHECKED], &format!("{mode}-first4m"));
    let (guest, lab, image) = run(mode, guest_options);
    let context = format!("guest log:\n{guest}\nlab:\n{lab}");
    assert!(
        guest.contains("nvme nvme0: pci function"),
        "nvme did not probe\n{context}"
    );
    let interrupts: Vec<&str> = guest
        .lines()
        .filter(|l| l.contains("nvme0q") && !l.contains("ommand line"))
        .collect();
    assert!(
        interrupts.iter().any(|l| l.contains(interrupt_kind)),
        "no {interrupt_kind} interrupt for nvme\n{context}"
    );
    let sum = guest
        .lines()
        .find_map(|l| l.trim().strip_prefix("SUM="))
        .unwrap_or_else(|| panic!("no checksum line\n{context}"));
    assert_eq!(
        sum.split_whitespace().next(),
        Some(expected.as_str()),
        "{context}"
    );
    assert!(guest.contains("WROTE=0"), "{context}");
    let mut block = [0u8; 12];
    let mut file = std::fs::File::open(&image).unwrap();
    file.seek(SeekFrom::Start(MARKER_BLOCK * 512)).unwrap();
    file.read_exact(&mut block).unwrap();
    assert_eq!(&block, b"barge-wrote\n", "{context}");
    println!("{mode}: {}", interrupts.join(" | "));
    println!("{mode}: guest SUM={sum} (expected {expected})");
}

#[test]
fn nvme_reads_and_writes_with_msix() {
    check("msix", "", "PCI-MSIX");
}

#[test]
fn nvme_reads_and_writes_with_intx() {
    check("intx", "pci=nomsi", "IO-APIC");
}

/// What the guest does to its passed-through NVMe controller: starts a read,
/// clears bus mastering in the middle of it, then programs vector 0 of the
/// MSI-X table with an absurd address and data and writes the table with
/// odd sizes and offsets. None of it may crash barge.
const ABUSE: &str = "d=/sys/bus/pci/devices/0000:00:01.0;c=$d/config;a=$(pcibar 1b36:0010 0);\
dd if=/dev/nvme0n1 of=/dev/null bs=64k count=64 2>/dev/null & \
printf '\\002\\000' | dd of=$c bs=1 seek=4 conv=notrunc 2>/dev/null;echo BUSMASTER-OFF;\
p=$(od -An -tu1 -j52 -N1 $c);while [ $(od -An -tu1 -j$p -N1 $c) != 17 ];do p=$(od -An -tu1 -j$((p+1)) -N1 $c);done;\
t=$(od -An -tu4 -j$((p+4)) -N4 $c);o=$((a+(t&~7)));echo MSIX-TABLE=$o;\
devmem $o 32 0xdeadbeef;devmem $((o+4)) 32 0xffffffff;devmem $((o+8)) 32 0xffffffff;devmem $((o+12)) 32 0;\
devmem $((o+1)) 8 0xff;devmem $((o+2)) 16 0xffff;devmem $((o+6)) 16 0x1234;devmem $((o+16)) 64 0xffffffffffffffff;\
devmem $((o+4093)) 8 1;devmem $((o+3)) 32;echo ABUSED";

#[test]
fn a_guest_abusing_its_device_cannot_crash_barge() {
    let (output, dir, _image) = run_script(
        "abuse",
        &format!(
            "barge run --kernel /lab/guest/bzImage --initramfs /lab/guest/initramfs \
             --memory size=512M --device vfio=$LAB_NVME0 \
             --serial file=/out/guest.log --report /out/report.json \
             --cmdline 'console=ttyS0 panic=-1 -- echo {} | base64 -d | sh' 2> /out/barge.err\n\
             echo $? > /out/status\n",
            // One word: the kernel passes init at most 32 arguments.
            base64::engine::general_purpose::STANDARD.encode(ABUSE)
        ),
    );
    let guest = std::fs::read_to_string(dir.join("guest.log")).unwrap_or_default();
    let barge = std::fs::read_to_string(dir.join("barge.err")).unwrap_or_default();
    let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
    let context = format!("guest:\n{guest}\nbarge:\n{barge}\nlab:\n{}", text(&output));
    assert!(guest.contains("BUSMASTER-OFF"), "{context}");
    assert!(guest.contains("MSIX-TABLE="), "{context}");
    assert!(guest.contains("ABUSED"), "{context}");
    assert!(!barge.contains("panicked"), "{context}");
    assert_eq!(
        status.trim(),
        "0",
        "barge ends as the guest powers off\n{context}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["exit"]["reason"], "poweroff", "{report}");
}
