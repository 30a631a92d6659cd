//! Helpers for the patch engine's integration tests: a test signing key, the v1 → v2 sample
//! re-signed with it, in-process VMs and engines on the real test guest, phases of the guest's
//! reports, micropatch construction, and byte-exact snapshots of guest memory.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_control::GuestControl;
use guest_tools::{GuestBuild, test_guest};
use kvm_vmm::vm::{ConsoleSink, Vm, VmConfig};
use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol};
use patch_engine::{Engine, EngineConfig};
use patch_format::{
    Location, Metadata, Patch, PublicKey, SecretKey, Site, SiteKind, TargetIdentity,
};
use sha2::{Digest, Sha256};

/// The name the in-process engines give the booted image (only shown in messages).
pub const IMAGE_NAME: &str = "test-guest-v1";

/// The key the tests sign with (fixed seed: reproducible patch files).
pub fn test_key() -> SecretKey {
    SecretKey::from_seed(&[0x42; 32])
}

/// A key nobody trusts.
pub fn untrusted_key() -> SecretKey {
    SecretKey::from_seed(&[0x66; 32])
}

pub fn test_public() -> PublicKey {
    test_key().public()
}

/// The embedded v1 → v2 sample patch (sites `compute` and `triangle`), re-signed with the
/// test key. Re-signing keeps the body, so the patch id is the sample's.
pub fn sample_signed() -> Vec<u8> {
    patch_format::sign_file(vmm_tools::sample::SAMPLE_PATCH, &test_key()).expect("re-sign sample")
}

/// The sample as a [`Patch`], to derive variants from.
pub fn sample_patch() -> Patch {
    patch_format::parse(vmm_tools::sample::SAMPLE_PATCH)
        .expect("sample parses")
        .patch
}

pub fn patch_id(file: &[u8]) -> String {
    patch_format::parse(file)
        .expect("patch parses")
        .id
        .to_string()
}

/// Boots the v1 test guest in-process. The console is discarded unless `keep_console`.
pub fn boot(vcpus: usize, memory_mib: u64, cmdline: &str, keep_console: bool) -> Arc<Vm> {
    crate::require_kvm();
    let mut config = VmConfig::builtin(vcpus, memory_mib, cmdline);
    config.console = ConsoleSink::Discard;
    config.keep_console = keep_console;
    Vm::start(config).expect("start VM")
}

/// An engine for `vm` trusting only the test key.
pub fn engine(vm: &Arc<Vm>, state_dir: Option<&Path>) -> Engine<Vm> {
    engine_with(vm, state_dir, EngineConfig::default())
}

/// An engine for `vm` with `config`, the test key added to its trusted keys.
pub fn engine_with(vm: &Arc<Vm>, state_dir: Option<&Path>, mut config: EngineConfig) -> Engine<Vm> {
    config.trusted_keys.push(test_public());
    vmm_tools::sample::engine_for(
        Arc::clone(vm),
        IMAGE_NAME,
        test_guest(GuestBuild::V1),
        config,
        state_dir,
    )
    .expect("engine for the test guest")
}

/// Panics (with the reason) if the guest stopped: it faulted, triple-faulted or powered off.
pub fn assert_running(vm: &Vm, when: &str) {
    if let Some(reason) = vm.stop_reason() {
        panic!("the guest stopped {when}: {reason}");
    }
}

pub use vmm_tools::phases::{Counts as Delta, all_v1, all_v2};

/// Waits until every vCPU has reported at least `batches` consecutive batches, all begun after
/// this call, each satisfying `want` with no bad result (`vmm_tools::phases::wait`). Returns those
/// batches' counts summed over vCPUs. Fails the test, naming `what`, if the guest stops or
/// `timeout` passes.
pub fn wait_phase(
    vm: &Vm,
    what: &str,
    want: impl Fn(&Delta) -> bool,
    batches: u64,
    timeout: Duration,
) -> Delta {
    match vmm_tools::phases::wait(vm, want, batches, timeout) {
        Ok(settled) => settled.counts,
        Err(e) => panic!("while waiting for {what}: {e}"),
    }
}

/// Asserts no vCPU ever got a wrong result, and reports arrived in order and valid.
pub fn assert_no_bad(vm: &Vm) {
    for (i, r) in vm.reports().iter().enumerate() {
        let last = r.last.unwrap_or_else(|| panic!("vCPU {i} never reported"));
        assert_eq!(
            last.bad, 0,
            "vCPU {i}: {} calls returned a value that is neither v1's nor v2's ({last:?})",
            last.bad
        );
        assert_eq!(r.seq_errors, 0, "vCPU {i}: reports lost or duplicated");
        assert_eq!(r.invalid, 0, "vCPU {i}: invalid report records");
    }
}

/// Calls made so far, summed over vCPUs.
pub fn total(vm: &Vm) -> Delta {
    let mut t = Delta::default();
    for r in vm.reports().iter().filter_map(|r| r.last) {
        t.add(Delta::of(&r));
    }
    t
}

/// Address and bytes of symbol `name` in a test-guest ELF.
pub fn elf_symbol(build: GuestBuild, name: &str) -> (u64, Vec<u8>) {
    let elf = object::File::parse(test_guest(build)).expect("guest ELF");
    let sym = elf
        .symbols()
        .find(|s| s.name() == Ok(name))
        .unwrap_or_else(|| panic!("the test guest has no symbol {name}"));
    let section = elf
        .sections()
        .find(|s| s.address() <= sym.address() && sym.address() < s.address() + s.size())
        .unwrap_or_else(|| panic!("no section holds {name}"));
    let data = section.data().expect("section data");
    let off = (sym.address() - section.address()) as usize;
    (sym.address(), data[off..off + sym.size() as usize].to_vec())
}

/// The v1 guest's identity, as a patch names it.
pub fn v1_identity() -> TargetIdentity {
    patch_format::read_image(IMAGE_NAME, test_guest(GuestBuild::V1))
        .expect("read image")
        .identity
}

/// A patch of one micropatch site at `symbol + offset` for the v1 guest.
pub fn micropatch(name: &str, symbol: &str, offset: u64, expected: &[u8], code: &[u8]) -> Patch {
    Patch {
        meta: Metadata {
            name: name.into(),
            description: "integration test".into(),
            author: "tests".into(),
            created: 1_700_000_000,
            advisories: Vec::new(),
            replaces: Vec::new(),
        },
        target: v1_identity(),
        sites: vec![Site {
            kind: SiteKind::Micropatch,
            target: Location::Symbol {
                name: symbol.into(),
                offset,
            },
            expected: expected.to_vec(),
            code: code.to_vec(),
            relocations: Vec::new(),
        }],
        data: Vec::new(),
    }
}

pub fn signed(p: &Patch) -> Vec<u8> {
    p.to_file_signed(&test_key()).expect("encode patch")
}

/// Reads guest-physical memory.
pub fn read(vm: &Vm, gpa: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    vm.read_phys(gpa, &mut b)
        .unwrap_or_else(|e| panic!("read {gpa:#x}+{len}: {e}"));
    b
}

/// Every byte of guest RAM and of the patch arena, with their SHA-256.
pub struct MemorySnapshot {
    pub regions: Vec<(u64, Vec<u8>)>,
    pub sha256: String,
}

impl MemorySnapshot {
    pub fn take(vm: &Vm) -> MemorySnapshot {
        let arena = vm.arena();
        let mut ranges: Vec<(u64, u64)> =
            vm.ram_regions().iter().map(|r| (r.start, r.size)).collect();
        ranges.push((arena.start, arena.size));
        let mut h = Sha256::new();
        let regions: Vec<(u64, Vec<u8>)> = ranges
            .into_iter()
            .map(|(start, size)| {
                let b = read(vm, start, size as usize);
                h.update(start.to_le_bytes());
                h.update(&b);
                (start, b)
            })
            .collect();
        MemorySnapshot {
            regions,
            sha256: hex::encode(h.finalize()),
        }
    }

    /// Panics with the first differing address unless `other` holds the same bytes.
    pub fn assert_same(&self, other: &MemorySnapshot, what: &str) {
        if self.sha256 == other.sha256 {
            return;
        }
        for ((a0, a), (b0, b)) in self.regions.iter().zip(&other.regions) {
            assert_eq!(a0, b0);
            if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
                panic!(
                    "{what}: guest memory changed (SHA-256 {} → {}): first difference at {:#x}: {:#04x} → {:#04x}",
                    self.sha256,
                    other.sha256,
                    a0 + i as u64,
                    a[i],
                    b[i]
                );
            }
        }
        panic!("{what}: the memory hashes differ but no byte does");
    }
}

/// Asserts the guest's text (its executable `PT_LOAD` segments) holds exactly the image's bytes.
/// The test guest maps itself 1:1, so guest-virtual = guest-physical there.
pub fn assert_text_is_original(vm: &Vm, what: &str) {
    assert_text_matches_image(|gpa, len| read(vm, gpa, len), what);
}

/// The same check with guest memory read by `read(gpa, len)` (any backend).
pub fn assert_text_matches_image(read: impl Fn(u64, usize) -> Vec<u8>, what: &str) {
    let elf = object::File::parse(test_guest(GuestBuild::V1)).expect("guest ELF");
    let mut checked = 0;
    for seg in elf.segments() {
        let object::SegmentFlags::Elf { p_flags, .. } = seg.flags() else {
            continue;
        };
        if p_flags.0 & object::elf::PF_X.0 == 0 {
            continue;
        }
        let want = seg.data().expect("segment data");
        let got = read(seg.address(), want.len());
        if let Some(i) = want.iter().zip(&got).position(|(a, b)| a != b) {
            panic!(
                "{what}: text byte at {:#x} is {:#04x}, the image has {:#04x}",
                seg.address() + i as u64,
                got[i],
                want[i]
            );
        }
        checked += want.len();
    }
    assert!(checked > 0, "the image has no executable segment");
}

/// Waits until a console line satisfies `pred` (needs `keep_console`).
pub fn wait_console(vm: &Vm, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(l) = vm.console_lines().into_iter().find(|l| pred(l)) {
            return l;
        }
        assert_running(vm, &format!("while waiting for {what}"));
        assert!(
            Instant::now() < deadline,
            "no console line {what} within {timeout:?}; console so far:\n{}",
            vm.console_lines().join("\n")
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Stops the VM and joins its vCPU threads.
pub fn stop(vm: &Vm) {
    vm.request_stop(kvm_vmm::devices::StopReason::Requested("test done".into()));
    vm.join();
}
