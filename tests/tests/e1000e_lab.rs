//! An e1000e NIC (QEMU's, with no network behind it) passed through by
//! barge into a Linux guest, in the lab. The cloud kernel has no e1000e
//! driver, so the guest boots Debian's generic kernel of the same version
//! (`/lab/guest/generic/`), whose initramfs loads e1000e.ko. The driver must
//! probe, the interface come up, and its MSI-X vectors take interrupts (the
//! link-up is signalled by one).

use std::path::PathBuf;

use barge_tests::harness::{lab_run, output_text as text, results_dir};
use barge_tests::lab::SETUP_COMMAND;

/// What the guest runs once e1000e is loaded.
const GUEST_COMMAND: &str = "dmesg | grep -i e1000e; ip link set eth0 up; echo IPUP=$?; \
    sleep 3; echo LINK=$(ip link show eth0); \
    echo OPERSTATE=$(cat /sys/class/net/eth0/operstate); grep eth0 /proc/interrupts";

fn script_file() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("barge-e1000e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("e1000e.sh");
    std::fs::write(
        &script,
        format!(
            "[ -e /lab/guest/generic/bzImage ] || {{ echo 'no generic guest kernel in the lab: \
             run `{SETUP_COMMAND}` again'; exit 3; }}\n\
             barge run --kernel /lab/guest/generic/bzImage \
             --initramfs /lab/guest/generic/initramfs \
             --memory size=512M --device vfio=$LAB_E1000E0 \
             --serial file=/out/guest.log --report /out/report.json \
             --cmdline 'console=ttyS0 panic=-1 -- {GUEST_COMMAND}' 2>&1 | tail -20\n"
        ),
    )
    .unwrap();
    script
}

/// Lines the guest's command printed: `PREFIX...` at the start of a line,
/// so the kernel's echo of its command line does not count.
fn marked<'a>(guest: &'a str, prefix: &str) -> Option<&'a str> {
    guest
        .lines()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(prefix))
}

#[test]
fn e1000e_probes_and_brings_its_link_up() {
    let output = lab_run(
        env!("CARGO_BIN_EXE_barge-lab"),
        &[
            "--timeout",
            "300",
            "--e1000e",
            "--script",
            script_file().to_str().unwrap(),
        ],
    );
    let lab = text(&output);
    assert!(output.status.success(), "{lab}");
    let dir = results_dir(&output);
    let guest = std::fs::read_to_string(dir.join("guest.log")).unwrap_or_default();
    let context = format!("guest log:\n{guest}\nlab:\n{lab}");

    assert!(
        guest.lines().any(|l| l.trim_end() == "GUEST-INSMOD e1000e"),
        "the guest did not load e1000e.ko\n{context}"
    );
    let probe = guest
        .lines()
        .find(|l| l.contains("e1000e ") && l.contains("Intel(R) PRO/1000 Network Connection"))
        .unwrap_or_else(|| panic!("e1000e did not probe\n{context}"));
    assert_eq!(marked(&guest, "IPUP="), Some("0"), "{context}");
    let link = marked(&guest, "LINK=").unwrap_or_else(|| panic!("no link line\n{context}"));
    let flags = link
        .split_once('<')
        .and_then(|(_, rest)| rest.split_once('>'))
        .map(|(flags, _)| flags.split(',').collect::<Vec<_>>())
        .unwrap_or_default();
    assert!(flags.contains(&"UP"), "eth0 is not UP: {link}\n{context}");
    assert!(
        flags.contains(&"LOWER_UP"),
        "eth0 has no carrier: {link}\n{context}"
    );
    assert_eq!(marked(&guest, "OPERSTATE="), Some("up"), "{context}");
    // The link-up reaches the driver as an interrupt on its MSI-X vectors.
    let interrupts: Vec<&str> = guest
        .lines()
        .filter(|l| l.contains("PCI-MSIX") && l.contains("eth0"))
        .collect();
    let taken: u64 = interrupts
        .iter()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    assert!(taken > 0, "no MSI-X interrupts counted for eth0\n{context}");
    println!("probe: {}", probe.trim());
    println!("link: {link}");
    println!("interrupts: {}", interrupts.join(" | "));
}
