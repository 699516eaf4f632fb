//! The two busybox initramfs images of the lab: the lab host's (its
//! kernel's modules, barge and the test programs, the guest's kernel and
//! initramfs, the command to run) and the guest's that barge boots inside
//! the lab. Whichever kernel the host boots, the guest's is the main one.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::cpio::{Archive, Entry};
use super::{GenericKernel, HostKernel, LabArch, LabError, LabState};

/// Marker lines the host's init prints on its console (ttyS0).
pub const READY_MARKER: &str = "BARGE-LAB-READY";
pub const FAIL_MARKER: &str = "BARGE-LAB-FAIL";
pub const EXIT_MARKER: &str = "BARGE-LAB-EXIT";
/// Framing of the results on the second serial port (ttyS1).
pub const OUT_BEGIN: &str = "BARGE-LAB-OUT-BEGIN";
pub const OUT_END: &str = "BARGE-LAB-OUT-END";
pub const STATUS_MARKER: &str = "BARGE-LAB-STATUS";

/// Where the lab host mounts the Debian guest's disk (`run --debian`):
/// `rootfs.img`, `vmlinuz`, `initrd.img`.
pub const DEBIAN_GUEST_DIR: &str = "/lab/guest/debian";
/// The serial number of the lab host's virtio disk that holds it.
pub const DEBIAN_DISK_SERIAL: &str = "barge-lab-debian";
/// The tap device `run --tap` makes in the lab host, and its address there.
pub const TAP_NAME: &str = "barge0";
pub const TAP_HOST_ADDRESS: &str = "192.168.100.1";
/// The address a guest on the tap takes by convention (its test command
/// configures it), and the prefix length of both.
pub const TAP_GUEST_ADDRESS: &str = "192.168.100.2";
pub const TAP_PREFIX_LEN: u8 = 24;

/// Where a guest initramfs lists the modules it carries, in load order.
const GUEST_MODULE_ORDER: &str = "lib/modules/load-order";

/// The guest's init: it loads the modules its initramfs carries (none in the
/// cloud kernel's guest), reports itself, runs what follows `--` on its
/// kernel command line (its arguments) as a shell command, reports the
/// status and powers off.
const GUEST_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
for m in $(cat /lib/modules/load-order 2>/dev/null); do
    insmod /lib/modules/$m.ko && echo "GUEST-INSMOD $m" || echo "GUEST-INSMOD-FAILED $m"
done
cpus=$(grep -c ^processor /proc/cpuinfo)
mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
echo "GUEST-UP cpus=$cpus mem_kb=$mem_kb"
status=0
if [ $# -gt 0 ]; then
    sh -c "$*"
    status=$?
fi
echo "GUEST-EXIT $status"
sync
poweroff -f
"#;

/// `pcibar VENDOR:DEVICE INDEX` in the guest: the guest physical address of
/// that BAR of the first such PCI device, as the guest kernel assigned it.
const GUEST_PCIBAR: &str = r#"#!/bin/sh
for d in /sys/bus/pci/devices/*; do
    [ -e "$d/vendor" ] || continue
    v=$(cat "$d/vendor"); id=$(cat "$d/device")
    if [ "${v#0x}:${id#0x}" = "$1" ]; then
        sed -n "$(( $2 + 1 ))p" "$d/resource" | cut -d' ' -f1
        exit 0
    fi
done
echo "pcibar: no PCI device $1" >&2
exit 1
"#;

/// The lab host's init. `/lab/devices` lists `NAME BDF` pairs to bind to
/// vfio-pci; `/lab/cmd.sh` is the command. Results under /out go to ttyS1.
/// With `iommufd=1` (`run --iommufd`) /dev/iommu and each bound device's
/// /dev/vfio/devices/vfioN must appear.
const HOST_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/local/bin:/bin:/sbin:/usr/bin:/usr/sbin
mkdir -p /proc /sys /dev /tmp /out /run
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t debugfs debugfs /sys/kernel/debug
mount -t tmpfs tmpfs /tmp
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
ln -sf /proc/self/fd /dev/fd 2>/dev/null

results() {
    stty -F /dev/@RESULTS_TTY@ raw -echo 2>/dev/null
    {
        echo "BARGE-LAB-OUT-BEGIN"
        tar -c -C /out . | base64
        echo "BARGE-LAB-OUT-END"
        echo "BARGE-LAB-STATUS $1"
    } > /dev/@RESULTS_TTY@
    sync
    poweroff -f
}
fail() {
    echo "BARGE-LAB-FAIL $*"
    echo "$*" > /out/lab-failure.txt
    results 125
}

for m in MODULES; do
    insmod /lib/modules/$m.ko || fail "insmod $m failed"
done
[ -c /dev/kvm ] || fail "/dev/kvm did not appear @KVM_FROM@"
for m in @EXTRA_MODULES@; do
    insmod /lib/modules/$m.ko || fail "insmod $m failed"
done
if [ @DEBIAN@ = 1 ]; then
    disk=
    for i in $(seq 50); do
        for b in /sys/block/vd*; do
            [ "$(cat "$b/serial" 2>/dev/null)" = @DEBIAN_SERIAL@ ] && disk=/dev/${b##*/}
        done
        [ -n "$disk" ] && [ -b "$disk" ] && break
        disk=
        sleep 0.1
    done
    [ -n "$disk" ] || fail "the Debian guest's disk (virtio, serial @DEBIAN_SERIAL@) did not appear"
    mkdir -p @DEBIAN_DIR@
    mount -t ext4 "$disk" @DEBIAN_DIR@ || fail "cannot mount the Debian guest's disk $disk"
    export LAB_DEBIAN=@DEBIAN_DIR@
    echo "barge-lab: Debian guest disk $disk at @DEBIAN_DIR@"
fi
if [ @TAP@ = 1 ]; then
    [ -c /dev/net/tun ] || fail "/dev/net/tun did not appear after loading tun"
    tunctl -t @TAP_NAME@ > /dev/null || fail "cannot create the tap @TAP_NAME@"
    ip addr add @TAP_HOST@/@TAP_PREFIX@ dev @TAP_NAME@ || fail "cannot address the tap @TAP_NAME@"
    ip link set @TAP_NAME@ up || fail "cannot bring the tap @TAP_NAME@ up"
    export LAB_TAP=@TAP_NAME@ LAB_TAP_HOST=@TAP_HOST@ LAB_TAP_GUEST=@TAP_GUEST@
    echo "barge-lab: tap @TAP_NAME@ @TAP_HOST@/@TAP_PREFIX@ (a guest takes @TAP_GUEST@)"
fi
iommufd=@IOMMUFD@
if [ "$iommufd" = 1 ]; then
    [ -c /dev/iommu ] || fail "/dev/iommu did not appear after loading the rebuilt iommufd module"
fi
echo 'func vfio_pci_mmap_huge_fault +p' > /sys/kernel/debug/dynamic_debug/control \
    || fail "cannot enable the vfio_pci_mmap_huge_fault dynamic-debug line"

while read -r name bdf mode; do
    [ -n "$bdf" ] || continue
    dev=/sys/bus/pci/devices/$bdf
    [ -d "$dev" ] || fail "device $name not found at $bdf"
    upper=$(echo "$name" | tr a-z A-Z)
    export "LAB_$upper=$bdf"
    if [ "$mode" = host ]; then
        echo "barge-lab: $name $bdf keeps driver $(basename "$(readlink "$dev/driver")" 2>/dev/null)"
        continue
    fi
    if [ -e "$dev/driver" ]; then echo "$bdf" > "$dev/driver/unbind"; fi
    echo vfio-pci > "$dev/driver_override"
    echo "$bdf" > /sys/bus/pci/drivers_probe
    [ "$(basename "$(readlink "$dev/driver")")" = vfio-pci ] || fail "cannot bind $bdf to vfio-pci"
    group=$(basename "$(readlink "$dev/iommu_group")")
    echo "barge-lab: $name $bdf iommu_group=$group bound to vfio-pci"
    # sysfs names the VFIO device (vfio-dev/vfioN) with or without
    # CONFIG_VFIO_DEVICE_CDEV; only with it is there a /dev node.
    cdev=$(ls "$dev/vfio-dev" 2>/dev/null)
    if [ -n "$cdev" ] && [ -c "/dev/vfio/devices/$cdev" ]; then
        echo "barge-lab: $name $bdf cdev /dev/vfio/devices/$cdev"
    elif [ "$iommufd" = 1 ]; then
        fail "$bdf got no /dev/vfio/devices/${cdev:-vfioN} (vfio.ko without CONFIG_VFIO_DEVICE_CDEV?)"
    fi
done < /lab/devices

echo "BARGE-LAB-READY kernel=$(uname -r)"
cd /out
sh /lab/cmd.sh
status=$?
echo "BARGE-LAB-EXIT $status"
results $status
"#;

/// What the host's init does besides binding devices.
#[derive(Debug, Default, Clone, Copy)]
struct InitOptions<'a> {
    /// The modules it loads first, in this order.
    modules: &'a [&'a str],
    /// It checks that /dev/iommu and the device cdevs appeared.
    iommufd: bool,
    /// Modules it loads after KVM's (virtio_blk, tun), in this order.
    extra_modules: &'a [&'a str],
    /// It mounts the Debian guest's disk at [`DEBIAN_GUEST_DIR`].
    debian: bool,
    /// It makes the tap [`TAP_NAME`] with [`TAP_HOST_ADDRESS`].
    tap: bool,
    /// The lab host's architecture: its results port and where KVM comes
    /// from.
    arch: LabArch,
}

fn flag(on: bool) -> &'static str {
    if on {
        "1"
    } else {
        "0"
    }
}

/// The host's init for `options`.
fn host_init(options: &InitOptions) -> String {
    HOST_INIT
        .replace("@EXTRA_MODULES@", &options.extra_modules.join(" "))
        .replace("MODULES", &options.modules.join(" "))
        .replace("@IOMMUFD@", flag(options.iommufd))
        .replace("@DEBIAN@", flag(options.debian))
        .replace("@DEBIAN_SERIAL@", DEBIAN_DISK_SERIAL)
        .replace("@DEBIAN_DIR@", DEBIAN_GUEST_DIR)
        .replace("@TAP@", flag(options.tap))
        .replace("@TAP_NAME@", TAP_NAME)
        .replace("@TAP_HOST@", TAP_HOST_ADDRESS)
        .replace("@TAP_GUEST@", TAP_GUEST_ADDRESS)
        .replace("@TAP_PREFIX@", &TAP_PREFIX_LEN.to_string())
        .replace("@RESULTS_TTY@", options.arch.results_tty())
        .replace("@KVM_FROM@", options.arch.kvm_from())
}

fn busybox_archive(state: &LabState, init: &str) -> Result<Archive, LabError> {
    let mut archive = Archive::new();
    add_elf(&mut archive, &state.busybox, "bin/busybox")?;
    add_skeleton(&mut archive, init);
    Ok(archive)
}

/// The init, the console and the folders every lab initramfs has.
fn add_skeleton(archive: &mut Archive, init: &str) {
    archive.add_file("init", init.as_bytes().to_vec(), true);
    archive.add("dev/console", Entry::CharDevice { major: 5, minor: 1 });
    for dir in ["proc", "sys", "dev", "tmp", "etc", "root"] {
        archive.add(dir, Entry::Dir);
    }
}

/// An arm64 initramfs with a static arm64 `busybox` (copied as it is: no
/// libraries) and `init`.
pub fn arm64_busybox_archive(busybox: &Path, init: &str) -> Result<Archive, LabError> {
    let mut archive = Archive::new();
    let data = std::fs::read(busybox).map_err(|e| LabError::io("cannot read", busybox, e))?;
    archive.add_file("bin/busybox", data, true);
    add_skeleton(&mut archive, init);
    Ok(archive)
}

/// The arm64 guest initramfs (`/lab/guest/initramfs` of the arm64 lab): the
/// x86 guest's init and `pcibar` with an arm64 busybox.
pub fn arm64_guest_initramfs(busybox: &Path) -> Result<Vec<u8>, LabError> {
    let mut archive = arm64_busybox_archive(busybox, GUEST_INIT)?;
    archive.add_file("bin/pcibar", GUEST_PCIBAR.as_bytes().to_vec(), true);
    Ok(archive.to_bytes())
}

/// The arm64 lab host's init: the x86 host's, loading `modules` (the vfio
/// ones: KVM is built in), with its results on the second PL011.
pub fn arm64_host_init(modules: &[&str]) -> String {
    host_init(&InitOptions {
        modules,
        arch: LabArch::Arm64,
        ..InitOptions::default()
    })
}

/// `/lab/devices` (`NAME BDF vfio|host` lines) and `/lab/cmd.sh`.
pub fn add_devices_and_command(
    archive: &mut Archive,
    devices: &[(String, String)],
    host_drivers: &[String],
    command_script: &str,
) {
    let devices: String = devices
        .iter()
        .map(|(name, bdf)| {
            let mode = if host_drivers.contains(name) {
                "host"
            } else {
                "vfio"
            };
            format!("{name} {bdf} {mode}\n")
        })
        .collect();
    archive.add_file("lab/devices", devices.into_bytes(), false);
    archive.add_file("lab/cmd.sh", command_script.as_bytes().to_vec(), true);
}

/// The guest initramfs that barge boots inside the lab (`/lab/guest/initramfs`).
pub fn guest_initramfs(state: &LabState) -> Result<Vec<u8>, LabError> {
    Ok(guest_archive(state)?.to_bytes())
}

fn guest_archive(state: &LabState) -> Result<Archive, LabError> {
    let mut archive = busybox_archive(state, GUEST_INIT)?;
    archive.add_file("bin/pcibar", GUEST_PCIBAR.as_bytes().to_vec(), true);
    Ok(archive)
}

/// The generic kernel's guest initramfs (`/lab/guest/generic/initramfs`):
/// the same guest, with that kernel's modules (e1000e) loaded by its init.
pub fn generic_guest_initramfs(
    state: &LabState,
    generic: &GenericKernel,
) -> Result<Vec<u8>, LabError> {
    Ok(generic_guest_archive(state, generic)?.to_bytes())
}

fn generic_guest_archive(state: &LabState, generic: &GenericKernel) -> Result<Archive, LabError> {
    let mut archive = guest_archive(state)?;
    for module in &generic.modules {
        let path = generic.modules_dir.join(format!("{module}.ko"));
        let data = std::fs::read(&path).map_err(|e| LabError::io("cannot read", &path, e))?;
        archive.add_file(&format!("lib/modules/{module}.ko"), data, false);
    }
    let order: String = generic.modules.iter().map(|m| format!("{m}\n")).collect();
    archive.add_file(GUEST_MODULE_ORDER, order.into_bytes(), false);
    Ok(archive)
}

/// What goes into the lab host besides busybox and the modules.
pub struct HostContents<'a> {
    /// Executables for /usr/local/bin, copied with the libraries they load.
    pub binaries: &'a [PathBuf],
    /// `NAME BDF` pairs to bind to vfio-pci.
    pub devices: &'a [(String, String)],
    /// Names of devices that keep their host driver (not bound).
    pub host_drivers: &'a [String],
    /// The shell script to run as the command.
    pub command_script: &'a str,
    /// Load the vfio modules rebuilt with iommufd instead of the stock ones.
    pub iommufd: bool,
    /// Modules to load after the host modules (virtio_blk, tun), in order,
    /// each with its file.
    pub extra_modules: &'a [(String, PathBuf)],
    /// Mount the Debian guest's disk at [`DEBIAN_GUEST_DIR`].
    pub debian: bool,
    /// Make the tap [`TAP_NAME`] with [`TAP_HOST_ADDRESS`].
    pub tap: bool,
    /// Carry this QEMU (with its libraries and firmware) as
    /// /usr/bin/qemu-system-x86_64, a peer VMM for side-by-side runs.
    pub peer_qemu: Option<&'a Path>,
}

/// The lab host's initramfs for `host`, its kernel (the modules are
/// `host`'s, or the rebuilt iommufd ones with `contents.iommufd`; the guest
/// kernel under /lab/guest stays the main one).
pub fn host_initramfs(
    state: &LabState,
    host: &HostKernel,
    contents: &HostContents,
) -> Result<Vec<u8>, LabError> {
    let modules = state.host_modules(host, contents.iommufd)?;
    let names: Vec<&str> = modules.iter().map(|(name, _)| name.as_str()).collect();
    let extra: Vec<&str> = contents
        .extra_modules
        .iter()
        .map(|(name, _)| name.as_str())
        .collect();
    let init = host_init(&InitOptions {
        modules: &names,
        iommufd: contents.iommufd,
        extra_modules: &extra,
        debian: contents.debian,
        tap: contents.tap,
        arch: LabArch::X86_64,
    });
    let mut archive = busybox_archive(state, &init)?;
    for (module, path) in modules.iter().chain(contents.extra_modules) {
        let data = std::fs::read(path).map_err(|e| LabError::io("cannot read", path, e))?;
        archive.add_file(&format!("lib/modules/{module}.ko"), data, false);
    }
    if let Some(qemu) = contents.peer_qemu {
        add_peer_qemu(&mut archive, qemu)?;
    }
    for binary in contents.binaries {
        let name = binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        add_elf(&mut archive, binary, &format!("usr/local/bin/{name}"))?;
    }
    let bzimage = std::fs::read(&state.bzimage)
        .map_err(|e| LabError::io("cannot read", &state.bzimage, e))?;
    archive.add_file("lab/guest/bzImage", bzimage, false);
    archive.add_file("lab/guest/initramfs", guest_initramfs(state)?, false);
    if let Some(generic) = &state.generic {
        let bzimage = std::fs::read(&generic.bzimage)
            .map_err(|e| LabError::io("cannot read", &generic.bzimage, e))?;
        archive.add_file("lab/guest/generic/bzImage", bzimage, false);
        archive.add_file(
            "lab/guest/generic/initramfs",
            generic_guest_initramfs(state, generic)?,
            false,
        );
    }
    add_devices_and_command(
        &mut archive,
        contents.devices,
        contents.host_drivers,
        contents.command_script,
    );
    Ok(archive.to_bytes())
}

/// The firmware a peer QEMU needs to boot a Linux guest with `-kernel`
/// (SeaBIOS, its option ROMs for direct kernel boot, the virtio NIC's ROM),
/// at the absolute paths QEMU searches (`qemu-system-x86_64 -L help`).
const PEER_QEMU_FIRMWARE_DIRS: &[(&str, &[&str])] = &[
    ("/usr/share/seabios", &[]),
    (
        "/usr/share/qemu",
        &[
            "kvmvapic.bin",
            "linuxboot.bin",
            "linuxboot_dma.bin",
            "multiboot.bin",
            "multiboot_dma.bin",
            "pvh.bin",
        ],
    ),
    ("/usr/lib/ipxe/qemu", &["efi-virtio.rom"]),
];

/// Adds `qemu` as /usr/bin/qemu-system-x86_64 with its libraries and the
/// firmware of [`PEER_QEMU_FIRMWARE_DIRS`] (a folder with no names listed:
/// all of its files), each at its own path.
fn add_peer_qemu(archive: &mut Archive, qemu: &Path) -> Result<(), LabError> {
    add_elf(archive, qemu, "usr/bin/qemu-system-x86_64")?;
    for (dir, names) in PEER_QEMU_FIRMWARE_DIRS {
        let dir = Path::new(dir);
        let files: Vec<PathBuf> = if names.is_empty() {
            let entries =
                std::fs::read_dir(dir).map_err(|e| LabError::io("cannot list", dir, e))?;
            let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            files.sort();
            files
        } else {
            names.iter().map(|n| dir.join(n)).collect()
        };
        for file in files {
            // Links are followed: the copy is a plain file.
            let data = std::fs::read(&file)
                .map_err(|e| LabError::io("cannot read the peer QEMU's firmware", &file, e))?;
            let path = file.to_string_lossy();
            archive.add_file(path.trim_start_matches('/'), data, false);
        }
    }
    Ok(())
}

/// Adds an executable at `path` and every shared library `ldd` says it
/// loads, each at its own absolute path.
fn add_elf(archive: &mut Archive, source: &Path, path: &str) -> Result<(), LabError> {
    let data = std::fs::read(source).map_err(|e| LabError::io("cannot read", source, e))?;
    archive.add_file(path, data, true);
    for library in shared_libraries(source)? {
        if archive.contains(&library.to_string_lossy()) {
            continue;
        }
        let data = std::fs::read(&library).map_err(|e| LabError::io("cannot read", &library, e))?;
        archive.add_file(&library.to_string_lossy(), data, true);
    }
    Ok(())
}

/// The libraries `ldd` lists for a dynamic executable; none for a static one.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, LabError> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| LabError::Command {
            command: format!("ldd {}", binary.display()),
            detail: e.to_string(),
        })?;
    Ok(parse_ldd(&String::from_utf8_lossy(&output.stdout)))
}

fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_is_parsed() {
        let text = "\tlinux-vdso.so.1 (0x00007ffc)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tnot a dynamic executable\n").is_empty());
    }

    #[test]
    fn guest_init_loads_the_listed_modules_if_any() {
        assert!(GUEST_INIT.contains(&format!("$(cat /{GUEST_MODULE_ORDER} 2>/dev/null)")));
        let load = GUEST_INIT.find("insmod").unwrap();
        assert!(load < GUEST_INIT.find("GUEST-UP").unwrap());
    }

    #[test]
    fn generic_guest_carries_its_modules_and_their_order() {
        let dir = std::env::temp_dir().join(format!("barge-generic-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("modules")).unwrap();
        let busybox = dir.join("busybox");
        std::fs::write(&busybox, b"not really busybox").unwrap();
        for module in ["ptp", "e1000e"] {
            std::fs::write(dir.join(format!("modules/{module}.ko")), module).unwrap();
        }
        let state = LabState {
            kernel_package: "k".into(),
            kernel_version: "v".into(),
            bzimage: dir.join("bzImage"),
            modules_dir: dir.join("modules"),
            qemu: dir.join("qemu"),
            qemu_version: "10.0.2".into(),
            busybox,
            generic: None,
            more_host_kernels: Vec::new(),
            iommufd: None,
            debian: None,
            extra_modules: None,
        };
        let generic = GenericKernel {
            package: "g".into(),
            version: "v".into(),
            bzimage: dir.join("bzImage"),
            modules_dir: dir.join("modules"),
            modules: vec!["ptp".into(), "e1000e".into()],
        };
        let archive = generic_guest_archive(&state, &generic).unwrap();
        let plain = guest_archive(&state).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        for path in [
            "init",
            "bin/pcibar",
            "lib/modules/ptp.ko",
            "lib/modules/e1000e.ko",
        ] {
            assert!(archive.contains(path), "{path}");
        }
        assert!(archive.contains(GUEST_MODULE_ORDER));
        assert!(!plain.contains(GUEST_MODULE_ORDER));
        let bytes = archive.to_bytes();
        let order = b"ptp\ne1000e\n";
        assert!(bytes.windows(order.len()).any(|w| w == order));
    }

    #[test]
    fn host_init_loads_modules_in_order() {
        let init = host_init(&InitOptions {
            modules: super::super::HOST_MODULES,
            ..InitOptions::default()
        });
        assert!(init.contains(
            "for m in irqbypass kvm kvm-amd vfio vfio_iommu_type1 vfio-pci-core vfio-pci; do"
        ));
        for marker in [READY_MARKER, EXIT_MARKER, OUT_BEGIN, OUT_END, STATUS_MARKER] {
            assert!(init.contains(marker), "{marker}");
        }
        assert!(init.contains("iommufd=0\n"));
    }

    #[test]
    fn iommufd_host_init_requires_dev_iommu_and_the_cdevs() {
        let init = host_init(&InitOptions {
            modules: &["kvm", "iommufd", "vfio"],
            iommufd: true,
            ..InitOptions::default()
        });
        assert!(init.contains("for m in kvm iommufd vfio; do"));
        assert!(init.contains("iommufd=1\n"));
        let check = init.find("[ -c /dev/iommu ]").unwrap();
        assert!(check < init.find(READY_MARKER).unwrap());
        assert!(init.contains("got no /dev/vfio/devices/"));
    }

    #[test]
    fn debian_and_tap_are_set_up_after_kvm_and_before_ready() {
        let plain = host_init(&InitOptions {
            modules: &["kvm"],
            ..InitOptions::default()
        });
        assert!(plain.contains("for m in ; do"));
        assert!(plain.contains("if [ 0 = 1 ]; then\n    disk="));
        let init = host_init(&InitOptions {
            modules: &["kvm"],
            extra_modules: &["virtio_blk", "tun"],
            debian: true,
            tap: true,
            ..InitOptions::default()
        });
        assert!(!init.contains('@'), "{init}");
        let kvm = init.find("[ -c /dev/kvm ]").unwrap();
        let extra = init.find("for m in virtio_blk tun; do").unwrap();
        let mount = init
            .find("mount -t ext4 \"$disk\" /lab/guest/debian")
            .unwrap();
        let tap = init.find("tunctl -t barge0").unwrap();
        let ready = init.find(READY_MARKER).unwrap();
        assert!(kvm < extra && extra < mount && mount < tap && tap < ready);
        assert!(init.contains("ip addr add 192.168.100.1/24 dev barge0"));
        assert!(init.contains("= barge-lab-debian ]"));
        assert!(init.contains("for m in kvm; do"));
    }
}
