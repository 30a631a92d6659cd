//! Where a running kernel may stop a task in kernel code, read from its own symbols: what the
//! engine needs to keep its jumps off the places a task it cannot see would resume at
//! (`patch_engine::threads`, `docs/linux-guests.md` "Tasks the hypervisor cannot see").

use patch_engine::threads::Preemption;

use crate::Kallsyms;

/// `enum { preempt_dynamic_none, preempt_dynamic_voluntary, preempt_dynamic_full }` of
/// `kernel/sched/core.c`: the two modes in which kernel code is preempted only where it calls
/// `cond_resched()` (or sleeps). `preempt_dynamic_undefined` (-1, before the boot-time choice)
/// and `full` are neither.
const DYNAMIC_NONE: u32 = 0;
const DYNAMIC_VOLUNTARY: u32 = 1;

/// Where the kernel whose symbols are `kallsyms` preempts kernel code, with run-time addresses
/// `slide` past its link-time ones.
///
/// - `preempt_dynamic_mode` (`CONFIG_PREEMPT_DYNAMIC`, Debian's kernels): chosen by
///   `preempt=` at boot and by `/sys/kernel/debug/sched/preempt` at run time, so the engine
///   reads the word itself each time it patches.
/// - otherwise `preempt_schedule_irq`, which only `CONFIG_PREEMPTION` builds have: an
///   interrupt's return preempts kernel code wherever it was.
/// - otherwise a task leaves the CPU in kernel code only where it calls.
pub fn of_kernel(kallsyms: &Kallsyms, slide: u64) -> Preemption {
    if let Some(at) = kallsyms.lookup("preempt_dynamic_mode") {
        return Preemption::Dynamic {
            mode_at: at.wrapping_add(slide),
            voluntary: vec![DYNAMIC_NONE, DYNAMIC_VOLUNTARY],
        };
    }
    if kallsyms.lookup("preempt_schedule_irq").is_some() {
        return Preemption::Full;
    }
    Preemption::Voluntary
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KernelSymbol;

    fn kernel(names: &[(&str, u64, char)]) -> Kallsyms {
        Kallsyms::from_symbols(
            names
                .iter()
                .map(|&(name, address, kind)| KernelSymbol {
                    address,
                    kind,
                    name: name.into(),
                })
                .collect(),
        )
    }

    #[test]
    fn a_dynamic_kernel_is_asked_its_mode_where_it_runs() {
        let k = kernel(&[
            ("preempt_schedule_irq", 0xffff_ffff_8100_1000, 'T'),
            ("preempt_dynamic_mode", 0xffff_ffff_8260_0040, 'd'),
        ]);
        assert_eq!(
            of_kernel(&k, 0x2a0_0000),
            Preemption::Dynamic {
                mode_at: 0xffff_ffff_8500_0040,
                voluntary: vec![0, 1],
            }
        );
    }

    #[test]
    fn a_preemptible_build_without_a_mode_preempts_anywhere_and_others_only_where_they_call() {
        let full = kernel(&[("preempt_schedule_irq", 0xffff_ffff_8100_1000, 'T')]);
        assert_eq!(of_kernel(&full, 0), Preemption::Full);
        let voluntary = kernel(&[("schedule", 0xffff_ffff_8100_1000, 'T')]);
        assert_eq!(of_kernel(&voluntary, 0), Preemption::Voluntary);
    }
}
