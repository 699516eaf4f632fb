//! barge arch crate.
