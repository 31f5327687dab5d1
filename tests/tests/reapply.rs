//! Applying again must always work and capture exactly as a first apply: an init container restarted, an
//! agent registering a pod again, an operator running the command twice. For both backends, IPv4-only,
//! dual-stack and IPv6-only pods, REDIRECT and TPROXY: apply twice; apply, clean, apply; apply with `::6`
//! already on lo; apply with TPROXY's rule and route already there; apply over another flag set. Every
//! step must exit 0 (the scene asserts it) and every outcome is pinned.

use std::io::ErrorKind;

use testkit::{
    POD_V4, POD_V6, REMOTE_V4, REMOTE_V6,
    diff::{
        APP, Expect,
        Expect::{Failed, Port},
        INJECTOR, PROXY, Pin, Scene, differential_after, inbound, tcp,
    },
    sa,
};

const TPROXY: &str = "-p 15001 -z 15006 -u 1337 -g 1337 -m TPROXY -i * -b * -d 15090";
/// A different flag set applied first: other mode, other lists.
const OTHER_FOR_REDIRECT: &str = "-u 1337 -g 1337 -m TPROXY -i 10.0.0.0/8 -x 192.0.2.0/24 -b 9090 -o 8080";
const OTHER_FOR_TPROXY: &str = "-u 1337 -m REDIRECT -i 10.0.0.0/8 -x 192.0.2.0/24 -b 9090 -o 8080";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stack {
    /// IPv6 capture off (the first address is IPv4).
    Ipv4,
    /// `--dual-stack`.
    Dual,
    /// No IPv4 address but loopback: IPv6 capture on by detection.
    Ipv6,
}

/// What is there before the final apply.
#[derive(Clone, Copy, Debug)]
enum Before {
    /// The same flags applied once already.
    SameApplied,
    /// Applied, then cleaned.
    Cleaned,
    /// `::6` on lo, added by someone else.
    PassthroughAddress,
    /// TPROXY's rule and route, added by someone else (istio's own `ip rule`/`ip route`).
    TproxyRoutes,
    /// Another flag set applied.
    OtherFlags,
}

const BEFORE: [Before; 5] = [
    Before::SameApplied,
    Before::Cleaned,
    Before::PassthroughAddress,
    Before::TproxyRoutes,
    Before::OtherFlags,
];

fn set_scene(scene: &Scene, stack: Stack, before: Before, flags: &str, other: &str) {
    if stack == Stack::Ipv6 {
        scene
            .pod
            .pod
            .ip(&["addr", "del", &format!("{POD_V4}/24"), "dev", "eth0"]);
    }
    match before {
        Before::SameApplied => scene.capture(None, flags),
        Before::Cleaned => {
            scene.capture(None, flags);
            scene.capture(Some("clean"), flags);
        }
        Before::PassthroughAddress => {
            scene.pod.pod.ip(&["-6", "addr", "add", "::6/128", "dev", "lo"]);
        }
        Before::TproxyRoutes => {
            for family in ["-4", "-6"] {
                scene
                    .pod
                    .pod
                    .ip(&[family, "rule", "add", "fwmark", "1337", "lookup", "133"]);
                scene
                    .pod
                    .pod
                    .ip(&[family, "route", "add", "local", "default", "dev", "lo", "table", "133"]);
            }
        }
        Before::OtherFlags => scene.capture(None, other),
    }
}

fn matrix(mode_flags: &str, other: &str) {
    let unreachable = Failed(ErrorKind::NetworkUnreachable);
    for stack in [Stack::Ipv4, Stack::Dual, Stack::Ipv6] {
        let flags = match stack {
            Stack::Dual => format!("{mode_flags} --dual-stack"),
            Stack::Ipv4 | Stack::Ipv6 => mode_flags.to_owned(),
        };
        let (pod_ip, v4_route) = match stack {
            Stack::Ipv6 => (std::net::IpAddr::from(POD_V6), false),
            Stack::Ipv4 | Stack::Dual => (POD_V4.into(), true),
        };
        let ipv6_captured = stack != Stack::Ipv4;
        let cases = [
            tcp("app to remote IPv4", APP, sa(REMOTE_V4, 8080)),
            tcp("app to remote IPv6", APP, sa(REMOTE_V6, 8080)),
            tcp("proxy to remote IPv4", PROXY, sa(REMOTE_V4, 8080)),
            tcp("proxy to own pod IP", PROXY, sa(pod_ip, 8080)),
            inbound("remote to pod IPv6", sa(POD_V6, 8080)),
        ];
        let expect: [(&str, Expect); 5] = [
            (
                "app to remote IPv4",
                if v4_route {
                    Port(15001)
                } else {
                    // The README's differences table: no route, and iptables never sees it.
                    Expect::Differs {
                        iptables: Pin::Failed(ErrorKind::NetworkUnreachable),
                        ebpf: Pin::Port(15001),
                    }
                },
            ),
            ("app to remote IPv6", Port(if ipv6_captured { 15001 } else { 8080 })),
            ("proxy to remote IPv4", if v4_route { Port(8080) } else { unreachable }),
            ("proxy to own pod IP", Port(15006)),
            ("remote to pod IPv6", Port(if ipv6_captured { 15006 } else { 8080 })),
        ];
        for before in BEFORE {
            eprintln!("{stack:?} pod, {before:?}, then {flags}");
            differential_after(
                &|scene: &Scene| set_scene(scene, stack, before, &flags, other),
                &flags,
                &cases,
                &expect,
            );
        }
    }
}

#[test]
fn redirect_mode_applies_again_over_anything() {
    matrix(INJECTOR, OTHER_FOR_REDIRECT);
}

#[test]
fn tproxy_mode_applies_again_over_anything() {
    matrix(TPROXY, OTHER_FOR_TPROXY);
}
