//! The eBPF backend: kernel programs attached once to a cgroup, fed per network namespace from maps that
//! are filled from the same flags as the iptables backend.
//!
//! Programs, links and maps are pinned under one bpffs directory (`--pin-dir`), so capture stays in the
//! kernel after the loader exits, like iptables rules. The first namespace registered attaches the
//! programs; `capture clean` in the last one detaches them and removes every pin.

mod attach_order;
pub mod entries;
pub mod features;
mod listeners;
pub mod sk_lookup;
// Public for the benchmark, which registers hundreds of throwaway namespaces without loading the programs
// again for each.
pub mod maps;
mod pins;
pub mod placement;
mod programs;
mod register;
mod status;
pub mod sys;

pub use maps::Registered;
pub use programs::PROGRAMS;
pub use register::{attach, register_here, registered, unregister};
pub use sk_lookup::Spares;

use std::path::Path;

use anyhow::{Result, bail};

use self::{
    maps::Maps,
    pins::{lock, remove_pins},
    programs::forward_logs,
    register::{apply, unregister_locked},
    status::{describe, status},
};
use crate::{
    config::{Action, Invocation, LogLevel},
    namespace::{self, Environment},
};

/// Runs one invocation with the eBPF backend in the current network namespace; returns what to print.
pub fn run(inv: &Invocation, env: &mut Environment) -> Result<String> {
    let opts = &inv.options;
    match opts.action {
        Action::Apply => {
            // Built first: a configuration the kernel cannot take fails before anything is touched.
            let entries = entries::entries(&inv.config, env, 0)?;
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
            env.add_passthrough_v6(&inv.config)?;
            let mut ebpf = apply(inv, env, &opts.pin_dir)?;
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

/// Fails with one line naming the first feature this kernel lacks (see [`features`]); nothing is applied.
fn probe() -> Result<()> {
    features::check()
        .map_err(|missing| anyhow::anyhow!("{missing}; nothing was applied (use --backend iptables or auto)"))
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
