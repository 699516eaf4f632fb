//! What the integration tests share to drive `barge-lab run` and read what it
//! brought back. The binary's path comes from the test (cargo only tells
//! integration tests where it is).

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::lab::SETUP_COMMAND;

/// stdout and stderr of a finished command, for assertion messages.
pub fn output_text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The folder `barge-lab run` printed as holding the command's results.
pub fn results_dir(output: &Output) -> PathBuf {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let line = stderr
        .lines()
        .find_map(|l| l.split("results in ").nth(1))
        .unwrap_or_else(|| panic!("no results folder printed:\n{}", output_text(output)));
    PathBuf::from(line.split(';').next().unwrap_or("").trim())
}

/// `barge-lab run --quiet ARGS...`; fails the test, naming the set-up
/// command, when the lab is not set up on this machine.
pub fn lab_run(barge_lab: &str, args: &[&str]) -> Output {
    let output = Command::new(barge_lab)
        .arg("run")
        .arg("--quiet")
        .args(args)
        .output()
        .expect("barge-lab runs");
    let text = output_text(&output);
    assert!(
        !text.contains("the lab is not set up"),
        "the lab is not set up on this machine: run `{SETUP_COMMAND}`\n{text}"
    );
    output
}

/// `barge-lab run --quiet ARGS... --script FILE` with `script` written to a
/// temporary FILE (removed afterwards); returns the output and the folder
/// holding what the script wrote under /out.
pub fn lab_script(barge_lab: &str, args: &[&str], script: &str) -> (Output, PathBuf) {
    static SCRIPTS: AtomicUsize = AtomicUsize::new(0);
    let file = std::env::temp_dir().join(format!(
        "barge-lab-script-{}-{}.sh",
        std::process::id(),
        SCRIPTS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&file, script).expect("the script file is written");
    let path = file.to_string_lossy().into_owned();
    let mut all = args.to_vec();
    all.extend(["--script", path.as_str()]);
    let output = lab_run(barge_lab, &all);
    let _ = std::fs::remove_file(&file);
    let dir = results_dir(&output);
    (output, dir)
}
