//! A guest abusing its passed-through NVMe controller, in the lab: QEMU's
//! NVMe controller over an image file, passed through by barge into a Linux
//! guest that clears bus mastering mid-read and scribbles over the MSI-X
//! table. Its DMA and interrupts (the guest's checksum of what it read and
//! the marker it wrote, with MSI-X and with INTx) are checked on every host
//! kernel and VFIO backend by `lab_matrix.rs` (`barge_tests::nvme`).

use barge_tests::harness::{lab_script, output_text as text};
use barge_tests::nvme::fresh_image;
use base64::Engine;

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
    let image = fresh_image("abuse");
    let (output, dir) = lab_script(
        env!("CARGO_BIN_EXE_barge-lab"),
        &["--timeout", "300", "--nvme", image.to_str().unwrap()],
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
