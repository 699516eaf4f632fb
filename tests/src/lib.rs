//! barge's integration-test support: the nested KVM + VFIO lab, and the
//! helpers the integration tests share to drive it.

pub mod bar_passthrough;
pub mod debian;
pub mod harness;
pub mod lab;
pub mod nvme;
