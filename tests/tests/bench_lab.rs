//! `barge bench` in the lab, once, at the smallest useful size: a 1 GiB
//! ivshmem BAR2 passed through with VFIO, one repetition of every mode,
//! a small window and few random reads. It shows the bench works (table,
//! JSON, SVG, KVM page counts, host faults by order); it is not a timed
//! test: the ratios are printed, not asserted beyond "1g is not slower to
//! pre-fault than 4k". The full comparison (8 GiB, 3 repetitions) is the
//! README's command.

use barge_tests::harness::{lab_script, output_text as text};

const GIB: u64 = 1 << 30;

const SCRIPT: &str = "\
barge bench --device vfio=$LAB_IVSHMEM0 --bar 2 --reps 1 --window 16M --passes 2 \
--random-reads 100000 --svg /out/bench.svg --json-file /out/bench.json \
> /out/bench.txt 2> /out/bench.err
echo $? > /out/status
";

#[test]
fn bench_runs_every_mode_on_a_vfio_bar_and_prints_table_json_and_svg() {
    let (output, dir) = lab_script(
        env!("CARGO_BIN_EXE_barge-lab"),
        &["--timeout", "900", "--ivshmem", "1G"],
        SCRIPT,
    );
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let (table, errors) = (read("bench.txt"), read("bench.err"));
    assert!(
        output.status.success(),
        "{}\n{table}\n{errors}",
        text(&output)
    );
    assert_eq!(read("status").trim(), "0", "{table}\n{errors}");
    println!("{table}");

    // The table: every mode, the ratios, host faults counted.
    let header = table
        .lines()
        .find(|l| l.starts_with("metric"))
        .unwrap_or_else(|| panic!("no table:\n{table}\n{errors}"));
    let columns: Vec<&str> = header.split_whitespace().collect();
    assert_eq!(
        columns,
        ["metric", "unit", "4k", "2m", "1g", "auto"],
        "{table}"
    );
    for needle in [
        "pre-fault whole BAR",
        "guest first touch (no pre-fault)",
        "warm random 8-byte read",
        "ratios (4k / 1g, medians):",
        "host faults: kprobe on vfio_pci_mmap_huge_fault",
    ] {
        assert!(table.contains(needle), "{needle} missing:\n{table}");
    }
    let pages = table
        .lines()
        .find(|l| l.starts_with("KVM pages after pre-fault"))
        .unwrap_or_default();
    assert!(pages.contains("4Kx262144"), "{pages}");
    assert!(pages.contains("2Mx512"), "{pages}");
    assert_eq!(pages.matches("1Gx1").count(), 2, "1g and auto: {pages}");

    // The JSON.
    let json: serde_json::Value =
        serde_json::from_str(&read("bench.json")).expect("bench.json parses");
    assert_eq!(json["bar"], 2);
    assert_eq!(json["bar_size"], GIB);
    let modes = json["modes"].as_array().unwrap();
    let names: Vec<&str> = modes.iter().filter_map(|m| m["mode"].as_str()).collect();
    assert_eq!(names, ["4k", "2m", "1g", "auto"]);
    for mode in modes {
        let sample = &mode["samples"][0];
        let mapped = &sample["mapped"];
        match mode["mode"].as_str().unwrap() {
            "4k" => assert_eq!(mapped["pages_4k"], 262_144, "{sample}"),
            "2m" => assert_eq!(mapped["pages_2m"], 512, "{sample}"),
            _ => {
                assert_eq!(mapped["pages_1g"], 1, "{sample}");
                // One host fault per GiB, at order 18, in both VMs.
                assert_eq!(sample["prefault_host_faults"]["18"], 1, "{sample}");
                assert_eq!(sample["touch_host_faults"]["18"], 1, "{sample}");
            }
        }
        assert!(sample["first_touch_ms"].as_f64().unwrap() > 0.0, "{sample}");
        assert!(sample["random_read_ns"].as_f64().unwrap() > 0.0, "{sample}");
        assert_eq!(sample["guest_1g_pages"], true, "{sample}");
    }
    let ratio = json["ratios"]["prefault_4k_over_1g"].as_f64().unwrap();
    assert!(ratio > 1.0, "pre-fault at 4k slower than at 1g: {ratio}");

    // The chart.
    let svg = read("bench.svg");
    assert!(
        svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
        "{svg}"
    );
    assert!(svg.contains("pre-fault whole BAR"), "{svg}");
}
