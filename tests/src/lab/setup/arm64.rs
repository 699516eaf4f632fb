//! `barge-lab setup --arch arm64` (and plain `setup`, after the x86 lab):
//! `qemu-system-arm` 10.0 from bookworm-backports (installed with apt, as
//! the x86 lab's QEMU is), the current bookworm-backports
//! `linux-image-cloud-arm64` (its Image and the vfio modules, decompressed)
//! and bookworm's `busybox-static:arm64`, both through a private apt
//! configuration that knows arm64 alone, and barge cross-built for
//! aarch64 (`cargo build --target aarch64-unknown-linux-gnu -p barge`,
//! static through `.cargo/config.toml`); a barge that does not build is
//! reported, not fatal. Cached under `target/lab/arm64`; a second run only
//! rebuilds barge (nothing when it is up to date).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use super::apt_sources::{ensure_backports_source, AptSuite, BACKPORTS_SUITE};
use super::kernel::{
    download_and_unpack, download_missing, find_deb, install_with_modules, resolve_kernel_package,
    unpacked_modules, unpacked_vmlinuz,
};
use super::{apt_install, have_apt, have_apt_get, qemu_major, qemu_version, MIN_QEMU_MAJOR};
use crate::lab::arm64::{
    arm64_paths, check_static_arm64, cross_barge, Arm64State, ARM64_HOST_MODULES, BARGE_TARGET,
    CROSS_LINKER, SYSTEM_QEMU,
};
use crate::lab::{command_output, LabError, LabPaths};

const KERNEL_META_PACKAGE: &str = "linux-image-cloud-arm64";
const QEMU_PACKAGE: &str = "qemu-system-arm";
const BUSYBOX_PACKAGE: &str = "busybox-static";
/// An arm64 `Image` header's magic, at offset 0x38.
const IMAGE_MAGIC: &[u8] = b"ARM\x64";

/// Sets the arm64 lab up unless it is cached (`refresh`: resolve and
/// download the kernel again), then builds the arm64 barge.
pub fn setup_arm64(paths: &LabPaths, refresh: bool) -> Result<Arm64State, LabError> {
    let started = Instant::now();
    install_cross_toolchain();
    check_cross_toolchain()?;
    let arm64 = arm64_paths(paths);
    std::fs::create_dir_all(&arm64.root)
        .map_err(|e| LabError::io("cannot create", &arm64.root, e))?;
    let (state, cached) = match Arm64State::load(&arm64) {
        Ok(state) if !refresh => (state, true),
        _ => {
            let state = fetch(&arm64)?;
            state.check()?;
            state.save(&arm64)?;
            (state, false)
        }
    };
    let barge = build_barge(&arm64);
    eprintln!(
        "barge-lab: arm64 lab {}: kernel {} ({}) with {}, QEMU {}, {}, {}; cached in {} \
         ({:.1} s)",
        if cached { "already set up" } else { "set up" },
        state.kernel_version,
        state.kernel_package,
        state.modules.join(", "),
        state.qemu_version,
        state.busybox_package,
        match &barge {
            Some(path) => format!("barge {}", path.display()),
            None => "no arm64 barge".into(),
        },
        arm64.root.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(state)
}

/// Installs what the cross build lacks, as the x86 set-up installs QEMU:
/// Debian's gcc-aarch64-linux-gnu with apt-get, Rust's aarch64 standard
/// library with rustup (each from the machine's own configuration). What
/// cannot be installed is left to [`check_cross_toolchain`] to name.
fn install_cross_toolchain() {
    if !cross_linker_complete() && have_apt_get() {
        if let Err(e) = apt_install(CROSS_PACKAGES, None) {
            eprintln!(
                "barge-lab: could not install {}: {e}",
                CROSS_PACKAGES.join(" ")
            );
        }
    }
    if !rust_target_installed().0 {
        eprintln!("barge-lab: rustup target add {BARGE_TARGET}");
        match Command::new("rustup")
            .args(["target", "add", BARGE_TARGET])
            .current_dir(workspace())
            .status()
        {
            Ok(status) if status.success() => {}
            Ok(status) => eprintln!("barge-lab: rustup target add {BARGE_TARGET}: {status}"),
            Err(e) => eprintln!("barge-lab: cannot run rustup: {e}"),
        }
    }
}

/// Debian's cross linker and the arm64 C library it links against: the
/// library is only a Recommends of the linker, which `apt_install`
/// (`--no-install-recommends`) does not follow.
const CROSS_PACKAGES: &[&str] = &["gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross"];
/// A file of libc6-dev-arm64-cross that every static link needs.
const CROSS_CRT: &str = "/usr/aarch64-linux-gnu/lib/crt1.o";

/// Whether the cross linker runs and has its C library.
fn cross_linker_complete() -> bool {
    command_output(CROSS_LINKER, &["--version"]).is_ok() && Path::new(CROSS_CRT).is_file()
}

/// Whether the Rust toolchain has the aarch64 standard library, and its
/// sysroot.
fn rust_target_installed() -> (bool, Option<PathBuf>) {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .current_dir(workspace())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let installed = sysroot.as_ref().is_some_and(|root| {
        root.join("lib/rustlib")
            .join(BARGE_TARGET)
            .join("lib")
            .is_dir()
    });
    (installed, sysroot)
}

/// The arm64 lab cross-builds barge: the linker and the Rust target must
/// be there (an error says how to install each).
fn check_cross_toolchain() -> Result<(), LabError> {
    if !cross_linker_complete() {
        return Err(LabError::Setup(format!(
            "the arm64 lab cross-builds barge with {CROSS_LINKER} (`.cargo/config.toml`) and the \
             arm64 C library ({CROSS_CRT}), and one is missing: install them with `apt-get \
             install {}` and run setup again",
            CROSS_PACKAGES.join(" ")
        )));
    }
    let (installed, sysroot) = rust_target_installed();
    if !installed {
        return Err(LabError::Setup(format!(
            "the arm64 lab cross-builds barge for {BARGE_TARGET}, and the Rust toolchain has no \
             standard library for it{}: install it with `rustup target add {BARGE_TARGET}` and \
             run setup again",
            sysroot
                .map(|root| format!(" (under {})", root.display()))
                .unwrap_or_default()
        )));
    }
    Ok(())
}

/// The workspace this `barge-lab` was built from.
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

/// Installs QEMU when needed, downloads and caches the kernel and busybox.
fn fetch(arm64: &LabPaths) -> Result<Arm64State, LabError> {
    let (qemu, qemu_version) = arm64_qemu()?;
    if !have_apt_get() {
        return Err(LabError::Setup(
            "the arm64 lab downloads its kernel and busybox with apt-get, which is missing".into(),
        ));
    }
    let apt = AptSuite::arm64(&arm64.apt_dir("arm64"))?;
    let package = resolve_kernel_package(&apt, KERNEL_META_PACKAGE)?;
    let (unpacked, version) = download_and_unpack(arm64, &apt, &package)?;
    let image = arm64.kernel_dir().join("Image");
    let modules_dir = arm64.modules_dir();
    let installed = install_with_modules(
        &unpacked_vmlinuz(&unpacked, &version),
        &image,
        &unpacked_modules(&unpacked, &version),
        &modules_dir,
        ARM64_HOST_MODULES,
    );
    let _ = std::fs::remove_dir_all(&unpacked);
    let modules = installed?;
    plain_image(&image)?;
    let (busybox, busybox_package) = arm64_busybox(arm64, &apt)?;
    for deb in std::fs::read_dir(arm64.downloads_dir())
        .map_err(|e| LabError::io("cannot list", &arm64.downloads_dir(), e))?
        .flatten()
    {
        let size = deb.metadata().map(|m| m.len()).unwrap_or(0);
        eprintln!(
            "barge-lab: arm64 download {} ({:.1} MB)",
            deb.file_name().to_string_lossy(),
            size as f64 / 1e6
        );
    }
    Ok(Arm64State {
        kernel_package: package,
        kernel_version: version,
        image,
        modules_dir,
        modules,
        qemu,
        qemu_version,
        busybox,
        busybox_package,
    })
}

/// qemu-system-aarch64 10.0 or newer, installed from bookworm-backports
/// (`qemu-system-arm`) when the system's is older or missing.
fn arm64_qemu() -> Result<(PathBuf, String), LabError> {
    let system = PathBuf::from(SYSTEM_QEMU);
    let current = qemu_version(&system).ok();
    if current.as_deref().map(qemu_major) < Some(MIN_QEMU_MAJOR) {
        if !have_apt() {
            return Err(LabError::Setup(format!(
                "the arm64 lab needs {SYSTEM_QEMU} {MIN_QEMU_MAJOR}.0 or newer ({}), and \
                 installing it needs root and apt: `apt-get install -t {BACKPORTS_SUITE} \
                 {QEMU_PACKAGE}` (with {BACKPORTS_SUITE} in the apt sources)",
                match &current {
                    Some(version) => format!("this one is {version}"),
                    None => "it is missing".into(),
                }
            )));
        }
        ensure_backports_source()?;
        apt_install(&[QEMU_PACKAGE], Some(BACKPORTS_SUITE))?;
    }
    let version = qemu_version(&system)?;
    if qemu_major(&version) < MIN_QEMU_MAJOR {
        return Err(LabError::Setup(format!(
            "{SYSTEM_QEMU} is version {version} after installing {QEMU_PACKAGE} from \
             {BACKPORTS_SUITE}; the arm64 lab needs {MIN_QEMU_MAJOR}.0 or newer"
        )));
    }
    Ok((system, version))
}

/// Checks that `image` is an arm64 kernel Image, decompressing a gzip'd one
/// in place (barge, like QEMU's -kernel, boots the plain Image).
fn plain_image(image: &Path) -> Result<(), LabError> {
    let bytes = std::fs::read(image).map_err(|e| LabError::io("cannot read", image, e))?;
    let bytes = if bytes.starts_with(&[0x1f, 0x8b]) {
        let output = Command::new("gzip")
            .arg("-dc")
            .arg(image)
            .output()
            .map_err(|e| LabError::io("cannot run gzip -dc on", image, e))?;
        if !output.status.success() {
            return Err(LabError::Command {
                command: format!("gzip -dc {}", image.display()),
                detail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        let plain = output.stdout;
        std::fs::write(image, &plain).map_err(|e| LabError::io("cannot write", image, e))?;
        plain
    } else {
        bytes
    };
    if bytes.get(0x38..0x3c) != Some(IMAGE_MAGIC) {
        return Err(LabError::Setup(format!(
            "{} is not an arm64 kernel Image (no ARM\\x64 magic at offset 0x38)",
            image.display()
        )));
    }
    Ok(())
}

/// busybox-static for arm64, downloaded (unless cached) and unpacked; its
/// static busybox is cached as `arm64/busybox`.
fn arm64_busybox(arm64: &LabPaths, apt: &AptSuite) -> Result<(PathBuf, String), LabError> {
    let downloads = arm64.downloads_dir();
    download_missing(arm64, apt, &[BUSYBOX_PACKAGE.to_string()])?;
    let deb = find_deb(&downloads, BUSYBOX_PACKAGE).ok_or_else(|| {
        LabError::Setup(format!(
            "apt-get download {BUSYBOX_PACKAGE} left no .deb in {}",
            downloads.display()
        ))
    })?;
    let unpacked = downloads.join("unpacked-busybox");
    let _ = std::fs::remove_dir_all(&unpacked);
    command_output(
        "dpkg",
        &["-x", &deb.to_string_lossy(), &unpacked.to_string_lossy()],
    )?;
    let target = arm64.root.join("busybox");
    let copied = std::fs::copy(unpacked.join("bin/busybox"), &target)
        .map_err(|e| LabError::io("cannot copy busybox from", &deb, e));
    let _ = std::fs::remove_dir_all(&unpacked);
    copied?;
    check_static_arm64(&target)?;
    let name = deb
        .file_name()
        .map(|n| n.to_string_lossy().replace("%3a", ":"))
        .unwrap_or_default();
    Ok((target, name.trim_end_matches(".deb").to_string()))
}

/// Cross-builds barge for aarch64 into the target folder of this
/// `barge-lab`; the barge the arm64 lab gets, or None (a line says why:
/// barge does not build for aarch64 yet, or the build failed).
fn build_barge(arm64: &LabPaths) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let barge = cross_barge(&exe)?;
    let target_dir = exe.parent()?.parent()?.to_path_buf();
    let log = arm64.root.join("barge-build.log");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let rendered = format!("cargo build --target {BARGE_TARGET} -p barge");
    let started = Instant::now();
    eprintln!(
        "barge-lab: {rendered} (target folder {}, log {})",
        target_dir.display(),
        log.display()
    );
    let status = std::fs::File::create(&log).ok().and_then(|out| {
        let err = out.try_clone().ok()?;
        Command::new(&cargo)
            .args(["build", "--target", BARGE_TARGET, "-p", "barge"])
            .env("CARGO_TARGET_DIR", &target_dir)
            .current_dir(workspace())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .status()
            .ok()
    });
    let seconds = started.elapsed().as_secs_f64();
    if status.is_some_and(|s| s.success()) && barge.is_file() {
        return match check_static_arm64(&barge) {
            Ok(()) => {
                eprintln!(
                    "barge-lab: arm64 barge built: {} ({seconds:.1} s)",
                    barge.display()
                );
                Some(barge)
            }
            Err(e) => {
                eprintln!(
                    "barge-lab: the arm64 barge is missing: {e} (is `rustflags = [\"-C\", \
                     \"target-feature=+crt-static\"]` under [target.{BARGE_TARGET}] in \
                     .cargo/config.toml?)"
                );
                None
            }
        };
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let errors = text.lines().filter(|l| l.starts_with("error")).count();
    let first = text
        .lines()
        .find(|l| l.starts_with("error"))
        .unwrap_or("no error line");
    eprintln!(
        "barge-lab: the arm64 barge is missing: `{rendered}` failed after {seconds:.1} s \
         ({errors} error lines, the first: `{first}`; log {}). The arm64 lab runs without \
         barge{} until it builds; setup tries again each time it runs",
        log.display(),
        if barge.is_file() {
            format!(" (an older build at {} is not used)", barge.display())
        } else {
            String::new()
        }
    );
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gzipped_or_foreign_image_is_told_apart() {
        let dir = std::env::temp_dir().join(format!("barge-arm64-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("Image");
        let mut header = vec![0u8; 64];
        header[0x38..0x3c].copy_from_slice(IMAGE_MAGIC);
        std::fs::write(&image, &header).unwrap();
        assert!(plain_image(&image).is_ok());
        let status = Command::new("gzip").arg("-f").arg(&image).status().unwrap();
        assert!(status.success());
        std::fs::rename(dir.join("Image.gz"), &image).unwrap();
        plain_image(&image).unwrap();
        assert_eq!(std::fs::read(&image).unwrap(), header);
        std::fs::write(
            &image,
            b"MZ not an arm64 Image, long enough to hold a header.....",
        )
        .unwrap();
        let err = plain_image(&image).unwrap_err().to_string();
        assert!(err.contains("not an arm64 kernel Image"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
