//! sockops: joins the application's redirected socket to the proxy's accepted one, so getsockopt can
//! answer `SO_ORIGINAL_DST`, and forgets the connection when the proxy's socket closes.
//!
//! - TCP_CONNECT_CB (application side, just before the SYN; the local port is known): move the original
//!   destination from `ORIG_BY_COOKIE` to `ORIG_BY_ADDR`, keyed by what the proxy will see as its peer.
//! - PASSIVE_ESTABLISHED_CB (proxy side): if the connection is one of ours, ask for state callbacks.
//! - STATE_CB to TCP_CLOSE (proxy side): delete the entry.
//! - ACTIVE/PASSIVE_ESTABLISHED_CB: loopback acceleration picks the socket up (see [`crate::accel`]).

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
        BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_SOCK_OPS_TCP_LISTEN_CB,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockOpsContext,
};
use capture_common::{
    addr::{self, Addr},
    maps::{ConnKey, ListenerKey},
};

use crate::{
    accel,
    fields::words,
    maps::{CONFIG, LISTENERS, ORIG_BY_ADDR, ORIG_BY_COOKIE},
};

const AF_INET: u32 = 2;
/// `TCP_CLOSE` in the kernel's TCP state numbering.
const TCP_CLOSE: u32 = 7;

// local_addr and remote_addr look alike on purpose: a shared helper taking the two field references
// compiles to a pointer chosen at run time, which the verifier rejects for context loads.

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

/// The key of a proxy-side socket: its peer is the application, its local port the proxy's listener.
#[inline(always)]
fn proxy_side_key(ctx: &SockOpsContext) -> ConnKey {
    // SAFETY: the context pointer is the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    ConnKey {
        netns,
        client: remote_addr(ctx),
        client_port: addr::port_from_remote_field(ctx.remote_port()),
        proxy_port: ctx.local_port() as u16,
        _pad: 0,
    }
}

/// Keeps a socket that starts listening on a capture port of a registered namespace, for sk_lookup.
#[inline(always)]
fn remember_listener(ctx: &SockOpsContext) {
    // SAFETY: the context pointer is the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read only for the duration of this call.
    let Some(cfg) = (unsafe { CONFIG.get(&netns) }) else {
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

/// Handles one sockops callback.
#[inline(always)]
pub fn handle(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // SAFETY: the context pointer is the program's own context.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            // SAFETY: the value is copied out before the entry is removed.
            let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(&cookie) }).copied() else {
                return;
            };
            let key = ConnKey {
                netns: orig.netns,
                client: local_addr(ctx),
                client_port: ctx.local_port() as u16,
                proxy_port: orig.proxy_port,
                _pad: 0,
            };
            let _ = ORIG_BY_ADDR.insert(&key, &orig, 0);
            let _ = ORIG_BY_COOKIE.remove(&cookie);
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => accel::join(ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let key = proxy_side_key(ctx);
            if ORIG_BY_ADDR.get_ptr(&key).is_some() {
                let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            }
            accel::join(ctx);
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => {
            let _ = ORIG_BY_ADDR.remove(&proxy_side_key(ctx));
        }
        BPF_SOCK_OPS_TCP_LISTEN_CB => remember_listener(ctx),
        _ => {}
    }
}
