//! Header changes that only declare new names, which reach no unit but the fix's own.
//!
//! Many upstream fixes add a helper to a `.c` file and its prototype (or a new macro, or a
//! `static inline` wrapper) to a header every part of the kernel includes: `include/linux/mm.h`
//! reaches over 2,000 built-in units. Compiling each of them before and after would make the
//! fix unbuildable (`--max-units`), yet no existing unit can compile differently because of a
//! declaration of a name it never mentions: an unused prototype, macro, type or `static inline`
//! function produces no code. So a header's change counts as *declarations only*
//! (`docs/source-patches.md` §2) when, comparing the header's top-level items before and after
//! (comments and spacing ignored):
//!
//! - every item of the old header is still there, in order, except declarations the change
//!   drops, and the items between are new;
//! - each run of new (or dropped) items is whole and self-contained: `#define NAME …`, balanced
//!   `#if`/`#else`/`#endif`, prototypes, `extern` declarations, `typedef`s, `struct`/`union`/
//!   `enum` types and `static inline` functions. An `#include`, `#undef` or `#pragma`, a
//!   variable definition, a top-level `asm` or a `__used`/`constructor`/`__section` attribute
//!   emits or changes code in every includer, so it makes the change an ordinary one;
//! - no file of the tree the kernel's units are built from mentions a name a new item declares,
//!   and no file but the header itself mentions a name a dropped one declared (a whole-word
//!   search, comments included, [`mentioned`]). A helper moved out of a `.c` file, a macro
//!   defined again, or a prototype dropped while others still call it is an ordinary change.
//!
//! What it may change elsewhere is line numbers after the insertion (`__LINE__` in a later
//! `WARN()`'s message): the running kernel's copy of such a unit behaves the same, so leaving it
//! unpatched is right.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use crate::unified::{FileDiff, apply_exactly, code_text, words};

/// One top-level item of C source: a preprocessor line (with its continuations) or a C
/// declaration/definition, with comments removed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Item {
    preprocessor: bool,
    text: String,
}

/// The top-level items of `text`; `clean` is false when the text ends inside an item or a
/// comment.
struct Scan {
    items: Vec<Item>,
    clean: bool,
}

fn scan(text: &str) -> Scan {
    let b = text.as_bytes();
    let mut items: Vec<Item> = Vec::new();
    let mut i = 0usize;
    // The C item being read, and its bracket depth. An item ends at a top-level `;`, or at the
    // `}` closing a function body (its head has a `(` and no `=`).
    let mut cur: Option<String> = None;
    let mut depth = 0u32;
    let mut at_line_start = true;
    while i < b.len() {
        let c = b[i];
        if c == b'\n' {
            at_line_start = true;
            if let Some(t) = cur.as_mut() {
                t.push(' ');
            }
            i += 1;
            continue;
        }
        if at_line_start && c == b'#' && cur.is_none() {
            let mut t = String::new();
            while i < b.len() && b[i] != b'\n' {
                if b[i] == b'\\' && b.get(i + 1) == Some(&b'\n') {
                    t.push(' ');
                    i += 2;
                    continue;
                }
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    // A comment inside a directive (it may span lines).
                    i += 2;
                    while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                        i += 1;
                    }
                    i += 2;
                    t.push(' ');
                    continue;
                }
                if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
                    while i < b.len() && b[i] != b'\n' {
                        i += 1;
                    }
                    break;
                }
                t.push(b[i] as char);
                i += 1;
            }
            items.push(Item {
                preprocessor: true,
                text: t.trim().to_string(),
            });
            continue;
        }
        if !c.is_ascii_whitespace() {
            at_line_start = false;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                i += 1;
            }
            if i >= b.len() {
                return Scan {
                    items,
                    clean: false,
                };
            }
            i += 2;
            if let Some(t) = cur.as_mut() {
                t.push(' ');
            }
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c.is_ascii_whitespace() {
            if let Some(t) = cur.as_mut() {
                t.push(' ');
            }
            i += 1;
            continue;
        }
        let t = cur.get_or_insert_with(String::new);
        if c == b'"' || c == b'\'' {
            t.push(c as char);
            i += 1;
            while i < b.len() && b[i] != c {
                if b[i] == b'\\' && i + 1 < b.len() {
                    t.push(b[i] as char);
                    i += 1;
                }
                t.push(b[i] as char);
                i += 1;
            }
            t.push(c as char);
            i += 1;
            continue;
        }
        t.push(c as char);
        let mut close = false;
        match c {
            b'{' | b'(' | b'[' => depth += 1,
            b'}' | b')' | b']' => {
                depth = depth.saturating_sub(1);
                if c == b'}' && depth == 0 {
                    let head = t.split('{').next().unwrap_or("");
                    close = head.contains('(') && !head.contains('=');
                }
            }
            b';' if depth == 0 => close = true,
            _ => {}
        }
        if close && let Some(text) = cur.take() {
            items.push(Item {
                preprocessor: false,
                text: text.trim().to_string(),
            });
        }
        i += 1;
    }
    let clean = cur.is_none() && depth == 0;
    Scan { items, clean }
}

const KEYWORDS: [&str; 24] = [
    "void", "char", "short", "int", "long", "float", "double", "signed", "unsigned", "bool",
    "_Bool", "struct", "union", "enum", "const", "volatile", "static", "inline", "extern",
    "typedef", "return", "sizeof", "asm", "register",
];

/// Attributes that make an otherwise unused declaration emit code or data in every includer.
const EMITTING: [&str; 8] = [
    "__used",
    "used",
    "constructor",
    "destructor",
    "__attribute_used__",
    "__visible",
    "externally_visible",
    "__section",
];

/// The names one C item declares, or `None` when it is not a declaration that leaves the code
/// of a unit not using them unchanged.
fn item_names(text: &str) -> Option<Vec<String>> {
    let ws: Vec<&str> = words(text).collect();
    if ws.iter().any(|w| EMITTING.contains(w)) {
        return None;
    }
    let ident = |s: &str| -> Option<String> {
        words(s)
            .last()
            .filter(|w| !KEYWORDS.contains(w) && !w.starts_with(|c: char| c.is_ascii_digit()))
            .map(str::to_string)
    };
    let has = |w: &str| ws.contains(&w);
    if matches!(ws.first(), Some(&"asm" | &"__asm__" | &"__asm")) {
        return None;
    }
    let brace = top_level(text, '{');
    let paren = top_level(text, '(');
    match (brace, paren) {
        // A function definition: only `static inline` ones are emitted nowhere unused.
        (Some(b), Some(p)) if p < b && !text[..b].contains('=') => {
            if !has("static") || !(has("inline") || has("__always_inline")) {
                return None;
            }
            ident(&text[..p]).map(|n| vec![n])
        }
        // A type definition (maybe in a typedef): its tag, an enum's constants, a typedef name.
        (Some(b), _) => {
            let head = &text[..b];
            let close = text.rfind('}')?;
            let (body, tail) = (&text[b + 1..close], text[close + 1..].trim());
            let mut names = Vec::new();
            let hw: Vec<&str> = words(head).collect();
            let kind = hw
                .iter()
                .position(|w| matches!(*w, "struct" | "union" | "enum"))?;
            if head.contains('=') {
                return None;
            }
            if let Some(tag) = hw.get(kind + 1) {
                names.push(tag.to_string());
            }
            if hw[kind] == "enum" {
                for part in body.split(',') {
                    if let Some(n) = words(part).next() {
                        names.push(n.to_string());
                    }
                }
            }
            let tail = tail.trim_end_matches(';').trim();
            if !tail.is_empty() {
                // `} name;` defines a variable unless the item is a typedef.
                if !hw.contains(&"typedef") {
                    return None;
                }
                names.push(ident(tail)?);
            }
            (!names.is_empty()).then_some(names)
        }
        (None, _) if has("typedef") => {
            // `typedef int (*fn_t)(int);` names fn_t; `typedef u32 x_t;` names x_t.
            let name = match text.find("(*") {
                Some(s) => words(&text[s + 2..]).next().map(str::to_string),
                None => ident(text.trim_end_matches(';').split('[').next().unwrap_or("")),
            };
            name.map(|n| vec![n])
        }
        // A prototype: the name before its parameter list.
        (None, Some(p)) => {
            if top_level(text, '=').is_some() {
                return None;
            }
            ident(&text[..p]).map(|n| vec![n])
        }
        // `extern T name;`: a declaration; without `extern` it would define the variable.
        (None, None) => {
            if !has("extern") || text.contains('=') {
                return None;
            }
            ident(text.trim_end_matches(';').split('[').next().unwrap_or("")).map(|n| vec![n])
        }
    }
}

/// The byte offset of the first `c` outside every bracket pair.
fn top_level(text: &str, c: char) -> Option<usize> {
    let mut depth = 0i32;
    for (i, ch) in text.char_indices() {
        if ch == c && depth == 0 {
            return Some(i);
        }
        match ch {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// The names a preprocessor line declares (`#define NAME`), `Some(empty)` for a conditional,
/// `None` for a directive that changes what existing code sees.
fn directive_names(text: &str, open: &mut i32) -> Option<Vec<String>> {
    let d = text.trim_start_matches('#').trim_start();
    let (word, rest) = d
        .split_once(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or((d, ""));
    match word {
        "define" => {
            let name = words(rest).next()?.to_string();
            Some(vec![name])
        }
        "if" | "ifdef" | "ifndef" => {
            *open += 1;
            Some(Vec::new())
        }
        "else" | "elif" if *open > 0 => Some(Vec::new()),
        "endif" if *open > 0 => {
            *open -= 1;
            Some(Vec::new())
        }
        _ => None,
    }
}

/// What a declarations-only header change declares and drops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Declarations {
    /// Names the new items declare, in the order they appear.
    pub added: Vec<String>,
    /// Names the removed items declared (a placeholder renamed, a prototype no longer needed).
    pub removed: Vec<String>,
}

/// An item as the compiler reads it, for comparing two versions: kind, and its text with every
/// run of white space outside literals made one space.
fn key(item: &Item) -> (bool, String) {
    (item.preprocessor, code_text(&item.text))
}

/// Which items of `a` and `b` are the same, in order (a longest common subsequence, after the
/// common prefix and suffix): `(in_a, in_b)` flags. `None` when the changed middle is too large
/// to compare (a header rewritten, not a fix's few lines).
fn common(a: &[(bool, String)], b: &[(bool, String)]) -> Option<(Vec<bool>, Vec<bool>)> {
    let (mut in_a, mut in_b) = (vec![false; a.len()], vec![false; b.len()]);
    let mut pre = 0;
    while pre < a.len() && pre < b.len() && a[pre] == b[pre] {
        in_a[pre] = true;
        in_b[pre] = true;
        pre += 1;
    }
    let mut suf = 0;
    while suf < a.len() - pre && suf < b.len() - pre && a[a.len() - 1 - suf] == b[b.len() - 1 - suf]
    {
        in_a[a.len() - 1 - suf] = true;
        in_b[b.len() - 1 - suf] = true;
        suf += 1;
    }
    let (ma, mb) = (&a[pre..a.len() - suf], &b[pre..b.len() - suf]);
    if ma.len().saturating_mul(mb.len()) > 1 << 22 {
        return None;
    }
    // lcs[i][j]: the longest common subsequence of ma[i..] and mb[j..].
    let w = mb.len() + 1;
    let mut lcs = vec![0u32; (ma.len() + 1) * w];
    for i in (0..ma.len()).rev() {
        for j in (0..mb.len()).rev() {
            lcs[i * w + j] = if ma[i] == mb[j] {
                lcs[(i + 1) * w + j + 1] + 1
            } else {
                lcs[(i + 1) * w + j].max(lcs[i * w + j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    while i < ma.len() && j < mb.len() {
        if ma[i] == mb[j] {
            in_a[pre + i] = true;
            in_b[pre + j] = true;
            i += 1;
            j += 1;
        } else if lcs[(i + 1) * w + j] >= lcs[i * w + j + 1] {
            i += 1;
        } else {
            j += 1;
        }
    }
    Some((in_a, in_b))
}

/// The names the unmatched items of `items` declare, each contiguous run of them being whole
/// self-contained items (balanced conditionals); `None` when one is not a declaration.
fn run_names(items: &[Item], matched: &[bool]) -> Option<Vec<String>> {
    let mut names = Vec::new();
    let mut open = 0;
    for (item, m) in items.iter().zip(matched) {
        if *m {
            // A run ends: its conditionals must have closed.
            if open != 0 {
                return None;
            }
            continue;
        }
        let n = if item.preprocessor {
            directive_names(&item.text, &mut open)?
        } else {
            item_names(&item.text)?
        };
        names.extend(n);
    }
    (open == 0).then_some(names)
}

/// What a header's diff declares and drops when it is declarations only (module docs);
/// `None` otherwise. `old` is the header before the diff. The two versions are compared item
/// by item (comments and spacing ignored), not by where the hunks say lines go: `diff` often
/// aligns an added function so that its hunk starts inside a comment.
pub fn declarations(old: &str, file: &FileDiff) -> Option<Declarations> {
    if file.created || file.deleted || !file.path.ends_with(".h") {
        return None;
    }
    // The hunks must apply exactly as written, or the new text is unknown.
    let new = apply_exactly(old, &file.hunks)?;
    let (before, after) = (scan(old), scan(&new));
    if !before.clean || !after.clean {
        return None;
    }
    let ka: Vec<(bool, String)> = before.items.iter().map(key).collect();
    let kb: Vec<(bool, String)> = after.items.iter().map(key).collect();
    let (in_a, in_b) = common(&ka, &kb)?;
    let mut removed = run_names(&before.items, &in_a)?;
    let mut added = run_names(&after.items, &in_b)?;
    let dedup = |v: &mut Vec<String>| {
        let mut seen = BTreeSet::new();
        v.retain(|n| seen.insert(n.clone()));
    };
    dedup(&mut removed);
    dedup(&mut added);
    // A dropped name the new header still uses is not dropped: its meaning changed.
    let new_words: BTreeSet<&str> = words(&new).collect();
    if removed.iter().any(|n| new_words.contains(n.as_str())) {
        return None;
    }
    Some(Declarations { added, removed })
}

/// Which files mention each of `names` (whole words, comments included), paths relative to
/// `tree`: every C, header and assembly file the kernel is built from, outside host tools,
/// documentation and other architectures.
pub fn mentioned(
    tree: &Path,
    names: &[String],
) -> std::io::Result<BTreeMap<String, BTreeSet<String>>> {
    let mut found: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    if names.is_empty() {
        return Ok(found);
    }
    let mut dirs = Vec::new();
    for e in std::fs::read_dir(tree)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !e.file_type()?.is_dir() || crate::reach::skipped(&name) || name.starts_with('.') {
            continue;
        }
        if name == "arch" {
            if tree.join("arch/x86").is_dir() {
                dirs.push("arch/x86".to_string());
            }
        } else {
            dirs.push(name);
        }
    }
    let mut cmd = Command::new("grep");
    cmd.args(["-rowF", "--include=*.c", "--include=*.h", "--include=*.S"]);
    cmd.args(["--include=*.lds", "--include=*.asn1", "--include=*.tbl"]);
    for n in names {
        cmd.arg("-e").arg(n);
    }
    cmd.args(&dirs).current_dir(tree);
    let out = cmd.output()?;
    // 0: found, 1: found nothing, 2: trouble (then nothing may be concluded from an absence).
    match out.status.code() {
        Some(0) | Some(1) => {}
        _ => {
            return Err(std::io::Error::other(format!(
                "grep for new names in {}: {}",
                tree.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some((file, word)) = line.rsplit_once(':')
            && names.iter().any(|n| n == word)
        {
            found
                .entry(word.to_string())
                .or_default()
                .insert(file.to_string());
        }
    }
    Ok(found)
}

/// Whether header `path`'s change `d` leaves every other unit's code as it was: no file
/// mentions a name it adds, and only the header itself mentioned a name it drops.
pub fn reaches_nothing(
    path: &str,
    d: &Declarations,
    used: &BTreeMap<String, BTreeSet<String>>,
) -> bool {
    d.added.iter().all(|n| !used.contains_key(n))
        && d.removed.iter().all(|n| {
            used.get(n)
                .is_none_or(|files| files.iter().all(|f| f == path))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unified::parse;

    const OLD: &str = "#ifndef _X_H\n#define _X_H\n\nstruct page;\n\n/* a comment\n * on two lines */\nstatic inline int old_helper(int a)\n{\n\treturn a + 1;\n}\n\n#define OLD_MACRO(x) \\\n\t((x) * 2)\n\nint old_proto(struct page *p,\n\t      int flags);\n\n#endif\n";

    fn diff(body: &str) -> FileDiff {
        let text = format!("--- a/include/linux/x.h\n+++ b/include/linux/x.h\n{body}");
        parse(&text).unwrap().remove(0)
    }

    #[test]
    fn new_prototypes_macros_types_and_inline_functions_are_declarations() {
        let d = diff(
            "@@ -11,5 +11,16 @@\n }\n \n+#define NEW_LIMIT 16\n+int new_helper(struct page *p);\n+extern unsigned long new_count;\n+struct new_thing {\n+\tint a;\n+};\n+enum { NEW_A, NEW_B = 3 };\n+#ifdef CONFIG_NEW\n+static inline bool new_check(void) { return true; }\n+#endif\n+typedef int (*new_fn_t)(int);\n #define OLD_MACRO(x) \\\n \t((x) * 2)\n \n",
        );
        let names = declarations(OLD, &d).expect("declarations only");
        assert!(names.removed.is_empty());
        assert_eq!(
            names.added,
            [
                "NEW_LIMIT",
                "new_helper",
                "new_count",
                "new_thing",
                "NEW_A",
                "NEW_B",
                "new_check",
                "new_fn_t"
            ]
        );
    }

    #[test]
    fn comments_and_spacing_alone_declare_nothing_and_count() {
        for body in [
            "@@ -3,2 +3,3 @@\n \n+/* why struct page is forward-declared */\n struct page;\n",
            // Inside a comment, inside a macro's continuation lines, re-indented.
            "@@ -6,2 +6,3 @@\n /* a comment\n+ * more words\n  * on two lines */\n",
            "@@ -13,2 +13,3 @@\n #define OLD_MACRO(x) \\\n+\t/* doubled */ \\\n \t((x) * 2)\n",
            "@@ -16,2 +16,1 @@\n-int old_proto(struct page *p,\n-\t      int flags);\n+int old_proto(struct page *p, int flags);\n",
        ] {
            assert_eq!(
                declarations(OLD, &diff(body)),
                Some(Declarations::default()),
                "{body}"
            );
        }
    }

    #[test]
    fn a_function_added_where_diff_starts_its_hunk_inside_a_comment_is_a_declaration() {
        // As `diff` aligns list.h's new list_count_nodes(): the new doc comment's `/**` is
        // matched with the old one's, so the hunk starts inside a comment.
        let old =
            "/**\n * old_fn - the old one\n */\nstatic inline int old_fn(void) { return 0; }\n";
        let d = diff(
            "@@ -1,0 +2,5 @@\n+ * new_fn - a new one\n+ */\n+static inline int new_fn(void) { return 1; }\n+\n+/**\n",
        );
        let got = declarations(old, &d).expect("declarations only");
        assert_eq!(got.added, ["new_fn"]);
    }

    #[test]
    fn a_placeholder_renamed_drops_one_name_and_adds_another() {
        // sched.h in 6.1.191: a hole in the PF_ flags gets its name.
        let old = "#define PF_A 0x1\n#define PF__HOLE__00800000\t0x00800000\n#define PF_B 0x2\n";
        let d = diff(
            "@@ -2 +2 @@\n-#define PF__HOLE__00800000\t0x00800000\n+#define PF_NO_NOTIFY_SIGNAL\t0x00800000\n",
        );
        let got = declarations(old, &d).expect("declarations only");
        assert_eq!(got.added, ["PF_NO_NOTIFY_SIGNAL"]);
        assert_eq!(got.removed, ["PF__HOLE__00800000"]);
        let only_here = BTreeMap::from([(
            "PF__HOLE__00800000".to_string(),
            BTreeSet::from(["include/linux/sched.h".to_string()]),
        )]);
        assert!(reaches_nothing("include/linux/sched.h", &got, &only_here));
        // Used elsewhere, the dropped name changes that file's meaning; a new name used
        // elsewhere is not new.
        let mut elsewhere = only_here.clone();
        elsewhere
            .get_mut("PF__HOLE__00800000")
            .unwrap()
            .insert("kernel/fork.c".into());
        assert!(!reaches_nothing("include/linux/sched.h", &got, &elsewhere));
        let taken = BTreeMap::from([(
            "PF_NO_NOTIFY_SIGNAL".to_string(),
            BTreeSet::from(["kernel/signal.c".to_string()]),
        )]);
        assert!(!reaches_nothing("include/linux/sched.h", &got, &taken));
    }

    #[test]
    fn changes_of_existing_items_are_not_declarations() {
        for body in [
            // Inside a function body, a macro's body, a prototype's parameters.
            "@@ -9,3 +9,4 @@\n {\n+\tif (!a) return 0;\n \treturn a + 1;\n }\n",
            "@@ -13,2 +13,3 @@\n #define OLD_MACRO(x) \\\n+\t(x) + \\\n \t((x) * 2)\n",
            "@@ -16,2 +16,3 @@\n int old_proto(struct page *p,\n+\t      int extra,\n \t      int flags);\n",
            // A forward declaration replaced.
            "@@ -4,1 +4,1 @@\n-struct page;\n+struct folio;\n",
        ] {
            assert_eq!(declarations(OLD, &diff(body)), None, "{body}");
        }
    }

    #[test]
    fn additions_that_emit_or_change_code_are_not_declarations() {
        for added in [
            "+#include <linux/other.h>\n",
            "+#undef OLD_MACRO\n",
            "+int new_variable;\n",
            "+static int new_fn(void) { return 0; }\n",
            "+int new_fn(void) { return 0; }\n",
            "+struct new_thing { int a; } new_instance;\n",
            "+static inline void __used new_kept(void) { }\n",
            "+asm(\".globl x\");\n",
            "+#ifdef CONFIG_NEW\n+int new_helper(void);\n",
            "+DECLARE_PER_CPU(int, new_pcpu);\n",
        ] {
            let d = diff(&format!(
                "@@ -3,1 +3,{} @@\n \n{added}",
                1 + added.lines().count()
            ));
            let names = declarations(OLD, &d).map(|d| d.added);
            // A macro invocation yields the macro's name, which the tree uses: not new.
            assert!(
                names.is_none() || names == Some(vec!["DECLARE_PER_CPU".to_string()]),
                "{added}: {names:?}"
            );
        }
    }

    #[test]
    fn names_the_tree_mentions_are_found_by_whole_word() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("mm")).unwrap();
        std::fs::create_dir_all(dir.path().join("tools/lib")).unwrap();
        std::fs::create_dir_all(dir.path().join("arch/arm64")).unwrap();
        std::fs::write(
            dir.path().join("mm/a.c"),
            "int x = used_one(2); // old_two_x\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("tools/lib/b.c"), "int y = in_tools;\n").unwrap();
        std::fs::write(dir.path().join("arch/arm64/c.c"), "int z = in_arm;\n").unwrap();
        std::fs::create_dir_all(dir.path().join("arch/x86/include")).unwrap();
        std::fs::write(
            dir.path().join("arch/x86/include/d.h"),
            "#define D in_x86\n",
        )
        .unwrap();
        let names: Vec<String> = ["used_one", "old_two", "in_tools", "in_arm", "in_x86"]
            .map(String::from)
            .to_vec();
        let found = mentioned(dir.path(), &names).unwrap();
        assert_eq!(
            found,
            BTreeMap::from([
                (
                    "in_x86".to_string(),
                    BTreeSet::from(["arch/x86/include/d.h".to_string()])
                ),
                (
                    "used_one".to_string(),
                    BTreeSet::from(["mm/a.c".to_string()])
                ),
            ])
        );
        assert!(mentioned(dir.path(), &[]).unwrap().is_empty());
    }
}
