//! Guest RAM backing: the hugetlbfs pools `--memory hugepages=2M|1G` draws
//! from (free and total, /sys/kernel/mm/hugepages) and transparent huge
//! pages, which the default anonymous RAM asks for with madvise
//! (/sys/kernel/mm/transparent_hugepage/enabled).

use super::{CheckResult, HostView};

/// The two pools: their `--memory hugepages=` name and sysfs directory.
const POOLS: [(&str, &str); 2] = [
    ("2M", "kernel/mm/hugepages/hugepages-2048kB"),
    ("1G", "kernel/mm/hugepages/hugepages-1048576kB"),
];

/// A pool's counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool {
    /// `nr_hugepages`.
    pub total: u64,
    /// `free_hugepages`.
    pub free: u64,
}

/// `hugepages 2M`, `hugepages 1G` and `transparent hugepages`.
pub fn checks(view: &HostView) -> Vec<CheckResult> {
    let mut results: Vec<CheckResult> = POOLS
        .iter()
        .map(|(name, dir)| {
            let count = |file: &str| view.sys(&format!("{dir}/{file}"))?.parse().ok();
            let pool = count("nr_hugepages")
                .zip(count("free_hugepages"))
                .map(|(total, free)| Pool { total, free });
            pool_check(name, dir, pool)
        })
        .collect();
    results.push(thp_check(
        view.sys("kernel/mm/transparent_hugepage/enabled")
            .as_deref(),
    ));
    results
}

/// One pool: WARN when it has no free page (`--memory hugepages=` would
/// fail), or does not exist (the CPU or kernel lacks that size).
pub fn pool_check(size: &str, dir: &str, pool: Option<Pool>) -> CheckResult {
    let name = format!("hugepages {size}");
    let at_boot = if size == "1G" {
        "; 1 GiB pages are best reserved at boot: hugepagesz=1G hugepages=N"
    } else {
        ""
    };
    let reserve = format!(
        "echo N > /sys/{dir}/nr_hugepages (N pages for --memory hugepages={size}{at_boot})"
    );
    match pool {
        None => CheckResult::warn(
            name,
            format!("no {size} pool (/sys/{dir} is missing)"),
            format!("--memory hugepages={size} is not available here; the default anonymous RAM needs no pool"),
        ),
        Some(Pool { total: 0, .. }) => CheckResult::warn(
            name,
            "0 pages reserved: --memory hugepages=".to_string() + size + " fails",
            reserve,
        ),
        Some(Pool { total, free: 0 }) => CheckResult::warn(
            name,
            format!("0 of {total} free: --memory hugepages={size} fails until pages are freed"),
            reserve,
        ),
        Some(Pool { total, free }) => {
            let bytes = free.saturating_mul(if size == "1G" { 1 << 30 } else { 2 << 20 });
            CheckResult::pass(
                name,
                format!(
                    "{free} of {total} free ({} of guest RAM with --memory hugepages={size})",
                    resources::placement::format_size(bytes)
                ),
            )
        }
    }
}

/// `transparent hugepages`: barge's anonymous RAM asks for them with
/// madvise, so `always` and `madvise` both serve it.
pub fn thp_check(enabled: Option<&str>) -> CheckResult {
    let name = "transparent hugepages";
    let fix = "echo madvise > /sys/kernel/mm/transparent_hugepage/enabled (or boot with \
               transparent_hugepage=madvise); otherwise guest RAM gets 4 KiB pages unless \
               --memory hugepages= is given";
    let selected = enabled.and_then(|text| {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix('[')?.strip_suffix(']'))
    });
    match selected {
        Some(mode @ ("always" | "madvise")) => {
            CheckResult::pass(name, format!("{mode}: guest RAM gets 2 MiB pages"))
        }
        Some(mode) => CheckResult::warn(name, format!("{mode}: guest RAM gets 4 KiB pages"), fix),
        None => CheckResult::warn(
            name,
            "cannot read /sys/kernel/mm/transparent_hugepage/enabled (kernel without THP?)",
            fix,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_check::fake::FakeHost;
    use crate::host_check::Status;

    #[test]
    fn pools() {
        let dir = POOLS[1].1;
        let pass = pool_check("1G", dir, Some(Pool { total: 4, free: 2 }));
        assert_eq!(pass.status, Status::Pass);
        assert!(pass.detail.contains("2 of 4 free (2 GiB"), "{pass:?}");
        let empty = pool_check("1G", dir, Some(Pool { total: 0, free: 0 }));
        assert_eq!(empty.status, Status::Warn);
        let fix = empty.fix.unwrap();
        assert!(
            fix.contains("/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages"),
            "{fix}"
        );
        let used = pool_check("2M", POOLS[0].1, Some(Pool { total: 8, free: 0 }));
        assert_eq!(used.status, Status::Warn);
        assert!(used.detail.contains("0 of 8 free"));
        assert_eq!(pool_check("1G", dir, None).status, Status::Warn);
    }

    #[test]
    fn thp() {
        assert_eq!(
            thp_check(Some("always [madvise] never")).status,
            Status::Pass
        );
        assert_eq!(
            thp_check(Some("[always] madvise never")).status,
            Status::Pass
        );
        let never = thp_check(Some("always madvise [never]"));
        assert_eq!(never.status, Status::Warn);
        assert!(never.fix.unwrap().starts_with("echo madvise"));
        assert_eq!(thp_check(None).status, Status::Warn);
        assert_eq!(thp_check(Some("garbage")).status, Status::Warn);
    }

    #[test]
    fn read_from_a_fake_tree() {
        let host = FakeHost::new("memory");
        host.write(&format!("sys/{}/nr_hugepages", POOLS[0].1), "16\n")
            .write(&format!("sys/{}/free_hugepages", POOLS[0].1), "12\n")
            .write(
                "sys/kernel/mm/transparent_hugepage/enabled",
                "always [madvise] never\n",
            );
        let results = checks(&host.view());
        let statuses: Vec<Status> = results.iter().map(|r| r.status).collect();
        assert_eq!(
            statuses,
            [Status::Pass, Status::Warn, Status::Pass],
            "{results:?}"
        );
        assert!(
            results[0].detail.starts_with("12 of 16 free (24 MiB"),
            "{results:?}"
        );
    }
}
