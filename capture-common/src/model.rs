//! The outbound capture decision: istio's `ISTIO_OUTPUT` chain (`docs/istio-rules.md#outbound-decision`) as
//! one function.
//!
//! The kernel's connect4/connect6 programs call [`outbound`] with lookups backed by BPF maps; the host
//! tests call it with lookups backed by plain collections and check it against istio's scenario table
//! and against the iptables backend. Rule letters (a, b, c1 …) are those of
//! `docs/istio-rules.md#outbound-decision`, which gives each step's [`Rule`]; the iptables rules themselves
//! are in `docs/istio-rules.md#rule-template`.

use crate::{
    addr::{self, Addr},
    maps::{CidrKind, MAX_PROXY_IDS, PodConfig, PodSources, SetKind, flag},
};

/// The DNS port.
pub const DNS_PORT: u16 = 53;
/// istio-agent's DNS proxy port, where captured DNS goes.
pub const DNS_PROXY_PORT: u16 = 15053;
/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h, level `SOL_IP`) and `IP6T_SO_ORIGINAL_DST`
/// (linux/netfilter_ipv6/ip6_tables.h, level `SOL_IPV6`) share this number: the option the getsockopt
/// program answers and proxies ask.
pub const SO_ORIGINAL_DST: i32 = 80;

/// The transport protocol of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP (a connected UDP socket, or a datagram).
    Udp,
}

/// A connection as the connect hook sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conn {
    /// Protocol.
    pub proto: Proto,
    /// Destination (IPv4 mapped); an IPv4-mapped destination is an IPv4 connection.
    pub dst: Addr,
    /// Destination port.
    pub dport: u16,
    /// The address the socket is bound to, [`addr::UNSPECIFIED`] if none (IPv4 mapped).
    pub src: Addr,
    /// The calling task's uid.
    pub uid: u32,
    /// The calling task's gid.
    pub gid: u32,
}

/// The rule of `ISTIO_OUTPUT` or `ISTIO_INBOUND` (or the chain's end) that decided, for tests: they check
/// the kernel's outcome against the rule the model names.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// The namespace does not capture this family (IPv6 off).
    FamilyOff,
    /// `-c`: the destination is on an excluded interface's subnet.
    ExcludedInterface,
    /// a: `-o` port.
    OutboundExcludePort,
    /// b: source 127.0.0.6 / ::6 to a local address.
    Passthrough,
    /// c1: a proxy uid to a local address outside the loopback CIDR (`LOOP`, 127.0.0.1/32 by default).
    ProxyUidToLocal,
    /// c2: another uid's local traffic.
    LocalNotProxyUid,
    /// c3: a proxy uid.
    ProxyUid,
    /// d1: a proxy gid to a local address outside the loopback CIDR.
    ProxyGidToLocal,
    /// d2: another gid's local traffic.
    LocalNotProxyGid,
    /// d3: a proxy gid.
    ProxyGid,
    /// e: owner-group filter.
    OwnerGroup,
    /// f: DNS.
    Dns,
    /// g: localhost.
    Loopback,
    /// h: `-x`.
    ExcludeCidr,
    /// i: `-q`.
    OutboundIncludePort,
    /// j: `-i`.
    IncludeCidr,
    /// End of the chain.
    NoMatch,
    /// Inbound, `-k`: treated as outbound (redirected to the outbound port if `-i` covers it).
    VirtInterface,
    /// Inbound over lo: locally generated, never captured inbound (nat PREROUTING never sees it).
    LocalInbound,
    /// Inbound, `-b` empty: no inbound capture.
    InboundOff,
    /// Inbound to the tunnel port (REDIRECT mode).
    TunnelPort,
    /// Inbound, `-d` with `-b '*'`.
    InboundExcludePort,
    /// Inbound, a captured port.
    InboundPort,
}

/// A new inbound TCP connection, as sk_lookup sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InConn {
    /// The local address it is for (IPv4 mapped).
    pub dst: Addr,
    /// The peer's address (IPv4 mapped).
    pub src: Addr,
    /// The local port it is for.
    pub dport: u16,
    /// The interface it arrived on.
    pub ifindex: u32,
}

/// The loopback interface's index in every network namespace.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// What happens to a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Left alone.
    Pass(Rule),
    /// Sent to this port on localhost, keeping the original destination for `SO_ORIGINAL_DST`.
    Redirect(u16, Rule),
}

/// The set lookups the decision needs; backed by BPF maps in the kernel, by collections in tests.
pub trait Lookups {
    /// Whether `value` is in set `kind` of the configuration.
    fn in_set(&self, kind: SetKind, value: u32) -> bool;
    /// Whether `addr` is in CIDR set `kind` of the configuration.
    fn in_cidrs(&self, kind: CidrKind, addr: &Addr) -> bool;
}

const PASSTHROUGH_V4: Addr = addr::from_v4([127, 0, 0, 6]);
const PASSTHROUGH_V6: Addr = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 6];
/// The first octet of IPv4's loopback network, 127.0.0.0/8: an address in it is loopback.
const LOOPBACK_NET_V4_FIRST_OCTET: u8 = 127;

/// `LOOP4`/`LOOP6`: what istio's `-d 127.0.0.1/32` (or the configured CIDR) and `-d ::1/128` match.
#[inline(always)]
fn in_loopback_cidr(cfg: &PodConfig, dst: &Addr, v4: bool) -> bool {
    if v4 {
        let net = addr::from_v4(cfg.loopback_v4);
        addr::in_prefix(dst, &net, addr::V4_MAPPED_PREFIX_BITS + u32::from(cfg.loopback_v4_len))
    } else {
        *dst == addr::LOCALHOST_V6
    }
}

/// iptables' `-o lo`: the route goes back into the namespace. That is every loopback address, the
/// unspecified address (connecting to it reaches the local host), and the namespace's own addresses.
#[inline(always)]
fn is_local<L: Lookups>(dst: &Addr, v4: bool, lookups: &L) -> bool {
    reaches_loopback(dst, v4) || lookups.in_cidrs(CidrKind::Local, dst)
}

/// A loopback address or the unspecified one (connecting to it reaches the local host over loopback).
#[inline(always)]
fn reaches_loopback(dst: &Addr, v4: bool) -> bool {
    if v4 {
        let octets = addr::v4_octets(dst);
        octets[0] == LOOPBACK_NET_V4_FIRST_OCTET || octets == [0; 4]
    } else {
        *dst == addr::LOCALHOST_V6 || *dst == addr::UNSPECIFIED
    }
}

/// Whether the configuration has a flag set.
#[inline(always)]
fn has(cfg: &PodConfig, bit: u32) -> bool {
    cfg.flags & bit != 0
}

/// The proxy-identity rules (c for uids, d for gids) for one id list; `None` means no rule matched.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn proxy_rules(
    ids: &[u32; MAX_PROXY_IDS],
    n: u32,
    id: u32,
    to_local_non_loopback: bool,
    local: bool,
    conn: &Conn,
    cfg: &PodConfig,
    dns_in_redirect: bool,
    rules: [Rule; 3],
) -> Option<Verdict> {
    let dns = cfg.flags & flag::DNS != 0;
    let tcp = conn.proto == Proto::Tcp;
    let mut i = 0;
    while i < MAX_PROXY_IDS {
        if i as u32 >= n {
            break;
        }
        let owner = ids[i];
        // 1: the proxy calling a local address outside the loopback CIDR (its own pod IP) goes to the inbound port.
        if to_local_non_loopback
            && tcp
            && conn.dport != cfg.tunnel_port
            && !(dns_in_redirect && conn.dport == DNS_PORT)
            && id == owner
        {
            return Some(Verdict::Redirect(cfg.inbound_capture_port, rules[0]));
        }
        // 2: anyone else's local traffic passes (unless -i lists a loopback CIDR).
        if cfg.flags & flag::INCLUDE_HAS_LOOPBACK == 0
            && local
            && id != owner
            && (!dns || (tcp && conn.dport != DNS_PORT))
        {
            return Some(Verdict::Pass(rules[1]));
        }
        // 3: the proxy's own traffic passes.
        if id == owner {
            return Some(Verdict::Pass(rules[2]));
        }
        i += 1;
    }
    None
}

/// istio's outbound decision for `conn` under `cfg`: the steps of `docs/istio-rules.md#outbound-decision`, in
/// order (family, `-c`, then rules a, b, c1–c3 per uid, d1–d3 per gid, e to j); the first that applies decides,
/// and the verdict carries the [`Rule`] the document gives for that step.
#[inline(always)]
pub fn outbound<L: Lookups>(cfg: &PodConfig, conn: &Conn, lookups: &L) -> Verdict {
    let v4 = addr::is_v4(&conn.dst);
    let tcp = conn.proto == Proto::Tcp;
    if !v4 && cfg.flags & flag::IPV6 == 0 {
        return Verdict::Pass(Rule::FamilyOff);
    }
    let local = is_local(&conn.dst, v4, lookups);
    // A local destination is routed over lo, never out of an excluded interface.
    if !local && has(cfg, flag::HAS_EXCLUDED_SUBNETS) && lookups.in_cidrs(CidrKind::ExcludedInterface, &conn.dst) {
        return Verdict::Pass(Rule::ExcludedInterface);
    }
    // a
    if has(cfg, flag::HAS_OUTBOUND_EXCLUDE_PORTS) && lookups.in_set(SetKind::OutboundExcludePort, u32::from(conn.dport))
    {
        return Verdict::Pass(Rule::OutboundExcludePort);
    }
    // b
    let passthrough = if v4 { PASSTHROUGH_V4 } else { PASSTHROUGH_V6 };
    if local && conn.src == passthrough {
        return Verdict::Pass(Rule::Passthrough);
    }
    let to_local_non_loopback = local && !in_loopback_cidr(cfg, &conn.dst, v4);
    // c: uids, with the DNS form of c1 when DNS is on.
    let dns = cfg.flags & flag::DNS != 0;
    let uid_rules = [Rule::ProxyUidToLocal, Rule::LocalNotProxyUid, Rule::ProxyUid];
    if let Some(v) = proxy_rules(
        &cfg.uids,
        cfg.n_uids,
        conn.uid,
        to_local_non_loopback,
        local,
        conn,
        cfg,
        dns,
        uid_rules,
    ) {
        return v;
    }
    // d: gids; d1 has no DNS exception (istio's rule).
    let gid_rules = [Rule::ProxyGidToLocal, Rule::LocalNotProxyGid, Rule::ProxyGid];
    if let Some(v) = proxy_rules(
        &cfg.gids,
        cfg.n_gids,
        conn.gid,
        to_local_non_loopback,
        local,
        conn,
        cfg,
        false,
        gid_rules,
    ) {
        return v;
    }
    // e
    let in_groups = has(cfg, flag::HAS_OWNER_GROUPS) && lookups.in_set(SetKind::OwnerGroup, conn.gid);
    if (cfg.flags & flag::OWNER_GROUPS_ONLY != 0) != in_groups {
        return Verdict::Pass(Rule::OwnerGroup);
    }
    // f
    let dns_here = cfg.flags & if v4 { flag::DNS_V4 } else { flag::DNS_V6 } != 0;
    if dns_here
        && conn.dport == DNS_PORT
        && (cfg.flags & flag::CAPTURE_ALL_DNS != 0 || lookups.in_cidrs(CidrKind::DnsServer, &conn.dst))
    {
        return Verdict::Redirect(DNS_PROXY_PORT, Rule::Dns);
    }
    // g
    if in_loopback_cidr(cfg, &conn.dst, v4) {
        return Verdict::Pass(Rule::Loopback);
    }
    // h
    if has(cfg, flag::HAS_EXCLUDE_CIDRS) && lookups.in_cidrs(CidrKind::Exclude, &conn.dst) {
        return Verdict::Pass(Rule::ExcludeCidr);
    }
    // i
    if tcp
        && has(cfg, flag::HAS_OUTBOUND_INCLUDE_PORTS)
        && lookups.in_set(SetKind::OutboundIncludePort, u32::from(conn.dport))
    {
        return Verdict::Redirect(cfg.proxy_port, Rule::OutboundIncludePort);
    }
    // j: ISTIO_REDIRECT only redirects TCP; anything else falls through it.
    if has(cfg, flag::INCLUDE_ALL)
        || (has(cfg, flag::HAS_INCLUDE_CIDRS) && lookups.in_cidrs(CidrKind::Include, &conn.dst))
    {
        return if tcp {
            Verdict::Redirect(cfg.proxy_port, Rule::IncludeCidr)
        } else {
            Verdict::Pass(Rule::IncludeCidr)
        };
    }
    Verdict::Pass(Rule::NoMatch)
}

/// Loopback acceleration (`--loopback-accel`): whether a TCP socket of a registered namespace that has just
/// become established joins the peer map, whose sends then go straight to the peer socket's receive queue.
/// Only pairs inside the namespace (the peer address is local: the app and its proxy over loopback, the
/// proxy's passthrough to the pod's own address) qualify, and only before any data has crossed
/// (`quiet`): data redirected later is read before data that came by TCP, so a connection that already
/// carried some (TCP Fast Open) stays on TCP.
#[inline(always)]
pub fn accelerate<L: Lookups>(cfg: &PodConfig, peer: &Addr, quiet: bool, lookups: &L) -> bool {
    has(cfg, flag::LOOPBACK_ACCEL) && quiet && is_local(peer, addr::is_v4(peer), lookups)
}

/// Whether a connection accepted on local port `port` may be the proxy's end of a redirected one: every
/// redirect of [`outbound`] lands on the outbound capture port (`-p`), the inbound capture port (`-z`, the
/// proxy's own connections to a local non-loopback address) or the DNS proxy's. sockops looks for a
/// handshake's original destination only there, so the app's own accepted connections cost no lookup.
#[inline(always)]
pub fn lands_on_capture_port(cfg: &PodConfig, port: u16) -> bool {
    port == cfg.proxy_port || port == cfg.inbound_capture_port || port == DNS_PROXY_PORT
}

/// A loopback address: 127.0.0.0/8 (IPv4 mapped) or `::1`. Every redirect rewrites the destination to one,
/// so sockops looks for a connecting socket's original destination only when its peer is one: the proxy's
/// upstream connections cost no lookup.
#[inline(always)]
pub fn is_loopback(a: &Addr) -> bool {
    if addr::is_v4(a) {
        addr::v4_octets(a)[0] == LOOPBACK_NET_V4_FIRST_OCTET
    } else {
        *a == addr::LOCALHOST_V6
    }
}

/// Whether a TCP socket connected to `remote`:`remote_port` may be the application's end of a redirected
/// connection: every redirect of [`outbound`] rewrites the destination to loopback on a port
/// [`lands_on_capture_port`].
#[inline(always)]
pub fn may_be_redirected(cfg: &PodConfig, remote: &Addr, remote_port: u16) -> bool {
    is_loopback(remote) && lands_on_capture_port(cfg, remote_port)
}

/// What `SO_ORIGINAL_DST` answers on a TCP socket of a registered namespace that has no original
/// destination kept with it, at local address `local` and port `local_port`, connected to `remote`:`remote_port`:
/// the local address. It is where the peer connected to, which is conntrack's answer for a connection
/// that was not rewritten and the original destination of an inbound connection sk_lookup handed to the
/// proxy (no rewrite, so nothing was kept). Except:
///
/// - on the outbound capture port (`-p`) at a loopback address, where every redirected connection lands:
///   a socket there without a kept destination lost it, and 127.0.0.1:15001 would send the proxy to
///   itself;
/// - on the application's own end of a redirected connection ([`may_be_redirected`]): capture keeps the
///   original destination for the proxy's end only, and the application's own local address would be a
///   wrong answer.
///
/// These get no answer, and a proxy closes the connection (fails closed).
#[inline(always)]
pub fn unkept_original_dst(
    cfg: &PodConfig,
    local: &Addr,
    local_port: u16,
    remote: &Addr,
    remote_port: u16,
) -> Option<(Addr, u16)> {
    if (is_loopback(local) && local_port == cfg.proxy_port) || may_be_redirected(cfg, remote, remote_port) {
        None
    } else {
        Some((*local, local_port))
    }
}

/// The address the application's socket of a redirected TCP connection to `dst` is bound to before its
/// destination becomes the proxy's, so that the proxy sees the peer iptables' REDIRECT shows it: the source
/// the kernel would have chosen for the original destination (routing picks it before NAT rewrites the
/// destination; a connect rewritten to loopback would otherwise come from loopback). `None` leaves the
/// socket as it is:
///
/// - a socket bound to an address (`bound`) keeps it, under REDIRECT too; one bound to the wildcard with
///   a port (`bound_port`) can no longer be bound, and comes from loopback (the README lists it);
/// - a loopback or unspecified destination: the kernel picks loopback for it either way;
/// - otherwise the namespace's address of the destination's family (`sources`), if it has one: the
///   kernel's choice for any destination off the pod, and for the pod's own address (its local route
///   answers with the address itself). Another of the pod's own addresses gets it too, where the kernel
///   would pick that address: telling them apart would cost this path a second CIDR lookup.
#[inline(always)]
pub fn redirect_source(sources: &PodSources, dst: &Addr, bound: &Addr, bound_port: u16) -> Option<Addr> {
    let v4 = addr::is_v4(dst);
    let unbound = (*bound == addr::UNSPECIFIED || *bound == addr::from_v4([0; 4])) && bound_port == 0;
    if !unbound || reaches_loopback(dst, v4) {
        return None;
    }
    let own = if v4 { sources.v4 } else { sources.v6 };
    (own != addr::UNSPECIFIED).then_some(own)
}

/// istio's inbound decision (`ISTIO_INBOUND` in REDIRECT mode,
/// `docs/istio-rules.md#inbound-decision-redirect-mode`) for a new TCP connection; in TPROXY mode the same
/// but for the tunnel port (`docs/istio-rules.md#inbound-in-tproxy-mode`).
#[inline(always)]
pub fn inbound<L: Lookups>(cfg: &PodConfig, conn: &InConn, lookups: &L) -> Verdict {
    let v4 = addr::is_v4(&conn.dst);
    if !v4 && cfg.flags & flag::IPV6 == 0 {
        return Verdict::Pass(Rule::FamilyOff);
    }
    // Locally generated (from one of the namespace's own addresses, over lo): nat PREROUTING never sees
    // it. The ingress interface alone does not tell: a connection to the pod's own IP reports eth0.
    if conn.ifindex == LOOPBACK_IFINDEX || is_local(&conn.src, v4, lookups) {
        return Verdict::Pass(Rule::LocalInbound);
    }
    // -k, inserted above everything: outbound capture, -x not consulted.
    if lookups.in_set(SetKind::VirtIfindex, conn.ifindex) {
        return if has(cfg, flag::INCLUDE_ALL)
            || (has(cfg, flag::HAS_INCLUDE_CIDRS) && lookups.in_cidrs(CidrKind::Include, &conn.dst))
        {
            Verdict::Redirect(cfg.proxy_port, Rule::VirtInterface)
        } else {
            Verdict::Pass(Rule::VirtInterface)
        };
    }
    if lookups.in_set(SetKind::ExcludedIfindex, conn.ifindex) {
        return Verdict::Pass(Rule::ExcludedInterface);
    }
    if cfg.flags & (flag::INBOUND_ALL | flag::INBOUND_LIST) == 0 {
        return Verdict::Pass(Rule::InboundOff);
    }
    // REDIRECT mode only: TPROXY mode's mangle rules capture the tunnel port too (see flag::TPROXY).
    if conn.dport == cfg.tunnel_port && !has(cfg, flag::TPROXY) {
        return Verdict::Pass(Rule::TunnelPort);
    }
    let port = u32::from(conn.dport);
    if cfg.flags & flag::INBOUND_ALL != 0 {
        if lookups.in_set(SetKind::InboundExcludePort, port) {
            return Verdict::Pass(Rule::InboundExcludePort);
        }
        return Verdict::Redirect(cfg.inbound_capture_port, Rule::InboundPort);
    }
    if lookups.in_set(SetKind::InboundPort, port) {
        Verdict::Redirect(cfg.inbound_capture_port, Rule::InboundPort)
    } else {
        Verdict::Pass(Rule::NoMatch)
    }
}
