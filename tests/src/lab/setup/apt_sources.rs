//! The apt sources setup needs, each from the Debian mirror the machine's
//! own `sources.list` or `sources.list.d` names (in a one-line or a deb822
//! entry, with that entry's Signed-By key), so no mirror address lives in
//! this repository:
//!
//! - bookworm-backports (QEMU, SeaBIOS, the 6.12 kernels), added to the
//!   machine's sources as a deb822 file unless some source already carries
//!   it;
//! - trixie-backports (the second host kernel), in a private apt
//!   configuration under the lab cache: its packages are only downloaded and
//!   unpacked, never installed, so the machine's sources stay without it
//!   and no trixie package can be installed on this bookworm machine by
//!   accident. It needs apt-get but not root.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::lab::{command_output, LabError, TRIXIE_HOST_KERNEL};

pub(super) const BACKPORTS_SUITE: &str = "bookworm-backports";
pub(super) const TRIXIE_BACKPORTS_SUITE: &str = TRIXIE_HOST_KERNEL;
const BACKPORTS_SOURCE_FILE: &str = "/etc/apt/sources.list.d/barge-lab-backports.sources";

/// How apt is asked about one suite's packages: with the machine's own
/// configuration, or with a private one (its own sources, package lists and
/// cache) given as `-o` options.
pub(super) struct AptSuite {
    pub(super) suite: &'static str,
    /// What marks the suite's package versions (`6.12.95-1~bpo12+1`).
    pub(super) version_tag: &'static str,
    /// `-o NAME=VALUE` pairs for a private configuration; none for the
    /// machine's own.
    options: Vec<String>,
}

impl AptSuite {
    /// bookworm-backports through the machine's own apt configuration
    /// (added to it first when missing).
    pub(super) fn bookworm_backports() -> Result<Self, LabError> {
        ensure_backports_source()?;
        Ok(AptSuite {
            suite: BACKPORTS_SUITE,
            version_tag: "bpo12",
            options: Vec::new(),
        })
    }

    /// trixie-backports from the machine's Debian mirror in a private apt
    /// configuration under `dir`, with its package lists fetched anew.
    pub(super) fn trixie_backports(dir: &Path) -> Result<Self, LabError> {
        let (uri, signed_by) = machine_mirror()?;
        let parts = dir.join("sources.list.d");
        let lists = dir.join("lists");
        let cache = dir.join("cache");
        for folder in [
            parts.clone(),
            lists.join("partial"),
            cache.join("archives").join("partial"),
        ] {
            std::fs::create_dir_all(&folder)
                .map_err(|e| LabError::io("cannot create", &folder, e))?;
        }
        let list = dir.join(format!("{TRIXIE_BACKPORTS_SUITE}.sources"));
        std::fs::write(
            &list,
            suite_stanza(TRIXIE_BACKPORTS_SUITE, &uri, signed_by.as_deref()),
        )
        .map_err(|e| LabError::io("cannot write", &list, e))?;
        let suite = AptSuite {
            suite: TRIXIE_BACKPORTS_SUITE,
            version_tag: "bpo13",
            options: private_options(&list, &parts, &lists, &cache),
        };
        eprintln!(
            "barge-lab: {TRIXIE_BACKPORTS_SUITE} from {uri}, in a private apt configuration \
             under {} (the machine's apt sources stay as they are)",
            dir.display()
        );
        suite.output("apt-get", &["update", "-q"])?;
        Ok(suite)
    }

    /// bookworm and bookworm-backports for arm64 (the arm64 lab's kernel
    /// and busybox) from the machine's Debian mirror, in a private apt
    /// configuration under `dir` that knows arm64 alone: the machine's
    /// dpkg gets no foreign architecture, and nothing is installed from it.
    /// Its package lists are fetched anew.
    pub(super) fn arm64(dir: &Path) -> Result<Self, LabError> {
        let (uri, signed_by) = machine_mirror()?;
        let (list, mut options) = private_configuration(
            dir,
            ARM64_SOURCES_NAME,
            &suite_stanza(ARM64_SUITES, &uri, signed_by.as_deref()),
        )?;
        options.extend(ARM64_ARCHITECTURE.iter().map(|o| o.to_string()));
        let suite = AptSuite {
            suite: BACKPORTS_SUITE,
            version_tag: "bpo12",
            options,
        };
        eprintln!(
            "barge-lab: {ARM64_SUITES} for arm64 from {uri}, in a private apt configuration \
             {} (the machine's apt sources and architectures stay as they are)",
            list.display()
        );
        suite.output("apt-get", &["update", "-q"])?;
        Ok(suite)
    }

    /// `tool` (apt-get, apt-cache) with this suite's configuration.
    pub(super) fn command(&self, tool: &str) -> Command {
        let mut command = Command::new(tool);
        command.args(self.option_args());
        command
    }

    /// Runs `tool ARGS` with this suite's configuration; its stdout.
    pub(super) fn output(&self, tool: &str, args: &[&str]) -> Result<String, LabError> {
        let options = self.option_args();
        let mut all: Vec<&str> = options.iter().map(String::as_str).collect();
        all.extend(args);
        command_output(tool, &all)
    }

    fn option_args(&self) -> Vec<String> {
        self.options
            .iter()
            .flat_map(|o| ["-o".to_string(), o.clone()])
            .collect()
    }
}

/// The suites the arm64 lab's packages come from: the kernel from
/// backports, busybox-static from bookworm.
const ARM64_SUITES: &str = "bookworm bookworm-backports";
const ARM64_SOURCES_NAME: &str = "bookworm-arm64.sources";
/// apt options for a configuration that sees arm64 packages only.
const ARM64_ARCHITECTURE: &[&str] = &["APT::Architecture=arm64", "APT::Architectures=arm64"];

/// Makes a private apt configuration under `dir` whose only source is
/// `sources` (written as `dir/name`); the file and apt's options for it.
fn private_configuration(
    dir: &Path,
    name: &str,
    sources: &str,
) -> Result<(PathBuf, Vec<String>), LabError> {
    let parts = dir.join("sources.list.d");
    let lists = dir.join("lists");
    let cache = dir.join("cache");
    for folder in [
        parts.clone(),
        lists.join("partial"),
        cache.join("archives").join("partial"),
    ] {
        std::fs::create_dir_all(&folder).map_err(|e| LabError::io("cannot create", &folder, e))?;
    }
    let list = dir.join(name);
    std::fs::write(&list, sources).map_err(|e| LabError::io("cannot write", &list, e))?;
    let options = private_options(&list, &parts, &lists, &cache);
    Ok((list, options))
}

/// The options that make apt read only `list` (and the empty folder
/// `parts`) and keep its package lists and cache in folders of its own.
fn private_options(list: &Path, parts: &Path, lists: &Path, cache: &Path) -> Vec<String> {
    vec![
        format!("Dir::Etc::SourceList={}", list.display()),
        format!("Dir::Etc::SourceParts={}", parts.display()),
        format!("Dir::State::Lists={}", lists.display()),
        format!("Dir::Cache={}", cache.display()),
    ]
}

/// Adds bookworm-backports from the mirror the machine's own apt
/// configuration names, unless some source already carries it.
pub(super) fn ensure_backports_source() -> Result<(), LabError> {
    let sources = read_apt_sources();
    if sources
        .iter()
        .any(|(_, text)| mentions_suite(text, BACKPORTS_SUITE))
    {
        return Ok(());
    }
    let (uri, signed_by) = mirror_of(&sources)?;
    let text = suite_stanza(BACKPORTS_SUITE, &uri, signed_by.as_deref());
    eprintln!("barge-lab: adding {BACKPORTS_SUITE} from {uri} as {BACKPORTS_SOURCE_FILE}");
    std::fs::write(BACKPORTS_SOURCE_FILE, text)
        .map_err(|e| LabError::io("cannot write", Path::new(BACKPORTS_SOURCE_FILE), e))?;
    command_output("apt-get", &["update", "-q"]).map(|_| ())
}

/// The URI and Signed-By key of the machine's Debian bookworm source.
pub(super) fn machine_mirror() -> Result<(String, Option<String>), LabError> {
    mirror_of(&read_apt_sources())
}

fn mirror_of(sources: &[(PathBuf, String)]) -> Result<(String, Option<String>), LabError> {
    sources
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
        })
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

fn suite_stanza(suite: &str, uri: &str, signed_by: Option<&str>) -> String {
    let mut text = format!(
        "# Added by barge-lab setup: {suite} from this machine's own Debian mirror.\n\
         Types: deb\nURIs: {uri}\nSuites: {suite}\nComponents: main\n"
    );
    if let Some(key) = signed_by {
        text.push_str(&format!("Signed-By: {key}\n"));
    }
    text
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
        let text = suite_stanza(
            BACKPORTS_SUITE,
            "http://mirror.example/debian",
            Some("/k.gpg"),
        );
        assert!(text.contains("URIs: http://mirror.example/debian\n"));
        assert!(text.contains("Suites: bookworm-backports\n"));
        assert!(text.contains("Signed-By: /k.gpg\n"));
    }

    #[test]
    fn private_configuration_reads_only_its_own_sources() {
        let dir = Path::new("/lab/apt/trixie-backports");
        let options = private_options(
            &dir.join("trixie-backports.sources"),
            &dir.join("sources.list.d"),
            &dir.join("lists"),
            &dir.join("cache"),
        );
        assert_eq!(
            options,
            [
                "Dir::Etc::SourceList=/lab/apt/trixie-backports/trixie-backports.sources",
                "Dir::Etc::SourceParts=/lab/apt/trixie-backports/sources.list.d",
                "Dir::State::Lists=/lab/apt/trixie-backports/lists",
                "Dir::Cache=/lab/apt/trixie-backports/cache",
            ]
        );
        let suite = AptSuite {
            suite: TRIXIE_BACKPORTS_SUITE,
            version_tag: "bpo13",
            options,
        };
        let args = suite.option_args();
        assert_eq!(args.len(), 8);
        assert_eq!(args[0], "-o");
        assert!(args[1].starts_with("Dir::Etc::SourceList="));
        let text = suite_stanza(TRIXIE_BACKPORTS_SUITE, "http://mirror.example/debian", None);
        assert!(text.contains("Suites: trixie-backports\n"), "{text}");
        assert!(!text.contains("Signed-By"), "{text}");
    }
}
