//! Golden parity: for each of Istio's 27 golden cases, the rules capture's iptables backend renders are
//! exactly the rules istio-iptables writes. Each case goes through the real command-line parser.

use std::{collections::HashMap, net::IpAddr};

use capture::{
    config::{Config, Environment, Nameserver, Owner, OwnerGroups},
    flags,
    iptables::render::{Ruleset, render},
};

/// One golden case: flags on top of istio's test base, env vars, IPv6 on, nameservers.
struct Case {
    name: &'static str,
    /// Command-line flags, split on white space (`--flag=` gives an empty value).
    args: &'static str,
    env: &'static [(&'static str, &'static str)],
    ipv6: bool,
    nameservers: &'static [&'static str],
}

const fn case(name: &'static str, args: &'static str) -> Case {
    Case {
        name,
        args,
        env: &[],
        ipv6: false,
        nameservers: &[],
    }
}

const V6: bool = true;
const DNS_V4: &[&str] = &["127.0.0.53"];

/// The table of CASES.md (tests/data/golden/README.md).
#[rustfmt::skip]
const CASES: &[Case] = &[
    case("empty", ""),
    Case { ipv6: V6, ..case("ipv6-empty-inbound-ports", "--istio-inbound-ports=") },
    Case { nameservers: DNS_V4, ..case("ip-range", "-x 1.1.0.0/16 -i 9.9.0.0/16 --redirect-dns -g 1,2 -u 3,4") },
    Case { ipv6: V6, nameservers: DNS_V4, ..case("tproxy",
        "-m TPROXY -b * -x 1.1.0.0/16 -i 9.9.0.0/16 --redirect-dns -g 1337 -u 1337 -c not-istio-nic") },
    Case { ipv6: V6, ..case("ipv6-inbound-ports", "-b 4000,5000") },
    Case { ipv6: V6, ..case("ipv6-virt-interfaces", "-b 4000,5000 -k eth0,eth1") },
    Case { ipv6: V6, ..case("ipv6-ipnets",
        "-b 4000,5000 -d 6000,7000, -k eth0,eth1 -x 2001:db8::/32 -i 2001:db8::/32") },
    Case { ipv6: V6, ..case("ipv6-uid-gid",
        "-b 4000,5000 -d 6000,7000 -k eth0,eth1 -x 2001:db8::/32 -i 2001:db8::/32 -g 1,2 -u 3,4") },
    Case { ipv6: V6, ..case("ipv6-outbound-ports", "--istio-inbound-ports= -q 32000,31000") },
    case("kube-virt-interfaces", "-k eth1,eth2 -i *"),
    case("ipnets", "-i 10.0.0.0/8"),
    case("ipnets-with-kube-virt-interfaces", "-k eth1,eth2 -i 10.0.0.0/8"),
    case("inbound-ports-include", "-b 32000,31000"),
    case("inbound-ports-wildcard", "-b *"),
    case("inbound-ports-tproxy", "-b 32000,31000 -m TPROXY"),
    case("inbound-ports-wildcard-tproxy", "-b * -m TPROXY"),
    Case { ipv6: V6, nameservers: &["127.0.0.53", "::127.0.0.53"], ..case("dns-uid-gid", "--redirect-dns -g 1,2 -u 3,4") },
    Case { ipv6: V6, ..case("ipv6-dns-uid-gid", "--redirect-dns -g 1,2 -u 3,4") },
    Case { env: &[("ISTIO_OUTBOUND_OWNER_GROUPS", "java,202")], ..case("outbound-owner-groups", "") },
    Case { env: &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "888,ftp")], ..case("outbound-owner-groups-exclude", "") },
    Case { ipv6: V6, env: &[("ISTIO_OUTBOUND_OWNER_GROUPS", "java,202")],
        ..case("ipv6-dns-outbound-owner-groups", "--redirect-dns") },
    Case { ipv6: V6, env: &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "888,ftp")],
        ..case("ipv6-dns-outbound-owner-groups-exclude", "--redirect-dns") },
    case("outbound-ports-include", "-q 32000,31000"),
    Case { nameservers: DNS_V4, ..case("loopback-outbound-iprange", "-i 127.1.2.3/32 --redirect-dns -g 1,2 -u 3,4") },
    case("basic-exclude-nic", "-c not-istio-nic"),
    case("drop-invalid", "--drop-invalid"),
    Case { env: &[("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.1/8")], ..case("host-ipv4-loopback-cidr", "") },
];

/// istio's test base (CASES.md), before each case's flags.
const BASE: &str = "-p 15001 -z 15006 -e 15008 -u 1337 -g 1337 -t 1337 -r 133";

/// The rules capture renders for `case`. Owner groups are set from the case's env here rather than by
/// the parser, because the parser resolves group names (`java`, `ftp`) that need not exist on this
/// machine; the renderer prints them as given either way.
fn rendered(case: &Case) -> String {
    let is_groups = |k: &str| k.starts_with("ISTIO_OUTBOUND_OWNER_GROUPS");
    let env: HashMap<&str, &str> = case.env.iter().copied().filter(|(k, _)| !is_groups(k)).collect();
    let args = std::iter::once("capture")
        .chain(BASE.split_whitespace())
        .chain(case.args.split_whitespace());
    let mut config = flags::parse(args, &|k| env.get(k).map(|v| v.to_string()))
        .unwrap_or_else(|e| panic!("{}: {e}", case.name))
        .config;
    let owners = |list: &str| -> Vec<Owner> {
        list.split(',')
            .map(|t| Owner {
                token: t.to_owned(),
                id: t.parse().unwrap_or(u32::MAX),
            })
            .collect()
    };
    for (k, v) in case.env.iter().filter(|(k, _)| is_groups(k)) {
        config.owner_groups = match *k {
            "ISTIO_OUTBOUND_OWNER_GROUPS" => OwnerGroups::Only(owners(v)),
            _ => OwnerGroups::AllExcept(owners(v)),
        };
    }
    render_doc(case, &config)
}

fn render_doc(case: &Case, config: &Config) -> String {
    let env = Environment {
        ipv6: case.ipv6,
        nameservers: case
            .nameservers
            .iter()
            .map(|t| Nameserver {
                addr: t.parse::<IpAddr>().unwrap(),
                text: (*t).to_owned(),
            })
            .collect(),
    };
    render(config, &env).iter().map(Ruleset::restore_document).collect()
}

fn golden(name: &str) -> String {
    let path = format!("{}/tests/data/golden/{name}.golden", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .filter(|l| *l != "iptables-save" && *l != "ip6tables-save")
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn all_27_golden_cases_match_istio_rule_for_rule() {
    assert_eq!(CASES.len(), 27);
    let mut failures = Vec::new();
    for case in CASES {
        let (want, got) = (golden(case.name), rendered(case));
        if want != got {
            let mut diff = String::new();
            for (i, (w, g)) in want.lines().zip(got.lines()).enumerate() {
                if w != g {
                    diff.push_str(&format!("  line {}: want {w:?}\n           got  {g:?}\n", i + 1));
                }
            }
            diff.push_str(&format!(
                "  ({} lines wanted, {} rendered)\n",
                want.lines().count(),
                got.lines().count()
            ));
            failures.push(format!("{}:\n{diff}", case.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of 27 golden cases differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
