//! The fix as the operator has it: a unified diff (`diff -u`, `git diff`, `git format-patch`).
//!
//! Only what the builder needs is parsed: which files change, and which lines of each old file
//! a hunk removes or inserts at. Applying the diff to the source tree is left to GNU `patch`
//! (its fuzz and offset rules are what kernel developers expect); this parse decides *before*
//! anything is compiled whether the diff is something a function-level live patch can be:
//! only C translation units, no new or deleted files, no type definitions changed.

use thiserror::Error;

/// One file's part of the diff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDiff {
    /// Path relative to the tree root (the first component of `a/…`/`b/…` stripped, as
    /// `patch -p1` does).
    pub path: String,
    /// The old file does not exist (`--- /dev/null`).
    pub created: bool,
    /// The new file does not exist (`+++ /dev/null`).
    pub deleted: bool,
    pub hunks: Vec<Hunk>,
}

/// One `@@ -a,b +c,d @@` hunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hunk {
    /// First line of the old file the hunk covers (1-based).
    pub old_start: u32,
    pub old_len: u32,
    /// Old-file lines the hunk removes or inserts before (1-based; an insertion before line n
    /// records n, an insertion at the end of the file records `old_start + old_len`).
    pub touched: Vec<u32>,
    /// The hunk's body lines, each with its `' '`, `'-'` or `'+'` (to apply it in memory).
    pub body: Vec<(u8, String)>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DiffError {
    #[error(
        "the diff names no files (no `--- a/…` / `+++ b/…` header pair): give a unified diff \
         (`diff -u`, `git diff`, `git format-patch`)"
    )]
    Empty,
    #[error("diff line {line}: {what}; the diff is damaged or not a unified diff")]
    Malformed { line: usize, what: String },
}

/// Parses a unified diff. Text before the first file header (a mail header, a commit message)
/// is ignored, as `patch` ignores it.
pub fn parse(text: &str) -> Result<Vec<FileDiff>, DiffError> {
    let lines: Vec<&str> = text.lines().collect();
    let mut files: Vec<FileDiff> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        if let (Some(old), Some(new)) = (
            l.strip_prefix("--- "),
            lines.get(i + 1).and_then(|n| n.strip_prefix("+++ ")),
        ) {
            let (old, new) = (header_path(old), header_path(new));
            let created = old.is_none();
            let deleted = new.is_none();
            let path = new.or(old).ok_or(DiffError::Malformed {
                line: i + 1,
                what: "both sides are /dev/null".into(),
            })?;
            i += 2;
            let mut hunks = Vec::new();
            while let Some(h) = lines.get(i).and_then(|l| l.strip_prefix("@@ ")) {
                let (old_start, old_len, new_len) = hunk_header(h).ok_or(DiffError::Malformed {
                    line: i + 1,
                    what: format!("bad hunk header {:?}", lines[i]),
                })?;
                i += 1;
                let (mut old_seen, mut new_seen) = (0u32, 0u32);
                let mut touched = Vec::new();
                let mut body_lines = Vec::new();
                let mut old_line = old_start.max(1);
                while old_seen < old_len || new_seen < new_len {
                    let Some(body) = lines.get(i) else {
                        return Err(DiffError::Malformed {
                            line: i + 1,
                            what: "the diff ends inside a hunk".into(),
                        });
                    };
                    let kind = body.as_bytes().first().copied();
                    if let Some(k @ (b' ' | b'-' | b'+')) = kind {
                        body_lines.push((k, body[1..].to_string()));
                    } else if kind.is_none() {
                        body_lines.push((b' ', String::new()));
                    }
                    match kind {
                        Some(b' ') | None => {
                            old_seen += 1;
                            new_seen += 1;
                            old_line += 1;
                        }
                        Some(b'-') => {
                            touched.push(old_line);
                            old_seen += 1;
                            old_line += 1;
                        }
                        Some(b'+') => {
                            touched.push(old_line);
                            new_seen += 1;
                        }
                        Some(b'\\') => {} // "\ No newline at end of file"
                        _ => {
                            return Err(DiffError::Malformed {
                                line: i + 1,
                                what: format!("unexpected line {body:?} inside a hunk"),
                            });
                        }
                    }
                    i += 1;
                }
                while lines.get(i).is_some_and(|l| l.starts_with('\\')) {
                    i += 1;
                }
                touched.dedup();
                hunks.push(Hunk {
                    old_start,
                    old_len,
                    touched,
                    body: body_lines,
                });
            }
            files.push(FileDiff {
                path,
                created,
                deleted,
                hunks,
            });
            continue;
        }
        i += 1;
    }
    if files.is_empty() {
        return Err(DiffError::Empty);
    }
    Ok(files)
}

/// The file after `hunks`, applied exactly where their headers say (no offset, no fuzz).
/// `None` when a context or removed line is not what the file has there: then the caller
/// cannot see the new text and must judge from the old one alone. GNU `patch` still applies
/// the diff for the build, with its offsets and fuzz.
pub fn apply_exactly(old: &str, hunks: &[Hunk]) -> Option<String> {
    let lines: Vec<&str> = old.lines().collect();
    let mut out: Vec<&str> = Vec::with_capacity(lines.len());
    let mut next = 0usize; // index of the first old line not yet copied
    for h in hunks {
        // `old_start` is 1-based; a pure insertion at the top has old_start 0.
        let start = if h.old_len == 0 {
            h.old_start as usize
        } else {
            (h.old_start as usize).checked_sub(1)?
        };
        if start < next || start > lines.len() {
            return None;
        }
        out.extend_from_slice(&lines[next..start]);
        let mut at = start;
        for (kind, text) in &h.body {
            match kind {
                b' ' | b'-' => {
                    if lines.get(at) != Some(&text.as_str()) {
                        return None;
                    }
                    if *kind == b' ' {
                        out.push(text);
                    }
                    at += 1;
                }
                _ => out.push(text),
            }
        }
        next = at;
    }
    out.extend_from_slice(&lines[next.min(lines.len())..]);
    let mut text = out.join("\n");
    text.push('\n');
    Some(text)
}

/// C source with its comments removed and every run of white space made one space: what the
/// compiler reads, to tell a change of a definition from a change of its comments.
/// String and character literals are kept whole (a `/*` inside one is not a comment).
pub fn code_text(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let mut space = false;
    let put = |out: &mut Vec<u8>, c: u8, space: &mut bool| {
        if *space && !out.is_empty() {
            out.push(b' ');
        }
        *space = false;
        out.push(c);
    };
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                i += 1;
            }
            i += 2;
            space = true;
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            space = true;
            continue;
        }
        if c == b'"' || c == b'\'' {
            put(&mut out, c, &mut space);
            i += 1;
            while i < b.len() && b[i] != c {
                if b[i] == b'\\' && i + 1 < b.len() {
                    out.push(b[i]);
                    i += 1;
                }
                out.push(b[i]);
                i += 1;
            }
            if i < b.len() {
                out.push(c);
            }
            i += 1;
            continue;
        }
        if c.is_ascii_whitespace() {
            space = true;
        } else {
            put(&mut out, c, &mut space);
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The words of C text: its runs of identifier characters (`[A-Za-z0-9_]`), numbers included.
pub fn words(s: &str) -> impl Iterator<Item = &str> {
    s.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
}

/// `a/fs/proc/base.c\t2026-…` → `fs/proc/base.c`; `/dev/null` → `None`.
fn header_path(h: &str) -> Option<String> {
    let p = h.split('\t').next().unwrap_or(h).trim_end();
    if p == "/dev/null" {
        return None;
    }
    Some(match p.split_once('/') {
        Some((_, rest)) => rest.to_string(),
        None => p.to_string(),
    })
}

/// `-12,7 +12,8 @@ …` → (12, 7, 8).
fn hunk_header(h: &str) -> Option<(u32, u32, u32)> {
    let mut it = h.split_whitespace();
    let old = it.next()?.strip_prefix('-')?;
    let new = it.next()?.strip_prefix('+')?;
    let range = |r: &str| -> Option<(u32, u32)> {
        match r.split_once(',') {
            Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
            None => Some((r.parse().ok()?, 1)),
        }
    };
    let (os, ol) = range(old)?;
    let (_, nl) = range(new)?;
    Some((os, ol, nl))
}

/// A top-level construct of a C file, by the lines it spans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Construct {
    pub kind: ConstructKind,
    /// What the head says: the tag of a type, the name of a function or variable (best effort).
    pub name: String,
    pub first_line: u32,
    pub last_line: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConstructKind {
    /// `struct x { … }`, `union x { … }`, `enum x { … }` (also inside a typedef).
    Type,
    /// `… name(args) { … }`.
    Function,
    /// `… name = { … };`: a variable with a braced initializer.
    Initializer,
}

/// The brace-delimited top-level constructs of C source `text`: comments, strings, character
/// literals and preprocessor lines are skipped; nested braces belong to their outermost
/// construct. Best effort, as a reader scanning the file would: it exists to name *what* a
/// hunk changes before compiling, and the object comparison after compiling is the check that
/// decides.
pub fn constructs(text: &str) -> Vec<Construct> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let (mut i, mut line, mut depth) = (0usize, 1u32, 0u32);
    let mut head = String::new();
    let mut open: Option<(ConstructKind, String, u32)> = None;
    let mut at_line_start = true;
    while i < b.len() {
        let c = b[i];
        if c == b'\n' {
            line += 1;
            at_line_start = true;
            if depth == 0 {
                head.push(' ');
            }
            i += 1;
            continue;
        }
        if at_line_start && c == b'#' {
            // A preprocessor line, with its continuations.
            while i < b.len() && b[i] != b'\n' {
                if b[i] == b'\\' && b.get(i + 1) == Some(&b'\n') {
                    line += 1;
                    i += 1;
                }
                i += 1;
            }
            continue;
        }
        if !c.is_ascii_whitespace() {
            at_line_start = false;
        }
        match c {
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                    if b[i] == b'\n' {
                        line += 1;
                    }
                    i += 1;
                }
                i += 2;
                continue;
            }
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'"' | b'\'' => {
                let q = c;
                i += 1;
                while i < b.len() && b[i] != q {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    if b.get(i) == Some(&b'\n') {
                        line += 1;
                    }
                    i += 1;
                }
                if depth == 0 {
                    head.push_str("\"\"");
                }
                i += 1;
                continue;
            }
            b'{' => {
                if depth == 0 {
                    let kind = classify(&head);
                    let name = match kind {
                        ConstructKind::Type => type_name(&head),
                        _ => head_name(&head),
                    };
                    open = Some((kind, name, line));
                }
                depth += 1;
            }
            b'}' => {
                depth = depth.saturating_sub(1);
                if depth == 0
                    && let Some((kind, name, first)) = open.take()
                {
                    out.push(Construct {
                        kind,
                        name,
                        first_line: first,
                        last_line: line,
                    });
                    head.clear();
                }
            }
            b';' if depth == 0 => head.clear(),
            _ if depth == 0 => head.push(c as char),
            _ => {}
        }
        i += 1;
    }
    out
}

fn classify(head: &str) -> ConstructKind {
    let h = strip_attributes(head.trim());
    if h.contains('=') {
        return ConstructKind::Initializer;
    }
    if h.contains('(') {
        return ConstructKind::Function;
    }
    let is_tag = words(&h).any(|w| matches!(w, "struct" | "union" | "enum"));
    if is_tag {
        ConstructKind::Type
    } else {
        ConstructKind::Function
    }
}

/// `head` without `__attribute__((…))` and `__aligned(…)`-style annotations, whose
/// parentheses would make a type definition look like a function.
/// The length of a balanced parenthesis group's inside and its `)`, `args` starting just
/// after the `(` (all of it when the group does not close).
fn group_end(args: &str) -> usize {
    let mut depth = 1;
    for (i, c) in args.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
    }
    args.len()
}

/// Whether `s` holds only `__ident` and `__ident(…)` tokens (the kernel's attribute macros).
fn only_attributes(mut s: &str) -> bool {
    loop {
        s = s.trim_start();
        if s.is_empty() {
            return true;
        }
        if !s.starts_with("__") {
            return false;
        }
        let n = s
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(s.len());
        s = s[n..].trim_start();
        if let Some(args) = s.strip_prefix('(') {
            s = &args[group_end(args)..];
        }
    }
}

fn strip_attributes(head: &str) -> String {
    let mut out = String::with_capacity(head.len());
    let mut rest = head;
    while let Some(pos) = rest.find("__") {
        out.push_str(&rest[..pos]);
        let after = &rest[pos..];
        let ident_len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let tail = after[ident_len..].trim_start();
        if let Some(args) = tail.strip_prefix('(') {
            let end = group_end(args);
            if only_attributes(&args[end..]) {
                // Nothing but attributes follows: this is the declarator, a function whose
                // name starts with `__` (`__blkg_release(…)`, `__cpu_up(…) __must_hold(…)`).
                out.push_str(&after[..ident_len]);
                rest = &after[ident_len..];
            } else {
                // An attribute with arguments (`__printf(2, 3)`) before the declarator.
                rest = &args[end..];
            }
        } else if tail.is_empty() || tail.starts_with(['=', '[']) {
            // The name itself: `struct __kernel_timespec {`, `… __names[] = {`.
            out.push_str(&after[..ident_len]);
            rest = &after[ident_len..];
        } else {
            rest = &after[ident_len..];
        }
    }
    out.push_str(rest);
    out
}

/// `struct x` (or `union x`, `enum x`; the keyword alone when anonymous) of a type's head.
fn type_name(head: &str) -> String {
    let h = strip_attributes(head.trim());
    let words: Vec<&str> = words(&h).collect();
    match words
        .iter()
        .position(|w| matches!(*w, "struct" | "union" | "enum"))
    {
        Some(i) => match words.get(i + 1) {
            Some(n) => format!("{} {n}", words[i]),
            None => words[i].to_string(),
        },
        None => h.trim().to_string(),
    }
}

/// The identifier before `(` (functions), before `=` (variables), or after `struct`/`union`/
/// `enum` (types).
fn head_name(head: &str) -> String {
    let h = strip_attributes(head.trim());
    let h = h.trim();
    let cut = h.find('(').or_else(|| h.find('=')).unwrap_or(h.len());
    words(&h[..cut])
        .last()
        .map(str::to_string)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIFF: &str = r#"From 1234 Mon Sep 17 00:00:00 2001
Subject: [PATCH] proc: fix a thing

diff --git a/fs/proc/base.c b/fs/proc/base.c
index 1..2 100644
--- a/fs/proc/base.c
+++ b/fs/proc/base.c
@@ -10,3 +10,4 @@ static int f(void)
 a
-b
+c
+d
 e
@@ -40,2 +41,3 @@
 x
 y
+z
--- /dev/null
+++ b/fs/proc/new.c
@@ -0,0 +1 @@
+int x;
"#;

    #[test]
    fn files_hunks_and_touched_lines() {
        let f = parse(DIFF).unwrap();
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].path, "fs/proc/base.c");
        assert!(!f[0].created && !f[0].deleted);
        assert_eq!(f[0].hunks.len(), 2);
        // "-b" is old line 11; both insertions go before old line 12.
        assert_eq!(f[0].hunks[0].touched, vec![11, 12]);
        // Appended after old lines 40, 41: before line 42.
        assert_eq!(f[0].hunks[1].touched, vec![42]);
        assert_eq!(f[1].path, "fs/proc/new.c");
        assert!(f[1].created);
    }

    #[test]
    fn names_with_leading_underscores_are_names_not_attributes() {
        let src = "static void __blkg_release(struct rcu_head *rcu)\n{\n}\n\
static __printf(2, 3) void __cold __log(int l, const char *f, ...)\n{\n}\n\
int __init __ref __cpu_up(unsigned int cpu) __must_hold(&lock)\n{\n}\n\
struct __kernel_timespec {\n\tlong s;\n};\n\
static const char *const __names[] = {\n\t\"a\",\n};\n\
static struct ops __initdata fops = {\n};\n";
        let names: Vec<_> = constructs(src)
            .iter()
            .map(|c| (c.kind, c.name.clone()))
            .collect();
        assert_eq!(
            names,
            vec![
                (ConstructKind::Function, "__blkg_release".to_string()),
                (ConstructKind::Function, "__log".to_string()),
                (ConstructKind::Function, "__cpu_up".to_string()),
                (ConstructKind::Type, "struct __kernel_timespec".to_string()),
                (ConstructKind::Initializer, "__names".to_string()),
                (ConstructKind::Initializer, "fops".to_string()),
            ]
        );
    }

    #[test]
    fn hunks_apply_exactly_or_not_at_all() {
        let old = "a\nb\nc\nd\n";
        let f = parse(
            "--- a/x.c\n+++ b/x.c\n@@ -2,2 +2,3 @@\n-b\n+B\n+b2\n c\n@@ -4 +5,2 @@\n d\n+e\n",
        )
        .unwrap();
        assert_eq!(
            apply_exactly(old, &f[0].hunks).as_deref(),
            Some("a\nB\nb2\nc\nd\ne\n")
        );
        let top = parse("--- a/x.c\n+++ b/x.c\n@@ -0,0 +1 @@\n+z\n").unwrap();
        assert_eq!(
            apply_exactly(old, &top[0].hunks).as_deref(),
            Some("z\na\nb\nc\nd\n")
        );
        // A removed line that is not there: not applied (GNU patch may still find it).
        let off = parse("--- a/x.c\n+++ b/x.c\n@@ -1 +1 @@\n-x\n+y\n").unwrap();
        assert_eq!(apply_exactly(old, &off[0].hunks), None);
    }

    #[test]
    fn code_text_drops_comments_and_spacing_but_not_strings() {
        assert_eq!(
            code_text("int  a; /* x\n y */ long\tb; // z\n"),
            "int a; long b;"
        );
        assert_eq!(code_text("int a;\n"), code_text("int a;  /* new */\n"));
        assert_eq!(code_text("s = \"/* no */\";"), "s = \"/* no */\";");
        assert_ne!(code_text("int a;"), code_text("int b;"));
    }

    #[test]
    fn damaged_diffs_are_refused() {
        assert_eq!(parse("just text\n"), Err(DiffError::Empty));
        let cut = "--- a/x.c\n+++ b/x.c\n@@ -1,3 +1,3 @@\n a\n";
        assert!(matches!(parse(cut), Err(DiffError::Malformed { .. })));
        let bad = "--- a/x.c\n+++ b/x.c\n@@ -1 +1 @@\n?a\n";
        assert!(matches!(parse(bad), Err(DiffError::Malformed { .. })));
    }

    #[test]
    fn constructs_of_a_c_file() {
        let src = "#include <x.h>\n\
/* a { comment */\n\
struct s {\n\
\tint a; /* } */\n\
};\n\
static const char *names[] = {\n\
\t\"{\",\n\
};\n\
static int f(int x)\n\
{\n\
\tif (x) { return 1; }\n\
\treturn 0;\n\
}\n\
typedef union u { int a; } u_t;\n\
struct __attribute__((packed)) p { char c; };\n";
        let c = constructs(src);
        let kinds: Vec<_> = c
            .iter()
            .map(|c| (c.kind, c.name.as_str(), c.first_line, c.last_line))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (ConstructKind::Type, "struct s", 3, 5),
                (ConstructKind::Initializer, "names", 6, 8),
                (ConstructKind::Function, "f", 10, 13),
                (ConstructKind::Type, "union u", 14, 14),
                (ConstructKind::Type, "struct p", 15, 15),
            ]
        );
    }
}
