//! Keys and values of the maps the loader fills and the kernel programs read: `#[repr(C)]`, no implicit
//! padding, so both sides agree on every byte.

use crate::addr::Addr;

/// Names the kernel programs' maps have in the object, as the loader looks them up.
pub mod names {
    /// Per-namespace configuration.
    pub const CONFIG: &str = "CONFIG";
    /// Port and group sets.
    pub const SETS: &str = "SETS";
    /// CIDR sets.
    pub const CIDRS: &str = "CIDRS";
    /// Original destination kept with each socket.
    pub const ORIG_DST: &str = "ORIG_DST";
    /// Original destination of a redirected TCP socket between its connect and its SYN, by socket cookie.
    pub const ORIG_CONNECTING: &str = "ORIG_CONNECTING";
    /// Original destination of a connection in its handshake, by the connection as the proxy sees it.
    pub const ORIG_BY_ADDR: &str = "ORIG_BY_ADDR";
    /// Each namespace's own addresses, the source of its redirected connections.
    pub const POD_SOURCES: &str = "POD_SOURCES";
    /// Maps of older releases that no program uses any more; their pins are removed once the current
    /// programs are attached.
    pub const RETIRED: &[&str] = &["ORIG_BY_COOKIE", "DNS_ORIG"];
    /// Per-namespace counters.
    pub const NETNS_COUNTERS: &str = "NETNS_COUNTERS";
    /// The last configuration id handed out.
    pub const CONFIG_IDS: &str = "CONFIG_IDS";
    /// The flags each namespace was registered with (for `capture status`).
    pub const FLAGS_TEXT: &str = "FLAGS_TEXT";
    /// The proxy's listening sockets, for inbound capture.
    pub const LISTENERS: &str = "LISTENERS";
    /// Established local sockets of namespaces with loopback acceleration (the sk_msg program's map).
    pub const PEERS: &str = "PEERS";
    /// Which namespace each sk_lookup program copy serves, by slot.
    pub const SLOT_NETNS: &str = "SLOT_NETNS";
    /// The global that tells an sk_lookup program copy its slot.
    pub const SLOT_GLOBAL: &str = "CAPTURE_SLOT";
}

/// Registered network namespaces (pods) a node can hold: the size of the per-namespace maps, and the
/// number of sk_lookup slots.
pub const MAX_NAMESPACES: u32 = 4096;

/// Port, group and interface set members (`SETS`), over all namespaces.
pub const MAX_SET_ENTRIES: u32 = 65536;
/// CIDR set members (`CIDRS`: `-i`, `-x`, local addresses, nameservers, `-c` subnets), over all namespaces.
pub const MAX_CIDR_ENTRIES: u32 = 65536;
/// The set members one namespace may have: a sixty-fourth of the node's, so that no pod, whatever its
/// annotations say, can fill the map and make another pod's registration fail.
pub const MAX_SET_ENTRIES_PER_POD: u32 = MAX_SET_ENTRIES / 64;
/// The CIDR set members one namespace may have: an eighth of the node's, for the same reason (room for
/// the largest exclusion lists operators write, and the benchmark's 4096).
pub const MAX_CIDR_ENTRIES_PER_POD: u32 = MAX_CIDR_ENTRIES / 8;

/// At most this many proxy uids, and as many gids (`-u`, `-g`); istio's injector passes one.
pub const MAX_PROXY_IDS: usize = 8;

/// [`PodConfig::flags`] bits.
pub mod flag {
    /// `-i '*'`.
    pub const INCLUDE_ALL: u32 = 1 << 0;
    /// `-i` lists a loopback CIDR (istio's `HasLoopBackIP`): no c2/d2 rules.
    pub const INCLUDE_HAS_LOOPBACK: u32 = 1 << 1;
    /// DNS capture is effective in some family: c1/c2 take their DNS form.
    pub const DNS: u32 = 1 << 2;
    /// DNS capture for IPv4 destinations (rule f).
    pub const DNS_V4: u32 = 1 << 3;
    /// DNS capture for IPv6 destinations (rule f).
    pub const DNS_V6: u32 = 1 << 4;
    /// `--capture-all-dns`.
    pub const CAPTURE_ALL_DNS: u32 = 1 << 5;
    /// `ISTIO_OUTBOUND_OWNER_GROUPS` is a list: only those groups are captured. Otherwise the group set
    /// holds `ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE`.
    pub const OWNER_GROUPS_ONLY: u32 = 1 << 6;
    /// IPv6 capture is on for this namespace (istio's `EnableIPv6`); without it IPv6 connections pass.
    pub const IPV6: u32 = 1 << 7;
    /// `-b '*'`: every inbound TCP port except `-d` ports and the tunnel port.
    pub const INBOUND_ALL: u32 = 1 << 8;
    /// `-b` is a list: only the ports in the inbound-port set.
    pub const INBOUND_LIST: u32 = 1 << 9;
    /// The configuration has `-c` subnets, `-o` ports, owner groups, `-x` CIDRs, `-q` ports, `-i` CIDRs:
    /// a set that is empty is not looked up, which keeps a connect that most pods make cheap.
    pub const HAS_EXCLUDED_SUBNETS: u32 = 1 << 10;
    /// See [`HAS_EXCLUDED_SUBNETS`].
    pub const HAS_OUTBOUND_EXCLUDE_PORTS: u32 = 1 << 11;
    /// See [`HAS_EXCLUDED_SUBNETS`].
    pub const HAS_OWNER_GROUPS: u32 = 1 << 12;
    /// See [`HAS_EXCLUDED_SUBNETS`].
    pub const HAS_EXCLUDE_CIDRS: u32 = 1 << 13;
    /// See [`HAS_EXCLUDED_SUBNETS`].
    pub const HAS_OUTBOUND_INCLUDE_PORTS: u32 = 1 << 14;
    /// See [`HAS_EXCLUDED_SUBNETS`].
    pub const HAS_INCLUDE_CIDRS: u32 = 1 << 15;
    /// `--loopback-accel`: sends between two sockets of this namespace skip the loopback TCP/IP path.
    pub const LOOPBACK_ACCEL: u32 = 1 << 16;
    /// `-m TPROXY`: istio captures inbound in the mangle table, whose rules have no tunnel-port exception
    /// (the `--dport 15008 -j RETURN` is written in nat only), so the tunnel port is captured like any other.
    pub const TPROXY: u32 = 1 << 17;
}

/// One namespace's scalar configuration. Value of the `CONFIG` map, keyed by network-namespace cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodConfig {
    /// Prefix of this configuration's `SETS` and `CIDRS` entries. A new apply writes its entries under a
    /// fresh id and then swaps this value, so a connection never sees half of two configurations.
    pub id: u32,
    /// [`flag`] bits.
    pub flags: u32,
    /// `-p`.
    pub proxy_port: u16,
    /// `-z`.
    pub inbound_capture_port: u16,
    /// `-e`.
    pub tunnel_port: u16,
    /// The IPv4 loopback CIDR's prefix length (`ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR`), 8–32.
    pub loopback_v4_len: u16,
    /// The IPv4 loopback CIDR's address.
    pub loopback_v4: [u8; 4],
    /// How many of `uids` are used.
    pub n_uids: u32,
    /// How many of `gids` are used.
    pub n_gids: u32,
    /// `-u`, in order.
    pub uids: [u32; MAX_PROXY_IDS],
    /// `-g`, in order.
    pub gids: [u32; MAX_PROXY_IDS],
    /// The slot of the sk_lookup copy attached to this namespace (its index in `SLOT_NETNS`). Only the
    /// loader reads it, to find the slot again when the namespace is registered anew or released.
    pub slot: u32,
}

/// What a `SETS` entry is a member of.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetKind {
    /// `-o`: outbound ports never captured.
    OutboundExcludePort = 1,
    /// `-q`: outbound TCP ports captured.
    OutboundIncludePort = 2,
    /// Owner groups: the include list or the exclude list (see [`flag::OWNER_GROUPS_ONLY`]).
    OwnerGroup = 3,
    /// `-b` as a list: inbound ports captured.
    InboundPort = 4,
    /// `-d` (with `-b '*'`): inbound ports not captured.
    InboundExcludePort = 5,
    /// `-c`: interface indexes whose inbound traffic is never captured.
    ExcludedIfindex = 6,
    /// `-k`: interface indexes whose inbound traffic is treated as outbound.
    VirtIfindex = 7,
}

/// Key of the `SETS` hash map; the value is a `u8` 1.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SetKey {
    /// [`PodConfig::id`].
    pub id: u32,
    /// [`SetKind`] as u32.
    pub kind: u32,
    /// A port or a gid.
    pub value: u32,
}

/// What a `CIDRS` entry is a member of.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CidrKind {
    /// `-x`.
    Exclude = 1,
    /// `-i` (when it is a list).
    Include = 2,
    /// The namespace's own addresses: a connection to them is what iptables sees as `-o lo`.
    Local = 3,
    /// resolv.conf nameservers, for DNS capture.
    DnsServer = 4,
    /// Subnets on `-c` interfaces: the connect hook has no route, so a destination on an excluded
    /// interface's subnet stands for "routed out of that interface".
    ExcludedInterface = 5,
}

/// The address family a `CIDRS` entry serves. istio-iptables splits every CIDR list by family (an entry
/// goes to iptables or to ip6tables), so an entry only ever meets destinations of its own family: an IPv6
/// prefix such as `::/0` or the IPv4-mapped `::ffff:10.0.0.0/104` never matches an IPv4 connection, even
/// though the kernel programs keep IPv4 addresses in their mapped form.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// IPv4: an entry written as `a.b.c.d/n`; a destination that is IPv4 (or IPv4-mapped on an IPv6
    /// socket, which the kernel sends as IPv4).
    V4 = 4,
    /// IPv6: an entry written as an IPv6 prefix (IPv4-mapped ones included); a destination that is not
    /// IPv4-mapped.
    V6 = 6,
}

impl Family {
    /// The family of a connection to (or from) `addr`: what iptables or ip6tables would see.
    #[inline(always)]
    pub fn of(addr: &Addr) -> Family {
        if crate::addr::is_v4(addr) {
            Family::V4
        } else {
            Family::V6
        }
    }
}

/// Bits of [`CidrKeyData`] before the address: id, kind, family and two zero bytes.
pub const CIDR_KEY_HEADER_BITS: u32 = 64;

/// Data of an LPM-trie key of the `CIDRS` map (the trie matches `prefix_len` bits of it, in memory
/// order). Bytes only, so there is no padding and the id, kind and family are matched exactly: the family
/// in the key is what keeps one family's entries away from the other's destinations.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CidrKeyData {
    /// [`PodConfig::id`], big-endian.
    pub id: [u8; 4],
    /// [`CidrKind`].
    pub kind: u8,
    /// [`Family`] of the entry, or of the destination looked up.
    pub family: u8,
    /// Zero.
    pub _zero: [u8; 2],
    /// The address (IPv4 mapped).
    pub addr: Addr,
}

impl CidrKeyData {
    /// The key data of an entry for `addr` (16-byte form) of `family` in set `kind` of configuration `id`.
    #[inline(always)]
    pub fn new(id: u32, kind: CidrKind, family: Family, addr: Addr) -> Self {
        CidrKeyData {
            id: id.to_be_bytes(),
            kind: kind as u8,
            family: family as u8,
            _zero: [0; 2],
            addr,
        }
    }

    /// The key data that looks `dst` up in set `kind` of configuration `id`: among the entries of the
    /// destination's own family only.
    #[inline(always)]
    pub fn lookup(id: u32, kind: CidrKind, dst: Addr) -> Self {
        Self::new(id, kind, Family::of(&dst), dst)
    }

    /// Whether `self` and `other` belong to the same set of the same configuration, in the same family.
    #[inline(always)]
    pub fn same_set(&self, other: &CidrKeyData) -> bool {
        self.id == other.id && self.kind == other.kind && self.family == other.family
    }
}

/// Where a captured connection was going. Value of `ORIG_DST` (per socket), `ORIG_CONNECTING` and
/// `ORIG_BY_ADDR`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrigDst {
    /// The namespace the connection was made in.
    pub netns: u64,
    /// Original destination address (IPv4 mapped).
    pub addr: Addr,
    /// Original destination port.
    pub port: u16,
    /// The port the connection was redirected to (the proxy's listener).
    pub proxy_port: u16,
    /// 1 if the application's socket was IPv6 (its view of the address), else 0.
    pub v6_socket: u32,
}

/// Key of `ORIG_BY_ADDR`: a redirected connection in its handshake, as the proxy will see it from its
/// accepted socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnKey {
    /// Network-namespace cookie.
    pub netns: u64,
    /// The application's address (the proxy's peer), IPv4 mapped.
    pub client: Addr,
    /// The application's port.
    pub client_port: u16,
    /// The proxy's listening port the connection was redirected to.
    pub proxy_port: u16,
    /// Zero; makes the size a multiple of 8 explicitly.
    pub _pad: u32,
}

impl ConnKey {
    /// The key of a connection from the application's `client`:`client_port` to the proxy's `proxy_port`
    /// in namespace `netns`. The application's side writes it from its own address and port, the proxy's
    /// side looks it up from its peer's: both build it here, so they agree byte for byte.
    #[inline(always)]
    pub const fn new(netns: u64, client: Addr, client_port: u16, proxy_port: u16) -> Self {
        Self {
            netns,
            client,
            client_port,
            proxy_port,
            _pad: 0,
        }
    }
}

/// Key of the `LISTENERS` sockhash: the proxy's listening socket on `port` in a namespace, per family.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerKey {
    /// Network-namespace cookie.
    pub netns: u64,
    /// The listening port (`-z`, or `-p` for `-k` interfaces).
    pub port: u32,
    /// AF_INET or AF_INET6 of the listening socket.
    pub family: u32,
}

/// Key of the `PEERS` sockhash (and of `ACCEL_FALLBACK`): one end of a TCP connection, as that end sees
/// it. The peer's key is the same with local and remote swapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerKey {
    /// Network-namespace cookie.
    pub netns: u64,
    /// The socket's own address, IPv4 mapped (so an IPv4 socket and a dual-stack peer agree).
    pub local: Addr,
    /// The peer's address, IPv4 mapped.
    pub remote: Addr,
    /// The socket's own port.
    pub local_port: u16,
    /// The peer's port.
    pub remote_port: u16,
    /// Zero; makes the size a multiple of 8 explicitly.
    pub _pad: u32,
}

impl PeerKey {
    /// The key of the other end of the same connection.
    #[inline(always)]
    pub fn peer(&self) -> PeerKey {
        PeerKey {
            netns: self.netns,
            local: self.remote,
            remote: self.local,
            local_port: self.remote_port,
            remote_port: self.local_port,
            _pad: 0,
        }
    }
}

/// Longest flags text kept for `capture status`.
pub const FLAGS_TEXT_LEN: usize = 1024;

/// Value of `POD_SOURCES`: the addresses a namespace's redirected TCP connections come from, one per
/// family, as [`crate::model::redirect_source`] picks between them. [`crate::addr::UNSPECIFIED`] where the
/// namespace has no address of that family (its connections then come from loopback, as before).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodSources {
    /// The pod's IPv4 address, IPv4 mapped.
    pub v4: Addr,
    /// The pod's IPv6 address.
    pub v6: Addr,
}

/// Value of `FLAGS_TEXT`: the command line a namespace was registered with, NUL-padded.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FlagsText(pub [u8; FLAGS_TEXT_LEN]);

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all): plain-old-data, repr(C), no padding, every bit pattern valid.
    unsafe impl aya::Pod for super::PodConfig {}
    unsafe impl aya::Pod for super::SetKey {}
    unsafe impl aya::Pod for super::CidrKeyData {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::FlagsText {}
    unsafe impl aya::Pod for super::PodSources {}
    unsafe impl aya::Pod for super::ListenerKey {}
    unsafe impl aya::Pod for crate::counters::NetnsCounters {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        use core::mem::size_of;
        assert_eq!(
            size_of::<PodConfig>(),
            4 * 2 + 2 * 4 + 4 + 4 * 2 + 4 * 2 * MAX_PROXY_IDS + 4
        );
        assert_eq!(size_of::<SetKey>(), 12);
        assert_eq!(size_of::<CidrKeyData>(), 24);
        assert_eq!(size_of::<OrigDst>(), 8 + 16 + 2 + 2 + 4);
        assert_eq!(size_of::<ConnKey>(), 8 + 16 + 2 + 2 + 4);
        assert_eq!(size_of::<PeerKey>(), 8 + 16 + 16 + 2 + 2 + 4);
        assert_eq!(size_of::<PodSources>(), 16 + 16);
    }

    /// sockops writes the handshake key from the application's socket (its local address and host-order
    /// local port) and reads it from the proxy's (its peer address and the peer port as `remote_port`
    /// encodes it): decoded as the kernel programs decode them, the two must be the same bytes.
    #[test]
    fn the_handshake_key_is_the_same_from_both_sockets() {
        use crate::addr::{from_v4_word, from_words, port_from_remote_field};
        let (netns, app_port, proxy_port) = (0x1234_5678_9abc_def0, 40_000u16, 15_001u16);
        // remote_port: the network-order port loaded, then shifted left by 16 on little-endian.
        let remote_port_field = if cfg!(target_endian = "little") {
            u32::from(app_port.to_be()) << 16
        } else {
            u32::from(app_port)
        };
        let v4 = u32::from_ne_bytes([127, 0, 0, 1]);
        let written = ConnKey::new(netns, from_v4_word(v4), u32::from(app_port) as u16, proxy_port);
        let read = ConnKey::new(
            netns,
            from_v4_word(v4),
            port_from_remote_field(remote_port_field),
            proxy_port,
        );
        assert_eq!(written, read);
        let v6 = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
        assert_eq!(
            ConnKey::new(netns, from_words(v6), app_port, proxy_port),
            ConnKey::new(
                netns,
                from_words(v6),
                port_from_remote_field(remote_port_field),
                proxy_port
            )
        );
        assert_eq!(written._pad, 0);
    }

    #[test]
    fn a_lookup_key_carries_the_destinations_family() {
        use crate::addr::from_v4;
        let v4 = CidrKeyData::lookup(3, CidrKind::Exclude, from_v4([10, 0, 0, 1]));
        assert_eq!(v4.family, Family::V4 as u8);
        // An IPv6 entry over the same bytes (`::ffff:10.0.0.0/104`) is another set: the trie never matches it
        // for an IPv4 destination.
        let mapped_entry = CidrKeyData::new(3, CidrKind::Exclude, Family::V6, from_v4([10, 0, 0, 0]));
        assert!(!mapped_entry.same_set(&v4));
        assert!(CidrKeyData::new(3, CidrKind::Exclude, Family::V4, from_v4([10, 0, 0, 0])).same_set(&v4));
        let v6 = CidrKeyData::lookup(
            3,
            CidrKind::Exclude,
            [0x20, 1, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        );
        assert_eq!(v6.family, Family::V6 as u8);
        // The header is exactly what CIDR_KEY_HEADER_BITS says: id, kind, family, two zero bytes.
        assert_eq!(
            core::mem::offset_of!(CidrKeyData, addr) as u32 * 8,
            CIDR_KEY_HEADER_BITS
        );
        assert_eq!(v6._zero, [0, 0]);
    }

    #[test]
    fn a_peer_key_swaps_the_ends_and_back() {
        let key = PeerKey {
            netns: 7,
            local: crate::addr::from_v4([127, 0, 0, 1]),
            remote: crate::addr::from_v4([127, 0, 0, 6]),
            local_port: 40000,
            remote_port: 15001,
            _pad: 0,
        };
        let peer = key.peer();
        assert_eq!((peer.local, peer.local_port), (key.remote, 15001));
        assert_eq!((peer.remote, peer.remote_port), (key.local, 40000));
        assert_eq!(peer.peer(), key);
    }
}
