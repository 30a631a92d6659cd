//! Type layouts, variable sizes and function signatures from a unit's DWARF, compared before
//! and after the fix.
//!
//! A function-level live patch runs new code on data laid out by the old code. The diff's own
//! text shows a changed `struct` definition (`unified::constructs`), but not one changed
//! through a macro (`#define FIELDS …` used inside a struct), a header a changed `#ifdef`
//! selects differently, or a `typedef` of another size. The compiler's debug information
//! (the kernel is built with `-g`) says what it actually laid out: every named struct and
//! union with its size and its members' offsets (anonymous members flattened in), the values
//! of every enumerator, the size of every file-scope variable's type, and the parameter sizes
//! of every external function. A difference between the builds before and after the fix
//! refuses the unit (`docs/source-patches.md` §3).

use std::borrow::Cow;
use std::collections::BTreeMap;

use gimli::{AttributeValue, DwTag, constants as dw};

use crate::elf::{Unit, r};

/// What the unit's DWARF says; empty when the object has none.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Layouts {
    /// `struct foo` / `union foo` / `typedef foo_t` (of an anonymous struct): each definition's
    /// layout (several when the unit has several of that name, in different scopes).
    pub aggregates: BTreeMap<String, Vec<String>>,
    /// Enumerator → value.
    pub enumerators: BTreeMap<String, i64>,
    /// File-scope variable → the size of its type.
    pub variables: BTreeMap<String, u64>,
    /// External function → return and parameter sizes (`?` unknown, `...` variadic).
    pub functions: BTreeMap<String, String>,
    /// The object had a `.debug_info` section.
    pub has_debug_info: bool,
}

/// One difference that makes the fix unsafe to apply live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutChange {
    pub what: String,
}

#[derive(Debug, thiserror::Error)]
#[error("the unit's debug information cannot be read: {0}")]
pub struct DwarfError(String);

#[derive(Debug, Clone)]
struct Die {
    tag: DwTag,
    name: Option<String>,
    byte_size: Option<u64>,
    ty: Option<usize>,
    location: Option<u64>,
    bit_size: Option<u64>,
    bit_offset: Option<u64>,
    declaration: bool,
    external: bool,
    count: Option<u64>,
    value: Option<i64>,
    depth: isize,
    children: Vec<usize>,
}

impl Layouts {
    /// Reads the unit's DWARF (its relocations applied: in an object, string and type-unit
    /// offsets are relocation addends).
    pub fn of(u: &Unit) -> Result<Layouts, DwarfError> {
        let mut out = Layouts::default();
        let section = |name: &str| u.sections.iter().find(|s| s.name == name);
        out.has_debug_info = section(".debug_info").is_some();
        if !out.has_debug_info {
            return Ok(out);
        }
        let load = |id: gimli::SectionId| -> Result<Cow<'_, [u8]>, DwarfError> {
            let Some(s) = section(id.name()) else {
                return Ok(Cow::Borrowed(&[][..]));
            };
            if s.relocs.is_empty() {
                return Ok(Cow::Borrowed(&s.data[..]));
            }
            let mut data = s.data.clone();
            for rel in &s.relocs {
                let sym = u.symbols.get(rel.symbol).ok_or_else(|| {
                    DwarfError(format!("{}: relocation to a missing symbol", s.name))
                })?;
                let v = (sym.value as i64).wrapping_add(rel.addend) as u64;
                let at = rel.offset as usize;
                let field: &[u8] = match rel.r_type {
                    r::ABS32 => &v.to_le_bytes()[..4],
                    r::ABS64 => &v.to_le_bytes()[..],
                    // Relocations against code addresses (PC-relative ones do not occur in
                    // debug sections GCC writes); what this reads does not depend on them.
                    _ => continue,
                };
                if let Some(dst) = data.get_mut(at..at + field.len()) {
                    dst.copy_from_slice(field);
                }
            }
            Ok(Cow::Owned(data))
        };
        let sections = gimli::DwarfSections::load(load)?;
        let dwarf = sections.borrow(|s| gimli::EndianSlice::new(s, gimli::LittleEndian));
        let mut units = dwarf.units();
        while let Some(header) = units.next().map_err(gimli_error)? {
            let unit = dwarf.unit(header).map_err(gimli_error)?;
            let dies = read_dies(&dwarf, &unit)?;
            out.collect(&dies);
        }
        Ok(out)
    }

    fn collect(&mut self, dies: &BTreeMap<usize, Die>) {
        for d in dies.values() {
            match d.tag {
                dw::DW_TAG_structure_type | dw::DW_TAG_union_type if !d.declaration => {
                    if let Some(name) = &d.name {
                        let kind = if d.tag == dw::DW_TAG_union_type {
                            "union"
                        } else {
                            "struct"
                        };
                        self.aggregates
                            .entry(format!("{kind} {name}"))
                            .or_default()
                            .push(aggregate(dies, d));
                    }
                }
                dw::DW_TAG_typedef => {
                    let target = d.ty.and_then(|t| dies.get(&t));
                    if let (Some(name), Some(t)) = (&d.name, target)
                        && matches!(t.tag, dw::DW_TAG_structure_type | dw::DW_TAG_union_type)
                        && t.name.is_none()
                        && !t.declaration
                    {
                        self.aggregates
                            .entry(format!("typedef {name}"))
                            .or_default()
                            .push(aggregate(dies, t));
                    }
                }
                dw::DW_TAG_enumerator => {
                    if let (Some(name), Some(v)) = (&d.name, d.value) {
                        self.enumerators.insert(name.clone(), v);
                    }
                }
                dw::DW_TAG_variable if d.depth == 1 => {
                    if let (Some(name), Some(size)) = (&d.name, d.ty.and_then(|t| size_of(dies, t)))
                    {
                        self.variables.insert(name.clone(), size);
                    }
                }
                dw::DW_TAG_subprogram if d.external => {
                    if let Some(name) = &d.name {
                        self.functions.insert(name.clone(), signature(dies, d));
                    }
                }
                _ => {}
            }
        }
        for v in self.aggregates.values_mut() {
            v.sort();
            v.dedup();
        }
    }

    /// What changed from `self` (before the fix) to `after` that code outside the patch, or
    /// data already in memory, depends on.
    pub fn changes(&self, after: &Layouts) -> Vec<LayoutChange> {
        let mut out = Vec::new();
        for (name, before) in &self.aggregates {
            if let Some(now) = after.aggregates.get(name)
                && now != before
            {
                out.push(LayoutChange {
                    what: format!(
                        "the layout of {name} changes ({} → {})",
                        before.join(" | "),
                        now.join(" | ")
                    ),
                });
            }
        }
        for (name, v) in &self.enumerators {
            if let Some(now) = after.enumerators.get(name)
                && now != v
            {
                out.push(LayoutChange {
                    what: format!("the value of enumerator {name} changes ({v} → {now})"),
                });
            }
        }
        for (name, size) in &self.variables {
            if let Some(now) = after.variables.get(name)
                && now != size
            {
                out.push(LayoutChange {
                    what: format!(
                        "the type of variable {name} changes size ({size} → {now} bytes)"
                    ),
                });
            }
        }
        for (name, sig) in &self.functions {
            if let Some(now) = after.functions.get(name)
                && now != sig
            {
                out.push(LayoutChange {
                    what: format!(
                        "the signature of external function {name} changes ({sig} → {now}): \
                         callers outside the patch (other units, modules, function pointers) \
                         would pass the old arguments"
                    ),
                });
            }
        }
        out
    }
}

impl From<gimli::Error> for DwarfError {
    fn from(e: gimli::Error) -> Self {
        gimli_error(e)
    }
}

fn gimli_error(e: gimli::Error) -> DwarfError {
    DwarfError(e.to_string())
}

type Reader<'a> = gimli::EndianSlice<'a, gimli::LittleEndian>;

/// Every DIE of a unit by its unit offset, with its children.
fn read_dies(
    dwarf: &gimli::Dwarf<Reader<'_>>,
    unit: &gimli::Unit<Reader<'_>>,
) -> Result<BTreeMap<usize, Die>, DwarfError> {
    let mut dies: BTreeMap<usize, Die> = BTreeMap::new();
    let mut stack: Vec<usize> = Vec::new();
    let mut cursor = unit.entries();
    while let Some(e) = cursor.next_dfs()? {
        let offset = e.offset().0;
        let depth = e.depth();
        let mut d = Die {
            tag: e.tag(),
            name: None,
            byte_size: None,
            ty: None,
            location: None,
            bit_size: None,
            bit_offset: None,
            declaration: false,
            external: false,
            count: None,
            value: None,
            depth,
            children: Vec::new(),
        };
        for a in e.attrs() {
            let v = a.value();
            match a.name() {
                dw::DW_AT_name => {
                    if let Ok(s) = dwarf.attr_string(unit, v) {
                        d.name = Some(s.to_string_lossy().into_owned());
                    }
                }
                dw::DW_AT_byte_size => d.byte_size = a.udata_value(),
                dw::DW_AT_type => {
                    if let AttributeValue::UnitRef(o) = v {
                        d.ty = Some(o.0);
                    }
                }
                dw::DW_AT_data_member_location => d.location = a.udata_value(),
                dw::DW_AT_bit_size => d.bit_size = a.udata_value(),
                dw::DW_AT_data_bit_offset => d.bit_offset = a.udata_value(),
                dw::DW_AT_declaration => d.declaration = matches!(v, AttributeValue::Flag(true)),
                dw::DW_AT_external => d.external = matches!(v, AttributeValue::Flag(true)),
                dw::DW_AT_count => d.count = a.udata_value(),
                dw::DW_AT_upper_bound => d.count = a.udata_value().map(|u| u + 1),
                dw::DW_AT_const_value => {
                    d.value = a.sdata_value().or(a.udata_value().map(|u| u as i64))
                }
                _ => {}
            }
        }
        stack.truncate(depth.max(0) as usize);
        if let Some(parent) = stack.last()
            && let Some(p) = dies.get_mut(parent)
        {
            p.children.push(offset);
        }
        dies.insert(offset, d);
        stack.push(offset);
    }
    Ok(dies)
}

/// The size of a type in bytes, through typedefs and qualifiers; `None` when unknown.
fn size_of(dies: &BTreeMap<usize, Die>, at: usize) -> Option<u64> {
    let mut at = at;
    for _ in 0..64 {
        let d = dies.get(&at)?;
        match d.tag {
            dw::DW_TAG_typedef
            | dw::DW_TAG_const_type
            | dw::DW_TAG_volatile_type
            | dw::DW_TAG_restrict_type
            | dw::DW_TAG_atomic_type => at = d.ty?,
            dw::DW_TAG_pointer_type | dw::DW_TAG_reference_type => {
                return Some(d.byte_size.unwrap_or(8));
            }
            dw::DW_TAG_array_type => {
                let elem = size_of(dies, d.ty?)?;
                let mut n = 1u64;
                for c in &d.children {
                    if let Some(s) = dies.get(c)
                        && s.tag == dw::DW_TAG_subrange_type
                    {
                        // A flexible array member has no count: it adds nothing to the size.
                        n = n.saturating_mul(s.count.unwrap_or(0));
                    }
                }
                return Some(elem.saturating_mul(n));
            }
            _ => return d.byte_size,
        }
    }
    None
}

/// `size S: member@offset[.bit:bits]/size …`, anonymous struct and union members flattened in
/// at their offsets.
fn aggregate(dies: &BTreeMap<usize, Die>, d: &Die) -> String {
    let mut members = Vec::new();
    members_of(dies, d, 0, "", &mut members, 0);
    format!(
        "size {}: {}",
        d.byte_size.map_or("?".to_string(), |s| s.to_string()),
        members.join(" ")
    )
}

fn members_of(
    dies: &BTreeMap<usize, Die>,
    d: &Die,
    base: u64,
    prefix: &str,
    out: &mut Vec<String>,
    nesting: usize,
) {
    for c in &d.children {
        let Some(m) = dies.get(c) else { continue };
        if m.tag != dw::DW_TAG_member {
            continue;
        }
        let offset = base + m.location.unwrap_or(0);
        let target = m.ty.and_then(|t| dies.get(&t));
        let anonymous_aggregate = m.name.is_none()
            && target.is_some_and(|t| {
                matches!(t.tag, dw::DW_TAG_structure_type | dw::DW_TAG_union_type)
            });
        if anonymous_aggregate && nesting < 16 {
            if let Some(t) = target {
                members_of(dies, t, offset, prefix, out, nesting + 1);
            }
            continue;
        }
        let name = m.name.clone().unwrap_or_else(|| "?".into());
        let size =
            m.ty.and_then(|t| size_of(dies, t))
                .map_or("?".to_string(), |s| s.to_string());
        let bits = match (m.bit_offset, m.bit_size) {
            (Some(o), Some(b)) => format!(".{o}:{b}"),
            (None, Some(b)) => format!(":{b}"),
            _ => String::new(),
        };
        out.push(format!("{prefix}{name}@{offset}{bits}/{size}"));
    }
}

/// `ret R (P1, P2, ...)` in sizes.
fn signature(dies: &BTreeMap<usize, Die>, d: &Die) -> String {
    let size = |t: Option<usize>| match t {
        None => "void".to_string(),
        Some(t) => size_of(dies, t).map_or("?".to_string(), |s| s.to_string()),
    };
    let mut params = Vec::new();
    for c in &d.children {
        let Some(p) = dies.get(c) else { continue };
        match p.tag {
            dw::DW_TAG_formal_parameter => params.push(size(p.ty)),
            dw::DW_TAG_unspecified_parameters => params.push("...".into()),
            _ => {}
        }
    }
    format!("ret {} ({})", size(d.ty), params.join(", "))
}
