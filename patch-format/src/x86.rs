//! x86-64 instruction analysis shared by the builders and `inspect`: finding
//! every field of an instruction that encodes an address, and disassembly.

use iced_x86::{
    ConstantOffsets, Decoder, DecoderOptions, Formatter, Instruction, NasmFormatter, OpKind,
    SymbolResolver, SymbolResult,
};
use std::collections::BTreeMap;

/// How an address field of an instruction encodes its target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FieldKind {
    /// 8-bit displacement from the end of the instruction (short branches).
    Rel8,
    /// 32-bit displacement from the end of the instruction (near branches, RIP-relative).
    Rel32,
    /// Zero-extended 32-bit absolute address (immediate).
    Abs32,
    /// Sign-extended 32-bit absolute address (immediate or displacement).
    Abs32S,
    /// 64-bit absolute address (`mov r64, imm64`, `moffs64`).
    Abs64,
}

/// A field of an instruction that holds an address.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AddrField {
    /// Offset of the field in the instruction.
    pub offset: usize,
    pub width: usize,
    pub kind: FieldKind,
    /// The absolute address the instruction refers to.
    pub target: u64,
    /// True for branch targets (call/jmp/jcc), false for data references.
    pub is_branch: bool,
}

/// A decoded instruction with its address fields.
#[derive(Clone, Debug)]
pub(crate) struct Insn {
    pub ip: u64,
    pub len: usize,
    pub instr: Instruction,
    pub fields: Vec<AddrField>,
}

/// Decodes `code` placed at `ip` completely. Returns the offset of the first
/// byte that does not decode (or where an instruction runs past the end).
///
/// `is_address` decides whether an absolute immediate or displacement is an
/// address (of a symbol) rather than a number: linked executables have no
/// relocations left, so this can only be a heuristic.
pub(crate) fn decode_all(
    code: &[u8],
    ip: u64,
    is_address: &dyn Fn(u64) -> bool,
) -> Result<Vec<Insn>, usize> {
    let mut dec = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    let mut out = Vec::new();
    let mut instr = Instruction::default();
    while dec.can_decode() {
        let pos = dec.position();
        dec.decode_out(&mut instr);
        if instr.is_invalid() {
            return Err(pos);
        }
        let co = dec.get_constant_offsets(&instr);
        let fields = address_fields(&instr, &co, is_address);
        out.push(Insn {
            ip: instr.ip(),
            len: instr.len(),
            instr,
            fields,
        });
    }
    Ok(out)
}

fn address_fields(
    instr: &Instruction,
    co: &ConstantOffsets,
    is_address: &dyn Fn(u64) -> bool,
) -> Vec<AddrField> {
    let mut v = Vec::new();
    let mut branch = false;
    for i in 0..instr.op_count() {
        match instr.op_kind(i) {
            OpKind::NearBranch64 | OpKind::NearBranch32 | OpKind::NearBranch16 => {
                // iced reports a branch displacement as the instruction's immediate.
                let kind = match co.immediate_size() {
                    1 => FieldKind::Rel8,
                    _ => FieldKind::Rel32,
                };
                if co.has_immediate() {
                    v.push(AddrField {
                        offset: co.immediate_offset(),
                        width: co.immediate_size(),
                        kind,
                        target: instr.near_branch_target(),
                        is_branch: true,
                    });
                    branch = true;
                }
            }
            OpKind::Immediate32 | OpKind::Immediate32to64 | OpKind::Immediate64 if !branch => {
                let value = instr.immediate(i);
                if co.has_immediate() && is_address(value) {
                    let kind = match instr.op_kind(i) {
                        OpKind::Immediate32 => FieldKind::Abs32,
                        OpKind::Immediate32to64 => FieldKind::Abs32S,
                        _ => FieldKind::Abs64,
                    };
                    v.push(AddrField {
                        offset: co.immediate_offset(),
                        width: co.immediate_size(),
                        kind,
                        target: value,
                        is_branch: false,
                    });
                }
            }
            _ => {}
        }
    }
    if co.has_displacement() {
        if instr.is_ip_rel_memory_operand() {
            v.push(AddrField {
                offset: co.displacement_offset(),
                width: co.displacement_size(),
                kind: FieldKind::Rel32,
                target: instr.ip_rel_memory_address(),
                is_branch: false,
            });
        } else {
            let target = instr.memory_displacement64();
            let kind = match co.displacement_size() {
                4 => Some(FieldKind::Abs32S),
                8 => Some(FieldKind::Abs64),
                _ => None,
            };
            if let Some(kind) = kind
                && is_address(target)
            {
                v.push(AddrField {
                    offset: co.displacement_offset(),
                    width: co.displacement_size(),
                    kind,
                    target,
                    is_branch: false,
                });
            }
        }
    }
    v
}

/// One line of a disassembly listing.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DisasmLine {
    /// Offset from the start of the listed bytes.
    pub offset: u64,
    /// The instruction bytes in hex.
    pub bytes: String,
    /// NASM syntax, with relocation targets shown symbolically.
    pub text: String,
}

/// Disassembles `code` (offsets from 0). `relocations` name the symbolic
/// targets of fields in the code (as in a site's new code); fields that carry
/// a relocation are shown as `symbol+addend` instead of their placeholder value.
/// Undecodable bytes are listed as `(bad)` and decoding resumes after them.
///
/// `origin` names where the code lives (e.g. the site's `compute+0x10`) when
/// it is guest code at an unknown address: targets outside the listed bytes are
/// then shown relative to it (`origin+0x1fe0`), which is exact whatever the
/// address. Targets inside the bytes are shown as offsets.
pub fn disassemble(
    code: &[u8],
    relocations: &[crate::Relocation],
    origin: Option<&str>,
) -> Vec<DisasmLine> {
    // Give every relocation a synthetic, distinct target address far from the
    // code, write it into a copy of the code, and let the formatter's symbol
    // resolver print the symbolic name for it.
    const SYNTH_BASE: u64 = 0x4000_0000;
    let mut buf = code.to_vec();
    let mut names: BTreeMap<u64, String> = BTreeMap::new();
    let plain: Vec<Insn> = decode_lenient(code);
    for (k, r) in relocations.iter().enumerate() {
        let synth = SYNTH_BASE + (k as u64) * 0x100;
        let start = r.offset as usize;
        let Some(field) = start
            .checked_add(r.kind.width())
            .and_then(|end| buf.get_mut(start..end))
        else {
            continue;
        };
        // `plain` is in address order and its instructions do not overlap: binary search
        // (a linear scan per relocation made 65,536 relocations take minutes).
        let at = u64::from(r.offset);
        let insn_end = plain
            .get(plain.partition_point(|i| i.ip + i.len as u64 <= at))
            .filter(|i| i.ip <= at)
            .map(|i| i.ip + i.len as u64);
        let shown = match r.kind {
            crate::RelocKind::Rel32 => {
                // The instruction's effective target is S + A - P + end.
                let Some(end) = insn_end else { continue };
                let extra = end as i64 - r.offset as i64;
                let disp = synth as i64 - end as i64;
                field.copy_from_slice(&(disp as i32).to_le_bytes());
                r.addend.wrapping_add(extra)
            }
            crate::RelocKind::Abs64 => {
                field.copy_from_slice(&synth.to_le_bytes());
                r.addend
            }
            crate::RelocKind::Abs32 | crate::RelocKind::Abs32S => {
                field.copy_from_slice(&(synth as u32).to_le_bytes());
                r.addend
            }
        };
        let name = match shown {
            0 => r.target.to_string(),
            a if a > 0 => format!("{}+{:#x}", r.target, a),
            a => format!("{}-{:#x}", r.target, a.unsigned_abs()),
        };
        names.insert(synth, name);
    }
    struct Res {
        names: BTreeMap<u64, String>,
        origin: Option<String>,
        len: u64,
    }
    impl SymbolResolver for Res {
        fn symbol(
            &mut self,
            instruction: &Instruction,
            _o: u32,
            _io: Option<u32>,
            address: u64,
            _s: u32,
        ) -> Option<SymbolResult<'_>> {
            if let Some(s) = self.names.get(&address) {
                return Some(SymbolResult::with_str(address, s.as_str()));
            }
            // Only addresses computed from the code's position (branches,
            // RIP-relative operands) are relative to the origin; immediates are numbers.
            let relative = instruction.is_ip_rel_memory_operand()
                || matches!(
                    instruction.op0_kind(),
                    OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
                );
            let origin = self.origin.as_ref()?;
            if !relative || address < self.len {
                return None;
            }
            let off = address as i64;
            let text = if off >= 0 {
                format!("{origin}+{off:#x}")
            } else {
                format!("{origin}-{:#x}", off.unsigned_abs())
            };
            Some(SymbolResult::with_string(address, text))
        }
    }
    let res = Res {
        names,
        origin: origin.map(str::to_string),
        len: code.len() as u64,
    };
    let mut fmt = NasmFormatter::with_options(Some(Box::new(res)), None);
    let o = fmt.options_mut();
    o.set_first_operand_char_index(8);
    o.set_space_after_operand_separator(true);
    o.set_hex_prefix("0x");
    o.set_hex_suffix("");
    o.set_uppercase_hex(false);
    o.set_leading_zeros(false);
    o.set_branch_leading_zeros(false);
    o.set_show_branch_size(false);
    let mut out = Vec::new();
    for insn in decode_lenient(&buf) {
        let start = insn.ip as usize;
        let bytes = code.get(start..start + insn.len).unwrap_or(&[]);
        let mut text = String::new();
        if insn.instr.is_invalid() {
            text.push_str("(bad)");
        } else {
            fmt.format(&insn.instr, &mut text);
        }
        out.push(DisasmLine {
            offset: insn.ip,
            bytes: hex::encode(bytes),
            text,
        });
    }
    out
}

/// Decodes everything, turning undecodable bytes into one-byte invalid entries.
fn decode_lenient(code: &[u8]) -> Vec<Insn> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < code.len() {
        let mut dec = Decoder::with_ip(64, &code[pos..], pos as u64, DecoderOptions::NONE);
        let instr = dec.decode();
        let len = if instr.is_invalid() { 1 } else { instr.len() };
        out.push(Insn {
            ip: pos as u64,
            len,
            instr,
            fields: Vec::new(),
        });
        pos += len.max(1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_and_riprel_fields() {
        // call rel32; jmp rel8; lea rax,[rip+0x10]; mov eax, 0x100010; mov rax, imm64
        let code = [
            0xe8, 0x10, 0, 0, 0, // call +0x10
            0xeb, 0x02, // jmp short
            0x48, 0x8d, 0x05, 0x10, 0, 0, 0, // lea rax,[rip+0x10]
            0xb8, 0x10, 0x00, 0x10, 0x00, // mov eax, 0x100010
            0x48, 0xb8, 0x20, 0, 0x10, 0, 0, 0, 0, 0, // mov rax, 0x100020
        ];
        let insns = decode_all(&code, 0x1000, &|a| (0x10_0000..0x20_0000).contains(&a)).unwrap();
        assert_eq!(insns.len(), 5);
        let f = &insns[0].fields[0];
        assert_eq!(
            (f.offset, f.width, f.kind, f.target),
            (1, 4, FieldKind::Rel32, 0x1015)
        );
        assert!(f.is_branch);
        let f = &insns[1].fields[0];
        assert_eq!(
            (f.offset, f.width, f.kind, f.target),
            (1, 1, FieldKind::Rel8, 0x1009)
        );
        let f = &insns[2].fields[0];
        assert_eq!(
            (f.offset, f.width, f.kind, f.target),
            (3, 4, FieldKind::Rel32, 0x101e)
        );
        let f = &insns[3].fields[0];
        assert_eq!(
            (f.offset, f.kind, f.target),
            (1, FieldKind::Abs32, 0x10_0010)
        );
        let f = &insns[4].fields[0];
        assert_eq!(
            (f.offset, f.width, f.kind, f.target),
            (2, 8, FieldKind::Abs64, 0x10_0020)
        );
    }

    #[test]
    fn disassembly_shows_relocation_symbols() {
        let code = [0xe8, 0, 0, 0, 0, 0xc3, 0xff];
        let relocs = [crate::Relocation::symbol(
            1,
            crate::RelocKind::Rel32,
            "helper",
            -4,
        )];
        let lines = disassemble(&code, &relocs, None);
        assert_eq!(lines[0].text, "call    helper");
        assert_eq!(lines[0].bytes, "e800000000");
        assert_eq!(lines[1].text, "ret");
        assert_eq!(lines[2].text, "(bad)");
        // Guest code at an unknown address: outside targets relative to the origin.
        let old = [
            0xe8, 0xf0, 0xff, 0xff, 0xff, 0x8b, 0x05, 0x10, 0, 0, 0, 0xeb, 0xf3,
        ];
        let lines = disassemble(&old, &[], Some("f"));
        assert_eq!(lines[0].text, "call    f-0xb");
        assert_eq!(lines[1].text, "mov     eax, [rel f+0x1b]");
        assert_eq!(lines[2].text, "jmp     0");
    }
}
