//! The patch journal (`--state-dir`): it outlives a killed VMM and tells the operator what
//! became of each patch, it belongs to one VMM at a time, and an apply cut short half-way is
//! repaired when the engine starts again.

use std::path::Path;
use std::time::{Duration, Instant};

use control_api::client::ApiClient;
use guest_control::GuestControl;
use integration_tests::patching::*;
use integration_tests::{TempDir, VmmProcess, cli, require_kvm, stdout};
use patch_engine::journal::{Journal, PatchState};
use serde_json::Value;

fn run_vmm(sock: &Path, key: &Path, state: &Path) -> VmmProcess {
    VmmProcess::spawn(&[
        "run",
        "--vcpus",
        "1",
        "--memory",
        "32",
        "--cmdline",
        "cpus=1 batch=1000000",
        "--api-sock",
        sock.to_str().expect("utf8"),
        "--trusted-key",
        key.to_str().expect("utf8"),
        "--state-dir",
        state.to_str().expect("utf8"),
    ])
}

/// Waits until the API answers (the killed VMM's socket file may still be there).
fn wait_for_api(sock: &Path, vmm: &mut VmmProcess) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while ApiClient::new(sock).status().is_err() {
        if let Some(status) = vmm.child.try_wait().expect("try_wait") {
            panic!(
                "vmm exited ({status}) before serving its API:\n{}",
                vmm.stderr()
            );
        }
        assert!(
            Instant::now() < deadline,
            "the API never answered on {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits until vCPU 0's newest report (through the API) satisfies `pred`.
fn wait_report(sock: &Path, what: &str, pred: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = ApiClient::new(sock).status().expect("GET /v1/vm");
        let last = &status["vcpu"][0]["reports"]["last"];
        if !last.is_null() && pred(last) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not seen within 20 s; last report {last}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn journal_survives_kill_9_and_the_state_dir_has_one_owner() {
    require_kvm();
    let dir = TempDir::new("journal");
    let key = dir.path().join("test.pub");
    std::fs::write(&key, test_public().to_file_text()).expect("write key");
    let file = dir.path().join("sample.hpatch");
    let sample = sample_signed();
    std::fs::write(&file, &sample).expect("write patch");
    let id = patch_id(&sample);
    let state = dir.path().join("state");
    let sock = dir.path().join("api.sock");
    let (sock_s, file_s) = (sock.to_str().expect("utf8"), file.to_str().expect("utf8"));

    let mut first = run_vmm(&sock, &key, &state);
    wait_for_api(&sock, &mut first);
    let out = stdout(&cli(&["patch", "apply", "--api-sock", sock_s, file_s]));
    assert!(out.starts_with(&format!("applied {id}")), "{out}");
    wait_report(&sock, "v2 results after the apply", |r| {
        r["v2"].as_u64() > Some(0) && r["bad"].as_u64() == Some(0)
    });

    // A second VMM on the same state dir is refused while the first one runs.
    let mut second = VmmProcess::spawn(&[
        "run",
        "--memory",
        "16",
        "--api-sock",
        dir.path().join("other.sock").to_str().expect("utf8"),
        "--trusted-key",
        key.to_str().expect("utf8"),
        "--state-dir",
        state.to_str().expect("utf8"),
    ]);
    let status = second.wait(Duration::from_secs(30));
    assert!(!status.success(), "the second vmm started");
    let err = second.stderr();
    assert!(
        err.contains("is in use by another vmm process")
            && err.contains(&format!("pid {}", first.child.id())),
        "expected a clear \"in use\" error naming pid {}:\n{err}",
        first.child.id()
    );
    assert!(!err.contains("panicked"), "{err}");

    // kill -9: no chance to clean up.
    first.child.kill().expect("SIGKILL");
    first.child.wait().expect("reap");

    let mut restarted = run_vmm(&sock, &key, &state);
    wait_for_api(&sock, &mut restarted);
    let list = stdout(&cli(&["patch", "list", "--api-sock", sock_s]));
    assert!(list.contains(&id[..16]), "{list}");
    assert!(list.contains("reverted"), "{list}");
    assert!(
        list.contains(
            "note: the guest holds the original bytes at every site (the guest was restarted"
        ),
        "{list}"
    );
    let json: Value =
        serde_json::from_slice(&cli(&["patch", "list", "--api-sock", sock_s, "--json"]).stdout)
            .expect("list --json");
    let patches = json["patches"].as_array().expect("patches");
    assert_eq!(patches.len(), 1, "{json}");
    assert_eq!(patches[0]["id"], id.as_str());
    assert_eq!(patches[0]["state"], "reverted");
    // The restarted guest runs v1, and the patch applies again.
    wait_report(&sock, "v1 results in the restarted guest", |r| {
        r["v2"].as_u64() == Some(0) && r["v1"].as_u64() > Some(0)
    });
    let out = stdout(&cli(&["patch", "apply", "--api-sock", sock_s, file_s]));
    assert!(out.starts_with(&format!("applied {id}")), "{out}");
    restarted.signal(libc::SIGTERM);
    restarted.wait(Duration::from_secs(30));
}

#[test]
fn an_apply_interrupted_half_way_is_undone_on_restart() {
    let vm = boot(2, 32, "cpus=2 batch=1000000", false);
    let dir = TempDir::new("half-applied");
    let sample = sample_signed();
    let id = patch_id(&sample);
    wait_phase(&vm, "v1 results", all_v1, 1, Duration::from_secs(20));

    // The writes a crash would have left: the arena code and the jump of the first site, and
    // the record saying the apply had begun. Made with the engine's own apply, then the second
    // site put back and the journal record rewound to `applying`.
    let mut rec = {
        let mut engine = engine(&vm, Some(dir.path()));
        engine.apply(&sample).expect("apply").patch
    };
    assert_eq!(rec.sites.len(), 2);
    let (written, unwritten) = (&rec.sites[0], &rec.sites[1]);
    vm.pause().expect("pause");
    vm.write_phys(unwritten.gpa, &unwritten.original)
        .expect("undo the second site");
    vm.resume().expect("resume");
    assert_eq!(
        read(&vm, written.gpa, written.patched.len()),
        written.patched
    );
    rec.state = PatchState::Applying;
    rec.applied_at = None;
    rec.apply_blackout_us = None;
    {
        let (mut journal, _) = Journal::open(dir.path()).expect("journal");
        journal.put(rec.clone()).expect("record `applying`");
    }

    // The engine starting on that state dir puts every original byte back.
    let engine = engine(&vm, Some(dir.path()));
    assert_text_is_original(&vm, "after recovery");
    let r = engine.find(&id).expect("the record");
    assert_eq!(r.state, PatchState::Failed, "{r:?}");
    let note = r.note.clone().unwrap_or_default();
    assert!(
        note.contains("interrupted") && note.contains("restored to their original bytes"),
        "{note}"
    );
    // Durably so.
    drop(engine);
    let (journal, recovery) = Journal::open(dir.path()).expect("journal");
    assert!(recovery.interrupted.is_empty(), "{recovery:?}");
    assert_eq!(journal.get(&id).map(|r| r.state), Some(PatchState::Failed));
    drop(journal);
    // The guest computes v1 again, every result right.
    wait_phase(
        &vm,
        "v1 results after recovery",
        all_v1,
        2,
        Duration::from_secs(20),
    );
    assert_running(&vm, "at the end");
    stop(&vm);
}
