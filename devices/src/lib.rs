//! barge devices crate.
