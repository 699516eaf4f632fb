//! The bench's output: a table for people, JSON for programs, and an SVG
//! chart (one panel per metric, one bar per mode with its min..max range,
//! a log scale where the modes differ by more than 20x).

use std::fmt::Write;

use resources::placement::format_size;
use vmm::report::PageCountsReport;

use super::faults::{self, FaultCounts};
use super::{BenchMode, BenchResult, ModeResult, Stat, METRICS};

/// A number with about three significant digits.
pub fn format_value(v: f64) -> String {
    if !v.is_finite() {
        return "-".to_string();
    }
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else if a >= 0.001 || a == 0.0 {
        format!("{v:.3}")
    } else {
        format!("{v:.2e}")
    }
}

fn format_stat(stat: Option<&Stat>) -> String {
    match stat {
        Some(s) if s.min == s.max => format_value(s.median),
        Some(s) => format!(
            "{} ({}..{})",
            format_value(s.median),
            format_value(s.min),
            format_value(s.max)
        ),
        None => "-".to_string(),
    }
}

/// `1Gx8`, `2Mx512 4Kx3`, `-` when none.
pub fn describe_pages(pages: Option<&PageCountsReport>) -> String {
    let Some(p) = pages else {
        return "-".to_string();
    };
    let parts: Vec<String> = [("1G", p.pages_1g), ("2M", p.pages_2m), ("4K", p.pages_4k)]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(name, n)| format!("{name}x{n}"))
        .collect();
    if parts.is_empty() {
        "none".to_string()
    } else {
        parts.join(" ")
    }
}

fn first_sample_text(mode: &ModeResult, f: impl Fn(&super::Sample) -> String) -> String {
    let texts: Vec<String> = mode.samples.iter().map(&f).collect();
    match texts.first() {
        None => "-".to_string(),
        Some(first) if texts.iter().all(|t| t == first) => first.clone(),
        Some(_) => texts.join(" / "),
    }
}

fn faults_text(counts: Option<&FaultCounts>) -> String {
    counts.map_or_else(|| "-".to_string(), faults::describe)
}

fn ratio_text(ratio: Option<f64>) -> String {
    ratio.map_or_else(
        || "- (needs 4k and 1g)".to_string(),
        |r| format!("{}x", format_value(r)),
    )
}

/// The human-readable table.
pub fn table(result: &BenchResult) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "barge bench: {} BAR {} ({}), {} repetition{}, TSC {} kHz",
        result.device,
        result.bar,
        format_size(result.bar_size),
        result.reps,
        if result.reps == 1 { "" } else { "s" },
        result.tsc_khz
    );
    let _ = writeln!(out, "mode order: {}", result.order);
    let _ = writeln!(
        out,
        "guest: BAR mapped with 1 GiB guest pages; window {} x {} passes; {} random reads",
        format_size(result.window),
        result.passes,
        result.random_reads
    );
    let _ = writeln!(out, "host faults: {}", result.host_faults);
    let _ = writeln!(out, "values: median (min..max) over repetitions");
    let _ = writeln!(out);

    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut header = vec!["metric".to_string(), "unit".to_string()];
    header.extend(result.modes.iter().map(|m| m.mode.name().to_string()));
    rows.push(header);
    for metric in METRICS {
        let mut row = vec![metric.label.to_string(), metric.unit.to_string()];
        row.extend(
            result
                .modes
                .iter()
                .map(|m| format_stat(m.stats.get(metric.key))),
        );
        rows.push(row);
    }
    type TextOf = fn(&super::Sample) -> String;
    let extra: [(&str, TextOf); 4] = [
        ("KVM pages after pre-fault", |s| {
            describe_pages(s.mapped.as_ref())
        }),
        ("host fault calls, pre-fault VM", |s| {
            faults_text(s.prefault_host_faults.as_ref())
        }),
        ("host fault calls, first-touch VM", |s| {
            faults_text(s.touch_host_faults.as_ref())
        }),
        ("KVM pages at exit, first-touch VM", |s| {
            describe_pages(Some(&s.touch_kvm_pages))
        }),
    ];
    for (label, text) in extra {
        let mut row = vec![label.to_string(), String::new()];
        row.extend(result.modes.iter().map(|m| first_sample_text(m, text)));
        rows.push(row);
    }
    let mut row = vec!["guest page size".to_string(), String::new()];
    row.extend(result.modes.iter().map(|m| {
        first_sample_text(m, |s| {
            if s.guest_1g_pages { "1G" } else { "2M" }.to_string()
        })
    }));
    rows.push(row);

    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|t| t.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, t)| format!("{t:<width$}", width = widths[c]))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "ratios (4k / 1g, medians):");
    let _ = writeln!(
        out,
        "  pre-fault             {}",
        ratio_text(result.ratios.prefault_4k_over_1g)
    );
    let _ = writeln!(
        out,
        "  first touch           {}",
        ratio_text(result.ratios.first_touch_4k_over_1g)
    );
    let _ = writeln!(
        out,
        "  random-read latency   {}",
        ratio_text(result.ratios.random_read_4k_over_1g)
    );
    out
}

/// The result as pretty JSON.
pub fn json(result: &BenchResult) -> String {
    // Plain structs, string keys, finite or null numbers: cannot fail.
    let mut text = serde_json::to_string_pretty(result).unwrap_or_else(|_| "{}".to_string());
    text.push('\n');
    text
}

fn mode_colour(mode: BenchMode) -> &'static str {
    match mode {
        BenchMode::Size4K => "#d62728",
        BenchMode::Size2M => "#ff7f0e",
        BenchMode::Size1G => "#2ca02c",
        BenchMode::Auto => "#1f77b4",
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Maps values to bar heights: linear from 0, or log10 between decades.
struct Scale {
    log: bool,
    lo: f64,
    hi: f64,
}

impl Scale {
    fn new(values: &[f64]) -> Scale {
        let positive: Vec<f64> = values
            .iter()
            .copied()
            .filter(|v| v.is_finite() && *v > 0.0)
            .collect();
        let max = positive.iter().copied().fold(0.0, f64::max);
        let min = positive.iter().copied().fold(f64::INFINITY, f64::min);
        if max > 0.0 && min.is_finite() && max / min > 20.0 {
            Scale {
                log: true,
                lo: min.log10().floor(),
                hi: max.log10().ceil(),
            }
        } else {
            Scale {
                log: false,
                lo: 0.0,
                hi: if max > 0.0 { max * 1.1 } else { 1.0 },
            }
        }
    }

    /// 0..=1 of the plot height.
    fn fraction(&self, v: f64) -> f64 {
        if !v.is_finite() || v <= 0.0 {
            return 0.0;
        }
        let f = if self.log {
            (v.log10() - self.lo) / (self.hi - self.lo).max(1e-9)
        } else {
            v / self.hi
        };
        f.clamp(0.0, 1.0)
    }
}

/// The chart: one panel per metric, a bar per mode (median) with a line
/// for its min..max, values written on the bars, the ratios underneath.
pub fn svg(result: &BenchResult) -> String {
    const PANEL_W: f64 = 300.0;
    const PANEL_H: f64 = 230.0;
    const COLUMNS: usize = 3;
    const TOP: f64 = 70.0;
    const PLOT_H: f64 = 150.0;
    let rows = METRICS.len().div_ceil(COLUMNS);
    let width = PANEL_W * COLUMNS as f64 + 20.0;
    let height = TOP + PANEL_H * rows as f64 + 80.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="22" font-size="15" font-weight="bold">{}</text>"#,
        escape(&format!(
            "barge bench: {} BAR {} ({}), median of {} (bars), min..max (lines)",
            result.device,
            result.bar,
            format_size(result.bar_size),
            result.reps
        ))
    );
    // Legend.
    for (i, mode) in result.modes.iter().enumerate() {
        let x = 10.0 + 90.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="34" width="12" height="12" fill="{}"/><text x="{}" y="44">{}</text>"#,
            mode_colour(mode.mode),
            x + 16.0,
            mode.mode.name()
        );
    }
    for (index, metric) in METRICS.iter().enumerate() {
        let px = 10.0 + PANEL_W * (index % COLUMNS) as f64;
        let py = TOP + PANEL_H * (index / COLUMNS) as f64;
        let stats: Vec<(BenchMode, Option<Stat>)> = result
            .modes
            .iter()
            .map(|m| (m.mode, m.stats.get(metric.key).copied()))
            .collect();
        let all: Vec<f64> = stats
            .iter()
            .filter_map(|(_, s)| *s)
            .flat_map(|s| [s.min, s.max, s.median])
            .collect();
        let scale = Scale::new(&all);
        // Two lines, so that long titles stay inside their panel.
        let subtitle = format!(
            "{}{}, {} is better",
            metric.unit,
            if scale.log { ", log scale" } else { "" },
            if metric.lower_is_better {
                "lower"
            } else {
                "higher"
            }
        );
        let _ = writeln!(
            s,
            r##"<text x="{px}" y="{}" font-weight="bold">{}</text><text x="{px}" y="{}" fill="#555">{}</text>"##,
            py + 12.0,
            escape(metric.label),
            py + 25.0,
            escape(&subtitle)
        );
        let base = py + 37.0 + PLOT_H;
        let _ = writeln!(
            s,
            r##"<line x1="{px}" y1="{base}" x2="{}" y2="{base}" stroke="#444"/>"##,
            px + PANEL_W - 30.0
        );
        let slot = (PANEL_W - 30.0) / stats.len().max(1) as f64;
        for (i, (mode, stat)) in stats.iter().enumerate() {
            let x = px + slot * i as f64 + slot * 0.15;
            let w = slot * 0.7;
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
                x + w / 2.0,
                base + 13.0,
                mode.name()
            );
            let Some(stat) = stat else {
                let _ = writeln!(
                    s,
                    r#"<text x="{}" y="{}" text-anchor="middle">n/a</text>"#,
                    x + w / 2.0,
                    base - 4.0
                );
                continue;
            };
            let h = scale.fraction(stat.median) * PLOT_H;
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{:.1}" width="{w:.1}" height="{h:.1}" fill="{}"/>"#,
                base - h,
                mode_colour(*mode)
            );
            if stat.max > stat.min {
                let y1 = base - scale.fraction(stat.min) * PLOT_H;
                let y2 = base - scale.fraction(stat.max) * PLOT_H;
                let cx = x + w / 2.0;
                let _ = writeln!(
                    s,
                    r#"<line x1="{cx:.1}" y1="{y1:.1}" x2="{cx:.1}" y2="{y2:.1}" stroke="black"/>"#
                );
            }
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                x + w / 2.0,
                (base - h - 4.0).max(py + 36.0),
                format_value(stat.median)
            );
        }
    }
    let y = TOP + PANEL_H * rows as f64 + 10.0;
    let ratios = format!(
        "4k / 1g (medians): pre-fault {}, first touch {}, random-read latency {}",
        ratio_text(result.ratios.prefault_4k_over_1g),
        ratio_text(result.ratios.first_touch_4k_over_1g),
        ratio_text(result.ratios.random_read_4k_over_1g)
    );
    let _ = writeln!(
        s,
        r#"<text x="10" y="{y}" font-size="13">{}</text>"#,
        escape(&ratios)
    );
    let notes = [
        format!("mode order: {}", result.order),
        format!("host faults: {}", result.host_faults),
    ];
    for (i, note) in notes.iter().enumerate() {
        let _ = writeln!(
            s,
            r#"<text x="10" y="{}">{}</text>"#,
            y + 18.0 * (i + 1) as f64,
            escape(note)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::super::{Ratios, Sample};
    use super::*;

    fn sample(rep: u32, scale: f64) -> Sample {
        Sample {
            rep,
            setup_ms: Some(2.0),
            prefault_ms: Some(800.0 * scale),
            mapped: Some(PageCountsReport {
                pages_4k: 262_144,
                ..Default::default()
            }),
            prefault_host_faults: Some(FaultCounts::from([(0, 262_144)])),
            touch_host_faults: None,
            touch_kvm_pages: PageCountsReport::default(),
            first_touch_ms: 40.0 * scale,
            read_gib_s: 5.0,
            write_gib_s: 7.0,
            random_read_ns: 90.0 * scale,
            guest_1g_pages: true,
            bar_gpa: 1 << 36,
        }
    }

    fn result() -> BenchResult {
        let modes = vec![
            ModeResult::new(BenchMode::Size4K, vec![sample(0, 1.0), sample(1, 1.2)]),
            ModeResult::new(BenchMode::Size1G, vec![sample(0, 0.001), sample(1, 0.001)]),
        ];
        let mut result = BenchResult {
            device: "vfio=0000:00:03.0".into(),
            bar: 2,
            bar_size: 1 << 30,
            tsc_khz: 2_000_000,
            reps: 2,
            order: "alternating".into(),
            window: 64 << 20,
            passes: 4,
            random_reads: 1000,
            host_faults: "kprobe".into(),
            modes,
            ratios: Ratios::default(),
        };
        result.ratios.prefault_4k_over_1g = result.ratio("prefault_ms");
        result
    }

    #[test]
    fn values_are_formatted_with_three_digits() {
        assert_eq!(format_value(815.3), "815");
        assert_eq!(format_value(4.234), "4.23");
        assert_eq!(format_value(0.0042), "0.004");
        assert_eq!(format_value(0.00001), "1.00e-5");
        assert_eq!(format_value(f64::INFINITY), "-");
    }

    #[test]
    fn table_has_every_mode_metric_and_ratio() {
        let text = table(&result());
        assert!(text.contains("metric"), "{text}");
        for needle in [
            "4k",
            "1g",
            "pre-fault whole BAR",
            "880 (800..960)",
            "4Kx262144",
            "host fault calls, pre-fault VM",
            "pre-fault             1100x",
            "first touch           - (needs 4k and 1g)",
            "mode order: alternating",
        ] {
            assert!(text.contains(needle), "{needle} missing:\n{text}");
        }
    }

    #[test]
    fn json_parses_and_names_the_modes() {
        let value: serde_json::Value = serde_json::from_str(&json(&result())).unwrap();
        assert_eq!(value["modes"][0]["mode"], "4k");
        assert_eq!(value["modes"][1]["mode"], "1g");
        assert_eq!(
            value["modes"][0]["samples"][0]["mapped"]["pages_4k"],
            262_144
        );
        assert_eq!(value["modes"][0]["stats"]["prefault_ms"]["median"], 880.0);
        assert!(value["ratios"]["prefault_4k_over_1g"].as_f64().unwrap() > 1000.0);
    }

    #[test]
    fn svg_is_well_formed_and_uses_a_log_scale_for_large_ratios() {
        let chart = svg(&result());
        assert!(chart.starts_with("<svg"), "{chart}");
        assert!(chart.trim_end().ends_with("</svg>"));
        assert!(
            chart.contains(
                "pre-fault whole BAR</text><text x=\"310\" y=\"95\" fill=\"#555\">ms, log scale"
            ),
            "{chart}"
        );
        assert!(
            chart.contains("warm sequential read</text>")
                && chart.contains(">GiB/s, higher is better</text>"),
            "{chart}"
        );
        assert_eq!(chart.matches("<svg").count(), 1);
        assert!(!chart.contains("NaN"), "{chart}");
    }

    #[test]
    fn linear_and_log_scales_map_into_the_plot() {
        let linear = Scale::new(&[1.0, 2.0]);
        assert!(!linear.log);
        assert!((linear.fraction(2.0) - 1.0 / 1.1).abs() < 1e-9);
        let log = Scale::new(&[0.004, 3260.0]);
        assert!(log.log);
        assert_eq!((log.lo, log.hi), (-3.0, 4.0));
        assert_eq!(log.fraction(0.0), 0.0);
        assert!(log.fraction(3260.0) <= 1.0);
    }
}
