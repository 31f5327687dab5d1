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

/// `SO_ORIGINAL_DST` (linux/netfilter_ipv4.h), level `SOL_IP`.
pub const SO_ORIGINAL_DST: libc::c_int = 80;
/// `IP6T_SO_ORIGINAL_DST` (linux/netfilter_ipv6/ip6_tables.h), level `SOL_IPV6`; same number.
pub const IP6T_SO_ORIGINAL_DST: libc::c_int = 80;

/// The original destination of an accepted connection. `v6` selects the question (IPv4 or IPv6 socket).
pub fn original_dst(fd: BorrowedFd<'_>, v6: bool) -> io::Result<SocketAddr> {
    if v6 {
        // SAFETY: sockaddr_in6 is plain old data; all-zero is a valid value.
        let mut sa: libc::sockaddr_in6 = unsafe { zeroed() };
        let mut len = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        // SAFETY: the pointer and length describe `sa`, which outlives the call.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_IPV6,
                IP6T_SO_ORIGINAL_DST,
                (&raw mut sa).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(sa.sin6_addr.s6_addr),
            u16::from_be(sa.sin6_port),
            0,
            0,
        )))
    } else {
        // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
        let mut sa: libc::sockaddr_in = unsafe { zeroed() };
        let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: the pointer and length describe `sa`, which outlives the call.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_IP,
                SO_ORIGINAL_DST,
                (&raw mut sa).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
            u16::from_be(sa.sin_port),
        )))
    }
}
