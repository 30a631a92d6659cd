//! CPUID as each vCPU sees it: KVM's supported set, normalised as reference VMMs do so a stock
//! kernel finds a consistent machine: per-vCPU APIC ids and topology, the hypervisor bit, and
//! XSAVE leaves that agree with the feature flags.

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

/// Leaf 1 ECX bit 31: "running under a hypervisor".
const HYPERVISOR_BIT: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: multi-threading (the logical count in EBX[23:16] is valid).
const HTT_BIT: u32 = 1 << 28;
/// Leaf 0x8000_0001 ECX bit 1: CmpLegacy (AMD: the logical count means cores).
const CMP_LEGACY_BIT: u32 = 1 << 1;
/// Size of the legacy XSAVE area plus its header: the smallest XSAVE image.
const XSAVE_LEGACY_SIZE: u32 = 576;

#[derive(Clone, Copy)]
enum Reg {
    Ebx,
    Ecx,
    Edx,
}

/// XSAVE state components (bit in XCR0) and the feature flag (leaf, register, bit) a kernel
/// requires before it enables the component. A component offered in leaf 0xD whose flag is
/// absent makes the kernel size its XSAVE buffer from one set and the CPU from another (Linux
/// warns "XSAVE consistency problem" and may corrupt state); so such components are dropped.
const XSTATE_NEEDS: [(u32, u32, Reg, u32); 10] = [
    (2, 1, Reg::Ecx, 28),  // AVX
    (3, 7, Reg::Ebx, 14),  // MPX bounds
    (4, 7, Reg::Ebx, 14),  // MPX CSR
    (5, 7, Reg::Ebx, 16),  // AVX-512 opmask
    (6, 7, Reg::Ebx, 16),  // AVX-512 ZMM_Hi256
    (7, 7, Reg::Ebx, 16),  // AVX-512 Hi16_ZMM
    (9, 7, Reg::Ecx, 3),   // PKRU
    (11, 7, Reg::Edx, 20), // CET user (CET_IBT)
    (17, 7, Reg::Edx, 24), // AMX tile config
    (18, 7, Reg::Edx, 24), // AMX tile data
];

fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
    entries
        .iter()
        .find(|e| e.function == function && e.index == index)
}

fn flag(entries: &[kvm_cpuid_entry2], function: u32, reg: Reg, bit: u32) -> bool {
    find(entries, function, 0).is_some_and(|e| {
        let v = match reg {
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        };
        v & (1 << bit) != 0
    })
}

/// Makes leaf 0xD agree with the feature flags: components whose flag is absent, or whose
/// sub-leaf gives no size, leave the supported-XCR0 mask (sub-leaf 0 EDX:EAX) and their
/// sub-leaf is zeroed; sub-leaf 0 ECX (the size for every supported component) is recomputed.
/// EBX (the size for the components enabled now) is KVM's to keep current as the guest writes
/// XCR0; it starts at the legacy size, as at reset.
pub fn normalise_xsave(entries: &mut [kvm_cpuid_entry2]) {
    let Some(leaf0) = find(entries, 0xd, 0).copied() else {
        return;
    };
    let mut mask = u64::from(leaf0.eax) | (u64::from(leaf0.edx) << 32);
    for bit in 2..64u32 {
        if mask & (1 << bit) == 0 {
            continue;
        }
        let needs_ok = XSTATE_NEEDS
            .iter()
            .filter(|(b, ..)| *b == bit)
            .all(|&(_, leaf, reg, fbit)| flag(entries, leaf, reg, fbit));
        let sized = find(entries, 0xd, bit).is_some_and(|e| e.eax != 0);
        if !needs_ok || !sized {
            mask &= !(1 << bit);
        }
    }
    let offered = u64::from(leaf0.eax) | (u64::from(leaf0.edx) << 32);
    let mut max_size = XSAVE_LEGACY_SIZE;
    for e in entries.iter_mut() {
        if e.function != 0xd || e.index < 2 || e.index >= 64 {
            continue;
        }
        let bit = 1u64 << e.index;
        if mask & bit != 0 {
            // User components (ECX bit 0 clear) are laid out at EBX in the standard format.
            if e.ecx & 1 == 0 {
                max_size = max_size.max(e.ebx.saturating_add(e.eax));
            }
        } else if offered & bit != 0 {
            // A dropped user component disappears. Supervisor components (IA32_XSS, listed
            // in sub-leaf 1 ECX:EDX, never in this mask) stay as KVM offers them.
            *e = kvm_cpuid_entry2 {
                function: e.function,
                index: e.index,
                flags: e.flags,
                ..Default::default()
            };
        }
    }
    for e in entries.iter_mut() {
        if e.function == 0xd && e.index == 0 {
            e.eax = mask as u32;
            e.edx = (mask >> 32) as u32;
            e.ecx = max_size;
            e.ebx = XSAVE_LEGACY_SIZE;
        }
    }
}

/// ceil(log2(n)) for n ≥ 1: the APIC-id bits a level with `n` members takes.
fn id_bits(n: usize) -> u32 {
    usize::BITS - n.saturating_sub(1).leading_zeros()
}

/// Adjusts the supported CPUID for vCPU `id` of `vcpus`: the APIC IDs in leaves 1, 0xB, 0x1F
/// and 0x8000_001E must match the vCPU's in-kernel local APIC (and the MADT), because guests
/// (ours included) find out which CPU they are from them; the topology leaves describe one
/// package of `vcpus` single-threaded cores, on Intel (leaves 4, 0xB) and AMD (0x8000_0008,
/// 0x8000_001E) alike, so the guest's topology matches the CPUs it is told about.
pub fn for_vcpu(base: &CpuId, id: usize, vcpus: usize) -> CpuId {
    let mut cpuid = base.clone();
    let apic_id = id as u32;
    let n = vcpus.clamp(1, 255) as u32;
    let core_bits = id_bits(vcpus.max(1));
    normalise_xsave(cpuid.as_mut_slice());
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (apic_id << 24) | (n << 16);
                entry.ecx |= HYPERVISOR_BIT;
                if vcpus > 1 {
                    entry.edx |= HTT_BIT;
                } else {
                    entry.edx &= !HTT_BIT;
                }
            }
            // Deterministic cache parameters: cores per package in EAX[31:26]; one thread per
            // core shares each cache level (EAX[25:14] = 0).
            4 if entry.eax & 0x1f != 0 => {
                entry.eax = (entry.eax & 0x3fff) | ((n - 1) << 26);
            }
            0xb | 0x1f => {
                entry.edx = apic_id;
                let level = entry.index;
                match level {
                    // SMT level: one thread per core.
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = (1 << 8) | level;
                    }
                    // Core level: every vCPU is a core of the one package.
                    1 => {
                        entry.eax = core_bits;
                        entry.ebx = n;
                        entry.ecx = (2 << 8) | level;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = level;
                    }
                }
            }
            0x8000_0001 => {
                if vcpus > 1 {
                    entry.ecx |= CMP_LEGACY_BIT;
                } else {
                    entry.ecx &= !CMP_LEGACY_BIT;
                }
            }
            // AMD: number of cores - 1 in ECX[7:0], APIC-id bits for them in ECX[15:12].
            0x8000_0008 => {
                entry.ecx = (entry.ecx & !0xf0ff) | (core_bits << 12) | (n - 1);
            }
            // AMD extended APIC id, core id, one thread per core, node 0.
            0x8000_001e => {
                entry.eax = apic_id;
                entry.ebx = apic_id & 0xff;
                entry.ecx = 0;
            }
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn get(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .copied()
            .unwrap_or_default()
    }

    #[test]
    fn apic_ids_and_topology_follow_the_vcpu_index() {
        let entries = [
            entry(1, 0, 0, 0xff00_0800, 0, 0),
            entry(0xb, 0, 0, 0, 0, 99),
            entry(0xb, 1, 0, 0, 0, 99),
            entry(0xb, 2, 0, 0, 0, 99),
            entry(4, 0, 0x121, 0, 0, 0),
            entry(0x8000_0008, 0, 0, 0, 0xffff, 0),
            entry(0x8000_001e, 0, 9, 9, 9, 0),
        ];
        let base = CpuId::from_entries(&entries).expect("cpuid");
        let c = for_vcpu(&base, 3, 4);
        let l1 = get(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800);
        assert_ne!(l1.ecx & HYPERVISOR_BIT, 0);
        assert_ne!(l1.edx & HTT_BIT, 0);
        let smt = get(&c, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8, smt.edx), (0, 1, 1, 3));
        let core = get(&c, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (2, 4, 2, 3));
        assert_eq!(get(&c, 0xb, 2).ecx >> 8, 0, "the last level is invalid");
        assert_eq!(get(&c, 4, 0).eax >> 26, 3);
        assert_eq!(get(&c, 4, 0).eax & 0x3fff, 0x121);
        let amd = get(&c, 0x8000_0008, 0);
        assert_eq!((amd.ecx & 0xff, (amd.ecx >> 12) & 0xf), (3, 2));
        assert_eq!(get(&c, 0x8000_001e, 0).eax, 3);
        // One vCPU: no multi-threading flag.
        let one = for_vcpu(&base, 0, 1);
        assert_eq!(get(&one, 1, 0).edx & HTT_BIT, 0);
        assert_eq!(get(&one, 0xb, 1).eax, 0);
    }

    /// Leaf 0xD as KVM offered it under QEMU's `-cpu max` (TCG, no AVX flag): x87, SSE, AVX,
    /// PKRU in the mask; the guest kernel saw "XSAVE consistency problem: size 2696 !=
    /// kernel_size 576".
    #[test]
    fn xsave_components_without_their_feature_flag_are_dropped() {
        let entries = [
            entry(1, 0, 0, 0, 1 << 26, 0), // XSAVE, no AVX
            entry(7, 0, 0, 0, 1 << 3, 0),  // PKU
            entry(0xd, 0, 0x207, 0x240, 0xa88, 0),
            entry(0xd, 1, 5, 0, 0, 0),
            entry(0xd, 2, 0x100, 0x240, 0, 0),
            entry(0xd, 9, 8, 0xa80, 0, 0),
        ];
        let base = CpuId::from_entries(&entries).expect("cpuid");
        let c = for_vcpu(&base, 0, 1);
        let l0 = get(&c, 0xd, 0);
        assert_eq!(l0.eax, 0x203, "AVX dropped, PKRU kept");
        assert_eq!(l0.ecx, 0xa80 + 8, "size of every supported component");
        assert_eq!(l0.ebx, XSAVE_LEGACY_SIZE);
        assert_eq!(get(&c, 0xd, 2).eax, 0, "the AVX sub-leaf is gone");
        assert_eq!(get(&c, 0xd, 9).eax, 8);
        assert_eq!(get(&c, 0xd, 1).eax, 5, "sub-leaf 1 is left alone");

        // With the AVX flag everything stays; without PKU, PKRU goes and the size shrinks.
        let entries = [
            entry(1, 0, 0, 0, (1 << 26) | (1 << 28), 0),
            entry(7, 0, 0, 0, 0, 0),
            entry(0xd, 0, 0x207, 0x240, 0xa88, 0),
            entry(0xd, 2, 0x100, 0x240, 0, 0),
            entry(0xd, 9, 8, 0xa80, 0, 0),
        ];
        let base = CpuId::from_entries(&entries).expect("cpuid");
        let c = for_vcpu(&base, 0, 1);
        let l0 = get(&c, 0xd, 0);
        assert_eq!((l0.eax, l0.ecx), (0x007, 0x340));
        // A component whose sub-leaf gives no size is dropped too.
        let entries = [
            entry(1, 0, 0, 0, (1 << 26) | (1 << 28), 0),
            entry(0xd, 0, 0x7, 0x240, 0x340, 0),
        ];
        let base = CpuId::from_entries(&entries).expect("cpuid");
        let c = for_vcpu(&base, 0, 1);
        assert_eq!(
            (get(&c, 0xd, 0).eax, get(&c, 0xd, 0).ecx),
            (0x3, XSAVE_LEGACY_SIZE)
        );
    }
}
