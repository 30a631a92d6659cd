//! The initramfs of the Linux guest kit: a tiny uncompressed newc archive that turns the stock
//! Debian kernel into a test guest. It holds the host's static busybox and an `/init` script
//! (`guest-tools/linux/init.sh`) that prints a workload line through `/proc/version` every ~100 ms,
//! or dumps `/proc/kallsyms` and powers off (see [`InitMode`]).
//!
//! Built in Rust rather than with `cpio`/`gen_init_cpio` so the tests need no extra host tool and
//! do not need root for the `/dev/console` node: the kernel opens `/dev/console` for PID 1 before
//! anything is mounted, so without that node `/init` would have no stdout at all. Uncompressed
//! because decompressing under TCG costs guest time for nothing (the archive is ~2 MB).

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use cpio::newc::Builder;

/// The `/init` script, kept as a file so it can be read and linted as shell.
pub const INIT_SCRIPT: &str = include_str!("../linux/init.sh");

/// What `/init` does once the kernel has started it. The archive records it in `/etc/hpl.mode`;
/// `hpl.mode=<name>` on the kernel command line overrides it, so one archive serves both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InitMode {
    /// Print `hpl: seq=<n> uptime=<s> version=<proc/version>` every ~100 ms, forever.
    #[default]
    Workload,
    /// Print `/proc/kallsyms` between `hpl: kallsyms-begin` and `hpl: kallsyms-end`, power off.
    Kallsyms,
    /// As [`InitMode::Workload`], but `version=` is the output of `/etc/hpl.probe` (see
    /// [`build_probe`]), lines joined by ` | `.
    Probe,
}

impl InitMode {
    /// The name `/init` understands (`hpl.mode=<name>`, `/etc/hpl.mode`).
    pub fn name(self) -> &'static str {
        match self {
            InitMode::Workload => "workload",
            InitMode::Kallsyms => "kallsyms",
            InitMode::Probe => "probe",
        }
    }
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// `/dev/console` is character device 5:1 on Linux.
const CONSOLE_MAJOR: u32 = 5;
const CONSOLE_MINOR: u32 = 1;

/// One archive member, before it is written.
struct Member<'a> {
    name: &'a str,
    mode: u32,
    data: &'a [u8],
    rdev: (u32, u32),
}

impl<'a> Member<'a> {
    fn dir(name: &'a str, perm: u32) -> Self {
        Member {
            name,
            mode: S_IFDIR | perm,
            data: &[],
            rdev: (0, 0),
        }
    }
    fn file(name: &'a str, perm: u32, data: &'a [u8]) -> Self {
        Member {
            name,
            mode: S_IFREG | perm,
            data,
            rdev: (0, 0),
        }
    }
    fn symlink(name: &'a str, target: &'a str) -> Self {
        Member {
            name,
            mode: S_IFLNK | 0o777,
            data: target.as_bytes(),
            rdev: (0, 0),
        }
    }
    fn char_dev(name: &'a str, perm: u32, major: u32, minor: u32) -> Self {
        Member {
            name,
            mode: S_IFCHR | perm,
            data: &[],
            rdev: (major, minor),
        }
    }
}

/// Builds the initramfs (uncompressed newc, ready for QEMU's `-initrd`) around the static busybox
/// at `busybox`. Fails if it cannot be read or is not a static x86-64 ELF: a dynamically linked
/// busybox would only show up later as the kernel's opaque "No working init found" panic.
pub fn build(busybox: &Path, mode: InitMode) -> io::Result<Vec<u8>> {
    let bb = read_static_busybox(busybox)?;
    let mode_file = format!("{}\n", mode.name());
    let members = [
        Member::dir("bin", 0o755),
        Member::file("bin/busybox", 0o755, &bb),
        Member::symlink("bin/sh", "busybox"),
        Member::dir("dev", 0o755),
        Member::char_dev("dev/console", 0o600, CONSOLE_MAJOR, CONSOLE_MINOR),
        Member::dir("etc", 0o755),
        Member::file("etc/hpl.mode", 0o644, mode_file.as_bytes()),
        Member::dir("proc", 0o555),
        Member::dir("sys", 0o555),
        Member::dir("tmp", 0o1777),
        Member::file("init", 0o755, INIT_SCRIPT.as_bytes()),
    ];
    write_archive(&members)
}

/// The kit's initramfs in [`InitMode::Probe`]: `/etc/hpl.probe` holds `probe` (a busybox `sh`
/// script whose output the workload prints every ~100 ms), and each `(path, bytes)` of `files`
/// is added executable (static test programs, e.g. under `bin/`).
pub fn build_probe(
    busybox: &Path,
    probe: &str,
    files: &[(String, Vec<u8>)],
) -> io::Result<Vec<u8>> {
    let bb = read_static_busybox(busybox)?;
    let mut a = Archive::new();
    a.dir("bin", 0o755)?;
    a.file("bin/busybox", 0o755, bb)?;
    a.symlink("bin/sh", "busybox")?;
    a.dir("dev", 0o755)?;
    a.char_dev("dev/console", 0o600, CONSOLE_MAJOR, CONSOLE_MINOR)?;
    a.dir("etc", 0o755)?;
    a.file("etc/hpl.mode", 0o644, b"probe\n".to_vec())?;
    a.file("etc/hpl.probe", 0o644, probe.as_bytes().to_vec())?;
    a.dir("proc", 0o555)?;
    a.dir("sys", 0o555)?;
    a.dir("tmp", 0o1777)?;
    for (path, data) in files {
        a.file(path, 0o755, data.clone())?;
    }
    a.file("init", 0o755, INIT_SCRIPT.as_bytes().to_vec())?;
    a.finish()
}

/// Reads the busybox at `busybox` and checks it is a static x86-64 ELF, the only kind that runs
/// in an initramfs without a libc.
pub fn read_static_busybox(busybox: &Path) -> io::Result<Vec<u8>> {
    let bb = fs::read(busybox)
        .map_err(|e| io::Error::new(e.kind(), format!("reading {}: {e}", busybox.display())))?;
    check_static_elf(&bb).map_err(|why| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} cannot be the initramfs busybox: {why} (install busybox-static)",
                busybox.display()
            ),
        )
    })?;
    Ok(bb)
}

/// One member of an [`Archive`], owned.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    mode: u32,
    data: Vec<u8>,
    rdev: (u32, u32),
}

/// A newc archive assembled member by member, for initramfs images other than the kit's (the
/// nested tier's L1, docs/nested-tier.md). Paths are relative to the archive root (a leading
/// `/` is dropped); missing parent directories are added before their children (the kernel's
/// unpacker does not create them); a path may be added only once.
#[derive(Debug, Clone, Default)]
pub struct Archive {
    entries: Vec<Entry>,
    names: std::collections::BTreeSet<String>,
}

impl Archive {
    pub fn new() -> Self {
        Archive::default()
    }

    /// A directory (`perm` like 0o755).
    pub fn dir(&mut self, path: &str, perm: u32) -> io::Result<()> {
        let name = Self::clean(path)?;
        if self.names.contains(&name) {
            // Already there, explicitly or as some file's parent: directories merge.
            return Ok(());
        }
        self.push(name, S_IFDIR | (perm & 0o7777), Vec::new(), (0, 0))
    }

    /// A regular file.
    pub fn file(&mut self, path: &str, perm: u32, data: Vec<u8>) -> io::Result<()> {
        let name = Self::clean(path)?;
        self.push(name, S_IFREG | (perm & 0o7777), data, (0, 0))
    }

    /// A symbolic link to `target` (relative targets resolve from the link's directory).
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let name = Self::clean(path)?;
        self.push(name, S_IFLNK | 0o777, target.as_bytes().to_vec(), (0, 0))
    }

    /// A character device node (e.g. `dev/console`, 5:1), so no root is needed to make one.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        let name = Self::clean(path)?;
        self.push(name, S_IFCHR | (perm & 0o7777), Vec::new(), (major, minor))
    }

    /// Whether `path` is in the archive (as any kind of member).
    pub fn contains(&self, path: &str) -> bool {
        Self::clean(path).is_ok_and(|n| self.names.contains(&n))
    }

    /// The total size of the members' data, before headers.
    pub fn data_bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.data.len() as u64).sum()
    }

    /// The archive, uncompressed, ready for `-initrd`.
    pub fn finish(&self) -> io::Result<Vec<u8>> {
        let members: Vec<Member<'_>> = self
            .entries
            .iter()
            .map(|e| Member {
                name: &e.name,
                mode: e.mode,
                data: &e.data,
                rdev: e.rdev,
            })
            .collect();
        write_archive(&members)
    }

    fn clean(path: &str) -> io::Result<String> {
        let trimmed = path.trim_start_matches('/').trim_end_matches('/');
        let bad = trimmed.is_empty()
            || trimmed
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
            || trimmed.contains('\0');
        if bad {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{path:?} is not a usable archive path"),
            ));
        }
        Ok(trimmed.to_string())
    }

    fn push(&mut self, name: String, mode: u32, data: Vec<u8>, rdev: (u32, u32)) -> io::Result<()> {
        if self.names.contains(&name) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{name} is already in the archive"),
            ));
        }
        if let Some((parent, _)) = name.rsplit_once('/') {
            self.dir(parent, 0o755)?;
        }
        self.names.insert(name.clone());
        self.entries.push(Entry {
            name,
            mode,
            data,
            rdev,
        });
        Ok(())
    }
}

fn write_archive(members: &[Member<'_>]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    for (ino, m) in (1u32..).zip(members) {
        let size = u32::try_from(m.data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is too large for a newc archive", m.name),
            )
        })?;
        let nlink = if m.mode & S_IFDIR == S_IFDIR { 2 } else { 1 };
        let mut w = Builder::new(m.name)
            .ino(ino)
            .mode(m.mode)
            .uid(0)
            .gid(0)
            .nlink(nlink)
            .rdev_major(m.rdev.0)
            .rdev_minor(m.rdev.1)
            .write(out, size);
        w.write_all(m.data)?;
        out = w.finish()?;
    }
    cpio::newc::trailer(out)
}

/// Checks that `elf` is a 64-bit x86-64 executable without a program interpreter (`PT_INTERP`),
/// i.e. one that runs in an initramfs that has no dynamic loader or libc.
fn check_static_elf(elf: &[u8]) -> Result<(), String> {
    const PT_INTERP: u32 = 3;
    const EM_X86_64: u16 = 62;
    let u16_at = |off: usize| {
        elf.get(off..off + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u32_at = |off: usize| {
        elf.get(off..off + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |off: usize| {
        elf.get(off..off + 8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_le_bytes(a)
        })
    };
    if elf.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err("not an ELF file".into());
    }
    if elf.get(4..6) != Some([2u8, 1].as_slice()) {
        return Err("not a 64-bit little-endian ELF".into());
    }
    if u16_at(0x12) != Some(EM_X86_64) {
        return Err("not an x86-64 ELF".into());
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return Err("truncated ELF header".into());
    };
    let phoff = usize::try_from(phoff).map_err(|_| "program header offset out of range")?;
    for i in 0..usize::from(phnum) {
        let off = usize::from(phentsize)
            .checked_mul(i)
            .and_then(|o| o.checked_add(phoff))
            .ok_or("program header offset out of range")?;
        match u32_at(off) {
            Some(PT_INTERP) => return Err("dynamically linked (has PT_INTERP)".into()),
            Some(_) => {}
            None => return Err("truncated program headers".into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One parsed newc member: what the kernel's unpacker (init/initramfs.c) would see.
    #[derive(Debug)]
    struct Parsed {
        ino: u32,
        name: String,
        mode: u32,
        nlink: u32,
        uid: u32,
        gid: u32,
        rdev: (u32, u32),
        data: Vec<u8>,
    }

    /// A reader written from the newc format description, independent of the cpio crate, that
    /// also checks the 4-byte alignment of every header and data start.
    fn parse(archive: &[u8]) -> Vec<Parsed> {
        let align = |n: usize| (n + 3) & !3;
        let mut pos = 0;
        let mut out = Vec::new();
        loop {
            assert_eq!(pos % 4, 0, "header at {pos} is not 4-byte aligned");
            let h = &archive[pos..pos + 110];
            assert_eq!(&h[..6], b"070701", "magic at {pos}");
            let field = |i: usize| {
                let s = std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).expect("ascii field");
                u32::from_str_radix(s, 16).expect("hex field")
            };
            let (ino, mode, uid, gid, nlink) = (field(0), field(1), field(2), field(3), field(4));
            let size = field(6) as usize;
            let rdev = (field(9), field(10));
            let namesize = field(11) as usize;
            assert_eq!(field(12), 0, "newc check field must be 0");
            let name_start = pos + 110;
            let name_bytes = &archive[name_start..name_start + namesize];
            assert_eq!(name_bytes.last(), Some(&0), "name is NUL-terminated");
            let name = std::str::from_utf8(&name_bytes[..namesize - 1])
                .expect("utf-8 name")
                .to_string();
            let data_start = align(name_start + namesize);
            let data = archive[data_start..data_start + size].to_vec();
            pos = align(data_start + size);
            if name == "TRAILER!!!" {
                assert_eq!(pos, archive.len(), "nothing after the trailer");
                return out;
            }
            out.push(Parsed {
                ino,
                name,
                mode,
                nlink,
                uid,
                gid,
                rdev,
                data,
            });
        }
    }

    /// The smallest "static x86-64 ELF" the check accepts: a header and one PT_LOAD.
    fn fake_elf(p_type: u32) -> Vec<u8> {
        let mut e = vec![0u8; 64 + 56];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2; // ELFCLASS64
        e[5] = 1; // little endian
        e[0x12..0x14].copy_from_slice(&62u16.to_le_bytes());
        e[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        e[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        e[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        e[64..68].copy_from_slice(&p_type.to_le_bytes());
        e.extend_from_slice(b"busybox body, odd length");
        e
    }

    /// `bytes` in a fresh temporary file, removed when the handle is dropped.
    fn write_temp(tag: &str, bytes: &[u8]) -> tempfile::NamedTempFile {
        let f = tempfile::Builder::new()
            .prefix(&format!("guest-tools-initramfs-{tag}-"))
            .tempfile()
            .expect("temp busybox");
        fs::write(f.path(), bytes).expect("write temp busybox");
        f
    }

    #[test]
    fn archive_has_busybox_init_console_and_mount_points() {
        let bb = fake_elf(1);
        let tmp = write_temp("ok", &bb);
        let path = tmp.path().to_path_buf();
        let archive = build(&path, InitMode::Workload).expect("build");
        drop(tmp);
        let members = parse(&archive);
        let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/busybox",
                "bin/sh",
                "dev",
                "dev/console",
                "etc",
                "etc/hpl.mode",
                "proc",
                "sys",
                "tmp",
                "init"
            ]
        );
        let get = |n: &str| members.iter().find(|m| m.name == n).expect(n);
        // Parents come before children: the kernel's unpacker does not create directories.
        for m in &members {
            if let Some((parent, _)) = m.name.rsplit_once('/') {
                let pi = names.iter().position(|n| *n == parent).expect(parent);
                let mi = names.iter().position(|n| *n == m.name).expect("self");
                assert!(pi < mi, "{} before its parent", m.name);
            }
        }
        let busybox = get("bin/busybox");
        assert_eq!(busybox.mode, 0o100755);
        assert_eq!(busybox.data, bb);
        let init = get("init");
        assert_eq!(init.mode, 0o100755);
        assert_eq!(init.data, INIT_SCRIPT.as_bytes());
        assert!(INIT_SCRIPT.starts_with("#!/bin/busybox sh\n"));
        let sh = get("bin/sh");
        assert_eq!(sh.mode, 0o120777);
        assert_eq!(sh.data, b"busybox");
        let console = get("dev/console");
        assert_eq!(console.mode, 0o020600);
        assert_eq!(console.rdev, (5, 1));
        assert!(console.data.is_empty());
        for d in ["bin", "dev", "etc", "proc", "sys"] {
            assert_eq!(get(d).mode & 0o170000, 0o040000, "{d} is a directory");
            assert_eq!(get(d).nlink, 2);
        }
        assert_eq!(get("tmp").mode, 0o041777);
        assert_eq!(get("etc/hpl.mode").data, b"workload\n");
        for m in &members {
            assert_eq!((m.uid, m.gid), (0, 0), "{} owned by root", m.name);
        }
        let mut inos: Vec<u32> = members.iter().map(|m| m.ino).collect();
        inos.sort_unstable();
        inos.dedup();
        assert_eq!(inos.len(), members.len(), "distinct inode numbers");
        assert!(!inos.contains(&0));
    }

    #[test]
    fn mode_is_recorded_and_the_cpio_crate_reads_the_archive_back() {
        let tmp = write_temp("kallsyms", &fake_elf(1));
        let path = tmp.path().to_path_buf();
        let archive = build(&path, InitMode::Kallsyms).expect("build");
        drop(tmp);
        let members = parse(&archive);
        let mode = members.iter().find(|m| m.name == "etc/hpl.mode");
        assert_eq!(mode.expect("etc/hpl.mode").data, b"kallsyms\n");
        // The crate's own reader agrees on names and sizes.
        let mut rest: &[u8] = &archive;
        let mut seen = Vec::new();
        loop {
            let r = cpio::NewcReader::new(rest).expect("entry");
            if r.entry().is_trailer() {
                break;
            }
            seen.push((r.entry().name().to_string(), r.entry().file_size()));
            rest = r.finish().expect("skip entry");
        }
        let expected: Vec<(String, u32)> = members
            .iter()
            .map(|m| (m.name.clone(), m.data.len() as u32))
            .collect();
        assert_eq!(seen, expected);
    }

    #[test]
    fn init_script_handles_both_modes() {
        for m in [InitMode::Workload, InitMode::Kallsyms, InitMode::Probe] {
            assert!(
                INIT_SCRIPT.contains(&format!("\n  {})", m.name())),
                "no case for {m:?}"
            );
        }
        for marker in [
            "hpl: init uptime=",
            "hpl: banner=",
            "hpl: seq=$n uptime=$up version=$version",
            "hpl: kallsyms-begin",
            "hpl: kallsyms-end",
            "usleep 100000",
        ] {
            assert!(INIT_SCRIPT.contains(marker), "{marker}");
        }
        assert_eq!(InitMode::default(), InitMode::Workload);
    }

    #[test]
    fn archive_builder_adds_parents_first_and_refuses_duplicates() {
        let mut a = Archive::new();
        a.file("/job/l2/bzImage", 0o644, b"kernel".to_vec())
            .expect("file");
        a.symlink("bin/sh", "busybox").expect("symlink");
        a.char_dev("dev/console", 0o600, 5, 1).expect("console");
        a.dir("job", 0o755).expect("existing dirs merge");
        a.file("init", 0o755, b"#!/bin/sh\n".to_vec())
            .expect("init");
        assert!(a.contains("job/l2") && a.contains("/job/l2/bzImage/"));
        assert!(!a.contains("job/l3"));
        let dup = a
            .file("job/l2/bzImage", 0o644, Vec::new())
            .expect_err("dup");
        assert_eq!(dup.kind(), io::ErrorKind::AlreadyExists);
        for bad in ["", "/", "a/../b", "a//b", "./x"] {
            let e = a.file(bad, 0o644, Vec::new()).expect_err(bad);
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
        assert_eq!(a.data_bytes(), 6 + 7 + 10);
        let members = parse(&a.finish().expect("finish"));
        let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "job",
                "job/l2",
                "job/l2/bzImage",
                "bin",
                "bin/sh",
                "dev",
                "dev/console",
                "init"
            ]
        );
        let get = |n: &str| members.iter().find(|m| m.name == n).expect(n);
        assert_eq!(get("job/l2").mode, 0o040755);
        assert_eq!(get("job/l2/bzImage").mode, 0o100644);
        assert_eq!(get("job/l2/bzImage").data, b"kernel");
        assert_eq!(get("bin/sh").mode, 0o120777);
        assert_eq!(get("dev/console").rdev, (5, 1));
        assert_eq!(get("init").mode, 0o100755);
    }

    #[test]
    fn dynamic_or_foreign_busybox_is_refused() {
        for (tag, bytes, why) in [
            ("dyn", fake_elf(3), "dynamically linked"),
            ("text", b"#!/bin/sh\n".to_vec(), "not an ELF"),
            (
                "short",
                fake_elf(1)[..0x30].to_vec(),
                "truncated ELF header",
            ),
        ] {
            let tmp = write_temp(tag, &bytes);
            let path = tmp.path().to_path_buf();
            let err = build(&path, InitMode::Workload).expect_err(tag);
            drop(tmp);
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{tag}");
            assert!(err.to_string().contains(why), "{tag}: {err}");
        }
        let missing = Path::new("/nonexistent/busybox");
        let err = build(missing, InitMode::Workload).expect_err("missing file");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("/nonexistent/busybox"));
    }
}
