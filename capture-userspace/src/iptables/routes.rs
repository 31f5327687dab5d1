//! The policy routes istio-iptables sets up beside its rules in TPROXY mode (REFERENCE §3.2, "Routing and
//! addresses"). The other half, `::6` on lo, is shared with the eBPF backend: [`namespace::add_passthrough_v6`].

use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::{
    config::{Config, Environment, InboundPorts, InterceptionMode},
    namespace,
};

/// Runs `ip ARGS`; `tolerate` is the error text that means "already so" (or "already gone").
fn ip(args: &[&str], tolerate: &str) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("run ip (iproute2)")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() && !stderr.contains(tolerate) {
        bail!("ip {} failed: {}", args.join(" "), stderr.trim());
    }
    Ok(())
}

fn tproxy_routes(config: &Config) -> bool {
    config.mode == InterceptionMode::Tproxy && config.inbound_ports != InboundPorts::None
}

/// Adds what istio adds: `::6` on lo when IPv6 is on; the TPROXY rule and local route when TPROXY
/// captures inbound. Idempotent.
pub fn configure(config: &Config, env: &Environment) -> Result<()> {
    namespace::add_passthrough_v6(env)?;
    if tproxy_routes(config) {
        let mark = config.tproxy_mark.to_string();
        let table = config.tproxy_route_table.to_string();
        let families: &[&str] = if env.ipv6 { &["-4", "-6"] } else { &["-4"] };
        for fam in families {
            ip(&[fam, "rule", "add", "fwmark", &mark, "lookup", &table], "File exists")?;
            ip(
                &[fam, "route", "add", "local", "default", "dev", "lo", "table", &table],
                "File exists",
            )?;
        }
    }
    Ok(())
}

/// Removes the TPROXY rule and route (the `::6` address stays, as with istio: the proxy may still use it).
pub fn remove(config: &Config) -> Result<()> {
    if config.mode == InterceptionMode::Tproxy {
        let mark = config.tproxy_mark.to_string();
        let table = config.tproxy_route_table.to_string();
        for fam in ["-4", "-6"] {
            ip(&[fam, "rule", "del", "fwmark", &mark, "lookup", &table], "No such file")?;
            ip(&[fam, "route", "flush", "table", &table], "FIB table does not exist")?;
        }
    }
    Ok(())
}
