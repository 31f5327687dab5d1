//! Reading (and, for sock_addr, rewriting) kernel context and socket fields the way the verifier accepts: the
//! address and port accessors every program uses, so no program reads a context field inline.

use aya_ebpf::{
    bindings::{bpf_sock, sockaddr},
    helpers::generated::bpf_bind,
    programs::{SkLookupContext, SkMsgContext, SockAddrContext, SockOpsContext},
};
use capture_common::{
    addr::{self, Addr},
    sock::{AF_INET, SockaddrIn, SockaddrIn6},
};

/// Reads the four words of an IPv6 address field of a context or socket, one volatile load each: the
/// verifier only accepts loads at a constant offset from the context or socket pointer and rejects any
/// derived pointer, which is what copying the array (as aya's `local_ip6()` does) compiles to.
#[inline(always)]
pub fn words(field: &[u32; 4]) -> [u32; 4] {
    // SAFETY: each pointer is to a u32 of the kernel's context, valid for the program's lifetime.
    unsafe {
        [
            core::ptr::read_volatile(&field[0]),
            core::ptr::read_volatile(&field[1]),
            core::ptr::read_volatile(&field[2]),
            core::ptr::read_volatile(&field[3]),
        ]
    }
}

// The readers below look alike on purpose (local_addr and remote_addr; lookup_addrs and msg_addrs, one per
// context type): a shared helper taking field references compiles to a pointer chosen at run time, which the
// verifier rejects for context loads.

/// The socket's local address (IPv4 mapped).
#[inline(always)]
pub fn local_addr(ctx: &SockOpsContext) -> Addr {
    // SAFETY: the kernel's context, readable for the program's lifetime.
    let ops = unsafe { &*ctx.ops };
    if ctx.family() == AF_INET {
        addr::from_v4_word(ops.local_ip4)
    } else {
        addr::from_words(words(&ops.local_ip6))
    }
}

/// The socket's peer address (IPv4 mapped).
#[inline(always)]
pub fn remote_addr(ctx: &SockOpsContext) -> Addr {
    // SAFETY: the kernel's context, readable for the program's lifetime.
    let ops = unsafe { &*ctx.ops };
    if ctx.family() == AF_INET {
        addr::from_v4_word(ops.remote_ip4)
    } else {
        addr::from_words(words(&ops.remote_ip6))
    }
}

/// The address a connect4 or sendmsg4 names (IPv4 mapped).
#[inline(always)]
pub fn user_addr4(ctx: &SockAddrContext) -> Addr {
    // SAFETY: the kernel's context, readable for the program's lifetime.
    addr::from_v4_word(unsafe { (*ctx.sock_addr).user_ip4 })
}

/// The address a connect6, sendmsg6 or recvmsg6 names.
#[inline(always)]
pub fn user_addr6(ctx: &SockAddrContext) -> Addr {
    // SAFETY: the kernel's context, readable for the program's lifetime.
    addr::from_words(words(unsafe { &(*ctx.sock_addr).user_ip6 }))
}

/// The socket a sock_addr program runs for.
#[inline(always)]
pub fn sock_addr_socket(ctx: &SockAddrContext) -> *mut bpf_sock {
    // SAFETY: the kernel's context, readable for the program's lifetime.
    unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk }
}

/// A socket's local address by its family (IPv4 mapped); an unbound one reads as 0.0.0.0 or `::`.
#[inline(always)]
pub fn socket_local(sk: *mut bpf_sock) -> Addr {
    // SAFETY: a socket pointer the verifier knows as such, valid for the program's lifetime.
    let sk = unsafe { &*sk };
    if sk.family == AF_INET {
        addr::from_v4_word(sk.src_ip4)
    } else {
        addr::from_words(words(&sk.src_ip6))
    }
}

/// A socket's peer address by its family (IPv4 mapped); an unconnected one reads as 0.0.0.0 or `::`. The
/// twin of [`socket_local`], apart on purpose (see above).
#[inline(always)]
pub fn socket_remote(sk: *mut bpf_sock) -> Addr {
    // SAFETY: a socket pointer the verifier knows as such, valid for the program's lifetime.
    let sk = unsafe { &*sk };
    if sk.family == AF_INET {
        addr::from_v4_word(sk.dst_ip4)
    } else {
        addr::from_words(words(&sk.dst_ip6))
    }
}

/// A socket's peer port (host order; the field is network order); 0 while it is not connected.
#[inline(always)]
pub fn socket_remote_port(sk: *mut bpf_sock) -> u16 {
    // SAFETY: a socket pointer the verifier knows as such, valid for the program's lifetime; a two-byte
    // load of the two-byte field.
    u16::from_be(unsafe { core::ptr::read_volatile(&(*sk).dst_port) })
}

/// A socket's local port (host order); 0 while it is not bound to one.
#[inline(always)]
pub fn socket_local_port(sk: *mut bpf_sock) -> u16 {
    // SAFETY: a socket pointer the verifier knows as such, valid for the program's lifetime.
    unsafe { (*sk).src_port as u16 }
}

/// Binds the socket of a connect4 to `source` (IPv4 mapped), its port left for the connect to choose
/// (`bpf_bind` with port 0 defers it, as `IP_BIND_ADDRESS_NO_PORT` does). Only connect4 and connect6 may
/// call `bpf_bind`: the verifier rejects it in any other sock_addr program. Returns whether it bound.
#[inline(always)]
pub fn bind4(ctx: &SockAddrContext, source: &Addr) -> bool {
    let mut sa = SockaddrIn::new(source, 0);
    bind(ctx, (&raw mut sa).cast(), size_of::<SockaddrIn>())
}

/// As [`bind4`], for the socket of a connect6 (an IPv4-mapped `source` for an IPv4-mapped destination).
#[inline(always)]
pub fn bind6(ctx: &SockAddrContext, source: &Addr) -> bool {
    let mut sa = SockaddrIn6::new(source, 0);
    bind(ctx, (&raw mut sa).cast(), size_of::<SockaddrIn6>())
}

/// `bpf_bind` of the sockaddr at `sa`, `len` bytes long.
#[inline(always)]
fn bind(ctx: &SockAddrContext, sa: *mut sockaddr, len: usize) -> bool {
    // SAFETY: the program's own context; `sa` points to a sockaddr of `len` bytes on the caller's stack.
    unsafe { bpf_bind(ctx.sock_addr, sa, len as i32) == 0 }
}

/// The local and remote addresses of an sk_lookup (IPv4 mapped).
#[inline(always)]
pub fn lookup_addrs(ctx: &SkLookupContext) -> (Addr, Addr) {
    // SAFETY: the kernel's context, readable for the program's lifetime.
    let l = unsafe { &*ctx.lookup };
    if l.family == AF_INET {
        (addr::from_v4_word(l.local_ip4), addr::from_v4_word(l.remote_ip4))
    } else {
        (
            addr::from_words(words(&l.local_ip6)),
            addr::from_words(words(&l.remote_ip6)),
        )
    }
}

/// The port a sock_addr program's address names (host order).
#[inline(always)]
pub fn user_port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: the kernel's context, readable for the program's lifetime.
    addr::port_from_be_field(unsafe { (*ctx.sock_addr).user_port })
}

/// Rewrites the address of a connect4, sendmsg4 or recvmsg4 to `to` (an IPv4-mapped address) and `port`.
#[inline(always)]
pub fn rewrite4(ctx: &SockAddrContext, to: &Addr, port: u16) {
    // SAFETY: user_ip4 and user_port are writable in these programs' contexts.
    unsafe {
        let sa = &mut *ctx.sock_addr;
        sa.user_ip4 = u32::from_ne_bytes(addr::v4_octets(to));
        sa.user_port = addr::port_to_be_field(port);
    }
}

/// Rewrites the address of a connect6, sendmsg6 or recvmsg6 to `to` and `port`, one word at a time (the
/// verifier's rule for context stores, as for loads).
#[inline(always)]
pub fn rewrite6(ctx: &SockAddrContext, to: &Addr, port: u16) {
    let w = addr::to_words(to);
    // SAFETY: user_ip6 (word by word) and user_port are writable in these programs' contexts.
    unsafe {
        let sa = &mut *ctx.sock_addr;
        sa.user_ip6[0] = w[0];
        sa.user_ip6[1] = w[1];
        sa.user_ip6[2] = w[2];
        sa.user_ip6[3] = w[3];
        sa.user_port = addr::port_to_be_field(port);
    }
}

/// The local and remote addresses of the socket sending an sk_msg (IPv4 mapped).
#[inline(always)]
pub fn msg_addrs(ctx: &SkMsgContext) -> (Addr, Addr) {
    // SAFETY: the kernel's context, readable for the program's lifetime.
    let md = unsafe { &*ctx.msg };
    if md.family == AF_INET {
        (addr::from_v4_word(md.local_ip4), addr::from_v4_word(md.remote_ip4))
    } else {
        (
            addr::from_words(words(&md.local_ip6)),
            addr::from_words(words(&md.remote_ip6)),
        )
    }
}
