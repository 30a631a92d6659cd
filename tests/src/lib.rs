//! Helpers shared by the integration tests: find and spawn the `vmm` binary, collect the guest
//! console, parse the test guest's report lines, talk to the API.
//!
//! The tests drive the real binary (not the library) so that exit codes, messages and the CLI
//! are what users get. Build it first: `cargo build --workspace --bins` (scripts/test does).
//! The patch engine's tests also drive the library in-process, for precise assertions
//! ([`patching`]).

pub mod linux;
pub mod nested;
pub mod patching;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The `vmm` binary next to the test executable (target/<profile>/vmm), or `$VMM_BIN`.
pub fn vmm_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("VMM_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = profile_dir.join("vmm");
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build --workspace --bins` (scripts/test does this)",
        bin.display()
    );
    bin
}

/// KVM tests must never pass silently without KVM: they fail, saying why.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: these integration tests boot real guests and need KVM"
    );
}

/// A fresh directory under the system temp dir (`vmm-test-{tag}-…`), removed on drop.
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("vmm-test-{tag}-"))
            .tempdir()
            .expect("temp dir");
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// A running `vmm` process with its stdout lines collected.
pub struct VmmProcess {
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
}

impl VmmProcess {
    pub fn spawn(args: &[&str]) -> Self {
        let mut child = Command::new(vmm_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmm");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l.lock().expect("lines").push(line);
            }
        });
        let e = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = e.lock().expect("stderr");
                s.push_str(&line);
                s.push('\n');
            }
        });
        VmmProcess {
            child,
            lines,
            stderr,
        }
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr").clone()
    }

    /// Waits for the process to exit, killing it after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Let the reader threads drain the pipes.
                std::thread::sleep(Duration::from_millis(100));
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "vmm did not exit within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                    self.lines().join("\n"),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits until `pred` holds for the collected lines.
    pub fn wait_for_lines(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&[String]) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while !pred(&self.lines()) {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "vmm exited ({status}) before {what}\nstdout:\n{}\nstderr:\n{}",
                    self.lines().join("\n"),
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\nstdout:\n{}\nstderr:\n{}",
                self.lines().join("\n"),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One `hp: vcpu=… seq=…` report line of the test guest (grammar in docs/guest-protocol.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportLine {
    pub vcpu: u64,
    pub seq: u64,
    pub calls: u64,
    pub v1: u64,
    pub v2: u64,
    pub bad: u64,
    pub x: u64,
    pub y: u64,
}

pub fn parse_report(line: &str) -> Option<ReportLine> {
    let rest = line.strip_prefix("hp: ")?;
    let mut fields = BTreeMap::new();
    for kv in rest.split_whitespace() {
        let (k, v) = kv.split_once('=')?;
        fields.insert(k, v.parse::<u64>().ok()?);
    }
    let g = |k: &str| fields.get(k).copied();
    Some(ReportLine {
        vcpu: g("vcpu")?,
        seq: g("seq")?,
        calls: g("calls")?,
        v1: g("v1")?,
        v2: g("v2")?,
        bad: g("bad")?,
        x: g("x")?,
        y: g("y")?,
    })
}

/// Report lines grouped by vCPU, in console order.
pub fn reports_by_vcpu(lines: &[String]) -> BTreeMap<u64, Vec<ReportLine>> {
    let mut m: BTreeMap<u64, Vec<ReportLine>> = BTreeMap::new();
    for r in lines.iter().filter_map(|l| parse_report(l)) {
        m.entry(r.vcpu).or_default().push(r);
    }
    m
}

/// Asserts a vCPU's reports are exactly seq 1, 2, … n: nothing lost, nothing duplicated.
pub fn assert_contiguous(vcpu: u64, reports: &[ReportLine]) {
    for (i, r) in reports.iter().enumerate() {
        assert_eq!(
            r.seq,
            i as u64 + 1,
            "vCPU {vcpu}: report {i} has seq {} (lost or duplicated console output)",
            r.seq
        );
    }
}

/// Waits for the API socket to appear.
pub fn wait_for_socket(path: &Path, proc_: &mut VmmProcess) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        if let Some(status) = proc_.child.try_wait().expect("try_wait") {
            panic!(
                "vmm exited ({status}) before creating its socket:\n{}",
                proc_.stderr()
            );
        }
        assert!(Instant::now() < deadline, "API socket never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `vmm ARGS…` to completion and fails the test, with its output, unless it succeeds.
pub fn cli(args: &[&str]) -> Output {
    let out = Command::new(vmm_bin())
        .args(args)
        .output()
        .expect("spawn vmm");
    assert!(
        out.status.success(),
        "vmm {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `vmm ARGS` and returns its output whatever its exit status (for refusals).
pub fn cli_output(args: &[&str]) -> Output {
    Command::new(vmm_bin())
        .args(args)
        .output()
        .expect("spawn vmm")
}

/// A command's standard output as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
