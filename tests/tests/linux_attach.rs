//! The QEMU backend on the stock Debian kernel (TCG, KASLR on): the slide is found from the
//! IDT on several boots with different slides, the running kernel is checked against the image,
//! and the patch arena is mapped into the kernel's address space.

use std::collections::BTreeSet;
use std::time::Duration;

use integration_tests::linux::{BootOptions, Kit, LinuxGuest};
use linux_guest::attach::{self, KernelImage};
use qemu_backend::QemuGuest;

/// Guest-physical arena the kernel is told not to use (`memmap=2M$…`).
pub const ARENA_GPA: u64 = 0x1000_0000;

fn boot(kit: &Kit) -> LinuxGuest {
    let g = LinuxGuest::boot(
        kit,
        &BootOptions {
            extra_cmdline: format!("memmap=2M${ARENA_GPA:#x}"),
            ..BootOptions::default()
        },
    );
    g.wait_for_line(Duration::from_secs(120), |l| l.starts_with("hpl: seq="));
    g
}

#[test]
fn kaslr_slide_is_found_on_several_boots_and_the_arena_is_mapped() {
    let kit = Kit::ensure();
    let image = KernelImage::from_file(&kit.vmlinuz).expect("read the kernel image");
    let mut slides = BTreeSet::new();
    for boot_no in 0..3 {
        let g = boot(&kit);
        let guest = QemuGuest::attach(&g.gdb_addr(), g.qmp_path()).expect("attach");
        let idt = guest.idt_base().expect("IDT base");
        let a = attach::attach(&guest, idt, &image, ARENA_GPA).expect("attach to the kernel");
        println!(
            "boot {boot_no}: slide {:#x} (anchors {:?}), arena at {:#x}",
            a.slide.slide, a.slide.anchors, a.arena.gva
        );
        assert_eq!(a.slide.slide % (2 << 20), 0);
        assert_eq!(a.slide.anchors.len(), 4);
        // One IRQ stack per online CPU (one here): its top slot, the last word of a 16 KiB
        // kernel mapping, is where an interrupt handler leads back to the task it interrupted.
        // And the TSS's exception stacks (#DF, NMI, #DB, #MC, and #VC in Debian's SEV-ES-capable
        // build), whose tops hold the frame.
        let stacks = &a.interrupt_stacks;
        assert_eq!(stacks.irq_tops.len(), 1, "{stacks:x?}");
        assert!((4..=5).contains(&stacks.ist_tops.len()), "{stacks:x?}");
        assert!(
            stacks
                .irq_tops
                .iter()
                .all(|&top| top & 0xfff == 0xff8 && top >= 0xffff_8000_0000_0000)
                && stacks
                    .ist_tops
                    .iter()
                    .all(|&top| top & 0xfff == 0 && top >= 0xffff_8000_0000_0000),
            "{stacks:x?}"
        );
        // Attaching again finds the same and accepts its own arena mapping.
        let b = attach::attach(&guest, idt, &image, ARENA_GPA).expect("attach again");
        assert_eq!((b.slide.slide, b.arena), (a.slide.slide, a.arena));
        slides.insert(a.slide.slide);
        drop(guest);
        // The guest keeps running after the attach.
        let seq = g.workload_lines().last().map_or(0, |l| l.seq);
        g.wait_for_line(Duration::from_secs(60), |l| {
            integration_tests::linux::parse_workload_line(l).is_some_and(|w| w.seq > seq + 2)
        });
    }
    assert!(
        slides.len() >= 2,
        "KASLR gave the same slide on every boot: {slides:?}"
    );
}

/// Without `memmap=` the arena's range is RAM the kernel may hand out, and an arena over the
/// kernel's own image would overwrite its code: both are refused from what the running kernel
/// says (its e820 table, its image's physical range) before anything is written.
#[test]
fn an_arena_the_kernel_did_not_reserve_is_refused_and_nothing_is_written() {
    use guest_control::GuestControl;
    use linux_guest::arena::{self, KernelArenaError};
    use linux_guest::attach::LinuxAttachError;

    let kit = Kit::ensure();
    let image = KernelImage::from_file(&kit.vmlinuz).expect("read the kernel image");
    let g = LinuxGuest::boot(&kit, &BootOptions::default());
    g.wait_for_line(Duration::from_secs(180), |l| l.starts_with("hpl: seq="));
    let guest = QemuGuest::attach(&g.gdb_addr(), g.qmp_path()).expect("attach");
    let idt = guest.idt_base().expect("IDT base");

    let look = || {
        let states = guest.pause_all().expect("pause");
        // The kernel's view of the vCPU, as attach takes it (arena's functions expect it).
        let vcpu = linux_guest::address_space::kernel_view(
            states.iter().flatten().next().expect("a vCPU"),
            linux_guest::address_space::has_pti(&image.kallsyms),
        );
        let idt_bytes = guest
            .read_virtual(&vcpu, idt, linux_guest::kaslr::IDT_BYTES)
            .expect("IDT");
        let slide = linux_guest::kaslr::slide_from_idt(&idt_bytes, &image.kallsyms)
            .expect("slide")
            .slide;
        let slot = arena::slot_entry(&guest, &vcpu, &image.kallsyms, slide).expect("slot");
        let kernel = arena::image_phys(&guest, &vcpu, &image.kallsyms, slide).expect("image range");
        guest.resume_all().expect("resume");
        (slot, kernel)
    };
    // The only write an attach makes is the slot's entry (the RAM at ARENA_GPA is the running
    // kernel's here, so it changes by itself).
    let (slot, (kernel_start, kernel_end)) = look();
    assert_eq!(slot.1, 0, "the arena's slot is already mapped");

    // Physical KASLR may put the kernel anywhere; an unreserved range it does not cover is
    // what this step is about (the next one aims at the kernel on purpose).
    let unreserved = [ARENA_GPA, 0x0800_0000, 0x1800_0000]
        .into_iter()
        .find(|&gpa| gpa + arena::ARENA_SIZE <= kernel_start || gpa >= kernel_end)
        .expect("a 2 MiB range outside a kernel image of a few MiB");
    let err = attach::attach(&guest, idt, &image, unreserved).expect_err("not reserved");
    println!("{err}");
    assert!(
        matches!(
            err,
            LinuxAttachError::Arena(KernelArenaError::NotReserved { .. })
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("usable RAM") && msg.contains("memmap=2M$"),
        "{msg}"
    );

    let over = kernel_start & !(arena::ARENA_SIZE - 1);
    let err = attach::attach(&guest, idt, &image, over).expect_err("over the kernel");
    println!("{err}");
    assert!(
        matches!(
            err,
            LinuxAttachError::Arena(KernelArenaError::OverlapsKernel { image_start, image_end, .. })
                if image_start == kernel_start && image_end == kernel_end
        ),
        "{err:?}"
    );

    let (slot_after, _) = look();
    assert_eq!(
        slot_after, slot,
        "a refused attach wrote the page directory"
    );
    // And the kernel goes on.
    let seq = g.workload_lines().last().map_or(0, |l| l.seq);
    g.wait_for_line(Duration::from_secs(60), |l| {
        integration_tests::linux::parse_workload_line(l).is_some_and(|w| w.seq > seq + 2)
    });
}

#[test]
fn a_vcpu_parked_in_an_interrupt_handler_leads_back_to_the_context_it_interrupted() {
    // Paused at random moments, the vCPU is now and then in an interrupt handler (under 1% of
    // pauses here), on its CPU's IRQ stack. The top slot must lead to the task stack holding
    // the interrupted context's pt_regs (a kernel RIP followed by the kernel's CS), within the
    // bytes the engine scans there.
    use guest_control::GuestControl;
    const KERNEL_CS: u64 = 0x10;
    let kit = Kit::ensure();
    let image = KernelImage::from_file(&kit.vmlinuz).expect("read the kernel image");
    let g = boot(&kit);
    let guest = QemuGuest::attach(&g.gdb_addr(), g.qmp_path()).expect("attach");
    let idt = guest.idt_base().expect("IDT base");
    let a = attach::attach(&guest, idt, &image, ARENA_GPA).expect("attach to the kernel");
    let text = |s: &str| image.kallsyms.lookup(s).expect(s) + a.slide.slide;
    let text = text("_stext")..text("_etext");
    let scan = patch_engine::EngineConfig::default().stack_scan;
    let (mut pauses, mut handlers) = (0, Vec::new());
    while handlers.len() < 3 && pauses < 4000 {
        pauses += 1;
        let states = guest.pause_all().expect("pause");
        let v = *states.iter().flatten().next().expect("a vCPU");
        let read = |gva: u64, len: usize| guest.read_virtual(&v, gva, len).ok();
        let found = a
            .interrupt_stacks
            .interrupted(&v, patch_engine::rewrites::GuestMemory(&read))
            .first()
            .map(|&rsp| {
                // As far as it is mapped, page by page, as the engine reads it.
                let mut bytes = Vec::new();
                let mut at = rsp & !7;
                while bytes.len() < scan {
                    let len = ((at | 0xfff) + 1 - at).min((scan - bytes.len()) as u64) as usize;
                    match guest.read_virtual(&v, at, len) {
                        Ok(b) => bytes.extend(b),
                        Err(_) => break,
                    }
                    at += len as u64;
                }
                let words: Vec<u64> = bytes
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect();
                let regs = words
                    .windows(2)
                    .position(|w| text.contains(&w[0]) && w[1] == KERNEL_CS);
                (v.rip, rsp, regs.map(|i| words[i]))
            });
        guest.resume_all().expect("resume");
        if let Some(h) = found {
            println!(
                "pause {pauses}: in a handler at {:#x}, interrupted stack {:#x}, its RIP {:x?}",
                h.0, h.1, h.2
            );
            assert!(h.2.is_some(), "no pt_regs above {:#x}", h.1);
            handlers.push(h);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        !handlers.is_empty(),
        "the vCPU was never in an interrupt handler in {pauses} pauses"
    );
}
