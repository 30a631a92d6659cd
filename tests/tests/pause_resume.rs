//! 1,000 pause/resume cycles through the API socket while the guest works: progress continues,
//! no wrong result, no console line lost or duplicated.

use std::time::{Duration, Instant};

use control_api::client::ApiClient;
use integration_tests::*;

fn calls(status: &serde_json::Value) -> Vec<u64> {
    status["vcpu"]
        .as_array()
        .expect("vcpu array")
        .iter()
        .map(|c| {
            c.pointer("/reports/last/calls")
                .and_then(|v| v.as_u64())
                .unwrap_or(0)
        })
        .collect()
}

fn wait_progress(api: &ApiClient, since: &[u64]) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = calls(&api.status().expect("status"));
        if now.iter().zip(since).all(|(a, b)| a > b) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "guest stopped making progress: {since:?} → {now:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn thousand_pause_resume_cycles_while_the_guest_runs() {
    require_kvm();
    let dir = TempDir::new("pause");
    let sock = dir.path().join("api.sock");
    let sock_s = sock.to_str().expect("utf8");
    let mut vmm = VmmProcess::spawn(&[
        "run",
        "--vcpus",
        "2",
        "--api-sock",
        sock_s,
        "--cmdline",
        "batch=200000",
    ]);
    wait_for_socket(&sock, &mut vmm);
    // Socket is private to its owner.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "API socket mode {mode:o}");

    let api = ApiClient::new(&sock);
    let mut progress = wait_progress(&api, &[0, 0]);
    for cycle in 0..1000 {
        let p = api.pause().expect("pause");
        assert_eq!(p["state"], "paused");
        // Paused: every vCPU is parked and its registers were snapshotted.
        if cycle % 100 == 0 {
            let st = api.status().expect("status");
            assert_eq!(st["state"], "paused");
            for cpu in st["vcpu"].as_array().expect("vcpus") {
                assert_eq!(cpu["phase"], "parked");
                assert!(
                    cpu.pointer("/regs/rip").and_then(|v| v.as_str()).is_some(),
                    "{cpu}"
                );
            }
            // Nothing runs while paused.
            let frozen = calls(&st);
            std::thread::sleep(Duration::from_millis(30));
            assert_eq!(
                calls(&api.status().expect("status")),
                frozen,
                "guest ran while paused"
            );
        }
        let r = api.resume().expect("resume");
        assert_eq!(r["state"], "running");
        if cycle % 100 == 99 {
            progress = wait_progress(&api, &progress);
        }
    }
    // Double pause/resume are refused with a clear error and change nothing.
    let err = api.resume().expect_err("resume while running");
    assert!(err.to_string().contains("not paused"), "{err}");

    let metrics = api.metrics().expect("metrics");
    assert_eq!(
        metrics.pointer("/pause/pauses").and_then(|v| v.as_u64()),
        Some(1000)
    );

    let status = api.status().expect("status");
    vmm.signal(libc::SIGTERM);
    let exit = vmm.wait(Duration::from_secs(30));
    assert!(!exit.success() || exit.code() == Some(0), "{exit}");
    let mut lines = vmm.lines();
    // The VM was stopped by a signal, possibly mid-line: the VMM flushes that partial line, which
    // is not a report to check.
    lines.pop();
    let by_vcpu = reports_by_vcpu(&lines);
    assert_eq!(by_vcpu.len(), 2);
    for (i, cpu) in status["vcpu"].as_array().expect("vcpus").iter().enumerate() {
        assert_eq!(
            cpu.pointer("/reports/seq_errors").and_then(|v| v.as_u64()),
            Some(0),
            "{cpu}"
        );
        assert_eq!(
            cpu.pointer("/reports/invalid").and_then(|v| v.as_u64()),
            Some(0),
            "{cpu}"
        );
        let seen = cpu
            .pointer("/reports/count")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        let console = by_vcpu
            .get(&(i as u64))
            .map(|v| v.len() as u64)
            .unwrap_or(0);
        assert!(
            console >= seen,
            "vCPU {i}: {seen} reports on the port but {console} console lines"
        );
    }
    for (vcpu, reports) in &by_vcpu {
        assert_contiguous(*vcpu, reports);
        assert!(
            reports.len() >= 10,
            "vCPU {vcpu} sent only {} reports",
            reports.len()
        );
        for r in reports {
            assert_eq!(r.bad, 0, "wrong result on vCPU {vcpu}: {r:?}");
            assert_eq!(r.y, guest_tools::reference::compute_v1(r.x));
        }
    }
}
