//! The command line: every istio-iptables flag by short and long name, env vars and their precedence,
//! defaults, and bad input.

use std::{collections::HashMap, time::Duration};

/// One way to give a flag: arguments and env vars.
type Way<'a> = (Vec<String>, Vec<(&'a str, &'a str)>);

/// Extra arguments, env vars, and the texts the error must contain.
type BadCase = (
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
    &'static [&'static str],
);

use capture::{
    config::{Action, Backend, Invocation, IptablesFlavour},
    config::{Config, InboundPorts, IncludeCidrs, InterceptionMode, Owner, OwnerGroups},
    flags::{self, ISTIO_FLAGS, ParseError},
};

/// A user name that exists nowhere, so the default `-u` does not depend on this machine's users.
const NO_USER: &str = "capture-test-no-such-user";

fn parse_env(args: &[&str], env: &[(&str, &str)]) -> Result<Invocation, ParseError> {
    let mut vars: HashMap<String, String> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    vars.entry("ENVOY_USER".into()).or_insert_with(|| NO_USER.into());
    let argv = std::iter::once("capture").chain(args.iter().copied());
    flags::parse(argv, &|k| vars.get(k).cloned())
}

fn parse(args: &[&str]) -> Invocation {
    parse_env(args, &[]).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn config(args: &[&str]) -> Config {
    parse(args).config
}

fn error(args: &[&str], env: &[(&str, &str)]) -> String {
    match parse_env(args, env) {
        Ok(inv) => panic!("{args:?} {env:?} parsed: {inv:?}"),
        Err(e) => e.to_string(),
    }
}

fn owners(ids: &[u32]) -> Vec<Owner> {
    ids.iter()
        .map(|&id| Owner {
            token: id.to_string(),
            id,
        })
        .collect()
}

#[test]
fn defaults_are_istios() {
    let inv = parse(&[]);
    assert_eq!(inv.config, Config::default());
    let c = &inv.config;
    assert_eq!(
        (c.proxy_port, c.inbound_capture_port, c.inbound_tunnel_port),
        (15001, 15006, 15008)
    );
    assert_eq!(c.proxy_uids, owners(&[1337]));
    assert_eq!(c.proxy_gids, owners(&[1337]));
    assert_eq!(c.inbound_ports, InboundPorts::None, "-b defaults to empty");
    assert_eq!(c.include_cidrs, IncludeCidrs::List(vec![]), "-i defaults to empty");
    assert_eq!((c.tproxy_mark, c.tproxy_route_table), (1337, 133));
    assert_eq!(c.owner_groups, OwnerGroups::AllExcept(vec![]));
    assert_eq!(c.loopback_cidr_v4.to_string(), "127.0.0.1/32");
    let o = &inv.options;
    assert_eq!(o.action, Action::Apply);
    assert_eq!(o.backend, Backend::Ebpf);
    assert_eq!(o.probe_port, 15002);
    assert_eq!(o.probe_timeout, Duration::from_secs(5));
    assert_eq!(o.iptables_flavour, IptablesFlavour::Auto);
    assert!(!o.dry_run && !o.run_validation && !o.skip_rule_apply);
}

/// Each value flag, set by its short name, its long name (`--long value` and `--long=value`) and its env
/// var, lands in the same place.
#[test]
fn every_value_flag_by_short_long_and_env() {
    type Check = fn(&Invocation) -> String;
    let cases: &[(&str, &str, Check, &str)] = &[
        ("envoy-port", "15101", |i| i.config.proxy_port.to_string(), "15101"),
        (
            "inbound-capture-port",
            "15106",
            |i| i.config.inbound_capture_port.to_string(),
            "15106",
        ),
        (
            "inbound-tunnel-port",
            "15108",
            |i| i.config.inbound_tunnel_port.to_string(),
            "15108",
        ),
        (
            "proxy-uid",
            "3,4",
            |i| format!("{:?}", i.config.proxy_uids.iter().map(|o| o.id).collect::<Vec<_>>()),
            "[3, 4]",
        ),
        (
            "proxy-gid",
            "1,2",
            |i| format!("{:?}", i.config.proxy_gids.iter().map(|o| o.id).collect::<Vec<_>>()),
            "[1, 2]",
        ),
        (
            "istio-inbound-interception-mode",
            "TPROXY",
            |i| format!("{:?}", i.config.mode),
            "Tproxy",
        ),
        (
            "istio-inbound-tproxy-mark",
            "7",
            |i| i.config.tproxy_mark.to_string(),
            "7",
        ),
        (
            "istio-inbound-tproxy-route-table",
            "99",
            |i| i.config.tproxy_route_table.to_string(),
            "99",
        ),
        (
            "istio-inbound-ports",
            "80,443",
            |i| format!("{:?}", i.config.inbound_ports),
            "List([80, 443])",
        ),
        (
            "istio-local-exclude-ports",
            "22,15090",
            |i| format!("{:?}", i.config.inbound_exclude_ports),
            "[22, 15090]",
        ),
        (
            "istio-exclude-interfaces",
            "eth1,veth+",
            |i| format!("{:?}", i.config.exclude_interfaces),
            r#"["eth1", "veth+"]"#,
        ),
        (
            "istio-service-cidr",
            "10.0.0.0/8,2001:db8::/32",
            |i| format!("{:?}", i.config.include_cidrs),
            "List([10.0.0.0/8, 2001:db8::/32])",
        ),
        (
            "istio-service-exclude-cidr",
            "10.1.2.3/8",
            |i| format!("{:?}", i.config.exclude_cidrs),
            "[10.1.2.3/8]",
        ),
        (
            "istio-outbound-ports",
            "32000,31000",
            |i| format!("{:?}", i.config.outbound_ports),
            "[32000, 31000]",
        ),
        (
            "istio-local-outbound-ports-exclude",
            "15020,53",
            |i| format!("{:?}", i.config.outbound_exclude_ports),
            "[15020, 53]",
        ),
        (
            "kube-virt-interfaces",
            "eth1,eth2",
            |i| format!("{:?}", i.config.kube_virt_interfaces),
            r#"["eth1", "eth2"]"#,
        ),
        (
            "network-namespace",
            "/run/netns/pod",
            |i| format!("{:?}", i.options.network_namespace),
            r#"Some("/run/netns/pod")"#,
        ),
        (
            "iptables-probe-port",
            "15102",
            |i| i.options.probe_port.to_string(),
            "15102",
        ),
        (
            "probe-timeout",
            "1m30s",
            |i| format!("{:?}", i.options.probe_timeout),
            "90s",
        ),
        (
            "force-iptables-binary",
            "legacy",
            |i| format!("{:?}", i.options.iptables_flavour),
            "Legacy",
        ),
    ];
    for &(long, value, check, want) in cases {
        let spec = ISTIO_FLAGS.iter().find(|s| s.long == long).unwrap();
        let long_flag = format!("--{long}");
        let long_eq = format!("--{long}={value}");
        let mut ways: Vec<Way> = vec![(vec![long_flag.clone(), value.into()], vec![]), (vec![long_eq], vec![])];
        if let Some(short) = spec.short {
            ways.push((vec![format!("-{short}"), value.into()], vec![]));
        }
        if let Some(env) = spec.env {
            ways.push((vec![], vec![(env, value)]));
        }
        for (args, env) in ways {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let inv = parse_env(&args, &env).unwrap_or_else(|e| panic!("{args:?} {env:?}: {e}"));
            assert_eq!(check(&inv), want, "--{long} via {args:?} {env:?}");
        }
    }
}

#[test]
fn every_bool_flag_by_flag_and_env() {
    type Check = fn(&Invocation) -> bool;
    let cases: &[(&str, Check)] = &[
        ("dry-run", |i| i.options.dry_run),
        ("redirect-dns", |i| i.config.redirect_dns),
        ("capture-all-dns", |i| i.config.capture_all_dns),
        ("drop-invalid", |i| i.config.drop_invalid),
        ("dual-stack", |i| i.config.dual_stack),
        ("run-validation", |i| i.options.run_validation),
        ("skip-rule-apply", |i| i.options.skip_rule_apply),
        ("cleanup-only", |i| i.options.action == Action::Clean),
        ("native-nftables", |i| i.options.native_nftables),
    ];
    for &(long, check) in cases {
        let spec = ISTIO_FLAGS.iter().find(|s| s.long == long).unwrap();
        assert!(!check(&parse(&[])), "--{long} defaults to false");
        assert!(check(&parse(&[&format!("--{long}")])), "--{long} alone means true");
        for t in ["true", "1", "t", "T", "TRUE", "True"] {
            assert!(check(&parse(&[&format!("--{long}={t}")])), "--{long}={t}");
        }
        for f in ["false", "0", "f", "F", "FALSE", "False"] {
            assert!(!check(&parse(&[&format!("--{long}={f}")])), "--{long}={f}");
        }
        for env in [spec.env, spec.extra_env].into_iter().flatten() {
            assert!(
                check(&parse_env(&[], &[(env, "true")]).unwrap()),
                "{env}=true sets --{long}"
            );
        }
        assert!(
            !check(&parse_env(&[&format!("--{long}=false")], &[(spec.env.unwrap(), "true")]).unwrap()),
            "--{long}=false beats its env var"
        );
    }
    assert!(parse(&["-n"]).options.dry_run, "-n is --dry-run");
    // Compatibility-only flags are accepted.
    parse(&[
        "--cni-mode",
        "--reconcile",
        "--force-apply",
        "--log_as_json",
        "--log_output_level=default:debug",
    ]);
}

#[test]
fn precedence_is_cli_then_additional_env_then_primary_env_then_default() {
    assert!(
        parse_env(&[], &[("REDIRECT_DNS", "false"), ("ISTIO_META_DNS_CAPTURE", "true")])
            .unwrap()
            .config
            .redirect_dns
    );
    assert!(
        !parse_env(&[], &[("REDIRECT_DNS", "true"), ("ISTIO_META_DNS_CAPTURE", "false")])
            .unwrap()
            .config
            .redirect_dns
    );
    assert!(
        parse_env(&[], &[("DROP_INVALID", "0"), ("INVALID_DROP", "1")])
            .unwrap()
            .config
            .drop_invalid
    );
    assert!(
        parse_env(&[], &[("DUAL_STACK", "0"), ("ISTIO_DUAL_STACK", "1")])
            .unwrap()
            .config
            .dual_stack
    );
    let inv = parse_env(&["-z", "1"], &[("INBOUND_CAPTURE_PORT", "2")]).unwrap();
    assert_eq!(inv.config.inbound_capture_port, 1, "the command line beats the env var");
    let inv = parse_env(&[], &[("INBOUND_CAPTURE_PORT", "2")]).unwrap();
    assert_eq!(inv.config.inbound_capture_port, 2, "the env var beats the default");
    let inv = parse_env(&[], &[("ENVOY_PORT", "2")]).unwrap();
    assert_eq!(inv.config.proxy_port, 15001, "ENVOY_PORT is not read (as in istio)");
}

#[test]
fn list_and_wildcard_syntax() {
    assert_eq!(config(&["-b", "*"]).inbound_ports, InboundPorts::All);
    assert_eq!(config(&["-b", ""]).inbound_ports, InboundPorts::None);
    assert_eq!(config(&["-i", "*"]).include_cidrs, IncludeCidrs::All);
    assert_eq!(config(&["-x", ""]).exclude_cidrs, vec![]);
    assert_eq!(
        config(&["-d", "6000,7000,"]).inbound_exclude_ports,
        vec![6000, 7000],
        "empty tokens are dropped"
    );
    assert_eq!(config(&["-q", ",,80"]).outbound_ports, vec![80]);
    assert!(config(&["-i", "127.1.2.3/32"]).include_cidrs.has_loopback());
    assert_eq!(config(&["-m", "REDIRECT"]).mode, InterceptionMode::Redirect);
    assert_eq!(config(&["-m", ""]).mode, InterceptionMode::Redirect);
    assert_eq!(parse(&["--backend", "iptables"]).options.backend, Backend::Iptables);
    assert_eq!(parse(&["--backend", "auto"]).options.backend, Backend::Auto);
    assert_eq!(parse(&["status", "--backend", "auto"]).options.backend, Backend::Auto);
    assert_eq!(parse(&["clean", "-k", "eth1"]).options.action, Action::Clean);
    assert_eq!(
        config(&["clean", "-k", "eth1"]).kube_virt_interfaces,
        vec!["eth1".to_string()]
    );
    assert_eq!(parse(&["status"]).options.action, Action::Status);
}

#[test]
fn proxy_gid_defaults_to_the_proxy_uids_and_envoy_user_sets_the_uid() {
    let c = config(&["-u", "3,4"]);
    assert_eq!(c.proxy_gids, owners(&[3, 4]));
    let c = parse_env(&[], &[("ENVOY_USER", "root")]).unwrap().config;
    assert_eq!(c.proxy_uids, owners(&[0]), "ENVOY_USER names an existing user: its uid");
    let c = config(&["-u", "root", "-g", "root"]);
    assert_eq!(
        c.proxy_uids,
        vec![Owner {
            token: "root".into(),
            id: 0
        }]
    );
    assert_eq!(
        c.proxy_gids,
        vec![Owner {
            token: "root".into(),
            id: 0
        }]
    );
}

#[test]
fn owner_groups_and_loopback_cidr_come_from_env() {
    let c = parse_env(&[], &[("ISTIO_OUTBOUND_OWNER_GROUPS", "0,5")])
        .unwrap()
        .config;
    assert_eq!(c.owner_groups, OwnerGroups::Only(owners(&[0, 5])));
    let c = parse_env(&[], &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "7,root")])
        .unwrap()
        .config;
    assert_eq!(
        c.owner_groups,
        OwnerGroups::AllExcept(vec![
            Owner {
                token: "7".into(),
                id: 7
            },
            Owner {
                token: "root".into(),
                id: 0
            }
        ])
    );
    let c = parse_env(&[], &[("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.1/8")])
        .unwrap()
        .config;
    assert_eq!(c.loopback_cidr_v4.to_string(), "127.0.0.1/8");
}

/// Bad input: one line naming the flag (or env var) and the value.
#[test]
fn bad_input_names_the_flag_and_the_value() {
    let cases: &[BadCase] = &[
        (&["-i", "10.0.0.0/33"], &[], &["-i/--istio-service-cidr", "10.0.0.0/33"]),
        (&["-i", "*,10.0.0.0/8"], &[], &["-i/--istio-service-cidr", "\"*\""]),
        (&["-x", "*"], &[], &["-x/--istio-service-exclude-cidr", "\"*\""]),
        (&["-x", "banana"], &[], &["-x/--istio-service-exclude-cidr", "banana"]),
        (&["-p", "0"], &[], &["-p/--envoy-port", "\"0\""]),
        (&["-p", "65536"], &[], &["-p/--envoy-port", "65536"]),
        (&["-z", "-1"], &[], &["-z/--inbound-capture-port"]),
        (&["-b", "80,70000"], &[], &["-b/--istio-inbound-ports", "70000"]),
        (
            &["-d", "1000:2000"],
            &[],
            &["-d/--istio-local-exclude-ports", "1000:2000"],
        ),
        (
            &["-o", " 80"],
            &[],
            &["-o/--istio-local-outbound-ports-exclude", "\" 80\""],
        ),
        (&["-q", "http"], &[], &["-q/--istio-outbound-ports", "http"]),
        (&["--backend", "nft"], &[], &["--backend", "nft"]),
        (&["--redirect-dns=yes"], &[], &["--redirect-dns", "yes"]),
        (&["-u", "1337,garbage!"], &[], &["-u/--proxy-uid", "garbage!"]),
        (&["-g", "1,-2"], &[], &["-g/--proxy-gid", "-2"]),
        (&["-m", "NAT"], &[], &["-m/--istio-inbound-interception-mode", "NAT"]),
        (&["-t", "mark"], &[], &["-t/--istio-inbound-tproxy-mark", "mark"]),
        (
            &["-k", "a-very-long-interface-name"],
            &[],
            &["-k/--kube-virt-interfaces", "a-very-long-interface-name"],
        ),
        (
            &["--probe-timeout", "5 seconds"],
            &[],
            &["--probe-timeout", "5 seconds"],
        ),
        (
            &["--force-iptables-binary", "xtables"],
            &[],
            &["--force-iptables-binary", "xtables"],
        ),
        (
            &[],
            &[("REDIRECT_DNS", "yes")],
            &["env REDIRECT_DNS (--redirect-dns)", "yes"],
        ),
        (&[], &[("PROXY_UID", "x y")], &["env PROXY_UID (-u/--proxy-uid)", "x y"]),
        (
            &[],
            &[("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "10.0.0.0/8")],
            &["env ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "10.0.0.0/8"],
        ),
        (
            &[],
            &[("ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.0/7")],
            &["ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR", "127.0.0.0/7"],
        ),
        (
            &[],
            &[("ISTIO_OUTBOUND_OWNER_GROUPS", "no-such-group-anywhere")],
            &["ISTIO_OUTBOUND_OWNER_GROUPS", "no-such-group-anywhere"],
        ),
        (
            &["--native-nftables", "--backend", "iptables"],
            &[],
            &["--native-nftables"],
        ),
        // auto may end on either backend, so it is held to both backends' limits.
        (&["--native-nftables", "--backend", "auto"], &[], &["--native-nftables"]),
        (
            &["--backend", "auto", "-u", "1,2,3,4,5,6,7,8,9"],
            &[],
            &["-u/--proxy-uid", "at most 8"],
        ),
    ];
    for (args, env, needles) in cases {
        let msg = error(args, env);
        assert!(!msg.contains('\n'), "{args:?}: not one line: {msg}");
        for n in *needles {
            assert!(msg.contains(n), "{args:?} {env:?}: {msg:?} does not mention {n:?}");
        }
    }
    let many: Vec<String> = (0..65).map(|g| g.to_string()).collect();
    let msg = error(&[], &[("ISTIO_OUTBOUND_OWNER_GROUPS", &many.join(","))]);
    assert!(msg.contains("at most 64"), "{msg}");
}

// Regressions the fuzz test (`tests/fuzz.rs`) found, pinned.

/// clap's own errors were shown as clap renders them: usage and tips on more lines (in the agent's answer
/// too), and an argument with a newline broke even the first line.
#[test]
fn clap_errors_are_one_line_naming_the_argument() {
    for (args, needle) in [
        (&["--no-such-flag"][..], "\"--no-such-flag\""),
        (&["stray\nline"], "\"stray\\nline\""),
        (&["-p"], "--envoy-port"),
        (&["--redirect-dns", "yes"], "\"yes\""),
    ] {
        let msg = error(args, &[]);
        assert!(!msg.contains('\n'), "{args:?}: not one line: {msg:?}");
        assert!(msg.contains(needle), "{args:?}: {msg:?} does not name {needle:?}");
    }
}

/// An argument that is not UTF-8 got clap's "invalid UTF-8 was detected", naming no argument.
#[test]
fn an_argument_that_is_not_utf8_is_named() {
    use std::{ffi::OsString, os::unix::ffi::OsStringExt as _};
    let argv = [
        OsString::from("capture"),
        "-b".into(),
        OsString::from_vec(b"80\xff".to_vec()),
    ];
    let msg = flags::parse(argv, &|_| None).unwrap_err().to_string();
    assert_eq!(
        msg,
        "invalid value \"80\u{fffd}\" for command-line argument 2: not valid UTF-8"
    );
}

/// `capture` read its env with `std::env::var(..).ok()`: a value that is not UTF-8 counted as unset, so the
/// default applied silently.
#[test]
fn an_env_value_that_is_not_utf8_is_named_not_ignored() {
    use std::{ffi::OsString, os::unix::ffi::OsStringExt as _};
    let env = |name: &str| (name == "REDIRECT_DNS").then(|| OsString::from_vec(b"tr\xffe".to_vec()));
    let err = flags::environment(env).unwrap_err().to_string();
    assert_eq!(
        err,
        "invalid value \"tr\u{fffd}e\" for env REDIRECT_DNS: not valid UTF-8"
    );
    let env = |name: &str| (name == "REDIRECT_DNS").then(|| OsString::from("true"));
    assert_eq!(
        flags::environment(env).unwrap().get("REDIRECT_DNS").map(String::as_str),
        Some("true")
    );
}

/// `--native-nftables` set through its env var was reported as the flag, which was not given.
#[test]
fn native_nftables_from_env_names_the_env_var() {
    let msg = error(&["--backend", "iptables"], &[("NATIVE_NFTABLES", "1")]);
    assert!(
        msg.starts_with("invalid value \"1\" for env NATIVE_NFTABLES (--native-nftables): "),
        "{msg}"
    );
}

/// `-g` defaults to the `-u` list read as groups; a user name with no group of that name was reported as a
/// bad `-g`, which was not given.
#[test]
fn a_proxy_gid_defaulted_from_the_uids_names_where_they_came_from() {
    let Some(user) = ["nobody", "_apt", "daemon", "bin"].into_iter().find(|name| {
        nix::unistd::User::from_name(name).ok().flatten().is_some()
            && nix::unistd::Group::from_name(name).ok().flatten().is_none()
    }) else {
        eprintln!("skipped: no user here lacks a group of the same name");
        return;
    };
    let msg = error(&["-u", user], &[]);
    assert!(
        msg.contains("-g/--proxy-gid (its default, the list of -u/--proxy-uid)"),
        "{msg}"
    );
    let msg = error(&[], &[("PROXY_UID", user)]);
    assert!(msg.contains("the list of env PROXY_UID (-u/--proxy-uid)"), "{msg}");
}

#[test]
fn the_readme_flag_table_is_the_flag_table() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).expect("README.md");
    let table = flags::markdown_table();
    assert!(
        readme.contains(&table),
        "README.md's flag table is out of date; it should contain exactly:\n{table}"
    );
}
