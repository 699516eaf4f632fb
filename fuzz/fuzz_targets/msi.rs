//! The MSI capability model: guest reads and writes at absolute config
//! offsets around the capability, and device-side triggers.
//!
//! Header: capability offset (1 byte, dword aligned) and the device's
//! Message Control (2 bytes: 32/64-bit, per-vector masking, vector count).
//! Selector (low 2 bits): 0-2 config access, 3 trigger (vector = offset);
//! selector bit 3: offset raw (u16) instead of near the capability.
#![no_main]

use barge_fuzz::accesses;
use devices::pci::msi::MsiCapability;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((header, input)) = input.split_first_chunk::<3>() else {
        return;
    };
    let offset = u16::from(header[0] & 0xfc).max(0x40);
    let control = u16::from_le_bytes([header[1], header[2]]);
    let mut cap = MsiCapability::new(offset, control);
    for access in accesses(input) {
        let at = if access.selector & 8 == 8 {
            access.offset as u16
        } else {
            offset.saturating_sub(8) + (access.offset % 48) as u16
        };
        match (access.selector & 3, access.write) {
            (3, _) => {
                let vector = access.offset as u8;
                cap.trigger(vector);
                let _ = cap.message(vector);
                let _ = cap.is_vector_masked(vector);
            }
            (_, None) => cap.read(at, &mut vec![0; access.width]),
            (_, Some(data)) => {
                cap.write(at, &data);
            }
        }
        assert!(cap.vectors_enabled() <= cap.vectors_capable().max(1));
    }
    let _ = cap.base_message();
    let _ = (cap.mask_bits(), cap.pending_bits(), cap.size());
});
