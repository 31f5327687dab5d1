//! The kernel feature probes, through the `capture` binary: a kernel that lacks a feature the eBPF backend
//! needs gets one line naming it (and the first kernel that has it), exit 1 and nothing applied; with
//! `--backend auto` it gets the iptables backend instead, and says why. This kernel has every feature, so
//! the missing one is named in `CAPTURE_ASSUME_MISSING`, the documented way to try a kernel without it.

use testkit::{BpfPins, Cgroup, INJECTOR_DEFAULT_FLAGS, Netns, capture_with_env};

/// Treated as missing: sk_lookup programs, first in Linux 5.9.
const MISSING: (&str, &str) = ("CAPTURE_ASSUME_MISSING", "sk_lookup");

/// `capture`'s arguments: the backend, a private pin directory, the child cgroup if any, the injector's flags.
fn args(backend: &str, pins: &BpfPins, cgroup: Option<&Cgroup>) -> Vec<String> {
    let mut args = vec!["--backend".to_owned(), backend.to_owned(), "--pin-dir".to_owned()];
    args.push(pins.path().display().to_string());
    if let Some(cgroup) = cgroup {
        args.extend(["--cgroup".to_owned(), cgroup.path().display().to_string()]);
    }
    args.extend(INJECTOR_DEFAULT_FLAGS.iter().map(|f| (*f).to_owned()));
    args
}

/// Runs `capture` with `args` (after `first`, e.g. `clean`) in `ns`, with `env`.
fn run(ns: &Netns, first: &[&str], args: &[String], env: &[(&str, &str)]) -> std::process::Output {
    let mut all: Vec<&str> = first.to_vec();
    all.extend(args.iter().map(String::as_str));
    capture_with_env(ns, &all, env)
}

/// The namespace's IPv6 addresses (capture adds ::6 to lo when it applies the eBPF backend).
fn addresses(ns: &Netns) -> String {
    String::from_utf8_lossy(&ns.ip(&["-6", "addr", "show"]).stdout).into_owned()
}

#[test]
fn a_missing_kernel_feature_is_named_in_one_line_and_nothing_is_applied() {
    let (ns, cgroup, pins) = (Netns::new("feat"), Cgroup::new("feat"), BpfPins::new("feat"));
    let rules_before = ns.iptables_rules();
    let addresses_before = addresses(&ns);

    let out = run(&ns, &[], &args("ebpf", &pins, Some(&cgroup)), &[MISSING]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr}");
    for needle in [
        "lacks sk_lookup",
        "Linux 5.9+",
        "inbound capture",
        "nothing was applied",
        "--backend iptables",
    ] {
        assert!(stderr.contains(needle), "{stderr:?} does not say {needle:?}");
    }
    assert!(!pins.path().exists(), "BPF objects were pinned");
    assert_eq!(ns.iptables_rules(), rules_before, "rules were applied");
    assert_eq!(addresses(&ns), addresses_before, "an address was added");
}

#[test]
fn backend_auto_falls_back_to_iptables_and_says_why() {
    let (ns, pins) = (Netns::new("auto"), BpfPins::new("auto"));
    let args = args("auto", &pins, None);

    let out = run(&ns, &[], &args, &[MISSING]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "capture --backend auto: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr}");
    assert!(
        stderr.contains("--backend auto: iptables") && stderr.contains("lacks sk_lookup (Linux 5.9+)"),
        "{stderr:?}"
    );
    assert!(
        ns.iptables_rules().iter().any(|r| r.contains("ISTIO_OUTPUT")),
        "the iptables backend applied no rules"
    );
    assert!(!pins.path().exists(), "BPF objects were pinned");

    // The same kernel gives the same answer, so clean removes what apply chose.
    let out = run(&ns, &["clean"], &args, &[MISSING]);
    assert!(out.status.success(), "clean: {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        ns.iptables_rules().is_empty(),
        "clean left rules: {:?}",
        ns.iptables_rules()
    );
}

#[test]
fn backend_auto_takes_ebpf_on_a_kernel_that_has_everything() {
    let (ns, cgroup, pins) = (
        Netns::new("auto-ebpf"),
        Cgroup::new("auto-ebpf"),
        BpfPins::new("auto-ebpf"),
    );
    let args = args("auto", &pins, Some(&cgroup));

    let out = run(&ns, &[], &args, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "capture --backend auto: {stderr}");
    assert!(stderr.contains("--backend auto: ebpf"), "{stderr:?}");
    assert!(pins.path().exists(), "the eBPF backend pinned nothing");
    assert!(ns.iptables_rules().is_empty(), "iptables rules were applied too");

    let out = run(&ns, &["clean"], &args, &[]);
    assert!(out.status.success(), "clean: {}", String::from_utf8_lossy(&out.stderr));
    assert!(!pins.path().exists(), "the last clean leaves no pins");
}
