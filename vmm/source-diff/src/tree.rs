//! The exact source of the running kernel, prepared for compiling single units.
//!
//! For a Debian kernel the banner names everything needed: the release
//! (`6.1.0-55-amd64`: the headers package holding its `.config`), the package version
//! (`Debian 6.1.192-1`: the `linux-source-6.1` package of that version) and the compiler
//! (`gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0`). Both packages are fetched with
//! `apt-get download` (nothing is installed), unpacked and prepared once
//! (`make olddefconfig prepare`: ~1 min on 2 cores) under the cache directory, which
//! later builds reuse. Any other kernel comes with `--linux-source DIR`, a tree its owner
//! configured and prepared.

use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

/// What the kernel says about its own build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelBuild {
    /// `6.1.0-55-amd64`.
    pub release: String,
    /// `6.1.192-1`, when the banner is a Debian one.
    pub debian_version: Option<String>,
    /// `gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0`: what `CONFIG_CC_VERSION_TEXT` holds.
    pub compiler: Option<String>,
}

impl KernelBuild {
    /// Reads `Linux version <release> (<builder>) (<compiler>, <linker>) #1 … Debian <version> (<date>)`.
    pub fn from_banner(banner: &str) -> Option<KernelBuild> {
        let rest = banner.strip_prefix("Linux version ")?;
        let release = rest.split_whitespace().next()?.to_string();
        // The compiler: the second parenthesised group, up to its ", " before the linker.
        let after_release = &rest[release.len()..];
        let compiler = second_group(after_release)
            .map(|g| g.split(", GNU ld").next().unwrap_or(&g).trim().to_string());
        let debian_version = rest
            .split(" Debian ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .map(str::to_string);
        Some(KernelBuild {
            release,
            debian_version,
            compiler,
        })
    }

    /// `6.1.0-55` and `amd64` from `6.1.0-55-amd64`.
    pub fn abi_and_flavour(&self) -> Option<(&str, &str)> {
        self.release.rsplit_once('-')
    }

    /// `6.1` from the release.
    pub fn series(&self) -> Option<String> {
        let mut it = self.release.split('.');
        Some(format!("{}.{}", it.next()?, it.next()?))
    }
}

/// The text of the second top-level `( … )` group of `s`.
fn second_group(s: &str) -> Option<String> {
    let mut depth = 0;
    let mut group = 0;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => {
                if depth == 0 {
                    group += 1;
                    start = i + 1;
                }
                depth += 1;
            }
            ')' => {
                depth -= 1;
                if depth == 0 && group == 2 {
                    return Some(s[start..i].to_string());
                }
            }
            _ => {}
        }
    }
    None
}

#[derive(Debug, Error)]
pub enum TreeError {
    #[error(
        "the kernel's banner does not name a Debian package version ({banner:?}); give the \
         prepared source tree it was built from with --linux-source DIR"
    )]
    NotDebian { banner: String },
    #[error(
        "{what} failed: {detail}; check that apt can reach the Debian archive (`apt-get \
         update`) and that the package exists (`apt-cache madison {package}`)"
    )]
    Fetch {
        what: String,
        package: String,
        detail: String,
    },
    #[error(
        "preparing the kernel's source needs tools this machine lacks: install them with \
         `apt-get install {packages}`"
    )]
    Tools { packages: String },
    #[error("{what} failed in {dir}: {detail}")]
    Prepare {
        what: String,
        dir: PathBuf,
        detail: String,
    },
    #[error(
        "{dir} is not a prepared kernel tree ({missing} is missing): run `make olddefconfig \
         prepare` there with the kernel's .config"
    )]
    NotPrepared { dir: PathBuf, missing: &'static str },
    #[error(
        "the kernel was built with {kernel:?} but {what}; install that exact compiler (the \
         object code must match the running kernel's)"
    )]
    Compiler { kernel: String, what: String },
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TreeError + '_ {
    move |source| TreeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A configured, prepared kernel source tree.
#[derive(Debug, Clone)]
pub struct SourceTree {
    pub dir: PathBuf,
    /// The compiler command (`gcc-12`), from `CONFIG_CC_VERSION_TEXT`.
    pub cc: String,
    /// What the tree is: `linux-source-6.1 6.1.192-1`, or the directory given.
    pub describe: String,
    /// It was unpacked and prepared by this call (not from the cache).
    pub prepared_now: bool,
}

/// Where fetched kernel sources go by default: `linux-source` beside the image cache
/// (`$VMM_CACHE_DIR/linux-source`, else `~/.cache/vmm/linux-source`); `None` when the cache
/// is off or there is no home.
pub fn default_cache_dir() -> Option<PathBuf> {
    linux_guest::image_cache::default_dir().and_then(|d| d.parent().map(|p| p.join("linux-source")))
}

/// `CONFIG_CC_VERSION_TEXT` of a `.config`.
pub fn config_compiler(config: &str) -> Option<String> {
    config
        .lines()
        .find_map(|l| l.strip_prefix("CONFIG_CC_VERSION_TEXT="))
        .map(|v| v.trim().trim_matches('"').to_string())
}

impl SourceTree {
    /// A tree the user prepared, checked for `.config` and the generated headers, and its
    /// compiler against the kernel's.
    pub fn given(dir: &Path, build: &KernelBuild) -> Result<SourceTree, TreeError> {
        for (rel, what) in [
            (".config", ".config"),
            (
                "include/generated/autoconf.h",
                "include/generated/autoconf.h",
            ),
        ] {
            if !dir.join(rel).is_file() {
                return Err(TreeError::NotPrepared {
                    dir: dir.to_path_buf(),
                    missing: what,
                });
            }
        }
        let cc = check_compiler(dir, build)?;
        Ok(SourceTree {
            dir: dir.to_path_buf(),
            cc,
            describe: dir.display().to_string(),
            prepared_now: false,
        })
    }

    /// The Debian source of `build`, from `cache` or fetched and prepared into it.
    pub fn debian(
        cache: &Path,
        build: &KernelBuild,
        banner: &str,
    ) -> Result<SourceTree, TreeError> {
        let (Some(version), Some((abi, flavour)), Some(series)) = (
            build.debian_version.as_deref(),
            build.abi_and_flavour(),
            build.series(),
        ) else {
            return Err(TreeError::NotDebian {
                banner: banner.trim().to_string(),
            });
        };
        let source_pkg = format!("linux-source-{series}");
        let headers_pkg = format!("linux-headers-{abi}-{flavour}");
        let cache = &std::path::absolute(cache).map_err(io(cache))?;
        let root = cache.join(format!("{source_pkg}_{version}_{abi}-{flavour}"));
        let tree = root.join("tree");
        let stamp = tree.join(".hotpatch-prepared");
        // One preparation at a time per kernel: a second build waits for the first's tree.
        std::fs::create_dir_all(cache).map_err(io(cache))?;
        let lock_path = sibling(&root, "lock");
        let lock = std::fs::File::create(&lock_path).map_err(io(&lock_path))?;
        lock.lock().map_err(io(&lock_path))?;
        if stamp.is_file() {
            let cc = check_compiler(&tree, build)?;
            return Ok(SourceTree {
                dir: tree,
                cc,
                describe: format!("{source_pkg} {version}"),
                prepared_now: false,
            });
        }
        let work = sibling(&root, "partial");
        if work.exists() {
            std::fs::remove_dir_all(&work).map_err(io(&work))?;
        }
        let debs = work.join("debs");
        std::fs::create_dir_all(&debs).map_err(io(&debs))?;
        check_build_tools()?;
        tracing::info!(package = %source_pkg, version, "fetching the kernel source");
        for pkg in [&source_pkg, &headers_pkg] {
            fetch_deb(&debs, pkg, version)?;
        }
        let deb_of = |pkg: &str| -> Result<PathBuf, TreeError> {
            let rd = std::fs::read_dir(&debs).map_err(io(&debs))?;
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&format!("{pkg}_")))
                })
                .ok_or_else(|| TreeError::Fetch {
                    what: format!("apt-get download {pkg}={version}"),
                    package: pkg.to_string(),
                    detail: "no .deb was written".into(),
                })
        };
        let (src_deb, hdr_deb) = (deb_of(&source_pkg)?, deb_of(&headers_pkg)?);
        // linux-source holds /usr/src/linux-source-6.1.tar.xz; unpack it into work/.
        let tarball = format!("./usr/src/{source_pkg}.tar.xz");
        sh(
            &work,
            &format!(
                "dpkg-deb --fsys-tarfile {} | tar -x -O {tarball} | tar -xJ",
                shell_quote(&src_deb)
            ),
            "unpacking the kernel source",
        )?;
        let unpacked = work.join(&source_pkg);
        let config = format!("./usr/src/{headers_pkg}/.config");
        sh(
            &work,
            &format!(
                "dpkg-deb --fsys-tarfile {} | tar -x -O {config} > {}/.config",
                shell_quote(&hdr_deb),
                shell_quote(&unpacked)
            ),
            "extracting the kernel's .config",
        )?;
        let cc = check_compiler(&unpacked, build)?;
        let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
        sh(
            &unpacked,
            &format!("make -s CC={cc} olddefconfig && make -s CC={cc} -j{jobs} prepare"),
            "make olddefconfig prepare",
        )?;
        std::fs::write(
            unpacked.join(".hotpatch-prepared"),
            format!("{source_pkg} {version} {abi}-{flavour}\n"),
        )
        .map_err(io(&unpacked))?;
        if root.exists() {
            std::fs::remove_dir_all(&root).map_err(io(&root))?;
        }
        std::fs::create_dir_all(&root).map_err(io(&root))?;
        std::fs::rename(&unpacked, &tree).map_err(io(&tree))?;
        let _ = std::fs::remove_dir_all(&work);
        Ok(SourceTree {
            dir: tree,
            cc,
            describe: format!("{source_pkg} {version}"),
            prepared_now: true,
        })
    }
}

/// The unpacked (not prepared) `linux-source-<series>` at `version`, from `cache` or fetched
/// into it: another version's source to compare with (`vmm bench source-diff`).
pub fn unpack_source(cache: &Path, series: &str, version: &str) -> Result<PathBuf, TreeError> {
    let pkg = format!("linux-source-{series}");
    let cache = &std::path::absolute(cache).map_err(io(cache))?;
    let root = cache.join(format!("{pkg}_{version}_source"));
    let tree = root.join("tree");
    std::fs::create_dir_all(cache).map_err(io(cache))?;
    let lock_path = sibling(&root, "lock");
    let lock = std::fs::File::create(&lock_path).map_err(io(&lock_path))?;
    lock.lock().map_err(io(&lock_path))?;
    if tree.join("Makefile").is_file() {
        return Ok(tree);
    }
    let work = sibling(&root, "partial");
    if work.exists() {
        std::fs::remove_dir_all(&work).map_err(io(&work))?;
    }
    std::fs::create_dir_all(&work).map_err(io(&work))?;
    fetch_deb(&work, &pkg, version)?;
    let deb = std::fs::read_dir(&work)
        .map_err(io(&work))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| TreeError::Fetch {
            what: format!("apt-get download {pkg}={version}"),
            package: pkg.clone(),
            detail: "no .deb was written".into(),
        })?;
    sh(
        &work,
        &format!(
            "dpkg-deb --fsys-tarfile {} | tar -x -O ./usr/src/{pkg}.tar.xz | tar -xJ",
            shell_quote(&deb)
        ),
        "unpacking the kernel source",
    )?;
    if root.exists() {
        std::fs::remove_dir_all(&root).map_err(io(&root))?;
    }
    std::fs::create_dir_all(&root).map_err(io(&root))?;
    std::fs::rename(work.join(&pkg), &tree).map_err(io(&tree))?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(tree)
}

/// What the kernel's `make olddefconfig prepare` needs besides the compiler; missing ones are
/// named with their Debian packages. pahole matters beyond building: without it Kconfig turns
/// `CONFIG_DEBUG_INFO_BTF` off, and the tree would not compile to the kernel's code.
fn check_build_tools() -> Result<(), TreeError> {
    let mut missing = Vec::new();
    for (cmd, pkg) in [
        ("flex", "flex"),
        ("bison", "bison"),
        ("bc", "bc"),
        ("pahole", "dwarves"),
        ("make", "make"),
    ] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()));
        if !found {
            missing.push(pkg);
        }
    }
    for (header, pkg) in [
        ("/usr/include/libelf.h", "libelf-dev"),
        ("/usr/include/openssl/ssl.h", "libssl-dev"),
    ] {
        if !Path::new(header).exists() {
            missing.push(pkg);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(TreeError::Tools {
        packages: missing.join(" "),
    })
}

/// `<root>.<what>` beside `root` (names hold dots: `with_extension` would cut them).
fn sibling(root: &Path, what: &str) -> PathBuf {
    let mut name = root.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{what}"));
    root.with_file_name(name)
}

/// The compiler named in the tree's `.config`, checked against the kernel's banner and
/// against what the machine's compiler of that name says it is.
fn check_compiler(tree: &Path, build: &KernelBuild) -> Result<String, TreeError> {
    let cfg_path = tree.join(".config");
    let config = std::fs::read_to_string(&cfg_path).map_err(io(&cfg_path))?;
    let text = config_compiler(&config).ok_or(TreeError::NotPrepared {
        dir: tree.to_path_buf(),
        missing: "CONFIG_CC_VERSION_TEXT in .config",
    })?;
    if let Some(k) = &build.compiler
        && *k != text
    {
        return Err(TreeError::Compiler {
            kernel: k.clone(),
            what: format!("the tree's .config names {text:?}"),
        });
    }
    let cc = text.split_whitespace().next().unwrap_or("gcc").to_string();
    let out = Command::new(&cc).arg("--version").output();
    let first = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_string(),
        _ => {
            return Err(TreeError::Compiler {
                kernel: text,
                what: format!("`{cc}` does not run on this machine"),
            });
        }
    };
    if first != text {
        return Err(TreeError::Compiler {
            kernel: text,
            what: format!("`{cc} --version` says {first:?}"),
        });
    }
    Ok(cc)
}

/// `apt-get download PKG=VERSION` into `dir`, with one `apt-get update` retry.
fn fetch_deb(dir: &Path, pkg: &str, version: &str) -> Result<(), TreeError> {
    let run = || {
        let mut c = Command::new("apt-get");
        c.args(["download", "-qq"]);
        // As root apt switches to its _apt user, which cannot write here.
        if is_root() {
            c.args(["-o", "APT::Sandbox::User=root"]);
        }
        c.arg(format!("{pkg}={version}")).current_dir(dir).output()
    };
    let mut out = run();
    if !matches!(&out, Ok(o) if o.status.success()) && is_root() {
        let _ = Command::new("apt-get").args(["update", "-qq"]).output();
        out = run();
    }
    match out {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(TreeError::Fetch {
            what: format!("apt-get download {pkg}={version}"),
            package: pkg.to_string(),
            detail: tail(&String::from_utf8_lossy(&o.stderr)),
        }),
        Err(e) => Err(TreeError::Fetch {
            what: format!("apt-get download {pkg}={version}"),
            package: pkg.to_string(),
            detail: e.to_string(),
        }),
    }
}

fn is_root() -> bool {
    std::env::var("USER").is_ok_and(|u| u == "root")
        || std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .map(|u| u.split_whitespace().next() == Some("0"))
            })
            .unwrap_or(false)
}

/// Runs `script` with `sh -c` in `dir`.
pub(crate) fn sh(dir: &Path, script: &str, what: &str) -> Result<(), TreeError> {
    let out = Command::new("sh")
        .args(["-c", script])
        .current_dir(dir)
        .output()
        .map_err(io(dir))?;
    if !out.status.success() {
        return Err(TreeError::Prepare {
            what: what.to_string(),
            dir: dir.to_path_buf(),
            detail: tail(&String::from_utf8_lossy(&out.stderr)),
        });
    }
    Ok(())
}

/// The last lines of a tool's output, for an error message.
/// What to show of a tool's output: its first compiler errors where it has any (make's own
/// lines after them only repeat that something failed), else its last lines.
pub(crate) fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    let errors: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.contains("error:") || l.contains("Error:"))
        .take(4)
        .collect();
    if !errors.is_empty() {
        return errors.join(" | ");
    }
    let from = lines.len().saturating_sub(8);
    lines[from..].join(" | ")
}

pub(crate) fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BANNER: &str = "Linux version 6.1.0-55-amd64 (debian-kernel@lists.debian.org) \
(gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0, GNU ld (GNU Binutils for Debian) 2.40) #1 SMP \
PREEMPT_DYNAMIC Debian 6.1.192-1 (2026-10-20)\n";

    #[test]
    fn a_debian_banner_names_release_version_and_compiler() {
        let b = KernelBuild::from_banner(BANNER).unwrap();
        assert_eq!(b.release, "6.1.0-55-amd64");
        assert_eq!(b.debian_version.as_deref(), Some("6.1.192-1"));
        assert_eq!(
            b.compiler.as_deref(),
            Some("gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0")
        );
        assert_eq!(b.abi_and_flavour(), Some(("6.1.0-55", "amd64")));
        assert_eq!(b.series().as_deref(), Some("6.1"));
    }

    #[test]
    fn a_self_built_banner_has_no_debian_version() {
        let b = KernelBuild::from_banner(
            "Linux version 6.8.0 (me@host) (gcc (GCC) 13.2.0, GNU ld 2.41) #3 SMP\n",
        )
        .unwrap();
        assert_eq!(b.debian_version, None);
        assert_eq!(b.compiler.as_deref(), Some("gcc (GCC) 13.2.0"));
    }

    #[test]
    fn config_names_the_compiler() {
        let c = "CONFIG_X=y\nCONFIG_CC_VERSION_TEXT=\"gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0\"\n";
        assert_eq!(
            config_compiler(c).as_deref(),
            Some("gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0")
        );
    }
}
