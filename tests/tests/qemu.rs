//! The same test-guest ELF boots under stock QEMU (`-kernel`, PVH entry) and computes the same
//! results: the image is not tied to this VMM. scripts/test installs qemu-system-x86.

use std::process::Command;

use guest_tools::{GuestBuild, reference, test_guest_path};
use integration_tests::*;

#[test]
fn test_guest_boots_under_qemu() {
    require_kvm();
    let out = Command::new("timeout")
        .args([
            "120",
            "qemu-system-x86_64",
            "-enable-kvm",
            "-M",
            "pc",
            "-m",
            "64M",
            "-display",
            "none",
        ])
        .args([
            "-nodefaults",
            "-serial",
            "stdio",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=4",
        ])
        .arg("-kernel")
        .arg(test_guest_path(GuestBuild::V1))
        .args(["-append", "reports=2 batch=1000000"])
        .output()
        .expect("qemu-system-x86_64 is needed (scripts/setup installs qemu-system-x86)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<String> = stdout.lines().map(str::to_string).collect();
    // isa-debug-exit turns the guest's status 0 into QEMU exit code 1.
    assert_eq!(
        out.status.code(),
        Some(1),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reports = reports_by_vcpu(&lines);
    let vcpu0 = reports.get(&0).expect("reports from vCPU 0");
    assert_eq!(vcpu0.len(), 2);
    assert_contiguous(0, vcpu0);
    for r in vcpu0 {
        assert_eq!(r.bad, 0);
        assert_eq!(r.y, reference::compute_v1(r.x));
    }
}
