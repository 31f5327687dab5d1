//! sockops: hands the original destination from the application's redirected socket to the proxy's
//! accepted one, so getsockopt can answer `SO_ORIGINAL_DST` for as long as the proxy's socket lives.
//!
//! - TCP_CONNECT_CB (application side, just before the SYN; the local port is known): the socket's
//!   original destination moves from `ORIG_CONNECTING` (by socket cookie) to `ORIG_BY_ADDR`, keyed by what
//!   the proxy will see as its peer, and the socket asks for state callbacks.
//! - PASSIVE_ESTABLISHED_CB (proxy side, when the handshake completes, before accept): the entry moves onto
//!   the proxy's new socket (`ORIG_DST`) and is deleted.
//! - STATE_CB leaving SYN_SENT (application side): a handshake that failed deletes its entry; either way the
//!   socket stops asking for state callbacks.
//! - ACTIVE/PASSIVE_ESTABLISHED_CB: loopback acceleration picks the socket up (see [`crate::accel`]).

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TCP_LISTEN_CB, bpf_sock,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockOpsContext,
};
use capture_common::{
    addr,
    counters::Counter,
    maps::{ConnKey, ListenerKey, PodConfig},
    model,
};

use crate::{
    accel,
    fields::{local_addr, remote_addr},
    maps::{CONFIG, LISTENERS, ORIG_BY_ADDR, ORIG_CONNECTING, ORIG_DST, bump},
};

/// `TCP_ESTABLISHED` in the kernel's TCP state numbering.
const TCP_ESTABLISHED: u32 = 1;
/// `TCP_SYN_SENT` in the kernel's TCP state numbering.
const TCP_SYN_SENT: u32 = 2;

/// The key of a proxy-side socket in namespace `netns`: its peer is the application, its local port the
/// proxy's listener.
#[inline(always)]
fn proxy_side_key(ctx: &SockOpsContext, netns: u64) -> ConnKey {
    ConnKey::new(
        netns,
        remote_addr(ctx),
        addr::port_from_remote_field(ctx.remote_port()),
        ctx.local_port() as u16,
    )
}

/// The namespace of the callback's socket and its configuration, if it is registered.
#[inline(always)]
fn registered(ctx: &SockOpsContext) -> Option<(u64, &'static PodConfig)> {
    // SAFETY: the context pointer is the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read only for the duration of the callback.
    unsafe { CONFIG.get(&netns) }.map(|cfg| (netns, cfg))
}

/// Keeps a socket that starts listening on a capture port of a registered namespace, for sk_lookup.
#[inline(always)]
fn remember_listener(ctx: &SockOpsContext) {
    let Some((netns, cfg)) = registered(ctx) else {
        return;
    };
    let port = ctx.local_port();
    if port != u32::from(cfg.inbound_capture_port) && port != u32::from(cfg.proxy_port) {
        return;
    }
    let mut key = ListenerKey {
        netns,
        port,
        family: ctx.family(),
    };
    // SAFETY: the kernel's context, valid for the program's lifetime.
    let _ = LISTENERS.update(&mut key, unsafe { &mut *ctx.ops }, u64::from(BPF_ANY));
}

/// The socket of the callback: always a full socket in the callbacks handled here, but the verifier only
/// knows it after the null check.
#[inline(always)]
fn socket(ctx: &SockOpsContext) -> Option<*mut bpf_sock> {
    // SAFETY: the kernel's context, readable for the program's lifetime; one load at the field's offset.
    let sk = unsafe { core::ptr::read_volatile(&(*ctx.ops).__bindgen_anon_2.sk) };
    (!sk.is_null()).then_some(sk)
}

/// The handshake key of an application's socket in namespace `netns`, connected to the proxy: the
/// connection as the proxy will see it (see [`proxy_side_key`]).
#[inline(always)]
fn app_side_key(ctx: &SockOpsContext, netns: u64) -> ConnKey {
    ConnKey::new(
        netns,
        local_addr(ctx),
        ctx.local_port() as u16,
        addr::port_from_remote_field(ctx.remote_port()),
    )
}

/// Sets or clears the state-callback flag of the callback's socket.
#[inline(always)]
fn state_callbacks(ctx: &SockOpsContext, on: bool) {
    let flags = match on {
        true => ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG,
        false => ctx.cb_flags() & !BPF_SOCK_OPS_STATE_CB_FLAG,
    };
    let _ = ctx.set_cb_flags(flags as i32);
}

/// TCP_CONNECT_CB: if the socket is an application's redirected one, its original destination is put
/// where the proxy's socket will find it at the end of the handshake. Only a socket connecting to loopback
/// can be one ([`model::is_loopback`]): the proxy's upstream connections cost no lookup. The entry is
/// handed on only if the socket still goes where the redirect pointed, its capture port.
#[inline(always)]
fn handshake_starts(ctx: &SockOpsContext) {
    if !model::is_loopback(&remote_addr(ctx)) {
        return;
    }
    // SAFETY: the context pointer is the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out before the entry is removed.
    let Some(orig) = (unsafe { ORIG_CONNECTING.get(&cookie) }).copied() else {
        return;
    };
    let _ = ORIG_CONNECTING.remove(&cookie);
    if addr::port_from_remote_field(ctx.remote_port()) != orig.proxy_port {
        return;
    }
    // A full map evicts its least recently used entry (LRU): the insert itself does not fail for lack of room.
    let _ = ORIG_BY_ADDR.insert(&app_side_key(ctx, orig.netns), &orig, 0);
    state_callbacks(ctx, true);
}

/// PASSIVE_ESTABLISHED_CB in registered namespace `netns`: if the new socket is the proxy's end of a
/// redirected connection, the original destination moves onto it. Only a socket accepted on a port a
/// redirect lands on can be one: the app's own accepted connections cost no lookup.
#[inline(always)]
fn handshake_ends(ctx: &SockOpsContext, netns: u64, cfg: &PodConfig) {
    if !model::lands_on_capture_port(cfg, ctx.local_port() as u16) {
        return;
    }
    let key = proxy_side_key(ctx, netns);
    // SAFETY: copied out before the entry is removed.
    let Some(orig) = (unsafe { ORIG_BY_ADDR.get(&key) }).copied() else {
        return;
    };
    if !socket(ctx).is_some_and(|sk| ORIG_DST.set(sk, orig)) {
        bump(orig.netns, Counter::OrigDstMisses);
    }
    let _ = ORIG_BY_ADDR.remove(&key);
}

/// STATE_CB of a redirected application socket, asked for at TCP_CONNECT_CB: leaving SYN_SENT other than
/// to ESTABLISHED, the handshake failed (refused, timed out, closed) and its entry goes. Only this one
/// change matters, so the callbacks stop here.
#[inline(always)]
fn state_changes(ctx: &SockOpsContext) {
    if ctx.arg(0) != TCP_SYN_SENT {
        return;
    }
    if ctx.arg(1) != TCP_ESTABLISHED {
        // SAFETY: the context pointer is the program's own context.
        let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        let _ = ORIG_BY_ADDR.remove(&app_side_key(ctx, netns));
    }
    state_callbacks(ctx, false);
}

/// Handles one sockops callback. The kernel calls the program for every TCP socket of the cgroup several
/// times a connection (timeout, window and ECN queries among them); those it has no use for return at once,
/// and the established callbacks look the namespace up once for both of their uses.
#[inline(always)]
pub fn handle(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => handshake_starts(ctx),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            if let Some((netns, cfg)) = registered(ctx) {
                accel::join(ctx, netns, cfg);
            }
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            if let Some((netns, cfg)) = registered(ctx) {
                handshake_ends(ctx, netns, cfg);
                accel::join(ctx, netns, cfg);
            }
        }
        BPF_SOCK_OPS_STATE_CB => state_changes(ctx),
        BPF_SOCK_OPS_TCP_LISTEN_CB => remember_listener(ctx),
        _ => {}
    }
}
