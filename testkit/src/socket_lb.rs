//! A stand-in for a socket load balancer (Cilium's kube-proxy replacement, Calico's eBPF connect-time load
//! balancing), for the tests: one IPv4 service VIP:port rewritten to one backend in cgroup programs, the way
//! those rewrite a ClusterIP to a backend before the socket ever routes a packet. Attached by link to a
//! test's cgroup, so it leaves the cgroup when [`SocketLb`] drops.
//!
//! | hook     | does                                                                            |
//! |----------|---------------------------------------------------------------------------------|
//! | connect4 | a TCP (or connected UDP) connect to VIP:port goes to backend:port instead        |
//! | connect6 | the same on an IPv6 socket, to the IPv4-mapped VIP (to the IPv4-mapped backend)  |
//! | sendmsg4 | a UDP send to VIP:port goes to backend:port                                      |
//! | recvmsg4 | a UDP datagram from backend:port is reported as from VIP:port (the reply un-NAT) |

use std::net::{SocketAddrV4, SocketAddrV6};

use crate::{
    Cgroup,
    sock_addr::{self, Attached, Hook, Insn, ctx},
};

/// The load balancer's programs, attached to one cgroup while this lives.
pub struct SocketLb {
    _programs: Vec<Attached>,
}

impl SocketLb {
    /// Attaches the programs for service `vip` with the one backend `backend` to `cgroup`.
    pub fn attach(cgroup: &Cgroup, vip: SocketAddrV4, backend: SocketAddrV4) -> SocketLb {
        let programs = [
            (rewrite(vip, backend).to_vec(), "test_lb_conn4", Hook::Connect4),
            (
                rewrite6(mapped(vip), mapped(backend)).to_vec(),
                "test_lb_conn6",
                Hook::Connect6,
            ),
            (rewrite(vip, backend).to_vec(), "test_lb_send4", Hook::Sendmsg4),
            (rewrite(backend, vip).to_vec(), "test_lb_recv4", Hook::Recvmsg4),
        ]
        .iter()
        .map(|(program, name, hook)| {
            sock_addr::attach(program, name, *hook, cgroup.path())
                .unwrap_or_else(|e| panic!("socket load balancer: {e:#}"))
        })
        .collect();
        SocketLb { _programs: programs }
    }
}

/// `user_ip4` and `user_port` as the context holds them: the address's and the port's network-order values.
fn ctx_values(addr: SocketAddrV4) -> (u32, u32) {
    (u32::from_ne_bytes(addr.ip().octets()), u32::from(addr.port().to_be()))
}

/// If the context's address is `from`, make it `to`; either way let the call proceed.
fn rewrite(from: SocketAddrV4, to: SocketAddrV4) -> [Insn; 10] {
    let ((from_ip, from_port), (to_ip, to_port)) = (ctx_values(from), ctx_values(to));
    // r1 is the context; r2 a scratch register. A jump of +off goes to instruction pc + 1 + off: both go
    // to 8, the verdict.
    [
        /* 0 */ Insn::load32(2, 1, ctx::USER_IP4),
        /* 1 */ Insn::jne32(2, from_ip, 6),
        /* 2 */ Insn::load32(2, 1, ctx::USER_PORT),
        /* 3 */ Insn::jne32(2, from_port, 4),
        /* 4 */ Insn::mov32(2, to_ip),
        /* 5 */ Insn::store32(1, 2, ctx::USER_IP4),
        /* 6 */ Insn::mov32(2, to_port),
        /* 7 */ Insn::store32(1, 2, ctx::USER_PORT),
        /* 8 */ Insn::mov64_r0(1),
        /* 9 */ Insn::exit(),
    ]
}

/// `addr` as an IPv6 socket names it: IPv4-mapped.
fn mapped(addr: SocketAddrV4) -> SocketAddrV6 {
    SocketAddrV6::new(addr.ip().to_ipv6_mapped(), addr.port(), 0, 0)
}

/// `user_ip6`'s four words and `user_port` as the context holds them.
fn ctx_values6(addr: SocketAddrV6) -> ([u32; 4], u32) {
    let o = addr.ip().octets();
    let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    ([word(0), word(4), word(8), word(12)], u32::from(addr.port().to_be()))
}

/// As [`rewrite`], for an IPv6 context: all four words and the port must match.
fn rewrite6(from: SocketAddrV6, to: SocketAddrV6) -> [Insn; 22] {
    let ((f, from_port), (t, to_port)) = (ctx_values6(from), ctx_values6(to));
    let word = |i: i16| ctx::USER_IP6 + 4 * i;
    // Every mismatch jumps to 20, the verdict: from instruction pc, an offset of 20 - (pc + 1).
    [
        /* 0 */ Insn::load32(2, 1, word(0)),
        /* 1 */ Insn::jne32(2, f[0], 18),
        /* 2 */ Insn::load32(2, 1, word(1)),
        /* 3 */ Insn::jne32(2, f[1], 16),
        /* 4 */ Insn::load32(2, 1, word(2)),
        /* 5 */ Insn::jne32(2, f[2], 14),
        /* 6 */ Insn::load32(2, 1, word(3)),
        /* 7 */ Insn::jne32(2, f[3], 12),
        /* 8 */ Insn::load32(2, 1, ctx::USER_PORT),
        /* 9 */ Insn::jne32(2, from_port, 10),
        /* 10 */ Insn::mov32(2, t[0]),
        /* 11 */ Insn::store32(1, 2, word(0)),
        /* 12 */ Insn::mov32(2, t[1]),
        /* 13 */ Insn::store32(1, 2, word(1)),
        /* 14 */ Insn::mov32(2, t[2]),
        /* 15 */ Insn::store32(1, 2, word(2)),
        /* 16 */ Insn::mov32(2, t[3]),
        /* 17 */ Insn::store32(1, 2, word(3)),
        /* 18 */ Insn::mov32(2, to_port),
        /* 19 */ Insn::store32(1, 2, ctx::USER_PORT),
        /* 20 */ Insn::mov64_r0(1),
        /* 21 */ Insn::exit(),
    ]
}
