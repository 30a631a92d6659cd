//! The engine's guest-control seam on this VMM, against the real test guest: pausing yields
//! consistent vCPU states, guest-virtual addresses translate through each vCPU's own page
//! tables to the right bytes, guest memory reads and writes work and are bounded.

use std::time::{Duration, Instant};

use guest_tools::{GuestBuild, test_guest};
use integration_tests::require_kvm;
use object::{Object, ObjectSymbol};
use vmm::guest::{GuestControl, GuestError};
use vmm::vm::{ConsoleSink, Vm, VmConfig};

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
    vm.request_stop(vmm::devices::StopReason::Requested("test done".into()));
    vm.join();
}
