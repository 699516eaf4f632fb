//! Capability lists in a configuration space read from a real device, and
//! a filter that hides chosen capabilities from the guest by unlinking them.
//!
//! Standard capabilities start at the pointer at 0x34 (valid when the
//! status register's capabilities-list bit is set) and live in 0x40..0xFF:
//! byte 0 is the ID, byte 1 the next pointer. Extended capabilities start at
//! 0x100 and live in 0x100..0xFFF: a dword header with the ID in bits 15:0,
//! the version in 19:16 and the next offset in 31:20.
//!
//! Walks are bounded: they stop at a pointer outside the capability area or
//! the buffer, at a capability already visited (a loop), or at an all-ones
//! extended header; [`CapabilityWalk::end`] says which. Garbage from the
//! device never panics and never loops.
//!
//! [`CapabilityFilter::plan`] computes a [`MaskPlan`]: the byte patches that
//! make the guest's walk skip hidden capabilities. A standard capability is
//! unlinked by rewriting the previous next pointer (or 0x34); an extended
//! one by rewriting the next field of the previous header; when the
//! capability at 0x100 is hidden, its header becomes a null capability
//! (ID 0, version 0) whose next field points at the first capability kept.
//! The hidden capabilities' bodies are left as they are: nothing reachable
//! points at them. A chain that loops or points out of range is cut after
//! its last good capability. The status register's capabilities-list bit
//! is left alone even when every standard capability is hidden (the
//! pointer is then 0, which guests treat as an empty list).

use std::collections::HashSet;

use super::config::{
    CAPABILITIES_POINTER_OFFSET, LEGACY_CONFIG_SPACE_SIZE, STATUS_CAPABILITIES_LIST, STATUS_OFFSET,
};

/// First offset a standard capability may occupy.
pub const STANDARD_CAPABILITIES_START: u16 = 0x40;
/// Offset of the first extended capability header.
pub const EXTENDED_CAPABILITIES_START: u16 = 0x100;
/// Standard capability ID: power management.
pub const CAP_ID_POWER_MANAGEMENT: u8 = 0x01;
/// Standard capability ID: MSI.
pub const CAP_ID_MSI: u8 = 0x05;
/// Standard capability ID: vendor specific.
pub const CAP_ID_VENDOR_SPECIFIC: u8 = 0x09;
/// Standard capability ID: PCI Express.
pub const CAP_ID_PCI_EXPRESS: u8 = 0x10;
/// Standard capability ID: MSI-X.
pub const CAP_ID_MSIX: u8 = 0x11;
/// Extended capability ID: advanced error reporting.
pub const EXT_CAP_ID_AER: u16 = 0x01;
/// Extended capability ID: single root I/O virtualization.
pub const EXT_CAP_ID_SRIOV: u16 = 0x10;
/// Extended capability ID: resizable BAR.
pub const EXT_CAP_ID_RESIZABLE_BAR: u16 = 0x15;
/// Extended capability ID: VF resizable BAR (part of SR-IOV; not hidden by
/// default, add it when a device has it).
pub const EXT_CAP_ID_VF_RESIZABLE_BAR: u16 = 0x24;

/// A capability ID in the standard or the extended list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CapabilityId {
    /// A standard capability (list from 0x34).
    Standard(u8),
    /// An extended capability (list from 0x100); ID 0 is the null capability.
    Extended(u16),
}

/// One capability found by a walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability {
    pub id: CapabilityId,
    /// Its offset in configuration space.
    pub offset: u16,
    /// The extended capability's version (0 for standard capabilities).
    pub version: u8,
}

/// How a walk ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkEnd {
    /// A next pointer of 0 (or no list at all).
    Complete,
    /// The capability at `from` points back at `pointer`, already visited.
    Loop {
        /// The capability whose next pointer loops (0x34 for the head).
        from: u16,
        /// The pointer, already visited.
        pointer: u16,
    },
    /// The capability at `from` points outside the capability area or the
    /// buffer.
    BadPointer {
        /// The capability whose next pointer is bad (0x34 for the head).
        from: u16,
        pointer: u16,
    },
    /// An extended header of all-ones after the first one (the device
    /// stopped answering, or the pointer leads into unimplemented space).
    AllOnesHeader {
        /// Where the header is.
        offset: u16,
    },
}

/// The capabilities of one list, in list order, and how the walk ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapabilityWalk {
    /// Capabilities in list order.
    pub capabilities: Vec<Capability>,
    /// How the walk ended.
    pub end: WalkEnd,
}

/// Walks the standard capability list of `config` (a configuration space
/// from offset 0, any length). Empty when the status register's
/// capabilities-list bit is clear or the buffer is shorter than a header.
pub fn standard_capabilities(config: &[u8]) -> CapabilityWalk {
    let mut walk = CapabilityWalk {
        capabilities: Vec::new(),
        end: WalkEnd::Complete,
    };
    let status = read_u16(config, STATUS_OFFSET).unwrap_or(0);
    if status & STATUS_CAPABILITIES_LIST == 0 {
        return walk;
    }
    let limit = config.len().min(LEGACY_CONFIG_SPACE_SIZE);
    let mut visited = HashSet::new();
    let mut from = CAPABILITIES_POINTER_OFFSET;
    let mut pointer = u16::from(config.get(usize::from(from)).copied().unwrap_or(0) & 0xfc);
    while pointer != 0 {
        if pointer < STANDARD_CAPABILITIES_START || usize::from(pointer) + 2 > limit {
            walk.end = WalkEnd::BadPointer { from, pointer };
            return walk;
        }
        if !visited.insert(pointer) {
            walk.end = WalkEnd::Loop { from, pointer };
            return walk;
        }
        let offset = usize::from(pointer);
        walk.capabilities.push(Capability {
            id: CapabilityId::Standard(config[offset]),
            offset: pointer,
            version: 0,
        });
        from = pointer;
        pointer = u16::from(config[offset + 1] & 0xfc);
    }
    walk
}

/// Walks the extended capability list of `config` (a configuration space
/// from offset 0). Empty when the buffer has no extended space or the
/// header at 0x100 is 0 or all-ones. Null capabilities (ID 0) are listed.
pub fn extended_capabilities(config: &[u8]) -> CapabilityWalk {
    let mut walk = CapabilityWalk {
        capabilities: Vec::new(),
        end: WalkEnd::Complete,
    };
    let mut visited = HashSet::new();
    let mut from = 0;
    let mut pointer = EXTENDED_CAPABILITIES_START;
    loop {
        let Some(header) = read_u32(config, pointer) else {
            if pointer != EXTENDED_CAPABILITIES_START {
                walk.end = WalkEnd::BadPointer { from, pointer };
            }
            return walk;
        };
        if pointer == EXTENDED_CAPABILITIES_START && (header == 0 || header == u32::MAX) {
            return walk;
        }
        if header == u32::MAX {
            walk.end = WalkEnd::AllOnesHeader { offset: pointer };
            return walk;
        }
        if !visited.insert(pointer) {
            walk.end = WalkEnd::Loop { from, pointer };
            return walk;
        }
        walk.capabilities.push(Capability {
            id: CapabilityId::Extended((header & 0xffff) as u16),
            offset: pointer,
            version: ((header >> 16) & 0xf) as u8,
        });
        from = pointer;
        pointer = ((header >> 20) & 0xffc) as u16;
        if pointer == 0 {
            return walk;
        }
        if pointer < EXTENDED_CAPABILITIES_START {
            walk.end = WalkEnd::BadPointer { from, pointer };
            return walk;
        }
    }
}

/// Which capabilities to hide from the guest.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CapabilityFilter {
    hidden: Vec<CapabilityId>,
}

/// Bytes of configuration space the guest must read differently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigPatch {
    /// Where the bytes start.
    pub offset: u16,
    /// What the guest reads there (1 byte for a standard next pointer, 4
    /// for an extended header).
    pub bytes: Vec<u8>,
}

/// What [`CapabilityFilter::plan`] found and how to hide what it hides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskPlan {
    /// The standard list as the device has it.
    pub standard: CapabilityWalk,
    /// The extended list as the device has it.
    pub extended: CapabilityWalk,
    /// The capabilities found (both lists, null capabilities left out).
    pub found: Vec<Capability>,
    /// The capabilities hidden (a subset of `found`).
    pub masked: Vec<Capability>,
    /// The patches that unlink them, by offset.
    pub patches: Vec<ConfigPatch>,
}

impl CapabilityFilter {
    /// A filter that hides nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// The filter for passthrough: hides resizable BAR (a guest resizing a
    /// BAR would move it out of the plan) and SR-IOV (barge does not create
    /// VFs).
    pub fn passthrough() -> Self {
        Self::new()
            .hide(CapabilityId::Extended(EXT_CAP_ID_RESIZABLE_BAR))
            .hide(CapabilityId::Extended(EXT_CAP_ID_SRIOV))
    }

    /// Also hides `id`.
    pub fn hide(mut self, id: CapabilityId) -> Self {
        if !self.hidden.contains(&id) {
            self.hidden.push(id);
        }
        self
    }

    /// The IDs this filter hides.
    pub fn hidden(&self) -> &[CapabilityId] {
        &self.hidden
    }

    /// Walks both lists of `config` and plans the patches that hide this
    /// filter's capabilities. Hiding the null capability (extended ID 0)
    /// has no effect.
    pub fn plan(&self, config: &[u8]) -> MaskPlan {
        let standard = standard_capabilities(config);
        let extended = extended_capabilities(config);
        let is_hidden =
            |cap: &Capability| cap.id != CapabilityId::Extended(0) && self.hidden.contains(&cap.id);
        let found: Vec<Capability> = standard
            .capabilities
            .iter()
            .chain(&extended.capabilities)
            .filter(|cap| cap.id != CapabilityId::Extended(0))
            .copied()
            .collect();
        let masked = found.iter().filter(|cap| is_hidden(cap)).copied().collect();
        let mut patches = Vec::new();

        // Standard: 0x34 -> kept[0] -> kept[1] -> ... -> 0.
        let kept: Vec<u16> = standard
            .capabilities
            .iter()
            .filter(|cap| !is_hidden(cap))
            .map(|cap| cap.offset)
            .collect();
        let links = std::iter::once(CAPABILITIES_POINTER_OFFSET)
            .chain(kept.iter().map(|offset| offset + 1));
        let targets = kept.iter().copied().chain(std::iter::once(0));
        if !standard.capabilities.is_empty() || standard.end != WalkEnd::Complete {
            for (link, target) in links.zip(targets) {
                let current = config.get(usize::from(link)).map(|b| u16::from(b & 0xfc));
                if current != Some(target) {
                    patches.push(ConfigPatch {
                        offset: link,
                        bytes: vec![target as u8],
                    });
                }
            }
        }

        // Extended: the node at 0x100 always stays (as a null capability
        // when hidden), then the kept ones.
        if let Some((first, rest)) = extended.capabilities.split_first() {
            let mut nodes = vec![(
                first.offset,
                if is_hidden(first) {
                    0
                } else {
                    read_u32(config, first.offset).unwrap_or(0) & 0x000f_ffff
                },
            )];
            nodes.extend(rest.iter().filter(|cap| !is_hidden(cap)).map(|cap| {
                (
                    cap.offset,
                    read_u32(config, cap.offset).unwrap_or(0) & 0x000f_ffff,
                )
            }));
            let targets: Vec<u16> = nodes
                .iter()
                .skip(1)
                .map(|(offset, _)| *offset)
                .chain(std::iter::once(0))
                .collect();
            for ((offset, id_and_version), target) in nodes.iter().zip(targets) {
                let header = id_and_version | (u32::from(target) << 20);
                if read_u32(config, *offset) != Some(header) {
                    patches.push(ConfigPatch {
                        offset: *offset,
                        bytes: header.to_le_bytes().to_vec(),
                    });
                }
            }
        }
        patches.sort_by_key(|patch| patch.offset);
        MaskPlan {
            standard,
            extended,
            found,
            masked,
            patches,
        }
    }
}

impl MaskPlan {
    /// Writes the patches into `config` (a configuration space from offset
    /// 0); bytes beyond its end are skipped.
    pub fn apply(&self, config: &mut [u8]) {
        for patch in &self.patches {
            for (i, byte) in patch.bytes.iter().enumerate() {
                if let Some(target) = config.get_mut(usize::from(patch.offset) + i) {
                    *target = *byte;
                }
            }
        }
    }

    /// Patches `data`, the bytes a read at `offset` returned from the
    /// device, so the guest sees the unlinked lists.
    pub fn overlay(&self, offset: u16, data: &mut [u8]) {
        let start = usize::from(offset);
        let end = start + data.len();
        for patch in &self.patches {
            for (i, byte) in patch.bytes.iter().enumerate() {
                let position = usize::from(patch.offset) + i;
                if (start..end).contains(&position) {
                    data[position - start] = *byte;
                }
            }
        }
    }
}

fn read_u16(config: &[u8], offset: u16) -> Option<u16> {
    let start = usize::from(offset);
    let bytes = config.get(start..start + 2)?;
    Some(u16::from_le_bytes([bytes[0], bytes[1]]))
}

fn read_u32(config: &[u8], offset: u16) -> Option<u32> {
    let start = usize::from(offset);
    let bytes = config.get(start..start + 4)?;
    Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::CONFIG_SPACE_SIZE;

    /// A config space with the given standard caps `(offset, id)` linked in
    /// order and extended caps `(offset, id, version)` linked in order.
    fn space(standard: &[(u8, u8)], extended: &[(u16, u16, u8)]) -> Vec<u8> {
        let mut config = vec![0u8; CONFIG_SPACE_SIZE];
        if let Some((first, _)) = standard.first() {
            config[0x06] = STATUS_CAPABILITIES_LIST as u8;
            config[0x34] = *first;
        }
        for (i, (offset, id)) in standard.iter().enumerate() {
            config[usize::from(*offset)] = *id;
            config[usize::from(*offset) + 1] = standard.get(i + 1).map_or(0, |(next, _)| *next);
        }
        for (i, (offset, id, version)) in extended.iter().enumerate() {
            let next = extended.get(i + 1).map_or(0, |(next, _, _)| *next);
            let header = u32::from(*id) | (u32::from(*version) << 16) | (u32::from(next) << 20);
            config[usize::from(*offset)..usize::from(*offset) + 4]
                .copy_from_slice(&header.to_le_bytes());
        }
        config
    }

    fn ids(walk: &CapabilityWalk) -> Vec<CapabilityId> {
        walk.capabilities.iter().map(|cap| cap.id).collect()
    }

    fn gpu_like() -> Vec<u8> {
        space(
            &[
                (0x60, CAP_ID_POWER_MANAGEMENT),
                (0x68, CAP_ID_MSI),
                (0x78, CAP_ID_PCI_EXPRESS),
                (0xb4, CAP_ID_MSIX),
            ],
            &[
                (0x100, EXT_CAP_ID_AER, 2),
                (0x250, EXT_CAP_ID_RESIZABLE_BAR, 1),
                (0x258, 0x1e, 1),
                (0xbb0, EXT_CAP_ID_SRIOV, 1),
                (0xc1c, 0x0b, 1),
            ],
        )
    }

    #[test]
    fn walks_both_lists_in_order() {
        let config = gpu_like();
        let standard = standard_capabilities(&config);
        assert_eq!(standard.end, WalkEnd::Complete);
        assert_eq!(
            ids(&standard),
            [0x01, 0x05, 0x10, 0x11].map(CapabilityId::Standard)
        );
        let extended = extended_capabilities(&config);
        assert_eq!(extended.end, WalkEnd::Complete);
        assert_eq!(
            extended.capabilities[0],
            Capability {
                id: CapabilityId::Extended(1),
                offset: 0x100,
                version: 2
            }
        );
        assert_eq!(
            extended
                .capabilities
                .iter()
                .map(|cap| cap.offset)
                .collect::<Vec<_>>(),
            [0x100, 0x250, 0x258, 0xbb0, 0xc1c]
        );
    }

    #[test]
    fn no_list_when_status_bit_clear_or_buffer_short() {
        let mut config = gpu_like();
        config[0x06] = 0;
        assert!(standard_capabilities(&config).capabilities.is_empty());
        assert!(standard_capabilities(&[]).capabilities.is_empty());
        assert!(extended_capabilities(&config[..0x100])
            .capabilities
            .is_empty());
        assert!(extended_capabilities(&config[..0x103])
            .capabilities
            .is_empty());
        let mut no_ext = gpu_like();
        no_ext[0x100..0x104].fill(0xff);
        assert_eq!(extended_capabilities(&no_ext).capabilities, []);
        assert_eq!(extended_capabilities(&no_ext).end, WalkEnd::Complete);
    }

    #[test]
    fn standard_walk_stops_at_loops_and_bad_pointers() {
        let mut config = gpu_like();
        config[0xb5] = 0x68; // MSI-X points back at MSI.
        let walk = standard_capabilities(&config);
        assert_eq!(walk.capabilities.len(), 4);
        assert_eq!(
            walk.end,
            WalkEnd::Loop {
                from: 0xb4,
                pointer: 0x68
            }
        );
        config[0xb5] = 0x3c; // Into the header.
        assert_eq!(
            standard_capabilities(&config).end,
            WalkEnd::BadPointer {
                from: 0xb4,
                pointer: 0x3c
            }
        );
        config[0x61] = 0x60; // Self loop on the first.
        let walk = standard_capabilities(&config);
        assert_eq!(walk.capabilities.len(), 1);
        assert_eq!(
            walk.end,
            WalkEnd::Loop {
                from: 0x60,
                pointer: 0x60
            }
        );
        // Buffer ends inside the list.
        let walk = standard_capabilities(&gpu_like()[..0x70]);
        assert_eq!(walk.capabilities.len(), 2);
        assert_eq!(
            walk.end,
            WalkEnd::BadPointer {
                from: 0x68,
                pointer: 0x78
            }
        );
    }

    #[test]
    fn standard_walk_ignores_low_pointer_bits() {
        let mut config = gpu_like();
        config[0x34] = 0x63;
        config[0x61] = 0x6b;
        assert_eq!(standard_capabilities(&config).capabilities.len(), 4);
    }

    #[test]
    fn extended_walk_stops_at_loops_bad_pointers_and_all_ones() {
        let mut config = gpu_like();
        let set_next = |config: &mut Vec<u8>, offset: usize, next: u32| {
            let header = u32::from_le_bytes(config[offset..offset + 4].try_into().unwrap());
            let header = (header & 0x000f_ffff) | (next << 20);
            config[offset..offset + 4].copy_from_slice(&header.to_le_bytes());
        };
        set_next(&mut config, 0xc1c, 0x100);
        assert_eq!(
            extended_capabilities(&config).end,
            WalkEnd::Loop {
                from: 0xc1c,
                pointer: 0x100
            }
        );
        set_next(&mut config, 0xc1c, 0x40);
        assert_eq!(
            extended_capabilities(&config).end,
            WalkEnd::BadPointer {
                from: 0xc1c,
                pointer: 0x40
            }
        );
        set_next(&mut config, 0xc1c, 0xffc);
        config[0xffc..0x1000].fill(0xff);
        assert_eq!(
            extended_capabilities(&config).end,
            WalkEnd::AllOnesHeader { offset: 0xffc }
        );
        let walk = extended_capabilities(&config[..0x300]);
        assert_eq!(
            walk.end,
            WalkEnd::BadPointer {
                from: 0x258,
                pointer: 0xbb0
            }
        );
    }

    #[test]
    fn garbage_configs_never_panic_and_stay_bounded() {
        // Deterministic pseudo-random bytes (xorshift).
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..200 {
            let mut config = vec![0u8; CONFIG_SPACE_SIZE];
            for byte in config.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *byte = state as u8;
            }
            config[0x06] |= STATUS_CAPABILITIES_LIST as u8;
            let plan = CapabilityFilter::passthrough()
                .hide(CapabilityId::Standard(0x05))
                .plan(&config);
            assert!(plan.standard.capabilities.len() <= 48);
            assert!(plan.extended.capabilities.len() <= 960);
            let mut patched = config.clone();
            plan.apply(&mut patched);
            // The patched lists are well formed and contain nothing hidden.
            let standard = standard_capabilities(&patched);
            let extended = extended_capabilities(&patched);
            assert_eq!(standard.end, WalkEnd::Complete);
            assert!(
                matches!(extended.end, WalkEnd::Complete),
                "{:?}",
                extended.end
            );
            for cap in standard.capabilities.iter().chain(&extended.capabilities) {
                assert!(!plan
                    .masked
                    .iter()
                    .any(|m| m.offset == cap.offset && m.id == cap.id));
                assert!(!matches!(
                    cap.id,
                    CapabilityId::Extended(0x10 | 0x15) | CapabilityId::Standard(0x05)
                ));
            }
        }
    }

    #[test]
    fn passthrough_filter_hides_resizable_bar_and_sriov() {
        let config = gpu_like();
        let plan = CapabilityFilter::passthrough().plan(&config);
        assert_eq!(plan.found.len(), 9);
        assert_eq!(
            plan.masked
                .iter()
                .map(|cap| (cap.id, cap.offset))
                .collect::<Vec<_>>(),
            [
                (CapabilityId::Extended(0x15), 0x250),
                (CapabilityId::Extended(0x10), 0xbb0)
            ]
        );
        // AER now points at 0x258, 0x258 at 0xc1c.
        assert_eq!(plan.patches.len(), 2);
        let mut patched = config.clone();
        plan.apply(&mut patched);
        assert_eq!(
            extended_capabilities(&patched)
                .capabilities
                .iter()
                .map(|cap| cap.offset)
                .collect::<Vec<_>>(),
            [0x100, 0x258, 0xc1c]
        );
        // IDs and versions of the predecessors are preserved.
        assert_eq!(extended_capabilities(&patched).capabilities[0].version, 2);
        assert_eq!(
            standard_capabilities(&patched),
            standard_capabilities(&config)
        );
    }

    #[test]
    fn hiding_the_first_extended_capability_leaves_a_null_capability() {
        let config = space(
            &[],
            &[
                (0x100, EXT_CAP_ID_RESIZABLE_BAR, 1),
                (0x140, EXT_CAP_ID_SRIOV, 1),
                (0x180, 0x0b, 1),
            ],
        );
        let plan = CapabilityFilter::passthrough().plan(&config);
        assert_eq!(plan.masked.len(), 2);
        let mut patched = config.clone();
        plan.apply(&mut patched);
        assert_eq!(
            u32::from_le_bytes(patched[0x100..0x104].try_into().unwrap()),
            0x1800_0000
        );
        let walk = extended_capabilities(&patched);
        assert_eq!(
            walk.capabilities
                .iter()
                .map(|cap| (cap.id, cap.offset))
                .collect::<Vec<_>>(),
            [
                (CapabilityId::Extended(0), 0x100),
                (CapabilityId::Extended(0x0b), 0x180)
            ]
        );
        // A null capability is not "found".
        let replan = CapabilityFilter::passthrough().plan(&patched);
        assert_eq!(replan.found.len(), 1);
        assert!(replan.patches.is_empty());
    }

    #[test]
    fn hiding_every_extended_capability_leaves_an_empty_header() {
        let config = space(
            &[],
            &[
                (0x100, EXT_CAP_ID_RESIZABLE_BAR, 1),
                (0x140, EXT_CAP_ID_SRIOV, 1),
            ],
        );
        let plan = CapabilityFilter::passthrough().plan(&config);
        let mut patched = config.clone();
        plan.apply(&mut patched);
        assert_eq!(&patched[0x100..0x104], &[0, 0, 0, 0]);
        assert!(extended_capabilities(&patched).capabilities.is_empty());
    }

    #[test]
    fn hiding_standard_capabilities_rewrites_previous_pointers() {
        let config = gpu_like();
        let filter = CapabilityFilter::new()
            .hide(CapabilityId::Standard(CAP_ID_POWER_MANAGEMENT))
            .hide(CapabilityId::Standard(CAP_ID_MSIX));
        let plan = filter.plan(&config);
        assert_eq!(
            plan.patches,
            [
                ConfigPatch {
                    offset: 0x34,
                    bytes: vec![0x68]
                },
                ConfigPatch {
                    offset: 0x79,
                    bytes: vec![0]
                }
            ]
        );
        let mut patched = config.clone();
        plan.apply(&mut patched);
        assert_eq!(
            ids(&standard_capabilities(&patched)),
            [0x05, 0x10].map(CapabilityId::Standard)
        );
        // Consecutive hidden ones in the middle.
        let filter = CapabilityFilter::new()
            .hide(CapabilityId::Standard(CAP_ID_MSI))
            .hide(CapabilityId::Standard(CAP_ID_PCI_EXPRESS));
        let mut patched = config.clone();
        filter.plan(&config).apply(&mut patched);
        assert_eq!(patched[0x61], 0xb4);
        // All hidden: the head pointer becomes 0.
        let mut filter = CapabilityFilter::new();
        for id in [1, 5, 0x10, 0x11] {
            filter = filter.hide(CapabilityId::Standard(id));
        }
        let mut patched = config.clone();
        filter.plan(&config).apply(&mut patched);
        assert_eq!(patched[0x34], 0);
        assert!(standard_capabilities(&patched).capabilities.is_empty());
    }

    #[test]
    fn a_filter_that_hides_nothing_present_changes_nothing() {
        let config = gpu_like();
        let plan = CapabilityFilter::new()
            .hide(CapabilityId::Extended(0x99))
            .hide(CapabilityId::Extended(0))
            .plan(&config);
        assert!(plan.masked.is_empty());
        assert!(plan.patches.is_empty());
        let plan = CapabilityFilter::passthrough().plan(&space(&[], &[]));
        assert!(plan.found.is_empty() && plan.patches.is_empty());
        assert_eq!(
            CapabilityFilter::passthrough()
                .hide(CapabilityId::Extended(0x10))
                .hidden()
                .len(),
            2
        );
    }

    #[test]
    fn a_looping_list_is_cut_after_its_last_good_capability() {
        let mut config = gpu_like();
        config[0xb5] = 0x68;
        let plan = CapabilityFilter::new().plan(&config);
        assert_eq!(
            plan.patches,
            [ConfigPatch {
                offset: 0xb5,
                bytes: vec![0]
            }]
        );
    }

    #[test]
    fn overlay_patches_reads_of_every_width() {
        let config = gpu_like();
        let plan = CapabilityFilter::passthrough().plan(&config);
        let mut patched = config.clone();
        plan.apply(&mut patched);
        for offset in 0x0f0u16..0x270 {
            for len in [1usize, 2, 4] {
                let start = usize::from(offset);
                let mut data = config[start..start + len].to_vec();
                plan.overlay(offset, &mut data);
                assert_eq!(
                    data,
                    &patched[start..start + len],
                    "offset {offset:#x} len {len}"
                );
            }
        }
        let mut data = [0u8; 4];
        plan.overlay(u16::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }
}
