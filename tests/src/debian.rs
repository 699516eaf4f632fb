//! The Debian guest of the lab (`barge-lab run --debian`, optionally with
//! `--tap` and `--peer-qemu`), booted inside the lab host by a VMM: the lab
//! host's shell lines that boot it and log its console, the guest commands
//! the tests share (a TCP transfer over the tap, sequential dd throughput),
//! and reading back what its console said.
//!
//! Every boot's console goes to `/out/NAME.console`, each line prefixed
//! with the lab host's uptime, between `VMM-START` and `VMM-EXIT <status>`
//! lines, so a test reads its timings (boot to GUEST-UP, GUEST-EXIT to the
//! VMM's exit) from the file.

use std::path::Path;

use crate::lab::initramfs::{TAP_GUEST_ADDRESS, TAP_HOST_ADDRESS, TAP_NAME, TAP_PREFIX_LEN};
use crate::lab::run::shell_quote;

/// The guest's files inside the lab host (under
/// [`crate::lab::initramfs::DEBIAN_GUEST_DIR`]).
pub const ROOTFS: &str = "/lab/guest/debian/rootfs.img";
pub const VMLINUZ: &str = "/lab/guest/debian/vmlinuz";
pub const INITRD: &str = "/lab/guest/debian/initrd.img";

/// Console lines the boot script adds around the VMM's own output.
pub const VMM_START: &str = "VMM-START";
pub const VMM_EXIT: &str = "VMM-EXIT";
/// The line the boot script adds before it boots a guest once more (see
/// [`DebianBoot::attempts`]).
pub const VMM_RETRY: &str = "VMM-RETRY";

/// The TCP check's ports in the guest: the lab host sends to the first,
/// receives from the second.
pub const TCP_TO_GUEST_PORT: u16 = 5001;
pub const TCP_FROM_GUEST_PORT: u16 = 5002;

/// The VMM that boots the guest inside the lab host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vmm {
    /// The lab's QEMU, carried in with `barge-lab run --peer-qemu`, with KVM
    /// and virtio-blk (and virtio-net on the tap).
    Qemu,
    /// barge with `--disk` (and `--net` on the tap), as issue 13 specifies
    /// them; not exercised before barge has those devices.
    Barge,
}

impl Vmm {
    pub fn name(self) -> &'static str {
        match self {
            Vmm::Qemu => "qemu",
            Vmm::Barge => "barge",
        }
    }
}

/// One boot of the Debian guest.
#[derive(Debug, Clone)]
pub struct DebianBoot {
    /// The console goes to `/out/NAME.console`.
    pub name: String,
    pub vmm: Vmm,
    pub cpus: u32,
    pub memory_mib: u32,
    /// A virtio NIC on the lab host's tap (`run --tap`).
    pub tap: bool,
    /// Mount the root file system read-write (`rw`) or read-only (`ro`:
    /// for an fsck of the root device).
    pub writable: bool,
    /// Leave `quiet` off the command line: every kernel and systemd line on
    /// the console (each costs milliseconds on an emulated UART under
    /// nested virtualization: seconds per boot).
    pub verbose: bool,
    /// Seconds the VMM may run before the boot script kills it (SIGKILL:
    /// QEMU exits 0 on SIGTERM; killed, its status is 137).
    pub timeout_secs: u32,
    /// The guest's shell command (after ` -- ` on its command line).
    pub command: String,
    /// barge only: pass through the lab device whose BDF is in this
    /// environment variable of the lab host (e.g. `LAB_NVME0`), as
    /// `--device vfio=$VAR`.
    pub passthrough_env: Option<&'static str>,
    /// How many times the boot script boots the guest while a boot ends
    /// without GUEST-EXIT (1: once, whatever happens). Only for boots whose
    /// VMM is not under test: the lab's nested emulation (TCG emulating
    /// SVM) has, rarely, reset a guest without a message (QEMU, with
    /// `-no-reboot`, then exits 0), and the peer VMM's runs are reference
    /// figures, not checks of barge. Each retry leaves a [`VMM_RETRY`]
    /// line on the console; [`GuestConsole::retries`] has them.
    pub attempts: u32,
}

impl DebianBoot {
    /// A boot with QEMU, 2 vCPUs, 1 GiB, read-write, no NIC, 600 s.
    pub fn new(name: &str, command: &str) -> Self {
        DebianBoot {
            name: name.to_string(),
            vmm: Vmm::Qemu,
            cpus: 2,
            memory_mib: 1024,
            tap: false,
            writable: true,
            verbose: false,
            timeout_secs: 600,
            command: command.to_string(),
            passthrough_env: None,
            attempts: 1,
        }
    }

    /// The guest kernel's command line, the command after ` -- `: in double
    /// quotes (unless it holds one), so that it is one word to the kernel,
    /// which panics when init would get more than 31 arguments ("Too many
    /// boot init vars"); both lab guests unwrap it. `panic=-1`: a guest
    /// kernel that panics reboots, and the VMM exits (QEMU runs with
    /// `-no-reboot`).
    pub fn cmdline(&self) -> String {
        let command = if self.command.contains('"') {
            self.command.clone()
        } else {
            format!("\"{}\"", self.command)
        };
        format!(
            "console=ttyS0 root=/dev/vda {}{} panic=-1 -- {command}",
            if self.writable { "rw" } else { "ro" },
            if self.verbose { "" } else { " quiet" },
        )
    }

    /// The VMM's command, word by word.
    pub fn vmm_argv(&self) -> Vec<String> {
        let mut argv: Vec<String> = Vec::new();
        let mut push = |words: &[&str]| argv.extend(words.iter().map(|w| w.to_string()));
        let cpus = self.cpus.to_string();
        match self.vmm {
            Vmm::Qemu => {
                let memory = format!("{}M", self.memory_mib);
                let drive = format!("file={ROOTFS},if=virtio,format=raw");
                push(&[
                    "qemu-system-x86_64",
                    "-accel",
                    "kvm",
                    "-cpu",
                    "host",
                    "-M",
                    "q35",
                    "-smp",
                    &cpus,
                    "-m",
                    &memory,
                    "-nodefaults",
                    "-vga",
                    "none",
                    "-display",
                    "none",
                    "-no-reboot",
                    "-serial",
                    "stdio",
                    "-kernel",
                    VMLINUZ,
                    "-initrd",
                    INITRD,
                    "-drive",
                    &drive,
                ]);
                if self.tap {
                    let netdev = format!("tap,id=net0,ifname={TAP_NAME},script=no,downscript=no");
                    push(&["-netdev", &netdev, "-device", "virtio-net-pci,netdev=net0"]);
                }
                push(&["-append", &self.cmdline()]);
            }
            Vmm::Barge => {
                let memory = format!("size={}M", self.memory_mib);
                let disk = format!("path={ROOTFS}");
                push(&[
                    "barge",
                    "run",
                    "--kernel",
                    VMLINUZ,
                    "--initramfs",
                    INITRD,
                    "--disk",
                    &disk,
                    "--cpus",
                    &cpus,
                    "--memory",
                    &memory,
                ]);
                if self.tap {
                    let net = format!("tap={TAP_NAME}");
                    push(&["--net", &net]);
                }
                let report = format!("/out/{}.report.json", self.name);
                push(&["--report", &report]);
                push(&["--cmdline", &self.cmdline()]);
            }
        }
        argv
    }

    /// The lab host's shell lines that run the boot to its end and log its
    /// console (stamped) to `/out/NAME.console`, booting it again (up to
    /// [`DebianBoot::attempts`] boots) while a boot ends without GUEST-EXIT.
    pub fn script(&self) -> String {
        format!(
            "# The Debian guest `{name}` under {vmm} (at most {attempts} boots).\n\
             {{\n    attempt=1\n    while :; do\n        \
             {{ echo {VMM_START}; timeout -s KILL {timeout} {argv}{passthrough} < /dev/null 2>&1; \
             echo \"{VMM_EXIT} $?\"; }} | tee /tmp/{name}.boot\n        \
             if grep -q 'GUEST-EXIT ' /tmp/{name}.boot || [ $attempt -ge {attempts} ]; then break; fi\n        \
             attempt=$((attempt + 1))\n        \
             echo \"{VMM_RETRY} no GUEST-EXIT: booting {name} again ($attempt of {attempts})\"\n    \
             done\n    rm -f /tmp/{name}.boot\n\
             }} | {STAMP} > /out/{name}.console\n",
            name = self.name,
            vmm = self.vmm.name(),
            attempts = self.attempts.max(1),
            timeout = self.timeout_secs,
            argv = shell_quote(&self.vmm_argv()),
            passthrough = match (self.vmm, self.passthrough_env) {
                (Vmm::Barge, Some(var)) => format!(" --device \"vfio=${var}\""),
                _ => String::new(),
            },
        )
    }

    /// [`DebianBoot::script`] in the background: what follows runs while the
    /// guest boots; `wait` for it.
    pub fn background_script(&self) -> String {
        format!("(\n{}) &\n", self.script())
    }
}

/// Prefixes each line of its input with the lab host's uptime in seconds
/// (busybox sh builtins only: no process per line).
const STAMP: &str = "while IFS= read -r line || [ -n \"$line\" ]; do \
read -r up _ < /proc/uptime; printf '%s %s\\n' \"$up\" \"$line\"; done";

/// A guest command waits with this for udev to finish with the devices it
/// found at boot (it loads virtio_net, for one, while multi-user.target is
/// reached and the command starts).
pub const UDEV_SETTLE: &str = "udevadm settle --timeout=120";

/// The guest's end of the TCP check over the tap: once udev has settled it takes
/// [`TAP_GUEST_ADDRESS`] on eth0, makes `bytes` random bytes and prints
/// their sha256 (`GUEST-SHA256 to-host SUM`), serves them on
/// [`TCP_FROM_GUEST_PORT`], receives what the lab host sends to
/// [`TCP_TO_GUEST_PORT`] and prints its sha256 (`GUEST-SHA256 from-host
/// SUM`).
pub fn tcp_guest_command(bytes: u64) -> String {
    format!(
        "set -e; {UDEV_SETTLE}; ip link set eth0 up; ip addr add {TAP_GUEST_ADDRESS}/{TAP_PREFIX_LEN} dev eth0; \
         head -c {bytes} /dev/urandom > /tmp/to-host; \
         echo GUEST-SHA256 to-host $(sha256sum < /tmp/to-host); \
         socat -u FILE:/tmp/to-host TCP-LISTEN:{TCP_FROM_GUEST_PORT},reuseaddr & \
         socat -u TCP-LISTEN:{TCP_TO_GUEST_PORT},reuseaddr CREATE:/tmp/from-host; wait; \
         echo GUEST-SHA256 from-host $(sha256sum < /tmp/from-host)"
    )
}

/// The lab host's end of the TCP check, run while the guest boots: `bytes`
/// random bytes sent to the guest once it listens (retried for up to
/// `timeout_secs`), then the guest's bytes received. It writes
/// /out/tcp-to-guest.sha256, /out/tcp-from-guest.sha256 (the sums) and
/// /out/tcp.status (`0` when both transfers worked).
pub fn tcp_host_script(bytes: u64, timeout_secs: u32) -> String {
    format!(
        "head -c {bytes} /dev/urandom > /tmp/to-guest\n\
         sha256sum < /tmp/to-guest | cut -d' ' -f1 > /out/tcp-to-guest.sha256\n\
         tcp_status=1\n\
         if timeout {timeout_secs} sh -c 'until socat -u FILE:/tmp/to-guest \
         TCP:{TAP_GUEST_ADDRESS}:{TCP_TO_GUEST_PORT},connect-timeout=2 2> /dev/null; do sleep 1; \
         done' \\\n    && timeout 120 socat -u \
         TCP:{TAP_GUEST_ADDRESS}:{TCP_FROM_GUEST_PORT},connect-timeout=10 CREATE:/tmp/from-guest; \
         then\n    tcp_status=0\nfi\n\
         sha256sum < /tmp/from-guest | cut -d' ' -f1 > /out/tcp-from-guest.sha256\n\
         echo $tcp_status > /out/tcp.status\n\
         echo \"barge-lab: TCP check with the guest at {TAP_GUEST_ADDRESS} from \
         {TAP_HOST_ADDRESS}: status $tcp_status\"\n"
    )
}

/// `/out/NAME` as the lab brought it back under `out_dir`, trimmed (empty
/// when the file is missing).
pub fn out_file(out_dir: &Path, name: &str) -> String {
    std::fs::read_to_string(out_dir.join(name))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Checks what [`tcp_host_script`] and [`tcp_guest_command`] (on the boot
/// whose console is `console`) left: both transfers worked, and each end
/// saw the sha256 the other sent (two different sums). Prints both.
pub fn assert_tcp_transfer(out_dir: &Path, console: &GuestConsole, bytes: u64) {
    let file = |name: &str| out_file(out_dir, name);
    assert_eq!(file("tcp.status"), "0", "{}", console.text());
    let (to_guest, from_guest) = (file("tcp-to-guest.sha256"), file("tcp-from-guest.sha256"));
    let (guest_received, guest_sent) = (
        console.guest_sha256("from-host").unwrap_or_default(),
        console.guest_sha256("to-host").unwrap_or_default(),
    );
    println!(
        "tcp: {bytes} bytes lab host -> guest: sent {to_guest}, guest received {guest_received}"
    );
    println!(
        "tcp: {bytes} bytes guest -> lab host: guest sent {guest_sent}, received {from_guest}"
    );
    assert_eq!(to_guest.len(), 64);
    assert_eq!(to_guest, guest_received);
    assert_eq!(from_guest, guest_sent);
    assert_ne!(to_guest, from_guest);
}

/// Sequential write then read of `mib` MiB with dd inside the guest,
/// direct I/O (the page cache out of the way), in a file on the root file
/// system: `GUEST-DD write <dd's summary line>` and `GUEST-DD read ...`.
pub fn dd_command(mib: u32) -> String {
    format!(
        "f=/var/tmp/barge-dd; \
         echo GUEST-DD write $(dd if=/dev/zero of=$f bs=1M count={mib} oflag=direct conv=fsync \
         2>&1 | tail -n 1); \
         sync; echo 3 > /proc/sys/vm/drop_caches; \
         echo GUEST-DD read $(dd if=$f of=/dev/null bs=1M iflag=direct 2>&1 | tail -n 1); \
         rm -f $f"
    )
}

/// What dd reported for one direction.
#[derive(Debug, Clone, PartialEq)]
pub struct DdResult {
    pub bytes: u64,
    pub seconds: f64,
}

impl DdResult {
    pub fn mib_per_second(&self) -> f64 {
        self.bytes as f64 / f64::from(1u32 << 20) / self.seconds
    }
}

/// dd's summary line: `268435456 bytes (268 MB, 256 MiB) copied, 2.5 s,
/// 107 MB/s`.
pub fn parse_dd(line: &str) -> Option<DdResult> {
    let bytes = line.split_whitespace().next()?.parse().ok()?;
    let (_, after) = line.split_once("copied, ")?;
    let seconds: f64 = after.split_whitespace().next()?.parse().ok()?;
    (seconds > 0.0).then_some(DdResult { bytes, seconds })
}

/// GUEST-UP's numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestUp {
    pub cpus: u32,
    pub mem_kb: u64,
}

/// A boot's console, each line with the lab host's uptime when it came:
/// the last boot's (from its `VMM-START` on) when the boot script booted
/// the guest more than once.
#[derive(Debug, Clone, Default)]
pub struct GuestConsole {
    pub lines: Vec<(f64, String)>,
    /// The [`VMM_RETRY`] lines, one per boot before the last, with the
    /// console's last lines before each (what the failed boot printed).
    pub retries: Vec<String>,
}

impl GuestConsole {
    /// `/out/NAME.console` as the lab brought it back under `out_dir`
    /// (empty when the file is missing).
    pub fn read(out_dir: &Path, name: &str) -> Self {
        let text = std::fs::read(out_dir.join(format!("{name}.console"))).unwrap_or_default();
        Self::parse(&String::from_utf8_lossy(&text))
    }

    pub fn parse(text: &str) -> Self {
        let mut lines: Vec<(f64, String)> = Vec::new();
        let mut retries = Vec::new();
        for line in text.lines() {
            let (stamp, rest) = line.split_once(' ').unwrap_or((line, ""));
            let Ok(stamp) = stamp.parse::<f64>() else {
                continue;
            };
            let rest = rest.trim_end_matches('\r').to_string();
            if rest.starts_with(VMM_RETRY) {
                let before = GuestConsole {
                    lines: std::mem::take(&mut lines),
                    retries: Vec::new(),
                };
                retries.push(format!(
                    "{rest}; the boot before it ended:\n{}",
                    before.tail(15)
                ));
            } else {
                lines.push((stamp, rest));
            }
        }
        GuestConsole { lines, retries }
    }

    /// The console as the VMM printed it, without the stamps.
    pub fn text(&self) -> String {
        self.lines
            .iter()
            .map(|(_, l)| format!("{l}\n"))
            .collect::<String>()
    }

    /// Checks that boot `name` ran to its end: GUEST-UP with `cpus` vCPUs
    /// and more than 900 MB of memory, GUEST-EXIT 0, the VMM's status 0
    /// (each failure shows the console's last 40 lines). Returns GUEST-UP.
    pub fn assert_ran(&self, name: &str, cpus: u32) -> GuestUp {
        let tail = self.tail(40);
        let up = self
            .guest_up()
            .unwrap_or_else(|| panic!("{name}: no GUEST-UP; the console's end:\n{tail}"));
        assert_eq!(up.cpus, cpus, "{name}");
        assert!(up.mem_kb > 900_000, "{name}: {up:?}");
        assert_eq!(self.guest_exit(), Some(0), "{name}:\n{tail}");
        assert_eq!(self.vmm_exit(), Some(0), "{name}: the VMM's status\n{tail}");
        up
    }

    /// The last `count` lines, without the stamps (for failure messages).
    pub fn tail(&self, count: usize) -> String {
        let start = self.lines.len().saturating_sub(count);
        self.lines[start..]
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The first line holding `marker` (from the marker on: a line may
    /// start with the tail of the kernel's output), and when it came.
    pub fn find(&self, marker: &str) -> Option<(f64, &str)> {
        self.lines
            .iter()
            .find_map(|(t, l)| l.find(marker).map(|at| (*t, &l[at..])))
    }

    /// Every line holding `marker`, from the marker on.
    pub fn find_all<'a>(&'a self, marker: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.lines
            .iter()
            .filter_map(move |(_, l)| l.find(marker).map(|at| &l[at..]))
    }

    /// The words after `marker` on its first line.
    fn after(&self, marker: &str) -> Option<&str> {
        self.find(marker).map(|(_, l)| l[marker.len()..].trim())
    }

    pub fn guest_up(&self) -> Option<GuestUp> {
        let rest = self.after("GUEST-UP ")?;
        let field = |name: &str| {
            rest.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .and_then(|v| v.parse::<u64>().ok())
        };
        Some(GuestUp {
            cpus: u32::try_from(field("cpus=")?).ok()?,
            mem_kb: field("mem_kb=")?,
        })
    }

    pub fn guest_exit(&self) -> Option<i32> {
        self.after("GUEST-EXIT ")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// The VMM's exit status (137 when the boot script's timeout killed it).
    pub fn vmm_exit(&self) -> Option<i32> {
        self.lines
            .iter()
            .rev()
            .find_map(|(_, l)| l.strip_prefix(VMM_EXIT))
            .and_then(|rest| rest.trim().parse().ok())
    }

    /// Seconds from the VMM's start to `marker`.
    pub fn seconds_to(&self, marker: &str) -> Option<f64> {
        let start = self.find(VMM_START)?.0;
        Some(self.find(marker)?.0 - start)
    }

    /// Seconds from the VMM's start to GUEST-UP.
    pub fn boot_seconds(&self) -> Option<f64> {
        self.seconds_to("GUEST-UP ")
    }

    /// Seconds from GUEST-EXIT to the VMM's exit (the guest's power-off).
    pub fn poweroff_seconds(&self) -> Option<f64> {
        let exit = self.find("GUEST-EXIT ")?.0;
        let end = self
            .lines
            .iter()
            .rev()
            .find(|(_, l)| l.starts_with(VMM_EXIT))?
            .0;
        Some(end - exit)
    }

    /// The sha256 the guest printed as `GUEST-SHA256 WHAT SUM`.
    pub fn guest_sha256(&self, what: &str) -> Option<String> {
        let marker = format!("GUEST-SHA256 {what} ");
        let rest = self.after(&marker)?;
        rest.split_whitespace().next().map(str::to_string)
    }

    /// dd's result for `direction` (`write`, `read`) of [`dd_command`].
    pub fn dd(&self, direction: &str) -> Option<DdResult> {
        parse_dd(self.after(&format!("GUEST-DD {direction} "))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::initramfs::DEBIAN_GUEST_DIR;

    #[test]
    fn paths_are_under_the_debian_guest_dir() {
        for path in [ROOTFS, VMLINUZ, INITRD] {
            assert!(path.starts_with(&format!("{DEBIAN_GUEST_DIR}/")), "{path}");
        }
    }

    #[test]
    fn qemu_boots_the_image_with_kvm_virtio_and_the_tap() {
        let mut boot = DebianBoot::new("boot1", "echo 'hi there'");
        assert_eq!(
            boot.cmdline(),
            "console=ttyS0 root=/dev/vda rw quiet panic=-1 -- \"echo 'hi there'\""
        );
        let argv = boot.vmm_argv().join(" ");
        assert!(argv.starts_with("qemu-system-x86_64 -accel kvm -cpu host -M q35 -smp 2 -m 1024M"));
        assert!(argv.contains("-drive file=/lab/guest/debian/rootfs.img,if=virtio,format=raw"));
        assert!(!argv.contains("-netdev"));
        boot.tap = true;
        boot.writable = false;
        boot.verbose = true;
        let argv = boot.vmm_argv();
        assert!(argv
            .join(" ")
            .contains("-netdev tap,id=net0,ifname=barge0,script=no,downscript=no -device virtio-net-pci,netdev=net0"));
        assert_eq!(
            argv.last().unwrap(),
            "console=ttyS0 root=/dev/vda ro panic=-1 -- \"echo 'hi there'\""
        );
        let script = boot.script();
        assert!(
            script.contains("timeout -s KILL 600 qemu-system-x86_64 "),
            "{script}"
        );
        // The command line reaches QEMU as one word.
        assert!(
            script.contains(
                r#"-append 'console=ttyS0 root=/dev/vda ro panic=-1 -- "echo '\''hi there'\''"'"#
            ),
            "{script}"
        );
        boot.command = "echo \"a b\"".into();
        assert!(boot.cmdline().ends_with(" -- echo \"a b\""));
        assert!(script.contains("} | while IFS= read -r line"), "{script}");
        assert!(script.ends_with("> /out/boot1.console\n"), "{script}");
        assert!(boot.background_script().ends_with(") &\n"));
    }

    #[test]
    fn barge_boots_the_image_as_issue_13_says() {
        let mut boot = DebianBoot::new("b", "true");
        boot.vmm = Vmm::Barge;
        boot.tap = true;
        assert_eq!(
            boot.vmm_argv().join(" "),
            "barge run --kernel /lab/guest/debian/vmlinuz --initramfs /lab/guest/debian/initrd.img \
             --disk path=/lab/guest/debian/rootfs.img --cpus 2 --memory size=1024M --net tap=barge0 \
             --report /out/b.report.json --cmdline console=ttyS0 root=/dev/vda rw quiet panic=-1 -- \"true\""
        );
        boot.passthrough_env = Some("LAB_NVME0");
        assert!(boot
            .script()
            .contains(" --device \"vfio=$LAB_NVME0\" < /dev/null"));
        boot.vmm = Vmm::Qemu;
        assert!(!boot.script().contains("--device \"vfio"));
    }

    /// Runs `boot`'s script with `qemu-system-x86_64` a stub that ends its
    /// first boot without GUEST-EXIT (as a guest reset would) and runs
    /// later ones to the end; /out and /tmp are a scratch folder.
    fn run_with_a_stub_vmm(boot: &DebianBoot) -> GuestConsole {
        let dir = std::env::temp_dir().join(format!(
            "barge-debian-script-{}-{}",
            std::process::id(),
            boot.attempts
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let stub = dir.join("qemu-system-x86_64");
        std::fs::write(
            &stub,
            format!(
                "#!/bin/sh\necho GUEST-UP cpus=2 mem_kb=990064\n\
                 if [ -e {d}/booted ]; then echo GUEST-EXIT 0; else touch {d}/booted; echo reset; fi\n",
                d = dir.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&stub, std::fs::Permissions::from_mode(0o755)).unwrap();
        let script = boot
            .script()
            .replace("/tmp/", &format!("{}/", dir.display()))
            .replace("/out/", &format!("{}/", dir.display()));
        let status = std::process::Command::new("sh")
            .args(["-c", &script])
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    dir.display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .status()
            .unwrap();
        assert!(status.success());
        let console = GuestConsole::read(&dir, &boot.name);
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(
            !left.iter().any(|n| n.to_string_lossy().ends_with(".boot")),
            "{left:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        console
    }

    #[test]
    fn a_boot_without_guest_exit_is_booted_again_only_when_attempts_allow() {
        let mut boot = DebianBoot::new("retry", "true");
        let once = run_with_a_stub_vmm(&boot);
        assert!(once.retries.is_empty());
        assert_eq!(once.guest_up().map(|u| u.cpus), Some(2));
        assert_eq!(once.guest_exit(), None);
        assert_eq!(once.vmm_exit(), Some(0));

        boot.attempts = 2;
        let twice = run_with_a_stub_vmm(&boot);
        assert_eq!(twice.retries.len(), 1, "{twice:?}");
        assert!(
            twice.retries[0].starts_with("VMM-RETRY no GUEST-EXIT: booting retry again (2 of 2)"),
            "{}",
            twice.retries[0]
        );
        // The failed boot's lines are with its retry, not in the console.
        assert!(
            twice.retries[0].ends_with("reset\nVMM-EXIT 0"),
            "{}",
            twice.retries[0]
        );
        assert_eq!(twice.lines[0].1, VMM_START);
        assert_eq!(
            twice
                .lines
                .iter()
                .filter(|(_, l)| l.starts_with("GUEST-UP"))
                .count(),
            1
        );
        assert_eq!(twice.guest_exit(), Some(0));
        assert_eq!(twice.vmm_exit(), Some(0));
    }

    #[test]
    fn the_stamping_loop_keeps_lines_and_a_last_one_without_newline() {
        let script = format!("printf 'a b\\n\\\\c\\nlast' | {STAMP}");
        let output = std::process::Command::new("sh")
            .args(["-c", &script])
            .output()
            .unwrap();
        let console = GuestConsole::parse(&String::from_utf8_lossy(&output.stdout));
        let lines: Vec<&str> = console.lines.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(lines, ["a b", "\\c", "last"]);
        assert!(console.lines[0].0 > 0.0);
    }

    #[test]
    fn console_markers_and_timings_are_read() {
        let text = "10.00 VMM-START\n\
                    12.50 [    1.0] kernel line\n\
                    30.25 junk GUEST-UP cpus=2 mem_kb=990064\r\n\
                    31.00 GUEST-SHA256 to-host 0123abcd -\n\
                    40.00 GUEST-DD write 268435456 bytes (268 MB, 256 MiB) copied, 2.5 s, 107 MB/s\n\
                    45.00 GUEST-EXIT 3\n\
                    47.50 VMM-EXIT 0\n";
        let console = GuestConsole::parse(text);
        assert_eq!(
            console.guest_up(),
            Some(GuestUp {
                cpus: 2,
                mem_kb: 990064
            })
        );
        assert_eq!(console.guest_exit(), Some(3));
        assert_eq!(console.vmm_exit(), Some(0));
        assert_eq!(console.boot_seconds(), Some(20.25));
        assert_eq!(console.poweroff_seconds(), Some(2.5));
        assert_eq!(console.guest_sha256("to-host").as_deref(), Some("0123abcd"));
        assert_eq!(console.guest_sha256("from-host"), None);
        let write = console.dd("write").unwrap();
        assert_eq!(write.bytes, 268435456);
        assert!((write.mib_per_second() - 102.4).abs() < 1e-9);
        assert_eq!(console.dd("read"), None);
        assert!(console.text().contains("junk GUEST-UP"));
        assert_eq!(GuestConsole::parse("").guest_up(), None);
    }

    #[test]
    fn dd_summaries_parse() {
        assert_eq!(
            parse_dd("268435456 bytes (268 MB, 256 MiB) copied, 1.25 s, 215 MB/s"),
            Some(DdResult {
                bytes: 268435456,
                seconds: 1.25
            })
        );
        assert_eq!(parse_dd("dd: error writing: No space left"), None);
        assert_eq!(parse_dd("1 bytes copied, 0 s, inf B/s"), None);
        let command = dd_command(256);
        assert!(command.contains("bs=1M count=256 oflag=direct conv=fsync"));
        assert!(command.contains("iflag=direct"));
    }

    #[test]
    fn tcp_check_uses_the_tap_addresses_and_both_ports() {
        let guest = tcp_guest_command(4 << 20);
        assert!(guest.contains("ip addr add 192.168.100.2/24 dev eth0"));
        assert!(guest.contains("head -c 4194304 /dev/urandom"));
        assert!(guest.contains("TCP-LISTEN:5002") && guest.contains("TCP-LISTEN:5001"));
        // Nothing the kernel or the guest's init would take for its own.
        assert!(!guest.contains('"'));
        let host = tcp_host_script(4 << 20, 300);
        assert!(host.contains("TCP:192.168.100.2:5001"));
        assert!(host.contains("TCP:192.168.100.2:5002"));
        assert!(host.contains("> /out/tcp.status"));
    }
}
