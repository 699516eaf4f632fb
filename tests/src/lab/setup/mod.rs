//! `barge-lab setup`: installs what the lab needs on a Debian 12 machine
//! (QEMU and SeaBIOS from bookworm-backports, busybox-static) and caches the
//! current bookworm-backports cloud kernel with the modules the lab host loads,
//! the generic kernel of the same version with the modules its guests
//! load (e1000e, which the cloud kernel lacks), the cloud kernel's vfio
//! modules rebuilt with iommufd, trixie-backports' current cloud kernel
//! as a second host kernel (only unpacked, never installed), and a Debian
//! bookworm guest image built with mmdebstrap (with the host's virtio_blk and
//! tun modules). It is idempotent, and offline once cached. Without apt, the
//! files can be supplied by hand (all but the Debian image).
//!
//! # Files
//!
//! - `mod.rs`: [`setup`] and its [`SetupOptions`], QEMU and busybox.
//! - `apt_sources.rs`: adding bookworm-backports to the apt sources, and
//!   trixie-backports' private apt configuration.
//! - `kernel.rs`: the cloud and generic kernel packages, whole or split.
//! - `iommufd.rs`: each host kernel's vfio modules rebuilt with iommufd.
//! - `debian.rs`: the Debian guest image and the host modules it needs.
//! - `kbuild.rs`: making a newer Debian kernel's build tools work here
//!   (7.3's kbuild programs and gcc-14).
//! - `modules.rs`: finding, decompressing and ordering kernel modules.
//! - `elf.rs`: the ELF section reader `.modinfo` is read with.

mod apt_sources;
mod arm64;
mod debian;
mod elf;
mod iommufd;
mod kbuild;
mod kernel;
mod modules;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use self::apt_sources::{
    ensure_backports_source, AptSuite, BACKPORTS_SUITE, TRIXIE_BACKPORTS_SUITE,
};
pub use self::arm64::setup_arm64;
use self::iommufd::{iommufd_modules, AptReach};
use self::kernel::{
    backports_kernel, describe_generic, generic_kernel, supplied_kernel, trixie_kernel,
};
use super::{
    command_output, HostKernel, IommufdModules, LabArch, LabError, LabPaths, LabState,
    HOST_MODULES, IOMMUFD_MODULES, TRIXIE_HOST_KERNEL,
};

const SYSTEM_QEMU: &str = "/usr/bin/qemu-system-x86_64";
const SYSTEM_BUSYBOX: &str = "/bin/busybox";
/// bookworm's own QEMU 7.2 failed about one nested boot in five; 10.0 never.
const MIN_QEMU_MAJOR: u32 = 10;

/// Files supplied by hand instead of through apt.
#[derive(Debug, Default, Clone)]
pub struct SetupOptions {
    pub kernel: Option<PathBuf>,
    pub modules: Option<PathBuf>,
    pub qemu: Option<PathBuf>,
    pub busybox: Option<PathBuf>,
    /// The generic kernel's bzImage, instead of Debian's (needs
    /// `generic_modules`).
    pub generic_kernel: Option<PathBuf>,
    pub generic_modules: Option<PathBuf>,
    /// The second host kernel's bzImage, instead of trixie-backports' (needs
    /// `trixie_modules`).
    pub trixie_kernel: Option<PathBuf>,
    pub trixie_modules: Option<PathBuf>,
    /// Re-resolve and re-download the kernels even when they are cached.
    pub refresh: bool,
}

/// `barge-lab setup [--arch ARCH]`: the x86_64 lab ([`setup`]) and the arm64
/// lab ([`setup_arm64`]), or the one `arch` names. Without `arch`, the
/// arm64 lab follows the x86 one, which is saved first; without root and
/// apt-get it is left out with a note (its QEMU is installed with apt).
pub fn setup_labs(
    paths: &LabPaths,
    options: &SetupOptions,
    arch: Option<LabArch>,
) -> Result<(), LabError> {
    match arch {
        Some(LabArch::X86_64) => setup(paths, options).map(|_| ()),
        Some(LabArch::Arm64) => {
            refuse_x86_files(options)?;
            setup_arm64(paths, options.refresh).map(|_| ())
        }
        None => {
            setup(paths, options)?;
            if !have_apt_get() {
                eprintln!(
                    "barge-lab: note: no arm64 lab: it downloads its packages with apt-get \
                     (`barge-lab run --arch arm64` cannot run)"
                );
                return Ok(());
            }
            setup_arm64(paths, options.refresh).map(|_| ())
        }
    }
}

/// The files given by hand are the x86 lab's: refused with `--arch arm64`.
fn refuse_x86_files(options: &SetupOptions) -> Result<(), LabError> {
    let given: Vec<&str> = [
        (options.kernel.is_some(), "--kernel"),
        (options.modules.is_some(), "--modules"),
        (options.qemu.is_some(), "--qemu"),
        (options.busybox.is_some(), "--busybox"),
        (options.generic_kernel.is_some(), "--generic-kernel"),
        (options.generic_modules.is_some(), "--generic-modules"),
        (options.trixie_kernel.is_some(), "--trixie-kernel"),
        (options.trixie_modules.is_some(), "--trixie-modules"),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, name)| *name)
    .collect();
    if given.is_empty() {
        return Ok(());
    }
    Err(LabError::Usage(format!(
        "{} {} the x86_64 lab's: `setup --arch arm64` takes no files by hand (it fetches \
         the arm64 kernel and busybox with apt-get); drop {} or `--arch arm64`",
        given.join(", "),
        if given.len() == 1 { "is" } else { "are" },
        if given.len() == 1 { "it" } else { "them" }
    )))
}

pub fn setup(paths: &LabPaths, options: &SetupOptions) -> Result<LabState, LabError> {
    let started = Instant::now();
    std::fs::create_dir_all(&paths.root)
        .map_err(|e| LabError::io("cannot create", &paths.root, e))?;
    if !options.refresh && options.kernel.is_none() && options.qemu.is_none() {
        if let Ok(mut state) = LabState::load(paths) {
            let mut changed = false;
            if state.generic.is_none() || options.generic_kernel.is_some() {
                state.generic = generic_kernel(paths, options, &state.kernel_package, have_apt())?;
                changed = true;
            }
            let has_trixie = state
                .more_host_kernels
                .iter()
                .any(|k| k.name == TRIXIE_HOST_KERNEL);
            if !has_trixie || options.trixie_kernel.is_some() || options.trixie_modules.is_some() {
                if let Some(kernel) = trixie_kernel(paths, options, have_apt_get())? {
                    state.set_host_kernel(kernel);
                    changed = true;
                }
            }
            if changed {
                state.check()?;
                state.save(paths)?;
            }
            if state
                .iommufd
                .as_ref()
                .is_none_or(|m| m.kernel_version != state.kernel_version)
            {
                state.iommufd = main_iommufd(
                    paths,
                    &state.kernel_package,
                    &state.kernel_version,
                    have_apt(),
                )?;
                state.check()?;
                state.save(paths)?;
            }
            if let Some(mut kernel) = second_host_kernel(&state) {
                if second_host_iommufd(paths, &mut kernel)? {
                    state.set_host_kernel(kernel);
                    state.check()?;
                    state.save(paths)?;
                }
            }
            if debian::ensure_debian(paths, &mut state, have_apt())? {
                state.check()?;
                state.save(paths)?;
            }
            eprintln!(
                "barge-lab: already set up: kernel {} ({}), {}, {}, {}, {}, QEMU {} ({:.1} s)",
                state.kernel_version,
                state.kernel_package,
                describe_generic(&state.generic),
                describe_iommufd(&state.iommufd),
                describe_more_hosts(&state),
                describe_debian(&state),
                state.qemu_version,
                started.elapsed().as_secs_f64()
            );
            return Ok(state);
        }
    }
    // A Debian image built before stays when it still fits (ensure_debian
    // checks its recipe and kernel).
    let previous = LabState::load(paths).ok();
    let apt = have_apt();
    let (qemu, qemu_version) = host_qemu(options, apt)?;
    let busybox = host_busybox(options, apt)?;
    let (kernel_package, kernel_version) = match (&options.kernel, &options.modules) {
        (Some(kernel), Some(modules)) => supplied_kernel(paths, kernel, modules)?,
        (Some(_), None) | (None, Some(_)) => {
            return Err(LabError::Usage(
                "--kernel and --modules go together: give the bzImage and the folder holding \
                 its modules (.ko, .ko.xz or .ko.zst, searched recursively)"
                    .into(),
            ))
        }
        (None, None) if apt => backports_kernel(paths)?,
        (None, None) => return Err(LabError::Setup(no_apt_help())),
    };
    let generic = generic_kernel(paths, options, &kernel_package, apt)?;
    let iommufd = main_iommufd(paths, &kernel_package, &kernel_version, apt)?;
    let mut state = LabState {
        kernel_package,
        kernel_version,
        bzimage: paths.bzimage(),
        modules_dir: paths.modules_dir(),
        qemu,
        qemu_version,
        busybox,
        generic,
        more_host_kernels: Vec::new(),
        iommufd,
        debian: previous.as_ref().and_then(|p| p.debian.clone()),
        extra_modules: previous.and_then(|p| p.extra_modules),
    };
    state.check()?;
    // Saved before the second host kernel: the main lab works without it.
    state.save(paths)?;
    if let Some(kernel) = trixie_kernel(paths, options, have_apt_get())? {
        state.set_host_kernel(kernel);
        state.check()?;
        state.save(paths)?;
    }
    if let Some(mut kernel) = second_host_kernel(&state) {
        if second_host_iommufd(paths, &mut kernel)? {
            state.set_host_kernel(kernel);
            state.check()?;
            state.save(paths)?;
        }
    }
    if debian::ensure_debian(paths, &mut state, apt)? {
        state.check()?;
        state.save(paths)?;
    }
    eprintln!(
        "barge-lab: set up: kernel {} ({}), {}, {}, {}, {}, QEMU {}, busybox {}; cached in {} \
         ({:.1} s)",
        state.kernel_version,
        state.kernel_package,
        describe_generic(&state.generic),
        describe_iommufd(&state.iommufd),
        describe_more_hosts(&state),
        describe_debian(&state),
        state.qemu_version,
        state.busybox.display(),
        paths.root.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(state)
}

/// The main host kernel's iommufd modules, its packages through the
/// machine's apt (bookworm-backports).
fn main_iommufd(
    paths: &LabPaths,
    kernel_package: &str,
    kernel_version: &str,
    apt: bool,
) -> Result<Option<IommufdModules>, LabError> {
    let open = AptSuite::bookworm_backports;
    let reach = AptReach::new(if apt { Some(&open) } else { None });
    iommufd_modules(paths, kernel_package, kernel_version, &reach, apt)
}

/// The cached trixie-backports host kernel.
fn second_host_kernel(state: &LabState) -> Option<HostKernel> {
    state
        .more_host_kernels
        .iter()
        .find(|k| k.name == TRIXIE_HOST_KERNEL)
        .cloned()
}

/// Builds the second host kernel's iommufd modules unless they are cached
/// for its version, its packages through trixie-backports' private apt
/// configuration (apt-get is enough while the build tools are installed);
/// whether `kernel` changed.
fn second_host_iommufd(paths: &LabPaths, kernel: &mut HostKernel) -> Result<bool, LabError> {
    if kernel
        .iommufd
        .as_ref()
        .is_some_and(|m| m.kernel_version == kernel.version)
    {
        return Ok(false);
    }
    let dir = paths.apt_dir(TRIXIE_BACKPORTS_SUITE);
    let open = || AptSuite::trixie_backports(&dir);
    let reach = AptReach::new(if have_apt_get() { Some(&open) } else { None });
    let built = iommufd_modules(paths, &kernel.package, &kernel.version, &reach, have_apt())?;
    let changed = built.is_some() || kernel.iommufd.is_some();
    kernel.iommufd = built;
    Ok(changed)
}

/// The host kernels besides the main one, for the summary line.
fn describe_more_hosts(state: &LabState) -> String {
    if state.more_host_kernels.is_empty() {
        return "no second host kernel".into();
    }
    state
        .more_host_kernels
        .iter()
        .map(|k| {
            format!(
                "host kernel {} ({}, {})",
                k.version,
                k.name,
                match &k.iommufd {
                    Some(_) => "with iommufd modules",
                    None => "no iommufd modules",
                }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn describe_debian(state: &LabState) -> String {
    match &state.debian {
        Some(image) => format!(
            "Debian bookworm guest image with kernel {} ({})",
            image.kernel_version,
            image.disk.display()
        ),
        None => "no Debian guest image".into(),
    }
}

fn describe_iommufd(iommufd: &Option<IommufdModules>) -> String {
    match iommufd {
        Some(m) => format!(
            "{} rebuilt with iommufd from {}",
            IOMMUFD_MODULES.join(", "),
            m.package_version
        ),
        None => "no iommufd modules".into(),
    }
}

fn no_apt_help() -> String {
    format!(
        "apt-get is not available (or this is not root), so the lab cannot install its \
         packages. Supply them by hand: `barge-lab setup --kernel BZIMAGE --modules DIR \
         --qemu QEMU [--busybox BUSYBOX]`, where BZIMAGE is a Linux 6.12+ x86_64 kernel with \
         huge pfnmap support (Debian's bookworm-backports linux-image-cloud-amd64 has it), DIR \
         holds its modules {} (plain, .xz or .zst, searched recursively), QEMU is \
         qemu-system-x86_64 {MIN_QEMU_MAJOR}.0 or newer with its firmware installed, and \
         BUSYBOX a static busybox. The second host kernel, trixie-backports' cloud \
         kernel, is fetched with apt-get alone (root is not needed); without apt-get give \
         one with `--trixie-kernel BZIMAGE --trixie-modules DIR` (Debian's 6.16+ kernels \
         keep both under /usr/lib/modules/VERSION/ of linux-binary-VERSION and \
         linux-modules-VERSION)",
        HOST_MODULES.join(", ")
    )
}

fn have_apt() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    root && Path::new("/usr/bin/apt-get").exists()
}

/// apt-get is there: enough for the second host kernel, which apt only
/// downloads through a private configuration.
fn have_apt_get() -> bool {
    Path::new("/usr/bin/apt-get").exists()
}

fn host_qemu(options: &SetupOptions, apt: bool) -> Result<(PathBuf, String), LabError> {
    if let Some(qemu) = &options.qemu {
        let version = qemu_version(qemu)?;
        return Ok((qemu.clone(), version));
    }
    let system = PathBuf::from(SYSTEM_QEMU);
    let current = qemu_version(&system).ok();
    if current.as_deref().map(qemu_major) < Some(MIN_QEMU_MAJOR) {
        if !apt {
            return Err(LabError::Setup(no_apt_help()));
        }
        ensure_backports_source()?;
        apt_install(&["qemu-system-x86", "seabios"], Some(BACKPORTS_SUITE))?;
    }
    let version = qemu_version(&system)?;
    if qemu_major(&version) < MIN_QEMU_MAJOR {
        return Err(LabError::Setup(format!(
            "{SYSTEM_QEMU} is version {version} after installing from {BACKPORTS_SUITE}; the \
             lab needs {MIN_QEMU_MAJOR}.0 or newer (give one with --qemu)"
        )));
    }
    Ok((system, version))
}

fn host_busybox(options: &SetupOptions, apt: bool) -> Result<PathBuf, LabError> {
    if let Some(busybox) = &options.busybox {
        return Ok(busybox.clone());
    }
    let installed = Command::new("dpkg")
        .args(["-s", "busybox-static"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !installed {
        if !apt {
            if Path::new(SYSTEM_BUSYBOX).exists() {
                return Ok(PathBuf::from(SYSTEM_BUSYBOX));
            }
            return Err(LabError::Setup(no_apt_help()));
        }
        apt_install(&["busybox-static", "xz-utils", "zstd"], None)?;
    }
    Ok(PathBuf::from(SYSTEM_BUSYBOX))
}

/// `QEMU emulator version 10.0.2 (Debian ...)` -> `10.0.2`.
fn qemu_version(qemu: &Path) -> Result<String, LabError> {
    let text = command_output(&qemu.to_string_lossy(), &["--version"])?;
    text.lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(3))
        .map(str::to_string)
        .ok_or_else(|| {
            LabError::Setup(format!(
                "cannot read the version of {}: it printed `{}`",
                qemu.display(),
                text.trim()
            ))
        })
}

fn qemu_major(version: &str) -> u32 {
    version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0)
}

pub(super) fn apt_install(packages: &[&str], suite: Option<&str>) -> Result<(), LabError> {
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    if let Some(suite) = suite {
        args.extend(["-t", suite]);
    }
    args.extend(packages);
    eprintln!("barge-lab: apt-get {}", args.join(" "));
    let status = Command::new("apt-get")
        .args(&args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .map_err(|e| LabError::Command {
            command: "apt-get install".into(),
            detail: e.to_string(),
        })?;
    if !status.success() {
        return Err(LabError::Command {
            command: format!("apt-get {}", args.join(" ")),
            detail: status.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_major_is_read() {
        assert_eq!(qemu_major("10.0.2"), 10);
        assert_eq!(qemu_major("7.2.0"), 7);
        assert_eq!(qemu_major("garbage"), 0);
    }
}
