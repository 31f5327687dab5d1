//! `SO_ORIGINAL_DST`: how a transparent proxy learns where a captured connection was going.
//!
//! Under the iptables backend conntrack answers it; under the eBPF backend a cgroup getsockopt program
//! does. Either way the proxy asks the same question, so this is what the validator, the demo sidecar
//! and the tests use.

use std::{
    io,
    mem::{size_of, zeroed},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd, BorrowedFd},
};

use capture_common::model::SO_ORIGINAL_DST;

/// Reads a fixed-size option value.
fn get<T>(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int) -> io::Result<T> {
    // SAFETY: only used with plain C structs (sockaddr_in, sockaddr_in6), for which all-zero is valid.
    let mut value: T = unsafe { zeroed() };
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: the pointer and length describe `value`, which outlives the call.
    let rc = unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, (&raw mut value).cast(), &mut len) };
    if rc == 0 {
        Ok(value)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The original destination of an accepted connection. `v6` selects the question (IPv4 or IPv6 socket).
pub fn original_dst(fd: BorrowedFd<'_>, v6: bool) -> io::Result<SocketAddr> {
    if v6 {
        let sa: libc::sockaddr_in6 = get(fd, libc::SOL_IPV6, SO_ORIGINAL_DST)?;
        let ip = Ipv6Addr::from(sa.sin6_addr.s6_addr);
        Ok(SocketAddr::V6(SocketAddrV6::new(ip, u16::from_be(sa.sin6_port), 0, 0)))
    } else {
        let sa: libc::sockaddr_in = get(fd, libc::SOL_IP, SO_ORIGINAL_DST)?;
        let ip = Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
        Ok(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sa.sin_port))))
    }
}
