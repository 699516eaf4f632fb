//! The huge pfnmap matrix (issue 14) on both lab host kernels:
//! `barge-pfnmap` maps BAR2 of an 8 GiB and a 128 MiB ivshmem device at an
//! address aligned to min(BAR size, 1 GiB) and runs each case on each
//! device (see its module docs): the first touch's host fault orders, the
//! same after mprotect(PROT_READ) and back, a fork whose child reads the
//! BAR, and KVM's page counts for a memslot on the BAR after pre-fault,
//! mprotect and fork. A kprobe on vfio-pci's huge fault handler counts the
//! host faults; one lab boot per host kernel runs all eight cases.
//!
//! What each case shows is in barge-pfnmap's module docs; in short, on both
//! hosts: one fault per huge page (order 18 for the 8 GiB BAR, 9 for the
//! 128 MiB one), none again after mprotect and back or after a fork (the
//! host entries are changed in place and copied), and KVM's 8 x 1G or
//! 64 x 2M after every pre-fault, dropped by mprotect and mapped again at
//! the same size. Every line is printed as `pfnmap HOST DEVICE: ...`; the
//! two tests (one boot each) took 47 to 75 s side by side on 2 shared cores.

use barge_tests::harness::{lab_script, output_text as text};

const CASES: [&str; 4] = ["fault", "mprotect", "fork", "kvm"];

/// Of the two devices: name, `$LAB_IVSHMEMn`, the host faults of the first
/// touch (ORDERxCOUNT), KVM's pages after a pre-fault, the reads per pass
/// (one per 2 MiB) and the faults of two words at either end.
type Device = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    u32,
    &'static str,
);
const DEVICES: [Device; 2] = [
    (
        "8G",
        "$LAB_IVSHMEM0",
        "18x8",
        "1Gx8 2Mx0 4Kx0",
        4096,
        "18x2",
    ),
    (
        "128M",
        "$LAB_IVSHMEM1",
        "9x64",
        "1Gx0 2Mx64 4Kx0",
        64,
        "9x2",
    ),
];

/// Runs every case on every device on `host`; returns (device, case, line)
/// with the line as the program printed it and its exit status appended.
fn matrix(host: &str) -> Vec<(&'static str, &'static str, String)> {
    let mut script = String::from(
        "cd /sys/kernel/tracing && \
         echo 'p:bargehf vfio_pci_mmap_huge_fault order=%si:u32' > kprobe_events && \
         echo 1 > events/kprobes/bargehf/enable && cd /out\n",
    );
    for (name, bdf, ..) in DEVICES {
        for case in CASES {
            script.push_str(&format!(
                "barge-pfnmap --device {bdf} --case {case} > /out/{name}-{case}.txt 2>&1; \
                 echo \"status $?\" >> /out/{name}-{case}.txt\n"
            ));
        }
    }
    let (output, dir) = lab_script(
        env!("CARGO_BIN_EXE_barge-lab"),
        &[
            "--host-kernel",
            host,
            "--ivshmem",
            "8G",
            "--ivshmem",
            "128M",
        ],
        &script,
    );
    assert!(output.status.success(), "{}", text(&output));
    let mut lines = Vec::new();
    for (name, ..) in DEVICES {
        for case in CASES {
            let out = std::fs::read_to_string(dir.join(format!("{name}-{case}.txt")))
                .unwrap_or_else(|e| panic!("no output of {name} {case}: {e}\n{}", text(&output)));
            let line = out.lines().collect::<Vec<_>>().join(" | ");
            println!("pfnmap {host} {name}: {line}");
            lines.push((name, case, line));
        }
    }
    lines
}

/// `line` without `18xK ` before a PMD order in each `faults` list, when
/// the device maps with 2 MiB pages (`order` is not a PUD one).
fn without_fallback_pud_attempts(line: &str, order: &str) -> String {
    if order.starts_with("18x") {
        return line.to_string();
    }
    let mut line = line.to_string();
    for k in (1..=64).rev() {
        line = line.replace(&format!("faults 18x{k} 9x"), "faults 9x");
    }
    line
}

fn check(host: &str) {
    let lines = matrix(host);
    for (name, case, line) in &lines {
        let (_, _, order, pages, n, two) = DEVICES
            .iter()
            .find(|d| d.0 == *name)
            .copied()
            .unwrap_or_default();
        let what = format!("{host} {name} {case}: {line}");
        assert!(line.ends_with("| status 0"), "{what}");
        // The kprobe counts attempts: a 128 MiB mapping sometimes sees a
        // PUD attempt (order 18) that falls back before its PMD faults
        // (seen once in CI: `faults 18x1 9x64`). Only the orders that map
        // are asserted.
        let line = &without_fallback_pud_attempts(line, order);
        match *case {
            "fault" => assert!(line.contains(&format!("reads, faults {order} |")), "{what}"),
            // mprotect changes the host's huge entries in place: nothing
            // faults again, neither the reads nor the writes after it.
            "mprotect" => assert!(
                line.contains(&format!(
                    "reads, faults {order}; PROT_READ and back (faults none, none); {n} \
                     reads again, faults none; {n} writes, faults none |"
                )),
                "{what}"
            ),
            // The child gets copies of the parent's huge entries: it
            // faults nothing, nor does the parent after it.
            "fork" => assert!(
                line.contains(&format!(
                    "wrote head and tail (faults {two}); child exit 0 (read both, faults \
                     none); parent reads both (faults none) |"
                )),
                "{what}"
            ),
            // KVM drops the slot's mappings on mprotect (its MMU notifier)
            // and maps the same page sizes again without a host fault; a
            // fork leaves them alone.
            _ => assert!(
                line.contains(&format!(
                    "pre-fault {pages} (faults {order}); mprotect and back 1Gx0 2Mx0 4Kx0; \
                     pre-fault {pages} (faults none); fork {pages} (faults none, child exit \
                     0); pre-fault {pages} (faults none) |"
                )),
                "{what}"
            ),
        }
    }
}

#[test]
fn the_pfnmap_matrix_on_the_6_12_host() {
    check("6.12");
}

#[test]
fn the_pfnmap_matrix_on_the_7_3_host() {
    check("7.3");
}
