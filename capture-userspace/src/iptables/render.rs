//! Renders a [`Config`] into the iptables-restore documents istio-iptables writes, rule for rule and in
//! istio's build order (REFERENCE §3.1–§3.2; proven against Istio's 27 golden files in
//! `tests/golden.rs`).
//!
//! Rules are built per family in one pass; each family's document then groups them by table. The letters
//! in the comments (a, b, c1 …) are those of REFERENCE §3.2's `ISTIO_OUTPUT` template.

use ipnet::IpNet;

use crate::config::{
    Config, DNS_PORT, DNS_PROXY_PORT, Environment, InboundPorts, IncludeCidrs, InterceptionMode, Owner, OwnerGroups,
    TPROXY_OUTBOUND_MARK,
};

/// An address family: one iptables-restore document each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// iptables.
    V4,
    /// ip6tables.
    V6,
}

/// The tables istio-iptables writes to, in emission (alphabetical) order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Table {
    /// TPROXY inbound and `--drop-invalid`.
    Mangle,
    /// REDIRECT capture.
    Nat,
    /// DNS conntrack zones.
    Raw,
}

impl Table {
    /// The table's name in iptables.
    pub fn name(self) -> &'static str {
        match self {
            Table::Mangle => "mangle",
            Table::Nat => "nat",
            Table::Raw => "raw",
        }
    }
}

/// istio's chains.
const INBOUND: &str = "ISTIO_INBOUND";
const REDIRECT: &str = "ISTIO_REDIRECT";
const IN_REDIRECT: &str = "ISTIO_IN_REDIRECT";
const OUTPUT: &str = "ISTIO_OUTPUT";
const OUTPUT_DNS: &str = "ISTIO_OUTPUT_DNS";
const DIVERT: &str = "ISTIO_DIVERT";
const TPROXY: &str = "ISTIO_TPROXY";
const DROP: &str = "ISTIO_DROP";

/// The kernel's own chains.
const BUILTIN_CHAINS: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// Conntrack zones of DNS flows (REFERENCE §3.7): proxy → server and server → proxy replies in 1, app →
/// server and the DNS proxy's replies in 2, so a cached UDP NAT of one leg is never used by the other.
const ZONE_UPSTREAM: &str = "1";
const ZONE_CLIENT: &str = "2";

/// One rule: `-A CHAIN spec` or `-I CHAIN n spec`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Its table.
    pub table: Table,
    /// Its chain.
    pub chain: String,
    /// `Some(n)`: inserted at position n instead of appended.
    pub insert_at: Option<u32>,
    /// The words after the chain (and position).
    pub spec: Vec<String>,
}

impl Rule {
    /// Whether the rule lives in a built-in chain (and so is not removed with istio's chains).
    pub fn is_builtin_chain(&self) -> bool {
        BUILTIN_CHAINS.contains(&self.chain.as_str())
    }

    /// The target after `-j`.
    pub fn jump_target(&self) -> Option<&str> {
        let at = self.spec.iter().position(|w| w == "-j")?;
        self.spec.get(at + 1).map(String::as_str)
    }

    fn line(&self) -> String {
        let spec = self.spec.join(" ");
        match self.insert_at {
            Some(n) => format!("-I {} {n} {spec}", self.chain),
            None => format!("-A {} {spec}", self.chain),
        }
    }
}

/// The rules of one family, in build order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ruleset {
    /// iptables or ip6tables.
    pub family: Family,
    /// The rules, in the order istio builds them.
    pub rules: Vec<Rule>,
}

impl Ruleset {
    /// The iptables-restore `--noflush` input: per table (alphabetically) the `-N` lines of every istio
    /// chain it uses, in order of first use, then its rules in build order, then `COMMIT`.
    pub fn restore_document(&self) -> String {
        let mut out = String::new();
        for table in [Table::Mangle, Table::Nat, Table::Raw] {
            let rules: Vec<&Rule> = self.rules.iter().filter(|r| r.table == table).collect();
            if rules.is_empty() {
                continue;
            }
            out.push_str(&format!("* {}\n", table.name()));
            let mut chains: Vec<&str> = Vec::new();
            for rule in &rules {
                let target = rule.jump_target().filter(|t| t.starts_with("ISTIO_"));
                for chain in [Some(rule.chain.as_str()), target].into_iter().flatten() {
                    if !BUILTIN_CHAINS.contains(&chain) && !chains.contains(&chain) {
                        chains.push(chain);
                    }
                }
            }
            for chain in chains {
                out.push_str(&format!("-N {chain}\n"));
            }
            for rule in rules {
                out.push_str(&rule.line());
                out.push('\n');
            }
            out.push_str("COMMIT\n");
        }
        out
    }
}

/// The rulesets istio-iptables writes: IPv4 always, IPv6 when the environment turns it on.
pub fn render(cfg: &Config, env: &Environment) -> Vec<Ruleset> {
    let mut families = vec![Family::V4];
    if env.ipv6 {
        families.push(Family::V6);
    }
    families
        .into_iter()
        .map(|family| Builder::new(cfg, env, family).build())
        .collect()
}

/// Builds one family's rules in istio's order.
struct Builder<'a> {
    cfg: &'a Config,
    env: &'a Environment,
    family: Family,
    rules: Vec<Rule>,
}

/// A rule spec from its text. Every token is free of white space: flags validate interface names, user and
/// group names, ports and CIDRs before they get here.
fn spec(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_owned).collect()
}

impl<'a> Builder<'a> {
    fn new(cfg: &'a Config, env: &'a Environment, family: Family) -> Self {
        Builder {
            cfg,
            env,
            family,
            rules: Vec::new(),
        }
    }

    fn append(&mut self, table: Table, chain: &str, text: &str) {
        self.rules.push(Rule {
            table,
            chain: chain.to_owned(),
            insert_at: None,
            spec: spec(text),
        });
    }

    fn insert(&mut self, table: Table, chain: &str, at: u32, text: &str) {
        self.rules.push(Rule {
            table,
            chain: chain.to_owned(),
            insert_at: Some(at),
            spec: spec(text),
        });
    }

    fn v6(&self) -> bool {
        self.family == Family::V6
    }

    /// "localhost" of this family (`LOOP4`/`LOOP6`).
    fn loopback(&self) -> String {
        if self.v6() {
            "::1/128".to_owned()
        } else {
            self.cfg.loopback_cidr_v4.to_string()
        }
    }

    /// The proxy's inbound-passthrough source (`PASSTHRU4/6`).
    fn passthrough(&self) -> &'static str {
        if self.v6() { "::6/128" } else { "127.0.0.6/32" }
    }

    /// The CIDRs of this family from a list.
    fn of_family<'c>(&self, cidrs: &'c [IpNet]) -> Vec<&'c IpNet> {
        let v6 = self.v6();
        cidrs.iter().filter(|c| matches!(c, IpNet::V6(_)) == v6).collect()
    }

    /// This family's nameservers as rule addresses (`S/32`, `S/128`), in resolv.conf's text.
    fn servers(&self) -> Vec<String> {
        let host_prefix = if self.v6() { "/128" } else { "/32" };
        self.env
            .nameservers(self.v6())
            .map(|n| format!("{}{host_prefix}", n.text))
            .collect()
    }

    /// The proxy's uids, then its gids, with the owner-match option for each.
    fn proxy_owners(&self) -> impl Iterator<Item = (&'static str, &'a Owner)> + 'a {
        let cfg = self.cfg;
        let uids = cfg.proxy_uids.iter().map(|o| ("--uid-owner", o));
        uids.chain(cfg.proxy_gids.iter().map(|o| ("--gid-owner", o)))
    }

    fn build(mut self) -> Ruleset {
        let cfg = self.cfg;
        let tproxy = cfg.mode == InterceptionMode::Tproxy;
        self.kube_virt_returns();
        self.exclude_interfaces(tproxy);
        if cfg.drop_invalid {
            self.append(
                Table::Mangle,
                "PREROUTING",
                &format!("-m conntrack --ctstate INVALID -j {DROP}"),
            );
            self.append(Table::Mangle, DROP, "-j DROP");
        }
        let tunnel = cfg.inbound_tunnel_port;
        self.append(Table::Nat, INBOUND, &format!("-p tcp --dport {tunnel} -j RETURN"));
        let proxy_port = cfg.proxy_port;
        self.append(
            Table::Nat,
            REDIRECT,
            &format!("-p tcp -j REDIRECT --to-ports {proxy_port}"),
        );
        let inbound_port = cfg.inbound_capture_port;
        self.append(
            Table::Nat,
            IN_REDIRECT,
            &format!("-p tcp -j REDIRECT --to-ports {inbound_port}"),
        );
        self.inbound(tproxy);
        self.append(Table::Nat, "OUTPUT", &format!("-j {OUTPUT}"));
        self.outbound();
        if cfg.dns_effective(self.env) {
            self.dns_conntrack_zones();
        }
        if tproxy {
            self.tproxy_marks();
        }
        Ruleset {
            family: self.family,
            rules: self.rules,
        }
    }

    /// `-k`: traffic arriving on these interfaces is not treated as inbound (the redirects that treat it
    /// as outbound are inserted above these later, in [`Self::outbound_includes`]).
    fn kube_virt_returns(&mut self) {
        for iface in &self.cfg.kube_virt_interfaces {
            self.insert(Table::Nat, "PREROUTING", 1, &format!("-i {iface} -j RETURN"));
        }
    }

    /// `-c`: nothing on these interfaces is captured, in either direction.
    fn exclude_interfaces(&mut self, tproxy: bool) {
        let tables: &[Table] = if tproxy {
            &[Table::Nat, Table::Mangle]
        } else {
            &[Table::Nat]
        };
        for &table in tables {
            for iface in &self.cfg.exclude_interfaces {
                self.append(table, "PREROUTING", &format!("-i {iface} -j RETURN"));
                self.append(table, "OUTPUT", &format!("-o {iface} -j RETURN"));
            }
        }
    }

    /// `-b`/`-d`: inbound capture, nat REDIRECT to the inbound port or mangle TPROXY.
    fn inbound(&mut self, tproxy: bool) {
        let cfg = self.cfg;
        if cfg.inbound_ports == InboundPorts::None {
            return;
        }
        let table = if tproxy {
            let (mark, port, loopback) = (cfg.tproxy_mark, cfg.inbound_capture_port, self.loopback());
            self.append(Table::Mangle, DIVERT, &format!("-j MARK --set-mark {mark}"));
            self.append(Table::Mangle, DIVERT, "-j ACCEPT");
            let rule = format!("! -d {loopback} -p tcp -j TPROXY --tproxy-mark {mark}/0xffffffff --on-port {port}");
            self.append(Table::Mangle, TPROXY, &rule);
            Table::Mangle
        } else {
            Table::Nat
        };
        self.append(table, "PREROUTING", &format!("-p tcp -j {INBOUND}"));
        let established = format!("-m conntrack --ctstate RELATED,ESTABLISHED -j {DIVERT}");
        match &cfg.inbound_ports {
            InboundPorts::None => {}
            InboundPorts::All => {
                for port in &cfg.inbound_exclude_ports {
                    self.append(table, INBOUND, &format!("-p tcp --dport {port} -j RETURN"));
                }
                if tproxy {
                    self.append(table, INBOUND, &format!("-p tcp {established}"));
                    self.append(table, INBOUND, &format!("-p tcp -j {TPROXY}"));
                } else {
                    self.append(table, INBOUND, &format!("-p tcp -j {IN_REDIRECT}"));
                }
            }
            InboundPorts::List(ports) => {
                for port in ports {
                    if tproxy {
                        self.append(table, INBOUND, &format!("-p tcp --dport {port} {established}"));
                        self.append(table, INBOUND, &format!("-p tcp --dport {port} -j {TPROXY}"));
                    } else {
                        self.append(table, INBOUND, &format!("-p tcp --dport {port} -j {IN_REDIRECT}"));
                    }
                }
            }
        }
    }

    /// `ISTIO_OUTPUT`, rules a to j.
    fn outbound(&mut self) {
        let cfg = self.cfg;
        // a: -o ports win over everything.
        for port in &cfg.outbound_exclude_ports {
            self.append(Table::Nat, OUTPUT, &format!("-p tcp --dport {port} -j RETURN"));
            self.append(Table::Nat, OUTPUT, &format!("-p udp --dport {port} -j RETURN"));
        }
        // b: the proxy's inbound passthrough to the app.
        let passthrough = self.passthrough();
        self.append(Table::Nat, OUTPUT, &format!("-o lo -s {passthrough} -j RETURN"));
        // c, d: the proxy's own traffic.
        let dns = cfg.dns_effective(self.env);
        for uid in &cfg.proxy_uids {
            self.proxy_owner(uid, "--uid-owner", dns, dns);
        }
        for gid in &cfg.proxy_gids {
            // d1 has no port-53 exception even with DNS on (istio's rule, kept as is).
            self.proxy_owner(gid, "--gid-owner", false, dns);
        }
        // e: owner groups.
        match &cfg.owner_groups {
            OwnerGroups::AllExcept(groups) => {
                for g in groups {
                    self.append(
                        Table::Nat,
                        OUTPUT,
                        &format!("-m owner --gid-owner {} -j RETURN", g.token),
                    );
                }
            }
            OwnerGroups::Only(groups) => {
                let not_in: String = groups
                    .iter()
                    .map(|g| format!("-m owner ! --gid-owner {} ", g.token))
                    .collect();
                self.append(Table::Nat, OUTPUT, &format!("{not_in}-j RETURN"));
            }
        }
        // f: DNS to the agent's DNS proxy.
        if cfg.dns_effective_for(self.env, self.v6()) {
            self.dns_redirect();
        }
        // g: localhost.
        let loopback = self.loopback();
        self.append(Table::Nat, OUTPUT, &format!("-d {loopback} -j RETURN"));
        // h: -x.
        for cidr in self.of_family(&cfg.exclude_cidrs) {
            self.append(Table::Nat, OUTPUT, &format!("-d {cidr} -j RETURN"));
        }
        // i: -q.
        for port in &cfg.outbound_ports {
            self.append(Table::Nat, OUTPUT, &format!("-p tcp --dport {port} -j {REDIRECT}"));
        }
        // j: -i (and -k's redirects).
        self.outbound_includes();
    }

    /// c1–c3 for one proxy uid, or d1–d3 for one gid. `dns_in_redirect`: c1's DNS form; `dns`: c2's.
    fn proxy_owner(&mut self, owner: &Owner, owner_match: &str, dns_in_redirect: bool, dns: bool) {
        let (loopback, tunnel, id) = (self.loopback(), self.cfg.inbound_tunnel_port, &owner.token);
        // c1: the proxy calling a local non-loopback address (its own pod IP) goes to the inbound port.
        let ports = if dns_in_redirect {
            format!("-m multiport ! --dports {DNS_PORT},{tunnel}")
        } else {
            format!("! --dport {tunnel}")
        };
        let c1 = format!("-o lo ! -d {loopback} -p tcp {ports} -m owner {owner_match} {id} -j {IN_REDIRECT}");
        self.append(Table::Nat, OUTPUT, &c1);
        // c2: other local traffic of anyone else passes (not when -i lists a loopback CIDR).
        if !self.cfg.include_cidrs.has_loopback() {
            let tcp = if dns {
                format!("-p tcp ! --dport {DNS_PORT} ")
            } else {
                String::new()
            };
            self.append(
                Table::Nat,
                OUTPUT,
                &format!("-o lo {tcp}-m owner ! {owner_match} {id} -j RETURN"),
            );
        }
        // c3: the proxy's own traffic passes.
        self.append(Table::Nat, OUTPUT, &format!("-m owner {owner_match} {id} -j RETURN"));
    }

    /// f: `ISTIO_OUTPUT_DNS` in nat, sending port 53 to the DNS proxy. istio writes `--to-ports` for TCP
    /// and `--to-port` for UDP (the same option), and all TCP rules before the UDP ones.
    fn dns_redirect(&mut self) {
        self.append(Table::Nat, OUTPUT, &format!("-j {OUTPUT_DNS}"));
        let destinations: Vec<String> = if self.cfg.capture_all_dns {
            vec![String::new()]
        } else {
            self.servers().iter().map(|s| format!("-d {s} ")).collect()
        };
        for d in &destinations {
            let rule = format!("-p tcp --dport {DNS_PORT} {d}-j REDIRECT --to-ports {DNS_PROXY_PORT}");
            self.append(Table::Nat, OUTPUT_DNS, &rule);
        }
        for d in &destinations {
            let rule = format!("-p udp --dport {DNS_PORT} {d}-j REDIRECT --to-port {DNS_PROXY_PORT}");
            self.append(Table::Nat, OUTPUT_DNS, &rule);
        }
    }

    /// j: `-i` includes; `-k` interfaces get the same redirects in PREROUTING, inserted on top.
    fn outbound_includes(&mut self) {
        let cfg = self.cfg;
        match &cfg.include_cidrs {
            IncludeCidrs::All => {
                self.append(Table::Nat, OUTPUT, &format!("-j {REDIRECT}"));
                for iface in &cfg.kube_virt_interfaces {
                    self.insert(Table::Nat, "PREROUTING", 1, &format!("-i {iface} -j {REDIRECT}"));
                }
            }
            IncludeCidrs::List(cidrs) => {
                for cidr in self.of_family(cidrs) {
                    for iface in &cfg.kube_virt_interfaces {
                        self.insert(
                            Table::Nat,
                            "PREROUTING",
                            1,
                            &format!("-i {iface} -d {cidr} -j {REDIRECT}"),
                        );
                    }
                    self.append(Table::Nat, OUTPUT, &format!("-d {cidr} -j {REDIRECT}"));
                }
            }
        }
    }

    /// The raw table's conntrack zones for DNS (REFERENCE §3.7).
    fn dns_conntrack_zones(&mut self) {
        self.append(Table::Raw, "OUTPUT", &format!("-j {OUTPUT_DNS}"));
        for (owner_match, owner) in self.proxy_owners() {
            let id = &owner.token;
            let upstream =
                format!("-p udp --dport {DNS_PORT} -m owner {owner_match} {id} -j CT --zone {ZONE_UPSTREAM}");
            self.append(Table::Raw, OUTPUT_DNS, &upstream);
            let replies =
                format!("-p udp --sport {DNS_PROXY_PORT} -m owner {owner_match} {id} -j CT --zone {ZONE_CLIENT}");
            self.append(Table::Raw, OUTPUT_DNS, &replies);
        }
        let servers: Vec<(String, String)> = if self.cfg.capture_all_dns {
            vec![(String::new(), String::new())]
        } else {
            self.servers()
                .iter()
                .map(|s| (format!("-d {s} "), format!("-s {s} ")))
                .collect()
        };
        if !servers.is_empty() {
            self.append(Table::Raw, "PREROUTING", &format!("-j {INBOUND}"));
        }
        for (to, from) in &servers {
            self.append(
                Table::Raw,
                OUTPUT_DNS,
                &format!("-p udp --dport {DNS_PORT} {to}-j CT --zone {ZONE_CLIENT}"),
            );
            self.append(
                Table::Raw,
                INBOUND,
                &format!("-p udp --sport {DNS_PORT} {from}-j CT --zone {ZONE_UPSTREAM}"),
            );
        }
    }

    /// TPROXY mode's marks (REFERENCE §3.6): replies of diverted connections follow the mark's routing
    /// table, and the proxy's own packets to local non-loopback addresses are marked so that inbound
    /// capture takes them back.
    fn tproxy_marks(&mut self) {
        let (mark, loopback, passthrough) = (self.cfg.tproxy_mark, self.loopback(), self.passthrough());
        self.append(
            Table::Mangle,
            "PREROUTING",
            &format!("-p tcp -m mark --mark {mark} -j CONNMARK --save-mark"),
        );
        self.append(
            Table::Mangle,
            "OUTPUT",
            &format!("-p tcp -o lo -m mark --mark {mark} -j RETURN"),
        );
        for (owner_match, owner) in self.proxy_owners() {
            let rule = format!(
                "! -d {loopback} -p tcp -o lo -m owner {owner_match} {} -j MARK --set-mark {TPROXY_OUTBOUND_MARK}",
                owner.token
            );
            self.append(Table::Mangle, "OUTPUT", &rule);
        }
        self.append(
            Table::Mangle,
            "OUTPUT",
            &format!("-p tcp -m connmark --mark {mark} -j CONNMARK --restore-mark"),
        );
        self.insert(
            Table::Mangle,
            INBOUND,
            1,
            &format!("-p tcp -m mark --mark {mark} -j RETURN"),
        );
        self.insert(
            Table::Mangle,
            INBOUND,
            2,
            &format!("-p tcp -s {passthrough} -i lo -j RETURN"),
        );
        let not_outbound = format!("-p tcp -i lo -m mark ! --mark {TPROXY_OUTBOUND_MARK} -j RETURN");
        self.insert(Table::Mangle, INBOUND, 3, &not_outbound);
    }
}
