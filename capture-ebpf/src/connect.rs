//! cgroup connect4 / connect6 (and sendmsg4 / sendmsg6, which run the same code for unconnected UDP):
//! istio's `ISTIO_OUTPUT` decision at connect(2), sendto with MSG_FASTOPEN, and UDP sendto. A redirect
//! rewrites the destination to the proxy's port on localhost, as iptables' REDIRECT does for locally
//! generated traffic, and remembers the original destination. recvmsg4 / recvmsg6 make a DNS proxy's reply
//! appear to come from the server the application asked, as conntrack's un-NAT does.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use capture_common::{
    addr::{self, Addr},
    counters::Counter,
    maps::OrigDst,
    model::{self, Conn, Proto, Rule, Verdict},
    sock,
};

use crate::{
    fields::{
        bind4, bind6, rewrite4, rewrite6, sock_addr_socket, socket_local, socket_local_port, user_addr4, user_addr6,
        user_port,
    },
    lookups::MapLookups,
    maps::{CONFIG, ORIG_CONNECTING, ORIG_DST, POD_SOURCES, bump},
};

/// Lets the connect proceed (a cgroup sock_addr program that returns 0 fails it with EPERM).
pub const PROCEED: i32 = 1;

/// The hook the decision runs in: only connect4/connect6 may bind the socket (`bpf_bind`); sendmsg4/6 run
/// the same decision for unconnected UDP, which is never bound.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// connect(2), or sendto with `MSG_FASTOPEN`.
    Connect,
    /// sendmsg on an unconnected UDP socket.
    Sendmsg,
}

/// The decision for the connect in `ctx` to `dst` from the socket bound to `src`: `None` when the
/// namespace is not registered or the protocol is neither TCP nor UDP (never touched).
#[inline(always)]
fn decide(ctx: &SockAddrContext, dst: Addr, src: Addr) -> Option<(u64, Verdict, Proto, u16)> {
    // SAFETY: the context pointer is the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read only for the duration of this call.
    let cfg = unsafe { CONFIG.get(&netns) }?;
    // SAFETY: the kernel's context, readable for the program's lifetime.
    let proto = match unsafe { (*ctx.sock_addr).protocol } {
        sock::IPPROTO_TCP => Proto::Tcp,
        sock::IPPROTO_UDP => Proto::Udp,
        _ => return None,
    };
    let ids = bpf_get_current_uid_gid();
    let dport = user_port(ctx);
    let conn = Conn {
        proto,
        dst,
        dport,
        src,
        uid: ids as u32,
        gid: (ids >> 32) as u32,
    };
    let verdict = model::outbound(cfg, &conn, &MapLookups { id: cfg.id });
    let record = Decision {
        netns,
        uid: conn.uid,
        gid: conn.gid,
        dport,
        to: match verdict {
            Verdict::Redirect(port, _) => port,
            Verdict::Pass(_) => 0,
        },
    };
    log_decision(ctx, &record);
    Some((netns, verdict, proto, dport))
}

/// What [`log_decision`] logs.
struct Decision {
    netns: u64,
    uid: u32,
    gid: u32,
    dport: u16,
    /// The port redirected to, 0 for a pass.
    to: u16,
}

/// Logs one decision (at debug level; a no-op unless `capture --log-level debug` loaded the programs).
/// A function of its own, not inlined: inlined into connect6 the log's register pressure made LLVM emit
/// code the verifier rejects.
#[inline(never)]
fn log_decision(ctx: &SockAddrContext, d: &Decision) {
    debug!(
        ctx,
        "connect netns {} uid {} gid {} port {} -> {}", d.netns, d.uid, d.gid, d.dport, d.to
    );
}

/// The socket cookie of the socket a sock_addr program runs for.
#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the context pointer is the program's own context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// Keeps where a redirected connection was going: a TCP socket's by its cookie, for sockops to hand on
/// when the socket sends its SYN (see [`ORIG_CONNECTING`]); a UDP socket's (DNS) with the socket, for
/// recvmsg to restore the replies' source. If the kernel cannot allocate a UDP socket's the query is still
/// redirected, and its reply comes from the DNS proxy's address.
#[inline(always)]
fn remember(ctx: &SockAddrContext, netns: u64, dst: Addr, dport: u16, proxy_port: u16, v6: bool, proto: Proto) {
    let orig = OrigDst {
        netns,
        addr: dst,
        port: dport,
        proxy_port,
        v6_socket: u32::from(v6),
    };
    let kept = match proto {
        // A full map evicts its least recently used entry (LRU): the insert itself does not fail for lack
        // of room.
        Proto::Tcp => ORIG_CONNECTING.insert(&cookie(ctx), &orig, 0).is_ok(),
        Proto::Udp => ORIG_DST.set(sock_addr_socket(ctx), orig),
    };
    if !kept {
        bump(netns, Counter::OrigDstMisses);
    }
}

/// A connection left alone. A TCP socket whose earlier redirected connect failed before its SYN may still
/// have an entry in [`ORIG_CONNECTING`]; sockops hands it on only to a connection that goes where that
/// redirect pointed (loopback, its capture port), so nothing is deleted here and the passed path costs no
/// map operation. (A UDP socket keeps its destination: a captured query's reply may still be on its way.)
#[inline(always)]
fn passed(netns: u64) {
    bump(netns, Counter::Passed);
}

/// The DNS proxy's address as a redirected socket sees it reply: 127.0.0.1, ::1 or ::ffff:127.0.0.1.
#[inline(always)]
fn is_dns_proxy(src: &Addr, port: u16) -> bool {
    port == model::DNS_PROXY_PORT && (*src == addr::from_v4(addr::LOCALHOST_V4) || *src == addr::LOCALHOST_V6)
}

/// recvmsg4: a reply from the DNS proxy to a socket whose query was redirected is reported as coming from
/// the server the application asked.
#[inline(always)]
pub fn recvmsg4(ctx: &SockAddrContext) {
    let Some(orig) = ORIG_DST.get(sock_addr_socket(ctx)) else {
        return;
    };
    if is_dns_proxy(&user_addr4(ctx), user_port(ctx)) && addr::is_v4(&orig.addr) {
        rewrite4(ctx, &orig.addr, orig.port);
    }
}

/// recvmsg6: as [`recvmsg4`], for IPv6 sockets (IPv4-mapped servers included).
#[inline(always)]
pub fn recvmsg6(ctx: &SockAddrContext) {
    let Some(orig) = ORIG_DST.get(sock_addr_socket(ctx)) else {
        return;
    };
    if is_dns_proxy(&user_addr6(ctx), user_port(ctx)) {
        rewrite6(ctx, &orig.addr, orig.port);
    }
}

/// Counts a redirected connection (and a redirected DNS query).
#[inline(always)]
fn redirected(netns: u64, rule: Rule) {
    bump(netns, Counter::Redirected);
    if rule == Rule::Dns {
        bump(netns, Counter::Dns);
    }
}

/// What [`connect4`] and [`connect6`] return when the socket is not to be bound.
pub const NO_BIND: u64 = 0;

/// The namespace in which a redirected connection's socket is to be bound to the pod's address: only in
/// connect(2) (the verifier allows `bpf_bind` nowhere else), and only TCP, whose proxy reads its peer.
#[inline(always)]
fn bind_in(hook: Hook, netns: u64, proto: Proto) -> u64 {
    if hook == Hook::Connect && proto == Proto::Tcp {
        netns
    } else {
        NO_BIND
    }
}

/// The address to bind the socket of a redirected connection in namespace `netns` to, where
/// [`model::redirect_source`] says so for its original destination.
#[inline(always)]
fn pod_source(ctx: &SockAddrContext, netns: u64) -> Option<Addr> {
    let sk = sock_addr_socket(ctx);
    // SAFETY: read only for the duration of this call.
    let orig = unsafe { ORIG_CONNECTING.get(&cookie(ctx)) }?;
    // SAFETY: read only for the duration of this call.
    let sources = unsafe { POD_SOURCES.get(&netns) }?;
    model::redirect_source(sources, &orig.addr, &socket_local(sk), socket_local_port(sk))
}

/// Binds the socket of a connect4 redirected in namespace `netns` (its original destination just kept by
/// its cookie) as [`pod_source`] says. Called by the connect4 program after [`connect4`]: in connect4's body, LLVM
/// ran short of registers and emitted code the verifier rejects. If the bind fails the connection still
/// goes, from loopback.
#[inline(never)]
pub fn bind_source4(ctx: &SockAddrContext, netns: u64) {
    if let Some(source) = pod_source(ctx, netns) {
        bind4(ctx, &source);
    }
}

/// As [`bind_source4`], for a connect6.
#[inline(never)]
pub fn bind_source6(ctx: &SockAddrContext, netns: u64) {
    if let Some(source) = pod_source(ctx, netns) {
        bind6(ctx, &source);
    }
}

/// connect4 (`hook`: which program runs it). Returns the namespace of a redirected TCP connect(2), whose
/// socket the caller binds with [`bind_source4`]; 0 (no namespace's cookie) otherwise.
#[inline(always)]
pub fn connect4(ctx: &SockAddrContext, hook: Hook) -> u64 {
    let dst = user_addr4(ctx);
    // An unbound socket's source is the model's unspecified address, whatever the family.
    let src = match socket_local(sock_addr_socket(ctx)) {
        src if src == addr::from_v4_word(0) => addr::UNSPECIFIED,
        src => src,
    };
    let Some((netns, verdict, proto, dport)) = decide(ctx, dst, src) else {
        return NO_BIND;
    };
    match verdict {
        Verdict::Redirect(port, rule) => {
            remember(ctx, netns, dst, dport, port, false, proto);
            rewrite4(ctx, &addr::from_v4(addr::LOCALHOST_V4), port);
            redirected(netns, rule);
            bind_in(hook, netns, proto)
        }
        Verdict::Pass(_) => {
            passed(netns);
            NO_BIND
        }
    }
}

/// connect6 (`hook`: which program runs it). An IPv4-mapped destination is an IPv4 connection and is judged
/// and redirected as one. Returns as [`connect4`] does, for [`bind_source6`].
#[inline(always)]
pub fn connect6(ctx: &SockAddrContext, hook: Hook) -> u64 {
    let dst = user_addr6(ctx);
    let src = socket_local(sock_addr_socket(ctx));
    let Some((netns, verdict, proto, dport)) = decide(ctx, dst, src) else {
        return NO_BIND;
    };
    match verdict {
        Verdict::Redirect(port, rule) => {
            remember(ctx, netns, dst, dport, port, true, proto);
            let target = if addr::is_v4(&dst) {
                addr::from_v4(addr::LOCALHOST_V4)
            } else {
                addr::LOCALHOST_V6
            };
            rewrite6(ctx, &target, port);
            redirected(netns, rule);
            bind_in(hook, netns, proto)
        }
        Verdict::Pass(_) => {
            passed(netns);
            NO_BIND
        }
    }
}
