//! barge resources crate.
