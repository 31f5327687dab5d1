//! Renders a validated [`Config`] into the iptables-restore documents istio-iptables writes: the same rules,
//! word for word, in the same order.
//!
//! Why the order matters as much as the rules: the documents must be byte-identical to istio's (our
//! iptables backend is the drop-in baseline the eBPF backend is compared with), and iptables evaluates a
//! chain top to bottom, so several of istio's quirks (`docs/istio-rules.md#interactions-and-gotchas`: the
//! multi-uid ordering, `-x` before `-i`, `-o` before everything) live only in the order.
//!
//! Rules are built per family in istio's *build* order
//! (`docs/istio-rules.md#serialisation-one-restore-transaction`). A document then groups them by table;
//! within a table the build order is kept, and `-I CHAIN n` rules take effect where they appear.
//! The letters in the comments (a, b, c1 …) name the rules of the `ISTIO_OUTPUT` template in
//! `docs/istio-rules.md#rule-template` (each step explained in `docs/istio-rules.md#outbound-decision`).
//! `tests/golden.rs` proves the result against all 27 of Istio's golden files.

use ipnet::IpNet;

use crate::{
    config::{
        Config, DNS_PORT, DNS_PROXY_PORT, InboundPorts, IncludeCidrs, InterceptionMode, Owner, OwnerGroups,
        TPROXY_OUTBOUND_MARK,
    },
    namespace::Environment,
};

// ---- Names --------------------------------------------------------------------------------------------

// istio's chains. The names are part of the interface: cleanup (ours and istio's) finds them by name.
const ISTIO_INBOUND: &str = "ISTIO_INBOUND";
const ISTIO_REDIRECT: &str = "ISTIO_REDIRECT";
const ISTIO_IN_REDIRECT: &str = "ISTIO_IN_REDIRECT";
const ISTIO_OUTPUT: &str = "ISTIO_OUTPUT";
const ISTIO_OUTPUT_DNS: &str = "ISTIO_OUTPUT_DNS";
const ISTIO_DIVERT: &str = "ISTIO_DIVERT";
const ISTIO_TPROXY: &str = "ISTIO_TPROXY";
const ISTIO_DROP: &str = "ISTIO_DROP";

// The kernel's chains we add rules to.
const PREROUTING: &str = "PREROUTING";
const OUTPUT: &str = "OUTPUT";
/// Every built-in chain: these exist already and are never declared with `-N`.
const BUILTIN_CHAINS: [&str; 5] = [PREROUTING, "INPUT", "FORWARD", OUTPUT, "POSTROUTING"];

/// Targets after `-j` that are verdicts or extensions, not chains (so never declared with `-N`).
const NON_CHAIN_TARGETS: [&str; 9] = [
    "ACCEPT", "DROP", "RETURN", "REJECT", "REDIRECT", "TPROXY", "MARK", "CONNMARK", "CT",
];

// ---- Addresses ----------------------------------------------------------------------------------------

/// The loopback interface: `-o lo` means "routed to a local address", `-i lo` "looped back from here".
const LOOPBACK_IFACE: &str = "lo";
/// IPv6 "localhost" (`LOOP6`); IPv4's is configurable ([`Config::loopback_cidr_v4`]).
const LOOPBACK_V6: &str = "::1/128";
/// The source the proxy binds for inbound passthrough connections to the app (`PASSTHRU4/6`).
const PASSTHROUGH_V4: &str = "127.0.0.6/32";
/// See [`PASSTHROUGH_V4`].
const PASSTHROUGH_V6: &str = "::6/128";
/// Prefix lengths istio appends to a nameserver's text to make it a single-host CIDR.
const HOST_PREFIX_V4: &str = "/32";
/// See [`HOST_PREFIX_V4`].
const HOST_PREFIX_V6: &str = "/128";

// ---- Marks and zones ----------------------------------------------------------------------------------

/// The mask istio gives `--tproxy-mark`: the whole mark is compared.
const TPROXY_MARK_MASK: &str = "0xffffffff";
/// Conntrack zone of the proxy ↔ upstream-server leg of a DNS exchange (`docs/istio-rules.md#dns`). Two zones
/// keep the cached UDP NAT of one leg from being applied to the other.
const ZONE_UPSTREAM: u16 = 1;
/// Conntrack zone of the app ↔ DNS-proxy leg.
const ZONE_CLIENT: u16 = 2;
/// The position of a rule inserted at the top of a chain.
const TOP: u32 = 1;

/// Builds a rule spec (a word vector). A string literal is iptables text and is split at white space, so
/// a rule reads like the line it becomes; any other argument is one value (a port, CIDR, uid, interface)
/// and is always exactly one word, whatever it contains; `..iter` splices words in.
macro_rules! spec {
    (@push $words:ident;) => {};
    (@push $words:ident; .. $splice:expr $(, $($rest:tt)*)?) => {
        $words.extend($splice);
        spec!(@push $words; $($($rest)*)?);
    };
    (@push $words:ident; $text:literal $(, $($rest:tt)*)?) => {
        $words.extend(ToString::to_string(&$text).split_whitespace().map(String::from));
        spec!(@push $words; $($($rest)*)?);
    };
    (@push $words:ident; $value:expr $(, $($rest:tt)*)?) => {
        $words.push($value.to_string());
        spec!(@push $words; $($($rest)*)?);
    };
    ($($part:tt)*) => {{
        let mut words: Vec<String> = Vec::new();
        spec!(@push words; $($part)*);
        words
    }};
}

// ---- Public types -------------------------------------------------------------------------------------

/// An address family: one iptables-restore document each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// iptables.
    V4,
    /// ip6tables.
    V6,
}

impl Family {
    /// Whether this is IPv6.
    pub fn is_v6(self) -> bool {
        self == Family::V6
    }
}

/// The tables istio-iptables writes to. The derived order is alphabetical, which is the order istio emits
/// them in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Table {
    /// TPROXY inbound capture and `--drop-invalid`.
    Mangle,
    /// REDIRECT capture, inbound and outbound.
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

/// One rule: `-A CHAIN spec…` or `-I CHAIN n spec…`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Its table.
    pub table: Table,
    /// Its chain.
    pub chain: String,
    /// `Some(n)`: inserted at position n (1-based) instead of appended.
    pub insert_at: Option<u32>,
    /// The words after the chain (and position).
    pub spec: Vec<String>,
}

impl Rule {
    /// Whether the rule lives in a kernel chain (which is never flushed or deleted, so such rules must be
    /// removed one by one).
    pub fn is_builtin_chain(&self) -> bool {
        BUILTIN_CHAINS.contains(&self.chain.as_str())
    }

    /// The target: the word after `-j`.
    pub fn jump_target(&self) -> Option<&str> {
        let at = self.spec.iter().position(|w| w == "-j")?;
        self.spec.get(at + 1).map(String::as_str)
    }

    /// The rule as an iptables-restore line.
    fn restore_line(&self) -> String {
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
    /// The iptables-restore `--noflush` input: per table, in alphabetical order, `* table`, then `-N X` for
    /// every non-builtin chain that has a rule or is a jump target, then the rules in build order
    /// (`-A …`/`-I … n …`), then `COMMIT`. Lines end with `\n`.
    pub fn restore_document(&self) -> String {
        let mut tables: Vec<Table> = self.rules.iter().map(|r| r.table).collect();
        tables.sort();
        tables.dedup();
        let mut lines: Vec<String> = Vec::new();
        for table in tables {
            let rules: Vec<&Rule> = self.rules.iter().filter(|r| r.table == table).collect();
            lines.push(format!("* {}", table.name()));
            lines.extend(declared_chains(&rules).into_iter().map(|chain| format!("-N {chain}")));
            lines.extend(rules.iter().map(|r| r.restore_line()));
            lines.push("COMMIT".to_owned());
        }
        lines.iter().map(|l| format!("{l}\n")).collect()
    }
}

/// The chains of one table to declare, in istio's order: those that have rules, by their first rule, then
/// those only jumped to, by their first jump. (With istio's rules this is also the order of first
/// appearance.)
fn declared_chains<'r>(rules: &[&'r Rule]) -> Vec<&'r str> {
    let is_chain = |name: &str| !BUILTIN_CHAINS.contains(&name) && !NON_CHAIN_TARGETS.contains(&name);
    let owners = rules.iter().map(|r| r.chain.as_str());
    let targets = rules.iter().filter_map(|r| r.jump_target());
    let mut chains: Vec<&str> = Vec::new();
    for name in owners.chain(targets) {
        if is_chain(name) && !chains.contains(&name) {
            chains.push(name);
        }
    }
    chains
}

/// The rulesets istio-iptables writes: IPv4 always, IPv6 as well when the environment enables it.
pub fn render(cfg: &Config, env: &Environment) -> Vec<Ruleset> {
    let families: &[Family] = if env.ipv6 {
        &[Family::V4, Family::V6]
    } else {
        &[Family::V4]
    };
    families
        .iter()
        .map(|&family| FamilyRules::new(cfg, env, family).build())
        .collect()
}

// ---- Building ---------------------------------------------------------------------------------------------

/// Which owner match a proxy identity uses.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OwnerKind {
    /// `-u`.
    Uid,
    /// `-g`.
    Gid,
}

impl OwnerKind {
    fn option(self) -> &'static str {
        match self {
            OwnerKind::Uid => "--uid-owner",
            OwnerKind::Gid => "--gid-owner",
        }
    }
}

/// Builds one family's rules in istio's build order.
struct FamilyRules<'a> {
    cfg: &'a Config,
    env: &'a Environment,
    family: Family,
    rules: Vec<Rule>,
}

impl<'a> FamilyRules<'a> {
    fn new(cfg: &'a Config, env: &'a Environment, family: Family) -> Self {
        FamilyRules {
            cfg,
            env,
            family,
            rules: Vec::new(),
        }
    }

    /// Every block, in the order istio builds it (which is the order its documents show).
    fn build(mut self) -> Ruleset {
        self.exclude_interfaces();
        self.kube_virt_returns();
        self.drop_invalid();
        self.common_chains();
        self.inbound();
        self.outbound();
        self.tproxy_marks();
        Ruleset {
            family: self.family,
            rules: self.rules,
        }
    }

    // ---- Helpers ----

    fn append(&mut self, table: Table, chain: &str, spec: Vec<String>) {
        self.push(table, chain, None, spec);
    }

    fn insert(&mut self, table: Table, chain: &str, position: u32, spec: Vec<String>) {
        self.push(table, chain, Some(position), spec);
    }

    fn push(&mut self, table: Table, chain: &str, insert_at: Option<u32>, spec: Vec<String>) {
        // The backend passes specs to `iptables -C` word by word, so a word must be one iptables argument.
        // Validated input guarantees it; this catches a rule written with several words in one value.
        debug_assert!(
            spec.iter().all(|w| !w.is_empty() && !w.contains(char::is_whitespace)),
            "not one word each: {spec:?}"
        );
        self.rules.push(Rule {
            table,
            chain: chain.to_owned(),
            insert_at,
            spec,
        });
    }

    /// Appends to nat `ISTIO_OUTPUT`, where most rules go.
    fn output(&mut self, spec: Vec<String>) {
        self.append(Table::Nat, ISTIO_OUTPUT, spec);
    }

    fn tproxy(&self) -> bool {
        self.cfg.mode == InterceptionMode::Tproxy
    }

    /// "localhost" of this family (`LOOP4`/`LOOP6`).
    fn loopback(&self) -> String {
        match self.family {
            Family::V4 => self.cfg.loopback_cidr_v4.to_string(),
            Family::V6 => LOOPBACK_V6.to_owned(),
        }
    }

    /// The proxy's inbound-passthrough source (`PASSTHRU4/6`).
    fn passthrough(&self) -> &'static str {
        match self.family {
            Family::V4 => PASSTHROUGH_V4,
            Family::V6 => PASSTHROUGH_V6,
        }
    }

    /// The CIDRs of this family in a `-i`/`-x` list (istio splits both lists by family).
    fn of_family<'c>(&self, cidrs: &'c [IpNet]) -> impl Iterator<Item = &'c IpNet> + use<'c> {
        let v6 = self.family.is_v6();
        cidrs.iter().filter(move |c| matches!(c, IpNet::V6(_)) == v6)
    }

    /// The proxy's identities: every uid, then every gid, in flag order.
    fn proxy_owners(&self) -> Vec<(OwnerKind, &'a Owner)> {
        let uids = self.cfg.proxy_uids.iter().map(|o| (OwnerKind::Uid, o));
        uids.chain(self.cfg.proxy_gids.iter().map(|o| (OwnerKind::Gid, o)))
            .collect()
    }

    /// Where DNS is captured in this family, as the address match of each rule: one empty match with
    /// `--capture-all-dns`, else `(flag, S/32|S/128)` per resolv.conf server of this family (its text as
    /// written, so `::127.0.0.53` stays `::127.0.0.53`).
    fn dns_servers(&self, flag: &'static str) -> Vec<Vec<String>> {
        if self.cfg.capture_all_dns {
            return vec![Vec::new()];
        }
        let prefix = if self.family.is_v6() {
            HOST_PREFIX_V6
        } else {
            HOST_PREFIX_V4
        };
        self.env
            .nameservers(self.family.is_v6())
            .map(|server| spec! {flag, format!("{}{prefix}", server.text)})
            .collect()
    }

    // ---- Blocks, in build order ----

    /// `-c`: nothing arriving on or leaving by these interfaces is captured. nat for every interface, then
    /// mangle in TPROXY mode (where inbound capture happens there).
    fn exclude_interfaces(&mut self) {
        let tables: &[Table] = if self.tproxy() {
            &[Table::Nat, Table::Mangle]
        } else {
            &[Table::Nat]
        };
        for &table in tables {
            for iface in &self.cfg.exclude_interfaces {
                self.append(table, PREROUTING, spec! {"-i", iface, "-j RETURN"});
                self.append(table, OUTPUT, spec! {"-o", iface, "-j RETURN"});
            }
        }
    }

    /// `-k`: traffic arriving on these interfaces (a KubeVirt VM, say) is not inbound traffic. Inserted at
    /// the top of nat PREROUTING; the redirects that treat it as outbound are inserted above these later,
    /// with the `-i` rules ([`Self::include_cidrs`]).
    fn kube_virt_returns(&mut self) {
        for iface in &self.cfg.kube_virt_interfaces {
            self.insert(Table::Nat, PREROUTING, TOP, spec! {"-i", iface, "-j RETURN"});
        }
    }

    /// `--drop-invalid`: drop conntrack-INVALID packets (out-of-window segments that would skip DNAT and
    /// reach the app unrewritten, which answers with a reset).
    fn drop_invalid(&mut self) {
        if self.cfg.drop_invalid {
            let rule = spec! {"-m conntrack --ctstate INVALID -j", ISTIO_DROP};
            self.append(Table::Mangle, PREROUTING, rule);
            self.append(Table::Mangle, ISTIO_DROP, spec! {"-j DROP"});
        }
    }

    /// The chains every configuration has: the tunnel port is never captured inbound (nat), and the two
    /// REDIRECT chains that all TCP capture jumps to.
    fn common_chains(&mut self) {
        let cfg = self.cfg;
        let rule = spec! {"-p tcp --dport", cfg.inbound_tunnel_port, "-j RETURN"};
        self.append(Table::Nat, ISTIO_INBOUND, rule);
        let rule = spec! {"-p tcp -j REDIRECT --to-ports", cfg.proxy_port};
        self.append(Table::Nat, ISTIO_REDIRECT, rule);
        let rule = spec! {"-p tcp -j REDIRECT --to-ports", cfg.inbound_capture_port};
        self.append(Table::Nat, ISTIO_IN_REDIRECT, rule);
    }

    /// `-b`/`-d`: inbound capture, by nat REDIRECT to the inbound port or (TPROXY mode) by mangle TPROXY.
    /// With `-b ""` nothing at all: no jump into `ISTIO_INBOUND`.
    fn inbound(&mut self) {
        let cfg = self.cfg;
        if cfg.inbound_ports == InboundPorts::None {
            return;
        }
        let table = if self.tproxy() {
            self.tproxy_chains();
            Table::Mangle
        } else {
            Table::Nat
        };
        // Only TCP is ever captured inbound.
        self.append(table, PREROUTING, spec! {"-p tcp -j", ISTIO_INBOUND});
        match &cfg.inbound_ports {
            InboundPorts::None => {}
            InboundPorts::All => {
                // `-d` is honoured only with `-b *`.
                for port in &cfg.inbound_exclude_ports {
                    self.append(table, ISTIO_INBOUND, spec! {"-p tcp --dport", port, "-j RETURN"});
                }
                self.capture_inbound(table, &[]);
            }
            InboundPorts::List(ports) => {
                for port in ports {
                    self.capture_inbound(table, &spec! {"--dport", port});
                }
            }
        }
    }

    /// The capture rules of `ISTIO_INBOUND` for TCP matching `port_match` (nothing: every port).
    fn capture_inbound(&mut self, table: Table, port_match: &[String]) {
        let tcp = spec! {"-p tcp", ..port_match.iter().cloned()};
        if self.tproxy() {
            // Packets of connections already diverted are routed locally again; new ones are TPROXYed.
            let established = spec! {..tcp.clone(), "-m conntrack --ctstate RELATED,ESTABLISHED -j", ISTIO_DIVERT};
            self.append(table, ISTIO_INBOUND, established);
            self.append(table, ISTIO_INBOUND, spec! {..tcp, "-j", ISTIO_TPROXY});
        } else {
            self.append(table, ISTIO_INBOUND, spec! {..tcp, "-j", ISTIO_IN_REDIRECT});
        }
    }

    /// TPROXY mode's two mangle chains (built only when something is captured inbound): `ISTIO_DIVERT`
    /// marks a packet so that the mark's routing table delivers it locally; `ISTIO_TPROXY` hands a new
    /// connection to the inbound port without rewriting its destination.
    fn tproxy_chains(&mut self) {
        let (mark, port, loopback) = (self.cfg.tproxy_mark, self.cfg.inbound_capture_port, self.loopback());
        self.append(Table::Mangle, ISTIO_DIVERT, spec! {"-j MARK --set-mark", mark});
        self.append(Table::Mangle, ISTIO_DIVERT, spec! {"-j ACCEPT"});
        let marked = format!("{mark}/{TPROXY_MARK_MASK}");
        let rule = spec! {"! -d", loopback, "-p tcp -j TPROXY --tproxy-mark", marked, "--on-port", port};
        self.append(Table::Mangle, ISTIO_TPROXY, rule);
    }

    /// Outbound capture: nat OUTPUT jumps (all protocols) to `ISTIO_OUTPUT`, whose rules a–j follow in
    /// the order of `docs/istio-rules.md#rule-template`; the first match decides.
    fn outbound(&mut self) {
        self.append(Table::Nat, OUTPUT, spec! {"-j", ISTIO_OUTPUT});
        self.outbound_port_excludes();
        self.passthrough_return();
        let dns = self.env.dns_effective(self.cfg);
        for (kind, owner) in self.proxy_owners() {
            self.proxy_owner(kind, owner, dns);
        }
        self.owner_groups();
        if dns {
            self.dns_redirect();
            self.dns_conntrack_zones();
        }
        self.localhost_return();
        self.exclude_cidrs();
        self.outbound_port_includes();
        self.include_cidrs();
    }

    /// a: `-o` ports are never captured, TCP or UDP; first, so they win over everything (DNS included).
    fn outbound_port_excludes(&mut self) {
        for port in &self.cfg.outbound_exclude_ports {
            self.output(spec! {"-p tcp --dport", port, "-j RETURN"});
            self.output(spec! {"-p udp --dport", port, "-j RETURN"});
        }
    }

    /// b: the proxy's inbound passthrough connections to the app (bound to 127.0.0.6 / ::6) pass.
    fn passthrough_return(&mut self) {
        let source = self.passthrough();
        self.output(spec! {"-o", LOOPBACK_IFACE, "-s", source, "-j RETURN"});
    }

    /// c1–c3 for one proxy uid, or d1–d3 for one gid. They come as a triplet per identity, so with two
    /// uids the first uid's c2 already decides for the second's local traffic
    /// (`docs/istio-rules.md#interactions-and-gotchas`).
    /// `dns`: DNS capture is effective in *either* family.
    fn proxy_owner(&mut self, kind: OwnerKind, owner: &Owner, dns: bool) {
        let (option, id) = (kind.option(), &owner.token);
        let (loopback, tunnel) = (self.loopback(), self.cfg.inbound_tunnel_port);
        // c1/d1: the proxy calling a local address outside the loopback CIDR (the pod's own IP, after an
        // app called itself through a service) goes to the inbound listener, except the tunnel port. With
        // DNS on, the uid form also spares port 53, so that the agent's queries to a resolver at a local
        // address go to that resolver and not to the inbound listener; istio gives the gid form (d1) no
        // such exception, and neither do we.
        let ports = if dns && kind == OwnerKind::Uid {
            spec! {"-m multiport ! --dports", format!("{DNS_PORT},{tunnel}")}
        } else {
            spec! {"! --dport", tunnel}
        };
        let lo = LOOPBACK_IFACE;
        let matches = spec! {"-o", lo, "! -d", loopback, "-p tcp", ..ports, "-m owner", option, id};
        self.output(spec! {..matches, "-j", ISTIO_IN_REDIRECT});
        // c2/d2: anyone else's traffic to a local address passes; with DNS on, only TCP to ports other
        // than 53 (a resolver on localhost is still captured, and UDP of any port goes on down the chain).
        // Left out when `-i` lists a loopback CIDR, so that such traffic can reach the include rule.
        if !self.cfg.include_cidrs.has_loopback() {
            let not_dns = if dns {
                spec! {"-p tcp ! --dport", DNS_PORT}
            } else {
                Vec::new()
            };
            self.output(spec! {"-o", lo, ..not_dns, "-m owner !", option, id, "-j RETURN"});
        }
        // c3/d3: the rest of the proxy's own traffic passes (any protocol, any destination).
        self.output(spec! {"-m owner", option, id, "-j RETURN"});
    }

    /// e: `ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]`: sockets of other groups pass, before DNS and the includes.
    fn owner_groups(&mut self) {
        match &self.cfg.owner_groups {
            OwnerGroups::AllExcept(groups) => {
                for group in groups {
                    self.output(spec! {"-m owner --gid-owner", group.token, "-j RETURN"});
                }
            }
            OwnerGroups::Only(groups) => {
                // One rule: a socket passes when its gid is none of the listed groups.
                let none_of = groups.iter().flat_map(|g| spec! {"-m owner ! --gid-owner", g.token});
                self.output(spec! {..none_of, "-j RETURN"});
            }
        }
    }

    /// f: DNS (TCP and UDP port 53) to the agent's DNS proxy, in this family only if it has servers (or
    /// with `--capture-all-dns`). Before the localhost and `-x` RETURNs, so a resolver on 127.0.0.53 or in
    /// an excluded range is still captured. istio spells the same option `--to-ports` in the TCP rules
    /// and `--to-port` in the UDP ones, and writes every TCP rule before the UDP ones.
    fn dns_redirect(&mut self) {
        if !self.env.dns_effective_for(self.cfg, self.family.is_v6()) {
            return;
        }
        self.output(spec! {"-j", ISTIO_OUTPUT_DNS});
        let servers = self.dns_servers("-d");
        for to in &servers {
            let rule = spec! {"-p tcp --dport", DNS_PORT, ..to.clone(), "-j REDIRECT --to-ports", DNS_PROXY_PORT};
            self.append(Table::Nat, ISTIO_OUTPUT_DNS, rule);
        }
        for to in &servers {
            let rule = spec! {"-p udp --dport", DNS_PORT, ..to.clone(), "-j REDIRECT --to-port", DNS_PROXY_PORT};
            self.append(Table::Nat, ISTIO_OUTPUT_DNS, rule);
        }
    }

    /// The raw table's DNS conntrack zones (`docs/istio-rules.md#dns`): the proxy's queries upstream and the
    /// servers' replies in [`ZONE_UPSTREAM`], the apps' queries and the DNS proxy's answers in
    /// [`ZONE_CLIENT`]. The proxy rules come in both families as soon as DNS is effective in either; the
    /// server rules (and the PREROUTING jump) only where this family has servers or all DNS is captured.
    fn dns_conntrack_zones(&mut self) {
        self.append(Table::Raw, OUTPUT, spec! {"-j", ISTIO_OUTPUT_DNS});
        for (kind, owner) in self.proxy_owners() {
            let (option, id) = (kind.option(), &owner.token);
            let upstream = spec! {"-p udp --dport", DNS_PORT, "-m owner", option, id, "-j CT --zone", ZONE_UPSTREAM};
            self.append(Table::Raw, ISTIO_OUTPUT_DNS, upstream);
            let answers = spec! {"-p udp --sport", DNS_PROXY_PORT, "-m owner", option, id, "-j CT --zone", ZONE_CLIENT};
            self.append(Table::Raw, ISTIO_OUTPUT_DNS, answers);
        }
        let (queries, replies) = (self.dns_servers("-d"), self.dns_servers("-s"));
        if queries.is_empty() {
            return;
        }
        self.append(Table::Raw, PREROUTING, spec! {"-j", ISTIO_INBOUND});
        for (to, from) in queries.into_iter().zip(replies) {
            let query = spec! {"-p udp --dport", DNS_PORT, ..to, "-j CT --zone", ZONE_CLIENT};
            self.append(Table::Raw, ISTIO_OUTPUT_DNS, query);
            let reply = spec! {"-p udp --sport", DNS_PORT, ..from, "-j CT --zone", ZONE_UPSTREAM};
            self.append(Table::Raw, ISTIO_INBOUND, reply);
        }
    }

    /// g: traffic to localhost passes.
    fn localhost_return(&mut self) {
        let loopback = self.loopback();
        self.output(spec! {"-d", loopback, "-j RETURN"});
    }

    /// h: `-x` ranges of this family pass (before `-q` and `-i`, so exclusion wins over inclusion).
    fn exclude_cidrs(&mut self) {
        let excluded: Vec<&IpNet> = self.of_family(&self.cfg.exclude_cidrs).collect();
        for cidr in excluded {
            self.output(spec! {"-d", cidr, "-j RETURN"});
        }
    }

    /// i: `-q` TCP ports are captured to any destination not excluded above.
    fn outbound_port_includes(&mut self) {
        for port in &self.cfg.outbound_ports {
            self.output(spec! {"-p tcp --dport", port, "-j", ISTIO_REDIRECT});
        }
    }

    /// j: `-i` destinations are captured (`*`: every destination). `-k` interfaces get the same redirects
    /// inserted at the top of nat PREROUTING, above their RETURNs, so their traffic is captured as
    /// outbound; istio does not consult `-x` for them.
    fn include_cidrs(&mut self) {
        let cfg = self.cfg;
        match &cfg.include_cidrs {
            IncludeCidrs::All => {
                self.output(spec! {"-j", ISTIO_REDIRECT});
                for iface in &cfg.kube_virt_interfaces {
                    self.insert(Table::Nat, PREROUTING, TOP, spec! {"-i", iface, "-j", ISTIO_REDIRECT});
                }
            }
            IncludeCidrs::List(cidrs) => {
                for cidr in self.of_family(cidrs) {
                    for iface in &cfg.kube_virt_interfaces {
                        let rule = spec! {"-i", iface, "-d", cidr, "-j", ISTIO_REDIRECT};
                        self.insert(Table::Nat, PREROUTING, TOP, rule);
                    }
                    self.output(spec! {"-d", cidr, "-j", ISTIO_REDIRECT});
                }
            }
        }
    }

    /// TPROXY mode's marks (`docs/istio-rules.md#inbound-in-tproxy-mode`), built even with `-b ""`: the divert
    /// mark is saved on the connection and restored onto its reply packets (so they follow the mark's routing
    /// table); the proxy's own packets to local addresses outside the loopback CIDR get
    /// [`TPROXY_OUTBOUND_MARK`] so that inbound capture takes them back; and three rules inserted at the top
    /// of mangle `ISTIO_INBOUND` let pass what is already diverted, the proxy's passthrough, and every other
    /// looped-back packet.
    fn tproxy_marks(&mut self) {
        if !self.tproxy() {
            return;
        }
        let (mark, loopback, lo) = (self.cfg.tproxy_mark, self.loopback(), LOOPBACK_IFACE);
        let save = spec! {"-p tcp -m mark --mark", mark, "-j CONNMARK --save-mark"};
        self.append(Table::Mangle, PREROUTING, save);
        let already_marked = spec! {"-p tcp -o", lo, "-m mark --mark", mark, "-j RETURN"};
        self.append(Table::Mangle, OUTPUT, already_marked);
        for (kind, owner) in self.proxy_owners() {
            let (option, id) = (kind.option(), &owner.token);
            let matches = spec! {"! -d", loopback, "-p tcp -o", lo, "-m owner", option, id};
            let rule = spec! {..matches, "-j MARK --set-mark", TPROXY_OUTBOUND_MARK};
            self.append(Table::Mangle, OUTPUT, rule);
        }
        let restore = spec! {"-p tcp -m connmark --mark", mark, "-j CONNMARK --restore-mark"};
        self.append(Table::Mangle, OUTPUT, restore);
        // Inserted at 1, 2 and 3, so they end up first, in this order, ahead of the capture rules.
        let passthrough = self.passthrough();
        let bypasses = [
            spec! {"-p tcp -m mark --mark", mark, "-j RETURN"},
            spec! {"-p tcp -s", passthrough, "-i", lo, "-j RETURN"},
            spec! {"-p tcp -i", lo, "-m mark ! --mark", TPROXY_OUTBOUND_MARK, "-j RETURN"},
        ];
        for (position, rule) in (TOP..).zip(bypasses) {
            self.insert(Table::Mangle, ISTIO_INBOUND, position, rule);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::namespace::Nameserver;

    fn cidrs(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|c| c.parse().expect("valid CIDR")).collect()
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|&n| n.to_owned()).collect()
    }

    fn v4_only() -> Environment {
        Environment::default()
    }

    fn dual_stack(nameservers: &[&str]) -> Environment {
        let nameservers = nameservers
            .iter()
            .map(|&text| Nameserver {
                addr: text.parse::<IpAddr>().expect("valid address"),
                text: text.to_owned(),
            })
            .collect();
        Environment {
            ipv6: true,
            nameservers,
            ..Environment::default()
        }
    }

    /// Every family's document, concatenated.
    fn documents(cfg: &Config, env: &Environment) -> String {
        render(cfg, env).iter().map(Ruleset::restore_document).collect()
    }

    /// One family's rules of one table and chain, as restore lines.
    fn chain(ruleset: &Ruleset, table: Table, chain: &str) -> Vec<String> {
        ruleset
            .rules
            .iter()
            .filter(|r| r.table == table && r.chain == chain)
            .map(Rule::restore_line)
            .collect()
    }

    /// One family's rules of one table, as restore lines.
    fn table(ruleset: &Ruleset, table: Table) -> Vec<String> {
        ruleset
            .rules
            .iter()
            .filter(|r| r.table == table)
            .map(Rule::restore_line)
            .collect()
    }

    /// The documents' lines, to compare against a hand-written list.
    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn injector_default_call_renders_reference_section_6() {
        // -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x '' -b '*' -d 15090,15021,15020
        // (`docs/istio-rules.md#rules-for-the-default-injected-call`).
        let cfg = Config {
            include_cidrs: IncludeCidrs::All,
            inbound_ports: InboundPorts::All,
            inbound_exclude_ports: vec![15090, 15021, 15020],
            ..Config::default()
        };
        let expected = "\
* nat
-N ISTIO_INBOUND
-N ISTIO_REDIRECT
-N ISTIO_IN_REDIRECT
-N ISTIO_OUTPUT
-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
-A ISTIO_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006
-A PREROUTING -p tcp -j ISTIO_INBOUND
-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15021 -j RETURN
-A ISTIO_INBOUND -p tcp --dport 15020 -j RETURN
-A ISTIO_INBOUND -p tcp -j ISTIO_IN_REDIRECT
-A OUTPUT -j ISTIO_OUTPUT
-A ISTIO_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT
-A ISTIO_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -m owner --gid-owner 1337 -j RETURN
-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN
-A ISTIO_OUTPUT -j ISTIO_REDIRECT
COMMIT
";
        assert_eq!(lines(&documents(&cfg, &v4_only())), lines(expected));
    }

    #[test]
    fn outbound_exclude_ports_are_the_first_rules_for_tcp_and_udp() {
        let cfg = Config {
            outbound_exclude_ports: vec![53, 8080],
            ..Config::default()
        };
        for ruleset in render(&cfg, &dual_stack(&[])) {
            let output = chain(&ruleset, Table::Nat, ISTIO_OUTPUT);
            assert_eq!(
                output[..4],
                [
                    "-A ISTIO_OUTPUT -p tcp --dport 53 -j RETURN",
                    "-A ISTIO_OUTPUT -p udp --dport 53 -j RETURN",
                    "-A ISTIO_OUTPUT -p tcp --dport 8080 -j RETURN",
                    "-A ISTIO_OUTPUT -p udp --dport 8080 -j RETURN",
                ],
                "{:?}",
                ruleset.family
            );
            assert!(
                output[4].starts_with("-A ISTIO_OUTPUT -o lo -s "),
                "b follows a: {}",
                output[4]
            );
        }
    }

    #[test]
    fn capture_all_dns_captures_any_destination_in_both_families() {
        let cfg = Config {
            redirect_dns: true,
            capture_all_dns: true,
            ..Config::default()
        };
        // With --capture-all-dns istio does not read resolv.conf; servers in the environment change nothing.
        let with_servers = documents(&cfg, &dual_stack(&["10.96.0.10", "fd00::10"]));
        assert_eq!(with_servers, documents(&cfg, &dual_stack(&[])));
        for ruleset in render(&cfg, &dual_stack(&[])) {
            let family = ruleset.family;
            let output = chain(&ruleset, Table::Nat, ISTIO_OUTPUT);
            assert!(
                output.contains(&"-A ISTIO_OUTPUT -j ISTIO_OUTPUT_DNS".to_owned()),
                "{family:?}"
            );
            assert!(output[1].contains("-m multiport ! --dports 53,15008 -m owner --uid-owner 1337"));
            assert!(output[2].contains("-o lo -p tcp ! --dport 53 -m owner ! --uid-owner 1337"));
            assert!(
                output[4].contains("-p tcp ! --dport 15008 -m owner --gid-owner 1337"),
                "d1 spares no DNS"
            );
            assert_eq!(
                chain(&ruleset, Table::Nat, ISTIO_OUTPUT_DNS),
                [
                    "-A ISTIO_OUTPUT_DNS -p tcp --dport 53 -j REDIRECT --to-ports 15053",
                    "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -j REDIRECT --to-port 15053",
                ],
                "{family:?}"
            );
            assert_eq!(
                table(&ruleset, Table::Raw),
                [
                    "-A OUTPUT -j ISTIO_OUTPUT_DNS",
                    "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --uid-owner 1337 -j CT --zone 1",
                    "-A ISTIO_OUTPUT_DNS -p udp --sport 15053 -m owner --uid-owner 1337 -j CT --zone 2",
                    "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -m owner --gid-owner 1337 -j CT --zone 1",
                    "-A ISTIO_OUTPUT_DNS -p udp --sport 15053 -m owner --gid-owner 1337 -j CT --zone 2",
                    "-A PREROUTING -j ISTIO_INBOUND",
                    "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -j CT --zone 2",
                    "-A ISTIO_INBOUND -p udp --sport 53 -j CT --zone 1",
                ],
                "{family:?}"
            );
        }
    }

    #[test]
    fn several_dns_servers_get_every_tcp_rule_before_the_udp_ones_and_zones_per_server() {
        let cfg = Config {
            redirect_dns: true,
            ..Config::default()
        };
        let env = Environment {
            nameservers: dual_stack(&["10.96.0.10", "10.96.0.11"]).nameservers,
            ..v4_only()
        };
        let v4 = &render(&cfg, &env)[0];
        assert_eq!(
            chain(v4, Table::Nat, ISTIO_OUTPUT_DNS),
            [
                "-A ISTIO_OUTPUT_DNS -p tcp --dport 53 -d 10.96.0.10/32 -j REDIRECT --to-ports 15053",
                "-A ISTIO_OUTPUT_DNS -p tcp --dport 53 -d 10.96.0.11/32 -j REDIRECT --to-ports 15053",
                "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 10.96.0.10/32 -j REDIRECT --to-port 15053",
                "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 10.96.0.11/32 -j REDIRECT --to-port 15053",
            ]
        );
        assert_eq!(
            table(v4, Table::Raw)[5..],
            [
                "-A PREROUTING -j ISTIO_INBOUND",
                "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 10.96.0.10/32 -j CT --zone 2",
                "-A ISTIO_INBOUND -p udp --sport 53 -s 10.96.0.10/32 -j CT --zone 1",
                "-A ISTIO_OUTPUT_DNS -p udp --dport 53 -d 10.96.0.11/32 -j CT --zone 2",
                "-A ISTIO_INBOUND -p udp --sport 53 -s 10.96.0.11/32 -j CT --zone 1",
            ]
        );
    }

    #[test]
    fn exclude_interfaces_come_before_kube_virt_inserts_in_build_order() {
        let cfg = Config {
            exclude_interfaces: names(&["ext0", "ext1"]),
            kube_virt_interfaces: names(&["vm0"]),
            include_cidrs: IncludeCidrs::All,
            ..Config::default()
        };
        let v4 = &render(&cfg, &v4_only())[0];
        let nat = table(v4, Table::Nat);
        assert_eq!(
            nat[..5],
            [
                "-A PREROUTING -i ext0 -j RETURN",
                "-A OUTPUT -o ext0 -j RETURN",
                "-A PREROUTING -i ext1 -j RETURN",
                "-A OUTPUT -o ext1 -j RETURN",
                "-I PREROUTING 1 -i vm0 -j RETURN",
            ]
        );
        assert_eq!(
            nat.last().map(String::as_str),
            Some("-I PREROUTING 1 -i vm0 -j ISTIO_REDIRECT")
        );
        assert!(
            table(v4, Table::Mangle).is_empty(),
            "-c touches mangle only in TPROXY mode"
        );
    }

    #[test]
    fn kube_virt_redirects_are_inserted_per_cidr_then_the_include_appended() {
        let cfg = Config {
            kube_virt_interfaces: names(&["vm0", "vm1"]),
            include_cidrs: IncludeCidrs::List(cidrs(&["10.0.0.0/8", "192.168.0.0/16"])),
            outbound_ports: vec![8443],
            ..Config::default()
        };
        let nat = table(&render(&cfg, &v4_only())[0], Table::Nat);
        assert_eq!(
            nat[nat.len() - 7..],
            [
                "-A ISTIO_OUTPUT -p tcp --dport 8443 -j ISTIO_REDIRECT",
                "-I PREROUTING 1 -i vm0 -d 10.0.0.0/8 -j ISTIO_REDIRECT",
                "-I PREROUTING 1 -i vm1 -d 10.0.0.0/8 -j ISTIO_REDIRECT",
                "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT",
                "-I PREROUTING 1 -i vm0 -d 192.168.0.0/16 -j ISTIO_REDIRECT",
                "-I PREROUTING 1 -i vm1 -d 192.168.0.0/16 -j ISTIO_REDIRECT",
                "-A ISTIO_OUTPUT -d 192.168.0.0/16 -j ISTIO_REDIRECT",
            ]
        );
    }

    #[test]
    fn cidr_lists_split_by_family_and_print_unmasked() {
        let cfg = Config {
            exclude_cidrs: cidrs(&["10.1.2.3/8", "fd00::1/8"]),
            include_cidrs: IncludeCidrs::List(cidrs(&["2001:db8::/32", "9.9.0.0/16"])),
            kube_virt_interfaces: names(&["vm0"]),
            ..Config::default()
        };
        let rulesets = render(&cfg, &dual_stack(&[]));
        let tail = |r: &Ruleset| {
            let nat = table(r, Table::Nat);
            nat[nat.len() - 4..].to_vec()
        };
        assert_eq!(
            tail(&rulesets[0]),
            [
                "-A ISTIO_OUTPUT -d 127.0.0.1/32 -j RETURN",
                "-A ISTIO_OUTPUT -d 10.1.2.3/8 -j RETURN",
                "-I PREROUTING 1 -i vm0 -d 9.9.0.0/16 -j ISTIO_REDIRECT",
                "-A ISTIO_OUTPUT -d 9.9.0.0/16 -j ISTIO_REDIRECT",
            ]
        );
        assert_eq!(
            tail(&rulesets[1]),
            [
                "-A ISTIO_OUTPUT -d ::1/128 -j RETURN",
                "-A ISTIO_OUTPUT -d fd00::1/8 -j RETURN",
                "-I PREROUTING 1 -i vm0 -d 2001:db8::/32 -j ISTIO_REDIRECT",
                "-A ISTIO_OUTPUT -d 2001:db8::/32 -j ISTIO_REDIRECT",
            ]
        );
    }

    #[test]
    fn a_v6_loopback_include_removes_the_lo_bypass_in_both_families() {
        let cfg = Config {
            include_cidrs: IncludeCidrs::List(cidrs(&["::1/128"])),
            ..Config::default()
        };
        for ruleset in render(&cfg, &dual_stack(&[])) {
            let output = chain(&ruleset, Table::Nat, ISTIO_OUTPUT);
            assert!(!output.iter().any(|r| r.contains("-o lo -m owner !")), "{output:#?}");
        }
    }

    #[test]
    fn tproxy_without_inbound_ports_keeps_the_marks_but_captures_nothing_inbound() {
        let cfg = Config {
            mode: InterceptionMode::Tproxy,
            ..Config::default()
        };
        let v4 = &render(&cfg, &v4_only())[0];
        let doc = v4.restore_document();
        let mangle: Vec<&str> = doc.lines().take_while(|l| *l != "COMMIT").collect();
        assert_eq!(
            mangle,
            [
                "* mangle",
                "-N ISTIO_INBOUND",
                "-A PREROUTING -p tcp -m mark --mark 1337 -j CONNMARK --save-mark",
                "-A OUTPUT -p tcp -o lo -m mark --mark 1337 -j RETURN",
                "-A OUTPUT ! -d 127.0.0.1/32 -p tcp -o lo -m owner --uid-owner 1337 -j MARK --set-mark 1338",
                "-A OUTPUT ! -d 127.0.0.1/32 -p tcp -o lo -m owner --gid-owner 1337 -j MARK --set-mark 1338",
                "-A OUTPUT -p tcp -m connmark --mark 1337 -j CONNMARK --restore-mark",
                "-I ISTIO_INBOUND 1 -p tcp -m mark --mark 1337 -j RETURN",
                "-I ISTIO_INBOUND 2 -p tcp -s 127.0.0.6/32 -i lo -j RETURN",
                "-I ISTIO_INBOUND 3 -p tcp -i lo -m mark ! --mark 1338 -j RETURN",
            ]
        );
        assert!(
            !chain(v4, Table::Nat, PREROUTING)
                .iter()
                .any(|r| r.contains(ISTIO_INBOUND))
        );
    }

    #[test]
    fn tproxy_wildcard_skips_local_exclude_ports_in_mangle_not_nat() {
        let cfg = Config {
            mode: InterceptionMode::Tproxy,
            inbound_ports: InboundPorts::All,
            inbound_exclude_ports: vec![15090],
            tproxy_mark: 77,
            ..Config::default()
        };
        let v4 = &render(&cfg, &v4_only())[0];
        assert_eq!(
            chain(v4, Table::Mangle, ISTIO_INBOUND),
            [
                "-A ISTIO_INBOUND -p tcp --dport 15090 -j RETURN",
                "-A ISTIO_INBOUND -p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT",
                "-A ISTIO_INBOUND -p tcp -j ISTIO_TPROXY",
                "-I ISTIO_INBOUND 1 -p tcp -m mark --mark 77 -j RETURN",
                "-I ISTIO_INBOUND 2 -p tcp -s 127.0.0.6/32 -i lo -j RETURN",
                "-I ISTIO_INBOUND 3 -p tcp -i lo -m mark ! --mark 1338 -j RETURN",
            ]
        );
        assert_eq!(
            chain(v4, Table::Nat, ISTIO_INBOUND),
            ["-A ISTIO_INBOUND -p tcp --dport 15008 -j RETURN"]
        );
        assert!(
            chain(v4, Table::Nat, PREROUTING).is_empty(),
            "no nat inbound jump in TPROXY mode"
        );
    }

    #[test]
    fn drop_invalid_comes_after_tproxy_exclude_interfaces_in_mangle() {
        let cfg = Config {
            mode: InterceptionMode::Tproxy,
            inbound_ports: InboundPorts::List(vec![8080]),
            exclude_interfaces: names(&["ext0"]),
            drop_invalid: true,
            ..Config::default()
        };
        let doc = render(&cfg, &v4_only())[0].restore_document();
        assert_eq!(
            lines(&doc)[..9],
            [
                "* mangle",
                "-N ISTIO_DROP",
                "-N ISTIO_DIVERT",
                "-N ISTIO_TPROXY",
                "-N ISTIO_INBOUND",
                "-A PREROUTING -i ext0 -j RETURN",
                "-A OUTPUT -o ext0 -j RETURN",
                "-A PREROUTING -m conntrack --ctstate INVALID -j ISTIO_DROP",
                "-A ISTIO_DROP -j DROP",
            ]
        );
    }

    #[test]
    fn owner_group_include_list_is_one_rule_of_repeated_matches() {
        let group = |token: &str, id| Owner {
            token: token.to_owned(),
            id,
        };
        let cfg = Config {
            owner_groups: OwnerGroups::Only(vec![group("java", 1001), group("202", 202), group("web", 1002)]),
            ..Config::default()
        };
        let output = chain(&render(&cfg, &v4_only())[0], Table::Nat, ISTIO_OUTPUT);
        let expected = "-A ISTIO_OUTPUT -m owner ! --gid-owner java -m owner ! --gid-owner 202 \
                        -m owner ! --gid-owner web -j RETURN";
        assert_eq!(output[output.len() - 2], expected);
    }

    #[test]
    fn ipv6_is_rendered_only_when_the_environment_enables_it() {
        let cfg = Config::default();
        let families = |env: &Environment| render(&cfg, env).iter().map(|r| r.family).collect::<Vec<_>>();
        assert_eq!(families(&v4_only()), [Family::V4]);
        assert_eq!(families(&dual_stack(&[])), [Family::V4, Family::V6]);
    }

    #[test]
    fn every_word_of_a_busy_configuration_is_one_argument() {
        let cfg = Config {
            mode: InterceptionMode::Tproxy,
            inbound_ports: InboundPorts::List(vec![80, 443]),
            exclude_interfaces: names(&["ext0"]),
            kube_virt_interfaces: names(&["vm0"]),
            include_cidrs: IncludeCidrs::List(cidrs(&["10.0.0.0/8", "fd00::/8"])),
            exclude_cidrs: cidrs(&["10.1.0.0/16"]),
            outbound_ports: vec![8443],
            outbound_exclude_ports: vec![9000],
            redirect_dns: true,
            drop_invalid: true,
            owner_groups: OwnerGroups::Only(vec![Owner {
                token: "app".to_owned(),
                id: 1000,
            }]),
            ..Config::default()
        };
        for ruleset in render(&cfg, &dual_stack(&["10.96.0.10", "::127.0.0.53"])) {
            for rule in &ruleset.rules {
                assert!(rule.spec.iter().all(|w| !w.is_empty() && !w.contains(' ')), "{rule:?}");
                assert_eq!(rule.spec.join(" ").split(' ').count(), rule.spec.len());
            }
        }
    }

    #[test]
    fn restore_document_declares_chains_with_rules_and_jump_targets_but_not_targets() {
        let rule = |table, chain: &str, insert_at, spec: &str| Rule {
            table,
            chain: chain.to_owned(),
            insert_at,
            spec: spec.split(' ').map(str::to_owned).collect(),
        };
        let ruleset = Ruleset {
            family: Family::V4,
            rules: vec![
                rule(Table::Raw, OUTPUT, None, "-j ISTIO_ONLY_JUMPED_TO"),
                rule(Table::Nat, "ISTIO_B", None, "-p tcp -j REDIRECT --to-ports 1"),
                rule(Table::Nat, OUTPUT, Some(1), "-j ISTIO_A"),
                rule(Table::Nat, "ISTIO_A", None, "-j ISTIO_B"),
                rule(Table::Nat, "ISTIO_A", None, "-j RETURN"),
            ],
        };
        let expected = "\
* nat
-N ISTIO_B
-N ISTIO_A
-A ISTIO_B -p tcp -j REDIRECT --to-ports 1
-I OUTPUT 1 -j ISTIO_A
-A ISTIO_A -j ISTIO_B
-A ISTIO_A -j RETURN
COMMIT
* raw
-N ISTIO_ONLY_JUMPED_TO
-A OUTPUT -j ISTIO_ONLY_JUMPED_TO
COMMIT
";
        assert_eq!(ruleset.restore_document(), expected);
        let empty = Ruleset {
            family: Family::V6,
            rules: Vec::new(),
        };
        assert_eq!(empty.restore_document(), "");
    }

    #[test]
    fn rule_helpers() {
        let rule = Rule {
            table: Table::Nat,
            chain: PREROUTING.to_owned(),
            insert_at: Some(1),
            spec: spec! {"-i", "eth0", "-j", ISTIO_REDIRECT},
        };
        assert!(rule.is_builtin_chain());
        assert_eq!(rule.jump_target(), Some(ISTIO_REDIRECT));
        assert_eq!(rule.restore_line(), "-I PREROUTING 1 -i eth0 -j ISTIO_REDIRECT");
        let own = Rule {
            chain: ISTIO_OUTPUT.to_owned(),
            insert_at: None,
            spec: spec! {"-m owner --uid-owner", 1337},
            ..rule
        };
        assert!(!own.is_builtin_chain());
        assert_eq!(own.jump_target(), None);
        assert_eq!([Table::Raw, Table::Mangle, Table::Nat].iter().max(), Some(&Table::Raw));
        assert_eq!(Table::Mangle.name(), "mangle");
    }

    #[test]
    fn spec_splits_literals_and_keeps_values_whole() {
        let value = "two words";
        let tail = vec!["x".to_owned()];
        assert_eq!(spec! {"-a  b", value, 7, ..tail}, ["-a", "b", "two words", "7", "x"]);
    }
}
