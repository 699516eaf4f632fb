//! The Debian guest image in the lab, booted by QEMU as the peer VMM inside
//! the lab host (`barge-lab run --debian --tap --peer-qemu`), in one lab
//! boot: systemd reaches multi-user and the command runs (words after `--`
//! that systemd would take for its own do not reach it), a file written in
//! one guest boot is read back in the next with the root file system
//! clean, the lab host moves a few MiB each way over the tap with matching
//! checksums, and QEMU's sequential dd throughput is printed (the reference
//! barge's virtio-blk will be compared with).

use barge_tests::debian::{
    assert_tcp_transfer, dd_command, out_file, tcp_guest_command, tcp_host_script, DebianBoot,
    GuestConsole,
};
use barge_tests::harness::{lab_script, output_text};

const TCP_BYTES: u64 = 4 << 20;
const DD_MIB: u32 = 256;

#[test]
fn debian_boots_under_qemu_in_the_lab_keeps_its_files_and_talks_tcp_over_the_tap() {
    let token = format!(
        "persisted-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    // Words systemd would read as a runlevel, targets and its own options
    // (`--help` would make PID 1 exit): the no-op `:` takes them.
    let mut write = DebianBoot::new(
        "write",
        &format!(
            ": 1 s single emergency -b -h --help; echo {token} > /root/barge-persist; sync; \
             echo GUEST-WROTE $(cat /root/barge-persist); \
             echo GUEST-STATE $(systemctl is-system-running); systemctl --failed --no-legend --plain"
        ),
    );
    let mut read = DebianBoot::new(
        "read",
        "echo GUEST-READ $(cat /root/barge-persist); e2fsck -fn /dev/vda > /run/fsck.log 2>&1; \
         echo GUEST-FSCK $?; cat /run/fsck.log",
    );
    read.writable = false;
    let mut tcp = DebianBoot::new("tcp", &tcp_guest_command(TCP_BYTES));
    tcp.tap = true;
    let mut dd = DebianBoot::new("dd", &dd_command(DD_MIB));
    // QEMU is the reference, not what is under test: a boot the lab's
    // nested emulation resets before GUEST-EXIT (seen once in CI: GUEST-UP,
    // then QEMU's exit 0 with no other line) is booted once more, and the
    // retry is printed. The write boot's file is rewritten by its retry;
    // the TCP check's lab host end waits through one.
    for boot in [&mut write, &mut read, &mut tcp, &mut dd] {
        boot.attempts = 2;
    }
    let script = format!(
        "qemu-system-x86_64 --version | head -n 1 > /out/qemu-version\n{}{}{}{}wait\n{}",
        write.script(),
        read.script(),
        tcp.background_script(),
        tcp_host_script(TCP_BYTES, 400),
        dd.script()
    );
    let (output, dir) = lab_script(
        env!("CARGO_BIN_EXE_barge-lab"),
        &["--debian", "--tap", "--peer-qemu", "--timeout", "2400"],
        &script,
    );
    assert!(output.status.success(), "{}", output_text(&output));
    println!("peer VMM: {}", out_file(&dir, "qemu-version"));

    let consoles: Vec<(&DebianBoot, GuestConsole)> = [&write, &read, &tcp, &dd]
        .into_iter()
        .map(|boot| (boot, GuestConsole::read(&dir, &boot.name)))
        .collect();
    for (boot, console) in &consoles {
        for retry in &console.retries {
            println!("{}: {retry}", boot.name);
        }
        console.assert_ran(&boot.name, 2);
        for marker in ["GUEST-UP", "GUEST-EXIT"] {
            println!(
                "{}: {}",
                boot.name,
                console.find(marker).map(|(_, l)| l).unwrap_or("")
            );
        }
        println!(
            "{}: QEMU start to GUEST-UP {:.1} s, GUEST-EXIT to QEMU's exit {:.1} s (lab host \
             uptime)",
            boot.name,
            console.boot_seconds().unwrap_or(f64::NAN),
            console.poweroff_seconds().unwrap_or(f64::NAN)
        );
    }
    let console = |name: &str| &consoles.iter().find(|(b, _)| b.name == name).unwrap().1;

    // systemd was not confused by the command's words.
    let first = console("write");
    assert_eq!(
        first.find("GUEST-WROTE ").map(|(_, l)| l.to_string()),
        Some(format!("GUEST-WROTE {token}"))
    );
    assert_eq!(
        first.find("GUEST-STATE ").map(|(_, l)| l),
        Some("GUEST-STATE running"),
        "{}",
        first.text()
    );

    // The file persisted into the second boot; the root file system is clean.
    let second = console("read");
    let read_back = second.find("GUEST-READ ").map(|(_, l)| l.to_string());
    println!("read: {}", read_back.as_deref().unwrap_or(""));
    assert_eq!(read_back, Some(format!("GUEST-READ {token}")));
    println!(
        "read: {}",
        second.find("GUEST-FSCK").map(|(_, l)| l).unwrap_or("")
    );
    assert_eq!(
        second.find("GUEST-FSCK ").map(|(_, l)| l),
        Some("GUEST-FSCK 0"),
        "{}",
        second.text()
    );

    // TCP over the tap, both ways.
    assert_tcp_transfer(&dir, console("tcp"), TCP_BYTES);

    // QEMU's virtio-blk throughput (printed: the reference for barge's).
    let throughput = console("dd");
    for direction in ["write", "read"] {
        let result = throughput
            .dd(direction)
            .unwrap_or_else(|| panic!("no dd {direction} result:\n{}", throughput.text()));
        assert_eq!(result.bytes, u64::from(DD_MIB) << 20);
        println!(
            "dd: QEMU virtio-blk sequential {direction} of {DD_MIB} MiB (direct I/O): {:.2} s, \
             {:.1} MiB/s",
            result.seconds,
            result.mib_per_second()
        );
    }
}
