//! A local user of the guest cannot hold a kernel hot patch back. On the stock kernel under
//! QEMU (TCG, KASLR on), a user program (`stack_spray`, three copies at the lowest priority)
//! puts the address 7 bytes into `cmdline_proc_show` wherever the engine looks for return
//! addresses: that is inside the bytes the patch's jump displaces (the jump goes after the
//! 5-byte ftrace nop, over `push rbx` and a 7-byte `mov`).
//!
//! - `stack`: all over its own stack, spinning in user mode on top of it. A vCPU in user mode,
//!   where the code is supervisor-only, has no return into it, so its stack is not read.
//! - `syscalls`: in its registers, making system calls in a loop, so a pause often catches
//!   the vCPU in the kernel with them saved (`pt_regs`) just above its RSP.
//! - `sleep`: in its registers, blocked in `pause()`, so they sit at the top of its kernel
//!   stack, which the engine's task walk reads for a two-function patch.
//!
//! The registers user mode left at the top of a task stack are the user's, never a kernel
//! resume point, so neither scan reads them (`docs/patch-engine.md`, "Return addresses").
//! Every patch applies at its first attempt, and changes what `/proc/cmdline` reads. Before,
//! every attempt that caught a sprayer was "busy", and the sleeper held the two-function
//! patch back for good.

use std::sync::Arc;
use std::time::Duration;

use guest_control::GuestControl;
use integration_tests::linux::{self, BootOptions, Kit, LinuxGuest, parse_workload_line};
use linux_guest::attach::{self, KernelImage};
use patch_engine::rewrites::GuestMemory;
use qemu_backend::QemuGuest;

const ARENA_GPA: u64 = 0x1000_0000;

/// Started once, in the background; every workload line then shows their reports and what
/// `/proc/cmdline` reads as (its length).
const PROBE: &str = r#"bb=/bin/busybox
if [ ! -e /tmp/spray.out ]; then
  for mode in stack syscalls sleep; do
    /bin/stack_spray cmdline_proc_show 7 $mode >>/tmp/spray.out 2>&1 &
  done
fi
$bb cat /tmp/spray.out
echo "cmdline=$($bb wc -c </proc/cmdline)"
"#;

/// `op`'s result. A loaded host can make one attempt's checks through the gdbstub slow (over
/// the time cap): that one is tried again, twice at most. Anything else that holds the patch
/// back (a sprayer's word taken for a return address) fails the test.
fn slow_tolerant<T>(what: &str, mut op: impl FnMut() -> Result<T, patch_engine::EngineError>) -> T {
    for _ in 0..2 {
        match op() {
            Ok(t) => return t,
            Err(patch_engine::EngineError::Busy { why, .. }) if why.contains("µs limit") => {
                println!("{what}: slow, again: {why}");
            }
            Err(e) => panic!("{what}: a sprayer held the patch: {e}"),
        }
    }
    op().unwrap_or_else(|e| panic!("{what}: {e}"))
}

#[test]
fn a_user_putting_kernel_addresses_on_its_stacks_cannot_hold_a_patch_back() {
    let kit = Kit::ensure();
    let dir = tempfile::tempdir().expect("temp dir");
    let spray = linux::compile_program("stack_spray", dir.path());
    let g = LinuxGuest::boot(
        &kit,
        &BootOptions {
            mode: guest_tools::initramfs::InitMode::Probe,
            probe: Some((PROBE.to_string(), vec![("bin/stack_spray".into(), spray)])),
            extra_cmdline: format!("memmap=2M${ARENA_GPA:#x}"),
            ..BootOptions::default()
        },
    );
    let sprayed = g.wait_for_line(Duration::from_secs(180), |l| {
        ["stack", "syscalls", "sleep"]
            .iter()
            .all(|m| l.contains(&format!("({m})")))
    });
    let image = KernelImage::from_file(&kit.vmlinuz).expect("read the kernel image");
    let guest = Arc::new(QemuGuest::attach(&g.gdb_addr(), g.qmp_path()).expect("attach"));
    let idt = guest.idt_base().expect("IDT base");
    let a = attach::attach(guest.as_ref(), idt, &image, ARENA_GPA).expect("attach to the kernel");
    let info = linux_guest::patch::kernel_image_info(&image.vmlinux, &image.kallsyms);
    let cmdline = info
        .symbols
        .iter()
        .find(|s| s.name == "cmdline_proc_show")
        .expect("cmdline_proc_show")
        .addr
        + a.slide.slide;
    let word = cmdline + 7;
    assert_eq!(
        sprayed
            .matches(&format!("cmdline_proc_show+7 = {word:x} ("))
            .count(),
        3,
        "the programs sprayed another address than cmdline_proc_show+7 ({word:#x}): {sprayed}"
    );
    let tasks = a
        .tasks
        .clone()
        .expect("the vmlinux's BTF gives the task layout");
    let pti = linux_guest::address_space::has_pti(&image.kallsyms);
    let holds = |b: &[u8]| b.chunks_exact(8).any(|c| c == word.to_le_bytes());

    // Pauses catch the vCPU in user mode on a sprayed stack, or in the kernel with the
    // sprayed registers saved within the 1 KiB above its RSP that the engine scans. The
    // sleeper's kernel stack holds them in the frame at its top, and nowhere below it.
    let (mut user, mut kernel) = (0, 0);
    for pause in 0..10 {
        let states = guest.pause_all().expect("pause");
        let v = *states.iter().flatten().next().expect("a vCPU");
        // (Not past the top of a task stack: a guard page follows.)
        let len = 1024.min(((v.rsp | 0x3fff) + 1 - v.rsp) as usize);
        let near = guest.read_virtual(&v, v.rsp, len).is_ok_and(|b| holds(&b));
        if pause == 0 {
            let k = linux_guest::address_space::kernel_view(&v, pti);
            let read = |gva: u64, len: usize| guest.read_virtual(&k, gva, len).ok();
            let listed = tasks
                .stacks(GuestMemory(&read))
                .expect("walk the task list");
            let sleepers: Vec<_> = listed
                .iter()
                .filter(|t| t.name.ends_with("(stack_spray)") && t.user_frame > 0)
                .collect();
            assert!(
                !sleepers.is_empty(),
                "no sprayer entered from user space: {listed:x?}"
            );
            let sleeper = sleepers
                .iter()
                .find(|t| {
                    read(t.top - t.user_frame, t.user_frame as usize).is_some_and(|b| holds(&b))
                })
                .unwrap_or_else(|| panic!("no sprayer holds the word in its frame: {sleepers:x?}"));
            assert_eq!(sleeper.user_frame, 168, "sizeof(struct pt_regs) on 6.1");
            let (from, to) = sleeper.scan_range(&[]).expect("a stack");
            let scanned = read(from, (to - from) as usize).expect("the sleeper's stack");
            assert!(!holds(&scanned), "{sleeper:x?}: the word below its frame");
        }
        guest.resume_all().expect("resume");
        match v.cpl {
            3 => user += u32::from(near),
            _ => kernel += u32::from(near),
        }
        std::thread::sleep(Duration::from_millis(53));
    }
    println!(
        "of 10 pauses, {user} caught the vCPU in user mode on a sprayed stack, {kernel} in the \
         kernel with the sprayed registers above its RSP"
    );
    assert!(
        user + kernel >= 5,
        "the sprayers were not what the vCPU ran"
    );

    let key = patch_format::SecretKey::generate().expect("key");
    let config = patch_engine::EngineConfig {
        trusted_keys: vec![key.public()],
        // One attempt: a pause that caught a sprayer would have been the whole answer.
        max_attempts: 1,
        ..Default::default()
    };
    let mut engine =
        vmm_tools::demo_linux::engine(guest.clone(), &image, config, &dir.path().join("state"))
            .expect("engine");
    // The length /proc/cmdline reads as, on the first workload line begun after the newest
    // one printed so far (the line after it may have read it before).
    let cmdline_len = || {
        let seq = g.workload_lines().last().map_or(0, |l| l.seq);
        let l = g.wait_for_line(Duration::from_secs(60), |l| {
            parse_workload_line(l).is_some_and(|w| w.seq > seq + 1)
        });
        let w = parse_workload_line(&l).expect("a workload line");
        w.version
            .rsplit("cmdline=")
            .next()
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no cmdline length in {l}"))
    };
    let original = cmdline_len();
    assert!(original > 0, "/proc/cmdline reads empty before the patch");
    let one = vmm_tools::demo_linux::ret_replacements(&image, &key, &["cmdline_proc_show"])
        .expect("build the patch");
    // Two functions: the QEMU backend walks the tasks for it, the sleeper's stack included.
    let two = vmm_tools::demo_linux::ret_replacements(
        &image,
        &key,
        &["cmdline_proc_show", "meminfo_proc_show"],
    )
    .expect("build the two-function patch");
    for (round, patch) in [&one, &one, &one, &one, &two, &two, &two]
        .iter()
        .enumerate()
    {
        let out = slow_tolerant(&format!("round {round}: apply"), || engine.apply(patch));
        assert_eq!(out.attempts, 1);
        let site = out
            .patch
            .sites
            .iter()
            .find(|s| s.location.starts_with("cmdline_proc_show"))
            .expect("the cmdline site");
        if round == 0 {
            println!(
                "the jump replaced {:02x?} at {:#x}",
                site.original, site.gva
            );
        }
        assert!(
            word > site.gva && word < site.gva + site.original.len() as u64,
            "{word:#x} is not inside the bytes the jump displaced, at {:#x}+{}",
            site.gva,
            site.original.len()
        );
        if *patch == &two {
            let checked = out.patch.threads_checked.expect("the tasks were listed");
            assert!(checked >= 20, "round {round}: {checked} tasks");
        }
        // The guest computes what the patch says: /proc/cmdline is empty.
        assert_eq!(
            cmdline_len(),
            0,
            "round {round}: the patch did not change /proc/cmdline"
        );
        slow_tolerant(&format!("round {round}: revert"), || {
            engine.revert(&out.patch.id)
        });
        assert_eq!(
            cmdline_len(),
            original,
            "round {round}: the revert did not restore it"
        );
    }
}
