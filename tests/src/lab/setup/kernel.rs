//! The kernel packages the lab boots: the bookworm-backports cloud kernel
//! for the lab host and its guests, the generic kernel of the same version
//! for guests that need its drivers, and trixie-backports' cloud kernel as
//! a second host kernel. Each is resolved from its meta package
//! (`apt-cache show`), downloaded (`apt-get download`, cached) and unpacked
//! (`dpkg -x`), or supplied by hand, then cached as a bzImage with the
//! modules it needs.
//!
//! From Linux 6.16 on Debian splits a kernel: the versioned
//! `linux-image-VERSION` is empty and depends on `linux-binary-VERSION`
//! (`/usr/lib/modules/VERSION/vmlinuz`), `linux-modules-VERSION` (the
//! modules) and `linux-base-VERSION` (config, System.map); the first two
//! are downloaded in its place.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::apt_sources::{AptSuite, TRIXIE_BACKPORTS_SUITE};
use super::modules::{find_module, list_files, load_order, read_module};
use super::SetupOptions;
use crate::lab::{
    command_output, GenericKernel, HostKernel, LabError, LabPaths, GENERIC_GUEST_MODULES,
    HOST_MODULES, TRIXIE_HOST_KERNEL,
};

const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";
const GENERIC_META_PACKAGE: &str = "linux-image-amd64";

/// Resolves the current bookworm-backports cloud kernel, downloads and
/// unpacks it, and caches its bzImage and the host modules, decompressed.
pub(super) fn backports_kernel(paths: &LabPaths) -> Result<(String, String), LabError> {
    let apt = AptSuite::bookworm_backports()?;
    let package = resolve_kernel_package(&apt, KERNEL_META_PACKAGE)?;
    let (unpacked, version) = download_and_unpack(paths, &apt, &package)?;
    let result = install_kernel(
        paths,
        &unpacked_vmlinuz(&unpacked, &version),
        &unpacked_modules(&unpacked, &version),
    );
    let _ = std::fs::remove_dir_all(&unpacked);
    result.map(|()| (package, version))
}

/// The second host kernel: the one given by hand, else trixie-backports'
/// current cloud kernel (through a private apt configuration: apt-get is
/// needed, root is not), else none (a note says what is missing). Cached
/// as a bzImage and the host modules with what they depend on, in load
/// order.
pub(super) fn trixie_kernel(
    paths: &LabPaths,
    options: &SetupOptions,
    apt_get: bool,
) -> Result<Option<HostKernel>, LabError> {
    let started = Instant::now();
    let kernel = match (&options.trixie_kernel, &options.trixie_modules) {
        (Some(kernel), Some(modules)) => {
            let version = bzimage_version(kernel)?;
            let package = format!("supplied:{}", kernel.display());
            install_host_kernel(paths, kernel, modules, package, version)?
        }
        (Some(_), None) | (None, Some(_)) => {
            return Err(LabError::Usage(
                "--trixie-kernel and --trixie-modules go together: give the second host \
                 kernel's bzImage and the folder holding its modules"
                    .into(),
            ))
        }
        (None, None) if apt_get => {
            let apt = AptSuite::trixie_backports(&paths.apt_dir(TRIXIE_BACKPORTS_SUITE))?;
            let package = resolve_kernel_package(&apt, KERNEL_META_PACKAGE)?;
            let (unpacked, version) = download_and_unpack(paths, &apt, &package)?;
            let result = install_host_kernel(
                paths,
                &unpacked_vmlinuz(&unpacked, &version),
                &unpacked_modules(&unpacked, &version),
                package,
                version,
            );
            let _ = std::fs::remove_dir_all(&unpacked);
            result?
        }
        (None, None) => {
            eprintln!(
                "barge-lab: note: no {TRIXIE_HOST_KERNEL} host kernel cached (it needs \
                 apt-get, or --trixie-kernel BZIMAGE --trixie-modules DIR): `barge-lab run \
                 --host-kernel {TRIXIE_HOST_KERNEL}` cannot run"
            );
            return Ok(None);
        }
    };
    eprintln!(
        "barge-lab: host kernel {} ({}) cached in {:.1} s with {}",
        kernel.version,
        kernel.package,
        started.elapsed().as_secs_f64(),
        kernel.modules.join(", ")
    );
    Ok(Some(kernel))
}

/// Downloads a versioned kernel package, or the packages a split kernel's
/// empty one depends on (each unless its .deb is cached), and unpacks them
/// into one folder; returns the folder and the kernel version.
pub(super) fn download_and_unpack(
    paths: &LabPaths,
    apt: &AptSuite,
    package: &str,
) -> Result<(PathBuf, String), LabError> {
    let downloads = paths.downloads_dir();
    let parts = kernel_parts(&apt.output("apt-cache", &["show", package])?, package);
    download_missing(paths, apt, &parts)?;
    let started = Instant::now();
    let unpacked = downloads.join("unpacked");
    let _ = std::fs::remove_dir_all(&unpacked);
    for part in &parts {
        let deb = find_deb(&downloads, part).ok_or_else(|| {
            LabError::Setup(format!(
                "apt-get download {part} left no .deb in {}",
                downloads.display()
            ))
        })?;
        command_output(
            "dpkg",
            &["-x", &deb.to_string_lossy(), &unpacked.to_string_lossy()],
        )?;
    }
    eprintln!(
        "barge-lab: unpacked {} in {:.1} s",
        parts.join(" "),
        started.elapsed().as_secs_f64()
    );
    let version = package
        .strip_prefix("linux-image-")
        .unwrap_or(package)
        .to_string();
    Ok((unpacked, version))
}

/// Downloads those of `packages` whose .deb is not in the downloads folder.
pub(super) fn download_missing(
    paths: &LabPaths,
    apt: &AptSuite,
    packages: &[String],
) -> Result<(), LabError> {
    let downloads = paths.downloads_dir();
    std::fs::create_dir_all(&downloads)
        .map_err(|e| LabError::io("cannot create", &downloads, e))?;
    let missing: Vec<&str> = packages
        .iter()
        .filter(|part| find_deb(&downloads, part).is_none())
        .map(String::as_str)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let started = Instant::now();
    eprintln!("barge-lab: downloading {}", missing.join(" "));
    let rendered = format!("apt-get download {}", missing.join(" "));
    let status = apt
        .command("apt-get")
        .args(["download", "-q"])
        .args(&missing)
        .current_dir(&downloads)
        .status()
        .map_err(|e| LabError::Command {
            command: rendered.clone(),
            detail: e.to_string(),
        })?;
    if !status.success() {
        return Err(LabError::Command {
            command: rendered,
            detail: status.to_string(),
        });
    }
    eprintln!(
        "barge-lab: downloaded in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The .deb of the main (bookworm-backports, whole: before Linux 6.16)
/// kernel package `package`, from the downloads folder, downloaded again
/// when it is gone.
pub(super) fn main_kernel_deb(paths: &LabPaths, package: &str) -> Result<PathBuf, LabError> {
    let downloads = paths.downloads_dir();
    if let Some(deb) = find_deb(&downloads, package) {
        return Ok(deb);
    }
    let apt = AptSuite::bookworm_backports()?;
    download_missing(paths, &apt, &[package.to_string()])?;
    find_deb(&downloads, package).ok_or_else(|| {
        LabError::Setup(format!(
            "apt-get download {package} left no .deb in {}",
            downloads.display()
        ))
    })
}

/// The packages that carry a kernel, from `apt-cache show` of its versioned
/// `linux-image-` package: the `linux-binary-` and `linux-modules-` ones it
/// depends on (Linux 6.16+), else the package itself.
fn kernel_parts(show: &str, package: &str) -> Vec<String> {
    let depends = show
        .split("\n\n")
        .next()
        .unwrap_or("")
        .lines()
        .find_map(|line| line.strip_prefix("Depends:"))
        .unwrap_or("");
    let parts: Vec<String> = depends
        .split(',')
        .filter_map(|d| d.split_whitespace().next())
        .filter(|d| d.starts_with("linux-binary-") || d.starts_with("linux-modules-"))
        .map(str::to_string)
        .collect();
    if parts.is_empty() {
        vec![package.to_string()]
    } else {
        parts
    }
}

/// The kernel image of an unpacked package: `/boot/vmlinuz-VERSION`, or
/// `/usr/lib/modules/VERSION/vmlinuz` in a split kernel's binary package.
pub(super) fn unpacked_vmlinuz(unpacked: &Path, version: &str) -> PathBuf {
    let boot = unpacked.join("boot").join(format!("vmlinuz-{version}"));
    if boot.exists() {
        boot
    } else {
        unpacked_modules(unpacked, version).join("vmlinuz")
    }
}

pub(super) fn unpacked_modules(unpacked: &Path, version: &str) -> PathBuf {
    let modules = unpacked.join("lib/modules").join(version);
    if modules.exists() {
        modules
    } else {
        unpacked.join("usr/lib/modules").join(version)
    }
}

pub(super) fn find_deb(dir: &Path, package: &str) -> Option<PathBuf> {
    let prefix = format!("{}_", package.replace('+', "%2b"));
    let plain_prefix = format!("{package}_");
    std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        ((name.starts_with(&prefix) || name.starts_with(&plain_prefix)) && name.ends_with(".deb"))
            .then(|| e.path())
    })
}

/// The versioned kernel package that the suite's newest meta package names
/// in its Depends.
pub(super) fn resolve_kernel_package(
    apt: &AptSuite,
    meta_package: &str,
) -> Result<String, LabError> {
    let text = apt.output("apt-cache", &["show", meta_package])?;
    let mut best: Option<(String, String)> = None;
    for (version, depends) in kernel_meta_stanzas(&text) {
        if !version.contains(apt.version_tag) {
            continue;
        }
        let newer = match &best {
            None => true,
            Some((current, _)) => Command::new("dpkg")
                .args(["--compare-versions", &version, "gt", current])
                .status()
                .map(|s| s.success())
                .unwrap_or(false),
        };
        if newer {
            best = Some((version, depends));
        }
    }
    best.map(|(_, package)| package).ok_or_else(|| {
        LabError::Setup(format!(
            "apt knows no {suite} version of {meta_package}: run `apt-get update` and check \
             that {suite} is in the apt sources",
            suite = apt.suite
        ))
    })
}

/// (Version, versioned linux-image package) of each stanza of `apt-cache show`.
fn kernel_meta_stanzas(text: &str) -> Vec<(String, String)> {
    text.split("\n\n")
        .filter_map(|stanza| {
            let field = |name: &str| {
                stanza.lines().find_map(|line| {
                    line.strip_prefix(name)
                        .and_then(|rest| rest.strip_prefix(':'))
                        .map(|v| v.trim().to_string())
                })
            };
            let version = field("Version")?;
            let package = field("Depends")?
                .split(',')
                .map(|d| d.split_whitespace().next().unwrap_or(""))
                .find(|d| d.starts_with("linux-image-") && !d.ends_with("-unsigned"))?
                .to_string();
            Some((version, package))
        })
        .collect()
}

pub(super) fn supplied_kernel(
    paths: &LabPaths,
    kernel: &Path,
    modules: &Path,
) -> Result<(String, String), LabError> {
    install_kernel(paths, kernel, modules)?;
    let name = kernel
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let version = name.strip_prefix("vmlinuz-").unwrap_or(&name).to_string();
    Ok((format!("supplied:{}", kernel.display()), version))
}

/// Copies the bzImage and decompresses the host modules into the cache.
fn install_kernel(paths: &LabPaths, vmlinuz: &Path, modules: &Path) -> Result<(), LabError> {
    let target_modules = paths.modules_dir();
    std::fs::create_dir_all(&target_modules)
        .map_err(|e| LabError::io("cannot create", &target_modules, e))?;
    std::fs::copy(vmlinuz, paths.bzimage())
        .map_err(|e| LabError::io("cannot copy the kernel image", vmlinuz, e))?;
    let found = list_files(modules);
    for module in HOST_MODULES {
        let source = [".ko", ".ko.xz", ".ko.zst"]
            .iter()
            .find_map(|ext| {
                let name = format!("{module}{ext}");
                found
                    .iter()
                    .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy() == name))
            })
            .ok_or_else(|| {
                LabError::Setup(format!(
                    "module {module} not found under {} (looked for .ko, .ko.xz, .ko.zst)",
                    modules.display()
                ))
            })?;
        let target = target_modules.join(format!("{module}.ko"));
        let bytes = read_module(source)?;
        std::fs::write(&target, bytes).map_err(|e| LabError::io("cannot write", &target, e))?;
    }
    Ok(())
}

/// The generic kernel: the one given by hand, else Debian's of the cloud
/// kernel's version (or bookworm-backports' current one when the cloud
/// kernel was given by hand), else none (a note says what is missing).
pub(super) fn generic_kernel(
    paths: &LabPaths,
    options: &SetupOptions,
    cloud_package: &str,
    apt: bool,
) -> Result<Option<GenericKernel>, LabError> {
    match (&options.generic_kernel, &options.generic_modules) {
        (Some(kernel), Some(modules)) => {
            let name = kernel
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let version = name.strip_prefix("vmlinuz-").unwrap_or(&name).to_string();
            let package = format!("supplied:{}", kernel.display());
            install_generic(paths, kernel, modules, package, version).map(Some)
        }
        (Some(_), None) | (None, Some(_)) => Err(LabError::Usage(
            "--generic-kernel and --generic-modules go together: give the generic bzImage and \
             the folder holding its modules"
                .into(),
        )),
        (None, None) if apt => {
            let apt = AptSuite::bookworm_backports()?;
            let package = match generic_package_of(cloud_package) {
                Some(package) => package,
                None => resolve_kernel_package(&apt, GENERIC_META_PACKAGE)?,
            };
            let (unpacked, version) = download_and_unpack(paths, &apt, &package)?;
            let result = install_generic(
                paths,
                &unpacked_vmlinuz(&unpacked, &version),
                &unpacked_modules(&unpacked, &version),
                package,
                version,
            );
            let _ = std::fs::remove_dir_all(&unpacked);
            result.map(Some)
        }
        (None, None) => {
            eprintln!(
                "barge-lab: note: no generic kernel cached (it needs apt, or \
                 --generic-kernel BZIMAGE --generic-modules DIR): guests that drive {} \
                 cannot run",
                GENERIC_GUEST_MODULES.join(", ")
            );
            Ok(None)
        }
    }
}

/// `linux-image-V-cloud-amd64` -> `linux-image-V-amd64`: the generic kernel
/// of the same version and build.
fn generic_package_of(cloud_package: &str) -> Option<String> {
    let version = cloud_package
        .strip_prefix("linux-image-")?
        .strip_suffix("-cloud-amd64")?;
    Some(format!("linux-image-{version}-amd64"))
}

pub(super) fn describe_generic(generic: &Option<GenericKernel>) -> String {
    match generic {
        Some(g) => format!(
            "generic guest kernel {} with {}",
            g.version,
            g.modules.join(", ")
        ),
        None => "no generic guest kernel".into(),
    }
}

/// Caches the generic bzImage and the guest modules with everything they
/// depend on (read from their .modinfo), decompressed, in load order.
fn install_generic(
    paths: &LabPaths,
    vmlinuz: &Path,
    modules: &Path,
    package: String,
    version: String,
) -> Result<GenericKernel, LabError> {
    let target_modules = paths.generic_modules_dir();
    let names = install_with_modules(
        vmlinuz,
        &paths.generic_bzimage(),
        modules,
        &target_modules,
        GENERIC_GUEST_MODULES,
    )?;
    Ok(GenericKernel {
        package,
        version,
        bzimage: paths.generic_bzimage(),
        modules_dir: target_modules,
        modules: names,
    })
}

/// Caches a second host kernel's bzImage and the host modules with
/// everything they depend on (a newer kernel may need modules 6.12 did
/// not), decompressed, in load order.
fn install_host_kernel(
    paths: &LabPaths,
    vmlinuz: &Path,
    modules: &Path,
    package: String,
    version: String,
) -> Result<HostKernel, LabError> {
    let dir = paths.host_kernel_dir(TRIXIE_HOST_KERNEL);
    let bzimage = dir.join("bzImage");
    let modules_dir = dir.join("modules");
    let names = install_with_modules(vmlinuz, &bzimage, modules, &modules_dir, HOST_MODULES)?;
    Ok(HostKernel {
        name: TRIXIE_HOST_KERNEL.into(),
        package,
        version,
        bzimage,
        modules_dir,
        modules: names,
        iommufd: None,
    })
}

/// Copies `vmlinuz` to `bzimage` and writes `roots` and the modules they
/// depend on (found under `modules`) into `target_modules`, emptied first,
/// decompressed; returns their names in load order.
pub(super) fn install_with_modules(
    vmlinuz: &Path,
    bzimage: &Path,
    modules: &Path,
    target_modules: &Path,
    roots: &[&str],
) -> Result<Vec<String>, LabError> {
    let _ = std::fs::remove_dir_all(target_modules);
    std::fs::create_dir_all(target_modules)
        .map_err(|e| LabError::io("cannot create", target_modules, e))?;
    std::fs::copy(vmlinuz, bzimage)
        .map_err(|e| LabError::io("cannot copy the kernel image", vmlinuz, e))?;
    let found = list_files(modules);
    let mut read = |name: &str| {
        let source = find_module(&found, name).ok_or_else(|| {
            LabError::Setup(format!(
                "module {name} not found under {} (looked for .ko, .ko.xz, .ko.zst)",
                modules.display()
            ))
        })?;
        read_module(source)
    };
    let order = load_order(roots, &mut read)?;
    let mut names = Vec::new();
    for (name, bytes) in order {
        let target = target_modules.join(format!("{name}.ko"));
        std::fs::write(&target, bytes).map_err(|e| LabError::io("cannot write", &target, e))?;
        names.push(name);
    }
    Ok(names)
}

/// Writes each of `roots` and the modules it depends on (found under
/// `modules`) into `target_modules`, emptied first, decompressed; returns
/// each root's load order (dependencies first, the root last).
pub(super) fn cache_module_orders(
    modules: &Path,
    target_modules: &Path,
    roots: &[&str],
) -> Result<BTreeMap<String, Vec<String>>, LabError> {
    let _ = std::fs::remove_dir_all(target_modules);
    std::fs::create_dir_all(target_modules)
        .map_err(|e| LabError::io("cannot create", target_modules, e))?;
    let found = list_files(modules);
    let mut read = |name: &str| {
        let source = find_module(&found, name).ok_or_else(|| {
            LabError::Setup(format!(
                "module {name} not found under {} (looked for .ko, .ko.xz, .ko.zst)",
                modules.display()
            ))
        })?;
        read_module(source)
    };
    let mut orders = BTreeMap::new();
    for root in roots {
        let order = load_order(&[root], &mut read)?;
        let mut names = Vec::new();
        for (name, bytes) in order {
            let target = target_modules.join(format!("{name}.ko"));
            std::fs::write(&target, bytes).map_err(|e| LabError::io("cannot write", &target, e))?;
            names.push(name);
        }
        orders.insert(root.to_string(), names);
    }
    Ok(orders)
}

/// The kernel release a bzImage carries in its setup header (the first
/// word of the string `kernel_version` points at), e.g.
/// `7.3.4+deb13-cloud-amd64`.
fn bzimage_version(bzimage: &Path) -> Result<String, LabError> {
    let bytes = std::fs::read(bzimage).map_err(|e| LabError::io("cannot read", bzimage, e))?;
    bzimage_release(&bytes).ok_or_else(|| {
        LabError::Setup(format!(
            "{} is not a bzImage with a kernel version in its setup header: give the \
             kernel's bzImage (vmlinuz)",
            bzimage.display()
        ))
    })
}

fn bzimage_release(bytes: &[u8]) -> Option<String> {
    if bytes.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let pointer = u16::from_le_bytes(bytes.get(0x20e..0x210)?.try_into().ok()?) as usize;
    let text = bytes.get(pointer.checked_add(0x200)?..)?;
    let text = &text[..text.iter().position(|&b| b == 0)?];
    let release = std::str::from_utf8(text).ok()?.split_whitespace().next()?;
    Some(release.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_meta_package_names_the_versioned_package() {
        let text = "Package: linux-image-cloud-amd64\nVersion: 6.12.95-1~bpo12+1\n\
            Depends: linux-image-6.12.95+deb12-cloud-amd64 (= 6.12.95-1~bpo12+1)\n\n\
            Package: linux-image-cloud-amd64\nVersion: 6.1.192-2\n\
            Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)\n";
        let stanzas = kernel_meta_stanzas(text);
        assert_eq!(
            stanzas,
            vec![
                (
                    "6.12.95-1~bpo12+1".to_string(),
                    "linux-image-6.12.95+deb12-cloud-amd64".to_string()
                ),
                (
                    "6.1.192-2".to_string(),
                    "linux-image-6.1.0-56-cloud-amd64".to_string()
                ),
            ]
        );
    }

    #[test]
    fn generic_package_has_the_cloud_packages_version() {
        assert_eq!(
            generic_package_of("linux-image-6.12.95+deb12-cloud-amd64").as_deref(),
            Some("linux-image-6.12.95+deb12-amd64")
        );
        assert_eq!(generic_package_of("supplied:/boot/vmlinuz-6.12"), None);
    }

    #[test]
    fn a_split_kernel_is_downloaded_as_its_binary_and_modules_packages() {
        let split = "Package: linux-image-7.3.4+deb13-cloud-amd64\n\
            Version: 7.3.4-1~bpo13+1\n\
            Depends: dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, \
            linux-base-7.3.4+deb13-cloud-amd64 (= 7.3.4-1~bpo13+1), \
            linux-binary-7.3.4+deb13-cloud-amd64 (= 7.3.4-1~bpo13+1), \
            linux-modules-7.3.4+deb13-cloud-amd64 (= 7.3.4-1~bpo13+1)\n";
        assert_eq!(
            kernel_parts(split, "linux-image-7.3.4+deb13-cloud-amd64"),
            [
                "linux-binary-7.3.4+deb13-cloud-amd64",
                "linux-modules-7.3.4+deb13-cloud-amd64"
            ]
        );
        let whole = "Package: linux-image-6.12.95+deb12-cloud-amd64\n\
            Depends: kmod, linux-base (>= 4.3~), initramfs-tools (>= 0.120+deb8u2)\n";
        assert_eq!(
            kernel_parts(whole, "linux-image-6.12.95+deb12-cloud-amd64"),
            ["linux-image-6.12.95+deb12-cloud-amd64"]
        );
        // trixie-backports' meta package names the versioned image among
        // its split siblings.
        let meta = "Package: linux-image-cloud-amd64\nVersion: 7.3.4-1~bpo13+1\n\
            Depends: linux-base-cloud-amd64 (= 7.3.4-1~bpo13+1), \
            linux-image-7.3.4+deb13-cloud-amd64 (= 7.3.4-1~bpo13+1), \
            linux-modules-cloud-amd64 (= 7.3.4-1~bpo13+1)\n";
        assert_eq!(
            kernel_meta_stanzas(meta),
            vec![(
                "7.3.4-1~bpo13+1".to_string(),
                "linux-image-7.3.4+deb13-cloud-amd64".to_string()
            )]
        );
    }

    #[test]
    fn split_kernel_image_is_found_under_usr_lib_modules() {
        let dir = std::env::temp_dir().join(format!("barge-unpacked-{}", std::process::id()));
        let version = "7.3.4+deb13-cloud-amd64";
        assert_eq!(
            unpacked_vmlinuz(&dir, version),
            dir.join("usr/lib/modules/7.3.4+deb13-cloud-amd64/vmlinuz")
        );
        std::fs::create_dir_all(dir.join("boot")).unwrap();
        std::fs::write(dir.join("boot/vmlinuz-6.12.95+deb12-cloud-amd64"), b"").unwrap();
        assert_eq!(
            unpacked_vmlinuz(&dir, "6.12.95+deb12-cloud-amd64"),
            dir.join("boot/vmlinuz-6.12.95+deb12-cloud-amd64")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bzimage_release_is_read_from_the_setup_header() {
        let mut image = vec![0u8; 0x400];
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x20e..0x210].copy_from_slice(&0x100u16.to_le_bytes());
        let text = b"7.3.4+deb13-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP\0";
        image[0x300..0x300 + text.len()].copy_from_slice(text);
        assert_eq!(
            bzimage_release(&image).as_deref(),
            Some("7.3.4+deb13-cloud-amd64")
        );
        let mut unterminated = image.clone();
        unterminated.truncate(0x310);
        assert_eq!(bzimage_release(&unterminated), None);
        image[0x202] = b'X';
        assert_eq!(bzimage_release(&image), None);
        assert_eq!(bzimage_release(b"short"), None);
    }
}
