//! A passed-through device the host takes back, and a barge that dies, in
//! one lab boot with a 1 GiB ivshmem BAR2 (a file on the outer machine):
//!
//! 1. While a guest sleeps with the device passed through, the lab host
//!    unbinds the device from vfio-pci. vfio-pci signals VFIO's device
//!    request and waits for the device to be closed; barge logs one line
//!    naming the device, stops the guest, writes its report (`exit.reason`
//!    `device_release_request`), tears down (which lets the unbind
//!    complete) and exits with status 6. The device is bound to vfio-pci
//!    again and the next run passes its data check with 1 GiB pages.
//! 2. A barge is killed with SIGKILL while its guest has the BAR mapped:
//!    the kernel releases the device with the process, and the next run
//!    gets the same mapping (pages_1g) and reads what the killed run's
//!    guest wrote into the BAR.
//!
//! Every check is collected before the test fails, so one broken run shows
//! all the checks it breaks.

use std::path::Path;
use std::process::Output;
use std::time::Instant;

use barge_tests::bar_passthrough::bar;
use barge_tests::harness::{lab_script, output_text as text, read_at, sparse_file, write_at};

const GIB: u64 = 1 << 30;
/// What the test writes into the BAR file for the guests to read.
const FROM_OUTSIDE: u32 = 0xcafe_f00d;
/// What a data-check guest writes into the BAR.
const FROM_GUEST: u32 = 0x600d_f00d;
/// What the guest of the run killed with SIGKILL writes before it sleeps.
const FROM_KILLED: u32 = 0xdead_beef;
/// How long the lab host lets an unbind or a barge take before it gives
/// up (and kills barge, so that the unbind can finish).
const WAIT_S: u32 = 60;

const GUEST: &str = "--kernel /lab/guest/bzImage --initramfs /lab/guest/initramfs \
                     --memory size=256M --device vfio=$LAB_IVSHMEM0";

/// What the guest says before it sleeps: computed, so that the kernel's
/// echo of its command line (which has [`SAY_SLEEPING`]) does not match.
const SLEEPING: &str = "GUEST-SLEEPS-42";
const SAY_SLEEPING: &str = "echo GUEST-SLEEPS-$((6*7));";

/// Seconds since the lab host booted, with hundredths (busybox `date` has
/// no sub-second format).
const NOW: &str = "cut -d' ' -f1 /proc/uptime";

/// Waits up to [`WAIT_S`] s for `condition` (a shell test).
fn wait_for(condition: &str) -> String {
    format!(
        "i=0; while ! {{ {condition}; }} && [ $i -lt {} ]; do sleep 0.5; i=$((i+1)); done\n",
        WAIT_S * 2
    )
}

/// `barge run` in the background as `$pid`: the guest does `guest` and
/// sleeps; stderr to /out/NAME.log, the console to /out/NAME.guest.
fn background_run(name: &str, guest: &str) -> String {
    format!(
        "barge run {GUEST} --serial file=/out/{name}.guest --report /out/{name}.json \
         --cmdline 'console=ttyS0 -- {guest}sleep 600' 2> /out/{name}.log &\n\
         pid=$!\n\
         {}",
        wait_for(&format!("grep -q {SLEEPING} /out/{name}.guest 2>/dev/null"))
    )
}

/// A `barge run` to the end whose guest reads the words at BAR2 + 0x1000
/// and + 0x3000 and writes [`FROM_GUEST`] at BAR2 + 0x2000; its status to
/// /out/NAME.status.
fn data_run(name: &str) -> String {
    format!(
        "barge run {GUEST} --serial file=/out/{name}.guest --report /out/{name}.json \
         --cmdline 'console=ttyS0 panic=-1 -- a=$(pcibar 1af4:1110 2);echo BAR2=$a;\
         echo READ=$(devmem $((a+0x1000)) 32);echo READ3=$(devmem $((a+0x3000)) 32);\
         devmem $((a+0x2000)) 32 {FROM_GUEST:#x}' 2> /out/{name}.log\n\
         echo $? > /out/{name}.status\n"
    )
}

/// The lab host's part: the unbind during a run, the rebind and a data
/// run; then the SIGKILL during a run and the data run after it.
fn script() -> String {
    let driver = |file: &str| {
        format!(
            "basename \"$(readlink /sys/bus/pci/devices/$LAB_IVSHMEM0/driver)\" > /out/{file}\n"
        )
    };
    format!(
        "echo $LAB_IVSHMEM0 > /out/bdf\n\
         {held}\
         {NOW} > /out/unbind.start\n\
         ( echo $LAB_IVSHMEM0 > /sys/bus/pci/drivers/vfio-pci/unbind; echo $? > /out/unbind.status; \
         {NOW} > /out/unbind.end ) &\n\
         unbinder=$!\n\
         {wait_barge}\
         if kill -0 $pid 2>/dev/null; then echo barge did not stop > /out/held.stuck; kill -9 $pid; fi\n\
         wait $pid; echo $? > /out/held.status\n\
         {wait_unbind}\
         wait $unbinder\n\
         {after_unbind}\
         echo $LAB_IVSHMEM0 > /sys/bus/pci/drivers/vfio-pci/bind; echo $? > /out/bind.status\n\
         {after_bind}\
         {rebind}\
         {killed}\
         kill -9 $pid; wait $pid; echo $? > /out/killed.status\n\
         {after_kill}\
         {after_kill_run}\
         dmesg | grep -i vfio > /out/dmesg.txt\n",
        held = background_run("held", SAY_SLEEPING),
        wait_barge = wait_for("! kill -0 $pid 2>/dev/null"),
        wait_unbind = wait_for("[ -e /out/unbind.end ]"),
        after_unbind = driver("unbound.driver"),
        after_bind = driver("rebound.driver"),
        rebind = data_run("rebind"),
        killed = background_run(
            "killed",
            &format!(
                "a=$(pcibar 1af4:1110 2);devmem $((a+0x3000)) 32 {FROM_KILLED:#x};\
                 {SAY_SLEEPING}"
            )
        ),
        after_kill = driver("killed.driver"),
        after_kill_run = data_run("after-kill"),
    )
}

/// Reads /out files of the run.
struct Results<'a> {
    dir: &'a Path,
    failures: Vec<String>,
}

impl Results<'_> {
    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    fn check(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            let what = what.into();
            println!("FAILED: {what}");
            self.failures.push(what);
        }
    }

    fn report(&mut self, name: &str) -> serde_json::Value {
        let report = self.read(&format!("{name}.json"));
        match serde_json::from_str(&report) {
            Ok(report) => report,
            Err(e) => {
                self.check(false, format!("{name}.json is no report: {e}: {report}"));
                serde_json::Value::Null
            }
        }
    }

    /// Checks a [`data_run`]: status 0, the guest read [`FROM_OUTSIDE`]
    /// and `word3` at + 0x3000, 1 GiB pages; returns BAR2's `mapped`.
    fn data_run(&mut self, name: &str, word3: u32) -> serde_json::Value {
        let guest = self.read(&format!("{name}.guest"));
        let log = self.read(&format!("{name}.log"));
        let status = self.read(&format!("{name}.status"));
        println!(
            "--- {name}: status {}, barge's stderr:\n{log}",
            status.trim()
        );
        let tail: Vec<&str> = guest.lines().rev().take(4).collect();
        println!(
            "--- {name}: guest (tail)\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
        self.check(status.trim() == "0", format!("{name}: status {status}"));
        self.check(
            guest.contains(&format!("READ=0x{FROM_OUTSIDE:08X}")),
            format!("{name}: the guest did not read the test's word"),
        );
        self.check(
            guest.contains(&format!("READ3=0x{word3:08X}")),
            format!("{name}: the guest did not read 0x{word3:08X} at BAR2 + 0x3000"),
        );
        self.check(
            guest.contains("GUEST-EXIT 0"),
            format!("{name}: no GUEST-EXIT 0"),
        );
        let report = self.report(name);
        if report.is_null() {
            return report;
        }
        let bar2 = bar(&report, 2);
        println!(
            "--- {name}: BAR2 gpa {:#x} hva {:#x} mapped {}",
            bar2["gpa"].as_u64().unwrap_or(0),
            bar2["hva"].as_u64().unwrap_or(0),
            bar2["mapped"]
        );
        self.check(
            bar2["mapped"]["pages_1g"] == 1,
            format!("{name}: BAR2 not mapped with one 1 GiB page: {bar2}"),
        );
        bar2
    }
}

#[test]
fn unbind_stops_barge_with_status_6_and_a_killed_barge_leaves_the_device_usable() {
    let size = GIB;
    let backing = sparse_file("ivshmem-device-release.shm", size);
    write_at(&backing, 0x1000, &FROM_OUTSIDE.to_le_bytes());
    let started = Instant::now();
    let ivshmem = format!("1G,file={}", backing.display());
    let (output, dir) = lab_script(
        env!("CARGO_BIN_EXE_barge-lab"),
        &["--timeout", "600", "--ivshmem", &ivshmem],
        &script(),
    );
    println!(
        "lab boot and command: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let outcome: &Output = &output;
    let mut results = Results {
        dir: &dir,
        failures: Vec::new(),
    };
    results.check(
        outcome.status.success(),
        format!("barge-lab: {}", text(outcome)),
    );
    let bdf = results.read("bdf").trim().to_string();

    // 1. The unbind while the guest runs.
    let log = results.read("held.log");
    let status = results.read("held.status");
    let guest = results.read("held.guest");
    println!("--- held: status {}, barge's stderr:\n{log}", status.trim());
    results.check(
        guest.contains(SLEEPING),
        format!("held: the guest did not get to sleep:\n{guest}"),
    );
    results.check(
        !guest.contains("GUEST-EXIT"),
        "held: the guest ended by itself",
    );
    results.check(
        results.read("held.stuck").is_empty(),
        format!("held: barge did not stop within {WAIT_S} s of the unbind"),
    );
    results.check(status.trim() == "6", format!("held: status {status}"));
    let request_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("the host asks for the device back"))
        .collect();
    results.check(
        request_lines.len() == 1 && request_lines[0].contains(&format!("vfio: {bdf}: ")),
        format!("held: not one line naming {bdf}: {request_lines:?}"),
    );
    results.check(!log.contains("panicked"), "held: barge panicked");
    let report = results.report("held");
    println!("--- held: report exit {}", report["exit"]);
    results.check(
        report["exit"]["reason"] == "device_release_request" && report["exit"]["status"] == 6,
        format!("held: report exit {}", report["exit"]),
    );
    let uptime = |name: &str| results.read(name).trim().parse::<f64>().ok();
    let unbind_s = match (uptime("unbind.start"), uptime("unbind.end")) {
        (Some(start), Some(end)) => Some(end - start),
        _ => None,
    };
    println!(
        "--- unbind: status {}, took {}",
        results.read("unbind.status").trim(),
        unbind_s.map_or("?".into(), |s| format!("{s:.2} s"))
    );
    results.check(
        results.read("unbind.status").trim() == "0",
        "unbind: did not complete",
    );
    // vfio-pci signals at once and again every 10 s: barge let go at the
    // first one.
    results.check(
        unbind_s.is_some_and(|s| s < 10.0),
        format!("unbind: took {unbind_s:?} s"),
    );
    let unbound = results.read("unbound.driver");
    let rebound = results.read("rebound.driver");
    println!(
        "--- driver after the unbind: {:?}; after the bind: {:?} (bind status {})",
        unbound.trim(),
        rebound.trim(),
        results.read("bind.status").trim()
    );
    results.check(
        unbound.trim() != "vfio-pci",
        "the unbind left vfio-pci bound",
    );
    results.check(rebound.trim() == "vfio-pci", "the device did not rebind");
    let rebind = results.data_run("rebind", 0);
    results.check(
        read_at(&backing, 0x2000, 4) == FROM_GUEST.to_le_bytes(),
        "rebind: the guest's word is not in the BAR file",
    );

    // 2. SIGKILL in the middle of a run.
    let killed_status = results.read("killed.status");
    let killed_guest = results.read("killed.guest");
    println!(
        "--- killed: status {} (137 = 128 + SIGKILL), driver after: {}",
        killed_status.trim(),
        results.read("killed.driver").trim()
    );
    results.check(
        killed_guest.contains(SLEEPING),
        format!("killed: the guest did not write its word:\n{killed_guest}"),
    );
    results.check(
        killed_status.trim() == "137",
        format!("killed: status {killed_status}"),
    );
    results.check(
        results.read("killed.driver").trim() == "vfio-pci",
        "killed: the device left vfio-pci",
    );
    results.check(
        read_at(&backing, 0x3000, 4) == FROM_KILLED.to_le_bytes(),
        "killed: the killed guest's word is not in the BAR file",
    );
    let after_kill = results.data_run("after-kill", FROM_KILLED);
    results.check(
        !after_kill.is_null() && after_kill["mapped"] == rebind["mapped"],
        format!(
            "after-kill: mapped {} where the run before the kill got {}",
            after_kill["mapped"], rebind["mapped"]
        ),
    );
    println!(
        "--- vfio in the lab host's kernel log\n{}",
        results.read("dmesg.txt")
    );
    let _ = std::fs::remove_file(&backing);
    assert!(
        results.failures.is_empty(),
        "{} checks failed:\n{}\n{}",
        results.failures.len(),
        results.failures.join("\n"),
        text(&output)
    );
}
