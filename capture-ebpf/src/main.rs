//! capture's kernel programs. This file only wires entry points to the modules that implement them.
#![no_std]
#![no_main]

mod accel;
mod connect;
mod fields;
mod lookups;
mod maps;
mod sk_lookup;
mod sockops;
mod sockopt;

use aya_ebpf::{
    macros::{cgroup_sock_addr, cgroup_sockopt, sk_lookup, sk_msg, sock_ops},
    programs::{SkLookupContext, SkMsgContext, SockAddrContext, SockOpsContext, SockoptContext},
};

/// Outbound capture for IPv4 sockets.
#[cgroup_sock_addr(connect4)]
pub fn capture_connect4(ctx: SockAddrContext) -> i32 {
    let netns = connect::connect4(&ctx, connect::Hook::Connect);
    if netns != connect::NO_BIND {
        connect::bind_source4(&ctx, netns);
    }
    connect::PROCEED
}

/// Outbound capture for IPv6 sockets (IPv4-mapped destinations included).
#[cgroup_sock_addr(connect6)]
pub fn capture_connect6(ctx: SockAddrContext) -> i32 {
    let netns = connect::connect6(&ctx, connect::Hook::Connect);
    if netns != connect::NO_BIND {
        connect::bind_source6(&ctx, netns);
    }
    connect::PROCEED
}

/// Unconnected UDP (DNS capture): the same decision as connect4.
#[cgroup_sock_addr(sendmsg4)]
pub fn capture_sendmsg4(ctx: SockAddrContext) -> i32 {
    let _ = connect::connect4(&ctx, connect::Hook::Sendmsg);
    connect::PROCEED
}

/// Unconnected UDP (DNS capture): the same decision as connect6.
#[cgroup_sock_addr(sendmsg6)]
pub fn capture_sendmsg6(ctx: SockAddrContext) -> i32 {
    let _ = connect::connect6(&ctx, connect::Hook::Sendmsg);
    connect::PROCEED
}

/// Replies of captured DNS appear to come from the server asked.
#[cgroup_sock_addr(recvmsg4)]
pub fn capture_recvmsg4(ctx: SockAddrContext) -> i32 {
    connect::recvmsg4(&ctx);
    connect::PROCEED
}

/// Replies of captured DNS appear to come from the server asked (IPv6 sockets).
#[cgroup_sock_addr(recvmsg6)]
pub fn capture_recvmsg6(ctx: SockAddrContext) -> i32 {
    connect::recvmsg6(&ctx);
    connect::PROCEED
}

/// Tracks redirected connections from the application's socket to the proxy's.
#[sock_ops]
pub fn capture_sockops(ctx: SockOpsContext) -> u32 {
    sockops::handle(&ctx);
    // The return value of a sockops callback is only read for the few ops that ask for a reply.
    1
}

/// Answers SO_ORIGINAL_DST for redirected connections.
#[cgroup_sockopt(getsockopt)]
pub fn capture_getsockopt(ctx: SockoptContext) -> i32 {
    sockopt::getsockopt(&ctx);
    sockopt::PROCEED
}

/// Inbound capture for one namespace (one copy per registered namespace).
#[sk_lookup]
pub fn capture_sk_lookup(ctx: SkLookupContext) -> u32 {
    sk_lookup::lookup(&ctx)
}

/// Loopback acceleration: a send of an accelerated socket goes straight to its peer (attached to the
/// `PEERS` sockhash, so it runs only for sockets in it).
#[sk_msg]
pub fn capture_sk_msg(ctx: SkMsgContext) -> u32 {
    accel::redirect(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves there are no panics; this is never reached.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
