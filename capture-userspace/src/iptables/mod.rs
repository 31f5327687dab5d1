//! The iptables backend: render the rules istio-iptables would write, apply them, remove them.
//!
//! It is the fallback where the kernel lacks what the eBPF backend needs, and the baseline the eBPF
//! backend is compared with, in behaviour (the differential tests) and in speed (the benchmark).
pub mod apply;
pub mod render;
pub mod routes;

use anyhow::Result;

use crate::{
    config::{Action, Invocation},
    namespace::Environment,
};

/// Runs one invocation with the iptables backend in the current network namespace; returns what to print.
pub fn run(inv: &Invocation, env: &mut Environment) -> Result<String> {
    let rulesets = render::render(&inv.config, env);
    let opts = &inv.options;
    Ok(match opts.action {
        Action::Apply if opts.dry_run => rulesets.iter().map(render::Ruleset::restore_document).collect(),
        Action::Apply if opts.skip_rule_apply => String::new(),
        Action::Apply => {
            apply::apply(&rulesets, opts.iptables_flavour)?;
            routes::configure(&inv.config, env)?;
            String::new()
        }
        Action::Clean if opts.dry_run => "would remove every ISTIO_* chain and the rules that jump to them\n".into(),
        Action::Clean => {
            apply::clean(&rulesets, opts.iptables_flavour)?;
            routes::remove(&inv.config)?;
            String::new()
        }
        Action::Status => {
            let lines = apply::status(opts.iptables_flavour)?;
            if lines.is_empty() {
                "iptables: no capture rules in this network namespace\n".into()
            } else {
                lines.iter().map(|l| format!("{l}\n")).collect()
            }
        }
    })
}
