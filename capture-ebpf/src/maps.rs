//! Every map the kernel programs use: key, value, size, and who writes it. All are pinned by name under
//! the loader's bpffs directory, so they outlive the loader and a later `capture` run finds them again.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuHashMap, SockHash},
};
use capture_common::{
    counters::{Counter, NetnsCounters},
    maps::{
        CidrKeyData, ConnKey, FlagsText, ListenerKey, MAX_CIDR_ENTRIES, MAX_NAMESPACES, MAX_SET_ENTRIES, OrigDst,
        PeerKey, PodConfig, SetKey,
    },
};

/// Connections between connect() and their proxy's accept, over all namespaces; LRU as a backstop for
/// connections that are never accepted.
const MAX_PENDING_CONNECTIONS: u32 = 65536;

/// Established sockets under loopback acceleration, over all namespaces (both ends of each pair).
const MAX_PEERS: u32 = 65536;

/// Per-namespace configuration.
/// - key: network-namespace cookie (`u64`); value: [`PodConfig`]
/// - written by: the loader (`capture`, `capture clean`); read by: connect4/connect6.
#[map]
pub static CONFIG: HashMap<u64, PodConfig> = HashMap::pinned(MAX_NAMESPACES, 0);

/// Which namespace each sk_lookup copy serves.
/// - key: slot (`u32`: the copy's `CAPTURE_SLOT`, the namespace's [`PodConfig::slot`]); value:
///   network-namespace cookie, 0 while the slot is free
/// - written by: the loader, when it attaches a copy to a namespace and when it unregisters the namespace;
///   read by: sk_lookup.
#[map]
pub static SLOT_NETNS: Array<u64> = Array::pinned(MAX_NAMESPACES, 0);

/// Port and owner-group sets of each configuration.
/// - key: [`SetKey`] (config id, set kind, port or gid); value: `u8` 1
/// - written by: the loader; read by: connect4/connect6.
#[map]
pub static SETS: HashMap<SetKey, u8> = HashMap::pinned(MAX_SET_ENTRIES, 0);

/// CIDR sets of each configuration, matched by longest prefix.
/// - key: [`CidrKeyData`] (config id, CIDR kind, family, IPv4-mapped address) with a prefix length that
///   always covers the id, kind and family; value: `u8` 1
/// - written by: the loader; read by: connect4/connect6.
#[map]
pub static CIDRS: LpmTrie<CidrKeyData, u8> = LpmTrie::pinned(MAX_CIDR_ENTRIES, 0);

/// Original destinations of redirected TCP connections, from connect() until the socket has a local port.
/// - key: socket cookie (`u64`); value: [`OrigDst`]
/// - written by: connect4/connect6; moved to [`ORIG_BY_ADDR`] and deleted by sockops (TCP_CONNECT_CB).
#[map]
pub static ORIG_BY_COOKIE: LruHashMap<u64, OrigDst> = LruHashMap::pinned(MAX_PENDING_CONNECTIONS, 0);

/// Original destinations by the connection as the proxy sees it.
/// - key: [`ConnKey`] (netns, client address and port, the proxy socket's local port); value: [`OrigDst`]
/// - written by: sockops (TCP_CONNECT_CB of the application's socket), sk_lookup (inbound); read by: getsockopt
///   (`SO_ORIGINAL_DST`); deleted by: sockops when the proxy's accepted socket closes.
#[map]
pub static ORIG_BY_ADDR: LruHashMap<ConnKey, OrigDst> = LruHashMap::pinned(MAX_PENDING_CONNECTIONS, 0);

/// Where a UDP socket's captured DNS queries were going, so replies appear to come from there.
/// - key: socket cookie (`u64`); value: [`OrigDst`] (the server the application asked)
/// - written by: connect4/6 and sendmsg4/6 when they send DNS to the DNS proxy; read by: recvmsg4/6.
///   LRU: a UDP socket has no close callback here, so the oldest entries make room.
#[map]
pub static DNS_ORIG: LruHashMap<u64, OrigDst> = LruHashMap::pinned(MAX_PENDING_CONNECTIONS, 0);

/// Per-namespace counters, per CPU.
/// - key: network-namespace cookie; value: [`NetnsCounters`]
/// - created by: the loader on registration; incremented by: every program; read by: `capture status`.
#[map]
pub static NETNS_COUNTERS: PerCpuHashMap<u64, NetnsCounters> = PerCpuHashMap::pinned(MAX_NAMESPACES, 0);

/// The last configuration id handed out ([`PodConfig::id`]): ids only ever go up, so a new configuration
/// never takes an id whose set or CIDR entries an interrupted unregistration left behind.
/// - key: 0 (`u32`); value: the last id (`u32`), 0 before the first
/// - written and read by: the loader only, under the pin-directory lock; the programs never touch it.
#[map]
pub static CONFIG_IDS: Array<u32> = Array::pinned(1, 0);

/// The command line each namespace was registered with.
/// - key: network-namespace cookie; value: [`FlagsText`]
/// - written and read by: the loader only (`capture status`); the programs never touch it.
#[map]
pub static FLAGS_TEXT: HashMap<u64, FlagsText> = HashMap::pinned(MAX_NAMESPACES, 0);

/// The proxy's listening sockets on its capture ports, for inbound capture.
/// - key: [`ListenerKey`] (netns, port, family); value: the socket
/// - written by: sockops (TCP_LISTEN_CB) when a socket in a registered namespace listens on `-z` or `-p`;
///   the kernel removes a socket when it closes. Read by: sk_lookup.
#[map]
pub static LISTENERS: SockHash<ListenerKey> = SockHash::pinned(MAX_NAMESPACES * 2, 0);

/// Both ends of each local TCP connection in a namespace with `--loopback-accel`; the sk_msg program is
/// attached to this map and runs for every send of a socket in it.
/// - key: [`PeerKey`] (netns, the socket's own address and port, the peer's); value: the socket
/// - written by: sockops (ACTIVE/PASSIVE_ESTABLISHED_CB), when [`capture_common::model::accelerate`] says
///   so; the kernel removes a socket when it closes. Read by: sk_msg (the peer's key).
#[map]
pub static PEERS: SockHash<PeerKey> = SockHash::pinned(MAX_PEERS, 0);

/// Accelerated sockets that once sent by TCP because their peer was not in [`PEERS`]: they stay on TCP,
/// since data redirected later would overtake what TCP still holds.
/// - key: [`PeerKey`] of the sending socket; value: `u8` 1
/// - written by: sk_msg; deleted by: sockops when a new connection with the same key joins [`PEERS`].
///   LRU: an entry outlives its connection until then or until evicted.
#[map]
pub static ACCEL_FALLBACK: LruHashMap<PeerKey, u8> = LruHashMap::pinned(MAX_PEERS, 0);

/// Adds one to `counter` of namespace `netns` (if it is registered).
#[inline(always)]
pub fn bump(netns: u64, counter: Counter) {
    if let Some(counters) = NETNS_COUNTERS.get_ptr_mut(netns) {
        // SAFETY: a live per-CPU value of this CPU; the index is a `Counter`, always in range.
        unsafe { (*counters).0[counter.index()] += 1 };
    }
}
