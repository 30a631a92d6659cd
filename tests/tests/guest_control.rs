//! The engine's guest-control seam on this VMM, against the real test guest: pausing yields
//! consistent vCPU states, guest-virtual addresses translate through each vCPU's own page
//! tables to the right bytes, guest memory reads and writes work and are bounded.

use std::time::{Duration, Instant};

use guest_control::{GuestControl, GuestError};
use guest_tools::{GuestBuild, test_guest};
use integration_tests::require_kvm;
use kvm_vmm::layout;
use kvm_vmm::vm::{ConsoleSink, Vm, VmConfig};
use object::{Object, ObjectSymbol};

fn wait_reports(vm: &Vm, min: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm.reports().iter().any(|r| r.count < min) {
        assert!(
            Instant::now() < deadline,
            "guest not reporting: {:?}",
            vm.stop_reason()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn pause_translate_read_write_resume() {
    require_kvm();
    let mut config = VmConfig::builtin(2, 64, "batch=500000");
    config.console = ConsoleSink::Discard;
    let vm = Vm::start(config).expect("start VM");
    wait_reports(&vm, 1);

    let elf = object::File::parse(test_guest(GuestBuild::V1)).expect("ELF");
    let compute = elf
        .symbols()
        .find(|s| s.name() == Ok("compute"))
        .expect("compute");
    let text = elf.section_by_name(".text").expect(".text");
    let off = (compute.address() - object::ObjectSection::address(&text)) as usize;
    let file_bytes =
        &object::ObjectSection::data(&text).expect("data")[off..off + compute.size() as usize];

    assert_eq!(
        vm.set_rip(0, 0x1000).err().map(|e| e.to_string()),
        Some(GuestError::NotPaused.to_string())
    );

    let states = vm.pause_all().expect("pause");
    assert_eq!(states.len(), 2);
    for s in states.iter().map(|s| s.expect("running vCPU")) {
        assert_eq!(s.cpl, 3, "the workload runs in ring 3: {s:?}");
        let t = vm.translate(&s, s.rip).expect("rip translates");
        assert_eq!(t.gpa, s.rip, "the guest identity-maps its image");
        assert!(t.executable && t.user);
        // The function's bytes, read through vCPU s's page tables, are the ELF's.
        let gpa = vm
            .translate(&s, compute.address())
            .expect("compute translates")
            .gpa;
        let mut live = vec![0u8; file_bytes.len()];
        vm.read_phys(gpa, &mut live).expect("read");
        assert_eq!(live, file_bytes);
        // Above 4 GiB nothing is mapped.
        assert!(vm.translate(&s, 1 << 40).is_err());
    }
    // Writes land and are bounded by guest RAM.
    let scratch = (64 << 20) - 4096;
    vm.write_phys(scratch, b"hotpatch").expect("write");
    let mut back = [0u8; 8];
    vm.read_phys(scratch, &mut back).expect("read back");
    assert_eq!(&back, b"hotpatch");
    assert!(matches!(
        vm.write_phys((64 << 20) - 4, b"12345678"),
        Err(GuestError::OutsideMemory { .. })
    ));
    // Moving a vCPU to where it already is changes nothing (the engine moves vCPUs out of
    // displaced bytes; that path is exercised by the engine's tests).
    let rip0 = states[0].map(|s| s.rip).unwrap_or(0);
    vm.set_rip(0, rip0).expect("set_rip while paused");
    assert!(matches!(vm.set_rip(7, 0), Err(GuestError::NoSuchVcpu(7))));

    let before: Vec<u64> = vm.reports().iter().map(|r| r.count).collect();
    vm.resume_all().expect("resume");
    wait_reports(&vm, before.iter().copied().max().unwrap_or(0) + 2);
    for r in vm.reports() {
        assert_eq!(r.last.map(|l| l.bad), Some(0));
        assert_eq!(r.seq_errors, 0);
    }
    vm.request_stop(kvm_vmm::devices::StopReason::Requested("test done".into()));
    vm.join();
}

/// The patch arena, on a real guest: zeroed, outside the guest's RAM, read and written through
/// the seam, identity-mapped user/executable by the guest's own page tables, and real guest
/// memory: vCPU 0, sent there, runs ring-3 code from it (which stores a marker into the arena
/// through the guest's mapping) and comes back with a `jmp rel32`.
#[test]
fn patch_arena_is_guest_memory_a_vcpu_can_run() {
    require_kvm();
    let mut config = VmConfig::builtin(2, 64, "batch=500000");
    config.console = ConsoleSink::Discard;
    let vm = Vm::start(config).expect("start VM");
    wait_reports(&vm, 1);

    let arena = vm.arena();
    assert_eq!(
        (arena.start, arena.size),
        (layout::PATCH_ARENA_START, layout::PATCH_ARENA_SIZE)
    );
    let ram = vm.ram_regions();
    assert_eq!(ram.iter().map(|r| r.size).sum::<u64>(), 64 << 20);
    assert!(ram.iter().all(|r| !arena.overlaps(r.start, r.end())));
    let mut bytes = vec![0xffu8; arena.size as usize];
    vm.read_phys(arena.start, &mut bytes)
        .expect("read the arena");
    assert!(bytes.iter().all(|&b| b == 0), "the arena starts zeroed");
    // Nothing is mapped after the arena in a 64 MiB guest.
    assert!(matches!(
        vm.read_phys(arena.end() - 4, &mut [0u8; 8]),
        Err(GuestError::OutsideMemory { .. })
    ));

    let states = vm.pause_all().expect("pause");
    let s = states[0].expect("vCPU 0 running");
    assert_eq!(s.cpl, 3, "the workload runs in ring 3: {s:?}");
    for gva in [arena.start, arena.start + 0x1234, arena.end() - 1] {
        let t = vm.translate(&s, gva).expect("the arena translates");
        assert_eq!(t.gpa, gva, "the guest identity-maps the arena");
        assert!(t.user && t.executable && t.writable, "{t:?}");
    }

    // mov byte [rip + marker], 1 ; jmp rel32 back to where vCPU 0 was. Neither touches
    // registers, flags or the stack, so the workload carries on as if nothing happened.
    let marker = arena.start + 0x800;
    let after_mov = arena.start + 7;
    let after_jmp = after_mov + 5;
    let mut code = vec![0xc6, 0x05];
    code.extend_from_slice(&((marker - after_mov) as u32).to_le_bytes());
    code.push(1);
    let back = i32::try_from(s.rip.wrapping_sub(after_jmp) as i64)
        .expect("the text is within rel32 of the arena");
    code.push(0xe9);
    code.extend_from_slice(&back.to_le_bytes());
    vm.write_phys(arena.start, &code).expect("write arena code");
    let mut read_back = vec![0u8; code.len()];
    vm.read_phys(arena.start, &mut read_back)
        .expect("read arena code");
    assert_eq!(read_back, code);
    vm.set_rip(0, arena.start)
        .expect("send vCPU 0 to the arena");

    let before: Vec<u64> = vm.reports().iter().map(|r| r.count).collect();
    vm.resume_all().expect("resume");
    wait_reports(&vm, before.iter().copied().max().unwrap_or(0) + 2);
    let mut flag = [0u8; 1];
    vm.read_phys(marker, &mut flag).expect("read the marker");
    assert_eq!(flag, [1], "vCPU 0 ran the arena code");
    for r in vm.reports() {
        assert_eq!(r.last.map(|l| l.bad), Some(0));
        assert_eq!(r.seq_errors, 0);
    }
    assert_eq!(vm.stop_reason(), None);
    vm.request_stop(kvm_vmm::devices::StopReason::Requested("test done".into()));
    vm.join();
}

/// With more RAM than fits below the arena, RAM continues right after it (the memory is lazily
/// backed, so the guest costs what it touches), the guest runs, and each side stays its own:
/// writes to the arena land in the arena, writes after it in RAM.
#[test]
fn ram_continues_after_the_arena() {
    require_kvm();
    let mut config = VmConfig::builtin(1, 2100, "batch=500000");
    config.console = ConsoleSink::Discard;
    let vm = Vm::start(config).expect("start VM");
    wait_reports(&vm, 1);

    let arena = vm.arena();
    let ram = vm.ram_regions();
    assert_eq!(ram.len(), 2, "{ram:x?}");
    assert_eq!(ram[0].end(), arena.start);
    assert_eq!(ram[1].start, arena.end());
    assert_eq!(ram.iter().map(|r| r.size).sum::<u64>(), 2100 << 20);
    vm.write_phys(arena.end() - 8, b"arena...")
        .expect("arena write");
    vm.write_phys(arena.end(), b"ram.....").expect("RAM write");
    let mut both = [0u8; 16];
    vm.read_phys(arena.end() - 8, &mut both)
        .expect("read across the boundary");
    assert_eq!(&both, b"arena...ram.....");
    let last = ram[1].end() - 8;
    vm.write_phys(last, b"lastbyte")
        .expect("write at the end of RAM");
    assert!(matches!(
        vm.write_phys(last, b"one byte too far"),
        Err(GuestError::OutsideMemory { .. })
    ));

    let before = vm.reports()[0].count;
    wait_reports(&vm, before + 2);
    assert_eq!(vm.reports()[0].last.map(|l| l.bad), Some(0));
    vm.request_stop(kvm_vmm::devices::StopReason::Requested("test done".into()));
    vm.join();
}
