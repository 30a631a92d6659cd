//! The stock kernel's tasks, listed from outside (`linux_guest::tasks`) on the kernel under
//! QEMU (TCG, KASLR on, 2 vCPUs): the offsets come from the vmlinux's BTF, the walk finds
//! every task with its stack, the stacks hold the return addresses a sleeping task will come
//! back through, and the QEMU backend's engine, which scans them (`EngineConfig::list_threads`),
//! holds back a multi-function patch while a task sleeps in one of its old functions, with the
//! text unchanged, and lets a valid one through.
//!
//! This VMM lists the tasks for every change a task could be in the way of; the QEMU backend,
//! whose gdbstub reads are slow, only where a change needs them (several functions, or a jump
//! over several instructions while the kernel preempts anywhere), with a longer time cap.

use std::sync::Arc;
use std::time::Duration;

use guest_control::GuestControl;
use integration_tests::linux::{BootOptions, Kit, LinuxGuest};
use linux_guest::attach::{self, KernelImage};
use patch_engine::rewrites::GuestMemory;
use qemu_backend::QemuGuest;
use sha2::{Digest, Sha256};

const ARENA_GPA: u64 = 0x1000_0000;

/// A signed patch replacing each of `functions` with a bare `ret`, in one patch.
fn ret_replacements(
    image: &KernelImage,
    key: &patch_format::SecretKey,
    functions: &[&str],
) -> Vec<u8> {
    vmm_tools::demo_linux::ret_replacements(image, key, functions).expect("build the patch")
}

/// `[start, end)` of `function` at run time, from the image's sized symbols.
fn range_of(info: &patch_format::ImageInfo, slide: u64, function: &str) -> (u64, u64) {
    let s = info
        .symbols
        .iter()
        .find(|s| s.name == function)
        .unwrap_or_else(|| panic!("{function}"));
    (s.addr + slide, s.addr + s.size + slide)
}

#[test]
fn the_kernels_tasks_are_listed_and_a_sleeper_holds_a_multi_function_patch_back() {
    let kit = Kit::ensure();
    let g = LinuxGuest::boot(
        &kit,
        &BootOptions {
            extra_cmdline: format!("memmap=2M${ARENA_GPA:#x}"),
            vcpus: 2,
            ..BootOptions::default()
        },
    );
    g.wait_for_line(Duration::from_secs(180), |l| l.starts_with("hpl: seq="));
    let image = KernelImage::from_file(&kit.vmlinuz).expect("read the kernel image");
    let guest = Arc::new(QemuGuest::attach(&g.gdb_addr(), g.qmp_path()).expect("attach"));
    let idt = guest.idt_base().expect("IDT base");
    let a = attach::attach(guest.as_ref(), idt, &image, ARENA_GPA).expect("attach to the kernel");
    let tasks = a
        .tasks
        .clone()
        .expect("the vmlinux's BTF gives the task layout");
    println!("layout {:?}, idle tasks {:x?}", tasks.layout, tasks.idle);
    assert_eq!(tasks.idle.len(), 1, "CPU 1's idle task: {tasks:x?}");
    let pti = linux_guest::address_space::has_pti(&image.kallsyms);
    let slide = a.slide.slide;
    let info = linux_guest::patch::kernel_image_info(&image.vmlinux, &image.kallsyms);
    let do_wait = range_of(&info, slide, "do_wait");
    let nanosleep = range_of(&info, slide, "do_nanosleep");
    let kthreadd = range_of(&info, slide, "kthreadd");
    let cmdline = range_of(&info, slide, "cmdline_proc_show");

    // PID 1 (the workload's shell) waits for its `usleep` child in do_wait, and the child
    // sleeps in do_nanosleep, most of the time: a few pauses catch both.
    let (mut init_waits, mut child_sleeps) = (false, false);
    for pause in 0..12 {
        let states = guest.pause_all().expect("pause");
        let v = linux_guest::address_space::kernel_view(
            states.iter().flatten().next().expect("a vCPU"),
            pti,
        );
        let read = |gva: u64, len: usize| guest.read_virtual(&v, gva, len).ok();
        let listed = tasks
            .stacks(GuestMemory(&read))
            .expect("walk the task list");
        let words: Vec<(String, Vec<u64>)> = listed
            .iter()
            .map(|t| {
                let (from, to) = t.scan_range(&[]).expect("a stack");
                let bytes = read(from, (to - from) as usize).unwrap_or_default();
                let w = bytes
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                (t.name.clone(), w)
            })
            .collect();
        guest.resume_all().expect("resume");
        if pause == 0 {
            let names: Vec<&str> = listed.iter().map(|t| t.name.as_str()).collect();
            println!("{} tasks: {names:?}", listed.len());
            for want in [
                "task 0 (swapper/0)",
                "task 0 (swapper/1)",
                "task 1 (init)",
                "task 2 (kthreadd)",
            ] {
                assert!(names.contains(&want), "{want} missing from {names:?}");
            }
            assert!(listed.len() >= 20, "{names:?}");
            // vmalloc'ed 16 KiB stacks, each task's own, its saved sp on it.
            let mut bases: Vec<u64> = listed.iter().map(|t| t.base).collect();
            bases.sort_unstable();
            bases.dedup();
            assert_eq!(bases.len(), listed.len(), "a stack listed twice");
            for t in &listed {
                assert_eq!(t.top - t.base, 16 << 10, "{t:x?}");
                assert!(t.sp >= t.base && t.sp < t.top, "{t:x?}");
            }
        }
        let holds = |name: &str, (lo, hi): (u64, u64)| {
            words
                .iter()
                .any(|(n, w)| n.starts_with(name) && w.iter().any(|&x| x > lo && x < hi))
        };
        // kthreadd sleeps in its own loop whenever it is not making a thread.
        assert!(
            holds("task 2 (kthreadd)", kthreadd),
            "pause {pause}: kthreadd's stack"
        );
        init_waits |= holds("task 1 (init)", do_wait);
        child_sleeps |= words.iter().any(|(n, w)| {
            n.ends_with("(busybox)") && w.iter().any(|&x| x > nanosleep.0 && x < nanosleep.1)
        });
        if init_waits && child_sleeps {
            break;
        }
        std::thread::sleep(Duration::from_millis(137));
    }
    assert!(init_waits, "PID 1 never seen waiting in do_wait");
    assert!(child_sleeps, "usleep never seen asleep in do_nanosleep");

    // An engine that lists the tasks in its blackouts.
    let dir = tempfile::tempdir().expect("temp dir");
    let key = patch_format::SecretKey::generate().expect("key");
    // The QEMU backend's own settings (`linux_guest::engine::over_gdbstub`): the tasks are
    // listed where a change needs them.
    let config = patch_engine::EngineConfig {
        trusted_keys: vec![key.public()],
        max_attempts: 3,
        ..Default::default()
    };
    let mut engine =
        vmm_tools::demo_linux::engine(guest.clone(), &image, config, &dir.path().join("state"))
            .expect("engine");
    // SHA-256 of the two functions' text, and of the arena's first 64 KiB.
    let hashes = || {
        let states = guest.pause_all().expect("pause");
        let v = linux_guest::address_space::kernel_view(
            states.iter().flatten().next().expect("a vCPU"),
            pti,
        );
        let mut text = Sha256::new();
        for (lo, hi) in [kthreadd, cmdline] {
            text.update(
                guest
                    .read_virtual(&v, lo, (hi - lo) as usize)
                    .expect("text"),
            );
        }
        let arena = Sha256::digest(
            guest
                .read_virtual(&v, a.arena.gva, 64 << 10)
                .expect("arena"),
        );
        guest.resume_all().expect("resume");
        (hex::encode(text.finalize()), hex::encode(arena))
    };
    // kthreadd never leaves its loop: a patch switching it and another function at once
    // would let it run old kthreadd against the new one, so it waits, and gives up unchanged.
    let before = hashes();
    let err = engine
        .apply(&ret_replacements(
            &image,
            &key,
            &["cmdline_proc_show", "kthreadd"],
        ))
        .expect_err("kthreadd is asleep in its old code");
    println!("refused: {err}");
    assert!(
        matches!(err, patch_engine::EngineError::Busy { .. })
            && err.to_string().contains("task 2 (kthreadd)")
            && err.to_string().contains("kthreadd"),
        "{err}"
    );
    assert_eq!(hashes(), before, "the refusal changed the guest");

    // Two functions no task sleeps in: applied with every task checked, then reverted.
    let out = engine
        .apply(&ret_replacements(
            &image,
            &key,
            &["cmdline_proc_show", "meminfo_proc_show"],
        ))
        .expect("apply a two-function patch no task is inside");
    let checked = out.patch.threads_checked.expect("tasks listed");
    println!(
        "applied in {} attempt(s), {checked} tasks checked, blackout {:?} µs",
        out.attempts, out.patch.apply_blackout_us
    );
    assert!(checked >= 20, "{checked}");
    engine.revert(&out.patch.id).expect("revert");
    // (The arena keeps the reverted code: a Linux guest's is never reused.)
    assert_eq!(
        hashes().0,
        before.0,
        "the revert restored every byte of text"
    );
    // The guest carried on.
    let seq = g.workload_lines().last().map_or(0, |l| l.seq);
    g.wait_for_line(Duration::from_secs(60), |l| {
        integration_tests::linux::parse_workload_line(l).is_some_and(|w| w.seq > seq + 2)
    });
}
