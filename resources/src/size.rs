//! Sizes for people: `format_size` writes a byte count in binary units
//! ("512 MiB", "1.50 KiB"), as the plan table, the planner's errors and the
//! bench print them. (vmm's `format_option_size` writes the `512M` form an
//! option takes.)

/// `bytes` with a binary unit: exact (`128 GiB`, `256 B`) when it divides, else two
/// decimals (`1.50 KiB`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes >> (10 * (unit + 1)) > 0 {
        unit += 1;
    }
    let scale = 1u64 << (10 * unit);
    if bytes % scale == 0 {
        format!("{} {}", bytes / scale, UNITS[unit])
    } else {
        format!("{:.2} {}", bytes as f64 / scale as f64, UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn format_size_is_exact_when_it_can_be() {
        assert_eq!(format_size(256), "256 B");
        assert_eq!(format_size(128 * GIB), "128 GiB");
        assert_eq!(format_size(1536), "1.50 KiB");
        assert_eq!(format_size(0), "0 B");
    }
}
