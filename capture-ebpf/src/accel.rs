//! Loopback acceleration (`--loopback-accel`). Once established, both sockets of a local TCP connection
//! (an app and its proxy, over loopback) join the `PEERS` sockhash; the sk_msg program, which then runs
//! for each of their sends, hands the data straight to the peer socket's receive queue
//! (`bpf_msg_redirect_hash` with `BPF_F_INGRESS`), skipping the loopback TCP/IP path. Handshake, FIN and
//! RST still go by TCP, so connection state, half-close and resets behave as before.
//!
//! Ordering: a receiver reads data redirected to it before data that reached it by TCP. So a socket joins
//! only before any data has crossed its connection, and a sender whose peer is not in the map (the peer is
//! not established yet, or not accelerated) goes back to TCP for good.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_ANY, BPF_F_INGRESS, sk_action::SK_PASS},
    helpers::bpf_get_netns_cookie,
    programs::{SkMsgContext, SockOpsContext},
};
use capture_common::{
    addr,
    counters::Counter,
    maps::{PeerKey, PodConfig},
    model,
};

use crate::{
    fields::{local_addr, msg_addrs, remote_addr},
    lookups::MapLookups,
    maps::{ACCEL_FALLBACK, PEERS, bump},
};

/// Adds a socket of registered namespace `netns` (configuration `cfg`) that has just become established
/// (either side) to `PEERS` if the namespace asks for acceleration and the connection qualifies.
#[inline(always)]
pub fn join(ctx: &SockOpsContext, netns: u64, cfg: &PodConfig) {
    // SAFETY: the kernel's context, readable for the program's lifetime.
    let ops = unsafe { &*ctx.ops };
    // SAFETY: fields of the kernel's context (0 unless the socket is a full TCP socket, which it is here).
    let quiet = unsafe {
        core::ptr::read_volatile(&ops.data_segs_in) == 0 && core::ptr::read_volatile(&ops.data_segs_out) == 0
    };
    let remote = remote_addr(ctx);
    if !model::accelerate(cfg, &remote, quiet, &MapLookups { id: cfg.id }) {
        return;
    }
    let mut key = PeerKey {
        netns,
        local: local_addr(ctx),
        remote,
        local_port: ctx.local_port() as u16,
        remote_port: addr::port_from_remote_field(ctx.remote_port()),
        _pad: 0,
    };
    // A connection that used this key before may have fallen back; this one starts afresh.
    let _ = ACCEL_FALLBACK.remove(&key);
    // SAFETY: the kernel's context, valid for the program's lifetime.
    if PEERS
        .update(&mut key, unsafe { &mut *ctx.ops }, u64::from(BPF_ANY))
        .is_ok()
    {
        bump(netns, Counter::Accelerated);
    }
}

/// The key of the socket sending `ctx`'s message.
#[inline(always)]
fn sender_key(ctx: &SkMsgContext, netns: u64) -> PeerKey {
    // SAFETY: the kernel's context, readable for the program's lifetime.
    let md = unsafe { &*ctx.msg };
    let (local, remote) = msg_addrs(ctx);
    PeerKey {
        netns,
        local,
        remote,
        local_port: md.local_port as u16,
        remote_port: addr::port_from_remote_field(md.remote_port),
        _pad: 0,
    }
}

/// One send of an accelerated socket: to the peer's receive queue if the peer is there, else by TCP,
/// from now on.
#[inline(always)]
pub fn redirect(ctx: &SkMsgContext) -> u32 {
    // SAFETY: the context pointer is the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let key = sender_key(ctx, netns);
    if ACCEL_FALLBACK.get_ptr(&key).is_some() {
        return SK_PASS;
    }
    let mut peer = key.peer();
    if PEERS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS)) != i64::from(SK_PASS) {
        let _ = ACCEL_FALLBACK.insert(&key, &1, 0);
        bump(netns, Counter::AccelFallbacks);
    }
    // With a redirect set this sends to the peer; without one (no peer) it sends by TCP.
    SK_PASS
}
