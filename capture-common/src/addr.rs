//! Addresses as the kernel programs keep them: 16 bytes in network order, IPv4 as IPv4-mapped IPv6
//! (`::ffff:a.b.c.d`), so one key type and one trie serve both families and a v4-mapped destination on
//! an IPv6 socket is the same address as on an IPv4 socket.

/// A 16-byte address in network order.
pub type Addr = [u8; 16];

/// The all-zero address (unbound source).
pub const UNSPECIFIED: Addr = [0; 16];

/// 127.0.0.1: where a redirected IPv4 connection goes (REDIRECT's address for locally generated traffic).
pub const LOCALHOST_V4: [u8; 4] = [127, 0, 0, 1];

/// ::1.
pub const LOCALHOST_V6: Addr = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

const MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

/// Bits an IPv4 prefix length is shifted by inside an IPv4-mapped address.
pub const V4_MAPPED_PREFIX_BITS: u32 = 96;

/// `a.b.c.d` (network-order bytes) as `::ffff:a.b.c.d`.
#[inline(always)]
pub const fn from_v4(v4: [u8; 4]) -> Addr {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3]]
}

/// Whether `addr` is IPv4-mapped.
#[inline(always)]
pub fn is_v4(addr: &Addr) -> bool {
    addr[..12] == MAPPED_PREFIX
}

/// The IPv4 part of a mapped address.
#[inline(always)]
pub const fn v4_octets(addr: &Addr) -> [u8; 4] {
    [addr[12], addr[13], addr[14], addr[15]]
}

/// An address from the kernel's four 32-bit words (`user_ip6`, `local_ip6`, …), each in network order as
/// loaded from memory on a little- or big-endian machine alike.
#[inline(always)]
pub fn from_words(words: [u32; 4]) -> Addr {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = words[i].to_ne_bytes();
        out[i * 4] = b[0];
        out[i * 4 + 1] = b[1];
        out[i * 4 + 2] = b[2];
        out[i * 4 + 3] = b[3];
        i += 1;
    }
    out
}

/// The inverse of [`from_words`].
#[inline(always)]
pub fn to_words(addr: &Addr) -> [u32; 4] {
    let w = |i: usize| u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// An IPv4 address from a kernel `u32` field holding it in network order (`user_ip4`, `src_ip4`, …).
#[inline(always)]
pub fn from_v4_word(word: u32) -> Addr {
    from_v4(word.to_ne_bytes())
}

/// `addr` within `prefix/len` (both 16-byte; `len` counts bits of the 16-byte form).
#[inline(always)]
pub fn in_prefix(addr: &Addr, prefix: &Addr, len: u32) -> bool {
    let mut i = 0;
    while i < 16 {
        let bits = len.saturating_sub(i as u32 * 8).min(8);
        let mask: u8 = if bits == 0 { 0 } else { 0xffu8 << (8 - bits) };
        if addr[i] & mask != prefix[i] & mask {
            return false;
        }
        i += 1;
    }
    true
}

/// Ports in the kernel's sock_addr context (`user_port`) and bpf_sock `dst_port` are network order in
/// the low 16 bits of a u32; these convert.
#[inline(always)]
pub const fn port_from_be_field(field: u32) -> u16 {
    u16::from_be(field as u16)
}

/// See [`port_from_be_field`].
#[inline(always)]
pub const fn port_to_be_field(port: u16) -> u32 {
    port.to_be() as u32
}

/// sockops' and sk_msg's `remote_port` hold the network-order port in their first two bytes (the kernel
/// shifts it up by 16 on little-endian machines), so the port is the field read as a big-endian u32.
#[inline(always)]
pub const fn port_from_remote_field(field: u32) -> u16 {
    u32::from_be(field) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_is_mapped_and_back() {
        let a = from_v4([192, 0, 2, 1]);
        assert!(is_v4(&a));
        assert_eq!(v4_octets(&a), [192, 0, 2, 1]);
        assert_eq!(std::net::Ipv6Addr::from(a).to_string(), "::ffff:192.0.2.1");
        assert!(!is_v4(&std::net::Ipv6Addr::LOCALHOST.octets()));
    }

    #[test]
    fn kernel_words_round_trip_in_network_order() {
        let v6: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
        // What the kernel stores: the bytes in network order, read as native u32 words.
        let o = v6.octets();
        let words = [0, 4, 8, 12].map(|i| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]));
        assert_eq!(from_words(words), o);
        assert_eq!(to_words(&o), words);
        let ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
        assert_eq!(from_v4_word(ip4), from_v4([127, 0, 0, 1]));
    }

    #[test]
    fn ports_convert_from_network_order_fields() {
        let field = u32::from(8080u16.to_be());
        assert_eq!(port_from_be_field(field), 8080);
        assert_eq!(port_to_be_field(15001), u32::from(15001u16.to_be()));
        // sockops: the be16 port loaded, then shifted left by 16 on little-endian.
        let sockops = if cfg!(target_endian = "little") {
            u32::from(8080u16.to_be()) << 16
        } else {
            8080
        };
        assert_eq!(port_from_remote_field(sockops), 8080);
    }

    #[test]
    fn prefixes_match_bitwise() {
        let net = from_v4([127, 0, 0, 1]);
        assert!(in_prefix(&from_v4([127, 9, 9, 9]), &net, 96 + 8));
        assert!(!in_prefix(&from_v4([127, 9, 9, 9]), &net, 96 + 32));
        assert!(in_prefix(&from_v4([127, 0, 0, 1]), &net, 96 + 32));
        assert!(!in_prefix(&from_v4([128, 0, 0, 1]), &net, 96 + 1));
        assert!(in_prefix(&from_v4([10, 1, 2, 3]), &from_v4([10, 255, 0, 0]), 96 + 8));
    }
}
