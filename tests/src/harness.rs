//! What the integration tests share to drive `barge-lab run` and read what it
//! brought back. The binary's path comes from the test (cargo only tells
//! integration tests where it is).

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::lab::run::{LAB_HOST_PANIC, LAB_HOST_STOPPED};
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
    printed_results_dir(output)
        .unwrap_or_else(|| panic!("no results folder printed:\n{}", output_text(output)))
}

/// The results folder, if `barge-lab run` got as far as printing one (not
/// when the lab itself failed, e.g. without a set-up step's files).
pub fn printed_results_dir(output: &Output) -> Option<PathBuf> {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let line = stderr.lines().find_map(|l| l.split("results in ").nth(1))?;
    Some(PathBuf::from(line.split(';').next().unwrap_or("").trim()))
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
    let (output, dir) = lab_script_outcome(barge_lab, args, script);
    let dir = dir.unwrap_or_else(|| panic!("no results folder printed:\n{}", output_text(&output)));
    (output, dir)
}

/// [`lab_script`], without failing when the lab printed no results folder.
pub fn lab_script_outcome(
    barge_lab: &str,
    args: &[&str],
    script: &str,
) -> (Output, Option<PathBuf>) {
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
    let mut output = lab_run(barge_lab, &all);
    // The lab host itself (6.12 under QEMU's full emulation) can be lost
    // mid-run, its kernel panicking ("corrupted stack end detected inside
    // scheduler") or the machine resetting without a word, under barge and
    // under the reference QEMU alike: not what the tests check. Its run is
    // lost; the whole lab runs again, up to LAB_RUNS times in all.
    for run in 2..=LAB_RUNS {
        let Some(lost) = lab_host_lost(&output) else {
            break;
        };
        println!("lab: {lost}; running the lab again (run {run} of at most {LAB_RUNS})");
        output = lab_run(barge_lab, &all);
    }
    let _ = std::fs::remove_file(&file);
    let dir = printed_results_dir(&output);
    (output, dir)
}

/// How many times [`lab_script`] runs the lab when the lab host is lost
/// mid-run (in four clean-clone CI runs of one session, debian_lab's lab
/// host was lost 4 times, twice in a row once).
pub const LAB_RUNS: usize = 4;

/// What happened when `barge-lab run` ended because the lab host stopped
/// before it reported a result (it printed no results folder and said
/// so): its kernel's panic line, or that it stopped without one.
pub fn lab_host_lost(output: &Output) -> Option<String> {
    if printed_results_dir(output).is_some() {
        return None;
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stopped = stderr
        .lines()
        .find(|line| line.contains(LAB_HOST_STOPPED))?;
    let marker = format!("; {LAB_HOST_PANIC}: ");
    Some(match stopped.split(marker.as_str()).nth(1) {
        Some(after) => {
            let line = after.split("; console log ").next().unwrap_or("").trim();
            format!("{LAB_HOST_PANIC} ({line})")
        }
        None => "the lab host stopped without reporting a result (no kernel panic in its log: \
                 a reset)"
            .to_string(),
    })
}

/// A sparse file of `size` bytes under the temporary folder (an ivshmem
/// device's BAR2 when given as `--ivshmem SIZE,file=PATH`), named `name`
/// with this process's id.
pub fn sparse_file(name: &str, size: u64) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("barge-lab-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("the scratch folder is made");
    let path = dir.join(name);
    let file = std::fs::File::create(&path).expect("the sparse file is made");
    file.set_len(size).expect("the sparse file is sized");
    path
}

/// Writes `data` at `offset` of `file`.
pub fn write_at(file: &Path, offset: u64, data: &[u8]) {
    let mut handle = std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .expect("the file opens for writing");
    handle.seek(SeekFrom::Start(offset)).expect("seek");
    handle.write_all(data).expect("write");
}

/// `len` bytes of `file` at `offset`.
pub fn read_at(file: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut handle = std::fs::File::open(file).expect("the file opens");
    handle.seek(SeekFrom::Start(offset)).expect("seek");
    let mut buf = vec![0; len];
    handle.read_exact(&mut buf).expect("read");
    buf
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    use super::*;
    use crate::lab::run::kernel_panic;

    fn output(stderr: &str) -> Output {
        Output {
            status: ExitStatus::from_raw(1 << 8),
            stdout: Vec::new(),
            stderr: stderr.as_bytes().to_vec(),
        }
    }

    #[test]
    fn a_lab_host_lost_mid_run_is_told_from_other_lab_outcomes() {
        let console = std::env::temp_dir().join(format!("barge-panic-{}.log", std::process::id()));
        std::fs::write(
            &console,
            "BARGE-LAB-READY kernel=6.12\n[   30.865592] Kernel panic - not syncing: corrupted \
             stack end detected inside scheduler\n[   30.866143] CPU: 0\n",
        )
        .unwrap();
        let line = kernel_panic(&console).unwrap();
        assert_eq!(
            line,
            "Kernel panic - not syncing: corrupted stack end detected inside scheduler"
        );
        let failed = output(&format!(
            "barge-lab: error: the lab host stopped (exit status: 0) without reporting a \
             result; {LAB_HOST_PANIC}: {line}; console log {}; its last lines:\n...",
            console.display()
        ));
        assert_eq!(
            lab_host_lost(&failed),
            Some(format!("{LAB_HOST_PANIC} ({line})"))
        );
        // No panic: a reset.
        let reset = output(
            "barge-lab: error: the lab host stopped (exit status: 0) without reporting a result; \
             console log /x; its last lines:\n",
        );
        let lost = lab_host_lost(&reset).unwrap();
        assert!(lost.contains("a reset"), "{lost}");
        // A run that reported, or a lab that failed otherwise, is not lost.
        let ran = output("barge-lab: status 0; results in /tmp/out; console log /tmp/c.log\n");
        assert_eq!(lab_host_lost(&ran), None);
        let unset = output("barge-lab: error: the lab is not set up\n");
        assert_eq!(lab_host_lost(&unset), None);
        std::fs::write(&console, "[ 1.0] all well\n").unwrap();
        assert_eq!(kernel_panic(&console), None);
        let _ = std::fs::remove_file(&console);
    }
}
