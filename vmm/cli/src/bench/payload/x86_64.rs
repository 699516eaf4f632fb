//! The payload's x86-64 code generator (see the parent module).

use arch::layout::{HIMEM_START, PDPTE_START, PML4_START};
use guest_programs::asm::{acpi_poweroff, hang, put_al, put_str};
use guest_programs::code_asm::*;
use guest_programs::elf::elf64;

use super::{PayloadError, PayloadParams, MAX_BAR_SIZE};

/// A free page for a page-directory-pointer table when the BAR is above
/// 512 GiB (PML4 index not 0).
const EXTRA_PDPT: u64 = 0x40_0000;
/// Page directories for the 2 MiB fallback, one 4 KiB page per GiB.
const PD_BASE: u64 = 0x40_1000;
/// The first device barge adds to the guest is 00:01.0.
const CONFIG_ADDRESS_DEVICE1: u32 = 0x8000_0800;
const PAGE_1G: u64 = 1 << 30;
/// Page table entry flags: present, writable, large page.
const LEAF_FLAGS: u64 = 0x83;
/// Page table entry flags: present, writable (points at a table).
const TABLE_FLAGS: u64 = 0x3;
const LCG_MULTIPLIER: u64 = 6_364_136_223_846_793_005;
const LCG_INCREMENT: u64 = 1_442_695_040_888_963_407;
const LCG_SEED: u64 = 0x2545_f491_4f6c_dd1d;

/// The payload as an ELF64 executable barge can load as its kernel.
pub fn payload_elf(params: &PayloadParams) -> Result<Vec<u8>, PayloadError> {
    Ok(elf64(&payload_code(params)?))
}

/// The payload's machine code, linked at `HIMEM_START`.
pub fn payload_code(params: &PayloadParams) -> Result<Vec<u8>, PayloadError> {
    if params.bar_index > 5 {
        return Err(PayloadError::BarIndex(params.bar_index));
    }
    if params.bar_size < 4096 || params.bar_size > MAX_BAR_SIZE {
        return Err(PayloadError::BarSize {
            size: params.bar_size,
        });
    }
    let mut a = CodeAssembler::new(64)?;
    let mut print_hex = a.create_label();
    let mut power_off = a.create_label();
    let mut no_bar = a.create_label();

    // r8 = the BAR's guest physical address, from configuration space.
    let bar_register = 0x10 + 4 * u32::from(params.bar_index);
    config_read(&mut a, bar_register)?;
    a.mov(r8d, eax)?;
    a.and(r8, -16)?;
    let mut bits32 = a.create_label();
    a.test(al, 4)?;
    a.jz(bits32)?;
    config_read(&mut a, bar_register + 4)?;
    a.shl(rax, 32)?;
    a.or(r8, rax)?;
    a.set_label(&mut bits32)?;
    a.nop()?;
    put_str(&mut a, "bench.bar_gpa=")?;
    a.mov(rdi, r8)?;
    a.call(print_hex)?;
    a.test(r8, r8)?;
    a.jz(no_bar)?;

    map_bar(&mut a, params, print_hex)?;

    if params.measure {
        measure(&mut a, params, print_hex)?;
    }
    put_str(&mut a, "bench.done=")?;
    a.mov(edi, 1)?;
    a.call(print_hex)?;
    a.jmp(power_off)?;

    a.set_label(&mut no_bar)?;
    put_str(&mut a, "bench.error=no-bar-address\n")?;

    a.set_label(&mut power_off)?;
    acpi_poweroff(&mut a)?;
    hang(&mut a)?;

    // print_hex: rdi as 16 hex digits and a newline. Clobbers rax, rcx,
    // rdx, rdi and r9 (put_al's).
    a.set_label(&mut print_hex)?;
    a.mov(ecx, 16)?;
    let mut digit = a.create_label();
    let mut decimal = a.create_label();
    let mut emit = a.create_label();
    a.set_label(&mut digit)?;
    a.rol(rdi, 4)?;
    a.mov(eax, edi)?;
    a.and(eax, 0xf)?;
    a.cmp(eax, 10)?;
    a.jb(decimal)?;
    a.add(eax, i32::from(b'a') - 10)?;
    a.jmp(emit)?;
    a.set_label(&mut decimal)?;
    a.add(eax, i32::from(b'0'))?;
    a.set_label(&mut emit)?;
    put_al(&mut a)?;
    a.dec(ecx)?;
    a.jnz(digit)?;
    a.mov(eax, u32::from(b'\n'))?;
    put_al(&mut a)?;
    a.ret()?;

    Ok(a.assemble(HIMEM_START)?)
}

/// eax = the dword at `register` of device 00:01.0 (clobbers dx).
fn config_read(a: &mut CodeAssembler, register: u32) -> Result<(), IcedError> {
    a.mov(dx, 0xcf8u32)?;
    a.mov(eax, CONFIG_ADDRESS_DEVICE1 | register)?;
    a.out(dx, eax)?;
    a.mov(dx, 0xcfcu32)?;
    a.in_(eax, dx)?;
    Ok(())
}

/// Maps the BAR at r8 identity with 1 GiB pages (2 MiB without
/// PDPE1GB) and reloads CR3. Prints `bench.gbpages=1|0`.
fn map_bar(
    a: &mut CodeAssembler,
    params: &PayloadParams,
    print_hex: CodeLabel,
) -> Result<(), IcedError> {
    let gib = (params.bar_size / PAGE_1G).max(1);
    // rsi = the PDPT covering the BAR: barge's (PML4 index 0) or a new one.
    let mut low = a.create_label();
    let mut have_pdpt = a.create_label();
    a.mov(rax, r8)?;
    a.shr(rax, 39)?;
    a.jz(low)?;
    a.mov(rdi, PML4_START)?;
    a.mov(rsi, EXTRA_PDPT)?;
    a.mov(rcx, EXTRA_PDPT | TABLE_FLAGS)?;
    a.mov(qword_ptr(rdi + rax * 8), rcx)?;
    a.jmp(have_pdpt)?;
    a.set_label(&mut low)?;
    a.mov(rsi, PDPTE_START)?;
    a.set_label(&mut have_pdpt)?;
    // rsi = &pdpt[(gpa >> 30) & 511]; r10 = the first GiB's address.
    a.mov(rax, r8)?;
    a.shr(rax, 30)?;
    a.and(eax, 511)?;
    a.lea(rsi, qword_ptr(rsi + rax * 8))?;
    a.mov(r10, r8)?;
    a.mov(rax, !(PAGE_1G - 1))?;
    a.and(r10, rax)?;

    // 1 GiB pages when CPUID says the vCPU has them.
    let mut small = a.create_label();
    let mut mapped = a.create_label();
    a.mov(eax, 0x8000_0001u32)?;
    a.cpuid()?;
    a.bt(edx, 26)?;
    a.jnc(small)?;
    a.mov(rcx, gib)?;
    a.mov(rax, r10)?;
    a.or(rax, LEAF_FLAGS as i32)?;
    a.mov(rdx, PAGE_1G)?;
    let mut each_gib = a.create_label();
    a.set_label(&mut each_gib)?;
    a.mov(qword_ptr(rsi), rax)?;
    a.add(rsi, 8)?;
    a.add(rax, rdx)?;
    a.dec(rcx)?;
    a.jnz(each_gib)?;
    put_str(a, "bench.gbpages=")?;
    a.mov(edi, 1)?;
    a.call(print_hex)?;
    a.jmp(mapped)?;

    // 2 MiB pages: one page directory per GiB at PD_BASE.
    a.set_label(&mut small)?;
    a.mov(rcx, gib * 512)?;
    a.mov(rdi, PD_BASE)?;
    a.mov(rax, r10)?;
    a.or(rax, LEAF_FLAGS as i32)?;
    let mut each_2m = a.create_label();
    a.set_label(&mut each_2m)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.add(rdi, 8)?;
    a.add(rax, 2 << 20)?;
    a.dec(rcx)?;
    a.jnz(each_2m)?;
    a.mov(rcx, gib)?;
    a.mov(rax, PD_BASE | TABLE_FLAGS)?;
    let mut each_pd = a.create_label();
    a.set_label(&mut each_pd)?;
    a.mov(qword_ptr(rsi), rax)?;
    a.add(rsi, 8)?;
    a.add(rax, 0x1000)?;
    a.dec(rcx)?;
    a.jnz(each_pd)?;
    put_str(a, "bench.gbpages=")?;
    a.xor(edi, edi)?;
    a.call(print_hex)?;

    a.set_label(&mut mapped)?;
    a.mov(rax, cr3)?;
    a.mov(cr3, rax)?;
    Ok(())
}

/// rax = the TSC, after every earlier instruction (clobbers rdx).
fn timestamp(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.lfence()?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    Ok(())
}

/// Prints `bench.KEY=` and the cycles since r12 (rax = now).
fn print_elapsed(a: &mut CodeAssembler, key: &str, print_hex: CodeLabel) -> Result<(), IcedError> {
    timestamp(a)?;
    a.sub(rax, r12)?;
    a.mov(r13, rax)?;
    put_str(a, &format!("bench.{key}="))?;
    a.mov(rdi, r13)?;
    a.call(print_hex)?;
    Ok(())
}

/// The timed phases (see the module docs). r8 = the BAR's address.
fn measure(
    a: &mut CodeAssembler,
    params: &PayloadParams,
    print_hex: CodeLabel,
) -> Result<(), IcedError> {
    // First touch: one read per 4 KiB page.
    timestamp(a)?;
    a.mov(r12, rax)?;
    a.mov(rsi, r8)?;
    a.mov(rcx, params.bar_size / 4096)?;
    let mut touch = a.create_label();
    a.set_label(&mut touch)?;
    a.mov(rax, qword_ptr(rsi))?;
    a.add(rsi, 4096)?;
    a.dec(rcx)?;
    a.jnz(touch)?;
    print_elapsed(a, "first_touch_cycles", print_hex)?;

    // Warm sequential reads over the window.
    let window = params.effective_window();
    let passes = u64::from(params.passes.max(1));
    timestamp(a)?;
    a.mov(r12, rax)?;
    a.mov(r10, passes)?;
    let mut read_pass = a.create_label();
    let mut read_line = a.create_label();
    a.set_label(&mut read_pass)?;
    a.mov(rsi, r8)?;
    a.mov(rcx, window / 64)?;
    a.set_label(&mut read_line)?;
    for offset in (0..64).step_by(8) {
        a.mov(rax, qword_ptr(rsi + offset))?;
    }
    a.add(rsi, 64)?;
    a.dec(rcx)?;
    a.jnz(read_line)?;
    a.dec(r10)?;
    a.jnz(read_pass)?;
    print_elapsed(a, "read_cycles", print_hex)?;

    // Warm sequential writes over the window.
    timestamp(a)?;
    a.mov(r12, rax)?;
    a.mov(r10, passes)?;
    a.cld()?;
    let mut write_pass = a.create_label();
    a.set_label(&mut write_pass)?;
    a.mov(rdi, r8)?;
    a.mov(rcx, window / 8)?;
    a.xor(eax, eax)?;
    a.rep().stosq()?;
    a.dec(r10)?;
    a.jnz(write_pass)?;
    print_elapsed(a, "write_cycles", print_hex)?;

    // Dependent random reads over the whole BAR.
    a.mov(rbx, LCG_SEED)?;
    a.mov(r11, LCG_MULTIPLIER)?;
    a.mov(r14, LCG_INCREMENT)?;
    a.mov(r15, params.random_mask())?;
    a.mov(rcx, params.random_reads.max(1))?;
    timestamp(a)?;
    a.mov(r12, rax)?;
    a.xor(eax, eax)?;
    let mut random = a.create_label();
    a.set_label(&mut random)?;
    a.add(rbx, rax)?;
    a.imul_2(rbx, r11)?;
    a.add(rbx, r14)?;
    a.mov(rax, rbx)?;
    a.shr(rax, 20)?;
    a.and(rax, r15)?;
    a.mov(rax, qword_ptr(r8 + rax))?;
    a.dec(rcx)?;
    a.jnz(random)?;
    print_elapsed(a, "random_cycles", print_hex)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(size: u64) -> PayloadParams {
        PayloadParams {
            bar_index: 2,
            bar_size: size,
            measure: true,
            window: 64 << 20,
            passes: 2,
            random_reads: 1000,
        }
    }

    #[test]
    fn payload_assembles_small_and_starts_with_the_config_read() {
        let code = payload_code(&params(8 << 30)).unwrap();
        assert!(code.len() < 16 * 1024, "{} bytes", code.len());
        // mov dx, 0xcf8 first.
        assert_eq!(&code[..4], &[0x66, 0xba, 0xf8, 0x0c]);
        let elf = payload_elf(&params(2 << 20)).unwrap();
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(
            elf.len(),
            0x1000 + payload_code(&params(2 << 20)).unwrap().len()
        );
    }

    #[test]
    fn window_and_mask_fit_the_bar() {
        let small = params(2 << 20);
        assert_eq!(small.effective_window(), 2 << 20);
        assert_eq!(small.random_mask(), (2 << 20) - 8);
        let odd = PayloadParams {
            bar_size: 3 << 20,
            window: 100,
            ..small
        };
        assert_eq!(odd.effective_window(), 64);
        assert_eq!(odd.random_mask(), (2 << 20) - 8);
    }

    #[test]
    fn bad_bars_are_refused() {
        assert!(matches!(
            payload_code(&params(1 << 40)),
            Err(PayloadError::BarSize { .. })
        ));
        assert!(matches!(
            payload_code(&params(1024)),
            Err(PayloadError::BarSize { .. })
        ));
        let six = PayloadParams {
            bar_index: 6,
            ..params(2 << 20)
        };
        assert!(matches!(payload_code(&six), Err(PayloadError::BarIndex(6))));
    }

    /// FNV-1a over the image.
    fn fnv1a(bytes: &[u8]) -> u64 {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
            (hash ^ u64::from(*byte)).wrapping_mul(0x100_0000_01b3)
        })
    }

    #[test]
    fn payload_bytes_are_unchanged() {
        // (bar_index, bar_size, measure, window, passes, random_reads) ->
        // (length, FNV-1a) of payload_elf, recorded before the ELF writer
        // and the COM1/poweroff sequences moved to guest-programs.
        let recorded = [
            ((0, 4096, false, 64, 1, 1), (6534, 0x89c0_7145_0886_dc77)),
            (
                (2, 2 << 20, true, 64 << 20, 2, 1000),
                (8959, 0xbab2_99f9_4758_da69),
            ),
            (
                (2, 8 << 30, true, 64 << 20, 2, 1000),
                (8959, 0xf7cc_cb59_b770_44b1),
            ),
            (
                (5, 512 << 30, true, 1 << 30, 3, 1 << 20),
                (8959, 0xb962_78a7_fd62_d925),
            ),
            ((1, 3 << 20, true, 100, 0, 0), (8959, 0x1ce7_474d_e440_ff65)),
            (
                (4, 1 << 30, false, 4096, 1, 10),
                (6534, 0xa160_4572_2019_4037),
            ),
        ];
        for ((bar_index, bar_size, measure, window, passes, random_reads), expected) in recorded {
            let params = PayloadParams {
                bar_index,
                bar_size,
                measure,
                window,
                passes,
                random_reads,
            };
            let elf = payload_elf(&params).unwrap();
            assert_eq!((elf.len(), fnv1a(&elf)), expected, "{params:?}");
        }
    }
}
