//! Every map the kernel programs use: key, value, size, and who writes it. All are pinned by name under
//! the loader's bpffs directory, so they outlive the loader and a later `capture` run finds them again.

use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_SK_STORAGE_GET_F_CREATE, bpf_map_type::BPF_MAP_TYPE_SK_STORAGE, bpf_sock},
    helpers::generated::bpf_sk_storage_get,
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuHashMap, SockHash},
};
use capture_common::{
    counters::{Counter, NetnsCounters},
    maps::{
        CidrKeyData, ConnKey, FlagsText, ListenerKey, MAX_CIDR_ENTRIES, MAX_NAMESPACES, MAX_SET_ENTRIES, OrigDst,
        PeerKey, PodConfig, PodSources, SetKey,
    },
};

/// Connections in their handshake (between the application's connect and the proxy's side established), over
/// all namespaces; LRU as a backstop for handshakes whose end no program sees.
const MAX_HANDSHAKES: u32 = 65536;

/// Established sockets under loopback acceleration, over all namespaces (both ends of each pair).
const MAX_PEERS: u32 = 65536;

/// Per-namespace configuration.
/// - key: network-namespace cookie (`u64`); value: [`PodConfig`]
/// - written by: the loader (`capture`, `capture clean`); read by: connect4/connect6.
#[map]
pub static CONFIG: HashMap<u64, PodConfig> = HashMap::pinned(MAX_NAMESPACES, 0);

/// Each namespace's own addresses, one per family: a redirected TCP connection's socket is bound to one
/// before its destination is rewritten, so the proxy sees the pod's address as its peer, as under REDIRECT
/// (see [`capture_common::model::redirect_source`]).
/// - key: network-namespace cookie (`u64`); value: [`PodSources`]
/// - written by: the loader, with the namespace's other entries, before its `CONFIG` value; deleted when
///   the namespace is unregistered. Read by: connect4/connect6, for a redirect only.
#[map]
pub static POD_SOURCES: HashMap<u64, PodSources> = HashMap::pinned(MAX_NAMESPACES, 0);

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

/// Where each captured connection was going, kept with the socket for as long as the socket lives: on the
/// proxy's accepted socket of a redirected TCP connection (from the end of the handshake, for
/// `SO_ORIGINAL_DST`), and on a UDP socket whose DNS queries are redirected (for its replies). No size: the
/// kernel frees a socket's value with the socket.
/// - key: the socket; value: [`OrigDst`]
/// - written by: sendmsg4/6 and connect4/6 (a redirected UDP socket), sockops (PASSIVE_ESTABLISHED_CB, the
///   proxy's socket); read by: getsockopt, recvmsg4/6.
#[btf_map]
pub static ORIG_DST: SocketStorage<OrigDst> = SocketStorage::new();

/// Original destinations of redirected TCP sockets between their connect and their SYN, by socket cookie:
/// the application's socket does not have its port yet, so the handshake's key cannot be written. A map
/// entry instead of socket storage: the storage's allocation, and its free when the socket closes, cost more
/// than the whole decision (`cargo xtask bench`'s profile in the README).
/// - key: socket cookie (`u64`); value: [`OrigDst`]
/// - written by: connect4/6 (a redirected TCP connect); read and deleted by: sockops (TCP_CONNECT_CB of the
///   same socket, in the same connect(2) unless the socket defers its connect for TCP Fast Open), also
///   read by connect4/6 to bind the socket. LRU as a backstop for a connect that fails before its SYN,
///   whose entry no program deletes (a later redirected connect of the socket replaces it).
#[map]
pub static ORIG_CONNECTING: LruHashMap<u64, OrigDst> = LruHashMap::pinned(MAX_HANDSHAKES, 0);

/// Original destinations of connections in their handshake, by the connection as the proxy will see it:
/// the only moment neither socket can carry it (the proxy's socket does not exist yet).
/// - key: [`ConnKey`] (netns, client address and port, the proxy's listening port); value: [`OrigDst`]
/// - written by: sockops (TCP_CONNECT_CB of the application's socket, from [`ORIG_CONNECTING`]); moved onto
///   the proxy's socket and deleted by sockops (PASSIVE_ESTABLISHED_CB), or deleted when the application's
///   handshake fails (STATE_CB from SYN_SENT). Entries of a namespace are deleted when it is unregistered.
#[map]
pub static ORIG_BY_ADDR: LruHashMap<ConnKey, OrigDst> = LruHashMap::pinned(MAX_HANDSHAKES, 0);

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

/// libbpf's `LIBBPF_PIN_BY_NAME`: the loader pins the map under its directory by the map's name.
const PIN_BY_NAME: usize = 1;

/// A socket-storage map (`BPF_MAP_TYPE_SK_STORAGE`): one `T` per socket, freed with the socket. Declared
/// in BTF (the kernel requires it for this map type) with pinning by name, like every other map here;
/// aya-ebpf's own `SkStorage` has no pinning and only takes a sock_addr context. The fields are the BTF
/// map definition the loader reads (each a pointer to an array whose length is the value); never read.
#[repr(C)]
pub struct SocketStorage<T> {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
    pinning: *const [i32; PIN_BY_NAME],
}

// SAFETY: a placeholder the loader replaces with the map; nothing reads or writes its fields.
unsafe impl<T> Sync for SocketStorage<T> {}

impl<T> SocketStorage<T> {
    /// The definition the loader reads.
    pub const fn new() -> Self {
        Self {
            r#type: ptr::null(),
            key: ptr::null(),
            value: ptr::null(),
            max_entries: ptr::null(),
            map_flags: ptr::null(),
            pinning: ptr::null(),
        }
    }

    #[inline(always)]
    fn storage(&self, sk: *mut bpf_sock, init: *mut T, flags: u64) -> Option<*mut T> {
        let map = ptr::from_ref(self).cast_mut().cast::<c_void>();
        // SAFETY: `sk` is a socket pointer the verifier knows as such (it rejects anything else).
        let value = unsafe { bpf_sk_storage_get(map, sk.cast(), init.cast(), flags) }.cast::<T>();
        (!value.is_null()).then_some(value)
    }

    /// The value kept with `sk`, if it has one.
    #[inline(always)]
    pub fn get(&self, sk: *mut bpf_sock) -> Option<T>
    where
        T: Copy,
    {
        // SAFETY: the kernel's value for this socket, valid for the program's run; copied out.
        self.storage(sk, ptr::null_mut(), 0).map(|v| unsafe { *v })
    }

    /// Keeps `value` with `sk`, replacing what it had. Fails only when the kernel cannot allocate (the
    /// socket's option memory, `net.core.optmem_max`, or memory itself).
    #[inline(always)]
    pub fn set(&self, sk: *mut bpf_sock, mut value: T) -> bool {
        match self.storage(sk, &mut value, u64::from(BPF_SK_STORAGE_GET_F_CREATE)) {
            Some(slot) => {
                // SAFETY: the socket's own value, writable for the program's run. A value created just now
                // already holds `value`; one that existed is overwritten.
                unsafe { slot.write(value) };
                true
            }
            None => false,
        }
    }
}
