//! The text form of a [`Plan`]: the table `barge plan` prints ([`render_table`]: per
//! device one line per BAR, then its areas and trapped ranges with the reason each traps).

use std::fmt::Write as _;

use super::types::{BarPlacement, BarRange, PageCounts, PageSize, Plan, HOST_PAGE_SIZE};
use crate::size::format_size;

/// A human-readable table of the plan: per device, one line per BAR and one per area and
/// trapped range, sizes with units, addresses in hex.
pub fn render_table(plan: &Plan) -> String {
    let mut out = String::new();
    for device in &plan.devices {
        let cap = device
            .align_cap
            .map_or("auto".to_string(), |c| c.name().to_ascii_lowercase());
        let _ = writeln!(out, "{}  (bar-align {cap})", device.name);
        let _ = writeln!(
            out,
            "  {:<3} {:>9}  {:<11} {:<6}  {:<37}  {:>9}  page",
            "BAR", "size", "type", "window", "gpa", "hva-align"
        );
        for bar in &device.bars {
            let kind = format!(
                "{}{}",
                bar.width,
                if bar.prefetchable { " pref" } else { "" }
            );
            let range = format!("{:#018x}-{:#018x}", bar.gpa, bar.gpa + bar.reserved() - 1);
            let page = bar.page_size().map_or("trap", PageSize::name);
            let mut align = format_size(bar.hva_align);
            if bar.hva_phase() != 0 {
                align = format!("{align}+{}", format_size(bar.hva_phase()));
            }
            let _ = writeln!(
                out,
                "  {:<3} {:>9}  {:<11} {:<6}  {:<37}  {:>9}  {}",
                bar.index,
                format_size(bar.size),
                kind,
                bar.window(),
                range,
                align,
                page
            );
            for area in &bar.areas {
                let _ = writeln!(
                    out,
                    "        area {:#x}+{} at gpa {:#x}: page {} ({})",
                    area.offset,
                    format_size(area.size),
                    area.gpa,
                    area.page_size,
                    describe_pages(&area.pages)
                );
            }
            for trap in &bar.traps() {
                let why = trap_reason(bar, trap);
                let _ = writeln!(
                    out,
                    "        trap {:#x}+{}{why}",
                    trap.offset,
                    format_size(trap.size)
                );
            }
        }
    }
    out
}

fn describe_pages(pages: &PageCounts) -> String {
    let parts: Vec<String> = [
        (pages.pages_1g, "1G"),
        (pages.pages_2m, "2M"),
        (pages.pages_4k, "4K"),
    ]
    .into_iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, name)| format!("{n} x {name}"))
    .collect();
    parts.join(" + ")
}

fn trap_reason(bar: &BarPlacement, trap: &BarRange) -> &'static str {
    let touches = |pages: Option<BarRange>| {
        pages.is_some_and(|p| p.offset < trap.end() && trap.offset < p.end())
    };
    if bar.size < HOST_PAGE_SIZE {
        " (sub-page BAR: emulated, no memslot)"
    } else if touches(bar.msix_table_pages) && touches(bar.msix_pba_pages) {
        " (MSI-X table and PBA)"
    } else if touches(bar.msix_table_pages) {
        " (MSI-X table)"
    } else if touches(bar.msix_pba_pages) {
        " (MSI-X PBA)"
    } else if trap.size < HOST_PAGE_SIZE && trap.end() == bar.size {
        " (sub-page tail)"
    } else {
        " (not mmap-able)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::fixtures::{h100, windows, GIB};
    use crate::placement::planner::plan;

    #[test]
    fn table_shows_units_and_hex() {
        let plan = plan(&[h100("0000:41:00.0")], &windows(8 * GIB, 46)).unwrap();
        let table = render_table(&plan);
        assert!(table.contains("0000:41:00.0  (bar-align auto)"), "{table}");
        assert!(table.contains("128 GiB"), "{table}");
        assert!(table.contains("0x0000002000000000"), "{table}");
        assert!(table.contains("128 x 1G"), "{table}");
    }
}
