//! Bad input gets a clear message and a non-zero exit, never a panic.

use std::process::Command;

use integration_tests::*;

fn run_fails(args: &[&str], expect: &str) {
    let out = Command::new(vmm_bin())
        .args(args)
        .output()
        .expect("spawn vmm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "vmm {args:?} succeeded");
    assert!(
        stderr.contains(expect),
        "vmm {args:?}: expected {expect:?} in:\n{stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "vmm {args:?} panicked:\n{stderr}"
    );
    assert_ne!(
        out.status.code(),
        Some(101),
        "exit code 101 is a Rust panic"
    );
}

#[test]
fn zero_vcpus() {
    run_fails(&["run", "--vcpus", "0"], "--vcpus must be at least 1");
}

#[test]
fn too_many_vcpus() {
    require_kvm();
    run_fails(
        &["run", "--vcpus", "100000"],
        "more than this host's KVM allows",
    );
}

#[test]
fn not_a_bootable_image() {
    let dir = TempDir::new("badimg");
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "this is not a kernel\n".repeat(100)).expect("write");
    run_fails(
        &["run", "--kernel", text.to_str().expect("utf8")],
        "is not a bootable image",
    );
    let missing = dir.path().join("missing.elf");
    run_fails(
        &["run", "--kernel", missing.to_str().expect("utf8")],
        "cannot read the guest image",
    );
}

#[test]
fn more_memory_than_the_host_has() {
    require_kvm();
    run_fails(
        &["run", "--memory", "1000000000"],
        "more than this host can give",
    );
}

#[test]
fn no_kvm_device() {
    run_fails(
        &["run", "--kvm-device", "/nonexistent/kvm"],
        "KVM is not available",
    );
}

#[test]
fn kvm_permission_denied() {
    require_kvm();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root {
        // Drop to an unprivileged user that cannot open the root-only /dev/kvm.
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(vmm_bin())
            .args(["run"])
            .output()
            .expect("setpriv (util-linux) is needed for this test");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            stderr.contains("permission denied opening /dev/kvm"),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    } else {
        // Not root: a device path we cannot open exercises the same message.
        let dir = TempDir::new("perm");
        let dev = dir.path().join("kvm");
        std::fs::write(&dev, b"").expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dev, std::fs::Permissions::from_mode(0o000)).expect("chmod");
        run_fails(
            &["run", "--kvm-device", dev.to_str().expect("utf8")],
            "permission denied opening",
        );
    }
}

#[test]
fn api_client_without_a_vmm() {
    run_fails(
        &["status", "--api-sock", "/nonexistent/api.sock"],
        "no VMM is listening",
    );
}

#[test]
fn api_sock_on_a_regular_file_is_refused_and_the_file_kept() {
    require_kvm();
    let dir = std::env::temp_dir().join(format!("vmm-api-sock-file-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("precious");
    std::fs::write(&file, b"keep me").expect("write");
    let file_s = file.to_str().expect("utf8");
    run_fails(
        &["run", "--vcpus", "1", "--api-sock", file_s],
        "is a regular file, not a stale API socket",
    );
    assert_eq!(
        std::fs::read(&file).ok().as_deref(),
        Some(&b"keep me"[..]),
        "--api-sock deleted or changed a regular file"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Bad Linux boots are refused before KVM runs anything, each with what to do.
#[test]
fn bad_linux_kernels_and_initrds_are_refused() {
    require_kvm();
    let dir = TempDir::new("bad-linux");
    let file = |name: &str, bytes: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).expect("write");
        p.to_str().expect("utf-8").to_string()
    };
    let kit = integration_tests::linux::Kit::ensure();
    let stock = std::fs::read(&kit.vmlinuz).expect("read the stock kernel");
    let kernel = kit.vmlinuz.to_str().expect("utf-8").to_string();

    // Not a kernel; a bzImage cut inside its setup header; cut after it (no kernel left).
    run_fails(
        &["run", "--kernel", &file("notes.txt", b"hello\n")],
        "not an ELF file or a Linux bzImage",
    );
    run_fails(
        &["run", "--kernel", &file("cut.bz", &stock[..0x210])],
        "truncated",
    );
    let setup = (usize::from(stock[0x1f1]) + 1) * 512;
    run_fails(
        &["run", "--kernel", &file("head.bz", &stock[..setup])],
        "no protected-mode kernel",
    );
    // The stock kernel does not decompress in 32 MiB, and a 200 MiB initrd does not fit in 128.
    run_fails(
        &["run", "--kernel", &kernel, "--memory", "32"],
        "raise --memory",
    );
    let big = dir.path().join("big.img");
    std::fs::File::create(&big)
        .and_then(|f| f.set_len(200 << 20))
        .expect("sparse initrd");
    run_fails(
        &[
            "run",
            "--kernel",
            &kernel,
            "--memory",
            "128",
            "--initrd",
            big.to_str().expect("utf-8"),
        ],
        "does not fit in guest memory",
    );
    // An initrd needs a Linux kernel.
    run_fails(
        &["run", "--initrd", big.to_str().expect("utf-8")],
        "--kernel",
    );
}
