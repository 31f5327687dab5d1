//! Which injected pods the Kubernetes source captures, and with which flags: a table of pod manifests as
//! the API server returns them after Istio's injector (tests/data/pods/, see its README), each against
//! the flags istio-cni would pass to istio-iptables, or the reason it leaves the pod alone.

use std::path::Path;

use capture::{
    agent::annotations::{self, Skip},
    flags,
};
use k8s_openapi::api::core::v1::Pod;

/// The flags of a pod injected with every default.
const DEFAULTS: &[&str] = &[
    "-p",
    "15001",
    "-z",
    "15006",
    "-u",
    "1337",
    "-g",
    "1337",
    "-m",
    "REDIRECT",
    "-i",
    "*",
    "-x",
    "",
    "-b",
    "*",
    "-d",
    "15020,15021,15090",
    "-o",
    "15020",
];

/// `DEFAULTS` with some flags' values replaced and others appended.
fn defaults_with(replace: &[(&str, &str)], append: &[&str]) -> Vec<String> {
    let mut flags: Vec<String> = DEFAULTS.iter().map(|s| s.to_string()).collect();
    for (flag, value) in replace {
        let at = flags
            .iter()
            .position(|f| f == flag)
            .unwrap_or_else(|| panic!("{flag} is not a default flag"));
        flags[at + 1] = value.to_string();
    }
    flags.extend(append.iter().map(|s| s.to_string()));
    flags
}

fn load(name: &str) -> Pod {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/pods")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn captured() -> Vec<(&'static str, Vec<String>)> {
    vec![
        ("cni-native-sidecar", defaults_with(&[], &[])),
        ("cni-classic-sidecar", defaults_with(&[], &[])),
        ("cni-no-annotations-defaults", defaults_with(&[], &[])),
        (
            "cni-ranges-and-ports",
            defaults_with(
                &[
                    ("-i", "10.96.0.0/12,10.244.0.0/16"),
                    ("-x", "10.96.0.1/32,169.254.169.254/32"),
                    ("-b", "8080,9090"),
                    ("-d", "9091,15020,15021,15090"),
                    ("-o", "6379,11211"),
                ],
                &["-q", "5432"],
            ),
        ),
        (
            "cni-status-port",
            defaults_with(&[("-d", "8443,15030,15020,15021,15090")], &[]),
        ),
        ("cni-tproxy", defaults_with(&[("-m", "TPROXY")], &[])),
        (
            "cni-interfaces",
            defaults_with(&[], &["-k", "k6t-eth0,tap0", "-c", "net2"]),
        ),
        ("cni-kubevirt-deprecated", defaults_with(&[], &["-k", "k6t-eth0"])),
        (
            "cni-dns-dual-stack",
            defaults_with(
                &[],
                &["--redirect-dns", "--capture-all-dns", "--dual-stack", "--drop-invalid"],
            ),
        ),
        ("cni-proxy-uid", defaults_with(&[("-u", "1500"), ("-g", "1600")], &[])),
        ("cni-empty-exclusions", defaults_with(&[("-x", ""), ("-o", "")], &[])),
    ]
}

fn skipped() -> Vec<(&'static str, Skip)> {
    vec![
        ("istio-init", Skip::IstioInit),
        ("inject-false-label", Skip::InjectionDisabled),
        ("host-network", Skip::HostNetwork),
        ("no-sidecar", Skip::NoSidecar),
        ("gateway", Skip::NotSidecar("router".into())),
        ("ambient", Skip::Ambient),
        ("interception-none", Skip::InterceptionNone),
        ("envoy-disabled", Skip::EnvoyDisabled),
        ("proxy-not-injected", Skip::NotInjected),
        ("succeeded-job", Skip::Finished),
    ]
}

#[test]
fn injected_pods_get_istio_cni_flags() {
    for (name, want) in captured() {
        let pod = load(name);
        assert_eq!(annotations::decide(&pod), Ok(want.clone()), "{name}");
        assert_eq!(annotations::flags(&pod), Some(want), "{name}");
    }
}

#[test]
fn pods_istio_would_not_capture_are_left_alone() {
    for (name, why) in skipped() {
        let pod = load(name);
        assert_eq!(annotations::decide(&pod), Err(why), "{name}");
        assert_eq!(annotations::flags(&pod), None, "{name}");
    }
}

#[test]
fn every_manifest_is_in_the_table() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/pods");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            e.unwrap()
                .file_name()
                .to_str()?
                .strip_suffix(".json")
                .map(str::to_string)
        })
        .collect();
    files.sort();
    let mut named: Vec<String> = captured()
        .into_iter()
        .map(|(n, _)| n)
        .chain(skipped().into_iter().map(|(n, _)| n))
        .map(String::from)
        .collect();
    named.sort();
    assert_eq!(files, named);
}

/// The derived flags are valid `capture` command lines: the agent applies them through the same parser.
#[test]
fn derived_flags_parse() {
    for (name, want) in captured() {
        let argv = std::iter::once("capture".to_string()).chain(want);
        let parsed = flags::parse(argv, &|k| {
            (k == "ENVOY_USER").then(|| "capture-test-no-such-user".to_string())
        });
        if let Err(e) = parsed {
            panic!("{name}: {e}");
        }
    }
}

/// The annotation wins over the injector's defaults; the injection label wins over the annotation.
#[test]
fn label_wins_over_annotation() {
    let mut pod = load("cni-native-sidecar");
    pod.metadata
        .annotations
        .get_or_insert_default()
        .insert(annotations::INJECT_KEY.into(), "false".into());
    assert_eq!(annotations::decide(&pod), Err(Skip::InjectionDisabled));
    pod.metadata
        .labels
        .get_or_insert_default()
        .insert(annotations::INJECT_KEY.into(), "true".into());
    assert_eq!(annotations::decide(&pod), Ok(defaults_with(&[], &[])));
}

#[test]
fn unknown_interception_mode_is_refused() {
    let mut pod = load("cni-native-sidecar");
    pod.metadata
        .annotations
        .get_or_insert_default()
        .insert(annotations::INTERCEPTION_MODE.into(), "redirect".into());
    assert_eq!(
        annotations::decide(&pod),
        Err(Skip::BadInterceptionMode("redirect".into()))
    );
}
