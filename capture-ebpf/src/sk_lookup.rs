//! sk_lookup: istio's inbound capture without rewriting a packet. A new TCP connection that
//! `ISTIO_INBOUND` would redirect is handed to the proxy's listening socket (`-z`, or `-p` for `-k`
//! interfaces); the accepted socket keeps the original destination as its local address, and the
//! getsockopt program answers `SO_ORIGINAL_DST` with it: nothing is stored per connection. If the proxy is not listening the connection is
//! dropped (fail closed): it must never reach the application uncaptured.
//!
//! sk_lookup cannot read the cookie of the namespace it is attached to, so each registered namespace gets
//! its own copy of the program, loaded for one slot ([`CAPTURE_SLOT`]); the loader writes the slot's
//! namespace into [`SLOT_NETNS`] when it attaches the copy. A copy is loaded before its namespace is known
//! (the agent keeps a few loaded and spare), which is what keeps a pod's registration in milliseconds.

use aya_ebpf::{Global, bindings::sk_action, programs::SkLookupContext};
use capture_common::{
    counters::Counter,
    maps::ListenerKey,
    model::{self, InConn, Verdict},
    sock::{AF_INET, AF_INET6, IPPROTO_TCP},
};

use crate::{
    fields::lookup_addrs,
    lookups::MapLookups,
    maps::{CONFIG, LISTENERS, SLOT_NETNS, bump},
};

/// The slot this copy serves (an index into [`SLOT_NETNS`]); set by the loader at load time.
#[unsafe(no_mangle)]
static CAPTURE_SLOT: Global<u32> = Global::new(0);

/// Hands the connection to the proxy's listener for `port`: the IPv4 one, or for an IPv4 connection a
/// dual-stack IPv6 one.
#[inline(always)]
fn assign(ctx: &SkLookupContext, netns: u64, port: u16, family: u32) -> bool {
    let key = |family| ListenerKey {
        netns,
        port: u32::from(port),
        family,
    };
    LISTENERS.redirect_sk_lookup(ctx, key(family), 0).is_ok()
        || (family == AF_INET && LISTENERS.redirect_sk_lookup(ctx, key(AF_INET6), 0).is_ok())
}

/// Decides one lookup; returns the sk_lookup verdict.
#[inline(always)]
pub fn lookup(ctx: &SkLookupContext) -> u32 {
    // A slot whose namespace was unregistered reads 0, which no namespace has: the lookup passes.
    let Some(&netns) = SLOT_NETNS.get(CAPTURE_SLOT.load()) else {
        return sk_action::SK_PASS;
    };
    // SAFETY: read only for the duration of this call.
    let Some(cfg) = (unsafe { CONFIG.get(&netns) }) else {
        return sk_action::SK_PASS;
    };
    // SAFETY: the kernel's context, readable for the program's lifetime.
    let l = unsafe { &*ctx.lookup };
    if l.protocol != IPPROTO_TCP {
        return sk_action::SK_PASS;
    }
    let family = l.family;
    let (local, remote) = lookup_addrs(ctx);
    let local_port = l.local_port as u16;
    let conn = InConn {
        dst: local,
        src: remote,
        dport: local_port,
        ifindex: l.ingress_ifindex,
    };
    let Verdict::Redirect(port, _) = model::inbound(cfg, &conn, &MapLookups { id: cfg.id }) else {
        return sk_action::SK_PASS;
    };
    if !assign(ctx, netns, port, family) {
        bump(netns, Counter::InboundResets);
        return sk_action::SK_DROP;
    }
    bump(netns, Counter::Inbound);
    sk_action::SK_PASS
}
