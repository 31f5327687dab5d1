//! Renders a [`Config`] into the iptables-restore documents istio-iptables writes, rule for rule and in
//! istio's build order (REFERENCE §3.1–§3.2; proven against Istio's 27 golden files in
//! `tests/golden.rs`).
//!
//! Rules are built per family in one pass; each family's document then groups them by table. The letters
//! in the comments (a, b, c1 …) are those of REFERENCE §3.2's `ISTIO_OUTPUT` template.

use ipnet::IpNet;

use crate::config::{
    Config, DNS_PORT, DNS_PROXY_PORT, Environment, InboundPorts, IncludeCidrs, InterceptionMode,
    Owner, OwnerGroups, TPROXY_OUTBOUND_MARK,
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

fn words(spec: &[&str]) -> Vec<String> {
    spec.iter().map(|w| (*w).to_owned()).collect()
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

    fn append(&mut self, table: Table, chain: &str, spec: Vec<String>) {
        self.rules.push(Rule {
            table,
            chain: chain.to_owned(),
            insert_at: None,
            spec,
        });
    }

    fn insert(&mut self, table: Table, chain: &str, at: u32, spec: Vec<String>) {
        self.rules.push(Rule {
            table,
            chain: chain.to_owned(),
            insert_at: Some(at),
            spec,
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

    fn host_prefix(&self) -> &'static str {
        if self.v6() { "/128" } else { "/32" }
    }

    /// The CIDRs of this family from a list.
    fn of_family<'c>(&self, cidrs: &'c [IpNet]) -> Vec<&'c IpNet> {
        let v6 = self.v6();
        cidrs
            .iter()
            .filter(|c| matches!(c, IpNet::V6(_)) == v6)
            .collect()
    }

    /// This family's nameservers as rule addresses (`S/32`, `S/128`), in resolv.conf's text.
    fn servers(&self) -> Vec<String> {
        self.env
            .nameservers(self.v6())
            .map(|n| format!("{}{}", n.text, self.host_prefix()))
            .collect()
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
                words(&["-m", "conntrack", "--ctstate", "INVALID", "-j", DROP]),
            );
            self.append(Table::Mangle, DROP, words(&["-j", "DROP"]));
        }
        let tunnel = cfg.inbound_tunnel_port.to_string();
        self.append(
            Table::Nat,
            INBOUND,
            words(&["-p", "tcp", "--dport", &tunnel, "-j", "RETURN"]),
        );
        let proxy_port = cfg.proxy_port.to_string();
        self.append(
            Table::Nat,
            REDIRECT,
            words(&["-p", "tcp", "-j", "REDIRECT", "--to-ports", &proxy_port]),
        );
        let inbound_port = cfg.inbound_capture_port.to_string();
        self.append(
            Table::Nat,
            IN_REDIRECT,
            words(&["-p", "tcp", "-j", "REDIRECT", "--to-ports", &inbound_port]),
        );
        self.inbound(tproxy);
        self.append(Table::Nat, "OUTPUT", words(&["-j", OUTPUT]));
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
            self.insert(
                Table::Nat,
                "PREROUTING",
                1,
                words(&["-i", iface, "-j", "RETURN"]),
            );
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
                self.append(table, "PREROUTING", words(&["-i", iface, "-j", "RETURN"]));
                self.append(table, "OUTPUT", words(&["-o", iface, "-j", "RETURN"]));
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
            let mark = cfg.tproxy_mark.to_string();
            self.append(
                Table::Mangle,
                DIVERT,
                words(&["-j", "MARK", "--set-mark", &mark]),
            );
            self.append(Table::Mangle, DIVERT, words(&["-j", "ACCEPT"]));
            let (loopback, port) = (self.loopback(), cfg.inbound_capture_port.to_string());
            let tproxy_mark = format!("{mark}/0xffffffff");
            self.append(
                Table::Mangle,
                TPROXY,
                words(&[
                    "!",
                    "-d",
                    &loopback,
                    "-p",
                    "tcp",
                    "-j",
                    "TPROXY",
                    "--tproxy-mark",
                    &tproxy_mark,
                    "--on-port",
                    &port,
                ]),
            );
            Table::Mangle
        } else {
            Table::Nat
        };
        self.append(table, "PREROUTING", words(&["-p", "tcp", "-j", INBOUND]));
        let established = [
            "-m",
            "conntrack",
            "--ctstate",
            "RELATED,ESTABLISHED",
            "-j",
            DIVERT,
        ];
        match &cfg.inbound_ports {
            InboundPorts::None => {}
            InboundPorts::All => {
                for port in &cfg.inbound_exclude_ports {
                    self.append(
                        table,
                        INBOUND,
                        words(&["-p", "tcp", "--dport", &port.to_string(), "-j", "RETURN"]),
                    );
                }
                if tproxy {
                    let mut spec = words(&["-p", "tcp"]);
                    spec.extend(words(&established));
                    self.append(table, INBOUND, spec);
                    self.append(table, INBOUND, words(&["-p", "tcp", "-j", TPROXY]));
                } else {
                    self.append(table, INBOUND, words(&["-p", "tcp", "-j", IN_REDIRECT]));
                }
            }
            InboundPorts::List(ports) => {
                for port in ports {
                    let port = port.to_string();
                    if tproxy {
                        let mut spec = words(&["-p", "tcp", "--dport", &port]);
                        spec.extend(words(&established));
                        self.append(table, INBOUND, spec);
                        self.append(
                            table,
                            INBOUND,
                            words(&["-p", "tcp", "--dport", &port, "-j", TPROXY]),
                        );
                    } else {
                        self.append(
                            table,
                            INBOUND,
                            words(&["-p", "tcp", "--dport", &port, "-j", IN_REDIRECT]),
                        );
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
            let port = port.to_string();
            for proto in ["tcp", "udp"] {
                self.append(
                    Table::Nat,
                    OUTPUT,
                    words(&["-p", proto, "--dport", &port, "-j", "RETURN"]),
                );
            }
        }
        // b: the proxy's inbound passthrough to the app.
        let passthrough = self.passthrough();
        self.append(
            Table::Nat,
            OUTPUT,
            words(&["-o", "lo", "-s", passthrough, "-j", "RETURN"]),
        );
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
                        words(&["-m", "owner", "--gid-owner", &g.token, "-j", "RETURN"]),
                    );
                }
            }
            OwnerGroups::Only(groups) => {
                let mut spec = Vec::new();
                for g in groups {
                    spec.extend(words(&["-m", "owner", "!", "--gid-owner", &g.token]));
                }
                spec.extend(words(&["-j", "RETURN"]));
                self.append(Table::Nat, OUTPUT, spec);
            }
        }
        // f: DNS to the agent's DNS proxy.
        if cfg.dns_effective_for(self.env, self.v6()) {
            self.dns_redirect();
        }
        // g: localhost.
        let loopback = self.loopback();
        self.append(
            Table::Nat,
            OUTPUT,
            words(&["-d", &loopback, "-j", "RETURN"]),
        );
        // h: -x.
        for cidr in self.of_family(&cfg.exclude_cidrs) {
            self.append(
                Table::Nat,
                OUTPUT,
                words(&["-d", &cidr.to_string(), "-j", "RETURN"]),
            );
        }
        // i: -q.
        for port in &cfg.outbound_ports {
            self.append(
                Table::Nat,
                OUTPUT,
                words(&["-p", "tcp", "--dport", &port.to_string(), "-j", REDIRECT]),
            );
        }
        // j: -i (and -k's redirects).
        self.outbound_includes();
    }

    /// c1–c3 for one proxy uid, or d1–d3 for one gid. `dns_in_redirect`: c1's DNS form; `dns`: c2's.
    fn proxy_owner(&mut self, owner: &Owner, match_flag: &str, dns_in_redirect: bool, dns: bool) {
        let loopback = self.loopback();
        let tunnel = self.cfg.inbound_tunnel_port.to_string();
        let id = owner.token.as_str();
        // c1: the proxy calling a local non-loopback address (its own pod IP) goes to the inbound port.
        let mut c1 = words(&["-o", "lo", "!", "-d", &loopback, "-p", "tcp"]);
        if dns_in_redirect {
            let ports = format!("{DNS_PORT},{tunnel}");
            c1.extend(words(&["-m", "multiport", "!", "--dports", &ports]));
        } else {
            c1.extend(words(&["!", "--dport", &tunnel]));
        }
        c1.extend(words(&["-m", "owner", match_flag, id, "-j", IN_REDIRECT]));
        self.append(Table::Nat, OUTPUT, c1);
        // c2: other local traffic of anyone else passes (not when -i lists a loopback CIDR).
        if !self.cfg.include_cidrs.has_loopback() {
            let mut c2 = words(&["-o", "lo"]);
            if dns {
                c2.extend(words(&["-p", "tcp", "!", "--dport", &DNS_PORT.to_string()]));
            }
            c2.extend(words(&["-m", "owner", "!", match_flag, id, "-j", "RETURN"]));
            self.append(Table::Nat, OUTPUT, c2);
        }
        // c3: the proxy's own traffic passes.
        self.append(
            Table::Nat,
            OUTPUT,
            words(&["-m", "owner", match_flag, id, "-j", "RETURN"]),
        );
    }

    /// f: `ISTIO_OUTPUT_DNS` in nat, sending port 53 to the DNS proxy.
    fn dns_redirect(&mut self) {
        self.append(Table::Nat, OUTPUT, words(&["-j", OUTPUT_DNS]));
        let (dns, proxy) = (DNS_PORT.to_string(), DNS_PROXY_PORT.to_string());
        // istio writes `--to-ports` for TCP and `--to-port` for UDP; both are the same option.
        let tcp = ["-p", "tcp", "--dport", &dns];
        let udp = ["-p", "udp", "--dport", &dns];
        if self.cfg.capture_all_dns {
            self.append(
                Table::Nat,
                OUTPUT_DNS,
                words(&[&tcp[..], &["-j", "REDIRECT", "--to-ports", &proxy]].concat()),
            );
            self.append(
                Table::Nat,
                OUTPUT_DNS,
                words(&[&udp[..], &["-j", "REDIRECT", "--to-port", &proxy]].concat()),
            );
        } else {
            let servers = self.servers();
            for s in &servers {
                self.append(
                    Table::Nat,
                    OUTPUT_DNS,
                    words(&[&tcp[..], &["-d", s, "-j", "REDIRECT", "--to-ports", &proxy]].concat()),
                );
            }
            for s in &servers {
                self.append(
                    Table::Nat,
                    OUTPUT_DNS,
                    words(&[&udp[..], &["-d", s, "-j", "REDIRECT", "--to-port", &proxy]].concat()),
                );
            }
        }
    }

    /// j: `-i` includes; `-k` interfaces get the same redirects in PREROUTING, inserted on top.
    fn outbound_includes(&mut self) {
        let cfg = self.cfg;
        match &cfg.include_cidrs {
            IncludeCidrs::All => {
                self.append(Table::Nat, OUTPUT, words(&["-j", REDIRECT]));
                for iface in &cfg.kube_virt_interfaces {
                    self.insert(
                        Table::Nat,
                        "PREROUTING",
                        1,
                        words(&["-i", iface, "-j", REDIRECT]),
                    );
                }
            }
            IncludeCidrs::List(cidrs) => {
                for cidr in self.of_family(cidrs) {
                    let cidr = cidr.to_string();
                    for iface in &cfg.kube_virt_interfaces {
                        self.insert(
                            Table::Nat,
                            "PREROUTING",
                            1,
                            words(&["-i", iface, "-d", &cidr, "-j", REDIRECT]),
                        );
                    }
                    self.append(Table::Nat, OUTPUT, words(&["-d", &cidr, "-j", REDIRECT]));
                }
            }
        }
    }

    /// The raw table's conntrack zones for DNS (REFERENCE §3.7).
    fn dns_conntrack_zones(&mut self) {
        let cfg = self.cfg;
        let (dns, proxy) = (DNS_PORT.to_string(), DNS_PROXY_PORT.to_string());
        self.append(Table::Raw, "OUTPUT", words(&["-j", OUTPUT_DNS]));
        let owners = cfg
            .proxy_uids
            .iter()
            .map(|o| ("--uid-owner", o))
            .chain(cfg.proxy_gids.iter().map(|o| ("--gid-owner", o)));
        for (flag, owner) in owners {
            let id = owner.token.as_str();
            self.append(
                Table::Raw,
                OUTPUT_DNS,
                words(&[
                    "-p",
                    "udp",
                    "--dport",
                    &dns,
                    "-m",
                    "owner",
                    flag,
                    id,
                    "-j",
                    "CT",
                    "--zone",
                    ZONE_UPSTREAM,
                ]),
            );
            self.append(
                Table::Raw,
                OUTPUT_DNS,
                words(&[
                    "-p",
                    "udp",
                    "--sport",
                    &proxy,
                    "-m",
                    "owner",
                    flag,
                    id,
                    "-j",
                    "CT",
                    "--zone",
                    ZONE_CLIENT,
                ]),
            );
        }
        let servers = self.servers();
        if cfg.capture_all_dns {
            self.append(Table::Raw, "PREROUTING", words(&["-j", INBOUND]));
            self.append(
                Table::Raw,
                OUTPUT_DNS,
                words(&[
                    "-p",
                    "udp",
                    "--dport",
                    &dns,
                    "-j",
                    "CT",
                    "--zone",
                    ZONE_CLIENT,
                ]),
            );
            self.append(
                Table::Raw,
                INBOUND,
                words(&[
                    "-p",
                    "udp",
                    "--sport",
                    &dns,
                    "-j",
                    "CT",
                    "--zone",
                    ZONE_UPSTREAM,
                ]),
            );
        } else if !servers.is_empty() {
            self.append(Table::Raw, "PREROUTING", words(&["-j", INBOUND]));
            for s in &servers {
                self.append(
                    Table::Raw,
                    OUTPUT_DNS,
                    words(&[
                        "-p",
                        "udp",
                        "--dport",
                        &dns,
                        "-d",
                        s,
                        "-j",
                        "CT",
                        "--zone",
                        ZONE_CLIENT,
                    ]),
                );
                self.append(
                    Table::Raw,
                    INBOUND,
                    words(&[
                        "-p",
                        "udp",
                        "--sport",
                        &dns,
                        "-s",
                        s,
                        "-j",
                        "CT",
                        "--zone",
                        ZONE_UPSTREAM,
                    ]),
                );
            }
        }
    }

    /// TPROXY mode's marks (REFERENCE §3.6): replies of diverted connections follow the mark's routing
    /// table, and the proxy's own packets to local non-loopback addresses are marked so that inbound
    /// capture takes them back.
    fn tproxy_marks(&mut self) {
        let cfg = self.cfg;
        let mark = cfg.tproxy_mark.to_string();
        let outbound_mark = TPROXY_OUTBOUND_MARK.to_string();
        let loopback = self.loopback();
        self.append(
            Table::Mangle,
            "PREROUTING",
            words(&[
                "-p",
                "tcp",
                "-m",
                "mark",
                "--mark",
                &mark,
                "-j",
                "CONNMARK",
                "--save-mark",
            ]),
        );
        self.append(
            Table::Mangle,
            "OUTPUT",
            words(&[
                "-p", "tcp", "-o", "lo", "-m", "mark", "--mark", &mark, "-j", "RETURN",
            ]),
        );
        let owners = cfg
            .proxy_uids
            .iter()
            .map(|o| ("--uid-owner", o))
            .chain(cfg.proxy_gids.iter().map(|o| ("--gid-owner", o)));
        let marks: Vec<Vec<String>> = owners
            .map(|(flag, o)| {
                words(&[
                    "!",
                    "-d",
                    &loopback,
                    "-p",
                    "tcp",
                    "-o",
                    "lo",
                    "-m",
                    "owner",
                    flag,
                    &o.token,
                    "-j",
                    "MARK",
                    "--set-mark",
                    &outbound_mark,
                ])
            })
            .collect();
        for spec in marks {
            self.append(Table::Mangle, "OUTPUT", spec);
        }
        self.append(
            Table::Mangle,
            "OUTPUT",
            words(&[
                "-p",
                "tcp",
                "-m",
                "connmark",
                "--mark",
                &mark,
                "-j",
                "CONNMARK",
                "--restore-mark",
            ]),
        );
        let passthrough = self.passthrough();
        self.insert(
            Table::Mangle,
            INBOUND,
            1,
            words(&["-p", "tcp", "-m", "mark", "--mark", &mark, "-j", "RETURN"]),
        );
        self.insert(
            Table::Mangle,
            INBOUND,
            2,
            words(&["-p", "tcp", "-s", passthrough, "-i", "lo", "-j", "RETURN"]),
        );
        self.insert(
            Table::Mangle,
            INBOUND,
            3,
            words(&[
                "-p",
                "tcp",
                "-i",
                "lo",
                "-m",
                "mark",
                "!",
                "--mark",
                &outbound_mark,
                "-j",
                "RETURN",
            ]),
        );
    }
}
