//! Golden parity: for each of Istio's 27 golden cases, the rules capture's iptables backend renders are
//! exactly the rules istio-iptables writes. Each case goes through the real command-line parser.

use std::{collections::HashMap, net::IpAddr};

use capture::{
    config::{Config, Owner, OwnerGroups},
    flags,
    iptables::render::{Ruleset, render},
    namespace::{Environment, Nameserver},
};
use golden_cases::{CASES, Case};

mod golden_cases;

/// The rules capture renders for `case`. Owner groups are set from the case's env here rather than by
/// the parser, because the parser resolves group names (`java`, `ftp`) that need not exist on this
/// machine; the renderer prints them as given either way.
fn rendered(case: &Case) -> String {
    let is_groups = |k: &str| k.starts_with("ISTIO_OUTBOUND_OWNER_GROUPS");
    let env: HashMap<&str, &str> = case.env.iter().copied().filter(|(k, _)| !is_groups(k)).collect();
    let mut config = flags::parse(case.argv(), &|k| env.get(k).map(|v| v.to_string()))
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
        ..Environment::default()
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
