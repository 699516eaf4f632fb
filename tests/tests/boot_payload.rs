//! barge's real vCPU loop on this machine's /dev/kvm: tiny long-mode
//! payloads, assembled here with iced-x86 and wrapped in a minimal ELF64
//! "vmlinux", run through the embedding API with the console captured.
//!
//! KVM here may be slow (~1M guest instructions/s), so every payload is a
//! few dozen instructions plus port I/O. Without /dev/kvm the tests fail
//! with a clear message unless `BARGE_SKIP_KVM=1`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arch::layout::{
    ACPI_POWEROFF_VALUE, ACPI_SLEEP_CONTROL_PORT, COM1_PORT, HIMEM_START, I8042_COMMAND_PORT,
    I8042_RESET_COMMAND,
};
use iced_x86::code_asm::*;
use vmm::config::{OnReboot, SerialConfig, VmConfig};
use vmm::report::Report;

const GREETING: &str = "hello from barge\n";
/// Linux's ACPI_BITMASK_WAKE_STATUS, written to the sleep status register
/// before the sleep control write in acpi_hw_extended_sleep().
const WAK_STS: u8 = 0x80;
/// Line status register: transmitter holding register empty.
const LSR_THRE: u8 = 0x20;

/// Whether the test may use KVM; panics with instructions when it is
/// missing and skipping was not asked for.
fn kvm_or_skip(test: &str) -> bool {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    match usable {
        Ok(_) => true,
        Err(_) if std::env::var("BARGE_SKIP_KVM").as_deref() == Ok("1") => {
            eprintln!("{test}: skipped: /dev/kvm is not usable and BARGE_SKIP_KVM=1");
            false
        }
        Err(e) => panic!(
            "{test} needs /dev/kvm ({e}); run on a host with KVM (or nested \
             virtualization), or set BARGE_SKIP_KVM=1 to skip the KVM tests"
        ),
    }
}

/// Writes `text` to COM1 polling LSR.THRE before each byte, like an
/// early-console driver. Unrolled, with no data references, so the same code
/// works in 64-bit and 32-bit mode.
fn print(a: &mut CodeAssembler, text: &str) -> Result<(), IcedError> {
    for byte in text.bytes() {
        let mut wait = a.create_label();
        a.mov(dx, COM1_PORT as u32 + 5)?;
        a.set_label(&mut wait)?;
        a.in_(al, dx)?;
        a.test(al, LSR_THRE as u32)?;
        a.jz(wait)?;
        a.mov(dx, COM1_PORT as u32)?;
        a.mov(al, u32::from(byte))?;
        a.out(dx, al)?;
    }
    // Give whatever label follows its own instruction.
    a.nop()?;
    Ok(())
}

/// Powers off as Linux does on a HW-reduced ACPI machine: clear WAK_STS in
/// the sleep status register, then write SLP_TYP(S5) | SLP_EN to the sleep
/// control register (both at the port the FADT names).
fn acpi_poweroff(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(dx, ACPI_SLEEP_CONTROL_PORT as u32)?;
    a.mov(al, WAK_STS as u32)?;
    a.out(dx, al)?;
    a.mov(al, ACPI_POWEROFF_VALUE as u32)?;
    a.out(dx, al)?;
    Ok(())
}

/// Halts forever with interrupts off (only a stop from barge ends it).
fn hang(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut again = a.create_label();
    a.set_label(&mut again)?;
    a.cli()?;
    a.hlt()?;
    a.jmp(again)?;
    Ok(())
}

fn assemble(body: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    assemble_bits(64, body)
}

fn assemble_bits(
    bitness: u32,
    body: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Vec<u8> {
    let mut a = CodeAssembler::new(bitness).expect("assembler");
    body(&mut a).expect("payload assembles");
    a.assemble(HIMEM_START).expect("payload assembles")
}

/// A minimal ELF64 executable: one PT_LOAD of `code` at `HIMEM_START`,
/// entry at its first byte, no PVH note (so barge uses the 64-bit entry).
fn elf64(code: &[u8]) -> Vec<u8> {
    elf64_with_pvh(code, None)
}

/// Like [`elf64`]; with `pvh_entry`, a PT_NOTE carrying the Xen
/// XEN_ELFNOTE_PHYS32_ENTRY note (type 18, name "Xen") as Linux's
/// vmlinux has when built with CONFIG_PVH.
fn elf64_with_pvh(code: &[u8], pvh_entry: Option<u32>) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    const NOTE_OFFSET: usize = 0x800;
    const CODE_OFFSET: u64 = 0x1000;
    let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
    let mut image = vec![0u8; CODE_OFFSET as usize];
    let ehdr = &mut image[..EHDR];
    ehdr[0..4].copy_from_slice(b"\x7fELF");
    ehdr[4] = 2; // ELFCLASS64
    ehdr[5] = 1; // ELFDATA2LSB
    ehdr[6] = 1; // EV_CURRENT
    ehdr[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    ehdr[18..20].copy_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
    ehdr[20..24].copy_from_slice(&1u32.to_le_bytes()); // e_version
    ehdr[24..32].copy_from_slice(&HIMEM_START.to_le_bytes()); // e_entry
    ehdr[32..40].copy_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    ehdr[52..54].copy_from_slice(&(EHDR as u16).to_le_bytes()); // e_ehsize
    ehdr[54..56].copy_from_slice(&(PHDR as u16).to_le_bytes()); // e_phentsize
    ehdr[56..58].copy_from_slice(&phnum.to_le_bytes()); // e_phnum
    let phdr = &mut image[EHDR..EHDR + PHDR];
    phdr[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    phdr[4..8].copy_from_slice(&7u32.to_le_bytes()); // RWX
    phdr[8..16].copy_from_slice(&CODE_OFFSET.to_le_bytes()); // p_offset
    phdr[16..24].copy_from_slice(&HIMEM_START.to_le_bytes()); // p_vaddr
    phdr[24..32].copy_from_slice(&HIMEM_START.to_le_bytes()); // p_paddr
    phdr[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes()); // p_filesz
    phdr[40..48].copy_from_slice(&(code.len() as u64).to_le_bytes()); // p_memsz
    phdr[48..56].copy_from_slice(&0x1000u64.to_le_bytes()); // p_align
    if let Some(entry) = pvh_entry {
        let mut note = Vec::new();
        note.extend_from_slice(&4u32.to_le_bytes()); // n_namesz
        note.extend_from_slice(&4u32.to_le_bytes()); // n_descsz
        note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
        note.extend_from_slice(b"Xen\0");
        note.extend_from_slice(&entry.to_le_bytes());
        image[NOTE_OFFSET..NOTE_OFFSET + note.len()].copy_from_slice(&note);
        let phdr = &mut image[EHDR + PHDR..EHDR + 2 * PHDR];
        phdr[0..4].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
        phdr[4..8].copy_from_slice(&4u32.to_le_bytes()); // R
        phdr[8..16].copy_from_slice(&(NOTE_OFFSET as u64).to_le_bytes());
        phdr[32..40].copy_from_slice(&(note.len() as u64).to_le_bytes()); // p_filesz
        phdr[40..48].copy_from_slice(&(note.len() as u64).to_le_bytes()); // p_memsz
        phdr[48..56].copy_from_slice(&4u64.to_le_bytes()); // p_align
    }
    image.extend_from_slice(code);
    image
}

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
        acpi_poweroff(a)?;
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
        acpi_poweroff(a)?;
        hang(a)
    });
    let image = elf64_with_pvh(&code, Some(HIMEM_START as u32));
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
        acpi_poweroff(a)?;
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
