//! Which instruction made a trapped write.
//!
//! KVM reports a write to a read-only slot after it has emulated the instruction: the vCPU's RIP
//! already points past it. x86 code cannot be decoded backwards in general, so we decode forwards
//! from each of the up to 15 bytes before that RIP and keep the starts whose single instruction
//! ends exactly at RIP and writes memory of the size KVM saw. Ties (a byte before the instruction
//! that would also decode as a prefix of it) go to the shortest candidate, which is how compilers
//! emit code; the exact RIP is then right for every store a compiler or hand-written assembly
//! makes without redundant prefixes.

use iced_x86::{Decoder, DecoderOptions, InstructionInfoFactory, OpAccess};

/// The longest x86 instruction.
pub const MAX_INSN: usize = 15;

/// The instruction found to have made a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writer {
    pub rip: u64,
    pub len: usize,
    /// Bytes the instruction writes (KVM delivers more than 8 in several exits).
    pub write_size: usize,
    pub text: String,
}

/// Finds the instruction ending at `next_rip` that wrote `write_len` bytes. `code` holds the
/// bytes just before `next_rip` (its last byte is at `next_rip - 1`); `bitness` is 64, 32 or 16.
pub fn locate(code: &[u8], next_rip: u64, bitness: u32, write_len: usize) -> Option<Writer> {
    let mut info = InstructionInfoFactory::new();
    let mut best: Option<(u8, Writer)> = None;
    for k in 1..=code.len().min(MAX_INSN) {
        let start = code.len() - k;
        let Some(ip) = next_rip.checked_sub(k as u64) else {
            break;
        };
        let mut decoder = Decoder::with_ip(bitness, &code[start..], ip, DecoderOptions::NONE);
        let insn = decoder.decode();
        if insn.is_invalid() || insn.len() != k {
            continue;
        }
        let written = info
            .info(&insn)
            .used_memory()
            .iter()
            .filter(|m| {
                matches!(
                    m.access(),
                    OpAccess::Write
                        | OpAccess::ReadWrite
                        | OpAccess::CondWrite
                        | OpAccess::ReadCondWrite
                )
            })
            .map(|m| m.memory_size().size())
            .max();
        let Some(size) = written else { continue };
        // KVM splits wide writes into fragments of at most 8 bytes; a size of 0 is an
        // instruction whose size iced cannot name (e.g. xsave): possible, but less likely.
        let score = if size == write_len {
            3
        } else if size > write_len && write_len == 8.min(size) {
            2
        } else if size == 0 {
            1
        } else {
            continue;
        };
        if best.as_ref().is_none_or(|(s, _)| score > *s) {
            best = Some((
                score,
                Writer {
                    rip: ip,
                    len: k,
                    write_size: size.max(write_len),
                    text: insn.to_string(),
                },
            ));
        }
    }
    best.map(|(_, w)| w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_plain_store_and_ignores_a_shorter_suffix() {
        // int3 padding, then mov [rdi], rsi (48 89 37): "89 37" alone would be a 4-byte store.
        let code = [0xcc, 0xcc, 0x48, 0x89, 0x37];
        let w = locate(&code, 0x1005, 64, 8);
        assert_eq!(
            w.as_ref().map(|w| (w.rip, w.len)),
            Some((0x1002, 3)),
            "{w:?}"
        );
        // The same bytes with a 4-byte write: "89 37" is the writer.
        let w = locate(&code, 0x1005, 64, 4);
        assert_eq!(w.map(|w| w.rip), Some(0x1003));
    }

    #[test]
    fn finds_stores_with_displacements_and_immediates() {
        // push rbp; mov dword [rax+0x10], 0x5a (c7 40 10 5a 00 00 00)
        let code = [0x55, 0xc7, 0x40, 0x10, 0x5a, 0x00, 0x00, 0x00];
        let w = locate(&code, 0x2008, 64, 4);
        assert_eq!(w.map(|w| w.rip), Some(0x2001));
        // mov byte [0x400010], 0x5a (the probe's store, absolute address)
        let code = [0x90, 0xc6, 0x04, 0x25, 0x10, 0x00, 0x40, 0x00, 0x5a];
        let w = locate(&code, 0x10009, 64, 1);
        assert_eq!(w.map(|w| w.rip), Some(0x10001));
    }

    #[test]
    fn wide_writes_match_their_first_fragment() {
        // movups [rdi], xmm0 (0f 11 07): 16 bytes, delivered by KVM as 8 + 8.
        let code = [0xc3, 0x0f, 0x11, 0x07];
        let w = locate(&code, 0x3004, 64, 8);
        assert_eq!(
            w.as_ref().map(|w| (w.rip, w.write_size)),
            Some((0x3001, 16)),
            "{w:?}"
        );
    }

    #[test]
    fn no_writer_when_nothing_ends_there_with_a_store() {
        // add rax, rbx; ret: no memory write ends at the RIP.
        assert_eq!(locate(&[0x48, 0x01, 0xd8, 0xc3], 0x4004, 64, 8), None);
        assert_eq!(locate(&[], 0x4004, 64, 8), None);
        // A RIP below 15 is handled without underflow.
        assert_eq!(locate(&[0x48, 0x89, 0x37], 2, 64, 8), None);
    }
}
