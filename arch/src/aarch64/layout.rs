//! The aarch64 guest physical address map, in address order.
