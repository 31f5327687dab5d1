//! The capture model for the kernel: a [`Config`] and the namespace's facts turned into the map entries
//! the programs read. Pure, so the same entries drive the host-side model in the tests.

use std::{collections::HashSet, net::IpAddr};

use anyhow::{Result, bail};
use capture_common::{
    addr::{self, Addr},
    maps::{
        CIDR_KEY_HEADER_BITS, CidrKeyData, CidrKind, Family, MAX_CIDR_ENTRIES_PER_POD, MAX_PROXY_IDS,
        MAX_SET_ENTRIES_PER_POD, PodConfig, PodSources, SetKey, SetKind, flag,
    },
    model::Lookups,
};
use ipnet::IpNet;

use crate::{
    config::{Config, InboundPorts, IncludeCidrs, InterceptionMode, Owner, OwnerGroups},
    namespace::Environment,
};

/// One CIDR-set entry: an LPM key's prefix length and data.
pub type CidrEntry = (u32, CidrKeyData);

/// All map entries of one namespace's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entries {
    /// The `CONFIG` value.
    pub config: PodConfig,
    /// `SETS` keys.
    pub sets: Vec<SetKey>,
    /// `CIDRS` keys.
    pub cidrs: Vec<CidrEntry>,
    /// The `POD_SOURCES` value.
    pub sources: PodSources,
}

fn ids(owners: &[Owner], flag: &str) -> Result<([u32; MAX_PROXY_IDS], u32)> {
    if owners.len() > MAX_PROXY_IDS {
        bail!(
            "{flag}: the eBPF backend takes at most {MAX_PROXY_IDS} ids, got {}",
            owners.len()
        );
    }
    let mut out = [0; MAX_PROXY_IDS];
    for (slot, o) in out.iter_mut().zip(owners) {
        *slot = o.id;
    }
    Ok((out, owners.len() as u32))
}

/// A CIDR as an LPM entry of configuration `id`, in the family it is written in (as istio-iptables splits
/// its lists): `10.0.0.0/8` is an IPv4 entry, `::ffff:10.0.0.0/104` and `::/0` are IPv6 entries, which never
/// match an IPv4 destination.
pub fn cidr_entry(id: u32, kind: CidrKind, net: &IpNet) -> CidrEntry {
    let net = net.trunc();
    let (family, a, bits) = match net {
        IpNet::V4(v4) => (
            Family::V4,
            addr::from_v4(v4.addr().octets()),
            addr::V4_MAPPED_PREFIX_BITS + u32::from(v4.prefix_len()),
        ),
        IpNet::V6(v6) => (Family::V6, v6.addr().octets(), u32::from(v6.prefix_len())),
    };
    (CIDR_KEY_HEADER_BITS + bits, CidrKeyData::new(id, kind, family, a))
}

/// `ip` as the kernel programs hold an address: IPv6, or IPv4 mapped.
fn mapped(ip: IpAddr) -> Addr {
    match ip {
        IpAddr::V4(v4) => addr::from_v4(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn host(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

/// The entries for `cfg` in a namespace with `env`, under configuration id `id`.
pub fn entries(cfg: &Config, env: &Environment, id: u32) -> Result<Entries> {
    let (uids, n_uids) = ids(&cfg.proxy_uids, "-u/--proxy-uid")?;
    let (gids, n_gids) = ids(&cfg.proxy_gids, "-g/--proxy-gid")?;
    let mut flags = 0;
    let mut set_flag = |on: bool, bit: u32| {
        if on {
            flags |= bit;
        }
    };
    set_flag(cfg.include_cidrs == IncludeCidrs::All, flag::INCLUDE_ALL);
    set_flag(cfg.include_cidrs.has_loopback(), flag::INCLUDE_HAS_LOOPBACK);
    set_flag(env.dns_effective(cfg), flag::DNS);
    set_flag(env.dns_effective_for(cfg, false), flag::DNS_V4);
    set_flag(env.dns_effective_for(cfg, true), flag::DNS_V6);
    set_flag(cfg.capture_all_dns, flag::CAPTURE_ALL_DNS);
    set_flag(
        matches!(cfg.owner_groups, OwnerGroups::Only(_)),
        flag::OWNER_GROUPS_ONLY,
    );
    set_flag(env.ipv6, flag::IPV6);
    set_flag(cfg.inbound_ports == InboundPorts::All, flag::INBOUND_ALL);
    set_flag(matches!(cfg.inbound_ports, InboundPorts::List(_)), flag::INBOUND_LIST);
    set_flag(!env.excluded_subnets.is_empty(), flag::HAS_EXCLUDED_SUBNETS);
    set_flag(!cfg.outbound_exclude_ports.is_empty(), flag::HAS_OUTBOUND_EXCLUDE_PORTS);
    set_flag(
        match &cfg.owner_groups {
            OwnerGroups::AllExcept(g) | OwnerGroups::Only(g) => !g.is_empty(),
        },
        flag::HAS_OWNER_GROUPS,
    );
    set_flag(!cfg.exclude_cidrs.is_empty(), flag::HAS_EXCLUDE_CIDRS);
    set_flag(!cfg.outbound_ports.is_empty(), flag::HAS_OUTBOUND_INCLUDE_PORTS);
    set_flag(
        matches!(&cfg.include_cidrs, IncludeCidrs::List(l) if !l.is_empty()),
        flag::HAS_INCLUDE_CIDRS,
    );
    set_flag(cfg.loopback_accel, flag::LOOPBACK_ACCEL);
    set_flag(cfg.mode == InterceptionMode::Tproxy, flag::TPROXY);
    let config = PodConfig {
        id,
        flags,
        proxy_port: cfg.proxy_port,
        inbound_capture_port: cfg.inbound_capture_port,
        tunnel_port: cfg.inbound_tunnel_port,
        loopback_v4_len: u16::from(cfg.loopback_cidr_v4.prefix_len()),
        loopback_v4: cfg.loopback_cidr_v4.addr().octets(),
        n_uids,
        n_gids,
        uids,
        gids,
        // Chosen when the namespace is registered (`Maps::register`).
        slot: 0,
    };

    let set = |kind: SetKind, value: u32| SetKey {
        id,
        kind: kind as u32,
        value,
    };
    let (inbound_ports, inbound_excluded): (&[u16], &[u16]) = match &cfg.inbound_ports {
        InboundPorts::None => (&[], &[]),
        // istio applies -d only with -b '*'.
        InboundPorts::All => (&[], &cfg.inbound_exclude_ports),
        InboundPorts::List(ports) => (ports, &[]),
    };
    let groups = match &cfg.owner_groups {
        OwnerGroups::AllExcept(g) | OwnerGroups::Only(g) => g,
    };
    let sets: Vec<SetKey> = cfg
        .outbound_exclude_ports
        .iter()
        .map(|&p| set(SetKind::OutboundExcludePort, u32::from(p)))
        .chain(
            cfg.outbound_ports
                .iter()
                .map(|&p| set(SetKind::OutboundIncludePort, u32::from(p))),
        )
        .chain(groups.iter().map(|g| set(SetKind::OwnerGroup, g.id)))
        .chain(inbound_ports.iter().map(|&p| set(SetKind::InboundPort, u32::from(p))))
        .chain(
            inbound_excluded
                .iter()
                .map(|&p| set(SetKind::InboundExcludePort, u32::from(p))),
        )
        .chain(env.excluded_ifindexes.iter().map(|&i| set(SetKind::ExcludedIfindex, i)))
        .chain(env.virt_ifindexes.iter().map(|&i| set(SetKind::VirtIfindex, i)))
        .collect();

    let mut cidrs = Vec::new();
    let mut add = |kind: CidrKind, net: &IpNet| cidrs.push(cidr_entry(id, kind, net));
    cfg.exclude_cidrs.iter().for_each(|n| add(CidrKind::Exclude, n));
    if let IncludeCidrs::List(list) = &cfg.include_cidrs {
        list.iter().for_each(|n| add(CidrKind::Include, n));
    }
    env.local.iter().for_each(|&ip| add(CidrKind::Local, &host(ip)));
    env.nameservers
        .iter()
        .for_each(|n| add(CidrKind::DnsServer, &host(n.addr)));
    env.excluded_subnets
        .iter()
        .for_each(|n| add(CidrKind::ExcludedInterface, n));
    within_pod_limits(&sets, &cidrs)?;
    let source = |v6| env.pod_address(v6).map_or(addr::UNSPECIFIED, mapped);
    let sources = PodSources {
        v4: source(false),
        v6: source(true),
    };
    Ok(Entries {
        config,
        sets,
        cidrs,
        sources,
    })
}

/// Fails with one line if a namespace's entries exceed what one pod may take of the node-wide maps
/// ([`MAX_SET_ENTRIES_PER_POD`], [`MAX_CIDR_ENTRIES_PER_POD`]).
fn within_pod_limits(sets: &[SetKey], cidrs: &[CidrEntry]) -> Result<()> {
    if sets.len() > MAX_SET_ENTRIES_PER_POD as usize {
        bail!(
            "-b/-d/-o/-q and owner groups: {} ports and groups; the eBPF backend takes at most \
             {MAX_SET_ENTRIES_PER_POD} per pod",
            sets.len()
        );
    }
    if cidrs.len() > MAX_CIDR_ENTRIES_PER_POD as usize {
        bail!(
            "-i/-x: {} CIDRs (with the pod's own addresses, nameservers and -c subnets); the eBPF backend \
             takes at most {MAX_CIDR_ENTRIES_PER_POD} per pod",
            cidrs.len()
        );
    }
    Ok(())
}

/// The model's lookups over a set of entries, as the kernel sees them in its maps.
pub struct EntryLookups {
    sets: HashSet<SetKey>,
    cidrs: Vec<CidrEntry>,
    id: u32,
}

impl EntryLookups {
    /// Lookups over `entries`.
    pub fn new(entries: &Entries) -> Self {
        EntryLookups {
            sets: entries.sets.iter().copied().collect(),
            cidrs: entries.cidrs.clone(),
            id: entries.config.id,
        }
    }
}

impl Lookups for EntryLookups {
    fn in_set(&self, kind: SetKind, value: u32) -> bool {
        self.sets.contains(&SetKey {
            id: self.id,
            kind: kind as u32,
            value,
        })
    }

    fn in_cidrs(&self, kind: CidrKind, a: &Addr) -> bool {
        let want = CidrKeyData::lookup(self.id, kind, *a);
        self.cidrs
            .iter()
            .any(|(bits, data)| data.same_set(&want) && addr::in_prefix(a, &data.addr, bits - CIDR_KEY_HEADER_BITS))
    }
}
