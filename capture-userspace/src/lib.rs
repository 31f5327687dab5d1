//! capture: transparent traffic capture for service-mesh sidecars.
pub mod ebpf;
