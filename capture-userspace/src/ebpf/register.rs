//! Registering and unregistering network namespaces: an apply's first load and attach, the agent's attach
//! and its registrations from a pod's namespace, and writing a namespace's configuration, sk_lookup copy
//! and existing listeners into the maps so that a failure at any step leaves nothing half-registered.

use std::path::Path;

use anyhow::{Context as _, Result, bail};
use aya::Ebpf;

use super::{
    entries, listeners,
    maps::{self, Maps, Registered},
    pins::{from_older_release, lock, remove_pins, sk_lookup_pin},
    probe,
    programs::{Loader, attach_hooks, attach_point, check_first_attach},
    sk_lookup::{self, Spares},
};
use crate::{
    config::{Invocation, LogLevel},
    namespace::{self, Environment},
};

/// Loads, attaches and registers the current namespace. On failure nothing stays: a first registration
/// that fails removes the pins it made.
pub(super) fn apply(inv: &Invocation, env: &Environment, dir: &Path) -> Result<Ebpf> {
    let _lock = lock(dir, true)?;
    let fresh = !dir.join(maps::names::CONFIG).exists();
    let result = (|| {
        let netns = namespace::cookie()?;
        // The object loaded for the hooks also gives this namespace its sk_lookup copy: loaded for the
        // namespace's slot, or for a free one.
        let slot = match dir.join(maps::names::CONFIG).exists() {
            true => {
                let maps = Maps::open(dir)?;
                match maps.slot_of(netns) {
                    Some(slot) => slot,
                    None => sk_lookup::free_slot(&maps.slots_in_use()?, &[])?,
                }
            }
            false => 0,
        };
        let cgroup = attach_point(inv.options.cgroup.as_deref())?;
        check_first_attach(dir, &cgroup)?;
        let upgrade = from_older_release(dir);
        let mut ebpf = Loader::new(dir, inv.options.log_level).load(slot)?;
        attach_hooks(&mut ebpf, dir, &cgroup, upgrade)?;
        let copy = sk_lookup::Loaded::from_object(&mut ebpf, slot)?;
        register_namespace(Maps::open(dir)?, inv, env, dir, netns, Some(copy), &flags_text())?;
        Ok(ebpf)
    })();
    if result.is_err() && fresh {
        let _ = remove_pins(dir);
    }
    result
}

/// Loads and attaches the programs without registering a namespace: what `capture agent` does when it
/// starts. Like an apply, it switches programs that are already attached to the new ones in place; then it
/// sweeps the set and CIDR entries that no registered configuration owns (left by a registration or
/// unregistration that was killed half-way). Returns how many were swept.
pub fn attach(dir: &Path, cgroup: Option<&Path>, level: LogLevel) -> Result<usize> {
    probe()?;
    let _lock = lock(dir, true)?;
    let cgroup = attach_point(cgroup)?;
    if let Err(e) = check_first_attach(dir, &cgroup) {
        // The pin directory this just made, if it did, goes too (removing it fails unless it is empty).
        let _ = std::fs::remove_dir(dir);
        return Err(e);
    }
    // No sk_lookup copy comes from this object: slot 0 is as good as any.
    let upgrade = from_older_release(dir);
    let mut ebpf = Loader::new(dir, level).load(0)?;
    attach_hooks(&mut ebpf, dir, &cgroup, upgrade)?;
    Maps::open(dir)?.sweep().context("sweep entries no configuration owns")
}

/// Registers the network namespace the calling thread is in with `inv`'s configuration, on programs
/// [`attach`] attached: the agent's step for one pod (from a thread that entered the pod's namespace). A
/// namespace new to capture gets its sk_lookup copy from `spares`; one registered again keeps its copy.
/// `label` is kept beside the registration, for `capture status` (the agent's records can be rebuilt from
/// it). Returns the namespace's cookie.
pub fn register_here(inv: &Invocation, env: &mut Environment, dir: &Path, spares: &Spares, label: &str) -> Result<u64> {
    // Built first: a configuration the kernel cannot take fails before anything is touched.
    entries::entries(&inv.config, env, 0)?;
    env.add_passthrough_v6(&inv.config)?;
    let _lock = lock(dir, false)?;
    let netns = namespace::cookie()?;
    let maps = Maps::open(dir)?;
    let copy = match maps.slot_of(netns).is_some() && sk_lookup_pin(dir, netns).exists() {
        true => None,
        false => Some(spares.take(&maps.slots_in_use()?)?),
    };
    register_namespace(maps, inv, env, dir, netns, copy, label)?;
    Ok(netns)
}

/// Unregisters namespace `netns` (by cookie), from any namespace; the programs stay attached.
pub fn unregister(dir: &Path, netns: u64) -> Result<()> {
    let _lock = lock(dir, false)?;
    unregister_locked(dir, netns)
}

/// [`unregister`], for a caller that holds the lock.
pub(super) fn unregister_locked(dir: &Path, netns: u64) -> Result<()> {
    Maps::open(dir)?.unregister(netns)?;
    let pin = sk_lookup_pin(dir, netns);
    if pin.exists() {
        // Unpinning the last reference detaches the program from the namespace.
        std::fs::remove_file(&pin).with_context(|| format!("unpin {}", pin.display()))?;
    }
    Ok(())
}

/// Every registered namespace, with its flags and counters.
pub fn registered(dir: &Path) -> Result<Vec<Registered>> {
    Maps::open(dir)?.registered()
}

/// Registers the current namespace (cookie `netns`) in `maps`: its entries, the proxy's listeners that
/// already exist, and `copy`, its sk_lookup copy (`None`: the namespace keeps the one it has), with
/// `label` for `capture status`. The
/// namespace's `CONFIG` value is written last: until then no connection sees any of it, so a registration
/// that fails at any step leaves the namespace as it was (a namespace new to capture, unregistered), and
/// what a failure could not remove is swept.
#[allow(clippy::too_many_arguments)]
fn register_namespace(
    mut maps: Maps,
    inv: &Invocation,
    env: &Environment,
    dir: &Path,
    netns: u64,
    copy: Option<sk_lookup::Loaded>,
    label: &str,
) -> Result<()> {
    let known = maps.slot_of(netns);
    let slot = match (&copy, known) {
        (Some(copy), _) => copy.slot(),
        (None, Some(slot)) => slot,
        (None, None) => bail!("namespace {netns} has no sk_lookup copy"),
    };
    let staged = maps.stage(netns, slot, &inv.config, env)?;
    let ports = [inv.config.inbound_capture_port, inv.config.proxy_port];
    let before_commit = hand_over_listeners(&mut maps, netns, &ports, &[]).and_then(|known| match copy {
        Some(copy) => copy
            .attach(&mut maps, netns, &sk_lookup_pin(dir, netns))
            .map(|()| known),
        None => Ok(known),
    });
    let result = match before_commit {
        Err(e) => {
            let _ = maps.abort(staged);
            Err(e)
        }
        // A listener that started between the dump and the commit: sockops only hands over the listeners
        // of registered namespaces. Those already handed over are not searched for again.
        Ok(known) => maps
            .commit(staged, label)
            .and_then(|()| hand_over_listeners(&mut maps, netns, &ports, &known).map(drop)),
    };
    let Err(err) = result else {
        return Ok(());
    };
    if known.is_none() {
        let _ = maps.release_slot(slot, netns);
        let _ = unregister_locked(dir, netns);
    }
    if let Err(e) = maps.sweep() {
        tracing::warn!(error = %format!("{e:#}"), "could not sweep after a failed registration");
    }
    Err(err)
}

/// Hands the proxy's listening sockets on `ports` that exist now, but for those whose inode is in `known`,
/// to inbound capture; returns the inodes of all handed over so far.
fn hand_over_listeners(maps: &mut Maps, netns: u64, ports: &[u16], known: &[u64]) -> Result<Vec<u64>> {
    let mut handed = known.to_vec();
    for (listening, fd) in listeners::existing(ports, known).context("find the proxy's listening sockets")? {
        maps.add_listener(netns, listening.port, listening.family, &fd)?;
        handed.push(listening.inode);
    }
    Ok(handed)
}

/// The command line, the label of a namespace `capture` registers (for `capture status`).
fn flags_text() -> String {
    std::env::args()
        .skip(1)
        .map(|a| if a.is_empty() { "''".to_owned() } else { a })
        .collect::<Vec<_>>()
        .join(" ")
}
