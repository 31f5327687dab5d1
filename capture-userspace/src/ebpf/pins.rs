//! The pin directory: the bpffs directory that holds the programs' links and the maps, making it (and the
//! bpffs under it), holding it for one change at a time, and removing its pins.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use super::{
    maps,
    programs::{HOOKS, SK_LOOKUP},
};

/// Where bpffs is mounted if no bpffs holds the pin directory yet.
const BPFFS_MOUNT: &str = "/sys/fs/bpf";
/// statfs(2) magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Where the sk_lookup link of namespace `netns` is pinned.
pub(super) fn sk_lookup_pin(dir: &Path, netns: u64) -> PathBuf {
    dir.join(format!("{}_{netns}", SK_LOOKUP.link))
}

fn on_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Whether making pin directory `dir` takes mounting a bpffs at /sys/fs/bpf first: the nearest existing
/// ancestor, which tells the filesystem the directory will be created on, is not on one.
pub(super) fn needs_bpffs_mount(dir: &Path) -> bool {
    let existing = dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    !on_bpffs(existing)
}

/// Makes sure `dir` is on a bpffs (mounting one at /sys/fs/bpf if that is where it belongs) and exists.
fn ensure_pin_dir(dir: &Path) -> Result<()> {
    let mount = Path::new(BPFFS_MOUNT);
    if needs_bpffs_mount(dir) {
        if !dir.starts_with(mount) || on_bpffs(mount) {
            bail!("--pin-dir {}: not on a bpffs", dir.display());
        }
        nix::mount::mount(
            Some("bpf"),
            mount,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("mount bpffs at {BPFFS_MOUNT}"))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))
}

pub(super) fn links_pinned(dir: &Path) -> bool {
    HOOKS.iter().all(|h| dir.join(h.link).exists())
}

/// Holds the pin directory `dir` for one change at a time (attach, register, unregister): `capture` runs
/// of pods that start together (as init containers) and the agent pick configuration ids and sk_lookup
/// slots that must not clash, and create pins that must not collide. With `create`, makes the directory
/// first, and again if the last namespace's `capture clean` removed it while this waited. Released when
/// the returned lock is dropped.
pub(super) fn lock(dir: &Path, create: bool) -> Result<nix::fcntl::Flock<File>> {
    /// Removals to outlast before giving up.
    const TRIES: usize = 3;
    for _ in 0..TRIES {
        if create {
            ensure_pin_dir(dir)?;
        }
        let file = File::open(dir).with_context(|| format!("open {}", dir.display()))?;
        let locked = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .with_context(|| format!("lock {}", dir.display()))?;
        let removed = nix::sys::stat::fstat(&*locked)
            .with_context(|| format!("stat {}", dir.display()))?
            .st_nlink
            == 0;
        if !removed {
            return Ok(locked);
        }
        if !create {
            bail!("{} was removed (its last namespace was cleaned)", dir.display());
        }
    }
    bail!("{} was removed {TRIES} times while waiting for it", dir.display())
}

/// Whether the pins in `dir` were made by a release before the CIDR key carried the family: maps there, but
/// no `CONFIG_IDS` (which came with that key). Asked before a load, which pins `CONFIG_IDS`; only then are
/// the CIDR entries walked (a node's can be 65,536).
pub(super) fn from_older_release(dir: &Path) -> bool {
    dir.join(maps::names::CIDRS).exists() && !dir.join(maps::names::CONFIG_IDS).exists()
}

/// Unpins the maps of an older release that the programs just attached no longer use (the programs they
/// replaced held the last references).
pub(super) fn remove_retired_pins(dir: &Path) -> Result<()> {
    for name in maps::names::RETIRED {
        let pin = dir.join(name);
        if pin.exists() {
            std::fs::remove_file(&pin).with_context(|| format!("unpin {}", pin.display()))?;
        }
    }
    Ok(())
}

/// Removes every pin in `dir` (links first, which detaches the programs) and `dir` itself.
pub(super) fn remove_pins(dir: &Path) -> Result<()> {
    for hook in &HOOKS {
        let path = dir.join(hook.link);
        if path.exists() {
            std::fs::remove_file(&path).with_context(|| format!("unpin {}", path.display()))?;
        }
    }
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path: PathBuf = entry?.path();
        std::fs::remove_file(&path).with_context(|| format!("unpin {}", path.display()))?;
    }
    std::fs::remove_dir(dir).with_context(|| format!("remove {}", dir.display()))
}
