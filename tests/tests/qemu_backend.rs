//! The patch engine through the QEMU backend: the test guest runs under stock QEMU (`-enable-kvm`
//! here: its workload is ring-3 code), and `vmm patch apply|list|revert --qemu-gdb … --qmp …`
//! applies the very same v1 → v2 patch file as on this VMM, through QEMU's gdbstub and QMP.
//! Results change and return; refusals leave the guest's code as it was.
//!
//! A VM started without `-gdb` (as operators' VMs are) is patched with `--qmp` alone: the
//! backend starts a gdbstub on a private Unix socket for each command and leaves none behind.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use guest_control::GuestControl;
use guest_tools::{GuestBuild, test_guest_path};
use integration_tests::patching::{micropatch, sample_signed, signed, test_public};
use integration_tests::{
    ReportLine, TempDir, cli, cli_output, parse_report, require_kvm, stdout, vmm_bin,
};
use qemu_backend::{IO_TIMEOUT, Qmp};
use vmm_tools::qemu_launch::{LaunchOptions, QemuProcess};

const SETTLE: Duration = Duration::from_secs(60);

/// `(before, after)` consecutive reports of vCPU 0 that both began after `since_seq`.
fn next_batch(q: &QemuProcess, since_seq: u64, what: &str) -> (ReportLine, ReportLine) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let reports: Vec<ReportLine> = q
            .console_lines()
            .iter()
            .filter_map(|l| parse_report(l))
            .filter(|r| r.vcpu == 0)
            .collect();
        if let Some(w) = reports
            .windows(2)
            .find(|w| w[0].seq > since_seq && w[1].seq == w[0].seq + 1)
        {
            return (w[0], w[1]);
        }
        assert!(
            Instant::now() < deadline,
            "no two reports after seq {since_seq} ({what}) within {SETTLE:?}:\n{}",
            q.console_lines().join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn last_seq(q: &QemuProcess) -> u64 {
    q.console_lines()
        .iter()
        .filter_map(|l| parse_report(l))
        .map(|r| r.seq)
        .max()
        .unwrap_or(0)
}

/// Waits for a whole batch, begun after now, in which every result is v1's (`want_v2` false)
/// or v2's; returns it.
fn wait_all(q: &QemuProcess, want_v2: bool, what: &str) -> ReportLine {
    let deadline = Instant::now() + SETTLE;
    let mut since = last_seq(q);
    loop {
        let (a, b) = next_batch(q, since, what);
        let (v1, v2, bad) = (b.v1 - a.v1, b.v2 - a.v2, b.bad - a.bad);
        assert_eq!(bad, 0, "{what}: wrong results {a:?} → {b:?}");
        if (want_v2 && v1 == 0 && v2 > 0) || (!want_v2 && v2 == 0 && v1 > 0) {
            return b;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: never settled ({a:?} → {b:?})"
        );
        since = a.seq;
    }
}

/// The test guest under QEMU (KVM), with a gdbstub on a local port or (`gdb` false) QMP only.
fn spawn(dir: &TempDir, gdb: bool) -> QemuProcess {
    let q = QemuProcess::spawn(&LaunchOptions {
        kernel: test_guest_path(GuestBuild::V1).to_path_buf(),
        initrd: None,
        append: "batch=2000000".into(),
        memory_mib: 2048,
        vcpus: 1,
        cpu: None,
        accel: "kvm",
        gdb,
        dir: dir.path().join("qemu"),
    })
    .expect("start QEMU");
    println!("QEMU accelerator: {}", q.accel);
    q
}

/// The guest's text as QEMU holds it equals the image's, byte for byte.
fn assert_text_is_original(q: &QemuProcess, what: &str) {
    let guest = q.attach().expect("attach for the text check");
    integration_tests::patching::assert_text_matches_image(
        |gpa, len| {
            let mut b = vec![0u8; len];
            guest
                .read_phys(gpa, &mut b)
                .expect("read text through the gdbstub");
            b
        },
        what,
    );
}

/// SHA-256 of the patch arena (the default `--arena`, 2 MiB) and of the guest's `compute`,
/// read through the gdbstub.
fn guest_hash(q: &QemuProcess) -> [u8; 32] {
    use sha2::Digest;
    let guest = q.attach().expect("attach for the hash");
    let (compute, code) = integration_tests::patching::elf_symbol(GuestBuild::V1, "compute");
    let mut h = sha2::Sha256::new();
    for (gpa, len) in [(0x7fe0_0000u64, 2usize << 20), (compute, code.len())] {
        let mut b = vec![0u8; len];
        guest.read_phys(gpa, &mut b).expect("read guest memory");
        h.update(&b);
    }
    h.finalize().into()
}

#[test]
fn the_same_patch_file_applies_and_reverts_through_qemu() {
    require_kvm();
    let dir = TempDir::new("qemu-backend");
    let q = spawn(&dir, true);
    let gdb = q.gdb.clone().expect("started with a gdbstub");
    let key = dir.path().join("test.pub");
    std::fs::write(&key, test_public().to_file_text()).expect("write key");
    let patch = dir.path().join("sample.hpatch");
    std::fs::write(&patch, sample_signed()).expect("write patch");
    let state = dir.path().join("state");
    let image = test_guest_path(GuestBuild::V1)
        .to_str()
        .expect("utf-8")
        .to_string();
    let target = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.extend(
            [
                "--qemu-gdb",
                &gdb,
                "--qmp",
                q.qmp_path().to_str().expect("utf-8"),
                "--image",
                &image,
                "--state-dir",
                state.to_str().expect("utf-8"),
                "--trusted-key",
                key.to_str().expect("utf-8"),
            ]
            .map(str::to_string),
        );
        v
    };
    let run = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        cli(&refs)
    };

    wait_all(&q, false, "v1 before the patch");
    let out = run(target(&["patch", "apply", patch.to_str().expect("utf-8")]));
    let applied = stdout(&out);
    println!("{applied}");
    assert!(applied.starts_with("applied "), "{applied}");
    assert_halts_reported(&applied);
    let id = applied.split_whitespace().nth(1).expect("id").to_string();
    wait_all(&q, true, "v2 after the apply through QEMU");

    // Idempotent, and listed from the journal (QEMU itself keeps nothing).
    let again = stdout(&run(target(&[
        "patch",
        "apply",
        patch.to_str().expect("utf-8"),
    ])));
    assert!(again.starts_with("already applied"), "{again}");
    let list = stdout(&run(target(&["patch", "list"])));
    assert!(
        list.contains(&id[..16]) && list.contains("applied"),
        "{list}"
    );

    // `list` only reads: the guest's arena and patched code, and the journal, are byte-identical
    // after it, and it does not even need the gdbstub to answer.
    let journal = state.join("patches.journal");
    let journal_before = std::fs::read(&journal).expect("read journal");
    let arena_before = guest_hash(&q);
    let listed: serde_json::Value =
        serde_json::from_slice(&run(target(&["patch", "list", "--json"])).stdout)
            .expect("list --json is JSON");
    assert_eq!(
        listed.pointer("/patches/0/id").and_then(|v| v.as_str()),
        Some(id.as_str()),
        "{listed}"
    );
    assert_eq!(
        guest_hash(&q),
        arena_before,
        "`patch list` changed guest memory"
    );
    assert_eq!(
        std::fs::read(&journal).expect("read journal"),
        journal_before,
        "`patch list` changed the journal"
    );
    let offline: Vec<String> = target(&["patch", "list"])
        .into_iter()
        .map(|a| {
            if a == gdb {
                "127.0.0.1:9".to_string()
            } else {
                a
            }
        })
        .collect();
    assert!(stdout(&run(offline)).contains(&id[..16]));

    // Exit statuses: an unknown patch id is "not found" (6).
    let args = target(&["patch", "revert", "abcdef12"]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_eq!(cli_output(&refs).status.code(), Some(6));

    let reverted = stdout(&run(target(&["patch", "revert", &id[..8]])));
    assert!(reverted.starts_with("reverted "), "{reverted}");
    wait_all(&q, false, "v1 after the revert");
    assert_text_is_original(&q, "after the revert through QEMU");

    // Refused: a micropatch whose expected bytes are not the guest's. Nothing changes.
    let (compute, bytes) = integration_tests::patching::elf_symbol(GuestBuild::V1, "compute");
    let mut wrong = bytes[..8].to_vec();
    wrong[0] ^= 0xff;
    let bad = dir.path().join("bad.hpatch");
    std::fs::write(
        &bad,
        signed(&micropatch("wrong-bytes", "compute", 0, &wrong, &[0x90; 8])),
    )
    .expect("write bad patch");
    let args = target(&["patch", "apply", bad.to_str().expect("utf-8")]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = cli_output(&refs);
    assert_eq!(out.status.code(), Some(3), "a refused patch exits 3");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("expected"), "{err}");
    assert!(compute > 0);
    assert_text_is_original(&q, "after the refusal");
    wait_all(&q, false, "v1 after the refusal");
    assert!(Path::new(&state).join("patches.journal").exists());
}

/// The halt count of a `guest halted N times, X µs in total (longest Y µs)` line in `out`;
/// fails unless there is one, with at least the attach's halt and one of the blackout, and
/// with numbers that add up.
fn assert_halts_reported(out: &str) -> u64 {
    let line = out
        .lines()
        .find(|l| l.starts_with("guest halted "))
        .unwrap_or_else(|| panic!("no halt report in:\n{out}"));
    let numbers: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .map(|w| w.parse().expect("a number"))
        .collect();
    let [count, total, longest] = numbers[..] else {
        panic!("not a halt report: {line}");
    };
    assert!(count >= 1 && total >= longest && longest > 0, "{line}");
    count
}

/// `vmm ARGS…` with `XDG_RUNTIME_DIR` set to `runtime` (where the backend makes the directory
/// of its own gdbstub), whatever its exit status.
fn cli_in(runtime: &Path, args: &[String]) -> Output {
    Command::new(vmm_bin())
        .args(args)
        .env("XDG_RUNTIME_DIR", runtime)
        .output()
        .expect("spawn vmm")
}

/// Like [`cli_in`], failing the test (with its output) unless the command succeeds.
fn cli_ok(runtime: &Path, args: &[String]) -> String {
    let out = cli_in(runtime, args);
    assert!(
        out.status.success(),
        "vmm {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout(&out)
}

/// The VM has no gdbstub (no `gdb` character device: `query-chardev` and HMP `info chardev`
/// agree), nothing is left in `runtime`, and the guest runs.
fn assert_no_gdbstub(q: &QemuProcess, runtime: &Path, what: &str) {
    let mut qmp = Qmp::connect(q.qmp_path(), IO_TIMEOUT).expect("QMP");
    let devs = qmp.chardevs().expect("query-chardev");
    assert!(
        devs.iter().all(|d| d.label != qemu_backend::GDB_CHARDEV),
        "{what}: a gdbstub remains: {devs:?}"
    );
    let info = qmp.hmp("info chardev").expect("info chardev");
    // QEMU keeps `#chrN: filename=gdb`, the gdbstub's internal monitor (no socket), for good
    // once a gdbstub was started: only a `gdb:` device is a gdbstub.
    assert!(
        !info.lines().any(|l| l.starts_with("gdb:"))
            && !info.contains(runtime.to_str().expect("utf-8")),
        "{what}: a gdbstub remains:\n{info}"
    );
    assert_eq!(qmp.status().expect("query-status"), "running", "{what}");
    let left: Vec<_> = std::fs::read_dir(runtime)
        .expect("read the runtime dir")
        .map(|e| e.expect("entry").path())
        .collect();
    assert!(left.is_empty(), "{what}: left behind: {left:?}");
}

#[test]
fn an_operators_vm_without_gdb_is_patched_with_only_its_qmp_socket() {
    require_kvm();
    let dir = TempDir::new("qemu-qmp-only");
    let q = spawn(&dir, false);
    assert!(q.gdb.is_none());
    let runtime = dir.path().join("runtime");
    std::fs::create_dir(&runtime).expect("runtime dir");
    std::fs::set_permissions(&runtime, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let key = dir.path().join("test.pub");
    std::fs::write(&key, test_public().to_file_text()).expect("write key");
    let patch = dir.path().join("sample.hpatch");
    std::fs::write(&patch, sample_signed()).expect("write patch");
    let path = |p: &Path| p.to_str().expect("utf-8").to_string();
    let state = dir.path().join("state");
    let image = path(test_guest_path(GuestBuild::V1));
    let target = |verb: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["patch"]
            .iter()
            .chain(verb)
            .map(|s| s.to_string())
            .collect();
        v.extend([
            "--qmp".into(),
            path(q.qmp_path()),
            "--image".into(),
            image.clone(),
            "--state-dir".into(),
            path(&state),
            "--trusted-key".into(),
            path(&key),
        ]);
        v
    };

    wait_all(&q, false, "v1 before the patch");
    assert_no_gdbstub(&q, &runtime, "before the apply");
    let applied = cli_ok(&runtime, &target(&["apply", &path(&patch)]));
    println!("{applied}");
    assert!(applied.starts_with("applied "), "{applied}");
    let halts = assert_halts_reported(&applied);
    assert!(
        halts >= 2,
        "the attach and the blackout halt at least: {applied}"
    );
    let id = applied.split_whitespace().nth(1).expect("id").to_string();
    wait_all(&q, true, "v2 after the apply with --qmp only");
    assert_no_gdbstub(&q, &runtime, "after the apply");

    // Again, as JSON: already applied, and the halts of this command.
    let again: serde_json::Value = serde_json::from_str(&cli_ok(
        &runtime,
        &target(&["apply", "--json", &path(&patch)]),
    ))
    .expect("apply --json is JSON");
    assert_eq!(again["already_applied"], true, "{again}");
    assert!(again["halts"]["count"].as_u64() >= Some(1), "{again}");
    let listed = cli_ok(&runtime, &target(&["list"]));
    assert!(
        listed.contains(&id[..16]) && listed.contains("applied"),
        "{listed}"
    );
    assert_halts_reported(&listed);
    let listed: serde_json::Value =
        serde_json::from_str(&cli_ok(&runtime, &target(&["list", "--json"])))
            .expect("list --json is JSON");
    assert_eq!(
        listed.pointer("/patches/0/id").and_then(|v| v.as_str()),
        Some(id.as_str())
    );
    assert!(listed["halts"]["total_us"].as_u64() > Some(0), "{listed}");
    assert_no_gdbstub(&q, &runtime, "after list");

    let reverted = cli_ok(&runtime, &target(&["revert", &id[..8]]));
    println!("{reverted}");
    assert!(reverted.starts_with("reverted "), "{reverted}");
    assert_halts_reported(&reverted);
    wait_all(&q, false, "v1 after the revert with --qmp only");
    assert_no_gdbstub(&q, &runtime, "after the revert");
    // The library attaches the same way (under this process's runtime dir): the socket is
    // 0600 in a 0700 directory, and both go with the attachment.
    let guest = q.attach().expect("attach with QMP only");
    let socket = guest.own_gdbstub().expect("a gdbstub of our own");
    let sock_dir = socket.parent().expect("its directory").to_path_buf();
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&socket), 0o600, "{}", socket.display());
    assert_eq!(mode(&sock_dir), 0o700, "{}", sock_dir.display());
    drop(guest);
    assert!(!sock_dir.exists(), "{} is left", sock_dir.display());
    assert_text_is_original(&q, "after the revert with --qmp only");
    assert_no_gdbstub(&q, &runtime, "after the text check");

    // A refused patch (expected bytes not the guest's) cleans up as well.
    let (_, bytes) = integration_tests::patching::elf_symbol(GuestBuild::V1, "compute");
    let mut wrong = bytes[..8].to_vec();
    wrong[0] ^= 0xff;
    let bad = dir.path().join("bad.hpatch");
    std::fs::write(
        &bad,
        signed(&micropatch("wrong-bytes", "compute", 0, &wrong, &[0x90; 8])),
    )
    .expect("write bad patch");
    let out = cli_in(&runtime, &target(&["apply", &path(&bad)]));
    assert_eq!(out.status.code(), Some(3), "a refused patch exits 3");
    assert_no_gdbstub(&q, &runtime, "after a refused apply");
    wait_all(&q, false, "v1 after the refusal");
}

#[test]
fn a_qmp_socket_held_by_another_client_is_reported_plainly() {
    require_kvm();
    let dir = TempDir::new("qemu-qmp-held");
    let q = spawn(&dir, false);
    let runtime = dir.path().join("runtime");
    std::fs::create_dir(&runtime).expect("runtime dir");
    let qmp = q.qmp_path().to_str().expect("utf-8").to_string();
    let patch = dir.path().join("sample.hpatch");
    std::fs::write(&patch, sample_signed()).expect("write patch");
    let args: Vec<String> = [
        "patch",
        "apply",
        "--qmp",
        &qmp,
        "--image",
        test_guest_path(GuestBuild::V1).to_str().expect("utf-8"),
        "--state-dir",
        dir.path().join("state").to_str().expect("utf-8"),
        "--allow-unsigned",
        patch.to_str().expect("utf-8"),
    ]
    .map(str::to_string)
    .to_vec();
    let mut other = Qmp::connect(q.qmp_path(), IO_TIMEOUT).expect("the other client");
    let t = Instant::now();
    let out = cli_in(&runtime, &args);
    let err = String::from_utf8_lossy(&out.stderr);
    println!("after {:?}: {err}", t.elapsed());
    assert_eq!(out.status.code(), Some(4), "busy: {err}");
    assert!(
        err.contains(&format!("QMP socket {qmp} is held by another client"))
            && err.contains("Close the other client"),
        "{err}"
    );
    // The other client was not disturbed, and nothing was started.
    assert_eq!(
        other.status().expect("the other client still works"),
        "running"
    );
    drop(other);
    assert_no_gdbstub(&q, &runtime, "after the busy refusal");
}
