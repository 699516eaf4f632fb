//! A tiny arm64 guest, hand-encoded (four instructions after the Image header): it calls
//! PSCI `SYSTEM_OFF` with `hvc #0`, which KVM turns into a shutdown system event, and
//! spins if that ever returns. `barge host-check --exercise` boots it on aarch64 hosts.

/// Bytes of the arm64 Image header (Documentation/arch/arm64/booting.rst).
pub const IMAGE_HEADER_SIZE: usize = 64;
/// The header's magic, "ARM\x64", at offset 56.
pub const IMAGE_MAGIC: [u8; 4] = *b"ARM\x64";
/// PSCI 0.2 `SYSTEM_OFF` function ID (SMC32 calling convention).
pub const PSCI_SYSTEM_OFF: u32 = 0x8400_0008;

/// `b #64`: code0, from the header's first word to the first instruction after it.
const BRANCH_OVER_HEADER: u32 = 0x1400_0000 | (IMAGE_HEADER_SIZE as u32 / 4);
/// `movz w0, #0x0008`.
const MOVZ_W0_SYSTEM_OFF_LOW: u32 = 0x5280_0000 | ((PSCI_SYSTEM_OFF & 0xffff) << 5);
/// `movk w0, #0x8400, lsl #16`.
const MOVK_W0_SYSTEM_OFF_HIGH: u32 = 0x72a0_0000 | ((PSCI_SYSTEM_OFF >> 16) << 5);
/// `hvc #0`.
const HVC_0: u32 = 0xd400_0002;
/// `b .`.
const BRANCH_TO_SELF: u32 = 0x1400_0000;
/// The kernel's memory footprint the header declares (one page: code, no BSS).
const IMAGE_SIZE: u64 = 4096;
/// Header flags: little-endian, 4 KiB pages, placeable anywhere (bits 0, 1-2, 3).
const IMAGE_FLAGS: u64 = 0b1010;

/// An arm64 Image that powers the VM off through PSCI `SYSTEM_OFF`.
pub fn poweroff_image() -> Vec<u8> {
    let mut image = vec![0u8; IMAGE_HEADER_SIZE];
    image[0..4].copy_from_slice(&BRANCH_OVER_HEADER.to_le_bytes());
    // text_offset (8..16) stays 0.
    image[16..24].copy_from_slice(&IMAGE_SIZE.to_le_bytes());
    image[24..32].copy_from_slice(&IMAGE_FLAGS.to_le_bytes());
    image[56..60].copy_from_slice(&IMAGE_MAGIC);
    for word in [
        MOVZ_W0_SYSTEM_OFF_LOW,
        MOVK_W0_SYSTEM_OFF_HIGH,
        HVC_0,
        BRANCH_TO_SELF,
    ] {
        image.extend_from_slice(&word.to_le_bytes());
    }
    image
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(image: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(image[offset..offset + 4].try_into().unwrap())
    }

    #[test]
    fn the_image_has_the_header_and_the_psci_call() {
        let image = poweroff_image();
        assert_eq!(image.len(), IMAGE_HEADER_SIZE + 16);
        assert_eq!(&image[56..60], b"ARM\x64");
        // code0 branches to offset 64: imm26 = 16 words.
        assert_eq!(word(&image, 0), 0x1400_0010);
        assert_eq!(u64::from_le_bytes(image[16..24].try_into().unwrap()), 4096);
        // The encodings as an assembler gives them (GNU as 2.40).
        assert_eq!(word(&image, 64), 0x5280_0100, "movz w0, #0x8");
        assert_eq!(word(&image, 68), 0x72b0_8000, "movk w0, #0x8400, lsl #16");
        assert_eq!(word(&image, 72), 0xd400_0002, "hvc #0");
        assert_eq!(word(&image, 76), 0x1400_0000, "b .");
    }
}
