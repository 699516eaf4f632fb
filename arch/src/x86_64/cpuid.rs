//! CPUID for a vCPU, starting from KVM_GET_SUPPORTED_CPUID.
//!
//! [`patch_cpuid`] gives every vCPU its APIC id and a topology of `cpus` cores with one
//! thread each in one package, sets the hypervisor bit and the KVM signature leaf, and
//! clears features barge cannot back (nested virtualization: VMX/SVM).

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Leaf 1 ECX: hypervisor present.
pub const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX: VMX (not offered: barge sets up no nested state).
pub const LEAF1_ECX_VMX: u32 = 1 << 5;
/// Leaf 1 EDX: HTT (the logical processor count in EBX bits 23:16 is valid).
pub const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 0x8000_0001 ECX: SVM (not offered).
pub const EXT1_ECX_SVM: u32 = 1 << 2;
/// Leaf 0x8000_0001 ECX: CmpLegacy (AMD: cores are reported through 0x8000_0008).
pub const EXT1_ECX_CMP_LEGACY: u32 = 1 << 1;
/// First hypervisor leaf.
pub const KVM_SIGNATURE_LEAF: u32 = 0x4000_0000;
/// The KVM features leaf (the largest hypervisor leaf barge reports).
pub const KVM_FEATURES_LEAF: u32 = 0x4000_0001;

/// Topology level types in leaves 0xb/0x1f ECX bits 15:8.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// "KVMKVMKVM\0\0\0" as EBX, ECX, EDX.
fn kvm_signature() -> [u32; 3] {
    let sig = *b"KVMKVMKVM\0\0\0";
    [
        u32::from_le_bytes([sig[0], sig[1], sig[2], sig[3]]),
        u32::from_le_bytes([sig[4], sig[5], sig[6], sig[7]]),
        u32::from_le_bytes([sig[8], sig[9], sig[10], sig[11]]),
    ]
}

/// Number of APIC-id bits needed for `count` items (ceil(log2(count))).
fn bits_for(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

fn is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    entries
        .iter()
        .find(|e| e.function == 0)
        .is_some_and(|e| e.ebx == u32::from_le_bytes(*b"Auth"))
}

/// Sets leaf `function`/`index` to the given registers, adding it when KVM did not list it.
/// Adding fails silently when the CpuId is full (KVM's limit); the leaf then stays absent.
fn set_leaf(cpuid: &mut CpuId, function: u32, index: u32, flags: u32, regs: [u32; 4]) {
    let [eax, ebx, ecx, edx] = regs;
    if let Some(e) = cpuid
        .as_mut_slice()
        .iter_mut()
        .find(|e| e.function == function && e.index == index)
    {
        (e.eax, e.ebx, e.ecx, e.edx) = (eax, ebx, ecx, edx);
        e.flags |= flags;
        return;
    }
    let _ = cpuid.push(kvm_cpuid_entry2 {
        function,
        index,
        flags,
        eax,
        ebx,
        ecx,
        edx,
        ..Default::default()
    });
}

/// Patches the CPUID (from KVM_GET_SUPPORTED_CPUID) for vCPU `vcpu_id` of `cpus`.
///
/// - leaf 1: EBX bits 31:24 = APIC id (= `vcpu_id`), EBX bits 23:16 = `cpus`, EDX.HTT when
///   `cpus` > 1, ECX.hypervisor set, ECX.VMX cleared;
/// - leaf 4: EAX bits 31:26 = cores − 1; caches of level 3 are shared by all cores, lower
///   levels by one thread;
/// - leaves 0xb and 0x1f (0x1f only when KVM lists it): SMT level of 1 thread, core level
///   of `cpus` cores, EDX = x2APIC id;
/// - leaf 0x4000_0000: "KVMKVMKVM", max leaf 0x4000_0001;
/// - leaf 0x8000_0001: SVM cleared; on AMD, CmpLegacy and 0x8000_0008 ECX bits 7:0 = cores − 1.
///
/// `cpus` of 0 is treated as 1.
pub fn patch_cpuid(cpuid: &mut CpuId, vcpu_id: u8, cpus: u8) {
    let cpus = u32::from(cpus.max(1));
    let apic_id = u32::from(vcpu_id);
    let core_bits = bits_for(cpus);
    let amd = is_amd(cpuid.as_slice());
    let has_leaf_1f = cpuid.as_slice().iter().any(|e| e.function == 0x1f);

    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (cpus << 16);
                e.ecx = (e.ecx | LEAF1_ECX_HYPERVISOR) & !LEAF1_ECX_VMX;
                if cpus > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            4 => {
                let cache_level = (e.eax >> 5) & 0x7;
                if e.eax & 0x1f != 0 {
                    let sharing = if cache_level >= 3 { cpus - 1 } else { 0 };
                    e.eax = (e.eax & 0x3fff) | ((cpus - 1) << 26) | (sharing << 14);
                }
            }
            0x8000_0001 => {
                e.ecx &= !EXT1_ECX_SVM;
                if amd {
                    if cpus > 1 {
                        e.ecx |= EXT1_ECX_CMP_LEGACY;
                    } else {
                        e.ecx &= !EXT1_ECX_CMP_LEGACY;
                    }
                }
            }
            0x8000_0008 if amd => {
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (cpus - 1);
            }
            _ => {}
        }
    }

    let topology_leaves: &[u32] = if has_leaf_1f { &[0xb, 0x1f] } else { &[0xb] };
    for &leaf in topology_leaves {
        let flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        set_leaf(
            cpuid,
            leaf,
            0,
            flags,
            [0, 1, (LEVEL_TYPE_SMT << 8), apic_id],
        );
        set_leaf(
            cpuid,
            leaf,
            1,
            flags,
            [core_bits, cpus, (LEVEL_TYPE_CORE << 8) | 1, apic_id],
        );
        set_leaf(cpuid, leaf, 2, flags, [0, 0, 2, apic_id]);
        // Drop any deeper levels KVM reported (die, module, ...): barge has none.
        for e in cpuid.as_mut_slice().iter_mut() {
            if e.function == leaf && e.index > 2 {
                (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, e.index, apic_id);
            }
        }
    }

    let [b, c, d] = kvm_signature();
    set_leaf(
        cpuid,
        KVM_SIGNATURE_LEAF,
        0,
        0,
        [KVM_FEATURES_LEAF, b, c, d],
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn synthetic(vendor: &[u8; 12]) -> CpuId {
        let v = |i: usize| u32::from_le_bytes(vendor[i..i + 4].try_into().unwrap());
        CpuId::from_entries(&[
            entry(0, 0, [0x1f, v(0), v(8), v(4)]),
            entry(1, 0, [0x906ea, 0x00ff_0800, LEAF1_ECX_VMX, 0]),
            // L1d (level 1, type 1) and L3 (level 3, type 3).
            entry(4, 0, [0x121, 0, 0, 0]),
            entry(4, 1, [0x163, 0, 0, 0]),
            entry(4, 2, [0, 0, 0, 0]),
            entry(0xb, 0, [1, 2, 0x100, 0]),
            entry(0x1f, 0, [0, 0, 0, 0]),
            entry(0x1f, 3, [5, 5, 5, 5]),
            entry(0x8000_0001, 0, [0, 0, EXT1_ECX_SVM, 0]),
            entry(0x8000_0008, 0, [0x3030, 0, 0, 0]),
        ])
        .unwrap()
    }

    fn get(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("leaf {function:#x}.{index} missing"))
    }

    #[test]
    fn leaf1_has_apic_id_count_and_hypervisor_bit() {
        let mut cpuid = synthetic(b"GenuineIntel");
        patch_cpuid(&mut cpuid, 3, 4);
        let l1 = get(&cpuid, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(l1.ecx & LEAF1_ECX_VMX, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn leaf4_reports_cores_and_l3_sharing() {
        let mut cpuid = synthetic(b"GenuineIntel");
        patch_cpuid(&mut cpuid, 0, 4);
        let l1d = get(&cpuid, 4, 0);
        assert_eq!(l1d.eax >> 26, 3);
        assert_eq!((l1d.eax >> 14) & 0xfff, 0);
        assert_eq!(l1d.eax & 0x3fff, 0x121);
        let l3 = get(&cpuid, 4, 1);
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
        assert_eq!(get(&cpuid, 4, 2).eax, 0, "terminating subleaf untouched");
    }

    #[test]
    fn topology_leaves_describe_n_cores_of_one_thread() {
        let mut cpuid = synthetic(b"GenuineIntel");
        patch_cpuid(&mut cpuid, 5, 6);
        for leaf in [0xb, 0x1f] {
            let smt = get(&cpuid, leaf, 0);
            assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 5));
            let core = get(&cpuid, leaf, 1);
            assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 5));
            let end = get(&cpuid, leaf, 2);
            assert_eq!((end.ebx, (end.ecx >> 8) & 0xff), (0, 0));
            assert_ne!(end.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 0);
        }
        assert_eq!(get(&cpuid, 0x1f, 3).ebx, 0);
    }

    #[test]
    fn kvm_signature_leaf_is_present() {
        let mut cpuid = synthetic(b"GenuineIntel");
        patch_cpuid(&mut cpuid, 0, 1);
        let sig = get(&cpuid, KVM_SIGNATURE_LEAF, 0);
        let mut bytes = Vec::new();
        for r in [sig.ebx, sig.ecx, sig.edx] {
            bytes.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&bytes[..9], b"KVMKVMKVM");
        assert_eq!(sig.eax, KVM_FEATURES_LEAF);
        let l1 = get(&cpuid, 1, 0);
        assert_eq!(l1.edx & LEAF1_EDX_HTT, 0, "single CPU: no HTT");
    }

    #[test]
    fn nested_virtualization_is_not_offered_and_amd_reports_cores() {
        let mut cpuid = synthetic(b"AuthenticAMD");
        patch_cpuid(&mut cpuid, 1, 2);
        let ext1 = get(&cpuid, 0x8000_0001, 0);
        assert_eq!(ext1.ecx & EXT1_ECX_SVM, 0);
        assert_ne!(ext1.ecx & EXT1_ECX_CMP_LEGACY, 0);
        let ext8 = get(&cpuid, 0x8000_0008, 0);
        assert_eq!(ext8.ecx & 0xff, 1);
        assert_eq!(ext8.eax, 0x3030, "address sizes kept");
    }

    #[test]
    fn bits_for_rounds_up_to_a_power_of_two() {
        assert_eq!(
            [1, 2, 3, 4, 5, 8, 9, 254].map(bits_for),
            [0, 1, 2, 2, 3, 3, 4, 8]
        );
    }
}
