//! CPUID as a guest vCPU sees it: the host's supported set, made consistent per vCPU.
//!
//! KVM reports what it can virtualise; the VMM must still fill in what only it knows: the
//! vCPU's APIC id, how many logical CPUs share a package, and that a hypervisor is present.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_TOPOLOGY: u32 = 0x4;
const LEAF_PERFMON: u32 = 0xa;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;

/// CPUID.1:ECX bit 31: running under a hypervisor.
pub const ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX bit 28: more than one logical processor per package.
pub const EDX_HTT: u32 = 1 << 28;

/// Number of bits needed to number `count` things.
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

fn fix_entry(entry: &mut kvm_cpuid_entry2, vcpu_id: u32, vcpus: u32) {
    match entry.function {
        LEAF_FEATURES => {
            // EBX[31:24] initial APIC id, EBX[23:16] logical processors per package.
            entry.ebx = (entry.ebx & 0x0000_ffff) | (vcpu_id << 24) | ((vcpus & 0xff) << 16);
            entry.ecx |= ECX_HYPERVISOR;
            if vcpus > 1 {
                entry.edx |= EDX_HTT;
            } else {
                entry.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE_TOPOLOGY => {
            // EAX[31:26]: cores per package minus one; EAX[25:14]: threads sharing this cache
            // minus one. Every vCPU is a core of one package.
            let cores = vcpus.max(1) - 1;
            entry.eax = (entry.eax & 0x03ff_ffff) | (cores << 26);
            let sharing = if (entry.eax >> 5) & 0x7 >= 3 { cores } else { 0 };
            entry.eax = (entry.eax & !(0xfff << 14)) | (sharing << 14);
        }
        LEAF_PERFMON => {
            // No virtual PMU is offered.
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = 0;
            entry.edx = 0;
        }
        LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => {
            // Level 0: SMT (one thread per core); level 1: core (all vCPUs in one package).
            entry.edx = vcpu_id;
            match entry.index {
                0 => {
                    entry.eax = 0;
                    entry.ebx = 1;
                    entry.ecx = 1 << 8;
                }
                1 => {
                    entry.eax = id_bits(vcpus);
                    entry.ebx = vcpus;
                    entry.ecx = (2 << 8) | 1;
                }
                index => {
                    entry.eax = 0;
                    entry.ebx = 0;
                    entry.ecx = index;
                }
            }
        }
        _ => {}
    }
}

/// Makes `cpuid` (from `KVM_GET_SUPPORTED_CPUID`) right for vCPU `vcpu_id` of `vcpus`.
pub fn filter(cpuid: &mut CpuId, vcpu_id: u32, vcpus: u32) {
    for entry in cpuid.as_mut_slice() {
        fix_entry(entry, vcpu_id, vcpus);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0x1234_5678,
            ebx: 0x0801_0800,
            ecx: 0,
            edx: 0,
            ..Default::default()
        }
    }

    fn cpuid() -> CpuId {
        CpuId::from_entries(&[
            entry(LEAF_FEATURES, 0),
            entry(LEAF_CACHE_TOPOLOGY, 0),
            entry(LEAF_PERFMON, 0),
            entry(LEAF_EXT_TOPOLOGY, 0),
            entry(LEAF_EXT_TOPOLOGY, 1),
            entry(LEAF_EXT_TOPOLOGY, 2),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice().iter().find(|e| e.function == function && e.index == index).unwrap()
    }

    #[test]
    fn each_vcpu_gets_its_apic_id_and_the_cpu_count() {
        for id in 0..3 {
            let mut c = cpuid();
            filter(&mut c, id, 3);
            let f = find(&c, LEAF_FEATURES, 0);
            assert_eq!(f.ebx >> 24, id);
            assert_eq!((f.ebx >> 16) & 0xff, 3);
            assert_eq!(f.ebx & 0xffff, 0x0800, "brand/clflush bits kept");
            assert_ne!(f.ecx & ECX_HYPERVISOR, 0);
            assert_ne!(f.edx & EDX_HTT, 0);
            assert_eq!(find(&c, LEAF_EXT_TOPOLOGY, 0).edx, id);
            assert_eq!(find(&c, LEAF_EXT_TOPOLOGY, 1).ebx, 3);
            assert_eq!(find(&c, LEAF_EXT_TOPOLOGY, 1).eax, 2, "2 bits number 3 cpus");
            assert_eq!(find(&c, LEAF_EXT_TOPOLOGY, 2).ecx, 2, "invalid level");
        }
    }

    #[test]
    fn single_vcpu_has_no_htt_and_no_pmu() {
        let mut c = cpuid();
        filter(&mut c, 0, 1);
        assert_eq!(find(&c, LEAF_FEATURES, 0).edx & EDX_HTT, 0);
        assert_eq!(find(&c, LEAF_PERFMON, 0).eax, 0);
        assert_eq!(find(&c, LEAF_CACHE_TOPOLOGY, 0).eax >> 26, 0);
    }

    #[test]
    fn id_bits_counts() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
    }
}
