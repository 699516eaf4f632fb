//! The KVM machine: opening KVM, the VM and its memslots, vCPU threads and
//! their exits, guest RAM and the host mappings behind it, pre-faulting
//! and KVM's statistics. The thin modules here (`kvm`, `mapping`,
//! `prefault`, the mmap part of `memory`) hold the ioctls and mmaps; the
//! logic above them has no `unsafe`.

pub mod exit;
pub mod kvm;
pub mod kvm_stats;
pub mod mapping;
pub mod memory;
pub mod prefault;
pub mod vcpu;
pub mod vm;
