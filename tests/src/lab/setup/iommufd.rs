//! The host kernel's vfio modules rebuilt with iommufd. No Debian kernel
//! enables CONFIG_IOMMUFD, so `setup` builds `drivers/iommu/iommufd`,
//! `drivers/vfio` (with the device cdev) and `drivers/vfio/pci` as
//! out-of-tree modules against the kernel's own Debian headers, from the
//! Debian source of the same upload, and caches the five modules
//! ([`IOMMUFD_MODULES`]) beside the kernel.
//!
//! [`iommufd_modules`] fetches `linux-headers-KVER`, the `-common` headers
//! and `linux-kbuild` they name, and `linux-source-X.Y`, all pinned to the
//! image's Debian version (`apt-get download`, cached in the lab's
//! downloads), unpacks them with `dpkg -x` (nothing is installed) and calls
//! [`build_iommufd_modules`], the build itself, which takes any kernel's
//! version and unpacked headers and source. The build:
//!
//! - points the headers' Makefile, which includes the `-common` headers by
//!   an absolute `/usr/src/...` path, at the unpacked copy;
//! - copies the three source folders into a build tree, without iommufd's
//!   `selftest.c` (CONFIG_IOMMUFD_TEST);
//! - gives iommufd.ko the CONFIG_INTERVAL_TREE_SPAN_ITER part of
//!   `lib/interval_tree.c` when the kernel was built without it (Debian's
//!   are: nothing else selects it);
//! - runs `make M=TREE modules` with `CONFIG_IOMMUFD=m
//!   CONFIG_VFIO_DEVICE_CDEV=y` (Kbuild's object lists) and
//!   `KCFLAGS=-DCONFIG_IOMMUFD=1 -DCONFIG_VFIO_DEVICE_CDEV=1` (the C code:
//!   the kernel's autoconf.h has neither), without module BTF
//!   (`CONFIG_DEBUG_INFO_BTF_MODULES=`, no pahole needed);
//! - strips the debug sections and checks each module's vermagic.
//!
//! The modules are unsigned: the lab host's kernel logs "module
//! verification failed" and marks itself tainted, which changes nothing.
//! `struct vfio_device` grows with CONFIG_IOMMUFD, so every module that uses
//! it is rebuilt and loaded in place of the stock one.
//!
//! It runs for each host kernel: bookworm-backports' 6.12 through the
//! machine's apt, trixie-backports' 7.3 through the lab's private apt
//! configuration ([`AptReach`]). What differed on 7.3.4:
//!
//! - the kernel is split (Linux 6.16+): the cached package is
//!   `linux-binary-KVER`, not `linux-image-KVER`, so the Debian version is
//!   read from either; the headers also depend on `linux-base-KVER`, which
//!   the build does not need (the headers carry `.config`);
//! - the headers' Makefile names `/usr/src/...` twice: `KBUILD_OUTPUT=` as
//!   well as the `include` of the `-common` headers;
//! - the headers depend on `gcc-14-for-host` and the kbuild programs were
//!   linked against trixie's glibc: [`super::kbuild`] builds with this
//!   system's gcc-12 and rebuilds modpost and objtool from the source;
//! - vfio-pci-core has CONFIG_VFIO_PCI_DMABUF (dma-buf export of BARs) and
//!   iommufd maps a dma-buf with IOMMU_IOAS_MAP_FILE (Linux 6.19+). iommufd
//!   reaches vfio-pci-core's `vfio_pci_dma_buf_iommufd_map` with
//!   `symbol_get` (exported for the module named iommufd only), so there is
//!   no module dependency loop: the `.modinfo` dependencies and the load
//!   order stay those of 6.12 (iommufd; vfio on iommufd; vfio_iommu_type1
//!   on vfio; vfio-pci-core on vfio and irqbypass; vfio-pci on both). Kbuild
//!   reads CONFIG_VFIO_PCI_DMABUF from the kernel's own configuration, so
//!   the rebuilt vfio-pci-core keeps it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use super::apt_sources::AptSuite;
use super::kbuild::{
    broken_host_programs, choose_compiler, dpkg_installed, gcc_major, older_gcc_make_args,
    rebuild_host_programs, Compiler,
};
use super::modules::{find_module, list_files, modinfo_field, read_module};
use crate::lab::run::{console_tail, shell_quote};
use crate::lab::{command_output, IommufdModules, LabError, LabPaths, IOMMUFD_MODULES};

/// The source files the build takes from the kernel source tree, relative
/// to its root.
/// Besides the modules' own, the sources of kbuild's host programs
/// (fixdep, modpost, objtool), rebuilt when the packaged ones do not start
/// here (see [`super::kbuild`]).
const SOURCE_PARTS: &[&str] = &[
    "drivers/iommu",
    "drivers/vfio",
    "lib/interval_tree.c",
    "scripts/basic/fixdep.c",
    "scripts/mod",
    "scripts/include",
    // modpost's includes of the kernel's own headers ("../../include/linux/
    // module_symbol.h", license.h, mod_devicetable.h and, from 7.x on, the
    // device-id/ folder the latter includes): the whole folder, since each
    // member named must exist in the tarball (6.12 has no device-id/).
    "include/linux",
    "tools/objtool",
    "tools/lib",
    "tools/include",
    "tools/arch/x86",
    "tools/build",
    "tools/scripts",
];
/// The iommufd self-test, left out of the build (it needs CONFIG_IOMMUFD_TEST).
const SELFTEST: &str = "drivers/iommu/iommufd/selftest.c";
/// The file the span iterator goes into, and its object, in iommufd's folder.
const SPAN_ITER_FILE: &str = "interval_tree_span_iter.c";
const SPAN_ITER_OBJECT: &str = "interval_tree_span_iter.o";
const SPAN_ITER_CONFIG: &str = "CONFIG_INTERVAL_TREE_SPAN_ITER";
/// The build-tree Kbuild file: the folders whose Makefiles build the modules.
const TREE_KBUILD: &str = "obj-m += drivers/iommu/iommufd/ drivers/vfio/\n";
/// What the make line sets: Kbuild's view, then the C code's.
const MAKE_CONFIG: &[&str] = &[
    "CONFIG_IOMMUFD=m",
    "CONFIG_VFIO_DEVICE_CDEV=y",
    "CONFIG_DEBUG_INFO_BTF_MODULES=",
    "KCFLAGS=-DCONFIG_IOMMUFD=1 -DCONFIG_VFIO_DEVICE_CDEV=1",
];
/// Packages the build needs besides the kernel's compiler (named by its
/// headers package): make, ld and strip, xz for the source tarball.
const BUILD_TOOLS: &[&str] = &["make", "binutils", "xz-utils"];
/// What a rebuilt objtool needs (libelf's headers; zlib's come with
/// libelf-dev).
const OBJTOOL_TOOLS: &[&str] = &["libelf-dev"];
const OBJTOOL: &str = "tools/objtool/objtool";

/// How the build reaches the apt suite that carries its kernel's
/// packages: not at all, or through an [`AptSuite`] opened on first use
/// (trixie-backports' private configuration runs `apt-get update` when it
/// opens, which a cached build never needs).
pub(super) struct AptReach<'a> {
    open: Option<&'a dyn Fn() -> Result<AptSuite, LabError>>,
    opened: std::cell::OnceCell<AptSuite>,
}

impl<'a> AptReach<'a> {
    pub(super) fn new(open: Option<&'a dyn Fn() -> Result<AptSuite, LabError>>) -> Self {
        AptReach {
            open,
            opened: std::cell::OnceCell::new(),
        }
    }

    fn suite(&self) -> Result<Option<&AptSuite>, LabError> {
        let Some(open) = self.open else {
            return Ok(None);
        };
        if let Some(suite) = self.opened.get() {
            return Ok(Some(suite));
        }
        let suite = open()?;
        Ok(Some(self.opened.get_or_init(|| suite)))
    }
}

/// Builds and caches the iommufd modules of the host kernel
/// `kernel_version` (package `kernel_package`), or says why it cannot and
/// returns `None` (a kernel supplied by hand; no apt and nothing cached).
/// Its packages come through `apt`; `install` says whether missing build
/// tools may be installed (root with apt).
pub(super) fn iommufd_modules(
    paths: &LabPaths,
    kernel_package: &str,
    kernel_version: &str,
    apt: &AptReach,
    install: bool,
) -> Result<Option<IommufdModules>, LabError> {
    if kernel_package.starts_with("supplied:") {
        eprintln!(
            "barge-lab: note: no iommufd modules for a kernel given with --kernel (they are \
             built from Debian's headers and source of Debian's kernel): `barge-lab run \
             --iommufd` cannot run"
        );
        return Ok(None);
    }
    let downloads = paths.downloads_dir();
    let Some(version) = image_version(&downloads, kernel_version, apt)? else {
        eprintln!(
            "barge-lab: note: no iommufd modules: the image of kernel {kernel_version} is not \
             cached and apt is not available to name its version; `barge-lab run --iommufd` \
             cannot run"
        );
        return Ok(None);
    };
    let download = |package: &str| {
        fetch_deb(&downloads, package, &version, apt).map_err(|e| {
            step_failed(
                "download",
                e,
                &format!(
                    "check that apt reaches the mirror (`apt-get update`) and that it still \
                     carries {package}={version} (a mirror keeps only the newest upload: if \
                     the kernel moved on, run setup with --refresh)"
                ),
            )
        })
    };
    let headers_package = format!("linux-headers-{kernel_version}");
    let Some(headers_deb) = download(&headers_package)? else {
        return Ok(not_cached(&headers_package, &version));
    };
    let depends = command_output(
        "dpkg-deb",
        &["-f", &headers_deb.to_string_lossy(), "Depends"],
    )
    .map_err(|e| {
        step_failed(
            "read the headers' Depends",
            e,
            &format!("delete {} and run setup again", headers_deb.display()),
        )
    })?;
    let needs = HeadersDepends::parse(&depends).ok_or_else(|| {
        LabError::Setup(format!(
            "iommufd module build: {headers_package} depends on no linux-headers-*-common \
             and linux-kbuild-* package (it says `{}`): build the modules by hand",
            depends.trim()
        ))
    })?;
    let source_package = source_package(kernel_version).ok_or_else(|| {
        LabError::Setup(format!(
            "iommufd module build: cannot tell the linux-source package of kernel \
             {kernel_version} (expected a version such as 6.12.95+deb12-cloud-amd64)"
        ))
    })?;
    let mut debs = vec![headers_deb];
    for package in [&needs.common, &needs.kbuild, &source_package] {
        match download(package)? {
            Some(deb) => debs.push(deb),
            None => return Ok(not_cached(package, &version)),
        }
    }
    let compiler = choose_compiler(&needs.compiler);
    ensure_build_tools(&compiler.package, BUILD_TOOLS, install)
        .map_err(|e| step_failed("build tools", e, "install them with apt-get as root"))?;

    let work = downloads.join(format!("iommufd-build-{kernel_version}"));
    let _ = std::fs::remove_dir_all(&work);
    let started = Instant::now();
    let (headers, source) = unpack(&debs, &work, kernel_version).map_err(|e| {
        step_failed(
            "unpack",
            e,
            &format!(
                "a cached .deb may be damaged: delete the linux-* files of version {version} \
                 from {} and run setup again",
                downloads.display()
            ),
        )
    })?;
    eprintln!(
        "barge-lab: iommufd: unpacked the headers and source of {version} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let broken = broken_host_programs(&headers);
    if broken.contains(&OBJTOOL) {
        ensure_build_tools("gcc", OBJTOOL_TOOLS, install).map_err(|e| {
            step_failed(
                "build tools",
                e,
                "install them with apt-get as root (kbuild's objtool is rebuilt with them)",
            )
        })?;
    }
    // The cached modules are replaced only once new ones are built.
    let log = work.join("build.log");
    let build = Build {
        compiler: &compiler,
        broken_host_programs: &broken,
        host_programs_work: &work.join("hostprogs"),
    };
    let built = build_iommufd_modules(
        kernel_version,
        &headers,
        &source,
        &work.join("tree"),
        &log,
        &build,
    )
    .map_err(|e| {
        step_failed(
            "make",
            e,
            &format!(
                "read {} (it and the unpacked headers and source stay in {} until setup \
                     runs again)",
                log.display(),
                work.display()
            ),
        )
    })?;
    let out = paths.iommufd_dir(kernel_version);
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).map_err(|e| LabError::io("cannot create", &out, e))?;
    let files = built
        .iter()
        .map(|(name, file)| (format!("{name}.ko"), file))
        .chain(std::iter::once(("build.log".to_string(), &log)));
    for (name, file) in files {
        copy_file(file, &out.join(name))?;
    }
    let _ = std::fs::remove_dir_all(&work);
    eprintln!(
        "barge-lab: iommufd: cached in {} with the build's log",
        out.display()
    );
    Ok(Some(IommufdModules {
        kernel_version: kernel_version.to_string(),
        package_version: version,
        modules_dir: out,
    }))
}

fn not_cached(package: &str, version: &str) -> Option<IommufdModules> {
    eprintln!(
        "barge-lab: note: no iommufd modules: {package}={version} is not cached and apt is \
         not available to download it; `barge-lab run --iommufd` cannot run"
    );
    None
}

fn step_failed(step: &str, error: LabError, what_to_do: &str) -> LabError {
    LabError::Setup(format!(
        "iommufd module build: step `{step}` failed: {error}; {what_to_do}"
    ))
}

/// The Debian version of the kernel image: its cached .deb's (the newest;
/// `linux-image-KVER`, or `linux-binary-KVER` for a kernel split as Linux
/// 6.16+ are), else the one apt offers.
fn image_version(
    downloads: &Path,
    kernel_version: &str,
    apt: &AptReach,
) -> Result<Option<String>, LabError> {
    let package = format!("linux-image-{kernel_version}");
    let binary = format!("linux-binary-{kernel_version}");
    let mut cached: Vec<String> = std::fs::read_dir(downloads)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            deb_name_version(&name, &package).or_else(|| deb_name_version(&name, &binary))
        })
        .collect();
    cached.sort_by(|a, b| {
        if dpkg_newer(a, b) {
            std::cmp::Ordering::Greater
        } else if dpkg_newer(b, a) {
            std::cmp::Ordering::Less
        } else {
            std::cmp::Ordering::Equal
        }
    });
    if let Some(newest) = cached.pop() {
        return Ok(Some(newest));
    }
    let Some(apt) = apt.suite()? else {
        return Ok(None);
    };
    let text = apt.output("apt-cache", &["show", "--no-all-versions", &package])?;
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("Version:"))
        .map(|v| v.trim().to_string());
    version.map(Some).ok_or_else(|| {
        LabError::Setup(format!(
            "apt-cache show {package} names no version: run `apt-get update`"
        ))
    })
}

fn dpkg_newer(a: &str, b: &str) -> bool {
    Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The version in an `apt-get download` file name (`PACKAGE_VERSION_ARCH.deb`,
/// with `:`, `+` and `~` possibly %-encoded) when it is `package`'s.
fn deb_name_version(file_name: &str, package: &str) -> Option<String> {
    let decoded = file_name
        .replace("%3a", ":")
        .replace("%3A", ":")
        .replace("%2b", "+")
        .replace("%2B", "+")
        .replace("%7e", "~")
        .replace("%7E", "~");
    let rest = decoded.strip_suffix(".deb")?.strip_prefix(package)?;
    let rest = rest.strip_prefix('_')?;
    let (version, _arch) = rest.rsplit_once('_')?;
    Some(version.to_string())
}

/// The cached .deb of `package` at `version`, downloaded first when apt is
/// there; `None` when it is not cached and apt is not there.
fn fetch_deb(
    downloads: &Path,
    package: &str,
    version: &str,
    apt: &AptReach,
) -> Result<Option<PathBuf>, LabError> {
    let find = || {
        std::fs::read_dir(downloads)
            .into_iter()
            .flatten()
            .flatten()
            .find(|e| {
                deb_name_version(&e.file_name().to_string_lossy(), package).as_deref()
                    == Some(version)
            })
            .map(|e| e.path())
    };
    if let Some(deb) = find() {
        return Ok(Some(deb));
    }
    let Some(apt) = apt.suite()? else {
        return Ok(None);
    };
    std::fs::create_dir_all(downloads).map_err(|e| LabError::io("cannot create", downloads, e))?;
    let pinned = format!("{package}={version}");
    eprintln!("barge-lab: iommufd: downloading {pinned}");
    let output = apt
        .command("apt-get")
        .args(["download", "-q", &pinned])
        .current_dir(downloads)
        .stdout(Stdio::null())
        .output()
        .map_err(|e| LabError::Command {
            command: format!("apt-get download {pinned}"),
            detail: e.to_string(),
        })?;
    if !output.status.success() {
        return Err(LabError::Command {
            command: format!("apt-get download {pinned}"),
            detail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    find().map(Some).ok_or_else(|| {
        LabError::Setup(format!(
            "apt-get download {pinned} left no .deb in {}",
            downloads.display()
        ))
    })
}

/// What a `linux-headers-KVER` package depends on that the build needs.
#[derive(Debug, PartialEq, Eq)]
struct HeadersDepends {
    /// `linux-headers-V-common`: the headers' architecture-independent part.
    common: String,
    /// `linux-kbuild-V`: the build scripts and host programs.
    kbuild: String,
    /// The compiler package the kernel was built with (`gcc-12`; 7.3's
    /// headers name `gcc-14-for-host`).
    compiler: String,
}

impl HeadersDepends {
    fn parse(depends: &str) -> Option<Self> {
        let names: Vec<&str> = depends
            .split(',')
            .filter_map(|d| d.split('|').next()?.split_whitespace().next())
            .collect();
        let find = |wanted: &dyn Fn(&str) -> bool| names.iter().find(|n| wanted(n)).copied();
        Some(HeadersDepends {
            common: find(&|n| n.starts_with("linux-headers-") && n.ends_with("-common"))?
                .to_string(),
            kbuild: find(&|n| n.starts_with("linux-kbuild-"))?.to_string(),
            compiler: find(&|n| n.starts_with("gcc-"))
                .unwrap_or("gcc")
                .to_string(),
        })
    }
}

/// `6.12.95+deb12-cloud-amd64` -> `linux-source-6.12`.
fn source_package(kernel_version: &str) -> Option<String> {
    let mut parts = kernel_version.split('.');
    let major = parts.next().filter(|p| p.parse::<u32>().is_ok())?;
    let minor = parts.next().filter(|p| p.parse::<u32>().is_ok())?;
    Some(format!("linux-source-{major}.{minor}"))
}

/// Installs with apt what the build needs and lacks, or names it.
fn ensure_build_tools(compiler: &str, tools: &[&str], apt: bool) -> Result<(), LabError> {
    let mut needed = vec![compiler];
    needed.extend(tools);
    let missing: Vec<&str> = needed
        .into_iter()
        .filter(|package| !dpkg_installed(package))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !apt {
        return Err(LabError::Setup(format!(
            "the module build needs {} (not installed)",
            missing.join(", ")
        )));
    }
    super::apt_install(&missing, None)
}

/// `dpkg -x` of every .deb into `work/root`, and the parts of the source
/// tarball the build needs into `work/source`; returns (headers, source).
fn unpack(
    debs: &[PathBuf],
    work: &Path,
    kernel_version: &str,
) -> Result<(PathBuf, PathBuf), LabError> {
    let root = work.join("root");
    std::fs::create_dir_all(&root).map_err(|e| LabError::io("cannot create", &root, e))?;
    for deb in debs {
        command_output(
            "dpkg",
            &["-x", &deb.to_string_lossy(), &root.to_string_lossy()],
        )?;
    }
    let src = root.join("usr/src");
    let tarball = std::fs::read_dir(&src)
        .map_err(|e| LabError::io("cannot read", &src, e))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .is_some_and(|n| n.starts_with("linux-source-") && n.ends_with(".tar.xz"))
        })
        .ok_or_else(|| LabError::Setup(format!("no linux-source-*.tar.xz in {}", src.display())))?;
    let top = tarball
        .file_name()
        .map(|n| n.to_string_lossy().trim_end_matches(".tar.xz").to_string())
        .unwrap_or_default();
    let source = work.join("source");
    std::fs::create_dir_all(&source).map_err(|e| LabError::io("cannot create", &source, e))?;
    let mut args = vec![
        "-xJf".to_string(),
        tarball.to_string_lossy().into_owned(),
        "-C".to_string(),
        source.to_string_lossy().into_owned(),
        "--strip-components=1".to_string(),
    ];
    args.extend(SOURCE_PARTS.iter().map(|part| format!("{top}/{part}")));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    command_output("tar", &args)?;
    let _ = std::fs::remove_file(&tarball);
    Ok((src.join(format!("linux-headers-{kernel_version}")), source))
}

/// How [`build_iommufd_modules`] builds: the compiler, and the kbuild host
/// programs to rebuild first (in `host_programs_work`).
pub(super) struct Build<'a> {
    pub(super) compiler: &'a Compiler,
    pub(super) broken_host_programs: &'a [&'static str],
    pub(super) host_programs_work: &'a Path,
}

/// Builds [`IOMMUFD_MODULES`] for `kernel_version` from `source` (a kernel
/// source tree, or the parts of one in `SOURCE_PARTS`) against `headers`
/// (the unpacked `linux-headers-KVER`, its `-common` sibling and kbuild
/// beside it as Debian lays them out), in `tree` (made afresh); make's
/// output goes to `log`. Returns each module's name and built file.
pub(super) fn build_iommufd_modules(
    kernel_version: &str,
    headers: &Path,
    source: &Path,
    tree: &Path,
    log: &Path,
    build: &Build,
) -> Result<Vec<(String, PathBuf)>, LabError> {
    let release = headers.join("include/config/kernel.release");
    if let Ok(found) = std::fs::read_to_string(&release) {
        if found.trim() != kernel_version {
            return Err(LabError::Setup(format!(
                "{} are the headers of kernel {}, not {kernel_version}",
                headers.display(),
                found.trim()
            )));
        }
    }
    let config_file = headers.join(".config");
    let config = std::fs::read_to_string(&config_file)
        .map_err(|e| LabError::io("cannot read the kernel config", &config_file, e))?;
    point_makefile_at_unpacked_headers(headers)?;
    prepare_tree(source, tree, !config_enabled(&config, SPAN_ITER_CONFIG))?;

    // With another compiler than the kernel's: `CC=` and the options that
    // need a newer one turned off (see super::kbuild).
    let mut compiler_args = Vec::new();
    if let Some(cc) = &build.compiler.cc {
        compiler_args.push(format!("CC={cc}"));
        let major = gcc_major(cc).ok_or_else(|| {
            LabError::Setup(format!(
                "cannot read the version of {cc} (`{cc} -dumpversion`)"
            ))
        })?;
        compiler_args.extend(older_gcc_make_args(&config, major));
    }
    let make_base = || {
        let mut make = Command::new("make");
        make.arg("-C")
            .arg(headers)
            .args(&compiler_args)
            .env_remove("MAKEFLAGS")
            .env_remove("MFLAGS")
            .env_remove("MAKELEVEL")
            .env_remove("KBUILD_OUTPUT")
            .stdin(Stdio::null());
        make
    };
    if !build.broken_host_programs.is_empty() {
        rebuild_host_programs(
            build.broken_host_programs,
            headers,
            source,
            build.host_programs_work,
            &make_base,
        )?;
    }

    let jobs = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let log_file = std::fs::File::create(log).map_err(|e| LabError::io("cannot create", log, e))?;
    let log_err = log_file
        .try_clone()
        .map_err(|e| LabError::io("cannot open", log, e))?;
    let mut make = make_base();
    make.arg(format!("M={}", tree.display()))
        .arg(format!("-j{jobs}"))
        .args(MAKE_CONFIG)
        .arg("modules")
        .stdout(log_file)
        .stderr(log_err);
    let mut words = vec![
        "make".to_string(),
        "-C".to_string(),
        headers.display().to_string(),
    ];
    words.extend(compiler_args.iter().cloned());
    words.extend([format!("M={}", tree.display()), format!("-j{jobs}")]);
    words.extend(MAKE_CONFIG.iter().map(|w| w.to_string()));
    words.push("modules".into());
    let rendered = shell_quote(&words);
    eprintln!("barge-lab: iommufd: {rendered}");
    let started = Instant::now();
    let status = make.status().map_err(|e| LabError::Command {
        command: rendered.clone(),
        detail: format!("{e} (install make)"),
    })?;
    let took = started.elapsed();
    if !status.success() {
        return Err(LabError::Command {
            command: rendered,
            detail: format!("{status}:\n{}", make_errors(log)),
        });
    }
    let found = list_files(tree);
    let mut built = Vec::new();
    for name in IOMMUFD_MODULES {
        let file = find_module(&found, name)
            .filter(|p| p.extension().is_some_and(|e| e == "ko"))
            .ok_or_else(|| {
                LabError::Setup(format!(
                    "make succeeded but built no {name}.ko under {} (see {})",
                    tree.display(),
                    log.display()
                ))
            })?
            .clone();
        command_output("strip", &["--strip-debug", &file.to_string_lossy()])?;
        let bytes = read_module(&file)?;
        let vermagic = modinfo_field(&bytes, "vermagic").unwrap_or_default();
        if vermagic.split_whitespace().next() != Some(kernel_version) {
            return Err(LabError::Setup(format!(
                "{} has vermagic `{vermagic}`, not kernel {kernel_version}'s",
                file.display()
            )));
        }
        built.push((name.to_string(), file));
    }
    eprintln!(
        "barge-lab: iommufd: built {} for {kernel_version} in {:.1} s (make -j{jobs})",
        IOMMUFD_MODULES.join(", "),
        took.as_secs_f64()
    );
    Ok(built)
}

/// The compiler's and modpost's error lines of a failed build's log (the
/// first ten), or its last lines when it has none.
fn make_errors(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("error:") || l.starts_with("ERROR:"))
        .take(10)
        .collect();
    if errors.is_empty() {
        console_tail(log, 15)
    } else {
        errors.join("\n")
    }
}

/// Whether `.config` text sets `option` to y or m.
pub(super) fn config_enabled(config: &str, option: &str) -> bool {
    config.lines().any(|line| {
        line.strip_prefix(option)
            .and_then(|rest| rest.strip_prefix('='))
            .is_some_and(|value| value == "y" || value == "m")
    })
}

/// Debian's `linux-headers-KVER/Makefile` is `include /usr/src/...-common/
/// Makefile` (from 7.3 on after `KBUILD_OUTPUT=/usr/src/linux-headers-KVER`,
/// which the common Makefile checks exists): where the headers are unpacked
/// rather than installed, those lines must name the unpacked folders.
fn point_makefile_at_unpacked_headers(headers: &Path) -> Result<(), LabError> {
    let makefile = headers.join("Makefile");
    let text = std::fs::read_to_string(&makefile)
        .map_err(|e| LabError::io("cannot read the headers' Makefile", &makefile, e))?;
    let siblings = headers.parent().unwrap_or(Path::new("."));
    let fixed = rewrite_includes(&text, siblings);
    if fixed != text {
        std::fs::write(&makefile, fixed).map_err(|e| LabError::io("cannot write", &makefile, e))?;
    }
    Ok(())
}

/// `include /usr/src/NAME/...` -> `include SIBLINGS/NAME/...`, and the
/// same for `KBUILD_OUTPUT=/usr/src/NAME`.
fn rewrite_includes(text: &str, siblings: &Path) -> String {
    text.lines()
        .map(|line| {
            for prefix in ["include ", "KBUILD_OUTPUT=", "KBUILD_OUTPUT = "] {
                if let Some(rest) = line
                    .strip_prefix(prefix)
                    .and_then(|r| r.strip_prefix("/usr/src/"))
                {
                    return format!("{prefix}{}/{rest}\n", siblings.display());
                }
            }
            format!("{line}\n")
        })
        .collect()
}

/// The build tree: iommufd's and vfio's folders (and the IOMMU core's
/// private headers they include) from `source`, iommufd without its
/// self-test and, with `span_iter`, with the span iterator of
/// `lib/interval_tree.c`; a Kbuild file names the two folders.
fn prepare_tree(source: &Path, tree: &Path, span_iter: bool) -> Result<(), LabError> {
    let _ = std::fs::remove_dir_all(tree);
    let iommu = source.join("drivers/iommu");
    let entries = std::fs::read_dir(&iommu).map_err(|e| LabError::io("cannot read", &iommu, e))?;
    let tree_iommu = tree.join("drivers/iommu");
    std::fs::create_dir_all(&tree_iommu)
        .map_err(|e| LabError::io("cannot create", &tree_iommu, e))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "h") {
            copy_file(&path, &tree_iommu.join(entry.file_name()))?;
        }
    }
    copy_tree(&iommu.join("iommufd"), &tree_iommu.join("iommufd"), &|p| {
        p == source.join(SELFTEST)
    })?;
    copy_tree(
        &source.join("drivers/vfio"),
        &tree.join("drivers/vfio"),
        &|_| false,
    )?;
    if span_iter {
        let file = source.join("lib/interval_tree.c");
        let text =
            std::fs::read_to_string(&file).map_err(|e| LabError::io("cannot read", &file, e))?;
        let part = span_iter_source(&text).ok_or_else(|| {
            LabError::Setup(format!(
                "{} has no `#ifdef {SPAN_ITER_CONFIG}` part to give iommufd.ko",
                file.display()
            ))
        })?;
        let iommufd = tree_iommu.join("iommufd");
        let target = iommufd.join(SPAN_ITER_FILE);
        std::fs::write(&target, part).map_err(|e| LabError::io("cannot write", &target, e))?;
        let makefile = iommufd.join("Makefile");
        let mut text = std::fs::read_to_string(&makefile)
            .map_err(|e| LabError::io("cannot read", &makefile, e))?;
        text.push_str(&format!("iommufd-y += {SPAN_ITER_OBJECT}\n"));
        std::fs::write(&makefile, text).map_err(|e| LabError::io("cannot write", &makefile, e))?;
    }
    let kbuild = tree.join("Kbuild");
    std::fs::write(&kbuild, TREE_KBUILD).map_err(|e| LabError::io("cannot write", &kbuild, e))
}

/// The `#ifdef CONFIG_INTERVAL_TREE_SPAN_ITER` part of `lib/interval_tree.c`
/// as a file of its own: the header it needs, the code, without its
/// exports (iommufd.ko uses it; nothing else may rely on it).
fn span_iter_source(interval_tree_c: &str) -> Option<String> {
    let opening = format!("#ifdef {SPAN_ITER_CONFIG}");
    let mut lines = interval_tree_c.lines();
    lines.by_ref().find(|l| l.trim() == opening)?;
    let mut body = String::from(
        "// SPDX-License-Identifier: GPL-2.0-only\n\
         // The CONFIG_INTERVAL_TREE_SPAN_ITER part of lib/interval_tree.c, built\n\
         // into iommufd.ko by barge-lab setup (the kernel was built without it).\n\
         #include <linux/interval_tree.h>\n",
    );
    let mut depth = 0;
    for line in lines {
        let trimmed = line.trim_start();
        if trimmed.starts_with("#if") {
            depth += 1;
        } else if trimmed.starts_with("#endif") {
            if depth == 0 {
                return Some(body);
            }
            depth -= 1;
        }
        if !trimmed.starts_with("EXPORT_SYMBOL") {
            body.push_str(line);
            body.push('\n');
        }
    }
    None
}

fn copy_file(from: &Path, to: &Path) -> Result<(), LabError> {
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| LabError::io("cannot copy", from, e))
}

/// Copies the folder `from` to `to`, recursively, leaving out the files
/// `skip` names.
fn copy_tree(from: &Path, to: &Path, skip: &dyn Fn(&Path) -> bool) -> Result<(), LabError> {
    std::fs::create_dir_all(to).map_err(|e| LabError::io("cannot create", to, e))?;
    let entries = std::fs::read_dir(from).map_err(|e| LabError::io("cannot read", from, e))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let target = to.join(entry.file_name());
        if path.is_dir() {
            copy_tree(&path, &target, skip)?;
        } else if !skip(&path) {
            copy_file(&path, &target)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_depends_name_common_kbuild_and_the_compiler() {
        let depends = "linux-base (>= 4.12~), linux-headers-6.12.95+deb12-common (= \
            6.12.95-1~bpo12+1), linux-image-6.12.95+deb12-cloud-amd64 (= 6.12.95-1~bpo12+1) | \
            linux-image-6.12.95+deb12-cloud-amd64-unsigned (= 6.12.95-1~bpo12+1), \
            linux-kbuild-6.12.95+deb12, gcc-12";
        assert_eq!(
            HeadersDepends::parse(depends),
            Some(HeadersDepends {
                common: "linux-headers-6.12.95+deb12-common".into(),
                kbuild: "linux-kbuild-6.12.95+deb12".into(),
                compiler: "gcc-12".into(),
            })
        );
        assert_eq!(HeadersDepends::parse("linux-base, gcc-12"), None);
        // 7.3.4's: the compiler first, as `-for-host`, and linux-base-KVER.
        let depends = "gcc-14-for-host, linux-base (>= 4.12~), \
            linux-base-7.3.4+deb13-cloud-amd64 (= 7.3.4-1~bpo13+1), \
            linux-headers-7.3.4+deb13-common (= 7.3.4-1~bpo13+1), linux-kbuild-7.3.4+deb13";
        assert_eq!(
            HeadersDepends::parse(depends),
            Some(HeadersDepends {
                common: "linux-headers-7.3.4+deb13-common".into(),
                kbuild: "linux-kbuild-7.3.4+deb13".into(),
                compiler: "gcc-14-for-host".into(),
            })
        );
    }

    #[test]
    fn source_package_is_the_kernels_major_and_minor() {
        assert_eq!(
            source_package("6.12.95+deb12-cloud-amd64").as_deref(),
            Some("linux-source-6.12")
        );
        assert_eq!(
            source_package("7.3.1+deb13-cloud-amd64").as_deref(),
            Some("linux-source-7.3")
        );
        assert_eq!(source_package("vmlinuz"), None);
    }

    #[test]
    fn deb_file_names_give_their_version() {
        let package = "linux-source-6.12";
        assert_eq!(
            deb_name_version("linux-source-6.12_6.12.95-1~bpo12+1_all.deb", package).as_deref(),
            Some("6.12.95-1~bpo12+1")
        );
        assert_eq!(
            deb_name_version(
                "linux-source-6.12_1%3a6.12.95-1%7ebpo12%2b1_all.deb",
                package
            )
            .as_deref(),
            Some("1:6.12.95-1~bpo12+1")
        );
        assert_eq!(
            deb_name_version("linux-source-6.1_6.1.1-1_all.deb", package),
            None
        );
        assert_eq!(
            deb_name_version("linux-source-6.12-extra_6.12.95-1_all.deb", package),
            None
        );
    }

    #[test]
    fn headers_makefile_is_pointed_at_the_unpacked_common_headers() {
        let text = "include /usr/src/linux-headers-6.12.95+deb12-common/Makefile\n";
        assert_eq!(
            rewrite_includes(text, Path::new("/lab/root/usr/src")),
            "include /lab/root/usr/src/linux-headers-6.12.95+deb12-common/Makefile\n"
        );
        assert_eq!(
            rewrite_includes("all:\n\ttrue\n", Path::new("/x")),
            "all:\n\ttrue\n"
        );
        // 7.3's names its own folder too.
        let text = "KBUILD_OUTPUT=/usr/src/linux-headers-7.3.4+deb13-cloud-amd64\n\
                    include /usr/src/linux-headers-7.3.4+deb13-common/Makefile\n";
        assert_eq!(
            rewrite_includes(text, Path::new("/r/usr/src")),
            "KBUILD_OUTPUT=/r/usr/src/linux-headers-7.3.4+deb13-cloud-amd64\n\
             include /r/usr/src/linux-headers-7.3.4+deb13-common/Makefile\n"
        );
    }

    #[test]
    fn a_failed_build_shows_its_error_lines() {
        let log = std::env::temp_dir().join(format!("barge-iommufd-log-{}", std::process::id()));
        std::fs::write(
            &log,
            "  CC [M]  tree/drivers/vfio/vfio_main.o\n\
             tree/drivers/vfio/vfio_main.c:9:1: error: unknown type name 'foo'\n\
             make[3]: *** [Makefile.build:234: vfio_main.o] Error 1\n\
             ERROR: modpost: \"bar\" [tree/drivers/vfio/vfio.ko] undefined!\n",
        )
        .unwrap();
        assert_eq!(
            make_errors(&log),
            "tree/drivers/vfio/vfio_main.c:9:1: error: unknown type name 'foo'\n\
             ERROR: modpost: \"bar\" [tree/drivers/vfio/vfio.ko] undefined!"
        );
        std::fs::write(&log, "make: *** No rule to make target 'modules'.  Stop.\n").unwrap();
        assert_eq!(
            make_errors(&log),
            "make: *** No rule to make target 'modules'.  Stop."
        );
        std::fs::remove_file(&log).unwrap();
    }

    #[test]
    fn config_options_are_read_as_set_or_not() {
        let config = "CONFIG_INTERVAL_TREE=y\n# CONFIG_IOMMUFD is not set\nCONFIG_VFIO=m\n";
        assert!(config_enabled(config, "CONFIG_INTERVAL_TREE"));
        assert!(config_enabled(config, "CONFIG_VFIO"));
        assert!(!config_enabled(config, "CONFIG_IOMMUFD"));
        assert!(!config_enabled(config, SPAN_ITER_CONFIG));
    }

    const INTERVAL_TREE_C: &str = "#include <linux/interval_tree.h>\n\
        INTERVAL_TREE_DEFINE(struct interval_tree_node, rb, ...)\n\
        EXPORT_SYMBOL_GPL(interval_tree_insert);\n\
        \n\
        #ifdef CONFIG_INTERVAL_TREE_SPAN_ITER\n\
        void interval_tree_span_iter_first(void)\n\
        {\n\
        #ifdef NESTED\n\
        \tnested();\n\
        #endif\n\
        }\n\
        EXPORT_SYMBOL_GPL(interval_tree_span_iter_first);\n\
        #endif\n\
        trailing();\n";

    #[test]
    fn span_iterator_is_cut_out_of_interval_tree_c() {
        let part = span_iter_source(INTERVAL_TREE_C).unwrap();
        assert!(part.contains("#include <linux/interval_tree.h>\n"));
        assert!(part.contains("void interval_tree_span_iter_first(void)\n"));
        assert!(part.contains("#ifdef NESTED\n\tnested();\n#endif\n}\n"));
        assert!(!part.contains("INTERVAL_TREE_DEFINE"), "{part}");
        assert!(!part.contains("EXPORT_SYMBOL"), "{part}");
        assert!(!part.contains("trailing"), "{part}");
        assert_eq!(span_iter_source("no such part\n"), None);
    }

    #[test]
    fn build_tree_has_iommufd_without_selftest_and_with_the_span_iterator() {
        let dir = std::env::temp_dir().join(format!("barge-iommufd-tree-{}", std::process::id()));
        let source = dir.join("source");
        for file in [
            "drivers/iommu/iommu-priv.h",
            "drivers/iommu/iommu.c",
            "drivers/iommu/iommufd/Makefile",
            "drivers/iommu/iommufd/main.c",
            SELFTEST,
            "drivers/vfio/Makefile",
            "drivers/vfio/pci/vfio_pci.c",
        ] {
            let path = source.join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, file).unwrap();
        }
        std::fs::create_dir_all(source.join("lib")).unwrap();
        std::fs::write(source.join("lib/interval_tree.c"), INTERVAL_TREE_C).unwrap();
        let tree = dir.join("tree");
        prepare_tree(&source, &tree, true).unwrap();
        let has = |file: &str| tree.join(file).exists();
        assert!(has("drivers/iommu/iommu-priv.h"));
        assert!(!has("drivers/iommu/iommu.c"));
        assert!(has("drivers/iommu/iommufd/main.c"));
        assert!(!has(SELFTEST));
        assert!(has("drivers/vfio/pci/vfio_pci.c"));
        assert!(has(&format!("drivers/iommu/iommufd/{SPAN_ITER_FILE}")));
        let makefile =
            std::fs::read_to_string(tree.join("drivers/iommu/iommufd/Makefile")).unwrap();
        assert!(makefile.ends_with(&format!("iommufd-y += {SPAN_ITER_OBJECT}\n")));
        assert_eq!(
            std::fs::read_to_string(tree.join("Kbuild")).unwrap(),
            TREE_KBUILD
        );
        prepare_tree(&source, &tree, false).unwrap();
        assert!(!tree
            .join(format!("drivers/iommu/iommufd/{SPAN_ITER_FILE}"))
            .exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
