//! The kernel programs and the hooks they attach to: the object embedded in this binary, loading it (with
//! its maps pinned in the pin directory), attaching its programs or switching the pinned links to them,
//! and forwarding their log records.

use std::{
    fs::File,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::{Context as _, Result};
use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupSockAddr, CgroupSockopt, SkLookup, SkMsg, SockOps},
};
use capture_common::maps::MAX_NAMESPACES;
use nix::poll::{PollFd, PollFlags, poll};

use super::{
    attach_order,
    maps::{self, Maps},
    pins::{links_pinned, remove_retired_pins},
    sys::{self, AttachType},
};
use crate::{cgroup, config::LogLevel};

/// The kernel programs, built by build.rs and embedded in this binary.
pub static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/capture-ebpf"));
/// How long the log forwarder waits for records before checking for Ctrl-C.
const LOG_POLL_MS: u16 = 200;

/// A kernel program, the hook it attaches to, and the pin that holds the attachment.
pub(super) struct Hook {
    pub(super) program: &'static str,
    pub(super) attach: AttachType,
    /// The name its link is pinned under (for sk_msg: the pinned map it is attached to).
    pub(super) link: &'static str,
    /// What the hook is for and the first kernel that has it, for the error when it is missing.
    pub(super) needs: &'static str,
}

/// The inbound hook: one copy of the program per registered namespace, attached to that namespace (see
/// [`sk_lookup`](super::sk_lookup)).
pub(super) const SK_LOOKUP: Hook = Hook {
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

pub(super) const HOOKS: [Hook; 8] = [
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
pub(super) struct Loader(EbpfLoader<'static>);

impl Loader {
    /// A loader for the maps in `dir`, with the programs logging at `level`.
    pub(super) fn new(dir: &Path, level: LogLevel) -> Loader {
        let mut loader = EbpfLoader::new();
        loader.btf(None).default_map_pin_directory(dir).override_global(
            aya_log::LEVEL,
            &LOG_LEVELS[level as usize],
            true,
        );
        Loader(loader)
    }

    /// Opens the object, for sk_lookup slot `slot` (the copy of sk_lookup it holds serves that slot).
    pub(super) fn load(&mut self, slot: u32) -> Result<Ebpf> {
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
pub(super) fn load_program(ebpf: &mut Ebpf, hook: &Hook) -> Result<std::os::fd::OwnedFd> {
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

/// Where the programs attach: `--cgroup`, else the cgroup v2 root.
pub(super) fn attach_point(cgroup: Option<&Path>) -> Result<PathBuf> {
    match cgroup {
        Some(c) => Ok(c.to_owned()),
        None => cgroup::cgroup2_root(),
    }
}

/// Before a first attach to `cgroup` (no links pinned in `dir`), fails with one line if the programs would
/// not run first there or not beside those above (see [`attach_order`]). Called before the object is
/// loaded, so that a refusal pins nothing.
pub(super) fn check_first_attach(dir: &Path, cgroup: &Path) -> Result<()> {
    match links_pinned(dir) {
        true => Ok(()),
        false => attach_order::check(cgroup),
    }
}

/// Loads the programs and attaches them to `cgroup`: new links the first time, or the pinned links switched
/// to the new programs, atomically each, so a newer `capture` or another log level takes over with no
/// moment unattached (and keeps its place among other programs on the hook).
pub(super) fn attach_hooks(ebpf: &mut Ebpf, dir: &Path, cgroup: &Path, upgrade: bool) -> Result<()> {
    let attached = links_pinned(dir);
    if attached {
        warn_if_attached_elsewhere(dir, cgroup)?;
    }
    // Entries an older release wrote, in the key layout the new programs read, before they are attached.
    let mut maps = Maps::open(dir)?;
    let outdated = match upgrade {
        true => maps
            .upgrade_cidr_keys()
            .context("upgrade the CIDR entries of an older release")?,
        false => Vec::new(),
    };
    for hook in &HOOKS {
        let prog = load_program(ebpf, hook)?;
        let pin = dir.join(hook.link);
        if attached {
            let link = sys::obj_get(&pin).with_context(|| format!("open {}", pin.display()))?;
            sys::link_update(link.as_fd(), prog.as_fd())
                .with_context(|| format!("switch the link of {} to the new program", hook.program))?;
        } else {
            let cgroup_dir = File::open(cgroup).with_context(|| format!("open cgroup {}", cgroup.display()))?;
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

/// An apply over pinned links keeps them where they are, which may not be the attach point asked for now
/// (`--cgroup`, or the agent's kubepods default after an upgrade from a release that attached at the root).
/// Moving them is not done here: for a moment the programs would run at both places, and the second run,
/// seeing the first one's redirect to loopback, would pass it and drop its original destination. So the
/// apply goes on in place and says so, once, on stderr.
fn warn_if_attached_elsewhere(dir: &Path, cgroup: &Path) -> Result<()> {
    let pin = dir.join(HOOKS[0].link);
    let link = sys::obj_get(&pin).with_context(|| format!("open {}", pin.display()))?;
    let attached_to = sys::link_cgroup_id(link.as_fd()).with_context(|| format!("read {}", pin.display()))?;
    let wanted = std::fs::metadata(cgroup)
        .with_context(|| format!("cgroup {}", cgroup.display()))?
        .ino();
    if attached_to != wanted {
        eprintln!(
            "capture: warning: the programs stay attached where the links pinned in {} are (cgroup id \
             {attached_to}), not to {} (cgroup id {wanted}); to move them, detach capture from the node \
             (remove the pins once no pod needs capture) and apply again",
            dir.display(),
            cgroup.display()
        );
    }
    Ok(())
}

/// Forwards the kernel programs' log records to stderr until Ctrl-C (or SIGTERM).
pub(super) fn forward_logs(ebpf: &mut Ebpf, level: LogLevel) -> Result<()> {
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
