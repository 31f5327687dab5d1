//! The pinned maps, opened by path: registering and unregistering a namespace, and reading them back.

use std::{collections::HashSet, path::Path};

use anyhow::{Context as _, Result};
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuHashMap, PerCpuValues, SockHash, lpm_trie::Key};
pub use capture_common::maps::names;
use capture_common::{
    addr,
    counters::{Counter, NetnsCounters},
    maps::{
        CIDR_KEY_HEADER_BITS, CidrKeyData, ConnKey, FLAGS_TEXT_LEN, Family, FlagsText, ListenerKey, MAX_NAMESPACES,
        OrigDst, PodConfig, PodSources, SetKey,
    },
};

use super::entries;
use crate::{config::Config, namespace::Environment};

/// The slot of a namespace registered without inbound capture (the benchmark's many namespaces): past
/// the last real one, so no sk_lookup copy ever serves it.
pub const NO_SLOT: u32 = MAX_NAMESPACES;

/// The maps the loader writes.
pub struct Maps {
    config: HashMap<MapData, u64, PodConfig>,
    sets: HashMap<MapData, SetKey, u8>,
    cidrs: LpmTrie<MapData, CidrKeyData, u8>,
    orig_by_addr: HashMap<MapData, ConnKey, OrigDst>,
    /// Missing, like `config_ids`, where the pins are older than the release that added it.
    orig_connecting: Option<HashMap<MapData, u64, OrigDst>>,
    counters: PerCpuHashMap<MapData, u64, NetnsCounters>,
    flags: HashMap<MapData, u64, FlagsText>,
    listeners: SockHash<MapData, ListenerKey>,
    slot_netns: Array<MapData, u64>,
    /// Missing where the pins were made by a release before it, until the next load pins it: only a new
    /// registration needs it.
    config_ids: Option<Array<MapData, u32>>,
    /// Missing, like `config_ids`, where the pins are older than the release that added it.
    sources: Option<HashMap<MapData, u64, PodSources>>,
}

/// A registration whose entries are written but whose `CONFIG` value is not: no connection can see any of
/// it until [`Maps::commit`]; [`Maps::abort`] takes it back.
#[must_use = "a staged registration is committed or aborted"]
pub struct Staged {
    netns: u64,
    config: PodConfig,
    /// The configuration it replaces, if the namespace is registered already.
    old: Option<PodConfig>,
}

/// One registered namespace, as `capture status` shows it.
pub struct Registered {
    /// Its cookie.
    pub netns: u64,
    /// The command line it was registered with.
    pub flags: String,
    /// Its counters, summed over CPUs, by name.
    pub counters: Vec<(&'static str, u64)>,
}

fn open<T: TryFrom<Map>>(dir: &Path, name: &str) -> Result<T>
where
    T::Error: std::error::Error + Send + Sync + 'static,
{
    let path = dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| format!("open pinned map {}", path.display()))?;
    let map = Map::from_map_data(data).with_context(|| format!("map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

impl Maps {
    /// Opens the maps pinned in `dir`.
    pub fn open(dir: &Path) -> Result<Maps> {
        Ok(Maps {
            config: open(dir, names::CONFIG)?,
            sets: open(dir, names::SETS)?,
            cidrs: open(dir, names::CIDRS)?,
            orig_by_addr: open(dir, names::ORIG_BY_ADDR)?,
            orig_connecting: open(dir, names::ORIG_CONNECTING).ok(),
            counters: open(dir, names::NETNS_COUNTERS)?,
            flags: open(dir, names::FLAGS_TEXT)?,
            listeners: open(dir, names::LISTENERS)?,
            slot_netns: open(dir, names::SLOT_NETNS)?,
            config_ids: open(dir, names::CONFIG_IDS).ok(),
            sources: open(dir, names::POD_SOURCES).ok(),
        })
    }

    /// The configuration ids registered namespaces use.
    fn ids_in_use(&self) -> Result<HashSet<u32>> {
        Ok(self
            .config
            .iter()
            .map(|r| r.map(|(_, c)| c.id))
            .collect::<Result<_, _>>()?)
    }

    /// A configuration id never handed out before (until the 32-bit counter wraps, and then none a
    /// registered namespace uses): entries an interrupted unregistration left under an old id can never
    /// become part of a new configuration. The caller holds the pin-directory lock.
    fn fresh_id(&mut self) -> Result<u32> {
        let used = self.ids_in_use()?;
        let ids = self
            .config_ids
            .as_mut()
            .context("the pinned CONFIG_IDS map is missing (pins of an older capture, not loaded again)")?;
        let mut id = ids.get(&0, 0).context("CONFIG_IDS")?;
        // At most MAX_NAMESPACES ids are in use, so this ends within that many steps.
        loop {
            id = id.wrapping_add(1);
            if id != 0 && !used.contains(&id) {
                break;
            }
        }
        ids.set(0, id, 0).context("CONFIG_IDS")?;
        Ok(id)
    }

    /// Removes the set and CIDR entries of every configuration id no registered namespace uses, and the
    /// `POD_SOURCES` entries of namespaces not registered: what a registration or unregistration that was
    /// killed half-way left. Returns how many went. The caller
    /// holds the pin-directory lock, so no registration is half-written meanwhile.
    pub fn sweep(&mut self) -> Result<usize> {
        let used = self.ids_in_use()?;
        let sets: Vec<SetKey> = self
            .sets
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !used.contains(&k.id))
            .collect();
        let cidrs: Vec<Key<CidrKeyData>> = self
            .cidrs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !used.contains(&u32::from_be_bytes(k.data().id)))
            .collect();
        let mut swept = sets.len() + cidrs.len();
        for key in sets {
            self.sets.remove(&key).context("SETS")?;
        }
        for key in cidrs {
            self.cidrs.remove(&key).context("CIDRS")?;
        }
        // Addresses of namespaces with no `CONFIG` value (written by a registration killed before its
        // commit, or left by an unregistration killed after removing it): cookies are never reused, so
        // nothing else would ever free their room in the map.
        let registered: HashSet<u64> = self.config.keys().collect::<Result<_, _>>()?;
        if let Some(sources) = self.sources.as_mut() {
            let orphans: Vec<u64> = sources
                .keys()
                .filter_map(Result::ok)
                .filter(|netns| !registered.contains(netns))
                .collect();
            swept += orphans.len();
            for netns in orphans {
                sources.remove(&netns).context("POD_SOURCES")?;
            }
        }
        Ok(swept)
    }

    /// Writes every `CIDRS` entry that is still in the layout of releases before the family was part of
    /// the key (the kind in the key's eighth byte, no family) again in the current layout, and returns the
    /// old keys, for [`Maps::remove_cidr_keys`] once the new programs are attached: until then the old
    /// programs keep finding the old keys, and after it the new ones find the new. The family is the
    /// entry's address's (an IPv4-mapped one is IPv4), which is how the old programs matched it; a pod
    /// registered again gets its entries in the family it wrote them in.
    pub fn upgrade_cidr_keys(&mut self) -> Result<Vec<Key<CidrKeyData>>> {
        let old: Vec<Key<CidrKeyData>> = self
            .cidrs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().kind == 0)
            .collect();
        for key in &old {
            let data = key.data();
            let bits = key.prefix_len();
            let address_bits = bits.saturating_sub(CIDR_KEY_HEADER_BITS);
            let family = if addr::is_v4(&data.addr) && address_bits >= addr::V4_MAPPED_PREFIX_BITS {
                Family::V4
            } else {
                Family::V6
            };
            let kind = data._zero[1];
            let new = CidrKeyData {
                kind,
                family: family as u8,
                _zero: [0; 2],
                ..data
            };
            self.cidrs.insert(&Key::new(bits, new), 1, 0).context("CIDRS")?;
        }
        Ok(old)
    }

    /// Removes `keys` from `CIDRS`.
    pub fn remove_cidr_keys(&mut self, keys: Vec<Key<CidrKeyData>>) -> Result<()> {
        for key in keys {
            self.cidrs.remove(&key).context("CIDRS")?;
        }
        Ok(())
    }

    /// The sk_lookup slots registered namespaces hold.
    pub fn slots_in_use(&self) -> Result<Vec<u32>> {
        Ok(self
            .config
            .iter()
            .map(|r| r.map(|(_, c)| c.slot))
            .collect::<Result<_, _>>()?)
    }

    /// The sk_lookup slot of namespace `netns`, if it is registered with one.
    pub fn slot_of(&self, netns: u64) -> Option<u32> {
        self.config
            .get(&netns, 0)
            .ok()
            .map(|c| c.slot)
            .filter(|&slot| slot != NO_SLOT)
    }

    /// Gives sk_lookup slot `slot` to namespace `netns`: the copy loaded for that slot serves it from now.
    pub fn bind_slot(&mut self, slot: u32, netns: u64) -> Result<()> {
        self.slot_netns.set(slot, netns, 0).context("SLOT_NETNS")
    }

    /// Frees sk_lookup slot `slot` if it is still namespace `netns`'s.
    pub fn release_slot(&mut self, slot: u32, netns: u64) -> Result<()> {
        if slot != NO_SLOT && self.slot_netns.get(&slot, 0).is_ok_and(|n| n == netns) {
            self.bind_slot(slot, 0)?;
        }
        Ok(())
    }

    /// Registers (or re-registers) namespace `netns`, whose inbound capture is sk_lookup slot `slot`:
    /// [`Maps::stage`], then [`Maps::commit`].
    pub fn register(&mut self, netns: u64, slot: u32, cfg: &Config, env: &Environment, flags: &str) -> Result<()> {
        let staged = self.stage(netns, slot, cfg, env)?;
        self.commit(staged, flags)
    }

    /// Writes everything of a registration of namespace `netns` but its `CONFIG` value: the set and CIDR
    /// entries under a fresh id, the namespace's addresses (`POD_SOURCES`) and its counters. Nothing a connection looks at changes: the
    /// programs find a namespace's entries through its `CONFIG` value only. On failure nothing stays.
    pub fn stage(&mut self, netns: u64, slot: u32, cfg: &Config, env: &Environment) -> Result<Staged> {
        let old = self.config.get(&netns, 0).ok();
        let id = self.fresh_id()?;
        let mut e = entries::entries(cfg, env, id)?;
        e.config.slot = slot;
        let staged = Staged {
            netns,
            config: e.config,
            old,
        };
        let written = self.write(&e).and_then(|()| {
            // Read only through the namespace's `CONFIG` value: a registration in progress changes no
            // connection, and a re-registration writes the same addresses unless the pod's changed.
            self.sources
                .as_mut()
                .context("the pinned POD_SOURCES map is missing (pins of an older capture, not loaded again)")?
                .insert(netns, e.sources, 0)
                .context("POD_SOURCES")?;
            if self.counters.get(&netns, 0).is_err() {
                let zero = PerCpuValues::try_from(vec![
                    NetnsCounters::default();
                    aya::util::nr_cpus().map_err(|(_, e)| e)?
                ])?;
                self.counters.insert(netns, zero, 0)?;
            }
            Ok(())
        });
        match written {
            Ok(()) => Ok(staged),
            Err(err) => {
                self.abort(staged)?;
                Err(err).context("register the namespace")
            }
        }
    }

    /// Makes a staged registration the namespace's: one `CONFIG` update, after which new connections see
    /// the new configuration and never a mix of two; then the replaced configuration's entries go. `flags`
    /// is the command line, for `capture status`.
    pub fn commit(&mut self, staged: Staged, flags: &str) -> Result<()> {
        if let Err(err) = self.config.insert(staged.netns, staged.config, 0) {
            self.abort(staged)?;
            return Err(err).context("CONFIG");
        }
        if let Some(old) = staged.old {
            self.remove_entries(old.id)?;
        }
        let mut text = [0u8; FLAGS_TEXT_LEN];
        let n = flags.len().min(FLAGS_TEXT_LEN);
        text[..n].copy_from_slice(&flags.as_bytes()[..n]);
        // Only `capture status` reads it.
        self.flags
            .insert(staged.netns, FlagsText(text), 0)
            .context("FLAGS_TEXT")
    }

    /// Takes a staged registration back: its entries go, and the namespace keeps what it had (a namespace
    /// new to capture loses its counters too).
    pub fn abort(&mut self, staged: Staged) -> Result<()> {
        if staged.old.is_none() {
            let _ = self.counters.remove(&staged.netns);
            self.forget_sources(staged.netns);
        }
        self.remove_entries(staged.config.id)
    }

    /// Removes namespace `netns`'s addresses, if any.
    fn forget_sources(&mut self, netns: u64) {
        if let Some(sources) = self.sources.as_mut() {
            let _ = sources.remove(&netns);
        }
    }

    fn write(&mut self, e: &entries::Entries) -> Result<()> {
        for key in &e.sets {
            self.sets.insert(key, 1, 0).context("SETS")?;
        }
        for (bits, data) in &e.cidrs {
            self.cidrs.insert(&Key::new(*bits, *data), 1, 0).context("CIDRS")?;
        }
        Ok(())
    }

    /// Removes the set and CIDR entries of configuration `id`.
    fn remove_entries(&mut self, id: u32) -> Result<()> {
        let sets: Vec<SetKey> = self.sets.keys().filter_map(Result::ok).filter(|k| k.id == id).collect();
        for key in sets {
            self.sets.remove(&key)?;
        }
        let id_bytes = id.to_be_bytes();
        let cidrs: Vec<Key<CidrKeyData>> = self
            .cidrs
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().id == id_bytes)
            .collect();
        for key in cidrs {
            self.cidrs.remove(&key)?;
        }
        Ok(())
    }

    /// Hands a listening socket of the proxy to inbound capture (as sockops does for new listeners).
    pub fn add_listener(&mut self, netns: u64, port: u16, family: u32, fd: &std::os::fd::OwnedFd) -> Result<()> {
        let key = ListenerKey {
            netns,
            port: u32::from(port),
            family,
        };
        self.listeners
            .insert(key, std::os::fd::AsRawFd::as_raw_fd(fd), 0)
            .context("LISTENERS")
    }

    /// Unregisters `netns`: its configuration, sk_lookup slot, counters, flags and pending original
    /// destinations.
    pub fn unregister(&mut self, netns: u64) -> Result<()> {
        let Ok(cfg) = self.config.get(&netns, 0) else {
            return Ok(());
        };
        self.config.remove(&netns)?;
        // Only if the slot is still this namespace's, which it is unless its sk_lookup copy failed to attach.
        self.release_slot(cfg.slot, netns)?;
        self.remove_entries(cfg.id)?;
        let _ = self.counters.remove(&netns);
        let _ = self.flags.remove(&netns);
        self.forget_sources(netns);
        let pending: Vec<ConnKey> = self
            .orig_by_addr
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.netns == netns)
            .collect();
        for key in pending {
            let _ = self.orig_by_addr.remove(&key);
        }
        if let Some(connecting) = &mut self.orig_connecting {
            let pending: Vec<u64> = connecting
                .iter()
                .filter_map(Result::ok)
                .filter(|(_, orig)| orig.netns == netns)
                .map(|(cookie, _)| cookie)
                .collect();
            for cookie in pending {
                let _ = connecting.remove(&cookie);
            }
        }
        Ok(())
    }

    /// Every registered namespace.
    pub fn registered(&self) -> Result<Vec<Registered>> {
        let mut out = Vec::new();
        for entry in self.config.iter() {
            let (netns, _) = entry?;
            let flags = self
                .flags
                .get(&netns, 0)
                .map(|t| String::from_utf8_lossy(&t.0).trim_end_matches('\0').to_owned())
                .unwrap_or_default();
            let per_cpu = self.counters.get(&netns, 0).ok();
            let counters = Counter::ALL
                .iter()
                .map(|c| {
                    (
                        c.name(),
                        per_cpu.as_ref().map_or(0, |v| v.iter().map(|n| n.0[c.index()]).sum()),
                    )
                })
                .collect();
            out.push(Registered { netns, flags, counters });
        }
        Ok(out)
    }
}
