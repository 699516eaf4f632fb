//! `barge-fork-rig`: a program that embeds barge and starts child processes
//! while its VM runs, as a test rig does, to show that barge's mappings
//! survive it: guest RAM and the BAR mappings are MADV_DONTFORK, so no
//! child copies their page tables (and guest RAM never turns copy on write).
//!
//! Runs in the lab host (`barge-lab run --ivshmem 8G -- barge-fork-rig
//! --device $LAB_IVSHMEM0`). The guest writes and reads back a word in each
//! GiB of BAR2, round after round; while it does, the rig's main thread
//! starts children both ways a program does (`std::process::Command`, which
//! spawns with vfork semantics, and a plain `fork()` whose child exits at
//! once) and reads its own `/proc/self/smaps` for the BAR and guest RAM
//! mappings. It prints:
//!
//! - `children: N commands, M forks while the guest ran`;
//! - `smaps: RANGE SIZE PATH flags ...` for the BAR mapping and guest RAM,
//!   and whether `dc` (MADV_DONTFORK) is among the flags;
//! - `guest: R rounds, B bad` from the guest;
//! - `report: BAR2 mapped 4Kx.. 2Mx.. 1Gx.., slot updates U; kvm pages_4k ..
//!   pages_2m .. pages_1g .. at exit` from the report;
//!
//! and `fork-rig: ok` or `fork-rig: FAILED: ...`, exiting 1 on a failure.
//! The counters at exit come after the smaps read, which matters: on Linux
//! 6.12 reading `/proc/PID/smaps` of a process walks its page tables, and
//! the walk splits (zaps) a huge pfnmap PUD entry it meets, so KVM loses
//! the BAR's 1 GiB mappings and the guest's next touch faults each GiB in
//! again (`--smaps-at-start` shows it: twice the host faults). The rig
//! finds the mappings through `/proc/self/maps`, which walks nothing, and
//! reads smaps only after the guest's loop.
//!
//! `--undo-dontfork` takes barge's MADV_DONTFORK off guest RAM first
//! (MADV_DOFORK; vfio-pci's BAR mapping is VM_IO and cannot take it), to
//! show what it guards: after a fork the guest's RAM writes break copy on
//! write and KVM maps RAM again, with smaller pages.

use std::process::{Command, ExitCode};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use vmm::config::{DeviceConfig, VfioConfig, VmConfig};
use vmm::{RunOutcome, Vm};

#[derive(Debug, Parser)]
#[command(about = "Start child processes while an embedded barge VM runs")]
struct Args {
    /// The vfio-pci device to pass through (ivshmem: BAR2 is written and
    /// read by the guest).
    #[arg(long)]
    device: String,
    /// Rounds of the guest's write-and-read loop over the BAR.
    #[arg(long, default_value_t = 40)]
    rounds: u32,
    /// Guest kernel.
    #[arg(long, default_value = "/lab/guest/bzImage")]
    kernel: std::path::PathBuf,
    /// Guest initramfs (its init runs what follows `--` on the cmdline).
    #[arg(long, default_value = "/lab/guest/initramfs")]
    initramfs: std::path::PathBuf,
    /// Seconds the run may take.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Take MADV_DONTFORK off guest RAM before the children start.
    #[arg(long)]
    undo_dontfork: bool,
    /// Start no children (the control run).
    #[arg(long)]
    no_children: bool,
    /// Read /proc/self/smaps when the guest's loop starts instead of when
    /// it ends: the page walk splits the BAR's 1 GiB host entries (see the
    /// module docs), and the guest's next touch faults them in again.
    #[arg(long)]
    smaps_at_start: bool,
}

/// Guest RAM: one region below the 32-bit hole.
const GUEST_RAM: u64 = 512 << 20;
const GIB: u64 = 1 << 30;
/// What the guest prints when its loop starts and ends. The command line
/// spells them `$((1))` so that the kernel's echo of its command line does
/// not match them.
const START: &str = "FORK-RIG-START1";
const DONE: &str = "FORK-RIG-DONE1";

/// The guest's loop: in each round, a word per GiB of BAR2 written and read
/// back; `bad` counts the words that did not read back. The kernel hands
/// init at most 32 arguments, so simple commands are spelled with `${IFS}`
/// between their words (the shell splits them again) and only the keywords
/// stand alone.
fn guest_cmdline(rounds: u32, gibs: u64) -> String {
    let offsets: Vec<String> = (0..gibs).map(|g| g.to_string()).collect();
    format!(
        "console=ttyS0 panic=-1 -- a=$(pcibar${{IFS}}1af4:1110${{IFS}}2);\
         echo${{IFS}}FORK-RIG-START$((1));bad=0;n=0;for i in $(seq${{IFS}}{rounds});do \
         for g in {};do o=$((a+g*{GIB}+0x3000));w=$((i*64+g));\
         devmem${{IFS}}$o${{IFS}}32${{IFS}}$w;\
         [${{IFS}}$(($(devmem${{IFS}}$o${{IFS}}32)))${{IFS}}-eq${{IFS}}$w${{IFS}}]||bad=$((bad+1));\
         done;n=$i;done;echo${{IFS}}FORK-RIG-DONE$((1))${{IFS}}rounds=$n${{IFS}}bad=$bad;\
         sleep${{IFS}}3",
        offsets.join(" ")
    )
}

/// One mapping of `/proc/self/smaps`: its range, path and VmFlags.
#[derive(Debug, Clone)]
struct SmapsEntry {
    start: u64,
    end: u64,
    path: String,
    flags: Vec<String>,
}

impl SmapsEntry {
    fn size(&self) -> u64 {
        self.end - self.start
    }

    fn line(&self) -> String {
        format!(
            "{:#x}-{:#x} {} MiB {} flags {}",
            self.start,
            self.end,
            self.size() >> 20,
            if self.path.is_empty() {
                "[anonymous]"
            } else {
                &self.path
            },
            self.flags.join(" ")
        )
    }

    fn dont_fork(&self) -> bool {
        self.flags.iter().any(|flag| flag == "dc")
    }
}

/// The mappings of `/proc/self/smaps` (with flags) or `/proc/self/maps`
/// (without: reading maps walks no page table).
fn read_mappings(file: &str) -> Vec<SmapsEntry> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let mut entries: Vec<SmapsEntry> = Vec::new();
    for line in text.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(last) = entries.last_mut() {
                last.flags = flags.split_whitespace().map(str::to_string).collect();
            }
            continue;
        }
        let mut fields = line.split_whitespace();
        let Some((start, end)) = fields.next().and_then(|range| range.split_once('-')) else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        else {
            continue;
        };
        let path = fields.nth(4).unwrap_or("").to_string();
        entries.push(SmapsEntry {
            start,
            end,
            path,
            flags: Vec::new(),
        });
    }
    entries
}

/// The BAR mapping (the VFIO device's, at least a GiB) and guest RAM (an
/// anonymous mapping of guest RAM's size).
fn interesting(entries: &[SmapsEntry]) -> (Option<SmapsEntry>, Option<SmapsEntry>) {
    let bar = entries
        .iter()
        .find(|e| e.path.contains("vfio") && e.size() >= GIB)
        .cloned();
    let ram = entries
        .iter()
        .find(|e| e.path.is_empty() && e.size() == GUEST_RAM)
        .cloned();
    (bar, ram)
}

/// Takes MADV_DONTFORK off `[start, end)`.
fn do_fork(entry: &SmapsEntry) -> std::io::Result<()> {
    // SAFETY: MADV_DOFORK only lets children inherit the range again; it
    // changes nothing in this process's view of the memory.
    let ret = unsafe {
        libc::madvise(
            entry.start as *mut libc::c_void,
            entry.size() as usize,
            libc::MADV_DOFORK,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `fork()`s a child that exits at once; waits for it.
fn fork_and_reap() -> std::io::Result<()> {
    // SAFETY: the child only calls `_exit`, which is async-signal-safe, so
    // fork in this multi-threaded process cannot leave it in a state where
    // it touches another thread's locks.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: in the child: exit at once, running nothing of the parent.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waits for the child just created; `status` is a valid int.
    let ret = unsafe { libc::waitpid(pid, &mut status, 0) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn console_text(console: &Mutex<Vec<u8>>) -> String {
    String::from_utf8_lossy(&console.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
}

struct Failures(Vec<String>);

impl Failures {
    fn check(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            let what = what.into();
            println!("  FAILED: {what}");
            self.0.push(what);
        }
    }
}

/// Prints the BAR's and guest RAM's smaps entries and checks they are
/// MADV_DONTFORK; with `--undo-dontfork` takes it off guest RAM.
fn check_smaps(failures: &mut Failures) {
    let (bar, ram) = interesting(&read_mappings("/proc/self/smaps"));
    for (name, entry) in [("BAR", &bar), ("guest RAM", &ram)] {
        match entry {
            Some(entry) => {
                println!("smaps: {name}: {}", entry.line());
                failures.check(
                    entry.dont_fork(),
                    format!("{name} mapping is not MADV_DONTFORK"),
                );
            }
            None => failures.check(false, format!("no {name} mapping in smaps")),
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut failures = Failures(Vec::new());
    let mut config = VmConfig::new(&args.kernel);
    config.initramfs = Some(args.initramfs.clone());
    config.memory.size = GUEST_RAM;
    config.cmdline = guest_cmdline(args.rounds, 8);
    config.devices = vec![DeviceConfig::Vfio(VfioConfig {
        bdf: args.device.clone(),
        bar_align: Default::default(),
        p2p: Default::default(),
    })];
    let console = Arc::new(Mutex::new(Vec::new()));
    let buffer = console.clone();
    let timeout = Duration::from_secs(args.timeout);
    // The VM runs on a thread of its own: barge's seccomp filter stays with
    // the thread that ran it, and this one starts processes.
    let vm = std::thread::spawn(move || {
        Vm::new(config)
            .console_buffer(buffer)
            .run_with_timeout(timeout)
            .map_err(|e| e.to_string())
    });

    let deadline = Instant::now() + timeout;
    while !console_text(&console).contains(START) && !vm.is_finished() {
        if Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if args.undo_dontfork {
        match interesting(&read_mappings("/proc/self/maps")).1 {
            Some(ram) => match do_fork(&ram) {
                Ok(()) => println!("undo: guest RAM is MADV_DOFORK again"),
                Err(e) => failures.check(false, format!("MADV_DOFORK on guest RAM: {e}")),
            },
            None => failures.check(false, "no guest RAM mapping in /proc/self/maps"),
        }
    }
    if args.smaps_at_start {
        check_smaps(&mut failures);
    }
    let (mut commands, mut forks) = (0u32, 0u32);
    while !console_text(&console).contains(DONE) && !vm.is_finished() {
        if args.no_children {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        match Command::new("/bin/true").status() {
            Ok(_) => commands += 1,
            Err(e) => failures.check(false, format!("Command: {e}")),
        }
        match fork_and_reap() {
            Ok(()) => forks += 1,
            Err(e) => failures.check(false, format!("fork: {e}")),
        }
    }
    println!("children: {commands} commands, {forks} forks while the guest ran");
    // The guest sleeps a little after its loop: the mappings are still there.
    if !args.smaps_at_start {
        check_smaps(&mut failures);
    }
    failures.check(
        args.no_children || commands > 0 && forks > 0,
        "no child started while the guest ran",
    );

    let result = vm
        .join()
        .unwrap_or_else(|_| Err("the VM thread panicked".to_string()));
    let text = console_text(&console);
    let outcome: RunOutcome = match result {
        Ok(outcome) => outcome,
        Err(e) => {
            println!("fork-rig: FAILED: {e}\n{text}");
            return ExitCode::FAILURE;
        }
    };
    let done = text.lines().find(|l| l.contains(DONE)).unwrap_or_default();
    println!("guest: {}", done.trim());
    if !done.contains("bad=0") {
        let lines: Vec<&str> = text.lines().collect();
        println!(
            "guest console (tail):\n{}",
            lines[lines.len().saturating_sub(15)..].join("\n")
        );
    }
    failures.check(
        done.contains(&format!("rounds={}", args.rounds)) && done.contains("bad=0"),
        format!("the guest's data check: {done:?}"),
    );
    failures.check(outcome.exit.status == 0, format!("exit {:?}", outcome.exit));
    let bar2 = outcome
        .report
        .devices
        .iter()
        .flat_map(|d| &d.bars)
        .find(|b| b.index == 2);
    let stats = &outcome.report.kvm_stats;
    let stat = |name: &str| stats.get(name).copied().unwrap_or(0);
    match bar2.and_then(|b| b.mapped.map(|m| (m, b.slot_updates))) {
        Some((mapped, slot_updates)) => {
            println!(
                "report: BAR2 mapped 4Kx{} 2Mx{} 1Gx{}, slot updates {slot_updates}; kvm \
                 pages_4k {} pages_2m {} pages_1g {} at exit",
                mapped.pages_4k,
                mapped.pages_2m,
                mapped.pages_1g,
                stat("pages_4k"),
                stat("pages_2m"),
                stat("pages_1g")
            );
            failures.check(mapped.pages_1g == 8, "BAR2 is not 8 x 1G");
            failures.check(slot_updates == 1, "BAR2's memslot was set more than once");
        }
        None => failures.check(false, "no BAR2 measurement in the report"),
    }
    if failures.0.is_empty() {
        println!("fork-rig: ok");
        ExitCode::SUCCESS
    } else {
        println!("fork-rig: FAILED: {}", failures.0.join("; "));
        ExitCode::FAILURE
    }
}
