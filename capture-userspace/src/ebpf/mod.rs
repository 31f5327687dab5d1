//! The eBPF backend: kernel programs attached to a cgroup, fed from maps filled from the same flags.

use anyhow::{Result, bail};

use crate::{config::Environment, flags::Invocation};

/// The kernel programs, built by build.rs and embedded in this binary.
pub static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/capture-ebpf"));

/// Runs one invocation with the eBPF backend.
pub fn run(_inv: &Invocation, _env: &Environment) -> Result<String> {
    bail!("the eBPF backend cannot capture yet (only its toolchain is in place); use --backend iptables")
}
