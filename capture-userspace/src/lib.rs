//! capture: transparent traffic capture for service-mesh sidecars.
//!
//! [`flags`] turns istio-iptables' command line into a [`config::Config`]; [`app`] runs it with one of the
//! backends: [`ebpf`] (kernel programs fed from maps) or [`iptables`] (istio's own rules).
pub mod agent;
pub mod app;
pub mod cgroup;
pub mod config;
pub mod ebpf;
pub mod flags;
pub mod iptables;
pub mod namespace;
pub mod rtnl;
pub mod sockopt;
pub mod validation;
