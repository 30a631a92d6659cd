//! `vmm bench qemu`: the same patch on the same test guest, applied and reverted through this
//! VMM and through the QEMU backend (QEMU `-enable-kvm`, gdbstub + QMP), side by side in one
//! run, with the peers' own floors: QMP `stop`→`cont` and a bare gdbstub halt→continue.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::{BenchError, HostInfo};
use crate::qemu_launch::{LaunchOptions, QemuProcess};
use crate::sample;
use guest_control::GuestControl;
use guest_control::stats::{Summary, summarize};
use kvm_vmm::vm::{ConsoleSink, Vm, VmConfig};
use patch_engine::arena::ArenaWindow;
use patch_engine::{Engine, EngineConfig};
use qemu_backend::{Qmp, Rsp};

#[derive(Debug, Clone, Serialize)]
pub struct QemuReport {
    pub benchmark: &'static str,
    pub host: HostInfo,
    pub cycles: usize,
    pub qemu_accel: &'static str,
    /// This VMM: apply and revert blackouts of the v1 → v2 sample (µs).
    pub vmm_apply_us: Summary,
    pub vmm_revert_us: Summary,
    /// This VMM's plain pause → resume (the floor of its blackouts).
    pub vmm_floor_us: Summary,
    /// The QEMU backend: the same patch file, the same guest image.
    pub qemu_apply_us: Summary,
    pub qemu_revert_us: Summary,
    /// The QEMU backend's plain pause → resume (halt, read every vCPU's registers, continue).
    pub qemu_floor_us: Summary,
    /// QMP `stop` sent → `cont` answered.
    pub qmp_stop_cont_us: Summary,
    /// gdbstub halt (0x03 → stop reply) → continue sent.
    pub gdb_halt_cont_us: Summary,
}

fn setup(what: &str) -> impl Fn(String) -> BenchError + '_ {
    move |e| BenchError::Setup(format!("{what}: {e}"))
}

/// An error and its causes on one line (`a: b: c`), for messages that keep only a string.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Blackouts of one backend, µs.
struct Cycles {
    floor: Vec<u64>,
    apply: Vec<u64>,
    revert: Vec<u64>,
}

/// Apply/revert cycles, each with a plain pause → resume of the same backend first (its floor,
/// interleaved so host noise hits both alike). Returns (floor, apply, revert) blackouts in µs.
fn cycles_on<G: GuestControl>(
    guest: &G,
    engine: &mut Engine<G>,
    cycles: usize,
    gap: Duration,
) -> Result<Cycles, BenchError> {
    let (mut floor, mut apply, mut revert) = (Vec::new(), Vec::new(), Vec::new());
    for cycle in 0..cycles {
        guest
            .pause_all()
            .map_err(|e| BenchError::Setup(format!("pause in cycle {cycle}: {e}")))?;
        let b = guest
            .resume_all()
            .map_err(|e| BenchError::Setup(format!("resume in cycle {cycle}: {e}")))?;
        floor.push(b.as_micros() as u64);
        std::thread::sleep(gap);
        let out = engine
            .apply(sample::SAMPLE_PATCH)
            .map_err(|e| BenchError::Setup(format!("apply in cycle {cycle}: {e}")))?;
        apply.push(out.patch.apply_blackout_us.unwrap_or(0));
        std::thread::sleep(gap);
        let r = engine
            .revert(&out.patch.id)
            .map_err(|e| BenchError::Setup(format!("revert in cycle {cycle}: {e}")))?;
        revert.push(r.revert_blackout_us.unwrap_or(0));
        std::thread::sleep(gap);
    }
    Ok(Cycles {
        floor,
        apply,
        revert,
    })
}

pub fn run(cycles: usize, host: HostInfo) -> Result<QemuReport, BenchError> {
    let gap = Duration::from_millis(2);
    // Removed when dropped, after the engines and QEMU that use it (declared before them).
    let scratch_dir = tempfile::Builder::new()
        .prefix("vmm-bench-qemu-")
        .tempdir()
        .map_err(BenchError::TempDir)?;
    let scratch = scratch_dir.path().to_path_buf();
    let config = || EngineConfig {
        trusted_keys: vec![sample::demo_key()],
        ..Default::default()
    };
    let image = guest_tools::test_guest(guest_tools::GuestBuild::V1);

    // This VMM.
    let mut vm_config = VmConfig::builtin(1, 64, "batch=2000000");
    vm_config.console = ConsoleSink::Discard;
    let vm = Vm::start(vm_config)?;
    let mut engine = sample::engine_for(
        vm.clone(),
        "built-in test guest",
        image,
        config(),
        Some(&scratch.join("vmm-state")),
    )?;
    let own = cycles_on(vm.as_ref(), &mut engine, cycles, gap)?;
    drop(engine);
    vm.request_stop(kvm_vmm::devices::StopReason::Requested(
        "benchmark done".into(),
    ));
    vm.join();

    // QEMU, the same image and patch.
    let q = QemuProcess::spawn(&LaunchOptions {
        kernel: guest_tools::test_guest_path(guest_tools::GuestBuild::V1).to_path_buf(),
        initrd: None,
        append: "batch=2000000".into(),
        memory_mib: 2048,
        vcpus: 1,
        cpu: None,
        accel: "kvm",
        gdb: true,
        dir: scratch.join("qemu"),
    })
    .map_err(|e| setup("starting QEMU")(chain(&e)))?;
    let mut qmp = Qmp::connect(q.qmp_path(), qemu_backend::IO_TIMEOUT)
        .map_err(|e| setup("QMP")(chain(&e)))?;
    let mut qmp_floor = Vec::new();
    for _ in 0..cycles {
        let t = Instant::now();
        qmp.stop().map_err(|e| setup("QMP stop")(chain(&e)))?;
        qmp.cont().map_err(|e| setup("QMP cont")(chain(&e)))?;
        qmp_floor.push(t.elapsed().as_micros() as u64);
        std::thread::sleep(gap);
    }
    // A QMP socket serves one client at a time: the backend opens its own.
    drop(qmp);
    let mut gdb_floor = Vec::new();
    {
        let gdb = q.gdb.as_deref().unwrap_or_default();
        let mut rsp =
            Rsp::connect(gdb, qemu_backend::IO_TIMEOUT).map_err(|e| setup("gdbstub")(chain(&e)))?;
        rsp.cont().map_err(|e| setup("gdbstub")(chain(&e)))?;
        for _ in 0..cycles {
            std::thread::sleep(gap);
            let t = Instant::now();
            rsp.interrupt()
                .map_err(|e| setup("gdbstub halt")(chain(&e)))?;
            rsp.cont().map_err(|e| setup("gdbstub cont")(chain(&e)))?;
            gdb_floor.push(t.elapsed().as_micros() as u64);
        }
    }
    let guest = Arc::new(q.attach().map_err(|e| setup("attach")(chain(&e)))?);
    let arena = kvm_vmm::layout::PATCH_ARENA;
    let mut qengine = Engine::for_elf_image(
        guest.clone(),
        "built-in test guest",
        image,
        ArenaWindow {
            gpa: arena.start,
            gva: arena.start,
            size: arena.size,
        },
        config(),
        Some(&scratch.join("qemu-state")),
    )?;
    let peer = cycles_on(guest.as_ref(), &mut qengine, cycles, gap)?;
    drop(qengine);
    drop(q);
    drop(scratch_dir);
    Ok(QemuReport {
        benchmark: "qemu",
        host,
        cycles,
        qemu_accel: "kvm",
        vmm_apply_us: summarize(&own.apply),
        vmm_revert_us: summarize(&own.revert),
        vmm_floor_us: summarize(&own.floor),
        qemu_apply_us: summarize(&peer.apply),
        qemu_revert_us: summarize(&peer.revert),
        qemu_floor_us: summarize(&peer.floor),
        qmp_stop_cont_us: summarize(&qmp_floor),
        gdb_halt_cont_us: summarize(&gdb_floor),
    })
}

pub fn table(r: &QemuReport) -> String {
    let mut t = format!(
        "Blackout of the v1 → v2 sample on the test guest, 1 vCPU, {} cycles (µs):\n",
        r.cycles
    );
    t.push_str("| path                                   | p50     | p99     | max     |\n");
    t.push_str("|----------------------------------------|---------|---------|---------|\n");
    for (name, s) in [
        ("this VMM: apply", &r.vmm_apply_us),
        ("this VMM: revert", &r.vmm_revert_us),
        ("this VMM: pause → resume (floor)", &r.vmm_floor_us),
        ("QEMU backend: apply", &r.qemu_apply_us),
        ("QEMU backend: revert", &r.qemu_revert_us),
        ("QEMU backend: pause → resume (floor)", &r.qemu_floor_us),
        ("QEMU: QMP stop → cont (peer floor)", &r.qmp_stop_cont_us),
        ("QEMU: gdbstub halt → continue", &r.gdb_halt_cont_us),
    ] {
        t.push_str(&format!(
            "| {name:<38} | {:>7} | {:>7} | {:>7} |\n",
            s.p50, s.p99, s.max
        ));
    }
    t.push_str(&format!(
        "QEMU accelerator: {}; QEMU-backend apply p50 / QMP stop→cont p50 = {:.2}; this VMM's apply p50 / QEMU backend's = {:.3}\n",
        r.qemu_accel,
        r.qemu_apply_us.p50 as f64 / (r.qmp_stop_cont_us.p50 as f64).max(1.0),
        r.vmm_apply_us.p50 as f64 / (r.qemu_apply_us.p50 as f64).max(1.0)
    ));
    t
}
