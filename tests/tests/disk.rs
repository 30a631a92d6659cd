//! `vmm run --disk`: bad disk images are refused with a clear message and a non-zero exit
//! (never a panic), before any guest runs; a good one is served while the built-in guest,
//! which does not use it, runs to completion.

use std::path::Path;
use std::process::Output;

use integration_tests::*;

fn utf8(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

fn assert_refused(out: &Output, expect: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "vmm succeeded:\n{stderr}");
    assert_ne!(out.status.code(), Some(101), "a panic:\n{stderr}");
    assert!(!stderr.contains("panicked"), "a panic:\n{stderr}");
    assert!(stderr.contains(expect), "expected {expect:?} in:\n{stderr}");
}

#[test]
fn a_missing_disk_image_is_refused_as_not_found() {
    let dir = TempDir::new("disk-missing");
    let missing = dir.path().join("nope.img");
    let out = cli_output(&["run", "--disk", utf8(&missing)]);
    assert_refused(&out, "does not exist");
    assert_refused(&out, utf8(&missing));
    // Exit status 6: a file named on the command line is missing.
    assert_eq!(out.status.code(), Some(6));
    let out = cli_output(&["run", "--disk", &format!("{},ro", utf8(&missing))]);
    assert_refused(&out, "does not exist");
}

#[test]
fn a_directory_is_not_a_disk_image() {
    let dir = TempDir::new("disk-dir");
    let out = cli_output(&["run", "--disk", utf8(dir.path())]);
    assert_refused(&out, "is not a regular file (it is a directory)");
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn a_file_that_cannot_be_opened_for_writing_is_refused_for_a_read_write_disk() {
    // sysfs refuses O_RDWR on a read-only attribute even to root (EACCES), unlike a chmod 0444
    // file, which root may open.
    let path = "/sys/kernel/notes";
    assert!(Path::new(path).is_file(), "{path} is missing on this host");
    let out = cli_output(&["run", "--disk", path]);
    assert_refused(
        &out,
        "cannot open disk image /sys/kernel/notes for reading and writing",
    );
    assert_refused(&out, "append ,ro");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ermission denied") || stderr.contains("os error"),
        "the OS error is reported:\n{stderr}"
    );
}

#[test]
fn a_size_that_is_not_whole_sectors_is_refused() {
    let dir = TempDir::new("disk-size");
    let odd = dir.path().join("odd.img");
    std::fs::write(&odd, vec![0u8; 1000]).expect("write");
    let out = cli_output(&["run", "--disk", utf8(&odd)]);
    assert_refused(&out, "is 1000 bytes, not a non-zero multiple of 512");
    let empty = dir.path().join("empty.img");
    std::fs::write(&empty, []).expect("write");
    let out = cli_output(&["run", "--disk", &format!("{},ro", utf8(&empty))]);
    assert_refused(&out, "is 0 bytes");
    // The file was not changed by the attempt.
    assert_eq!(std::fs::metadata(&odd).expect("stat").len(), 1000);
}

#[test]
fn an_empty_disk_argument_is_a_usage_error() {
    let out = cli_output(&["run", "--disk", ",ro"]);
    assert_refused(&out, "no file named");
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn the_built_in_guest_runs_with_disks_attached() {
    require_kvm();
    let dir = TempDir::new("disk-run");
    let rw = dir.path().join("rw.img");
    let ro = dir.path().join("ro.img");
    let bytes: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 253) as u8).collect();
    std::fs::write(&rw, &bytes).expect("write");
    std::fs::write(&ro, &bytes).expect("write");
    let out = cli_output(&[
        "--log",
        "info",
        "run",
        "--vcpus",
        "1",
        "--cmdline",
        "reports=2",
        "--disk",
        utf8(&rw),
        "--disk",
        &format!("{},ro", utf8(&ro)),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "vmm failed ({}):\n{}{stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    // Both devices were set up, in their windows and on their interrupt lines.
    assert!(
        stderr.contains("virtio-blk device") && stderr.contains("0xd0000000"),
        "{stderr}"
    );
    assert!(stderr.contains("0xd0001000"), "{stderr}");
    // The guest did not touch them: the images are as they were.
    assert_eq!(std::fs::read(&rw).expect("read"), bytes);
    assert_eq!(std::fs::read(&ro).expect("read"), bytes);
}
