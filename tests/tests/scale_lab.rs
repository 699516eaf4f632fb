//! Scale in the lab: eight ivshmem devices of 8 GiB passed through to one
//! guest, then one of 64 GiB. Every BAR is mapped with 1 GiB pages (KVM's
//! `pages_1g` after pre-fault), the host takes one huge fault per GiB over
//! the whole boot (order 18, counted by a kprobe on vfio-pci's huge fault
//! handler), the guest reads through each BAR the word the test wrote into
//! that device's file and writes back a word of its own, and the report's
//! phases add up to its time to the first KVM_RUN.
//!
//! The 64 GiB BAR is mapped for peer-to-peer DMA in the background
//! (`p2p=background`): type1 on 6.12 takes tens of seconds for it, and the
//! test checks that this time is not in the boot's `bar_mapping` phase,
//! that the map was done after the guest started (the guest waits for it
//! with a `sleep`), and that the report says when.

use std::path::PathBuf;

use barge_tests::bar_passthrough::{
    check_phases, host_fault_orders, COUNT_HOST_FAULTS, GIB, SAVE_HOST_FAULTS,
};
use barge_tests::harness::{lab_script, output_text, read_at, sparse_file, write_at};
use serde_json::Value;

/// Two lab hosts side by side starve each other on two cores.
static ONE_LAB_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Where the test writes, and the guest reads, in each BAR.
const READ_AT: u64 = 0x1000;
/// Where the guest writes in each BAR.
const WRITE_AT: u64 = 0x2000;

/// The word the test writes into device `index`'s file.
fn from_outside(index: usize) -> u32 {
    0xcafe_0000 + index as u32
}

/// The word the guest writes into the BAR of the device in its slot
/// `slot` (its guest BDF 0000:00:SLOT.0).
fn from_guest(slot: u32) -> u32 {
    0x600d_0000 + slot
}

/// The guest's command: for every ivshmem device (vendor 0x1af4), its BDF,
/// BAR2's address and the word at BAR2 + READ_AT (`BAR <bdf> <gpa>
/// <word>`), then it writes [`from_guest`] of its slot at BAR2 + WRITE_AT.
/// In double quotes: one word to the guest kernel (see
/// `barge_tests::debian::DebianBoot::cmdline`).
fn guest_command(then: &str) -> String {
    format!(
        "\"for d in /sys/bus/pci/devices/*;do [ $(cat $d/vendor) = 0x1af4 ]||continue;\
         set -- $(sed -n 3p $d/resource);s=${{d##*:00:}};\
         echo BAR ${{d##*/}} $1 $(devmem $(($1+{READ_AT:#x})) 32);\
         devmem $(($1+{WRITE_AT:#x})) 32 $((0x600d0000+0x${{s%.0}}));done{then}\""
    )
}

/// How the BARs are mapped for peer-to-peer DMA in a run.
#[derive(Clone, Copy, PartialEq)]
enum P2pMode {
    /// Before the guest runs (`p2p=auto`, type1 maps them on 6.12).
    Boot,
    /// While the guest boots (`p2p=background`); the guest then sleeps for
    /// this many seconds so that the map is done while it runs.
    Background { guest_sleep_s: u32 },
}

/// One lab boot with an ivshmem device of `size` bytes per file in `files`,
/// all passed through to one barge guest with host faults counted: the
/// report, barge's log and the guest's console.
fn run(
    name: &str,
    files: &[PathBuf],
    size: u64,
    p2p: P2pMode,
) -> (Value, String, String, Vec<u32>) {
    let _one = ONE_LAB_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    for (index, file) in files.iter().enumerate() {
        write_at(file, READ_AT, &from_outside(index).to_le_bytes());
    }
    let (option, then) = match p2p {
        P2pMode::Boot => ("", String::new()),
        P2pMode::Background { guest_sleep_s } => {
            (",p2p=background", format!(";sleep {guest_sleep_s}"))
        }
    };
    let devices: String = (0..files.len())
        .map(|i| format!(" --device vfio=$LAB_IVSHMEM{i}{option}"))
        .collect();
    let script = format!(
        "{COUNT_HOST_FAULTS}barge run --kernel /lab/guest/bzImage --initramfs /lab/guest/initramfs \
         --memory size=512M{devices} --serial file=/out/{name}.guest --report /out/{name}.json \
         --verbose --cmdline 'console=ttyS0 panic=-1 -- {}' 2> /out/{name}.log\n\
         echo $? > /out/{name}.status\n{SAVE_HOST_FAULTS}",
        guest_command(&then)
    );
    let ivshmem: Vec<String> = files
        .iter()
        .map(|file| format!("{}G,file={}", size / GIB, file.display()))
        .collect();
    let mut args = vec!["--timeout", "900"];
    for device in &ivshmem {
        args.extend(["--ivshmem", device.as_str()]);
    }
    let (output, dir) = lab_script(env!("CARGO_BIN_EXE_barge-lab"), &args, &script);
    let read = |ext: &str| std::fs::read_to_string(dir.join(format!("{name}.{ext}")));
    let log = read("log").unwrap_or_default();
    let guest = read("guest").unwrap_or_default();
    assert!(output.status.success(), "{}\n{log}", output_text(&output));
    assert_eq!(
        read("status").unwrap_or_default().trim(),
        "0",
        "{log}\nguest:\n{guest}"
    );
    assert!(guest.contains("GUEST-EXIT 0"), "{guest}");
    let report: Value = serde_json::from_str(&read("json").unwrap_or_default())
        .unwrap_or_else(|e| panic!("{name}.json: {e}\n{log}"));
    (report, log, guest, host_fault_orders(&dir))
}

/// Checks every device of a run over `files` (BARs of `size` bytes): 1 GiB
/// pages for BAR2, the word of its own file read by the guest through it,
/// the guest's word in its file; `size / GIB` order-18 host faults per
/// device and no others; the phases; with [`P2pMode::Background`] each
/// BAR2's map after the first KVM_RUN and outside the boot's phases.
/// Prints what it saw.
fn check(name: &str, files: &[PathBuf], size: u64, p2p: P2pMode) {
    let (report, log, guest, faults) = run(name, files, size, p2p);
    let devices = report["devices"].as_array().cloned().unwrap_or_default();
    assert_eq!(devices.len(), files.len(), "{report}");
    let per_device = size / GIB;
    for (index, (device, file)) in devices.iter().zip(files).enumerate() {
        let bar2 = device["bars"]
            .as_array()
            .and_then(|bars| bars.iter().find(|b| b["index"] == 2))
            .unwrap_or_else(|| panic!("no BAR2: {device}"));
        let guest_bdf = device["guest_bdf"].as_str().unwrap_or_default();
        println!(
            "{name}: {} as {guest_bdf}: BAR2 {} GiB at {:#x}, mapped {}, slot updates {}",
            device["bdf"].as_str().unwrap_or_default(),
            size / GIB,
            bar2["gpa"].as_u64().unwrap_or(0),
            bar2["mapped"],
            bar2["slot_updates"]
        );
        assert_eq!(bar2["mapped"]["pages_1g"], per_device, "{bar2}");
        assert_eq!(bar2["mapped"]["pages_2m"], 0, "{bar2}");
        assert_eq!(bar2["mapped"]["pages_4k"], 0, "{bar2}");
        assert_eq!(bar2["huge_ok"], true, "{bar2}");
        assert_eq!(bar2["slot_updates"], 1, "{bar2}");
        println!("{name}: BAR2 p2p {}", bar2["p2p"]);
        assert_eq!(bar2["p2p"]["method"], "type1-vaddr", "{bar2}");
        assert_eq!(bar2["p2p"]["bytes"], size, "{bar2}");
        if p2p != P2pMode::Boot {
            check_background_p2p(&report, bar2);
        } else {
            assert!(bar2["p2p"]["ready_after_first_run_ms"].is_null(), "{bar2}");
        }
        // The guest read this device's own word through this BAR.
        let line = guest
            .lines()
            .find(|l| l.starts_with(&format!("BAR {guest_bdf} ")))
            .unwrap_or_else(|| panic!("no BAR line for {guest_bdf}:\n{guest}"));
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            u64::from_str_radix(words[2].trim_start_matches("0x"), 16).ok(),
            bar2["gpa"].as_u64(),
            "the guest kept barge's address: {line}"
        );
        assert_eq!(
            words[3].to_ascii_lowercase(),
            format!("{:#010x}", from_outside(index)),
            "{line}"
        );
        // And wrote its own into this device's file.
        let slot = u32::from_str_radix(&guest_bdf[8..10], 16).unwrap_or(0);
        assert_eq!(
            read_at(file, WRITE_AT, 4),
            from_guest(slot).to_le_bytes(),
            "{guest_bdf}"
        );
    }
    let huge = faults.iter().filter(|&&order| order == 18).count() as u64;
    println!(
        "{name}: host huge faults over the boot: {huge} of order 18, {} others (for {} GiB of BARs)",
        faults.len() as u64 - huge,
        per_device * files.len() as u64
    );
    assert_eq!(huge, per_device * files.len() as u64, "{faults:?}");
    assert_eq!(faults.len() as u64, huge, "{faults:?}");
    check_phases(&report);
    // --verbose printed them too.
    assert!(
        log.lines()
            .any(|l| l.starts_with("barge: boot phases (ms): startup ")),
        "{log}"
    );
    for file in files {
        let _ = std::fs::remove_file(file);
    }
}

/// A BAR2 mapped for peer to peer in the background: done after the
/// first KVM_RUN, and its time is not in the boot's `bar_mapping` phase.
fn check_background_p2p(report: &Value, bar2: &Value) {
    let ready = bar2["p2p"]["ready_after_first_run_ms"]
        .as_f64()
        .unwrap_or_else(|| panic!("no ready_after_first_run_ms: {bar2}"));
    let map_ms = bar2["p2p"]["ms"].as_f64().unwrap_or(0.0);
    let bar_mapping = report["phases_ms"]["bar_mapping"]
        .as_f64()
        .unwrap_or(f64::MAX);
    println!(
        "background p2p: {map_ms:.0} ms map, done {ready:.0} ms after the first KVM_RUN; \
         bar_mapping phase {bar_mapping} ms"
    );
    assert!(ready > 0.0, "done before the guest ran: {bar2}");
    assert!(
        bar_mapping * 4.0 < map_ms,
        "the map is in the boot's phases: {bar_mapping} ms vs {map_ms}: {report}"
    );
    assert!(bar2["warning"].is_null(), "{bar2}");
}

#[test]
fn eight_8g_bars_in_one_guest_get_1g_pages_and_one_fault_per_gib() {
    let files: Vec<PathBuf> = (0..8)
        .map(|i| sparse_file(&format!("scale-8x8g-{i}.shm"), 8 * GIB))
        .collect();
    check("eight", &files, 8 * GIB, P2pMode::Boot);
}

#[test]
fn one_64g_bar_gets_1g_pages_and_one_fault_per_gib_with_p2p_in_the_background() {
    let files = vec![sparse_file("scale-64g.shm", 64 * GIB)];
    // The map took about 26 s in the lab: the guest waits 75 s for it.
    let p2p = P2pMode::Background { guest_sleep_s: 75 };
    check("one", &files, 64 * GIB, p2p);
}
