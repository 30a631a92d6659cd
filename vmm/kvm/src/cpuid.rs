//! CPUID as each vCPU sees it: KVM's supported set, with per-vCPU topology.

use kvm_bindings::CpuId;

/// Leaf 1 ECX bit 31: "running under a hypervisor".
const HYPERVISOR_BIT: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: multi-threading (the logical count in EBX[23:16] is valid).
const HTT_BIT: u32 = 1 << 28;

/// Adjusts the supported CPUID for vCPU `id` of `vcpus`: the APIC IDs in leaves 1, 0xB and 0x1F
/// must match the vCPU's in-kernel local APIC, because guests (ours included) find out which CPU
/// they are from them.
pub fn for_vcpu(base: &CpuId, id: usize, vcpus: usize) -> CpuId {
    let mut cpuid = base.clone();
    let apic_id = id as u32;
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx =
                    (entry.ebx & 0x0000_ffff) | (apic_id << 24) | ((vcpus.min(255) as u32) << 16);
                entry.ecx |= HYPERVISOR_BIT;
                if vcpus > 1 {
                    entry.edx |= HTT_BIT;
                }
            }
            0xb | 0x1f => entry.edx = apic_id,
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn apic_ids_follow_the_vcpu_index() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff00_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                edx: 99,
                ..Default::default()
            },
        ];
        let base = CpuId::from_entries(&entries).expect("cpuid");
        let c = for_vcpu(&base, 3, 4);
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0x0800);
        assert_ne!(e[0].ecx & HYPERVISOR_BIT, 0);
        assert_ne!(e[0].edx & HTT_BIT, 0);
        assert_eq!(e[1].edx, 3);
    }
}
