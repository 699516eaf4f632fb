//! Tiny guest programs barge can boot without Linux: x86 machine code
//! assembled with iced-x86 and wrapped in a minimal ELF64 "vmlinux".
//!
//! `barge bench` builds its measuring guest from these pieces, and the
//! integration tests of vmm, barge and barge-tests build their payloads
//! from them. [`elf`] writes the executable, [`asm`] has the recurring
//! instruction sequences (print to COM1, power off through the ACPI sleep
//! register, halt forever) and the assemble helpers, and [`testing`] has
//! the check the KVM tests start with. The assembler itself is re-exported
//! as [`code_asm`], so a user needs no iced-x86 dependency of its own.
//!
//! Those are x86-64 and build on x86_64 hosts only; [`arm64`] has the one
//! aarch64 program barge needs (an arm64 Image that powers off through
//! PSCI), hand-encoded, built on every host.

pub mod arm64;
#[cfg(target_arch = "x86_64")]
pub mod asm;
#[cfg(target_arch = "x86_64")]
pub mod elf;
#[cfg(target_arch = "x86_64")]
pub mod testing;

#[cfg(target_arch = "x86_64")]
pub use iced_x86::code_asm;

#[cfg(test)]
mod tests {
    /// FNV-1a, to compare whole images with ones recorded from the copies
    /// this crate replaced.
    pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
            (hash ^ u64::from(*byte)).wrapping_mul(0x100_0000_01b3)
        })
    }
}
