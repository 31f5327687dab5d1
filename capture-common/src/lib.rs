//! Types shared by the kernel programs (`capture-ebpf`) and the userspace loader (`capture-userspace`).
//!
//! `no_std` when built for the bpf target, `std` on the host so that everything here is unit-tested there.
#![cfg_attr(target_arch = "bpf", no_std)]

pub mod counters;
