//! aarch64 boot set-up: the guest physical map ([`layout`]), the flattened device tree and
//! the boot vCPU's register state, as plain data.

pub mod layout;
