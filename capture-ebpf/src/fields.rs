//! Reading kernel context and socket fields the way the verifier accepts: the helpers every program uses.

use aya_ebpf::programs::SockOpsContext;
use capture_common::{
    addr::{self, Addr},
    sock::AF_INET,
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
