//! cgroup connect4: runs on every connect(2) of an IPv4 socket in the attached cgroup.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use capture_common::counters::Counter;

use crate::maps::bump;

/// Lets a connect(2) proceed. A cgroup sock_addr program that returns 0 fails the call with EPERM.
const PROCEED: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn capture_connect4(_ctx: SockAddrContext) -> i32 {
    bump(Counter::Connect4Calls);
    PROCEED
}
