//! The apt sources setup needs: bookworm-backports, added (unless some
//! source already carries it) as a deb822 file that points at the Debian
//! mirror the machine's own `sources.list` or `sources.list.d` names, in a
//! one-line or a deb822 entry, with that entry's Signed-By key.

use std::path::{Path, PathBuf};

use crate::lab::{command_output, LabError};

pub(super) const BACKPORTS_SUITE: &str = "bookworm-backports";
const BACKPORTS_SOURCE_FILE: &str = "/etc/apt/sources.list.d/barge-lab-backports.sources";

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
}
