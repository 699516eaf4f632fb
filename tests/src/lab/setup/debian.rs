//! The Debian bookworm guest image: a system built with mmdebstrap from the
//! machine's own Debian mirror (its apt configuration names it), with
//! systemd, udev, iproute2, socat and the lab's own kernel package (the
//! bookworm-backports cloud kernel the lab host runs, from the downloads
//! folder), whose initramfs-tools initrd is built inside the image. A
//! systemd unit follows the busybox guest's convention (GUEST-UP, the
//! command after ` -- ` on the kernel command line, GUEST-EXIT, power off).
//!
//! The result is a raw ext4 `rootfs.img` (made with `mkfs.ext4 -d`: no loop
//! mount), which goes with `vmlinuz` and `initrd.img` into a second ext4
//! file system, [`LabPaths::debian_disk`]: the lab host gets that as a
//! virtio disk and mounts it at /lab/guest/debian. The same step caches the
//! host modules that disk and the tap device need ([`HOST_EXTRA_MODULES`]),
//! taken from the image's copy of the same kernel package.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use super::apt_install;
use super::apt_sources::machine_mirror;
use super::kernel::{cache_module_orders, main_kernel_deb};
use crate::lab::{DebianImage, ExtraModules, LabError, LabPaths, LabState, HOST_EXTRA_MODULES};

/// The suite the image is built from.
const SUITE: &str = "bookworm";
/// What the image holds besides Debian's Essential set and the kernel.
const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "udev",
    "kmod",
    "initramfs-tools",
    "e2fsprogs",
    "iproute2",
    "socat",
];
/// What setup needs on this machine to build it: mmdebstrap, mkfs.ext4, and
/// socat for the lab host's end of the guest's TCP checks.
const BUILD_PACKAGES: &[&str] = &["mmdebstrap", "e2fsprogs", "socat"];
const MMDEBSTRAP: &str = "/usr/bin/mmdebstrap";
/// mmdebstrap's hook that makes a local .deb given to --include visible
/// inside the chroot (and removes it afterwards).
const LOCAL_DEB_HOOKS: &str = "/usr/share/mmdebstrap/hooks/file-mirror-automount";
/// The initrd carries the modules it needs to mount root=/dev/vda and no
/// others (initramfs-tools' default, MODULES=most, carries every storage
/// driver, and its udev then loads AHCI and SCSI for QEMU's q35 under
/// nested virtualization: seconds): MODULES=list with virtio_blk (the cloud
/// kernel has virtio_pci, ext4 and nvme built in). Written before the
/// kernel is installed, so its initrd is built once, with them.
const INITRD_MODULES: &[&str] = &["virtio_blk"];
const INITRD_CONFIG: &str = "etc/initramfs-tools/conf.d/barge-lab.conf";
const INITRD_MODULES_LIST: &str = "usr/share/initramfs-tools/modules.d/barge-lab";

/// Documentation and translations stay out (copyright files stay in).
const DPKG_OPTIONS: &[&str] = &[
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
];

/// `rootfs.img`'s size (sparse: about 300 MB of it is used).
pub(super) const ROOTFS_SIZE: u64 = 2 << 30;
/// Room on the lab host's disk beyond `rootfs.img`, the kernel and the initrd
/// (ext4's own metadata and journal): every block the guest writes into
/// `rootfs.img` has a block behind it.
const DISK_SLACK: u64 = 512 << 20;
const ROOTFS_LABEL: &str = "barge-debian";
const DISK_LABEL: &str = "barge-lab-debian";

/// The service's script: GUEST-UP, the command, GUEST-EXIT (the unit powers
/// the guest off when it ends).
const GUEST_SCRIPT_PATH: &str = "usr/local/sbin/barge-guest";
const GUEST_SCRIPT: &str = r#"#!/bin/sh
# barge lab guest: the busybox guest's convention under systemd. Once
# multi-user.target is reached, print GUEST-UP, run the shell command that
# follows " -- " on the kernel command line (read from /proc/cmdline, as it
# was given), print GUEST-EXIT with its status. barge-guest.service powers
# the guest off when this ends.
#
# The kernel hands the words after "--" to init as its arguments and
# panics beyond 31 of them ("Too many boot init vars"); a command wrapped
# whole in double quotes is one word to the kernel, and is unwrapped here.
cpus=$(grep -c '^processor' /proc/cpuinfo)
mem_kb=0
while read -r key value _; do
    if [ "$key" = MemTotal: ]; then mem_kb=$value; fi
done < /proc/meminfo
cmdline=$(cat /proc/cmdline)
command=
case "$cmdline" in
*" -- "*) command=${cmdline#* -- } ;;
esac
case "$command" in
\"*\") command=${command#\"}; command=${command%\"} ;;
esac
echo "GUEST-UP cpus=$cpus mem_kb=$mem_kb"
status=0
if [ -n "$command" ]; then
    sh -c "$command" < /dev/null
    status=$?
fi
sync
echo "GUEST-EXIT $status"
"#;

const GUEST_SERVICE_PATH: &str = "etc/systemd/system/barge-guest.service";
const GUEST_SERVICE: &str = "\
[Unit]
Description=barge lab guest: GUEST-UP, the kernel command line's command, GUEST-EXIT
After=multi-user.target
# poweroff-force: no orderly stop of every unit (seconds under nested
# virtualization); processes are still killed and the file systems
# unmounted or remounted read-only, so the disk is clean.
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
# idle: after every other start-up job, so that systemd's status lines do
# not interleave with the command's output on the console.
Type=idle
ExecStart=/usr/local/sbin/barge-guest
StandardInput=null
StandardOutput=tty
StandardError=inherit
TTYPath=/dev/console
Environment=HOME=/root
WorkingDirectory=/
";

/// The default target: multi-user, then the guest's command.
const GUEST_TARGET_PATH: &str = "etc/systemd/system/barge-guest.target";
const GUEST_TARGET: &str = "\
[Unit]
Description=barge lab guest (multi-user, then the command after -- on the kernel command line)
Requires=multi-user.target barge-guest.service
After=multi-user.target
AllowIsolate=yes
";

/// /sbin/init: systemd (diverted to /sbin/init.systemd), without the words
/// after ` -- ` that the kernel hands init as arguments.
const INIT_PATH: &str = "usr/sbin/init";
const INIT_DIVERSION: &str = "/sbin/init.systemd";
const INIT_WRAPPER: &str = r#"#!/bin/sh
# barge lab guest: the kernel hands the words after " -- " on its command
# line to init as arguments, and systemd would take them (and the tail of
# /proc/cmdline) as its own: a bare number as a SysV runlevel, -h as --help,
# "single" or "emergency" as a target. They are the guest's command
# (barge-guest reads it from /proc/cmdline), so systemd gets no arguments
# and, as SYSTEMD_PROC_CMDLINE, the command line before " -- ".
if cmdline=$(cat /proc/cmdline 2>/dev/null); then
    SYSTEMD_PROC_CMDLINE=${cmdline%% -- *}
    export SYSTEMD_PROC_CMDLINE
fi
exec /lib/systemd/systemd
"#;

/// Units masked in the image, each with why.
const MASKED_UNITS: &[(&str, &str)] = &[
    (
        "getty@.service",
        "no login prompt on the console: it would interleave",
    ),
    (
        "serial-getty@.service",
        "no login prompt on ttyS0 (console=ttyS0)",
    ),
    ("console-getty.service", "no login prompt on /dev/console"),
    (
        "getty-static.service",
        "it starts gettys on tty2-tty6 when logind is missing, and fails",
    ),
    (
        "systemd-firstboot.service",
        "it would prompt on the console on a first boot",
    ),
    (
        "systemd-logind.service",
        "it needs D-Bus, which the image does not have: no logins here",
    ),
    (
        "systemd-networkd-wait-online.service",
        "no wait for a network the test command configures itself",
    ),
    (
        "systemd-hwdb-update.service",
        "a fresh image would rebuild the hardware database at every boot",
    ),
    (
        "ldconfig.service",
        "a fresh image would rebuild the loader cache at boot",
    ),
    (
        "systemd-journal-catalog-update.service",
        "a fresh image would rebuild the journal catalog at boot",
    ),
    ("systemd-update-done.service", "goes with the three above"),
    (
        "e2scrub_all.timer",
        "no periodic maintenance in a test guest",
    ),
    (
        "e2scrub_reap.service",
        "no periodic maintenance in a test guest",
    ),
    ("fstrim.timer", "no periodic maintenance in a test guest"),
    (
        "dpkg-db-backup.timer",
        "no periodic maintenance in a test guest",
    ),
    (
        "systemd-tmpfiles-clean.timer",
        "no periodic maintenance in a test guest",
    ),
    (
        "dev-hugepages.mount",
        "every unit costs a second or two at boot under nested virtualization: \
         no hugetlbfs, POSIX message queues, binfmt_misc, FUSE or configfs here",
    ),
    ("dev-mqueue.mount", "as dev-hugepages.mount"),
    (
        "proc-sys-fs-binfmt_misc.automount",
        "as dev-hugepages.mount",
    ),
    ("systemd-binfmt.service", "as dev-hugepages.mount"),
    ("sys-fs-fuse-connections.mount", "as dev-hugepages.mount"),
    ("sys-kernel-config.mount", "as dev-hugepages.mount"),
    ("modprobe@configfs.service", "as dev-hugepages.mount"),
    ("modprobe@fuse.service", "as dev-hugepages.mount"),
    ("modprobe@loop.service", "no loop devices here"),
    ("modprobe@dm_mod.service", "no device mapper here"),
    ("modprobe@efi_pstore.service", "no EFI here"),
    ("systemd-pstore.service", "no EFI here"),
    (
        "systemd-update-utmp.service",
        "no logins here, so no login records",
    ),
    (
        "systemd-update-utmp-runlevel.service",
        "no logins here, so no login records",
    ),
    ("apt-daily.timer", "no apt runs (should apt be added)"),
    (
        "apt-daily-upgrade.timer",
        "no apt runs (should apt be added)",
    ),
];

/// systemd generators masked in the image: each is a process at every boot
/// (seconds in all under nested virtualization) for what this guest does not
/// have (encrypted, integrity or verity volumes, GPT auto-mounts,
/// hibernation, SysV scripts, rc.local, offline updates, gettys). The
/// fstab, debug (`systemd.mask=`, `systemd.debug_shell`) and run
/// (`systemd.run=`) generators stay.
const MASKED_GENERATORS: &[&str] = &[
    "systemd-cryptsetup-generator",
    "systemd-gpt-auto-generator",
    "systemd-hibernate-resume-generator",
    "systemd-integritysetup-generator",
    "systemd-veritysetup-generator",
    "systemd-rc-local-generator",
    "systemd-system-update-generator",
    "systemd-sysv-generator",
    "systemd-getty-generator",
];

/// Links the image gets besides the masks: (path, target).
const LINKS: &[(&str, &str)] = &[
    (
        "etc/systemd/system/default.target",
        "/etc/systemd/system/barge-guest.target",
    ),
    // The NIC keeps its kernel name (eth0): a test configures it by name.
    ("etc/systemd/network/99-default.link", "/dev/null"),
];

/// Files removed from what mmdebstrap made: the build machine's resolver
/// configuration and the getty link for tty1.
const REMOVED: &[&str] = &[
    "etc/resolv.conf",
    "etc/systemd/system/getty.target.wants/getty@tty1.service",
];

const HOSTNAME: &str = "barge-guest";

/// A file setup writes into the image.
struct ImageFile {
    path: &'static str,
    contents: String,
    mode: u32,
}

fn image_files() -> Vec<ImageFile> {
    let file = |path, contents: &str, mode| ImageFile {
        path,
        contents: contents.to_string(),
        mode,
    };
    vec![
        file(GUEST_SCRIPT_PATH, GUEST_SCRIPT, 0o755),
        file(GUEST_SERVICE_PATH, GUEST_SERVICE, 0o644),
        file(GUEST_TARGET_PATH, GUEST_TARGET, 0o644),
        file(INIT_PATH, INIT_WRAPPER, 0o755),
        file("etc/hostname", &format!("{HOSTNAME}\n"), 0o644),
        file(
            "etc/hosts",
            &format!("127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n::1\tlocalhost\n"),
            0o644,
        ),
        file(
            "etc/fstab",
            "# barge lab guest: the root file system is the kernel's root=, mounted by the \
             initrd (rw or ro as the command line says)\n",
            0o644,
        ),
        file("etc/resolv.conf", "", 0o644),
        file(
            "etc/modprobe.d/barge-lab.conf",
            "# barge lab guest: udev would load KVM for the CPU, and its set-up takes seconds\n\
             # under nested virtualization; no VMs run in here (modprobe still loads them).\n\
             blacklist kvm_amd\nblacklist kvm_intel\n",
            0o644,
        ),
    ]
}

/// Everything that decides what the image holds, as text: a cached image
/// whose recipe differs is built again.
fn recipe_text(kernel_package: &str) -> String {
    let mut text = format!(
        "suite {SUITE}\nkernel {kernel_package}\npackages {}\ndpkg {}\nrootfs {ROOTFS_SIZE}\n\
         initrd modules {}\n",
        PACKAGES.join(","),
        DPKG_OPTIONS.join(","),
        INITRD_MODULES.join(",")
    );
    for file in image_files() {
        text.push_str(&format!(
            "file {} {:o}\n{}\n",
            file.path, file.mode, file.contents
        ));
    }
    for (unit, _) in MASKED_UNITS {
        text.push_str(&format!("mask {unit}\n"));
    }
    for generator in MASKED_GENERATORS {
        text.push_str(&format!("mask generator {generator}\n"));
    }
    for (path, target) in LINKS {
        text.push_str(&format!("link {path} {target}\n"));
    }
    for path in REMOVED {
        text.push_str(&format!("remove {path}\n"));
    }
    text.push_str(&format!("extra modules {}\n", HOST_EXTRA_MODULES.join(",")));
    text
}

/// FNV-1a (64 bits) of the recipe, in hex: stable across Rust versions.
fn fingerprint(text: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// Builds the Debian image and the host's extra modules unless they are
/// cached for the current recipe and kernel; whether `state` changed. Without
/// apt (or for a kernel given by hand, which has no package to install in
/// the image) it prints a note and leaves them out.
pub(super) fn ensure_debian(
    paths: &LabPaths,
    state: &mut LabState,
    apt: bool,
) -> Result<bool, LabError> {
    let recipe = fingerprint(&recipe_text(&state.kernel_package));
    let cached = state.debian.as_ref().is_some_and(|d| {
        d.recipe == recipe && d.kernel_package == state.kernel_package && d.disk.exists()
    }) && state
        .extra_modules
        .as_ref()
        .is_some_and(|m| m.kernel_version == state.kernel_version);
    if cached {
        return Ok(false);
    }
    if state.kernel_package.starts_with("supplied:") {
        eprintln!(
            "barge-lab: note: no Debian guest image: the host kernel was given by hand, and the \
             image installs the lab's kernel package (`run --debian` and `--tap` cannot run)"
        );
        return Ok(false);
    }
    if !apt {
        eprintln!(
            "barge-lab: note: no Debian guest image: building it needs root and apt \
             (mmdebstrap); `run --debian` and `--tap` cannot run"
        );
        return Ok(false);
    }
    let (image, modules) = build(paths, state, recipe)?;
    state.debian = Some(image);
    state.extra_modules = Some(modules);
    Ok(true)
}

fn build(
    paths: &LabPaths,
    state: &LabState,
    recipe: String,
) -> Result<(DebianImage, ExtraModules), LabError> {
    let started = Instant::now();
    let missing: Vec<&str> = BUILD_PACKAGES
        .iter()
        .copied()
        .filter(|p| !package_installed(p))
        .collect();
    if !missing.is_empty() {
        apt_install(&missing, None)?;
    }
    let deb = main_kernel_deb(paths, &state.kernel_package)?;
    let version = state
        .kernel_package
        .strip_prefix("linux-image-")
        .unwrap_or(&state.kernel_package)
        .to_string();
    let dir = paths.debian_dir();
    let work = dir.join("build");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| LabError::io("cannot create", &work, e))?;
    let root = work.join("root");
    let log = dir.join("build.log");

    let (uri, signed_by) = machine_mirror()?;
    let source = mirror_line(&uri, signed_by.as_deref());
    eprintln!(
        "barge-lab: building the Debian {SUITE} guest image with mmdebstrap from {uri} (log \
         {})",
        log.display()
    );
    let step = Instant::now();
    mmdebstrap(&root, &deb, &version, &source, &work, &log)?;
    let mmdebstrap_secs = step.elapsed().as_secs_f64();
    check_initrd(&work.join("initrd-contents.txt"))?;
    customize(&root)?;

    let modules_dir = paths.extra_modules_dir();
    let load_orders = cache_module_orders(
        &root.join("usr/lib/modules").join(&version),
        &modules_dir,
        HOST_EXTRA_MODULES,
    )?;

    let step = Instant::now();
    let contents = work.join("disk");
    std::fs::create_dir_all(&contents).map_err(|e| LabError::io("cannot create", &contents, e))?;
    let rootfs = contents.join("rootfs.img");
    mkfs_ext4(&root, &rootfs, ROOTFS_SIZE, ROOTFS_LABEL)?;
    let mut payload = ROOTFS_SIZE;
    for (from, to) in [
        (format!("boot/vmlinuz-{version}"), "vmlinuz"),
        (format!("boot/initrd.img-{version}"), "initrd.img"),
    ] {
        let from = root.join(from);
        let to = contents.join(to);
        payload += std::fs::copy(&from, &to).map_err(|e| LabError::io("cannot copy", &from, e))?;
    }
    let disk_tmp = work.join("disk.img");
    mkfs_ext4(&contents, &disk_tmp, disk_size(payload), DISK_LABEL)?;
    let mkfs_secs = step.elapsed().as_secs_f64();
    let disk = paths.debian_disk();
    // A rename: a lab run still using the old disk keeps its file.
    std::fs::rename(&disk_tmp, &disk).map_err(|e| LabError::io("cannot move", &disk_tmp, e))?;
    let _ = std::fs::remove_dir_all(&work);
    let used = allocated_bytes(&disk);
    eprintln!(
        "barge-lab: Debian guest image (kernel {version}) cached as {} ({} MiB used of {} \
         MiB) in {:.1} s: mmdebstrap {mmdebstrap_secs:.1} s, mkfs.ext4 {mkfs_secs:.1} s; \
         host modules {}",
        disk.display(),
        used >> 20,
        disk_size(payload) >> 20,
        started.elapsed().as_secs_f64(),
        load_orders
            .values()
            .flatten()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok((
        DebianImage {
            disk,
            kernel_package: state.kernel_package.clone(),
            kernel_version: version.clone(),
            rootfs_size: ROOTFS_SIZE,
            recipe,
        },
        ExtraModules {
            kernel_version: version,
            modules_dir,
            load_orders,
        },
    ))
}

/// The lab host's disk: the payload, rounded up to a MiB, with slack.
fn disk_size(payload: u64) -> u64 {
    (payload + DISK_SLACK).div_ceil(1 << 20) << 20
}

fn parent(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(dir, _)| dir)
}

/// A one-line apt source for the image's suite on the machine's mirror.
fn mirror_line(uri: &str, signed_by: Option<&str>) -> String {
    match signed_by {
        Some(key) => format!("deb [signed-by={key}] {uri} {SUITE} main"),
        None => format!("deb {uri} {SUITE} main"),
    }
}

/// The mmdebstrap arguments: the Essential set, [`PACKAGES`] and the kernel
/// .deb, into `root` (a directory); two hooks inside the chroot divert
/// /sbin/init (setup writes its wrapper there) and list the initrd.
fn mmdebstrap_args(
    root: &Path,
    deb: &Path,
    version: &str,
    source: &str,
    work: &Path,
) -> Vec<String> {
    let mut args = vec![
        "--mode=root".to_string(),
        "--variant=essential".to_string(),
        format!("--include={}", PACKAGES.join(",")),
        format!("--include={}", deb.display()),
        format!("--hook-dir={LOCAL_DEB_HOOKS}"),
    ];
    args.extend(DPKG_OPTIONS.iter().map(|o| format!("--dpkgopt={o}")));
    args.push(format!(
        "--essential-hook=mkdir -p \"$1/{}\" \"$1/{}\" && echo MODULES=list > \"$1/{INITRD_CONFIG}\" \
         && printf '{}\\n' > \"$1/{INITRD_MODULES_LIST}\"",
        parent(INITRD_CONFIG),
        parent(INITRD_MODULES_LIST),
        INITRD_MODULES.join("\\n"),
    ));
    args.push(format!(
        "--customize-hook=chroot \"$1\" dpkg-divert --quiet --local --rename --divert \
         {INIT_DIVERSION} --add /sbin/init"
    ));
    args.push(format!(
        "--customize-hook=chroot \"$1\" lsinitramfs /boot/initrd.img-{version} > '{}'",
        work.join("initrd-contents.txt").display()
    ));
    args.extend([
        SUITE.to_string(),
        root.to_string_lossy().into_owned(),
        source.to_string(),
    ]);
    args
}

fn mmdebstrap(
    root: &Path,
    deb: &Path,
    version: &str,
    source: &str,
    work: &Path,
    log: &Path,
) -> Result<(), LabError> {
    let args = mmdebstrap_args(root, deb, version, source, work);
    let log_file = std::fs::File::create(log).map_err(|e| LabError::io("cannot create", log, e))?;
    let log_err = log_file
        .try_clone()
        .map_err(|e| LabError::io("cannot open", log, e))?;
    let status = Command::new(MMDEBSTRAP)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err)
        .status()
        .map_err(|e| LabError::Command {
            command: format!("{MMDEBSTRAP} {}", args.join(" ")),
            detail: format!("{e} (install mmdebstrap)"),
        })?;
    if !status.success() {
        return Err(LabError::Command {
            command: format!("mmdebstrap (its log: {})", log.display()),
            detail: format!("{status}; the log's last lines:\n{}", tail(log, 15)),
        });
    }
    Ok(())
}

/// The initrd must carry virtio_blk (root=/dev/vda: VIRTIO_BLK=m in the
/// cloud kernel; virtio_pci, ext4 and nvme are built in).
fn check_initrd(listing: &Path) -> Result<(), LabError> {
    let text =
        std::fs::read_to_string(listing).map_err(|e| LabError::io("cannot read", listing, e))?;
    if text.lines().any(|l| l.contains("/virtio_blk.ko")) {
        return Ok(());
    }
    Err(LabError::Setup(format!(
        "the Debian guest's initrd has no virtio_blk module (its contents: {}), so root=/dev/vda \
         cannot be found: check /etc/initramfs-tools/initramfs.conf (MODULES=most) in the image",
        listing.display()
    )))
}

/// Writes [`image_files`], the masks and [`LINKS`] into `root`, removes
/// [`REMOVED`] and gives the image a machine id of its own.
fn customize(root: &Path) -> Result<(), LabError> {
    for path in REMOVED {
        remove_in_root(root, path)?;
    }
    for file in image_files() {
        write_in_root(root, file.path, file.contents.as_bytes(), file.mode)?;
    }
    for (unit, _) in MASKED_UNITS {
        link_in_root(root, &format!("etc/systemd/system/{unit}"), "/dev/null")?;
    }
    for generator in MASKED_GENERATORS {
        link_in_root(
            root,
            &format!("etc/systemd/system-generators/{generator}"),
            "/dev/null",
        )?;
    }
    for (path, target) in LINKS {
        link_in_root(root, path, target)?;
    }
    write_in_root(
        root,
        "etc/machine-id",
        format!("{}\n", machine_id()?).as_bytes(),
        0o444,
    )
}

/// A random machine id (32 hex digits), as systemd-machine-id-setup makes.
fn machine_id() -> Result<String, LabError> {
    let source = Path::new("/proc/sys/kernel/random/uuid");
    let uuid =
        std::fs::read_to_string(source).map_err(|e| LabError::io("cannot read", source, e))?;
    Ok(uuid.trim().replace('-', ""))
}

/// `root/relative`, refusing a path through a symbolic link: the image's
/// links are absolute and would lead out of it, into this machine's files.
fn inside_root(root: &Path, relative: &str) -> Result<PathBuf, LabError> {
    let mut path = root.to_path_buf();
    let parts: Vec<&str> = relative.split('/').collect();
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() || *part == "." || *part == ".." {
            return Err(LabError::Setup(format!(
                "bad path {relative} inside the Debian image"
            )));
        }
        path.push(part);
        let last = i + 1 == parts.len();
        if !last {
            match std::fs::symlink_metadata(&path) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    return Err(LabError::Setup(format!(
                        "{} inside the Debian image is a symbolic link: setup does not write \
                         through it",
                        path.display()
                    )))
                }
                Ok(_) => {}
                Err(_) => {
                    std::fs::create_dir_all(&path)
                        .map_err(|e| LabError::io("cannot create", &path, e))?;
                }
            }
        }
    }
    Ok(path)
}

fn remove_in_root(root: &Path, relative: &str) -> Result<(), LabError> {
    let path = inside_root(root, relative)?;
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LabError::io("cannot remove", &path, e)),
    }
}

fn write_in_root(root: &Path, relative: &str, data: &[u8], mode: u32) -> Result<(), LabError> {
    use std::os::unix::fs::PermissionsExt;
    remove_in_root(root, relative)?;
    let path = inside_root(root, relative)?;
    std::fs::write(&path, data).map_err(|e| LabError::io("cannot write", &path, e))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| LabError::io("cannot chmod", &path, e))
}

fn link_in_root(root: &Path, relative: &str, target: &str) -> Result<(), LabError> {
    remove_in_root(root, relative)?;
    let path = inside_root(root, relative)?;
    std::os::unix::fs::symlink(target, &path).map_err(|e| LabError::io("cannot link", &path, e))
}

/// `mkfs.ext4 -d`: an ext4 file system of `size` bytes (sparse) holding
/// `from`'s tree, owners and modes as they are, with no loop mount.
fn mkfs_ext4(from: &Path, image: &Path, size: u64, label: &str) -> Result<(), LabError> {
    let _ = std::fs::remove_file(image);
    let file = std::fs::File::create(image).map_err(|e| LabError::io("cannot create", image, e))?;
    file.set_len(size)
        .map_err(|e| LabError::io("cannot size", image, e))?;
    drop(file);
    crate::lab::command_output(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-L",
            label,
            "-d",
            &from.to_string_lossy(),
            &image.to_string_lossy(),
        ],
    )
    .map(|_| ())
}

fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

fn package_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_script_follows_the_busybox_guests_markers() {
        let up = GUEST_SCRIPT
            .find("GUEST-UP cpus=$cpus mem_kb=$mem_kb")
            .unwrap();
        let run = GUEST_SCRIPT.find("sh -c \"$command\"").unwrap();
        let exit = GUEST_SCRIPT.find("GUEST-EXIT $status").unwrap();
        assert!(up < run && run < exit);
        // The command is what follows the first " -- ".
        assert!(GUEST_SCRIPT.contains(r#"command=${cmdline#* -- }"#));
    }

    #[test]
    fn the_guest_command_is_split_off_the_kernel_command_line() {
        // The same expansions the script and the init wrapper use, run by
        // this machine's shell.
        let split = |cmdline: &str| {
            let start = GUEST_SCRIPT.find("command=\n").unwrap();
            let end = GUEST_SCRIPT.find("echo \"GUEST-UP").unwrap();
            let script = format!(
                "cmdline='{cmdline}'\n{}\nprintf '%s|%s' \"$command\" \"${{cmdline%% -- *}}\"",
                &GUEST_SCRIPT[start..end]
            );
            let output = Command::new("sh").args(["-c", &script]).output().unwrap();
            String::from_utf8_lossy(&output.stdout).into_owned()
        };
        assert_eq!(
            split("console=ttyS0 root=/dev/vda rw -- echo 1 -- -h"),
            "echo 1 -- -h|console=ttyS0 root=/dev/vda rw"
        );
        assert_eq!(
            split("console=ttyS0 rw -- \"set -e; echo a b\""),
            "set -e; echo a b|console=ttyS0 rw"
        );
        assert_eq!(
            split("console=ttyS0 -- echo \"a b\""),
            "echo \"a b\"|console=ttyS0"
        );
        assert_eq!(split("console=ttyS0 -- \""), "\"|console=ttyS0");
        assert_eq!(split("console=ttyS0"), "|console=ttyS0");
    }

    #[test]
    fn the_unit_powers_off_after_multi_user_and_the_target_is_default() {
        assert!(GUEST_SERVICE.contains("After=multi-user.target\n"));
        assert!(GUEST_SERVICE.contains("SuccessAction=poweroff-force\n"));
        assert!(GUEST_SERVICE.contains("FailureAction=poweroff-force\n"));
        assert!(GUEST_SERVICE.contains(&format!("ExecStart=/{GUEST_SCRIPT_PATH}\n")));
        assert!(GUEST_TARGET.contains("Requires=multi-user.target barge-guest.service\n"));
        assert!(LINKS
            .iter()
            .any(|(p, t)| p.ends_with("default.target") && t.ends_with(GUEST_TARGET_PATH)));
        assert!(INIT_WRAPPER.contains("exec /lib/systemd/systemd\n"));
        assert!(MASKED_UNITS
            .iter()
            .any(|(u, _)| *u == "serial-getty@.service"));
    }

    #[test]
    fn the_recipe_fingerprint_follows_what_goes_in() {
        let a = fingerprint(&recipe_text("linux-image-6.12.95+deb12-cloud-amd64"));
        let b = fingerprint(&recipe_text("linux-image-6.12.96+deb12-cloud-amd64"));
        assert_eq!(a.len(), 16);
        assert_ne!(a, b);
        assert_eq!(
            a,
            fingerprint(&recipe_text("linux-image-6.12.95+deb12-cloud-amd64"))
        );
        assert_eq!(fingerprint(""), "cbf29ce484222325");
    }

    #[test]
    fn mmdebstrap_gets_the_mirror_the_kernel_deb_and_the_hooks() {
        let args = mmdebstrap_args(
            Path::new("/l/debian/build/root"),
            Path::new("/l/downloads/linux-image-6.12.95+deb12-cloud-amd64_1_amd64.deb"),
            "6.12.95+deb12-cloud-amd64",
            &mirror_line("http://mirror.example/debian", Some("/k.gpg")),
            Path::new("/l/debian/build"),
        );
        assert_eq!(args[0], "--mode=root");
        assert!(args.contains(
            &"--include=/l/downloads/linux-image-6.12.95+deb12-cloud-amd64_1_amd64.deb".to_string()
        ));
        assert!(args.iter().any(|a| a.starts_with("--include=systemd,")));
        assert!(args
            .iter()
            .any(|a| a.contains("dpkg-divert") && a.contains("/sbin/init")));
        assert!(args
            .iter()
            .any(|a| a.contains("lsinitramfs /boot/initrd.img-6.12.95+deb12-cloud-amd64 > '/l/debian/build/initrd-contents.txt'")));
        let n = args.len();
        assert_eq!(
            &args[n - 3..],
            [
                "bookworm",
                "/l/debian/build/root",
                "deb [signed-by=/k.gpg] http://mirror.example/debian bookworm main"
            ]
        );
        assert_eq!(
            mirror_line("http://m/debian", None),
            "deb http://m/debian bookworm main"
        );
    }

    #[test]
    fn files_are_written_inside_the_root_never_through_its_links() {
        let root = std::env::temp_dir().join(format!("barge-debian-root-{}", std::process::id()));
        let outside = root.with_extension("outside");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("usr/sbin")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        // An absolute link, as the image has: writing the wrapper replaces
        // the link, and the file it pointed at stays as it was.
        std::fs::write(outside.join("systemd"), "host file").unwrap();
        std::os::unix::fs::symlink(outside.join("systemd"), root.join("usr/sbin/init")).unwrap();
        write_in_root(&root, INIT_PATH, INIT_WRAPPER.as_bytes(), 0o755).unwrap();
        assert_eq!(
            std::fs::read_to_string(outside.join("systemd")).unwrap(),
            "host file"
        );
        assert_eq!(
            std::fs::read_to_string(root.join(INIT_PATH)).unwrap(),
            INIT_WRAPPER
        );
        // A directory link is refused.
        std::os::unix::fs::symlink(&outside, root.join("etc")).unwrap();
        assert!(write_in_root(&root, "etc/hostname", b"x", 0o644).is_err());
        assert!(!outside.join("hostname").exists());
        assert!(inside_root(&root, "../x").is_err());
        link_in_root(&root, "usr/lib/systemd/system/x.service", "/dev/null").unwrap();
        assert_eq!(
            std::fs::read_link(root.join("usr/lib/systemd/system/x.service")).unwrap(),
            PathBuf::from("/dev/null")
        );
        std::fs::remove_dir_all(&root).unwrap();
        std::fs::remove_dir_all(&outside).unwrap();
    }

    #[test]
    fn the_disk_has_room_for_every_block_of_the_rootfs() {
        assert_eq!(disk_size(ROOTFS_SIZE), ROOTFS_SIZE + DISK_SLACK);
        assert_eq!(disk_size(1), DISK_SLACK + (1 << 20));
    }
}
