//! When a changed `enum` still means what it meant: every old enumerator keeps its value.
//!
//! Fixes often add a state or a flag to an enum (`IOPRIO_CLASS_INVALID = 7`), sometimes
//! spelling the old values out as they do (`IOPRIO_CLASS_RT = 1` for an implicit 1). Code the
//! patch does not replace was compiled with the old constants; if each keeps its value and the
//! enum's type stays `int`-sized, that code and the new code agree, and no memory already in use
//! is laid out differently. Such an enum change is not a type change
//! (`docs/source-patches.md` §2). Only what can be decided from the text counts: values given
//! as integer literals, or by counting on from one; an enumerator whose value is an expression
//! must keep the same expression and the same predecessors. The object comparison after
//! compiling checks enumerator values again from the debug information (`layout`).

/// An enumerator's value as the text gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    Known(i128),
    /// `steps` after an expression the text does not evaluate.
    After {
        expr: String,
        steps: u32,
    },
}

/// An enum's text read: what precedes its body, its enumerators in order, what follows.
struct EnumText {
    head: String,
    items: Vec<(String, Value)>,
    tail: String,
}

/// The enumerators of an enum's text (`code_text`, from its head to its `}`); `None` when the
/// text is not an enum body this can read.
fn enumerators(text: &str) -> Option<EnumText> {
    let open = text.find('{')?;
    let close = text.rfind('}')?;
    if close < open {
        return None;
    }
    let (head, body, tail) = (&text[..open], &text[open + 1..close], &text[close + 1..]);
    let mut out = Vec::new();
    let mut prev: Option<Value> = None;
    for item in split_top(body) {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let (name, init) = match item.split_once('=') {
            Some((n, e)) => (n.trim(), Some(e.trim())),
            None => (item, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return None;
        }
        let value = match init {
            Some(e) => match literal(e) {
                Some(v) => Value::Known(v),
                None => Value::After {
                    expr: e.to_string(),
                    steps: 0,
                },
            },
            None => match prev {
                None => Value::Known(0),
                Some(Value::Known(v)) => Value::Known(v + 1),
                Some(Value::After { expr, steps }) => Value::After {
                    expr,
                    steps: steps + 1,
                },
            },
        };
        prev = Some(value.clone());
        out.push((name.to_string(), value));
    }
    Some(EnumText {
        head: head.trim().to_string(),
        items: out,
        tail: tail.trim().to_string(),
    })
}

/// `body` split at the commas outside brackets.
fn split_top(body: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in body.char_indices() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&body[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&body[start..]);
    parts
}

/// A C integer literal (decimal, hex, octal; `U`/`L` suffixes; a leading `-`), maybe in
/// parentheses.
fn literal(e: &str) -> Option<i128> {
    let mut e = e.trim();
    while let Some(inner) = e.strip_prefix('(').and_then(|x| x.strip_suffix(')')) {
        e = inner.trim();
    }
    let (neg, e) = match e.strip_prefix('-') {
        Some(rest) => (true, rest.trim()),
        None => (false, e),
    };
    let e = e.trim_end_matches(['u', 'U', 'l', 'L']);
    let v = if let Some(h) = e.strip_prefix("0x").or_else(|| e.strip_prefix("0X")) {
        i128::from_str_radix(h, 16).ok()?
    } else if e.len() > 1 && e.starts_with('0') {
        i128::from_str_radix(&e[1..], 8).ok()?
    } else {
        e.parse::<i128>().ok()?
    };
    Some(if neg { -v } else { v })
}

/// Whether enum text `new` keeps every enumerator of `old` at its value, adds only enumerators
/// with known values that fit an `int`, and keeps its head (tag, attributes) and what follows
/// the body (a typedef name).
pub fn keeps_values(old: &str, new: &str) -> bool {
    let (Some(old), Some(new)) = (enumerators(old), enumerators(new)) else {
        return false;
    };
    if old.head != new.head
        || old.tail != new.tail
        || !crate::unified::words(&old.head).any(|w| w == "enum")
    {
        return false;
    }
    let (old_items, new_items) = (old.items, new.items);
    let int = i128::from(i32::MIN)..=i128::from(u32::MAX);
    let fits = |v: &Value| matches!(v, Value::Known(n) if int.contains(n));
    // With a value past `int` the compiler may pick a wider type for the whole enum.
    if !old_items
        .iter()
        .all(|(_, v)| matches!(v, Value::After { .. }) || fits(v))
    {
        return false;
    }
    for (name, value) in &old_items {
        match new_items.iter().find(|(n, _)| n == name) {
            Some((_, v)) if v == value => {}
            _ => return false,
        }
    }
    new_items
        .iter()
        .filter(|(n, _)| !old_items.iter().any(|(o, _)| o == n))
        .all(|(_, v)| fits(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unified::code_text;

    fn keeps(old: &str, new: &str) -> bool {
        keeps_values(&code_text(old), &code_text(new))
    }

    #[test]
    fn an_added_enumerator_with_old_values_spelled_out_keeps_them() {
        // The 6.1.191 ioprio fix.
        let old = "enum {\n\tIOPRIO_CLASS_NONE,\n\tIOPRIO_CLASS_RT,\n\tIOPRIO_CLASS_BE,\n\tIOPRIO_CLASS_IDLE,\n}";
        let new = "enum {\n\tIOPRIO_CLASS_NONE\t= 0,\n\tIOPRIO_CLASS_RT\t\t= 1,\n\tIOPRIO_CLASS_BE\t\t= 2,\n\tIOPRIO_CLASS_IDLE\t= 3,\n\n\t/* Special class to indicate an invalid ioprio value */\n\tIOPRIO_CLASS_INVALID\t= 7,\n}";
        assert!(keeps(old, new));
        // Appended at the end, counting on.
        assert!(keeps("enum s { A, B = 4, C }", "enum s { A, B = 4, C, D }"));
        // After an expression kept as it was.
        assert!(keeps(
            "enum s { A = FOO, B }",
            "enum s { A = FOO, B, C = 9 }"
        ));
    }

    #[test]
    fn a_value_that_moves_or_a_count_that_grows_is_a_change() {
        for (old, new) in [
            // Inserted before a counter: NR moves.
            ("enum s { A, B, NR }", "enum s { A, B, C, NR }"),
            // Inserted in front.
            ("enum s { A, B }", "enum s { Z, A, B }"),
            // An old one removed.
            ("enum s { A, B, C }", "enum s { A, C }"),
            // An expression changed.
            ("enum s { A = FOO, B }", "enum s { A = BAR, B }"),
            // A new value past int: the enum may widen.
            ("enum s { A, B }", "enum s { A, B, C = 0x100000000 }"),
            // A new value the text does not evaluate.
            ("enum s { A, B }", "enum s { A, B, C = B << 2 }"),
            // Another tag, or a typedef name.
            ("enum s { A }", "enum t { A }"),
            ("typedef enum { A } a_t", "typedef enum { A } b_t"),
            // Not an enum.
            ("struct s { int a; }", "struct s { int a; int b; }"),
        ] {
            assert!(!keeps(old, new), "{old} -> {new}");
        }
    }
}
