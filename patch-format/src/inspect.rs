//! Human- and machine-readable views of a parsed patch (`vmm patch inspect`).

use crate::codec::ParsedPatch;
use crate::keys::{PublicKey, SignatureBlock};
use crate::model::*;
use crate::x86::{DisasmLine, disassemble};
use serde_json::{Value, json};
use std::fmt::Write;

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the Unix epoch (proleptic
/// Gregorian calendar, Howard Hinnant's civil-from-days algorithm).
pub fn format_utc(secs: u64) -> String {
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// What `inspect` says about the signature.
fn signature_text(p: &ParsedPatch, trusted: Option<&[PublicKey]>) -> String {
    let base = match &p.signature {
        SignatureBlock::Unsigned => {
            return "UNSIGNED (development only; will be refused by verify/apply)".into();
        }
        SignatureBlock::Ed25519 { key_id, .. } => format!("ed25519, key id {key_id}"),
    };
    match trusted {
        None => format!("{base} (not verified: pass --trusted-key to check)"),
        Some(keys) => match p.verify(keys) {
            Ok(_) => format!("{base}, VALID"),
            Err(e) => format!("{base}, INVALID: {e}"),
        },
    }
}

fn sym_plus(sym: &str, addend: i64) -> String {
    if addend < 0 {
        format!("{sym}-{:#x}", addend.unsigned_abs())
    } else {
        format!("{sym}+{addend:#x}")
    }
}

/// Without `full`, at most this many bytes of a data block are shown.
pub const SUMMARY_DATA: usize = 96;

/// A data block as an escaped byte string (`"%s patched\n\x00"`): strings read as
/// themselves, every other byte as `\xNN`. Cut to [`SUMMARY_DATA`] bytes unless `full`.
fn data_preview(bytes: &[u8], full: bool) -> String {
    let n = shown(bytes.len(), SUMMARY_DATA, full);
    let mut s = format!("\"{}\"", bytes[..n].escape_ascii());
    if n < bytes.len() {
        let _ = write!(s, " ... {} more bytes (--full shows them)", bytes.len() - n);
    }
    s
}

/// Without `full`, at most this many relocations are listed per site.
pub const SUMMARY_RELOCATIONS: usize = 32;
/// Without `full`, at most this many disassembly lines are listed per code block.
pub const SUMMARY_LINES: usize = 64;

/// How many of `total` entries to show.
fn shown(total: usize, cap: usize, full: bool) -> usize {
    if full { total } else { total.min(cap) }
}

fn listing(out: &mut String, lines: &[DisasmLine], full: bool) {
    let n = shown(lines.len(), SUMMARY_LINES, full);
    for l in &lines[..n] {
        let _ = writeln!(out, "      {:>6x}  {:<24} {}", l.offset, l.bytes, l.text);
    }
    if n < lines.len() {
        let _ = writeln!(
            out,
            "      ... {} more instructions (--full lists them all)",
            lines.len() - n
        );
    }
}

/// A readable multi-line description: id, signature, metadata, target, and
/// every site with a disassembly of its old (expected) and new code. Unless `full`, long
/// relocation lists and disassemblies are cut to [`SUMMARY_RELOCATIONS`] and
/// [`SUMMARY_LINES`] entries, with a line saying how many were left out.
pub fn inspect_text(p: &ParsedPatch, trusted: Option<&[PublicKey]>, full: bool) -> String {
    let mut o = String::new();
    let m = &p.patch.meta;
    let t = &p.patch.target;
    let _ = writeln!(o, "patch id     {}", p.id);
    let _ = writeln!(
        o,
        "format       version {}, {} bytes",
        p.version,
        p.file_len()
    );
    let _ = writeln!(o, "signature    {}", signature_text(p, trusted));
    let _ = writeln!(o, "name         {}", m.name);
    let _ = writeln!(
        o,
        "author       {}",
        if m.author.is_empty() { "-" } else { &m.author }
    );
    let _ = writeln!(o, "created      {} ({})", format_utc(m.created), m.created);
    let adv = if m.advisories.is_empty() {
        "-".to_string()
    } else {
        m.advisories.join(", ")
    };
    let _ = writeln!(o, "advisories   {adv}");
    if m.replaces.is_empty() {
        let _ = writeln!(o, "replaces     -");
    }
    for r in &m.replaces {
        let _ = writeln!(o, "replaces     {r}");
    }
    if !m.description.is_empty() {
        let _ = writeln!(o, "description");
        for line in m.description.lines() {
            let _ = writeln!(o, "  {line}");
        }
    }
    let _ = writeln!(o, "target       {}", t.name);
    let _ = writeln!(
        o,
        "  build id     {}",
        t.build_id
            .as_ref()
            .map(hex::encode)
            .unwrap_or_else(|| "-".into())
    );
    let _ = writeln!(
        o,
        "  text sha256  {}",
        t.text_sha256
            .as_ref()
            .map(hex::encode)
            .unwrap_or_else(|| "-".into())
    );
    let data = &p.patch.data;
    if data.is_empty() {
        let _ = writeln!(o, "data         -");
    } else {
        let total: usize = data.iter().map(|d| d.bytes.len()).sum();
        let _ = writeln!(
            o,
            "data         {} read-only blocks, {total} bytes",
            data.len()
        );
        for (i, d) in data.iter().enumerate() {
            let _ = writeln!(
                o,
                "  data[{i}]  {} bytes, align {}: {}",
                d.bytes.len(),
                d.align,
                data_preview(&d.bytes, full)
            );
        }
    }
    let _ = writeln!(o, "sites        {}", p.patch.sites.len());
    for (i, s) in p.patch.sites.iter().enumerate() {
        let _ = writeln!(o);
        let _ = writeln!(o, "site {i}: {} at {}", s.kind.as_str(), s.target);
        let _ = writeln!(
            o,
            "  expected {} bytes, new code {} bytes, {} relocations",
            s.expected.len(),
            s.code.len(),
            s.relocations.len()
        );
        let n = shown(s.relocations.len(), SUMMARY_RELOCATIONS, full);
        for r in &s.relocations[..n] {
            let _ = writeln!(
                o,
                "    +{:#06x}  {:<6}  {}",
                r.offset,
                r.kind.as_str(),
                sym_plus(&r.target.to_string(), r.addend)
            );
        }
        if n < s.relocations.len() {
            let _ = writeln!(
                o,
                "    ... {} more relocations (--full lists them all)",
                s.relocations.len() - n
            );
        }
        let _ = writeln!(o, "  old code (expected bytes):");
        listing(
            &mut o,
            &disassemble(&s.expected, &[], Some(&s.target.to_string())),
            full,
        );
        let _ = writeln!(o, "  new code:");
        listing(&mut o, &disassemble(&s.code, &s.relocations, None), full);
    }
    o
}

/// The same information as JSON (for scripts). The code, expected bytes and relocations are
/// always complete; unless `full`, each disassembly is cut to [`SUMMARY_LINES`] lines and
/// `old_disassembly_lines`/`new_disassembly_lines` give the full counts.
pub fn inspect_json(p: &ParsedPatch, trusted: Option<&[PublicKey]>, full: bool) -> Value {
    let m = &p.patch.meta;
    let t = &p.patch.target;
    let signature = match &p.signature {
        SignatureBlock::Unsigned => json!({"kind": "unsigned"}),
        SignatureBlock::Ed25519 { key_id, signature } => {
            let verified = trusted.map(|k| match p.verify(k) {
                Ok(_) => json!(true),
                Err(e) => json!(e.to_string()),
            });
            json!({"kind": "ed25519", "key_id": key_id.to_string(),
                   "signature": hex::encode(signature), "verified": verified})
        }
    };
    let sites: Vec<Value> = p
        .patch
        .sites
        .iter()
        .map(|s| {
            let (sym, off, addr) = match &s.target {
                Location::Symbol { name, offset } => (Some(name.clone()), Some(*offset), None),
                Location::Address(a) => (None, None, Some(*a)),
            };
            let mut old = disassemble(&s.expected, &[], Some(&s.target.to_string()));
            let mut new = disassemble(&s.code, &s.relocations, None);
            let (old_lines, new_lines) = (old.len(), new.len());
            old.truncate(shown(old_lines, SUMMARY_LINES, full));
            new.truncate(shown(new_lines, SUMMARY_LINES, full));
            json!({
                "kind": s.kind.as_str(),
                "target": s.target.to_string(),
                "symbol": sym, "offset": off, "address": addr,
                "expected": hex::encode(&s.expected),
                "code": hex::encode(&s.code),
                "relocations": s.relocations.iter().map(|r| {
                    let (symbol, data) = match &r.target {
                        RelocTarget::Symbol(name) => (Some(name.clone()), None),
                        RelocTarget::Data(block) => (None, Some(*block)),
                    };
                    json!({
                        "offset": r.offset, "kind": r.kind.as_str(), "symbol": symbol,
                        "data": data, "addend": r.addend
                    })
                }).collect::<Vec<_>>(),
                "old_disassembly": old,
                "old_disassembly_lines": old_lines,
                "new_disassembly": new,
                "new_disassembly_lines": new_lines,
            })
        })
        .collect();
    json!({
        "id": p.id.to_string(),
        "format_version": p.version,
        "file_size": p.file_len(),
        "signature": signature,
        "name": m.name,
        "description": m.description,
        "author": m.author,
        "created": m.created,
        "created_utc": format_utc(m.created),
        "advisories": m.advisories,
        "replaces": m.replaces.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
        "target": {
            "name": t.name,
            "build_id": t.build_id.as_ref().map(hex::encode),
            "text_sha256": t.text_sha256.as_ref().map(hex::encode),
        },
        "data": p.patch.data.iter().map(|d| json!({
            "align": d.align,
            "len": d.bytes.len(),
            "bytes": hex::encode(&d.bytes),
        })).collect::<Vec<_>>(),
        "sites": sites,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc() {
        assert_eq!(super::format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::format_utc(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(super::format_utc(951_782_400), "2000-02-29T00:00:00Z");
    }
}
