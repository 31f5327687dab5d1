//! A stand-in for a socket load balancer (Cilium's kube-proxy replacement, Calico's eBPF connect-time load
//! balancing), for the tests: one IPv4 service VIP:port rewritten to one backend in cgroup programs, the way
//! those rewrite a ClusterIP to a backend before the socket ever routes a packet. Attached by link to a
//! test's cgroup, so it leaves the cgroup when [`SocketLb`] drops.
//!
//! | hook     | does                                                                            |
//! |----------|---------------------------------------------------------------------------------|
//! | connect4 | a TCP (or connected UDP) connect to VIP:port goes to backend:port instead        |
//! | sendmsg4 | a UDP send to VIP:port goes to backend:port                                      |
//! | recvmsg4 | a UDP datagram from backend:port is reported as from VIP:port (the reply un-NAT) |

use std::net::SocketAddrV4;

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
            (rewrite(vip, backend), "test_lb_conn4", Hook::Connect4),
            (rewrite(vip, backend), "test_lb_send4", Hook::Sendmsg4),
            (rewrite(backend, vip), "test_lb_recv4", Hook::Recvmsg4),
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
