//! The kernel's tasks, listed from outside the guest, so that the engine can scan the stack of
//! every task no vCPU is running (`patch_engine::rewrites::TextRewrites::threads`).
//!
//! A task asleep or preempted in kernel code keeps all it will come back to on its own kernel
//! stack: return addresses, the registers its callees saved, and for a preempted task the
//! interrupted RIP in `pt_regs`. A hypervisor sees none of it through the vCPUs
//! (`docs/patch-engine.md`, "Threads the hypervisor cannot see"). The kernel's own structures
//! say where it is: every thread group leader is on `init_task.tasks`, every thread on its
//! group's `signal->thread_head` (through `thread_node`; both lists are RCU lists, so a
//! forward walk is sound at any instant, which is what a pause catches), each task's stack
//! starts at `task->stack`, and a task switched out saved its stack pointer in
//! `task->thread.sp`. The CPUs' idle tasks are on no list: each runqueue's `idle`.
//!
//! The offsets come from the vmlinux's own type information (its `.BTF` section, which
//! Debian's kernels carry), never from a table of kernel versions: a kernel whose layout
//! cannot be read is simply not listed, and the engine keeps its vCPU-only checks.

use btf_rs::{Btf, Type};
use guest_control::{GuestControl, VcpuState};
use object::read::elf::{ElfFile64, SectionHeader};
use object::{Endianness, Object, ObjectSection};
use patch_engine::rewrites::GuestMemory;
use patch_engine::threads::ThreadStack;
use thiserror::Error;

use crate::Kallsyms;

/// `THREAD_SIZE` of x86-64: four pages (`THREAD_SIZE_ORDER` 2), twice that with KASAN.
pub const THREAD_SIZE: u64 = 16 << 10;
const THREAD_SIZE_KASAN: u64 = 32 << 10;

/// At most this many tasks are listed in one walk, and at most twice as many list entries
/// followed: the lists are the guest's, and a loop in one (or a forged one) must end the walk
/// with an error, not hold the blackout.
pub const MAX_TASKS: usize = 1 << 17;

/// The lowest address of the kernel half of a 4- or 5-level address space: every task and
/// stack pointer the walk follows must be at or above it.
const KERNEL_HALF: u64 = 0xff00_0000_0000_0000;

/// Why the task layout could not be read from the vmlinux.
#[derive(Debug, Error)]
pub enum TaskLayoutError {
    #[error("the vmlinux has no .BTF section (a kernel built without CONFIG_DEBUG_INFO_BTF)")]
    NoBtf,
    #[error("the vmlinux's .BTF section cannot be read: {0}")]
    Btf(String),
    #[error("the vmlinux's type information has no {0}")]
    Missing(String),
}

/// Where the fields the walk reads are, in bytes from the start of their structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskLayout {
    /// `task_struct.tasks` (the list of thread group leaders).
    pub tasks: u64,
    /// `task_struct.signal`.
    pub signal: u64,
    /// `task_struct.thread_node`, on `signal_struct.thread_head`.
    pub thread_node: u64,
    /// `signal_struct.thread_head`.
    pub thread_head: u64,
    /// `task_struct.stack`.
    pub stack: u64,
    /// `task_struct.thread.sp`.
    pub sp: u64,
    /// `task_struct.pid`.
    pub pid: u64,
    /// `task_struct.comm`.
    pub comm: u64,
    /// `rq.idle`, for the CPUs' idle tasks.
    pub rq_idle: u64,
    /// `struct pt_regs`, which a task entering the kernel from user space saves at the top
    /// of its stack.
    pub user_frame: UserFrameLayout,
}

/// `struct pt_regs` as the walk reads it: the registers of user mode at the top of a task's
/// stack (x86-64 keeps nothing above them, `TOP_OF_KERNEL_STACK_PADDING` 0; a FRED kernel's
/// 16 bytes of padding make the read miss the frame, and then nothing is left out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserFrameLayout {
    /// `sizeof(struct pt_regs)`.
    pub size: u64,
    /// `pt_regs.ip`.
    pub ip: u64,
    /// `pt_regs.cs`.
    pub cs: u64,
    /// `pt_regs.sp`.
    pub sp: u64,
    /// `pt_regs.ss`.
    pub ss: u64,
}

impl TaskLayout {
    /// From the vmlinux's `.BTF`.
    pub fn from_vmlinux(vmlinux: &[u8]) -> Result<TaskLayout, TaskLayoutError> {
        let btf = Btf::from_bytes(btf_section(vmlinux)?)
            .map_err(|e| TaskLayoutError::Btf(e.to_string()))?;
        let at = |s: &str, path: &[&str]| offset_of(&btf, s, path);
        Ok(TaskLayout {
            tasks: at("task_struct", &["tasks"])?,
            signal: at("task_struct", &["signal"])?,
            thread_node: at("task_struct", &["thread_node"])?,
            thread_head: at("signal_struct", &["thread_head"])?,
            stack: at("task_struct", &["stack"])?,
            sp: at("task_struct", &["thread", "sp"])?,
            pid: at("task_struct", &["pid"])?,
            comm: at("task_struct", &["comm"])?,
            rq_idle: at("rq", &["idle"])?,
            user_frame: UserFrameLayout {
                size: size_of(&btf, "pt_regs")?,
                ip: at("pt_regs", &["ip"])?,
                cs: at("pt_regs", &["cs"])?,
                sp: at("pt_regs", &["sp"])?,
                ss: at("pt_regs", &["ss"])?,
            },
        })
    }
}

/// The size in bytes of struct `name`.
fn size_of(btf: &Btf, name: &str) -> Result<u64, TaskLayoutError> {
    btf.resolve_types_by_name(name)
        .ok()
        .into_iter()
        .flatten()
        .find_map(|t| match t {
            Type::Struct(s) if s.size() > 0 => Some(s.size() as u64),
            _ => None,
        })
        .ok_or_else(|| TaskLayoutError::Missing(format!("the size of struct {name}")))
}

fn btf_section(vmlinux: &[u8]) -> Result<&[u8], TaskLayoutError> {
    let elf = ElfFile64::<Endianness>::parse(vmlinux)
        .map_err(|e| TaskLayoutError::Btf(format!("the vmlinux is not a 64-bit ELF: {e}")))?;
    let section = elf.section_by_name(".BTF").ok_or(TaskLayoutError::NoBtf)?;
    // A section with no file bytes (SHT_NOBITS) has nothing to parse.
    if section.elf_section_header().sh_type(elf.endian()) == object::elf::SHT_NOBITS {
        return Err(TaskLayoutError::NoBtf);
    }
    section
        .data()
        .map_err(|e| TaskLayoutError::Btf(e.to_string()))
}

/// The byte offset of `path` (member names, nested) in struct `name`, looking through
/// anonymous structs and unions as C does.
fn offset_of(btf: &Btf, name: &str, path: &[&str]) -> Result<u64, TaskLayoutError> {
    let missing = || TaskLayoutError::Missing(format!("{name}.{}", path.join(".")));
    let mut ty = btf
        .resolve_types_by_name(name)
        .map_err(|_| missing())?
        .into_iter()
        .find(|t| matches!(t, Type::Struct(s) if s.size() > 0))
        .ok_or_else(missing)?;
    let mut bits = 0u64;
    for member in path {
        let (offset, next) = member_of(btf, &ty, member, 0).ok_or_else(missing)?;
        bits += offset;
        ty = next;
    }
    if !bits.is_multiple_of(8) {
        return Err(missing());
    }
    Ok(bits / 8)
}

/// Member `name` of struct or union `ty` (through anonymous members, at most a few deep):
/// its bit offset and its type with typedefs and qualifiers taken off.
fn member_of(btf: &Btf, ty: &Type, name: &str, depth: u32) -> Option<(u64, Type)> {
    let (Type::Struct(s) | Type::Union(s)) = ty else {
        return None;
    };
    if depth > 4 {
        return None;
    }
    for m in &s.members {
        let member_name = btf.resolve_name(m).unwrap_or_default();
        let member_ty = bare(btf, btf.resolve_chained_type(m).ok()?)?;
        if member_name == name {
            return Some((u64::from(m.bit_offset()), member_ty));
        }
        if member_name.is_empty()
            && let Some((inner, t)) = member_of(btf, &member_ty, name, depth + 1)
        {
            return Some((u64::from(m.bit_offset()) + inner, t));
        }
    }
    None
}

/// `ty` without typedefs, `const`, `volatile` and the like.
fn bare(btf: &Btf, mut ty: Type) -> Option<Type> {
    for _ in 0..16 {
        ty = match &ty {
            Type::Typedef(t) => btf.resolve_chained_type(t).ok()?,
            Type::Const(t) => btf.resolve_chained_type(t).ok()?,
            Type::Volatile(t) => btf.resolve_chained_type(t).ok()?,
            Type::Restrict(t) => btf.resolve_chained_type(t).ok()?,
            Type::TypeTag(t) => btf.resolve_chained_type(t).ok()?,
            _ => return Some(ty),
        };
    }
    None
}

/// A running kernel's tasks: where the walk starts, read once at attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelTasks {
    pub layout: TaskLayout,
    /// `init_task` at its run-time address: CPU 0's idle task, the head of the task list.
    pub init_task: u64,
    /// The other CPUs' idle tasks (run-time addresses).
    pub idle: Vec<u64>,
    /// Each task's stack size.
    pub stack_size: u64,
}

impl KernelTasks {
    /// Reads where the walk starts through `vcpu`'s kernel view, with run-time addresses
    /// `slide` past the link-time ones; `None` when the kernel lacks `init_task` (a kernel
    /// whose tasks are not listed). The idle tasks come from each possible CPU's runqueue
    /// (`runqueues` through `__per_cpu_offset`), which the kernel sets up before it runs user
    /// space and keeps.
    pub fn read<G: GuestControl + ?Sized>(
        guest: &G,
        vcpu: &VcpuState,
        kallsyms: &Kallsyms,
        slide: u64,
        layout: TaskLayout,
    ) -> Option<KernelTasks> {
        let init_task = kallsyms.lookup("init_task")?.wrapping_add(slide);
        let word = |gva: u64| -> Option<u64> {
            let b = guest.read_virtual(vcpu, gva, 8).ok()?;
            Some(u64::from_le_bytes(b.try_into().ok()?))
        };
        let idle = match kallsyms
            .lookup_symbol("runqueues")
            .filter(|s| s.is_absolute())
        {
            Some(rq) => crate::interrupt_stacks::per_cpu_bases(guest, vcpu, kallsyms, slide)
                .into_iter()
                .filter_map(|base| word(base.wrapping_add(rq.address).wrapping_add(layout.rq_idle)))
                .filter(|&t| t != 0 && t != init_task)
                .collect(),
            None => Vec::new(),
        };
        let stack_size = if kallsyms.lookup("kasan_init").is_some() {
            THREAD_SIZE_KASAN
        } else {
            THREAD_SIZE
        };
        Some(KernelTasks {
            layout,
            init_task,
            idle,
            stack_size,
        })
    }

    /// Where the registers of user mode begin on the task stack ending at `top`: at
    /// `top - sizeof(pt_regs)` when the frame there is one user mode left (CS and SS of
    /// privilege 3, RIP and RSP in the lower half: the task entered the kernel from user
    /// space, and what is there is the user's), else `None`. The frame is written only on
    /// entry from user space: a kernel thread's holds zeroes and kernel selectors, and a
    /// context the kernel interrupted saves its registers lower down, where the scan reads.
    pub fn user_frame_below(&self, top: u64, memory: GuestMemory<'_>) -> Option<u64> {
        let f = self.layout.user_frame;
        let at = top.checked_sub(f.size)?;
        // One read of the words from the lowest of them to the highest (they are adjacent
        // in pt_regs): each read may walk the page tables.
        let (lo, hi) = [f.ip, f.cs, f.sp, f.ss]
            .iter()
            .fold((u64::MAX, 0), |(lo, hi), &o| (lo.min(o), hi.max(o)));
        if hi.checked_add(8)? > f.size || hi - lo > 256 {
            return None;
        }
        let bytes = memory.read(at.wrapping_add(lo), (hi - lo + 8) as usize)?;
        let word = |off: u64| {
            let i = (off - lo) as usize;
            bytes
                .get(i..i + 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
        };
        let user_selector = |off: u64| word(off).is_some_and(|s| s & 3 == 3);
        let lower_half = |off: u64| word(off).is_some_and(|a| a < 1 << 63);
        (user_selector(f.cs) && user_selector(f.ss) && lower_half(f.ip) && lower_half(f.sp))
            .then_some(at)
    }

    /// The top of the task stack `rsp` is on, if it is on one: task stacks are `stack_size`
    /// bytes aligned to their size (`THREAD_ALIGN`), so the top is `rsp` rounded up. The
    /// caller rules out the interrupt and exception stacks first.
    pub fn task_stack_top(&self, rsp: u64) -> Option<u64> {
        (rsp | (self.stack_size - 1)).checked_add(1)
    }

    /// Every task's stack, read through `memory` with the guest parked: `init_task` and the
    /// idle tasks, then every thread of every thread group. A task without a stack (it has
    /// exited and freed it) is left out. An error names what could not be read or did not
    /// look like a task list.
    pub fn stacks(&self, memory: GuestMemory<'_>) -> Result<Vec<ThreadStack>, String> {
        let l = &self.layout;
        let word = |gva: u64, what: &str| -> Result<u64, String> {
            memory
                .read(gva, 8)
                .and_then(|b| b.try_into().ok())
                .map(u64::from_le_bytes)
                .ok_or_else(|| format!("{what} at {gva:#x} cannot be read"))
        };
        let pointer = |gva: u64, what: &str| -> Result<u64, String> {
            let p = word(gva, what)?;
            if p < KERNEL_HALF || p % 8 != 0 {
                return Err(format!(
                    "{what} at {gva:#x} holds {p:#x}, not a kernel pointer"
                ));
            }
            Ok(p)
        };
        let mut out: Vec<ThreadStack> = Vec::new();
        let visit = |task: u64, out: &mut Vec<ThreadStack>| -> Result<(), String> {
            if out.len() >= MAX_TASKS {
                return Err(format!(
                    "more than {MAX_TASKS} tasks: the task list loops or is not one"
                ));
            }
            let base = word(task.wrapping_add(l.stack), "a task's stack pointer")?;
            if base == 0 {
                return Ok(());
            }
            if base < KERNEL_HALF || base % 8 != 0 {
                return Err(format!(
                    "task {task:#x} has its stack at {base:#x}, not a kernel address"
                ));
            }
            let sp = word(task.wrapping_add(l.sp), "a task's saved stack pointer")?;
            let pid = memory
                .read(task.wrapping_add(l.pid), 4)
                .and_then(|b| b.try_into().ok())
                .map(i32::from_le_bytes);
            let comm = memory
                .read(task.wrapping_add(l.comm), 16)
                .map(|b| {
                    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
                    String::from_utf8_lossy(&b[..end]).into_owned()
                })
                .unwrap_or_default();
            let top = base.saturating_add(self.stack_size);
            out.push(ThreadStack {
                name: match pid {
                    Some(pid) => format!("task {pid} ({comm})"),
                    None => format!("task at {task:#x}"),
                },
                sp,
                base,
                top,
                user_frame: self.user_frame_below(top, memory).map_or(0, |at| top - at),
            });
            Ok(())
        };
        visit(self.init_task, &mut out)?;
        for &idle in self.idle.iter().filter(|&&t| t != self.init_task) {
            visit(idle, &mut out)?;
        }
        // Every thread group leader, and each one's threads.
        let mut steps = 0usize;
        let mut step = |at: u64, what: &str| -> Result<u64, String> {
            steps += 1;
            if steps > 2 * MAX_TASKS {
                return Err(format!(
                    "more than {} list entries followed: the task list loops or is not one",
                    2 * MAX_TASKS
                ));
            }
            pointer(at, what)
        };
        let head = self.init_task.wrapping_add(l.tasks);
        let mut node = step(head, "init_task.tasks.next")?;
        while node != head {
            let leader = node.wrapping_sub(l.tasks);
            visit(leader, &mut out)?;
            let signal = word(
                leader.wrapping_add(l.signal),
                "a task's signal_struct pointer",
            )?;
            if signal != 0 {
                let threads = signal.wrapping_add(l.thread_head);
                let mut t = step(threads, "a thread group's thread list")?;
                while t != threads {
                    // The leader is on its own group's list too: listed once.
                    let thread = t.wrapping_sub(l.thread_node);
                    if thread != leader {
                        visit(thread, &mut out)?;
                    }
                    t = step(t, "a thread list entry")?;
                }
            }
            node = step(node, "a task list entry")?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// 6.1.0-57's offsets (read from its BTF), which the synthetic lists below are laid out in.
    const LAYOUT: TaskLayout = TaskLayout {
        tasks: 2192,
        signal: 3072,
        thread_node: 2608,
        thread_head: 16,
        stack: 32,
        sp: 5376 + 24,
        pid: 2416,
        comm: 2976,
        rq_idle: 2408,
        user_frame: UserFrameLayout {
            size: 168,
            ip: 128,
            cs: 136,
            sp: 152,
            ss: 160,
        },
    };

    /// Guest memory as a map of 8-byte words (unset words read as unreadable).
    #[derive(Default)]
    struct Words(HashMap<u64, u64>);

    impl Words {
        fn set(&mut self, at: u64, v: u64) {
            self.0.insert(at, v);
        }
        fn read(&self, gva: u64, len: usize) -> Option<Vec<u8>> {
            let mut out = Vec::new();
            let mut at = gva & !7;
            while (out.len() as u64) < len as u64 + (gva - (gva & !7)) {
                out.extend_from_slice(&self.0.get(&at)?.to_le_bytes());
                at += 8;
            }
            let skip = (gva - (gva & !7)) as usize;
            Some(out[skip..skip + len].to_vec())
        }
    }

    const INIT: u64 = 0xffff_ffff_8261_3940;
    const SIGNAL_INIT: u64 = 0xffff_ffff_8260_0000;

    /// A task at `t` with stack `stack`, saved sp `sp`, pid and comm.
    fn task(m: &mut Words, t: u64, stack: u64, sp: u64, pid: u32, comm: &str, signal: u64) {
        m.set(t + LAYOUT.stack, stack);
        m.set(t + LAYOUT.sp, sp);
        m.set(t + LAYOUT.pid, u64::from(pid));
        let mut c = [0u8; 16];
        c[..comm.len()].copy_from_slice(comm.as_bytes());
        m.set(
            t + LAYOUT.comm,
            u64::from_le_bytes(c[..8].try_into().unwrap()),
        );
        m.set(
            t + LAYOUT.comm + 8,
            u64::from_le_bytes(c[8..].try_into().unwrap()),
        );
        m.set(t + LAYOUT.signal, signal);
    }

    /// Circular list through the `off` field of each of `nodes`, headed at `head`.
    fn link(m: &mut Words, head: u64, nodes: &[u64]) {
        let mut prev = head;
        for &n in nodes {
            m.set(prev, n);
            prev = n;
        }
        m.set(prev, head);
    }

    fn kernel_tasks() -> KernelTasks {
        KernelTasks {
            layout: LAYOUT,
            init_task: INIT,
            idle: vec![0xffff_8880_0100_0000],
            stack_size: THREAD_SIZE,
        }
    }

    /// init_task, one idle task, a process with two threads and a single-threaded one.
    fn guest() -> Words {
        let mut m = Words::default();
        let (p1, p1b, p2) = (
            0xffff_8880_0200_0000u64,
            0xffff_8880_0200_4000u64,
            0xffff_8880_0300_0000u64,
        );
        let (s1, s2) = (0xffff_8880_0400_0000u64, 0xffff_8880_0400_1000u64);
        task(
            &mut m,
            INIT,
            0xffff_ffff_8260_4000,
            0xffff_ffff_8260_7e00,
            0,
            "swapper/0",
            SIGNAL_INIT,
        );
        task(
            &mut m,
            0xffff_8880_0100_0000,
            0xffff_c900_0001_0000,
            0xffff_c900_0001_3e00,
            0,
            "swapper/1",
            0,
        );
        task(
            &mut m,
            p1,
            0xffff_c900_0002_0000,
            0xffff_c900_0002_3d00,
            1,
            "init",
            s1,
        );
        task(
            &mut m,
            p1b,
            0xffff_c900_0003_0000,
            0xffff_c900_0003_3c00,
            7,
            "worker",
            s1,
        );
        task(&mut m, p2, 0, 0, 9, "zombie", s2);
        link(
            &mut m,
            INIT + LAYOUT.tasks,
            &[p1 + LAYOUT.tasks, p2 + LAYOUT.tasks],
        );
        link(
            &mut m,
            SIGNAL_INIT + LAYOUT.thread_head,
            &[INIT + LAYOUT.thread_node],
        );
        link(
            &mut m,
            s1 + LAYOUT.thread_head,
            &[p1 + LAYOUT.thread_node, p1b + LAYOUT.thread_node],
        );
        link(&mut m, s2 + LAYOUT.thread_head, &[p2 + LAYOUT.thread_node]);
        m
    }

    #[test]
    fn every_thread_of_every_group_and_the_idle_tasks_are_listed_once() {
        let m = guest();
        let read = |gva: u64, len: usize| m.read(gva, len);
        let stacks = kernel_tasks().stacks(GuestMemory(&read)).unwrap();
        let names: Vec<&str> = stacks.iter().map(|s| s.name.as_str()).collect();
        // The zombie freed its stack: nothing of it can run again.
        assert_eq!(
            names,
            [
                "task 0 (swapper/0)",
                "task 0 (swapper/1)",
                "task 1 (init)",
                "task 7 (worker)"
            ]
        );
        let worker = &stacks[3];
        assert_eq!(worker.base, 0xffff_c900_0003_0000);
        assert_eq!(worker.top, 0xffff_c900_0003_4000);
        assert_eq!(worker.sp, 0xffff_c900_0003_3c00);
        assert!(stacks.iter().all(|s| s.user_frame == 0), "no frame read");
    }

    #[test]
    fn the_registers_a_task_from_user_space_left_at_its_top_are_not_scanned() {
        let mut m = guest();
        let top = 0xffff_c900_0003_4000u64;
        let frame = top - 168;
        // worker entered from user space (CS 0x33, SS 0x2b, user RIP and RSP), with a
        // kernel address in r12.
        let user_frame = |m: &mut Words, frame: u64, cs: u64, ip: u64| {
            m.set(frame + 128, ip);
            m.set(frame + 136, cs);
            m.set(frame + 144, 0x246);
            m.set(frame + 152, 0x7ffd_1234_5670);
            m.set(frame + 160, 0x2b);
        };
        user_frame(&mut m, frame, 0x33, 0x40_1000);
        m.set(frame + 24, 0xffff_ffff_8110_0007);
        // init's top holds a kernel CS, the idle task's a kernel RIP: kernel frames, scanned
        // as they are.
        let init_top = 0xffff_c900_0002_4000u64;
        user_frame(&mut m, init_top - 168, 0x10, 0x40_1000);
        let idle_top = 0xffff_c900_0001_4000u64;
        user_frame(&mut m, idle_top - 168, 0x33, 0xffff_ffff_8110_0000);
        let read = |gva: u64, len: usize| m.read(gva, len);
        let tasks = kernel_tasks();
        let stacks = tasks.stacks(GuestMemory(&read)).unwrap();
        let worker = &stacks[3];
        assert_eq!(worker.user_frame, 168);
        assert_eq!(worker.scan_range(&[]), Some((0xffff_c900_0003_3c00, frame)));
        assert_eq!(stacks[2].user_frame, 0, "init's frame is the kernel's");
        assert_eq!(
            stacks[1].user_frame, 0,
            "swapper/1's frame has a kernel RIP"
        );
        assert_eq!(tasks.user_frame_below(init_top, GuestMemory(&read)), None);
        // A top at the bottom of the address space has no room for a frame.
        assert_eq!(tasks.user_frame_below(100, GuestMemory(&read)), None);
        // Task stacks are aligned to their size: the top is the rsp rounded up.
        assert_eq!(tasks.task_stack_top(top - 0x2f8), Some(top));
        assert_eq!(tasks.task_stack_top(u64::MAX - 8), None);
    }

    #[test]
    fn a_looping_or_broken_list_is_an_error_not_a_hang() {
        // A group leader whose next points at itself: the walk ends at MAX_TASKS.
        let mut m = guest();
        let p1 = 0xffff_8880_0200_0000u64;
        m.set(p1 + LAYOUT.tasks, p1 + LAYOUT.tasks);
        let read = |gva: u64, len: usize| m.read(gva, len);
        let e = kernel_tasks().stacks(GuestMemory(&read)).unwrap_err();
        assert!(e.contains("loops"), "{e}");

        // A next pointer into user space.
        let mut m = guest();
        m.set(p1 + LAYOUT.tasks, 0x1000);
        let read = |gva: u64, len: usize| m.read(gva, len);
        let e = kernel_tasks().stacks(GuestMemory(&read)).unwrap_err();
        assert!(e.contains("not a kernel pointer"), "{e}");

        // A next pointer at the very top of the address space: fields past it wrap, and read
        // as unreadable, not as an overflow.
        let mut m = guest();
        m.set(p1 + LAYOUT.tasks, u64::MAX - 7);
        let read = |gva: u64, len: usize| m.read(gva, len);
        let e = kernel_tasks().stacks(GuestMemory(&read)).unwrap_err();
        assert!(e.contains("cannot be read"), "{e}");

        // An unreadable task.
        let mut m = guest();
        m.0.remove(&(p1 + LAYOUT.stack));
        let read = |gva: u64, len: usize| m.read(gva, len);
        let e = kernel_tasks().stacks(GuestMemory(&read)).unwrap_err();
        assert!(e.contains("cannot be read"), "{e}");
    }

    #[test]
    fn a_vmlinux_without_btf_has_no_layout() {
        let e = TaskLayout::from_vmlinux(b"not an elf").unwrap_err();
        assert!(matches!(e, TaskLayoutError::Btf(_)), "{e}");
    }
}
