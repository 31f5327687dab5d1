//! Socket constants as the kernel's BPF contexts report them (`family`, `protocol`), defined once for every
//! program: the bpf target has no libc.

/// `AF_INET`.
pub const AF_INET: u32 = 2;
/// `AF_INET6`.
pub const AF_INET6: u32 = 10;
/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u32 = 6;
/// `IPPROTO_UDP`.
pub const IPPROTO_UDP: u32 = 17;

/// `struct sockaddr_in`: what `SO_ORIGINAL_DST` answers, and what a program binds an IPv4 socket to.
#[repr(C)]
pub struct SockaddrIn {
    family: u16,
    /// Network order.
    port: u16,
    addr: [u8; 4],
    zero: [u8; 8],
}

impl SockaddrIn {
    /// `addr` (IPv4 mapped) and `port` (host order).
    #[inline(always)]
    pub fn new(addr: &crate::addr::Addr, port: u16) -> Self {
        Self {
            family: AF_INET as u16,
            port: port.to_be(),
            addr: crate::addr::v4_octets(addr),
            zero: [0; 8],
        }
    }
}

/// `struct sockaddr_in6`: what `IP6T_SO_ORIGINAL_DST` answers, and what a program binds an IPv6 socket to
/// (an IPv4-mapped address included).
#[repr(C)]
pub struct SockaddrIn6 {
    family: u16,
    /// Network order.
    port: u16,
    flowinfo: u32,
    addr: crate::addr::Addr,
    scope_id: u32,
}

impl SockaddrIn6 {
    /// `addr` and `port` (host order).
    #[inline(always)]
    pub fn new(addr: &crate::addr::Addr, port: u16) -> Self {
        Self {
            family: AF_INET6 as u16,
            port: port.to_be(),
            flowinfo: 0,
            addr: *addr,
            scope_id: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddrs_are_the_kernels_sizes() {
        assert_eq!(size_of::<SockaddrIn>(), 16);
        assert_eq!(size_of::<SockaddrIn6>(), 28);
    }
}
