//! Which functions a fix changes: the unit compiled before and after, compared per function,
//! as kpatch's create-diff-object does.
//!
//! Two versions of a function are the same when their bytes are equal with every relocated
//! field masked and their relocations point at the same things. "The same thing" is compared
//! by meaning, not by position, because positions shift whenever anything else in the unit
//! changes: a named symbol by its name without GCC's numbered suffixes
//! ([`crate::elf::normalized_name`]), a string literal by its text, an unnamed constant by its
//! bytes. A reference made through a section symbol (the assembler's habit for file-local
//! symbols) is first turned back into the symbol it lands on.
//!
//! What changes because an inline function or a macro changed shows up by itself: every
//! function it was inlined into compiles to different bytes.

use std::collections::{BTreeMap, BTreeSet};

use crate::elf::{SectionClass, SymKind, Unit, normalized_name};

/// What a reference points at, compared across the two builds.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Referent {
    /// A named symbol (defined in the unit or not), numbered suffixes dropped, and the offset
    /// into it.
    Named(String, i128),
    /// A string literal: its bytes up to the NUL, and the offset into it.
    Str(Vec<u8>, i128),
    /// Unnamed read-only data: the section's bytes and the offset.
    Const(Vec<u8>, i128),
    /// Anything else: section name and offset.
    Section(String, i128),
}

/// One relocation of a function, position-independent.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ref {
    pub offset: u64,
    pub r_type: u32,
    pub referent: Referent,
}

/// The referent of relocation `r` of `unit`.
pub fn referent(unit: &Unit, r: &crate::elf::Reloc) -> Referent {
    let s = &unit.symbols[r.symbol];
    // The field points `pointed - value` bytes into the symbol; written relative to the
    // symbol itself so it stays the same however the section is laid out.
    let addend_in = |value: u64| r.pointed(unit) - i128::from(value);
    // An assembler-local label the assembler kept (`.LC3`, a string's) names nothing stable:
    // compared through its section, as a section symbol is.
    if s.kind != SymKind::Section && !s.name.starts_with(".L") {
        return Referent::Named(normalized_name(&s.name), addend_in(s.value));
    }
    let Some(sec_idx) = s.section else {
        return Referent::Section(String::new(), i128::from(r.addend));
    };
    let sec = &unit.sections[sec_idx];
    let at = r.pointed(unit);
    if let Some(t) = unit.symbol_at(sec_idx, at) {
        let t = &unit.symbols[t];
        return Referent::Named(normalized_name(&t.name), at - i128::from(t.value));
    }
    match sec.class {
        SectionClass::Strings => {
            // The string containing `at`: back to the previous NUL, up to the next.
            let Ok(at_u) = usize::try_from(at) else {
                return Referent::Section(sec.name.clone(), at);
            };
            let at_u = at_u.min(sec.data.len());
            let start = sec.data[..at_u]
                .iter()
                .rposition(|&b| b == 0)
                .map_or(0, |p| p + 1);
            let end = sec.data[at_u..]
                .iter()
                .position(|&b| b == 0)
                .map_or(sec.data.len(), |p| at_u + p);
            Referent::Str(sec.data[start..end].to_vec(), at - start as i128)
        }
        SectionClass::ReadOnly => Referent::Const(sec.data.clone(), at),
        _ => Referent::Section(normalized_name(&sec.name), at),
    }
}

/// A function's comparable form: masked bytes and references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    pub bytes: Vec<u8>,
    pub refs: Vec<Ref>,
}

/// The comparable form of defined symbol `sym`.
pub fn shape(unit: &Unit, sym: usize) -> Shape {
    let mut bytes = unit.bytes_of(sym).map(<[u8]>::to_vec).unwrap_or_default();
    let relocs = unit.relocs_of(sym);
    let mut refs = Vec::with_capacity(relocs.len());
    for r in &relocs {
        let w = r.width().unwrap_or(4) as usize;
        let o = r.offset as usize;
        let end = (o + w).min(bytes.len());
        if let Some(f) = bytes.get_mut(o..end) {
            f.fill(0);
        }
        refs.push(Ref {
            offset: r.offset,
            r_type: r.r_type,
            referent: referent(unit, r),
        });
    }
    Shape { bytes, refs }
}

/// How the post-fix unit differs from the pre-fix one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitDiff {
    /// Functions in both builds whose code differs: (pre name, post name). The pre name is
    /// the running kernel's name of the function.
    pub changed: Vec<(String, String)>,
    /// Functions only in the post build (their code must be carried).
    pub added: Vec<String>,
    /// Functions only in the pre build (inlined away or deleted by the fix).
    pub removed: Vec<String>,
    /// Variables in both builds whose initial contents differ: (pre name, post name, section).
    pub data_changed: Vec<(String, String, String)>,
    /// Variables only in the post build: (name, section).
    pub data_added: Vec<(String, String)>,
    /// Functions of the pre build correlated with the post build: post name → pre name.
    pub correlated: BTreeMap<String, String>,
    /// Numbered static locals of the post build bound to the pre build's (post → pre name):
    /// the running kernel's copy is the pre name's.
    pub locals: BTreeMap<String, String>,
}

/// Pairs symbols of the two builds by exact name, then by normalized name where that is unique
/// on both sides (a clone renumbered: `foo.isra.0` → `foo.isra.1`).
fn correlate<'u>(
    pre: impl Iterator<Item = &'u str>,
    post: impl Iterator<Item = &'u str>,
) -> (BTreeMap<String, String>, Vec<String>, Vec<String>) {
    let pre: BTreeSet<&str> = pre.collect();
    let post: BTreeSet<&str> = post.collect();
    let mut pairs = BTreeMap::new();
    for n in post.intersection(&pre) {
        pairs.insert(n.to_string(), n.to_string());
    }
    let unpaired_pre: Vec<&str> = pre.iter().filter(|n| !post.contains(*n)).copied().collect();
    let unpaired_post: Vec<&str> = post.iter().filter(|n| !pre.contains(*n)).copied().collect();
    let by_norm = |names: &[&str]| {
        let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for n in names {
            m.entry(normalized_name(n)).or_default().push(n.to_string());
        }
        m
    };
    let (np, nq) = (by_norm(&unpaired_pre), by_norm(&unpaired_post));
    for (norm, posts) in &nq {
        if let (Some(pres), [post]) = (np.get(norm), posts.as_slice())
            && let [pre] = pres.as_slice()
        {
            pairs.insert(post.clone(), pre.clone());
        }
    }
    let paired_pre: BTreeSet<&String> = pairs.values().collect();
    let added = unpaired_post
        .iter()
        .filter(|n| !pairs.contains_key(**n))
        .map(|n| n.to_string())
        .collect();
    let removed = unpaired_pre
        .iter()
        .filter(|n| !paired_pre.contains(&n.to_string()))
        .map(|n| n.to_string())
        .collect();
    (pairs, added, removed)
}

/// Compares the two builds of one unit.
pub fn diff(pre: &Unit, post: &Unit) -> UnitDiff {
    let mut out = UnitDiff::default();
    let (pairs, added, removed) = correlate(
        pre.functions().map(|(_, s)| s.name.as_str()),
        post.functions().map(|(_, s)| s.name.as_str()),
    );
    out.added = added;
    out.removed = removed;
    for (post_name, pre_name) in &pairs {
        let (Some(a), Some(b)) = (pre.defined(pre_name), post.defined(post_name)) else {
            continue;
        };
        if shape(pre, a) != shape(post, b) {
            out.changed.push((pre_name.clone(), post_name.clone()));
        }
    }
    // A changed `.cold` fragment changes its parent: the fragment is carried in the parent's
    // code, never patched on its own (it is entered in the middle).
    let cold_parents: Vec<(String, String)> = out
        .changed
        .iter()
        .filter_map(|(a, b)| {
            Some((
                a.strip_suffix(".cold")?.to_string(),
                b.strip_suffix(".cold")?.to_string(),
            ))
        })
        .collect();
    for (a, b) in cold_parents {
        if !out.changed.iter().any(|(x, _)| *x == a) && pre.defined(&a).is_some() {
            out.changed.push((a, b));
        }
    }
    out.changed.sort();
    out.correlated = pairs;

    // Variables: writable and named read-only data, and the objects of sections no known
    // table is in (`rt_sched_class` in `__rt_sched_class`: replaced code may be reached through
    // the kernel's copy, so a changed one must be seen). String literals and unnamed constants
    // are compared through the functions that use them.
    let data_of = |u: &Unit| -> Vec<(String, usize)> {
        u.objects()
            .filter(|(_, s)| {
                s.section.is_some_and(|i| match u.sections[i].class {
                    SectionClass::Writable | SectionClass::ReadOnly => true,
                    SectionClass::OtherAlloc => {
                        crate::link::table_policy(&u.sections[i].name)
                            == crate::link::TablePolicy::Unknown
                    }
                    _ => false,
                })
            })
            .map(|(i, s)| (s.name.clone(), i))
            .collect()
    };
    let (pre_d, post_d) = (data_of(pre), data_of(post));
    // Numbered names (static locals: `__already_done.12`) pair through the functions that use
    // them; only the others pair by name.
    let numbered = |n: &str| normalized_name(n) != n;
    let locals = bind_locals(pre, post, &out.correlated);
    let (mut dpairs, dadded, _) = correlate(
        pre_d
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| !numbered(n)),
        post_d
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| !numbered(n)),
    );
    let mut dadded = dadded;
    for (n, _) in &post_d {
        if numbered(n) {
            match locals.get(n) {
                Some(p) => {
                    dpairs.insert(n.clone(), p.clone());
                }
                None => dadded.push(n.clone()),
            }
        }
    }
    out.locals = locals;
    for (post_name, pre_name) in &dpairs {
        let (Some(a), Some(b)) = (pre.defined(pre_name), post.defined(post_name)) else {
            continue;
        };
        if shape(pre, a) != shape(post, b) {
            let sec = post.symbols[b]
                .section
                .map(|i| post.sections[i].name.clone())
                .unwrap_or_default();
            out.data_changed
                .push((pre_name.clone(), post_name.clone(), sec));
        }
    }
    for n in dadded {
        if let Some(b) = post.defined(&n) {
            let sec = post.symbols[b]
                .section
                .map(|i| post.sections[i].name.clone())
                .unwrap_or_default();
            out.data_added.push((n, sec));
        }
    }
    out
}

/// Binds the post build's numbered locals (`static` variables inside functions, GCC's
/// `name.N`) to the pre build's: walking each pair of correlated functions' references in
/// order, the k-th distinct numbered local of a base name in one is the k-th of that base
/// name in the other. A binding two functions disagree on is dropped (left unbound).
pub fn bind_locals(
    pre: &Unit,
    post: &Unit,
    functions: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let numbered_refs = |u: &Unit, f: usize| -> Vec<String> {
        let mut seen = Vec::new();
        for r in u.relocs_of(f) {
            let s = &u.symbols[r.symbol];
            let name = if s.kind == SymKind::Section {
                s.section
                    .and_then(|sec| u.symbol_at(sec, r.pointed(u)))
                    .map(|t| u.symbols[t].name.clone())
            } else {
                Some(s.name.clone())
            };
            if let Some(n) = name
                && normalized_name(&n) != n
                && u.defined(&n)
                    .is_some_and(|i| u.symbols[i].kind == SymKind::Object)
                && !seen.contains(&n)
            {
                seen.push(n);
            }
        }
        seen
    };
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    let mut conflicts: BTreeSet<String> = BTreeSet::new();
    for (post_f, pre_f) in functions {
        let (Some(a), Some(b)) = (pre.defined(pre_f), post.defined(post_f)) else {
            continue;
        };
        let (ra, rb) = (numbered_refs(pre, a), numbered_refs(post, b));
        let mut by_base: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for n in ra {
            by_base.entry(normalized_name(&n)).or_default().push(n);
        }
        let mut taken: BTreeMap<String, usize> = BTreeMap::new();
        for n in rb {
            let base = normalized_name(&n);
            let k = taken.entry(base.clone()).or_default();
            if let Some(p) = by_base.get(&base).and_then(|v| v.get(*k)) {
                match out.get(&n) {
                    Some(prev) if prev != p => {
                        conflicts.insert(n.clone());
                    }
                    _ => {
                        out.insert(n.clone(), p.clone());
                    }
                }
            }
            *k += 1;
        }
    }
    for c in conflicts {
        out.remove(&c);
    }
    out
}
