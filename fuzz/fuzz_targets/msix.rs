//! The MSI-X table and PBA model: table and PBA reads and writes, Message
//! Control writes, device-side triggers.
//!
//! The first two bytes are the vector count (masked to 0..4096, so invalid
//! counts are tried too). Selector (low 3 bits): 0-1 table, 2 PBA, 3
//! control_write (low 16 bits of the data), 4 trigger (vector = offset),
//! 5 reset, 6-7 table. Selector bit 3: offset raw instead of reduced.
#![no_main]

use barge_fuzz::accesses;
use devices::pci::msix::MsixTable;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((count, input)) = input.split_first_chunk::<2>() else {
        return;
    };
    let vectors = u16::from_le_bytes(*count) & 0x0fff;
    let Ok(mut table) = MsixTable::new(vectors) else {
        return;
    };
    for access in accesses(input) {
        let raw = access.selector & 8 == 8;
        let reduce = |size: u64| {
            if raw {
                u64::from(access.offset)
            } else {
                u64::from(access.offset) % (size + 32)
            }
        };
        match (access.selector & 7, access.write) {
            (0 | 1 | 6 | 7, None) => {
                table.table_read(reduce(table.table_size()), &mut vec![0; access.width])
            }
            (0 | 1 | 6 | 7, Some(data)) => {
                table.table_write(reduce(table.table_size()), &data);
            }
            (2, None) => table.pba_read(reduce(table.pba_size()), &mut vec![0; access.width]),
            (2, Some(data)) => table.pba_write(reduce(table.pba_size()), &data),
            (3, Some(data)) => {
                let mut control = [0u8; 2];
                for (slot, byte) in control.iter_mut().zip(&data) {
                    *slot = *byte;
                }
                table.control_write(u16::from_le_bytes(control));
            }
            (3, None) => {
                let _ = table.message_control();
            }
            (4, _) => {
                let vector = access.offset as u16;
                table.trigger(vector);
                let _ = table.is_pending(vector);
                let _ = table.is_vector_masked(vector);
                let _ = table.entry(vector);
            }
            _ => table.reset(),
        }
    }
    assert_eq!(table.entries().len(), usize::from(vectors));
});
