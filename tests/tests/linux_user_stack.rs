//! A local user of the guest cannot hold a kernel hot patch back. On the stock kernel under
//! QEMU (TCG, KASLR on), a user program (`stack_spray`) fills its own stack with the address
//! 7 bytes into `cmdline_proc_show`, inside the bytes the patch's jump displaces (the jump goes
//! after the 5-byte ftrace nop, over `push rbx` and a 7-byte `mov`), and spins in user mode on
//! top of it at the lowest priority, so most pauses catch the vCPU there. The
//! engine reads a vCPU's stack for return addresses into the code being changed; a vCPU in
//! user mode, where that code is supervisor-only, has none, so its stack is not read
//! (`docs/patch-engine.md`, "Return addresses"), and the patch applies at its first attempt
//! every time. Before, every attempt that caught the spinner was "busy".

use std::sync::Arc;
use std::time::Duration;

use guest_control::GuestControl;
use integration_tests::linux::{self, BootOptions, Kit, LinuxGuest, parse_workload_line};
use linux_guest::attach::{self, KernelImage};
use qemu_backend::QemuGuest;

const ARENA_GPA: u64 = 0x1000_0000;

/// Started once, in the background; every workload line then shows its report and what
/// `/proc/cmdline` reads as (its length).
const PROBE: &str = r#"bb=/bin/busybox
if [ ! -e /tmp/spray.out ]; then /bin/stack_spray cmdline_proc_show 7 >/tmp/spray.out 2>&1 & fi
$bb cat /tmp/spray.out
echo "cmdline=$($bb wc -c </proc/cmdline)"
"#;

#[test]
fn a_user_filling_its_stack_with_kernel_addresses_cannot_hold_a_patch_back() {
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
        l.contains("stack_spray: cmdline_proc_show+7 = ")
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
    assert!(
        sprayed.contains(&format!("= {word:x}")),
        "the program sprayed another address than cmdline_proc_show+7 ({word:#x}): {sprayed}"
    );

    // Most pauses catch the vCPU in user mode, on the sprayed words: what made the scan busy.
    let mut caught = 0;
    for _ in 0..10 {
        let states = guest.pause_all().expect("pause");
        let v = *states.iter().flatten().next().expect("a vCPU");
        let on_spray = v.cpl == 3
            && guest
                .read_virtual(&v, v.rsp, 1024)
                .is_ok_and(|b| b.chunks_exact(8).any(|c| c == word.to_le_bytes()));
        guest.resume_all().expect("resume");
        caught += u32::from(on_spray);
        std::thread::sleep(Duration::from_millis(53));
    }
    println!("{caught} of 10 pauses caught the vCPU in user mode on the sprayed words");
    assert!(
        caught >= 5,
        "the spinner was not what the vCPU ran ({caught} of 10)"
    );

    let key = patch_format::SecretKey::generate().expect("key");
    let config = patch_engine::EngineConfig {
        trusted_keys: vec![key.public()],
        // One attempt: a pause that caught the spinner would have been the whole answer.
        max_attempts: 1,
        ..Default::default()
    };
    let mut engine =
        vmm_tools::demo_linux::engine(guest.clone(), &image, config, &dir.path().join("state"))
            .expect("engine");
    let patch = vmm_tools::demo_linux::ret_replacements(&image, &key, &["cmdline_proc_show"])
        .expect("build the patch");
    // The length /proc/cmdline reads as, on the first workload line begun after `seq` was
    // printed (the line after it may have read it before).
    let cmdline_len = |g: &LinuxGuest, seq: u64| {
        let l = g.wait_for_line(Duration::from_secs(60), |l| {
            parse_workload_line(l).is_some_and(|w| w.seq > seq + 1)
        });
        let w = parse_workload_line(&l).expect("a workload line");
        let len = w
            .version
            .rsplit("cmdline=")
            .next()
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no cmdline length in {l}"));
        (w.seq, len)
    };
    let (_, original) = cmdline_len(&g, g.workload_lines().last().map_or(0, |l| l.seq));
    assert!(original > 0, "/proc/cmdline reads empty before the patch");
    for round in 0..5 {
        let out = engine
            .apply(&patch)
            .unwrap_or_else(|e| panic!("round {round}: the spinner's stack held the patch: {e}"));
        assert_eq!(out.attempts, 1);
        let site = &out.patch.sites[0];
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
        // The guest computes what the patch says: /proc/cmdline is empty.
        let (after, len) = cmdline_len(&g, g.workload_lines().last().map_or(0, |l| l.seq));
        assert_eq!(
            len, 0,
            "round {round}: the patch did not change /proc/cmdline"
        );
        engine.revert(&out.patch.id).expect("revert");
        let (_, len) = cmdline_len(
            &g,
            after.max(g.workload_lines().last().map_or(0, |l| l.seq)),
        );
        assert_eq!(
            len, original,
            "round {round}: the revert did not restore it"
        );
    }
}
