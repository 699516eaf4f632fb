//! The shared memory device end to end on this machine's /dev/kvm: a tiny
//! long-mode payload finds the device in PCI configuration space, reads the
//! register BAR (trapped), reads a pattern the test wrote into the backing
//! file, writes values back into BAR2 at its planned GPA and powers off; the
//! test checks the file from outside and the report's BAR entries.
//!
//! Without /dev/kvm the test fails with a clear message unless
//! `BARGE_SKIP_KVM=1`.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arch::layout::PDPTE_START;
use guest_programs::asm::{acpi_poweroff, assemble, hang, print};
use guest_programs::code_asm::*;
use guest_programs::elf::elf64;
use guest_programs::testing::kvm_or_skip;
use vmm::config::{DeviceConfig, SerialConfig, ShmemConfig, VmConfig};

const PATTERN: u64 = 0x1122_3344_5566_7788;
const WRITTEN: u64 = 0xfeed_f00d_cafe_0002;
/// A free page for the payload's own page directory (between barge's page
/// tables and the command line).
const EXTRA_PD: u64 = 0x10000;

/// The payload: checks, writes, prints "shmem ok" or what failed, powers off.
fn payload(registers_gpa: u64, memory_gpa: u64) -> Vec<u8> {
    assemble(|a| {
        let mut fail = a.create_label();
        let mut done = a.create_label();
        // 00:01.0's vendor/device through CONFIG_ADDRESS/CONFIG_DATA.
        a.mov(dx, 0xcf8u32)?;
        a.mov(eax, 0x8000_0800u32)?;
        a.out(dx, eax)?;
        a.mov(dx, 0xcfcu32)?;
        a.in_(eax, dx)?;
        a.cmp(eax, 0x1110_1af4u32 as i32)?;
        a.jne(fail)?;
        // The register BAR (trapped, below 4 GiB, identity-mapped) reads 0.
        a.mov(rax, registers_gpa)?;
        a.mov(ecx, dword_ptr(rax))?;
        a.test(ecx, ecx)?;
        a.jnz(fail)?;
        // Map BAR2's first GiB (2 MiB pages) through PDPT entry gpa >> 30.
        a.mov(rdi, EXTRA_PD)?;
        for i in 0..2u64 {
            a.mov(rax, (memory_gpa + (i << 21)) | 0x83)?;
            a.mov(qword_ptr(rdi + (i * 8) as i32), rax)?;
        }
        a.mov(rdi, PDPTE_START + (memory_gpa >> 30) * 8)?;
        a.mov(rax, EXTRA_PD | 0x3)?;
        a.mov(qword_ptr(rdi), rax)?;
        a.mov(rax, cr3)?;
        a.mov(cr3, rax)?;
        // Read the pattern, write it + 1 after it, and a value 2 MiB in.
        a.mov(rdi, memory_gpa)?;
        a.mov(rax, qword_ptr(rdi))?;
        a.mov(rbx, PATTERN)?;
        a.cmp(rax, rbx)?;
        a.jne(fail)?;
        a.add(rax, 1)?;
        a.mov(qword_ptr(rdi + 8), rax)?;
        a.mov(rdi, memory_gpa + (2 << 20) + 0x10)?;
        a.mov(rax, WRITTEN)?;
        a.mov(qword_ptr(rdi), rax)?;
        print(a, "shmem ok\n")?;
        a.jmp(done)?;
        a.set_label(&mut fail)?;
        print(a, "shmem check failed\n")?;
        a.set_label(&mut done)?;
        acpi_poweroff(a)?;
        hang(a)
    })
}

fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("barge-shmem-it-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn guest_shares_memory_through_bar2_and_the_report_shows_one_memslot() {
    if !kvm_or_skip("guest_shares_memory_through_bar2") {
        return;
    }
    let dir = scratch_dir("data-path");
    let backing = dir.join("shared.bin");
    let shmem: ShmemConfig = format!("size=4M,path={}", backing.display())
        .parse()
        .unwrap();
    // The plan the VM will make (phys-bits do not matter: BAR2 goes to the
    // start of the MMIO64 window, BAR0 to the start of MMIO32).
    let ram = resources::ram_regions(vmm::config::MIN_MEMORY_SIZE).unwrap();
    let windows = resources::placement::Windows::new(&ram, 40).unwrap();
    let plan = resources::plan(
        &[vmm::pci_devices::shmem::plan_input("shmem0", &shmem)],
        &windows,
    )
    .unwrap();
    let (bar0, bar2) = (&plan.devices[0].bars[0], &plan.devices[0].bars[1]);
    assert_eq!((bar0.index, bar0.gpa), (0, 0xc000_0000));
    assert_eq!((bar2.index, bar2.gpa), (2, 1 << 32));

    std::fs::write(&backing, PATTERN.to_le_bytes()).unwrap();
    let kernel = dir.join("payload.elf");
    let code = payload(bar0.gpa, bar2.gpa);
    std::fs::write(&kernel, elf64(&code)).unwrap();
    let mut config = VmConfig::new(kernel);
    config.memory.size = vmm::config::MIN_MEMORY_SIZE;
    config.serial = SerialConfig::Disabled;
    config.devices = vec![DeviceConfig::Shmem(shmem)];
    config.report = Some(dir.join("report.json"));

    let console = Arc::new(Mutex::new(Vec::new()));
    let outcome = vmm::Vm::new(config)
        .console_buffer(console.clone())
        .run_with_timeout(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("the VM could not be built: {e}"));
    let console = String::from_utf8_lossy(&console.lock().unwrap()).into_owned();
    assert_eq!(outcome.exit.reason, "poweroff", "console: {console:?}");
    assert_eq!(console, "shmem ok\n");

    // The data path, checked from outside after exit.
    let file = std::fs::File::open(&backing).unwrap();
    assert_eq!(file.metadata().unwrap().len(), 4 << 20);
    let mut word = [0u8; 8];
    file.read_exact_at(&mut word, 8).unwrap();
    assert_eq!(u64::from_le_bytes(word), PATTERN + 1);
    file.read_exact_at(&mut word, (2 << 20) + 0x10).unwrap();
    assert_eq!(u64::from_le_bytes(word), WRITTEN);

    // The report.
    let devices = &outcome.report.devices;
    assert_eq!(devices.len(), 1, "{devices:?}");
    assert_eq!(devices[0].bdf, "shmem0");
    assert_eq!(devices[0].kind, "shmem");
    assert_eq!(devices[0].guest_bdf, "0000:00:01.0");
    let bars = &devices[0].bars;
    assert_eq!(bars.len(), 2);
    assert_eq!(
        (bars[0].index, bars[0].gpa, bars[0].size),
        (0, 0xc000_0000, 256)
    );
    assert!(bars[0].trapped);
    assert_eq!((bars[0].slots, bars[0].slot_updates), (0, 0));
    let memory = &bars[1];
    assert_eq!(
        (memory.index, memory.gpa, memory.size),
        (2, 1 << 32, 4 << 20)
    );
    assert!(!memory.trapped);
    assert_eq!(
        (memory.slots, memory.slot_updates),
        (1, 1),
        "one memslot, set once"
    );
    assert_ne!(memory.hva, 0);
    assert_eq!(memory.hva % (4 << 20), 0, "HVA aligned like the GPA");
    assert_eq!(memory.planned_page_size, 2 << 20);
    assert_eq!(memory.best_possible.pages_2m, 2);
    assert_eq!(memory.planned, memory.best_possible, "no bar-align cap");
    match memory.mapped {
        Some(mapped) => {
            // Pre-faulted: every byte of the BAR is mapped, with 4K pages on a
            // file on ext4 (then huge_ok is false and a warning says why).
            assert_eq!(mapped.bytes(), 4 << 20, "{memory:?}");
            assert_eq!(memory.huge_ok, mapped == memory.planned);
            if !memory.huge_ok {
                let warning = memory.warning.as_deref().unwrap_or_default();
                assert!(warning.contains("BAR 2 of shmem0"), "{warning}");
            }
            assert!(memory.prefault_ms.is_some());
        }
        None => eprintln!("KVM_PRE_FAULT_MEMORY unavailable here: mapped not measured"),
    }
    // The report file says the same.
    let json = std::fs::read_to_string(dir.join("report.json")).unwrap();
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(value["devices"][0]["bars"][1]["slot_updates"], 1);
    assert_eq!(value["devices"][0]["bars"][1]["gpa"], 1u64 << 32);
}
