//! Applying symbolic relocations to a site's code once the guest's symbols, the addresses of
//! the patch's data blocks and the code's load address are known. Pure: the engine supplies the
//! lookup and the placement.

use crate::model::{RelocKind, RelocTarget, Relocation};

/// Why a relocation could not be applied. `index` is the relocation's index in
/// the site's list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RelocError {
    #[error("relocation {index}: symbol {symbol:?} is not known in the running guest")]
    UnknownSymbol { index: usize, symbol: String },
    #[error(
        "relocation {index}: refers to data block {block}, but only {placed} blocks were placed; \
         the patch is inconsistent (rebuild it)"
    )]
    NoSuchData {
        index: usize,
        block: u32,
        placed: usize,
    },
    #[error(
        "relocation {index} ({kind} against {symbol}{addend:+}): value {value:#x} does not fit the field; place the code within reach of the symbol (rel32: within ±2 GiB)"
    )]
    Overflow {
        index: usize,
        kind: &'static str,
        symbol: String,
        addend: i64,
        value: i128,
    },
    #[error(
        "relocation {index}: {width}-byte field at offset {offset} is outside the {len}-byte code"
    )]
    OutOfBounds {
        index: usize,
        offset: u32,
        width: usize,
        len: usize,
    },
}

/// Writes every relocation's value into `code`, which will live at guest
/// address `load_address`. `lookup` maps a guest symbol name to its address; `data[i]` is the
/// guest address the patch's data block `i` was placed at (S of a [`RelocTarget::Data`]).
///
/// Values: `Rel32` = S + A - P (P = `load_address + offset`, signed 32-bit),
/// `Abs64` = S + A, `Abs32` = S + A (zero-extended 32-bit), `Abs32S` = S + A
/// (sign-extended 32-bit). Any value that does not fit is an error; on error
/// `code` may be partly written and must be discarded.
pub fn apply_relocations(
    code: &mut [u8],
    load_address: u64,
    relocations: &[Relocation],
    data: &[u64],
    mut lookup: impl FnMut(&str) -> Option<u64>,
) -> Result<(), RelocError> {
    for (index, r) in relocations.iter().enumerate() {
        let width = r.kind.width();
        let start = r.offset as usize;
        let len = code.len();
        let field = start
            .checked_add(width)
            .and_then(|end| code.get_mut(start..end))
            .ok_or(RelocError::OutOfBounds {
                index,
                offset: r.offset,
                width,
                len,
            })?;
        let s = match &r.target {
            RelocTarget::Symbol(name) => lookup(name).ok_or_else(|| RelocError::UnknownSymbol {
                index,
                symbol: name.clone(),
            })?,
            RelocTarget::Data(block) => {
                *data.get(*block as usize).ok_or(RelocError::NoSuchData {
                    index,
                    block: *block,
                    placed: data.len(),
                })?
            }
        };
        let sa = i128::from(s) + i128::from(r.addend);
        let overflow = |value: i128| RelocError::Overflow {
            index,
            kind: r.kind.as_str(),
            symbol: r.target.to_string(),
            addend: r.addend,
            value,
        };
        const U64_RANGE: i128 = 1 << 64;
        match r.kind {
            RelocKind::Rel32 => {
                // The CPU adds the displacement to RIP modulo 2^64, so a field at the top of
                // the address space reaches a small value (a kernel's `%gs:var(%rip)` per-CPU
                // offset) and the other way round: the distance is taken the same way.
                let p = i128::from(load_address) + i128::from(r.offset);
                let mut v = (sa - p).rem_euclid(U64_RANGE);
                if v >= U64_RANGE / 2 {
                    v -= U64_RANGE;
                }
                let v32 = i32::try_from(v).map_err(|_| overflow(v))?;
                field.copy_from_slice(&v32.to_le_bytes());
            }
            RelocKind::Abs64 => {
                if !(0..U64_RANGE).contains(&sa) {
                    return Err(overflow(sa));
                }
                field.copy_from_slice(&(sa as u64).to_le_bytes());
            }
            RelocKind::Abs32 => {
                let v = u32::try_from(sa).map_err(|_| overflow(sa))?;
                field.copy_from_slice(&v.to_le_bytes());
            }
            RelocKind::Abs32S => {
                // The CPU sign-extends the field, so reachable addresses are
                // the lowest and the highest 2 GiB of the address space.
                let v = if (0..1 << 31).contains(&sa) {
                    sa as i32
                } else if (U64_RANGE - (1 << 31)..U64_RANGE).contains(&sa) {
                    (sa - U64_RANGE) as i32
                } else {
                    return Err(overflow(sa));
                };
                field.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(offset: u32, kind: RelocKind, symbol: &str, addend: i64) -> Relocation {
        Relocation::symbol(offset, kind, symbol, addend)
    }

    fn syms(name: &str) -> Option<u64> {
        match name {
            "near" => Some(0x10_0000),
            "far" => Some(0x1_0000_0000_0000),
            "high" => Some(0xffff_ffff_8100_0000),
            _ => None,
        }
    }

    #[test]
    fn rel32_call() {
        // call near: e8 <rel32>, field at 1, P = 0x20_0001, S + A - P with A = -4.
        let mut code = [0xe8, 0, 0, 0, 0];
        apply_relocations(
            &mut code,
            0x20_0000,
            &[rel(1, RelocKind::Rel32, "near", -4)],
            &[],
            syms,
        )
        .unwrap();
        let v = i32::from_le_bytes(code[1..5].try_into().unwrap());
        // Target = next rip (0x20_0005) + v must be `near`.
        assert_eq!(0x20_0005i64 + i64::from(v), 0x10_0000);
    }

    #[test]
    fn rel32_overflow() {
        let mut code = [0u8; 4];
        let e = apply_relocations(
            &mut code,
            0,
            &[rel(0, RelocKind::Rel32, "far", 0)],
            &[],
            syms,
        )
        .unwrap_err();
        assert!(matches!(e, RelocError::Overflow { index: 0, .. }), "{e}");
        // Negative reach also overflows.
        let e = apply_relocations(
            &mut code,
            0x1_0000_0000_0000 + 0x8000_0000,
            &[rel(0, RelocKind::Rel32, "near", 0)],
            &[],
            syms,
        )
        .unwrap_err();
        assert!(matches!(e, RelocError::Overflow { .. }));
    }

    #[test]
    fn rel32_wraps_as_the_cpu_does() {
        // `%gs:var(%rip)` in code at the top of the address space: RIP + disp wraps to the
        // small per-CPU offset of `var`.
        let mut code = [0u8; 4];
        let p = 0xffff_ffff_c000_0000u64;
        apply_relocations(
            &mut code,
            p,
            &[rel(0, RelocKind::Rel32, "near", -4)],
            &[],
            syms,
        )
        .unwrap();
        let v = i32::from_le_bytes(code);
        assert_eq!((p + 4).wrapping_add_signed(i64::from(v)), 0x10_0000);
        // And low code reaching the top.
        apply_relocations(
            &mut code,
            0x1000,
            &[rel(0, RelocKind::Rel32, "high", -4)],
            &[],
            syms,
        )
        .unwrap();
        let v = i32::from_le_bytes(code);
        assert_eq!(
            0x1004u64.wrapping_add_signed(i64::from(v)),
            0xffff_ffff_8100_0000
        );
        // Wrapping never makes a far target reachable.
        let e = apply_relocations(
            &mut code,
            0xffff_ffff_c000_0000,
            &[rel(0, RelocKind::Rel32, "far", 0)],
            &[],
            syms,
        )
        .unwrap_err();
        assert!(matches!(e, RelocError::Overflow { .. }), "{e}");
    }

    #[test]
    fn abs_kinds() {
        let mut code = [0u8; 16];
        apply_relocations(
            &mut code,
            0x1234,
            &[
                rel(0, RelocKind::Abs64, "far", 8),
                rel(8, RelocKind::Abs32, "near", 1),
                rel(12, RelocKind::Abs32S, "high", 0),
            ],
            &[],
            syms,
        )
        .unwrap();
        assert_eq!(
            u64::from_le_bytes(code[0..8].try_into().unwrap()),
            0x1_0000_0000_0008
        );
        assert_eq!(
            u32::from_le_bytes(code[8..12].try_into().unwrap()),
            0x10_0001
        );
        assert_eq!(
            i32::from_le_bytes(code[12..16].try_into().unwrap()) as i64 as u64,
            0xffff_ffff_8100_0000
        );
    }

    #[test]
    fn abs_overflow_and_errors() {
        let mut code = [0u8; 8];
        for r in [
            rel(0, RelocKind::Abs32, "far", 0),
            rel(0, RelocKind::Abs32S, "far", 0),
            rel(0, RelocKind::Abs32S, "near", 0x8000_0000),
            rel(0, RelocKind::Abs64, "near", -0x20_0000),
            rel(0, RelocKind::Abs64, "high", i64::MAX),
        ] {
            let e = apply_relocations(&mut code, 0, &[r], &[], syms).unwrap_err();
            assert!(matches!(e, RelocError::Overflow { .. }), "{e}");
        }
        let e = apply_relocations(
            &mut code,
            0,
            &[rel(0, RelocKind::Abs32, "nope", 0)],
            &[],
            syms,
        )
        .unwrap_err();
        assert_eq!(
            e,
            RelocError::UnknownSymbol {
                index: 0,
                symbol: "nope".into()
            }
        );
        let e = apply_relocations(
            &mut code,
            0,
            &[rel(6, RelocKind::Rel32, "near", 0)],
            &[],
            syms,
        )
        .unwrap_err();
        assert!(matches!(e, RelocError::OutOfBounds { len: 8, .. }));
        let e = apply_relocations(
            &mut code,
            0,
            &[rel(u32::MAX, RelocKind::Abs64, "near", 0)],
            &[],
            syms,
        )
        .unwrap_err();
        assert!(matches!(e, RelocError::OutOfBounds { .. }));
    }

    #[test]
    fn data_relocations_resolve_to_the_placed_blocks() {
        // lea rdi, [rip+data[1]+2] at 0x20_0000 and an abs64 of data[0].
        let mut code = [0x48, 0x8d, 0x3d, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let relocs = [
            Relocation {
                offset: 3,
                kind: RelocKind::Rel32,
                target: RelocTarget::Data(1),
                addend: 2 - 4,
            },
            Relocation {
                offset: 7,
                kind: RelocKind::Abs64,
                target: RelocTarget::Data(0),
                addend: 0,
            },
        ];
        apply_relocations(&mut code, 0x20_0000, &relocs, &[0x30_0000, 0x30_0040], syms).unwrap();
        let v = i32::from_le_bytes(code[3..7].try_into().unwrap());
        assert_eq!(0x20_0007i64 + i64::from(v), 0x30_0042);
        assert_eq!(
            u64::from_le_bytes(code[7..15].try_into().unwrap()),
            0x30_0000
        );
        let e = apply_relocations(&mut code, 0x20_0000, &relocs, &[0x30_0000], syms).unwrap_err();
        assert_eq!(
            e,
            RelocError::NoSuchData {
                index: 0,
                block: 1,
                placed: 1
            }
        );
    }
}
