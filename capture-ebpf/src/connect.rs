//! cgroup connect4 / connect6 (and sendmsg4 / sendmsg6, which run the same code for unconnected UDP):
//! istio's `ISTIO_OUTPUT` decision at connect(2), sendto with MSG_FASTOPEN, and UDP sendto. A redirect
//! rewrites the destination to the proxy's port on localhost, as iptables' REDIRECT does for locally
//! generated traffic, and remembers the original destination. recvmsg4 / recvmsg6 make a DNS proxy's reply
//! appear to come from the server the application asked, as conntrack's un-NAT does.

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock,
    helpers::{bpf_get_current_uid_gid, bpf_get_netns_cookie},
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
    fields::words,
    lookups::MapLookups,
    maps::{CONFIG, ORIG_DST, bump},
};

/// Lets the connect proceed (a cgroup sock_addr program that returns 0 fails it with EPERM).
pub const PROCEED: i32 = 1;

/// The decision for the connect in `ctx` to `dst` from the socket bound to `src`: `None` when the
/// namespace is not registered or the protocol is neither TCP nor UDP (never touched).
#[inline(always)]
fn decide(ctx: &SockAddrContext, dst: Addr, src: Addr) -> Option<(u64, Verdict, Proto, u16)> {
    // SAFETY: the context pointer is the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read only for the duration of this call.
    let cfg = unsafe { CONFIG.get(&netns) }?;
    // SAFETY: the kernel's context, readable for the program's lifetime.
    let sa = unsafe { &*ctx.sock_addr };
    let proto = match sa.protocol {
        sock::IPPROTO_TCP => Proto::Tcp,
        sock::IPPROTO_UDP => Proto::Udp,
        _ => return None,
    };
    let ids = bpf_get_current_uid_gid();
    let dport = addr::port_from_be_field(sa.user_port);
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

/// The socket the program runs for.
#[inline(always)]
fn socket(ctx: &SockAddrContext) -> *mut bpf_sock {
    // SAFETY: the kernel's context, readable for the program's lifetime.
    unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk }
}

/// Keeps where a redirected connection was going with its socket: a TCP socket for sockops to hand to the
/// proxy's socket, a UDP socket (DNS) for recvmsg to restore the replies' source. If the kernel cannot
/// allocate it the connection is still redirected: the proxy then finds no original destination and closes
/// it, which fails closed.
#[inline(always)]
fn remember(ctx: &SockAddrContext, netns: u64, dst: Addr, dport: u16, proxy_port: u16, v6: bool) {
    let orig = OrigDst {
        netns,
        addr: dst,
        port: dport,
        proxy_port,
        v6_socket: u32::from(v6),
    };
    if !ORIG_DST.set(socket(ctx), orig) {
        bump(netns, Counter::OrigDstMisses);
    }
}

/// A connection left alone. A TCP socket may still keep the destination of an earlier redirected connect
/// that failed; it no longer describes this connection, which must not be handed to the proxy with it. (A
/// UDP socket keeps its: a captured query's reply may still be on its way.)
#[inline(always)]
fn passed(ctx: &SockAddrContext, netns: u64, proto: Proto) {
    if proto == Proto::Tcp {
        ORIG_DST.forget(socket(ctx));
    }
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
    let Some(orig) = ORIG_DST.get(socket(ctx)) else {
        return;
    };
    // SAFETY: the kernel's context; user_ip4 and user_port are readable and writable in recvmsg4.
    unsafe {
        let sa = &mut *ctx.sock_addr;
        let src = addr::from_v4_word(sa.user_ip4);
        if is_dns_proxy(&src, addr::port_from_be_field(sa.user_port)) && addr::is_v4(&orig.addr) {
            sa.user_ip4 = u32::from_ne_bytes(addr::v4_octets(&orig.addr));
            sa.user_port = addr::port_to_be_field(orig.port);
        }
    }
}

/// recvmsg6: as [`recvmsg4`], for IPv6 sockets (IPv4-mapped servers included).
#[inline(always)]
pub fn recvmsg6(ctx: &SockAddrContext) {
    let Some(orig) = ORIG_DST.get(socket(ctx)) else {
        return;
    };
    // SAFETY: the kernel's context; user_ip6 (word by word) and user_port are writable in recvmsg6.
    unsafe {
        let sa = &mut *ctx.sock_addr;
        let src = addr::from_words(words(&sa.user_ip6));
        if is_dns_proxy(&src, addr::port_from_be_field(sa.user_port)) {
            let w = addr::to_words(&orig.addr);
            sa.user_ip6[0] = w[0];
            sa.user_ip6[1] = w[1];
            sa.user_ip6[2] = w[2];
            sa.user_ip6[3] = w[3];
            sa.user_port = addr::port_to_be_field(orig.port);
        }
    }
}

/// connect4.
#[inline(always)]
pub fn connect4(ctx: &SockAddrContext) {
    // SAFETY: the kernel's context and its socket, both valid for the program's lifetime.
    let (dst, src) = unsafe {
        let sa = &*ctx.sock_addr;
        let sk = sa.__bindgen_anon_1.sk;
        (addr::from_v4_word(sa.user_ip4), (*sk).src_ip4)
    };
    let src = if src == 0 {
        addr::UNSPECIFIED
    } else {
        addr::from_v4_word(src)
    };
    let Some((netns, verdict, proto, dport)) = decide(ctx, dst, src) else {
        return;
    };
    match verdict {
        Verdict::Redirect(port, rule) => {
            remember(ctx, netns, dst, dport, port, false);
            // SAFETY: user_ip4 and user_port are writable in connect4.
            unsafe {
                (*ctx.sock_addr).user_ip4 = u32::from_ne_bytes(addr::LOCALHOST_V4);
                (*ctx.sock_addr).user_port = addr::port_to_be_field(port);
            }
            bump(netns, Counter::Redirected);
            if rule == Rule::Dns {
                bump(netns, Counter::Dns);
            }
        }
        Verdict::Pass(_) => passed(ctx, netns, proto),
    }
}

/// connect6. An IPv4-mapped destination is an IPv4 connection and is judged and redirected as one.
#[inline(always)]
pub fn connect6(ctx: &SockAddrContext) {
    // SAFETY: the kernel's context and its socket, valid for the program's lifetime.
    let (dst, src) = unsafe {
        let sa = &*ctx.sock_addr;
        let sk = sa.__bindgen_anon_1.sk;
        (
            addr::from_words(words(&sa.user_ip6)),
            addr::from_words(words(&(*sk).src_ip6)),
        )
    };
    let Some((netns, verdict, proto, dport)) = decide(ctx, dst, src) else {
        return;
    };
    match verdict {
        Verdict::Redirect(port, rule) => {
            remember(ctx, netns, dst, dport, port, true);
            let target = if addr::is_v4(&dst) {
                addr::from_v4(addr::LOCALHOST_V4)
            } else {
                addr::LOCALHOST_V6
            };
            let words = addr::to_words(&target);
            // SAFETY: user_ip6 (word by word) and user_port are writable in connect6.
            unsafe {
                let sa = &mut *ctx.sock_addr;
                sa.user_ip6[0] = words[0];
                sa.user_ip6[1] = words[1];
                sa.user_ip6[2] = words[2];
                sa.user_ip6[3] = words[3];
                sa.user_port = addr::port_to_be_field(port);
            }
            bump(netns, Counter::Redirected);
            if rule == Rule::Dns {
                bump(netns, Counter::Dns);
            }
        }
        Verdict::Pass(_) => passed(ctx, netns, proto),
    }
}
