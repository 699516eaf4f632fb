//! `barge-lab setup`: installs what the lab needs on a Debian 12 machine
//! (QEMU and SeaBIOS from bookworm-backports, busybox-static) and caches the
//! current bookworm-backports cloud kernel with the modules the lab host loads,
//! and the generic kernel of the same version with the modules its guests
//! load (e1000e, which the cloud kernel lacks). It is idempotent, and offline
//! once cached. Without apt, the files can be supplied by hand.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{
    command_output, GenericKernel, LabError, LabPaths, LabState, GENERIC_GUEST_MODULES,
    HOST_MODULES,
};

const BACKPORTS_SUITE: &str = "bookworm-backports";
const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";
const GENERIC_META_PACKAGE: &str = "linux-image-amd64";
const BACKPORTS_SOURCE_FILE: &str = "/etc/apt/sources.list.d/barge-lab-backports.sources";
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
    /// Re-resolve and re-download the kernel even when one is cached.
    pub refresh: bool,
}

pub fn setup(paths: &LabPaths, options: &SetupOptions) -> Result<LabState, LabError> {
    std::fs::create_dir_all(&paths.root)
        .map_err(|e| LabError::io("cannot create", &paths.root, e))?;
    if !options.refresh && options.kernel.is_none() && options.qemu.is_none() {
        if let Ok(mut state) = LabState::load(paths) {
            if state.generic.is_none() || options.generic_kernel.is_some() {
                state.generic = generic_kernel(paths, options, &state.kernel_package, have_apt())?;
                state.check()?;
                state.save(paths)?;
            }
            eprintln!(
                "barge-lab: already set up: kernel {} ({}), {}, QEMU {}",
                state.kernel_version,
                state.kernel_package,
                describe_generic(&state.generic),
                state.qemu_version
            );
            return Ok(state);
        }
    }
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
    let state = LabState {
        kernel_package,
        kernel_version,
        bzimage: paths.bzimage(),
        modules_dir: paths.modules_dir(),
        qemu,
        qemu_version,
        busybox,
        generic,
    };
    state.check()?;
    state.save(paths)?;
    eprintln!(
        "barge-lab: set up: kernel {} ({}), {}, QEMU {}, busybox {}; cached in {}",
        state.kernel_version,
        state.kernel_package,
        describe_generic(&state.generic),
        state.qemu_version,
        state.busybox.display(),
        paths.root.display()
    );
    Ok(state)
}

fn no_apt_help() -> String {
    format!(
        "apt-get is not available (or this is not root), so the lab cannot install its \
         packages. Supply them by hand: `barge-lab setup --kernel BZIMAGE --modules DIR \
         --qemu QEMU [--busybox BUSYBOX]`, where BZIMAGE is a Linux 6.12+ x86_64 kernel with \
         huge pfnmap support (Debian's bookworm-backports linux-image-cloud-amd64 has it), DIR \
         holds its modules {} (plain, .xz or .zst, searched recursively), QEMU is \
         qemu-system-x86_64 {MIN_QEMU_MAJOR}.0 or newer with its firmware installed, and \
         BUSYBOX a static busybox",
        HOST_MODULES.join(", ")
    )
}

fn have_apt() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    root && Path::new("/usr/bin/apt-get").exists()
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

fn apt_install(packages: &[&str], suite: Option<&str>) -> Result<(), LabError> {
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

/// Adds bookworm-backports from the mirror the machine's own apt
/// configuration names, unless some source already carries it.
fn ensure_backports_source() -> Result<(), LabError> {
    let sources = read_apt_sources();
    if sources
        .iter()
        .any(|(_, text)| mentions_suite(text, BACKPORTS_SUITE))
    {
        return Ok(());
    }
    let (uri, signed_by) = sources
        .iter()
        .find_map(|(path, text)| {
            if path.extension().is_some_and(|e| e == "sources") {
                debian_mirror_deb822(text)
            } else {
                debian_mirror_one_line(text).map(|uri| (uri, None))
            }
        })
        .ok_or_else(|| {
            LabError::Setup(
                "no Debian bookworm source found in /etc/apt/sources.list or \
                 /etc/apt/sources.list.d: add one (or add bookworm-backports yourself) and \
                 run setup again"
                    .into(),
            )
        })?;
    let text = backports_stanza(&uri, signed_by.as_deref());
    eprintln!("barge-lab: adding {BACKPORTS_SUITE} from {uri} as {BACKPORTS_SOURCE_FILE}");
    std::fs::write(BACKPORTS_SOURCE_FILE, text)
        .map_err(|e| LabError::io("cannot write", Path::new(BACKPORTS_SOURCE_FILE), e))?;
    command_output("apt-get", &["update", "-q"]).map(|_| ())
}

fn read_apt_sources() -> Vec<(PathBuf, String)> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut entries: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        entries.sort();
        files.extend(entries);
    }
    files
        .into_iter()
        .filter_map(|path| std::fs::read_to_string(&path).ok().map(|text| (path, text)))
        .collect()
}

fn mentions_suite(text: &str, suite: &str) -> bool {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .any(|l| l.split_whitespace().any(|w| w == suite))
}

/// The URI and Signed-By of a deb822 stanza that carries the `bookworm` suite.
fn debian_mirror_deb822(text: &str) -> Option<(String, Option<String>)> {
    text.split("\n\n").find_map(|stanza| {
        let field = |name: &str| {
            stanza.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim().eq_ignore_ascii_case(name)).then(|| value.trim().to_string())
            })
        };
        let types = field("Types")?;
        let suites = field("Suites")?;
        if !types.split_whitespace().any(|t| t == "deb")
            || !suites.split_whitespace().any(|s| s == "bookworm")
        {
            return None;
        }
        let uri = field("URIs")?.split_whitespace().next()?.to_string();
        Some((uri, field("Signed-By")))
    })
}

/// The URI of a one-line `deb URI bookworm ...` entry.
fn debian_mirror_one_line(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let words: Vec<&str> = line
            .split_whitespace()
            .filter(|w| !w.starts_with('['))
            .collect();
        match words.as_slice() {
            ["deb", uri, "bookworm", ..] => Some(uri.to_string()),
            _ => None,
        }
    })
}

fn backports_stanza(uri: &str, signed_by: Option<&str>) -> String {
    let mut text = format!(
        "# Added by barge-lab setup: {BACKPORTS_SUITE} from this machine's own Debian mirror.\n\
         Types: deb\nURIs: {uri}\nSuites: {BACKPORTS_SUITE}\nComponents: main\n"
    );
    if let Some(key) = signed_by {
        text.push_str(&format!("Signed-By: {key}\n"));
    }
    text
}

/// Resolves the current bookworm-backports cloud kernel, downloads and
/// unpacks it, and caches its bzImage and the host modules, decompressed.
fn backports_kernel(paths: &LabPaths) -> Result<(String, String), LabError> {
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

fn supplied_kernel(
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
fn generic_kernel(
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

fn describe_generic(generic: &Option<GenericKernel>) -> String {
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

/// The file of module `name` (`-` and `_` are the same in module names).
fn find_module<'a>(found: &'a [PathBuf], name: &str) -> Option<&'a PathBuf> {
    let wanted = name.replace('-', "_");
    [".ko", ".ko.xz", ".ko.zst"].iter().find_map(|ext| {
        found.iter().find(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().replace('-', "_"))
                .is_some_and(|n| n.strip_suffix(ext) == Some(wanted.as_str()))
        })
    })
}

/// A module's bytes, decompressed.
fn read_module(source: &Path) -> Result<Vec<u8>, LabError> {
    let source_text = source.to_string_lossy();
    match source.extension().and_then(|e| e.to_str()) {
        Some("xz") => decompress("xz", &source_text),
        Some("zst") => decompress("zstd", &source_text),
        _ => std::fs::read(source).map_err(|e| LabError::io("cannot read", source, e)),
    }
}

type ModuleReader<'a> = dyn FnMut(&str) -> Result<Vec<u8>, LabError> + 'a;

/// The modules `roots` and what they depend on, dependencies first, each
/// once, with their bytes.
fn load_order(roots: &[&str], read: &mut ModuleReader) -> Result<Vec<(String, Vec<u8>)>, LabError> {
    fn visit(
        name: &str,
        read: &mut ModuleReader,
        seen: &mut Vec<String>,
        order: &mut Vec<(String, Vec<u8>)>,
    ) -> Result<(), LabError> {
        let key = name.replace('-', "_");
        if seen.contains(&key) {
            return Ok(());
        }
        seen.push(key);
        let bytes = read(name)?;
        let depends = modinfo_field(&bytes, "depends").ok_or_else(|| {
            LabError::Setup(format!(
                "module {name} has no `depends=` in a .modinfo section: is it a 64-bit kernel \
                 module?"
            ))
        })?;
        for dependency in depends.split(',').filter(|d| !d.is_empty()) {
            visit(dependency, read, seen, order)?;
        }
        order.push((name.to_string(), bytes));
        Ok(())
    }
    let mut seen = Vec::new();
    let mut order = Vec::new();
    for root in roots {
        visit(root, read, &mut seen, &mut order)?;
    }
    Ok(order)
}

/// `key=value` from a kernel module's .modinfo section.
fn modinfo_field(elf: &[u8], key: &str) -> Option<String> {
    elf_section(elf, ".modinfo")?
        .split(|&b| b == 0)
        .find_map(|entry| {
            let entry = std::str::from_utf8(entry).ok()?;
            entry
                .strip_prefix(key)?
                .strip_prefix('=')
                .map(str::to_string)
        })
}

/// The contents of the named section of a 64-bit little-endian ELF file.
fn elf_section<'a>(elf: &'a [u8], wanted: &str) -> Option<&'a [u8]> {
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let bytes = |offset: usize, len: usize| elf.get(offset..offset.checked_add(len)?);
    let u16_at =
        |offset: usize| bytes(offset, 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |offset: usize| {
        bytes(offset, 4).map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()) as usize)
    };
    let u64_at = |offset: usize| {
        bytes(offset, 8).and_then(|b| {
            usize::try_from(u64::from_le_bytes(b.try_into().unwrap_or_default())).ok()
        })
    };
    let section_offset = u64_at(0x28)?;
    let entry_size = u16_at(0x3a)?;
    let count = u16_at(0x3c)?;
    let names_index = u16_at(0x3e)?;
    // (name offset, file offset, size) of section `index`.
    let header = |index: usize| {
        let base = section_offset.checked_add(index.checked_mul(entry_size)?)?;
        Some((u32_at(base)?, u64_at(base + 0x18)?, u64_at(base + 0x20)?))
    };
    let (_, names_offset, names_size) = header(names_index)?;
    let names = bytes(names_offset, names_size)?;
    (0..count).find_map(|index| {
        let (name, offset, size) = header(index)?;
        let name = names.get(name..)?;
        let name = &name[..name.iter().position(|&b| b == 0)?];
        if name == wanted.as_bytes() {
            bytes(offset, size)
        } else {
            None
        }
    })
}

fn decompress(tool: &str, path: &str) -> Result<Vec<u8>, LabError> {
    let output = Command::new(tool)
        .args(["-dc", path])
        .output()
        .map_err(|e| LabError::Command {
            command: format!("{tool} -dc {path}"),
            detail: format!("{e} (install {tool})"),
        })?;
    if !output.status.success() {
        return Err(LabError::Command {
            command: format!("{tool} -dc {path}"),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(output.stdout)
}

fn list_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEB822: &str = "Types: deb\n# comment\nURIs: http://mirror.example/debian\n\
        Suites: bookworm bookworm-updates\nComponents: main\n\
        Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
        Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\
        Components: main\n";

    #[test]
    fn deb822_mirror_is_found_with_its_key() {
        let (uri, key) = debian_mirror_deb822(DEB822).unwrap();
        assert_eq!(uri, "http://mirror.example/debian");
        assert_eq!(
            key.as_deref(),
            Some("/usr/share/keyrings/debian-archive-keyring.gpg")
        );
        assert!(!mentions_suite(DEB822, BACKPORTS_SUITE));
    }

    #[test]
    fn one_line_mirror_is_found() {
        let text = "# deb http://old bookworm main\n\
                    deb [arch=amd64] http://mirror.example/debian bookworm main contrib\n";
        assert_eq!(
            debian_mirror_one_line(text).as_deref(),
            Some("http://mirror.example/debian")
        );
        assert!(mentions_suite(
            "deb http://m/debian bookworm-backports main",
            BACKPORTS_SUITE
        ));
        assert!(!mentions_suite(
            "# deb http://m/debian bookworm-backports main",
            BACKPORTS_SUITE
        ));
    }

    #[test]
    fn backports_stanza_uses_the_machines_mirror() {
        let text = backports_stanza("http://mirror.example/debian", Some("/k.gpg"));
        assert!(text.contains("URIs: http://mirror.example/debian\n"));
        assert!(text.contains("Suites: bookworm-backports\n"));
        assert!(text.contains("Signed-By: /k.gpg\n"));
    }

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

    /// A 64-bit little-endian ELF file with `.shstrtab` and `.modinfo`.
    fn module_elf(modinfo: &str) -> Vec<u8> {
        let names = b"\0.shstrtab\0.modinfo\0";
        let mut elf = vec![0u8; 64];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let names_offset = elf.len();
        elf.extend_from_slice(names);
        let modinfo_offset = elf.len();
        elf.extend_from_slice(modinfo.as_bytes());
        let headers = elf.len();
        elf[0x28..0x30].copy_from_slice(&(headers as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        let sections = [
            (0u32, 0usize, 0usize),
            (1, names_offset, names.len()),
            (11, modinfo_offset, modinfo.len()),
        ];
        for (name, offset, size) in sections {
            let mut header = [0u8; 64];
            header[..4].copy_from_slice(&name.to_le_bytes());
            header[0x18..0x20].copy_from_slice(&(offset as u64).to_le_bytes());
            header[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&header);
        }
        elf
    }

    #[test]
    fn modinfo_fields_are_read_from_the_section() {
        let elf = module_elf("license=GPL\0depends=ptp,pps_core\0name=e1000e\0");
        assert_eq!(
            modinfo_field(&elf, "depends").as_deref(),
            Some("ptp,pps_core")
        );
        assert_eq!(modinfo_field(&elf, "name").as_deref(), Some("e1000e"));
        assert_eq!(modinfo_field(&elf, "vermagic"), None);
        assert_eq!(modinfo_field(b"\x7fELF\x02\x01 truncated", "depends"), None);
        assert_eq!(modinfo_field(b"not an elf file at all", "depends"), None);
    }

    #[test]
    fn modules_load_after_their_dependencies_once() {
        let modules = [
            ("e1000e", module_elf("depends=ptp,pps_core\0")),
            ("ptp", module_elf("depends=pps_core\0")),
            ("pps_core", module_elf("depends=\0")),
        ];
        let mut read = |name: &str| {
            modules
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, elf)| elf.clone())
                .ok_or_else(|| LabError::Setup(format!("no {name}")))
        };
        let order: Vec<String> = load_order(&["e1000e"], &mut read)
            .unwrap()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(order, ["pps_core", "ptp", "e1000e"]);
        assert!(load_order(&["missing"], &mut read).is_err());
    }

    #[test]
    fn module_files_match_with_dashes_or_underscores() {
        let found = vec![
            PathBuf::from("/m/kernel/drivers/vfio/pci/vfio-pci.ko.xz"),
            PathBuf::from("/m/kernel/drivers/net/e1000e.ko.zst"),
        ];
        assert_eq!(find_module(&found, "vfio_pci"), Some(&found[0]));
        assert_eq!(find_module(&found, "e1000e"), Some(&found[1]));
        assert_eq!(find_module(&found, "e1000"), None);
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
    fn qemu_major_is_read() {
        assert_eq!(qemu_major("10.0.2"), 10);
        assert_eq!(qemu_major("7.2.0"), 7);
        assert_eq!(qemu_major("garbage"), 0);
    }
}
