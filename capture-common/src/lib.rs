//! Types shared by the kernel programs (`capture-ebpf`) and the userspace loader (`capture-userspace`),
//! and the capture decision itself.
//!
//! `no_std` when built for the bpf target, `std` on the host so that everything here is unit-tested there.
//! The kernel programs call [`model::outbound`] directly: one decision, written once.
#![cfg_attr(target_arch = "bpf", no_std)]

pub mod addr;
pub mod counters;
pub mod maps;
pub mod model;
pub mod sock;
