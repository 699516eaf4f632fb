//! Shared decoding for barge's fuzz targets: an input is a sequence of
//! guest accesses, each encoded as
//!
//! ```text
//! op:u8  bit 0      1 = write, 0 = read
//!        bits 1..=3 width index into WIDTHS (1, 2, 4, 8, 3, 5, 6, 7)
//!        bits 4..=7 selector (which register block, for targets with several)
//! offset:u32 little endian (each target reduces it to its block's size)
//! data:  `width` bytes, writes only
//! ```
//!
//! A truncated last access is dropped. Widths 3, 5, 6 and 7 are in the
//! table because KVM reports MMIO accesses of any length up to 8 and
//! string port I/O of any length: models must ignore them, never panic.

/// Access widths, indexed by bits 1..=3 of the op byte.
pub const WIDTHS: [usize; 8] = [1, 2, 4, 8, 3, 5, 6, 7];

/// One decoded guest access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// Which register block (0..16); targets use what they need.
    pub selector: u8,
    /// Offset, to be reduced by the target.
    pub offset: u32,
    /// Read (`None`, with `width`) or write (`Some(data)`).
    pub write: Option<Vec<u8>>,
    /// Access width in bytes.
    pub width: usize,
}

/// Decodes `input` into accesses (see the module docs).
pub fn accesses(mut input: &[u8]) -> Vec<Access> {
    let mut out = Vec::new();
    while input.len() >= 5 {
        let op = input[0];
        let offset = u32::from_le_bytes([input[1], input[2], input[3], input[4]]);
        input = &input[5..];
        let width = WIDTHS[usize::from((op >> 1) & 7)];
        let selector = op >> 4;
        let write = if op & 1 == 1 {
            if input.len() < width {
                break;
            }
            let (data, rest) = input.split_at(width);
            input = rest;
            Some(data.to_vec())
        } else {
            None
        };
        out.push(Access {
            selector,
            offset,
            write,
            width,
        });
    }
    out
}

/// Encodes accesses (for seeds and regression tests): the inverse of
/// [`accesses`]. `width` must be in [`WIDTHS`] and match a write's data.
pub fn encode(accesses: &[Access]) -> Vec<u8> {
    let mut out = Vec::new();
    for access in accesses {
        let index = WIDTHS
            .iter()
            .position(|w| *w == access.width)
            .expect("width in WIDTHS") as u8;
        let op = (access.selector << 4) | (index << 1) | u8::from(access.write.is_some());
        out.push(op);
        out.extend_from_slice(&access.offset.to_le_bytes());
        if let Some(data) = &access.write {
            assert_eq!(data.len(), access.width);
            out.extend_from_slice(data);
        }
    }
    out
}

/// A read access (seed helper).
pub fn read(selector: u8, offset: u32, width: usize) -> Access {
    Access {
        selector,
        offset,
        write: None,
        width,
    }
}

/// A write access of the `width` low bytes of `value` (seed helper).
pub fn write(selector: u8, offset: u32, width: usize, value: u64) -> Access {
    Access {
        selector,
        offset,
        write: Some(value.to_le_bytes()[..width.min(8)].to_vec()),
        width,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_then_decode_round_trips() {
        let list = vec![read(3, 0xcfc, 4), write(1, 0x10, 8, u64::MAX), write(0, 0, 3, 0x123456)];
        assert_eq!(accesses(&encode(&list)), list);
    }

    #[test]
    fn truncated_write_is_dropped() {
        let mut bytes = encode(&[write(0, 4, 4, 1)]);
        bytes.pop();
        assert!(accesses(&bytes).is_empty());
    }
}
