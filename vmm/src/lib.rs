//! barge vmm crate.

pub mod bus;
pub mod exit;
pub mod power;
