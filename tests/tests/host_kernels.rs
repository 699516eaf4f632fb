//! The lab's host kernels: besides its main one (bookworm-backports' 6.12,
//! which is also the guests' kernel), `barge-lab setup` caches
//! trixie-backports' current cloud kernel (7.3 when this was written), and
//! `barge-lab run --host-kernel` boots the host on it. The most important
//! passthrough check runs there as it does on 6.12 in `passthrough.rs`: an
//! 8 GiB ivshmem BAR2 mapped once with 1 GiB pages, and data both ways.
//! The test picks the kernel by its suite, so it follows trixie-backports
//! to its next kernel; without it cached it fails naming the set-up command.

use std::process::Command;

use barge_tests::bar_passthrough::eight_gib_bar_maps_once_with_1g_pages;
use barge_tests::harness::output_text as text;
use barge_tests::lab::{LabPaths, LabState, SETUP_COMMAND, TRIXIE_HOST_KERNEL};

#[test]
fn trixie_backports_host_kernel_maps_an_8g_bar_once_with_1g_pages() {
    let run = eight_gib_bar_maps_once_with_1g_pages(
        env!("CARGO_BIN_EXE_barge-lab"),
        Some(TRIXIE_HOST_KERNEL),
    );
    let state = LabState::load(&LabPaths::from_env()).expect("the lab state loads after a run");
    let cached = state
        .host_kernel(Some(TRIXIE_HOST_KERNEL))
        .expect("the run found the kernel");
    assert_eq!(run.host_kernel, cached.version, "{run:?}");
    assert_ne!(
        run.host_kernel, state.kernel_version,
        "the host booted the main kernel, not {TRIXIE_HOST_KERNEL}'s"
    );
}

#[test]
fn a_host_kernel_not_cached_is_refused_naming_the_set_up_command() {
    let output = Command::new(env!("CARGO_BIN_EXE_barge-lab"))
        .args(["run", "--quiet", "--host-kernel", "5.10", "--", "true"])
        .output()
        .expect("barge-lab runs");
    let out = text(&output);
    assert_eq!(output.status.code(), Some(125), "{out}");
    assert!(out.contains("host kernel 5.10"), "{out}");
    assert!(out.contains(SETUP_COMMAND), "{out}");
    assert!(!out.contains("BARGE-LAB-READY"), "it booted:\n{out}");
}
