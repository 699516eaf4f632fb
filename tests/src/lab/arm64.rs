//! The arm64 lab: the same nested KVM + VFIO host for arm64, booted under
//! `qemu-system-aarch64` full emulation (`-M virt` with EL2 and VHE, a GICv3
//! and an SMMUv3), with Debian's bookworm-backports cloud-arm64 kernel and a
//! static arm64 busybox. `barge-lab setup --arch arm64` caches it under
//! `target/lab/arm64` (plain `setup` too); `barge-lab run --arch arm64` boots
//! it with ivshmem and NVMe devices bound to vfio-pci and runs a command
//! there, with the x86 lab's conventions (`/out`, `$LAB_IVSHMEM0`, the
//! markers, the exit statuses). The guest files inside are
//! `/lab/guest/Image` (the same kernel) and `/lab/guest/initramfs`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::cpio::Archive;
use super::initramfs;
use super::run::{self, DeviceAddresses, LabDevice, RunOptions, RunOutcome};
use super::{LabError, LabPaths};

/// The Rust target barge is cross-built for.
pub const BARGE_TARGET: &str = "aarch64-unknown-linux-gnu";
/// The cross linker `.cargo/config.toml` names for [`BARGE_TARGET`].
pub const CROSS_LINKER: &str = "aarch64-linux-gnu-gcc";
/// The QEMU the arm64 lab runs (from `qemu-system-arm`).
pub const SYSTEM_QEMU: &str = "/usr/bin/qemu-system-aarch64";
/// The lab host's serial port that carries the results: the virt
/// machine's second PL011 (QEMU 10.0 adds it for a second `-serial`).
pub const RESULTS_TTY: &str = "ttyAMA1";
/// The modules the arm64 lab host loads, before what they depend on is
/// added by `setup` (KVM, irqbypass and the SMMUv3 driver are built into
/// the cloud-arm64 kernel).
pub const ARM64_HOST_MODULES: &[&str] = &["vfio", "vfio_iommu_type1", "vfio-pci"];
/// The lab host's memory when `run` is given no `--mem`.
pub const DEFAULT_MEMORY: u64 = 2 << 30;
/// What the arm64 kernel logs when KVM has EL2 with VHE.
pub const KVM_VHE_LINE: &str = "VHE mode initialized successfully";

/// What `setup --arch arm64` recorded (`target/lab/arm64/lab.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Arm64State {
    pub kernel_package: String,
    pub kernel_version: String,
    /// The kernel's uncompressed arm64 `Image`: the host's and the guests'.
    pub image: PathBuf,
    pub modules_dir: PathBuf,
    /// Module names in load order (dependencies first); each is
    /// `modules_dir/NAME.ko`, decompressed.
    pub modules: Vec<String>,
    pub qemu: PathBuf,
    pub qemu_version: String,
    /// A static arm64 busybox (from `busybox-static:arm64`).
    pub busybox: PathBuf,
    pub busybox_package: String,
}

/// Where the arm64 lab keeps its files: `arm64/` under the lab's folder,
/// laid out as the x86 lab's (`lab.json`, `kernel/`, `downloads/`, `runs/`).
pub fn arm64_paths(paths: &LabPaths) -> LabPaths {
    LabPaths {
        root: paths.root.join("arm64"),
    }
}

impl Arm64State {
    /// Loads the state (of the arm64 lab's folder, [`arm64_paths`]) and
    /// checks that every file it names is still there.
    pub fn load(arm64: &LabPaths) -> Result<Self, LabError> {
        let state: Arm64State = super::read_state(arm64.state_file(), LabError::Arm64NotSetUp)?;
        state.check()?;
        Ok(state)
    }

    pub fn check(&self) -> Result<(), LabError> {
        let mut needed = vec![self.image.clone(), self.qemu.clone(), self.busybox.clone()];
        needed.extend(self.module_files().into_iter().map(|(_, path)| path));
        match needed.into_iter().find(|p| !p.exists()) {
            Some(missing) => Err(LabError::Arm64NotSetUp(missing)),
            None => Ok(()),
        }
    }

    pub fn save(&self, arm64: &LabPaths) -> Result<(), LabError> {
        let file = arm64.state_file();
        let text = serde_json::to_string_pretty(self).expect("Arm64State serializes");
        std::fs::write(&file, text + "\n").map_err(|e| LabError::io("cannot write", &file, e))
    }

    fn module_files(&self) -> Vec<(String, PathBuf)> {
        self.modules
            .iter()
            .map(|m| (m.clone(), self.modules_dir.join(format!("{m}.ko"))))
            .collect()
    }
}

/// Where `cargo build --target aarch64-unknown-linux-gnu -p barge` puts
/// barge, for a `barge-lab` binary in `target/debug` (the same target
/// folder).
pub fn cross_barge(barge_lab_exe: &Path) -> Option<PathBuf> {
    let target_dir = barge_lab_exe.parent()?.parent()?;
    Some(target_dir.join(BARGE_TARGET).join("debug").join("barge"))
}

/// The options the arm64 lab does not have, named in an error.
fn refuse_x86_options(options: &RunOptions) -> Result<(), LabError> {
    let refused: Vec<&str> = [
        (
            options.devices.contains(&LabDevice::E1000e),
            "--e1000e (the cloud-arm64 kernel has no e1000e driver either)",
        ),
        (options.host_kernel.is_some(), "--host-kernel"),
        (options.iommufd, "--iommufd"),
        (options.debian, "--debian"),
        (options.tap, "--tap"),
        (options.peer_qemu, "--peer-qemu"),
        (options.bridge, "--bridge"),
        (!options.host_drivers.is_empty(), "--host-driver"),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, name)| *name)
    .collect();
    if refused.is_empty() {
        return Ok(());
    }
    Err(LabError::Usage(format!(
        "`run --arch arm64` has no {}: the arm64 lab takes --ivshmem, --nvme, --mem, --cpus, \
         --bin, --script, --no-iommu and the timeouts",
        refused.join(", ")
    )))
}

/// `-M virt` with EL2 (KVM's VHE host), a GICv3 and, unless `iommu` is
/// off, an SMMUv3 in front of pcie.0.
fn machine(iommu: bool) -> String {
    let mut machine = "virt,virtualization=on,gic-version=3".to_string();
    if iommu {
        machine.push_str(",iommu=smmuv3");
    }
    machine
}

/// The arm64 lab host's QEMU arguments and the address of each device
/// (pcie.0, slots from 0x10, as on x86).
fn qemu_args(
    state: &Arm64State,
    options: &RunOptions,
    run_dir: &Path,
    initrd: &Path,
) -> Result<(Vec<String>, DeviceAddresses), LabError> {
    let mut args: Vec<String> = [
        "-M",
        &machine(options.iommu),
        "-accel",
        "tcg",
        // pauth-impdef: QEMU's own pointer-authentication algorithm, much
        // quicker to emulate than the architected QARMA5.
        "-cpu",
        "max,pauth-impdef=on",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-smp",
        &options.cpus.to_string(),
        "-m",
        &format!("{}M", options.memory >> 20),
        "-kernel",
        &state.image.to_string_lossy(),
        "-initrd",
        &initrd.to_string_lossy(),
        "-append",
        "console=ttyAMA0 panic=-1 loglevel=4",
        "-serial",
        "stdio",
        "-serial",
        &format!("file:{}", run_dir.join("results.serial").display()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    run::check_device_count(&options.devices)?;
    let mut names = Vec::new();
    let mut counts = std::collections::HashMap::new();
    for (i, device) in options.devices.iter().enumerate() {
        let slot = 0x10 + i as u32;
        let addr = format!("bus=pcie.0,addr=0x{slot:x}");
        let name = match device {
            LabDevice::Ivshmem { size, file } => {
                let n = counts.entry("ivshmem").or_insert(0u32);
                let name = format!("ivshmem{n}");
                *n += 1;
                let file = match file {
                    Some(file) => file.clone(),
                    None => run_dir.join(format!("{name}.shm")),
                };
                run::ensure_backing_file(&file, *size)?;
                args.extend([
                    "-object".into(),
                    format!(
                        "memory-backend-file,id=mem-{name},size={size},mem-path={},share=on",
                        file.display()
                    ),
                    "-device".into(),
                    format!("ivshmem-plain,memdev=mem-{name},{addr}"),
                ]);
                name
            }
            LabDevice::Nvme { image } => {
                let n = counts.entry("nvme").or_insert(0u32);
                let name = format!("nvme{n}");
                *n += 1;
                args.extend(super::nvme_args(image, &name, &addr)?);
                name
            }
            LabDevice::E1000e => unreachable!("refused by refuse_x86_options"),
        };
        names.push((name, format!("0000:00:{slot:02x}.0")));
    }
    Ok((args, names))
}

/// Boots the arm64 lab host with `options` and runs its command (a host
/// that hangs before it is ready is booted once more, as on x86).
pub fn run(paths: &LabPaths, options: &RunOptions) -> Result<RunOutcome, LabError> {
    refuse_x86_options(options)?;
    for binary in &options.binaries {
        check_static_arm64(binary)?;
    }
    let arm64 = arm64_paths(paths);
    let state = Arm64State::load(&arm64)?;
    run::retry_hung_boot(|| run_once(&arm64, &state, options))
}

fn run_once(
    arm64: &LabPaths,
    state: &Arm64State,
    options: &RunOptions,
) -> Result<RunOutcome, LabError> {
    let run_dir = run::new_run_dir(arm64)?;
    let initrd = run_dir.join("host-initramfs.cpio");
    let (args, devices) = qemu_args(state, options, &run_dir, &initrd)?;
    let host_drivers: Vec<String> = if options.iommu {
        Vec::new()
    } else {
        devices.iter().map(|(name, _)| name.clone()).collect()
    };
    let image = host_initramfs(state, options, &devices, &host_drivers)?;
    std::fs::write(&initrd, image).map_err(|e| LabError::io("cannot write", &initrd, e))?;
    eprintln!(
        "barge-lab: arm64 host kernel {} ({}), QEMU {}",
        state.kernel_version, state.kernel_package, state.qemu_version
    );
    for (name, bdf) in &devices {
        eprintln!("barge-lab: {name} at {bdf}");
    }
    run::drive(&state.qemu, &args, run_dir, devices, options)
}

/// The arm64 lab host's initramfs: busybox, the host init (the x86 lab's,
/// with the arm64 results port), the vfio modules, the binaries under
/// /usr/local/bin, the guest's Image and initramfs under /lab/guest, the
/// devices and the command.
fn host_initramfs(
    state: &Arm64State,
    options: &RunOptions,
    devices: &DeviceAddresses,
    host_drivers: &[String],
) -> Result<Vec<u8>, LabError> {
    let modules = state.module_files();
    let names: Vec<&str> = modules.iter().map(|(name, _)| name.as_str()).collect();
    let init = initramfs::arm64_host_init(&names);
    let mut archive = initramfs::arm64_busybox_archive(&state.busybox, &init)?;
    for (module, path) in &modules {
        add_file(
            &mut archive,
            path,
            &format!("lib/modules/{module}.ko"),
            false,
        )?;
    }
    for binary in &options.binaries {
        let name = binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        add_file(&mut archive, binary, &format!("usr/local/bin/{name}"), true)?;
    }
    add_file(&mut archive, &state.image, "lab/guest/Image", false)?;
    archive.add_file(
        "lab/guest/initramfs",
        initramfs::arm64_guest_initramfs(&state.busybox)?,
        false,
    );
    initramfs::add_devices_and_command(&mut archive, devices, host_drivers, &options.script);
    Ok(archive.to_bytes())
}

fn add_file(
    archive: &mut Archive,
    source: &Path,
    path: &str,
    executable: bool,
) -> Result<(), LabError> {
    let data = std::fs::read(source).map_err(|e| LabError::io("cannot read", source, e))?;
    archive.add_file(path, data, executable);
    Ok(())
}

/// `EM_AARCH64` in an ELF header's `e_machine`.
const EM_AARCH64: u16 = 183;
const PT_INTERP: u32 = 3;

/// Refuses a binary for the arm64 lab host that is not a static aarch64
/// ELF executable: the host has busybox and no libraries.
pub fn check_static_arm64(binary: &Path) -> Result<(), LabError> {
    let bytes = std::fs::read(binary).map_err(|e| LabError::io("cannot read", binary, e))?;
    elf_kind(&bytes).map_err(|why| {
        LabError::Usage(format!(
            "{}: {why}; the arm64 lab host runs static aarch64 executables only (build with \
             `--target {BARGE_TARGET}` and `-C target-feature=+crt-static`)",
            binary.display()
        ))
    })
}

fn elf_kind(bytes: &[u8]) -> Result<(), String> {
    let u16_at = |at: usize| {
        bytes
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |at: usize| {
        bytes
            .get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    if bytes.get(..4) != Some(b"\x7fELF") || bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let machine = u16_at(18).ok_or("a truncated ELF header")?;
    if machine != EM_AARCH64 {
        return Err(format!(
            "an ELF file for machine {machine}, not aarch64 ({EM_AARCH64})"
        ));
    }
    let phoff = u64_at(32).ok_or("a truncated ELF header")? as usize;
    let phentsize = u16_at(54).ok_or("a truncated ELF header")? as usize;
    let phnum = u16_at(56).ok_or("a truncated ELF header")? as usize;
    for i in 0..phnum {
        let kind = u32_at(phoff + i * phentsize).ok_or("truncated program headers")?;
        if kind == PT_INTERP {
            return Err("a dynamically linked executable (it has an interpreter)".into());
        }
    }
    Ok(())
}

/// The seconds `barge-lab run` printed as the host's boot time
/// (`barge-lab: host ready after 4.2 s`).
pub fn printed_boot_seconds(stderr: &str) -> Option<f64> {
    stderr.lines().find_map(|line| {
        line.strip_prefix("barge-lab: host ready after ")?
            .strip_suffix(" s")?
            .parse()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf(machine: u16, interp: bool) -> Vec<u8> {
        let mut bytes = vec![0u8; 64 + 56];
        bytes[..6].copy_from_slice(b"\x7fELF\x02\x01");
        bytes[18..20].copy_from_slice(&machine.to_le_bytes());
        bytes[32..40].copy_from_slice(&64u64.to_le_bytes());
        bytes[54..56].copy_from_slice(&56u16.to_le_bytes());
        bytes[56..58].copy_from_slice(&1u16.to_le_bytes());
        let kind: u32 = if interp { PT_INTERP } else { 1 };
        bytes[64..68].copy_from_slice(&kind.to_le_bytes());
        bytes
    }

    #[test]
    fn only_static_aarch64_executables_go_into_the_arm64_host() {
        assert_eq!(elf_kind(&elf(EM_AARCH64, false)), Ok(()));
        assert!(elf_kind(&elf(EM_AARCH64, true))
            .unwrap_err()
            .contains("dynamically linked"));
        assert!(elf_kind(&elf(62, false))
            .unwrap_err()
            .contains("machine 62"));
        assert!(elf_kind(b"#!/bin/sh\n")
            .unwrap_err()
            .contains("not a 64-bit"));
        assert!(elf_kind(&elf(EM_AARCH64, false)[..30]).is_err());
    }

    #[test]
    fn x86_only_options_are_refused_by_name() {
        let options = RunOptions {
            devices: vec![LabDevice::E1000e],
            iommufd: true,
            ..RunOptions::default()
        };
        let err = refuse_x86_options(&options).unwrap_err().to_string();
        assert!(
            err.contains("--e1000e") && err.contains("--iommufd"),
            "{err}"
        );
        assert!(refuse_x86_options(&RunOptions::default()).is_ok());
    }

    #[test]
    fn the_machine_has_el2_a_gicv3_and_the_smmu() {
        assert_eq!(
            machine(true),
            "virt,virtualization=on,gic-version=3,iommu=smmuv3"
        );
        assert_eq!(machine(false), "virt,virtualization=on,gic-version=3");
    }

    #[test]
    fn devices_are_on_pcie0_from_slot_0x10() {
        let dir = std::env::temp_dir().join(format!("barge-arm64-args-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let state = Arm64State {
            kernel_package: "linux-image-6.12.95+deb12-cloud-arm64".into(),
            kernel_version: "6.12.95+deb12-cloud-arm64".into(),
            image: PathBuf::from("/l/Image"),
            modules_dir: PathBuf::from("/l/modules"),
            modules: vec!["vfio".into()],
            qemu: PathBuf::from(SYSTEM_QEMU),
            qemu_version: "10.0.2".into(),
            busybox: PathBuf::from("/l/busybox"),
            busybox_package: "busybox-static".into(),
        };
        let options = RunOptions {
            devices: vec![LabDevice::Ivshmem {
                size: 2 << 20,
                file: None,
            }],
            memory: DEFAULT_MEMORY,
            ..RunOptions::default()
        };
        let (args, names) = qemu_args(&state, &options, &dir, &dir.join("i.cpio")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            names,
            vec![("ivshmem0".to_string(), "0000:00:10.0".to_string())]
        );
        let joined = args.join(" ");
        assert!(joined.contains("-cpu max,pauth-impdef=on"), "{joined}");
        assert!(joined.contains("-m 2048M"), "{joined}");
        assert!(
            joined.contains("ivshmem-plain,memdev=mem-ivshmem0,bus=pcie.0,addr=0x10"),
            "{joined}"
        );
        assert!(joined.contains("share=on"), "{joined}");
    }

    #[test]
    fn the_boot_time_line_is_read() {
        assert_eq!(
            printed_boot_seconds("x\nbarge-lab: host ready after 4.2 s\n"),
            Some(4.2)
        );
        assert_eq!(printed_boot_seconds("barge-lab: status 0"), None);
    }

    #[test]
    fn cross_barge_is_beside_the_host_target() {
        assert_eq!(
            cross_barge(Path::new("/w/target/debug/barge-lab")),
            Some(PathBuf::from(
                "/w/target/aarch64-unknown-linux-gnu/debug/barge"
            ))
        );
    }
}
