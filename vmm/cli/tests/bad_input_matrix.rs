//! The bad-input matrix: `barge run` with bad kernels, initramfs, memory,
//! cpus, devices, shared memory, disks, network cards, serial, report and
//! config files. One row per
//! case: the arguments, the exit status, and the key part of the one-line
//! `barge: error: ...` message. Every case also checks that barge did not
//! panic and left nothing behind: the scratch directory (inputs, and the
//! report, console and `--shmem path=` files the rows name) and barge's
//! `$TMPDIR` hold exactly what they held before.
//!
//! Cases already in `cli.rs` and `plan_cli.rs` are not repeated. Rows marked
//! `kvm` get past opening /dev/kvm (they need it; skipped with
//! `BARGE_SKIP_KVM=1`); every other row runs with `BARGE_KVM_DEVICE`
//! pointing at a missing path, which proves it fails before touching KVM.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use guest_programs::elf::idle_kernel;
use guest_programs::testing::kvm_or_skip;

struct Case {
    name: &'static str,
    args: Vec<String>,
    status: i32,
    message: String,
    kvm: bool,
}

/// A row that fails only after /dev/kvm is open.
fn kvm_case(name: &'static str, args: &[&str], status: i32, message: &str) -> Case {
    Case {
        kvm: true,
        ..case(name, args, status, message)
    }
}

fn case(name: &'static str, args: &[&str], status: i32, message: &str) -> Case {
    Case {
        name,
        args: args.iter().map(|a| a.to_string()).collect(),
        status,
        message: message.to_string(),
        kvm: false,
    }
}

/// Every file and directory under `dir`, relative, with file sizes.
fn snapshot(dir: &Path) -> BTreeSet<(PathBuf, u64)> {
    let mut found = BTreeSet::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current).expect("readable scratch dir") {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            let relative = entry.path().strip_prefix(dir).unwrap().to_path_buf();
            if meta.is_dir() {
                pending.push(entry.path());
                found.insert((relative, 0));
            } else {
                found.insert((relative, meta.len()));
            }
        }
    }
    found
}

fn s(path: &Path) -> String {
    path.to_str().expect("utf-8 scratch path").to_string()
}

#[test]
fn bad_input_matrix() {
    let dir = std::env::temp_dir().join(format!("barge-matrix-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let kernel = dir.join("vmlinux");
    std::fs::write(&kernel, idle_kernel()).unwrap();
    let empty = dir.join("empty");
    std::fs::write(&empty, b"").unwrap();
    let truncated = dir.join("truncated.elf");
    std::fs::write(&truncated, &idle_kernel()[..64]).unwrap();
    let big_initramfs = dir.join("big.cpio");
    std::fs::File::create(&big_initramfs)
        .unwrap()
        .set_len(48 << 20)
        .unwrap();
    let configs = [
        ("bad.json", r#"{"kernel": "#.to_string()),
        (
            "unknown.json",
            format!(r#"{{"kernel": "{}", "colour": 1}}"#, s(&kernel)),
        ),
        (
            "type.json",
            format!(r#"{{"kernel": "{}", "cpus": "two"}}"#, s(&kernel)),
        ),
        ("nokernel.json", r#"{"cpus": 1}"#.to_string()),
        (
            "seccomp.json",
            format!(r#"{{"kernel": "{}", "seccomp": "strict"}}"#, s(&kernel)),
        ),
    ];
    for (name, text) in &configs {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let k = s(&kernel);
    let d = s(&dir);
    let missing = |name: &str| s(&dir.join("no-such-dir").join(name));
    let report = s(&dir.join("report.json"));
    let console = s(&dir.join("console.log"));
    let shm = s(&dir.join("shm"));
    let config = |name: &str| s(&dir.join(name));
    let locked = s(&dir.join("locked.img"));
    std::fs::File::create(&locked)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let odd = s(&dir.join("odd.img"));
    std::fs::write(&odd, [0u8; 1000]).unwrap();
    // Another process holds the write lock barge takes (as a second barge
    // on the same image would).
    let mut holder = Command::new("flock")
        .args(["--exclusive", &locked, "sleep", "300"])
        .spawn()
        .expect("flock (util-linux) runs");
    while Command::new("flock")
        .args(["--exclusive", "--nonblock", &locked, "true"])
        .status()
        .unwrap()
        .success()
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    let mut cases = vec![
        // kernel
        case(
            "kernel: none given",
            &["run"],
            2,
            "barge run needs a kernel: give --kernel PATH",
        ),
        case(
            "kernel: empty file",
            &["run", "--kernel", &s(&empty)],
            1,
            "empty: not a bzImage, ELF vmlinux or arm64 Image",
        ),
        kvm_case(
            "kernel: truncated ELF",
            &["run", "--kernel", &s(&truncated)],
            1,
            "Unable to read program header",
        ),
        case(
            "kernel: character device",
            &["run", "--kernel", "/dev/null"],
            1,
            "the kernel /dev/null is not a regular file",
        ),
        // initramfs
        case(
            "initramfs: missing",
            &["run", "--kernel", &k, "--initramfs", &missing("initrd")],
            1,
            "cannot read the initramfs",
        ),
        case(
            "initramfs: a directory",
            &["run", "--kernel", &k, "--initramfs", &d],
            1,
            "is not a regular file",
        ),
        // memory
        case(
            "memory: size=0",
            &["run", "--kernel", &k, "--memory", "size=0"],
            1,
            "memory size 0 is too small: barge needs at least 32M",
        ),
        case(
            "memory: unknown suffix",
            &["run", "--kernel", &k, "--memory", "size=12X"],
            2,
            "invalid size \"12X\": unknown suffix",
        ),
        case(
            "memory: huge page size 4M",
            &["run", "--kernel", &k, "--memory", "size=512M,hugepages=4M"],
            2,
            "use hugepages=2M or hugepages=1G",
        ),
        case(
            "memory: unknown key",
            &["run", "--kernel", &k, "--memory", "size=512M,color=blue"],
            2,
            "--memory: unknown key \"color\"",
        ),
        // cpus
        case(
            "cpus: not a number",
            &["run", "--kernel", &k, "--cpus", "abc"],
            2,
            "invalid cpus \"abc\": give a number from 1 to 255",
        ),
        case(
            "cpus: 256",
            &["run", "--kernel", &k, "--cpus", "256"],
            2,
            "invalid cpus \"256\"",
        ),
        case(
            "cpus: negative",
            &["run", "--kernel", &k, "--cpus", "-1"],
            2,
            "unexpected argument '-1'",
        ),
        // devices
        case(
            "device: bad PCI address",
            &["run", "--kernel", &k, "--device", "vfio=0000:zz:00.0"],
            2,
            "not a PCI address",
        ),
        case(
            "device: unknown kind",
            &["run", "--kernel", &k, "--device", "bogus=1"],
            2,
            "unknown device \"bogus\"",
        ),
        kvm_case(
            "device: absent PCI device",
            &["run", "--kernel", &k, "--device", "vfio=0000:ff:1f.7"],
            1,
            "no PCI device 0000:ff:1f.7",
        ),
        case(
            "device: bar-align=3k",
            &[
                "run",
                "--kernel",
                &k,
                "--device",
                "vfio=0000:00:00.0,bar-align=3k",
            ],
            2,
            "invalid bar-align \"3k\"",
        ),
        // shared memory
        case(
            "shmem: size=0",
            &["run", "--kernel", &k, "--shmem", "size=0"],
            2,
            "shared memory needs at least 4K",
        ),
        kvm_case(
            "shmem: path in a missing dir",
            &[
                "run",
                "--kernel",
                &k,
                "--shmem",
                &format!("size=1M,path={}", missing("shm")),
            ],
            1,
            &format!("cannot use {}", missing("shm")),
        ),
        kvm_case(
            "shmem: path is a directory",
            &[
                "run",
                "--kernel",
                &k,
                "--shmem",
                &format!("size=1M,path={d}"),
            ],
            1,
            "Is a directory",
        ),
        case(
            "shmem: unknown key",
            &["run", "--kernel", &k, "--shmem", "size=1M,colour=red"],
            2,
            "--shmem: unknown key \"colour\"",
        ),
        // disks (virtio-blk)
        kvm_case(
            "disk: missing image",
            &[
                "run",
                "--kernel",
                &k,
                "--disk",
                &format!("path={}", missing("disk.img")),
            ],
            1,
            &format!("disk image {} does not exist", missing("disk.img")),
        ),
        kvm_case(
            "disk: a directory",
            &["run", "--kernel", &k, "--disk", &format!("path={d}")],
            1,
            "is a directory; give the path of a raw disk image",
        ),
        kvm_case(
            "disk: image locked by another process",
            &["run", "--kernel", &k, "--disk", &format!("path={locked}")],
            1,
            "is in use by another process (another barge?), which holds a lock",
        ),
        kvm_case(
            "disk: not whole sectors",
            &["run", "--kernel", &k, "--disk", &format!("path={odd}")],
            1,
            "not a whole number of 512-byte sectors",
        ),
        case(
            "disk: serial too long",
            &[
                "run",
                "--kernel",
                &k,
                "--disk",
                "path=x.img,serial=abcdefghijklmnopqrstu",
            ],
            2,
            "a virtio-blk serial is at most 20 bytes",
        ),
        case(
            "disk: unknown key",
            &["run", "--kernel", &k, "--disk", "path=x.img,cache=none"],
            2,
            "--disk: unknown key \"cache\"",
        ),
        // network cards (virtio-net)
        kvm_case(
            "net: a tap that does not exist",
            &["run", "--kernel", &k, "--net", "tap=bargenotap9"],
            1,
            "tap \"bargenotap9\" does not exist",
        ),
        case(
            "net: a MAC that does not parse",
            &[
                "run",
                "--kernel",
                &k,
                "--net",
                "tap=tap0,mac=52:54:00:zz:00:01",
            ],
            2,
            "--net mac=\"52:54:00:zz:00:01\" is not a MAC address",
        ),
        case(
            "net: a multicast MAC",
            &[
                "run",
                "--kernel",
                &k,
                "--net",
                "tap=tap0,mac=01:00:5e:00:00:01",
            ],
            2,
            "a multicast address",
        ),
        case(
            "net: a tap name too long",
            &["run", "--kernel", &k, "--net", "tap=abcdefghijklmnop"],
            2,
            "--net tap=\"abcdefghijklmnop\"",
        ),
        // serial
        case(
            "serial: file in a missing dir",
            &[
                "run",
                "--kernel",
                &k,
                "--serial",
                &format!("file={}", missing("console.log")),
            ],
            1,
            "cannot open the serial output file",
        ),
        case(
            "serial: unknown kind",
            &["run", "--kernel", &k, "--serial", "tcp=1234"],
            2,
            "invalid serial output \"tcp=1234\"",
        ),
        // report
        case(
            "report: a directory",
            &["run", "--kernel", &k, "--report", &d],
            1,
            "it is a directory; give --report a file path",
        ),
        case(
            "report: empty value",
            &["run", "--kernel", &k, "--report"],
            2,
            "a value is required for '--report",
        ),
        // config file
        case(
            "config: bad JSON",
            &["run", "--config", &config("bad.json")],
            2,
            "EOF while parsing a value",
        ),
        case(
            "config: unknown field",
            &["run", "--config", &config("unknown.json")],
            2,
            "unknown field `colour`",
        ),
        case(
            "config: wrong type",
            &["run", "--config", &config("type.json")],
            2,
            "invalid type: string \"two\", expected u8",
        ),
        case(
            "config: missing kernel",
            &["run", "--config", &config("nokernel.json")],
            2,
            "missing field `kernel`",
        ),
        case(
            "seccomp: unknown mode",
            &["run", "--kernel", &k, "--seccomp", "strict"],
            2,
            "invalid seccomp mode \"strict\": use on, off or log",
        ),
        case(
            "config: unknown seccomp mode",
            &["run", "--config", &config("seccomp.json")],
            2,
            "unknown variant `strict`, expected one of `on`, `log`, `off`",
        ),
        case(
            "config: missing file",
            &["run", "--config", &missing("vm.json")],
            2,
            "cannot read the configuration file",
        ),
        // leftovers: a run that fails after naming a report, a console
        // file and a shmem file leaves none of them
        case(
            "leftovers: bad kernel with report, console, shmem",
            &[
                "run",
                "--kernel",
                &s(&empty),
                "--report",
                &report,
                "--serial",
                &format!("file={console}"),
                "--shmem",
                &format!("size=1M,path={shm}"),
            ],
            1,
            "not a bzImage, ELF vmlinux or arm64 Image",
        ),
    ];
    cases.push(kvm_case(
        "leftovers (kvm): shmem created, then initramfs too big",
        &[
            "run",
            "--kernel",
            &k,
            "--memory",
            "size=32M",
            "--initramfs",
            &s(&big_initramfs),
            "--report",
            &report,
            "--serial",
            &format!("file={console}"),
            "--shmem",
            &format!("size=1M,path={shm}"),
        ],
        1,
        "larger than the guest memory",
    ));

    let kvm = kvm_or_skip("bad_input_matrix (kvm rows)");
    let mut ran = 0;
    let mut failures = Vec::new();
    for case in &cases {
        if case.kvm && !kvm {
            println!("SKIP  {:<52} (no KVM)", case.name);
            continue;
        }
        let before = snapshot(&dir);
        let mut command = Command::new(env!("CARGO_BIN_EXE_barge"));
        command
            .args(&case.args)
            .stdin(Stdio::null())
            .env_remove("RUST_LOG")
            .env("TMPDIR", &tmp);
        if !case.kvm {
            command.env("BARGE_KVM_DEVICE", dir.join("no-such-dir/kvm"));
        }
        let output = command.output().expect("barge starts");
        let stderr = String::from_utf8_lossy(&output.stderr).to_string();
        let after = snapshot(&dir);
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("barge: error: "))
            .collect();
        let mut problems = Vec::new();
        if output.status.code() != Some(case.status) {
            problems.push(format!(
                "status {:?}, want {}",
                output.status.code(),
                case.status
            ));
        }
        if stderr.contains("panicked") {
            problems.push("panicked".to_string());
        }
        if errors.len() != 1 {
            problems.push(format!("{} error lines, want 1", errors.len()));
        } else if !errors[0].contains(&case.message) {
            problems.push(format!("message lacks {:?}", case.message));
        }
        if before != after {
            let left: Vec<_> = after.symmetric_difference(&before).collect();
            problems.push(format!("files changed: {left:?}"));
        }
        ran += 1;
        if problems.is_empty() {
            println!(
                "ok    {:<52} status {} | {}",
                case.name, case.status, case.message
            );
        } else {
            println!(
                "FAIL  {:<52} {}\n      stderr: {}",
                case.name,
                problems.join("; "),
                stderr.trim()
            );
            failures.push(case.name);
        }
    }
    println!(
        "bad-input matrix: {ran} cases run, {} passed, {} failed",
        ran - failures.len(),
        failures.len()
    );
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(failures.is_empty(), "failed cases: {failures:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
