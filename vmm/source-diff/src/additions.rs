//! Header changes that only declare new names, which reach no unit but the fix's own.
//!
//! Many upstream fixes add a helper to a `.c` file and its prototype (or a new macro, or a
//! `static inline` wrapper) to a header every part of the kernel includes: `include/linux/mm.h`
//! reaches over 2,000 built-in units. Compiling each of them before and after would make the
//! fix unbuildable (`--max-units`), yet no existing unit can compile differently because of a
//! declaration of a name it never mentions: an unused prototype, macro, type or `static inline`
//! function produces no code. So a header's diff counts as *declarations only*
//! (`docs/source-patches.md` §2) when
//!
//! - every hunk only adds lines (nothing removed or rewritten), and each run of added lines is
//!   inserted between two top-level items of the old header (not inside a definition, a
//!   declaration, a macro's continuation lines or a comment);
//! - each run is whole top-level items by itself: `#define NAME …`, balanced
//!   `#if`/`#else`/`#endif`, prototypes, `extern` declarations, `typedef`s, new `struct`/
//!   `union`/`enum` types and `static inline` functions (no `#include`, `#undef`, `#pragma`,
//!   no variable definition, no top-level `asm`, no `__used`/`constructor` attribute: those
//!   emit or change code in every includer);
//! - no file of the tree the kernel's units are built from mentions any name the run declares
//!   (a whole-word search, comments included, [`mentioned`]). A name already used elsewhere
//!   (a helper moved from a `.c` file, a macro redefined) makes the header reach its includers
//!   as any other change does.
//!
//! What it may change elsewhere is line numbers after the insertion (`__LINE__` in a later
//! `WARN()`'s message): the running kernel's copy of such a unit behaves the same, so leaving it
//! unpatched is right.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use crate::unified::{FileDiff, apply_exactly};

/// One top-level item of C source: a preprocessor line (with its continuations) or a C
/// declaration/definition, with comments removed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Item {
    preprocessor: bool,
    text: String,
    first_line: u32,
    last_line: u32,
}

/// The top-level items of `text`, and the lines after which no item or comment goes on (the
/// places a whole item can be inserted), as `ends[k]` = "between line k and line k+1" (k = 0:
/// before the first line). `clean` is false when the text ends inside an item or a comment.
struct Scan {
    items: Vec<Item>,
    ends: Vec<bool>,
    clean: bool,
}

fn scan(text: &str) -> Scan {
    let b = text.as_bytes();
    let lines = text.lines().count();
    let mut ends = vec![true; lines + 1];
    let mut items: Vec<Item> = Vec::new();
    let (mut i, mut line) = (0usize, 1u32);
    // The C item being read: its text, first line, brace depth, and whether its head (the part
    // before the first top-level `{`) has a `(` and no `=` (a function: it ends at its `}`).
    let mut cur: Option<(String, u32)> = None;
    let mut depth = 0u32;
    let mut at_line_start = true;
    while i < b.len() {
        let c = b[i];
        if c == b'\n' {
            line += 1;
            at_line_start = true;
            if let Some((t, _)) = cur.as_mut() {
                t.push(' ');
            }
            i += 1;
            continue;
        }
        if at_line_start && c == b'#' && cur.is_none() {
            let first = line;
            let mut t = String::new();
            while i < b.len() && b[i] != b'\n' {
                if b[i] == b'\\' && b.get(i + 1) == Some(&b'\n') {
                    line += 1;
                    t.push(' ');
                    i += 2;
                    continue;
                }
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    // A comment inside a directive (it may span lines).
                    i += 2;
                    while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                        if b[i] == b'\n' {
                            line += 1;
                        }
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
            spans(first, line, &mut ends);
            items.push(Item {
                preprocessor: true,
                text: t.trim().to_string(),
                first_line: first,
                last_line: line,
            });
            continue;
        }
        if !c.is_ascii_whitespace() {
            at_line_start = false;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let first = line;
            i += 2;
            while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                if b[i] == b'\n' {
                    line += 1;
                }
                i += 1;
            }
            if i >= b.len() {
                return Scan {
                    items,
                    ends,
                    clean: false,
                };
            }
            i += 2;
            spans(first, line, &mut ends);
            if let Some((t, _)) = cur.as_mut() {
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
            if let Some((t, _)) = cur.as_mut() {
                t.push(' ');
            }
            i += 1;
            continue;
        }
        let (t, _) = cur.get_or_insert_with(|| (String::new(), line));
        if c == b'"' || c == b'\'' {
            t.push(c as char);
            i += 1;
            while i < b.len() && b[i] != c {
                if b[i] == b'\\' && i + 1 < b.len() {
                    t.push(b[i] as char);
                    i += 1;
                }
                if b[i] == b'\n' {
                    line += 1;
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
        if close && let Some((text, first)) = cur.take() {
            spans(first, line, &mut ends);
            items.push(Item {
                preprocessor: false,
                text: text.trim().to_string(),
                first_line: first,
                last_line: line,
            });
        }
        i += 1;
    }
    let clean = cur.is_none() && depth == 0;
    if let Some((_, first)) = cur {
        spans(first, line, &mut ends);
    }
    Scan { items, ends, clean }
}

/// Marks the places between `first` and `last` as inside an item or comment.
fn spans(first: u32, last: u32, ends: &mut [bool]) {
    for k in first..last {
        if let Some(e) = ends.get_mut(k as usize) {
            *e = false;
        }
    }
}

fn words(s: &str) -> impl Iterator<Item = &str> {
    s.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
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

/// The names a header's diff declares when it is declarations only (module docs), in the
/// order they appear; `None` otherwise. `old` is the header before the diff.
pub fn declared_names(old: &str, file: &FileDiff) -> Option<Vec<String>> {
    if file.created || file.deleted || !file.path.ends_with(".h") {
        return None;
    }
    // The hunks must apply exactly as written, or the places they insert at are unknown.
    apply_exactly(old, &file.hunks)?;
    let before = scan(old);
    if !before.clean {
        return None;
    }
    let mut names = Vec::new();
    for h in &file.hunks {
        // The old line after which the next added run goes.
        let mut after = if h.old_len == 0 {
            h.old_start
        } else {
            h.old_start.saturating_sub(1)
        };
        let mut run: Vec<&str> = Vec::new();
        let mut runs: Vec<(u32, String)> = Vec::new();
        for (kind, text) in &h.body {
            match kind {
                b'+' => run.push(text),
                b' ' => {
                    if !run.is_empty() {
                        runs.push((after, run.join("\n")));
                        run.clear();
                    }
                    after += 1;
                }
                _ => return None,
            }
        }
        if !run.is_empty() {
            runs.push((after, run.join("\n")));
        }
        for (at, text) in runs {
            if !before.ends.get(at as usize).copied().unwrap_or(false) {
                return None;
            }
            let added = scan(&text);
            if !added.clean {
                return None;
            }
            let mut open = 0;
            for item in &added.items {
                let n = if item.preprocessor {
                    directive_names(&item.text, &mut open)?
                } else {
                    item_names(&item.text)?
                };
                names.extend(n);
            }
            if open != 0 {
                return None;
            }
        }
    }
    let mut seen = BTreeSet::new();
    names.retain(|n| seen.insert(n.clone()));
    Some(names)
}

/// Which of `names` a file the kernel is built from mentions (whole words, comments included):
/// every C, header and assembly file of the tree outside host tools, documentation and other
/// architectures.
pub fn mentioned(tree: &Path, names: &[String]) -> std::io::Result<BTreeSet<String>> {
    if names.is_empty() {
        return Ok(BTreeSet::new());
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
                dirs.push(tree.join("arch/x86"));
            }
        } else {
            dirs.push(e.path());
        }
    }
    let mut cmd = Command::new("grep");
    cmd.args(["-rhowF", "--include=*.c", "--include=*.h", "--include=*.S"]);
    cmd.args(["--include=*.lds", "--include=*.asn1", "--include=*.tbl"]);
    for n in names {
        cmd.arg("-e").arg(n);
    }
    cmd.args(&dirs);
    let out = cmd.output()?;
    // 0: found, 1: found nothing, 2: trouble (an unreadable file still lets the rest count,
    // but then nothing may be concluded from an absence).
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
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .filter(|w| names.contains(w))
        .collect())
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
        let names = declared_names(OLD, &d).expect("declarations only");
        assert_eq!(
            names,
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
    fn a_comment_alone_declares_nothing_and_counts() {
        let d =
            diff("@@ -3,2 +3,3 @@\n \n+/* why struct page is forward-declared */\n struct page;\n");
        assert_eq!(declared_names(OLD, &d), Some(Vec::new()));
    }

    #[test]
    fn changes_inside_or_of_existing_items_are_not_declarations() {
        // Inside a function body, inside a macro's continuation, inside a multi-line
        // prototype, inside a comment.
        for body in [
            "@@ -9,3 +9,4 @@\n {\n+\tif (!a) return 0;\n \treturn a + 1;\n }\n",
            "@@ -13,2 +13,3 @@\n #define OLD_MACRO(x) \\\n+\t/* doubled */ \\\n \t((x) * 2)\n",
            "@@ -16,2 +16,3 @@\n int old_proto(struct page *p,\n+\t      int extra,\n \t      int flags);\n",
            "@@ -6,2 +6,3 @@\n /* a comment\n+ * more words\n  * on two lines */\n",
            // A removed or rewritten line.
            "@@ -4,1 +4,1 @@\n-struct page;\n+struct folio;\n",
        ] {
            assert_eq!(declared_names(OLD, &diff(body)), None, "{body}");
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
            let names = declared_names(OLD, &d);
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
            BTreeSet::from(["used_one".to_string(), "in_x86".to_string()])
        );
        assert!(mentioned(dir.path(), &[]).unwrap().is_empty());
    }
}
