//! Mappings a process can fork under, in the lab: `barge-fork-rig` embeds
//! barge with the 8 GiB ivshmem BAR passed through (1 GiB pages) and starts
//! children, with `std::process::Command` and with `fork()`, while its
//! guest writes and reads back a word in every GiB of the BAR, round after
//! round. A kprobe on vfio-pci's huge fault handler counts the host faults
//! of each run.
//!
//! - As barge maps them (guest RAM and the BAR MADV_DONTFORK, `dc` in
//!   smaps): children change nothing: 8 host faults of order 18, one per
//!   GiB, as in a run without children; the guest's data checks pass; BAR2
//!   8 x 1G with one memslot set.
//! - With guest RAM made MADV_DOFORK again (`--undo-dontfork`), what
//!   DONTFORK guards shows: each fork makes guest RAM copy on write, the
//!   guest's next writes break it, and KVM maps RAM again with 4 KiB pages.
//! - Reading `/proc/PID/smaps` while the guest runs (`--smaps-at-start`)
//!   costs the BAR its 1 GiB host entries (the page walk splits huge pfnmap
//!   PUDs): each GiB faults in once more. Recorded here as a fact of the
//!   6.12 host, not a barge defect.

use barge_tests::harness::{lab_script, output_text as text};

/// The rig's run with MODE flags; its output in /out/NAME.txt, its host
/// fault orders in /out/NAME.faults.
fn rig(name: &str, flags: &str) -> String {
    format!(
        "echo 0 > /sys/kernel/tracing/trace\n\
         barge-fork-rig --device $LAB_IVSHMEM0 --rounds 8 {flags} > /out/{name}.txt 2>&1\n\
         echo \"status $?\" >> /out/{name}.txt\n\
         grep -o 'order=[0-9]*' /sys/kernel/tracing/trace > /out/{name}.faults\n"
    )
}

/// The value after `key ` in `line` (`pages_4k 12`).
fn number_after(line: &str, key: &str) -> u64 {
    line.split(&format!("{key} "))
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

#[test]
#[ignore = "the lab host kernel panicked (\"corrupted stack end detected inside scheduler\" in \
            barge's vcpu0 thread) in 2 of 4 runs of this test; out of CI until that is \
            understood: run it with `cargo test -p barge-tests --test fork_lab -- --ignored`"]
fn children_started_while_the_guest_runs_leave_the_bar_and_ram_mappings_alone() {
    let script = format!(
        "cd /sys/kernel/tracing && \
         echo 'p:bargehf vfio_pci_mmap_huge_fault order=%si:u32' > kprobe_events && \
         echo 1 > events/kprobes/bargehf/enable && cd /out\n{}{}{}",
        rig("dontfork", ""),
        rig("dofork", "--undo-dontfork"),
        rig("smaps", "--smaps-at-start")
    );
    let (output, dir) = lab_script(
        env!("CARGO_BIN_EXE_barge-lab"),
        &["--timeout", "1200", "--ivshmem", "8G"],
        &script,
    );
    assert!(output.status.success(), "{}", text(&output));
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let faults = |name: &str| read(&format!("{name}.faults")).lines().count();
    let at_exit = |out: &str| {
        out.lines()
            .find(|l| l.starts_with("report: "))
            .unwrap_or_else(|| panic!("no report line:\n{out}"))
            .to_string()
    };

    let dontfork = read("dontfork.txt");
    println!(
        "--- as barge maps them\n{dontfork}host faults: {}",
        faults("dontfork")
    );
    assert!(dontfork.contains("fork-rig: ok"), "{dontfork}");
    assert!(dontfork.contains("status 0"), "{dontfork}");
    let children = dontfork
        .lines()
        .find(|l| l.starts_with("children: "))
        .unwrap_or_default();
    assert!(!children.starts_with("children: 0 "), "{dontfork}");
    for name in ["BAR", "guest RAM"] {
        let line = dontfork
            .lines()
            .find(|l| l.starts_with(&format!("smaps: {name}: ")))
            .unwrap_or_else(|| panic!("no smaps line for {name}:\n{dontfork}"));
        assert!(line.split_whitespace().any(|flag| flag == "dc"), "{line}");
    }
    assert!(
        dontfork.contains("guest: FORK-RIG-DONE1 rounds=8 bad=0"),
        "{dontfork}"
    );
    assert!(
        dontfork.contains("report: BAR2 mapped 4Kx0 2Mx0 1Gx8, slot updates 1"),
        "{dontfork}"
    );
    let orders = read("dontfork.faults");
    assert_eq!(faults("dontfork"), 8, "one fault per GiB:\n{orders}");
    assert!(orders.lines().all(|l| l == "order=18"), "{orders}");

    let dofork = read("dofork.txt");
    println!(
        "--- guest RAM MADV_DOFORK again\n{dofork}host faults: {}",
        faults("dofork")
    );
    assert!(
        dofork.contains("undo: guest RAM is MADV_DOFORK again"),
        "{dofork}"
    );
    assert!(
        dofork.contains("guest: FORK-RIG-DONE1 rounds=8 bad=0"),
        "{dofork}"
    );
    // Copy on write broke KVM's large RAM mappings: 4 KiB pages at exit
    // where the DONTFORK run has none.
    let (kept, broken) = (at_exit(&dontfork), at_exit(&dofork));
    assert_eq!(number_after(&kept, "pages_4k"), 0, "{kept}");
    assert!(number_after(&broken, "pages_4k") > 0, "{broken}");

    let smaps = read("smaps.txt");
    println!(
        "--- smaps read while the guest runs\n{smaps}host faults: {}",
        faults("smaps")
    );
    assert!(smaps.contains("fork-rig: ok"), "{smaps}");
    assert_eq!(
        faults("smaps"),
        16,
        "the smaps walk split every 1 GiB entry"
    );
}
