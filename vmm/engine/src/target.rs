//! The running guest as a patch sees it: which build it is (rule 6) and where its symbols are.
//!
//! Built from the image the guest booted (the test guest's ELF, later a Linux `vmlinux` plus
//! its KASLR slide). Addresses here are guest-virtual, with the slide applied.

use patch_format::{ImageInfo, ImageSymbol, Location, TargetIdentity};
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TargetError {
    #[error(
        "wrong target: the patch is for build id {patch} but the guest runs build id {guest}; get the patch built for this guest's image"
    )]
    BuildId { patch: String, guest: String },
    #[error(
        "wrong target: the patch is for text SHA-256 {patch} but the guest's text hashes to {guest}; get the patch built for this guest's image"
    )]
    TextHash { patch: String, guest: String },
    #[error(
        "wrong target: the patch names the guest only by {what}, which the running guest's image does not have; rebuild the patch with both build id and text hash"
    )]
    Incomparable { what: &'static str },
    #[error("site {site}: the guest has no symbol {name:?}; the patch was built for other code")]
    NoSymbol { site: String, name: String },
    #[error(
        "site {site}: the guest has {count} symbols named {name:?}; the location is ambiguous: name one as {name},N (the N-th in address order, as livepatch's sympos)"
    )]
    Ambiguous {
        site: String,
        name: String,
        count: usize,
    },
    #[error(
        "site {site}: offset {offset:#x} is outside {name} ({size} bytes); the patch was built for other code"
    )]
    OffsetOutside {
        site: String,
        name: String,
        offset: u64,
        size: u64,
    },
}

/// Identity and symbols of the running guest.
#[derive(Debug, Clone)]
pub struct Target {
    pub identity: TargetIdentity,
    /// Added to every image address (KASLR); 0 for the test guest.
    pub slide: u64,
    /// Sorted by address.
    symbols: Vec<ImageSymbol>,
    /// Absolute symbols (a kernel's per-CPU offsets), sorted by name: values, not addresses in
    /// the image, so the slide never applies. Only relocations resolve to them.
    absolute: Vec<(String, u64)>,
}

/// A resolved site location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub gva: u64,
    /// The function containing it, `(start, size)`, when the symbols say.
    pub function: Option<(u64, u64)>,
}

impl Target {
    pub fn new(info: ImageInfo, slide: u64) -> Target {
        let mut symbols = info.symbols;
        symbols.sort_by(|a, b| (a.addr, &a.name).cmp(&(b.addr, &b.name)));
        Target {
            identity: info.identity,
            slide,
            symbols,
            absolute: Vec::new(),
        }
    }

    /// With the image's absolute symbols (per-CPU offsets: `%gs`-relative code refers to them),
    /// which relocations resolve to their value, unslid, when no image symbol has the name.
    pub fn with_absolute(mut self, symbols: impl IntoIterator<Item = (String, u64)>) -> Target {
        self.absolute = symbols.into_iter().collect();
        self.absolute.sort();
        self
    }

    /// Rule 6: the patch is for this build. Both ids are compared when both sides have them;
    /// at least one must be comparable.
    pub fn check_identity(&self, patch: &TargetIdentity) -> Result<(), TargetError> {
        let mut compared = false;
        if let (Some(p), Some(g)) = (&patch.build_id, &self.identity.build_id) {
            if p != g {
                return Err(TargetError::BuildId {
                    patch: hex::encode(p),
                    guest: hex::encode(g),
                });
            }
            compared = true;
        }
        if let (Some(p), Some(g)) = (&patch.text_sha256, &self.identity.text_sha256) {
            if p != g {
                return Err(TargetError::TextHash {
                    patch: hex::encode(p),
                    guest: hex::encode(g),
                });
            }
            compared = true;
        }
        if !compared {
            return Err(TargetError::Incomparable {
                what: if patch.build_id.is_some() {
                    "build id"
                } else {
                    "text hash"
                },
            });
        }
        Ok(())
    }

    /// The build as the journal names it, e.g. `build-id:ab12…,text:9f…`.
    pub fn identity_tag(&self) -> String {
        let mut parts = Vec::new();
        if let Some(b) = &self.identity.build_id {
            parts.push(format!("build-id:{}", hex::encode(b)));
        }
        if let Some(t) = &self.identity.text_sha256 {
            parts.push(format!("text:{}", hex::encode(t)));
        }
        parts.join(",")
    }

    /// The address of a symbol, for relocations: unique names only; an absolute symbol (a
    /// per-CPU offset) resolves to its value when no image symbol has the name.
    pub fn symbol(&self, name: &str) -> Option<u64> {
        let mut it = self.symbols.iter().filter(|s| s.name == name);
        let Some(s) = it.next() else {
            // `name,N`: the N-th of several symbols of that name, in address order (a
            // file-local name that is not unique; the source-diff builder names them so).
            if let (base, Some(pos)) = patch_format::split_sympos(name) {
                return self
                    .symbols
                    .iter()
                    .filter(|s| s.name == base)
                    .nth(pos - 1)
                    .map(|s| s.addr.wrapping_add(self.slide));
            }
            let from = self.absolute.partition_point(|(n, _)| n.as_str() < name);
            let mut same = self.absolute[from..].iter().take_while(|(n, _)| n == name);
            let (_, v) = same.next()?;
            return same.next().is_none().then_some(*v);
        };
        it.next().is_none().then(|| s.addr.wrapping_add(self.slide))
    }

    /// The sized function containing `gva`.
    pub fn function_at(&self, gva: u64) -> Option<(u64, u64)> {
        self.containing(gva)
            .map(|s| (s.addr.wrapping_add(self.slide), s.size))
    }

    /// The name of the sized function containing `gva`.
    pub fn function_name_at(&self, gva: u64) -> Option<&str> {
        self.containing(gva).map(|s| s.name.as_str())
    }

    fn containing(&self, gva: u64) -> Option<&ImageSymbol> {
        let addr = gva.wrapping_sub(self.slide);
        let upto = self.symbols.partition_point(|s| s.addr <= addr);
        self.symbols[..upto]
            .iter()
            .rev()
            .take(64)
            .find(|s| s.function && s.size > 0 && addr < s.addr.saturating_add(s.size))
    }

    pub fn resolve(&self, site: &str, loc: &Location) -> Result<Resolved, TargetError> {
        match loc {
            Location::Address(a) => Ok(Resolved {
                gva: *a,
                function: self.function_at(*a),
            }),
            Location::Symbol { name, offset } => {
                let mut named: Vec<&ImageSymbol> =
                    self.symbols.iter().filter(|s| &s.name == name).collect();
                // `name,N`: the N-th of several symbols of that name, in address order.
                if let (true, (base, Some(pos))) =
                    (named.is_empty(), patch_format::split_sympos(name))
                {
                    let all: Vec<&ImageSymbol> =
                        self.symbols.iter().filter(|s| s.name == base).collect();
                    match all.get(pos - 1) {
                        Some(s) => named = vec![*s],
                        None => {
                            return Err(TargetError::NoSymbol {
                                site: site.into(),
                                name: name.clone(),
                            });
                        }
                    }
                }
                let s = match named.as_slice() {
                    [] => {
                        return Err(TargetError::NoSymbol {
                            site: site.into(),
                            name: name.clone(),
                        });
                    }
                    [s] => *s,
                    many => {
                        return Err(TargetError::Ambiguous {
                            site: site.into(),
                            name: name.clone(),
                            count: many.len(),
                        });
                    }
                };
                if s.size > 0 && *offset >= s.size {
                    return Err(TargetError::OffsetOutside {
                        site: site.into(),
                        name: name.clone(),
                        offset: *offset,
                        size: s.size,
                    });
                }
                let start = s.addr.wrapping_add(self.slide);
                Ok(Resolved {
                    gva: start.wrapping_add(*offset),
                    function: (s.function && s.size > 0).then_some((start, s.size)),
                })
            }
        }
    }
}
