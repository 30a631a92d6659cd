//! Where the stock Debian kernel rewrites its own text, from the tables it carries
//! (`linux_guest::text_sites`), and the engine's refusal to place a jump over a site it
//! rewrites while it runs. Offline: the real vmlinux, no boot.

use std::sync::Arc;

use integration_tests::linux::Kit;
use linux_guest::attach::KernelImage;
use linux_guest::boot_rewrites::LinuxBootRewrites;
use linux_guest::text_sites::{KernelTextSites, Mechanism};
use patch_engine::rewrites::TextRewrites;
use patch_engine::target::Target;

fn image() -> KernelImage {
    let kit = Kit::ensure();
    KernelImage::from_file(&kit.vmlinuz).expect("read the kernel image")
}

#[test]
fn the_kernels_tables_of_its_own_rewrites_are_read() {
    let image = image();
    let sites = &image.text_sites;
    let count = |m| sites.of(m).count();
    for (m, at_least) in [
        (Mechanism::JumpLabel, 3_000),
        (Mechanism::StaticCall, 1_000),
        (Mechanism::Ftrace, 30_000),
        (Mechanism::SmpLock, 1_000),
        (Mechanism::Alternative, 1_000),
        (Mechanism::Paravirt, 500),
        (Mechanism::Retpoline, 1_000),
        (Mechanism::ReturnThunk, 10_000),
        (Mechanism::StaticCallTrampoline, 500),
        (Mechanism::ExceptionFixup, 300),
    ] {
        println!("{m:?}: {}", count(m));
        assert!(count(m) >= at_least, "{m:?}: only {} sites", count(m));
    }
    // Every site is in the kernel's image, nearly all in its text (a few jump labels sit in
    // alternatives' replacement code, `.altinstr_replacement`).
    let k = |n: &str| image.kallsyms.lookup(n).expect(n);
    let (image_start, image_end) = (k("_text"), k("_end"));
    let text = [
        (k("_stext"), k("_etext")),
        (k("_sinittext"), k("_einittext")),
    ];
    for m in [
        Mechanism::JumpLabel,
        Mechanism::StaticCall,
        Mechanism::Ftrace,
        Mechanism::SmpLock,
    ] {
        let mut outside = 0;
        for s in sites.of(m) {
            assert!(
                (image_start..image_end).contains(&s.addr),
                "{m:?} at {:#x}",
                s.addr
            );
            if !text.iter().any(|(a, b)| (*a..*b).contains(&s.addr)) {
                outside += 1;
            }
        }
        assert!(
            outside * 100 <= count(m),
            "{m:?}: {outside} sites outside the text"
        );
    }
    // ftrace's sites are function entries (`call __fentry__` as the first instruction).
    let f = image.kallsyms.lookup("version_proc_show").expect("symbol");
    assert!(sites.of(Mechanism::Ftrace).any(|s| s.addr == f));
    // ping_close: fentry, then a dynamic-debug jump label at +9 (`pr_debug` first thing).
    let p = image.kallsyms.lookup("ping_close").expect("ping_close");
    let in_ping: Vec<_> = sites.touching(p, p + 16).collect();
    println!("ping_close: {in_ping:x?}");
    assert!(
        in_ping
            .iter()
            .any(|s| s.mechanism == Mechanism::JumpLabel && s.addr == p + 9),
        "{in_ping:x?}"
    );
}

#[test]
fn a_jump_over_a_site_the_kernel_rewrites_while_it_runs_is_found() {
    let image = image();
    let info = linux_guest::patch::kernel_image_info(&image.vmlinux, &image.kallsyms);
    let slide = 0x2a00_0000;
    let target = Target::new(info, slide);
    let rewrites = LinuxBootRewrites::new(image.text_sites.clone(), false);
    let ping = image.kallsyms.lookup("ping_close").expect("ping_close") + slide;
    // The function site's jump goes after the entry's NOP: +5..+10 holds the jump label.
    let live = rewrites
        .live_rewrite(ping + 5, ping + 10, &target)
        .expect("the jump label is found");
    assert_eq!(live.at, ping + 9);
    assert!(live.what.contains("jump label"), "{}", live.what);
    // version_proc_show's first bytes after its entry hold none.
    let v = image.kallsyms.lookup("version_proc_show").expect("symbol") + slide;
    assert_eq!(rewrites.live_rewrite(v + 5, v + 12, &target), None);
    // Lock prefixes count only on a kernel that keeps them to rewrite (booted on one CPU).
    let lock = image
        .text_sites
        .of(Mechanism::SmpLock)
        .next()
        .expect("a lock prefix")
        .addr
        + slide;
    assert_eq!(rewrites.live_rewrite(lock, lock + 1, &target), None);
    let up = LinuxBootRewrites::new(image.text_sites.clone(), true);
    let live = up
        .live_rewrite(lock, lock + 1, &target)
        .expect("live on UP");
    assert!(live.what.contains("lock prefix"), "{}", live.what);
    // Boot-time rewrites are not live: their final form is what the jump displaces.
    let alt = image
        .text_sites
        .of(Mechanism::Alternative)
        .find(|a| {
            image
                .text_sites
                .touching(a.addr, a.addr + u64::from(a.len))
                .all(|s| !s.mechanism.at_run_time())
        })
        .expect("an alternative alone")
        .addr
        + slide;
    assert_eq!(rewrites.live_rewrite(alt, alt + 1, &target), None);
    let _: Arc<KernelTextSites> = image.text_sites.clone();
}

/// kallsyms sizes `loadavg_proc_show` up to the next named symbol, which takes in the unnamed
/// code after it (another function with its own ftrace entry): the planner refused it for what
/// that code does. Cut at the next ftrace entry, it is the function alone, and accepted.
#[test]
fn functions_end_at_the_next_function_entry() {
    use patch_engine::plan::{self, FunctionCode, SiteInput};
    use patch_format::SiteKind;
    let image = image();
    let full = linux_guest::patch::kernel_image_info(&image.vmlinux, &image.kallsyms);
    let mut cut = full.clone();
    image.text_sites.cut_at_function_entries(&mut cut.symbols);
    let find = |info: &patch_format::ImageInfo, name: &str| {
        info.symbols
            .iter()
            .find(|s| s.name == name)
            .expect(name)
            .clone()
    };
    let (long, short) = (
        find(&full, "loadavg_proc_show"),
        find(&cut, "loadavg_proc_show"),
    );
    println!(
        "loadavg_proc_show: {} bytes by kallsyms, {} to the next entry",
        long.size, short.size
    );
    assert!(short.size < long.size);
    assert!(
        image
            .text_sites
            .of(Mechanism::Ftrace)
            .any(|s| s.addr == short.addr + short.size)
    );
    let analyze = |size: u64| {
        let bytes = linux_guest::patch::file_bytes(&image.vmlinux, long.addr, size as usize)
            .expect("in the file");
        plan::analyze(
            &SiteInput {
                name: "loadavg_proc_show".into(),
                kind: SiteKind::Function,
                at: long.addr,
                expected: bytes,
                current: bytes,
                function: Some(FunctionCode {
                    start: long.addr,
                    bytes,
                }),
            },
            plan::JMP_REL32_LEN,
        )
    };
    println!("by kallsyms: {:?}", analyze(long.size).err());
    analyze(short.size).expect("the function alone is patchable");
    // A fix built against the symbol's whole extent expects the unnamed function's `call
    // __fentry__`, which the running kernel holds as a NOP: accepted at that ftrace entry.
    let expected = linux_guest::patch::file_bytes(&image.vmlinux, long.addr, long.size as usize)
        .expect("in the file")
        .to_vec();
    let inner = short.size as usize;
    assert_eq!(expected[inner], 0xe8, "call __fentry__ at the next entry");
    let mut current = expected.clone();
    current[..5].copy_from_slice(&patch_engine::plan::NOP5);
    current[inner..inner + 5].copy_from_slice(&patch_engine::plan::NOP5);
    let rewrites = LinuxBootRewrites::new(image.text_sites.clone(), false);
    let target = Target::new(full.clone(), 0);
    let got = rewrites
        .reconcile(
            &patch_engine::rewrites::SiteText {
                site: "loadavg_proc_show",
                expected: &expected,
                current: &current,
                at: long.addr,
                function_entry: true,
                memory: patch_engine::rewrites::GuestMemory::NONE,
            },
            &target,
        )
        .expect("reconcile");
    assert_eq!(got, current);
    // No function grows, and the cut only ever lands on an entry.
    for (a, b) in full.symbols.iter().zip(&cut.symbols) {
        assert!(b.size <= a.size);
    }
}

/// The decompressed vmlinux is cached by the bzImage's hash and checked on every read: a
/// damaged entry, or a cache directory another user could write, is never used.
#[test]
fn the_decompressed_kernel_is_cached_and_checked_on_read() {
    use std::os::unix::fs::PermissionsExt;
    let kit = Kit::ensure();
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = dir.path().join("linux");
    let load = || KernelImage::from_file_cached(&kit.vmlinuz, Some(&cache)).expect("image");
    let first = load();
    assert!(!first.from_cache);
    let second = load();
    assert!(second.from_cache, "the second read decompressed again");
    assert!(second.vmlinux == first.vmlinux);
    let entry = std::fs::read_dir(&cache)
        .expect("cache dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "vmlinux"))
        .expect("an entry");
    assert_eq!(
        std::fs::metadata(&entry)
            .expect("entry")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    // One flipped byte: detected, decompressed again, and the entry rewritten good.
    let mut bytes = std::fs::read(&entry).expect("read entry");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&entry, &bytes).expect("damage it");
    let third = load();
    assert!(!third.from_cache);
    assert!(third.vmlinux == first.vmlinux);
    assert!(load().from_cache);
    // A cache others can write is not trusted.
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    assert!(!load().from_cache);
}

/// Static functions of one name (`load_elf_binary` in binfmt_elf and compat_binfmt_elf) are
/// named by position, as livepatch's sympos: `load_elf_binary,2` is the second in address order.
#[test]
fn duplicate_names_are_chosen_by_position() {
    use patch_format::Location;
    let image = image();
    let info = linux_guest::patch::kernel_image_info(&image.vmlinux, &image.kallsyms);
    let mut addrs: Vec<u64> = info
        .symbols
        .iter()
        .filter(|s| s.name == "load_elf_binary")
        .map(|s| s.addr)
        .collect();
    addrs.sort_unstable();
    assert!(addrs.len() >= 2, "{addrs:x?}");
    let target = Target::new(info, 0);
    let at = |name: &str| {
        target.resolve(
            name,
            &Location::Symbol {
                name: name.into(),
                offset: 0,
            },
        )
    };
    let err = at("load_elf_binary").unwrap_err().to_string();
    assert!(err.contains("load_elf_binary,N"), "{err}");
    assert_eq!(at("load_elf_binary,1").unwrap().gva, addrs[0]);
    assert_eq!(at("load_elf_binary,2").unwrap().gva, addrs[1]);
    assert!(at(&format!("load_elf_binary,{}", addrs.len() + 1)).is_err());
}

/// What must stay in place though no table says the kernel rewrites it: a static call's
/// trampoline (static_call_update() rewrites its jump) and an instruction with an exception
/// fixup (`native_read_msr_safe`'s `rdmsr`: run from a copy, its #GP would find no fixup).
#[test]
fn trampolines_and_fixed_up_instructions_stay_in_place() {
    let image = image();
    let info = linux_guest::patch::kernel_image_info(&image.vmlinux, &image.kallsyms);
    let target = Target::new(info, 0);
    let rewrites = LinuxBootRewrites::new(image.text_sites.clone(), false);
    let sct = image
        .kallsyms
        .symbols()
        .iter()
        .find(|s| s.name.starts_with("__SCT__"))
        .expect("a static call trampoline");
    let live = rewrites
        .live_rewrite(sct.address, sct.address + 5, &target)
        .expect("the trampoline is found");
    assert!(live.what.contains("trampoline"), "{}", live.what);
    let msr = image
        .kallsyms
        .lookup("native_read_msr_safe")
        .expect("native_read_msr_safe");
    let fixups: Vec<_> = image
        .text_sites
        .touching(msr, msr + 64)
        .filter(|s| s.mechanism == Mechanism::ExceptionFixup)
        .collect();
    assert!(
        !fixups.is_empty(),
        "no __ex_table entry in native_read_msr_safe"
    );
    // A difference in freed init text is explained as such, not blamed on the patch.
    let init = image
        .kallsyms
        .lookup("debug_kernel")
        .expect("an __init function");
    let why = rewrites.explain(init, &target).expect("explained");
    assert!(why.contains("init memory"), "{why}");
}

/// The boot-time tables a function's body is reconciled with (`linux_guest::boot_forms`) are
/// read from the real vmlinux with 6.1's layouts: every paravirt site is the indirect call
/// through its `pv_ops` slot the table says, every static call site calls (or tail-calls) its
/// key's trampoline, every alternative's replacement is in the file.
#[test]
fn the_boot_time_tables_are_read_with_the_kernels_layouts() {
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};
    let image = image();
    let boot = image.text_sites.boot();
    let k = |n: &str| image.kallsyms.lookup(n).expect(n);
    println!(
        "{} alternatives, {} paravirt sites, {} static call sites",
        boot.alternatives.len(),
        boot.paravirt.len(),
        boot.static_calls.len()
    );
    assert!(boot.alternatives.len() >= 1_000);
    assert!(boot.paravirt.len() >= 500);
    assert!(boot.static_calls.len() >= 1_000);
    let sym = boot.symbols;
    assert_eq!(sym.pv_ops, Some(k("pv_ops")));
    assert!(sym.paravirt_nop.is_some() && sym.paravirt_bug.is_some());
    assert!(sym.static_call_return0.is_some() && sym.return_thunk.is_some());
    let pv_ops = k("pv_ops");
    for p in &boot.paravirt {
        let bytes = linux_guest::patch::file_bytes(&image.vmlinux, p.instr, usize::from(p.len))
            .expect("paravirt site in the file");
        let insn = Decoder::with_ip(64, bytes, p.instr, DecoderOptions::NONE).decode();
        assert_eq!(insn.mnemonic(), Mnemonic::Call, "{:#x}", p.instr);
        assert_eq!(
            insn.ip_rel_memory_address(),
            pv_ops + 8 * u64::from(p.op),
            "{:#x}",
            p.instr
        );
    }
    let mut tails = 0;
    for s in &boot.static_calls {
        let tramp = s.trampoline.expect("every key has its trampoline");
        let bytes = linux_guest::patch::file_bytes(&image.vmlinux, s.addr, 6).expect("in the file");
        let insn = Decoder::with_ip(64, bytes, s.addr, DecoderOptions::NONE).decode();
        assert_eq!(insn.near_branch_target(), tramp, "{:#x}", s.addr);
        assert_eq!(
            s.tail,
            insn.mnemonic() != Mnemonic::Call,
            "tail flag at {:#x}",
            s.addr
        );
        tails += usize::from(s.tail);
    }
    assert!(tails > 0, "some static calls are tail calls");
    for a in &boot.alternatives {
        assert!(a.replacement.len() <= usize::from(a.instrlen));
    }
}

/// On the real tables: a function whose alternative the kernel applied (its replacement
/// copied over the site, its `call` relocated), and whose paravirt call became a direct
/// call, is accepted exactly when its bytes are those forms.
#[test]
fn a_function_with_applied_alternatives_is_reconciled_on_the_real_tables() {
    let image = image();
    let boot = image.text_sites.boot();
    let info = linux_guest::patch::kernel_image_info(&image.vmlinux, &image.kallsyms);
    let slide = 0x2a00_0000u64;
    let target = Target::new(info.clone(), slide);
    let rewrites = LinuxBootRewrites::new(image.text_sites.clone(), false);
    let (lo, hi) = (
        image.kallsyms.lookup("_stext").expect("_stext"),
        image.kallsyms.lookup("_etext").expect("_etext"),
    );
    // An alternative in a function's text whose replacement is one instruction with no
    // address in it (`stac`, `clac`, `lfence`...), alone at its address.
    let alt = boot
        .alternatives
        .iter()
        .find(|a| {
            (lo..hi).contains(&a.instr)
                && a.replacement.len() == 3
                && a.instrlen == 3
                && boot.alternatives_at(a.instr).len() == 1
                && boot.paravirt_at(a.instr).is_none()
                && image
                    .text_sites
                    .touching(a.instr, a.instr + 3)
                    .all(|s| s.mechanism == Mechanism::Alternative)
        })
        .expect("a 3-byte alternative");
    let f = image.kallsyms.containing(alt.instr).expect("its function");
    let len = (alt.instr - f.address + 16) as usize;
    let expected = linux_guest::patch::file_bytes(&image.vmlinux, f.address, len)
        .expect("in the file")
        .to_vec();
    let off = (alt.instr - f.address) as usize;
    let mut current = expected.clone();
    current[off..off + 3].copy_from_slice(&alt.replacement);
    let none = |_: u64, _: usize| None;
    let text = |current: &[u8]| {
        rewrites
            .reconcile(
                &patch_engine::rewrites::SiteText {
                    site: &f.name,
                    expected: &expected,
                    current,
                    at: f.address + slide,
                    function_entry: false,
                    memory: patch_engine::rewrites::GuestMemory(&none),
                },
                &target,
            )
            .expect("reconcile")
    };
    println!(
        "{} +{off:#x}: {:02x?} -> {:02x?}",
        f.name,
        &expected[off..off + 3],
        alt.replacement
    );
    assert_ne!(
        current, expected,
        "the replacement differs from the original"
    );
    assert_eq!(text(&current), current, "the replacement is accepted");
    // One byte after the site changed as well: that byte stays a difference.
    let mut more = current.clone();
    more[off + 3] ^= 0xff;
    assert_ne!(text(&more), more);
    assert_eq!(text(&more)[off..off + 3], alt.replacement[..]);
}
