//! barge's virtio devices with a real guest, in one lab boot
//! (`barge-lab run --debian --tap --peer-qemu --nvme IMAGE`): the Debian
//! image booted by barge from `--disk` (root=/dev/vda, 2 vCPUs), as a
//! distribution boots:
//!
//! - `write`: systemd reaches multi-user, the guest writes a file, syncs and
//!   powers off; `read`: a second boot reads it back and `e2fsck -fn` finds
//!   the root file system clean (mounted read-only);
//! - `tcp`: with `--net` on the lab host's tap, the lab host sends 4 MiB to
//!   a TCP service in the guest and receives 4 MiB back, checksums matching;
//! - `nvme`: `--disk`, `--net` and the lab's NVMe controller passed through
//!   (`--device vfio=$LAB_NVME0`): the guest's nvme driver reads the disk
//!   and its checksum matches the image's;
//! - `dd`: sequential write and read of 256 MiB (direct I/O) in the guest
//!   on barge's virtio-blk, then the same on QEMU's (`qemu dd`) on the same
//!   image in the same lab run: the ratio goes in the README.
//!
//! Each barge boot writes its report; the test checks each virtio device's
//! entry (kind, guest BDF, requests and bytes served).

use barge_tests::debian::{
    assert_tcp_transfer, dd_command, out_file, tcp_guest_command, tcp_host_script, DebianBoot,
    GuestConsole, Vmm, UDEV_SETTLE,
};
use barge_tests::harness::{lab_script, output_text};
use barge_tests::nvme::{expected_sha256, fresh_image, CHECKED};
use serde_json::Value;

const TCP_BYTES: u64 = 4 << 20;
const DD_MIB: u32 = 256;

fn barge(name: &str, command: &str) -> DebianBoot {
    let mut boot = DebianBoot::new(name, command);
    boot.vmm = Vmm::Barge;
    boot
}

/// The report's entry of the device of `kind`.
fn device<'a>(report: &'a Value, kind: &str) -> &'a Value {
    report["devices"]
        .as_array()
        .and_then(|devices| devices.iter().find(|d| d["kind"] == kind))
        .unwrap_or_else(|| panic!("no {kind} device in the report: {report}"))
}

#[test]
fn debian_boots_from_barge_virtio_blk_talks_over_virtio_net_and_reads_a_passed_through_nvme() {
    let image = fresh_image("virtio-lab");
    let token = format!(
        "persisted-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    );
    let write = barge(
        "write",
        &format!(
            "echo {token} > /root/barge-persist; sync; echo GUEST-WROTE $(cat /root/barge-persist); \
             echo GUEST-STATE $(systemctl is-system-running)"
        ),
    );
    let mut read = barge(
        "read",
        "echo GUEST-READ $(cat /root/barge-persist); e2fsck -fn /dev/vda > /run/fsck.log 2>&1; \
         echo GUEST-FSCK $?; cat /run/fsck.log",
    );
    read.writable = false;
    let mut tcp = barge("tcp", &tcp_guest_command(TCP_BYTES));
    tcp.tap = true;
    let mut nvme = barge(
        "nvme",
        &format!(
            "{UDEV_SETTLE}; echo GUEST-SHA256 nvme $(head -c {CHECKED} /dev/nvme0n1 | sha256sum)"
        ),
    );
    nvme.tap = true;
    nvme.passthrough_env = Some("LAB_NVME0");
    let dd = barge("dd", &dd_command(DD_MIB));
    // QEMU's run is the reference figure, not a check of barge: booted
    // once more should the lab's emulation reset its guest (the retry is
    // printed).
    let mut qemu_dd = DebianBoot::new("qemu-dd", &dd_command(DD_MIB));
    qemu_dd.attempts = 2;
    let script = format!(
        "{}{}{}{}wait\n{}{}{}",
        write.script(),
        read.script(),
        tcp.background_script(),
        tcp_host_script(TCP_BYTES, 400),
        nvme.script(),
        dd.script(),
        qemu_dd.script()
    );
    let (output, dir) = lab_script(
        env!("CARGO_BIN_EXE_barge-lab"),
        &[
            "--debian",
            "--tap",
            "--peer-qemu",
            "--nvme",
            image.to_str().unwrap(),
            "--timeout",
            "2400",
        ],
        &script,
    );
    assert!(output.status.success(), "{}", output_text(&output));
    let report = |name: &str| -> Value {
        serde_json::from_str(&out_file(&dir, &format!("{name}.report.json")))
            .unwrap_or_else(|e| panic!("{name}: no report ({e})"))
    };

    let boots = [&write, &read, &tcp, &nvme, &dd, &qemu_dd];
    let consoles: Vec<GuestConsole> = boots
        .iter()
        .map(|boot| GuestConsole::read(&dir, &boot.name))
        .collect();
    for (boot, console) in boots.iter().zip(&consoles) {
        for retry in &console.retries {
            println!("{}: {retry}", boot.name);
        }
        console.assert_ran(&boot.name, 2);
        println!(
            "{} ({}): {} | GUEST-EXIT 0 | start to GUEST-UP {:.1} s (lab host uptime)",
            boot.name,
            boot.vmm.name(),
            console.find("GUEST-UP").map(|(_, l)| l).unwrap_or(""),
            console.boot_seconds().unwrap_or(f64::NAN),
        );
    }
    let console = |name: &str| &consoles[boots.iter().position(|b| b.name == name).unwrap()];

    // Booted from barge's virtio-blk; the file persisted; fsck is clean.
    let wrote = console("write")
        .find("GUEST-WROTE ")
        .map(|(_, l)| l.to_string());
    assert_eq!(wrote, Some(format!("GUEST-WROTE {token}")));
    assert_eq!(
        console("write").find("GUEST-STATE ").map(|(_, l)| l),
        Some("GUEST-STATE running"),
        "{}",
        console("write").text()
    );
    let read_back = console("read")
        .find("GUEST-READ ")
        .map(|(_, l)| l.to_string());
    println!("read: {}", read_back.as_deref().unwrap_or(""));
    assert_eq!(read_back, Some(format!("GUEST-READ {token}")));
    let fsck = console("read")
        .find("GUEST-FSCK ")
        .map(|(_, l)| l.to_string());
    println!("read: {}", fsck.as_deref().unwrap_or(""));
    assert_eq!(
        fsck.as_deref(),
        Some("GUEST-FSCK 0"),
        "{}",
        console("read").text()
    );

    // The disk's report entry.
    let write_report = report("write");
    let blk = device(&write_report, "virtio-blk");
    println!("write: report virtio-blk {blk}");
    assert_eq!(blk["guest_bdf"], "0000:00:01.0");
    assert!(blk["virtio"]["requests"].as_u64().unwrap() > 100, "{blk}");
    assert!(
        blk["virtio"]["bytes_to_guest"].as_u64().unwrap() > 1 << 20,
        "{blk}"
    );
    assert!(
        blk["virtio"]["bytes_from_guest"].as_u64().unwrap() > 0,
        "{blk}"
    );
    assert_eq!(blk["virtio"]["errors"], 0, "{blk}");

    // TCP over barge's virtio-net, both ways.
    assert_tcp_transfer(&dir, console("tcp"), TCP_BYTES);
    let tcp_report = report("tcp");
    let virtio_net = device(&tcp_report, "virtio-net");
    println!("tcp: report virtio-net {virtio_net}");
    assert!(
        virtio_net["virtio"]["bytes_to_guest"].as_u64().unwrap() >= TCP_BYTES,
        "{virtio_net}"
    );
    assert!(
        virtio_net["virtio"]["bytes_from_guest"].as_u64().unwrap() >= TCP_BYTES,
        "{virtio_net}"
    );

    // Disk, network card and a passed-through NVMe controller together.
    let expected = expected_sha256();
    let seen = console("nvme").guest_sha256("nvme").unwrap_or_default();
    println!("nvme: the guest read the passed-through disk: sha256 {seen} (the image: {expected})");
    assert_eq!(seen, expected, "{}", console("nvme").text());
    let nvme_report = report("nvme");
    let kinds: Vec<&str> = nvme_report["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["kind"].as_str().unwrap_or(""))
        .collect();
    println!("nvme: report devices {kinds:?}");
    assert_eq!(kinds, ["vfio", "virtio-blk", "virtio-net"]);

    // Throughput: barge's virtio-blk against QEMU's, one run, same image.
    for direction in ["write", "read"] {
        let ours = console("dd")
            .dd(direction)
            .unwrap_or_else(|| panic!("no barge dd {direction}:\n{}", console("dd").text()));
        let theirs = console("qemu-dd")
            .dd(direction)
            .unwrap_or_else(|| panic!("no QEMU dd {direction}:\n{}", console("qemu-dd").text()));
        assert_eq!(ours.bytes, u64::from(DD_MIB) << 20);
        println!(
            "dd: sequential {direction} of {DD_MIB} MiB (direct I/O): barge {:.1} MiB/s ({:.2} s), \
             QEMU {:.1} MiB/s ({:.2} s), barge/QEMU {:.2}",
            ours.mib_per_second(),
            ours.seconds,
            theirs.mib_per_second(),
            theirs.seconds,
            ours.mib_per_second() / theirs.mib_per_second()
        );
    }
}
