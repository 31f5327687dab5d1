//! cgroup getsockopt: answers `SO_ORIGINAL_DST` (SOL_IP) and `IP6T_SO_ORIGINAL_DST` (SOL_IPV6) on a TCP
//! socket of a registered namespace, as conntrack does under iptables:
//!
//! - with the original destination kept with the socket (`ORIG_DST`): the proxy's end of a redirected
//!   outbound connection;
//! - otherwise as [`model::unkept_original_dst`] says: the socket's own local address (an inbound connection
//!   sk_lookup handed to the proxy, or one not rewritten at all), but nothing on the outbound capture port at
//!   loopback, nor on the application's own end of a redirected connection.
//!
//! Every other option, and these on sockets of other namespaces or of other protocols, keep the kernel's
//! own answer untouched.

use aya_ebpf::{EbpfContext as _, helpers::bpf_get_netns_cookie, programs::SockoptContext};
use capture_common::{
    addr,
    counters::Counter,
    model::{self, SO_ORIGINAL_DST},
    sock::{self, SockaddrIn, SockaddrIn6},
};

use crate::{
    fields::{socket_local, socket_remote, socket_remote_port},
    maps::{CONFIG, ORIG_DST, bump},
};

/// Lets the getsockopt complete with whatever answer it has (0 would fail it with EPERM).
pub const PROCEED: i32 = 1;

const SOL_IP: i32 = 0;
const SOL_IPV6: i32 = 41;

/// Writes `value` as the option's answer if the buffer has room; returns whether it did.
#[inline(always)]
fn answer<T>(ctx: &SockoptContext, value: T) -> bool {
    let len = core::mem::size_of::<T>();
    // SAFETY: the kernel's context; the buffer is written only within [optval, optval_end).
    unsafe {
        let so = &mut *ctx.sockopt;
        let start = so.__bindgen_anon_2.optval as *mut u8;
        let end = so.__bindgen_anon_3.optval_end as *mut u8;
        if start.add(len) > end {
            return false;
        }
        core::ptr::write_unaligned(start.cast::<T>(), value);
        so.optlen = len as i32;
        so.retval = 0;
    }
    true
}

/// Handles one getsockopt.
#[inline(always)]
pub fn getsockopt(ctx: &SockoptContext) {
    // SAFETY: the kernel's context, readable for the program's lifetime.
    let (level, optname, sk) = unsafe {
        let so = &*ctx.sockopt;
        (so.level, so.optname, so.__bindgen_anon_1.sk)
    };
    if optname != SO_ORIGINAL_DST || (level != SOL_IP && level != SOL_IPV6) {
        return;
    }
    // SAFETY: the socket the option is asked on, valid for the program's lifetime.
    let (protocol, local_port) = unsafe { ((*sk).protocol, (*sk).src_port as u16) };
    if protocol != sock::IPPROTO_TCP {
        return;
    }
    // SAFETY: the context pointer is the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // A kept destination is the answer (only capture keeps one); the namespace's configuration is looked up
    // only for a socket without one, the rarer case: a proxy asks on every connection it accepts.
    let found = match ORIG_DST.get(sk) {
        Some(orig) => Some((orig.addr, orig.port)),
        None => {
            // SAFETY: read only for the duration of this call.
            let Some(cfg) = (unsafe { CONFIG.get(&netns) }) else {
                return;
            };
            model::unkept_original_dst(
                cfg,
                &socket_local(sk),
                local_port,
                &socket_remote(sk),
                socket_remote_port(sk),
            )
        }
    };
    let Some((addr, port)) = found else {
        bump(netns, Counter::OrigDstMisses);
        return;
    };
    let answered = if level == SOL_IP {
        // IPv4 only, like conntrack: an IPv6 connection has no IPv4 original destination.
        addr::is_v4(&addr) && answer(ctx, SockaddrIn::new(&addr, port))
    } else {
        answer(ctx, SockaddrIn6::new(&addr, port))
    };
    bump(
        netns,
        if answered {
            Counter::OrigDstLookups
        } else {
            Counter::OrigDstMisses
        },
    );
}
