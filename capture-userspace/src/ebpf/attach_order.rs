//! Checking, before capture's programs first attach to a cgroup, that they will run where capture needs
//! them: before any other program that rewrites destinations, and beside (not instead of) the programs of
//! the cgroups above.
//!
//! A socket load balancer (Cilium's kube-proxy replacement, Calico's eBPF connect-time load balancing)
//! rewrites a service VIP to one backend in its own cgroup connect/sendmsg programs, at the cgroup root.
//! The kernel runs a cgroup's programs in the order they were attached, then those of its parent, and so
//! on up to the root (`compute_effective_progs`, kernel/bpf/cgroup.c). So capture attached to a cgroup
//! below the load balancer's sees the VIP first, redirects the app to the proxy with the VIP as the
//! original destination, and lets the proxy's own connection to the VIP on to the load balancer. Attached
//! to the load balancer's own cgroup after it, capture would only ever see the backend: that is refused
//! here, with nothing applied. So are the two ancestors the kernel would not run beside capture: one
//! attached with `BPF_F_ALLOW_OVERRIDE` (capture's program would replace it below) and one attached with
//! no flag (the kernel refuses any program below it, and capture would fail half-way).
//!
//! Checked only when the links are created: an apply over pinned links switches their programs in place,
//! which keeps their position, and a program attached after capture's runs after it.

use std::{
    fs::File,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use super::{
    programs::{HOOKS, Hook},
    sys::{self, AttachType, Attached, BPF_F_ALLOW_MULTI, BPF_F_ALLOW_OVERRIDE},
};

/// statfs(2) magic of cgroup v2: where the walk up the hierarchy stops.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The hooks whose programs rewrite the destination an app asked for: another program there that runs
/// before capture's would hide the original destination from it.
fn rewrites_destination(hook: &Hook) -> bool {
    matches!(
        hook.attach,
        AttachType::Connect4 | AttachType::Connect6 | AttachType::Sendmsg4 | AttachType::Sendmsg6
    )
}

/// Fails with one line if capture's programs, attached now to `cgroup`, would not run first there or
/// would not run beside the programs of the cgroups above it.
pub(super) fn check(cgroup: &Path) -> Result<()> {
    let target = File::open(cgroup).with_context(|| format!("open cgroup {}", cgroup.display()))?;
    let ancestors = ancestors(cgroup);
    for hook in &HOOKS {
        let here = query(&target, cgroup, hook)?;
        if let Some(&first) = here.ids.first() {
            if rewrites_destination(hook) {
                bail!(
                    "cgroup {} already runs {} on {}, which would run before capture and could rewrite a \
                     destination (a service VIP) before capture sees it; attach capture to a cgroup below it \
                     (--cgroup, e.g. the pods' kubepods cgroup); nothing was applied",
                    cgroup.display(),
                    program(first),
                    hook_name(hook)
                );
            }
            if here.flags & BPF_F_ALLOW_MULTI == 0 {
                bail!(
                    "cgroup {} has {} on {} attached without BPF_F_ALLOW_MULTI, so the kernel lets no other \
                     program attach there; attach capture to a cgroup below it (--cgroup); nothing was applied",
                    cgroup.display(),
                    program(first),
                    hook_name(hook)
                );
            }
        }
        // The kernel decides by the nearest cgroup above that has programs on the hook
        // (`hierarchy_allows_attach`); those further up already give way to it.
        for dir in &ancestors {
            let above = query(
                &File::open(dir).with_context(|| format!("open cgroup {}", dir.display()))?,
                dir,
                hook,
            )?;
            let Some(&first) = above.ids.first() else {
                continue;
            };
            let fix = "have it attached with BPF_F_ALLOW_MULTI or as a BPF link (as Cilium 1.14+ does on a fresh \
                       install); nothing was applied";
            if above.flags & BPF_F_ALLOW_MULTI != 0 {
                break;
            } else if above.flags & BPF_F_ALLOW_OVERRIDE != 0 {
                bail!(
                    "cgroup {} has {} on {} attached with BPF_F_ALLOW_OVERRIDE: capture's program would replace \
                     it for every process under {}; {fix}",
                    dir.display(),
                    program(first),
                    hook_name(hook),
                    cgroup.display()
                );
            } else {
                bail!(
                    "cgroup {} has {} on {} attached exclusively (no BPF_F_ALLOW_MULTI), so the kernel lets no \
                     program attach under it; {fix}",
                    dir.display(),
                    program(first),
                    hook_name(hook)
                );
            }
        }
    }
    Ok(())
}

/// The cgroups above `cgroup`, nearest first, up to the root of its cgroup v2 mount.
fn ancestors(cgroup: &Path) -> Vec<PathBuf> {
    cgroup
        .ancestors()
        .skip(1)
        .take_while(|dir| nix::sys::statfs::statfs(*dir).is_ok_and(|s| s.filesystem_type().0 == CGROUP2_SUPER_MAGIC))
        .map(Path::to_owned)
        .collect()
}

fn query(dir: &File, path: &Path, hook: &Hook) -> Result<Attached> {
    sys::prog_query(dir.as_fd(), hook.attach)
        .with_context(|| format!("list the programs on {} of cgroup {}", hook_name(hook), path.display()))
}

/// `connect4` for `capture_connect4`.
fn hook_name(hook: &Hook) -> &'static str {
    hook.program.trim_start_matches("capture_")
}

/// A program by name and id, for an operator to find it (`bpftool prog show id N`).
fn program(id: u32) -> String {
    let name = aya::programs::loaded_programs()
        .flatten()
        .find(|p| p.id() == id)
        .and_then(|p| p.name_as_str().map(str::to_owned))
        .filter(|n| !n.is_empty());
    match name {
        Some(name) => format!("program {name} (id {id})"),
        None => format!("program id {id}"),
    }
}
