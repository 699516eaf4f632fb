//! The kernel packages the lab boots: the bookworm-backports cloud kernel
//! for the lab host and the generic kernel of the same version for its
//! guests. Each is resolved from its meta package (`apt-cache show`),
//! downloaded (`apt-get download`, cached) and unpacked (`dpkg -x`), or
//! supplied by hand, then cached as a bzImage with the modules it needs.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::apt_sources::{ensure_backports_source, BACKPORTS_SUITE};
use super::modules::{find_module, list_files, load_order, read_module};
use super::SetupOptions;
use crate::lab::{
    command_output, GenericKernel, LabError, LabPaths, GENERIC_GUEST_MODULES, HOST_MODULES,
};

const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";
const GENERIC_META_PACKAGE: &str = "linux-image-amd64";

/// Resolves the current bookworm-backports cloud kernel, downloads and
/// unpacks it, and caches its bzImage and the host modules, decompressed.
pub(super) fn backports_kernel(paths: &LabPaths) -> Result<(String, String), LabError> {
    ensure_backports_source()?;
    let package = resolve_kernel_package(KERNEL_META_PACKAGE)?;
    let (unpacked, version) = download_and_unpack(paths, &package)?;
    let result = install_kernel(
        paths,
        &unpacked_vmlinuz(&unpacked, &version),
        &unpacked_modules(&unpacked, &version),
    );
    let _ = std::fs::remove_dir_all(&unpacked);
    result.map(|()| (package, version))
}

/// Downloads a versioned kernel package (unless its .deb is cached) and
/// unpacks it; returns the folder and the kernel version.
fn download_and_unpack(paths: &LabPaths, package: &str) -> Result<(PathBuf, String), LabError> {
    let downloads = paths.downloads_dir();
    std::fs::create_dir_all(&downloads)
        .map_err(|e| LabError::io("cannot create", &downloads, e))?;
    let deb = find_deb(&downloads, package);
    let deb = match deb {
        Some(deb) => deb,
        None => {
            eprintln!("barge-lab: downloading {package}");
            let status = Command::new("apt-get")
                .args(["download", "-q", package])
                .current_dir(&downloads)
                .status()
                .map_err(|e| LabError::Command {
                    command: format!("apt-get download {package}"),
                    detail: e.to_string(),
                })?;
            if !status.success() {
                return Err(LabError::Command {
                    command: format!("apt-get download {package}"),
                    detail: status.to_string(),
                });
            }
            find_deb(&downloads, package).ok_or_else(|| {
                LabError::Setup(format!(
                    "apt-get download {package} left no .deb in {}",
                    downloads.display()
                ))
            })?
        }
    };
    let unpacked = downloads.join("unpacked");
    let _ = std::fs::remove_dir_all(&unpacked);
    command_output(
        "dpkg",
        &["-x", &deb.to_string_lossy(), &unpacked.to_string_lossy()],
    )?;
    let version = package
        .strip_prefix("linux-image-")
        .unwrap_or(package)
        .to_string();
    Ok((unpacked, version))
}

fn unpacked_vmlinuz(unpacked: &Path, version: &str) -> PathBuf {
    unpacked.join("boot").join(format!("vmlinuz-{version}"))
}

fn unpacked_modules(unpacked: &Path, version: &str) -> PathBuf {
    let modules = unpacked.join("lib/modules").join(version);
    if modules.exists() {
        modules
    } else {
        unpacked.join("usr/lib/modules").join(version)
    }
}

fn find_deb(dir: &Path, package: &str) -> Option<PathBuf> {
    let prefix = format!("{}_", package.replace('+', "%2b"));
    let plain_prefix = format!("{package}_");
    std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        ((name.starts_with(&prefix) || name.starts_with(&plain_prefix)) && name.ends_with(".deb"))
            .then(|| e.path())
    })
}

/// The versioned kernel package that bookworm-backports' meta package names
/// in its Depends.
fn resolve_kernel_package(meta_package: &str) -> Result<String, LabError> {
    let text = command_output("apt-cache", &["show", meta_package])?;
    let mut best: Option<(String, String)> = None;
    for (version, depends) in kernel_meta_stanzas(&text) {
        if !version.contains("bpo12") {
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
            "apt knows no {BACKPORTS_SUITE} version of {meta_package}: run `apt-get \
             update` and check that {BACKPORTS_SUITE} is in the apt sources"
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
                .find(|d| d.starts_with("linux-image-") && !d.ends_with("-amd64-unsigned"))?
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
            ensure_backports_source()?;
            let package = match generic_package_of(cloud_package) {
                Some(package) => package,
                None => resolve_kernel_package(GENERIC_META_PACKAGE)?,
            };
            let (unpacked, version) = download_and_unpack(paths, &package)?;
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
    let _ = std::fs::remove_dir_all(&target_modules);
    std::fs::create_dir_all(&target_modules)
        .map_err(|e| LabError::io("cannot create", &target_modules, e))?;
    std::fs::copy(vmlinuz, paths.generic_bzimage())
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
    let order = load_order(GENERIC_GUEST_MODULES, &mut read)?;
    let mut names = Vec::new();
    for (name, bytes) in order {
        let target = target_modules.join(format!("{name}.ko"));
        std::fs::write(&target, bytes).map_err(|e| LabError::io("cannot write", &target, e))?;
        names.push(name);
    }
    Ok(GenericKernel {
        package,
        version,
        bzimage: paths.generic_bzimage(),
        modules_dir: target_modules,
        modules: names,
    })
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
}
