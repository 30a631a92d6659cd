//! `vmm bench linux`: the blackout of the C fix for `version_proc_show` applied to and reverted
//! from the stock Debian kernel under QEMU (TCG here), against the backend's own pause → resume
//! floor, interleaved.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use patch_format::SecretKey;
use serde::Serialize;

use super::HostInfo;
use crate::demo_linux;
use guest_control::GuestControl;
use guest_control::stats::{Summary, summarize};
use linux_guest::attach::KernelImage;
use patch_engine::EngineConfig;

#[derive(Debug, Clone, Serialize)]
pub struct LinuxReport {
    pub benchmark: &'static str,
    pub host: HostInfo,
    pub accel: &'static str,
    pub kernel: String,
    pub cycles: usize,
    pub floor_us: Summary,
    pub apply_us: Summary,
    pub revert_us: Summary,
}

/// A fix built elsewhere: its signed file and the key that verifies it. Where no C compiler
/// is (inside the nested tier's L1) the fix comes built from the host, which also makes both
/// sides of `vmm bench linux-vmm` apply the very same file.
pub struct Prebuilt {
    pub file: Vec<u8>,
    pub key: patch_format::PublicKey,
}

pub fn run(
    kernel: &Path,
    busybox: &Path,
    accel: &'static str,
    cycles: usize,
    prebuilt: Option<Prebuilt>,
    host: HostInfo,
) -> anyhow::Result<LinuxReport> {
    // Removed when dropped, after QEMU and the engine that use it (declared before them).
    let tmp = tempfile::Builder::new()
        .prefix("vmm-bench-linux-")
        .tempdir()?;
    let dir = tmp.path().to_path_buf();
    let image = KernelImage::from_file(kernel)?;
    let mut q = demo_linux::boot(&dir, kernel, busybox, accel)?;
    demo_linux::wait_booted(&mut q)?;
    let (file, trusted) = match prebuilt {
        Some(p) => (p.file, p.key),
        None => {
            let key = SecretKey::generate()?;
            (demo_linux::version_fix(&dir, &image, &key)?.1, key.public())
        }
    };
    let guest = Arc::new(q.attach()?);
    let config = EngineConfig {
        trusted_keys: vec![trusted],
        ..Default::default()
    };
    let mut engine = demo_linux::engine(guest.clone(), &image, config, &dir.join("state"))?;
    let (mut floor, mut apply, mut revert) = (Vec::new(), Vec::new(), Vec::new());
    let gap = Duration::from_millis(20);
    for _ in 0..cycles {
        guest.pause_all()?;
        floor.push(guest.resume_all()?.as_micros() as u64);
        std::thread::sleep(gap);
        let a = engine.apply(&file)?;
        apply.push(a.patch.apply_blackout_us.unwrap_or(0));
        std::thread::sleep(gap);
        let r = engine.revert(&a.patch.id)?;
        revert.push(r.revert_blackout_us.unwrap_or(0));
        std::thread::sleep(gap);
    }
    drop(engine);
    drop(q);
    drop(tmp);
    Ok(LinuxReport {
        benchmark: "linux",
        host,
        accel,
        kernel: image.banner.trim_end().to_string(),
        cycles,
        floor_us: summarize(&floor),
        apply_us: summarize(&apply),
        revert_us: summarize(&revert),
    })
}

pub fn table(r: &LinuxReport) -> String {
    let mut t = format!(
        "Stock kernel under QEMU ({}), version_proc_show fix from C, {} cycles (µs):\n",
        r.accel, r.cycles
    );
    t.push_str("| blackout                                  | p50     | p99     | max     |\n");
    t.push_str("|-------------------------------------------|---------|---------|---------|\n");
    for (name, s) in [
        ("apply", &r.apply_us),
        ("revert", &r.revert_us),
        ("QEMU backend pause → resume (floor)", &r.floor_us),
    ] {
        t.push_str(&format!(
            "| {name:<41} | {:>7} | {:>7} | {:>7} |\n",
            s.p50, s.p99, s.max
        ));
    }
    t
}
