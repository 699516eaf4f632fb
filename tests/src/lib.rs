//! barge's integration-test support: the nested KVM + VFIO lab.

pub mod lab;
