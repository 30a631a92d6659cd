//! The micropatch targets of `mode=probe` and `mode=spin` (`probe`, `spin_wait` and the statics
//! they load) are in both builds, identical, with the exact bytes and offsets that
//! docs/guest-protocol.md documents and micropatch tests rely on.

use guest_tools::{GuestBuild, reference, test_guest};
use object::{Object, ObjectSection, ObjectSymbol, SectionKind, SymbolKind};

const BUILDS: [GuestBuild; 2] = [GuestBuild::V1, GuestBuild::V2];

/// A symbol's address, size, kind, section kind and bytes (from the file).
struct Sym {
    addr: u64,
    size: u64,
    kind: SymbolKind,
    section: SectionKind,
    bytes: Vec<u8>,
}

fn sym(elf: &object::File<'_>, name: &str) -> Sym {
    let s = elf
        .symbols()
        .find(|s| s.name() == Ok(name))
        .unwrap_or_else(|| panic!("symbol {name} missing"));
    assert!(s.is_global(), "{name} is not a global symbol");
    assert!(s.is_definition(), "{name} is not defined");
    let index = s
        .section_index()
        .unwrap_or_else(|| panic!("{name} has no section"));
    let section = elf.section_by_index(index).expect("section");
    let bytes = section
        .data_range(s.address(), s.size())
        .expect("section data")
        .unwrap_or_else(|| panic!("{name}'s bytes are not in the file"))
        .to_vec();
    Sym {
        addr: s.address(),
        size: s.size(),
        kind: s.kind(),
        section: section.kind(),
        bytes,
    }
}

/// The little-endian rel32 at `bytes[at..at + 4]`.
fn rel32(bytes: &[u8], at: usize) -> i64 {
    i64::from(i32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()))
}

/// Where a RIP-relative operand whose instruction ends at `end` (offset in the function) points.
fn rip_target(f: &Sym, end: u64, disp: i64) -> u64 {
    (f.addr + end).wrapping_add_signed(disp)
}

/// A u64 static: global OBJECT of size 8 with its bytes in the file (not NOBITS), holding
/// `value`.
fn check_u64_static(elf: &object::File<'_>, name: &str, value: u64) -> Sym {
    let s = sym(elf, name);
    assert_eq!(s.kind, SymbolKind::Data, "{name} is not an OBJECT");
    assert_eq!(s.size, 8, "{name}'s size");
    assert!(
        // .rodata (`ReadOnlyString` when the linker merged string constants into it) or .data,
        // never .bss or code.
        matches!(
            s.section,
            SectionKind::ReadOnlyData | SectionKind::ReadOnlyString | SectionKind::Data
        ),
        "{name} is in a {:?} section",
        s.section
    );
    assert_eq!(s.bytes, value.to_le_bytes(), "{name}'s value");
    s
}

#[test]
fn probe_has_the_documented_bytes() {
    let mut seen = Vec::new();
    for build in BUILDS {
        let elf = object::File::parse(test_guest(build)).expect("ELF");
        let f = sym(&elf, "probe");
        assert_eq!(f.kind, SymbolKind::Text, "{build:?}: probe is not a FUNC");
        assert_eq!(f.section, SectionKind::Text);
        assert_eq!(f.size, 17, "{build:?}: probe's size");
        let b = &f.bytes;
        assert_eq!(b[0..1], [0x55], "+0 push rbp");
        assert_eq!(b[1..4], [0x48, 0x89, 0xe5], "+1 mov rbp, rsp");
        assert_eq!(b[4..7], [0x48, 0x8b, 0x05], "+4 mov rax, [rip + disp32]");
        assert_eq!(b[11..15], [0x48, 0x0f, 0xaf, 0xc7], "+11 imul rax, rdi");
        assert_eq!(b[15..17], [0x5d, 0xc3], "+15 pop rbp; +16 ret");
        let factor = check_u64_static(&elf, "PROBE_FACTOR", reference::PROBE_FACTOR);
        assert_eq!(
            rip_target(&f, 11, rel32(b, 7)),
            factor.addr,
            "{build:?}: the load at +4 does not read PROBE_FACTOR"
        );
        seen.push(f.bytes);
    }
    assert_eq!(seen[0], seen[1], "probe differs between v1 and v2");
}

#[test]
fn spin_wait_has_the_documented_bytes() {
    let mut seen = Vec::new();
    for build in BUILDS {
        let elf = object::File::parse(test_guest(build)).expect("ELF");
        let f = sym(&elf, "spin_wait");
        assert_eq!(
            f.kind,
            SymbolKind::Text,
            "{build:?}: spin_wait is not a FUNC"
        );
        assert_eq!(f.section, SectionKind::Text);
        assert_eq!(f.size, 23, "{build:?}: spin_wait's size");
        let b = &f.bytes;
        assert_eq!(b[0..1], [0x55], "+0 push rbp");
        assert_eq!(b[1..4], [0x48, 0x89, 0xe5], "+1 mov rbp, rsp");
        assert_eq!(b[4..7], [0x48, 0x89, 0xf8], "+4 mov rax, rdi");
        assert_eq!(b[7..9], [0xf3, 0x90], "+7 pause");
        assert_eq!(b[9..12], [0x48, 0xff, 0xc8], "+9 dec rax");
        assert_eq!(b[12], 0x75, "+12 jnz rel8");
        // The short jump ends at +14 and goes back to the `pause` at +7.
        assert_eq!(14 + i64::from(b[13] as i8), 7, "+12 jnz must target +7");
        assert_eq!(b[14..17], [0x48, 0x8b, 0x05], "+14 mov rax, [rip + disp32]");
        assert_eq!(b[21..23], [0x5d, 0xc3], "+21 pop rbp; +22 ret");
        let token = check_u64_static(&elf, "SPIN_TOKEN", reference::SPIN_TOKEN);
        assert_eq!(
            rip_target(&f, 21, rel32(b, 17)),
            token.addr,
            "{build:?}: the load at +14 does not read SPIN_TOKEN"
        );
        seen.push(f.bytes);
    }
    assert_eq!(seen[0], seen[1], "spin_wait differs between v1 and v2");
}

#[test]
fn micropatch_targets_follow_the_patchable_functions() {
    for build in BUILDS {
        let elf = object::File::parse(test_guest(build)).expect("ELF");
        let order = [
            "compute",
            "triangle",
            "mix",
            "next_input",
            "probe",
            "spin_wait",
        ];
        let addrs: Vec<u64> = order.iter().map(|n| sym(&elf, n).addr).collect();
        assert!(
            addrs.windows(2).all(|w| w[0] < w[1]),
            "{build:?}: {order:?} at {addrs:x?}"
        );
        // Neither static is in the code.
        for name in ["PROBE_FACTOR", "SPIN_TOKEN"] {
            let text = elf.section_by_name(".text").expect(".text");
            let a = sym(&elf, name).addr;
            assert!(
                a < text.address() || a >= text.address() + text.size(),
                "{build:?}: {name} is in .text"
            );
        }
    }
}
