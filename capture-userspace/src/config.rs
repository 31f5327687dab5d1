//! The validated capture configuration: what istio-iptables' flags and env vars mean, after parsing.
//!
//! [`crate::flags`] builds a [`Config`] and its [`Options`] from the command line and the environment; the
//! backends only ever see these, so every value here has already been checked.

use ipnet::{IpNet, Ipv4Net};

pub mod options;

pub use options::{
    Action, Backend, DEFAULT_PIN_DIR, DEFAULT_RESOLV_CONF, Invocation, IptablesFlavour, LogLevel, Options,
};

/// Inbound interception mode (`-m`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterceptionMode {
    /// nat REDIRECT (istio's default; also what any value other than `TPROXY` means to istio-iptables).
    Redirect,
    /// mangle TPROXY: the original destination stays the local address.
    Tproxy,
}

/// Which inbound ports are captured (`-b`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InboundPorts {
    /// `""`: no inbound capture at all.
    None,
    /// `*`: every TCP port except `-d` ports and the tunnel port.
    All,
    /// An explicit list, in the order given.
    List(Vec<u16>),
}

/// Which outbound destinations are captured (`-i`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IncludeCidrs {
    /// `*`: every destination not excluded earlier.
    All,
    /// An explicit list, in the order given (possibly empty: no CIDR capture).
    List(Vec<IpNet>),
}

impl IncludeCidrs {
    /// istio's `HasLoopBackIP`: any listed prefix whose address is a loopback address. It removes the
    /// "local traffic of other users passes" rules (c2/d2), in both families.
    pub fn has_loopback(&self) -> bool {
        match self {
            IncludeCidrs::All => false,
            // Go's `IsLoopback` unmaps an IPv4-mapped address first: `::ffff:127.0.0.1/128` counts too.
            IncludeCidrs::List(cidrs) => cidrs.iter().any(|c| c.addr().to_canonical().is_loopback()),
        }
    }
}

/// A uid or gid as given on the command line: the token is rendered into iptables rules verbatim (istio
/// pastes it into `--uid-owner`), the number is what the kernel compares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    /// The text given (a number or a user/group name).
    pub token: String,
    /// The numeric id it names.
    pub id: u32,
}

/// Outbound owner-group filter (`ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnerGroups {
    /// Include `*` (the default): capture every group except these (possibly none).
    AllExcept(Vec<Owner>),
    /// Capture only sockets whose gid is one of these (at most [`MAX_OWNER_GROUPS`]).
    Only(Vec<Owner>),
}

/// istio's limit on a non-wildcard owner-groups include list.
pub const MAX_OWNER_GROUPS: usize = 64;

/// The capture configuration, one field per istio-iptables input that changes what is captured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// `-p`: the proxy's outbound listener.
    pub proxy_port: u16,
    /// `-z`: the proxy's inbound listener.
    pub inbound_capture_port: u16,
    /// `-e`: the HBONE tunnel port, never captured inbound.
    pub inbound_tunnel_port: u16,
    /// `-u`: proxy uids, in order (the order matters, see `docs/istio-rules.md#interactions-and-gotchas`).
    pub proxy_uids: Vec<Owner>,
    /// `-g`: proxy gids, in order.
    pub proxy_gids: Vec<Owner>,
    /// `-m`.
    pub mode: InterceptionMode,
    /// `-t`: TPROXY fwmark.
    pub tproxy_mark: u32,
    /// `-r`: TPROXY routing table.
    pub tproxy_route_table: u32,
    /// `-b`.
    pub inbound_ports: InboundPorts,
    /// `-d`: only used when `-b` is `*`.
    pub inbound_exclude_ports: Vec<u16>,
    /// `-c`: interfaces whose traffic is never captured.
    pub exclude_interfaces: Vec<String>,
    /// `-i`.
    pub include_cidrs: IncludeCidrs,
    /// `-x`.
    pub exclude_cidrs: Vec<IpNet>,
    /// `-q`: TCP ports captured outbound to any non-excluded destination.
    pub outbound_ports: Vec<u16>,
    /// `-o`: TCP and UDP ports never captured outbound (wins over everything).
    pub outbound_exclude_ports: Vec<u16>,
    /// `-k`: interfaces whose inbound traffic is treated as outbound.
    pub kube_virt_interfaces: Vec<String>,
    /// `--redirect-dns`.
    pub redirect_dns: bool,
    /// `--capture-all-dns`.
    pub capture_all_dns: bool,
    /// `--drop-invalid`.
    pub drop_invalid: bool,
    /// `--dual-stack`: IPv6 rules whenever the namespace has any global IPv6 address.
    pub dual_stack: bool,
    /// `ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]`.
    pub owner_groups: OwnerGroups,
    /// `ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`: what "localhost" means for IPv4 (v6 is always `::1/128`).
    pub loopback_cidr_v4: Ipv4Net,
    /// `--loopback-accel` (capture's own, eBPF backend only): sends between two sockets of the namespace
    /// skip the loopback TCP/IP path.
    pub loopback_accel: bool,
}

/// The DNS port, and the istio-agent DNS proxy port that captured DNS goes to (hard-coded in istio); defined
/// once, beside the decision model that uses them in the kernel.
pub use capture_common::model::{DNS_PORT, DNS_PROXY_PORT};
/// Mark that TPROXY mode puts on the proxy's own packets to local addresses outside the loopback CIDR
/// (hard-coded in istio).
pub const TPROXY_OUTBOUND_MARK: u32 = 1338;

#[cfg(test)]
mod tests {
    use super::*;

    fn include(list: &str) -> IncludeCidrs {
        IncludeCidrs::List(list.split(',').map(|c| c.parse().unwrap()).collect())
    }

    #[test]
    fn a_loopback_include_is_found_in_either_family_and_mapped() {
        assert!(include("10.0.0.0/8,127.1.2.3/32").has_loopback());
        assert!(include("::1/128").has_loopback());
        // Go's netip unmaps before IsLoopback; Rust's Ipv6Addr::is_loopback alone would say no.
        assert!(include("::ffff:127.0.0.1/128").has_loopback());
        assert!(!include("::ffff:10.0.0.0/104,::/0,10.0.0.0/8").has_loopback());
        assert!(!IncludeCidrs::All.has_loopback());
    }
}
