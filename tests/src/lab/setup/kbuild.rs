//! Making a newer Debian release's kernel build tools work on this older
//! system, for the out-of-tree iommufd build ([`super::iommufd`]).
//!
//! Debian 12's own kernels (6.12 from bookworm-backports) need nothing of
//! this: their `linux-kbuild` runs here and their headers name `gcc-12`.
//! trixie-backports' 7.3 kernel differs (measured with 7.3.4-1~bpo13+1):
//!
//! - its `linux-kbuild-7.3.4+deb13` was linked against trixie's glibc:
//!   `modpost` and `objtool` do not start on Debian 12's glibc 2.36
//!   ("version `GLIBC_2.38' not found": the C23 `__isoc23_strtoul` family),
//!   `fixdep` does. [`rebuild_host_programs`] rebuilds each one that does
//!   not start from the kernel's own source with this system's gcc, in the
//!   unpacked kbuild (nothing is installed): fixdep from
//!   `scripts/basic/fixdep.c`; modpost from `scripts/mod` (its
//!   `elfconfig.h` and `devicetable-offsets.h` generated as Kbuild does,
//!   the latter's assembly compiled through the headers' own Kbuild);
//!   objtool with `make -C tools/objtool`, which needs libelf-dev.
//! - its headers depend on `gcc-14-for-host`; Debian 12 has no gcc 14.
//!   [`choose_compiler`] then builds with this system's gcc (`CC=gcc-12`
//!   on the make line; Debian's headers already skip Kbuild's compiler
//!   version check) and [`older_gcc_make_args`] turns off, on the make
//!   line, the options of the kernel's configuration that Kbuild turns into
//!   flags only a newer gcc knows: `CONFIG_CC_HAS_MIN_FUNCTION_ALIGNMENT`
//!   (gcc 14's `-fmin-function-alignment=16` becomes `-falign-functions=16`,
//!   the same alignment). The C code's few gcc-13+ options
//!   (`CONFIG_CC_HAS_ASSUME`) are not used by iommufd or vfio: the 7.3.4
//!   build is free of warnings with gcc-12.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::lab::{command_output, LabError};

/// Options of a kernel configuration that Kbuild's Makefiles turn into
/// compiler flags only gcc of at least this major version knows.
const NEWER_GCC_OPTIONS: &[(&str, u32)] = &[("CONFIG_CC_HAS_MIN_FUNCTION_ALIGNMENT", 14)];

/// The compiler the module build uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Compiler {
    /// The Debian package that provides it (installed when missing).
    pub(super) package: String,
    /// `CC=...` when it is not the one the kernel's headers name.
    pub(super) cc: Option<String>,
}

/// The kernel's compiler package (`gcc-12`; `gcc-14-for-host` names
/// `gcc-14`) when it is installed or apt can install it, else this
/// system's gcc (`gcc`, used as `gcc-MAJOR`).
pub(super) fn choose_compiler(kernel_compiler: &str) -> Compiler {
    let wanted = kernel_compiler
        .strip_suffix("-for-host")
        .unwrap_or(kernel_compiler);
    if dpkg_installed(wanted) || apt_has(wanted) {
        return Compiler {
            package: wanted.to_string(),
            cc: None,
        };
    }
    let cc = host_gcc_major()
        .map(|major| format!("gcc-{major}"))
        .filter(|cc| on_path(cc))
        .unwrap_or_else(|| "gcc".to_string());
    eprintln!(
        "barge-lab: iommufd: the kernel was built with {wanted}, which apt cannot install \
         here: building with this system's {cc}"
    );
    Compiler {
        package: "gcc".to_string(),
        cc: Some(cc),
    }
}

/// `OPTION=` for each option of `config` that needs a newer gcc than
/// `gcc_major` ([`NEWER_GCC_OPTIONS`]).
pub(super) fn older_gcc_make_args(config: &str, gcc_major: u32) -> Vec<String> {
    NEWER_GCC_OPTIONS
        .iter()
        .filter(|(option, needs)| {
            gcc_major < *needs && super::iommufd::config_enabled(config, option)
        })
        .map(|(option, _)| format!("{option}="))
        .collect()
}

/// The major version of `cc` (`gcc-12`, `gcc`).
pub(super) fn gcc_major(cc: &str) -> Option<u32> {
    command_output(cc, &["-dumpversion"])
        .ok()?
        .trim()
        .split('.')
        .next()?
        .parse()
        .ok()
}

fn host_gcc_major() -> Option<u32> {
    gcc_major("gcc")
}

fn on_path(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn apt_has(package: &str) -> bool {
    command_output("apt-cache", &["show", "--no-all-versions", package])
        .is_ok_and(|text| text.contains("Package:"))
}

pub(super) fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", package])
        .output()
        .map(|o| o.status.success() && o.stdout == b"installed")
        .unwrap_or(false)
}

/// The kbuild host programs the module build runs, relative to the
/// headers (whose `scripts` and `tools` lead into the unpacked kbuild).
const HOST_PROGRAMS: &[&str] = &[
    "scripts/basic/fixdep",
    "scripts/mod/modpost",
    "tools/objtool/objtool",
];

/// Whether `ldd` finds everything `binary` needs here: a missing library
/// or symbol version ("version `GLIBC_2.38' not found") means it cannot
/// start.
fn starts_here(binary: &Path) -> bool {
    Command::new("ldd")
        .arg(binary)
        .output()
        .map(|o| {
            let all = [o.stdout, o.stderr].concat();
            o.status.success() && !String::from_utf8_lossy(&all).contains("not found")
        })
        .unwrap_or(false)
}

/// The files behind a kbuild program: the program and the `.real-*`
/// binaries Debian's multi-target wrappers (modpost, objtool) start for
/// an x86-64 target.
fn program_binaries(program: &Path) -> Vec<PathBuf> {
    let name = program
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    std::iter::once(program.to_path_buf())
        .chain(
            ["real-lsb-64", "real-x86"]
                .iter()
                .map(|suffix| program.with_file_name(format!("{name}.{suffix}"))),
        )
        .filter(|p| p.exists())
        .collect()
}

/// The [`HOST_PROGRAMS`] of `headers` that do not start here.
pub(super) fn broken_host_programs(headers: &Path) -> Vec<&'static str> {
    HOST_PROGRAMS
        .iter()
        .copied()
        .filter(|program| {
            let binaries = program_binaries(&headers.join(program));
            binaries.is_empty() || !binaries.iter().all(|b| starts_here(b))
        })
        .collect()
}

/// Rebuilds `programs` (from [`broken_host_programs`]) from the kernel
/// `source` with `cc` in `work`, and puts each in the place of the
/// headers' one. `make` is a `make -C HEADERS` command set up as the module
/// build's (its compiler and options), for modpost's generated headers.
pub(super) fn rebuild_host_programs(
    programs: &[&str],
    headers: &Path,
    source: &Path,
    work: &Path,
    make: &dyn Fn() -> Command,
) -> Result<(), LabError> {
    let started = Instant::now();
    std::fs::create_dir_all(work).map_err(|e| LabError::io("cannot create", work, e))?;
    for program in programs {
        let built = match *program {
            "scripts/basic/fixdep" => rebuild_fixdep(source, work)?,
            "scripts/mod/modpost" => rebuild_modpost(source, work, make)?,
            "tools/objtool/objtool" => rebuild_objtool(source, work)?,
            other => {
                return Err(LabError::Setup(format!(
                    "no recipe to rebuild kbuild's {other}"
                )))
            }
        };
        let target = headers.join(program);
        let _ = std::fs::remove_file(&target);
        std::fs::copy(&built, &target).map_err(|e| LabError::io("cannot copy", &built, e))?;
    }
    eprintln!(
        "barge-lab: iommufd: rebuilt kbuild's {} from the kernel source with this system's \
         gcc (the packaged ones do not start here) in {:.1} s",
        programs.join(", "),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn rebuild_fixdep(source: &Path, work: &Path) -> Result<PathBuf, LabError> {
    let out = work.join("fixdep");
    host_cc(&[
        "-O2",
        "-o",
        &out.to_string_lossy(),
        &source.join("scripts/basic/fixdep.c").to_string_lossy(),
    ])?;
    Ok(out)
}

/// modpost as `scripts/mod/Makefile` builds it: `elfconfig.h` from
/// `mk_elfconfig < empty.o`, `devicetable-offsets.h` from the kernel's
/// struct offsets (the assembly of `devicetable-offsets.c`, compiled
/// through the headers' Kbuild), then the four sources.
fn rebuild_modpost(
    source: &Path,
    work: &Path,
    make: &dyn Fn() -> Command,
) -> Result<PathBuf, LabError> {
    let dir = work.join("mod");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| LabError::io("cannot create", &dir, e))?;
    let mod_src = source.join("scripts/mod");
    for file in [
        "empty.c",
        "devicetable-offsets.c",
        "mk_elfconfig.c",
        "modpost.c",
        "modpost.h",
        "file2alias.c",
        "sumversion.c",
        "symsearch.c",
    ] {
        let from = mod_src.join(file);
        std::fs::copy(&from, dir.join(file)).map_err(|e| LabError::io("cannot copy", &from, e))?;
    }
    let kbuild = dir.join("Kbuild");
    std::fs::write(&kbuild, "always-y := empty.o devicetable-offsets.s\n")
        .map_err(|e| LabError::io("cannot write", &kbuild, e))?;
    let mut command = make();
    command
        .arg(format!("M={}", dir.display()))
        .args(["empty.o", "devicetable-offsets.s"]);
    run(
        command,
        "make M=... empty.o devicetable-offsets.s (for modpost)",
    )?;

    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    host_cc(&["-O2", "-o", &path("mk_elfconfig"), &path("mk_elfconfig.c")])?;
    let empty = std::fs::File::open(dir.join("empty.o"))
        .map_err(|e| LabError::io("cannot open", &dir.join("empty.o"), e))?;
    let elfconfig = std::fs::File::create(dir.join("elfconfig.h"))
        .map_err(|e| LabError::io("cannot create", &dir.join("elfconfig.h"), e))?;
    let mut command = Command::new(dir.join("mk_elfconfig"));
    command.stdin(empty).stdout(elfconfig);
    run(command, "mk_elfconfig < empty.o > elfconfig.h")?;
    let assembly = std::fs::read_to_string(dir.join("devicetable-offsets.s"))
        .map_err(|e| LabError::io("cannot read", &dir.join("devicetable-offsets.s"), e))?;
    let offsets = offsets_header(&assembly, "__DEVICETABLE_OFFSETS_H__");
    std::fs::write(dir.join("devicetable-offsets.h"), offsets)
        .map_err(|e| LabError::io("cannot write", &dir.join("devicetable-offsets.h"), e))?;
    let include = source
        .join("scripts/include")
        .to_string_lossy()
        .into_owned();
    host_cc(&[
        "-O2",
        "-I",
        &include,
        "-I",
        &dir.to_string_lossy(),
        "-o",
        &path("modpost"),
        &path("modpost.c"),
        &path("file2alias.c"),
        &path("sumversion.c"),
        &path("symsearch.c"),
    ])?;
    Ok(dir.join("modpost"))
}

/// What Kbuild's `filechk_offsets` makes of an offsets assembly file: each
/// `.ascii "->NAME $VALUE COMMENT"` becomes `#define NAME VALUE /* COMMENT */`
/// (and `->#TEXT` a comment), inside an include guard.
fn offsets_header(assembly: &str, guard: &str) -> String {
    let mut out = format!(
        "#ifndef {guard}\n#define {guard}\n/*\n * DO NOT MODIFY.\n *\n * This file was \
         generated by barge-lab setup as Kbuild would\n */\n\n"
    );
    for line in assembly.lines() {
        let Some(rest) = line.trim_start().strip_prefix(".ascii") else {
            continue;
        };
        let Some(text) = rest
            .trim_start()
            .strip_prefix('"')
            .and_then(|t| t.split('"').next())
        else {
            continue;
        };
        let Some(entry) = text.strip_prefix("->") else {
            continue;
        };
        if let Some(comment) = entry.strip_prefix('#') {
            out.push_str(&format!("/* {comment} */\n"));
            continue;
        }
        let mut words = entry.splitn(3, ' ');
        let (Some(name), Some(value)) = (words.next(), words.next()) else {
            out.push('\n');
            continue;
        };
        let value = value.trim_start_matches(['$', '#']);
        match words.next() {
            Some(comment) => out.push_str(&format!("#define {name} {value} /* {comment} */\n")),
            None => out.push_str(&format!("#define {name} {value}\n")),
        }
    }
    out.push_str("\n#endif\n");
    out
}

fn rebuild_objtool(source: &Path, work: &Path) -> Result<PathBuf, LabError> {
    let out = work.join("objtool");
    std::fs::create_dir_all(&out).map_err(|e| LabError::io("cannot create", &out, e))?;
    let log = work.join("objtool.log");
    let log_file =
        std::fs::File::create(&log).map_err(|e| LabError::io("cannot create", &log, e))?;
    let log_err = log_file
        .try_clone()
        .map_err(|e| LabError::io("cannot open", &log, e))?;
    let jobs = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mut command = Command::new("make");
    command
        .arg("-C")
        .arg(source.join("tools/objtool"))
        .arg(format!("O={}", out.display()))
        .arg(format!("-j{jobs}"))
        .args(["CC=gcc", "HOSTCC=gcc"])
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS")
        .env_remove("MAKELEVEL")
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err);
    run(command, "make -C tools/objtool").map_err(|e| {
        LabError::Setup(format!(
            "{e}; see {} (objtool needs libelf-dev and zlib1g-dev)",
            log.display()
        ))
    })?;
    Ok(out.join("objtool"))
}

fn host_cc(args: &[&str]) -> Result<(), LabError> {
    command_output("gcc", args).map(|_| ())
}

fn run(mut command: Command, what: &str) -> Result<(), LabError> {
    let output = command.output().map_err(|e| LabError::Command {
        command: what.to_string(),
        detail: e.to_string(),
    })?;
    if !output.status.success() {
        return Err(LabError::Command {
            command: what.to_string(),
            detail: format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_assembly_becomes_defines() {
        let assembly = "\t.text\n\
            # 0 \"\" 2\n\
            \t.ascii \"->SIZE_usb_device_id $32 sizeof(struct usb_device_id)\"\t#\n\
            \t.ascii \"->OFF_usb_device_id_idVendor $2 offsetof(struct usb_device_id, idVendor)\"\n\
            \t.ascii \"->\"\n\
            \t.ascii \"->#a comment\"\n\
            \tmovl $1, %eax\n";
        let header = offsets_header(assembly, "__X_H__");
        assert!(
            header.starts_with("#ifndef __X_H__\n#define __X_H__\n"),
            "{header}"
        );
        assert!(
            header.contains("#define SIZE_usb_device_id 32 /* sizeof(struct usb_device_id) */\n")
        );
        assert!(header.contains(
            "#define OFF_usb_device_id_idVendor 2 /* offsetof(struct usb_device_id, idVendor) */\n"
        ));
        assert!(header.contains("/* a comment */\n"), "{header}");
        assert!(!header.contains("movl"), "{header}");
        assert!(header.ends_with("\n#endif\n"));
    }

    #[test]
    fn options_needing_a_newer_gcc_are_turned_off_for_an_older_one() {
        let config = "CONFIG_CC_HAS_MIN_FUNCTION_ALIGNMENT=y\nCONFIG_CC_HAS_IBT=y\n";
        assert_eq!(
            older_gcc_make_args(config, 12),
            vec!["CONFIG_CC_HAS_MIN_FUNCTION_ALIGNMENT=".to_string()]
        );
        assert!(older_gcc_make_args(config, 14).is_empty());
        assert!(older_gcc_make_args("CONFIG_CC_HAS_IBT=y\n", 12).is_empty());
    }

    #[test]
    fn wrapped_programs_are_checked_with_their_real_binaries() {
        let dir = std::env::temp_dir().join(format!("barge-kbuild-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let modpost = dir.join("modpost");
        for name in ["modpost", "modpost.real-lsb-64", "modpost.real-msb-32"] {
            std::fs::write(dir.join(name), b"").unwrap();
        }
        assert_eq!(
            program_binaries(&modpost),
            vec![modpost.clone(), dir.join("modpost.real-lsb-64")]
        );
        assert!(program_binaries(&dir.join("objtool")).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_program_of_this_system_starts_here() {
        assert!(starts_here(Path::new("/bin/sh")));
        assert!(!starts_here(Path::new("/no/such/program")));
    }
}
