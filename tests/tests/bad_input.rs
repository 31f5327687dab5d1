//! Bad input, for real: `capture` exits 2 with one line naming the flag and the value, and the namespace is
//! left exactly as it was (no rules, no BPF pins).

use std::{ffi::OsStr, os::unix::ffi::OsStrExt as _};

use testkit::{BpfPins, Cgroup, INJECTOR_DEFAULT_FLAGS, Netns, capture_bin, capture_with_env};

/// Extra arguments, env vars, and the texts the error must contain.
type BadCase = (
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
    &'static [&'static str],
);

/// Where capture pins its BPF objects; nothing may appear there on bad input.
const PIN_ROOT: &str = "/sys/fs/bpf/capture";

fn pins() -> Vec<String> {
    std::fs::read_dir(PIN_ROOT)
        .map(|d| d.flatten().map(|e| e.path().display().to_string()).collect())
        .unwrap_or_default()
}

#[test]
fn bad_input_exits_2_with_one_line_and_applies_nothing() {
    // (extra args, env, text the error must contain)
    let cases: &[BadCase] = &[
        (&["-i", "10.0.0.0/33"], &[], &["-i/--istio-service-cidr", "10.0.0.0/33"]),
        (&["-x", "*"], &[], &["-x/--istio-service-exclude-cidr", "*"]),
        (
            &["-d", "15090,99999"],
            &[],
            &["-d/--istio-local-exclude-ports", "99999"],
        ),
        (&["-p", "0"], &[], &["-p/--envoy-port", "0"]),
        (&["--backend", "nftables"], &[], &["--backend", "nftables"]),
        (&["--redirect-dns=maybe"], &[], &["--redirect-dns", "maybe"]),
        (&["-u", "1337,x!y"], &[], &["-u/--proxy-uid", "x!y"]),
        (
            &[],
            &[("ISTIO_META_DNS_CAPTURE", "yes")],
            &["ISTIO_META_DNS_CAPTURE", "yes"],
        ),
        (&["--no-such-flag"], &[], &["--no-such-flag"]),
        // Found by the fuzz test (capture-userspace/tests/fuzz.rs): clap's errors, newlines and all.
        (&["stray\nline"], &[], &["\"stray\\nline\""]),
        (&["-p"], &[], &["--envoy-port"]),
        (
            &[],
            &[("ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE", "15020\n")],
            &["env ISTIO_LOCAL_OUTBOUND_PORTS_EXCLUDE", "15020\\n"],
        ),
    ];
    let ns = Netns::new("bad");
    let rules_before = ns.iptables_rules();
    let pins_before = pins();
    // A safety net: were a case accepted, the eBPF backend would attach to this child cgroup and pin in a
    // private bpffs, not to the machine's root cgroup.
    let (cgroup, private) = (Cgroup::new("bad"), BpfPins::new("bad"));
    let place = [
        "--cgroup".to_owned(),
        cgroup.path().display().to_string(),
        "--pin-dir".to_owned(),
        private.path().display().to_string(),
    ];
    for backend in ["iptables", "ebpf"] {
        for (extra, env, needles) in cases {
            // The injector's flags first, the bad one last: a valid prefix must not be half-applied.
            let mut args = vec!["--backend", backend];
            args.extend(place.iter().map(String::as_str));
            args.extend_from_slice(INJECTOR_DEFAULT_FLAGS);
            args.extend_from_slice(extra);
            if extra.first() == Some(&"--backend") {
                args.drain(..2);
            }
            let out = capture_with_env(&ns, &args, env);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{backend} {extra:?} {env:?}: exit code; stderr: {stderr}"
            );
            assert_eq!(stderr.lines().count(), 1, "{backend} {extra:?}: not one line: {stderr}");
            for n in *needles {
                assert!(
                    stderr.contains(n),
                    "{backend} {extra:?} {env:?}: {stderr:?} does not name {n:?}"
                );
            }
            assert!(
                out.stdout.is_empty(),
                "{backend} {extra:?}: printed {:?}",
                String::from_utf8_lossy(&out.stdout)
            );
            assert_eq!(
                ns.iptables_rules(),
                rules_before,
                "{backend} {extra:?}: rules were applied"
            );
            assert_eq!(pins(), pins_before, "{backend} {extra:?}: BPF objects were pinned");
            assert!(!private.path().exists(), "{backend} {extra:?}: BPF objects were pinned");
        }
    }
}

/// Input that is not UTF-8 (an argument, an env value: `capture` used to take such a value as unset) is
/// refused in one line naming it. `--dry-run` is a safety net: were it accepted, nothing would be applied.
#[test]
fn input_that_is_not_utf8_is_refused_in_one_line() {
    let ns = Netns::new("bad8");
    let rules_before = ns.iptables_rules();
    let pins_before = pins();
    // (the `-b` value, an env var and its value, what the error must name)
    type Case<'a> = (&'a [u8], Option<(&'a str, &'a [u8])>, &'a str);
    let cases: [Case; 2] = [
        (b"80\xff", None, "command-line argument 5"),
        (b"80", Some(("REDIRECT_DNS", b"tr\xffe")), "env REDIRECT_DNS"),
    ];
    for (ports, env, needle) in cases {
        let mut cmd = ns.command(capture_bin());
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .args(["--backend", "iptables", "--dry-run", "-b"])
            .arg(OsStr::from_bytes(ports));
        if let Some((name, value)) = env {
            cmd.env(name, OsStr::from_bytes(value));
        }
        let out = cmd.output().expect("run capture");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{needle}: exit code; stderr: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{needle}: not one line: {stderr}");
        assert!(stderr.contains(needle), "{stderr:?} does not name {needle:?}");
        assert!(
            out.stdout.is_empty(),
            "{needle}: printed {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert_eq!(ns.iptables_rules(), rules_before, "rules were applied");
    assert_eq!(pins(), pins_before, "BPF objects were pinned");
}
