//! barge's real vCPU loop on this machine's /dev/kvm: tiny long-mode
//! payloads, assembled from guest-programs' pieces and wrapped in its
//! minimal ELF64 "vmlinux", run through the embedding API with the console
//! captured.
//!
//! KVM here may be slow (~1M guest instructions/s), so every payload is a
//! few dozen instructions plus port I/O. Without /dev/kvm the tests fail
//! with a clear message unless `BARGE_SKIP_KVM=1`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arch::layout::{HIMEM_START, I8042_COMMAND_PORT, I8042_RESET_COMMAND};
use guest_programs::asm::{acpi_poweroff_as_linux, assemble, assemble_bits, hang, print};
use guest_programs::code_asm::*;
use guest_programs::elf::{elf64, Vmlinux};
use guest_programs::testing::kvm_or_skip;
use vmm::config::{OnReboot, SerialConfig, VmConfig};
use vmm::report::Report;

const GREETING: &str = "hello from barge\n";

fn scratch_dir(test: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("barge-boot-payload-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn config_for(dir: &Path, code: &[u8], cpus: u8) -> VmConfig {
    config_for_image(dir, &elf64(code), cpus)
}

fn config_for_image(dir: &Path, image: &[u8], cpus: u8) -> VmConfig {
    let kernel = dir.join("payload.elf");
    std::fs::write(&kernel, image).expect("write payload");
    let mut config = VmConfig::new(kernel);
    config.cpus = cpus;
    config.memory.size = vmm::config::MIN_MEMORY_SIZE;
    config.serial = SerialConfig::Disabled;
    config.cmdline = "console=ttyS0".into();
    config.report = Some(dir.join("report.json"));
    config
}

struct Run {
    outcome: vmm::RunOutcome,
    console: String,
    report_file: Report,
}

fn run(config: VmConfig, timeout: Duration) -> Run {
    let report_path = config.report.clone().expect("report path");
    let console = Arc::new(Mutex::new(Vec::new()));
    let outcome = vmm::Vm::new(config)
        .console_buffer(console.clone())
        .run_with_timeout(timeout)
        .unwrap_or_else(|e| panic!("the VM could not be built: {e}"));
    let console = String::from_utf8_lossy(&console.lock().unwrap()).into_owned();
    let json = std::fs::read_to_string(&report_path).expect("report written");
    let report_file: Report = serde_json::from_str(&json).expect("report parses");
    Run {
        outcome,
        console,
        report_file,
    }
}

#[test]
fn payload_prints_through_com1_and_powers_off_via_acpi() {
    if !kvm_or_skip("payload_prints_through_com1_and_powers_off_via_acpi") {
        return;
    }
    let dir = scratch_dir("poweroff");
    let code = assemble(|a| {
        print(a, GREETING)?;
        acpi_poweroff_as_linux(a)?;
        hang(a)
    });
    let run = run(config_for(&dir, &code, 1), Duration::from_secs(120));
    let exit = &run.outcome.exit;
    assert_eq!(
        (exit.reason.as_str(), exit.status),
        ("poweroff", 0),
        "console: {:?}",
        run.console
    );
    assert_eq!(run.console, GREETING);

    let report = &run.outcome.report;
    assert_eq!(
        report, &run.report_file,
        "--report file matches the outcome"
    );
    assert_eq!(report.exit, *exit);
    let first_run = report
        .start_to_first_run_ms
        .expect("start_to_first_run_ms is set once a vCPU ran");
    assert!(first_run <= report.wall_ms, "{report:?}");
    // The phases are back to back from the process start (here: the run's
    // start) to the first KVM_RUN: they add up to it.
    let phases = report.phases_ms.expect("phases_ms is set once a vCPU ran");
    assert_eq!(
        phases.total(),
        first_run,
        "phases {phases:?} against {first_run} ms to the first KVM_RUN"
    );
    assert_eq!(phases.ram_dma_map, 0, "no device needs DMA: {phases:?}");
    assert_eq!(report.memory.len(), 1, "{:?}", report.memory);
    assert_eq!(report.memory[0].gpa, 0);
    assert_eq!(report.memory[0].size, vmm::config::MIN_MEMORY_SIZE);
    assert_eq!(report.memory[0].backing, "anonymous");
    assert_eq!(report.memory[0].page_size, 4096);
    // KVM_GET_STATS_FD exists from Linux 5.14; the 4K/2M/1G page counters
    // are x86 VM stats.
    assert!(
        report.kvm_stats.contains_key("pages_4k"),
        "kvm_stats: {:?}",
        report.kvm_stats
    );
}

#[test]
fn pvh_note_selects_the_32bit_pvh_entry() {
    if !kvm_or_skip("pvh_note_selects_the_32bit_pvh_entry") {
        return;
    }
    let dir = scratch_dir("pvh");
    // 32-bit protected mode, paging off, EBX = hvm_start_info: say whether
    // EBX points at the start_info magic, then power off.
    let code = assemble_bits(32, |a| {
        let mut bad = a.create_label();
        let mut end = a.create_label();
        a.cmp(dword_ptr(ebx), 0x336e_c578u32)?; // XEN_HVM_START_MAGIC_VALUE
        a.jne(bad)?;
        print(a, "pvh start_info ok\n")?;
        a.jmp(end)?;
        a.set_label(&mut bad)?;
        print(a, "pvh start_info missing\n")?;
        a.set_label(&mut end)?;
        acpi_poweroff_as_linux(a)?;
        hang(a)
    });
    let image = Vmlinux::new(&code).pvh_entry(HIMEM_START as u32).to_bytes();
    let run = run(config_for_image(&dir, &image, 1), Duration::from_secs(120));
    assert_eq!(run.outcome.exit.reason, "poweroff", "{:?}", run.console);
    assert_eq!(run.console, "pvh start_info ok\n");
}

#[test]
fn poweroff_stops_application_processors_waiting_for_sipi() {
    if !kvm_or_skip("poweroff_stops_application_processors_waiting_for_sipi") {
        return;
    }
    let dir = scratch_dir("two-cpus");
    let code = assemble(|a| {
        print(a, "bsp\n")?;
        acpi_poweroff_as_linux(a)?;
        hang(a)
    });
    let run = run(config_for(&dir, &code, 2), Duration::from_secs(120));
    assert_eq!(run.outcome.exit.reason, "poweroff");
    assert_eq!(run.outcome.exit.status, 0);
    assert_eq!(run.console, "bsp\n");
}

#[test]
fn triple_fault_fails_with_its_own_status() {
    if !kvm_or_skip("triple_fault_fails_with_its_own_status") {
        return;
    }
    let dir = scratch_dir("triple-fault");
    // #UD with an IDT that has no usable entries: #GP, #DF, shutdown.
    let code = assemble(|a| a.ud2());
    let run = run(config_for(&dir, &code, 1), Duration::from_secs(120));
    assert_eq!(run.outcome.exit.reason, "triple-fault");
    assert_eq!(run.outcome.exit.status, vmm::status::GUEST_FAILURE);
}

#[test]
fn i8042_reset_stops_with_the_reboot_status() {
    if !kvm_or_skip("i8042_reset_stops_with_the_reboot_status") {
        return;
    }
    let dir = scratch_dir("reboot");
    let code = assemble(|a| {
        a.mov(dx, I8042_COMMAND_PORT as u32)?;
        a.mov(al, I8042_RESET_COMMAND as u32)?;
        a.out(dx, al)?;
        hang(a)
    });
    let mut config = config_for(&dir, &code, 1);
    config.on_reboot = OnReboot::Stop;
    let run = run(config, Duration::from_secs(120));
    assert_eq!(run.outcome.exit.reason, "reboot");
    assert_eq!(run.outcome.exit.status, vmm::status::REBOOT);
}

#[test]
fn reboot_with_restart_boots_again_until_the_timeout() {
    if !kvm_or_skip("reboot_with_restart_boots_again_until_the_timeout") {
        return;
    }
    let dir = scratch_dir("restart");
    let code = assemble(|a| {
        print(a, "boot\n")?;
        a.mov(dx, I8042_COMMAND_PORT as u32)?;
        a.mov(al, I8042_RESET_COMMAND as u32)?;
        a.out(dx, al)?;
        hang(a)
    });
    let mut config = config_for(&dir, &code, 1);
    config.on_reboot = OnReboot::Restart;
    let run = run(config, Duration::from_secs(3));
    assert_eq!(run.outcome.exit.reason, "timeout");
    assert_eq!(run.outcome.exit.status, vmm::status::TIMEOUT);
    let boots = run.console.matches("boot\n").count();
    assert!(
        boots >= 2,
        "the guest booted {boots} time(s): {:?}",
        run.console
    );
}

#[test]
fn a_halted_guest_is_stopped_by_the_timeout() {
    if !kvm_or_skip("a_halted_guest_is_stopped_by_the_timeout") {
        return;
    }
    let dir = scratch_dir("timeout");
    let code = assemble(hang);
    let run = run(config_for(&dir, &code, 1), Duration::from_millis(500));
    assert_eq!(run.outcome.exit.reason, "timeout");
    assert_eq!(run.outcome.exit.status, vmm::status::TIMEOUT);
    assert!(run.outcome.report.wall_ms >= 500);
}
