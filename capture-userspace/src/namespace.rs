//! What capture detects in the target network namespace instead of taking it as a flag, in one type
//! ([`Environment`]): whether IPv6 capture is on and the DNS servers (as istio-iptables detects them), and
//! the addresses and interfaces the eBPF backend needs; and entering a namespace given by
//! `--network-namespace`. Depends on [`crate::config`] and [`crate::rtnl`] only; the backends take these
//! types from here.

use std::{fs::File, net::IpAddr, path::Path};

use anyhow::{Context as _, Result};

use ipnet::IpNet;

use crate::{config::Config, rtnl};

/// `SO_NETNS_COOKIE` (asm-generic/socket.h): a namespace's cookie, as BPF programs see it.
const SO_NETNS_COOKIE: libc::c_int = 71;
/// The proxy's IPv6 inbound-passthrough source address (`::6`), which istio adds to lo when IPv6 is on.
const PASSTHROUGH_V6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6);

/// A DNS server from resolv.conf. The text is kept because istio pastes it into rules verbatim
/// (`::127.0.0.53` stays `::127.0.0.53`, where Rust would print `::7f00:35`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nameserver {
    /// The parsed address.
    pub addr: IpAddr,
    /// The address as written in resolv.conf.
    pub text: String,
}

/// What capture detects in the target network namespace rather than takes as flags (see [`detect`]). The
/// iptables backend reads the first two fields (istio's own detection); the eBPF backend all of them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Environment {
    /// Whether IPv6 capture is on (istio's `EnableIPv6`): detected from the namespace's addresses.
    pub ipv6: bool,
    /// resolv.conf nameservers, read only when `--redirect-dns` is on and `--capture-all-dns` is off.
    pub nameservers: Vec<Nameserver>,
    /// Every address of the namespace: a connection to one of them is local (`-o lo` to iptables).
    pub local: Vec<IpAddr>,
    /// The subnets of the `-c` interfaces (see `capture_common::maps::CidrKind::ExcludedInterface`).
    pub excluded_subnets: Vec<IpNet>,
    /// Indexes of the `-c` interfaces (inbound).
    pub excluded_ifindexes: Vec<u32>,
    /// Indexes of the `-k` interfaces.
    pub virt_ifindexes: Vec<u32>,
}

impl Environment {
    /// The namespace's own address of one family, the source of its redirected connections
    /// ([`capture_common::model::redirect_source`]): its first global address in the kernel's order (not
    /// loopback, not link-local, as istio's IPv6 detection counts them, and not in `::/96`, where the
    /// passthrough address `::6` that capture adds to lo is). In a pod, eth0's: the address the kernel picks
    /// for any destination off the pod. A pod with several interfaces gets this one for every destination,
    /// which the README states.
    pub fn pod_address(&self, v6: bool) -> Option<IpAddr> {
        self.local.iter().copied().find(|a| {
            let compatible = matches!(a, IpAddr::V6(v6) if v6.segments()[..6] == [0; 6]);
            a.is_ipv6() == v6 && !a.is_loopback() && !is_link_local(a) && !compatible
        })
    }

    /// Nameservers of one family.
    pub fn nameservers(&self, v6: bool) -> impl Iterator<Item = &Nameserver> {
        self.nameservers.iter().filter(move |n| n.addr.is_ipv6() == v6)
    }

    /// istio's "DNS is effective": `--redirect-dns` and (capture-all or any nameserver of either family).
    /// It changes the proxy-uid rules of both families.
    pub fn dns_effective(&self, config: &Config) -> bool {
        config.redirect_dns && (config.capture_all_dns || !self.nameservers.is_empty())
    }

    /// DNS capture for one family: effective and (capture-all or a nameserver of that family).
    pub fn dns_effective_for(&self, config: &Config, v6: bool) -> bool {
        config.redirect_dns && (config.capture_all_dns || self.nameservers(v6).next().is_some())
    }

    /// Adds `::6` to lo when IPv6 is on, as istio does: the proxy binds it as its inbound passthrough
    /// source. Already there (a second apply, a restarted init container, a re-registration) is success.
    /// The interfaces are read again after, so that `::6` counts among the namespace's own addresses.
    pub fn add_passthrough_v6(&mut self, config: &Config) -> Result<()> {
        if !self.ipv6 {
            return Ok(());
        }
        rtnl::add_loopback_address(IpNet::from(IpAddr::V6(PASSTHROUGH_V6)))?;
        self.read_interfaces(config)
    }

    /// Reads the namespace's addresses and the `-c` and `-k` interfaces.
    fn read_interfaces(&mut self, config: &Config) -> Result<()> {
        self.local = addresses().context("list the namespace's addresses")?;
        self.excluded_subnets = subnets(&config.exclude_interfaces)?;
        self.excluded_ifindexes = ifindexes(&config.exclude_interfaces)?;
        self.virt_ifindexes = ifindexes(&config.kube_virt_interfaces)?;
        Ok(())
    }
}

/// Moves this process (this thread, before any other thread exists) into the network namespace at `path`.
pub fn enter(path: &Path) -> Result<()> {
    let ns = File::open(path).with_context(|| format!("open network namespace {}", path.display()))?;
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("enter network namespace {}", path.display()))
}

/// Detects the [`Environment`] of the current network namespace: the interfaces, then IPv6 (from the addresses
/// just read) and the nameservers as istio's `FillConfigFromEnvironment`.
pub fn detect(config: &Config, resolv_conf: &Path) -> Result<Environment> {
    let mut env = Environment::default();
    env.read_interfaces(config)?;
    env.ipv6 = ipv6_enabled(&env.local, config.dual_stack);
    if config.redirect_dns && !config.capture_all_dns {
        env.nameservers = match std::fs::read_to_string(resolv_conf) {
            Ok(text) => nameservers(&text),
            // istio: no resolv.conf means no servers, and DNS capture silently off (with a warning).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e).with_context(|| format!("read {}", resolv_conf.display())),
        };
    }
    Ok(env)
}

/// The current network namespace's cookie (`bpf_get_netns_cookie`), read through a socket made in it.
pub fn cookie() -> Result<u64> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))
        .context("open a socket to read the namespace cookie")?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: the pointer and length describe `cookie`, which outlives the call.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("SO_NETNS_COOKIE (Linux 5.14+)");
    }
    Ok(cookie)
}

/// The subnets of the interfaces matching `patterns` (the `-c` interfaces), host bits cleared.
fn subnets(patterns: &[String]) -> Result<Vec<IpNet>> {
    if patterns.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().context("list interfaces")? {
        if !patterns.iter().any(|p| interface_matches(p, &ifa.interface_name)) {
            continue;
        }
        let (Some(addr), Some(mask)) = (ifa.address, ifa.netmask) else {
            continue;
        };
        let net = match (
            addr.as_sockaddr_in(),
            mask.as_sockaddr_in(),
            addr.as_sockaddr_in6(),
            mask.as_sockaddr_in6(),
        ) {
            (Some(a), Some(m), _, _) => IpNet::with_netmask(IpAddr::V4(a.ip()), IpAddr::V4(m.ip())).ok(),
            (_, _, Some(a), Some(m)) => IpNet::with_netmask(IpAddr::V6(a.ip()), IpAddr::V6(m.ip())).ok(),
            _ => None,
        };
        out.extend(net.map(|n| n.trunc()));
    }
    Ok(out)
}

/// The indexes of the interfaces matching `patterns` (iptables' `+` suffix included) that exist now.
fn ifindexes(patterns: &[String]) -> Result<Vec<u32>> {
    if patterns.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for iface in nix::net::if_::if_nameindex().context("list interfaces")?.iter() {
        let name = iface.name().to_string_lossy();
        if patterns.iter().any(|p| interface_matches(p, &name)) && !out.contains(&iface.index()) {
            out.push(iface.index());
        }
    }
    Ok(out)
}

/// iptables' interface match: an exact name, or a prefix ending in `+`.
fn interface_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('+') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// Every address of every interface in the current network namespace, in the kernel's order.
fn addresses() -> Result<Vec<IpAddr>> {
    Ok(nix::ifaddrs::getifaddrs()?
        .filter_map(|ifa| ifa.address)
        .filter_map(|sa| {
            if let Some(v4) = sa.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect())
}

/// istio's IPv6 detection: only global addresses count (not loopback, not link-local). Without
/// `--dual-stack` the first such address decides; with it, any IPv6 one turns IPv6 capture on.
pub fn ipv6_enabled(addrs: &[IpAddr], dual_stack: bool) -> bool {
    let mut global = addrs.iter().filter(|a| !a.is_loopback() && !is_link_local(a));
    if dual_stack {
        global.any(IpAddr::is_ipv6)
    } else {
        global.next().is_some_and(IpAddr::is_ipv6)
    }
}

fn is_link_local(addr: &IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    }
}

/// The `nameserver` entries of a resolv.conf, in order; entries that are not IP addresses are skipped
/// (as the resolver does).
pub fn nameservers(resolv_conf: &str) -> Vec<Nameserver> {
    resolv_conf
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            let text = words.next()?;
            // A zone suffix (fe80::1%eth0) is not part of the address.
            let addr = text.split('%').next()?.parse().ok()?;
            Some(Nameserver {
                addr,
                text: text.to_owned(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn ipv6_follows_the_first_global_address_unless_dual_stack() {
        let v4_first = ips(&["127.0.0.1", "::1", "fe80::1", "10.0.0.2", "2001:db8::2"]);
        assert!(!ipv6_enabled(&v4_first, false));
        assert!(ipv6_enabled(&v4_first, true));
        let v6_first = ips(&["::1", "169.254.1.1", "2001:db8::2", "10.0.0.2"]);
        assert!(ipv6_enabled(&v6_first, false));
        let local_only = ips(&["127.0.0.1", "::1", "fe80::1"]);
        assert!(!ipv6_enabled(&local_only, false));
        assert!(!ipv6_enabled(&local_only, true));
    }

    #[test]
    fn nameservers_are_read_in_order_and_keep_their_text() {
        let conf = "# comment\nsearch svc.cluster.local\nnameserver 10.96.0.10\nnameserver ::127.0.0.53\n\
                    nameserver fe80::1%eth0\nnameserver not-an-ip\noptions ndots:5\n";
        let got = nameservers(conf);
        let texts: Vec<_> = got.iter().map(|n| n.text.as_str()).collect();
        assert_eq!(texts, ["10.96.0.10", "::127.0.0.53", "fe80::1%eth0"]);
        assert_eq!(got[1].addr, "::7f00:35".parse::<IpAddr>().unwrap());
    }
}
