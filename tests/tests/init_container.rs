//! The init-container way, run where the eBPF backend's state would go with the container: in a cgroup
//! namespace of its own (the cgroup root it finds is the container's own cgroup), or in a mount namespace
//! of its own with no bpffs where the pins go (the bpffs it would mount is the container's only). Both used
//! to apply and exit 0 while the pod was captured by nothing once the container went. Now the eBPF backend
//! refuses with one line and nothing applied, and `--backend auto` takes iptables. The namespaces are made
//! with unshare(1), inside a throwaway network namespace.

use std::process::{Command, Output};

use testkit::{BpfPins, Cgroup, INJECTOR_DEFAULT_FLAGS, Netns, capture_bin};

/// `unshare UNSHARE -- sh -c SCRIPT capture ARGS…` inside `ns`, with a clean environment: the script runs
/// first in the new namespaces, then `exec "$0" "$@"` runs capture.
fn unshared(ns: &Netns, unshare: &[&str], script: &str, args: &[String]) -> Output {
    let mut cmd: Command = ns.command("unshare");
    cmd.args(unshare)
        .args(["--", "sh", "-c"])
        .arg(format!("{script}; exec \"$0\" \"$@\""))
        .arg(capture_bin())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    cmd.output().expect("run unshare")
}

fn args(backend: &str, pin_dir: &str, cgroup: &Cgroup) -> Vec<String> {
    let mut args: Vec<String> = ["--backend", backend, "--pin-dir", pin_dir, "--cgroup"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    args.push(cgroup.path().display().to_string());
    args.extend(INJECTOR_DEFAULT_FLAGS.iter().map(|f| (*f).to_owned()));
    args
}

fn addresses(ns: &Netns) -> String {
    String::from_utf8_lossy(&ns.ip(&["-6", "addr", "show"]).stdout).into_owned()
}

/// Asserts a refusal: exit 1, one line saying `why`, what to use instead, and that nothing was applied;
/// and no rule, address or pin in fact.
fn assert_refused(out: &Output, why: &str, ns: &Netns, addresses_before: &str, pins: &std::path::Path) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "not one line: {stderr}");
    for needle in [why, "capture agent", "--backend iptables", "nothing was applied"] {
        assert!(stderr.contains(needle), "{stderr:?} does not say {needle:?}");
    }
    assert!(ns.iptables_rules().is_empty(), "rules were applied");
    assert_eq!(addresses(ns), addresses_before, "an address was added");
    assert!(!pins.exists(), "BPF objects were pinned");
}

#[test]
fn in_a_cgroup_namespace_of_its_own_ebpf_refuses_and_auto_takes_iptables() {
    let (ns, cgroup, pins) = (Netns::new("cgns"), Cgroup::new("cgns"), BpfPins::new("cgns"));
    let pin_dir = pins.path().display().to_string();
    let before = addresses(&ns);
    let out = unshared(&ns, &["--cgroup"], "true", &args("ebpf", &pin_dir, &cgroup));
    assert_refused(&out, "cgroup namespace of its own", &ns, &before, pins.path());

    let auto = args("auto", &pin_dir, &cgroup);
    let out = unshared(&ns, &["--cgroup"], "true", &auto);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "--backend auto: {stderr}");
    assert!(
        stderr.contains("--backend auto: iptables (capture runs in a cgroup namespace of its own"),
        "{stderr:?}"
    );
    assert!(
        ns.iptables_rules().iter().any(|r| r.contains("ISTIO_OUTPUT")),
        "the iptables backend applied no rules"
    );
    assert!(!pins.path().exists(), "BPF objects were pinned");
    let mut clean = vec!["clean".to_owned()];
    clean.extend(auto);
    let out = unshared(&ns, &["--cgroup"], "true", &clean);
    assert!(out.status.success(), "clean: {}", String::from_utf8_lossy(&out.stderr));
    assert!(ns.iptables_rules().is_empty(), "clean left rules");
}

#[test]
fn in_a_mount_namespace_of_its_own_without_bpffs_ebpf_refuses() {
    let (ns, cgroup) = (Netns::new("mntns"), Cgroup::new("mntns"));
    // A pin directory under /sys/fs/bpf, where capture would mount a bpffs itself; in the new mount
    // namespace nothing is mounted there (whatever the host has is unmounted, in that namespace only).
    let pin_dir = format!("/sys/fs/bpf/capture-test-mntns-{}", std::process::id());
    let before = addresses(&ns);
    let out = unshared(
        &ns,
        &["--mount", "--propagation", "private"],
        "umount -l /sys/fs/bpf 2>/dev/null",
        &args("ebpf", &pin_dir, &cgroup),
    );
    assert_refused(&out, "is not on a bpffs", &ns, &before, std::path::Path::new(&pin_dir));
}
