//! The virtio-pci modern transport (in progress).
