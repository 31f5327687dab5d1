//! Inbound capture's sk_lookup program: one copy per registered namespace.
//!
//! sk_lookup cannot read the cookie of the namespace it runs in, so each namespace gets its own copy of
//! the program, loaded for a slot (the copy's `CAPTURE_SLOT` global) and attached to that namespace; the
//! pinned `SLOT_NETNS` map tells the copy of each slot whose configuration to apply. Loading a copy costs
//! tens of milliseconds (the object is parsed again and the program verified), while giving a loaded copy
//! to a namespace costs one map write and one attach. So the agent keeps [`Spares`]: copies loaded ahead
//! for free slots and refilled in the background, and a pod's registration only hands one over.

use std::{
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    time::Duration,
};

use anyhow::{Context as _, Result};
use aya::Ebpf;
use capture_common::maps::MAX_NAMESPACES;

use super::{
    maps::Maps,
    programs::{Loader, SK_LOOKUP, load_program},
    sys,
};
use crate::config::LogLevel;

/// How many copies the agent keeps loaded ahead. A burst of more new pods than this, faster than the
/// refill loads copies (about 10 ms each on an idle machine here), has the rest wait for a load of their
/// own. A copy costs the kernel about 29 KiB (measured: the program 8 KiB, its BTF 20 KiB, its constants
/// under 1 KiB), and the agent a descriptor.
const SPARES: usize = 16;
/// How long the refill waits after a failed load before trying again.
const RETRY: Duration = Duration::from_secs(1);

/// A copy of sk_lookup loaded for one slot, not attached yet.
pub struct Loaded {
    slot: u32,
    fd: OwnedFd,
}

impl Loaded {
    /// The copy in an object that was loaded for `slot`.
    pub fn from_object(ebpf: &mut Ebpf, slot: u32) -> Result<Loaded> {
        let fd = load_program(ebpf, &SK_LOOKUP)?;
        Ok(Loaded { slot, fd })
    }

    /// The slot it was loaded for.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// Makes this copy serve namespace `netns`, the calling thread's: its slot is bound to the namespace
    /// first, then the copy is attached, or switched in place of the copy attached before (the link pinned
    /// at `pin`), so the namespace is never without one.
    pub fn attach(self, maps: &mut Maps, netns: u64, pin: &Path) -> Result<()> {
        maps.bind_slot(self.slot, netns)?;
        if pin.exists() {
            let link = sys::obj_get(pin).with_context(|| format!("open {}", pin.display()))?;
            return sys::link_update(link.as_fd(), self.fd.as_fd())
                .context("switch the sk_lookup link to the new program");
        }
        // The calling thread's namespace: the agent registers from a thread that entered the pod's.
        let ns = std::fs::File::open("/proc/thread-self/ns/net").context("open this network namespace")?;
        let link = sys::link_create(self.fd.as_fd(), ns.as_fd(), SK_LOOKUP.attach)
            .with_context(|| format!("attach {} to this namespace ({})", SK_LOOKUP.program, SK_LOOKUP.needs))?;
        sys::obj_pin(link.as_fd(), pin).context("pin the sk_lookup link")
    }
}

/// The lowest slot that registered namespaces (`used`) and loaded copies (`taken`) leave free.
pub fn free_slot(used: &[u32], taken: &[u32]) -> Result<u32> {
    (0..MAX_NAMESPACES)
        .find(|s| !used.contains(s) && !taken.contains(s))
        .with_context(|| format!("all {MAX_NAMESPACES} sk_lookup slots are in use"))
}

/// Copies loaded ahead for the agent, kept at [`SPARES`] by a thread of their own.
pub struct Spares {
    dir: PathBuf,
    /// One loader for every copy (see [`Loader`]); the agent's programs log nothing, nor do these.
    loader: Mutex<Loader>,
    loaded: Mutex<Vec<Loaded>>,
    /// Signalled when a copy is taken.
    taken: Condvar,
}

impl Spares {
    /// Starts loading copies ahead for the programs pinned in `dir`.
    pub fn start(dir: &Path) -> Arc<Spares> {
        let spares = Arc::new(Spares {
            dir: dir.to_owned(),
            loader: Mutex::new(Loader::new(dir, LogLevel::Off)),
            loaded: Mutex::new(Vec::with_capacity(SPARES)),
            taken: Condvar::new(),
        });
        let worker = spares.clone();
        std::thread::Builder::new()
            .name("sk-lookup-spares".into())
            .spawn(move || worker.refill())
            .expect("start the thread that loads sk_lookup copies ahead");
        spares
    }

    /// A copy for a namespace about to be registered, given the slots registered namespaces hold: a spare
    /// if one is left, else one loaded now.
    pub fn take(&self, used: &[u32]) -> Result<Loaded> {
        let mut loaded = self.lock();
        // A spare whose slot was given out meanwhile (by a `capture` run beside the agent) is no use.
        loaded.retain(|l| !used.contains(&l.slot));
        let spare = loaded.pop();
        let taken: Vec<u32> = loaded.iter().map(Loaded::slot).collect();
        drop(loaded);
        self.taken.notify_one();
        match spare {
            Some(copy) => Ok(copy),
            None => self.load(free_slot(used, &taken)?),
        }
    }

    fn load(&self, slot: u32) -> Result<Loaded> {
        let mut loader = self.loader.lock().unwrap_or_else(|p| p.into_inner());
        Loaded::from_object(&mut loader.load(slot)?, slot)
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Loaded>> {
        self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads a copy whenever fewer than [`SPARES`] are left; never returns.
    fn refill(&self) {
        loop {
            let taken: Vec<u32> = {
                let mut loaded = self.lock();
                while loaded.len() >= SPARES {
                    loaded = self.taken.wait(loaded).unwrap_or_else(|p| p.into_inner());
                }
                loaded.iter().map(Loaded::slot).collect()
            };
            let copy = Maps::open(&self.dir)
                .and_then(|maps| maps.slots_in_use())
                .and_then(|used| free_slot(&used, &taken))
                .and_then(|slot| self.load(slot));
            match copy {
                Ok(copy) => self.lock().push(copy),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "could not load an sk_lookup copy ahead");
                    std::thread::sleep(RETRY);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lowest_slot_neither_registered_nor_loaded_is_free() {
        assert_eq!(free_slot(&[], &[]).unwrap(), 0);
        assert_eq!(free_slot(&[0, 2], &[1]).unwrap(), 3);
        assert_eq!(free_slot(&[1], &[]).unwrap(), 0);
        let all: Vec<u32> = (0..MAX_NAMESPACES).collect();
        let err = free_slot(&all[1..], &[0]).unwrap_err().to_string();
        assert!(err.contains("sk_lookup slots are in use"), "{err}");
    }
}
