//! Patching through the real `vmm` binary: its control API (a raw HTTP request as curl sends
//! it, and the API client) and the `vmm patch apply|list|revert` CLI.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use control_api::client::ApiClient;
use integration_tests::patching::*;
use integration_tests::{TempDir, VmmProcess, cli, require_kvm, stdout, wait_for_socket};
use serde_json::Value;

/// `curl --unix-socket SOCK --data-binary @FILE http://localhost/v1/patches`, byte for byte
/// the request curl 8 sends. Returns the status and the JSON body.
fn curl_post(sock: &Path, body: &[u8]) -> (u16, Value) {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let head = format!(
        "POST /v1/patches HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\nContent-Length: {}\r\nContent-Type: application/x-www-form-urlencoded\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("send head");
    s.write_all(body).expect("send body");
    // One response; the server keeps the connection open (HTTP/1.1), so read by Content-Length.
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).expect("read response");
        assert!(n > 0, "connection closed mid-response");
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).into_owned();
        let Some(end) = text.find("\r\n\r\n") else {
            continue;
        };
        let headers = text[..end].to_ascii_lowercase();
        let len: usize = headers
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse().expect("content-length"))
            .expect("a Content-Length header");
        if raw.len() < end + 4 + len {
            continue;
        }
        let status: u16 = text[9..12].parse().expect("status code");
        assert!(text.starts_with("HTTP/1.1 "), "{text}");
        let body = serde_json::from_slice(&raw[end + 4..end + 4 + len]).expect("JSON body");
        return (status, body);
    }
}

/// Waits until every vCPU (seen through `GET /v1/vm`) has reported a whole batch, begun after
/// this call, in which every result counted as `field` ("v1" or "v2").
fn wait_batch(sock: &Path, field: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let last = || -> Vec<Value> {
        let status = ApiClient::new(sock).status().expect("GET /v1/vm");
        status["vcpu"]
            .as_array()
            .expect("vcpu")
            .iter()
            .map(|v| v["reports"]["last"].clone())
            .collect()
    };
    let get = |r: &Value, k: &str| r[k].as_u64().unwrap_or(0);
    let start = last();
    let mut prev: Vec<Option<Value>> = vec![None; start.len()];
    let mut done = vec![false; start.len()];
    while !done.iter().all(|&d| d) {
        for (i, r) in last().into_iter().enumerate() {
            if r.is_null() || get(&r, "seq") == get(&start[i], "seq") {
                continue;
            }
            if let Some(p) = &prev[i]
                && get(&r, "seq") > get(p, "seq")
            {
                let calls = get(&r, "calls") - get(p, "calls");
                assert_eq!(get(&r, "bad"), get(p, "bad"), "wrong results: {r}");
                done[i] |= calls > 0 && get(&r, field) - get(p, field) == calls;
            }
            prev[i] = Some(r);
        }
        assert!(
            Instant::now() < deadline,
            "no all-{field} batch on every vCPU within 20 s: {prev:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn patching_through_the_api_and_the_cli() {
    require_kvm();
    let dir = TempDir::new("patch-api");
    let key = dir.path().join("test.pub");
    std::fs::write(&key, test_public().to_file_text()).expect("write key");
    let sample = sample_signed();
    let id = patch_id(&sample);
    let file = dir.path().join("sample.hpatch");
    std::fs::write(&file, &sample).expect("write patch");
    let sock = dir.path().join("api.sock");
    let (sock_s, file_s) = (sock.to_str().expect("utf8"), file.to_str().expect("utf8"));
    let mut vmm = VmmProcess::spawn(&[
        "run",
        "--vcpus",
        "2",
        "--memory",
        "32",
        "--cmdline",
        "cpus=2 batch=1000000",
        "--api-sock",
        sock_s,
        "--trusted-key",
        key.to_str().expect("utf8"),
    ]);
    wait_for_socket(&sock, &mut vmm);
    let api = ApiClient::new(&sock);

    // Apply as curl would; the same file again is a no-op that says so.
    let (status, v) = curl_post(&sock, &sample);
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["already_applied"], false);
    assert_eq!(v["patch"]["id"], id.as_str());
    assert_eq!(v["patch"]["state"], "applied");
    assert_eq!(v["patch"]["sites"].as_array().map(Vec::len), Some(2));
    let (status, v) = api.raw("POST", "/v1/patches", &sample).expect("POST");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["already_applied"], true);
    assert_eq!(v["patch"]["id"], id.as_str());
    let out = stdout(&cli(&["patch", "apply", "--api-sock", sock_s, file_s]));
    assert!(out.starts_with(&format!("already applied: {id}")), "{out}");
    wait_batch(&sock, "v2");

    // Refusals, each with its status.
    let unsigned = sample_patch().to_file_unsigned().expect("encode");
    let (status, v) = api.raw("POST", "/v1/patches", &unsigned).expect("POST");
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["kind"], "signature");
    assert!(
        v["fault_message"]
            .as_str()
            .unwrap_or("")
            .contains("unsigned"),
        "{v}"
    );
    let (status, v) = api
        .raw("POST", "/v1/patches", b"this is not a patch")
        .expect("POST");
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["kind"], "malformed");
    let (status, v) = api.raw("POST", "/v1/patches", b"").expect("POST");
    assert_eq!(status, 400, "{v}");
    let unknown = "0123456789abcdef".repeat(4);
    let (status, v) = api
        .raw("POST", &format!("/v1/patches/{unknown}/revert"), b"")
        .expect("POST");
    assert_eq!(status, 404, "{v}");
    assert!(
        v["fault_message"]
            .as_str()
            .unwrap_or("")
            .contains("no patch"),
        "{v}"
    );

    assert_eq!(v["kind"], "not_found", "{v}");
    // DELETE without an id used to panic the API thread; after it nothing was answered.
    for url in ["/v1/patches", "/v1/patches/", "/v1/patches?x"] {
        let (status, v) = api.raw("DELETE", url, b"").expect("DELETE");
        assert_eq!(status, 405, "DELETE {url}: {v}");
        assert_eq!(v["kind"], "method_not_allowed", "{v}");
    }
    let version = api.version().expect("the server still answers");
    assert_eq!(version["patching_enabled"], true, "{version}");
    assert_eq!(
        version["patch_format_versions"],
        serde_json::json!([1, 2]),
        "{version}"
    );

    let m = api.metrics().expect("metrics");
    let p = &m["patches"];
    assert!(p.is_object(), "/v1/metrics has no patches object: {m}");
    assert_eq!(p["applied"], 1, "{p}");
    assert_eq!(p["applies"], 1, "{p}");
    // The unsigned file and the garbage (the empty body never reaches the engine).
    assert_eq!(p["refused"], 2, "{p}");
    assert!(p["apply_blackout_us"].is_object(), "{p}");

    // The CLI: list, revert by prefix, list, apply again.
    let list = stdout(&cli(&["patch", "list", "--api-sock", sock_s]));
    assert!(
        list.contains(&id[..16]) && list.contains("applied"),
        "{list}"
    );
    let out = stdout(&cli(&["patch", "revert", "--api-sock", sock_s, &id[..8]]));
    assert!(out.starts_with(&format!("reverted {id}")), "{out}");
    wait_batch(&sock, "v1");
    let json: Value =
        serde_json::from_slice(&cli(&["patch", "list", "--api-sock", sock_s, "--json"]).stdout)
            .expect("list --json");
    assert_eq!(json["patches"][0]["state"], "reverted", "{json}");
    let (status, v) = api
        .raw("POST", &format!("/v1/patches/{id}/revert"), b"")
        .expect("POST");
    assert_eq!(status, 409, "reverting a reverted patch: {v}");
    let out = stdout(&cli(&["patch", "apply", "--api-sock", sock_s, file_s]));
    assert!(out.starts_with(&format!("applied {id}")), "{out}");
    wait_batch(&sock, "v2");

    let status = api.status().expect("status");
    for v in status["vcpu"].as_array().expect("vcpu") {
        assert_eq!(v["reports"]["last"]["bad"], 0, "{v}");
    }
    assert_eq!(status["state"], "running", "{status}");
    vmm.signal(libc::SIGTERM);
    vmm.wait(Duration::from_secs(30));
}
