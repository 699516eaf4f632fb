//! The lab: a nested KVM + VFIO host booted under QEMU full emulation, in
//! which barge's tests run. `setup` installs and caches what it needs, `run`
//! boots it with emulated devices, runs a command inside and brings the
//! command's results back.

pub mod arm64;
pub mod cpio;
pub mod initramfs;
pub mod run;
pub mod setup;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The kernel modules the lab host loads, in load order.
pub const HOST_MODULES: &[&str] = &[
    "irqbypass",
    "kvm",
    "kvm-amd",
    "vfio",
    "vfio_iommu_type1",
    "vfio-pci-core",
    "vfio-pci",
];

/// The modules `setup` rebuilds with CONFIG_IOMMUFD and
/// CONFIG_VFIO_DEVICE_CDEV (no Debian kernel enables them), in load order.
/// `barge-lab run --iommufd` loads them in place of the stock vfio ones
/// (`struct vfio_device` changes with CONFIG_IOMMUFD, so every module that
/// uses it is rebuilt); irqbypass and kvm stay stock.
pub const IOMMUFD_MODULES: &[&str] = &[
    "iommufd",
    "vfio",
    "vfio_iommu_type1",
    "vfio-pci-core",
    "vfio-pci",
];

/// The modules the generic guest (`/lab/guest/generic/`) carries and loads,
/// before the ones they depend on are added by `setup`.
pub const GENERIC_GUEST_MODULES: &[&str] = &["e1000e"];

/// The modules of the main host kernel the lab host loads only when a run
/// asks for them: virtio_blk for the Debian guest's disk (`run --debian`),
/// tun for the tap device (`run --tap`). Cached by `setup` with what they
/// depend on.
pub const HOST_EXTRA_MODULES: &[&str] = &["virtio_blk", "tun"];

/// The command that sets the lab up, named in every "not set up" error.
pub const SETUP_COMMAND: &str = "cargo run -p barge-tests --bin barge-lab -- setup";

/// The name of the main host kernel (bookworm-backports' cloud kernel, 6.12),
/// which is also the guests' kernel.
pub const MAIN_HOST_KERNEL: &str = "bookworm-backports";
/// The name of the second host kernel (trixie-backports' cloud kernel, 7.3
/// when this was written), also when one is given by hand in its place.
pub const TRIXIE_HOST_KERNEL: &str = "trixie-backports";

/// The command that sets the arm64 lab up alone, named in its "not set up"
/// errors (plain [`SETUP_COMMAND`] sets it up too).
pub const ARM64_SETUP_COMMAND: &str =
    "cargo run -p barge-tests --bin barge-lab -- setup --arch arm64";

/// The lab host's architecture (`barge-lab setup --arch`, `run --arch`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LabArch {
    /// q35 with intel-iommu, AMD SVM under TCG (the default).
    #[default]
    #[value(name = "x86_64", alias = "x86", alias = "amd64")]
    X86_64,
    /// virt with SMMUv3 and a GICv3, EL2 with VHE under TCG.
    #[value(name = "arm64", alias = "aarch64")]
    Arm64,
}

impl LabArch {
    /// The lab host's serial port that carries the results (its console is
    /// the first one).
    pub fn results_tty(self) -> &'static str {
        match self {
            LabArch::X86_64 => "ttyS1",
            LabArch::Arm64 => arm64::RESULTS_TTY,
        }
    }

    /// What makes /dev/kvm appear, for the host init's error.
    pub fn kvm_from(self) -> &'static str {
        match self {
            LabArch::X86_64 => "after loading kvm-amd",
            LabArch::Arm64 => {
                "(KVM is built into the arm64 kernel: is EL2 there, virtualization=on?)"
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("the lab is not set up ({0} is missing): run `{SETUP_COMMAND}` first")]
    NotSetUp(PathBuf),
    #[error(
        "the lab is not set up for arm64 ({0} is missing): run `{ARM64_SETUP_COMMAND}` (or \
         plain `{SETUP_COMMAND}`) first"
    )]
    Arm64NotSetUp(PathBuf),
    #[error(
        "the lab is not set up with host kernel {wanted} (cached: {cached}): run \
         `{SETUP_COMMAND}` (trixie-backports' kernel needs apt-get, or give one with \
         --trixie-kernel BZIMAGE --trixie-modules DIR)"
    )]
    HostKernelNotCached { wanted: String, cached: String },
    #[error("cannot read the lab state {path}: {reason}; run `{SETUP_COMMAND}` again")]
    BadState { path: PathBuf, reason: String },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("{0}")]
    Setup(String),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Run(String),
    /// The lab host never reached BARGE-LAB-READY: no command ran.
    #[error("{0}")]
    BootHung(String),
}

impl LabError {
    pub fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        LabError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Where the lab keeps what `setup` fetched and what each `run` produced.
#[derive(Debug, Clone)]
pub struct LabPaths {
    pub root: PathBuf,
}

impl LabPaths {
    /// `$BARGE_LAB_DIR`, or `target/lab` in this workspace.
    pub fn from_env() -> Self {
        let root = match std::env::var_os("BARGE_LAB_DIR") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .unwrap_or(Path::new("."))
                .join("target")
                .join("lab"),
        };
        LabPaths { root }
    }

    pub fn state_file(&self) -> PathBuf {
        self.root.join("lab.json")
    }

    pub fn kernel_dir(&self) -> PathBuf {
        self.root.join("kernel")
    }

    pub fn bzimage(&self) -> PathBuf {
        self.kernel_dir().join("bzImage")
    }

    pub fn modules_dir(&self) -> PathBuf {
        self.kernel_dir().join("modules")
    }

    /// Where the generic kernel (same version, with the drivers the cloud
    /// one lacks) is cached for guests that drive emulated NICs.
    pub fn generic_dir(&self) -> PathBuf {
        self.kernel_dir().join("generic")
    }

    pub fn generic_bzimage(&self) -> PathBuf {
        self.generic_dir().join("bzImage")
    }

    pub fn generic_modules_dir(&self) -> PathBuf {
        self.generic_dir().join("modules")
    }

    /// Where a second host kernel (`trixie-backports`) is cached.
    pub fn host_kernel_dir(&self, name: &str) -> PathBuf {
        self.kernel_dir().join(name)
    }

    /// A private apt configuration for one suite (its sources, lists and
    /// cache), for packages that are only unpacked.
    pub fn apt_dir(&self, suite: &str) -> PathBuf {
        self.root.join("apt").join(suite)
    }

    /// Where the iommufd and vfio modules rebuilt for host kernel
    /// `kernel_version` are cached (with the log of their build).
    pub fn iommufd_dir(&self, kernel_version: &str) -> PathBuf {
        self.kernel_dir().join("iommufd").join(kernel_version)
    }

    /// Where the Debian guest image is built and cached.
    pub fn debian_dir(&self) -> PathBuf {
        self.root.join("debian")
    }

    /// The disk the lab host mounts at /lab/guest/debian: an ext4 file
    /// system holding `rootfs.img`, `vmlinuz` and `initrd.img`.
    pub fn debian_disk(&self) -> PathBuf {
        self.debian_dir().join("disk.img")
    }

    /// Where the main host kernel's [`HOST_EXTRA_MODULES`] are cached.
    pub fn extra_modules_dir(&self) -> PathBuf {
        self.kernel_dir().join("extra-modules")
    }

    pub fn runs_dir(&self) -> PathBuf {
        self.root.join("runs")
    }

    pub fn downloads_dir(&self) -> PathBuf {
        self.root.join("downloads")
    }
}

/// What `setup` recorded: every file `run` needs, with their versions.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LabState {
    pub kernel_package: String,
    pub kernel_version: String,
    pub bzimage: PathBuf,
    pub modules_dir: PathBuf,
    pub qemu: PathBuf,
    pub qemu_version: String,
    pub busybox: PathBuf,
    /// The generic kernel for guests that need its modules (e1000e); absent
    /// from a lab set up before it existed, until `setup` runs again.
    #[serde(default)]
    pub generic: Option<GenericKernel>,
    /// Host kernels besides the main one (trixie-backports' cloud kernel),
    /// picked with `barge-lab run --host-kernel`; the guests keep the main
    /// kernel. Empty in a lab set up before they existed, until `setup`
    /// runs again.
    #[serde(default)]
    pub more_host_kernels: Vec<HostKernel>,
    /// The main host kernel's vfio modules rebuilt with iommufd (the second
    /// host kernel's are in its [`HostKernel::iommufd`]); absent from a lab
    /// set up before they existed (until `setup` runs again) and when the
    /// host kernel was supplied by hand.
    #[serde(default)]
    pub iommufd: Option<IommufdModules>,
    /// The Debian bookworm guest image (`run --debian`); absent from a lab
    /// set up before it existed (until `setup` runs again) and without apt.
    #[serde(default)]
    pub debian: Option<DebianImage>,
    /// The main host kernel's [`HOST_EXTRA_MODULES`] (`run --debian`,
    /// `run --tap`); absent like [`LabState::debian`].
    #[serde(default)]
    pub extra_modules: Option<ExtraModules>,
}

/// The Debian bookworm system `setup` builds with mmdebstrap from the
/// machine's own mirror: systemd, udev, iproute2, socat and Debian's kernel
/// (the lab's own cloud kernel package) with the initramfs-tools initrd it
/// built inside, as a raw ext4 `rootfs.img`. The lab host mounts [`Self::disk`]
/// at /lab/guest/debian.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DebianImage {
    /// An ext4 file system holding `rootfs.img`, `vmlinuz` and `initrd.img`.
    pub disk: PathBuf,
    /// The guest kernel's package and release (`uname -r`).
    pub kernel_package: String,
    pub kernel_version: String,
    /// `rootfs.img`'s size in bytes (sparse).
    pub rootfs_size: u64,
    /// A fingerprint of what setup puts into the image (packages, files,
    /// masked units): a recipe that changed is built again.
    pub recipe: String,
}

/// Modules of the main host kernel loaded only on demand, decompressed,
/// with what they depend on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExtraModules {
    /// The kernel they were taken from (`uname -r`).
    pub kernel_version: String,
    /// Holds `NAME.ko` for every module of every load order.
    pub modules_dir: PathBuf,
    /// For each of [`HOST_EXTRA_MODULES`], the modules to load for it in
    /// order: what it depends on, then itself.
    pub load_orders: std::collections::BTreeMap<String, Vec<String>>,
}

impl ExtraModules {
    fn files(&self) -> Vec<PathBuf> {
        self.load_order_for(
            &self
                .load_orders
                .keys()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
        .map(|list| list.into_iter().map(|(_, path)| path).collect())
        .unwrap_or_default()
    }

    /// The modules to load for `wanted` (names from [`HOST_EXTRA_MODULES`]),
    /// in order, each once, with its file; an error names a module that was
    /// not cached.
    pub fn load_order_for(&self, wanted: &[&str]) -> Result<Vec<(String, PathBuf)>, LabError> {
        let mut order: Vec<(String, PathBuf)> = Vec::new();
        for name in wanted {
            let list = self.load_orders.get(*name).ok_or_else(|| {
                LabError::Setup(format!(
                    "the lab has no {name} module cached for kernel {}: run `{SETUP_COMMAND}`",
                    self.kernel_version
                ))
            })?;
            for module in list {
                if !order.iter().any(|(m, _)| m == module) {
                    order.push((
                        module.clone(),
                        self.modules_dir.join(format!("{module}.ko")),
                    ));
                }
            }
        }
        Ok(order)
    }
}

/// A kernel the lab host boots: its bzImage and the host modules.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostKernel {
    /// The suite it comes from (`bookworm-backports`, `trixie-backports`),
    /// also when it was given by hand in that one's place.
    pub name: String,
    pub package: String,
    pub version: String,
    pub bzimage: PathBuf,
    pub modules_dir: PathBuf,
    /// Module names in load order (dependencies first); each is
    /// `modules_dir/NAME.ko`, decompressed.
    pub modules: Vec<String>,
    /// Its vfio modules rebuilt with iommufd (`run --iommufd`); for the main
    /// host kernel these are [`LabState::iommufd`]. Absent from a lab set up
    /// before they were built for the second host kernel, until `setup`
    /// runs again.
    #[serde(default)]
    pub iommufd: Option<IommufdModules>,
}

impl HostKernel {
    /// Whether `wanted` names this kernel: its name, its version, or the
    /// start of its version up to a `.`, `+` or `-` (`6.12`, `7.3`,
    /// `7.3.4`; `6.1` is not `6.12`).
    pub fn is_named(&self, wanted: &str) -> bool {
        self.name == wanted
            || self.version == wanted
            || self
                .version
                .strip_prefix(wanted)
                .is_some_and(|rest| rest.starts_with(['.', '+', '-']))
    }

    fn files(&self) -> Vec<PathBuf> {
        let mut files = kernel_files(&self.bzimage, &self.modules_dir, &self.modules);
        if let Some(iommufd) = &self.iommufd {
            files.extend(iommufd.files());
        }
        files
    }
}

/// The host kernel's [`IOMMUFD_MODULES`], built out of tree against its own
/// Debian headers and source (the same upload as its image).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IommufdModules {
    /// The kernel they were built for (`uname -r`); they load into no other.
    pub kernel_version: String,
    /// The Debian version of the headers and source they were built from.
    pub package_version: String,
    /// Holds `NAME.ko` for each of [`IOMMUFD_MODULES`].
    pub modules_dir: PathBuf,
}

impl IommufdModules {
    pub fn files(&self) -> Vec<PathBuf> {
        IOMMUFD_MODULES
            .iter()
            .map(|m| self.modules_dir.join(format!("{m}.ko")))
            .collect()
    }
}

/// A kernel's bzImage and its `modules_dir/NAME.ko` files, for the state check.
fn kernel_files(bzimage: &Path, modules_dir: &Path, modules: &[String]) -> Vec<PathBuf> {
    std::iter::once(bzimage.to_path_buf())
        .chain(modules.iter().map(|m| modules_dir.join(format!("{m}.ko"))))
        .collect()
}

/// Debian's generic kernel of the cloud kernel's version: the cloud kernel
/// has no e1000e driver, and modules of one build do not load into another.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GenericKernel {
    pub package: String,
    pub version: String,
    pub bzimage: PathBuf,
    pub modules_dir: PathBuf,
    /// Module names in load order (dependencies first); each is
    /// `modules_dir/NAME.ko`, decompressed.
    pub modules: Vec<String>,
}

impl GenericKernel {
    fn files(&self) -> Vec<PathBuf> {
        kernel_files(&self.bzimage, &self.modules_dir, &self.modules)
    }
}

/// Reads a lab's state file `file`; `not_set_up` names the set-up command
/// when there is none.
pub(crate) fn read_state<T: serde::de::DeserializeOwned>(
    file: PathBuf,
    not_set_up: impl FnOnce(PathBuf) -> LabError,
) -> Result<T, LabError> {
    if !file.exists() {
        return Err(not_set_up(file));
    }
    let text = std::fs::read_to_string(&file).map_err(|e| LabError::io("cannot read", &file, e))?;
    serde_json::from_str(&text).map_err(|e| LabError::BadState {
        path: file.clone(),
        reason: e.to_string(),
    })
}

/// The `-drive` and `-device` arguments of NVMe controller `name` over
/// `image`, at `placement` (`addr=...`, with `bus=...` where needed).
pub(crate) fn nvme_args(
    image: &Path,
    name: &str,
    placement: &str,
) -> Result<[String; 4], LabError> {
    if !image.is_file() {
        return Err(LabError::Usage(format!(
            "--nvme {}: no such disk image",
            image.display()
        )));
    }
    Ok([
        "-drive".into(),
        format!("file={},if=none,id=drv-{name},format=raw", image.display()),
        "-device".into(),
        format!("nvme,serial=barge-{name},drive=drv-{name},{placement}"),
    ])
}

impl LabState {
    /// Loads the state and checks that every file it names is still there.
    pub fn load(paths: &LabPaths) -> Result<Self, LabError> {
        let state: LabState = read_state(paths.state_file(), LabError::NotSetUp)?;
        state.check()?;
        Ok(state)
    }

    pub fn check(&self) -> Result<(), LabError> {
        let mut needed = vec![
            self.bzimage.clone(),
            self.qemu.clone(),
            self.busybox.clone(),
        ];
        needed.extend(
            HOST_MODULES
                .iter()
                .map(|m| self.modules_dir.join(format!("{m}.ko"))),
        );
        if let Some(generic) = &self.generic {
            needed.extend(generic.files());
        }
        for host in &self.more_host_kernels {
            needed.extend(host.files());
        }
        if let Some(iommufd) = &self.iommufd {
            needed.extend(iommufd.files());
        }
        if let Some(debian) = &self.debian {
            needed.push(debian.disk.clone());
        }
        if let Some(extra) = &self.extra_modules {
            needed.extend(extra.files());
        }
        match needed.into_iter().find(|p| !p.exists()) {
            Some(missing) => Err(LabError::NotSetUp(missing)),
            None => Ok(()),
        }
    }

    /// The main host kernel (also the guests' kernel) and the others.
    pub fn host_kernels(&self) -> Vec<HostKernel> {
        let main = HostKernel {
            name: MAIN_HOST_KERNEL.into(),
            package: self.kernel_package.clone(),
            version: self.kernel_version.clone(),
            bzimage: self.bzimage.clone(),
            modules_dir: self.modules_dir.clone(),
            modules: HOST_MODULES.iter().map(|m| m.to_string()).collect(),
            iommufd: self.iommufd.clone(),
        };
        std::iter::once(main)
            .chain(self.more_host_kernels.iter().cloned())
            .collect()
    }

    /// The host kernel `wanted` names (see [`HostKernel::is_named`]), or the
    /// main one.
    pub fn host_kernel(&self, wanted: Option<&str>) -> Result<HostKernel, LabError> {
        let kernels = self.host_kernels();
        let Some(wanted) = wanted else {
            return Ok(kernels[0].clone());
        };
        kernels
            .iter()
            .find(|k| k.is_named(wanted))
            .cloned()
            .ok_or_else(|| LabError::HostKernelNotCached {
                wanted: wanted.to_string(),
                cached: kernels
                    .iter()
                    .map(|k| format!("{} ({})", k.version, k.name))
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Puts `kernel` in place of the other host kernel of its name.
    pub fn set_host_kernel(&mut self, kernel: HostKernel) {
        self.more_host_kernels.retain(|k| k.name != kernel.name);
        self.more_host_kernels.push(kernel);
    }

    /// The modules the lab host loads when it boots `host`, in order, each
    /// with its file: `host`'s stock ones, or with `iommufd` the rebuilt
    /// [`IOMMUFD_MODULES`] in place of the stock vfio ones (an error says how
    /// to get them when `setup` has not built them for that kernel).
    pub fn host_modules(
        &self,
        host: &HostKernel,
        iommufd: bool,
    ) -> Result<Vec<(String, PathBuf)>, LabError> {
        let stock = |m: &str| (m.to_string(), host.modules_dir.join(format!("{m}.ko")));
        if !iommufd {
            return Ok(host.modules.iter().map(|m| stock(m)).collect());
        }
        let rebuilt = match &host.iommufd {
            Some(rebuilt) if rebuilt.kernel_version == host.version => rebuilt,
            Some(rebuilt) => {
                return Err(LabError::Setup(format!(
                    "the iommufd modules in {} were built for kernel {}, not the host kernel {}: \
                     run `{SETUP_COMMAND}` again (it rebuilds them after a kernel update)",
                    rebuilt.modules_dir.display(),
                    rebuilt.kernel_version,
                    host.version
                )))
            }
            None => {
                return Err(LabError::Setup(format!(
                    "the lab has no iommufd modules for kernel {}: run `{SETUP_COMMAND}` \
                     (as root with apt: it builds them from Debian's headers and source of \
                     that kernel; a kernel given by hand gets none)",
                    host.version
                )))
            }
        };
        let mut modules: Vec<(String, PathBuf)> = host
            .modules
            .iter()
            .filter(|m| !IOMMUFD_MODULES.contains(&m.as_str()))
            .map(|m| stock(m))
            .collect();
        modules.extend(
            IOMMUFD_MODULES
                .iter()
                .map(|m| (m.to_string(), rebuilt.modules_dir.join(format!("{m}.ko")))),
        );
        Ok(modules)
    }

    pub fn save(&self, paths: &LabPaths) -> Result<(), LabError> {
        let file = paths.state_file();
        let text = serde_json::to_string_pretty(self).expect("LabState serializes");
        std::fs::write(&file, text + "\n").map_err(|e| LabError::io("cannot write", &file, e))
    }
}

/// Runs a command to completion and returns its stdout, or an error that
/// quotes the command and its stderr.
pub fn command_output(program: &str, args: &[&str]) -> Result<String, LabError> {
    let rendered = std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let output = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|e| LabError::Command {
            command: rendered.clone(),
            detail: e.to_string(),
        })?;
    if !output.status.success() {
        return Err(LabError::Command {
            command: rendered,
            detail: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Parses sizes such as `8G`, `512M`, `2097152`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("bad size `{text}`: use a number with K, M, G or T")),
            };
            (&text[..i], shift)
        }
        _ => (text, 0),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("bad size `{text}`: use a number with K, M, G or T"))?;
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size `{text}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert_eq!(parse_size("2m"), Ok(2 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("8X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn missing_state_names_the_setup_command() {
        let paths = LabPaths {
            root: PathBuf::from("/nonexistent/barge-lab"),
        };
        let err = LabState::load(&paths).unwrap_err().to_string();
        assert!(err.contains(SETUP_COMMAND), "{err}");
    }

    #[test]
    fn state_from_before_the_generic_kernel_still_loads() {
        let text = r#"{"kernel_package": "linux-image-6.12.95+deb12-cloud-amd64",
            "kernel_version": "6.12.95+deb12-cloud-amd64", "bzimage": "/l/bzImage",
            "modules_dir": "/l/modules", "qemu": "/usr/bin/qemu-system-x86_64",
            "qemu_version": "10.0.2", "busybox": "/bin/busybox"}"#;
        let state: LabState = serde_json::from_str(text).unwrap();
        assert_eq!(state.generic, None);
        assert_eq!(state.iommufd, None);
        let main = state.host_kernel(None).unwrap();
        let err = state.host_modules(&main, true).unwrap_err().to_string();
        assert!(err.contains(SETUP_COMMAND), "{err}");
    }

    #[test]
    fn iommufd_modules_replace_the_stock_vfio_ones_after_kvm() {
        let text = r#"{"kernel_package": "linux-image-6.12.95+deb12-cloud-amd64",
            "kernel_version": "6.12.95+deb12-cloud-amd64", "bzimage": "/l/bzImage",
            "modules_dir": "/l/modules", "qemu": "/usr/bin/qemu-system-x86_64",
            "qemu_version": "10.0.2", "busybox": "/bin/busybox",
            "iommufd": {"kernel_version": "6.12.95+deb12-cloud-amd64",
                "package_version": "6.12.95-1~bpo12+1", "modules_dir": "/l/iommufd"}}"#;
        let mut state: LabState = serde_json::from_str(text).unwrap();
        let main = state.host_kernel(None).unwrap();
        let stock: Vec<String> = state
            .host_modules(&main, false)
            .unwrap()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(stock, HOST_MODULES);
        let modules = state.host_modules(&main, true).unwrap();
        let names: Vec<&str> = modules.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(
            names,
            [
                "irqbypass",
                "kvm",
                "kvm-amd",
                "iommufd",
                "vfio",
                "vfio_iommu_type1",
                "vfio-pci-core",
                "vfio-pci"
            ]
        );
        assert_eq!(modules[2].1, PathBuf::from("/l/modules/kvm-amd.ko"));
        assert_eq!(modules[3].1, PathBuf::from("/l/iommufd/iommufd.ko"));
        assert_eq!(modules[7].1, PathBuf::from("/l/iommufd/vfio-pci.ko"));
        state.kernel_version = "7.3.0+deb13-cloud-amd64".into();
        let main = state.host_kernel(None).unwrap();
        let err = state.host_modules(&main, true).unwrap_err().to_string();
        assert!(err.contains("rebuild"), "{err}");
    }

    #[test]
    fn generic_kernel_files_are_checked() {
        let generic = GenericKernel {
            package: "linux-image-6.12.95+deb12-amd64".into(),
            version: "6.12.95+deb12-amd64".into(),
            bzimage: PathBuf::from("/g/bzImage"),
            modules_dir: PathBuf::from("/g/modules"),
            modules: vec!["e1000e".into()],
        };
        assert_eq!(
            generic.files(),
            vec![
                PathBuf::from("/g/bzImage"),
                PathBuf::from("/g/modules/e1000e.ko")
            ]
        );
    }

    fn state_with_trixie() -> LabState {
        let text = r#"{"kernel_package": "linux-image-6.12.95+deb12-cloud-amd64",
            "kernel_version": "6.12.95+deb12-cloud-amd64", "bzimage": "/l/bzImage",
            "modules_dir": "/l/modules", "qemu": "/usr/bin/qemu-system-x86_64",
            "qemu_version": "10.0.2", "busybox": "/bin/busybox"}"#;
        let mut state: LabState = serde_json::from_str(text).unwrap();
        assert!(state.more_host_kernels.is_empty());
        state.set_host_kernel(HostKernel {
            name: TRIXIE_HOST_KERNEL.into(),
            package: "linux-image-7.3.4+deb13-cloud-amd64".into(),
            version: "7.3.4+deb13-cloud-amd64".into(),
            bzimage: PathBuf::from("/l/trixie-backports/bzImage"),
            modules_dir: PathBuf::from("/l/trixie-backports/modules"),
            modules: vec!["irqbypass".into(), "kvm".into()],
            iommufd: None,
        });
        state
    }

    #[test]
    fn each_host_kernel_loads_the_iommufd_modules_built_for_it() {
        let mut state = state_with_trixie();
        state.iommufd = Some(IommufdModules {
            kernel_version: "6.12.95+deb12-cloud-amd64".into(),
            package_version: "6.12.95-1~bpo12+1".into(),
            modules_dir: PathBuf::from("/l/iommufd/6.12"),
        });
        let trixie = state.host_kernel(Some("7.3")).unwrap();
        let err = state.host_modules(&trixie, true).unwrap_err().to_string();
        assert!(err.contains("no iommufd modules for kernel 7.3.4"), "{err}");
        state.more_host_kernels[0].iommufd = Some(IommufdModules {
            kernel_version: "7.3.4+deb13-cloud-amd64".into(),
            package_version: "7.3.4-1~bpo13+1".into(),
            modules_dir: PathBuf::from("/l/iommufd/7.3"),
        });
        let trixie = state.host_kernel(Some("7.3")).unwrap();
        let modules = state.host_modules(&trixie, true).unwrap();
        assert_eq!(
            modules[0].1,
            PathBuf::from("/l/trixie-backports/modules/irqbypass.ko")
        );
        assert_eq!(modules[2].1, PathBuf::from("/l/iommufd/7.3/iommufd.ko"));
        assert_eq!(
            modules.last().unwrap().1,
            PathBuf::from("/l/iommufd/7.3/vfio-pci.ko")
        );
        assert!(trixie
            .files()
            .contains(&PathBuf::from("/l/iommufd/7.3/vfio.ko")));
        let main = state.host_kernel(None).unwrap();
        let modules = state.host_modules(&main, true).unwrap();
        assert!(modules.contains(&("vfio".into(), PathBuf::from("/l/iommufd/6.12/vfio.ko"))));
        // Built for another 7.3 upload: set up again.
        state.more_host_kernels[0].version = "7.3.5+deb13-cloud-amd64".into();
        let trixie = state.host_kernel(Some("7.3")).unwrap();
        let err = state.host_modules(&trixie, true).unwrap_err().to_string();
        assert!(err.contains("not the host kernel 7.3.5"), "{err}");
    }

    #[test]
    fn host_kernels_are_picked_by_version_or_name() {
        let state = state_with_trixie();
        let version = |wanted: Option<&str>| state.host_kernel(wanted).map(|k| k.version);
        assert_eq!(version(None).unwrap(), "6.12.95+deb12-cloud-amd64");
        assert_eq!(version(Some("6.12")).unwrap(), "6.12.95+deb12-cloud-amd64");
        assert_eq!(
            version(Some(MAIN_HOST_KERNEL)).unwrap(),
            "6.12.95+deb12-cloud-amd64"
        );
        assert_eq!(version(Some("7.3")).unwrap(), "7.3.4+deb13-cloud-amd64");
        assert_eq!(version(Some("7.3.4")).unwrap(), "7.3.4+deb13-cloud-amd64");
        assert_eq!(
            version(Some(TRIXIE_HOST_KERNEL)).unwrap(),
            "7.3.4+deb13-cloud-amd64"
        );
        // A prefix ends where a version part does: 6.1 is not 6.12.
        let err = version(Some("6.1")).unwrap_err().to_string();
        assert!(err.contains("not set up with host kernel 6.1"), "{err}");
        assert!(
            err.contains("7.3.4+deb13-cloud-amd64 (trixie-backports)"),
            "{err}"
        );
        assert!(err.contains(SETUP_COMMAND), "{err}");
    }

    #[test]
    fn a_second_host_kernel_replaces_the_one_of_its_name_and_is_checked() {
        let mut state = state_with_trixie();
        let mut newer = state.more_host_kernels[0].clone();
        newer.version = "7.4.1+deb13-cloud-amd64".into();
        state.set_host_kernel(newer);
        assert_eq!(state.more_host_kernels.len(), 1);
        assert_eq!(
            state.more_host_kernels[0].version,
            "7.4.1+deb13-cloud-amd64"
        );
        assert_eq!(
            state.more_host_kernels[0].files(),
            vec![
                PathBuf::from("/l/trixie-backports/bzImage"),
                PathBuf::from("/l/trixie-backports/modules/irqbypass.ko"),
                PathBuf::from("/l/trixie-backports/modules/kvm.ko"),
            ]
        );
    }
}
