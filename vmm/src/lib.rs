//! barge vmm crate.
