//! `capture status` and a dry run's account: what the pin directory holds (the attached programs, every
//! registered namespace with its flags and counters), and the map entries an apply would write.

use std::path::Path;

use anyhow::Result;

use super::{
    entries::Entries,
    maps::{self, Maps},
    programs::HOOKS,
};
use crate::namespace;

/// A dry run's account of what would be written.
pub(super) fn describe(e: &Entries) -> String {
    let mut out = format!("CONFIG[this namespace] = {:?}\n", e.config);
    for key in &e.sets {
        out.push_str(&format!("SETS += {key:?}\n"));
    }
    for (bits, data) in &e.cidrs {
        out.push_str(&format!("CIDRS += /{bits} {data:?}\n"));
    }
    out
}

/// `capture status`: every registered namespace, its flags and counters.
pub(super) fn status(dir: &Path) -> Result<String> {
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
