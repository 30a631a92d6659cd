//! The built guest images are what the VMM, QEMU and the patch builder expect.

use guest_tools::{GuestBuild, reference, test_guest, test_guest_path};
use object::{Object, ObjectSegment, ObjectSymbol};

fn symbol_bytes(elf: &object::File<'_>, data: &[u8], name: &str) -> Vec<u8> {
    let sym = elf
        .symbols()
        .find(|s| s.name() == Ok(name))
        .unwrap_or_else(|| panic!("symbol {name} missing"));
    assert!(sym.size() > 0, "{name} has no size");
    for seg in elf.segments() {
        let (start, size) = (seg.address(), seg.size());
        if sym.address() >= start && sym.address() + sym.size() <= start + size {
            let (off, _) = seg.file_range();
            let at = (off + sym.address() - start) as usize;
            return data[at..at + sym.size() as usize].to_vec();
        }
    }
    panic!("{name} is not in a loaded segment");
}

/// The PVH entry from the `.note.Xen` note (type 18).
fn pvh_entry(elf: &object::File<'_>) -> Option<u32> {
    let sec = elf.section_by_name(".note")?;
    let data = object::ObjectSection::data(&sec).ok()?;
    let mut at = 0;
    while at + 12 <= data.len() {
        let word = |o: usize| u32::from_le_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]]);
        let (namesz, descsz, kind) = (word(at) as usize, word(at + 4) as usize, word(at + 8));
        let name_at = at + 12;
        let desc_at = name_at + namesz.div_ceil(4) * 4;
        if kind == 18 && &data[name_at..name_at + 3] == b"Xen" {
            return Some(word(desc_at));
        }
        at = desc_at + descsz.div_ceil(4) * 4;
    }
    None
}

#[test]
fn both_builds_are_pvh_elf64_with_symbols() {
    for build in [GuestBuild::V1, GuestBuild::V2] {
        let data = test_guest(build);
        assert_eq!(std::fs::read(test_guest_path(build)).expect("read"), data);
        let elf = object::File::parse(data).expect("ELF");
        assert_eq!(elf.architecture(), object::Architecture::X86_64);
        assert!(elf.is_64());
        let entry = pvh_entry(&elf).expect("PVH note");
        let text = elf.section_by_name(".text").expect(".text");
        let (start, size) = (
            object::ObjectSection::address(&text),
            object::ObjectSection::size(&text),
        );
        assert!(u64::from(entry) >= start && u64::from(entry) < start + size);
        for name in [
            "compute",
            "triangle",
            "mix",
            "next_input",
            "guest_main",
            "pvh_start32",
        ] {
            assert!(
                elf.symbols().any(|s| s.name() == Ok(name)),
                "{build:?} lacks {name}"
            );
        }
        assert!(
            elf.build_id().ok().flatten().is_some(),
            "{build:?} has no build id"
        );
    }
}

#[test]
fn v2_changes_compute_and_triangle_only() {
    let (d1, d2) = (test_guest(GuestBuild::V1), test_guest(GuestBuild::V2));
    let (e1, e2) = (
        object::File::parse(d1).expect("v1"),
        object::File::parse(d2).expect("v2"),
    );
    for changed in ["compute", "triangle"] {
        assert_ne!(
            symbol_bytes(&e1, d1, changed),
            symbol_bytes(&e2, d2, changed),
            "{changed}"
        );
    }
    for same in ["mix", "next_input"] {
        assert_eq!(
            symbol_bytes(&e1, d1, same),
            symbol_bytes(&e2, d2, same),
            "{same}"
        );
    }
    let compute = |e: &object::File<'_>| {
        e.symbols()
            .find(|s| s.name() == Ok("compute"))
            .map(|s| s.size())
    };
    assert!(
        compute(&e2) > compute(&e1),
        "v2's compute must be longer so later code moves"
    );
}

#[test]
fn v1_and_v2_always_disagree_on_generated_inputs() {
    for cpu in 0..4 {
        for x in reference::Inputs::for_vcpu(cpu).take(100_000) {
            assert!((reference::INPUT_MIN..=reference::INPUT_MAX).contains(&x));
            assert_ne!(
                reference::compute_v1(x),
                reference::compute_v2(x),
                "x = {x}"
            );
        }
    }
}

fn symbol_address(elf: &object::File<'_>, name: &str) -> u64 {
    elf.symbols()
        .find(|s| s.name() == Ok(name))
        .unwrap_or_else(|| panic!("symbol {name} missing"))
        .address()
}

#[test]
fn boot_layout_fits_both_loaders() {
    use guest_tools::protocol::{LINK_ADDRESS, MIN_GUEST_RAM};
    use object::elf::{FileHeader64, PT_LOAD, PT_NOTE};
    use object::read::elf::{FileHeader, ProgramHeader};
    for build in [GuestBuild::V1, GuestBuild::V2] {
        let data = test_guest(build);
        let elf = object::File::parse(data).expect("ELF");
        // e_entry is the 32-bit PVH entry too (linux-loader checks it against high memory).
        let entry = pvh_entry(&elf).expect("PVH note");
        assert_eq!(elf.entry(), u64::from(entry));
        assert_eq!(u64::from(entry), symbol_address(&elf, "pvh_start32"));

        let hdr = FileHeader64::<object::Endianness>::parse(data).expect("header");
        let endian = hdr.endian().expect("endian");
        let mut notes = 0;
        let mut end = 0;
        for ph in hdr.program_headers(endian, data).expect("phdrs") {
            match ph.p_type(endian) {
                // QEMU aligns the note's name to the PT_NOTE's p_align: it must be 4.
                PT_NOTE => {
                    notes += 1;
                    assert_eq!(ph.p_align(endian), 4);
                }
                PT_LOAD => {
                    assert!(
                        ph.p_paddr(endian) >= LINK_ADDRESS,
                        "{build:?}: load below 1 MiB"
                    );
                    end = end.max(ph.p_paddr(endian) + ph.p_memsz(endian));
                }
                _ => {}
            }
        }
        assert_eq!(notes, 1, "{build:?}: one PT_NOTE");
        // Image plus room for the boot structures the loaders place below it.
        assert!(end <= MIN_GUEST_RAM, "{build:?}: image ends at {end:#x}");
    }
}

#[test]
fn patchable_functions_are_laid_out_in_order() {
    let (e1, e2) = (
        object::File::parse(test_guest(GuestBuild::V1)).expect("v1"),
        object::File::parse(test_guest(GuestBuild::V2)).expect("v2"),
    );
    let order = ["compute", "triangle", "mix", "next_input"];
    for e in [&e1, &e2] {
        let addrs: Vec<u64> = order.iter().map(|n| symbol_address(e, n)).collect();
        assert!(addrs.windows(2).all(|w| w[0] < w[1]), "{addrs:x?}");
    }
    // compute stays put; everything after it moves (v2's compute is longer).
    assert_eq!(
        symbol_address(&e1, "compute"),
        symbol_address(&e2, "compute")
    );
    for moved in ["triangle", "mix", "next_input", "guest_main"] {
        assert!(
            symbol_address(&e2, moved) > symbol_address(&e1, moved),
            "{moved} did not move"
        );
    }
}
