//! The policy routes istio-iptables sets up beside its rules in TPROXY mode
//! (`docs/istio-rules.md#routes-and-addresses`), made over rtnetlink ([`rtnl`]). The other half, `::6` on lo,
//! is shared with the eBPF backend: [`Environment::add_passthrough_v6`].

use anyhow::Result;

use crate::{
    config::{Config, InboundPorts, InterceptionMode},
    namespace::Environment,
    rtnl::{self, Family},
};

fn tproxy_routes(config: &Config) -> bool {
    config.mode == InterceptionMode::Tproxy && config.inbound_ports != InboundPorts::None
}

/// Adds what istio adds: `::6` on lo when IPv6 is on; the TPROXY rule and local route when TPROXY
/// captures inbound. Idempotent: what is already there is left as it is.
pub fn configure(config: &Config, env: &mut Environment) -> Result<()> {
    env.add_passthrough_v6(config)?;
    if tproxy_routes(config) {
        let families: &[Family] = if env.ipv6 {
            &[Family::V4, Family::V6]
        } else {
            &[Family::V4]
        };
        for &family in families {
            rtnl::add_fwmark_rule(family, config.tproxy_mark, config.tproxy_route_table)?;
            rtnl::add_local_default_route(family, config.tproxy_route_table)?;
        }
    }
    Ok(())
}

/// Removes the TPROXY rule and route (the `::6` address stays, as with istio: the proxy may still use it).
/// What is already gone is success.
pub fn remove(config: &Config) -> Result<()> {
    if config.mode == InterceptionMode::Tproxy {
        for family in [Family::V4, Family::V6] {
            rtnl::del_fwmark_rule(family, config.tproxy_mark, config.tproxy_route_table)?;
            rtnl::flush_table(family, config.tproxy_route_table)?;
        }
    }
    Ok(())
}
