//! The decision model's set lookups, backed by the `SETS` and `CIDRS` maps.

use aya_ebpf::maps::lpm_trie::Key;
use capture_common::{
    addr::Addr,
    maps::{CIDR_KEY_HEADER_BITS, CidrKeyData, CidrKind, SetKey, SetKind},
    model::Lookups,
};

use crate::maps::{CIDRS, SETS};

/// Bits of a full-length CIDR lookup key: the header (id, kind, family) and a 128-bit address.
const FULL_KEY_BITS: u32 = CIDR_KEY_HEADER_BITS + 128;

/// Lookups in the sets of one configuration.
pub struct MapLookups {
    /// `PodConfig::id`.
    pub id: u32,
}

impl Lookups for MapLookups {
    #[inline(always)]
    fn in_set(&self, kind: SetKind, value: u32) -> bool {
        let key = SetKey {
            id: self.id,
            kind: kind as u32,
            value,
        };
        // SAFETY: the value is only tested for presence, never read through the reference.
        unsafe { SETS.get(&key) }.is_some()
    }

    #[inline(always)]
    fn in_cidrs(&self, kind: CidrKind, addr: &Addr) -> bool {
        CIDRS
            .get(Key::new(FULL_KEY_BITS, CidrKeyData::lookup(self.id, kind, *addr)))
            .is_some()
    }
}
