//! A writer for the `newc` cpio format, the format Linux unpacks as an
//! initramfs. Only what an initramfs needs: directories, regular files,
//! symbolic links and character device nodes.

use std::collections::BTreeMap;
use std::io::{self, Write};

/// One entry of an initramfs, keyed by its path without a leading `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir,
    File { data: Vec<u8>, executable: bool },
    Symlink { target: String },
    CharDevice { major: u32, minor: u32 },
}

/// An initramfs under construction. Parents of every entry are created as
/// directories, and entries are written in path order so parents come first.
#[derive(Debug, Default)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

impl Archive {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) `path` and creates its missing parent directories.
    pub fn add(&mut self, path: &str, entry: Entry) {
        let path = path.trim_start_matches('/').to_string();
        let mut parent = String::new();
        for component in path
            .split('/')
            .collect::<Vec<_>>()
            .iter()
            .rev()
            .skip(1)
            .rev()
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(component);
            self.entries.entry(parent.clone()).or_insert(Entry::Dir);
        }
        self.entries.insert(path, entry);
    }

    pub fn add_file(&mut self, path: &str, data: Vec<u8>, executable: bool) {
        self.add(path, Entry::File { data, executable });
    }

    pub fn add_symlink(&mut self, path: &str, target: &str) {
        self.add(
            path,
            Entry::Symlink {
                target: target.to_string(),
            },
        );
    }

    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(path.trim_start_matches('/'))
    }

    /// Writes the archive, ending with the `TRAILER!!!` record.
    pub fn write_to<W: Write>(&self, out: &mut W) -> io::Result<()> {
        for (ino, (path, entry)) in (1u32..).zip(&self.entries) {
            let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match entry {
                Entry::Dir => (0o040_755, &[], (0, 0)),
                Entry::File { data, executable } => (
                    if *executable { 0o100_755 } else { 0o100_644 },
                    data,
                    (0, 0),
                ),
                Entry::Symlink { target } => (0o120_777, target.as_bytes(), (0, 0)),
                Entry::CharDevice { major, minor } => (0o020_600, &[], (*major, *minor)),
            };
            write_record(out, ino, mode, path, data, rdev)?;
        }
        write_record(out, 0, 0, "TRAILER!!!", &[], (0, 0))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing into a Vec cannot fail.
        let _ = self.write_to(&mut out);
        out
    }
}

fn write_record<W: Write>(
    out: &mut W,
    ino: u32,
    mode: u32,
    name: &str,
    data: &[u8],
    rdev: (u32, u32),
) -> io::Result<()> {
    let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
    let header = format!(
        "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}\
         {devmaj:08x}{devmin:08x}{rdevmaj:08x}{rdevmin:08x}{namesize:08x}{check:08x}",
        uid = 0,
        gid = 0,
        mtime = 0,
        size = data.len(),
        devmaj = 0,
        devmin = 0,
        rdevmaj = rdev.0,
        rdevmin = rdev.1,
        namesize = name.len() + 1,
        check = 0,
    );
    out.write_all(header.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    pad4(out, header.len() + name.len() + 1)?;
    out.write_all(data)?;
    pad4(out, data.len())
}

fn pad4<W: Write>(out: &mut W, len: usize) -> io::Result<()> {
    let pad = (4 - len % 4) % 4;
    out.write_all(&[0u8; 3][..pad])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_are_created_and_records_are_aligned() {
        let mut archive = Archive::new();
        archive.add_file("/lab/guest/init", b"#!/bin/sh\n".to_vec(), true);
        assert!(archive.contains("lab"));
        assert!(archive.contains("lab/guest"));
        let bytes = archive.to_bytes();
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("lab/guest/init\0"));
        assert!(text.contains("TRAILER!!!\0"));
    }

    #[test]
    fn archive_unpacks_with_system_cpio_when_present() {
        if std::process::Command::new("cpio")
            .arg("--version")
            .output()
            .is_err()
        {
            return;
        }
        let mut archive = Archive::new();
        archive.add_file("a/b.txt", b"hello".to_vec(), false);
        archive.add_symlink("a/link", "b.txt");
        let dir = std::env::temp_dir().join(format!("barge-cpio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-idm", "--quiet"])
            .current_dir(&dir)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&archive.to_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success());
        assert_eq!(std::fs::read(dir.join("a/link")).unwrap(), b"hello");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
