//! How the VFIO host put memory into the IOMMU domain for device DMA: the
//! ioctl each domain took, as the report names it.
//!
//! | method           | ioctl                                   | memory                          |
//! |------------------|-----------------------------------------|---------------------------------|
//! | `type1-vaddr`    | VFIO_IOMMU_MAP_DMA (legacy container)   | a process address range         |
//! | `iommufd-vaddr`  | IOMMU_IOAS_MAP                          | a process address range         |
//! | `iommufd-memfd`  | IOMMU_IOAS_MAP_FILE (Linux 6.13+)       | a range of a memfd (guest RAM)  |
//! | `iommufd-dmabuf` | IOMMU_IOAS_MAP_FILE of a vfio-pci dma-buf (Linux 6.19+) | a BAR (peer to peer) |
//!
//! A VM whose devices were opened with both backends (`--vfio-backend auto`
//! with one device lacking a cdev) has both domains, and every range goes
//! into both: [`DmaMethods`] lists the method of each, container first.

use std::fmt;
use std::fs::File;

/// The ioctl one domain mapped a range with (see module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmaMethod {
    /// VFIO_IOMMU_MAP_DMA of a process address range (type1, pinned).
    Type1Vaddr,
    /// IOMMU_IOAS_MAP of a process address range (pinned).
    IommufdVaddr,
    /// IOMMU_IOAS_MAP_FILE of a memfd range.
    IommufdMemfd,
    /// IOMMU_IOAS_MAP_FILE of a dma-buf that vfio-pci exported for a BAR.
    IommufdDmabuf,
}

impl DmaMethod {
    /// The report's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Type1Vaddr => "type1-vaddr",
            Self::IommufdVaddr => "iommufd-vaddr",
            Self::IommufdMemfd => "iommufd-memfd",
            Self::IommufdDmabuf => "iommufd-dmabuf",
        }
    }
}

impl fmt::Display for DmaMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The method of each domain a range went into, container first; printed
/// joined with `+` (`type1-vaddr+iommufd-vaddr`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DmaMethods(pub Vec<DmaMethod>);

impl DmaMethods {
    /// Adds `other`'s methods not already listed.
    pub fn merge(&mut self, other: &DmaMethods) {
        for method in &other.0 {
            if !self.0.contains(method) {
                self.0.push(*method);
            }
        }
    }
}

impl fmt::Display for DmaMethods {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.0.iter().map(|method| method.name()).collect();
        f.write_str(&names.join("+"))
    }
}

/// A BAR range mapped for peer-to-peer DMA: how, and what must live until
/// it is unmapped (the dma-buf the IOAS maps, on the iommufd path).
#[derive(Debug, Default)]
pub struct BarDmaMapping {
    /// How each domain mapped it.
    pub methods: DmaMethods,
    /// The exported dma-buf, closed after the unmap.
    pub dma_buf: Option<File>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_print_joined_and_merge_without_repeats() {
        let mut methods = DmaMethods(vec![DmaMethod::Type1Vaddr]);
        assert_eq!(methods.to_string(), "type1-vaddr");
        methods.merge(&DmaMethods(vec![
            DmaMethod::Type1Vaddr,
            DmaMethod::IommufdDmabuf,
        ]));
        assert_eq!(methods.to_string(), "type1-vaddr+iommufd-dmabuf");
        assert_eq!(DmaMethods::default().to_string(), "");
    }
}
