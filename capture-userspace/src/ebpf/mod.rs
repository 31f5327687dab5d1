//! The eBPF backend.

/// The kernel programs, built by build.rs and embedded in this binary.
pub static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/capture"));
