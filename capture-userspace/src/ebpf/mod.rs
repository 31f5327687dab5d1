//! The eBPF backend: kernel programs attached once to a cgroup, fed per network namespace from maps that
//! are filled from the same flags as the iptables backend.
//!
//! Programs, links and maps are pinned under one bpffs directory (`--pin-dir`), so capture stays in the
//! kernel after the loader exits, like iptables rules. The first namespace registered attaches the
//! programs; `capture clean` in the last one detaches them and removes every pin.

pub mod entries;
pub mod features;
mod listeners;
pub mod sk_lookup;
// Public for the benchmark, which registers hundreds of throwaway namespaces without loading the programs
// again for each.
pub mod maps;
pub mod placement;
mod sys;

pub use maps::Registered;
pub use sk_lookup::Spares;

use std::{
    fs::File,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupSockAddr, CgroupSockopt, SkLookup, SkMsg, SockOps},
};
use capture_common::maps::MAX_NAMESPACES;

use nix::poll::{PollFd, PollFlags, poll};

use self::{
    entries::{Entries, Facts},
    maps::Maps,
    sys::AttachType,
};
use crate::{
    cgroup,
    config::Environment,
    flags::{Action, Invocation, LogLevel},
    namespace,
};

/// The kernel programs, built by build.rs and embedded in this binary.
pub static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/capture-ebpf"));

/// Where the pins go unless `--pin-dir` says otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/capture";
/// Where bpffs is mounted if no bpffs holds the pin directory yet.
const BPFFS_MOUNT: &str = "/sys/fs/bpf";
/// How long the log forwarder waits for records before checking for Ctrl-C.
const LOG_POLL_MS: u16 = 200;
/// statfs(2) magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// A kernel program, the hook it attaches to, and the pin that holds the attachment.
struct Hook {
    program: &'static str,
    attach: AttachType,
    /// The name its link is pinned under (for sk_msg: the pinned map it is attached to).
    link: &'static str,
    /// What the hook is for and the first kernel that has it, for the error when it is missing.
    needs: &'static str,
}

/// The inbound hook: one copy of the program per registered namespace, attached to that namespace (see
/// [`sk_lookup`]).
const SK_LOOKUP: Hook = Hook {
    program: "capture_sk_lookup",
    attach: AttachType::SkLookup,
    link: "link_sk_lookup",
    needs: "sk_lookup (Linux 5.9)",
};

/// Loopback acceleration: attached to the `PEERS` sockhash, it runs for the sends of the sockets sockops
/// puts there (only in namespaces registered with `--loopback-accel`).
const SK_MSG: Hook = Hook {
    program: "capture_sk_msg",
    attach: AttachType::SkMsgVerdict,
    link: maps::names::PEERS,
    needs: "sk_msg with bpf_get_netns_cookie (Linux 5.15)",
};

/// Where the sk_lookup link of namespace `netns` is pinned.
fn sk_lookup_pin(dir: &Path, netns: u64) -> PathBuf {
    dir.join(format!("{}_{netns}", SK_LOOKUP.link))
}

const HOOKS: [Hook; 8] = [
    Hook {
        program: "capture_connect4",
        attach: AttachType::Connect4,
        link: "link_connect4",
        needs: "cgroup connect4 (Linux 4.17)",
    },
    Hook {
        program: "capture_connect6",
        attach: AttachType::Connect6,
        link: "link_connect6",
        needs: "cgroup connect6 (Linux 4.17)",
    },
    Hook {
        program: "capture_sockops",
        attach: AttachType::SockOps,
        link: "link_sockops",
        needs: "sockops (Linux 4.13)",
    },
    Hook {
        program: "capture_getsockopt",
        attach: AttachType::GetSockopt,
        link: "link_getsockopt",
        needs: "cgroup getsockopt (Linux 5.3)",
    },
    Hook {
        program: "capture_sendmsg4",
        attach: AttachType::Sendmsg4,
        link: "link_sendmsg4",
        needs: "cgroup sendmsg4 (Linux 4.18)",
    },
    Hook {
        program: "capture_sendmsg6",
        attach: AttachType::Sendmsg6,
        link: "link_sendmsg6",
        needs: "cgroup sendmsg6 (Linux 4.18)",
    },
    Hook {
        program: "capture_recvmsg4",
        attach: AttachType::Recvmsg4,
        link: "link_recvmsg4",
        needs: "cgroup recvmsg4 (Linux 5.2)",
    },
    Hook {
        program: "capture_recvmsg6",
        attach: AttachType::Recvmsg6,
        link: "link_recvmsg6",
        needs: "cgroup recvmsg6 (Linux 5.2)",
    },
];

/// Runs one invocation with the eBPF backend in the current network namespace; returns what to print.
pub fn run(inv: &Invocation, env: &Environment) -> Result<String> {
    let opts = &inv.options;
    match opts.action {
        Action::Apply => {
            let facts = namespace::facts(&inv.config)?;
            // Built first: a configuration the kernel cannot take fails before anything is touched.
            let entries = entries::entries(&inv.config, env, &facts, 0)?;
            if opts.dry_run {
                return Ok(describe(&entries));
            }
            if opts.skip_rule_apply {
                return Ok(String::new());
            }
            // Before anything is touched: a kernel that lacks a feature, or a place where capture would go
            // with this process's container, gets one line and no change.
            if let Some(why) = placement::vanishing(&opts.pin_dir) {
                bail!("{why}; nothing was applied");
            }
            probe()?;
            // ::6 first, so that it counts among the namespace's own addresses: the proxy's passthrough
            // from ::6 is local traffic, never inbound.
            namespace::add_passthrough_v6(env)?;
            let facts = namespace::facts(&inv.config)?;
            let mut ebpf = apply(inv, env, &facts, &opts.pin_dir)?;
            if opts.log_level != LogLevel::Off {
                forward_logs(&mut ebpf, opts.log_level)?;
            }
            Ok(String::new())
        }
        Action::Clean if opts.dry_run => Ok(format!(
            "would unregister this namespace from {}\n",
            opts.pin_dir.display()
        )),
        Action::Clean => clean(&opts.pin_dir),
        Action::Status => status(&opts.pin_dir),
    }
}

/// A dry run's account of what would be written.
fn describe(e: &Entries) -> String {
    let mut out = format!("CONFIG[this namespace] = {:?}\n", e.config);
    for key in &e.sets {
        out.push_str(&format!("SETS += {key:?}\n"));
    }
    for (bits, data) in &e.cidrs {
        out.push_str(&format!("CIDRS += /{bits} {data:?}\n"));
    }
    out
}

/// Fails with one line naming the first feature this kernel lacks (see [`features`]); nothing is applied.
fn probe() -> Result<()> {
    features::check()
        .map_err(|missing| anyhow::anyhow!("{missing}; nothing was applied (use --backend iptables or auto)"))
}

fn on_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Whether making pin directory `dir` takes mounting a bpffs at /sys/fs/bpf first: the nearest existing
/// ancestor, which tells the filesystem the directory will be created on, is not on one.
fn needs_bpffs_mount(dir: &Path) -> bool {
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

fn links_pinned(dir: &Path) -> bool {
    HOOKS.iter().all(|h| dir.join(h.link).exists())
}

/// Loads, attaches and registers the current namespace. On failure nothing stays: a first registration
/// that fails removes the pins it made.
fn apply(inv: &Invocation, env: &Environment, facts: &Facts, dir: &Path) -> Result<Ebpf> {
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
        let upgrade = from_older_release(dir);
        let mut ebpf = Loader::new(dir, inv.options.log_level).load(slot)?;
        attach_hooks(&mut ebpf, dir, inv.options.cgroup.as_deref(), upgrade)?;
        let copy = sk_lookup::Loaded::from_object(&mut ebpf, slot)?;
        register_namespace(Maps::open(dir)?, inv, env, facts, dir, netns, Some(copy), &flags_text())?;
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
    // No sk_lookup copy comes from this object: slot 0 is as good as any.
    let upgrade = from_older_release(dir);
    let mut ebpf = Loader::new(dir, level).load(0)?;
    attach_hooks(&mut ebpf, dir, cgroup, upgrade)?;
    Maps::open(dir)?.sweep().context("sweep entries no configuration owns")
}

/// Registers the network namespace the calling thread is in with `inv`'s configuration, on programs
/// [`attach`] attached: the agent's step for one pod (from a thread that entered the pod's namespace). A
/// namespace new to capture gets its sk_lookup copy from `spares`; one registered again keeps its copy.
/// `label` is kept beside the registration, for `capture status` (the agent's records can be rebuilt from
/// it). Returns the namespace's cookie.
pub fn register_here(inv: &Invocation, env: &Environment, dir: &Path, spares: &Spares, label: &str) -> Result<u64> {
    let facts = namespace::facts(&inv.config)?;
    // Built first: a configuration the kernel cannot take fails before anything is touched.
    entries::entries(&inv.config, env, &facts, 0)?;
    namespace::add_passthrough_v6(env)?;
    let facts = namespace::facts(&inv.config)?;
    let _lock = lock(dir, false)?;
    let netns = namespace::cookie()?;
    let maps = Maps::open(dir)?;
    let copy = match maps.slot_of(netns).is_some() && sk_lookup_pin(dir, netns).exists() {
        true => None,
        false => Some(spares.take(&maps.slots_in_use()?)?),
    };
    register_namespace(maps, inv, env, &facts, dir, netns, copy, label)?;
    Ok(netns)
}

/// Unregisters namespace `netns` (by cookie), from any namespace; the programs stay attached.
pub fn unregister(dir: &Path, netns: u64) -> Result<()> {
    let _lock = lock(dir, false)?;
    unregister_locked(dir, netns)
}

/// [`unregister`], for a caller that holds the lock.
fn unregister_locked(dir: &Path, netns: u64) -> Result<()> {
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

/// Holds the pin directory `dir` for one change at a time (attach, register, unregister): `capture` runs
/// of pods that start together (as init containers) and the agent pick configuration ids and sk_lookup
/// slots that must not clash, and create pins that must not collide. With `create`, makes the directory
/// first, and again if the last namespace's `capture clean` removed it while this waited. Released when
/// the returned lock is dropped.
fn lock(dir: &Path, create: bool) -> Result<nix::fcntl::Flock<File>> {
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

/// Values for the loader's globals, which it borrows for as long as it lives: one per log level and one
/// per sk_lookup slot, so that one loader serves every load.
static LOG_LEVELS: [u8; 6] = [0, 1, 2, 3, 4, 5];
static SLOTS: [u32; MAX_NAMESPACES as usize] = {
    let mut slots = [0; MAX_NAMESPACES as usize];
    let mut i = 0;
    while i < slots.len() {
        slots[i] = i as u32;
        i += 1;
    }
    slots
};

/// Loads capture's kernel object (with its maps pinned in, or reused from, one directory), as often as
/// needed. Making an aya loader parses the kernel's BTF, about 20 ms here, which these programs do not use
/// (they need no CO-RE relocation): the agent keeps one loader for all its sk_lookup copies.
struct Loader(EbpfLoader<'static>);

impl Loader {
    /// A loader for the maps in `dir`, with the programs logging at `level`.
    fn new(dir: &Path, level: LogLevel) -> Loader {
        let mut loader = EbpfLoader::new();
        loader.btf(None).default_map_pin_directory(dir).override_global(
            aya_log::LEVEL,
            &LOG_LEVELS[level as usize],
            true,
        );
        Loader(loader)
    }

    /// Opens the object, for sk_lookup slot `slot` (the copy of sk_lookup it holds serves that slot).
    fn load(&mut self, slot: u32) -> Result<Ebpf> {
        let slot = SLOTS
            .get(slot as usize)
            .with_context(|| format!("sk_lookup slot {slot} is past the last one"))?;
        self.0
            .override_global(maps::names::SLOT_GLOBAL, slot, true)
            .load(PROGRAMS)
            .context("load capture's kernel programs")
    }
}

/// Loads one program of the object and returns a descriptor of it that outlives the object.
fn load_program(ebpf: &mut Ebpf, hook: &Hook) -> Result<std::os::fd::OwnedFd> {
    let program = ebpf
        .program_mut(hook.program)
        .with_context(|| format!("{} is missing", hook.program))?;
    let loaded = match hook.attach {
        AttachType::Connect4
        | AttachType::Connect6
        | AttachType::Sendmsg4
        | AttachType::Sendmsg6
        | AttachType::Recvmsg4
        | AttachType::Recvmsg6 => {
            let p: &mut CgroupSockAddr = program.try_into()?;
            p.load().map(|()| p.fd().map(|fd| fd.as_fd().try_clone_to_owned()))
        }
        AttachType::SockOps => {
            let p: &mut SockOps = program.try_into()?;
            p.load().map(|()| p.fd().map(|fd| fd.as_fd().try_clone_to_owned()))
        }
        AttachType::GetSockopt => {
            let p: &mut CgroupSockopt = program.try_into()?;
            p.load().map(|()| p.fd().map(|fd| fd.as_fd().try_clone_to_owned()))
        }
        AttachType::SkLookup => {
            let p: &mut SkLookup = program.try_into()?;
            p.load().map(|()| p.fd().map(|fd| fd.as_fd().try_clone_to_owned()))
        }
        AttachType::SkMsgVerdict => {
            let p: &mut SkMsg = program.try_into()?;
            p.load().map(|()| p.fd().map(|fd| fd.as_fd().try_clone_to_owned()))
        }
    };
    loaded
        .with_context(|| format!("the kernel rejected {} ({})", hook.program, hook.needs))??
        .with_context(|| format!("duplicate the fd of {}", hook.program))
}

/// Whether the pins in `dir` were made by a release before the CIDR key carried the family: maps there, but
/// no `CONFIG_IDS` (which came with that key). Asked before a load, which pins `CONFIG_IDS`; only then are
/// the CIDR entries walked (a node's can be 65,536).
fn from_older_release(dir: &Path) -> bool {
    dir.join(maps::names::CIDRS).exists() && !dir.join(maps::names::CONFIG_IDS).exists()
}

/// Loads the programs and attaches them: new links the first time, or the pinned links switched to the new
/// programs, atomically each, so a newer `capture` or another log level takes over with no moment
/// unattached.
fn attach_hooks(ebpf: &mut Ebpf, dir: &Path, cgroup: Option<&Path>, upgrade: bool) -> Result<()> {
    let attached = links_pinned(dir);
    // Entries an older release wrote, in the key layout the new programs read, before they are attached.
    let mut maps = Maps::open(dir)?;
    let outdated = match upgrade {
        true => maps
            .upgrade_cidr_keys()
            .context("upgrade the CIDR entries of an older release")?,
        false => Vec::new(),
    };
    let cgroup = match cgroup {
        Some(c) => c.to_owned(),
        None => cgroup::cgroup2_root()?,
    };
    for hook in &HOOKS {
        let prog = load_program(ebpf, hook)?;
        let pin = dir.join(hook.link);
        if attached {
            let link = sys::obj_get(&pin).with_context(|| format!("open {}", pin.display()))?;
            sys::link_update(link.as_fd(), prog.as_fd())
                .with_context(|| format!("switch the link of {} to the new program", hook.program))?;
        } else {
            let cgroup_dir = File::open(&cgroup).with_context(|| format!("open cgroup {}", cgroup.display()))?;
            let link = sys::link_create(prog.as_fd(), cgroup_dir.as_fd(), hook.attach)
                .with_context(|| format!("attach {} to {} ({})", hook.program, cgroup.display(), hook.needs))?;
            sys::obj_pin(link.as_fd(), &pin).with_context(|| format!("pin the link of {}", hook.program))?;
        }
    }
    // Loopback acceleration's program rides on its pinned map: attached (or replaced) before any namespace
    // can ask for it.
    let prog = load_program(ebpf, &SK_MSG)?;
    let pin = dir.join(SK_MSG.link);
    let peers = sys::obj_get(&pin).with_context(|| format!("open {}", pin.display()))?;
    sys::map_attach(prog.as_fd(), peers.as_fd(), SK_MSG.attach)
        .with_context(|| format!("attach {} to {} ({})", SK_MSG.program, SK_MSG.link, SK_MSG.needs))?;
    maps.remove_cidr_keys(outdated)
        .context("remove the CIDR entries of an older release")?;
    remove_retired_pins(dir)
}

/// Unpins the maps of an older release that the programs just attached no longer use (the programs they
/// replaced held the last references).
fn remove_retired_pins(dir: &Path) -> Result<()> {
    for name in maps::names::RETIRED {
        let pin = dir.join(name);
        if pin.exists() {
            std::fs::remove_file(&pin).with_context(|| format!("unpin {}", pin.display()))?;
        }
    }
    Ok(())
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
    facts: &Facts,
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
    let staged = maps.stage(netns, slot, &inv.config, env, facts)?;
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

/// Forwards the kernel programs' log records to stderr until Ctrl-C (or SIGTERM).
fn forward_logs(ebpf: &mut Ebpf, level: LogLevel) -> Result<()> {
    env_logger::Builder::new()
        .filter_level(level.filter())
        .target(env_logger::Target::Stderr)
        .init();
    let mut logger = aya_log::EbpfLogger::init(ebpf).context("open the programs' log buffer")?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::Relaxed)).context("install the Ctrl-C handler")?;
    eprintln!("capture: forwarding the kernel programs' {level:?} logs; Ctrl-C to stop");
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [PollFd::new(logger.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, LOG_POLL_MS) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => logger.flush(),
            Err(e) => return Err(e).context("wait for log records"),
        }
    }
    Ok(())
}

/// The command line, the label of a namespace `capture` registers (for `capture status`).
fn flags_text() -> String {
    std::env::args()
        .skip(1)
        .map(|a| if a.is_empty() { "''".to_owned() } else { a })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Unregisters the current namespace; the last one out detaches the programs and removes every pin.
fn clean(dir: &Path) -> Result<String> {
    if !dir.join(maps::names::CONFIG).exists() {
        return Ok(String::new());
    }
    let _lock = lock(dir, false)?;
    unregister_locked(dir, namespace::cookie()?)?;
    if Maps::open(dir)?.registered()?.is_empty() {
        remove_pins(dir)?;
    }
    Ok(String::new())
}

/// Removes every pin in `dir` (links first, which detaches the programs) and `dir` itself.
fn remove_pins(dir: &Path) -> Result<()> {
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

/// `capture status`: every registered namespace, its flags and counters.
fn status(dir: &Path) -> Result<String> {
    if !dir.join(maps::names::CONFIG).exists() {
        return Ok(format!("ebpf: nothing registered (no pins in {})\n", dir.display()));
    }
    let attached: Vec<&str> = HOOKS
        .iter()
        .filter(|h| dir.join(h.link).exists())
        .map(|h| h.program)
        .collect();
    let mut out = format!("ebpf: pins in {}; attached: {}\n", dir.display(), attached.join(", "));
    let maps = Maps::open(dir)?;
    let here = namespace::cookie()?;
    for ns in maps.registered()? {
        let this = if ns.netns == here { " (this namespace)" } else { "" };
        out.push_str(&format!("netns {}{this}: {}\n", ns.netns, ns.flags));
        let counters: Vec<String> = ns.counters.iter().map(|(name, n)| format!("{name}={n}")).collect();
        out.push_str(&format!("  {}\n", counters.join(" ")));
    }
    Ok(out)
}
