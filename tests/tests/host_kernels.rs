//! The lab's host kernels: besides its main one (bookworm-backports' 6.12,
//! which is also the guests' kernel), `barge-lab setup` caches
//! trixie-backports' current cloud kernel (7.3 when this was written), and
//! `barge-lab run --host-kernel` boots the host on it (the passthrough
//! checks on it are `lab_matrix.rs`'s 7.3 cells). A host kernel that is not
//! cached is refused, naming the set-up command.

use std::process::Command;

use barge_tests::harness::output_text as text;
use barge_tests::lab::SETUP_COMMAND;

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
