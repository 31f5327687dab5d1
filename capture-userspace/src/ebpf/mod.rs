//! The eBPF backend: kernel programs attached once to a cgroup, fed per network namespace from maps that
//! are filled from the same flags as the iptables backend.
//!
//! Programs, links and maps are pinned under one bpffs directory (`--pin-dir`), so capture stays in the
//! kernel after the loader exits, like iptables rules. The first namespace registered attaches the
//! programs; `capture clean` in the last one detaches them and removes every pin.

pub mod entries;
pub mod features;
mod listeners;
// Public for the benchmark, which registers hundreds of throwaway namespaces without loading the programs
// again for each.
pub mod maps;
mod sys;

pub use maps::Registered;

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

/// The inbound hook: one copy of the program per registered namespace, attached to that namespace.
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
            // Before anything is touched: a kernel that lacks a feature gets one line and no change.
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

/// Makes sure `dir` is on a bpffs (mounting one at /sys/fs/bpf if that is where it belongs) and exists.
fn ensure_pin_dir(dir: &Path) -> Result<()> {
    let on_bpffs = |p: &Path| nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC);
    let mount = Path::new(BPFFS_MOUNT);
    // The nearest existing ancestor tells which filesystem the directory will be created on.
    let existing = dir.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"));
    if !on_bpffs(existing) {
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
    let fresh = !dir.join(maps::names::CONFIG).exists();
    ensure_pin_dir(dir)?;
    let result = (|| {
        let netns = namespace::cookie()?;
        let mut ebpf = load(dir, inv.options.log_level, netns)?;
        attach_hooks(&mut ebpf, dir, inv.options.cgroup.as_deref())?;
        register_namespace(&mut ebpf, inv, env, facts, dir, netns)?;
        Ok(ebpf)
    })();
    if result.is_err() && fresh {
        let _ = remove_pins(dir);
    }
    result
}

/// Loads and attaches the programs without registering a namespace: what `capture agent` does when it
/// starts. Like an apply, it switches programs that are already attached to the new ones in place.
pub fn attach(dir: &Path, cgroup: Option<&Path>, level: LogLevel) -> Result<()> {
    probe()?;
    ensure_pin_dir(dir)?;
    let mut ebpf = load(dir, level, 0)?;
    attach_hooks(&mut ebpf, dir, cgroup)
}

/// Registers the network namespace the calling thread is in with `inv`'s configuration, on programs
/// [`attach`] attached: the agent's step for one pod (from a thread that entered the pod's namespace).
/// Returns the namespace's cookie.
pub fn register_here(inv: &Invocation, env: &Environment, dir: &Path) -> Result<u64> {
    let facts = namespace::facts(&inv.config)?;
    // Built first: a configuration the kernel cannot take fails before anything is touched.
    entries::entries(&inv.config, env, &facts, 0)?;
    namespace::add_passthrough_v6(env)?;
    let facts = namespace::facts(&inv.config)?;
    let netns = namespace::cookie()?;
    let mut ebpf = load(dir, inv.options.log_level, netns)?;
    register_namespace(&mut ebpf, inv, env, &facts, dir, netns)?;
    Ok(netns)
}

/// Unregisters namespace `netns` (by cookie), from any namespace; the programs stay attached.
pub fn unregister(dir: &Path, netns: u64) -> Result<()> {
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

/// Opens the kernel object with the requested log level, for namespace `netns` (sk_lookup's copy), with
/// its maps pinned in, or reused from, `dir`.
fn load(dir: &Path, level: LogLevel, netns: u64) -> Result<Ebpf> {
    let level = level as u8;
    EbpfLoader::new()
        // The programs need no CO-RE relocation: not parsing the kernel's BTF (megabytes) on every load
        // keeps a pod's registration in milliseconds.
        .btf(None)
        .default_map_pin_directory(dir)
        .override_global(aya_log::LEVEL, &level, true)
        .override_global(maps::names::NETNS_GLOBAL, &netns, true)
        .load(PROGRAMS)
        .context("load capture's kernel programs")
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

/// Loads the programs and attaches them: new links the first time, or the pinned links switched to the new
/// programs, atomically each, so a newer `capture` or another log level takes over with no moment
/// unattached.
fn attach_hooks(ebpf: &mut Ebpf, dir: &Path, cgroup: Option<&Path>) -> Result<()> {
    let attached = links_pinned(dir);
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
        .with_context(|| format!("attach {} to {} ({})", SK_MSG.program, SK_MSG.link, SK_MSG.needs))
}

/// Registers the current namespace (cookie `netns`): its map entries, the proxy's listeners that already
/// exist, and its own copy of sk_lookup from `ebpf` (loaded for `netns`).
fn register_namespace(
    ebpf: &mut Ebpf,
    inv: &Invocation,
    env: &Environment,
    facts: &Facts,
    dir: &Path,
    netns: u64,
) -> Result<()> {
    let mut maps = Maps::open(dir)?;
    maps.register(netns, &inv.config, env, facts, &flags_text())?;
    // Listeners that existed before this registration (sockops only sees new ones).
    let ports = [inv.config.inbound_capture_port, inv.config.proxy_port];
    for (listening, fd) in listeners::existing(&ports).context("find the proxy's listening sockets")? {
        maps.add_listener(netns, listening.port, listening.family, &fd)?;
    }
    // Inbound: this namespace's own copy of sk_lookup, attached to it.
    let prog = load_program(ebpf, &SK_LOOKUP)?;
    let pin = sk_lookup_pin(dir, netns);
    if pin.exists() {
        let link = sys::obj_get(&pin).with_context(|| format!("open {}", pin.display()))?;
        sys::link_update(link.as_fd(), prog.as_fd()).context("switch the sk_lookup link to the new program")?;
    } else {
        // The calling thread's namespace: the agent registers from a thread that entered the pod's.
        let ns = File::open("/proc/thread-self/ns/net").context("open this network namespace")?;
        let link = sys::link_create(prog.as_fd(), ns.as_fd(), AttachType::SkLookup)
            .with_context(|| format!("attach {} to this namespace ({})", SK_LOOKUP.program, SK_LOOKUP.needs))?;
        sys::obj_pin(link.as_fd(), &pin).context("pin the sk_lookup link")?;
    }
    Ok(())
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

/// The command line, for `capture status`.
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
    unregister(dir, namespace::cookie()?)?;
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
