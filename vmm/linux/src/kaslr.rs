//! The running kernel's KASLR slide, from vCPU state the guest cannot hide: the interrupt
//! descriptor table. Every IDT gate holds the run-time address of its handler; the same
//! handlers are in kallsyms at their link-time addresses. The slide is their difference,
//! taken from several independent vectors that must all agree, and it must be a multiple of
//! the kernel's 2 MiB alignment (`CONFIG_PHYSICAL_ALIGN`).

use serde::Serialize;
use thiserror::Error;

use super::Kallsyms;

/// The vectors used, with the 6.1 handler symbols (`asm_exc_*`, in `.entry.text`).
pub const IDT_ANCHORS: [(u8, &str); 4] = [
    (0, "asm_exc_divide_error"),
    (3, "asm_exc_int3"),
    (6, "asm_exc_invalid_op"),
    (14, "asm_exc_page_fault"),
];

/// Text KASLR moves the kernel in steps of this (`CONFIG_PHYSICAL_ALIGN` on x86-64).
pub const SLIDE_ALIGN: u64 = 2 << 20;

/// Bytes of the IDT that cover every anchor vector.
pub const IDT_BYTES: usize = 16 * 15;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Anchor {
    pub vector: u8,
    pub symbol: &'static str,
    pub runtime: u64,
    pub link: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Slide {
    /// Run-time address minus link-time address of kernel text (0 with `nokaslr`).
    pub slide: u64,
    pub anchors: Vec<Anchor>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KaslrError {
    #[error("the IDT read is {0} bytes; {IDT_BYTES} are needed")]
    Short(usize),
    #[error(
        "IDT vector {vector} is not a present 64-bit interrupt or trap gate: the guest is not a booted Linux kernel (or not yet)"
    )]
    NoGate { vector: u8 },
    #[error(
        "kallsyms has no {0}: the kernel image given is not the 6.1-style kernel this slide finder knows"
    )]
    NoSymbol(&'static str),
    #[error(
        "the IDT handlers give different slides ({0}): the running kernel is not the image given, or it changed its IDT"
    )]
    Disagree(String),
    #[error(
        "the slide {0:#x} is not a multiple of 2 MiB: the running kernel is not the image given"
    )]
    Misaligned(u64),
}

/// The handler address of a 64-bit IDT gate, if present and an interrupt/trap gate.
pub fn gate_target(gate: &[u8]) -> Option<u64> {
    let g: &[u8; 16] = gate.get(..16)?.try_into().ok()?;
    let kind = g[5] & 0x0f;
    let present = g[5] & 0x80 != 0;
    if !present || !(kind == 0xe || kind == 0xf) {
        return None;
    }
    let lo = u64::from(u16::from_le_bytes([g[0], g[1]]));
    let mid = u64::from(u16::from_le_bytes([g[6], g[7]]));
    let hi = u64::from(u32::from_le_bytes([g[8], g[9], g[10], g[11]]));
    Some(lo | (mid << 16) | (hi << 32))
}

/// The slide from the first [`IDT_BYTES`] of the running kernel's IDT.
pub fn slide_from_idt(idt: &[u8], kallsyms: &Kallsyms) -> Result<Slide, KaslrError> {
    if idt.len() < IDT_BYTES {
        return Err(KaslrError::Short(idt.len()));
    }
    let mut anchors = Vec::new();
    for (vector, symbol) in IDT_ANCHORS {
        let at = usize::from(vector) * 16;
        let runtime = gate_target(&idt[at..at + 16]).ok_or(KaslrError::NoGate { vector })?;
        let link = kallsyms
            .lookup(symbol)
            .ok_or(KaslrError::NoSymbol(symbol))?;
        anchors.push(Anchor {
            vector,
            symbol,
            runtime,
            link,
        });
    }
    let slide = anchors[0].runtime.wrapping_sub(anchors[0].link);
    if anchors
        .iter()
        .any(|a| a.runtime.wrapping_sub(a.link) != slide)
    {
        let all: Vec<String> = anchors
            .iter()
            .map(|a| {
                format!(
                    "vector {} {}: {:#x}",
                    a.vector,
                    a.symbol,
                    a.runtime.wrapping_sub(a.link)
                )
            })
            .collect();
        return Err(KaslrError::Disagree(all.join(", ")));
    }
    if !slide.is_multiple_of(SLIDE_ALIGN) {
        return Err(KaslrError::Misaligned(slide));
    }
    Ok(Slide { slide, anchors })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(target: u64) -> [u8; 16] {
        let mut g = [0u8; 16];
        g[0..2].copy_from_slice(&(target as u16).to_le_bytes());
        g[2..4].copy_from_slice(&0x10u16.to_le_bytes());
        g[5] = 0x8e;
        g[6..8].copy_from_slice(&((target >> 16) as u16).to_le_bytes());
        g[8..12].copy_from_slice(&((target >> 32) as u32).to_le_bytes());
        g
    }

    #[test]
    fn gates_decode_and_absent_ones_do_not() {
        let t = 0xffff_ffff_b260_0bd0;
        assert_eq!(gate_target(&gate(t)), Some(t));
        let mut g = gate(t);
        g[5] = 0x0e;
        assert_eq!(gate_target(&g), None);
        g[5] = 0x85; // task gate
        assert_eq!(gate_target(&g), None);
        assert_eq!(gate_target(&[0u8; 8]), None);
    }
}
