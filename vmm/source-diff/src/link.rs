//! The changed functions' new code, linked against the running kernel.
//!
//! Each changed function becomes the code of one function site: its own bytes, then every
//! piece of code it needs that the running kernel does not have (functions the fix adds, its
//! `.cold` fragment, a function it enters anywhere but at the start), then the stubs that
//! replace its jump labels. References inside that code are resolved here (position
//! independent); every other reference becomes a symbolic relocation against the running
//! kernel, resolved at apply time by name (`name,N` where a file-local name is not unique,
//! `docs/source-patches.md`); string literals and unnamed constants become patch data.
//!
//! Every table the compiler or objtool emits about the code is handled or refused, never
//! dropped silently: see [`table_policy`].

use std::collections::BTreeMap;

use linux_guest::Kallsyms;
use patch_format::{DataBlock, RelocKind, RelocTarget, Relocation, limits};
use thiserror::Error;

use crate::elf::{Reloc, SectionClass, SymKind, Unit};
use crate::objdiff::{UnitDiff, shape};

/// The running kernel as the linker sees it: its symbols and its file bytes.
pub struct Kernel<'a> {
    pub vmlinux: &'a [u8],
    pub kallsyms: &'a Kallsyms,
}

/// How one reference of the new code was resolved, for `vmm patch inspect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The post-fix function whose code holds the reference.
    pub from: String,
    /// What the object names.
    pub symbol: String,
    /// What it became: `kernel NAME` (with `,N` when disambiguated), `patch data`, `in patch
    /// code`, `jump label on KEY`.
    pub how: String,
}

/// The code of one site.
#[derive(Debug, Clone)]
pub struct LinkedFunction {
    /// The running kernel's function it replaces (kallsyms name, `,N` when not unique).
    pub kernel_name: String,
    pub code: Vec<u8>,
    pub relocations: Vec<Relocation>,
    /// Post-fix functions carried in the code after the function itself.
    pub carried: Vec<String>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LinkError {
    #[error(
        "{function}+{offset:#x}: refers to {symbol}, which the running kernel does not have \
         (no kallsyms entry of that name){hint}"
    )]
    NotInKernel {
        function: String,
        offset: u64,
        symbol: String,
        hint: &'static str,
    },
    #[error(
        "{function}+{offset:#x}: refers to {symbol}, of which the running kernel has {count} \
         symbols and none or several match this unit's copy (a function by its bytes, a \
         variable by where the unit's other variables are); the fix cannot name the right one: \
         rename the symbol in the fix or build from the matching source"
    )]
    Ambiguous {
        function: String,
        offset: u64,
        symbol: String,
        count: usize,
    },
    #[error(
        "{function}+{offset:#x}: {what}. A function-level live patch cannot carry this; the \
         fix needs rewriting (or a reboot)"
    )]
    Unsupported {
        function: String,
        offset: u64,
        what: String,
    },
    #[error(
        "{function}: the code of the unit does not match the running kernel's {kernel_name} \
         ({why}); the source tree is not the one this kernel was built from (check the \
         version of linux-source and the compiler)"
    )]
    PreMismatch {
        function: String,
        kernel_name: String,
        why: String,
    },
    #[error("{function}: its code is {len} bytes, over the format's {max}-byte limit for a site")]
    TooLarge {
        function: String,
        len: usize,
        max: usize,
    },
}

/// The patch's data blocks, shared by every function linked into one patch.
#[derive(Debug, Default)]
pub struct DataSet {
    pub blocks: Vec<DataBlock>,
    /// (unit tag, section, start, len) of each block, to reuse a block.
    keys: Vec<(usize, usize, u64, u64)>,
}

impl DataSet {
    fn block(
        &mut self,
        unit_tag: usize,
        unit: &Unit,
        sec: usize,
        at: i128,
    ) -> Result<(u32, u64), String> {
        let s = &unit.sections[sec];
        let (start, len) = unit
            .symbol_at(sec, at)
            .map(|i| &unit.symbols[i])
            .filter(|t| t.size > 0)
            .map(|t| (t.value, t.size))
            .unwrap_or((0, s.data.len() as u64));
        let key = (unit_tag, sec, start, len);
        if let Some(i) = self.keys.iter().position(|k| *k == key) {
            return Ok((i as u32, start));
        }
        let end = start + len;
        if s.relocs
            .iter()
            .any(|r| r.offset < end && r.offset + 8 > start)
        {
            return Err(format!(
                "read-only data {}+{start:#x} holds addresses (a table of pointers); patch data \
                 is copied, never relocated",
                s.name
            ));
        }
        let bytes = s
            .data
            .get(start as usize..end as usize)
            .ok_or_else(|| format!("{}+{start:#x} lies outside the section", s.name))?
            .to_vec();
        if bytes.is_empty() || bytes.len() > limits::MAX_DATA {
            return Err(format!(
                "{}+{start:#x}: {} bytes of data",
                s.name,
                bytes.len()
            ));
        }
        let align = if start == 0 {
            s.align
        } else {
            s.align.min(1 << start.trailing_zeros())
        };
        let align = u32::try_from(align.clamp(1, u64::from(limits::MAX_DATA_ALIGN)))
            .map_err(|e| e.to_string())?;
        if self.blocks.len() >= limits::MAX_DATA_BLOCKS {
            return Err("too many data blocks".into());
        }
        self.blocks.push(DataBlock { align, bytes });
        self.keys.push(key);
        Ok(((self.blocks.len() - 1) as u32, start))
    }
}

/// What the linker does with a table section's entries that describe patch code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TablePolicy {
    /// Not needed by code running from the arena; why is in [`table_policy`].
    Ignore,
    /// Turned into code: jump labels.
    JumpLabel,
    /// Acceptable when the described instruction is a paravirt call (the unpatched form is
    /// the indirect call through `pv_ops`, right on every CPU); refused otherwise.
    Alternative,
    /// Refused with the location.
    Refuse(&'static str),
    /// A section this builder does not know: refused as a table where it describes the code
    /// (past a function's start); a pointer to the start of the replaced function is kept
    /// (an object of the kernel's, `rt_sched_class`), and a label in it the code refers to
    /// (`.BTF_ids`) binds to the kernel's copy.
    Unknown,
}

/// The policy for a section of the object that refers to patch code.
///
/// - `.discard.*`: objtool's annotations, dropped by the kernel's own link.
/// - `___ksymtab*`: `EXPORT_SYMBOL` entries, pointing at the kernel's function (redirected).
/// - `__mcount_loc`: ftrace call sites. Patch code does not call `__fentry__` (the call is
///   replaced by a NOP): patched functions are not traceable.
/// - `.orc_unwind_ip`: ORC unwind data. The arena has none, so a stack trace through patch
///   code ends there (the unwinder reports an unknown address), as for any code without ORC.
/// - `.static_call_sites`: the code calls the static call's trampoline, which always jumps
///   to the current target; only the inline fast path is lost.
/// - `.return_sites`, `.retpoline_sites`, `.call_sites`: jumps and calls to the kernel's
///   return and indirect-branch thunks, which the kernel keeps right for the running CPU.
/// - `.smp_locks`: the `lock` prefix stays: correct on every CPU count.
/// - `.ibt_endbr_seal`, `__patchable_function_entries`: `endbr64` stays; harmless.
/// - `.parainstructions`: the indirect call through `pv_ops` stays: correct everywhere.
pub fn table_policy(section: &str) -> TablePolicy {
    match section {
        s if s.starts_with(".discard") => TablePolicy::Ignore,
        // EXPORT_SYMBOL entries: they point at the start of the kernel's function, which its
        // site redirects.
        s if s.starts_with("___ksymtab")
            || s.starts_with("__ksymtab")
            || s.starts_with("___kcrctab") =>
        {
            TablePolicy::Ignore
        }
        "__mcount_loc"
        | ".orc_unwind_ip"
        | ".orc_unwind"
        | ".static_call_sites"
        | ".return_sites"
        | ".retpoline_sites"
        | ".call_sites"
        | ".ibt_endbr_seal"
        | "__patchable_function_entries"
        | ".smp_locks"
        | ".parainstructions" => TablePolicy::Ignore,
        "__jump_table" => TablePolicy::JumpLabel,
        ".altinstructions" => TablePolicy::Alternative,
        "__ex_table" => TablePolicy::Refuse(
            "an exception-table entry (a user access or another faulting instruction with a \
             fixup): the kernel finds fixups only for its own text and modules, so a fault \
             there would oops",
        ),
        "__bug_table" => TablePolicy::Refuse(
            "a WARN()/BUG() (bug-table entry): the kernel finds bug entries only for its own \
             text and modules, so the `ud2` would oops instead of warning; this unit could not \
             be compiled with WARN() as a call (docs/source-patches.md §2)",
        ),
        _ => TablePolicy::Unknown,
    }
}

const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
const ALIGN: usize = 16;

/// Links the new code of every function `diff` says changed.
pub struct Linker<'a> {
    pub kernel: Kernel<'a>,
    /// The pre-fix build compared with the post-fix one (names, variables).
    pub pre: &'a Unit,
    pub post: &'a Unit,
    /// The pre-fix build exactly as the kernel was built: what its bytes are compared with
    /// (the same unit as `pre` unless the comparison used the WARN rewrite).
    pub kernel_pre: &'a Unit,
    pub diff: &'a UnitDiff,
    /// Distinguishes this unit's data blocks from other units' in `data`.
    pub unit_tag: usize,
}

impl<'a> Linker<'a> {
    /// Kernel name (with `,N` when needed) of the pre-build symbol `pre_name`, checked against
    /// the running kernel: the unit's own functions by their bytes (always: a unique name may
    /// be another unit's), its variables by being the only one or by where the unit's other
    /// variables are, other units' symbols by being the only one.
    ///
    /// `called`: the reference is a direct call or jump to the function's start. Then, when
    /// several of the kernel's functions of that name have the unit's bytes (the out-of-line
    /// copies of one `static inline` function in several units), any of them will do if they
    /// also reach the same addresses from every relocated field ([`interchangeable`]): calling
    /// one or another runs the same code on the same data. An address taken is not a call
    /// (code may compare it), and neither is a patch site.
    pub fn kernel_name(
        &self,
        pre_name: &str,
        from: &str,
        offset: u64,
        called: bool,
    ) -> Result<String, LinkError> {
        let mut cands: Vec<&linux_guest::KernelSymbol> = self
            .kernel
            .kallsyms
            .named(pre_name)
            .filter(|s| !s.is_absolute())
            .collect();
        cands.sort_by_key(|s| s.address);
        match cands.len() {
            0 => {
                if self.kernel.kallsyms.named(pre_name).next().is_some() {
                    return Ok(pre_name.to_string()); // a per-CPU symbol
                }
                Err(LinkError::NotInKernel {
                    function: from.to_string(),
                    offset,
                    symbol: pre_name.to_string(),
                    hint: "",
                })
            }
            // A name the unit does not define (another unit's global): unique, so it.
            1 if self.pre.defined(pre_name).is_none()
                && self.kernel_pre.defined(pre_name).is_none() =>
            {
                Ok(pre_name.to_string())
            }
            // The unit's own variable: the kernel has it (same source, same compiler), so the
            // only one of its name is it.
            1 if self
                .kernel_pre
                .defined(pre_name)
                .is_some_and(|i| self.kernel_pre.symbols[i].kind != SymKind::Function) =>
            {
                Ok(pre_name.to_string())
            }
            // The unit's own function, even when its name is unique: the kernel may have
            // inlined it away and have another unit's function of that name, so its bytes
            // must be this unit's.
            n => {
                let Some(sym) = self.kernel_pre.defined(pre_name) else {
                    return Err(LinkError::Ambiguous {
                        function: from.to_string(),
                        offset,
                        symbol: pre_name.to_string(),
                        count: n,
                    });
                };
                let matching: Vec<usize> = if self.kernel_pre.symbols[sym].kind == SymKind::Function
                {
                    let want = shape(self.kernel_pre, sym);
                    let masks = self.kernel_pre.relocs_of(sym);
                    let mut m: Vec<usize> = cands
                        .iter()
                        .enumerate()
                        .filter(|(_, c)| {
                            kernel_matches(self.kernel.vmlinux, c.address, &want.bytes, &masks)
                                .is_ok()
                        })
                        .map(|(i, _)| i)
                        .collect();
                    let addrs: Vec<u64> = m.iter().map(|&i| cands[i].address).collect();
                    if called && m.len() > 1 && interchangeable(&self.kernel, &addrs, &masks) {
                        m.truncate(1);
                    }
                    m
                } else {
                    match self.data_candidates(sym, &cands) {
                        m if m.len() == 1 => m,
                        m => {
                            let by_code = self.code_candidates(sym, &cands);
                            if by_code.len() == 1 { by_code } else { m }
                        }
                    }
                };
                match matching.as_slice() {
                    [_] if n == 1 => Ok(pre_name.to_string()),
                    [i] => Ok(format!("{pre_name},{}", i + 1)),
                    _ => Err(LinkError::Ambiguous {
                        function: from.to_string(),
                        offset,
                        symbol: pre_name.to_string(),
                        count: n,
                    }),
                }
            }
        }
    }

    /// Which of `cands` (kallsyms entries of one name, by address) is the kernel's copy of
    /// variable `sym` of the kernel-layout build (`kernel_pre`, compiled without
    /// `-fdata-sections`, so its data sections are laid out as the unit's part of the kernel's):
    /// the candidates at which every other named variable of the same section, moved by the
    /// same distance, is a kallsyms symbol of its name, and at least one is.
    fn data_candidates(&self, sym: usize, cands: &[&linux_guest::KernelSymbol]) -> Vec<usize> {
        let u = self.kernel_pre;
        let s = &u.symbols[sym];
        let Some(sec) = s.section else {
            return Vec::new();
        };
        let others: Vec<&crate::elf::Symbol> = u
            .symbols
            .iter()
            .enumerate()
            .filter(|(i, o)| {
                *i != sym
                    && o.section == Some(sec)
                    && !o.name.is_empty()
                    && matches!(o.kind, SymKind::Object | SymKind::Other)
            })
            .map(|(_, o)| o)
            .collect();
        cands
            .iter()
            .enumerate()
            .filter(|(_, c)| {
                let mut confirmed = 0;
                for o in &others {
                    let at = c.address.wrapping_add(o.value).wrapping_sub(s.value);
                    let mut named = self.kernel.kallsyms.named(&o.name).peekable();
                    if named.peek().is_none() {
                        continue; // not in kallsyms: says nothing
                    }
                    if named.any(|k| k.address == at) {
                        confirmed += 1;
                    } else {
                        return false;
                    }
                }
                confirmed > 0
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// Which of `cands` the running kernel's own code says is the kernel's copy of variable
    /// `sym`: a function of the unit that refers to it and is in the kernel with the unit's
    /// bytes (relocated fields aside) holds, in the kernel image, the linked value of that
    /// reference, from which the variable's address follows. For a variable no named
    /// neighbour places (`WARN_ONCE`'s `__already_done.N`, alone in `.data.once`): the old
    /// function's own reference says which one it used.
    fn code_candidates(&self, sym: usize, cands: &[&linux_guest::KernelSymbol]) -> Vec<usize> {
        let u = self.kernel_pre;
        let s = &u.symbols[sym];
        let Some(sec) = s.section else {
            return Vec::new();
        };
        let mut found: Vec<usize> = Vec::new();
        for (f, fs) in u.functions() {
            let relocs = u.relocs_of(f);
            let uses: Vec<&Reloc> = relocs
                .iter()
                .filter(|r| {
                    let t = &u.symbols[r.symbol];
                    if t.kind == SymKind::Section {
                        let at = r.pointed(u);
                        t.section == Some(sec)
                            && at >= i128::from(s.value)
                            && at < i128::from(s.value) + i128::from(s.size.max(1))
                    } else {
                        r.symbol == sym
                    }
                })
                .collect();
            if uses.is_empty() {
                continue;
            }
            // The kernel's copy of this function: the one candidate of its name with its bytes.
            let want = shape(u, f);
            let copies: Vec<u64> = self
                .kernel
                .kallsyms
                .named(&fs.name)
                .filter(|k| k.is_text())
                .filter(|k| {
                    kernel_matches(self.kernel.vmlinux, k.address, &want.bytes, &relocs).is_ok()
                })
                .map(|k| k.address)
                .collect();
            let [at] = copies.as_slice() else {
                continue;
            };
            for r in uses {
                let Some(width) = r.width() else { continue };
                let field_at = at.wrapping_add(r.offset);
                let Some(bytes) =
                    linux_guest::patch::file_bytes(self.kernel.vmlinux, field_at, width as usize)
                else {
                    continue;
                };
                // The linked field is S + A (- P when PC-relative): S, the symbol's address.
                let field = match width {
                    4 => i128::from(i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])),
                    _ => {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&bytes[..8]);
                        i128::from(u64::from_le_bytes(b))
                    }
                };
                let mut target = field - i128::from(r.addend);
                if r.is_pc_relative() {
                    target += i128::from(field_at);
                }
                let t = &u.symbols[r.symbol];
                if t.kind == SymKind::Section {
                    target += i128::from(s.value) - i128::from(t.value);
                }
                let target = (target.rem_euclid(1 << 64)) as u64;
                for (i, c) in cands.iter().enumerate() {
                    if c.address == target && !found.contains(&i) {
                        found.push(i);
                    }
                }
            }
        }
        found
    }

    /// The run-pre check of one changed function: the unit's pre-fix code is the running
    /// kernel's, relocated fields aside. Returns the kernel name.
    pub fn check_pre(&self, pre_name: &str) -> Result<String, LinkError> {
        // One function of that name: compared below (a mismatch is named as one). Several: the
        // one whose bytes are the unit's, or none matches.
        let unique = self
            .kernel
            .kallsyms
            .named(pre_name)
            .filter(|s| !s.is_absolute())
            .count()
            == 1;
        let name = if unique {
            pre_name.to_string()
        } else {
            self.kernel_name(pre_name, pre_name, 0, false)
                .map_err(|e| match e {
                    LinkError::Ambiguous { count, .. } => LinkError::PreMismatch {
                        function: pre_name.to_string(),
                        kernel_name: pre_name.to_string(),
                        why: format!(
                            "none of the kernel's {count} functions of that name has its code"
                        ),
                    },
                    other => other,
                })?
        };
        let (base, pos) = patch_format::split_sympos(&name);
        let mut cands: Vec<&linux_guest::KernelSymbol> = self
            .kernel
            .kallsyms
            .named(base)
            .filter(|s| !s.is_absolute())
            .collect();
        cands.sort_by_key(|s| s.address);
        let Some(k) = cands.get(pos.map_or(0, |p| p - 1)) else {
            return Err(LinkError::NotInKernel {
                function: pre_name.to_string(),
                offset: 0,
                symbol: pre_name.to_string(),
                hint: "",
            });
        };
        if !k.is_text() {
            return Err(LinkError::PreMismatch {
                function: pre_name.to_string(),
                kernel_name: name,
                why: format!("the kernel's symbol is of type {:?}, not code", k.kind),
            });
        }
        let Some(sym) = self.kernel_pre.defined(pre_name) else {
            return Err(LinkError::PreMismatch {
                function: pre_name.to_string(),
                kernel_name: name,
                why: "the pre-fix unit does not define it".into(),
            });
        };
        let want = shape(self.kernel_pre, sym);
        kernel_matches(
            self.kernel.vmlinux,
            k.address,
            &want.bytes,
            &self.kernel_pre.relocs_of(sym),
        )
        .map_err(|why| LinkError::PreMismatch {
            function: pre_name.to_string(),
            kernel_name: name.clone(),
            why,
        })?;
        Ok(name)
    }

    /// The post-build symbol a relocation lands on (a section symbol turned into the function
    /// or object at the pointed offset) and the offset into it.
    fn landing(&self, r: &Reloc) -> (usize, i128) {
        let u = self.post;
        let s = &u.symbols[r.symbol];
        if s.kind == SymKind::Section
            && let Some(sec) = s.section
            && let Some(t) = u.symbol_at(sec, r.pointed(u))
        {
            return (t, r.pointed(u) - i128::from(u.symbols[t].value));
        }
        (r.symbol, r.pointed(u) - i128::from(s.value))
    }

    /// Whether post function `t` is carried in the code of a function that refers to it at
    /// offset `into`: new code, a `.cold` fragment, or code entered other than at its start.
    fn must_carry(&self, t: usize, into: i128) -> bool {
        let name = &self.post.symbols[t].name;
        let Some(pre_name) = self.diff.correlated.get(name) else {
            return true;
        };
        if name.ends_with(".cold") || into != 0 {
            return true;
        }
        // Not out of line in the kernel's own build (inlined into its callers there): the
        // kernel has no copy of it to call.
        self.kernel_pre
            .defined(pre_name)
            .is_none_or(|i| self.kernel_pre.symbols[i].kind != SymKind::Function)
            || self.kernel.kallsyms.named(pre_name).next().is_none()
    }

    /// Links the post-fix function `post_name`, which replaces `kernel_name`.
    pub fn link(
        &self,
        post_name: &str,
        kernel_name: &str,
        data: &mut DataSet,
        resolved: &mut Vec<Resolved>,
    ) -> Result<LinkedFunction, LinkError> {
        let u = self.post;
        let root = u.defined(post_name).ok_or_else(|| LinkError::Unsupported {
            function: post_name.to_string(),
            offset: 0,
            what: "the post-fix unit does not define it".into(),
        })?;
        // 1. The members: the function and what it must carry, transitively.
        let mut members = vec![root];
        let mut i = 0;
        while i < members.len() {
            for r in u.relocs_of(members[i]) {
                let (t, into) = self.landing(&r);
                if u.symbols[t].kind == SymKind::Function
                    && u.symbols[t].section.is_some()
                    && !members.contains(&t)
                    && self.must_carry(t, into)
                {
                    members.push(t);
                }
            }
            i += 1;
        }
        // 2. Layout.
        let mut code: Vec<u8> = Vec::new();
        let mut at: BTreeMap<usize, usize> = BTreeMap::new();
        for &m in &members {
            while !code.len().is_multiple_of(ALIGN) {
                code.push(0xcc);
            }
            at.insert(m, code.len());
            code.extend_from_slice(u.bytes_of(m).unwrap_or_default());
        }
        // The member holding (section, offset), its code offset and the offset in it.
        let member_at = |sec: usize, off: i128| -> Option<(usize, usize, u64)> {
            members.iter().find_map(|&m| {
                let s = &u.symbols[m];
                (s.section == Some(sec)
                    && off >= i128::from(s.value)
                    && off < i128::from(s.value + s.size))
                .then(|| {
                    let inside = (off - i128::from(s.value)) as usize;
                    (m, at[&m] + inside, inside as u64)
                })
            })
        };
        let mut relocs: Vec<Relocation> = Vec::new();
        let name_of = |m: usize| u.symbols[m].name.clone();
        // 3. References of the members.
        for &m in &members {
            let base = at[&m];
            let from = name_of(m);
            for r in u.relocs_of(m) {
                let field = base + r.offset as usize;
                let width = r.width().ok_or_else(|| LinkError::Unsupported {
                    function: from.clone(),
                    offset: r.offset,
                    what: format!("relocation type {} is not supported", r.r_type),
                })? as usize;
                // The field must lie inside the member (an object could say otherwise).
                let member_end = base + u.symbols[m].size as usize;
                if field + width > member_end.min(code.len()) {
                    return Err(LinkError::Unsupported {
                        function: from.clone(),
                        offset: r.offset,
                        what: "a relocation runs past the end of the function".into(),
                    });
                }
                let (t, into) = self.landing(&r);
                let ts = &u.symbols[t];
                // `call __fentry__` in the prologue: patch code is not traced.
                if ts.name == "__fentry__" && r.offset <= 16 && r.offset >= 1 {
                    let op = field - 1;
                    if code.get(op) == Some(&0xe8) && op + 5 <= member_end {
                        code[op..op + 5].copy_from_slice(&NOP5);
                        continue;
                    }
                }
                code[field..field + width].fill(0);
                let kind = reloc_kind(&r).ok_or_else(|| LinkError::Unsupported {
                    function: from.clone(),
                    offset: r.offset,
                    what: format!("relocation type {} is not supported", r.r_type),
                })?;
                // (a) Into the code itself: resolved now.
                if let Some(&tm) = at.get(&t) {
                    if !r.is_pc_relative() || width != 4 {
                        return Err(LinkError::Unsupported {
                            function: from,
                            offset: r.offset,
                            what: format!(
                                "takes the absolute address of {} (code carried in the patch); \
                                 only calls and jumps to it can be placed",
                                ts.name
                            ),
                        });
                    }
                    let target = tm as i128 + into;
                    let v = target - (field as i128 + 4);
                    code[field..field + 4].copy_from_slice(&(v as i32).to_le_bytes());
                    continue;
                }
                let sec_class = ts.section.map(|i| u.sections[i].class);
                let named = ts.kind != SymKind::Section
                    && !ts.name.is_empty()
                    && !ts.name.starts_with(".L");
                let addend = |into: i128| -> i64 {
                    (into - if r.is_pc_relative() { width as i128 } else { 0 }) as i64
                };
                // The kernel symbol the reference binds to, and the addend: (b)–(e), (g).
                let mut bind: Option<(String, i64)> = None;
                match (ts.section, sec_class) {
                    // (b) Undefined: a kernel global (or per-CPU) symbol.
                    (None, _) => {
                        bind = Some((ts.name.clone(), r.addend));
                    }
                    // (c) Code of the unit not carried: the kernel's function (a changed one
                    //     is redirected to its new code by its own site).
                    (Some(_), Some(SectionClass::Text)) if named => {
                        let pre_name = self.diff.correlated.get(&ts.name).ok_or_else(|| {
                            LinkError::Unsupported {
                                function: from.clone(),
                                offset: r.offset,
                                what: format!("refers to {} which only the fix has", ts.name),
                            }
                        })?;
                        bind = Some((pre_name.clone(), addend(into)));
                    }
                    // (d) Variables: always the running kernel's copy, never a fresh one.
                    (Some(_), Some(SectionClass::Writable)) if named => {
                        let pre_name =
                            self.pre_variable(&ts.name)
                                .ok_or_else(|| LinkError::Unsupported {
                                    function: from.clone(),
                                    offset: r.offset,
                                    what: format!(
                                        "uses variable {} which the fix adds; a live patch cannot \
                                     allocate writable data (and a new `static` inside a \
                                     function is one: pr_*_once, WARN_ONCE, DO_ONCE)",
                                        ts.name
                                    ),
                                })?;
                        bind = Some((pre_name, addend(into)));
                    }
                    // (e) Named read-only objects the kernel has: its copy when it holds
                    //     pointers (a copy would not be relocated) or is global (its address
                    //     may be compared). A file-local constant of plain bytes (`__func__`,
                    //     a lookup table) is carried as data (f), as a string literal is:
                    //     its name is rarely unique in the kernel.
                    (Some(_), Some(SectionClass::ReadOnly))
                        if named
                            && self.pre_variable(&ts.name).is_some()
                            && (!ts.local || self.holds_addresses(t)) =>
                    {
                        let pre_name = self.pre_variable(&ts.name).unwrap_or_default();
                        bind = Some((pre_name, addend(into)));
                    }
                    // (f) Strings and constants: carried as patch data.
                    (Some(sec), Some(SectionClass::Strings | SectionClass::ReadOnly)) => {
                        let pointed = r.pointed(u);
                        let (block, start) =
                            data.block(self.unit_tag, u, sec, pointed).map_err(|what| {
                                LinkError::Unsupported {
                                    function: from.clone(),
                                    offset: r.offset,
                                    what,
                                }
                            })?;
                        // S = the block; A = the ELF addend made relative to the block (the
                        // ELF S is the relocation's own symbol, not the one it lands on).
                        let a = i128::from(u.symbols[r.symbol].value) + i128::from(r.addend)
                            - i128::from(start);
                        resolved.push(Resolved {
                            from: from.clone(),
                            symbol: if named {
                                ts.name.clone()
                            } else {
                                u.sections[sec].name.clone()
                            },
                            how: format!("patch data[{block}]"),
                        });
                        relocs.push(Relocation {
                            offset: field as u32,
                            kind,
                            target: RelocTarget::Data(block),
                            addend: a as i64,
                        });
                    }
                    // (g) Named data in a table the kernel's own link fills (`.BTF_ids`:
                    //     BTF ids resolved by resolve_btfids): the kernel's copy.
                    (Some(_), Some(SectionClass::OtherAlloc))
                        if named
                            && table_policy(&u.sections[ts.section.unwrap_or(0)].name)
                                == TablePolicy::Unknown
                            && self.pre_variable(&ts.name).is_some() =>
                    {
                        let pre_name = self.pre_variable(&ts.name).unwrap_or_default();
                        bind = Some((pre_name, addend(into)));
                    }
                    (Some(sec), _) => {
                        return Err(LinkError::Unsupported {
                            function: from,
                            offset: r.offset,
                            what: format!(
                                "refers to {} in section {}, which a patch cannot reach",
                                if named { ts.name.as_str() } else { "data" },
                                u.sections[sec].name
                            ),
                        });
                    }
                }
                if let Some((pre_name, addend)) = bind {
                    // `call`/`jmp rel32` (or a `jcc rel32`) to the start of a function.
                    let called = matches!(r.r_type, crate::elf::r::PC32 | crate::elf::r::PLT32)
                        && r.addend == -4
                        && u.symbols[t].kind == SymKind::Function
                        && direct_branch(&code, field);
                    self.bind_kernel(
                        &pre_name,
                        &ts.name,
                        &from,
                        r.offset,
                        (field, kind, addend),
                        called,
                        resolved,
                        &mut relocs,
                    )?;
                }
            }
        }
        // 4. Tables describing the members.
        let paravirt = self.table_targets(".parainstructions", 16, 0);
        for sec in &u.sections {
            if matches!(sec.class, SectionClass::Text | SectionClass::NotAlloc)
                && !sec.name.starts_with(".discard")
            {
                continue;
            }
            let refs_members = sec.relocs.iter().any(|r| {
                let (t, _) = self.landing(r);
                members.contains(&t)
            });
            if !refs_members {
                continue;
            }
            match sec.class {
                SectionClass::Writable | SectionClass::ReadOnly | SectionClass::Strings => {
                    // Pointers from data to the code: fine at a function's start (the kernel's
                    // copy of the data points at the kernel's function, redirected by its
                    // site); anything else is a label's address.
                    for r in &sec.relocs {
                        let (t, into) = self.landing(r);
                        if members.contains(&t) && (into != 0 || t != root) {
                            return Err(LinkError::Unsupported {
                                function: name_of(t),
                                offset: into.max(0) as u64,
                                what: format!(
                                    "its address is stored in data ({}): only the start of a \
                                     replaced function may be",
                                    sec.name
                                ),
                            });
                        }
                    }
                    continue;
                }
                _ => {}
            }
            match table_policy(&sec.name) {
                TablePolicy::Ignore => {}
                TablePolicy::JumpLabel => {
                    self.jump_labels(sec, &member_at, &mut code, &mut relocs, resolved, &name_of)?;
                }
                TablePolicy::Alternative => {
                    for e in 0..sec.data.len() / 12 {
                        let off = (e * 12) as u64;
                        let Some(r) = sec.relocs.iter().find(|r| r.offset == off) else {
                            continue;
                        };
                        let site = self.location(r);
                        if let Some((m, _, inside)) = site.and_then(|(s, o)| member_at(s, o)) {
                            if site.is_some_and(|s| paravirt.contains(&s)) {
                                continue;
                            }
                            let feature =
                                u16::from_le_bytes([sec.data[e * 12 + 8], sec.data[e * 12 + 9]]);
                            return Err(LinkError::Unsupported {
                                function: name_of(m),
                                offset: inside,
                                what: format!(
                                    "an alternative (code chosen at boot by CPU feature \
                                     {}*32+{}) that is not a paravirt call; its unpatched form \
                                     may be wrong on this CPU",
                                    feature >> 5,
                                    feature & 31
                                ),
                            });
                        }
                    }
                }
                policy @ (TablePolicy::Refuse(_) | TablePolicy::Unknown) => {
                    let why = match policy {
                        TablePolicy::Refuse(why) => why,
                        _ => "an entry of a kernel table this builder does not know",
                    };
                    for r in &sec.relocs {
                        if let Some((m, _, inside)) =
                            self.location(r).and_then(|(s, o)| member_at(s, o))
                        {
                            // A kernel object of its own section (`rt_sched_class` in
                            // `__rt_sched_class`) pointing at the start of the replaced
                            // function: as from data, the kernel's copy points at the kernel's
                            // function, which its site redirects. The object is compared
                            // before and after like any variable (`objdiff`).
                            if policy == TablePolicy::Unknown && m == root && inside == 0 {
                                continue;
                            }
                            return Err(LinkError::Unsupported {
                                function: name_of(m),
                                offset: inside,
                                what: format!("{why} (section {})", sec.name),
                            });
                        }
                    }
                }
            }
        }
        if code.len() > limits::MAX_CODE {
            return Err(LinkError::TooLarge {
                function: post_name.to_string(),
                len: code.len(),
                max: limits::MAX_CODE,
            });
        }
        relocs.sort_by_key(|r| r.offset);
        Ok(LinkedFunction {
            kernel_name: kernel_name.to_string(),
            code,
            relocations: relocs,
            carried: members[1..].iter().map(|&m| name_of(m)).collect(),
        })
    }

    /// The pre-build name of post-build variable `post_name`: a numbered static local through
    /// its binding, anything else by its own name.
    fn pre_variable(&self, post_name: &str) -> Option<String> {
        if let Some(p) = self.diff.locals.get(post_name) {
            return Some(p.clone());
        }
        if crate::elf::normalized_name(post_name) != post_name {
            return None;
        }
        self.pre.defined(post_name).map(|_| post_name.to_string())
    }

    /// A reference of the new code bound to the running kernel's `pre_name` (the unit's name
    /// for it, disambiguated by [`Linker::kernel_name`]): the relocation, and its line for
    /// `inspect`. `at` is the field's offset in the code, its kind and the addend.
    #[allow(clippy::too_many_arguments)]
    fn bind_kernel(
        &self,
        pre_name: &str,
        symbol: &str,
        from: &str,
        offset: u64,
        at: (usize, RelocKind, i64),
        called: bool,
        resolved: &mut Vec<Resolved>,
        relocs: &mut Vec<Relocation>,
    ) -> Result<(), LinkError> {
        let name = self.kernel_name(pre_name, from, offset, called)?;
        resolved.push(Resolved {
            from: from.to_string(),
            symbol: symbol.to_string(),
            how: format!("kernel {name}"),
        });
        let (field, kind, addend) = at;
        relocs.push(Relocation::symbol(field as u32, kind, name, addend));
        Ok(())
    }

    /// Whether post-build object `sym` has relocations in its bytes (holds addresses).
    fn holds_addresses(&self, sym: usize) -> bool {
        !self.post.relocs_of(sym).is_empty()
    }

    /// (section, offset) a relocation points at.
    fn location(&self, r: &Reloc) -> Option<(usize, i128)> {
        let u = self.post;
        let s = &u.symbols[r.symbol];
        let sec = s.section?;
        // A table field (PC-relative or absolute) locates S + A: the kernel adds the
        // field's own address back; no instruction length is involved.
        Some((sec, i128::from(s.value) + i128::from(r.addend)))
    }

    /// The code locations the entries of table `name` (entries of `size` bytes, the
    /// location's relocation at `field`) point at.
    fn table_targets(&self, name: &str, size: u64, field: u64) -> Vec<(usize, i128)> {
        let u = self.post;
        let Some(sec) = u.sections.iter().find(|s| s.name == name) else {
            return Vec::new();
        };
        sec.relocs
            .iter()
            .filter(|r| r.offset % size == field)
            .filter_map(|r| self.location(r))
            .collect()
    }

    /// Replaces each jump label of the members by a jump to a stub that tests the key, as
    /// `static_key_enabled()` does: the site jumps iff the key is enabled XOR the entry's
    /// branch bit (the kernel's `jump_label_type()`).
    #[allow(clippy::too_many_arguments)]
    fn jump_labels(
        &self,
        sec: &crate::elf::Section,
        member_at: &dyn Fn(usize, i128) -> Option<(usize, usize, u64)>,
        code: &mut Vec<u8>,
        relocs: &mut Vec<Relocation>,
        resolved: &mut Vec<Resolved>,
        name_of: &dyn Fn(usize) -> String,
    ) -> Result<(), LinkError> {
        let u = self.post;
        for e in 0..(sec.data.len() / 16) as u64 {
            let field = |f: u64| sec.relocs.iter().find(|r| r.offset == e * 16 + f);
            let (Some(rc), Some(rt), Some(rk)) = (field(0), field(4), field(8)) else {
                continue;
            };
            let Some((m, s, off_in)) = self.location(rc).and_then(|(sec, o)| member_at(sec, o))
            else {
                continue;
            };
            let from = name_of(m);
            let Some((_, t, _)) = self.location(rt).and_then(|(sec, o)| member_at(sec, o)) else {
                return Err(LinkError::Unsupported {
                    function: from,
                    offset: off_in,
                    what: "a jump label whose target is outside the function".into(),
                });
            };
            let site = code.get(s..s + 5).unwrap_or_default();
            let five = site == NOP5 || site.first() == Some(&0xe9);
            if !five {
                return Err(LinkError::Unsupported {
                    function: from,
                    offset: off_in,
                    what: "a 2-byte jump label (jmp rel8 or a 2-byte NOP); only 5-byte ones can \
                           be rewritten"
                        .into(),
                });
            }
            // The key: S + A of the PC64 field, the low two bits flags (bit 0: branch).
            let ks = &u.symbols[rk.symbol];
            let key_at = i128::from(rk.addend);
            let branch = key_at & 1 == 1;
            let key_addend = (key_at & !3) as i64;
            let (key_name, key_addend) = if ks.kind == SymKind::Section {
                let sec_i = ks.section.unwrap_or(0);
                let t = u.symbol_at(sec_i, i128::from(ks.value) + i128::from(key_addend));
                match t {
                    Some(t) => (
                        u.symbols[t].name.clone(),
                        key_addend + ks.value as i64 - u.symbols[t].value as i64,
                    ),
                    None => {
                        return Err(LinkError::Unsupported {
                            function: from,
                            offset: off_in,
                            what: "a jump label whose key is not a named variable".into(),
                        });
                    }
                }
            } else {
                (ks.name.clone(), key_addend)
            };
            let kernel_key = if ks.section.is_some() {
                let pre = self
                    .pre_variable(&key_name)
                    .ok_or_else(|| LinkError::Unsupported {
                        function: from.clone(),
                        offset: off_in,
                        what: format!("a jump label on key {key_name}, which the fix adds"),
                    })?;
                self.kernel_name(&pre, &from, off_in, false)?
            } else {
                self.kernel_name(&key_name, &from, off_in, false)?
            };
            // Stub: cmpl $0, key(%rip); jg/jle target; jmp back.
            while !code.len().is_multiple_of(2) {
                code.push(0xcc);
            }
            let stub = code.len();
            code.extend_from_slice(&[0x83, 0x3d, 0, 0, 0, 0, 0x00]);
            relocs.push(Relocation::symbol(
                (stub + 2) as u32,
                RelocKind::Rel32,
                kernel_key.clone(),
                key_addend - 5,
            ));
            let jcc = code.len();
            code.extend_from_slice(&[0x0f, if branch { 0x8e } else { 0x8f }, 0, 0, 0, 0]);
            let d = t as i64 - (jcc as i64 + 6);
            code[jcc + 2..jcc + 6].copy_from_slice(&(d as i32).to_le_bytes());
            let back = code.len();
            code.extend_from_slice(&[0xe9, 0, 0, 0, 0]);
            let d = (s as i64 + 5) - (back as i64 + 5);
            code[back + 1..back + 5].copy_from_slice(&(d as i32).to_le_bytes());
            // The site: jmp stub.
            let d = stub as i64 - (s as i64 + 5);
            code[s] = 0xe9;
            code[s + 1..s + 5].copy_from_slice(&(d as i32).to_le_bytes());
            resolved.push(Resolved {
                from,
                symbol: key_name,
                how: format!(
                    "jump label on kernel {kernel_key}{}, tested in patch code",
                    if branch { " (branch)" } else { "" }
                ),
            });
        }
        Ok(())
    }
}

fn reloc_kind(r: &Reloc) -> Option<RelocKind> {
    use crate::elf::r;
    Some(match r.r_type {
        r::PC32 | r::PLT32 => RelocKind::Rel32,
        r::ABS64 => RelocKind::Abs64,
        r::ABS32 => RelocKind::Abs32,
        r::ABS32S => RelocKind::Abs32S,
        _ => return None,
    })
}

/// Whether the 32-bit field at `field` of `code` is the displacement of a `call`, `jmp` or
/// `jcc` with a 32-bit displacement.
fn direct_branch(code: &[u8], field: usize) -> bool {
    let at = |back: usize| field.checked_sub(back).and_then(|i| code.get(i)).copied();
    matches!(at(1), Some(0xe8 | 0xe9))
        || (at(2) == Some(0x0f) && matches!(at(1), Some(0x80..=0x8f)))
}

/// Whether the kernel's functions at `addrs`, whose bytes are the same but for the fields of
/// `masks`, reach the same addresses from each of those fields (a PC-relative field from its
/// own place): then they are the same code on the same data. None may be boot-time code the
/// kernel has freed (`_sinittext`..`_einittext`).
fn interchangeable(kernel: &Kernel<'_>, addrs: &[u64], masks: &[Reloc]) -> bool {
    let bound = |name: &str| kernel.kallsyms.named(name).next().map(|s| s.address);
    if let (Some(a), Some(b)) = (bound("_sinittext"), bound("_einittext"))
        && addrs.iter().any(|x| (a..b).contains(x))
    {
        return false;
    }
    let targets = |base: u64| -> Option<Vec<i128>> {
        masks
            .iter()
            .map(|r| {
                let w = r.width()? as usize;
                let at = base + r.offset;
                let f = linux_guest::patch::file_bytes(kernel.vmlinux, at, w)?;
                let v: i128 = match w {
                    4 if r.r_type == crate::elf::r::ABS32 => {
                        i128::from(u32::from_le_bytes(f.try_into().ok()?))
                    }
                    4 => i128::from(i32::from_le_bytes(f.try_into().ok()?)),
                    8 => i128::from(i64::from_le_bytes(f.try_into().ok()?)),
                    _ => return None,
                };
                Some(if r.is_pc_relative() {
                    v + i128::from(at)
                } else {
                    v
                })
            })
            .collect()
    };
    let Some(first) = addrs.first().and_then(|&a| targets(a)) else {
        return false;
    };
    addrs[1..]
        .iter()
        .all(|&a| targets(a).as_ref() == Some(&first))
}

/// Whether the file bytes at `addr` are `want` (the pre-build code, relocated fields zero),
/// with the same fields masked.
pub fn kernel_matches(
    vmlinux: &[u8],
    addr: u64,
    want: &[u8],
    masks: &[Reloc],
) -> Result<(), String> {
    let got = linux_guest::patch::file_bytes(vmlinux, addr, want.len())
        .ok_or_else(|| format!("no file bytes at {addr:#x}"))?;
    let mut got = got.to_vec();
    for r in masks {
        let w = r.width().unwrap_or(4) as usize;
        let o = r.offset as usize;
        let end = (o + w).min(want.len());
        if let Some(f) = got.get_mut(o..end) {
            f.fill(0);
        }
    }
    match got.iter().zip(want).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(p) => Err(format!(
            "first difference at +{p:#x}: kernel {:#04x}, unit {:#04x}",
            got[p], want[p]
        )),
    }
}
